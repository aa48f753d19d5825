//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/v1/partitions`, `/v1/transactions`.
//!
//! It reads a snapshot the consumer thread publishes a few times a second, so a scrape
//! never contends with the hot path. It binds 127.0.0.1 by default; in Kubernetes set
//! `admin.addr = "0.0.0.0:9464"` so probes and Prometheus reach it on the pod IP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// One assigned partition, as `/v1/partitions` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Last committed offset, if any.
    pub committed_offset: Option<i64>,
    /// Next offset to consume.
    pub consumed_offset: Option<i64>,
    /// Offset the next commit will carry.
    pub safe_offset: Option<i64>,
    /// Open transactions.
    pub open_transactions: usize,
    /// Staged bytes.
    pub staged_bytes: u64,
    /// Work items queued or in delivery.
    pub queued: usize,
    /// Paused for back-pressure.
    pub paused: bool,
    /// Records behind the high watermark.
    pub consumer_lag: i64,
}

/// One open transaction, as `/v1/transactions` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TxnView {
    /// Transaction id.
    pub id: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset of its first task.
    pub first_offset: i64,
    /// Tasks staged.
    pub tasks: usize,
    /// Bytes staged.
    pub bytes: u64,
    /// Seconds since its first task (record time).
    pub age_seconds: f64,
}

/// What the consumer thread publishes for the admin server.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The group was joined (an assignment, possibly empty, was received).
    pub joined: bool,
    /// Assigned partitions.
    pub partitions: Vec<PartitionView>,
    /// Open transactions (at most 1000).
    pub transactions: Vec<TxnView>,
}

#[derive(Clone)]
struct AppState {
    snapshot: Arc<Mutex<Snapshot>>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    app_probe: url::Url,
}

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is taken or not bindable.
    #[error("cannot listen on admin address {addr}: {error}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        error: std::io::Error,
    },
}

/// A running admin server.
pub struct AdminServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
}

/// Binds `addr` and serves until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    snapshot: Arc<Mutex<Snapshot>>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    app_probe: url::Url,
    shutdown: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<AdminServer, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| AdminError::Bind { addr, error })?;
    let bound = listener
        .local_addr()
        .map_err(|error| AdminError::Bind { addr, error })?;
    let state = AppState {
        snapshot,
        metrics,
        client,
        app_probe,
    };
    let router = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/partitions", get(partitions))
        .route("/v1/transactions", get(transactions))
        .with_state(state);
    tracker.spawn(async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    tracing::info!(addr = %bound, "admin server listening");
    Ok(AdminServer { addr: bound })
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
struct Ready {
    ready: bool,
    joined: bool,
    app_reachable: bool,
    assigned_partitions: usize,
}

async fn readyz(State(s): State<AppState>) -> Response {
    let (joined, assigned) = match s.snapshot.lock() {
        Ok(snap) => (snap.joined, snap.partitions.len()),
        Err(_) => (false, 0),
    };
    // Any HTTP answer means the app is listening; only transport errors mean it is not.
    let app_reachable = s
        .client
        .get(s.app_probe.clone())
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .is_ok();
    let ready = joined && app_reachable;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Ready {
            ready,
            joined,
            app_reachable,
            assigned_partitions: assigned,
        }),
    )
        .into_response()
}

async fn partitions(State(s): State<AppState>) -> Response {
    let v = s
        .snapshot
        .lock()
        .map(|s| s.partitions.clone())
        .unwrap_or_default();
    Json(v).into_response()
}

async fn transactions(State(s): State<AppState>) -> Response {
    let v = s
        .snapshot
        .lock()
        .map(|s| s.transactions.clone())
        .unwrap_or_default();
    Json(v).into_response()
}
