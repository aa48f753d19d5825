//! Metrics and logs: every event is counted where it is logged.
//!
//! Metric names follow Prometheus conventions (base units, `_total` counters) under the
//! `txn_sidecar_` prefix. Labels stay low-cardinality: never an offset, key or txn id;
//! topic and partition appear only on the per-partition lag gauges.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::LogFormat;

/// Kind of a consumed record.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RecordKind {
    /// A task.
    task,
    /// A commit marker.
    commit,
    /// An abort marker.
    abort,
    /// A record that failed to decode.
    invalid,
}

/// Labels of `records_consumed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Record kind.
    pub kind: RecordKind,
}

/// Final outcome of a transaction.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// The app accepted it (2xx or 409).
    delivered,
    /// An abort marker discarded it.
    aborted,
    /// It stayed open longer than `txn_timeout` and was dead-lettered.
    expired,
    /// It was written to the dead-letter topic for another reason.
    dead_lettered,
    /// A previous owner already delivered it; skipped on replay.
    duplicate_skipped,
}

/// Labels of `transactions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// Outcome.
    pub outcome: Outcome,
}

/// Labels carrying a free-form but bounded reason (dead-letter reasons are a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Reason.
    pub reason: String,
}

/// Labels of `delivery_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success`, `conflict`, `retryable` or `permanent` (deliveries); `ok`/`error` (commits).
    pub result: &'static str,
}

/// Labels of `rebalances_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RebalanceLabel {
    /// `assign`, `revoke` or `error`.
    pub kind: &'static str,
}

/// Labels of per-partition gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// Topic.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

/// Labels of `dead_letter_write_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel2 {
    /// The error's kind.
    pub kind: &'static str,
}

/// Labels of `offset_gaps_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GapLabel {
    /// `retention`, `truncation` or `reset`.
    pub kind: &'static str,
}

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// Crate version.
    pub version: &'static str,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    /// Prometheus registry.
    pub registry: Registry,
    /// Records consumed by kind.
    pub records_consumed: Family<KindLabel, Counter>,
    /// The task/commit/abort/invalid series of `records_consumed`, resolved once.
    consumed_counters: [Counter; 4],
    /// Transactions by final outcome.
    pub transactions: Family<OutcomeLabel, Counter>,
    /// Dead-lettered transactions and records by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Open transactions.
    pub open_transactions: Gauge,
    /// Staged bytes.
    pub staged_bytes: Gauge,
    /// Tasks per delivered transaction.
    pub transaction_tasks: Histogram,
    /// Duration of one delivery, all attempts included.
    pub delivery_duration: Histogram,
    /// HTTP attempts by result.
    pub delivery_attempts: Family<ResultLabel, Counter>,
    /// Commit marker consumed → app answered 2xx.
    pub commit_to_delivery: Histogram,
    /// First task consumed → marker consumed.
    pub transaction_open: Histogram,
    /// Rebalance callbacks by kind.
    pub rebalances: Family<RebalanceLabel, Counter>,
    /// Assigned partitions.
    pub assigned_partitions: Gauge,
    /// Paused partitions.
    pub paused_partitions: Gauge,
    /// Times back-pressure paused a partition; each resume costs librdkafka a refetch.
    pub partition_pauses: Counter,
    /// Consumer lag per partition from librdkafka statistics.
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Records a crash would replay per partition (consumed − committed).
    pub commit_lag: Family<PartitionLabel, Gauge>,
    /// Offset commits by result.
    pub offset_commits: Family<ResultLabel, Counter>,
    /// Finished transactions left out of the skip set because the metadata was full.
    pub skip_set_overflow: Counter,
    /// 1 once the broker was seen dropping offset-commit metadata (the skip set and
    /// tombstones do not survive a handoff there: plain at-least-once).
    pub commit_metadata_dropped: Gauge,
    /// Failed dead-letter writes by kind (`unknown_topic`, `authorization`, `too_large`,
    /// `invalid_record`, `transient`).
    pub dead_letter_write_errors: Family<KindLabel2, Counter>,
    /// Seconds each partition's committed offset has been held below its consumed
    /// position by the same unfinished work (an open transaction, a delivery, a
    /// dead-letter write); 0 when nothing holds it.
    pub offset_held: Family<PartitionLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Ids remembered as dead (tombstones) until their marker.
    pub tombstones: Gauge,
    /// Tombstones forgotten before their marker, by why (`silent`, `capacity`).
    pub tombstones_forgotten: Family<ReasonLabel, Counter>,
    /// Assigns where the log did not continue at the committed offset, by kind.
    pub offset_gaps: Family<GapLabel, Counter>,
    /// Constant 1 labelled with the version.
    pub build_info: Family<BuildLabel, Gauge>,
    /// 1 when the delivery client's last connect to the app succeeded, 0 when it failed
    /// (or none was made yet).
    pub app_up: Gauge,
    /// Connects to the app that failed (refused, unreachable, not resolved, timed out).
    pub app_connect_failures: Counter,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 300.0,
    ]
    .into_iter()
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("txn_sidecar");
        let m = Metrics {
            records_consumed: Family::default(),
            consumed_counters: Default::default(),
            transactions: Family::default(),
            dead_letters: Family::default(),
            open_transactions: Gauge::default(),
            staged_bytes: Gauge::default(),
            transaction_tasks: Histogram::new([
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0, 10000.0,
            ]),
            delivery_duration: Histogram::new(seconds_buckets()),
            delivery_attempts: Family::default(),
            commit_to_delivery: Histogram::new(seconds_buckets()),
            transaction_open: Histogram::new(seconds_buckets()),
            rebalances: Family::default(),
            assigned_partitions: Gauge::default(),
            paused_partitions: Gauge::default(),
            partition_pauses: Counter::default(),
            consumer_lag: Family::default(),
            commit_lag: Family::default(),
            offset_commits: Family::default(),
            skip_set_overflow: Counter::default(),
            commit_metadata_dropped: Gauge::default(),
            dead_letter_write_errors: Family::default(),
            offset_held: Family::default(),
            tombstones: Gauge::default(),
            tombstones_forgotten: Family::default(),
            offset_gaps: Family::default(),
            build_info: Family::default(),
            app_up: Gauge::default(),
            app_connect_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "records_consumed",
            "Records consumed, by kind",
            m.records_consumed.clone(),
        );
        registry.register(
            "transactions",
            "Transactions by final outcome",
            m.transactions.clone(),
        );
        registry.register(
            "dead_letters",
            "Transactions and records written to the dead-letter topic, by reason",
            m.dead_letters.clone(),
        );
        registry.register(
            "open_transactions",
            "Transactions staged and waiting for their marker",
            m.open_transactions.clone(),
        );
        registry.register(
            "staged_bytes",
            "Bytes staged across open transactions",
            m.staged_bytes.clone(),
        );
        registry.register(
            "transaction_tasks",
            "Tasks per committed transaction",
            m.transaction_tasks.clone(),
        );
        registry.register(
            "delivery_duration_seconds",
            "Time to deliver one transaction, all attempts included",
            m.delivery_duration.clone(),
        );
        registry.register(
            "delivery_attempts",
            "HTTP delivery attempts by result",
            m.delivery_attempts.clone(),
        );
        registry.register(
            "commit_to_delivery_seconds",
            "Time from consuming a commit marker to the app accepting the transaction",
            m.commit_to_delivery.clone(),
        );
        registry.register(
            "transaction_open_seconds",
            "Time a transaction stayed open, first task to marker (log time)",
            m.transaction_open.clone(),
        );
        registry.register(
            "rebalances",
            "Rebalance callbacks by kind",
            m.rebalances.clone(),
        );
        registry.register(
            "assigned_partitions",
            "Partitions assigned to this member",
            m.assigned_partitions.clone(),
        );
        registry.register(
            "paused_partitions",
            "Assigned partitions currently paused for back-pressure",
            m.paused_partitions.clone(),
        );
        registry.register(
            "partition_pauses",
            "Times back-pressure paused a partition (delivery queue full, staged-bytes budget or shutdown)",
            m.partition_pauses.clone(),
        );
        registry.register(
            "consumer_lag_records",
            "Records between the consumed position and the high watermark (librdkafka statistics)",
            m.consumer_lag.clone(),
        );
        registry.register(
            "commit_lag_records",
            "Records between the committed and the consumed offset: what a crash would replay",
            m.commit_lag.clone(),
        );
        registry.register(
            "offset_commits",
            "Offset commits by result",
            m.offset_commits.clone(),
        );
        registry.register("skip_set_overflow", "Finished transactions that did not fit into the offset-commit metadata and may be redelivered after a handoff", m.skip_set_overflow.clone());
        registry.register(
            "commit_metadata_dropped",
            "1 when the broker returned an offset commit without the metadata the sidecar wrote: skip sets and tombstones do not survive a handoff, delivery is plain at-least-once with the stable Idempotency-Key",
            m.commit_metadata_dropped.clone(),
        );
        registry.register(
            "dead_letter_write_errors",
            "Failed dead-letter writes by kind; unknown_topic and authorization need an operator (the partition's offset waits, see offset_held_seconds)",
            m.dead_letter_write_errors.clone(),
        );
        registry.register(
            "offset_held_seconds",
            "Seconds the partition's committed offset has been held below its consumed position by the same unfinished work",
            m.offset_held.clone(),
        );
        registry.register(
            "tombstones",
            "Transaction ids dead-lettered while open whose later records follow them to the dead-letter topic until their marker",
            m.tombstones.clone(),
        );
        registry.register(
            "tombstones_forgotten",
            "Tombstones forgotten before their marker (silent for txn_timeout, or over capacity); a later record of the id opens a new instance",
            m.tombstones_forgotten.clone(),
        );
        registry.register(
            "offset_gaps",
            "Assigns where the log did not continue at the committed offset (retention, truncation, reset)",
            m.offset_gaps.clone(),
        );
        registry.register(
            "app_up",
            "1 when the last connect to the app succeeded, 0 when it failed or none was made yet; deliveries wait for an absent app without spending retry budgets",
            m.app_up.clone(),
        );
        registry.register(
            "app_connect_failures",
            "Connects to the app that failed (refused, unreachable, name not resolved, connect timed out)",
            m.app_connect_failures.clone(),
        );
        registry.register("build_info", "Build information", m.build_info.clone());
        m.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Pre-create the label values operators alert on, so rates exist from the start.
        for kind in [
            RecordKind::task,
            RecordKind::commit,
            RecordKind::abort,
            RecordKind::invalid,
        ] {
            let _ = m.records_consumed.get_or_create(&KindLabel { kind });
        }
        let mut m = m;
        let c = |kind| {
            m.records_consumed
                .get_or_create(&KindLabel { kind })
                .clone()
        };
        m.consumed_counters = [
            c(RecordKind::task),
            c(RecordKind::commit),
            c(RecordKind::abort),
            c(RecordKind::invalid),
        ];
        for outcome in [
            Outcome::delivered,
            Outcome::aborted,
            Outcome::expired,
            Outcome::dead_lettered,
            Outcome::duplicate_skipped,
        ] {
            let _ = m.transactions.get_or_create(&OutcomeLabel { outcome });
        }
        for result in ["success", "conflict", "retryable", "permanent"] {
            let _ = m.delivery_attempts.get_or_create(&ResultLabel { result });
        }
        for kind in ["assign", "revoke", "error"] {
            let _ = m.rebalances.get_or_create(&RebalanceLabel { kind });
        }
        for result in ["ok", "error"] {
            let _ = m.offset_commits.get_or_create(&ResultLabel { result });
        }
        let mut m = m;
        m.registry = registry;
        Arc::new(m)
    }

    /// Counts a transaction outcome.
    pub fn outcome(&self, outcome: Outcome) {
        self.transactions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Counts a consumed record.
    pub fn consumed(&self, kind: RecordKind) {
        // Per-record path: the pre-created counters, no label hashing or family lock.
        let i = match kind {
            RecordKind::task => 0,
            RecordKind::commit => 1,
            RecordKind::abort => 2,
            RecordKind::invalid => 3,
        };
        self.consumed_counters[i].inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Installs the global `tracing` subscriber: JSON or text, level from `RUST_LOG`
/// (default `info`). `LOG_FORMAT=text|json` overrides the configured format.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let format = match std::env::var("LOG_FORMAT").ok().as_deref() {
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        _ => format,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
    };
}
