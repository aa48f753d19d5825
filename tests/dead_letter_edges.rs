//! Dead-letter writes at their edges: a batch the broker refuses, a write waiting for
//! metadata when the process is told to stop.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";

/// A broker that refuses one dead-letter produce request as too large (a DLQ topic whose
/// `max.message.bytes` is below the batch librdkafka built) refuses the whole batch. The
/// policy is that a record that *cannot* be written becomes a stub; here every record of
/// the transaction, each a few bytes, and its commit marker, lose their payloads and
/// keys for good, although each fits on its own. The dead letter can no longer be
/// replayed (no marker headers survive), which is the dead-letter topic's whole purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_does_not_turn_records_that_fit_into_stubs() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    app.rule("bad", Answer::status(400));
    kafka.task(T, 0, "bad", "{\"small\":1}"); // 0
    kafka.task(T, 0, "bad", "{\"small\":2}"); // 1
    kafka.commit(T, 0, "bad"); // 2
    kafka.flush();
    // The next produce request (the dead-letter write) is refused as too large once.
    kafka.mock().cluster().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let k = &kafka;
    wait_until(
        Duration::from_secs(30),
        "offset past the dead letter",
        || k.committed("test-group", T, 0).0 == Some(3),
    )
    .await;
    let dlq = kafka.read_all(DLQ, 0, 3);
    let stubs: Vec<i64> = dlq
        .iter()
        .filter(|r| r.headers.contains_key("txn-dlq-original-size"))
        .map(|r| r.offset)
        .collect();
    let summary: Vec<String> = dlq
        .iter()
        .map(|r| {
            format!(
                "dlq offset {}: key {:?} value {:?} txn-type {:?} stub of {:?}",
                r.offset,
                r.key,
                r.value,
                r.headers.get("txn-type"),
                r.headers.get("txn-dlq-original-offset")
            )
        })
        .collect();
    s.shutdown();
    s.wait().await.unwrap();
    assert!(
        stubs.is_empty(),
        "records of a few bytes were written as payload-less stubs: {summary:#?}"
    );
    assert_eq!(dlq.len(), 3, "{summary:#?}");
    assert_eq!(
        dlq[2].headers.get("txn-type").map(String::as_str),
        Some("commit")
    );
}

/// The binary's shape (`main`): `block_on(run(..))`, then the runtime is dropped, which
/// waits for every `spawn_blocking` task. A dead-letter write to a topic whose partition
/// count is not cached yet runs `fetch_metadata` (10 s timeout) on a blocking thread; with
/// the broker unreachable, SIGTERM returns from `Sidecar::wait` inside the grace but the
/// process then hangs in the runtime's drop until that metadata call gives up.
#[test]
fn the_process_exits_within_the_grace_while_a_dead_letter_write_waits_for_metadata() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let (sigterm_at, wait_took) = rt.block_on(async {
        let app = RecordingApp::start().await;
        app.rule(
            "bad",
            Answer {
                status: 400,
                delay: Duration::from_millis(1500),
                retry_after: None,
            },
        );
        let s = txn_sidecar::start(config(
            &kafka.brokers,
            T,
            &app.url(),
            &[("shutdown_grace", "2s")],
        ))
        .await
        .unwrap();
        kafka.task(T, 0, "bad", "1");
        kafka.commit(T, 0, "bad");
        kafka.flush();
        let a = app.clone();
        wait_until(
            Duration::from_secs(30),
            "the app got the request",
            move || !a.attempts().is_empty(),
        )
        .await;
        // The broker goes away while the app takes its time to reject.
        kafka.mock().cluster().broker_down(1).unwrap();
        // The 400 arrives; the dead-letter write starts and looks up its topic.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let at = Instant::now();
        s.shutdown();
        let _ = s.wait().await;
        (at, at.elapsed())
    });
    // As `main` does after the drain.
    txn_sidecar::shutdown::release_runtime(rt);
    let took = sigterm_at.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "exit took {took:?} after SIGTERM (Sidecar::wait returned after {wait_took:?}); \
         shutdown_grace is 2 s"
    );
}
