//! librdkafka plumbing: client configs, and reading a consumed message as a record.
//!
//! Consumers read with `isolation.level=read_committed`, manual offset commits,
//! partition EOF events and cooperative-sticky assignment (under the classic group
//! protocol; KIP-848's broker-side assignment is cooperative by design); any `kafka.*`
//! property passes through on top.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::consumer::ConsumerContext;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use std::time::Duration;

use crate::config::{Config, GroupProtocol};
use crate::protocol::{self, RecordRef};

/// Properties every client gets: brokers, then the user's `kafka.*` table.
pub fn base_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", "txn-sidecar");
    for (k, v) in &cfg.kafka {
        c.set(k, v);
    }
    c
}

/// Consumer properties: the guarantees depend on these, so users cannot override the
/// owned ones (config validation rejects them).
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = base_config(cfg);
    c.set("group.id", &cfg.group);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("isolation.level", "read_committed");
    c.set("enable.partition.eof", "true");
    // Under KIP-848 the broker assigns partitions and sets session and heartbeat timing;
    // librdkafka refuses the client-side properties (config validation names them).
    let kip848 = cfg.group_protocol() == GroupProtocol::Consumer;
    if !cfg.kafka.contains_key("partition.assignment.strategy") && !kip848 {
        c.set("partition.assignment.strategy", "cooperative-sticky");
    }
    if !cfg.kafka.contains_key("auto.offset.reset") {
        // A new group must not skip transactions already in the topic.
        c.set("auto.offset.reset", "earliest");
    }
    if !cfg.kafka.contains_key("statistics.interval.ms") {
        c.set("statistics.interval.ms", "5000");
    }
    if !cfg.kafka.contains_key("fetch.queue.backoff.ms") {
        // librdkafka's default (1000 ms) stops fetching a partition for a whole second
        // whenever its local queue is full; a consumer that is slower than the broker
        // (any that does work per record) then drains the queue and idles. Measured on a
        // backlog: 119k -> 437k records/s (docs/benchmarks-history.md, staging throughput).
        c.set("fetch.queue.backoff.ms", "10");
    }
    // librdkafka's defaults (64 MiB prefetched, 50 MiB per fetch response) come on top of
    // the sidecar's own budget; these keep the whole within a 512 MiB pod limit with the
    // default budget (README, "The memory budget").
    if !cfg.kafka.contains_key("queued.max.messages.kbytes") {
        c.set("queued.max.messages.kbytes", "32768");
    }
    if !cfg.kafka.contains_key("fetch.max.bytes") {
        c.set("fetch.max.bytes", "16777216");
    }
    if !cfg.kafka.contains_key("fetch.wait.max.ms") {
        // A broker holds a fetch that finds no data for up to this long, and librdkafka
        // sends a broker's next fetch only when the last one has returned. So a partition
        // resumed after back-pressure, or newly assigned in a handoff, waits for it
        // whenever the fetch in flight was empty: 500 ms by default. 100 ms bounds that
        // at the price of up to 10 empty fetches a second per idle broker (docs/benchmarks-history.md,
        // change 7).
        c.set("fetch.wait.max.ms", "100");
    }
    let session_ms = cfg
        .kafka
        .get("session.timeout.ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(45_000);
    if !cfg.kafka.contains_key("heartbeat.interval.ms") && session_ms > 3_000 && !kip848 {
        // A member learns of a rebalance at its next heartbeat; librdkafka's 3 s default
        // adds up to 3 s to every handoff, a 1 s heartbeat at most 1 s.
        c.set("heartbeat.interval.ms", "1000");
    }
    c
}

/// Producer properties for the dead-letter topic: idempotent, all acks.
pub fn dlq_producer_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", "txn-sidecar-dlq");
    for (k, v) in &cfg.kafka {
        if is_producer_safe(k) {
            c.set(k, v);
        }
    }
    c.set("enable.idempotence", "true");
    c.set("acks", "all");
    c
}

/// Consumer-only properties make a producer log warnings; keep the shared ones
/// (security, timeouts, client tuning).
fn is_producer_safe(key: &str) -> bool {
    const CONSUMER_ONLY: &[&str] = &[
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "partition.assignment.strategy",
        "group.protocol",
        "group.protocol.type",
        "group.instance.id",
        "group.remote.assignor",
        "auto.offset.reset",
        "fetch.min.bytes",
        "fetch.max.bytes",
        "fetch.wait.max.ms",
        "fetch.message.max.bytes",
        "max.partition.fetch.bytes",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "enable.partition.eof",
        "check.crcs",
        "statistics.interval.ms",
        "fetch.queue.backoff.ms",
        "coordinator.query.interval.ms",
        "auto.commit.interval.ms",
    ];
    !CONSUMER_ONLY.contains(&key)
}

/// Encodes a consumed message into `buf` and returns a view of it.
///
/// `buf` is the consumer loop's scratch, reused for every record: staging copies the
/// view into its transaction's buffer, so a task costs no allocation of its own.
pub fn record_ref<'b>(msg: &BorrowedMessage<'_>, buf: &'b mut Vec<u8>) -> RecordRef<'b> {
    let headers = raw_headers(msg);
    protocol::encode_into(
        buf,
        msg.offset(),
        msg.timestamp().to_millis(),
        msg.key(),
        msg.payload(),
        &headers,
    )
}

/// Appends a consumed message to `buf` (see [`protocol::append_encoded`]): its offset,
/// its timestamp in milliseconds when the broker gave one, and where its bytes lie.
pub fn append_record(
    msg: &BorrowedMessage<'_>,
    buf: &mut Vec<u8>,
) -> (i64, Option<i64>, std::ops::Range<usize>) {
    let headers = raw_headers(msg);
    let range = protocol::append_encoded(buf, msg.key(), msg.payload(), &headers);
    (msg.offset(), msg.timestamp().to_millis(), range)
}

/// Reads headers with their names as raw bytes, borrowed from `msg`.
///
/// rdkafka's safe accessor unwraps the header name as UTF-8 and so panics on a record
/// whose header name is not, which would turn one bad record into a crash loop; this
/// reads librdkafka's C API without that assumption (in the `txn-sidecar-ffi` crate,
/// which holds the project's only unsafe code).
fn raw_headers<'a>(msg: &'a BorrowedMessage<'_>) -> txn_sidecar_ffi::RawHeaders<'a> {
    txn_sidecar_ffi::raw_headers(msg)
}

/// Reads the metadata of a committed-offsets entry without rdkafka's UTF-8 `expect`,
/// which panics when another client stored non-UTF-8 metadata for the group.
pub fn safe_metadata(elem: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>) -> String {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| elem.metadata().to_string()))
        .unwrap_or_default()
}

/// Makes librdkafka fetch just-resumed partitions now rather than up to a second later.
///
/// Resuming does not wake the broker thread. When every partition a broker leads was
/// paused, that thread sleeps up to a second (librdkafka's `rd_kafka_max_block_ms`)
/// before it sees the resume: the benchmark showed 0.65 s with nothing delivered after
/// each back-pressure cycle (docs/benchmarks-history.md, change 8). Any request to the broker wakes
/// it. A watermark query with a zero timeout enqueues one and returns at once;
/// librdkafka drops the late answer by design.
pub fn wake_fetchers<C: ConsumerContext>(consumer: &BaseConsumer<C>, resumed: &TopicPartitionList) {
    use rdkafka::consumer::Consumer;
    for e in resumed.elements() {
        let _ = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::ZERO);
    }
}

/// Partition assignment protocol of a consumer, for logs.
pub fn protocol_name<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> &'static str {
    use rdkafka::consumer::{Consumer, RebalanceProtocol};
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => "cooperative",
        RebalanceProtocol::Eager => "eager",
        RebalanceProtocol::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;

    fn cfg(kafka: &[(&str, &str)]) -> Config {
        let mut s = Sources::default();
        s.flags.insert("topic".into(), "t".into());
        for (k, v) in kafka {
            s.flags.insert(format!("kafka.{k}"), v.to_string());
        }
        Config::load(&s).unwrap()
    }

    #[test]
    fn consumer_defaults_that_differ_from_librdkafka_yield_to_the_user() {
        let c = consumer_config(&cfg(&[]));
        for (k, v) in [
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("auto.offset.reset", "earliest"),
            ("fetch.queue.backoff.ms", "10"),
            ("fetch.wait.max.ms", "100"),
            ("heartbeat.interval.ms", "1000"),
        ] {
            assert_eq!(c.get(k), Some(v), "{k}");
        }
        let c = consumer_config(&cfg(&[
            ("fetch.wait.max.ms", "500"),
            ("fetch.queue.backoff.ms", "1000"),
        ]));
        assert_eq!(c.get("fetch.wait.max.ms"), Some("500"));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("1000"));
    }

    #[test]
    fn the_sidecar_reads_partition_eof_events() {
        assert_eq!(
            consumer_config(&cfg(&[])).get("enable.partition.eof"),
            Some("true")
        );
    }

    #[test]
    fn kip848_consumers_get_no_classic_only_property_and_librdkafka_takes_them() {
        use crate::config::GroupProtocol;
        use rdkafka::consumer::BaseConsumer;
        let c = cfg(&[("group.protocol", "consumer")]);
        assert_eq!(c.group_protocol(), GroupProtocol::Consumer);
        let mut cc = consumer_config(&c);
        for k in [
            "heartbeat.interval.ms",
            "session.timeout.ms",
            "partition.assignment.strategy",
            "group.protocol.type",
        ] {
            assert_eq!(cc.get(k), None, "{k}");
        }
        // librdkafka refuses a classic-only property only when the client is created: do
        // it (no broker needed; nothing listens on port 1).
        cc.set("bootstrap.servers", "127.0.0.1:1");
        let consumer: Result<BaseConsumer, _> = cc.create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
        let mut classic = consumer_config(&cfg(&[]));
        classic.set("bootstrap.servers", "127.0.0.1:1");
        let consumer: Result<BaseConsumer, _> = classic.create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
    }

    #[test]
    fn tls_and_sasl_mechanisms_managed_clusters_need_are_built_in() {
        let native = rdkafka::ClientConfig::new().create_native_config().unwrap();
        let features = native.get("builtin.features").unwrap();
        for f in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "zstd",
            "gzip",
        ] {
            assert!(
                features.split(',').any(|x| x == f),
                "{f} missing from {features}"
            );
        }
    }
}
