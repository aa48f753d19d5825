//! A slow, down or wrong app and garbage from producers: the line keeps moving and
//! nothing is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::RDKafkaRespErr;
use serde_json::json;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);

async fn metrics_of(s: &txn_sidecar::Sidecar) -> String {
    admin_get(s.admin_addr(), "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_answers_are_retried_with_one_idempotency_key_and_retry_after_is_honoured() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.script(vec![
        Answer {
            status: 503,
            delay: Duration::ZERO,
            retry_after: Some("1".into()),
        },
        Answer::status(503),
    ]);
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    kafka.task(T, 0, "a", "1");
    kafka.commit(T, 0, "a");
    app.wait_accepted(1, WAIT).await;
    let attempts = app.attempts();
    assert_eq!(attempts.len(), 3);
    assert!(attempts
        .iter()
        .all(|g| g.idempotency_key == "orders.tx/0/1"));
    let gap = attempts[1].at - attempts[0].at;
    // Retry-After: 1 beats the 20 ms backoff; allow scheduling slack.
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_millis(1800),
        "{gap:?}"
    );
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_delivery_attempts_total{result=\"retryable\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_delivery_attempts_total{result=\"success\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "txn_sidecar_transactions_total{outcome=\"delivered\"}"),
        Some(1.0)
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_transaction_is_dead_lettered_whole_and_the_partition_moves_on() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule("bad", Answer::status(400));
    // The DLQ topic is unavailable at first: the offset must wait for the DLQ write.
    kafka
        .mock()
        .cluster()
        .topic_error(DLQ, RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
        .unwrap();
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    kafka.send(
        T,
        0,
        Some(b"bad"),
        &[("txn-id", b"bad"), ("txn-type", b"task"), ("x", b"1")],
        Some(b"{\"v\":1}"),
    ); // 0
    kafka.task(T, 0, "bad", "2"); // 1
    kafka.commit(T, 0, "bad"); // 2
    kafka.task(T, 0, "good", "3"); // 3
    kafka.commit(T, 0, "good"); // 4
    app.wait_accepted(1, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["good"]);
    // "good" is delivered, but the offset stays at "bad" while its DLQ write fails.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(kafka.committed("test-group", T, 0).0.unwrap_or(0), 0);
    kafka
        .mock()
        .cluster()
        .topic_error(DLQ, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    let k = &kafka;
    wait_until(WAIT, "offset past the dead-lettered transaction", || {
        k.committed("test-group", T, 0).0 == Some(5)
    })
    .await;
    let dlq = kafka.read_all(DLQ, 0, 3);
    assert_eq!(dlq.len(), 3, "{dlq:?}");
    assert_eq!(
        dlq.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
        vec![Some("{\"v\":1}".into()), Some("2".into()), None]
    );
    assert_eq!(dlq[0].headers["x"], "1", "original headers kept");
    assert_eq!(
        dlq[2].headers["txn-type"], "commit",
        "marker follows the tasks"
    );
    for r in &dlq {
        assert_eq!(r.headers["txn-dlq-reason"], "rejected");
        assert_eq!(r.headers["txn-dlq-source"], "orders.tx/0/2");
        assert_eq!(r.headers["txn-dlq-attempts"], "1");
        assert!(
            r.headers["txn-dlq-error"].contains("400"),
            "{:?}",
            r.headers
        );
    }
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(&m, "txn_sidecar_dead_letters_total{reason=\"rejected\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}"
        ),
        Some(1.0)
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_holds_one_partition_in_order_while_others_flow() {
    let kafka = Kafka::start(&[(T, 2), (DLQ, 2)]);
    let app = RecordingApp::start().await;
    app.rule("p0-", Answer::status(500));
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("on_failure", "block"), ("retry.max_attempts", "2")],
    ))
    .await
    .unwrap();
    for i in 0..3 {
        kafka.task(T, 0, &format!("p0-{i}"), "1");
        kafka.commit(T, 0, &format!("p0-{i}"));
        kafka.task(T, 1, &format!("p1-{i}"), "1");
        kafka.commit(T, 1, &format!("p1-{i}"));
    }
    app.wait_accepted(3, WAIT).await;
    let a = app.clone();
    // Partition 0 keeps retrying its first transaction, past the attempt budget.
    wait_until(WAIT, "p0 retried beyond the budget", || {
        a.attempts().iter().filter(|g| g.id() == "p0-0").count() >= 5
    })
    .await;
    assert_eq!(app.accepted_ids(), vec!["p1-0", "p1-1", "p1-2"]);
    assert!(
        app.attempts().iter().all(|g| g.id() != "p0-1"),
        "p0-1 must wait behind p0-0"
    );
    app.clear_rules();
    app.wait_accepted(6, WAIT).await;
    let p0: Vec<String> = app
        .accepted_ids()
        .into_iter()
        .filter(|i| i.starts_with("p0"))
        .collect();
    assert_eq!(p0, vec!["p0-0", "p0-1", "p0-2"]);
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_dead_letters_total{reason=\"retries_exhausted\"}"
        ),
        None,
        "{m}"
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_transaction_expires_into_the_dlq_and_releases_the_offset() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("txn_timeout", "2s"),
            ("kafka.statistics.interval.ms", "200"),
        ],
    );
    let s = txn_sidecar::start(cfg).await.unwrap();
    kafka.task(T, 0, "orphan", "1"); // 0, never committed
    kafka.task(T, 0, "ok", "2"); // 1
    kafka.commit(T, 0, "ok"); // 2
    app.wait_accepted(1, WAIT).await;
    let k = &kafka;
    wait_until(WAIT, "offset released by the expiry", || {
        k.committed("test-group", T, 0).0 == Some(3)
    })
    .await;
    let dlq = kafka.read_all(DLQ, 0, 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].headers["txn-dlq-reason"], "expired");
    assert_eq!(dlq[0].value.as_deref(), Some("1"));
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(&m, "txn_sidecar_transactions_total{outcome=\"expired\"}"),
        Some(1.0),
        "{m}"
    );
    // Its late commit follows it into the dead-letter topic, under the same reason and
    // source: the instance is dead-lettered whole, never delivered in part.
    kafka.commit(T, 0, "orphan");
    let k = &kafka;
    wait_until(WAIT, "late commit dead-lettered", || {
        k.read_all(DLQ, 0, 2).len() == 2
    })
    .await;
    let late = &kafka.read_all(DLQ, 0, 2)[1];
    assert_eq!(late.headers["txn-dlq-reason"], "expired");
    assert_eq!(late.headers["txn-dlq-source"], "orders.tx/0/0");
    assert_eq!(app.accepted_ids(), vec!["ok"]);
    s.shutdown();
    s.wait().await.unwrap();
}

/// Each bad input is dead-lettered with its reason and the next transaction still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_and_the_partition_keeps_flowing() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("limits.max_tasks_per_txn", "3"),
            ("limits.max_txn_bytes", "2000"),
        ],
    );
    let s = txn_sidecar::start(cfg).await.unwrap();
    let mut expected_reasons = Vec::new();
    let mut n = 0;
    let mut next_ok = |kafka: &Kafka| {
        n += 1;
        let id = format!("ok-{n}");
        kafka.task(T, 0, &id, "1");
        kafka.commit(T, 0, &id);
    };
    // Missing txn-type.
    kafka.send(T, 0, Some(b"k"), &[("txn-id", b"x")], Some(b"1"));
    expected_reasons.push("missing_type");
    next_ok(&kafka);
    // Unknown txn-type (another id: x's later records follow its dead instance).
    kafka.send(
        T,
        0,
        Some(b"k"),
        &[("txn-id", b"y"), ("txn-type", b"prepare")],
        Some(b"1"),
    );
    expected_reasons.push("unknown_type");
    next_ok(&kafka);
    // No id at all.
    kafka.send(T, 0, None, &[("txn-type", b"task")], Some(b"1"));
    expected_reasons.push("missing_id");
    next_ok(&kafka);
    // Commit with no staged tasks.
    kafka.commit(T, 0, "ghost");
    expected_reasons.push("empty_commit");
    next_ok(&kafka);
    // Count mismatch: 2 tasks, commit says 3 (3 records dead-lettered).
    kafka.task(T, 0, "short", "1");
    kafka.task(T, 0, "short", "2");
    kafka.send(
        T,
        0,
        Some(b"short"),
        &[
            ("txn-id", b"short"),
            ("txn-type", b"commit"),
            ("txn-count", b"3"),
        ],
        None,
    );
    expected_reasons.extend(["count_mismatch"; 3]);
    next_ok(&kafka);
    // A second commit for a transaction already delivered.
    kafka.commit(T, 0, "ok-1");
    expected_reasons.push("duplicate_commit");
    next_ok(&kafka);
    // Too many tasks (limit 3): all 4 tasks and the marker go to the DLQ, nothing partial.
    for i in 0..4 {
        kafka.task(T, 0, "big", &i.to_string());
    }
    kafka.commit(T, 0, "big");
    expected_reasons.extend(["too_large"; 5]);
    next_ok(&kafka);
    // One oversized record (limit 2000 bytes).
    kafka.task(T, 0, "huge", &"x".repeat(5000));
    kafka.commit(T, 0, "huge");
    expected_reasons.extend(["too_large"; 2]);
    next_ok(&kafka);
    // A key that carries the id, and a marker header, that are not UTF-8 (any other
    // bytes are data).
    kafka.send(
        T,
        0,
        Some(&[0xff, 0xfe]),
        &[("txn-type", b"task")],
        Some(b"1"),
    );
    expected_reasons.push("not_utf8");
    next_ok(&kafka);
    kafka.send(
        T,
        0,
        Some(b"k"),
        &[("txn-id", b"k"), ("txn-type", &[0xc3, 0x28])],
        Some(b"1"),
    );
    expected_reasons.push("not_utf8");
    next_ok(&kafka);
    // Invalid txn-count.
    kafka.send(
        T,
        0,
        Some(b"k2"),
        &[
            ("txn-id", b"k2"),
            ("txn-type", b"commit"),
            ("txn-count", b"many"),
        ],
        None,
    );
    expected_reasons.push("invalid_count");
    next_ok(&kafka);

    app.wait_accepted(11, WAIT).await;
    let ids = app.accepted_ids();
    assert_eq!(ids, (1..=11).map(|i| format!("ok-{i}")).collect::<Vec<_>>());
    let dlq = kafka.read_all(DLQ, 0, expected_reasons.len());
    let reasons: Vec<&str> = dlq
        .iter()
        .map(|r| r.headers["txn-dlq-reason"].as_str())
        .collect();
    assert_eq!(reasons, expected_reasons);
    // Everything settled: the offset passes all of it.
    let total = kafka.read_all(T, 0, 1000).len() as i64;
    let k = &kafka;
    wait_until(WAIT, "offset at the end", || {
        k.committed("test-group", T, 0).0 == Some(total)
    })
    .await;
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(&m, "txn_sidecar_records_consumed_total{kind=\"invalid\"}"),
        Some(6.0),
        "{m}"
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_slower_than_max_poll_interval_causes_no_rebalance() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    // Every delivery takes 2.5 s; six of them take far longer than max.poll.interval.ms.
    app.set_default(Some(Answer {
        status: 200,
        delay: Duration::from_millis(2500),
        retry_after: None,
    }));
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("kafka.max.poll.interval.ms", "7000"),
            // A revoke may take rebalance_grace + 5 s, which must fit the interval.
            ("rebalance_grace", "2s"),
            ("limits.max_queued_per_partition", "2"),
        ],
    );
    let s = txn_sidecar::start(cfg).await.unwrap();
    for i in 0..6 {
        kafka.task(T, 0, &format!("slow-{i}"), "1");
        kafka.commit(T, 0, &format!("slow-{i}"));
    }
    kafka.flush();
    let a = s.admin_addr();
    let deadline = Instant::now() + WAIT;
    // Back-pressure pauses the partition rather than stalling the poll loop.
    loop {
        let m = admin_get(a, "/metrics").await.1;
        if metric(&m, "txn_sidecar_paused_partitions") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "never paused: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.wait_accepted(6, Duration::from_secs(40)).await;
    assert_eq!(
        app.accepted_ids(),
        (0..6).map(|i| format!("slow-{i}")).collect::<Vec<_>>()
    );
    let m = metrics_of(&s).await;
    assert_eq!(
        metric(&m, "txn_sidecar_rebalances_total{kind=\"assign\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "txn_sidecar_rebalances_total{kind=\"revoke\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(app.attempts().len(), 6, "no redelivery");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_the_queue_is_delivered_once_in_order_through_pauses() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.set_default(Some(Answer {
        status: 200,
        delay: Duration::from_millis(10),
        retry_after: None,
    }));
    // The backlog is in the log before the sidecar starts, as after a restart.
    let n = 80;
    for i in 0..n {
        kafka.task(T, 0, &format!("b-{i}"), "1");
        kafka.commit(T, 0, &format!("b-{i}"));
    }
    kafka.flush();
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("limits.max_queued_per_partition", "10")],
    );
    let s = txn_sidecar::start(cfg).await.unwrap();
    app.wait_accepted(n, WAIT).await;
    assert_eq!(
        app.accepted_ids(),
        (0..n).map(|i| format!("b-{i}")).collect::<Vec<_>>()
    );
    assert_eq!(app.attempts().len(), n, "no redelivery");
    let m = metrics_of(&s).await;
    let pauses = metric(&m, "txn_sidecar_partition_pauses_total").unwrap();
    // Paused at least once, and each pause lasts until 5 of the 10 are delivered (the
    // rule itself is unit-tested in `pipeline`).
    assert!(
        (1.0..=(n / 5) as f64 + 1.0).contains(&pauses),
        "{pauses} pauses for {n} transactions"
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_survived_without_loss() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    kafka.task(T, 0, "before", "1");
    kafka.commit(T, 0, "before");
    kafka.task(T, 0, "across", "1");
    app.wait_accepted(1, WAIT).await;
    // The outage may cost the group membership; what was committed is not redelivered.
    let k = &kafka;
    wait_until(WAIT, "first commit", || {
        k.committed("test-group", T, 0).0 == Some(2)
    })
    .await;
    kafka.mock().cluster().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.mock().cluster().broker_up(1).unwrap();
    kafka.task(T, 0, "across", "2");
    kafka.commit(T, 0, "across");
    kafka.task(T, 0, "after", "1");
    kafka.commit(T, 0, "after");
    let got = app.wait_accepted(3, Duration::from_secs(60)).await;
    assert_eq!(app.accepted_ids(), vec!["before", "across", "after"]);
    assert_eq!(got[1].task_values(), vec![json!(1), json!(2)]);
    let k = &kafka;
    wait_until(WAIT, "offsets committed after the outage", || {
        k.committed("test-group", T, 0).0 == Some(7)
    })
    .await;
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_staged_bytes_budget_only_the_oldest_transactions_partition_keeps_reading() {
    let kafka = Kafka::start(&[(T, 2), (DLQ, 2)]);
    let app = RecordingApp::start().await;
    let cfg = config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("limits.max_staged_bytes", "4000"),
            ("limits.max_txn_bytes", "3000"),
        ],
    );
    let s = txn_sidecar::start(cfg).await.unwrap();
    let a = s.admin_addr();
    let kb = "x".repeat(1000);
    kafka.task(T, 0, "head", &kb);
    kafka.task(T, 0, "head", &kb);
    kafka.flush();
    let deadline = Instant::now() + WAIT;
    while !admin_get(a, "/v1/transactions")
        .await
        .1
        .contains("\"head\"")
    {
        assert!(Instant::now() < deadline, "head never staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kafka.task(T, 1, "other", &"y".repeat(2500));
    kafka.flush();
    // The head's partition keeps reading; the other one pauses (the admin snapshot is
    // published a few times a second, so poll it).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, parts) = admin_get(a, "/v1/partitions").await;
        let parts: Vec<serde_json::Value> = serde_json::from_str(&parts).unwrap();
        if parts.len() == 2 && parts[1]["paused"] == json!(true) {
            assert_eq!(
                parts[0]["paused"],
                json!(false),
                "the head's partition must keep reading"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never paused: {parts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = admin_get(a, "/metrics").await.1;
    assert_eq!(
        metric(&m, "txn_sidecar_paused_partitions"),
        Some(1.0),
        "{m}"
    );
    kafka.commit(T, 1, "other");
    kafka.flush();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(app.accepted().is_empty(), "partition 1 is paused");
    kafka.commit(T, 0, "head");
    app.wait_accepted(2, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["head", "other"]);
    s.shutdown();
    s.wait().await.unwrap();
}

/// Headers of every hostile shape, read from the broker by the sidecar's own header
/// reader (`crates/txn-sidecar-ffi`), reach the app exactly: a repeated marker header
/// (the first decides), an empty name, a null value next to an empty one, NUL bytes in a
/// value, a repeated name, and hundreds of headers on one record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_headers_reach_the_app_exactly_and_the_first_marker_header_decides() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let many: Vec<String> = (0..300).map(|i| format!("n{i:03}")).collect();
    let mut headers: Vec<(&str, Option<&[u8]>)> = vec![
        ("txn-id", Some(b"h".as_slice())),
        ("txn-type", Some(b"task".as_slice())),
        // Repeated marker headers: the first of each decides; none reaches the app.
        ("txn-id", Some(b"other".as_slice())),
        ("txn-type", Some(b"commit".as_slice())),
        ("", Some(b"empty name".as_slice())),
        ("nul", Some(b"a\0b".as_slice())),
        ("null", None),
        ("empty", Some(b"".as_slice())),
        ("dup", Some(b"1".as_slice())),
        ("dup", Some(b"2".as_slice())),
    ];
    for n in &many {
        headers.push((n.as_str(), Some(b"v".as_slice())));
    }
    kafka.send_raw(T, 0, &headers, Some(br#"{"task":1}"#));
    kafka.commit(T, 0, "h");
    kafka.flush();
    app.wait_accepted(1, Duration::from_secs(30)).await;
    let got = app.accepted();
    assert_eq!(got.len(), 1, "{got:?}");
    let g = &got[0];
    assert_eq!(g.id(), "h");
    let tasks = g.body["tasks"].as_array().unwrap();
    assert_eq!(
        tasks.len(),
        1,
        "the repeated txn-type must not end the transaction"
    );
    let t = &tasks[0];
    // The object: sorted by name, the last of a repeated name wins.
    let h = t["headers"].as_object().unwrap();
    assert_eq!(h.len(), 5 + many.len(), "{h:?}");
    assert_eq!(h[""], "empty name");
    assert_eq!(h["nul"], "a\u{0}b");
    assert_eq!(h["null"], serde_json::Value::Null);
    assert_eq!(h["empty"], "");
    assert_eq!(h["dup"], "2");
    assert!(many.iter().all(|n| h[n.as_str()] == "v"));
    assert!(!h.contains_key("txn-id") && !h.contains_key("txn-type"));
    // The list: every non-marker header in record order, because a name repeats.
    let list: Vec<(String, serde_json::Value)> = t["header_list"]
        .as_array()
        .expect("header_list, since a name repeats")
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e["value"].clone()))
        .collect();
    let mut expected: Vec<(String, serde_json::Value)> = vec![
        ("".into(), "empty name".into()),
        ("nul".into(), "a\u{0}b".into()),
        ("null".into(), serde_json::Value::Null),
        ("empty".into(), "".into()),
        ("dup".into(), "1".into()),
        ("dup".into(), "2".into()),
    ];
    expected.extend(many.iter().map(|n| (n.clone(), "v".into())));
    assert_eq!(list, expected);
    let m = metrics_of(&s).await;
    assert!(
        !m.lines()
            .any(|l| l.starts_with("txn_sidecar_dead_letters_total{") && !l.ends_with(" 0")),
        "nothing may be dead-lettered: {m}"
    );
    assert_eq!(
        metric(&m, "txn_sidecar_records_consumed_total{kind=\"invalid\"}").unwrap_or(0.0),
        0.0
    );
    s.shutdown();
    s.wait().await.unwrap();
}
