//! A panic inside the sidecar (a bug, not an input: nothing panics on input) loses
//! nothing. The process stops with an error and commits no offset after the panic, so the
//! next start replays from the last commit and delivers every transaction whole.
//!
//! Built only with `--features failpoints` (scripts/test passes it): `fail` points in the
//! state machine's staging, a delivery worker and two shutdown steps panic on demand.

mod common;

use std::time::Duration;

use common::*;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const TXNS: usize = 20;

fn produce(kafka: &Kafka) {
    for i in 0..TXNS {
        let id = format!("t{i:02}");
        kafka.task(T, 0, &id, &format!("{{\"i\":{i}}}"));
        kafka.task(T, 0, &id, &format!("{{\"i\":{i},\"second\":true}}"));
        kafka.commit(T, 0, &id);
    }
    kafka.flush();
}

/// Fail points are global to the process, and every sidecar in it stages: one test at
/// a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asserts that `g` holds both tasks [`produce`] wrote for it; returns its number.
fn assert_whole(g: &Got, context: &str) -> usize {
    let i: usize = g.id()[1..].parse().unwrap();
    assert_eq!(
        g.task_values(),
        vec![
            serde_json::json!({"i": i}),
            serde_json::json!({"i": i, "second": true})
        ],
        "{context}: {} partial",
        g.id()
    );
    i
}

/// A fail point set for as long as this lives: switched off again even when a check
/// fails first, so the next test does not inherit it.
struct Armed(&'static str);

impl Armed {
    fn new(point: &'static str, actions: &str) -> Armed {
        fail::cfg(point, actions).unwrap();
        Armed(point)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = fail::cfg(self.0, "off");
    }
}

/// Both read paths in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_staging_commits_nothing_after_it_and_a_restart_delivers_every_transaction_whole(
) {
    let _serial = SERIAL.lock().await;
    for readers in ["0", "2"] {
        panic_then_restart(readers).await;
    }
}

/// A delivery worker (a tokio task) that panics stops the sidecar with an error at once,
/// rather than leaving its partition stalled and the sidecar ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_worker_that_panics_stops_the_sidecar_and_a_restart_delivers_everything() {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let cfg = || config(&kafka.brokers, T, &app.url(), &[("shutdown_grace", "6s")]);
    produce(&kafka);
    let armed = Armed::new("worker::deliver", "1*panic");
    let started = std::time::Instant::now();
    let first = txn_sidecar::start(cfg()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), first.wait())
        .await
        .expect("the sidecar did not stop after the worker panicked");
    drop(armed);
    let err = ended.expect_err("stopped without an error");
    assert!(
        err.to_string().contains("delivery worker panicked"),
        "{err}"
    );
    // Not by waiting out the 6 s grace for a worker that will never report.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(app.accepted().is_empty());
    let (committed, _) = kafka.committed("test-group", T, 0);
    assert!(
        committed.is_none_or(|o| o == 0),
        "committed {committed:?} past t00, which was never delivered"
    );
    let second = txn_sidecar::start(cfg()).await.unwrap();
    let got = app.wait_accepted(TXNS, Duration::from_secs(30)).await;
    second.shutdown();
    second.wait().await.unwrap();
    let ids: Vec<String> = got.iter().map(|g| g.id().to_string()).collect();
    let want: Vec<String> = (0..TXNS).map(|i| format!("t{i:02}")).collect();
    assert_eq!(ids, want);
}

async fn panic_then_restart(readers: &str) {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let cfg = || {
        config(
            &kafka.brokers,
            T,
            &app.url(),
            &[("reader_threads", readers)],
        )
    };
    produce(&kafka);
    // Ten transactions of two tasks stage; the 21st task, the first of `t10`, panics after
    // the machine counted it as consumed and before it was staged: a commit taken from
    // that state would pass it.
    let armed = Armed::new("machine::stage", "20*off->panic");
    let first = txn_sidecar::start(cfg()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), first.wait())
        .await
        .unwrap_or_else(|_| panic!("readers={readers}: the sidecar did not stop after the panic"));
    let err = ended.expect_err("stopped without an error");
    // Each path reports its panic (not a lost thread or a Kafka error) after its drain.
    let thread = if readers == "0" { "consumer" } else { "reader" };
    assert!(
        err.to_string()
            .contains(&format!("the {thread} thread panicked")),
        "readers={readers}: {err}"
    );
    drop(armed);
    // `t10` begins at offset 30: the committed offset must not have passed it.
    let (committed, _) = kafka.committed("test-group", T, 0);
    assert!(
        committed.is_none_or(|o| o <= 30),
        "readers={readers}: committed {committed:?} past t10's first task at 30"
    );
    let before = app.accepted().len();
    let second = txn_sidecar::start(cfg()).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "every transaction delivered",
        || {
            let ids: std::collections::HashSet<String> = app.accepted_ids().into_iter().collect();
            ids.len() == TXNS
        },
    )
    .await;
    second.shutdown();
    second.wait().await.unwrap();
    // Whole and in order on each run; the second run may repeat what the first delivered
    // after its last commit (a crash, not a graceful handoff), never less than whole.
    let all = app.accepted();
    for (run, got) in [("first", &all[..before]), ("second", &all[before..])] {
        let mut prev: Option<usize> = None;
        for g in got {
            let i = assert_whole(g, &format!("readers={readers}, the {run} run"));
            assert!(
                prev.is_none_or(|p| i == p + 1),
                "readers={readers}: {} after t{prev:?} in the {run} run",
                g.id()
            );
            prev = Some(i);
        }
    }
    // The first run stopped at t10; the second delivered from its committed offset on.
    assert!(
        all[..before].iter().all(|g| g.id() < "t10"),
        "readers={readers}: the first run delivered past the panic"
    );
    assert_eq!(
        all.last().map(|g| g.id().to_string()),
        Some(format!("t{:02}", TXNS - 1))
    );
}

/// A shutdown step that panics (the final commit's thread, the consumer's close thread)
/// ends the process with that error, not with success, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_step_that_panics_stops_with_its_error_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    for (point, step) in [
        ("drain::commit", "final offset commit"),
        ("drain::close", "consumer's close"),
    ] {
        let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
        let app = RecordingApp::start().await;
        // No periodic commit within the test: only the final commit can move the offset.
        let cfg = || config(&kafka.brokers, T, &app.url(), &[("commit_interval", "1h")]);
        produce(&kafka);
        let first = txn_sidecar::start(cfg()).await.unwrap();
        app.wait_accepted(TXNS, Duration::from_secs(30)).await;
        let armed = Armed::new(point, "1*panic");
        first.shutdown();
        let ended = tokio::time::timeout(Duration::from_secs(20), first.wait())
            .await
            .unwrap_or_else(|_| panic!("{point}: the sidecar did not stop"));
        drop(armed);
        let err = ended.expect_err("a panicked shutdown step ended in success");
        assert!(
            err.to_string().contains(&format!("the {step} panicked")),
            "{point}: {err}"
        );
        let (committed, _) = kafka.committed("test-group", T, 0);
        if point == "drain::close" {
            // The final commit ran before the close: everything delivered is committed.
            assert_eq!(committed, Some(3 * TXNS as i64), "{point}");
            continue;
        }
        // The commit panicked while it held the partitions' state: nothing is committed,
        // not even by the revoke in the consumer's close, and the next start replays all.
        assert_eq!(committed, None, "{point}");
        let before = app.accepted().len();
        let second = txn_sidecar::start(cfg()).await.unwrap();
        let all = app
            .wait_accepted(before + TXNS, Duration::from_secs(30))
            .await;
        second.shutdown();
        second.wait().await.unwrap();
        let ids: Vec<String> = all[before..].iter().map(|g| g.id().to_string()).collect();
        let want: Vec<String> = (0..TXNS).map(|i| format!("t{i:02}")).collect();
        assert_eq!(ids, want, "{point}");
        for g in &all {
            assert_whole(g, point);
        }
    }
}
