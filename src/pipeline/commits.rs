//! Offset commits: each partition's machine says what may be committed (its commit point
//! and skip set); this sends it, periodically and asynchronously, or synchronously on
//! revoke and shutdown.

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::{Engine, Part};
use crate::offsets::CommitPoint;
use crate::telemetry::ResultLabel;

impl Engine {
    /// Commits the safe offsets of `tps` synchronously; `Err` carries the broker's refusal.
    pub(super) fn commit_sync<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tps: &[(Arc<str>, i32)],
    ) -> KafkaResult<()> {
        if self.tainted {
            warn!("offset commit skipped: a thread panicked while it held the partitions' state");
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        let mut points = Vec::new();
        let metrics = self.metrics.clone();
        for (t, n) in tps {
            let Some(p) = self.part_mut(t, *n) else {
                continue;
            };
            if let Some(cp) = p.machine.final_commit_point() {
                count_overflow(p, &cp, &metrics);
                points.push((t.clone(), *n, cp));
            }
        }
        for (t, n, cp) in &points {
            if add_offset(&mut tpl, t, *n, cp.offset, &cp.metadata).is_err() {
                warn!(topic = %t, partition = *n, "cannot build offset commit");
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                for (t, n, cp) in points {
                    if let Some(p) = self.part_mut(&t, n) {
                        p.machine.committed(cp.offset);
                        note_metadata(p, &cp);
                    }
                    info!(topic = %t, partition = n, offset = cp.offset, "committed safe offset");
                }
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit failed; the next owner replays from the last committed offset");
                Err(e)
            }
        }
    }

    /// Sends the commit points that changed, or all of them when `refresh` is set.
    pub(super) fn commit_async<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        refresh: bool,
    ) {
        if self.tainted {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let metrics = self.metrics.clone();
        for p in self.all_parts_mut() {
            let point = if refresh {
                p.machine.final_commit_point()
            } else {
                p.machine.commit_point()
            };
            if let Some(cp) = point {
                count_overflow(p, &cp, &metrics);
                let m = &mut p.machine;
                if add_offset(&mut tpl, m.topic(), m.partition(), cp.offset, &cp.metadata).is_ok() {
                    m.committed(cp.offset);
                    note_metadata(p, &cp);
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit could not be sent");
            }
        }
    }

    /// Reads back a commit this member sent (its metadata names the offset, and the skip set
    /// and tombstones when there are any) until the broker's handling is known. A broker
    /// that keeps it lets commit points rely on it; one that returns the offset without it
    /// keeps no skip set across a handoff: logged once, shown by `commit_metadata_dropped`,
    /// and commit points stay conservative (see `OffsetTracker::skip_set_lost`).
    pub(super) fn check_metadata_kept<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if self.metadata_kept || self.metadata_dropped {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in self.all_parts() {
            if !p.sent.is_empty() {
                tpl.add_partition(p.machine.topic(), p.machine.partition());
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let Ok(read) = consumer.committed_offsets(tpl, std::time::Duration::from_secs(2)) else {
            return;
        };
        for el in read.elements() {
            let Offset::Offset(offset) = el.offset() else {
                continue;
            };
            let metadata = crate::kafka::safe_metadata(&el);
            let topic = el.topic().to_string();
            let partition = el.partition();
            let Some(p) = self.part_mut(&topic, partition) else {
                continue;
            };
            // Only a read of a commit this member sent says anything.
            if !p.sent.contains(&offset) {
                continue;
            }
            p.sent.clear();
            if !metadata.is_empty() && !self.metadata_dropped && !self.metadata_kept {
                // The broker keeps it: from now on commit points rely on the skip set and
                // the tombstones travelling (until then they stayed conservative).
                self.metadata_kept = true;
                for p in self.all_parts_mut() {
                    p.machine.metadata_kept();
                }
                tracing::debug!(topic = %topic, partition, offset, "the broker keeps offset-commit metadata");
            }
            if metadata.is_empty() && !self.metadata_dropped {
                self.metadata_dropped = true;
                self.metrics.commit_metadata_dropped.set(1);
                for p in self.all_parts_mut() {
                    p.machine.metadata_unreliable();
                }
                warn!(topic = %topic, partition, offset, "the broker dropped the offset-commit metadata: skip sets and tombstones do not survive a handoff here, delivery is plain at-least-once with the stable Idempotency-Key");
            }
        }
    }

    /// Results of asynchronous commits, should librdkafka report them (rust-rdkafka's
    /// `BaseConsumer` does not today; [`super::COMMIT_REFRESH`] covers refused commits).
    pub(super) fn on_commit_result(
        &mut self,
        result: KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
            }
            Err(e) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit failed, will retry");
                for el in offsets.elements() {
                    if let Some(p) = self.part_mut(el.topic(), el.partition()) {
                        // Forces the next tick to commit again.
                        p.machine.committed(-1);
                    }
                }
            }
        }
    }

    /// Commits every partition still owned; `true` when the coordinator refused it because
    /// the group is rebalancing, so the caller should serve the rebalance and call again.
    ///
    /// A refused final commit hands the next owner everything since the last accepted
    /// one, all of it already delivered. After the rebalance this member still owns the
    /// partitions it kept (cooperative) under the new generation, so the commit goes
    /// through; partitions it loses are committed by the revoke callback.
    pub(super) fn final_commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        let tps: Vec<(Arc<str>, i32)> = self
            .all_parts()
            .map(|p| (p.machine.topic().clone(), p.machine.partition()))
            .collect();
        match self.commit_sync(consumer, &tps) {
            Ok(()) => false,
            Err(e) => matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::RebalanceInProgress | RDKafkaErrorCode::IllegalGeneration)
            ),
        }
    }
}

/// Counts what the metadata left out, by its increase: the same entries are left out of
/// every commit until the offset passes them.
fn count_overflow(p: &mut Part, cp: &CommitPoint, metrics: &crate::telemetry::Metrics) {
    let (dropped, tombs) = (cp.dropped as u64, cp.not_carried as u64);
    metrics
        .skip_set_overflow
        .inc_by(dropped.saturating_sub(p.overflow.0));
    if tombs > p.overflow.1 {
        metrics
            .tombstones_forgotten
            .get_or_create(&crate::telemetry::ReasonLabel {
                reason: "metadata_full".into(),
            })
            .inc_by(tombs - p.overflow.1);
        warn!(topic = %p.machine.topic(), partition = p.machine.partition(), tombstones = tombs, "tombstones do not fit into the commit metadata: a new owner may take their later records for new transactions");
    }
    p.overflow = (dropped, tombs);
}

/// Remembers a commit (every commit carries metadata, `txs2:<offset>:` at least), to read
/// one back until the broker's handling of metadata is known.
fn note_metadata(p: &mut Part, cp: &CommitPoint) {
    if !cp.metadata.is_empty() {
        if p.sent.len() >= 32 {
            p.sent.pop_front();
        }
        p.sent.push_back(cp.offset);
    }
}

fn add_offset(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &str,
) -> KafkaResult<()> {
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    if let Some(mut el) = tpl.find_partition(topic, partition) {
        el.set_metadata(metadata);
    }
    Ok(())
}
