//! Rebalances: members joining and leaving mid-stream never cause partial, lost or
//! duplicate deliveries (graceful handoffs carry the skip set in the commit metadata).
//! Each scenario runs under both group protocols: classic (cooperative-sticky) and
//! KIP-848 (`group.protocol=consumer`, broker-side assignment).
//!
//! The classic runs of the first scenario use the broker `TXN_SIDECAR_TEST_BROKER` selects
//! (`mock`, the default, or `tansu`). tansu drops offset-commit metadata, so there
//! duplicates are allowed (and printed); lost, partial and wrong transactions fail on both.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;

const T: &str = "orders.tx";

/// Offset commits of `s` the coordinator accepted (`ok`) or refused (`error`).
fn commits(m: &txn_sidecar::telemetry::Metrics, result: &'static str) -> u64 {
    m.offset_commits
        .get_or_create(&txn_sidecar::telemetry::ResultLabel { result })
        .get()
}

/// Whether duplicates are excused: only when the coordinator refused the commit that
/// hands the partitions over (`refused`). librdkafka's mock does so when a follower's
/// SyncGroup reaches it after the leader's: its group is UP as soon as the leader has
/// brought every member's assignment, it answers the late SyncGroup with
/// INVALID_REQUEST, and that member's rejoin refuses the leaving member's commit
/// (docs/benchmarks-history.md, change 11; Apache Kafka answers such a SyncGroup with the
/// assignment). Lost, partial and wrong transactions fail either way.
fn check_handoff(kafka: &Kafka, duplicates: usize, after: &str, refused: bool) {
    if refused && kafka.kind() == BrokerKind::Mock {
        println!(
            "{duplicates} duplicate(s) after {after}: the coordinator refused the handoff commit"
        );
        return;
    }
    check_duplicates(kafka, duplicates, after);
}

fn produce_batch(kafka: &Kafka, from: usize, to: usize) {
    for i in from..to {
        let id = format!("tx-{i}");
        let p = (i % 3) as i32;
        for k in 0..3 {
            kafka.task(T, p, &id, &format!("{{\"txn\":{i},\"task\":{k}}}"));
        }
        kafka.commit(T, p, &id);
    }
    kafka.flush();
}

/// Waits until transactions `tx-0` .. `tx-{n-1}` have all arrived (a duplicate counts
/// once), or `timeout`; the checks that follow say what is missing.
async fn wait_transactions(app: &RecordingApp, n: usize, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ids: std::collections::HashSet<String> =
            app.accepted().iter().map(|g| g.id().to_string()).collect();
        if (0..n).all(|i| ids.contains(&format!("tx-{i}"))) || std::time::Instant::now() >= deadline
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_whole(app: &RecordingApp, n: usize) -> usize {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for g in app.accepted() {
        let id = g.id().to_string();
        let i: usize = id.trim_start_matches("tx-").parse().unwrap();
        let expect: Vec<serde_json::Value> = (0..3)
            .map(|k| serde_json::json!({"txn": i, "task": k}))
            .collect();
        assert_eq!(g.task_values(), expect, "partial or wrong transaction {id}");
        *seen.entry(id).or_default() += 1;
    }
    for i in 0..n {
        assert!(seen.contains_key(&format!("tx-{i}")), "tx-{i} lost");
    }
    seen.values().map(|c| c - 1).sum()
}

/// Zero duplicates on a broker that keeps commit metadata; on one that drops it (tansu)
/// the skip set does not survive a handoff and duplicates are allowed.
fn check_duplicates(kafka: &Kafka, duplicates: usize, after: &str) {
    if kafka.kind().keeps_commit_metadata() {
        assert_eq!(duplicates, 0, "duplicates after {after}");
    } else {
        println!(
            "{duplicates} duplicate(s) after {after} on {} (allowed: commit metadata is dropped)",
            kafka.kind().name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave_mid_stream_without_partial_lost_or_duplicate_transactions() {
    join_and_leave(GroupProtocol::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_members_join_and_leave_mid_stream_without_partial_lost_or_duplicate_transactions() {
    join_and_leave(GroupProtocol::Consumer).await;
}

async fn join_and_leave(protocol: GroupProtocol) {
    // KIP-848 runs on librdkafka's mock cluster only (tansu speaks the classic protocol).
    let topics = [(T, 3), ("orders.tx.dlq", 3)];
    let kafka = match protocol {
        GroupProtocol::Classic => Kafka::start_selected(&topics),
        GroupProtocol::Consumer => Kafka::start(&topics),
    };
    let app = RecordingApp::start().await;
    let cfg = || config_with(protocol, &kafka.brokers, T, &app.url(), &[]);
    let s1 = txn_sidecar::start(cfg()).await.unwrap();
    produce_batch(&kafka, 0, 60);
    wait_transactions(&app, 20, Duration::from_secs(30)).await;
    // A second member joins while transactions flow.
    let s2 = txn_sidecar::start(cfg()).await.unwrap();
    produce_batch(&kafka, 60, 120);
    let a2 = s2.admin_addr();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let (_, body) = admin_get(a2, "/v1/partitions").await;
        let parts: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        if !parts.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "second member never got a partition"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce_batch(&kafka, 120, 180);
    wait_transactions(&app, 180, Duration::from_secs(60)).await;
    // Until it leaves, the first member's only synchronous commits are its revokes'.
    let m1 = s1.metrics().clone();
    let refused = commits(&m1, "error") > 0;
    check_handoff(
        &kafka,
        check_whole(&app, 180),
        "a graceful handoff",
        refused,
    );

    // The first member leaves gracefully; the second takes everything over.
    let (ok, err) = (commits(&m1, "ok"), commits(&m1, "error"));
    s1.shutdown();
    s1.wait().await.unwrap();
    let refused = refused || (commits(&m1, "error") > err && commits(&m1, "ok") == ok);
    produce_batch(&kafka, 180, 240);
    wait_transactions(&app, 240, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    check_handoff(&kafka, check_whole(&app, 240), "a graceful leave", refused);
    let (_, m) = admin_get(a2, "/metrics").await;
    assert!(
        metric(&m, "txn_sidecar_rebalances_total{kind=\"assign\"}").unwrap() >= 2.0,
        "{m}"
    );
    s2.shutdown();
    s2.wait().await.unwrap();
}

/// A member stopped while the group rebalances: the coordinator refuses its final commit
/// (librdkafka's mock refuses all commits while a join is pending, for up to
/// `session.timeout.ms − 1 s`; Apache Kafka refuses them in CompletingRebalance). The member
/// serves the rebalance, commits under the new generation and only then leaves, so the
/// next owner does not redeliver what it already delivered.
///
/// Mock only. On tansu 0.6.0 this scenario leaves the group stuck about every other run:
/// when the leader leaves between its JoinGroup response and its SyncGroup, tansu keeps
/// naming the departed member as leader of every later generation (JoinGroup answers
/// the remaining member with that LeaderId and no member metadata), so the remaining
/// member's SyncGroup fails with REBALANCE_IN_PROGRESS every 5 s and it never gets a
/// partition, long past `session.timeout.ms`. (tansu also accepts commits during the
/// rebalance, so there the member leaves at once instead of serving it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_during_a_rebalance_commits_before_it_leaves() {
    stopped_during_a_rebalance(GroupProtocol::Classic).await;
}

/// Under KIP-848 the member learns of the new assignment at its next heartbeat and
/// revokes (committing) before it acknowledges; a stop inside that window must still
/// leave nothing for the next owner to redeliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_a_member_stopped_during_a_rebalance_commits_before_it_leaves() {
    stopped_during_a_rebalance(GroupProtocol::Consumer).await;
}

async fn stopped_during_a_rebalance(protocol: GroupProtocol) {
    let kafka = Kafka::start(&[(T, 3), ("orders.tx.dlq", 3)]);
    let app = RecordingApp::start().await;
    let cfg = || config_with(protocol, &kafka.brokers, T, &app.url(), &[]);
    let s1 = txn_sidecar::start(cfg()).await.unwrap();
    produce_batch(&kafka, 0, 30);
    wait_transactions(&app, 30, Duration::from_secs(30)).await;
    // Let the first member's commits of those land while the group is stable.
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A second member joins: the group now waits ~5 s for everyone to rejoin, and the
    // first member keeps delivering meanwhile, but none of its commits is accepted.
    let s2 = txn_sidecar::start(cfg()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    produce_batch(&kafka, 30, 60);
    wait_transactions(&app, 60, Duration::from_secs(30)).await;
    assert!(
        app.accepted()
            .iter()
            .all(|g| g.idempotency_key.starts_with(T)),
        "every delivery carries the stable key"
    );
    // Stop the first member inside that window.
    let stop = std::time::Instant::now();
    let m1 = s1.metrics().clone();
    let ok = commits(&m1, "ok");
    s1.shutdown();
    s1.wait().await.unwrap();
    let took = stop.elapsed();
    // Its final commit is refused at first by design; it must land after the member has
    // served the rebalance, unless the coordinator refused every one of them.
    let refused = commits(&m1, "ok") == ok;
    // The second member now owns everything: it must find nothing left to deliver.
    produce_batch(&kafka, 60, 90);
    wait_transactions(&app, 90, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    check_handoff(
        &kafka,
        check_whole(&app, 90),
        &format!("a stop during a rebalance (stop took {took:?})"),
        refused,
    );
    s2.shutdown();
    s2.wait().await.unwrap();
}
