//! The core pipeline against a real Kafka wire protocol and a real HTTP app.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: &str = "orders.tx";
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_transactions_arrive_whole_in_commit_order_and_aborts_never() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let sidecar = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();

    kafka.task(T, 0, "a", r#"{"n":"a1"}"#); // 0
    kafka.task(T, 0, "b", r#"{"n":"b1"}"#); // 1
    kafka.task(T, 0, "c", r#"{"n":"c1"}"#); // 2
    kafka.task(T, 0, "a", r#"{"n":"a2"}"#); // 3
    kafka.commit(T, 0, "b"); // 4
    kafka.abort(T, 0, "c"); // 5
    kafka.task(T, 0, "c", r#"{"n":"c-new"}"#); // 6: id reused after abort
    kafka.commit(T, 0, "a"); // 7
    kafka.commit(T, 0, "c"); // 8

    let got = app.wait_accepted(3, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["b", "a", "c"]);
    assert_eq!(got[0].task_values(), vec![json!({"n": "b1"})]);
    assert_eq!(
        got[1].task_values(),
        vec![json!({"n": "a1"}), json!({"n": "a2"})]
    );
    assert_eq!(got[1].task_offsets(), vec![0, 3]);
    assert_eq!(
        got[2].task_values(),
        vec![json!({"n": "c-new"})],
        "aborted tasks must not reappear"
    );
    assert_eq!(got[1].idempotency_key, "orders.tx/0/7");
    assert_eq!(got[1].txn_id_header, "a");
    assert_eq!(got[1].body["topic"], "orders.tx");
    assert_eq!(got[1].body["partition"], 0);
    assert_eq!(got[1].body["commit_offset"], 7);
    // Marker headers are not repeated in task headers.
    assert_eq!(got[1].body["tasks"][0]["headers"], json!({}));
    assert_eq!(got[1].body["tasks"][0]["key"], "a");

    // Nothing else arrives (no duplicates, nothing from the abort).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.attempts().len(), 3);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
    // After a graceful stop everything is committed.
    assert_eq!(kafka.committed("test-group", T, 0).0, Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefix_protocol_delivers_and_clears() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let cfg = config(&kafka.brokers, T, &app.url(), &[("protocol", "key-prefix")]);
    let sidecar = txn_sidecar::start(cfg).await.unwrap();
    let send = |key: &str, value: Option<&str>| {
        kafka.send(
            T,
            0,
            Some(key.as_bytes()),
            &[("trace", b"t")],
            value.map(str::as_bytes),
        )
    };
    send("task-x", Some("1"));
    send("task-y", Some("\"y1\""));
    send("task-x", Some("2"));
    send("clear-y", None);
    send("commit-x", None);
    send("task-y", Some("\"y2\""));
    send("commit-y", None);
    let got = app.wait_accepted(2, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["x", "y"]);
    assert_eq!(got[0].task_values(), vec![json!(1), json!(2)]);
    assert_eq!(got[0].body["tasks"][0]["key"], "task-x");
    assert_eq!(got[0].body["tasks"][0]["headers"], json!({"trace": "t"}));
    assert_eq!(got[1].task_values(), vec![json!("y2")]);
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_embedded_as_json_text_or_base64() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let sidecar = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let h: &[(&str, &[u8])] = &[
        ("txn-id", b"v"),
        ("txn-type", b"task"),
        ("content-type", b"x"),
    ];
    kafka.send(T, 0, None, h, Some(br#"{"a":[1,2,{"b":null}]}"#));
    kafka.send(T, 0, None, h, Some(b"hello world"));
    kafka.send(T, 0, None, h, Some(&[0xde, 0xad, 0xbe, 0xef]));
    kafka.send(T, 0, None, h, None);
    kafka.send(
        T,
        0,
        None,
        &[
            ("txn-id", b"v"),
            ("txn-type", b"commit"),
            ("txn-count", b"4"),
        ],
        None,
    );
    let got = app.wait_accepted(1, WAIT).await;
    let tasks = got[0].body["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks[0]["value"], json!({"a": [1, 2, {"b": null}]}));
    assert!(tasks[0].get("encoding").is_none());
    assert_eq!(tasks[1]["value"], json!("hello world"));
    assert_eq!(tasks[2]["value"], json!("3q2+7w=="));
    assert_eq!(tasks[2]["encoding"], json!("base64"));
    assert_eq!(tasks[3]["value"], json!(null));
    assert_eq!(tasks[0]["key"], json!(null));
    assert_eq!(tasks[0]["headers"], json!({"content-type": "x"}));
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offset_stays_at_the_oldest_open_transaction() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let sidecar = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    kafka.task(T, 0, "open", "1"); // 0: stays open
    kafka.task(T, 0, "b", "1"); // 1
    kafka.commit(T, 0, "b"); // 2
    kafka.task(T, 0, "c", "1"); // 3
    kafka.commit(T, 0, "c"); // 4
    app.wait_accepted(2, WAIT).await;
    // Deliveries happened, but the offset must not pass "open"'s first task; the
    // delivered markers above it travel in the metadata.
    let k = &kafka;
    wait_until(WAIT, "commit with skip set", || {
        k.committed("test-group", T, 0) == (Some(0), "txs2:0:2,2".to_string())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(kafka.committed("test-group", T, 0).0, Some(0));
    kafka.commit(T, 0, "open"); // 5
    app.wait_accepted(3, WAIT).await;
    wait_until(WAIT, "offset past everything", || {
        k.committed("test-group", T, 0).0 == Some(6)
    })
    .await;
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_redeliver_what_was_delivered_above_the_committed_offset() {
    let kafka = Kafka::start(&[(T, 1), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let cfg = || config(&kafka.brokers, T, &app.url(), &[]);
    let s1 = txn_sidecar::start(cfg()).await.unwrap();
    kafka.task(T, 0, "open", "1");
    kafka.task(T, 0, "b", "1");
    kafka.commit(T, 0, "b");
    app.wait_accepted(1, WAIT).await;
    s1.shutdown();
    s1.wait().await.unwrap();
    assert_eq!(
        kafka.committed("test-group", T, 0),
        (Some(0), "txs2:0:2".to_string())
    );
    let s2 = txn_sidecar::start(cfg()).await.unwrap();
    kafka.task(T, 0, "open", "2");
    kafka.commit(T, 0, "open");
    let got = app.wait_accepted(2, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["b", "open"]);
    assert_eq!(got[1].task_values(), vec![json!(1), json!(2)]);
    let text = admin_get(s2.admin_addr(), "/metrics").await.1;
    assert_eq!(
        metric(
            &text,
            "txn_sidecar_transactions_total{outcome=\"duplicate_skipped\"}"
        ),
        Some(1.0),
        "{text}"
    );
    s2.shutdown();
    s2.wait().await.unwrap();
}

/// With `reader_threads` set, partition queues are read on their own threads: every
/// partition's transactions still arrive whole, once, in commit order, and a graceful
/// stop commits every partition to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_threads_deliver_every_partition_whole_once_and_in_commit_order() {
    const P: i32 = 6;
    const PER: usize = 20;
    let kafka = Kafka::start(&[(T, P), ("orders.tx.dlq", 1)]);
    let app = RecordingApp::start().await;
    let sidecar = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("reader_threads", "2")],
    ))
    .await
    .unwrap();
    // Per partition: transactions interleaved in pairs, the second of each pair
    // committed first, so commit order differs from first-task order.
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); P as usize];
    for p in 0..P {
        for i in (0..PER).step_by(2) {
            let (a, b) = (format!("p{p}-t{i}"), format!("p{p}-t{}", i + 1));
            kafka.task(T, p, &a, &format!(r#"{{"id":"{a}","k":0}}"#));
            kafka.task(T, p, &b, &format!(r#"{{"id":"{b}","k":0}}"#));
            kafka.task(T, p, &a, &format!(r#"{{"id":"{a}","k":1}}"#));
            kafka.task(T, p, &b, &format!(r#"{{"id":"{b}","k":1}}"#));
            kafka.commit(T, p, &b);
            kafka.commit(T, p, &a);
            expected[p as usize].push(b);
            expected[p as usize].push(a);
        }
    }
    kafka.flush();
    let total = P as usize * PER;
    app.wait_accepted(total, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = app.accepted();
    assert_eq!(got.len(), total, "each transaction exactly once");
    let mut per_partition: Vec<Vec<String>> = vec![Vec::new(); P as usize];
    for g in &got {
        let id = g.id().to_string();
        assert_eq!(
            g.task_values(),
            vec![json!({"id": id, "k": 0}), json!({"id": id, "k": 1})],
            "whole and in task order: {id}"
        );
        let p = g.body["partition"].as_i64().unwrap() as usize;
        per_partition[p].push(id);
    }
    assert_eq!(
        per_partition, expected,
        "commit order within each partition"
    );
    sidecar.shutdown();
    sidecar.wait().await.unwrap();
    for p in 0..P {
        assert_eq!(
            kafka.committed("test-group", T, p).0,
            Some((PER * 3) as i64),
            "partition {p} committed to its end"
        );
    }
}
