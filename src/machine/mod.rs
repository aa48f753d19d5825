//! The transaction state machine of one partition: every rule of a transaction's life.
//!
//! Pure: no I/O, no clock reads, no logging. The consumer thread (the driver, in
//! [`crate::pipeline`]) feeds it consumed records, clock ticks, delivery and dead-letter
//! completions and operator requests; it answers with [`Action`]s (deliver this
//! transaction, dead-letter this group, report this event) and with the commit point the
//! driver may send. Time is an input: `now_ms` is any monotonic millisecond clock.
//!
//! # Rules
//!
//! - **Instance.** The records of one id from its previous marker (or the start) up to
//!   its next marker. An instance is delivered whole (every task, offset order) or
//!   dead-lettered whole, never split, never both.
//! - **Tombstone.** An instance dead-lettered while open (`expired`, `too_large`,
//!   `operator`, or poisoned by a record of its id whose marker fields do not decode) is
//!   remembered: every later record of its id, up to and including the marker, follows it
//!   into the dead-letter topic with the same `txn-dlq-source`. The committed offset may
//!   pass the instance once its first group is written: a tombstone whose first record
//!   lies below the committed offset travels in the commit metadata
//!   ([`crate::offsets::Carried`]); one that does not fit holds the offset at its first
//!   record, where a new owner finds the head in the skip set (below) and reaches the same
//!   decision. A tombstone whose id stays silent for another `txn_timeout` is forgotten
//!   (reported), and so is the oldest one beyond [`MAX_TOMBSTONES`] or
//!   [`MAX_TOMBSTONE_BYTES`].
//! - **Expiry clock.** A transaction expires when `txn_timeout` has passed since its first
//!   task was consumed *and* the driver reports the partition caught up (consumed to the
//!   end of the log, not paused). The first task was produced no later than it was
//!   consumed, so the producer has had at least that long, and a caught-up partition has no
//!   marker waiting behind a pause or a backlog. Record timestamps are never used, so a
//!   producer's clock cannot expire anything.
//! - **Skip set.** Offsets whose handling is complete above the committed offset travel
//!   in the commit metadata ([`crate::offsets`]). A new owner treats a hit as: a marker
//!   ends an instance already delivered or dead-lettered (drop what it staged, silently);
//!   any other record ends a group already dead-lettered while its instance was open (drop
//!   what it staged and keep a tombstone for the id, silently).
//! - **Offset gaps.** When the committed offset lies below the log start (retention) or
//!   above its end (truncation), or the first record after an assign lies below the
//!   committed offset, instances seen in the first `txn_timeout` after the assign may have
//!   lost records: such an instance is delivered only when its commit carries a matching
//!   `txn-count`, and is dead-lettered as `offset_gap` otherwise. A skip set that no longer
//!   matches the log (truncation, reset) is ignored.
//!
//! # Layout
//!
//! This file holds what the driver sees: the types it exchanges with the machine, the
//! machine with its constructor and read-outs, and the dispatch of a consumed record
//! ([`PartitionMachine::on_record`]). The rules live in submodules: `instances` (staging,
//! commit and `txn-count`, abort, poisoning, dead-lettering an open instance, on the
//! operator's request too), `report` (what the machine tells the driver happened),
//! `tombstones` (tombstones, heads, records replayed from an
//! earlier owner, what the commit metadata carries) and `expiry` (the clock: expiry of
//! open transactions and silent tombstones, the window after an offset gap).

mod expiry;
mod instances;
mod report;
mod tombstones;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use hashbrown::HashMap;

use crate::delivery::ReadyTxn;
use crate::dlq::DeadTxn;
use crate::offsets::{decode_tombstones, CommitPoint, OffsetTracker};
use crate::protocol::{DecodeError, Kind, Marker, RecordRef, Records};
use crate::staging::{MemoryStore, OpenTxn, StagingStore};

use expiry::GapWindow;
use instances::RecentIds;
pub use report::{ConsumedKind, OperatorRefusal, Report};
use tombstones::{carried, Head, Tombstone, REASONS};

/// Most ids remembered as tombstones per partition; beyond it the oldest is forgotten.
pub const MAX_TOMBSTONES: usize = 10_000;
/// Most bytes of tombstoned ids per partition; beyond it the oldest is forgotten.
pub const MAX_TOMBSTONE_BYTES: usize = 1 << 20;

/// The limits a partition enforces, from [`crate::config::Limits`] and `txn_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most tasks per transaction.
    pub max_tasks_per_txn: usize,
    /// Most staged bytes per transaction.
    pub max_txn_bytes: u64,
    /// How long (ms of the driver's clock) a transaction may stay open.
    pub txn_timeout_ms: u64,
}

/// What the driver knows of the partition's committed position when it is assigned.
#[derive(Debug, Clone, Default)]
pub struct Assignment {
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// Its metadata string (the skip set), empty if none.
    pub metadata: String,
    /// The log's first offset (low watermark), if it could be read.
    pub log_start: Option<i64>,
    /// The log's end offset (high watermark), if it could be read.
    pub log_end: Option<i64>,
}

/// Which offsets a completed piece of work releases. Returned to [`PartitionMachine::done`]
/// unchanged once the work is delivered or its dead-letter write acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// The hold this work kept on the committed offset.
    pub hold: i64,
    /// The first offset of the instance it finishes (the hold, except for a later record
    /// of a tombstoned instance).
    pub first: i64,
    /// Bytes it holds in memory until done (its records), counted in the budget.
    pub bytes: u64,
    /// The offset to enter into the skip set.
    pub finish: Option<i64>,
}

/// A committed transaction, whole, ready to deliver.
#[derive(Debug)]
pub struct Committed {
    /// Transaction id.
    pub id: String,
    /// Offset of the commit marker.
    pub commit_offset: i64,
    /// Offset of the first task.
    pub first_offset: i64,
    /// Tasks in offset order.
    pub tasks: Records,
    /// The commit marker.
    pub marker: crate::protocol::Record,
}

impl Committed {
    /// The transaction as the delivery worker takes it, consumed from `topic`/`partition`
    /// and committed at `committed_at` (the driver's clock, for the latency histogram).
    pub fn into_ready(
        self,
        topic: Arc<str>,
        partition: i32,
        committed_at: std::time::Instant,
    ) -> ReadyTxn {
        ReadyTxn {
            topic,
            partition,
            id: self.id,
            commit_offset: self.commit_offset,
            first_offset: self.first_offset,
            tasks: self.tasks,
            marker: self.marker,
            committed_at,
        }
    }
}

/// How a dead-lettered group counts among transaction outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Open longer than `txn_timeout`.
    Expired,
    /// Any other failure of a whole or open transaction.
    DeadLettered,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action {
    /// POST this committed transaction (in order, one in flight per partition); on
    /// success or after dead-lettering it, report `release` to [`PartitionMachine::done`].
    Deliver(Committed, Release),
    /// Write this group to the dead-letter topic, then report `release`; `fate` is set
    /// when the group ends a transaction that should be counted as such.
    DeadLetter(DeadTxn, Release, Option<Fate>),
    /// Log and count this event.
    Report(Report),
}

/// A record as decoded by [`crate::protocol::decode`]: its marker, or why its marker
/// fields do not decode and, if it could be read, the id it belongs to.
pub type Decoded<'a> = Result<Marker<'a>, (DecodeError, Option<&'a str>)>;

/// The state of one assigned partition.
#[derive(Debug)]
pub struct PartitionMachine {
    topic: Arc<str>,
    partition: i32,
    settings: Settings,
    store: MemoryStore,
    offsets: OffsetTracker,
    tombstones: HashMap<Box<str>, Tombstone>,
    /// Tombstones whose marker was consumed, by marker offset, until it is written.
    closing: BTreeMap<i64, (Box<str>, Tombstone)>,
    /// Dead-letter writes of tombstoned instances in flight: the offset each finishes,
    /// with the id and first offset of its instance, to advance `written`.
    tomb_writes: HashMap<i64, (Box<str>, i64)>,
    /// Heads of instances an earlier owner dead-lettered while open, by first offset,
    /// from the commit metadata: the record there names the id.
    heads: BTreeMap<i64, Head>,
    tombstone_bytes: usize,
    tombstone_seq: u64,
    recent_commits: RecentIds,
    gap: Option<GapWindow>,
    /// The committed offset at assign, until the first record is seen.
    first_check: Option<i64>,
    /// Work handed to the driver and not yet reported done.
    queued: usize,
    /// Bytes of that work (committed transactions, dead-letter groups).
    queued_bytes: u64,
    /// The highest offset of the skip set loaded on assign.
    replay_until: Option<i64>,
    now_ms: u64,
}

impl PartitionMachine {
    /// A partition just assigned, at driver clock `now_ms`; the reports say what the
    /// assignment found (offset gaps).
    pub fn assigned(
        topic: Arc<str>,
        partition: i32,
        settings: Settings,
        a: &Assignment,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) -> PartitionMachine {
        let mut gap = None;
        let mut offsets = OffsetTracker::assigned(a.committed, &a.metadata);
        if let Some(c) = a.committed {
            let found = match (a.log_start, a.log_end) {
                (Some(start), _) if c < start => Some(("retention", start)),
                (_, Some(end)) if c > end => Some(("truncation", end)),
                _ => None,
            };
            if let Some((kind, found)) = found {
                if kind == "truncation" {
                    // Offsets at and above the log end will be written again by other
                    // records: a skip set naming them no longer describes this log.
                    offsets = OffsetTracker::assigned(a.committed, "");
                }
                out.push(Action::Report(Report::OffsetGap {
                    kind,
                    committed: c,
                    found,
                }));
                gap = Some(GapWindow {
                    until_ms: now_ms + settings.txn_timeout_ms,
                    cleared: HashSet::new(),
                });
            }
        }
        let replay_until = offsets.last_finished();
        let mut m = PartitionMachine {
            topic,
            partition,
            settings,
            store: MemoryStore::new(),
            offsets,
            tombstones: HashMap::new(),
            closing: BTreeMap::new(),
            tomb_writes: HashMap::new(),
            heads: BTreeMap::new(),
            tombstone_bytes: 0,
            tombstone_seq: 0,
            recent_commits: RecentIds::default(),
            gap,
            first_check: a.committed,
            queued: 0,
            queued_bytes: 0,
            replay_until,
            now_ms,
        };
        // After a gap the tombstones may be stale (their markers may be among the deleted
        // records); the gap rule protects those instances instead.
        if let (Some(c), None) = (a.committed, &m.gap) {
            // Ids dead-lettered while open by an earlier owner, whose first record the
            // committed offset has passed: their later records follow them still.
            for t in decode_tombstones(c, &a.metadata) {
                let reason = REASONS
                    .iter()
                    .find(|r| **r == t.reason)
                    .copied()
                    .unwrap_or("replayed");
                match t.id {
                    Some(id) => m.add_tombstone(&id, t.first, t.source, reason, t.written, out),
                    None => {
                        m.heads.insert(
                            t.first,
                            Head {
                                written: t.written,
                                source: t.source,
                                reason,
                            },
                        );
                    }
                }
            }
        }
        m
    }

    /// Source topic.
    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    /// Source partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Work handed out and not yet done (deliveries and dead-letter writes).
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Bytes of work handed out and not yet done: committed transactions queued or being
    /// delivered, and dead-letter groups not yet written.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }

    /// Open transactions.
    pub fn open_count(&self) -> usize {
        self.store.len()
    }

    /// Bytes staged in open transactions.
    pub fn staged_bytes(&self) -> u64 {
        self.store.bytes()
    }

    /// Every open transaction with its id, in no particular order.
    pub fn open(&self) -> Vec<(&str, &OpenTxn)> {
        self.store.open()
    }

    /// Tombstoned ids remembered.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// The broker drops offset-commit metadata: commit points stop relying on it (see
    /// [`OffsetTracker::skip_set_lost`]).
    pub fn metadata_unreliable(&mut self) {
        self.offsets.skip_set_lost();
    }

    /// A commit was read back with its metadata: commit points may rely on it (see
    /// [`OffsetTracker::metadata_kept`]).
    pub fn metadata_kept(&mut self) {
        self.offsets.metadata_kept();
    }

    /// The offset bookkeeping (committed, consumed, safe offsets).
    pub fn offsets(&self) -> &OffsetTracker {
        &self.offsets
    }

    /// The commit to send now, if it changed; the driver confirms with [`Self::committed`].
    pub fn commit_point(&mut self) -> Option<CommitPoint> {
        let carried = carried(&self.tombstones, &self.closing);
        self.offsets.commit_point(&carried)
    }

    /// The commit to send regardless of change (revoke, shutdown, refresh).
    pub fn final_commit_point(&mut self) -> Option<CommitPoint> {
        let carried = carried(&self.tombstones, &self.closing);
        self.offsets.final_commit_point(&carried)
    }

    /// Records that `offset` was handed to the broker as the committed offset.
    pub fn committed(&mut self, offset: i64) {
        self.offsets.committed_at(offset);
    }

    /// A work item handed out earlier is complete (delivered, or its dead-letter write
    /// acknowledged).
    pub fn done(&mut self, r: Release) {
        self.queued = self.queued.saturating_sub(1);
        self.queued_bytes = self.queued_bytes.saturating_sub(r.bytes);
        self.offsets.release(r.hold);
        if let Some(f) = r.finish {
            self.offsets.finish(f, r.first);
            self.closing.remove(&f);
            if let Some((id, first)) = self.tomb_writes.remove(&f) {
                let live = self.tombstones.get_mut(&id).filter(|t| t.first == first);
                let t = match live {
                    Some(t) => Some(t),
                    None => self
                        .closing
                        .values_mut()
                        .find(|(i, t)| *i == id && t.first == first)
                        .map(|(_, t)| t),
                };
                if let Some(t) = t {
                    t.written = t.written.max(f);
                }
            }
        }
    }

    /// Handles one consumed record at driver clock `now_ms`.
    pub fn on_record(
        &mut self,
        rec: RecordRef<'_>,
        decoded: Decoded<'_>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        self.now_ms = self.now_ms.max(now_ms);
        let offset = rec.offset;
        // librdkafka can hand a record out twice. A pause saves the partition's fetch
        // position, and a record the consumer has taken from the queue but not yet read
        // is not in it; the resume fetches that record again. librdkafka pauses every
        // partition itself while a cooperative rebalance waits for the application
        // (`rd_kafka_assignment_pause`, on its own thread), so this happens without any
        // pause of ours: the fault-injection suite once delivered a transaction with one
        // task twice. A record is applied once per assignment.
        if let Some(next) = self.offsets.next_offset().filter(|&next| offset < next) {
            out.push(Action::Report(Report::ReadAgain { offset, next }));
            return;
        }
        if let Some(committed) = self.first_check.take() {
            if offset == committed {
                // The log continues exactly where the committed offset says: whatever the
                // log's bounds suggested at assign (a broker can misreport its end), no
                // record was lost.
                self.gap = None;
            }
            if offset < committed {
                // librdkafka reset the position below the committed offset (the log was
                // truncated or the offset fell out of range): the skip set names
                // offsets of records that may no longer be the same.
                self.offsets.forget_skip_set();
                // Tombstones from the metadata may name records that are gone too; the
                // gap rule protects their instances instead.
                self.tombstones.clear();
                self.tombstone_bytes = 0;
                self.heads.clear();
                out.push(Action::Report(Report::OffsetGap {
                    kind: "reset",
                    committed,
                    found: offset,
                }));
                self.gap.get_or_insert_with(|| GapWindow {
                    until_ms: self.now_ms + self.settings.txn_timeout_ms,
                    cleared: HashSet::new(),
                });
            }
        }
        self.offsets.consumed(offset);
        let kind = match &decoded {
            Ok(m) => match m.kind {
                Kind::Task => ConsumedKind::Task,
                Kind::Commit { .. } => ConsumedKind::Commit,
                Kind::Abort => ConsumedKind::Abort,
            },
            Err(_) => ConsumedKind::Invalid,
        };
        out.push(Action::Report(Report::Consumed(kind)));
        if (!self.heads.is_empty() || !self.tombstones.is_empty())
            && self.written_before(offset, &decoded, out)
        {
            return;
        }
        if self.offsets.is_finished(offset) {
            self.replayed(offset, &decoded, out);
            return;
        }
        match decoded {
            Err((e, None)) => {
                // No id: the record belongs to no instance.
                self.offsets.hold(offset);
                let dead = self.dead(None, rec.into(), e.reason(), e.to_string(), None);
                self.emit_dead(dead, offset, Some(offset), None, true, out);
            }
            Err((e, Some(id))) => self.poison(id, rec, e, out),
            Ok(m) => {
                if !self.tombstones.is_empty() && self.tombstoned(m.id, offset) {
                    self.follow(m.id, rec, &m.kind, out);
                    return;
                }
                match m.kind {
                    Kind::Task => self.stage(m.id, rec, out),
                    Kind::Abort => self.abort(m.id, offset, out),
                    Kind::Commit { count } => self.commit(m.id, rec, count, out),
                }
            }
        }
    }
}

/// Whether a record that fails to decode for `e` is still its instance's marker.
fn ends_instance(e: &DecodeError) -> bool {
    matches!(e, DecodeError::InvalidCount(..))
}

/// The dead-letter group of a committed transaction whose delivery failed: its tasks,
/// then its marker. The driver releases it with the delivery's [`Release`].
pub fn failed_delivery(
    txn: ReadyTxn,
    reason: &'static str,
    error: String,
    attempts: u32,
) -> DeadTxn {
    let mut records = txn.tasks;
    records.push(&txn.marker);
    DeadTxn {
        topic: txn.topic,
        partition: txn.partition,
        id: Some(txn.id),
        records,
        reason,
        error,
        attempts,
        source: None,
    }
}
