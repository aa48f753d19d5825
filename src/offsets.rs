//! Safe offsets and the skip set: what may be committed, and what a new owner must not redo.
//!
//! The committed offset of a partition is the first offset of its oldest unfinished
//! transaction (staged, queued, in delivery or awaiting its dead-letter write), or the
//! next offset to consume when none is unfinished. Transactions finished *above* that
//! offset would be replayed by the next owner, so their commit-marker offsets travel in
//! the offset commit's metadata string and the next owner skips exactly those.
//!
//! The metadata names the offset it was written for (`txs2:<base>:<deltas>`): a new
//! owner ignores a skip set whose base is not the committed offset it reads (the offset
//! was reset or rewritten by another tool), since its offsets may no longer name the
//! same records.

use std::collections::{BTreeMap, BTreeSet};

/// Prefix of the metadata string, versioned so a future format can coexist.
const METADATA_PREFIX: &str = "txs2:";
/// The previous format (`txs1:<deltas>`, base implied), still read after an upgrade.
const METADATA_PREFIX_V1: &str = "txs1:";

/// Brokers reject metadata above `offset.metadata.max.bytes` (4096 by default).
pub const MAX_METADATA_BYTES: usize = 3900;

/// Offset bookkeeping of one partition.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// First offsets of unfinished work, with multiplicity.
    pending: BTreeMap<i64, u32>,
    /// Next offset to consume (last consumed + 1).
    next: Option<i64>,
    /// Offsets whose handling is complete: commit markers of delivered or dead-lettered
    /// transactions and single dead-lettered records. Includes the set loaded on assign.
    finished: BTreeSet<i64>,
    /// The first offset of the instance each finished offset ends (known for what this
    /// owner finished): an instance the committed offset passes is safe only while its
    /// finished offset travels in the skip set.
    firsts: BTreeMap<i64, i64>,
    /// The finished offsets loaded on assign and not yet passed. Where such an instance
    /// began is unknown (possibly below the committed offset, which the earlier owner may
    /// have moved past it while the skip set carried its end), so no commit point may
    /// leave one out of the metadata: a later owner would deliver its tail alone.
    inherited: BTreeSet<i64>,
    /// Whether the broker is known to keep commit metadata. Until a commit has been read
    /// back with it, the skip set and tombstones are written but not relied on.
    metadata_trusted: bool,
    /// The broker was seen dropping commit metadata (for good).
    metadata_dropped: bool,
    /// Last offset handed to a commit.
    committed: Option<i64>,
}

/// What to commit for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPoint {
    /// Offset to commit.
    pub offset: i64,
    /// Metadata carrying the skip set.
    pub metadata: String,
    /// Finished offsets that did not fit into the metadata (they will be redelivered).
    pub dropped: usize,
    /// Tombstones carried in the metadata.
    pub carried: usize,
    /// Tombstones that did not fit at all (a new owner may take their later records for a
    /// new instance).
    pub not_carried: usize,
}

/// A tombstone as it travels in the commit metadata: an id dead-lettered while open,
/// whose later records a new owner must dead-letter too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried<'a> {
    /// First offset of the dead instance.
    pub first: i64,
    /// The highest of its offsets whose dead-letter write is acknowledged (`first - 1`
    /// when none is): a new owner skips its records up to there, and writes the rest.
    pub written: i64,
    /// Offset its dead-letter records name in `txn-dlq-source`.
    pub source: i64,
    /// Its dead-letter reason.
    pub reason: &'a str,
    /// The transaction id.
    pub id: &'a str,
}

impl Carried<'_> {
    /// `;first,written,source,reason,id`, with `%`, `,` and `;` escaped. The id is left out
    /// (`head`) when the committed offset is at or below `first`: a new owner reads it
    /// from the record at `first`, and long ids then cost nothing.
    fn encode(&self, head: bool) -> String {
        let mut s = format!(
            ";{},{},{},{}",
            self.first,
            self.written,
            self.source,
            escape(self.reason)
        );
        if !head {
            s.push(',');
            s.push_str(&escape(self.id));
        }
        s
    }
}

/// Bytes kept for `txs2:<base>:` ahead of the tombstones.
const HEADER_RESERVE: usize = 32;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ',' => out.push_str("%2C"),
            ';' => out.push_str("%3B"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "2C" => ',',
            "3B" => ';',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// A tombstone read back from commit metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedOwned {
    /// First offset of the dead instance.
    pub first: i64,
    /// Its highest offset already dead-lettered.
    pub written: i64,
    /// Offset named in `txn-dlq-source`.
    pub source: i64,
    /// Dead-letter reason.
    pub reason: String,
    /// Transaction id; `None` for a head entry (the record at `first` names it).
    pub id: Option<String>,
}

/// The tombstones in `metadata` written for committed offset `base` (none for any other
/// base or format).
pub fn decode_tombstones(base: i64, metadata: &str) -> Vec<CarriedOwned> {
    let Some(rest) = metadata.strip_prefix(METADATA_PREFIX) else {
        return Vec::new();
    };
    let Some((b, body)) = rest.split_once(':') else {
        return Vec::new();
    };
    if b.parse::<i64>() != Ok(base) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for piece in body.split(';').skip(1) {
        let mut f = piece.splitn(5, ',');
        let parsed = (|| {
            let first = f.next()?.parse::<i64>().ok()?;
            let written = f.next()?.parse::<i64>().ok()?;
            let source = f.next()?.parse::<i64>().ok()?;
            let reason = unescape(f.next()?)?;
            let id = match f.next() {
                Some(id) => Some(unescape(id)?),
                None if first >= base => None,
                // A tombstone below the committed offset must name its id.
                None => return None,
            };
            Some(CarriedOwned {
                first,
                written,
                source,
                reason,
                id,
            })
        })();
        match parsed {
            Some(t) => out.push(t),
            // Not written by this format: carry nothing rather than something wrong.
            None => return Vec::new(),
        }
    }
    out
}

impl OffsetTracker {
    /// A tracker for a partition just assigned, with the skip set from its committed metadata.
    pub fn assigned(committed: Option<i64>, metadata: &str) -> OffsetTracker {
        let finished = match committed {
            Some(base) => decode_metadata(base, metadata),
            None => BTreeSet::new(),
        };
        OffsetTracker {
            pending: BTreeMap::new(),
            next: None,
            inherited: finished.clone(),
            finished,
            firsts: BTreeMap::new(),
            metadata_trusted: false,
            metadata_dropped: false,
            committed,
        }
    }

    /// Drops the skip set loaded on assign (the log no longer matches it).
    pub fn forget_skip_set(&mut self) {
        self.finished.clear();
        self.inherited.clear();
    }

    /// Notes that `offset` was consumed.
    pub fn consumed(&mut self, offset: i64) {
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// The highest offset in the skip set, if any: until the consumer passes it, it is
    /// replaying records an earlier owner already handled.
    pub fn last_finished(&self) -> Option<i64> {
        self.finished.last().copied()
    }

    /// Whether the record at `offset` was already handled by an earlier owner or session.
    pub fn is_finished(&self, offset: i64) -> bool {
        self.finished.contains(&offset)
    }

    /// Holds the committed offset at or below `first_offset` until [`Self::release`].
    pub fn hold(&mut self, first_offset: i64) {
        *self.pending.entry(first_offset).or_insert(0) += 1;
    }

    /// Releases one hold at `first_offset`.
    pub fn release(&mut self, first_offset: i64) {
        if let Some(n) = self.pending.get_mut(&first_offset) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&first_offset);
            }
        }
    }

    /// Records that the work ending at `offset`, whose instance began at `first`, is
    /// complete and must not be redone.
    pub fn finish(&mut self, offset: i64, first: i64) {
        self.finished.insert(offset);
        let f = self.firsts.entry(offset).or_insert(first);
        *f = (*f).min(first);
    }

    /// The broker was seen dropping commit metadata: from now on the committed offset
    /// never passes the first record of a finished instance whose end lies above it (a new
    /// owner redelivers such an instance whole instead of its tail), nor a tombstone's head.
    pub fn skip_set_lost(&mut self) {
        self.metadata_dropped = true;
        self.metadata_trusted = false;
    }

    /// A commit was read back with its metadata: the broker keeps it, and commit points
    /// may rely on the skip set and tombstones travelling. Until then they are written but
    /// not relied on, as if lost.
    pub fn metadata_kept(&mut self) {
        self.metadata_trusted = !self.metadata_dropped;
    }

    /// The offset a commit may carry now, if anything was consumed or committed.
    pub fn safe_offset(&self) -> Option<i64> {
        match (self.pending.keys().next(), self.next) {
            (Some(&p), Some(n)) => Some(p.min(n)),
            (Some(&p), None) => Some(p),
            (None, Some(n)) => Some(n),
            (None, None) => self.committed,
        }
    }

    /// Next offset to consume, if any record was consumed.
    pub fn next_offset(&self) -> Option<i64> {
        self.next
    }

    /// Last committed offset known to this tracker.
    pub fn committed(&self) -> Option<i64> {
        self.committed
    }

    /// The commit to send now, or `None` when nothing changed since the last one.
    ///
    /// `tombstones` are the ids dead-lettered while open whose marker has not come: each
    /// whose first record the offset passes must travel in the metadata; one that does not
    /// fit keeps the offset at its first record instead.
    pub fn commit_point(&mut self, tombstones: &[Carried<'_>]) -> Option<CommitPoint> {
        let cp = self.final_commit_point(tombstones)?;
        if self.committed == Some(cp.offset)
            && cp.dropped == 0
            && !self.finished_changed_since_commit()
            && cp.carried == 0
        {
            return None;
        }
        Some(cp)
    }

    /// The commit to send regardless of change (on revoke, shutdown and refresh).
    pub fn final_commit_point(&mut self, tombstones: &[Carried<'_>]) -> Option<CommitPoint> {
        let mut offset = self.safe_offset()?;
        // Tombstones first: a new owner needs them to keep dead instances dead; the skip
        // set only saves duplicates. A tombstone whose head the offset passes travels
        // whole (with its id); one at or above the offset as a head entry, which a long id
        // does not lengthen. When not all fit, the offset stays at the head of the first
        // that cannot travel whole, as few as needed: the most tombstones then fit.
        let mut sorted: Vec<&Carried<'_>> = tombstones.iter().collect();
        sorted.sort_by_key(|t| t.first);
        let full: Vec<String> = sorted.iter().map(|t| t.encode(false)).collect();
        let head: Vec<String> = sorted.iter().map(|t| t.encode(true)).collect();
        let needed = sorted.iter().take_while(|t| t.first < offset).count();
        // Inherited skip entries travel before any tombstone (see `inherited`): they fitted
        // in the commit that carried them here, and a base at or above it only shortens
        // their deltas. Reserved at their length from the last commit, an upper bound.
        let floor_base = self.committed.unwrap_or(offset).min(offset);
        let reserve: usize = self
            .inherited
            .range(offset..)
            .map(|e| digits(e - floor_base) + 1)
            .sum::<usize>()
            .min(MAX_METADATA_BYTES - HEADER_RESERVE);
        let budget = MAX_METADATA_BYTES - HEADER_RESERVE - reserve;
        let head_total: usize = head.iter().map(String::len).sum();
        // Largest k (whole entries) with whole[..k] + heads[k..] within the budget.
        let mut cost: usize = head_total
            + full[..needed]
                .iter()
                .zip(&head[..needed])
                .map(|(f, h)| f.len() - h.len())
                .sum::<usize>();
        let mut k = needed;
        while cost > budget && k > 0 {
            k -= 1;
            cost -= full[k].len() - head[k].len();
        }
        if k < needed {
            offset = sorted[k].first;
        }
        let mut tail = String::new();
        let (mut carried, mut not_carried) = (0, 0);
        for (i, piece) in full[..k].iter().chain(head[k..].iter()).enumerate() {
            if HEADER_RESERVE + reserve + tail.len() + piece.len() <= MAX_METADATA_BYTES {
                tail.push_str(piece);
                carried += 1;
            } else {
                // Only heads get here (k == 0 and still too many).
                debug_assert!(i >= k);
                not_carried += 1;
            }
        }
        // A finished instance the offset passes (first record below it, end at or above) is
        // safe only while its end travels in the skip set: a new owner would otherwise
        // replay its tail alone. Where the skip set cannot carry it (it overflows, or the
        // broker drops metadata), the offset stays at its first record; never below the
        // last commit, whose entries below it are gone.
        let floor = self.committed.unwrap_or(i64::MIN);
        let lost = !self.metadata_trusted;
        if lost {
            // Tombstones cannot travel either: the offset stays at their heads, where a
            // new owner at least sees the whole instance.
            if let Some(t) = tombstones
                .iter()
                .map(|t| t.first)
                .filter(|f| *f < offset)
                .min()
            {
                offset = t.max(floor).min(offset);
            }
        }
        let (metadata, dropped) = loop {
            let (metadata, dropped, left_out) =
                encode_metadata_cut(offset, &self.finished, &self.inherited, &tail);
            let candidates: Vec<i64> = if lost {
                self.finished.range(offset..).copied().collect()
            } else {
                left_out
            };
            let lower = candidates
                .iter()
                .filter_map(|e| self.firsts.get(e))
                .filter(|f| **f < offset)
                .min()
                .copied();
            match lower.map(|l| l.max(floor)) {
                Some(l) if l < offset => offset = l,
                _ => break (metadata, dropped),
            }
        };
        // Entries below the offset will never be read again by anyone.
        self.finished = self.finished.split_off(&offset);
        self.firsts = self.firsts.split_off(&offset);
        self.inherited = self.inherited.split_off(&offset);
        Some(CommitPoint {
            offset,
            metadata,
            dropped,
            carried,
            not_carried,
        })
    }

    fn finished_changed_since_commit(&self) -> bool {
        // Cheap approximation: any finished entry at or above the committed offset may be
        // new; committing again is harmless, losing the entry would cost a duplicate.
        !self.finished.is_empty()
    }

    /// Records that `point` was committed.
    pub fn committed_at(&mut self, offset: i64) {
        self.committed = Some(offset);
    }

    /// How many records a crash now would replay (consumed offset − committed offset).
    pub fn replay_cost(&self) -> i64 {
        match (self.next, self.committed) {
            (Some(n), Some(c)) => (n - c).max(0),
            _ => 0,
        }
    }
}

/// Encodes the finished offsets ≥ `base` as deltas: `txs2:<base>:d1,d2,...` where
/// d1 = o1 − base.
/// Keeps the lowest offsets that fit, since the next owner reaches those first; the
/// count of those that did not fit is returned (they are redelivered, never lost).
pub fn encode_metadata(base: i64, finished: &BTreeSet<i64>) -> (String, usize) {
    let (m, dropped, _) = encode_metadata_cut(base, finished, &BTreeSet::new(), "");
    (m, dropped)
}

/// [`encode_metadata`] with encoded tombstones (`tail`) after the skip set, which gets
/// the bytes they leave, and `pinned` offsets that are kept before any other; also the
/// finished offsets left out, lowest first.
fn encode_metadata_cut(
    base: i64,
    finished: &BTreeSet<i64>,
    pinned: &BTreeSet<i64>,
    tail: &str,
) -> (String, usize, Vec<i64>) {
    let limit = MAX_METADATA_BYTES.saturating_sub(tail.len());
    let header = METADATA_PREFIX.len() + digits(base) + 1;
    // The length of the deltas (with their commas) of a sorted chain from `base`.
    let mut kept: BTreeSet<i64> = BTreeSet::new();
    let mut body = 0usize;
    let add = |kept: &BTreeSet<i64>, o: i64| -> usize {
        let prev = kept.range(..o).next_back().copied().unwrap_or(base);
        let comma = usize::from(!kept.is_empty());
        match kept.range(o + 1..).next() {
            Some(&next) => digits(o - prev) + digits(next - o) + 1 - digits(next - prev),
            None => digits(o - prev) + comma,
        }
    };
    // Pinned first (they fitted before; the highest go only if they cannot all fit).
    for &o in pinned.range(base..).filter(|o| finished.contains(o)) {
        let cost = add(&kept, o);
        if header + body + cost > limit {
            break;
        }
        body += cost;
        kept.insert(o);
    }
    // Then the others, lowest first: the next owner reaches those first.
    let mut full = false;
    let mut left_out = Vec::new();
    for &o in finished.range(base..) {
        if kept.contains(&o) {
            continue;
        }
        if !full {
            let cost = add(&kept, o);
            if header + body + cost <= limit {
                body += cost;
                kept.insert(o);
                continue;
            }
            full = true;
        }
        left_out.push(o);
    }
    let mut out = String::with_capacity(header + body + tail.len());
    out.push_str(METADATA_PREFIX);
    out.push_str(&base.to_string());
    out.push(':');
    let mut prev = base;
    for (i, o) in kept.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&(o - prev).to_string());
        prev = *o;
    }
    out.push_str(tail);
    let dropped = finished.range(base..).count() - kept.len();
    (out, dropped, left_out)
}

/// Decimal digits of `n` (≥ 0).
fn digits(n: i64) -> usize {
    let mut n = n.max(0);
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Decodes metadata written by [`encode_metadata`]. Anything else (another tool's
/// metadata, garbage) yields an empty set: skipping less is safe, skipping wrongly is not.
pub fn decode_metadata(base: i64, metadata: &str) -> BTreeSet<i64> {
    let mut set = BTreeSet::new();
    let body = if let Some(rest) = metadata.strip_prefix(METADATA_PREFIX) {
        // Written for another offset: the offset was moved without this sidecar.
        match rest.split_once(':') {
            Some((b, body)) if b.parse::<i64>() == Ok(base) => {
                body.split(';').next().unwrap_or_default()
            }
            _ => return set,
        }
    } else if let Some(body) = metadata.strip_prefix(METADATA_PREFIX_V1) {
        body
    } else {
        return set;
    };
    if body.is_empty() {
        return set;
    }
    let mut prev = base;
    for part in body.split(',') {
        match part.parse::<i64>() {
            Ok(d) if d >= 0 => match prev.checked_add(d) {
                Some(o) => {
                    set.insert(o);
                    prev = o;
                }
                None => return BTreeSet::new(),
            },
            _ => return BTreeSet::new(),
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn safe_offset_stays_at_the_oldest_open_transaction() {
        let mut t = OffsetTracker::assigned(None, "");
        t.consumed(0);
        t.hold(0); // txn a opens at 0
        t.consumed(1);
        t.hold(1); // txn b opens at 1
        t.consumed(2); // b commits at 2
        t.release(1);
        t.finish(2, 1);
        assert_eq!(t.safe_offset(), Some(0));
        let cp = t.commit_point(&[]).unwrap();
        assert_eq!(cp.offset, 0);
        assert_eq!(cp.metadata, "txs2:0:2");
        t.consumed(3);
        t.release(0);
        t.finish(3, 0);
        assert_eq!(t.safe_offset(), Some(4));
        assert_eq!(t.commit_point(&[]).unwrap().metadata, "txs2:4:");
    }

    #[test]
    fn without_trusted_metadata_the_offset_never_passes_a_finished_instance() {
        // a: 0..=3 delivered; b opens at 2 and holds the offset.
        let mut t = OffsetTracker::assigned(None, "");
        for o in 0..4 {
            t.consumed(o);
        }
        t.hold(2);
        t.finish(3, 0);
        // Until the broker is known to keep metadata, a's end may not survive a
        // handoff: the offset stays at a's first record, not at b's.
        assert_eq!(t.final_commit_point(&[]).unwrap().offset, 0);
        t.metadata_kept();
        assert_eq!(t.final_commit_point(&[]).unwrap().offset, 2);
        t.committed_at(2);
        // A broker seen dropping it: conservative again, but never below the last commit.
        t.skip_set_lost();
        t.metadata_kept();
        assert_eq!(t.final_commit_point(&[]).unwrap().offset, 2);
        let tomb = [Carried {
            first: 2,
            written: 2,
            source: 2,
            reason: "expired",
            id: "b",
        }];
        t.release(2);
        assert_eq!(
            t.final_commit_point(&tomb).unwrap().offset,
            2,
            "held at the head"
        );
    }

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        let set: BTreeSet<i64> = [10, 12, 30].into_iter().collect();
        let (m, dropped) = encode_metadata(5, &set);
        assert_eq!((m.as_str(), dropped), ("txs2:5:5,2,18", 0));
        assert_eq!(decode_metadata(5, &m), set);
        // Read back only at the offset it was written for.
        assert!(decode_metadata(6, &m).is_empty());
        assert!(decode_metadata(4, &m).is_empty());
        // The previous format still reads, relative to the committed offset.
        assert_eq!(decode_metadata(5, "txs1:5,2,18"), set);
        assert!(decode_metadata(5, "something-else").is_empty());
        assert!(decode_metadata(5, "txs1:1,x").is_empty());
        assert!(decode_metadata(5, "txs1:-1").is_empty());
    }

    #[test]
    fn tombstones_travel_in_the_metadata_or_hold_the_offset() {
        let mut t = OffsetTracker::assigned(None, "");
        // Read back once: the broker keeps metadata.
        t.metadata_kept();
        for o in 0..10 {
            t.consumed(o);
        }
        t.finish(9, 9);
        let id = "order,42;%x";
        let tomb = [Carried {
            first: 3,
            written: 4,
            source: 3,
            reason: "expired",
            id,
        }];
        let cp = t.final_commit_point(&tomb).unwrap();
        assert_eq!(cp.offset, 10);
        assert_eq!(cp.carried, 1);
        let back = decode_tombstones(10, &cp.metadata);
        assert_eq!(
            back,
            vec![CarriedOwned {
                first: 3,
                written: 4,
                source: 3,
                reason: "expired".into(),
                id: Some(id.into()),
            }]
        );
        assert!(decode_metadata(10, &cp.metadata).is_empty());
        assert!(decode_tombstones(11, &cp.metadata).is_empty());
        // Tombstones that do not fit keep the offset at the first of them.
        let long = "x".repeat(1500);
        let many: Vec<Carried<'_>> = (0..5)
            .map(|i| Carried {
                first: i,
                written: i,
                source: i,
                reason: "operator",
                id: &long,
            })
            .collect();
        let cp = t.final_commit_point(&many).unwrap();
        assert_eq!(cp.offset, 2);
        assert!(cp.metadata.len() <= MAX_METADATA_BYTES);
        // Two whole, the other three as heads above the offset (no id).
        assert_eq!((cp.carried, cp.not_carried), (5, 0));
        let back = decode_tombstones(2, &cp.metadata);
        assert_eq!(back.len(), 5);
        assert!(back[..2]
            .iter()
            .all(|t| t.id.as_deref() == Some(long.as_str())));
        assert!(back[2..].iter().all(|t| t.id.is_none() && t.first >= 2));
    }

    #[test]
    fn metadata_that_does_not_fit_drops_the_highest_offsets() {
        let set: BTreeSet<i64> = (0..5000).map(|i| i * 1000).collect();
        let (m, dropped) = encode_metadata(0, &set);
        assert!(m.len() <= MAX_METADATA_BYTES);
        assert!(dropped > 0);
        let back = decode_metadata(0, &m);
        assert_eq!(back.len() + dropped, set.len());
        assert!(back.iter().all(|o| set.contains(o)));
        assert_eq!(back.iter().next_back(), set.iter().nth(back.len() - 1));
    }

    /// `txs2:0:` and every delta of `set`, whatever the size limit.
    fn unbounded_encoding(set: &BTreeSet<i64>) -> String {
        let mut out = format!("{METADATA_PREFIX}0:");
        let mut prev = 0;
        for (i, o) in set.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&(o - prev).to_string());
            prev = *o;
        }
        out
    }

    #[test]
    fn pinned_offsets_travel_before_lower_ones_and_the_metadata_still_fits() {
        let set: BTreeSet<i64> = (0..5000).map(|i| i * 1000).collect();
        // The two highest must travel, although the lowest alone fill the metadata.
        let pinned: BTreeSet<i64> = set.iter().rev().take(2).copied().collect();
        let (m, dropped, left_out) = encode_metadata_cut(0, &set, &pinned, ";tail");
        assert!(m.len() <= MAX_METADATA_BYTES, "{}", m.len());
        assert!(m.ends_with(";tail"));
        let back = decode_metadata(0, &m);
        assert!(pinned.iter().all(|o| back.contains(o)), "pinned left out");
        assert_eq!(back.len() + dropped, set.len());
        assert_eq!(left_out.len(), dropped);
        assert!(left_out
            .iter()
            .all(|o| !back.contains(o) && !pinned.contains(o)));
        // The others kept are the lowest ones.
        let others: Vec<i64> = back
            .iter()
            .filter(|o| !pinned.contains(o))
            .copied()
            .collect();
        assert_eq!(
            others,
            set.iter().take(others.len()).copied().collect::<Vec<_>>()
        );
        // Exactly as long as its length accounting says: one more entry would not fit.
        let next = left_out[0];
        let mut more = back.clone();
        more.insert(next);
        let longer = format!("{}{}", unbounded_encoding(&more), ";tail");
        assert!(
            longer.len() > MAX_METADATA_BYTES,
            "{} would have fitted",
            next
        );
    }

    #[test]
    fn an_inherited_skip_entry_is_carried_whatever_the_tombstones_need() {
        // Committed at 1 by an earlier owner with 303.. finished: the instances ending there
        // may have begun below 1, so they travel as long as the offset is at or below them.
        // Twenty of them: more than the bytes the header reserve leaves.
        let inherited: BTreeSet<i64> = (303..323).collect();
        let (meta, _) = encode_metadata(1, &inherited);
        let mut t = OffsetTracker::assigned(Some(1), &meta);
        t.metadata_kept();
        // An instance open at 1 holds the offset there; 300 ids dead-lettered while open
        // above it travel as heads, more than the metadata holds.
        t.hold(1);
        let tombstones: Vec<Carried<'_>> = (2..302)
            .map(|i| Carried {
                first: i,
                written: i,
                source: i,
                reason: "expired",
                id: "id",
            })
            .collect();
        t.consumed(400);
        let cp = t.final_commit_point(&tombstones).unwrap();
        assert_eq!(cp.offset, 1);
        assert!(cp.metadata.len() <= MAX_METADATA_BYTES);
        assert!(cp.not_carried > 0, "the heads should not all fit");
        let back = decode_metadata(1, &cp.metadata);
        assert!(
            inherited.iter().all(|o| back.contains(o)),
            "inherited entries left out: {}",
            &cp.metadata[..80]
        );
    }

    /// A model of one partition: transactions open at some offset and commit later;
    /// deliveries complete in any order; commits happen at any point; then a new owner
    /// replays from the committed offset with the committed skip set.
    #[derive(Debug, Clone)]
    enum Step {
        Open,
        Commit(usize),
        Deliver(usize),
        CommitOffsets,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => Just(Step::Open),
                3 => (0usize..8).prop_map(Step::Commit),
                3 => (0usize..8).prop_map(Step::Deliver),
                1 => Just(Step::CommitOffsets),
            ],
            1..60,
        )
    }

    proptest! {
        /// The skip set never hides a transaction that was not delivered, and the safe
        /// offset never passes the first record of an undelivered transaction.
        #[test]
        fn skip_set_never_hides_an_undelivered_transaction(steps in steps()) {
            let mut t = OffsetTracker::assigned(None, "");
            let mut next = 0i64;
            // (first offset, commit offset, delivered)
            let mut txns: Vec<(i64, Option<i64>, bool)> = Vec::new();
            let mut last_commit: Option<CommitPoint> = None;
            for s in steps {
                match s {
                    Step::Open => {
                        t.consumed(next);
                        t.hold(next);
                        txns.push((next, None, false));
                        next += 1;
                    }
                    Step::Commit(i) => {
                        let open: Vec<usize> = (0..txns.len()).filter(|&j| txns[j].1.is_none()).collect();
                        if let Some(&j) = open.get(i % open.len().max(1)) {
                            t.consumed(next);
                            txns[j].1 = Some(next);
                            next += 1;
                        }
                    }
                    Step::Deliver(i) => {
                        let ready: Vec<usize> = (0..txns.len()).filter(|&j| txns[j].1.is_some() && !txns[j].2).collect();
                        if let Some(&j) = ready.get(i % ready.len().max(1)) {
                            txns[j].2 = true;
                            t.release(txns[j].0);
                            t.finish(txns[j].1.unwrap(), txns[j].0);
                        }
                    }
                    Step::CommitOffsets => {
                        if let Some(cp) = t.commit_point(&[]) {
                            t.committed_at(cp.offset);
                            last_commit = Some(cp);
                        }
                    }
                }
            }
            let Some(cp) = last_commit else { return Ok(()); };
            let skip = decode_metadata(cp.offset, &cp.metadata);
            for (first, commit, delivered) in &txns {
                if !delivered {
                    // Never lost: an undelivered transaction is replayed whole...
                    prop_assert!(*first >= cp.offset, "offset {} passed undelivered txn at {}", cp.offset, first);
                    // ...and its marker is not skipped.
                    if let Some(c) = commit { prop_assert!(!skip.contains(c)); }
                }
            }
            // Every skipped offset is the marker of a delivered transaction.
            for o in &skip {
                prop_assert!(txns.iter().any(|(_, c, d)| *d && *c == Some(*o)));
            }
        }
    }
}
