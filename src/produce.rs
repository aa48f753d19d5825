//! Writing transactions: tasks and their commit marker inside one Kafka transaction, so
//! a consumer reading `read_committed` never sees half of them.
//!
//! Every record of a transaction goes to one partition: keyed by the id (headers
//! protocol), or pinned to the partition Java clients would pick for the id (key-prefix
//! protocol, whose keys differ per record).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::config::{HeaderNames, Protocol};

/// Errors while producing a transaction.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// A Kafka call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The topic is missing or has no partitions.
    #[error("topic {0} not found or has no partitions")]
    NoTopic(String),
}

impl ProduceError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::Kafka(e) => e.rdkafka_error_code().is_some_and(|c| {
                use rdkafka::types::RDKafkaErrorCode as C;
                matches!(
                    c,
                    C::BrokerTransportFailure
                        | C::AllBrokersDown
                        | C::RequestTimedOut
                        | C::NotCoordinator
                        | C::CoordinatorLoadInProgress
                        | C::CoordinatorNotAvailable
                )
            }),
            ProduceError::NoTopic(_) => false,
        }
    }
}

/// One task to write.
#[derive(Debug, Clone, Default)]
pub struct TaskRecord {
    /// Record value.
    pub value: Vec<u8>,
    /// Extra headers, passed to the app.
    pub headers: Vec<(String, String)>,
}

/// A transactional producer of transactions.
pub struct TxnProducer {
    producer: ThreadedProducer<DefaultProducerContext>,
    protocol: Protocol,
    names: HeaderNames,
    timeout: Duration,
}

/// Default marker header names.
pub fn default_names() -> HeaderNames {
    HeaderNames {
        id: "txn-id".into(),
        kind: "txn-type".into(),
        count: "txn-count".into(),
    }
}

impl TxnProducer {
    /// Connects with `transactional_id`; `extra` holds librdkafka properties (TLS, SASL).
    pub fn new(
        brokers: &str,
        extra: &BTreeMap<String, String>,
        transactional_id: &str,
        protocol: Protocol,
        names: HeaderNames,
    ) -> Result<TxnProducer, ProduceError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        c.set("transactional.id", transactional_id);
        // Same partition for the same key as Java clients.
        c.set("partitioner", "murmur2_random");
        for (k, v) in extra {
            c.set(k, v);
        }
        let producer: ThreadedProducer<DefaultProducerContext> = c.create()?;
        let timeout = Duration::from_secs(30);
        producer.init_transactions(timeout)?;
        Ok(TxnProducer {
            producer,
            protocol,
            names,
            timeout,
        })
    }

    fn partition_for(&self, topic: &str, id: &str) -> Result<i32, ProduceError> {
        let md = self
            .producer
            .client()
            .fetch_metadata(Some(topic), self.timeout)?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if n == 0 {
            return Err(ProduceError::NoTopic(topic.to_string()));
        }
        Ok(((murmur2(id.as_bytes()) & 0x7fff_ffff) % n as u32) as i32)
    }

    /// Writes `tasks` then a commit marker (or an abort marker when `abort`) for `id`,
    /// atomically; returns once the Kafka transaction is committed.
    pub fn send(
        &self,
        topic: &str,
        id: &str,
        tasks: &[TaskRecord],
        abort: bool,
    ) -> Result<(), ProduceError> {
        let partition = match self.protocol {
            Protocol::Headers => None,
            Protocol::KeyPrefix => Some(self.partition_for(topic, id)?),
        };
        self.producer.begin_transaction()?;
        let result = (|| -> Result<(), ProduceError> {
            for t in tasks {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &t.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    });
                }
                self.send_one(topic, partition, id, "task", None, Some(&t.value), headers)?;
            }
            let kind = if abort { "abort" } else { "commit" };
            let count = (!abort).then(|| tasks.len().to_string());
            self.send_one(
                topic,
                partition,
                id,
                kind,
                count.as_deref(),
                None,
                OwnedHeaders::new(),
            )?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.producer.commit_transaction(self.timeout)?;
                Ok(())
            }
            Err(e) => {
                let _ = self.producer.abort_transaction(self.timeout);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_one(
        &self,
        topic: &str,
        partition: Option<i32>,
        id: &str,
        kind: &str,
        count: Option<&str>,
        value: Option<&[u8]>,
        mut headers: OwnedHeaders,
    ) -> Result<(), ProduceError> {
        let key = match self.protocol {
            Protocol::Headers => {
                headers = headers
                    .insert(Header {
                        key: &self.names.id,
                        value: Some(id.as_bytes()),
                    })
                    .insert(Header {
                        key: &self.names.kind,
                        value: Some(kind.as_bytes()),
                    });
                id.to_string()
            }
            Protocol::KeyPrefix => {
                let prefix = if kind == "abort" { "clear" } else { kind };
                format!("{prefix}-{id}")
            }
        };
        if let Some(c) = count {
            headers = headers.insert(Header {
                key: &self.names.count,
                value: Some(c.as_bytes()),
            });
        }
        let mut rec: BaseRecord<'_, str, [u8]> =
            BaseRecord::to(topic).key(key.as_str()).headers(headers);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        self.producer
            .send(rec)
            .map_err(|(e, _)| ProduceError::Kafka(e))
    }
}

/// Kafka's murmur2 (as in the Java client's default partitioner).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match rest.len() {
        3 => {
            h ^= u32::from(rest[2]) << 16;
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(rest[1]) << 8;
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(rest[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }
}
