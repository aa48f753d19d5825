//! The binary as users run it: separate processes, kill -9, SIGTERM, bad config, demo.
//!
//! The tests with a broker run on the one `TXN_SIDECAR_TEST_BROKER` selects (`mock`, the
//! default, or `tansu`; see `tests/common/broker.rs`).

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: &str = "orders.tx";
const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_txn-sidecar");

struct Proc {
    child: Child,
    admin: String,
}

impl Proc {
    fn spawn(brokers: &str, app_url: &str) -> Proc {
        Proc::spawn_with(GroupProtocol::Classic, brokers, app_url)
    }

    fn spawn_with(protocol: GroupProtocol, brokers: &str, app_url: &str) -> Proc {
        let admin = format!("127.0.0.1:{}", free_port());
        let group: Vec<String> = txn_sidecar::embedded::fast_group_properties(protocol)
            .iter()
            .flat_map(|(k, v)| ["-X".to_string(), format!("{k}={v}")])
            .collect();
        let child = Command::new(BIN)
            .args([
                "run",
                "--brokers",
                brokers,
                "--topic",
                T,
                "--group",
                "proc-group",
                "--app-url",
                app_url,
            ])
            .args(["--admin-addr", &admin, "--log-format", "text"])
            .args(["--set", "commit_interval=200ms"])
            .args(&group)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn txn-sidecar");
        Proc { child, admin }
    }

    /// The admin server's `/metrics`, once it answers.
    async fn metrics(&self) -> Option<String> {
        let r = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    }

    async fn open_txns(&self) -> Vec<serde_json::Value> {
        match reqwest::get(format!("http://{}/v1/transactions", self.admin)).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => vec![],
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_the_next_process_delivers_the_whole_transaction() {
    kill_9_loses_nothing(GroupProtocol::Classic).await;
}

/// The same under KIP-848: the killed member's partition moves once the broker-side
/// session (6 s on the embedded cluster) expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_kill_9_loses_nothing_the_next_process_delivers_the_whole_transaction() {
    kill_9_loses_nothing(GroupProtocol::Consumer).await;
}

async fn kill_9_loses_nothing(protocol: GroupProtocol) {
    // KIP-848 runs on librdkafka's mock cluster only (tansu speaks the classic protocol).
    let topics = [(T, 1), ("orders.tx.dlq", 1)];
    let kafka = match protocol {
        GroupProtocol::Classic => Kafka::start_selected(&topics),
        GroupProtocol::Consumer => Kafka::start(&topics),
    };
    let app = RecordingApp::start().await;
    let mut p1 = Proc::spawn_with(protocol, &kafka.brokers, &app.url());
    kafka.task(T, 0, "done", "0");
    kafka.commit(T, 0, "done");
    kafka.task(T, 0, "t", "1");
    kafka.task(T, 0, "t", "2");
    app.wait_accepted(1, WAIT).await;
    // Wait until the first process has staged both tasks of "t"...
    let deadline = Instant::now() + WAIT;
    loop {
        let open = p1.open_txns().await;
        if open.iter().any(|t| t["id"] == "t" && t["tasks"] == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "tasks never staged: {open:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and has committed the offset up to (not past) its first task.
    let k = &kafka;
    wait_until(WAIT, "offset held at the open transaction", || {
        k.committed("proc-group", T, 0).0 == Some(2)
    })
    .await;
    p1.child.kill().unwrap(); // SIGKILL: no drain, no commit, no leave
    p1.child.wait().unwrap();

    kafka.task(T, 0, "t", "3");
    kafka.commit(T, 0, "t");
    let _p2 = Proc::spawn_with(protocol, &kafka.brokers, &app.url());
    let got = app.wait_accepted(2, Duration::from_secs(60)).await;
    assert_eq!(app.accepted_ids(), vec!["done", "t"]);
    assert_eq!(got[1].task_values(), vec![json!(1), json!(2), json!(3)]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.attempts().len(), 2, "nothing redelivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    let kafka = Kafka::start_selected(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    // The app is slow: the delivery is in flight when SIGTERM arrives and must finish.
    app.script(vec![Answer {
        status: 200,
        delay: Duration::from_millis(1500),
        retry_after: None,
    }]);
    let mut p = Proc::spawn(&kafka.brokers, &app.url());
    kafka.task(T, 0, "a", "1");
    kafka.commit(T, 0, "a");
    let a = app.clone();
    wait_until(WAIT, "delivery in flight", || !a.attempts().is_empty()).await;
    p.signal("-TERM");
    let (code, stderr) = p.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(app.accepted_ids(), vec!["a"]);
    assert_eq!(kafka.committed("proc-group", T, 0).0, Some(2), "{stderr}");
    assert!(stderr.contains("leaving the consumer group"), "{stderr}");
}

const DROPPED: &str = "txn_sidecar_commit_metadata_dropped";

impl Proc {
    /// Waits until the process stages `tasks` tasks of `id`.
    async fn wait_staged(&self, id: &str, tasks: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let open = self.open_txns().await;
            if open.iter().any(|t| t["id"] == id && t["tasks"] == tasks) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id:?} never staged with {tasks} task(s): {open:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `series` reads `value` on `/metrics`.
    async fn wait_metric(&self, series: &str, value: f64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.metrics().await.unwrap_or_default();
            if metric(&m, series) == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} did not read {value} within {WAIT:?}:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that `series` reads `value` on every scrape for `window` (at least one).
    async fn metric_stays(&self, series: &str, value: f64, window: Duration) {
        let until = Instant::now() + window;
        let mut scraped = 0;
        while Instant::now() < until {
            if let Some(m) = self.metrics().await {
                assert_eq!(metric(&m, series), Some(value), "{series} in\n{m}");
                scraped += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(scraped > 0, "/metrics never answered");
    }
}

/// How long the gauge must stay 0 on a broker that keeps metadata once a commit with a
/// non-empty skip set has landed: two periods of re-sending unchanged commit points (every
/// one a commit with that skip set), plus a second.
fn quiet_window() -> Duration {
    txn_sidecar::pipeline::COMMIT_REFRESH * 2 + Duration::from_secs(1)
}

/// A transaction held open while a later one is delivered makes the skip set non-empty.
/// tansu drops offset-commit metadata: the sidecar notices (the gauge turns 1) and a
/// handoff redelivers the later transaction with the same `Idempotency-Key` (plain
/// at-least-once). The mock keeps the metadata: the gauge stays 0 and the next owner
/// skips the later transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_commit_metadata_is_noticed_and_handoffs_fall_back_to_at_least_once() {
    let kafka = Kafka::start_selected(&[(T, 1), ("orders.tx.dlq", 1)]);
    let kind = kafka.kind();
    let app = RecordingApp::start().await;
    let mut p1 = Proc::spawn(&kafka.brokers, &app.url());
    kafka.task(T, 0, "open", "1"); // offset 0, held open
    kafka.task(T, 0, "later", "2"); // offset 1
    kafka.commit(T, 0, "later"); // offset 2
    kafka.flush();
    let got = app.wait_accepted(1, WAIT).await;
    assert_eq!(got[0].id(), "later");
    assert_eq!(got[0].idempotency_key, format!("{T}/0/2"));
    // The sidecar stages "open" and commits offset 0 with the skip set {2}.
    p1.wait_staged("open", 1).await;
    let k = &kafka;
    wait_until(WAIT, "offset committed at the open transaction", || {
        k.committed("proc-group", T, 0).0 == Some(0)
    })
    .await;
    if kind.keeps_commit_metadata() {
        // The skip set reads back from the broker, so the gauge stays 0.
        wait_until(WAIT, "the skip set {2} in the committed metadata", || {
            let (off, meta) = k.committed("proc-group", T, 0);
            off == Some(0) && txn_sidecar::offsets::decode_metadata(0, &meta) == [2].into()
        })
        .await;
        p1.metric_stays(DROPPED, 0.0, quiet_window()).await;
    } else {
        p1.wait_metric(DROPPED, 1.0).await;
        assert_eq!(
            kafka.committed("proc-group", T, 0),
            (Some(0), String::new()),
            "tansu reads the offset back without its metadata"
        );
    }
    // A graceful handoff: the first process leaves, the next one finishes "open".
    p1.signal("-TERM");
    let (code, stderr) = p1.wait_exit(WAIT);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(kafka.committed("proc-group", T, 0).0, Some(0), "{stderr}");
    kafka.task(T, 0, "open", "3"); // offset 3
    kafka.commit(T, 0, "open"); // offset 4
    kafka.flush();
    let p2 = Proc::spawn(&kafka.brokers, &app.url());
    let expect: Vec<(&str, String)> = if kind.keeps_commit_metadata() {
        vec![("later", format!("{T}/0/2")), ("open", format!("{T}/0/4"))]
    } else {
        // No skip set survived: "later" again, with the key of its first delivery.
        vec![
            ("later", format!("{T}/0/2")),
            ("later", format!("{T}/0/2")),
            ("open", format!("{T}/0/4")),
        ]
    };
    let got = app.wait_accepted(expect.len(), WAIT).await;
    wait_until(WAIT, "the next owner committed past \"open\"", || {
        k.committed("proc-group", T, 0).0 == Some(5)
    })
    .await;
    assert_eq!(
        app.accepted()
            .iter()
            .map(|g| (g.id(), g.idempotency_key.clone()))
            .collect::<Vec<_>>(),
        expect,
        "deliveries on {}",
        kind.name()
    );
    assert_eq!(got.last().unwrap().task_values(), vec![json!(1), json!(3)]);
    assert_eq!(app.attempts().len(), expect.len(), "nothing else delivered");
    let m = p2.metrics().await.unwrap_or_default();
    let skipped = metric(
        &m,
        "txn_sidecar_transactions_total{outcome=\"duplicate_skipped\"}",
    );
    assert_eq!(
        skipped,
        Some(if kind.keeps_commit_metadata() {
            1.0
        } else {
            0.0
        }),
        "{m}"
    );
}

/// A delivered transaction whose records straddle the committed offset (its first task
/// below the first task of one held open, its marker above): a skip set is the only
/// thing that tells the next owner not to redeliver the tail it replays. Without one (a
/// broker that drops commit metadata, once the sidecar has noticed), the redelivery
/// must still be whole: all its tasks, same `Idempotency-Key`; never a partial one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_commit_metadata_a_handoff_redelivers_a_straddling_transaction_whole() {
    let kafka = Kafka::start_selected(&[(T, 1), ("orders.tx.dlq", 1)]);
    let kind = kafka.kind();
    let app = RecordingApp::start().await;
    let mut p1 = Proc::spawn(&kafka.brokers, &app.url());
    kafka.task(T, 0, "span", "1"); // offset 0
    kafka.task(T, 0, "open", "1"); // offset 1, held open
    kafka.task(T, 0, "span", "2"); // offset 2
    kafka.commit(T, 0, "span"); // offset 3
    kafka.flush();
    let got = app.wait_accepted(1, WAIT).await;
    assert_eq!(got[0].id(), "span");
    assert_eq!(got[0].task_values(), vec![json!(1), json!(2)]);
    p1.wait_staged("open", 1).await;
    let k = &kafka;
    if kind.keeps_commit_metadata() {
        wait_until(WAIT, "offset 1 with the skip set {3} committed", || {
            let (off, meta) = k.committed("proc-group", T, 0);
            off == Some(1) && txn_sidecar::offsets::decode_metadata(1, &meta) == [3].into()
        })
        .await;
    } else {
        // From here on the sidecar knows no skip set survives a handoff.
        p1.wait_metric(DROPPED, 1.0).await;
    }
    p1.signal("-TERM");
    let (code, stderr) = p1.wait_exit(WAIT);
    assert_eq!(code, Some(0), "{stderr}");
    kafka.task(T, 0, "open", "3"); // offset 4
    kafka.commit(T, 0, "open"); // offset 5
    kafka.flush();
    let _p2 = Proc::spawn(&kafka.brokers, &app.url());
    let a = app.clone();
    wait_until(WAIT, "\"open\" delivered", || {
        a.accepted_ids().iter().any(|id| id == "open")
    })
    .await;
    wait_until(WAIT, "the next owner committed past \"open\"", || {
        k.committed("proc-group", T, 0).0 == Some(6)
    })
    .await;
    let accepted = app.accepted();
    for g in accepted.iter().filter(|g| g.id() == "span") {
        assert_eq!(
            (
                g.task_values(),
                g.task_offsets(),
                g.idempotency_key.as_str()
            ),
            (
                vec![json!(1), json!(2)],
                vec![0, 2],
                format!("{T}/0/3").as_str()
            ),
            "a partial redelivery of \"span\" on {}: {stderr}",
            kind.name()
        );
    }
    let open: Vec<_> = accepted.iter().filter(|g| g.id() == "open").collect();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].task_values(), vec![json!(1), json!(3)]);
    let ids = app.accepted_ids();
    if kind.keeps_commit_metadata() {
        assert_eq!(
            ids,
            vec!["span", "open"],
            "the skip set saved the redelivery"
        );
    } else {
        assert_eq!(ids, vec!["span", "span", "open"], "plain at-least-once");
    }
    assert_eq!(app.attempts().len(), ids.len(), "nothing else delivered");
}

#[test]
fn a_bad_config_exits_non_zero_with_one_line_naming_each_key() {
    let out = Command::new(BIN)
        .args([
            "run",
            "--topic",
            "t",
            "--txn-timeout",
            "forever",
            "--on-failure",
            "explode",
        ])
        .env("TXN_SIDECAR_APP_URL", "not a url")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for key in ["txn_timeout", "on_failure", "app.url"] {
        assert!(err.contains(key), "{key} missing in {err}");
    }
    let out = Command::new(BIN)
        .args(["run"])
        .env_remove("TXN_SIDECAR_TOPIC")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("topic: is required"));
}

#[test]
fn config_command_prints_the_effective_config_with_secrets_redacted() {
    let out = Command::new(BIN)
        .args([
            "config",
            "--topic",
            "t",
            "-X",
            "sasl.password=hunter2",
            "-X",
            "sasl.username=svc",
        ])
        .env("TXN_SIDECAR_KAFKA_SSL_KEY_PASSWORD", "keypw")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(!s.contains("hunter2") && !s.contains("keypw"), "{s}");
    assert!(s.contains("\"sasl.password\" = \"<redacted>\""), "{s}");
    assert!(s.contains("\"ssl.key.password\" = \"<redacted>\""), "{s}");
    assert!(s.contains("\"sasl.username\" = \"svc\""), "{s}");
}

#[test]
fn demo_prints_the_delivered_transactions() {
    let out = Command::new(BIN).arg("demo").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{s}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let received: Vec<&str> = s
        .lines()
        .filter(|l| l.starts_with("app received transaction"))
        .collect();
    assert_eq!(received.len(), 3, "{s}");
    assert!(
        received[0].contains("order-2")
            && received[1].contains("order-1")
            && received[2].contains("transfer-7"),
        "{s}"
    );
    assert!(
        !received.iter().any(|l| l.contains("order-3")),
        "aborted transaction delivered: {s}"
    );
}

#[test]
fn credentials_never_reach_the_logs() {
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--brokers",
            "127.0.0.1:1",
            "--topic",
            T,
            "--admin-addr",
            &admin,
        ])
        .args([
            "-X",
            "sasl.password=hunter2",
            "-X",
            "security.protocol=SASL_PLAINTEXT",
            "-X",
            "sasl.mechanisms=PLAIN",
            "-X",
            "sasl.username=svc",
        ])
        .env("RUST_LOG", "debug")
        .env("TXN_SIDECAR_ADMIN_TOKEN", "tok-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it start, log its config and fail to reach the broker for a moment.
    std::thread::sleep(Duration::from_secs(3));
    let p = Proc {
        child: std::mem::replace(&mut child, Command::new("true").spawn().unwrap()),
        admin,
    };
    p.signal("-TERM");
    let mut p = p;
    let (code, stderr) = p.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("starting"), "{stderr}");
    assert!(
        stderr.contains("<redacted>"),
        "the startup line shows the redacted property: {stderr}"
    );
    assert!(
        !stderr.contains("hunter2") && !stderr.contains("tok-secret"),
        "secret leaked: {stderr}"
    );
    let _ = child.wait();
}
