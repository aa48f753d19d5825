//! "Never partial" against hostile input and time, end to end on librdkafka's mock
//! cluster: binary bytes are data, a dead transaction's later records follow it, the expiry
//! clock cannot be fooled by statistics, timestamps or pauses, and replayed dead letters
//! carry one set of `txn-dlq-*` headers.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `txn-dlq-*` headers of a dead-letter record, in record order.
fn dlq_headers(r: &ReadRecord) -> Vec<(String, String)> {
    r.header_list
        .iter()
        .filter(|(k, _)| k.starts_with("txn-dlq-"))
        .map(|(k, v)| {
            (
                k.clone(),
                String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned(),
            )
        })
        .collect()
}

async fn committed_reaches(kafka: &Kafka, offset: i64) {
    wait_until(WAIT, &format!("committed offset {offset}"), || {
        kafka.committed("test-group", T, 0).0 == Some(offset)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_header_value_is_data_and_the_transaction_arrives_whole() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let amqp: &[u8] = &[0xA1, 0x03, 0x61, 0x62, 0x63];
    kafka.task(T, 0, "o-1", r#"{"step":1}"#);
    kafka.send(
        T,
        0,
        Some(&[0xff, 0x00, 0xfe]),
        &[("txn-id", b"o-1"), ("txn-type", b"task"), ("x-amqp", amqp)],
        Some(br#"{"step":2}"#),
    );
    kafka.task(T, 0, "o-1", r#"{"step":3}"#);
    kafka.commit(T, 0, "o-1");
    let got = app.wait_accepted(1, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["o-1"]);
    assert_eq!(
        got[0].task_values(),
        vec![json!({"step":1}), json!({"step":2}), json!({"step":3})]
    );
    assert_eq!(got[0].task_offsets(), vec![0, 1, 2]);
    let middle = &got[0].body["tasks"][1];
    assert_eq!(middle["headers"]["x-amqp"], "oQNhYmM=");
    assert_eq!(middle["base64_headers"], json!(["x-amqp"]));
    assert_eq!(middle["key"], "/wD+");
    assert_eq!(middle["key_encoding"], "base64");
    committed_reaches(&kafka, 4).await;
    assert_eq!(kafka.end_offset(DLQ, 0), 0, "nothing was dead-lettered");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_after_an_expiry_follow_their_transaction_to_the_dead_letter_topic() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("txn_timeout", "2s")],
    ))
    .await
    .unwrap();
    kafka.task(T, 0, "slow", r#"{"n":1}"#); // 0
    kafka.flush();
    let k = &kafka;
    wait_until(WAIT, "the expired task in the dead-letter topic", || {
        k.end_offset(DLQ, 0) == 1
    })
    .await;
    kafka.task(T, 0, "slow", r#"{"n":2}"#); // 1
    kafka.commit(T, 0, "slow"); // 2
    kafka.task(T, 0, "ok", "1"); // 3
    kafka.commit(T, 0, "ok"); // 4
    app.wait_accepted(1, WAIT).await;
    committed_reaches(&kafka, 5).await;
    assert_eq!(
        app.accepted_ids(),
        vec!["ok"],
        "no part of slow reaches the app"
    );
    assert_eq!(app.attempts().len(), 1);
    let dlq = kafka.read_all(DLQ, 0, 3);
    assert_eq!(
        dlq.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
        vec![Some(r#"{"n":1}"#.into()), Some(r#"{"n":2}"#.into()), None]
    );
    for r in &dlq {
        assert_eq!(r.headers["txn-dlq-reason"], "expired", "{r:?}");
        assert_eq!(r.headers["txn-dlq-source"], "orders.tx/0/0", "one source");
        assert_eq!(r.headers["txn-id"], "slow");
    }
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_an_operator_dead_letter_dead_when_another_transaction_holds_the_offset() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let extra = [("admin.token", "s3cret")];
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &extra))
        .await
        .unwrap();
    kafka.task(T, 0, "dead", r#"{"n":1}"#); // 0
    kafka.task(T, 0, "hold", r#"{"h":1}"#); // 1: stays open across the restart
    kafka.flush();
    let url = format!("http://{}/v1/transactions/dead-letter", s.admin_addr());
    let c = reqwest::Client::new();
    let body = json!({"topic": T, "partition": 0, "id": "dead"});
    let mut accepted = false;
    for _ in 0..100 {
        let r = c
            .post(&url)
            .bearer_auth("s3cret")
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 202 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "operator dead-letter accepted");
    // The offset passes the dead transaction's head (its id travels in the metadata) and
    // stops at the open one.
    committed_reaches(&kafka, 1).await;
    let (_, metadata) = kafka.committed("test-group", T, 0);
    assert!(metadata.contains(",dead"), "{metadata}");
    s.shutdown();
    s.wait().await.unwrap();

    kafka.task(T, 0, "dead", r#"{"n":2}"#); // 2
    kafka.commit(T, 0, "dead"); // 3
    kafka.commit(T, 0, "hold"); // 4
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &extra))
        .await
        .unwrap();
    let got = app.wait_accepted(1, WAIT).await;
    committed_reaches(&kafka, 5).await;
    assert_eq!(app.accepted_ids(), vec!["hold"]);
    assert_eq!(got[0].task_offsets(), vec![1]);
    let dlq = kafka.read_all(DLQ, 0, 3);
    assert_eq!(
        dlq.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
        vec![Some(r#"{"n":1}"#.into()), Some(r#"{"n":2}"#.into()), None]
    );
    for r in &dlq {
        assert_eq!(r.headers["txn-dlq-reason"], "operator", "{r:?}");
        assert_eq!(r.headers["txn-dlq-source"], "orders.tx/0/0");
    }
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_needs_no_statistics_and_ignores_record_timestamps() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("txn_timeout", "2s"), ("kafka.statistics.interval.ms", "0")],
    ))
    .await
    .unwrap();
    let day = 86_400_000;
    let future = Some(now_ms() + day);
    let past = Some(now_ms() - 400 * day);
    let task = |id: &str, v: &str, ts| {
        kafka.send_at(
            T,
            0,
            Some(id.as_bytes()),
            &[("txn-id", id.as_bytes()), ("txn-type", b"task")],
            Some(v.as_bytes()),
            ts,
        )
    };
    let commit = |id: &str, ts| {
        kafka.send_at(
            T,
            0,
            Some(id.as_bytes()),
            &[("txn-id", id.as_bytes()), ("txn-type", b"commit")],
            None,
            ts,
        )
    };
    // An orphan on an idle partition, with statistics off.
    task("lost", "1", None); // 0
    kafka.flush();
    let k = &kafka;
    wait_until(WAIT, "the orphan expired", || k.end_offset(DLQ, 0) == 1).await;
    committed_reaches(&kafka, 1).await;
    // Healthy transactions whose timestamps lie a day ahead and 400 days behind.
    task("past", "p1", past); // 1
    task("future", "f1", future); // 2
    task("past", "p2", past); // 3
    commit("future", future); // 4
    commit("past", Some(now_ms())); // 5
    app.wait_accepted(2, WAIT).await;
    committed_reaches(&kafka, 6).await;
    let got = app.accepted();
    assert_eq!(app.accepted_ids(), vec!["future", "past"]);
    assert_eq!(got[0].task_offsets(), vec![2]);
    assert_eq!(got[1].task_offsets(), vec![1, 3]);
    assert_eq!(kafka.end_offset(DLQ, 0), 1, "only the orphan expired");
    let dlq = kafka.read_all(DLQ, 0, 1);
    assert_eq!(dlq[0].headers["txn-dlq-reason"], "expired");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_does_not_expire_a_transaction_whose_marker_waits_behind_the_pause() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.set_default(Some(Answer {
        status: 200,
        delay: Duration::from_millis(1200),
        retry_after: None,
    }));
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[
            ("txn_timeout", "2s"),
            ("limits.max_queued_per_partition", "1"),
        ],
    ))
    .await
    .unwrap();
    kafka.task(T, 0, "a1", "1"); // 0
    kafka.task(T, 0, "p", "p"); // 1: opens; its marker is far behind the pauses
    kafka.commit(T, 0, "a1"); // 2: queue full, pause
    for i in 2..=4 {
        kafka.task(T, 0, &format!("a{i}"), "1");
        kafka.commit(T, 0, &format!("a{i}"));
    }
    kafka.commit(T, 0, "p"); // 9
    let got = app.wait_accepted(5, Duration::from_secs(60)).await;
    assert_eq!(app.accepted_ids(), vec!["a1", "a2", "a3", "a4", "p"]);
    assert_eq!(got[4].task_offsets(), vec![1]);
    committed_reaches(&kafka, 10).await;
    assert_eq!(kafka.end_offset(DLQ, 0), 0, "nothing expired");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_that_fails_again_carries_one_set_of_dead_letter_headers() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule("replayed", Answer::status(400));
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    // Re-produced from the dead-letter topic: the earlier failure's headers come along.
    let old: [(&str, &[u8]); 4] = [
        ("txn-dlq-reason", b"retries_exhausted"),
        ("txn-dlq-error", b"app answered 503"),
        ("txn-dlq-source", b"orders.tx/0/77"),
        ("txn-dlq-attempts", b"10"),
    ];
    let mut task_h: Vec<(&str, &[u8])> = vec![("txn-id", b"replayed-1"), ("txn-type", b"task")];
    task_h.extend(old);
    let mut commit_h: Vec<(&str, &[u8])> = vec![("txn-id", b"replayed-1"), ("txn-type", b"commit")];
    commit_h.extend(old);
    kafka.send(T, 0, Some(b"replayed-1"), &task_h, Some(b"{\"v\":1}")); // 0
    kafka.send(T, 0, Some(b"replayed-1"), &commit_h, None); // 1
    let k = &kafka;
    wait_until(WAIT, "the dead letter written", || {
        k.end_offset(DLQ, 0) == 2
    })
    .await;
    committed_reaches(&kafka, 2).await;
    let attempts = app.attempts();
    assert_eq!(attempts.len(), 1);
    let headers = &attempts[0].body["tasks"][0]["headers"];
    assert_eq!(headers, &json!({}), "no txn-dlq-* header reaches the app");
    let dlq = kafka.read_all(DLQ, 0, 2);
    for r in &dlq {
        assert_eq!(
            dlq_headers(r)
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| *k != "txn-dlq-timestamp")
                .collect::<Vec<_>>(),
            vec![
                "txn-dlq-reason",
                "txn-dlq-error",
                "txn-dlq-source",
                "txn-dlq-attempts"
            ],
            "exactly one set: {r:?}"
        );
        assert_eq!(r.headers["txn-dlq-reason"], "rejected");
        assert_eq!(r.headers["txn-dlq-source"], "orders.tx/0/1");
        assert_eq!(r.headers["txn-dlq-attempts"], "1");
    }
    s.shutdown();
    s.wait().await.unwrap();
}
