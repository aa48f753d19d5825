//! Expiry end to end on librdkafka's mock cluster when fetches fail.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);

/// Guarantee 8 / README "The expiry clock": a lagging partition must not expire a
/// transaction whose marker is already in the log. `at_end` (librdkafka's partition EOF)
/// is cleared only by the next consumed record, so a consumer that stops receiving
/// records (fetches failing: leader moves, a network partition between the sidecar and the
/// brokers, a slow broker) still counts as caught up, and expires transactions whose
/// commit markers the producers have already written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_fetches_do_not_count_as_caught_up() {
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
    // Warm up: the group is joined once `w` is delivered.
    kafka.task(T, 0, "w", "1"); // 0
    kafka.commit(T, 0, "w"); // 1
    app.wait_accepted(1, WAIT).await;
    kafka.task(T, 0, "x", r#"{"n":1}"#); // 2
    kafka.flush();
    // Let the sidecar consume it and reach the end of the log.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // From now on the sidecar's fetches fail; the producer is unaffected.
    let errs = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 2000];
    kafka
        .mock()
        .cluster()
        .request_errors(RDKafkaApiKey::Fetch, &errs);
    kafka.commit(T, 0, "x"); // 3: the marker is in the log
    kafka.flush();
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!(
        "after 5 s of failing fetches: accepted {:?}, dlq {}",
        app.accepted_ids(),
        kafka.end_offset(DLQ, 0)
    );
    kafka
        .mock()
        .cluster()
        .clear_request_errors(RDKafkaApiKey::Fetch);
    let k = &kafka;
    let a = &app;
    wait_until(WAIT, "x delivered or dead-lettered", || {
        a.accepted().len() > 1 || k.end_offset(DLQ, 0) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.accepted_ids(),
        vec!["w", "x"],
        "x was committed by its producer within txn_timeout of being consumed; dead-letter topic holds {} records",
        kafka.end_offset(DLQ, 0)
    );
    assert_eq!(kafka.end_offset(DLQ, 0), 0);
    s.shutdown();
    s.wait().await.unwrap();
}
