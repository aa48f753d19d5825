//! Liveness: nothing stalls silently. A partition paused by back-pressure that moves away
//! and comes back is fetched again; SIGTERM handling keeps its deadline against a
//! coordinator that does not answer.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";

fn produce(kafka: &Kafka, partition: i32, from: usize, to: usize) {
    for i in from..to {
        let id = format!("p{partition}-{i}");
        kafka.task(T, partition, &id, &format!("{{\"i\":{i}}}"));
        kafka.task(T, partition, &id, &format!("{{\"i\":{i},\"second\":true}}"));
        kafka.commit(T, partition, &id);
    }
    kafka.flush();
}

async fn partitions_of(s: &txn_sidecar::Sidecar) -> Vec<i64> {
    let (_, body) = admin_get(s.admin_addr(), "/v1/partitions").await;
    let parts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
    parts
        .iter()
        .filter_map(|p| p["partition"].as_i64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partition_that_moves_away_and_comes_back_is_fetched_again() {
    pause_survives(GroupProtocol::Classic, None).await;
}

/// The same with an eager strategy: every partition is revoked and assigned again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_a_paused_partition_that_moves_away_and_comes_back_is_fetched_again() {
    pause_survives(GroupProtocol::Classic, Some("range")).await;
}

/// The same under KIP-848 (broker-side assignment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_a_paused_partition_that_moves_away_and_comes_back_is_fetched_again() {
    pause_survives(GroupProtocol::Consumer, None).await;
}

async fn pause_survives(protocol: GroupProtocol, strategy: Option<&str>) {
    let kafka = Kafka::start(&[(T, 2), (DLQ, 2)]);
    let app = RecordingApp::start().await;
    app.set_default(Some(Answer {
        status: 200,
        delay: Duration::from_millis(250),
        retry_after: None,
    }));
    let mut extra = vec![("limits.max_queued_per_partition", "4")];
    if let Some(s) = strategy {
        extra.push(("kafka.partition.assignment.strategy", s));
    }
    let cfg = || config_with(protocol, &kafka.brokers, T, &app.url(), &extra);
    let s1 = txn_sidecar::start(cfg()).await.unwrap();
    let m1 = s1.metrics().clone();
    produce(&kafka, 0, 0, 30);
    produce(&kafka, 1, 0, 30);
    // Back-pressure pauses both partitions on the first member.
    let a1 = s1.admin_addr();
    wait_until(Duration::from_secs(30), "both partitions paused", || {
        let rt = tokio::runtime::Handle::current();
        let body = std::thread::scope(|sc| {
            sc.spawn(|| rt.block_on(admin_get(a1, "/v1/partitions")).1)
                .join()
                .unwrap()
        });
        let parts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        parts.len() == 2 && parts.iter().all(|p| p["paused"] == true)
    })
    .await;
    // A second member joins: one partition moves to it, paused where it left.
    let s2 = txn_sidecar::start(cfg()).await.unwrap();
    let m2 = s2.metrics().clone();
    let deadline = Instant::now() + Duration::from_secs(40);
    while partitions_of(&s2).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the second member never got a partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    // It leaves: the partition comes back to the first member.
    s2.shutdown();
    s2.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    while partitions_of(&s1).await.len() < 2 {
        assert!(Instant::now() < deadline, "the partition never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Everything produced afterwards to either partition is delivered too.
    produce(&kafka, 0, 30, 40);
    produce(&kafka, 1, 30, 40);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ids: std::collections::HashSet<String> = app.accepted_ids().into_iter().collect();
        if ids.len() == 80 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 80 transactions delivered; missing: {:?}",
            ids.len(),
            (0..2)
                .flat_map(|p| (0..40).map(move |i| format!("p{p}-{i}")))
                .filter(|id| !ids.contains(id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Whole, in order per partition (first deliveries), never duplicated by the graceful
    // handoffs. Under an eager strategy every partition is revoked while the group
    // rebalances, when librdkafka's mock coordinator refuses commits (Apache Kafka takes
    // them from the current generation): redeliveries are allowed there, and counted.
    // Under the cooperative strategy only when the coordinator refused a commit: the
    // mock does when a follower's SyncGroup reaches it after the leader's (see
    // tests/rebalance.rs, `check_handoff`).
    let refused = [&m1, &m2].iter().any(|m| {
        m.offset_commits
            .get_or_create(&txn_sidecar::telemetry::ResultLabel { result: "error" })
            .get()
            > 0
    });
    // Per partition the deliveries must read as runs of consecutive transactions, each
    // run starting at or before the one after the previous delivery: a redelivery is a
    // replay from an earlier committed offset, never a gap, a lone repeat in the middle
    // or a partial transaction.
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut replays = 0;
    let mut duplicates = 0;
    let mut seen = std::collections::HashSet::new();
    for g in app.accepted() {
        let id = g.id().to_string();
        let (p, i) = id.split_once('-').unwrap();
        let i: i64 = i.parse().unwrap();
        assert_eq!(
            g.task_values(),
            vec![
                serde_json::json!({"i": i}),
                serde_json::json!({"i": i, "second": true})
            ],
            "{id} partial"
        );
        let prev = last.insert(p.to_string(), i).unwrap_or(-1);
        assert!(
            i <= prev + 1,
            "{id} after {p}-{prev}: a transaction skipped"
        );
        if i <= prev {
            // A replay starts here; the runs that follow must be consecutive again.
            assert!(
                strategy.is_some() || refused,
                "{id} delivered again after {p}-{prev}, and no commit was refused"
            );
            replays += 1;
        }
        if !seen.insert(id) {
            duplicates += 1;
        }
    }
    if duplicates > 0 {
        println!("{duplicates} redelivered in {replays} replays under {strategy:?} (a commit refused during the rebalance: {refused})");
    }
    s1.shutdown();
    s1.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_its_deadline_when_the_coordinator_does_not_answer() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(
        &kafka.brokers,
        T,
        &app.url(),
        &[("shutdown_grace", "3s")],
    ))
    .await
    .unwrap();
    kafka.task(T, 0, "open", "1");
    kafka.task(T, 0, "a", "1");
    kafka.commit(T, 0, "a");
    app.wait_accepted(1, Duration::from_secs(30)).await;
    // Every request to the only broker (the group coordinator) now takes a minute.
    kafka
        .mock()
        .cluster()
        .broker_round_trip_time(1, Duration::from_secs(60))
        .unwrap();
    let started = Instant::now();
    s.shutdown();
    s.wait().await.unwrap();
    let took = started.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "shutdown took {took:?}, more than shutdown_grace (3 s) + 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_to_write_becomes_a_stub_and_releases_the_offset() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule("big", Answer::status(400));
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let value = "x".repeat(995_000);
    kafka.task(T, 0, "big", &value); // 0: its dead-letter copy (plus headers) cannot fit
    kafka.commit(T, 0, "big"); // 1
    kafka.task(T, 0, "ok", "1"); // 2
    kafka.commit(T, 0, "ok"); // 3
    app.wait_accepted(1, Duration::from_secs(30)).await;
    assert_eq!(app.accepted_ids(), vec!["ok"]);
    let k = &kafka;
    wait_until(
        Duration::from_secs(30),
        "offset past the dead letter",
        || k.committed("test-group", T, 0).0 == Some(4),
    )
    .await;
    let dlq = kafka.read_all(DLQ, 0, 2);
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    let stub = &dlq[0];
    assert_eq!(stub.value, None, "the stub carries no payload");
    assert_eq!(stub.key, None);
    assert_eq!(stub.headers["txn-dlq-reason"], "rejected");
    assert_eq!(stub.headers["txn-dlq-source"], "orders.tx/0/1");
    assert_eq!(stub.headers["txn-dlq-original-offset"], "0");
    assert_eq!(stub.headers["txn-dlq-txn-id"], "big");
    let size: u64 = stub.headers["txn-dlq-original-size"].parse().unwrap();
    assert!(size >= 995_000, "{size}");
    // The marker is small: written as it was.
    assert_eq!(dlq[1].headers["txn-id"], "big");
    assert_eq!(dlq[1].headers["txn-type"], "commit");
    let m = admin_get(s.admin_addr(), "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_transactions_total{outcome=\"dead_lettered\"}"
        ),
        Some(1.0),
        "{m}"
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_refuses_writes_is_counted_and_shows_in_offset_held() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule("bad", Answer::status(400));
    kafka
        .mock()
        .cluster()
        .topic_error(
            DLQ,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    kafka.task(T, 0, "bad", "1");
    kafka.commit(T, 0, "bad");
    kafka.task(T, 0, "ok", "1");
    kafka.commit(T, 0, "ok");
    app.wait_accepted(1, Duration::from_secs(30)).await;
    let addr = s.admin_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = admin_get(addr, "/metrics").await.1;
        let errors: f64 = m
            .lines()
            .filter(|l| l.starts_with("txn_sidecar_dead_letter_write_errors_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let held = metric(
            &m,
            "txn_sidecar_offset_held_seconds{topic=\"orders.tx\",partition=\"0\"}",
        )
        .unwrap_or(0.0);
        if errors >= 1.0 && held >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "errors {errors}, held {held}: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kafka.committed("test-group", T, 0).0.unwrap_or(0), 0);
    // Fixed by an operator: the write goes through and the offset moves on.
    kafka
        .mock()
        .cluster()
        .topic_error(
            DLQ,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        )
        .unwrap();
    let k = &kafka;
    wait_until(
        Duration::from_secs(30),
        "offset past the dead letter",
        || k.committed("test-group", T, 0).0 == Some(4),
    )
    .await;
    s.shutdown();
    s.wait().await.unwrap();
}
