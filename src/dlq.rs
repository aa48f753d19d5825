//! The dead-letter topic: failed transactions are written back as their original records
//! (tasks, then the marker) with `txn-dlq-*` headers, so re-producing them replays them.
//!
//! A dead-letter record carries exactly one set of `txn-dlq-*` headers, the latest
//! failure's: those of an earlier failure (a dead letter replayed that failed again) are
//! dropped. It is stamped with the time of the write, not its source's timestamp, which
//! goes in `txn-dlq-timestamp`: with the source's time, retention could delete a dead
//! letter right after its source offset was committed.
//!
//! An idempotent producer writes them; the pipeline commits past a dead-lettered
//! transaction only after every record is acknowledged.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Config;
use crate::kafka;
use crate::protocol::{RecordRef, Records};

/// Prefix of the headers a dead-letter write adds. The app never sees them as task
/// headers, and a new dead-letter write replaces them.
pub const DLQ_HEADER_PREFIX: &str = "txn-dlq-";

/// Records of one failed transaction (or one bad record) and why they failed.
#[derive(Debug, Clone)]
pub struct DeadTxn {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Transaction id, when one is known.
    pub id: Option<String>,
    /// Records in source order: tasks, then the marker if there was one.
    pub records: Records,
    /// `txn-dlq-reason`: a stable label (`rejected`, `expired`, `too_large`, ...).
    pub reason: &'static str,
    /// `txn-dlq-error`: what went wrong, for a human.
    pub error: String,
    /// `txn-dlq-attempts`: HTTP attempts made.
    pub attempts: u32,
    /// The offset `txn-dlq-source` names, when not the last record's: the first record of
    /// an instance dead-lettered while open, shared by every part of it written later.
    pub source: Option<i64>,
}

impl DeadTxn {
    /// Offset named in `txn-dlq-source`: [`DeadTxn::source`] if set, else the last
    /// record's (the marker's, for a whole transaction).
    pub fn source_offset(&self) -> i64 {
        self.source
            .unwrap_or_else(|| self.records.last().map_or(-1, |r| r.offset))
    }
}

/// Why a dead-letter write failed. The caller retries every one (the source offset waits
/// for the write); [`DlqError::kind`] says which need an operator.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The topic does not exist or its metadata is unavailable.
    #[error("dead-letter topic {topic} unavailable: {error}")]
    Topic {
        /// Topic name.
        topic: String,
        /// Underlying error.
        error: String,
    },
    /// The broker did not acknowledge a record.
    #[error("dead-letter write to {topic} failed ({kind}): {error}")]
    Write {
        /// Topic name.
        topic: String,
        /// [`write_error_kind`] of the error.
        kind: &'static str,
        /// Underlying error.
        error: String,
    },
}

impl DlqError {
    /// `unknown_topic`, `authorization`, `too_large`, `invalid_record` or `transient`:
    /// the label of `dead_letter_write_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            DlqError::Topic { .. } => "unknown_topic",
            DlqError::Write { kind, .. } => kind,
        }
    }

    /// Whether trying again may help without an operator: `false` for a missing topic or
    /// a denied write (the offset then waits, counted and logged, until it is fixed).
    /// Records too large or invalid never get here: they are rewritten as stubs.
    pub fn is_retryable(&self) -> bool {
        self.kind() == "transient"
    }
}

/// The kind of a producer error, for metrics and the write policy.
pub fn write_error_kind(e: &rdkafka::error::KafkaError) -> &'static str {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => "unknown_topic",
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed) => "authorization",
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize) => {
            "too_large"
        }
        Some(C::InvalidRecord | C::InvalidMessage | C::InvalidTimestamp) => "invalid_record",
        _ => "transient",
    }
}

/// How far the write of one dead-letter group got, kept across the lane's retries so
/// that acknowledged records are not written again.
#[derive(Debug, Default)]
pub struct WriteProgress {
    acked: std::collections::HashSet<i64>,
    stubs: std::collections::HashSet<i64>,
    one_by_one: bool,
}

/// Bytes a dead-letter record may take before it is written as a stub: librdkafka's
/// default `message.max.bytes` (the broker's default limit is about the same), less room
/// for the `txn-dlq-*` headers.
const DEFAULT_MAX_RECORD_BYTES: u64 = 1_000_000 - 8 * 1024;

/// Writer of dead-lettered transactions.
#[derive(Clone)]
pub struct DeadLetterWriter {
    producer: FutureProducer,
    cfg: Arc<Config>,
    partitions: Arc<Mutex<HashMap<String, i32>>>,
}

impl DeadLetterWriter {
    /// An idempotent producer configured from `cfg`.
    pub fn new(cfg: Arc<Config>) -> Result<DeadLetterWriter, rdkafka::error::KafkaError> {
        let producer: FutureProducer = kafka::dlq_producer_config(&cfg).create()?;
        Ok(DeadLetterWriter {
            producer,
            cfg,
            partitions: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, DlqError> {
        if let Some(n) = self
            .partitions
            .lock()
            .ok()
            .and_then(|m| m.get(topic).copied())
        {
            return Ok(n);
        }
        let producer = self.producer.clone();
        let t = topic.to_string();
        let n = tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&t), Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let topic_md = md
                .topics()
                .iter()
                .find(|x| x.name() == t)
                .ok_or("no metadata")?;
            if let Some(err) = topic_md.error() {
                return Err(format!("{:?}", err));
            }
            match topic_md.partitions().len() {
                0 => Err("topic has no partitions (create it first)".to_string()),
                n => Ok(n as i32),
            }
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
        .map_err(|error| DlqError::Topic {
            topic: topic.to_string(),
            error,
        })?;
        if let Ok(mut m) = self.partitions.lock() {
            m.insert(topic.to_string(), n);
        }
        Ok(n)
    }

    /// Writes every record of `dead` to its dead-letter topic and waits for all acks.
    pub async fn write(
        &self,
        dead: &DeadTxn,
        progress: &mut WriteProgress,
    ) -> Result<(), DlqError> {
        let topic = self.cfg.dlq_topic_for(&dead.topic);
        let count = self.partition_count(&topic).await?;
        // One DLQ partition per transaction keeps its tasks before its marker on replay.
        let partition = dead.partition.rem_euclid(count);
        // A record that can never be written as it is (too large, refused as invalid) is
        // written as a stub without key, value or its own headers, keeping its source
        // coordinates, reason and size, so it never holds its partition. The first try
        // stubs what is over the producer's limit. A broker refuses a whole batch at once,
        // so after a refusal the records go one per request, and only a record refused on
        // its own becomes a stub. Acknowledged records are never written again.
        let max = self.max_record_bytes();
        for r in dead.records.iter() {
            if r.size() > max {
                progress.stubs.insert(r.offset);
            }
        }
        loop {
            let todo: Vec<i64> = dead
                .records
                .iter()
                .map(|r| r.offset)
                .filter(|o| !progress.acked.contains(o))
                .collect();
            let Some(&next) = todo.first() else {
                return Ok(());
            };
            let one = progress.one_by_one.then_some(next);
            match self
                .write_once(dead, &topic, partition, progress, one)
                .await
            {
                Ok(()) if one.is_none() => return Ok(()),
                Ok(()) => {}
                Err((e, refused)) if !refused.is_empty() => {
                    if todo.len() > 1 && !progress.one_by_one {
                        progress.one_by_one = true;
                        continue;
                    }
                    if refused.is_subset(&progress.stubs) {
                        // Even the stub is refused: nothing smaller can be written.
                        return Err(e);
                    }
                    tracing::warn!(topic = %dead.topic, partition = dead.partition, offsets = ?refused, error = %e, "a dead-letter record refused for its size or form on its own; writing it as a stub");
                    progress.stubs.extend(refused);
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn max_record_bytes(&self) -> u64 {
        self.cfg
            .kafka
            .get("message.max.bytes")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_MAX_RECORD_BYTES, |m| m.saturating_sub(8 * 1024))
    }

    /// One try at writing the records of `dead` not yet acknowledged (all of them, or only
    /// `one`), those in `progress.stubs` as stubs; acknowledged offsets go into
    /// `progress.acked`. On failure, the error and the offsets refused for their size or
    /// form.
    async fn write_once(
        &self,
        dead: &DeadTxn,
        topic: &str,
        partition: i32,
        progress: &mut WriteProgress,
        one: Option<i64>,
    ) -> Result<(), (DlqError, std::collections::HashSet<i64>)> {
        let stubs = &progress.stubs;
        let topic = topic.to_string();
        let source = format!("{}/{}/{}", dead.topic, dead.partition, dead.source_offset());
        let attempts = dead.attempts.to_string();
        let mut pending = Vec::with_capacity(dead.records.len());
        let mut refused = std::collections::HashSet::new();
        let fail = |e: &rdkafka::error::KafkaError| DlqError::Write {
            topic: topic.clone(),
            kind: write_error_kind(e),
            error: e.to_string(),
        };
        for rec in dead.records.iter() {
            if progress.acked.contains(&rec.offset) || one.is_some_and(|o| o != rec.offset) {
                continue;
            }
            if stubs.contains(&rec.offset) {
                let size = rec.size().to_string();
                let list = stub_headers(rec, dead, &source, &attempts, &size);
                let mut headers = OwnedHeaders::new_with_capacity(list.len());
                for (k, v) in &list {
                    headers = headers.insert(Header {
                        key: k,
                        value: v.as_deref(),
                    });
                }
                let fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                    .partition(partition)
                    .headers(headers);
                match self.producer.send_result(fr) {
                    Ok(f) => pending.push((rec.offset, f)),
                    Err((e, _)) => return Err((fail(&e), refused)),
                }
                continue;
            }
            let list = dead_letter_headers(rec, dead, &source, &attempts);
            let mut headers = OwnedHeaders::new_with_capacity(list.len());
            for (k, v) in &list {
                headers = headers.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                .partition(partition)
                .headers(headers);
            if let Some(k) = rec.key() {
                fr = fr.key(k);
            }
            if let Some(v) = rec.value() {
                fr = fr.payload(v);
            }
            // No `.timestamp(..)`: the producer stamps the write time (the source's time
            // is in `txn-dlq-timestamp`).
            match self.producer.send_result(fr) {
                Ok(f) => pending.push((rec.offset, f)),
                Err((e, _)) => {
                    if matches!(write_error_kind(&e), "too_large" | "invalid_record") {
                        refused.insert(rec.offset);
                    }
                    return Err((fail(&e), refused));
                }
            }
        }
        let mut first_error = None;
        for (offset, f) in pending {
            let e = match f.await {
                Ok(Ok(_)) => {
                    progress.acked.insert(offset);
                    continue;
                }
                Ok(Err((e, _))) => {
                    if matches!(write_error_kind(&e), "too_large" | "invalid_record") {
                        refused.insert(offset);
                    }
                    fail(&e)
                }
                Err(_) => DlqError::Write {
                    topic: topic.clone(),
                    kind: "transient",
                    error: "producer closed".into(),
                },
            };
            first_error.get_or_insert(e);
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err((e, refused)),
        }
    }
}

/// The headers of a stub for `rec`: its transaction marker headers are not known here, so
/// only the `txn-dlq-*` set, with `txn-dlq-original-size` (bytes of key, value and
/// headers) and the transaction id, when known, in `txn-dlq-txn-id`.
fn stub_headers<'a>(
    rec: RecordRef<'a>,
    dead: &'a DeadTxn,
    source: &'a str,
    attempts: &'a str,
    size: &'a str,
) -> Vec<DlqHeader<'a>> {
    let text = |s: &'a str| Some(Cow::Borrowed(s.as_bytes()));
    let mut out: Vec<DlqHeader<'a>> = Vec::with_capacity(8);
    if let Some(id) = dead.id.as_deref() {
        out.push(("txn-dlq-txn-id".into(), text(id)));
    }
    out.push(("txn-dlq-reason".into(), text(dead.reason)));
    out.push((
        "txn-dlq-error".into(),
        Some(Cow::Owned(
            format!(
                "{}; the record (offset {}) could not be written to the dead-letter topic as it was, so only this stub was",
                dead.error, rec.offset
            )
            .into_bytes(),
        )),
    ));
    out.push(("txn-dlq-source".into(), text(source)));
    out.push(("txn-dlq-attempts".into(), text(attempts)));
    out.push(("txn-dlq-original-size".into(), text(size)));
    out.push((
        "txn-dlq-original-offset".into(),
        Some(Cow::Owned(rec.offset.to_string().into_bytes())),
    ));
    if let Some(ts) = rec.timestamp_ms {
        out.push((
            "txn-dlq-timestamp".into(),
            Some(Cow::Owned(ts.to_string().into_bytes())),
        ));
    }
    out
}

/// A header of a dead-letter record: name, value (`None` = null).
type DlqHeader<'a> = (Cow<'a, str>, Option<Cow<'a, [u8]>>);

/// The headers of the dead-letter copy of `rec`: its own headers in record order
/// (repeats kept, values byte for byte) without any `txn-dlq-*` header of an earlier
/// failure, then one set describing this one: `txn-dlq-reason`, `txn-dlq-error`,
/// `txn-dlq-source`, `txn-dlq-attempts` and, when `rec` has a timestamp,
/// `txn-dlq-timestamp` (milliseconds since the epoch, decimal).
///
/// A header name that is not UTF-8 loses its invalid bytes (each becomes U+FFFD):
/// rdkafka's `Header::key` is a `&str`, so its API cannot write such a name as it was.
/// Values are bytes and are written unchanged.
fn dead_letter_headers<'a>(
    rec: RecordRef<'a>,
    dead: &'a DeadTxn,
    source: &'a str,
    attempts: &'a str,
) -> Vec<DlqHeader<'a>> {
    let mut out = Vec::with_capacity(rec.header_count() + 5);
    for (k, v) in rec.headers() {
        if k.starts_with(DLQ_HEADER_PREFIX.as_bytes()) {
            continue;
        }
        out.push((String::from_utf8_lossy(k), v.map(Cow::Borrowed)));
    }
    let text = |s: &'a str| Some(Cow::Borrowed(s.as_bytes()));
    out.push(("txn-dlq-reason".into(), text(dead.reason)));
    out.push(("txn-dlq-error".into(), text(&dead.error)));
    out.push(("txn-dlq-source".into(), text(source)));
    out.push(("txn-dlq-attempts".into(), text(attempts)));
    if let Some(ts) = rec.timestamp_ms {
        out.push((
            "txn-dlq-timestamp".into(),
            Some(Cow::Owned(ts.to_string().into_bytes())),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HeaderRef, Record};

    fn dead(records: Records) -> DeadTxn {
        DeadTxn {
            topic: "orders.tx".into(),
            partition: 0,
            id: Some("order-42".into()),
            records,
            reason: "retries_exhausted",
            error: "app answered 503".into(),
            attempts: 5,
            source: None,
        }
    }

    /// `dead_letter_headers` of the first record of `dead`, owned, for comparisons.
    fn headers_of(dead: &DeadTxn) -> Vec<(String, Option<Vec<u8>>)> {
        let rec = dead.records.iter().next().unwrap();
        dead_letter_headers(rec, dead, "orders.tx/0/9", "5")
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.map(Cow::into_owned)))
            .collect()
    }

    fn h(k: &str, v: Option<&[u8]>) -> (String, Option<Vec<u8>>) {
        (k.to_string(), v.map(<[u8]>::to_vec))
    }

    #[test]
    fn a_replayed_dead_letter_carries_one_set_of_the_latest_failure() {
        // A dead letter of an earlier failure, replayed to the main topic, failed again.
        let src: [HeaderRef<'_>; 9] = [
            (b"txn-id", Some(b"order-42")),
            (b"txn-dlq-reason", Some(b"rejected")),
            (b"b", Some(b"1")),
            (b"txn-dlq-error", Some(b"app answered 400")),
            (b"txn-dlq-source", Some(b"orders.tx/0/2")),
            (b"txn-dlq-attempts", Some(b"1")),
            (b"txn-dlq-timestamp", Some(b"1600000000000")),
            (b"a", None),
            (b"b", Some(b"2")),
        ];
        let d = dead(Record::new(7, Some(1_700_000_000_123), Some(b"k"), Some(b"v"), &src).into());
        assert_eq!(
            headers_of(&d),
            vec![
                h("txn-id", Some(b"order-42")),
                h("b", Some(b"1")),
                h("a", None),
                h("b", Some(b"2")),
                h("txn-dlq-reason", Some(b"retries_exhausted")),
                h("txn-dlq-error", Some(b"app answered 503")),
                h("txn-dlq-source", Some(b"orders.tx/0/9")),
                h("txn-dlq-attempts", Some(b"5")),
                h("txn-dlq-timestamp", Some(b"1700000000123")),
            ]
        );
    }

    #[test]
    fn binary_values_are_kept_byte_for_byte_and_a_binary_name_is_lossy() {
        let src: [HeaderRef<'_>; 3] = [
            (b"sig", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
            (b"n\xffm", Some(&[0xff])),
            // An earlier failure's header whose name is not UTF-8 goes as well.
            (b"txn-dlq-\xfe", Some(b"old")),
        ];
        // No timestamp on the source: no `txn-dlq-timestamp`.
        let d = dead(Record::new(7, None, None, None, &src).into());
        assert_eq!(
            headers_of(&d),
            vec![
                h("sig", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
                h("n\u{fffd}m", Some(&[0xff])),
                h("txn-dlq-reason", Some(b"retries_exhausted")),
                h("txn-dlq-error", Some(b"app answered 503")),
                h("txn-dlq-source", Some(b"orders.tx/0/9")),
                h("txn-dlq-attempts", Some(b"5")),
            ]
        );
    }

    #[test]
    fn every_record_gets_its_own_timestamp_and_the_shared_failure() {
        let recs: Records = vec![
            Record::new(5, Some(1_700_000_000_000), None, Some(b"t1"), &[]),
            Record::new(9, Some(0), None, None, &[(b"txn-type", Some(b"commit"))]),
        ]
        .into_iter()
        .collect();
        let d = dead(recs);
        let got: Vec<Vec<(String, Option<Vec<u8>>)>> = d
            .records
            .iter()
            .map(|r| {
                dead_letter_headers(r, &d, "orders.tx/0/9", "5")
                    .into_iter()
                    .map(|(k, v)| (k.into_owned(), v.map(Cow::into_owned)))
                    .collect()
            })
            .collect();
        assert_eq!(
            got[0].last(),
            Some(&h("txn-dlq-timestamp", Some(b"1700000000000")))
        );
        assert_eq!(got[1].last(), Some(&h("txn-dlq-timestamp", Some(b"0"))));
        assert_eq!(got[1][0], h("txn-type", Some(b"commit")));
        assert_eq!(got[1].len(), 6);
    }
}
