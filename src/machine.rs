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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use hashbrown::HashMap;

use crate::delivery::ReadyTxn;
use crate::dlq::DeadTxn;
use crate::offsets::{decode_tombstones, Carried, CommitPoint, OffsetTracker};
use crate::protocol::{DecodeError, Kind, Marker, RecordRef, Records};
use crate::staging::{MemoryStore, OpenTxn, StagingStore};

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

/// What an event was, for the driver to log and count in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A record was consumed; `kind` is its protocol meaning.
    Consumed(ConsumedKind),
    /// An abort discarded `tasks` staged tasks.
    Aborted {
        /// Offset of the abort marker.
        offset: i64,
        /// Transaction id.
        id: String,
        /// Tasks discarded.
        tasks: usize,
    },
    /// A commit marker at `offset` was handled before this owner (skip set).
    DuplicateSkipped {
        /// Offset of the commit marker.
        offset: i64,
        /// Transaction id.
        id: String,
    },
    /// The open transaction `id` was dead-lettered while open and became a tombstone.
    Tombstoned {
        /// First offset of the instance.
        offset: i64,
        /// Transaction id.
        id: String,
        /// Why.
        reason: &'static str,
        /// Tasks in the first dead-lettered group.
        tasks: usize,
        /// Milliseconds it had been open (driver's clock), for `expired`.
        age_ms: u64,
    },
    /// A record was dead-lettered on its own or as part of a group; `error` says why.
    Rejected {
        /// Offset of the record that decided it.
        offset: i64,
        /// Transaction id, if known.
        id: Option<String>,
        /// Stable reason label.
        reason: &'static str,
        /// Human-readable error.
        error: String,
    },
    /// A tombstone was forgotten: a later record of `id` opens a new instance.
    TombstoneForgotten {
        /// First offset of the dead instance.
        offset: i64,
        /// Transaction id.
        id: String,
        /// `silent` (no record within `txn_timeout`) or `capacity`.
        why: &'static str,
    },
    /// The log does not continue where the committed offset says.
    OffsetGap {
        /// `retention` (committed below the log start), `truncation` (above its end), or
        /// `reset` (first record below the committed offset).
        kind: &'static str,
        /// The committed offset.
        committed: i64,
        /// The offset the log offers instead (log start, log end or first record).
        found: i64,
    },
    /// A transaction was committed and queued for delivery.
    Committed {
        /// Milliseconds between its first task and its commit (driver's clock).
        open_ms: u64,
    },
}

/// Protocol meaning of a consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumedKind {
    /// A task.
    Task,
    /// A commit marker.
    Commit,
    /// An abort marker.
    Abort,
    /// A record whose marker fields do not decode.
    Invalid,
}

/// Why an operator's dead-letter request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorRefusal {
    /// The id has no open transaction in this partition.
    #[error("no open transaction with that id")]
    NotOpen,
    /// The partition is replaying records an earlier owner already handled.
    #[error("the partition is replaying records an earlier owner handled (up to offset {until}); the transaction may already be delivered, try again once past it")]
    Replaying {
        /// Highest offset of the skip set loaded on assign.
        until: i64,
    },
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

#[derive(Debug)]
struct Tombstone {
    /// First offset of the instance.
    first: i64,
    /// Offset named in `txn-dlq-source` by every dead-lettered part of the instance.
    source: i64,
    reason: &'static str,
    /// Its highest offset whose dead-letter write is acknowledged (`first - 1`: none).
    written: i64,
    /// Driver clock at its last record.
    last_ms: u64,
    /// Sequence number, for capacity eviction of the oldest.
    seq: u64,
}

/// A tombstone read back from commit metadata without its id.
#[derive(Debug)]
struct Head {
    written: i64,
    source: i64,
    reason: &'static str,
}

/// After an offset gap: instances first seen before `until_ms` may have lost records.
#[derive(Debug)]
struct GapWindow {
    until_ms: u64,
    /// Ids whose marker was seen since the gap: their next instance is whole.
    cleared: HashSet<Box<str>>,
}

/// Bounded memory of recently committed ids, to name a second commit `duplicate_commit`.
#[derive(Default, Debug)]
struct RecentIds {
    order: VecDeque<Box<str>>,
    set: HashSet<Box<str>>,
}

impl RecentIds {
    const CAP: usize = 4096;
    fn insert(&mut self, id: &str) {
        if self.set.insert(id.into()) {
            self.order.push_back(id.into());
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

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

    /// Whether an open transaction or a tombstone is old enough to expire if the
    /// partition is caught up: the driver checks the log end only then.
    pub fn wants_caught_up(&self, now_ms: u64) -> bool {
        let t = self.settings.txn_timeout_ms;
        self.store
            .open()
            .iter()
            .any(|(_, x)| now_ms.saturating_sub(x.opened_ms) > t)
            || self
                .tombstones
                .values()
                .any(|x| now_ms.saturating_sub(x.last_ms) > t)
            || self.gap.as_ref().is_some_and(|g| now_ms > g.until_ms)
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

    /// The clock advanced to `now_ms`; `caught_up` says whether the partition has been
    /// consumed to the end of its log and is being fetched (not paused). Expires open
    /// transactions and forgets silent tombstones only when caught up.
    pub fn tick(&mut self, now_ms: u64, caught_up: bool, out: &mut Vec<Action>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if !caught_up {
            return;
        }
        let timeout = self.settings.txn_timeout_ms;
        if self.gap.as_ref().is_some_and(|g| now > g.until_ms) {
            self.gap = None;
        }
        let mut expired: Vec<(i64, Box<str>)> = self
            .store
            .open()
            .into_iter()
            .filter(|(_, t)| now.saturating_sub(t.opened_ms) > timeout)
            .map(|(id, t)| (t.first_offset, id.into()))
            .collect();
        // Oldest first, so the dead-letter topic holds them in log order.
        expired.sort_unstable();
        for (_, id) in expired {
            if let Some(t) = self.store.take(&id) {
                let age_ms = now.saturating_sub(t.opened_ms);
                let error = format!(
                    "no commit or abort within {age_ms} ms of consuming the first task, with the partition caught up"
                );
                self.tombstone_open(&id, t, "expired", error, age_ms, out);
            }
        }
        let mut silent: Vec<(i64, Box<str>)> = self
            .tombstones
            .iter()
            .filter(|(_, t)| now.saturating_sub(t.last_ms) > timeout)
            .map(|(id, t)| (t.first, id.clone()))
            .collect();
        silent.sort_unstable();
        for (_, id) in silent {
            self.forget(&id, "silent", out);
        }
    }

    /// Dead-letters the open transaction `id` on an operator's request; returns the number
    /// of tasks dead-lettered.
    ///
    /// # Errors
    /// [`OperatorRefusal::NotOpen`] when `id` has no open transaction here;
    /// [`OperatorRefusal::Replaying`] while the partition replays records an earlier owner
    /// already handled (the transaction may be one it delivered: its commit lies ahead).
    pub fn operator_dead_letter(
        &mut self,
        id: &str,
        out: &mut Vec<Action>,
    ) -> Result<usize, OperatorRefusal> {
        if self.store.get(id).is_none() {
            return Err(OperatorRefusal::NotOpen);
        }
        if let (Some(last), next) = (self.replay_until, self.offsets.next_offset()) {
            if next.is_none_or(|n| n <= last) {
                return Err(OperatorRefusal::Replaying { until: last });
            }
        }
        let Some(t) = self.store.take(id) else {
            return Err(OperatorRefusal::NotOpen);
        };
        let tasks = t.tasks.len();
        self.tombstone_open(
            id,
            t,
            "operator",
            "dead-lettered through the admin API".into(),
            0,
            out,
        );
        Ok(tasks)
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

    fn stage(&mut self, id: &str, rec: RecordRef<'_>, out: &mut Vec<Action>) {
        let offset = rec.offset;
        let suspect = match &self.gap {
            Some(g) => !g.cleared.contains(id),
            None => false,
        };
        let now = self.now_ms;
        let t = self.store.stage(id, rec, now);
        let (tasks, bytes) = (t.tasks.len(), t.bytes);
        if tasks == 1 {
            // This task opened the transaction: hold the commit point below it.
            self.offsets.hold(offset);
            if suspect {
                self.store.mark_suspect(id);
            }
        }
        let s = self.settings;
        if tasks > s.max_tasks_per_txn || bytes > s.max_txn_bytes {
            if let Some(t) = self.store.take(id) {
                let error = format!(
                    "transaction has {tasks} tasks / {bytes} bytes, limits are {} / {}",
                    s.max_tasks_per_txn, s.max_txn_bytes
                );
                self.tombstone_open(id, t, "too_large", error, 0, out);
            }
        }
    }

    fn abort(&mut self, id: &str, offset: i64, out: &mut Vec<Action>) {
        self.clear_gap(id);
        let tasks = match self.store.take(id) {
            Some(t) => {
                self.offsets.release(t.first_offset);
                t.tasks.len()
            }
            None => 0,
        };
        out.push(Action::Report(Report::Aborted {
            offset,
            id: id.to_string(),
            tasks,
        }));
    }

    fn commit(&mut self, id: &str, rec: RecordRef<'_>, count: Option<u64>, out: &mut Vec<Action>) {
        let offset = rec.offset;
        self.clear_gap(id);
        let Some(t) = self.store.take(id) else {
            let (reason, error) = if self.recent_commits.contains(id) {
                (
                    "duplicate_commit",
                    "a second commit for a transaction already committed",
                )
            } else {
                ("empty_commit", "commit with no staged tasks")
            };
            self.offsets.hold(offset);
            let dead = self.dead(Some(id), rec.into(), reason, error.into(), None);
            self.emit_dead(
                dead,
                offset,
                Some(offset),
                Some(Fate::DeadLettered),
                true,
                out,
            );
            return;
        };
        self.recent_commits.insert(id);
        out.push(Action::Report(Report::Committed {
            open_ms: self.now_ms.saturating_sub(t.opened_ms),
        }));
        let staged = t.tasks.len() as u64;
        let rejection = match count {
            Some(expected) if expected != staged => Some((
                "count_mismatch",
                format!("commit declares {expected} tasks, {staged} were staged"),
            )),
            None if t.suspect => Some((
                "offset_gap",
                "the log had a gap before this transaction's records and its commit has no txn-count to prove it whole".to_string(),
            )),
            _ => None,
        };
        let release = Release {
            hold: t.first_offset,
            first: t.first_offset,
            bytes: t.tasks.encoded_len() as u64 + rec.size(),
            finish: Some(offset),
        };
        if let Some((reason, error)) = rejection {
            let mut records = t.tasks;
            records.push(rec);
            let dead = self.dead(Some(id), records, reason, error, None);
            let Release { hold, finish, .. } = release;
            self.emit_dead(dead, hold, finish, Some(Fate::DeadLettered), true, out);
            return;
        }
        self.queued += 1;
        self.queued_bytes += release.bytes;
        out.push(Action::Deliver(
            Committed {
                id: id.to_string(),
                commit_offset: offset,
                first_offset: t.first_offset,
                tasks: t.tasks,
                marker: rec.to_record(),
            },
            release,
        ));
    }

    /// A record whose marker fields do not decode but whose id is known poisons its
    /// instance: what was staged and this record are dead-lettered as one group, and the
    /// id is tombstoned until its marker. A commit whose `txn-count` does not parse is
    /// still a marker: it ends the instance, and nothing is tombstoned.
    fn poison(&mut self, id: &str, rec: RecordRef<'_>, e: DecodeError, out: &mut Vec<Action>) {
        let offset = rec.offset;
        let ends = ends_instance(&e);
        if self.tombstoned(id, offset) {
            let kind = if ends {
                Kind::Commit { count: None }
            } else {
                Kind::Task
            };
            self.follow(id, rec, &kind, out);
            return;
        }
        let (first, mut records, hold_kept) = match self.store.take(id) {
            Some(t) => (t.first_offset, t.tasks, true),
            None => (offset, Records::new(), false),
        };
        records.push(rec);
        let tasks = records.len();
        if !hold_kept {
            self.offsets.hold(first);
        }
        let fate = (tasks > 1).then_some(Fate::DeadLettered);
        if ends {
            self.clear_gap(id);
            let dead = self.dead(Some(id), records, e.reason(), e.to_string(), None);
            self.emit_dead(dead, first, Some(offset), fate, true, out);
            return;
        }
        let dead = self.dead(Some(id), records, e.reason(), e.to_string(), Some(first));
        self.emit_dead(dead, first, Some(offset), fate, false, out);
        self.tomb_writes.insert(offset, (id.into(), first));
        self.add_tombstone(id, first, first, e.reason(), first - 1, out);
        out.push(Action::Report(Report::Tombstoned {
            offset: first,
            id: id.to_string(),
            reason: e.reason(),
            tasks,
            age_ms: 0,
        }));
    }

    /// Dead-letters an open transaction while open and tombstones its id.
    fn tombstone_open(
        &mut self,
        id: &str,
        t: OpenTxn,
        reason: &'static str,
        error: String,
        age_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let first = t.first_offset;
        let tasks = t.tasks.len();
        // The group's last offset enters the skip set: a new owner replaying it knows the
        // group up to there is written (see `replayed`).
        let last = t.tasks.last().map_or(first, |r| r.offset);
        let dead = self.dead(Some(id), t.tasks, reason, error, Some(first));
        let fate = if reason == "expired" {
            Fate::Expired
        } else {
            Fate::DeadLettered
        };
        // The open transaction's hold at `first` passes to the write.
        self.emit_dead(dead, first, Some(last), Some(fate), false, out);
        self.tomb_writes.insert(last, (id.into(), first));
        self.add_tombstone(id, first, first, reason, first - 1, out);
        out.push(Action::Report(Report::Tombstoned {
            offset: first,
            id: id.to_string(),
            reason,
            tasks,
            age_ms,
        }));
    }

    fn add_tombstone(
        &mut self,
        id: &str,
        first: i64,
        source: i64,
        reason: &'static str,
        written: i64,
        out: &mut Vec<Action>,
    ) {
        self.tombstone_seq += 1;
        self.tombstone_bytes += id.len();
        self.tombstones.insert(
            id.into(),
            Tombstone {
                first,
                source,
                reason,
                written,
                last_ms: self.now_ms,
                seq: self.tombstone_seq,
            },
        );
        while self.tombstones.len() > MAX_TOMBSTONES
            || (self.tombstone_bytes > MAX_TOMBSTONE_BYTES && self.tombstones.len() > 1)
        {
            let Some(oldest) = self
                .tombstones
                .iter()
                .min_by_key(|(_, t)| t.seq)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            self.forget(&oldest, "capacity", out);
        }
    }

    /// Whether a record of `id` at `offset` belongs to a tombstoned instance.
    fn tombstoned(&self, id: &str, offset: i64) -> bool {
        self.tombstones.get(id).is_some_and(|t| offset >= t.first)
    }

    /// A record an earlier owner already dead-lettered as part of a tombstoned instance
    /// (from the metadata: the instance's head, or a record up to its `written` offset):
    /// recreates the tombstone from a head and skips what was written. `true` when the
    /// record is done with.
    fn written_before(
        &mut self,
        offset: i64,
        decoded: &Decoded<'_>,
        out: &mut Vec<Action>,
    ) -> bool {
        let (id, marker) = match decoded {
            Ok(m) => (m.id, matches!(m.kind, Kind::Commit { .. } | Kind::Abort)),
            Err((e, Some(id))) => (*id, ends_instance(e)),
            Err((_, None)) => return false,
        };
        if let Some(h) = self.heads.remove(&offset) {
            if let Some(t) = self.store.take(id) {
                self.offsets.release(t.first_offset);
            }
            self.add_tombstone(id, offset, h.source, h.reason, h.written, out);
        }
        let now = self.now_ms;
        let Some(t) = self.tombstones.get_mut(id) else {
            return false;
        };
        if offset < t.first || offset > t.written {
            return false;
        }
        t.last_ms = now;
        if marker {
            self.tombstones.remove(id);
            self.tombstone_bytes -= id.len();
            self.clear_gap(id);
        }
        true
    }

    fn forget(&mut self, id: &str, why: &'static str, out: &mut Vec<Action>) {
        if let Some(t) = self.tombstones.remove(id) {
            self.tombstone_bytes -= id.len();
            out.push(Action::Report(Report::TombstoneForgotten {
                offset: t.first,
                id: id.to_string(),
                why,
            }));
        }
    }

    /// A record of a tombstoned id follows its instance into the dead-letter topic; a
    /// marker ends the tombstone once written.
    fn follow(&mut self, id: &str, rec: RecordRef<'_>, kind: &Kind, out: &mut Vec<Action>) {
        let offset = rec.offset;
        let marker = matches!(kind, Kind::Commit { .. } | Kind::Abort);
        let now = self.now_ms;
        let Some(t) = self.tombstones.get_mut(id) else {
            return;
        };
        t.last_ms = now;
        let (reason, source, first) = (t.reason, t.source, t.first);
        if marker {
            if let Some(t) = self.tombstones.remove(id) {
                self.tombstone_bytes -= id.len();
                // Until the marker is written, a new owner still needs the tombstone to
                // dead-letter it: it keeps travelling in the commit metadata.
                self.closing.insert(offset, (id.into(), t));
            }
            self.clear_gap(id);
        }
        self.offsets.hold(offset);
        let error = format!(
            "the transaction instance that began at offset {first} was dead-lettered as {reason}; its later records follow it"
        );
        let dead = self.dead(Some(id), rec.into(), reason, error, Some(source));
        self.emit_dead(dead, offset, Some(offset), None, false, out);
        self.tomb_writes.insert(offset, (id.into(), first));
    }

    /// A record at an offset in the skip set: an earlier owner completed its handling.
    fn replayed(&mut self, offset: i64, decoded: &Decoded<'_>, out: &mut Vec<Action>) {
        let (id, marker) = match decoded {
            Ok(m) => (m.id, matches!(m.kind, Kind::Commit { .. } | Kind::Abort)),
            Err((e, Some(id))) => (*id, ends_instance(e)),
            Err((_, None)) => return,
        };
        let staged = self.store.take(id);
        if let Some(t) = &staged {
            self.offsets.release(t.first_offset);
            // The skip set loaded on assign carries ends, not firsts: note where this
            // instance began here, so a commit point that cannot rely on metadata stays at
            // or below it and a later owner never replays its tail alone.
            self.offsets.finish(offset, t.first_offset);
        }
        if marker {
            if self.tombstones.remove(id).is_some() {
                self.tombstone_bytes -= id.len();
            }
            self.clear_gap(id);
            // Only a commit that had tasks staged was a delivery (an empty or duplicate
            // commit was dead-lettered on its own).
            if let (
                Ok(Marker {
                    kind: Kind::Commit { .. },
                    ..
                }),
                Some(_),
            ) = (decoded, &staged)
            {
                out.push(Action::Report(Report::DuplicateSkipped {
                    offset,
                    id: id.to_string(),
                }));
            }
        } else if !self.tombstones.contains_key(id) {
            // The group up to here was dead-lettered while its instance was open.
            let first = staged.as_ref().map_or(offset, |t| t.first_offset);
            let reason = "replayed";
            self.add_tombstone(id, first, first, reason, offset, out);
        } else if let Some(t) = self.tombstones.get_mut(id) {
            t.last_ms = self.now_ms;
        }
    }

    fn clear_gap(&mut self, id: &str) {
        if let Some(g) = &mut self.gap {
            g.cleared.insert(id.into());
        }
    }

    fn dead(
        &self,
        id: Option<&str>,
        records: Records,
        reason: &'static str,
        error: String,
        source: Option<i64>,
    ) -> DeadTxn {
        DeadTxn {
            topic: self.topic.clone(),
            partition: self.partition,
            id: id.map(str::to_string),
            records,
            reason,
            error,
            attempts: 0,
            source,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_dead(
        &mut self,
        dead: DeadTxn,
        hold: i64,
        finish: Option<i64>,
        fate: Option<Fate>,
        report: bool,
        out: &mut Vec<Action>,
    ) {
        self.queued += 1;
        let bytes = dead.records.encoded_len() as u64;
        // A later record of a tombstoned instance names the instance's first record as
        // its source.
        let first = dead.source.map_or(hold, |s| s.min(hold));
        self.queued_bytes += bytes;
        if report {
            out.push(Action::Report(Report::Rejected {
                offset: dead.records.last().map_or(hold, |r| r.offset),
                id: dead.id.clone(),
                reason: dead.reason,
                error: dead.error.clone(),
            }));
        }
        out.push(Action::DeadLetter(
            dead,
            Release {
                hold,
                first,
                bytes,
                finish,
            },
            fate,
        ));
    }
}

/// Whether a record that fails to decode for `e` is still its instance's marker.
fn ends_instance(e: &DecodeError) -> bool {
    matches!(e, DecodeError::InvalidCount(..))
}

/// Tombstones as the commit metadata carries them: the live ones and those whose marker
/// is being written.
fn carried<'a>(
    tombstones: &'a HashMap<Box<str>, Tombstone>,
    closing: &'a BTreeMap<i64, (Box<str>, Tombstone)>,
) -> Vec<Carried<'a>> {
    tombstones
        .iter()
        .chain(closing.values().map(|(id, t)| (id, t)))
        .map(|(id, t)| Carried {
            first: t.first,
            written: t.written,
            source: t.source,
            reason: t.reason,
            id,
        })
        .collect()
}

/// Dead-letter reasons a tombstone read back from commit metadata may carry; any other
/// is kept as `replayed`.
const REASONS: [&str; 10] = [
    "expired",
    "too_large",
    "operator",
    "not_utf8",
    "missing_type",
    "unknown_type",
    "missing_id",
    "bad_key_prefix",
    "invalid_count",
    "replayed",
];

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
