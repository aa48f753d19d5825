//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/v1/partitions`, `/v1/transactions`.
//!
//! It reads a snapshot the consumer thread publishes a few times a second, so a scrape
//! never contends with the hot path. It binds 127.0.0.1 by default; in Kubernetes set
//! `admin.addr = "0.0.0.0:9464"` so probes and Prometheus reach it on the pod IP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    /// Open transactions, the oldest 1000 at most, by partition and first offset.
    pub transactions: Vec<TxnView>,
}

/// An operator's request to the consumer thread.
#[derive(Debug)]
pub enum AdminCommand {
    /// Dead-letter an open transaction now (reason `operator`), releasing its offset hold.
    DeadLetter {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Transaction id.
        id: String,
        /// Tasks dead-lettered, or why nothing was.
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    },
}

#[derive(Clone)]
struct AppState {
    commands: std::sync::mpsc::Sender<AdminCommand>,
    token: Option<Arc<str>>,
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
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    commands: std::sync::mpsc::Sender<AdminCommand>,
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
        commands,
        token: token.map(Arc::from),
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
        .route("/v1/transactions/dead-letter", post(dead_letter))
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

/// Body of `POST /v1/transactions/dead-letter`.
#[derive(Debug, serde::Deserialize)]
struct DeadLetterRequest {
    topic: String,
    partition: i32,
    id: String,
}

/// Compares in constant time (`subtle`), so response timing reveals nothing about the
/// token but its length.
fn same_token(given: &[u8], want: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.ct_eq(want))
}

/// Mutating endpoints are disabled without `admin.token` and require `Bearer <token>`.
///
/// A blank token never authorizes anything, even if one reached here without config
/// validation (which refuses it): it would match a request with no credentials.
fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let want = match &s.token {
        Some(t) if !t.trim().is_empty() => t,
        _ => {
            return Err((
                StatusCode::FORBIDDEN,
                "mutating endpoints are disabled: set admin.token\n",
            ))
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if same_token(given.as_bytes(), want.as_bytes()) {
        Ok(())
    } else {
        Err((StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n"))
    }
}

async fn dead_letter(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err((code, msg)) = authorize(&s, &headers) {
        let mut r = (code, msg).into_response();
        if code == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        return r;
    }
    let req: DeadLetterRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"topic\", \"partition\", \"id\"}}: {e}\n"),
            )
                .into_response()
        }
    };
    let (reply, rx) = tokio::sync::oneshot::channel();
    let cmd = AdminCommand::DeadLetter {
        topic: req.topic,
        partition: req.partition,
        id: req.id,
        reply,
    };
    if s.commands.send(cmd).is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(tasks))) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"dead_lettered": true, "tasks": tasks})),
        )
            .into_response(),
        Ok(Ok(Err(e))) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the consumer did not answer\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(token: Option<&str>) -> AppState {
        AppState {
            commands: std::sync::mpsc::channel().0,
            token: token.map(Arc::from),
            snapshot: Arc::default(),
            metrics: Metrics::new(),
            client: reqwest::Client::new(),
            app_probe: url::Url::parse("http://127.0.0.1:1/").unwrap(),
        }
    }

    fn bearer(v: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_exact_token_authorizes() {
        let s = state(Some("tok-123"));
        assert!(authorize(&s, &bearer(Some("Bearer tok-123"))).is_ok());
        for wrong in [
            None,
            Some("Bearer "),
            Some("Bearer tok-12"),
            Some("Bearer tok-1234"),
            Some("tok-123"),
        ] {
            let e = authorize(&s, &bearer(wrong)).unwrap_err();
            assert_eq!(e.0, StatusCode::UNAUTHORIZED, "{wrong:?}");
        }
    }

    #[test]
    fn a_blank_token_disables_the_endpoint_rather_than_opening_it() {
        for t in [None, Some(""), Some("   ")] {
            let s = state(t);
            for h in [None, Some("Bearer "), Some("Bearer    ")] {
                let e = authorize(&s, &bearer(h)).unwrap_err();
                assert_eq!(e.0, StatusCode::FORBIDDEN, "{t:?} {h:?}");
            }
        }
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"abc"));
    }
}
