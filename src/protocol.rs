//! The Kafka-side wire contract: turns a consumed record into a task, commit or abort marker.
//!
//! Decoding is total: every byte sequence yields either a [`Marker`] or a [`DecodeError`]
//! with a stable `reason`, never a panic (property-tested below).

use crate::config::{HeaderNames, Protocol};

/// One consumed record, owned, with raw bytes kept so it can be dead-lettered verbatim.
///
/// Key, value and headers share one allocation: staging holds every open task, and with
/// separate `Vec`s per key, value, header name and header value the allocator overhead
/// was ~4.5x the payload for 100-byte values (docs/benchmarks-history.md, "Memory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in its partition.
    pub offset: i64,
    /// Record timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// varint(key len + 1, 0 = none), varint(value len + 1), varint(header count),
    /// per header varint(name len) varint(value len + 1); then key, value, and each
    /// header's name and value bytes.
    data: Box<[u8]>,
}

/// A header as borrowed from a [`Record`]: raw name, value (`None` = null).
pub type HeaderRef<'a> = (&'a [u8], Option<&'a [u8]>);

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    while let Some(&c) = b.get(*pos) {
        *pos += 1;
        v |= u64::from(c & 0x7f) << shift;
        if c < 0x80 {
            break;
        }
        shift += 7;
    }
    v
}

fn opt_len(x: Option<&[u8]>) -> u64 {
    x.map_or(0, |x| x.len() as u64 + 1)
}

impl Record {
    /// A record from borrowed parts (copied once, into one allocation).
    pub fn new(
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[HeaderRef<'_>],
    ) -> Record {
        let mut buf = Vec::new();
        encode_into(&mut buf, offset, timestamp_ms, key, value, headers);
        // `encode_into` reserved exactly, so this keeps the one allocation.
        Record {
            offset,
            timestamp_ms,
            data: buf.into_boxed_slice(),
        }
    }

    /// A borrowed view of this record.
    pub fn view(&self) -> RecordRef<'_> {
        RecordRef {
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            data: &self.data,
        }
    }

    /// Record key.
    pub fn key(&self) -> Option<&[u8]> {
        self.view().key()
    }

    /// Record value; `None` is a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.view().value()
    }

    /// Headers in record order; names as raw bytes because producers can send anything.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = HeaderRef<'_>> + '_ {
        self.view().headers()
    }

    /// Number of headers.
    pub fn header_count(&self) -> usize {
        self.view().header_count()
    }

    /// Bytes this record occupies in staging (key + value + headers).
    pub fn size(&self) -> u64 {
        self.view().size()
    }

    /// The first header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.view().header(name)
    }
}

/// Writes a record's parts into `buf` (cleared first) in [`Record`]'s layout and returns
/// a view of them.
///
/// The consumer loop reuses one `buf` for every record, so a task staged into its
/// transaction's [`Records`] costs no allocation of its own; an owned [`Record`] is made
/// only where one must outlive the loop (a commit marker, a dead letter).
pub fn encode_into<'b>(
    buf: &'b mut Vec<u8>,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[HeaderRef<'_>],
) -> RecordRef<'b> {
    buf.clear();
    let data = append_encoded(buf, key, value, headers);
    RecordRef {
        offset,
        timestamp_ms,
        data: &buf[data],
    }
}

/// Appends a record's parts to `buf` in [`Record`]'s layout, after whatever `buf`
/// already holds, and returns where they lie: the reader threads encode a batch of
/// records into one buffer and view each with [`RecordRef::encoded`].
pub fn append_encoded(
    buf: &mut Vec<u8>,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[HeaderRef<'_>],
) -> std::ops::Range<usize> {
    let mut len =
        varint_len(opt_len(key)) + varint_len(opt_len(value)) + varint_len(headers.len() as u64);
    len += key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
    for (k, v) in headers {
        len += varint_len(k.len() as u64) + varint_len(opt_len(*v));
        len += k.len() + v.map_or(0, <[u8]>::len);
    }
    let start = buf.len();
    buf.reserve(len);
    put_varint(buf, opt_len(key));
    put_varint(buf, opt_len(value));
    put_varint(buf, headers.len() as u64);
    for (k, v) in headers {
        put_varint(buf, k.len() as u64);
        put_varint(buf, opt_len(*v));
    }
    buf.extend_from_slice(key.unwrap_or_default());
    buf.extend_from_slice(value.unwrap_or_default());
    for (k, v) in headers {
        buf.extend_from_slice(k);
        buf.extend_from_slice(v.unwrap_or_default());
    }
    start..buf.len()
}

/// A record borrowed from a [`Record`] or from a transaction's [`Records`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Offset in its partition.
    pub offset: i64,
    /// Record timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Same layout as [`Record`]'s buffer.
    data: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// A view of bytes [`append_encoded`] wrote: `data` is exactly the range it returned.
    pub fn encoded(offset: i64, timestamp_ms: Option<i64>, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef {
            offset,
            timestamp_ms,
            data,
        }
    }

    /// Walks the length prefix: (key len+1, value len+1, header count, header lengths
    /// start, bytes start).
    fn layout(&self) -> (u64, u64, usize, usize, usize) {
        let d = self.data;
        let mut pos = 0;
        let k = get_varint(d, &mut pos);
        let v = get_varint(d, &mut pos);
        let n = get_varint(d, &mut pos) as usize;
        let lens = pos;
        for _ in 0..n {
            get_varint(d, &mut pos);
            get_varint(d, &mut pos);
        }
        (k, v, n, lens, pos)
    }

    fn slice(&self, at: usize, len_plus_one: u64) -> Option<&'a [u8]> {
        (len_plus_one > 0).then(|| &self.data[at..at + len_plus_one as usize - 1])
    }

    /// Record key.
    pub fn key(&self) -> Option<&'a [u8]> {
        let (k, _, _, _, start) = self.layout();
        self.slice(start, k)
    }

    /// Record value; `None` is a tombstone.
    pub fn value(&self) -> Option<&'a [u8]> {
        let (k, v, _, _, start) = self.layout();
        self.slice(start + k.saturating_sub(1) as usize, v)
    }

    /// Headers in record order; names as raw bytes because producers can send anything.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = HeaderRef<'a>> + 'a {
        self.parts().2
    }

    /// Key, value and headers from one walk of the length prefix; each accessor above
    /// walks it again, which showed in the per-record instruction counts.
    #[allow(clippy::type_complexity)]
    pub fn parts(
        &self,
    ) -> (
        Option<&'a [u8]>,
        Option<&'a [u8]>,
        impl ExactSizeIterator<Item = HeaderRef<'a>> + 'a,
    ) {
        let this = *self;
        let (k, v, n, mut lens, start) = this.layout();
        let key = this.slice(start, k);
        let value = this.slice(start + k.saturating_sub(1) as usize, v);
        let mut at = start + k.saturating_sub(1) as usize + v.saturating_sub(1) as usize;
        let headers = (0..n).map(move |_| {
            let name_len = get_varint(this.data, &mut lens) as usize;
            let value_len = get_varint(this.data, &mut lens);
            let name = &this.data[at..at + name_len];
            at += name_len;
            let value = this.slice(at, value_len);
            at += value_len.saturating_sub(1) as usize;
            (name, value)
        });
        (key, value, headers)
    }

    /// Number of headers.
    pub fn header_count(&self) -> usize {
        self.layout().2
    }

    /// Bytes this record occupies in staging (key + value + headers).
    pub fn size(&self) -> u64 {
        (self.data.len() - self.layout().4) as u64
    }

    /// The first header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<Option<&'a [u8]>> {
        self.headers()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// An owned copy.
    pub fn to_record(&self) -> Record {
        Record {
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            data: self.data.into(),
        }
    }
}

/// A transaction's records back to back in one growable buffer.
///
/// Staging holds every task of every open transaction. One `Box` per record in a `Vec`
/// cost the allocator's rounding per record plus the `Vec`'s doubling slack, about 2x the
/// payload for 100-byte values; here a transaction is one allocation that grows by an
/// eighth, so the slack stays under 12.5 % (docs/benchmarks-history.md, "Memory").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// Per record: varint(offset, zigzag), varint(data len × 2 + 1 if a timestamp
    /// follows), varint(timestamp, zigzag) if any, then the data in [`Record`]'s layout.
    buf: Vec<u8>,
    len: usize,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

impl Records {
    /// No records.
    pub fn new() -> Records {
        Records::default()
    }

    /// Appends a copy of `rec`.
    pub fn push<'r>(&mut self, rec: impl Into<RecordRef<'r>>) {
        let rec = rec.into();
        let len_flag = ((rec.data.len() as u64) << 1) | u64::from(rec.timestamp_ms.is_some());
        let extra = varint_len(zigzag(rec.offset))
            + varint_len(len_flag)
            + rec.timestamp_ms.map_or(0, |t| varint_len(zigzag(t)))
            + rec.data.len();
        let (len, cap) = (self.buf.len(), self.buf.capacity());
        if len + extra > cap {
            // Exact growth by at least an eighth: amortised linear copying, small slack.
            // Room for more records saved 300-400 instructions per record but cost up to
            // 2x staged memory for small transactions, which the budget does not see
            // (docs/benchmarks-history.md, change 12).
            let target = (len + extra).max(cap + cap / 8);
            self.buf.reserve_exact(target - len);
        }
        put_varint(&mut self.buf, zigzag(rec.offset));
        put_varint(&mut self.buf, len_flag);
        if let Some(t) = rec.timestamp_ms {
            put_varint(&mut self.buf, zigzag(t));
        }
        self.buf.extend_from_slice(rec.data);
        self.len += 1;
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the buffer in use: the records' bytes plus a few bytes of framing each.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// The records in the order they were pushed.
    pub fn iter(&self) -> RecordsIter<'_> {
        RecordsIter {
            buf: &self.buf,
            pos: 0,
            left: self.len,
        }
    }

    /// The last record pushed.
    pub fn last(&self) -> Option<RecordRef<'_>> {
        self.iter().last()
    }
}

/// Iterator over [`Records`].
#[derive(Debug, Clone)]
pub struct RecordsIter<'a> {
    buf: &'a [u8],
    pos: usize,
    left: usize,
}

impl<'a> Iterator for RecordsIter<'a> {
    type Item = RecordRef<'a>;

    fn next(&mut self) -> Option<RecordRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let offset = unzigzag(get_varint(self.buf, &mut self.pos));
        let len_flag = get_varint(self.buf, &mut self.pos);
        let timestamp_ms =
            (len_flag & 1 == 1).then(|| unzigzag(get_varint(self.buf, &mut self.pos)));
        let n = (len_flag >> 1) as usize;
        let data = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Some(RecordRef {
            offset,
            timestamp_ms,
            data,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for RecordsIter<'_> {}

impl<'a> IntoIterator for &'a Records {
    type Item = RecordRef<'a>;
    type IntoIter = RecordsIter<'a>;

    fn into_iter(self) -> RecordsIter<'a> {
        self.iter()
    }
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(r: &'a Record) -> RecordRef<'a> {
        r.view()
    }
}

impl From<RecordRef<'_>> for Records {
    fn from(r: RecordRef<'_>) -> Records {
        let mut rs = Records::new();
        rs.push(r);
        rs
    }
}

impl From<Record> for Records {
    fn from(r: Record) -> Records {
        Records::from(r.view())
    }
}

impl FromIterator<Record> for Records {
    fn from_iter<I: IntoIterator<Item = Record>>(iter: I) -> Records {
        let mut rs = Records::new();
        for r in iter {
            rs.push(&r);
        }
        rs
    }
}

/// What a record means to the transaction protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Part of a transaction: stage it.
    Task,
    /// End of a transaction: deliver it; `count` is the task count the producer declared.
    Commit {
        /// Declared number of tasks (`txn-count`), if the producer sent one.
        count: Option<u64>,
    },
    /// Discard the transaction (`abort`, or `clear` in the key-prefix protocol).
    Abort,
}

/// A decoded record: which transaction and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker<'a> {
    /// Transaction id, borrowed from the record (most records are tasks of a transaction
    /// already open, and need no owned copy).
    pub id: &'a str,
    /// Task, commit or abort.
    pub kind: Kind,
}

/// Why a record cannot take part in a transaction. Each is dead-lettered with its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No `txn-type` header.
    #[error("missing header {0:?}")]
    MissingType(String),
    /// `txn-type` is not task, commit or abort.
    #[error("unknown transaction type {0:?}")]
    UnknownType(String),
    /// Neither an id header nor a key.
    #[error("no transaction id: header {0:?} and key are both absent or empty")]
    MissingId(String),
    /// The key does not start with `task-`, `commit-` or `clear-`.
    #[error("key {0:?} has no task-/commit-/clear- prefix")]
    BadKeyPrefix(String),
    /// Key, header name or header value is not UTF-8.
    #[error("{0} is not valid utf-8")]
    NotUtf8(String),
    /// `txn-count` is not a non-negative integer.
    #[error("invalid {0} value {1:?}")]
    InvalidCount(String, String),
}

impl DecodeError {
    /// Stable label for metrics and the `txn-dlq-reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::MissingType(_) => "missing_type",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::MissingId(_) => "missing_id",
            DecodeError::BadKeyPrefix(_) => "bad_key_prefix",
            DecodeError::NotUtf8(_) => "not_utf8",
            DecodeError::InvalidCount(..) => "invalid_count",
        }
    }
}

/// A record whose marker fields do not decode: why, and the transaction id when that
/// part could be read (the record then belongs to, and poisons, that id's instance).
pub type Invalid<'a> = (DecodeError, Option<&'a str>);

/// Decodes `record` under `protocol`; the marker borrows the id from the record.
///
/// Only the marker fields must decode: the first header of each marker name (id, type,
/// count) and, where it carries the id, the key. Every other byte is data for the app,
/// delivered losslessly. One pass over the headers picks out the marker headers: this runs
/// for every consumed record, and a lookup per header name walked the record's layout
/// three times.
///
/// # Errors
/// [`Invalid`]: the reason, and the id when the id itself could be read.
pub fn decode<'a>(
    record: impl Into<RecordRef<'a>>,
    protocol: Protocol,
    names: &HeaderNames,
) -> Result<Marker<'a>, Invalid<'a>> {
    let (key, _, headers) = record.into().parts();
    // Raw values of the first header of each marker name; `Some(None)` is a null value.
    type Slot<'s> = Option<Option<&'s [u8]>>;
    let (mut kind_h, mut id_h, mut count_h): (Slot<'_>, Slot<'_>, Slot<'_>) = (None, None, None);
    for (name, value) in headers {
        for (wanted, slot) in [
            (&names.kind, &mut kind_h),
            (&names.id, &mut id_h),
            (&names.count, &mut count_h),
        ] {
            if slot.is_none() && name == wanted.as_bytes() {
                *slot = Some(value);
            }
        }
    }
    // A header with a null value counts as absent.
    let (kind_h, id_h, count_h) = (kind_h.flatten(), id_h.flatten(), count_h.flatten());
    let text = |v: &'a [u8], what: &str| {
        std::str::from_utf8(v).map_err(|_| DecodeError::NotUtf8(format!("header {what:?}")))
    };
    let count = |id: &'a str| -> Result<Option<u64>, Invalid<'a>> {
        match count_h {
            None => Ok(None),
            Some(v) => {
                // A count that is not text does not parse either: the record is still its
                // transaction's commit, with an invalid count.
                let s = std::str::from_utf8(v).map_err(|_| {
                    (
                        DecodeError::InvalidCount(
                            names.count.clone(),
                            String::from_utf8_lossy(&v[..v.len().min(64)]).into_owned(),
                        ),
                        Some(id),
                    )
                })?;
                s.trim().parse::<u64>().map(Some).map_err(|_| {
                    (
                        DecodeError::InvalidCount(names.count.clone(), truncate(s, 64)),
                        Some(id),
                    )
                })
            }
        }
    };
    match protocol {
        Protocol::Headers => {
            // The id first: a record whose type is unreadable still belongs to it.
            let id = match id_h {
                Some(v) if !v.is_empty() => text(v, &names.id).map_err(|e| (e, None))?,
                _ => match key {
                    Some(k) if !k.is_empty() => std::str::from_utf8(k).map_err(|_| {
                        (DecodeError::NotUtf8("the record key (the id)".into()), None)
                    })?,
                    _ => return Err((DecodeError::MissingId(names.id.clone()), None)),
                },
            };
            let kind = match kind_h {
                None => return Err((DecodeError::MissingType(names.kind.clone()), Some(id))),
                Some(v) => {
                    let t = text(v, &names.kind).map_err(|e| (e, Some(id)))?;
                    // Case-insensitive without allocating (this runs for every record).
                    let k = t.trim();
                    if k.eq_ignore_ascii_case("task") {
                        Kind::Task
                    } else if k.eq_ignore_ascii_case("commit") {
                        Kind::Commit { count: count(id)? }
                    } else if k.eq_ignore_ascii_case("abort") || k.eq_ignore_ascii_case("clear") {
                        Kind::Abort
                    } else {
                        return Err((DecodeError::UnknownType(truncate(t, 64)), Some(id)));
                    }
                }
            };
            Ok(Marker { id, kind })
        }
        Protocol::KeyPrefix => {
            let key = match key {
                Some(k) if !k.is_empty() => std::str::from_utf8(k)
                    .map_err(|_| (DecodeError::NotUtf8("the record key".into()), None))?,
                _ => return Err((DecodeError::MissingId("key".into()), None)),
            };
            let (kind, id) = if let Some(id) = key.strip_prefix("task-") {
                (Kind::Task, id)
            } else if let Some(id) = key.strip_prefix("commit-") {
                (Kind::Commit { count: None }, id)
            } else if let Some(id) = key.strip_prefix("clear-") {
                (Kind::Abort, id)
            } else if let Some(id) = key.strip_prefix("abort-") {
                (Kind::Abort, id)
            } else {
                return Err((DecodeError::BadKeyPrefix(truncate(key, 64)), None));
            };
            if id.is_empty() {
                return Err((DecodeError::MissingId("key".into()), None));
            }
            let kind = match kind {
                Kind::Commit { .. } => Kind::Commit { count: count(id)? },
                k => k,
            };
            Ok(Marker { id, kind })
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> HeaderNames {
        HeaderNames {
            id: "txn-id".into(),
            kind: "txn-type".into(),
            count: "txn-count".into(),
        }
    }

    fn rec(key: Option<&[u8]>, headers: &[(&str, &[u8])]) -> Record {
        let h: Vec<HeaderRef<'_>> = headers
            .iter()
            .map(|(k, v)| (k.as_bytes(), Some(*v)))
            .collect();
        Record::new(7, None, key, Some(b"v"), &h)
    }

    /// Decodes and owns the outcome, so a test can decode a temporary record.
    fn dec(r: Record, p: Protocol, n: &HeaderNames) -> Result<(String, Kind), DecodeError> {
        decode(&r, p, n)
            .map(|m| (m.id.to_string(), m.kind))
            .map_err(|(e, _)| e)
    }

    fn dec_full(
        r: &Record,
        p: Protocol,
        n: &HeaderNames,
    ) -> Result<(String, Kind), (DecodeError, Option<String>)> {
        decode(r, p, n)
            .map(|m| (m.id.to_string(), m.kind))
            .map_err(|(e, id)| (e, id.map(str::to_string)))
    }

    #[test]
    fn headers_protocol() {
        let n = names();
        let m = dec(
            rec(Some(b"k"), &[("txn-type", b"task"), ("txn-id", b"a")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(m, ("a".to_string(), Kind::Task));
        let m = dec(
            rec(Some(b"k"), &[("txn-type", b"commit"), ("txn-count", b"3")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(m, ("k".to_string(), Kind::Commit { count: Some(3) }));
        let m = dec(
            rec(Some(b"k"), &[("txn-type", b"abort")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(m.1, Kind::Abort);
        let e = dec(rec(Some(b"k"), &[]), Protocol::Headers, &n).unwrap_err();
        assert_eq!(e.reason(), "missing_type");
        let e = dec(
            rec(Some(b"k"), &[("txn-type", b"maybe")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "unknown_type");
        let e = dec(rec(None, &[("txn-type", b"task")]), Protocol::Headers, &n).unwrap_err();
        assert_eq!(e.reason(), "missing_id");
        let e = dec(
            rec(Some(b"k"), &[("txn-type", b"commit"), ("txn-count", b"x")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "invalid_count");
        // The key is the id only when the id header is absent; then it must be text.
        let e = dec(
            rec(Some(&[0xff, 0xfe]), &[("txn-type", b"task")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "not_utf8");
        // Otherwise bytes that are not UTF-8 are data: a key, a header value, a name.
        let m = dec(
            rec(
                Some(&[0xff, 0xfe]),
                &[
                    ("txn-type", b"task"),
                    ("txn-id", b"o-1"),
                    ("x-amqp", &[0xA1, 0x03, 0x61, 0x62, 0x63]),
                ],
            ),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(m, ("o-1".to_string(), Kind::Task));
        let raw = Record::new(
            1,
            None,
            Some(b"k"),
            None,
            &[
                (&[0xc3, 0x28], Some(&[0xff])),
                (b"txn-type", Some(b"commit")),
            ],
        );
        assert_eq!(
            dec(raw, Protocol::Headers, &n).unwrap(),
            ("k".to_string(), Kind::Commit { count: None })
        );
        // A marker field that does not decode names the id when the id itself could be read.
        let bad_type = rec(Some(b"k"), &[("txn-type", &[0xc3]), ("txn-id", b"o-2")]);
        let (e, id) = dec_full(&bad_type, Protocol::Headers, &n).unwrap_err();
        assert_eq!((e.reason(), id.as_deref()), ("not_utf8", Some("o-2")));
        let unknown = rec(None, &[("txn-type", b"comit"), ("txn-id", b"o-3")]);
        let (e, id) = dec_full(&unknown, Protocol::Headers, &n).unwrap_err();
        assert_eq!((e.reason(), id.as_deref()), ("unknown_type", Some("o-3")));
        let binary_id = rec(None, &[("txn-type", b"task"), ("txn-id", &[0xff])]);
        let (e, id) = dec_full(&binary_id, Protocol::Headers, &n).unwrap_err();
        assert_eq!((e.reason(), id), ("not_utf8", None));
    }

    #[test]
    fn key_prefix_protocol() {
        let n = names();
        let d = |k: &[u8]| dec(rec(Some(k), &[]), Protocol::KeyPrefix, &n);
        assert_eq!(
            d(b"task-order-1").unwrap(),
            ("order-1".to_string(), Kind::Task)
        );
        assert_eq!(
            d(b"commit-order-1").unwrap().1,
            Kind::Commit { count: None }
        );
        assert_eq!(d(b"clear-order-1").unwrap().1, Kind::Abort);
        assert_eq!(d(b"order-1").unwrap_err().reason(), "bad_key_prefix");
        assert_eq!(d(b"task-").unwrap_err().reason(), "missing_id");
    }

    /// The decoding rules written plainly (a lookup per marker header): the property
    /// below holds the one-pass decoder to the same outcome on any record.
    fn decode_reference(
        record: &Record,
        protocol: Protocol,
        names: &HeaderNames,
    ) -> Result<(String, Kind), (DecodeError, Option<String>)> {
        let first = |name: &str| -> Option<&[u8]> {
            record
                .headers()
                .find(|(n, _)| *n == name.as_bytes())
                .and_then(|(_, v)| v)
        };
        let text = |name: &str| -> Result<Option<String>, DecodeError> {
            match first(name) {
                None => Ok(None),
                Some(v) => std::str::from_utf8(v)
                    .map(|s| Some(s.to_string()))
                    .map_err(|_| DecodeError::NotUtf8(format!("header {name:?}"))),
            }
        };
        let count = |id: &str| -> Result<Option<u64>, (DecodeError, Option<String>)> {
            let raw = first(&names.count);
            let as_text = text(&names.count).map_err(|_| {
                let v = raw.unwrap_or_default();
                (
                    DecodeError::InvalidCount(
                        names.count.clone(),
                        String::from_utf8_lossy(&v[..v.len().min(64)]).into_owned(),
                    ),
                    Some(id.to_string()),
                )
            })?;
            match as_text {
                None => Ok(None),
                Some(s) => s.trim().parse::<u64>().map(Some).map_err(|_| {
                    (
                        DecodeError::InvalidCount(names.count.clone(), truncate(&s, 64)),
                        Some(id.to_string()),
                    )
                }),
            }
        };
        match protocol {
            Protocol::Headers => {
                let id = match first(&names.id) {
                    Some(v) if !v.is_empty() => {
                        text(&names.id).map_err(|e| (e, None))?.unwrap_or_default()
                    }
                    _ => match record.key() {
                        Some(k) if !k.is_empty() => std::str::from_utf8(k)
                            .map_err(|_| {
                                (DecodeError::NotUtf8("the record key (the id)".into()), None)
                            })?
                            .to_string(),
                        _ => return Err((DecodeError::MissingId(names.id.clone()), None)),
                    },
                };
                let t = match text(&names.kind).map_err(|e| (e, Some(id.clone())))? {
                    None => return Err((DecodeError::MissingType(names.kind.clone()), Some(id))),
                    Some(t) => t,
                };
                let k = t.trim().to_ascii_lowercase();
                let kind = match k.as_str() {
                    "task" => Kind::Task,
                    "commit" => Kind::Commit { count: count(&id)? },
                    "abort" | "clear" => Kind::Abort,
                    _ => return Err((DecodeError::UnknownType(truncate(&t, 64)), Some(id))),
                };
                Ok((id, kind))
            }
            Protocol::KeyPrefix => {
                let key = match record.key() {
                    Some(k) if !k.is_empty() => std::str::from_utf8(k)
                        .map_err(|_| (DecodeError::NotUtf8("the record key".into()), None))?,
                    _ => return Err((DecodeError::MissingId("key".into()), None)),
                };
                let (kind, id) = if let Some(id) = key.strip_prefix("task-") {
                    (Kind::Task, id)
                } else if let Some(id) = key.strip_prefix("commit-") {
                    (Kind::Commit { count: None }, id)
                } else if let Some(id) = key.strip_prefix("clear-") {
                    (Kind::Abort, id)
                } else if let Some(id) = key.strip_prefix("abort-") {
                    (Kind::Abort, id)
                } else {
                    return Err((DecodeError::BadKeyPrefix(truncate(key, 64)), None));
                };
                if id.is_empty() {
                    return Err((DecodeError::MissingId("key".into()), None));
                }
                let kind = match kind {
                    Kind::Commit { .. } => Kind::Commit { count: count(id)? },
                    k => k,
                };
                Ok((id.to_string(), kind))
            }
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let bytes = || prop::collection::vec(any::<u8>(), 0..24);
        let header_name = prop_oneof![
            Just(b"txn-type".to_vec()),
            Just(b"txn-id".to_vec()),
            Just(b"txn-count".to_vec()),
            bytes(),
        ];
        let header_value = prop_oneof![
            Just(Some(b"task".to_vec())),
            Just(Some(b"commit".to_vec())),
            Just(Some(b"abort".to_vec())),
            Just(None),
            bytes().prop_map(Some),
        ];
        (
            any::<i64>(),
            prop::option::of(bytes()),
            prop::option::of(bytes()),
            prop::collection::vec((header_name, header_value), 0..5),
        )
            .prop_map(|(offset, key, value, headers)| {
                let h: Vec<HeaderRef<'_>> = headers
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_deref()))
                    .collect();
                Record::new(offset, None, key.as_deref(), value.as_deref(), &h)
            })
    }

    #[test]
    fn records_round_trip_every_field_through_growth() {
        let owned: Vec<Record> = (0..200i64)
            .map(|i| {
                let value = vec![i as u8; (i as usize * 7) % 300];
                let name = format!("h{i}");
                let h: [HeaderRef<'_>; 2] = [(name.as_bytes(), Some(b"x")), (b"null", None)];
                let ts = match i % 4 {
                    0 => None,
                    1 => Some(1_700_000_000_000 + i),
                    2 => Some(i64::MIN + i),
                    _ => Some(-i),
                };
                let key = (i % 4 != 0).then_some(&b"k"[..]);
                Record::new(i * 1_000_003 - 5, ts, key, Some(&value), &h)
            })
            .collect();
        let mut rs = Records::new();
        assert!(rs.is_empty() && rs.last().is_none());
        for r in &owned {
            rs.push(r);
        }
        assert_eq!(rs.len(), 200);
        assert_eq!(rs.iter().len(), 200);
        for (a, b) in owned.iter().zip(rs.iter()) {
            assert_eq!(a.view(), b);
            assert_eq!(&b.to_record(), a);
            assert_eq!(b.key(), a.key());
            assert_eq!(b.value(), a.value());
            assert_eq!(
                b.headers().collect::<Vec<_>>(),
                a.headers().collect::<Vec<_>>()
            );
        }
        assert_eq!(rs.last().map(|r| r.offset), Some(199 * 1_000_003 - 5));
        // Growth by an eighth keeps the slack small.
        let used: usize = rs.buf.len();
        assert!(
            rs.buf.capacity() <= used + used / 8 + 1,
            "{} of {}",
            used,
            rs.buf.capacity()
        );
    }

    #[test]
    fn a_transactions_buffer_holds_at_most_an_eighth_of_unused_room() {
        // The staged-bytes budget counts bytes used, not capacity: the README's sizing
        // allows about 10 % over it, whatever the transaction's shape.
        for size in [10usize, 1000, 1 << 20] {
            let r = Record::new(7, Some(1), Some(b"k"), Some(&vec![1u8; size]), &[]);
            let mut rs = Records::new();
            for n in 1..=40 {
                rs.push(&r);
                let (used, cap) = (rs.buf.len(), rs.buf.capacity());
                assert!(
                    cap <= used + used / 8,
                    "{n} records of {size} B: {cap} for {used}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn records_give_back_what_was_pushed(
            rs in prop::collection::vec((arb_record(), prop::option::of(any::<i64>())), 0..20)
        ) {
            let owned: Vec<Record> = rs
                .into_iter()
                .map(|(mut r, ts)| {
                    r.timestamp_ms = ts;
                    r
                })
                .collect();
            let buf: Records = owned.iter().cloned().collect();
            prop_assert_eq!(buf.len(), owned.len());
            let back: Vec<Record> = buf.iter().map(|r| r.to_record()).collect();
            prop_assert_eq!(back, owned);
        }

        #[test]
        fn decode_agrees_with_the_reference_decoder(r in arb_record()) {
            for p in [Protocol::Headers, Protocol::KeyPrefix] {
                prop_assert_eq!(dec_full(&r, p, &names()), decode_reference(&r, p, &names()));
            }
        }

        #[test]
        fn decode_never_panics_and_ids_are_never_empty(r in arb_record()) {
            for p in [Protocol::Headers, Protocol::KeyPrefix] {
                if let Ok(m) = decode(&r, p, &names()) {
                    prop_assert!(!m.id.is_empty());
                }
            }
        }
    }
}
