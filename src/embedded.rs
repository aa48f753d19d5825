//! An embedded Kafka: librdkafka's mock cluster (real wire protocol over TCP, consumer
//! groups under both group protocols, transactions) for `txn-sidecar demo`,
//! `txn-sidecar mock-kafka` and tests.
//!
//! Limits worth knowing: it keeps only the newest ~5 MB per partition, does not emulate
//! `read_committed`, and completes a classic rebalance only when every member rejoined or
//! timed out, so classic members should use a short `session.timeout.ms`. For KIP-848
//! groups (`group.protocol=consumer`) the broker sets session and heartbeat timing; this
//! cluster uses [`KIP848_SESSION_TIMEOUT_MS`] and [`KIP848_HEARTBEAT_INTERVAL_MS`].

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::GroupProtocol;

/// A running mock cluster; it stops when dropped.
pub struct EmbeddedKafka {
    /// The client that hosts the cluster (`test.mock.num.brokers`): unlike
    /// `MockCluster::new`, this way the cluster's handle is reachable, for the KIP-848
    /// group timing.
    host: BaseProducer,
}

/// Client properties that make classic group rebalances against the mock cluster take
/// seconds.
pub const FAST_GROUP_PROPERTIES: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "500"),
];

/// Client properties that select KIP-848 (its timing is the broker's, set below).
pub const KIP848_GROUP_PROPERTIES: &[(&str, &str)] = &[("group.protocol", "consumer")];

/// The broker-side session timeout of KIP-848 groups (librdkafka's mock: 30 s).
pub const KIP848_SESSION_TIMEOUT_MS: i32 = 6000;

/// The broker-side heartbeat interval of KIP-848 groups (librdkafka's mock: 3 s). A
/// member learns of a new assignment at its next heartbeat.
pub const KIP848_HEARTBEAT_INTERVAL_MS: i32 = 500;

/// The client properties for a fast group under `protocol` on the embedded cluster.
pub fn fast_group_properties(protocol: GroupProtocol) -> &'static [(&'static str, &'static str)] {
    match protocol {
        GroupProtocol::Classic => FAST_GROUP_PROPERTIES,
        GroupProtocol::Consumer => KIP848_GROUP_PROPERTIES,
    }
}

impl EmbeddedKafka {
    /// Starts a cluster of `brokers` brokers on loopback ports.
    pub fn start(brokers: i32) -> Result<EmbeddedKafka, KafkaError> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("client.id", "txn-sidecar-embedded-kafka")
            .create()?;
        set_kip848_timing(&host)?;
        Ok(EmbeddedKafka { host })
    }

    /// `host:port,...` to give clients.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster().create_topic(topic, partitions, 1)
    }

    /// The underlying mock cluster, for fault injection (broker down/up, request errors).
    pub fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.host
            .client()
            .mock_cluster()
            .expect("a client created with test.mock.num.brokers hosts a mock cluster")
    }
}

/// Sets the KIP-848 session timeout and heartbeat interval of the cluster `host` hosts.
fn set_kip848_timing(host: &BaseProducer) -> Result<(), KafkaError> {
    if txn_sidecar_ffi::set_mock_group_consumer_timing(
        host.client(),
        KIP848_SESSION_TIMEOUT_MS,
        KIP848_HEARTBEAT_INTERVAL_MS,
    ) {
        Ok(())
    } else {
        Err(KafkaError::MockCluster(RDKafkaErrorCode::Fail))
    }
}
