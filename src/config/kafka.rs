//! librdkafka properties: the ones owned or refused, the group protocol, which hold secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

use super::reader::Reader;
use super::{REDACTED, REVOKE_MARGIN};

/// Whether a librdkafka property holds a credential that must never be printed.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || k == "ssl.key.pem"
        || k.contains("sasl.oauthbearer.config")
        || k.contains("token")
}

/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// Properties the sidecar owns, each with what to use instead; a user value would break
/// its guarantees.
const OWNED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "offsets are committed only up to the safe offset",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only up to the safe offset",
    ),
    ("group.id", "use the `group` setting"),
    ("bootstrap.servers", "use the `brokers` setting"),
    ("isolation.level", "the sidecar reads read_committed"),
    (
        "enable.partition.eof",
        "the sidecar enables it to learn when a partition is caught up",
    ),
];

/// Properties librdkafka refuses with `group.protocol=consumer` (KIP-848), each with what
/// takes its place (librdkafka 2.12, `rd_kafka_conf_finalize`).
const CLASSIC_ONLY_PROPERTIES: &[(&str, &str)] = &[
    (
        "session.timeout.ms",
        "the broker sets it (group.consumer.session.timeout.ms)",
    ),
    (
        "heartbeat.interval.ms",
        "the broker sets it (group.consumer.heartbeat.interval.ms)",
    ),
    (
        "partition.assignment.strategy",
        "use kafka.group.remote.assignor (uniform or range) instead",
    ),
    ("group.protocol.type", "it belongs to the classic protocol"),
];

/// The consumer group protocol, from `kafka.group.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    /// The classic protocol: JoinGroup/SyncGroup, client-side assignment.
    Classic,
    /// KIP-848 (`group.protocol=consumer`): heartbeats carry the assignment, which the
    /// broker computes; session and heartbeat timing are the broker's.
    Consumer,
}

impl GroupProtocol {
    /// The group protocol `kafka` selects (librdkafka matches the value ignoring case).
    pub fn of(kafka: &BTreeMap<String, String>) -> GroupProtocol {
        match kafka.get("group.protocol") {
            Some(v) if v.trim().eq_ignore_ascii_case("consumer") => GroupProtocol::Consumer,
            _ => GroupProtocol::Classic,
        }
    }

    /// The value of `group.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// The librdkafka properties: owned ones, ones the group protocol forbids, ones that
/// would break a guarantee, a `max.poll.interval.ms` a revoke can outlast, and whatever
/// librdkafka itself refuses, each reported with its key before any client exists.
pub(super) fn check_kafka(
    r: &mut Reader<'_>,
    kafka: &BTreeMap<String, String>,
    rebalance_grace: Duration,
) {
    let mut reported: Vec<&str> = Vec::new();
    for (owned, instead) in OWNED_KAFKA_PROPERTIES {
        if kafka.contains_key(*owned) {
            r.fail_kafka(
                owned,
                format!("is managed by txn-sidecar and cannot be overridden ({instead})"),
            );
            reported.push(owned);
        }
    }
    if GroupProtocol::of(kafka) == GroupProtocol::Consumer {
        for (prop, instead) in CLASSIC_ONLY_PROPERTIES {
            if kafka.contains_key(*prop) {
                r.fail_kafka(
                    prop,
                    format!(
                        "is not supported with kafka.group.protocol=consumer (KIP-848): {instead}"
                    ),
                );
                reported.push(prop);
            }
        }
    }
    if kafka
        .get("transactional.id")
        .is_some_and(|v| !v.trim().is_empty())
    {
        r.fail_kafka(
            "transactional.id",
            "is not supported: [kafka] properties also reach the dead-letter producer, which \
             is idempotent and not transactional (a transactional.id would make every \
             dead-letter write fail)",
        );
        reported.push("transactional.id");
    }
    if let Some(v) = kafka.get("auto.offset.reset") {
        let why = match v.trim().to_ascii_lowercase().as_str() {
            "latest" | "largest" | "end" => Some(
                "would silently skip every transaction already in the topic whenever the \
                 group has no committed offset or it fell out of retention",
            ),
            "none" | "error" => Some(
                "would stop a partition with an error whenever the group has no committed \
                 offset or it fell out of retention",
            ),
            _ => None,
        };
        if let Some(why) = why {
            r.fail_kafka(
                "auto.offset.reset",
                format!(
                    "{v:?} {why}; the sidecar needs \"earliest\" (to start a new group at the end \
                     of the topic, reset its offsets with kafka-consumer-groups.sh \
                     --reset-offsets --to-latest before the first start)"
                ),
            );
            reported.push("auto.offset.reset");
        }
    }
    let revoke = rebalance_grace.saturating_add(REVOKE_MARGIN);
    let max_poll = kafka.get("max.poll.interval.ms");
    match max_poll.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(ms)) if Duration::from_millis(ms) < revoke => {
            r.fail_kafka(
                "max.poll.interval.ms",
                format!(
                    "{ms} ms is shorter than a revoke may take (rebalance_grace {} + {}), so the \
                     member would be evicted mid-revoke; set it to at least {} or lower \
                     rebalance_grace",
                    humantime::format_duration(rebalance_grace),
                    humantime::format_duration(REVOKE_MARGIN),
                    revoke.as_millis()
                ),
            );
            reported.push("max.poll.interval.ms");
        }
        None if revoke > Duration::from_millis(DEFAULT_MAX_POLL_INTERVAL_MS) => {
            r.fail(
                "rebalance_grace",
                format!(
                    "{} + {} is longer than librdkafka's max.poll.interval.ms ({DEFAULT_MAX_POLL_INTERVAL_MS} \
                     ms by default), so the member would be evicted mid-revoke; lower it or set \
                     kafka.max.poll.interval.ms to at least {}",
                    humantime::format_duration(rebalance_grace),
                    humantime::format_duration(REVOKE_MARGIN),
                    revoke.as_millis()
                ),
            );
        }
        _ => {}
    }
    // Plugins add properties librdkafka only knows once they are loaded.
    if kafka.contains_key("plugin.library.paths") {
        return;
    }
    for (k, v) in kafka {
        if reported.contains(&k.as_str()) {
            continue;
        }
        if let Err(e) = ClientConfig::new().set(k, v).create_native_config() {
            let msg = match e {
                KafkaError::ClientConfig(_, desc, _, _) => desc,
                other => other.to_string(),
            };
            let msg = if is_secret_property(k) && !v.is_empty() {
                msg.replace(v.as_str(), REDACTED)
            } else {
                msg
            };
            r.fail_kafka(k, format!("librdkafka refuses it: {msg}"));
        }
    }
}
