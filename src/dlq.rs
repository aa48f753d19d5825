//! The dead-letter topic: failed transactions are written back as their original records
//! (tasks, then the marker) with `txn-dlq-*` headers, so re-producing them replays them.
//!
//! An idempotent producer writes them; the pipeline commits past a dead-lettered
//! transaction only after every record is acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Config;
use crate::kafka;
use crate::protocol::Records;

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
            let mut headers = OwnedHeaders::new_with_capacity(rec.header_count() + 4);
            for (k, v) in rec.headers() {
                let k = String::from_utf8_lossy(k);
                headers = headers.insert(Header { key: &k, value: v });
            }
            headers = headers
                .insert(Header {
                    key: "txn-dlq-reason",
                    value: Some(dead.reason),
                })
                .insert(Header {
                    key: "txn-dlq-error",
                    value: Some(dead.error.as_str()),
                })
                .insert(Header {
                    key: "txn-dlq-source",
                    value: Some(source.as_str()),
                })
                .insert(Header {
                    key: "txn-dlq-attempts",
                    value: Some(attempts.as_str()),
                });
            let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                .partition(partition)
                .headers(headers);
            if let Some(k) = rec.key() {
                fr = fr.key(k);
            }
            if let Some(v) = rec.value() {
                fr = fr.payload(v);
            }
            if let Some(ts) = rec.timestamp_ms {
                fr = fr.timestamp(ts);
            }
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
