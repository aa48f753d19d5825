//! The Kafka-side wire contract: turns a consumed record into a task, commit or abort marker.
//!
//! Decoding is total: every byte sequence yields either a [`Marker`] or a [`DecodeError`]
//! with a stable `reason`, never a panic (property-tested below).

use crate::config::{HeaderNames, Protocol};

/// One consumed record, owned, with raw bytes kept so it can be dead-lettered verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in its partition.
    pub offset: i64,
    /// Record timestamp in milliseconds since the epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers in record order; names as raw bytes because producers can send anything.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Record {
    /// Bytes this record occupies in staging (key + value + headers).
    pub fn size(&self) -> u64 {
        let h: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum();
        (self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + h) as u64
    }

    /// The first header named `name`, if any.
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_deref())
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
pub struct Marker {
    /// Transaction id.
    pub id: String,
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

/// Decodes `record` under `protocol`.
pub fn decode(
    record: &Record,
    protocol: Protocol,
    names: &HeaderNames,
) -> Result<Marker, DecodeError> {
    // Everything a task carries to the app must be text, so check it up front.
    for (name, value) in &record.headers {
        let name =
            std::str::from_utf8(name).map_err(|_| DecodeError::NotUtf8("a header name".into()))?;
        if let Some(v) = value {
            if std::str::from_utf8(v).is_err() {
                return Err(DecodeError::NotUtf8(format!("header {name:?}")));
            }
        }
    }
    let key = match &record.key {
        Some(k) => Some(
            std::str::from_utf8(k).map_err(|_| DecodeError::NotUtf8("the record key".into()))?,
        ),
        None => None,
    };
    let header_text = |name: &str| -> Option<&str> {
        record
            .header(name)
            .flatten()
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let count = || -> Result<Option<u64>, DecodeError> {
        match header_text(&names.count) {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| DecodeError::InvalidCount(names.count.clone(), s.to_string())),
        }
    };
    match protocol {
        Protocol::Headers => {
            let kind = match header_text(&names.kind) {
                None => return Err(DecodeError::MissingType(names.kind.clone())),
                Some(t) => match t.trim().to_ascii_lowercase().as_str() {
                    "task" => Kind::Task,
                    "commit" => Kind::Commit { count: count()? },
                    "abort" | "clear" => Kind::Abort,
                    _ => return Err(DecodeError::UnknownType(t.to_string())),
                },
            };
            let id = match header_text(&names.id) {
                Some(id) if !id.is_empty() => id,
                _ => match key {
                    Some(k) if !k.is_empty() => k,
                    _ => return Err(DecodeError::MissingId(names.id.clone())),
                },
            };
            Ok(Marker {
                id: id.to_string(),
                kind,
            })
        }
        Protocol::KeyPrefix => {
            let key = match key {
                Some(k) if !k.is_empty() => k,
                _ => return Err(DecodeError::MissingId("key".into())),
            };
            let (kind, id) = if let Some(id) = key.strip_prefix("task-") {
                (Kind::Task, id)
            } else if let Some(id) = key.strip_prefix("commit-") {
                (Kind::Commit { count: count()? }, id)
            } else if let Some(id) = key.strip_prefix("clear-") {
                (Kind::Abort, id)
            } else if let Some(id) = key.strip_prefix("abort-") {
                (Kind::Abort, id)
            } else {
                return Err(DecodeError::BadKeyPrefix(truncate(key, 64)));
            };
            if id.is_empty() {
                return Err(DecodeError::MissingId("key".into()));
            }
            Ok(Marker {
                id: id.to_string(),
                kind,
            })
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
        Record {
            offset: 7,
            timestamp_ms: None,
            key: key.map(<[u8]>::to_vec),
            value: Some(b"v".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.to_vec())))
                .collect(),
        }
    }

    #[test]
    fn headers_protocol() {
        let n = names();
        let m = decode(
            &rec(Some(b"k"), &[("txn-type", b"task"), ("txn-id", b"a")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(
            m,
            Marker {
                id: "a".into(),
                kind: Kind::Task
            }
        );
        let m = decode(
            &rec(Some(b"k"), &[("txn-type", b"commit"), ("txn-count", b"3")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(
            m,
            Marker {
                id: "k".into(),
                kind: Kind::Commit { count: Some(3) }
            }
        );
        let m = decode(
            &rec(Some(b"k"), &[("txn-type", b"abort")]),
            Protocol::Headers,
            &n,
        )
        .unwrap();
        assert_eq!(m.kind, Kind::Abort);
        let e = decode(&rec(Some(b"k"), &[]), Protocol::Headers, &n).unwrap_err();
        assert_eq!(e.reason(), "missing_type");
        let e = decode(
            &rec(Some(b"k"), &[("txn-type", b"maybe")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "unknown_type");
        let e = decode(&rec(None, &[("txn-type", b"task")]), Protocol::Headers, &n).unwrap_err();
        assert_eq!(e.reason(), "missing_id");
        let e = decode(
            &rec(Some(b"k"), &[("txn-type", b"commit"), ("txn-count", b"x")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "invalid_count");
        let e = decode(
            &rec(Some(&[0xff, 0xfe]), &[("txn-type", b"task")]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "not_utf8");
        let e = decode(
            &rec(Some(b"k"), &[("txn-type", b"task"), ("h", &[0xc3])]),
            Protocol::Headers,
            &n,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "not_utf8");
    }

    #[test]
    fn key_prefix_protocol() {
        let n = names();
        let d = |k: &[u8]| decode(&rec(Some(k), &[]), Protocol::KeyPrefix, &n);
        assert_eq!(
            d(b"task-order-1").unwrap(),
            Marker {
                id: "order-1".into(),
                kind: Kind::Task
            }
        );
        assert_eq!(
            d(b"commit-order-1").unwrap().kind,
            Kind::Commit { count: None }
        );
        assert_eq!(d(b"clear-order-1").unwrap().kind, Kind::Abort);
        assert_eq!(d(b"order-1").unwrap_err().reason(), "bad_key_prefix");
        assert_eq!(d(b"task-").unwrap_err().reason(), "missing_id");
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
            .prop_map(|(offset, key, value, headers)| Record {
                offset,
                timestamp_ms: None,
                key,
                value,
                headers,
            })
    }

    proptest! {
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
