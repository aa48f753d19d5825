//! An embedded Kafka: librdkafka's mock cluster (real wire protocol over TCP, consumer
//! groups, transactions) for `txn-sidecar demo`, `txn-sidecar mock-kafka` and tests.
//!
//! Limits worth knowing: it keeps only the newest ~5 MB per partition, does not emulate
//! `read_committed`, and completes a rebalance only when every member rejoined or timed
//! out, so members should use a short `session.timeout.ms`.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running mock cluster; it stops when dropped.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

/// Client properties that make group rebalances against the mock cluster take seconds.
pub const FAST_GROUP_PROPERTIES: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "500"),
];

impl EmbeddedKafka {
    /// Starts a cluster of `brokers` brokers on loopback ports.
    pub fn start(brokers: i32) -> Result<EmbeddedKafka, rdkafka::error::KafkaError> {
        Ok(EmbeddedKafka {
            cluster: MockCluster::new(brokers)?,
        })
    }

    /// `host:port,...` to give clients.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.cluster.create_topic(topic, partitions, 1)
    }

    /// The underlying mock cluster, for fault injection (broker down/up, request errors).
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
