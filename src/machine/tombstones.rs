//! Tombstones: instances dead-lettered while open, whose later records follow them into
//! the dead-letter topic; heads read back from commit metadata, records an earlier owner
//! already handled (`written_before`, `replayed`), forgetting, and the tombstones the
//! commit metadata carries.

use std::collections::BTreeMap;

use hashbrown::HashMap;

use crate::offsets::Carried;
use crate::protocol::{Kind, Marker, RecordRef};
use crate::staging::StagingStore;

use super::{
    ends_instance, Action, Decoded, PartitionMachine, Report, MAX_TOMBSTONES, MAX_TOMBSTONE_BYTES,
};

#[derive(Debug)]
pub(super) struct Tombstone {
    /// First offset of the instance.
    pub(super) first: i64,
    /// Offset named in `txn-dlq-source` by every dead-lettered part of the instance.
    source: i64,
    reason: &'static str,
    /// Its highest offset whose dead-letter write is acknowledged (`first - 1`: none).
    pub(super) written: i64,
    /// Driver clock at its last record.
    pub(super) last_ms: u64,
    /// Sequence number, for capacity eviction of the oldest.
    seq: u64,
}

/// A tombstone read back from commit metadata without its id.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) written: i64,
    pub(super) source: i64,
    pub(super) reason: &'static str,
}

impl PartitionMachine {
    pub(super) fn add_tombstone(
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
    pub(super) fn tombstoned(&self, id: &str, offset: i64) -> bool {
        self.tombstones.get(id).is_some_and(|t| offset >= t.first)
    }

    /// A record an earlier owner already dead-lettered as part of a tombstoned instance
    /// (from the metadata: the instance's head, or a record up to its `written` offset):
    /// recreates the tombstone from a head and skips what was written. `true` when the
    /// record is done with.
    pub(super) fn written_before(
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

    pub(super) fn forget(&mut self, id: &str, why: &'static str, out: &mut Vec<Action>) {
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
    pub(super) fn follow(
        &mut self,
        id: &str,
        rec: RecordRef<'_>,
        kind: &Kind,
        out: &mut Vec<Action>,
    ) {
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
    pub(super) fn replayed(&mut self, offset: i64, decoded: &Decoded<'_>, out: &mut Vec<Action>) {
        let (id, marker) = match decoded {
            Ok(m) => (m.id, matches!(m.kind, Kind::Commit { .. } | Kind::Abort)),
            Err((e, Some(id))) => (*id, ends_instance(e)),
            Err((_, None)) => return,
        };
        let staged = self.store.take(id);
        if let Some(t) = &staged {
            self.offsets.release(t.first_offset);
            // The skip set loaded on assign carries ends, not firsts: note where this owner
            // first saw the instance, so a commit point that cannot rely on metadata stays
            // at or below it. (Where it began may lie below the committed offset; the
            // offset tracker therefore keeps inherited entries in the metadata.)
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
}

/// Tombstones as the commit metadata carries them: the live ones and those whose marker
/// is being written.
pub(super) fn carried<'a>(
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
pub(super) const REASONS: [&str; 10] = [
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
