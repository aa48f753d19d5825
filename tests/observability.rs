//! The operating surface: exact metrics after a scenario, a well-formed exposition,
//! readiness, the admin API and trace-context propagation.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "orders.tx";
const WAIT: Duration = Duration::from_secs(30);

/// Checks every line of a Prometheus text exposition and returns the metric families.
fn parse_exposition(text: &str) -> HashSet<String> {
    let mut families = HashSet::new();
    for line in text.lines() {
        if line.is_empty() || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            assert!(
                kind == "HELP" || kind == "TYPE" || kind == "UNIT",
                "bad comment line: {line}"
            );
            let name = parts.next().unwrap_or_default();
            assert!(
                name.starts_with("txn_sidecar_"),
                "unprefixed family: {line}"
            );
            if kind == "TYPE" {
                let t = parts.next().unwrap_or_default();
                assert!(
                    ["counter", "gauge", "histogram", "info", "unknown"].contains(&t),
                    "{line}"
                );
                families.insert(name.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
            "bad value: {line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels: {line}"
                );
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label pair in {line}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line}"
                    );
                    // Never an id, key or offset as a label.
                    assert!(
                        !["txn_id", "id", "key", "offset"].contains(&k),
                        "high-cardinality label in {line}"
                    );
                    let _ = v;
                }
            }
        }
    }
    families
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_yields_exact_counters_in_a_well_formed_exposition() {
    let kafka = Kafka::start(&[(T, 2), ("orders.tx.dlq", 2)]);
    let app = RecordingApp::start().await;
    app.rule("rejected", Answer::status(422));
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    // 3 delivered (2 + 1 + 3 tasks), 1 aborted, 1 rejected, 1 invalid record, 1 left open.
    kafka.task(T, 0, "d1", "1");
    kafka.task(T, 0, "d1", "2");
    kafka.commit(T, 0, "d1");
    kafka.task(T, 1, "d2", "1");
    kafka.commit(T, 1, "d2");
    kafka.task(T, 1, "ab", "1");
    kafka.abort(T, 1, "ab");
    kafka.task(T, 0, "rejected", "1");
    kafka.commit(T, 0, "rejected");
    kafka.send(T, 0, Some(b"x"), &[("txn-type", b"nonsense")], None);
    kafka.task(T, 0, "open", "1");
    for v in ["1", "2", "3"] {
        kafka.task(T, 1, "d3", v);
    }
    kafka.commit(T, 1, "d3");
    app.wait_accepted(3, WAIT).await;
    let a = s.admin_addr();
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let m = admin_get(a, "/metrics").await.1;
        if metric(
            &m,
            "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}",
        ) == Some(1.0)
            && metric(&m, "txn_sidecar_open_transactions") == Some(1.0)
        {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let families = parse_exposition(&text);
    let expect =
        |series: &str, v: f64| assert_eq!(metric(&text, series), Some(v), "{series} in\n{text}");
    expect("txn_sidecar_records_consumed_total{kind=\"task\"}", 9.0);
    expect("txn_sidecar_records_consumed_total{kind=\"commit\"}", 4.0);
    expect("txn_sidecar_records_consumed_total{kind=\"abort\"}", 1.0);
    expect("txn_sidecar_records_consumed_total{kind=\"invalid\"}", 1.0);
    expect("txn_sidecar_transactions_total{outcome=\"delivered\"}", 3.0);
    expect("txn_sidecar_transactions_total{outcome=\"aborted\"}", 1.0);
    expect(
        "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}",
        1.0,
    );
    expect("txn_sidecar_transactions_total{outcome=\"expired\"}", 0.0);
    expect("txn_sidecar_dead_letters_total{reason=\"rejected\"}", 1.0);
    expect(
        "txn_sidecar_dead_letters_total{reason=\"unknown_type\"}",
        1.0,
    );
    expect(
        "txn_sidecar_delivery_attempts_total{result=\"permanent\"}",
        1.0,
    );
    expect("txn_sidecar_transaction_tasks_count", 3.0);
    expect("txn_sidecar_transaction_tasks_sum", 6.0);
    expect("txn_sidecar_commit_to_delivery_seconds_count", 3.0);
    expect("txn_sidecar_open_transactions", 1.0);
    expect("txn_sidecar_assigned_partitions", 2.0);
    expect("txn_sidecar_build_info{version=\"0.1.0\"}", 1.0);
    for f in [
        "txn_sidecar_records_consumed",
        "txn_sidecar_transactions",
        "txn_sidecar_delivery_duration_seconds",
        "txn_sidecar_transaction_open_seconds",
        "txn_sidecar_rebalances",
        "txn_sidecar_paused_partitions",
        "txn_sidecar_partition_pauses",
        "txn_sidecar_staged_bytes",
        "txn_sidecar_commit_lag_records",
        "txn_sidecar_offset_commits",
    ] {
        assert!(families.contains(f), "{f} missing");
    }

    // The admin API shows the open transaction.
    // (The admin snapshot is published a few times a second.)
    let deadline = Instant::now() + WAIT;
    let (body, txns) = loop {
        let (code, body) = admin_get(a, "/v1/transactions").await;
        assert_eq!(code, 200);
        let txns: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        if (txns.len() == 1 && txns[0]["id"] == "open") || Instant::now() > deadline {
            break (body, txns);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(txns.len(), 1, "{body}");
    assert_eq!(txns[0]["id"], "open");
    assert_eq!(txns[0]["partition"], 0);
    assert_eq!(txns[0]["first_offset"], 6);
    assert_eq!(txns[0]["tasks"], 1);
    assert_eq!(
        txns[0]["bytes"],
        4 + 1 + (6 + 4) + (8 + 4),
        "key + value + marker headers"
    );
    let _ = body;
    let (_, body) = admin_get(a, "/v1/partitions").await;
    let parts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["partition"], 0);
    assert_eq!(parts[0]["open_transactions"], 1);
    assert_eq!(parts[0]["safe_offset"], 6, "{body}");
    assert_eq!(parts[0]["paused"], false);
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_once_the_group_is_joined_and_the_app_answers() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    // No app yet: a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/transactions");
    let s = txn_sidecar::start(config(&kafka.brokers, T, &url, &[]))
        .await
        .unwrap();
    let a = s.admin_addr();
    assert_eq!(admin_get(a, "/healthz").await.0, 200);
    let (code, body) = admin_get(a, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    // Joined, but the app is still down: not ready.
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = admin_get(a, "/readyz").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["joined"] == true {
            assert_eq!(code, 503);
            assert_eq!(v["app_reachable"], false);
            break;
        }
        assert!(Instant::now() < deadline, "never joined: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let router =
            axum::Router::new().route("/transactions", axum::routing::get(|| async { "ok" }));
        let _ = axum::serve(listener, router).await;
    });
    let (code, body) = admin_get(a, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_of_the_commit_record_reaches_the_app() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    kafka.task(T, 0, "t", "1");
    kafka.send(
        T,
        0,
        Some(b"t"),
        &[
            ("txn-id", b"t"),
            ("txn-type", b"commit"),
            ("traceparent", tp.as_bytes()),
        ],
        None,
    );
    kafka.task(T, 0, "u", "1");
    kafka.commit(T, 0, "u");
    let got = app.wait_accepted(2, WAIT).await;
    assert_eq!(got[0].traceparent.as_deref(), Some(tp));
    assert_eq!(got[1].traceparent, None);
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_endpoint_needs_the_token_and_releases_a_stuck_transaction() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("admin.token", "s3cret")],
    ))
    .await
    .unwrap();
    kafka.task(T, 0, "stuck", "1");
    kafka.task(T, 0, "ok", "1");
    kafka.commit(T, 0, "ok");
    app.wait_accepted(1, WAIT).await;
    let url = format!("http://{}/v1/transactions/dead-letter", s.admin_addr());
    let body = serde_json::json!({"topic": T, "partition": 0, "id": "stuck"});
    let c = reqwest::Client::new();
    let r = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(&url)
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = c
        .post(&url)
        .bearer_auth("s3cret")
        .json(&serde_json::json!({"topic": T, "partition": 0, "id": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = c
        .post(&url)
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let k = &kafka;
    wait_until(WAIT, "offset released", || {
        k.committed("test-group", T, 0).0 == Some(3)
    })
    .await;
    let dlq = kafka.read_all("orders.tx.dlq", 0, 1);
    assert_eq!(dlq[0].headers["txn-dlq-reason"], "operator");
    s.shutdown();
    s.wait().await.unwrap();

    // Without a configured token, mutating endpoints are off.
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let url = format!("http://{}/v1/transactions/dead-letter", s.admin_addr());
    let r = c
        .post(&url)
        .bearer_auth("")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    s.shutdown();
    s.wait().await.unwrap();
}
