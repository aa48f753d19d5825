//! The recording HTTP app: one endpoint per sidecar incarnation (`/t/{inc}`), so every
//! request is attributed to the process that sent it, with scripted failure phases.
//!
//! The app *processes* a transaction (records it as accepted) as soon as it decides to
//! answer 2xx, before any slow-response delay: like an app that commits its side effect
//! and then answers late. A sidecar killed during that delay never learns of the success,
//! which is exactly the "cut off mid-request" duplicate the brief allows.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::rng::Rng;

/// How the app answers right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// 200 at once.
    Normal,
    /// A 5xx burst: every request fails (503 with `Retry-After: 1`, 500, or 502).
    Errors,
    /// Slow responses: 200 after a delay in `min_ms..=max_ms`.
    Slow { min_ms: u64, max_ms: u64 },
}

/// One HTTP request the app received.
#[derive(Debug, Clone)]
pub struct Req {
    /// Sidecar incarnation that sent it.
    pub inc: usize,
    pub id: String,
    pub partition: i32,
    pub commit_offset: i64,
    pub idempotency_key: String,
    pub task_values: Vec<serde_json::Value>,
    pub task_offsets: Vec<i64>,
    pub start: Instant,
    /// Wall-clock start, to compare with the sidecars' log timestamps.
    pub wall: SystemTime,
    /// When the handler finished (response handed to the server), if it did.
    pub end: Option<Instant>,
    pub status: u16,
    /// Processed by the app (2xx): counts as a delivery.
    pub accepted: bool,
    /// Order of acceptance across all requests.
    pub accept_seq: Option<u64>,
    /// The connection went away before the handler finished.
    pub dropped: bool,
}

#[derive(Default)]
struct Inner {
    reqs: Vec<Req>,
    mode: Option<Mode>,
    rng: Option<Rng>,
    accepted: u64,
}

/// The app server.
#[derive(Clone)]
pub struct App {
    inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
}

impl App {
    pub async fn start(seed: u64) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind app");
        let addr = listener.local_addr().unwrap();
        let inner = Inner {
            rng: Some(Rng::fork(seed, "app")),
            ..Inner::default()
        };
        let app = App {
            inner: Arc::new(Mutex::new(inner)),
            addr,
        };
        let router = Router::new()
            .route("/t/{inc}", post(receive))
            .with_state(app.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        app
    }

    pub fn url(&self, inc: usize) -> String {
        format!("http://{}/t/{inc}", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        self.inner.lock().unwrap().mode = Some(m);
    }

    pub fn mode(&self) -> Mode {
        self.inner.lock().unwrap().mode.unwrap_or(Mode::Normal)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Req> {
        self.inner.lock().unwrap().reqs.clone()
    }

    pub fn accepted_count(&self) -> u64 {
        self.inner.lock().unwrap().accepted
    }

    /// Requests from `inc` whose handler is still running.
    pub fn in_flight(&self, inc: usize) -> usize {
        self.inner
            .lock()
            .unwrap()
            .reqs
            .iter()
            .filter(|r| r.inc == inc && r.end.is_none())
            .count()
    }
}

/// Marks the request dropped if the server cancels the handler (client went away).
struct DropGuard {
    app: App,
    idx: usize,
    finished: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut inner = self.app.inner.lock().unwrap();
            let r = &mut inner.reqs[self.idx];
            r.dropped = true;
            r.end = Some(Instant::now());
        }
    }
}

async fn receive(
    State(app): State<App>,
    Path(inc): Path<usize>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
    let (idx, status, delay) = {
        let mut guard = app.inner.lock().unwrap();
        let inner = &mut *guard;
        let mode = inner.mode.unwrap_or(Mode::Normal);
        let rng = inner.rng.as_mut().unwrap();
        let (status, delay) = match mode {
            Mode::Normal => (200, 0),
            Mode::Errors => (rng.pick(&[503u16, 503, 500, 502]), 0),
            Mode::Slow { min_ms, max_ms } => (200, rng.range(min_ms, max_ms)),
        };
        let accepted = (200..300).contains(&status);
        let accept_seq = accepted.then(|| {
            inner.accepted += 1;
            inner.accepted
        });
        inner.reqs.push(Req {
            inc,
            id: v["id"].as_str().unwrap_or_default().to_string(),
            partition: v["partition"].as_i64().unwrap_or(-1) as i32,
            commit_offset: v["commit_offset"].as_i64().unwrap_or(-1),
            idempotency_key: headers
                .get("idempotency-key")
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            task_values: tasks.iter().map(|t| t["value"].clone()).collect(),
            task_offsets: tasks
                .iter()
                .map(|t| t["offset"].as_i64().unwrap_or(-1))
                .collect(),
            start: Instant::now(),
            wall: SystemTime::now(),
            end: None,
            status,
            accepted,
            accept_seq,
            dropped: false,
        });
        (inner.reqs.len() - 1, status, delay)
    };
    let mut guard = DropGuard {
        app: app.clone(),
        idx,
        finished: false,
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    guard.finished = true;
    app.inner.lock().unwrap().reqs[idx].end = Some(Instant::now());
    let mut resp = StatusCode::from_u16(status).unwrap().into_response();
    if status == 503 {
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
    }
    resp
}
