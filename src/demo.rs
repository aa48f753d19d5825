//! `txn-sidecar demo`: an embedded Kafka, a sample app, the sidecar and a producer of
//! sample transactions in one process; prints what the app received and exits.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormat, Protocol, Sources};
use crate::embedded::{EmbeddedKafka, FAST_GROUP_PROPERTIES};
use crate::produce::{default_names, TaskRecord, TxnProducer};
use crate::sample_app::{self, Received};

/// Errors the demo can hit.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Kafka setup or producing failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Producing a transaction failed.
    #[error(transparent)]
    Produce(#[from] crate::produce::ProduceError),
    /// The sidecar failed.
    #[error(transparent)]
    Run(#[from] crate::RunError),
    /// The sample app could not bind.
    #[error("sample app: {0}")]
    Io(#[from] std::io::Error),
    /// Not everything arrived in time.
    #[error("timed out: the app received {got} of {want} transactions")]
    Timeout {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// The demo config is invalid (a bug).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Runs the demo, printing to stdout; returns the received transactions.
pub async fn run() -> Result<Vec<Received>, DemoError> {
    let kafka = EmbeddedKafka::start(1)?;
    let topic = "orders.tx";
    kafka.create_topic(topic, 3)?;
    kafka.create_topic("orders.tx.dlq", 3)?;
    let brokers = kafka.bootstrap_servers();
    println!(
        "embedded Kafka (librdkafka mock cluster) at {brokers}, topic {topic} with 3 partitions"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = listener.local_addr()?;
    let stop_app = CancellationToken::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let app_stop = stop_app.clone();
    tokio::spawn(async move { sample_app::serve(listener, "/transactions", tx, app_stop).await });
    println!("sample app at http://{app_addr}/transactions");

    let mut sources = Sources::default();
    for (k, v) in [
        ("brokers", brokers.as_str()),
        ("topic", topic),
        ("admin.addr", "127.0.0.1:0"),
        ("commit_interval", "1s"),
        ("log_format", "text"),
    ] {
        sources.flags.insert(k.into(), v.into());
    }
    sources
        .flags
        .insert("app.url".into(), format!("http://{app_addr}/transactions"));
    for (k, v) in FAST_GROUP_PROPERTIES {
        sources.flags.insert(format!("kafka.{k}"), v.to_string());
    }
    let cfg = Config::load(&sources)?;
    debug_assert_eq!(cfg.log_format, LogFormat::Text);
    let sidecar = crate::start(cfg).await?;
    println!(
        "sidecar started, admin at http://{}/metrics",
        sidecar.admin_addr()
    );

    // Interleaved transactions in one partition, written without Kafka transactions, as a
    // plain producer would: order-1 and order-2 interleave, order-3 is aborted.
    let plain: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let script: &[(&str, &str, &str)] = &[
        (
            "order-1",
            "task",
            r#"{"op":"create_order","order":1,"amount":42.5}"#,
        ),
        (
            "order-2",
            "task",
            r#"{"op":"create_order","order":2,"amount":7}"#,
        ),
        (
            "order-1",
            "task",
            r#"{"op":"reserve_stock","sku":"A-1","qty":2}"#,
        ),
        ("order-3", "task", r#"{"op":"create_order","order":3}"#),
        (
            "order-2",
            "task",
            "plain text is delivered as a JSON string",
        ),
        ("order-2", "commit", ""),
        ("order-3", "abort", ""),
        (
            "order-1",
            "task",
            r#"{"op":"send_mail","to":"customer@example.com"}"#,
        ),
        ("order-1", "commit", ""),
    ];
    for (id, kind, value) in script {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "txn-id",
                value: Some(*id),
            })
            .insert(Header {
                key: "txn-type",
                value: Some(*kind),
            });
        let mut rec: BaseRecord<'_, str, str> =
            BaseRecord::to(topic).partition(0).key(*id).headers(headers);
        if !value.is_empty() {
            rec = rec.payload(*value);
        }
        plain.send(rec).map_err(|(e, _)| e)?;
        println!("produced {kind:<6} {id} to partition 0");
    }
    plain.flush(Duration::from_secs(10))?;
    drop(plain);

    // One more, written atomically with a Kafka transaction, as `txn-sidecar produce` does.
    let b2 = brokers.clone();
    tokio::task::spawn_blocking(move || -> Result<(), DemoError> {
        let p = TxnProducer::new(
            &b2,
            &Default::default(),
            "txn-sidecar-demo",
            Protocol::Headers,
            default_names(),
        )?;
        let tasks = [
            TaskRecord {
                value: br#"{"op":"debit","account":"acc-1","amount":100}"#.to_vec(),
                headers: vec![],
            },
            TaskRecord {
                value: br#"{"op":"credit","account":"acc-2","amount":100}"#.to_vec(),
                headers: vec![],
            },
        ];
        p.send("orders.tx", "transfer-7", &tasks, false)?;
        println!("produced transfer-7 (2 tasks + commit) in one Kafka transaction");
        Ok(())
    })
    .await
    .map_err(|_| DemoError::Timeout { got: 0, want: 3 })??;

    let want = 3;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => {
                print_received(&r);
                got.push(r);
            }
            _ => break,
        }
    }
    sidecar.shutdown();
    sidecar.wait().await?;
    stop_app.cancel();
    if got.len() < want {
        return Err(DemoError::Timeout {
            got: got.len(),
            want,
        });
    }
    println!("done: {} transactions delivered whole and in order; order-3 was aborted and never delivered", got.len());
    drop(kafka);
    Ok(got)
}

fn print_received(r: &Received) {
    let b = &r.body;
    let tasks = b["tasks"].as_array().map_or(0, Vec::len);
    println!(
        "app received transaction {} (partition {}, commit offset {}, Idempotency-Key {}) with {tasks} tasks:",
        b["id"].as_str().unwrap_or("?"),
        b["partition"],
        b["commit_offset"],
        r.idempotency_key
    );
    if let Some(ts) = b["tasks"].as_array() {
        for t in ts {
            println!("    offset {:>3}: {}", t["offset"], t["value"]);
        }
    }
}
