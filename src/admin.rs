//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/v1/partitions`, `/v1/transactions`.
//!
//! It reads a snapshot the consumer thread publishes a few times a second, so a scrape
//! never contends with the hot path. It binds 127.0.0.1 by default; in Kubernetes set
//! `admin.addr = "0.0.0.0:9464"` so probes and Prometheus reach it on the pod IP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::delivery::{AppClient, AppState as AppReach};
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
///
/// # Group membership, as `/readyz` reads it
///
/// `/readyz` answers 200 only while the member holds a group session with an
/// assignment: `joined && group_lost.is_none()`. The consumer thread (the pipeline) owns
/// both fields and keeps them current:
///
/// - On **every assign** callback (eager assign, cooperative incremental assign, KIP-848
///   assign; an empty assignment too): `joined = true` and `group_lost = None`. That is
///   how a member recovers by itself: librdkafka rejoins, the next assign clears the loss.
/// - On a **revoke with `assignment_lost()`** (the session timed out, often because the
///   coordinator was unreachable for `session.timeout.ms`; `max.poll.interval.ms` was
///   exceeded; the member was fenced): `group_lost = Some(GroupLost { since: now, reason })`,
///   set before anything else the revoke does (including returning early because this
///   member owned none of the revoked partitions). `joined` may stay as it is.
/// - A routine revoke (not lost: a rebalance under way, the member keeps its session)
///   changes neither: the member stays ready while it rebalances.
///
/// `joined` alone is `false` until the first assign: `/readyz` says `not_joined`.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// An assignment (possibly empty) was received; see the type's contract.
    pub joined: bool,
    /// The member lost its group session or its assignment and has not been assigned
    /// again since; see the type's contract.
    pub group_lost: Option<GroupLost>,
    /// Assigned partitions.
    pub partitions: Vec<PartitionView>,
    /// Open transactions, the oldest 1000 at most, by partition and first offset.
    pub transactions: Vec<TxnView>,
}

/// Why and since when the member is out of its group (see [`Snapshot`]).
#[derive(Debug, Clone)]
pub struct GroupLost {
    /// When the loss was seen.
    pub since: Instant,
    /// What happened, for the operator (e.g. "assignment lost: session timed out or
    /// max.poll.interval.ms exceeded").
    pub reason: String,
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
    app: AppClient,
    /// Fires when the sidecar starts to drain (SIGTERM or a fatal error).
    draining: CancellationToken,
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

/// Binds `addr` and serves until `shutdown` fires; `/readyz` answers 503 from the moment
/// `draining` fires (the server keeps serving `/metrics` while the sidecar drains).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    commands: std::sync::mpsc::Sender<AdminCommand>,
    snapshot: Arc<Mutex<Snapshot>>,
    metrics: Arc<Metrics>,
    client: reqwest::Client,
    app_probe: url::Url,
    app: AppClient,
    draining: CancellationToken,
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
        app,
        draining,
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
    /// A member of the group now: assigned, and not lost since.
    joined: bool,
    app_reachable: bool,
    assigned_partitions: usize,
    /// Why not ready; empty when ready.
    reasons: Vec<NotReady>,
}

/// One reason `/readyz` answers 503.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct NotReady {
    /// `shutting_down`, `not_joined`, `group_lost` or `app_unreachable`.
    reason: &'static str,
    /// For the operator.
    detail: String,
}

/// How long each of `/readyz`'s app checks may take (kubelet's default probe timeout is
/// 1 s; the manifests allow 2 s, and the two checks run side by side).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Follows the current state, never a first success: ready while the member holds a
/// group session with an assignment (see [`Snapshot`]) and the app is present.
async fn readyz(State(s): State<AppState>) -> Response {
    let (joined, lost, assigned) = match s.snapshot.lock() {
        Ok(snap) => (snap.joined, snap.group_lost.clone(), snap.partitions.len()),
        Err(_) => (false, None, 0),
    };
    let mut reasons = Vec::new();
    if s.draining.is_cancelled() {
        reasons.push(NotReady {
            reason: "shutting_down",
            detail: "draining: in-flight deliveries finish, offsets are committed, then the member leaves its group".into(),
        });
    }
    if let Some(l) = &lost {
        reasons.push(NotReady {
            reason: "group_lost",
            detail: format!(
                "{} ({:.0} s ago); librdkafka rejoins by itself",
                l.reason,
                l.since.elapsed().as_secs_f64()
            ),
        });
    } else if !joined {
        reasons.push(NotReady {
            reason: "not_joined",
            detail: "no assignment received from the consumer group yet".into(),
        });
    }
    let app = app_check(&s).await;
    let app_reachable = app.is_ok();
    if let Err(detail) = app {
        reasons.push(NotReady {
            reason: "app_unreachable",
            detail,
        });
    }
    let ready = reasons.is_empty();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Ready {
            ready,
            joined: joined && lost.is_none(),
            app_reachable,
            assigned_partitions: assigned,
            reasons,
        }),
    )
        .into_response()
}

/// Whether the app is present: its probe URL (`app.health_url`, else `app.url`) gets an
/// HTTP answer (any status), and the delivery client can connect to `app.url`. The
/// client's own state is refreshed by a connect whenever it is not known up or the probe
/// failed, so the answer is current and a success wakes deliveries waiting for the app.
async fn app_check(s: &AppState) -> Result<(), String> {
    let probe = async {
        s.client
            .get(s.app_probe.clone())
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e))
    };
    let connect = || async {
        match tokio::time::timeout(PROBE_TIMEOUT, s.app.check()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "cannot connect to app: no connection within {PROBE_TIMEOUT:?}"
            )),
        }
    };
    let (probe, mut connected) = if s.app.status().state == AppReach::Up {
        (probe.await, None)
    } else {
        let (p, c) = tokio::join!(probe, connect());
        (p, Some(c))
    };
    if probe.is_err() && connected.is_none() {
        connected = Some(connect().await);
    }
    // No connection says it all; else the probe's own failure.
    if let Some(Err(e)) = connected {
        let down_for = s
            .app
            .status()
            .down
            .map(|(since, _)| format!(", down for {:.0} s", since.elapsed().as_secs_f64()))
            .unwrap_or_default();
        return Err(format!("{e} ({}){down_for}", s.app.url()));
    }
    probe.map_err(|e| format!("the app's probe {} does not answer: {e}", s.app_probe))
}

/// An error and its sources, joined (reqwest's own message names only the URL).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        out.push_str(": ");
        out.push_str(&src.to_string());
        cur = src.source();
    }
    out
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
    use std::net::SocketAddr;

    fn state(token: Option<&str>) -> AppState {
        AppState {
            commands: std::sync::mpsc::channel().0,
            token: token.map(Arc::from),
            snapshot: Arc::default(),
            metrics: Metrics::new(),
            client: reqwest::Client::new(),
            app_probe: url::Url::parse("http://127.0.0.1:1/").unwrap(),
            app: AppClient::new(
                &url::Url::parse("http://127.0.0.1:1/").unwrap(),
                Duration::from_secs(1),
            )
            .unwrap(),
            draining: CancellationToken::new(),
        }
    }

    fn bearer(v: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = v {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    fn state_for_app(addr: SocketAddr) -> AppState {
        let url = url::Url::parse(&format!("http://{addr}/transactions")).unwrap();
        AppState {
            app_probe: url.clone(),
            app: AppClient::new(&url, Duration::from_secs(1)).unwrap(),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            ..state(None)
        }
    }

    async fn ready(s: &AppState) -> (u16, serde_json::Value) {
        let r = readyz(State(s.clone())).await;
        let code = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (code, serde_json::from_slice(&body).unwrap())
    }

    fn reasons(v: &serde_json::Value) -> Vec<&str> {
        v["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reason"].as_str().unwrap())
            .collect()
    }

    /// An app on `addr` answering every GET and POST; dropping the handle closes it.
    async fn app_on(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let router = Router::new().route("/transactions", get(|| async { "ok" }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        })
    }

    #[tokio::test]
    async fn readiness_follows_the_group_and_the_app_now_and_recovers_by_itself() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = state_for_app(addr);
        // Not joined, no app.
        let (code, v) = ready(&s).await;
        assert_eq!(code, 503, "{v}");
        assert_eq!(reasons(&v), ["not_joined", "app_unreachable"], "{v}");
        let detail = v["reasons"][1]["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("http://{addr}/transactions")),
            "{detail}"
        );
        assert!(detail.contains("cannot connect to app"), "{detail}");
        assert_eq!(v["app_reachable"], false);
        assert_eq!(s.app.status().state, AppReach::Down);
        // Joined, app up.
        s.snapshot.lock().unwrap().joined = true;
        let server = app_on(addr).await;
        let (code, v) = ready(&s).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["reasons"], serde_json::json!([]));
        assert_eq!(v["joined"], true);
        assert_eq!(s.app.status().state, AppReach::Up);
        // The session is lost: 503 with the pipeline's reason, until the next assign.
        s.snapshot.lock().unwrap().group_lost = Some(GroupLost {
            since: Instant::now(),
            reason: "assignment lost: session timed out".into(),
        });
        let (code, v) = ready(&s).await;
        assert_eq!(code, 503, "{v}");
        assert_eq!(reasons(&v), ["group_lost"]);
        assert!(v["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("assignment lost: session timed out (0 s ago)"));
        assert_eq!(v["joined"], false);
        s.snapshot.lock().unwrap().group_lost = None;
        assert_eq!(ready(&s).await.0, 200);
        // The app goes away while the client still believes it up: the failed probe
        // makes the client look again.
        server.abort();
        let _ = server.await;
        let (code, v) = ready(&s).await;
        assert_eq!(code, 503, "{v}");
        assert_eq!(reasons(&v), ["app_unreachable"]);
        assert_eq!(s.app.status().state, AppReach::Down);
        // And it comes back.
        let _server = app_on(addr).await;
        assert_eq!(ready(&s).await.0, 200);
        // A health URL that does not answer while deliveries can connect.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = AppState {
            app_probe: url::Url::parse(&format!("http://{closed}/health")).unwrap(),
            ..s
        };
        let (code, v) = ready(&s).await;
        assert_eq!(code, 503, "{v}");
        assert_eq!(reasons(&v), ["app_unreachable"]);
        let detail = v["reasons"][0]["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!(
                "the app's probe http://{closed}/health does not answer: "
            )),
            "{detail}"
        );
        assert_eq!(s.app.status().state, AppReach::Up);
    }

    #[tokio::test]
    async fn a_draining_sidecar_is_not_ready() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let s = state_for_app(addr);
        s.snapshot.lock().unwrap().joined = true;
        let _server = app_on(addr).await;
        assert_eq!(ready(&s).await.0, 200);
        s.draining.cancel();
        let (code, v) = ready(&s).await;
        assert_eq!(code, 503, "{v}");
        assert_eq!(reasons(&v), ["shutting_down"], "{v}");
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
