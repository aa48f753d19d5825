//! Model-based test of the per-partition transaction state machine ([`txn_sidecar::machine`]).
//!
//! A reference model produces a log of records (interleaved and reused ids, aborts, right
//! and wrong `txn-count`s, records whose marker fields do not decode, binary keys and
//! headers, oversized transactions, skewed timestamps), and the harness drives the
//! machine through it with everything a driver does: consume with lag, pause, clock
//! ticks, deliveries that succeed or fail, dead-letter acknowledgements, operator
//! requests, offset commits, retention, and a revoke (graceful or a crash) followed by a
//! re-assign from the committed offset and metadata, at any step. After every step the
//! guarantees are checked against instances computed from the log itself:
//!
//! - an instance is delivered whole (exactly its tasks, in offset order) or dead-lettered
//!   whole, never split, never both;
//! - an aborted instance is never delivered;
//! - first deliveries come in commit-marker order;
//! - the committed offset never passes a record whose instance is unfinished;
//! - no redelivery after a graceful handoff (only a crash may repeat work);
//! - at the end, after draining, every committed instance was delivered or dead-lettered
//!   (the skip set hid nothing).
//!
//! The documented exceptions are tracked, not ignored: an instance split by a forgotten
//! tombstone, or whose head was deleted by retention and whose first visible record came
//! after the gap window closed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use std::time::Instant;
use txn_sidecar::config::{HeaderNames, Protocol};
use txn_sidecar::delivery::ReadyTxn;
use txn_sidecar::dlq::DeadTxn;
use txn_sidecar::machine::{
    failed_delivery, Action, Assignment, PartitionMachine, Release, Report, Settings,
};
use txn_sidecar::offsets::{decode_metadata, decode_tombstones};
use txn_sidecar::protocol::{self, Record};

const TIMEOUT: u64 = 1_000;
/// Short ids, and long ones whose tombstones overflow the commit metadata when several
/// are carried at once.
static IDS: std::sync::LazyLock<[&'static str; 6]> = std::sync::LazyLock::new(|| {
    let long = |c: &str| -> &'static str { Box::leak(c.repeat(1300).into_boxed_str()) };
    ["a", "b", "c", "d", long("e"), long("f")]
});

fn settings() -> Settings {
    Settings {
        max_tasks_per_txn: 4,
        max_txn_bytes: 300,
        txn_timeout_ms: TIMEOUT,
    }
}

fn names() -> HeaderNames {
    HeaderNames {
        id: "txn-id".into(),
        kind: "txn-type".into(),
        count: "txn-count".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CountKind {
    None,
    Right,
    Wrong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecKind {
    Task,
    Commit(CountKind),
    Abort,
    /// `txn-type` that is not task/commit/abort: the id is known, the marker is not.
    BadType,
    /// A commit whose `txn-count` does not parse: still its instance's marker.
    BadCount,
    /// No id at all.
    NoId,
}

/// A record of the model's log; its offset is its index.
#[derive(Debug, Clone)]
struct Rec {
    id: Option<&'static str>,
    kind: RecKind,
    /// Declared count on a commit.
    count: Option<u64>,
    big: bool,
    binary: bool,
    ts: i64,
}

impl Rec {
    fn is_marker(&self) -> bool {
        matches!(
            self.kind,
            RecKind::Commit(_) | RecKind::Abort | RecKind::BadCount
        )
    }

    fn to_record(&self, offset: i64) -> Record {
        let mut headers: Vec<(&[u8], Option<Vec<u8>>)> = Vec::new();
        let kind = match self.kind {
            RecKind::Task => "task",
            RecKind::Commit(_) => "commit",
            RecKind::Abort => "abort",
            RecKind::BadType => "comit",
            RecKind::BadCount => "commit",
            RecKind::NoId => "task",
        };
        if let Some(id) = self.id {
            headers.push((b"txn-id", Some(id.as_bytes().to_vec())));
        }
        headers.push((b"txn-type", Some(kind.as_bytes().to_vec())));
        if let Some(c) = self.count {
            headers.push((b"txn-count", Some(c.to_string().into_bytes())));
        }
        if self.kind == RecKind::BadCount {
            headers.push((b"txn-count", Some(b"many".to_vec())));
        }
        if self.binary {
            headers.push((b"x-amqp", Some(vec![0xA1, 0x03, 0x61, 0x62, 0x63])));
            headers.push((&[0xff, 0xfe], Some(vec![0xC0])));
        }
        let value = if self.big {
            vec![b'x'; 200]
        } else {
            format!("{{\"o\":{offset}}}").into_bytes()
        };
        let key: Option<&[u8]> = if self.binary {
            Some(&[0x80, 0x81])
        } else {
            None
        };
        let hs: Vec<(&[u8], Option<&[u8]>)> =
            headers.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        Record::new(offset, Some(self.ts), key, Some(&value), &hs)
    }
}

#[derive(Debug, Clone)]
struct Model {
    log: Vec<Rec>,
    /// Tasks of each id's current instance, for right and wrong counts.
    open_tasks: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone)]
enum Op {
    Produce {
        id: usize,
        kind: RecKind,
        big: bool,
        binary: bool,
        skew: i64,
    },
    Consume(usize),
    DeliverOk,
    DeliverFail,
    DlqAck,
    Tick(u64),
    Pause(bool),
    CommitOffsets,
    Rebalance {
        crash: bool,
    },
    Retention(usize),
    Operator(usize),
    /// The broker keeps the committed offset but drops its metadata (a broker's property:
    /// only before the driver has read a commit back).
    DropMetadata,
    /// The driver reads a commit back and learns whether the broker keeps metadata.
    ReadBack,
    /// librdkafka hands out again up to this many records the machine already consumed
    /// (a pause saved the fetch position before a record the consumer had taken).
    ReadAgain(usize),
}

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            log: Vec::new(),
            open_tasks: BTreeMap::new(),
        })
        .boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let kind = prop_oneof![
            8 => Just(RecKind::Task),
            2 => Just(RecKind::Commit(CountKind::None)),
            2 => Just(RecKind::Commit(CountKind::Right)),
            1 => Just(RecKind::Commit(CountKind::Wrong)),
            2 => Just(RecKind::Abort),
            1 => Just(RecKind::BadType),
            1 => Just(RecKind::BadCount),
            1 => Just(RecKind::NoId),
        ];
        let produce = (
            0..IDS.len(),
            kind,
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.2),
            prop_oneof![Just(0i64), Just(-86_400_000i64 * 400), Just(86_400_000i64)],
        )
            .prop_map(|(id, kind, big, binary, skew)| Op::Produce {
                id,
                kind,
                big,
                binary,
                skew,
            });
        prop_oneof![
            20 => produce,
            8 => (1usize..6).prop_map(Op::Consume),
            5 => Just(Op::DeliverOk),
            1 => Just(Op::DeliverFail),
            4 => Just(Op::DlqAck),
            4 => prop_oneof![Just(10u64), Just(400), Just(TIMEOUT + 1), Just(3 * TIMEOUT)].prop_map(Op::Tick),
            1 => any::<bool>().prop_map(Op::Pause),
            3 => Just(Op::CommitOffsets),
            1 => any::<bool>().prop_map(|crash| Op::Rebalance { crash }),
            1 => (1usize..6).prop_map(Op::Retention),
            1 => (0usize..4).prop_map(Op::Operator),
            1 => Just(Op::DropMetadata),
            2 => Just(Op::ReadBack),
            1 => (1usize..4).prop_map(Op::ReadAgain),
        ]
        .boxed()
    }

    fn apply(mut s: Model, op: &Op) -> Model {
        if let Op::Produce {
            id,
            kind,
            big,
            binary,
            skew,
        } = *op
        {
            let idn = IDS[id];
            let ts = 1_700_000_000_000 + s.log.len() as i64 * 10 + skew;
            let (rid, count) = match kind {
                RecKind::NoId => (None, None),
                RecKind::Commit(c) => {
                    let n = s.open_tasks.get(idn).copied().unwrap_or(0);
                    let count = match c {
                        CountKind::None => None,
                        CountKind::Right => Some(n),
                        CountKind::Wrong => Some(n + 1),
                    };
                    (Some(idn), count)
                }
                _ => (Some(idn), None),
            };
            match kind {
                RecKind::Task => *s.open_tasks.entry(idn).or_insert(0) += 1,
                RecKind::Commit(_) | RecKind::Abort | RecKind::BadCount => {
                    s.open_tasks.remove(idn);
                }
                _ => {}
            }
            s.log.push(Rec {
                id: rid,
                kind,
                count,
                big,
                binary,
                ts,
            });
        }
        s
    }
}

/// One instance of the log: offsets of its records, its tasks, and its marker.
#[derive(Debug, Clone)]
struct Instance {
    id: Option<&'static str>,
    records: Vec<i64>,
    tasks: Vec<i64>,
    end: Option<(i64, RecKind)>,
}

fn instances(log: &[Rec]) -> Vec<Instance> {
    let mut out: Vec<Instance> = Vec::new();
    let mut current: HashMap<&'static str, usize> = HashMap::new();
    for (o, r) in log.iter().enumerate() {
        let o = o as i64;
        let Some(id) = r.id else {
            out.push(Instance {
                id: None,
                records: vec![o],
                tasks: vec![],
                end: Some((o, r.kind)),
            });
            continue;
        };
        let i = *current.entry(id).or_insert_with(|| {
            out.push(Instance {
                id: Some(id),
                records: vec![],
                tasks: vec![],
                end: None,
            });
            out.len() - 1
        });
        out[i].records.push(o);
        if r.kind == RecKind::Task {
            out[i].tasks.push(o);
        }
        if r.is_marker() {
            out[i].end = Some((o, r.kind));
            current.remove(id);
        }
    }
    out
}

struct Harness {
    m: Option<PartitionMachine>,
    pos: usize,
    /// Where the current machine started consuming.
    assigned_pos: usize,
    log_start: usize,
    now: u64,
    paused: bool,
    committed: Option<(i64, String)>,
    deliveries: VecDeque<(ReadyTxn, Release)>,
    dlq: VecDeque<(DeadTxn, Release)>,
    /// (commit offset, task offsets) per delivery, in order.
    app: Vec<(i64, Vec<i64>)>,
    /// Offsets written to the dead-letter topic, with the source they name.
    dead: Vec<(i64, i64)>,
    /// Per id, the log positions at which a tombstone of it was forgotten.
    forgotten: Vec<(&'static str, i64)>,
    /// Consumption position when each crash happened.
    crashes: Vec<usize>,
    /// Open gap window: (assign time, the log position of the gap).
    gap: Option<(u64, i64)>,
    /// Ids whose instance's first visible record was consumed after a gap window closed,
    /// with the gap position.
    late_after_gap: Vec<i64>,
    gap_positions: Vec<i64>,
    fresh_starts: Vec<i64>,
    uncommitted_dead: Vec<i64>,
    uncommitted_delivered: Vec<i64>,
    /// The broker drops commit metadata (once set, for good).
    drops_metadata: bool,
    /// The driver has read a commit back (and told the machines what it found).
    read_back: bool,
    actions: Vec<Action>,
}

impl Harness {
    fn caught_up(&self, log_len: usize) -> bool {
        self.pos == log_len && !self.paused
    }

    fn run(&mut self, log: &[Rec]) {
        let actions = std::mem::take(&mut self.actions);
        for a in actions {
            match a {
                Action::Deliver(c, r) => self
                    .deliveries
                    .push_back((c.into_ready(Arc::from("t"), 0, Instant::now()), r)),
                Action::DeadLetter(d, r, _) => self.dlq.push_back((d, r)),
                Action::Report(Report::TombstoneForgotten { id, .. }) => {
                    let id = IDS.iter().find(|x| **x == id).copied().unwrap();
                    self.forgotten.push((id, self.pos as i64));
                }
                Action::Report(_) => {}
            }
        }
        let _ = log;
    }

    fn assign(&mut self, log: &[Rec]) {
        let a = Assignment {
            committed: self.committed.as_ref().map(|c| c.0),
            metadata: self
                .committed
                .as_ref()
                .map_or(String::new(), |c| c.1.clone()),
            log_start: Some(self.log_start as i64),
            log_end: Some(log.len() as i64),
        };
        // As the driver does: metadata this sidecar wrote, found on assign, shows the
        // broker keeps it (so from here on the broker cannot start dropping it).
        if a.metadata.starts_with("txs") && !self.drops_metadata {
            self.read_back = true;
        }
        let start = a
            .committed
            .map_or(self.log_start as i64, |c| c.max(self.log_start as i64));
        if a.committed.is_some_and(|c| c < self.log_start as i64) {
            self.gap = Some((self.now, start));
            self.gap_positions.push(start);
        }
        if a.committed.is_none() && self.log_start > 0 {
            // A group's first start at a log whose head retention removed: documented as
            // undetectable (only `txn-count` protects such an instance).
            self.fresh_starts.push(start);
        }
        self.pos = start as usize;
        self.assigned_pos = self.pos;
        let m = PartitionMachine::assigned(
            Arc::from("t"),
            0,
            settings(),
            &a,
            self.now,
            &mut self.actions,
        );
        self.m = Some(m);
        if self.read_back {
            let m = self.m.as_mut().unwrap();
            if self.drops_metadata {
                m.metadata_unreliable();
            } else {
                m.metadata_kept();
            }
        }
        self.run(log);
    }

    fn commit(&mut self, final_: bool) {
        let Some(m) = self.m.as_mut() else { return };
        let cp = if final_ {
            m.final_commit_point()
        } else {
            m.commit_point()
        };
        if let Some(cp) = cp {
            m.committed(cp.offset);
            let metadata = if self.drops_metadata {
                String::new()
            } else {
                cp.metadata
            };
            self.committed = Some((cp.offset, metadata));
        }
    }
}

struct Test;

impl StateMachineTest for Test {
    type SystemUnderTest = Harness;
    type Reference = Reference;

    fn init_test(model: &Model) -> Harness {
        let mut h = Harness {
            m: None,
            pos: 0,
            assigned_pos: 0,
            log_start: 0,
            now: 0,
            paused: false,
            committed: None,
            deliveries: VecDeque::new(),
            dlq: VecDeque::new(),
            app: Vec::new(),
            dead: Vec::new(),
            forgotten: Vec::new(),
            crashes: Vec::new(),
            gap: None,
            late_after_gap: Vec::new(),
            gap_positions: Vec::new(),
            fresh_starts: Vec::new(),
            uncommitted_dead: Vec::new(),
            uncommitted_delivered: Vec::new(),
            drops_metadata: false,
            read_back: false,
            actions: Vec::new(),
        };
        h.assign(&model.log);
        h
    }

    fn apply(mut h: Harness, model: &Model, op: Op) -> Harness {
        let log = &model.log;
        match op {
            Op::Produce { .. } => {}
            Op::Consume(n) => {
                if !h.paused {
                    for _ in 0..n {
                        if h.pos >= log.len() {
                            break;
                        }
                        let o = h.pos as i64;
                        let rec = log[h.pos].to_record(o);
                        let decoded = protocol::decode(&rec, Protocol::Headers, &names());
                        if h.gap.is_none() && !h.gap_positions.is_empty() {
                            h.late_after_gap.push(o);
                        }
                        let m = h.m.as_mut().unwrap();
                        m.on_record(rec.view(), decoded, h.now, &mut h.actions);
                        h.pos += 1;
                        h.run(log);
                    }
                }
            }
            Op::ReadAgain(k) => {
                // Only records this machine consumed and retention has not removed.
                let from = h.pos.saturating_sub(k).max(h.assigned_pos).max(h.log_start);
                if !h.paused {
                    for p in from..h.pos {
                        let rec = log[p].to_record(p as i64);
                        let decoded = protocol::decode(&rec, Protocol::Headers, &names());
                        let m = h.m.as_mut().unwrap();
                        m.on_record(rec.view(), decoded, h.now, &mut h.actions);
                        h.run(log);
                    }
                }
            }
            Op::DeliverOk => {
                if let Some((t, r)) = h.deliveries.pop_front() {
                    h.app
                        .push((t.commit_offset, t.tasks.iter().map(|x| x.offset).collect()));
                    h.m.as_mut().unwrap().done(r);
                }
            }
            Op::DeliverFail => {
                if let Some((t, r)) = h.deliveries.pop_front() {
                    let d = failed_delivery(t, "rejected", "app answered 400".into(), 1);
                    h.dlq.push_back((d, r));
                }
            }
            Op::DlqAck => {
                if let Some((d, r)) = h.dlq.pop_front() {
                    let source = d.source_offset();
                    for rec in d.records.iter() {
                        h.dead.push((rec.offset, source));
                    }
                    h.m.as_mut().unwrap().done(r);
                }
            }
            Op::Tick(ms) => {
                h.now += ms;
                let caught_up = h.caught_up(log.len());
                if let Some((at, _)) = h.gap {
                    if caught_up && h.now > at + TIMEOUT {
                        h.gap = None;
                    }
                }
                let now = h.now;
                h.m.as_mut().unwrap().tick(now, caught_up, &mut h.actions);
                h.run(log);
            }
            Op::Pause(p) => h.paused = p,
            Op::CommitOffsets => h.commit(false),
            Op::Rebalance { crash } => {
                if crash {
                    h.crashes.push(h.pos);
                    // Dead letters whose completion no commit recorded yet: a new owner
                    // decides their instances afresh (documented: a crash within a commit
                    // interval of an expiry or operator dead letter).
                    let (base, skip) = match &h.committed {
                        Some((o, m)) => (*o, decode_metadata(*o, m)),
                        None => (0, Default::default()),
                    };
                    for (o, _) in &h.dead {
                        if *o >= base && !skip.contains(o) {
                            h.uncommitted_dead.push(*o);
                        }
                    }
                    for (c, _) in &h.app {
                        if *c >= base && !skip.contains(c) {
                            h.uncommitted_delivered.push(*c);
                        }
                    }
                } else {
                    h.commit(true);
                }
                // Work in flight is cut off: the next owner redoes it, and may decide a
                // dead letter that was never written differently.
                let unwritten: Vec<i64> = h
                    .dlq
                    .iter()
                    .flat_map(|(d, _)| d.records.iter().map(|r| r.offset).collect::<Vec<_>>())
                    .collect();
                h.uncommitted_dead.extend(unwritten);
                h.deliveries.clear();
                h.dlq.clear();
                h.m = None;
                h.gap = None;
                h.assign(log);
            }
            Op::Retention(k) => {
                // Retention deletes only what this member has consumed.
                h.log_start = (h.log_start + k).min(h.pos);
            }
            Op::DropMetadata => {
                if !h.read_back {
                    h.drops_metadata = true;
                }
            }
            Op::ReadBack => {
                if h.committed.is_some() {
                    h.read_back = true;
                    let m = h.m.as_mut().unwrap();
                    if h.drops_metadata {
                        m.metadata_unreliable();
                    } else {
                        m.metadata_kept();
                    }
                }
            }
            Op::Operator(i) => {
                let m = h.m.as_mut().unwrap();
                let mut ids: Vec<String> = m.open().iter().map(|(id, _)| id.to_string()).collect();
                ids.sort();
                if let Some(id) = ids.get(i % ids.len().max(1)) {
                    let _ = m.operator_dead_letter(id, &mut h.actions);
                    h.run(log);
                }
            }
        }
        h
    }

    fn check_invariants(h: &Harness, model: &Model) {
        check(h, model, false);
    }

    fn teardown(mut h: Harness, model: Model) {
        // Drain: consume everything, complete all work, let every clock run out; then a
        // graceful handoff and the same again. Nothing may be left unfinished.
        for round in 0..2 {
            h.paused = false;
            for _ in 0..(model.log.len() * 4 + 20) {
                h = Test::apply(h, &model, Op::Consume(5));
                while !h.deliveries.is_empty() {
                    h = Test::apply(h, &model, Op::DeliverOk);
                }
                while !h.dlq.is_empty() {
                    h = Test::apply(h, &model, Op::DlqAck);
                }
                h = Test::apply(h, &model, Op::Tick(3 * TIMEOUT));
                if h.pos == model.log.len() && h.deliveries.is_empty() && h.dlq.is_empty() {
                    break;
                }
            }
            for _ in 0..3 {
                h = Test::apply(h, &model, Op::Tick(3 * TIMEOUT));
                while !h.dlq.is_empty() {
                    h = Test::apply(h, &model, Op::DlqAck);
                }
            }
            check(&h, &model, false);
            if round == 0 {
                h = Test::apply(h, &model, Op::Rebalance { crash: false });
            }
        }
        check(&h, &model, true);
    }
}

fn check(h: &Harness, model: &Model, end: bool) {
    let log = &model.log;
    let insts = instances(log);
    let by_end: HashMap<i64, &Instance> = insts
        .iter()
        .filter_map(|i| i.end.map(|(o, _)| (o, i)))
        .collect();
    let dead: BTreeSet<i64> = h.dead.iter().map(|(o, _)| *o).collect();
    let delivered: BTreeSet<i64> = h.app.iter().map(|(c, _)| *c).collect();

    // Documented exceptions, each tracked by the harness. `exempt` covers what may be
    // split: an instance split by a forgotten tombstone, or whose head was deleted by
    // retention without the new owner being able to tell (its first visible record came
    // after the gap window, or the group had never committed).
    let exempt = |i: &Instance| -> bool {
        let Some(id) = i.id else { return false };
        let first = i.records.first().copied().unwrap_or(0);
        let last = i.end.map_or(i64::MAX, |(o, _)| o);
        let forgotten = h
            .forgotten
            .iter()
            .any(|(fid, at)| *fid == id && first < *at && last >= *at - 1);
        let head_lost = h.gap_positions.iter().any(|g| first < *g && last >= *g);
        let late = head_lost && i.records.iter().any(|o| h.late_after_gap.contains(o));
        let fresh = h.fresh_starts.iter().any(|g| first < *g && last >= *g);
        forgotten || late || fresh
    };
    // `redecided` covers what a new owner may decide differently (never partially): an
    // instance whose dead letter no commit recorded before a crash, or whose head
    // retention deleted.
    let redecided = |i: &Instance| -> bool {
        let first = i.records.first().copied().unwrap_or(0);
        let last = i.end.map_or(i64::MAX, |(o, _)| o);
        // A delivery no commit recorded before a crash is redone, and the redelivery may
        // fail (the app answers differently the second time) or, after an offset gap,
        // not be provable whole: either way it is dead-lettered the second time.
        let after_gap = i
            .end
            .is_some_and(|(o, _)| h.uncommitted_delivered.contains(&o));
        // Without commit metadata no tombstone travels: a new owner decides an instance
        // dead-lettered while open afresh (documented); it never delivers part of one.
        let no_metadata = h.drops_metadata && i.records.iter().any(|o| dead.contains(o));
        exempt(i)
            || no_metadata
            || after_gap
            || i.records.iter().any(|o| h.uncommitted_dead.contains(o))
            || h.gap_positions.iter().any(|g| first < *g && last >= *g)
    };

    for (commit, tasks) in &h.app {
        let Some(i) = by_end.get(commit) else {
            panic!("delivered commit offset {commit} is not the end of any instance");
        };
        assert!(
            matches!(i.end, Some((_, RecKind::Commit(_)))),
            "delivered an instance that ended with {:?} at {commit}",
            i.end
        );
        if !exempt(i) {
            assert_eq!(
                tasks, &i.tasks,
                "instance {:?} ending at {commit} delivered partial: got {tasks:?}, log has {:?}",
                i.id, i.tasks
            );
        }
        if !redecided(i) {
            let both: Vec<i64> = i
                .records
                .iter()
                .copied()
                .filter(|o| dead.contains(o))
                .collect();
            assert!(
                both.is_empty(),
                "instance {:?} ending at {commit} was delivered and dead-lettered ({both:?})",
                i.id
            );
        }
    }

    // One source per dead-lettered instance.
    let mut sources: HashMap<Vec<i64>, BTreeSet<i64>> = HashMap::new();
    for (o, src) in &h.dead {
        if let Some(i) = insts.iter().find(|i| i.records.contains(o)) {
            // An instance whose head retention deleted is decided afresh by a new owner.
            let deleted = (i.records[0] as usize) < h.log_start;
            if !redecided(i) && i.id.is_some() && !deleted {
                sources.entry(i.records.clone()).or_default().insert(*src);
            }
        }
    }
    for (recs, srcs) in &sources {
        assert!(
            srcs.len() == 1,
            "instance {recs:?} dead-lettered under several sources {srcs:?}"
        );
    }

    // First deliveries in marker order.
    let mut seen = BTreeSet::new();
    let mut last = -1;
    for (c, _) in &h.app {
        if by_end.get(c).is_some_and(|i| redecided(i)) {
            continue;
        }
        if seen.insert(*c) {
            assert!(*c > last, "first delivery of {c} after {last}");
            last = *c;
        }
    }

    // No redelivery unless a crash came after the first delivery.
    let mut count: HashMap<i64, usize> = HashMap::new();
    for (c, _) in &h.app {
        *count.entry(*c).or_insert(0) += 1;
    }
    if h.crashes.is_empty() && !h.drops_metadata {
        for (c, n) in &count {
            assert_eq!(*n, 1, "commit {c} delivered {n} times without a crash");
        }
    }

    // The committed offset never passes an unfinished instance.
    if let Some((committed, metadata)) = &h.committed {
        for i in &insts {
            let Some(&first) = i.records.first() else {
                continue;
            };
            // Retention deleted part of it: nobody can finish it any more. What must
            // not happen to it (a partial delivery) is checked above.
            let deleted = (first as usize) < h.log_start;
            if first >= *committed || exempt(i) || deleted {
                continue;
            }
            // Finished: delivered, every record dead-lettered, or aborted (nothing to
            // deliver; a replay of its tail sees the abort).
            let all_dead = i.records.iter().all(|r| dead.contains(r));
            // Or dead-lettered while open and carried in the metadata as a tombstone, so a
            // new owner dead-letters the rest of it.
            let carried = i.id.is_some_and(|id| {
                decode_tombstones(*committed, metadata)
                    .iter()
                    .any(|t| t.id.as_deref() == Some(id) && t.first == first)
            });
            let handled = carried
                || match i.end {
                    Some((o, RecKind::Commit(_))) => delivered.contains(&o) || all_dead,
                    Some((o, RecKind::Abort)) => !delivered.contains(&o),
                    _ => all_dead,
                };
            assert!(
                handled,
                "committed offset {committed} passed the first record {first} of unfinished instance {:?} {:?} (end {:?})",
                i.id, i.records, i.end
            );
        }
    }

    if end {
        // Every piece of work handed out came back: the memory budget's count is exact.
        if let Some(m) = &h.m {
            assert!(h.deliveries.is_empty() && h.dlq.is_empty());
            assert_eq!((m.queued(), m.queued_bytes()), (0, 0), "work still counted");
        }
        for i in &insts {
            if exempt(i) {
                continue;
            }
            match i.end {
                Some((o, RecKind::Commit(_))) => assert!(
                    delivered.contains(&o)
                        || i.records.iter().all(|r| dead.contains(r))
                        || i.records.iter().any(|r| (*r as usize) < h.log_start),
                    "committed instance {:?} {:?} was lost",
                    i.id,
                    i.records
                ),
                Some((o, _)) if i.id.is_none() => assert!(
                    dead.contains(&o) || (o as usize) < h.log_start,
                    "record {o} without an id was neither dead-lettered nor skipped"
                ),
                _ => {}
            }
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 4096,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]
    /// Every guarantee, after every step of random records and events.
    #[test]
    fn the_machine_keeps_every_guarantee(sequential 1..120 => Test);
}

/// A plain record of `id` (no count, small, text), for hand-written logs.
fn rec(id: &'static str, kind: RecKind) -> Rec {
    Rec {
        id: Some(id),
        kind,
        count: None,
        big: false,
        binary: false,
        ts: 1_700_000_000_000,
    }
}

/// Feeds `log[from..]` to `m` at time 0.
fn feed(m: &mut PartitionMachine, log: &[Rec], from: usize, actions: &mut Vec<Action>) {
    for (o, r) in log.iter().enumerate().skip(from) {
        let record = r.to_record(o as i64);
        let decoded = protocol::decode(&record, Protocol::Headers, &names());
        m.on_record(record.view(), decoded, 0, actions);
    }
}

/// A machine assigned at `committed` with `metadata`, over a log of `log_end` records.
fn assigned_at(
    committed: Option<i64>,
    metadata: String,
    log_end: usize,
    actions: &mut Vec<Action>,
) -> PartitionMachine {
    let a = Assignment {
        committed,
        metadata,
        log_start: Some(0),
        log_end: Some(log_end as i64),
    };
    PartitionMachine::assigned(Arc::from("t"), 0, settings(), &a, 0, actions)
}

/// A skip set loaded on assign names where finished instances end, not where they began.
/// A new owner that replays such an instance whole must still hold a commit point that
/// cannot rely on metadata at the instance's first record: committing past it, then
/// losing the metadata, would let the next owner deliver the instance's tail alone.
/// (Found by the property test before the harness learned that metadata found at assign
/// counts as read back.)
#[test]
fn a_replayed_instance_holds_an_untrusted_commit_point_at_its_first_record() {
    // 0: an empty commit of "a" (dead-lettered), 1: task of "c", 2: task of "a" (stays
    // open), 3: task of "c", 4: commit of "c" (delivered by the earlier owner).
    let log = [
        rec("a", RecKind::Commit(CountKind::None)),
        rec("c", RecKind::Task),
        rec("a", RecKind::Task),
        rec("c", RecKind::Task),
        rec("c", RecKind::Commit(CountKind::None)),
    ];
    let (metadata, _) = txn_sidecar::offsets::encode_metadata(1, &BTreeSet::from([4]));
    let mut actions = Vec::new();
    let mut m = assigned_at(Some(1), metadata, log.len(), &mut actions);
    feed(&mut m, &log, 1, &mut actions);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Deliver(..))),
        "the skipped commit was delivered again"
    );
    let cp = m.final_commit_point().expect("a commit point");
    assert_eq!(
        cp.offset, 1,
        "the untrusted commit passed the replayed instance's first record"
    );
}

/// A record handed out again (librdkafka after a pause) or a log that went back while
/// assigned: the machine applies each offset once, and says which case it saw.
#[test]
fn a_record_is_applied_once_per_assignment() {
    let log = [
        rec("a", RecKind::Task),
        rec("a", RecKind::Task),
        rec("a", RecKind::Commit(CountKind::None)),
    ];
    let mut actions = Vec::new();
    let mut m = assigned_at(None, String::new(), 0, &mut actions);
    feed(&mut m, &log[..2], 0, &mut actions);
    // The last record again, then the whole log from its start.
    feed(&mut m, &log[..2], 1, &mut actions);
    let again: Vec<(i64, i64)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(Report::ReadAgain { offset, next }) => Some((*offset, *next)),
            _ => None,
        })
        .collect();
    assert_eq!(again, vec![(1, 2)]);
    feed(&mut m, &log[..2], 0, &mut actions);
    feed(&mut m, &log, 2, &mut actions);
    let delivered: Vec<Vec<i64>> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(c, _) => Some(c.tasks.iter().map(|t| t.offset).collect()),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![vec![0, 1]], "each task staged once");
    let rewound = actions
        .iter()
        .filter(|a| matches!(a, Action::Report(Report::ReadAgain { offset: 0, next: 2 })))
        .count();
    assert_eq!(rewound, 1);
}

/// An instance that began BELOW the committed offset and ends in the skip set loaded on
/// assign (the previous owner, trusting metadata, committed past its first record): the
/// new owner does not know where it began. If the new owner's later commit leaves its end
/// out of the metadata (here: many tombstones take the bytes), the next owner replays the
/// instance's tail alone and delivers it: a partial transaction.
#[test]
fn a_straddling_replayed_instance_is_never_delivered_in_part_by_a_later_owner() {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    // 0: c task (below the committed offset), 1: x task (x stays open: held the previous
    // owner's offset at 1), 2: c task, 3..3+M: tasks of M ids that stay open,
    // 3+M: c commit (delivered by the previous owner; its end travels in the skip set).
    const M: usize = 300;
    let mut log = vec![
        rec("c", RecKind::Task),
        rec("x", RecKind::Task),
        rec("c", RecKind::Task),
    ];
    for i in 0..M {
        log.push(rec(leak(format!("o{i}")), RecKind::Task));
    }
    let c_commit = log.len() as i64;
    log.push(rec("c", RecKind::Commit(CountKind::None)));
    let (metadata, _) = txn_sidecar::offsets::encode_metadata(1, &BTreeSet::from([c_commit]));
    let mut actions = Vec::new();
    let mut m = assigned_at(Some(1), metadata, log.len(), &mut actions);
    m.metadata_kept(); // as the driver does: metadata found on assign
    feed(&mut m, &log, 1, &mut actions);
    // Everything open expires (x and the M ids); acknowledge every dead-letter write.
    m.tick(10 * TIMEOUT, true, &mut actions);
    for act in actions.drain(..) {
        match act {
            Action::Deliver(..) => panic!("the skipped commit was delivered again"),
            Action::DeadLetter(_, r, _) => m.done(r),
            Action::Report(_) => {}
        }
    }
    let cp = m.final_commit_point().expect("a commit point");
    // Next owner: starts at cp.offset with cp.metadata.
    let a2 = Assignment {
        committed: Some(cp.offset),
        metadata: cp.metadata.clone(),
        log_start: Some(0),
        log_end: Some(log.len() as i64),
    };
    let mut actions = Vec::new();
    let mut m2 = PartitionMachine::assigned(Arc::from("t"), 0, settings(), &a2, 0, &mut actions);
    m2.metadata_kept();
    feed(&mut m2, &log, cp.offset as usize, &mut actions);
    for act in &actions {
        if let Action::Deliver(c, _) = act {
            panic!(
                "delivered {} with tasks at {:?} (committed {}, metadata {} bytes, dropped {}): its task at 0 is missing",
                c.id,
                c.tasks.iter().map(|t| t.offset).collect::<Vec<_>>(),
                cp.offset,
                cp.metadata.len(),
                cp.dropped,
            );
        }
    }
}
