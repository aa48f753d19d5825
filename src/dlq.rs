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

/// Why a dead-letter write failed. Every variant is retried by the caller.
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
    #[error("dead-letter write to {topic} failed: {error}")]
    Write {
        /// Topic name.
        topic: String,
        /// Underlying error.
        error: String,
    },
}

impl DlqError {
    /// Whether trying again may help (always: the offset waits until it does).
    pub fn is_retryable(&self) -> bool {
        true
    }
}

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
    pub async fn write(&self, dead: &DeadTxn) -> Result<(), DlqError> {
        let topic = self.cfg.dlq_topic_for(&dead.topic);
        let count = self.partition_count(&topic).await?;
        // One DLQ partition per transaction keeps its tasks before its marker on replay.
        let partition = dead.partition.rem_euclid(count);
        let source = format!("{}/{}/{}", dead.topic, dead.partition, dead.source_offset());
        let attempts = dead.attempts.to_string();
        let mut pending = Vec::with_capacity(dead.records.len());
        for rec in dead.records.iter() {
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
                Ok(f) => pending.push(f),
                Err((e, _)) => {
                    return Err(DlqError::Write {
                        topic,
                        error: e.to_string(),
                    });
                }
            }
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(DlqError::Write {
                        topic,
                        error: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(DlqError::Write {
                        topic,
                        error: "producer closed".into(),
                    })
                }
            }
        }
        Ok(())
    }
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
