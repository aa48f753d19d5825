//! The one place where what a partition's state machine reports is logged and counted.

use tracing::{debug, info, warn};

use crate::machine::{ConsumedKind, PartitionMachine, Report};
use crate::telemetry::{GapLabel, Metrics, Outcome, ReasonLabel, RecordKind};

/// Logs and counts `r`, an event of `m`'s partition.
pub(super) fn report(metrics: &Metrics, m: &PartitionMachine, r: Report) {
    let topic = &**m.topic();
    let partition = m.partition();
    match r {
        Report::Consumed(kind) => metrics.consumed(match kind {
            ConsumedKind::Task => RecordKind::task,
            ConsumedKind::Commit => RecordKind::commit,
            ConsumedKind::Abort => RecordKind::abort,
            ConsumedKind::Invalid => RecordKind::invalid,
        }),
        Report::Committed { open_ms } => {
            metrics.transaction_open.observe(open_ms as f64 / 1000.0);
        }
        Report::Aborted { offset, id, tasks } => {
            if tasks > 0 {
                metrics.outcome(Outcome::aborted);
            }
            info!(topic, partition, offset, txn_id = %id, tasks, "aborted");
        }
        Report::ReadAgain { offset, next } if offset + 1 == next => {
            debug!(
                topic,
                partition, offset, "record read again after a pause; ignored"
            );
        }
        Report::ReadAgain { offset, next } => {
            metrics
                .offset_gaps
                .get_or_create(&GapLabel { kind: "rewind" })
                .inc();
            warn!(topic, partition, offset, next, "the log went back below records already applied (truncated or reset while assigned); records at those offsets are not applied again by this owner");
        }
        Report::DuplicateSkipped { offset, id } => {
            metrics.outcome(Outcome::duplicate_skipped);
            info!(topic, partition, offset, txn_id = %id, "already delivered before the handoff, skipped");
        }
        Report::Tombstoned {
            offset,
            id,
            reason,
            tasks,
            age_ms,
        } => {
            warn!(topic, partition, offset, txn_id = %id, reason, tasks, age_ms, "open transaction dead-lettered; its later records follow it until its marker");
        }
        Report::Rejected {
            offset,
            id,
            reason,
            error,
        } => {
            warn!(topic, partition, offset, txn_id = id.as_deref().unwrap_or(""), reason, error = %error, "dead-lettering");
        }
        Report::TombstoneForgotten { offset, id, why } => {
            metrics
                .tombstones_forgotten
                .get_or_create(&ReasonLabel {
                    reason: why.to_string(),
                })
                .inc();
            warn!(topic, partition, offset, txn_id = %id, why, "dead transaction forgotten; a later record of its id opens a new instance");
        }
        Report::OffsetGap {
            kind,
            committed,
            found,
        } => {
            metrics.offset_gaps.get_or_create(&GapLabel { kind }).inc();
            warn!(topic, partition, committed, found, kind, "the log does not continue at the committed offset; transactions seen in the next txn_timeout need a matching txn-count to be delivered");
        }
    }
}
