//! Guarantee 9: the app's absence is not the transaction's fault, and `Retry-After`
//! never shortens the backoff. Real HTTP servers on loopback, librdkafka's mock cluster.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use common::*;
use tokio_util::sync::CancellationToken;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);

async fn metrics_of(s: &txn_sidecar::Sidecar) -> String {
    admin_get(s.admin_addr(), "/metrics").await.1
}

/// The app answers 503 with `retry_after` for 3 s from its first request, then 200.
async fn a_retry_after_that_asks_for_no_wait_waits_the_backoff(retry_after: String) {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.set_default(Some(Answer {
        status: 503,
        delay: Duration::ZERO,
        retry_after: Some(retry_after.clone()),
    }));
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("retry.initial_backoff", "200ms"),
            ("retry.max_backoff", "1s"),
        ],
    );
    // The default budget: 10 attempts.
    assert_eq!(cfg.retry.max_attempts, 10);
    let s = txn_sidecar::start(cfg).await.unwrap();
    kafka.task(T, 0, "a", "1");
    kafka.commit(T, 0, "a");
    let a = app.clone();
    wait_until(WAIT, "the first attempt", || !a.attempts().is_empty()).await;
    let first = app.attempts()[0].at;
    tokio::time::sleep_until((first + Duration::from_secs(3)).into()).await;
    app.set_default(None);
    app.wait_accepted(1, WAIT).await;
    let attempts = app.attempts();
    assert_eq!(app.accepted_ids(), ["a"], "delivered once");
    assert!(attempts
        .iter()
        .all(|g| g.idempotency_key == "orders.tx/0/1"));
    // Spacing follows the backoff (200 ms doubling up to 1 s, jitter only adds), never
    // the zero the app asked for.
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let min = (Duration::from_millis(200) * 2u32.pow(i as u32)).min(Duration::from_secs(1));
        assert!(*gap >= min, "gap {i} is {gap:?} < {min:?}: {gaps:?}");
    }
    // In 3 s of 503s that is 3 to 5 attempts (10 with `Retry-After: 0` taken literally).
    let refused = attempts.len() - 1;
    assert!((3..=5).contains(&refused), "{refused} attempts: {gaps:?}");
    let m = metrics_of(&s).await;
    let series = |s: &str| metric(&m, s);
    assert_eq!(
        series("txn_sidecar_delivery_attempts_total{result=\"retryable\"}"),
        Some(refused as f64),
        "{m}"
    );
    assert_eq!(
        series("txn_sidecar_transactions_total{outcome=\"delivered\"}"),
        Some(1.0)
    );
    assert_eq!(
        series("txn_sidecar_transactions_total{outcome=\"dead_lettered\"}"),
        Some(0.0)
    );
    assert_eq!(kafka.end_offset(DLQ, 0), 0, "zero dead letters");
    let k = &kafka;
    wait_until(WAIT, "offset committed past the transaction", || {
        k.committed("test-group", T, 0).0 == Some(2)
    })
    .await;
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_never_shortens_the_backoff_and_the_transaction_is_delivered_once() {
    a_retry_after_that_asks_for_no_wait_waits_the_backoff("0".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_in_the_past_never_shortens_the_backoff_either() {
    let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    a_retry_after_that_asks_for_no_wait_waits_the_backoff(past).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_remaining_budget_ends_the_retries_at_once() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule(
        "long",
        Answer {
            status: 503,
            delay: Duration::ZERO,
            retry_after: Some("60".into()),
        },
    );
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("retry.max_elapsed", "10s")],
    ))
    .await
    .unwrap();
    kafka.task(T, 0, "long", "1"); // 0
    kafka.commit(T, 0, "long"); // 1
    kafka.task(T, 0, "next", "2"); // 2
    kafka.commit(T, 0, "next"); // 3
    let got = app.wait_accepted(1, WAIT).await;
    assert_eq!(app.accepted_ids(), ["next"]);
    let long: Vec<Got> = app
        .attempts()
        .into_iter()
        .filter(|g| g.id() == "long")
        .collect();
    assert_eq!(long.len(), 1, "one attempt, no sleep past the budget");
    // Dead-lettered at its first answer: "next" followed at once, not after 10 or 60 s.
    let after = got[0].at - long[0].at;
    assert!(after < Duration::from_secs(2), "{after:?}");
    let k = &kafka;
    wait_until(WAIT, "offset past both transactions", || {
        k.committed("test-group", T, 0).0 == Some(4)
    })
    .await;
    let dlq = kafka.read_all(DLQ, 0, 2);
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    for r in &dlq {
        assert_eq!(r.headers["txn-dlq-reason"], "retries_exhausted");
        assert_eq!(r.headers["txn-dlq-attempts"], "1");
        assert_eq!(r.headers["txn-dlq-source"], "orders.tx/0/1");
        let e = &r.headers["txn-dlq-error"];
        assert!(
            e.starts_with("app answered 503; Retry-After 60s is longer than the ")
                && e.ends_with("s left of retry.max_elapsed"),
            "{e}"
        );
    }
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_dead_letters_total{reason=\"retries_exhausted\"}"
        ),
        Some(1.0),
        "{m}"
    );
    s.shutdown();
    s.wait().await.unwrap();
}

/// An app that can stop listening (its listener and every connection closed, so
/// connects are refused) and listen again on the same port.
struct AbsentApp {
    addr: SocketAddr,
    /// (transaction id, Idempotency-Key) of every request, in arrival order.
    got: Arc<Mutex<Vec<(String, String)>>>,
    server: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl AbsentApp {
    async fn start(port: u16) -> AbsentApp {
        let mut app = AbsentApp {
            addr: ([127, 0, 0, 1], port).into(),
            got: Arc::default(),
            server: None,
        };
        app.listen().await;
        app
    }

    fn url(&self) -> String {
        format!("http://{}/transactions", self.addr)
    }

    fn ids(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.0.clone())
            .collect()
    }

    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let got = self.got.clone();
        let router = axum::Router::new().route(
            "/transactions",
            post(move |headers: HeaderMap, body: Bytes| {
                let got = got.clone();
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    got.lock()
                        .unwrap()
                        .push((v["id"].as_str().unwrap().to_string(), key));
                    "ok"
                }
            })
            .get(|| async { "ok" }),
        );
        let stop = CancellationToken::new();
        let until = stop.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
                .unwrap();
        });
        self.server = Some((stop, server));
    }

    /// Closes the listener and every connection (graceful: nothing is in flight).
    async fn close(&mut self) {
        let (stop, server) = self.server.take().expect("listening");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the app closes its connections")
            .unwrap();
    }
}

/// The readiness answer, parsed.
async fn readyz(a: SocketAddr) -> (u16, serde_json::Value) {
    let (code, body) = admin_get(a, "/readyz").await;
    (code, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_app_spends_no_budget_and_every_transaction_is_delivered_once_afterwards() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let mut app = AbsentApp::start(free_port()).await;
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("retry.max_attempts", "3"),
            ("limits.max_queued_per_partition", "2"),
        ],
    ))
    .await
    .unwrap();
    let a = s.admin_addr();
    let series = |m: &str, s: &str| metric(m, s);
    kafka.task(T, 0, "before", "1");
    kafka.commit(T, 0, "before");
    let got = app.got.clone();
    wait_until(WAIT, "the first delivery", || {
        got.lock().unwrap().len() == 1
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics_of(&s).await;
        if readyz(a).await.0 == 200 && series(&m, "txn_sidecar_app_up") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The app goes away for 8 s (a rollout of its container) while 5 transactions arrive.
    app.close().await;
    let back_at = Instant::now() + Duration::from_secs(8);
    for i in 0..5 {
        kafka.task(T, 0, &format!("t{i}"), "1");
        kafka.commit(T, 0, &format!("t{i}"));
    }
    kafka.flush();
    // Seen while it is away: app_up 0, /readyz 503 naming the app, the partition paused
    // by back-pressure (5 transactions, a queue of 2), and no dead letter.
    let (mut saw_down, mut saw_unready, mut saw_paused) = (false, false, false);
    let mut unready_body = serde_json::Value::Null;
    while !(saw_down && saw_unready && saw_paused) {
        assert!(
            Instant::now() < back_at,
            "within the outage: app_up 0 {saw_down}, /readyz 503 {saw_unready}, paused {saw_paused}"
        );
        let m = metrics_of(&s).await;
        saw_down |= series(&m, "txn_sidecar_app_up") == Some(0.0);
        saw_paused |= series(&m, "txn_sidecar_paused_partitions") == Some(1.0);
        let (code, v) = readyz(a).await;
        if code == 503 {
            saw_unready = true;
            unready_body = v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unready_body["ready"], false);
    assert_eq!(unready_body["joined"], true);
    assert_eq!(unready_body["app_reachable"], false);
    let reasons = unready_body["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{unready_body}");
    assert_eq!(reasons[0]["reason"], "app_unreachable");
    let detail = reasons[0]["detail"].as_str().unwrap();
    assert!(detail.contains(&app.url()), "{detail}");
    tokio::time::sleep_until(back_at.into()).await;
    let m = metrics_of(&s).await;
    assert_eq!(series(&m, "txn_sidecar_app_up"), Some(0.0), "{m}");
    assert!(
        series(&m, "txn_sidecar_app_connect_failures_total").unwrap() > 3.0,
        "more failed connects than the budget's 3 attempts: {m}"
    );
    assert_eq!(
        series(
            &m,
            "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}"
        ),
        Some(0.0)
    );
    assert_eq!(app.ids(), ["before"]);

    // Back on the same port.
    app.listen().await;
    let got = app.got.clone();
    wait_until(WAIT, "every transaction delivered", || {
        got.lock().unwrap().len() >= 6
    })
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics_of(&s).await;
        let (code, v) = readyz(a).await;
        if code == 200 && series(&m, "txn_sidecar_app_up") == Some(1.0) {
            assert_eq!(v["reasons"], serde_json::json!([]));
            break;
        }
        assert!(Instant::now() < deadline, "not ready again: {v} {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let k = &kafka;
    let end = kafka.end_offset(T, 0);
    wait_until(WAIT, "offset at the end of the log", || {
        k.committed("test-group", T, 0).0 == Some(end)
    })
    .await;
    // Exactly once each, in order, one request per transaction.
    assert_eq!(app.ids(), ["before", "t0", "t1", "t2", "t3", "t4"]);
    let keys: Vec<String> = app
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|g| g.1.clone())
        .collect();
    assert_eq!(
        keys,
        (0..6)
            .map(|i| format!("orders.tx/0/{}", 2 * i + 1))
            .collect::<Vec<_>>()
    );
    let m = metrics_of(&s).await;
    for (s, v) in [
        ("txn_sidecar_transactions_total{outcome=\"delivered\"}", 6.0),
        (
            "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}",
            0.0,
        ),
        (
            "txn_sidecar_delivery_attempts_total{result=\"success\"}",
            6.0,
        ),
        (
            "txn_sidecar_delivery_attempts_total{result=\"retryable\"}",
            0.0,
        ),
        ("txn_sidecar_paused_partitions", 0.0),
    ] {
        assert_eq!(series(&m, s), Some(v), "{s}: {m}");
    }
    assert_eq!(kafka.end_offset(DLQ, 0), 0, "zero dead letters");
    s.shutdown();
    s.wait().await.unwrap();
}
