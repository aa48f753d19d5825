//! The life of an open instance: staging its tasks (and the limits), its commit (with
//! the `txn-count` check) or abort, poisoning by a record that does not decode, and
//! dead-lettering it while open; and the dead-letter groups the machine hands out.

use std::collections::{HashSet, VecDeque};

use crate::dlq::DeadTxn;
use crate::protocol::{DecodeError, Kind, RecordRef, Records};
use crate::staging::{OpenTxn, StagingStore};

use super::{
    ends_instance, Action, Committed, Fate, OperatorRefusal, PartitionMachine, Release, Report,
};

/// Bounded memory of recently committed ids, to name a second commit `duplicate_commit`.
#[derive(Default, Debug)]
pub(super) struct RecentIds {
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

impl PartitionMachine {
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

    pub(super) fn stage(&mut self, id: &str, rec: RecordRef<'_>, out: &mut Vec<Action>) {
        // Nothing in a build without the `failpoints` feature; tests/panics.rs panics
        // here, after the record was counted as consumed and before it is staged.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("machine::stage");
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

    pub(super) fn abort(&mut self, id: &str, offset: i64, out: &mut Vec<Action>) {
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

    pub(super) fn commit(
        &mut self,
        id: &str,
        rec: RecordRef<'_>,
        count: Option<u64>,
        out: &mut Vec<Action>,
    ) {
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
    pub(super) fn poison(
        &mut self,
        id: &str,
        rec: RecordRef<'_>,
        e: DecodeError,
        out: &mut Vec<Action>,
    ) {
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
    pub(super) fn tombstone_open(
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

    pub(super) fn dead(
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
    pub(super) fn emit_dead(
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
