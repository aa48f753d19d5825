//! Edges of the state machine at a handoff: metadata that overflows, replayed heads,
//! commits whose count does not decode. Each states a documented rule.

use std::sync::Arc;

use txn_sidecar::config::{HeaderNames, Protocol};
use txn_sidecar::machine::{Action, Assignment, PartitionMachine, Settings};
use txn_sidecar::protocol::{self, Record};

fn names() -> HeaderNames {
    HeaderNames {
        id: "txn-id".into(),
        kind: "txn-type".into(),
        count: "txn-count".into(),
    }
}

fn settings() -> Settings {
    Settings {
        max_tasks_per_txn: 100,
        max_txn_bytes: 1 << 20,
        txn_timeout_ms: 60_000,
    }
}

fn rec(offset: i64, id: &str, kind: &str) -> Record {
    let hs: Vec<(&[u8], Option<&[u8]>)> = vec![
        (b"txn-id", Some(id.as_bytes())),
        (b"txn-type", Some(kind.as_bytes())),
    ];
    Record::new(offset, Some(0), None, Some(b"{}"), &hs)
}

/// What the driver saw: deliveries (id, task offsets) and dead-lettered offsets.
#[derive(Default)]
struct Out {
    delivered: Vec<(String, Vec<i64>)>,
    dead: Vec<(i64, i64)>,
    reasons: Vec<(i64, &'static str)>,
}

/// Carries out every action at once: deliveries succeed, dead letters are acknowledged.
fn run(m: &mut PartitionMachine, actions: &mut Vec<Action>, out: &mut Out) {
    for a in actions.drain(..) {
        match a {
            Action::Deliver(c, r) => {
                out.delivered
                    .push((c.id.clone(), c.tasks.iter().map(|t| t.offset).collect()));
                m.done(r);
            }
            Action::DeadLetter(d, r, _) => {
                let src = d.source_offset();
                for x in d.records.iter() {
                    out.dead.push((x.offset, src));
                    out.reasons.push((x.offset, d.reason));
                }
                m.done(r);
            }
            Action::Report(_) => {}
        }
    }
}

fn feed(m: &mut PartitionMachine, log: &[Record], from: usize, out: &mut Out) {
    let mut actions = Vec::new();
    for r in &log[from..] {
        let d = protocol::decode(r.view(), Protocol::Headers, &names());
        m.on_record(r.view(), d, 0, &mut actions);
        run(m, &mut actions, out);
    }
}

fn new_owner(committed: i64, metadata: String) -> PartitionMachine {
    let mut a = Vec::new();
    PartitionMachine::assigned(
        Arc::from("t"),
        0,
        settings(),
        &Assignment {
            committed: Some(committed),
            metadata,
            log_start: Some(0),
            log_end: None,
        },
        0,
        &mut a,
    )
}

/// Guarantee 1 ("never both, across any handoff"): a tombstone whose first record lies at
/// or above the committed offset is not carried in the metadata; it relies on the skip
/// set entry of its dead-lettered head. When the skip set overflows (many transactions
/// finished above an older open one), that entry is dropped, and the next owner delivers
/// the instance whole although its head is already in the dead-letter topic.
#[test]
fn skip_set_overflow_drops_a_tombstone_head_and_the_next_owner_delivers_it_whole() {
    let mut log = Vec::new();
    // 0: a long transaction, open (well within txn_timeout), holds the committed offset.
    log.push(rec(0, "long", "task"));
    // 2500 small transactions committed and delivered above it.
    for i in 0..2500 {
        let id = format!("s{i}");
        let o = log.len() as i64;
        log.push(rec(o, &id, "task"));
        log.push(rec(o + 1, &id, "commit"));
    }
    // "bad": one task, then the operator dead-letters it (reason operator, tombstoned).
    let bad_first = log.len() as i64;
    log.push(rec(bad_first, "bad", "task"));

    let mut out = Out::default();
    let mut m = new_owner(0, String::new());
    feed(&mut m, &log, 0, &mut out);
    let mut actions = Vec::new();
    m.operator_dead_letter("bad", &mut actions).unwrap();
    run(&mut m, &mut actions, &mut out);
    assert_eq!(out.dead, vec![(bad_first, bad_first)]);

    // Graceful handoff: the final commit point.
    let cp = m.final_commit_point().unwrap();
    assert_eq!(cp.offset, 0, "held by the open transaction `long`");

    // The producer of "bad" goes on, and commits.
    let o = log.len() as i64;
    log.push(rec(o, "bad", "task"));
    log.push(rec(o + 1, "bad", "commit"));

    let mut out2 = Out::default();
    let mut m2 = new_owner(cp.offset, cp.metadata.clone());
    feed(&mut m2, &log, cp.offset as usize, &mut out2);
    let bad: Vec<_> = out2
        .delivered
        .iter()
        .filter(|(id, _)| id == "bad")
        .collect();
    assert!(
        bad.is_empty(),
        "instance `bad` was dead-lettered (head at {bad_first}) by the first owner and delivered by the next: {bad:?} (metadata dropped {} skip entries, carried {} tombstones)",
        cp.dropped,
        cp.carried
    );
}

/// Same rule, second path: tombstones fill the metadata (long ids), the first that does
/// not fit lowers the committed offset to its head, and the skip set gets only the bytes
/// left over; the tombstones *above* the lowered offset are not carried and their skip
/// entries do not fit either.
#[test]
fn tombstones_that_fill_the_metadata_leave_later_tombstones_unprotected() {
    let mut log = Vec::new();
    let long_a = "a".repeat(1900);
    let long_b = "b".repeat(1900);
    let ids: Vec<String> = std::iter::once(long_a.clone())
        .chain(std::iter::once(long_b.clone()))
        .chain((0..40).map(|i| format!("k{i}")))
        .collect();
    for (o, id) in ids.iter().enumerate() {
        log.push(rec(o as i64, id, "task"));
    }
    let mut out = Out::default();
    let mut m = new_owner(0, String::new());
    feed(&mut m, &log, 0, &mut out);
    let mut actions = Vec::new();
    for id in &ids {
        m.operator_dead_letter(id, &mut actions).unwrap();
    }
    run(&mut m, &mut actions, &mut out);
    // A few unrelated records so the committed offset would pass all of them.
    let o = log.len() as i64;
    log.push(rec(o, "x", "task"));
    log.push(rec(o + 1, "x", "commit"));
    feed(&mut m, &log, o as usize, &mut out);
    let cp = m.final_commit_point().unwrap();
    assert!(cp.metadata.len() <= 3900);

    // Every dead id's producer goes on and commits.
    for id in &ids {
        let o = log.len() as i64;
        log.push(rec(o, id, "task"));
        log.push(rec(o + 1, id, "commit"));
    }
    let mut out2 = Out::default();
    let mut m2 = new_owner(cp.offset, cp.metadata.clone());
    feed(&mut m2, &log, cp.offset as usize, &mut out2);
    let revived: Vec<String> = out2
        .delivered
        .iter()
        .filter(|(id, _)| ids.contains(id))
        .map(|(id, t)| format!("{}… {:?}", &id[..id.len().min(4)], t))
        .collect();
    assert!(
        revived.is_empty(),
        "dead-lettered instances delivered by the next owner (offset {}, carried {}, dropped {}): {revived:?}",
        cp.offset,
        cp.carried,
        cp.dropped
    );
}

/// README "Bytes"/machine docs: "A commit whose `txn-count` does not parse is still a
/// marker: it ends the instance, and nothing is tombstoned." A `txn-count` whose bytes are
/// not UTF-8 does not parse either, but decodes as `NotUtf8`, which `ends_instance` does
/// not treat as a marker: the id is tombstoned past its own commit, and the *next*,
/// healthy instance of the id is dead-lettered instead of delivered.
#[test]
fn a_commit_with_a_non_utf8_count_ends_its_instance() {
    let bad_commit = {
        let hs: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"txn-id", Some(b"o-1")),
            (b"txn-type", Some(b"commit")),
            (b"txn-count", Some(&[0xff, 0x01])),
        ];
        Record::new(1, Some(0), None, None, &hs)
    };
    let log = vec![
        rec(0, "o-1", "task"),
        bad_commit,
        // The id is reused for a new, healthy transaction.
        rec(2, "o-1", "task"),
        rec(3, "o-1", "commit"),
    ];
    let mut out = Out::default();
    let mut m = new_owner(0, String::new());
    feed(&mut m, &log, 0, &mut out);
    assert_eq!(
        out.delivered,
        vec![("o-1".to_string(), vec![2])],
        "the second instance is whole and healthy; dead-lettered: {:?}",
        out.dead
    );
}

/// README: "every later record of its id, up to and including its marker, follows it into
/// the dead-letter topic with the same reason". When the next owner rebuilds the
/// tombstone from the skip set (its head lies above the committed offset, so it is not
/// carried), `replayed` names the reason `replayed`, a reason the README's table does not
/// list: the head says `operator`, the tail `replayed`.
#[test]
fn a_tombstone_rebuilt_from_the_skip_set_keeps_its_reason() {
    let mut log = vec![rec(0, "long", "task"), rec(1, "bad", "task")];
    let mut out = Out::default();
    let mut m = new_owner(0, String::new());
    feed(&mut m, &log, 0, &mut out);
    let mut actions = Vec::new();
    m.operator_dead_letter("bad", &mut actions).unwrap();
    run(&mut m, &mut actions, &mut out);
    assert_eq!(out.reasons, vec![(1, "operator")]);
    let cp = m.final_commit_point().unwrap();
    log.push(rec(2, "bad", "commit"));
    let mut out2 = Out::default();
    let mut m2 = new_owner(cp.offset, cp.metadata.clone());
    feed(&mut m2, &log, cp.offset as usize, &mut out2);
    assert_eq!(
        out2.dead,
        vec![(2, 1)],
        "the marker follows under the same source"
    );
    assert_eq!(out2.reasons, vec![(2, "operator")], "and the same reason");
}
