//! Interoperability with third-party producers: kcat (librdkafka's CLI) and our own
//! `txn-sidecar produce`, including input that would crash a naive consumer.
//!
//! The `produce` test runs on the broker `TXN_SIDECAR_TEST_BROKER` selects (`mock`, the
//! default, or `tansu`); the kcat tests stay on the mock: Debian's kcat 1.7 (librdkafka
//! 2.0.2) cannot talk to tansu (its ApiVersion request fails with "Read underflow").

mod common;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_txn-sidecar");

fn kcat(brokers: &str, args: Vec<OsString>, stdin: &str) {
    let mut child = Command::new("kcat")
        .args(["-P", "-b", brokers, "-t", T, "-p", "0", "-Z"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat is installed by scripts/install-test-deps.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_produced_with_kcat_is_delivered() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let b = kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        kcat(
            &b,
            os(&[
                "-k",
                "order-7",
                "-H",
                "txn-id=order-7",
                "-H",
                "txn-type=task",
                "-H",
                "source=kcat",
            ]),
            "{\"step\":1}\n{\"step\":2}\n",
        );
        kcat(
            &b,
            os(&[
                "-k",
                "order-7",
                "-H",
                "txn-id=order-7",
                "-H",
                "txn-type=commit",
                "-H",
                "txn-count=2",
            ]),
            "commit\n",
        );
    })
    .await
    .unwrap();
    let got = app.wait_accepted(1, WAIT).await;
    assert_eq!(got[0].id(), "order-7");
    assert_eq!(
        got[0].task_values(),
        vec![json!({"step": 1}), json!({"step": 2})]
    );
    assert_eq!(
        got[0].body["tasks"][0]["headers"],
        json!({"source": "kcat"})
    );
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_data_delivered_losslessly() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let s = txn_sidecar::start(config(&kafka.brokers, T, &app.url(), &[]))
        .await
        .unwrap();
    let b = kafka.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let mut args = os(&["-k", "x", "-H", "txn-type=task", "-H"]);
        args.push(OsString::from_vec(b"\xff\xfe=v".to_vec()));
        kcat(&b, args, "1\n");
    })
    .await
    .unwrap();
    kafka.commit(T, 0, "x");
    kafka.task(T, 0, "after", "1");
    kafka.commit(T, 0, "after");
    let got = app.wait_accepted(2, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["x", "after"]);
    let task = &got[0].body["tasks"][0];
    assert_eq!(
        task["header_list"],
        json!([{"name": "//4=", "name_encoding": "base64", "value": "v"}])
    );
    assert_eq!(task["headers"], json!({}));
    assert_eq!(kafka.end_offset(DLQ, 0), 0, "nothing dead-lettered");
    s.shutdown();
    s.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_written_by_txn_sidecar_produce_are_delivered_with_both_protocols() {
    for (protocol, id) in [("headers", "p-1"), ("key-prefix", "p-2")] {
        let kafka = Kafka::start_selected(&[(T, 3), (DLQ, 3)]);
        let app = RecordingApp::start().await;
        let s = txn_sidecar::start(config(
            &kafka.brokers,
            T,
            &app.url(),
            &[("protocol", protocol)],
        ))
        .await
        .unwrap();
        let mut child = Command::new(BIN)
            .args([
                "produce",
                "--brokers",
                &kafka.brokers,
                "--topic",
                T,
                "--id",
                id,
                "--protocol",
                protocol,
            ])
            .args(["--task", "{\"a\":1}", "--file", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"second\n{\"c\":3}\n")
            .unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = app.wait_accepted(1, WAIT).await;
        assert_eq!(got[0].id(), id);
        assert_eq!(
            got[0].task_values(),
            vec![json!({"a": 1}), json!("second"), json!({"c": 3})]
        );
        s.shutdown();
        s.wait().await.unwrap();
    }
}

#[test]
fn produce_rejects_bad_arguments_with_a_clear_error() {
    let out = Command::new(BIN)
        .args([
            "produce",
            "--topic",
            T,
            "--id",
            "x",
            "--protocol",
            "carrier-pigeon",
            "--task",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--protocol"));
    let out = Command::new(BIN)
        .args(["produce", "--topic", T, "--id", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tasks"));
}
