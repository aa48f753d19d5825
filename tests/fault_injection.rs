//! Fault-injection suite: a broker in its own process, a recording HTTP app, thousands of
//! multi-task transactions across several partitions, several sidecar *processes* in one
//! consumer group, and a seeded schedule of joins, graceful leaves (SIGTERM), SIGKILLs,
//! restarts, 5xx bursts and slow responses.
//!
//! It fails if any transaction is lost, partial, delivered although aborted, or delivered
//! out of commit order within its partition; if any duplicate follows a graceful handoff;
//! or if duplicates after SIGKILLs exceed what the kills could provably cause (requests
//! in flight at the kill plus deliveries the victim had not yet committed).
//!
//! `cargo test --test fault_injection` runs the short form (about a minute) under each
//! group protocol, classic and KIP-848 (`group.protocol=consumer`), one after the other;
//! `TXN_SIDECAR_FAULT_LONG=1` selects the long form (minutes, thousands of transactions);
//! `TXN_SIDECAR_FAULT_SEED=<n>` changes the seed. `scripts/fault-suite.sh [--long]
//! [--protocol classic|consumer]` runs either and prints the report. See RELIABILITY.md
//! for what the figures mean.

mod common;
mod fault;

use std::sync::Mutex;
use std::time::Duration;

use fault::runner::{self, GroupProtocol, Profile};
use fault::schedule;
use fault::workload::Shape;

const SHORT_SEED: u64 = 4;
const LONG_SEED: u64 = 20_261_123;

fn profile(protocol: GroupProtocol) -> Profile {
    let long = std::env::var("TXN_SIDECAR_FAULT_LONG").is_ok_and(|v| v == "1" || v == "true");
    let seed_env = std::env::var("TXN_SIDECAR_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    if long {
        let seed = seed_env.unwrap_or(LONG_SEED);
        Profile {
            name: match protocol {
                GroupProtocol::Classic => "long",
                GroupProtocol::Consumer => "long-kip848",
            },
            protocol,
            seed,
            shape: Shape {
                transactions: 6000,
                partitions: 6,
                interleave: 4,
                max_tasks: 6,
                abort_ratio: 0.08,
                long_ratio: 0.02,
            },
            produce_for: Duration::from_secs(230),
            schedule: schedule::long(seed, 36),
            settle_timeout: Duration::from_secs(240),
        }
    } else {
        let seed = seed_env.unwrap_or(SHORT_SEED);
        Profile {
            name: match protocol {
                GroupProtocol::Classic => "short",
                GroupProtocol::Consumer => "short-kip848",
            },
            protocol,
            seed,
            shape: Shape {
                transactions: 400,
                partitions: 4,
                interleave: 3,
                max_tasks: 5,
                abort_ratio: 0.08,
                long_ratio: 0.03,
            },
            produce_for: Duration::from_secs(26),
            schedule: schedule::short(seed),
            settle_timeout: Duration::from_secs(60),
        }
    }
}

/// The suites run one at a time: each loads both cores with its sidecars.
static ONE_SUITE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn fault_injection_suite() {
    suite(GroupProtocol::Classic);
}

#[test]
fn kip848_fault_injection_suite() {
    suite(GroupProtocol::Consumer);
}

fn suite(protocol: GroupProtocol) {
    let _one = ONE_SUITE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let p = profile(protocol);
    println!("fault-injection suite, {} form, seed {}", p.name, p.seed);
    println!(
        "sidecar flags: {}",
        runner::sidecar_args(protocol).join(" ")
    );
    println!("schedule (after slots {:?} start):", p.schedule.initial);
    for (i, s) in p.schedule.steps.iter().enumerate() {
        println!("  step {:>2} after {:>5} ms: {}", i + 1, s.gap_ms, s.action);
    }
    let report = runner::run(&p);
    let table = report.table();
    println!("\n{table}");
    let path = report.dir.join("report.txt");
    let _ = std::fs::write(&path, &table);
    assert!(report.passed(), "fault-injection suite failed:\n{table}");
}

/// The harness's reading of sidecar logs: a revoke counts as refused when the last commit
/// outcome before it, for that partition, was a failure.
#[test]
fn refused_handoffs_are_read_from_the_sidecar_logs() {
    let dir = tempfile::tempdir().unwrap();
    let log = "\
2026-11-23T10:16:23.941016Z  INFO partition assigned topic=fault.tx partition=1 committed=-1
2026-11-23T10:16:29.588656Z  WARN offset commit failed; the next owner replays from the last committed offset error=Consumer commit error: RebalanceInProgress
2026-11-23T10:16:31.163404Z  INFO partition revoked, staged state dropped topic=fault.tx partition=1
2026-11-23T10:17:12.726100Z  WARN offset commit failed; the next owner replays from the last committed offset error=Consumer commit error: RebalanceInProgress
2026-11-23T10:17:12.727205Z  INFO committed safe offset topic=fault.tx partition=3 offset=430
2026-11-23T10:17:12.727300Z  INFO committed safe offset topic=fault.tx partition=2 offset=97
2026-11-23T10:17:12.728151Z  WARN offset commit failed; the next owner replays from the last committed offset error=Consumer commit error: RebalanceInProgress
2026-11-23T10:17:12.728300Z  INFO committed safe offset topic=fault.tx partition=3 offset=431
2026-11-23T10:17:12.728361Z  INFO partition revoked, staged state dropped topic=fault.tx partition=3
2026-11-23T10:17:12.728362Z  INFO partition revoked, staged state dropped topic=fault.tx partition=2
2026-11-23T10:17:12.728363Z  INFO partition revoked, staged state dropped topic=fault.tx partition=0
";
    std::fs::write(dir.path().join("sidecar-07-slot2.log"), log).unwrap();
    let r = fault::logs::refused_handoffs(dir.path());
    let got: Vec<(usize, i32)> = r.iter().map(|h| (h.inc, h.partition)).collect();
    // 3's last word was a success; 2 committed early but its final commit failed; 1 and 0
    // saw only failures.
    assert_eq!(got, vec![(7, 1), (7, 2), (7, 0)]);
    let t = |s: &str| humantime::parse_rfc3339_weak(s).unwrap();
    assert!(fault::logs::explains(
        &r[0],
        7,
        1,
        t("2026-11-23T10:16:24"),
        t("2026-11-23T10:16:40")
    ));
    assert!(
        !fault::logs::explains(
            &r[0],
            7,
            1,
            t("2026-11-23T10:16:00"),
            t("2026-11-23T10:16:40")
        ),
        "older than the window"
    );
    assert!(
        !fault::logs::explains(
            &r[0],
            6,
            1,
            t("2026-11-23T10:16:24"),
            t("2026-11-23T10:16:40")
        ),
        "another process"
    );
}
