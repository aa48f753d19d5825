//! # txn-sidecar
//!
//! Kafka multi-message transactions for any application. Producers write **task**
//! records that share a transaction id, then a **commit** (or **abort**) marker; the
//! sidecar stages tasks per id and, on commit, POSTs the whole group in order to the app.
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | settings: defaults < TOML file < `TXN_SIDECAR_*` env < flags, validated once |
//! | [`protocol`] | the Kafka-side wire contract: record → task / commit / abort; the compact record and a transaction's record buffer |
//! | [`machine`] | **the transaction rules**: one pure state machine per partition (stage, commit, abort, `txn-count`, limits, expiry, tombstones, offset gaps, holds on the committed offset, the skip set); no I/O, time is an input |
//! | [`staging`] | the store of open transactions, behind the [`staging::StagingStore`] trait |
//! | [`offsets`] | safe offsets and the skip set carried in offset-commit metadata |
//! | [`pipeline`] | the driver: the poll loop, reader threads, rebalances, commits, back-pressure, per-partition delivery workers |
//! | [`kafka`] | librdkafka client configs and record conversion |
//! | [`delivery`] | the HTTP-side wire contract, retries and backoff; the app's HTTP/1.1 client |
//! | [`dlq`] | the dead-letter topic writer |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz`, `/v1/*` |
//! | [`telemetry`] | Prometheus metrics and `tracing` setup |
//! | [`shutdown`] | signals and deadline-bounded draining |
//! | [`produce`] | writing a transaction (tasks + commit) inside a Kafka transaction |
//! | [`embedded`] | librdkafka's mock cluster as an embedded Kafka, for the demo and tests |
//! | [`sample_app`] | a tiny app that prints what it receives, for the demo and compose |
//! | [`demo`] | `txn-sidecar demo`: everything in one process |
//!
//! The crate forbids `unsafe`; the two reads of librdkafka's C API that rust-rdkafka's
//! safe API lacks live in the `txn-sidecar-ffi` crate (`crates/txn-sidecar-ffi`).
//!
//! The entry point is [`start`] (or [`run`]), which takes its shutdown signal as a
//! parameter so tests drive it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod dlq;
pub mod embedded;
pub mod kafka;
pub mod machine;
pub mod offsets;
pub mod pipeline;
pub mod produce;
pub mod protocol;
pub mod sample_app;
pub mod shutdown;
pub mod staging;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use telemetry::Metrics;

/// Why the sidecar could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The app's URL cannot be requested.
    #[error(transparent)]
    App(#[from] delivery::TargetError),
    /// The readiness probe's HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    /// A Kafka client could not be created.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The admin server could not bind.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The consumer loop failed.
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    /// The consumer thread died.
    #[error("consumer thread ended unexpectedly")]
    ThreadLost,
}

/// A running sidecar.
pub struct Sidecar {
    admin_addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    admin_stop: CancellationToken,
    tracker: TaskTracker,
    consumer: tokio::sync::oneshot::Receiver<Result<(), pipeline::PipelineError>>,
    grace: Duration,
}

impl Sidecar {
    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// The token that stops this sidecar.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for the sidecar to stop (after [`Sidecar::shutdown`] or a fatal error).
    pub async fn wait(self) -> Result<(), RunError> {
        // The consumer thread drains within the grace itself (every step is bounded);
        // this bound only guards against a step that is not.
        let mut consumer = self.consumer;
        let ended = tokio::select! {
            r = &mut consumer => Some(r),
            _ = self.stop.cancelled() => None,
        };
        let ended = match ended {
            Some(r) => Ok(r),
            None => tokio::time::timeout(self.grace + Duration::from_secs(1), consumer).await,
        };
        let result = match ended {
            Ok(Ok(r)) => r.map_err(RunError::from),
            Ok(Err(_)) => Err(RunError::ThreadLost),
            Err(_) => {
                tracing::warn!(
                    grace_ms = self.grace.as_millis() as u64,
                    "the consumer thread did not finish draining within the shutdown grace; exiting without it"
                );
                Ok(())
            }
        };
        self.stop.cancel();
        self.admin_stop.cancel();
        // The drain stopped the workers already; what is left is the admin server.
        shutdown::wait_tasks(&self.tracker, "workers and admin", Duration::from_secs(1)).await;
        tracing::info!("stopped");
        result
    }
}

/// Starts the sidecar: admin server, delivery workers and the consumer thread.
pub async fn start(cfg: Config) -> Result<Sidecar, RunError> {
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let admin_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let deliverer = delivery::Deliverer::new(&cfg, metrics.clone())?;
    let dlq = dlq::DeadLetterWriter::new(cfg.clone())?;
    let snapshot = Arc::new(Mutex::new(admin::Snapshot::default()));
    let probe = cfg
        .app
        .health_url
        .clone()
        .unwrap_or_else(|| cfg.app.url.clone());
    let (commands_tx, commands_rx) = std::sync::mpsc::channel();
    let admin = admin::serve(
        cfg.admin.addr,
        cfg.admin.token.clone(),
        commands_tx,
        snapshot.clone(),
        metrics.clone(),
        reqwest::Client::builder().no_proxy().build()?,
        probe,
        deliverer.app().clone(),
        stop.clone(),
        admin_stop.clone(),
        &tracker,
    )
    .await?;
    tracing::info!(kafka = ?cfg.redacted_kafka(), app = %cfg.app.url, protocol = cfg.protocol.as_str(), "starting");
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    // One connect, so `txn_sidecar_app_up` tells from the start whether the app is there
    // (the connection is kept for the first delivery). Untracked: best effort.
    let app = deliverer.app().clone();
    tokio::spawn(async move {
        let _ = app.check().await;
    });
    // Untracked: a best-effort check must not hold up shutdown.
    tokio::spawn(pipeline::warn_if_compacted(cfg.clone()));
    let engine = pipeline::Engine::new(
        cfg.clone(),
        metrics.clone(),
        deliverer,
        dlq,
        tokio::runtime::Handle::current(),
        tracker.clone(),
        snapshot,
        commands_rx,
    );
    let engine = Arc::new(Mutex::new(engine));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_cfg = cfg.clone();
    let thread_stop = stop.clone();
    std::thread::Builder::new()
        .name("txn-sidecar-consumer".into())
        .spawn(move || {
            let r = pipeline::consume(&thread_cfg, engine, thread_stop);
            let _ = tx.send(r);
        })
        .map_err(|_| RunError::ThreadLost)?;
    Ok(Sidecar {
        admin_addr: admin.addr,
        metrics,
        stop,
        admin_stop,
        tracker,
        consumer: rx,
        grace: cfg.shutdown_grace,
    })
}

/// Runs until `shutdown` resolves, then drains and leaves the group.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let sidecar = start(cfg).await?;
    let token = sidecar.shutdown_token();
    tokio::spawn(async move {
        shutdown.await;
        token.cancel();
    });
    sidecar.wait().await
}
