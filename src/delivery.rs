//! The HTTP-side wire contract: POSTs a committed transaction to the app and classifies
//! its answer (2xx/409 delivered; 408/425/429/5xx/timeout retried; other 4xx permanent),
//! retrying with exponential backoff and jitter that a `Retry-After` can lengthen but never
//! shorten.
//!
//! A connection that cannot be opened is not an answer: the app is absent (restarting,
//! crash-looping), which is not the transaction's fault. Such a delivery waits for the app
//! without spending its retry budget, and the client's [`AppState`] (exported as
//! `txn_sidecar_app_up`, read by `/readyz`) says so.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HeaderNames, OnFailure};
use crate::dlq::DLQ_HEADER_PREFIX;
use crate::protocol::{Record, Records};
use crate::telemetry::{Metrics, ResultLabel};

/// A committed transaction, ready to POST.
#[derive(Debug, Clone)]
pub struct ReadyTxn {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Transaction id.
    pub id: String,
    /// Offset of the commit marker: the transaction's identity in `Idempotency-Key`.
    pub commit_offset: i64,
    /// Offset of its first task.
    pub first_offset: i64,
    /// Tasks in offset order.
    pub tasks: Records,
    /// The commit marker itself (kept for dead-lettering and trace context).
    pub marker: Record,
    /// When the marker was consumed, for the commit-to-delivery latency.
    pub committed_at: Instant,
}

impl ReadyTxn {
    /// `<topic>/<partition>/<commit offset>`: stable across redeliveries.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.commit_offset)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    topic: &'a str,
    partition: i32,
    commit_offset: i64,
    tasks: Vec<TaskBody<'a>>,
}

#[derive(Serialize)]
struct TaskBody<'a> {
    offset: i64,
    key: Option<Text<'a>>,
    /// `"base64"` when the key is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    headers: TaskHeaders<'a>,
    /// Names in `headers` whose value is base64 because it is not UTF-8.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    base64_headers: Vec<&'a str>,
    /// Every rendered header in record order, only when `headers` loses some: a repeated
    /// name, or a name that is not UTF-8.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    header_list: Vec<ListedHeader<'a>>,
    value: TaskValue<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

/// Record bytes as a JSON string: the text itself when it is UTF-8, else its base64.
///
/// Base64 is written straight into the body by `collect_str`, without a `String`.
#[derive(Clone, Copy)]
enum Text<'a> {
    Utf8(&'a str),
    Base64(&'a [u8]),
}

impl<'a> Text<'a> {
    fn of(b: &'a [u8]) -> Text<'a> {
        match std::str::from_utf8(b) {
            Ok(s) => Text::Utf8(s),
            Err(_) => Text::Base64(b),
        }
    }

    fn is_base64(&self) -> bool {
        matches!(self, Text::Base64(_))
    }

    /// The `*_encoding` field that goes with it.
    fn encoding(&self) -> Option<&'static str> {
        self.is_base64().then_some("base64")
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Text::Utf8(t) => s.serialize_str(t),
            Text::Base64(b) => s.collect_str(&base64::display::Base64Display::new(
                b,
                &base64::engine::general_purpose::STANDARD,
            )),
        }
    }
}

/// A task's headers as a JSON object: sorted by name, the last of a repeated name wins;
/// names that are not UTF-8 are left out (they are in `header_list`).
///
/// Borrowed from the staged record, so rendering allocates one small `Vec` per task
/// instead of a map node and two `String`s per header (docs/benchmarks-history.md, "Delivery").
struct TaskHeaders<'a>(Vec<(&'a str, Option<Text<'a>>)>);

impl Serialize for TaskHeaders<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One entry of `header_list`.
#[derive(Serialize)]
struct ListedHeader<'a> {
    name: Text<'a>,
    value: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_encoding: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TaskValue<'a> {
    Json(&'a RawValue),
    Text(&'a str),
    Base64(String),
    Null,
}

/// Renders the request body of the brief's HTTP contract.
///
/// Only marker fields must be text: a task's key and headers are data and reach the app
/// losslessly (base64 where they are not UTF-8, flagged by the `*_encoding` fields and
/// `base64_headers`). Marker headers and `txn-dlq-*` headers are not rendered.
pub fn render_body(txn: &ReadyTxn, names: &HeaderNames) -> Vec<u8> {
    let marker_headers = [names.id.as_str(), names.kind.as_str(), names.count.as_str()];
    // Whether a header reaches the app at all.
    let rendered = |name: &[u8]| {
        !name.starts_with(DLQ_HEADER_PREFIX.as_bytes())
            && !marker_headers.iter().any(|m| m.as_bytes() == name)
    };
    let tasks: Vec<TaskBody<'_>> = txn
        .tasks
        .iter()
        .map(|t| {
            let (key, value, all_headers) = t.parts();
            // Most tasks carry only the marker headers: allocate only for others.
            let mut headers: Vec<(&str, Option<Text<'_>>)> = Vec::new();
            let mut binary_name = false;
            for (k, v) in all_headers {
                if !rendered(k) {
                    continue;
                }
                let Ok(k) = std::str::from_utf8(k) else {
                    binary_name = true;
                    continue;
                };
                headers.push((k, v.map(Text::of)));
            }
            // Stable sort, then keep the last of each name: what a JSON object built by
            // inserting in record order would hold.
            let rendered_count = headers.len();
            headers.sort_by(|a, b| a.0.cmp(b.0));
            headers.reverse();
            headers.dedup_by(|later, kept| later.0 == kept.0);
            headers.reverse();
            let repeated_name = headers.len() != rendered_count;
            // Collecting nothing allocates nothing.
            let base64_headers: Vec<&str> = headers
                .iter()
                .filter(|(_, v)| v.is_some_and(|v| v.is_base64()))
                .map(|(k, _)| *k)
                .collect();
            // The object lost a header: list them all, in record order (a second walk of
            // the layout, only on this rare path).
            let header_list: Vec<ListedHeader<'_>> = if repeated_name || binary_name {
                t.headers()
                    .filter(|(k, _)| rendered(k))
                    .map(|(k, v)| {
                        let (name, value) = (Text::of(k), v.map(Text::of));
                        ListedHeader {
                            name,
                            value,
                            name_encoding: name.encoding(),
                            value_encoding: value.and_then(|v| v.encoding()),
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let key = key.map(Text::of);
            let (value, encoding) = match value {
                None => (TaskValue::Null, None),
                Some(v) => match serde_json::from_slice::<&RawValue>(v) {
                    Ok(raw) => (TaskValue::Json(raw), None),
                    Err(_) => match std::str::from_utf8(v) {
                        Ok(s) => (TaskValue::Text(s), None),
                        Err(_) => (
                            TaskValue::Base64(base64::engine::general_purpose::STANDARD.encode(v)),
                            Some("base64"),
                        ),
                    },
                },
            };
            TaskBody {
                offset: t.offset,
                key,
                key_encoding: key.and_then(|k| k.encoding()),
                headers: TaskHeaders(headers),
                base64_headers,
                header_list,
                value,
                encoding,
            }
        })
        .collect();
    let body = Body {
        id: &txn.id,
        topic: &txn.topic,
        partition: txn.partition,
        commit_offset: txn.commit_offset,
        tasks,
    };
    // Sized for the staged bytes plus the JSON around them, so the body is written
    // without the reallocations and copies of a growing `Vec`.
    let mut out = Vec::with_capacity(txn.tasks.encoded_len() + 96 * txn.tasks.len() + 128);
    match serde_json::to_writer(&mut out, &body) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// One failed HTTP attempt.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The app answered with a status that is not success.
    #[error("app answered {status}")]
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After`, parsed.
        retry_after: Option<Duration>,
        /// Start of the response body, for the dead-letter error header.
        body: String,
    },
    /// The app did not answer within `app.timeout` once connected.
    #[error("app did not answer within {0:?}")]
    Timeout(Duration),
    /// No connection could be opened (refused, unreachable, name not resolved, or the
    /// connect itself timed out): the app is absent, nothing was sent. It does not spend
    /// a transaction's retry budget.
    #[error("cannot connect to app: {0}")]
    Connect(String),
    /// Any other transport error.
    #[error("request failed: {0}")]
    Transport(String),
}

impl DeliveryError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeliveryError::Status { status, .. } => matches!(status, 408 | 425 | 429 | 500..=599),
            DeliveryError::Timeout(_) | DeliveryError::Connect(_) | DeliveryError::Transport(_) => {
                true
            }
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            DeliveryError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How a delivery ended.
#[derive(Debug)]
pub enum Delivered {
    /// 2xx or 409 after `attempts` attempts.
    Ok {
        /// HTTP attempts made.
        attempts: u32,
    },
    /// Permanently rejected or out of retries.
    Failed {
        /// `rejected` (4xx) or `retries_exhausted`.
        reason: &'static str,
        /// The last error.
        error: String,
        /// HTTP attempts made.
        attempts: u32,
    },
    /// Stopped by a revoke or shutdown before an answer.
    Cancelled,
}

/// Parses `Retry-After` as delta-seconds or an HTTP-date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `app.url` cannot be turned into requests.
#[derive(Debug, thiserror::Error)]
#[error("app.url {url}: {reason}")]
pub struct TargetError {
    url: String,
    reason: String,
}

/// Where the app listens: parsed once from `app.url`.
#[derive(Debug)]
struct Target {
    /// `app.url`, for messages.
    url: String,
    dest: Dest,
    /// The `Host` header (hyper's connection API does not add one).
    host: HeaderValue,
    /// Origin-form request target: path and query.
    uri: Uri,
    connect_timeout: Duration,
}

#[derive(Debug)]
enum Dest {
    Addr(SocketAddr),
    Name(String, u16),
}

/// The most idle connections kept, and for how long (what reqwest's pool kept before).
const MAX_IDLE: usize = 64;
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A success body longer than this is not drained; its connection is closed instead.
const MAX_DRAIN: usize = 1 << 20;

/// The app's answer to one POST.
#[derive(Debug)]
pub struct AppResponse {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, parsed.
    pub retry_after: Option<Duration>,
    /// Start of the body (first 256 characters), kept only for non-success answers.
    pub body: String,
}

/// An HTTP/1.1 client for the app with keep-alive connections that run in the caller's task.
///
/// A pooled client (reqwest, hyper-util) drives each connection in a task of its own, so
/// every request crosses tasks twice and often threads. Deliveries are sequential per
/// partition, so the task that sends can as well read: a connection here is taken from an
/// idle stack, polled by the request's own future, and returned when its response has
/// been read in full (docs/benchmarks-history.md, change 6). Dropping a request mid-flight (timeout,
/// revoke, shutdown) drops its connection with it.
#[derive(Clone)]
pub struct AppClient {
    target: Arc<Target>,
    idle: Arc<Mutex<Vec<Conn>>>,
    health: Arc<Health>,
}

/// Whether the app accepts connections, as the client's last connect found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    /// No connect attempted yet.
    Unknown,
    /// The last connect succeeded.
    Up,
    /// The last connect failed: refused, unreachable, name not resolved, timed out.
    Down,
}

/// What the client knows about the app, for `/readyz`.
#[derive(Debug, Clone)]
pub struct AppStatus {
    /// The state after the last connect.
    pub state: AppState,
    /// While down: since when (the first failed connect after the last success) and the
    /// last connect error.
    pub down: Option<(Instant, String)>,
}

/// Reachability shared by every clone of one [`AppClient`]: set by each connect, watched
/// by deliveries waiting for the app to come back.
struct Health {
    state: watch::Sender<AppState>,
    down: Mutex<Option<(Instant, String)>>,
    /// `txn_sidecar_app_up` (unregistered unless the client reports to [`Metrics`]).
    up: Gauge,
    /// `txn_sidecar_app_connect_failures_total`.
    failures: Counter,
}

impl Health {
    fn new(up: Gauge, failures: Counter) -> Health {
        Health {
            state: watch::Sender::new(AppState::Unknown),
            down: Mutex::new(None),
            up,
            failures,
        }
    }

    fn connected(&self, url: &str) {
        self.up.set(1);
        let was_down = self.down.lock().map(|mut d| d.take()).unwrap_or_default();
        self.state
            .send_if_modified(|s| std::mem::replace(s, AppState::Up) != AppState::Up);
        if let Some((since, _)) = was_down {
            tracing::info!(
                app = url,
                down_ms = since.elapsed().as_millis() as u64,
                "app accepts connections again; waiting deliveries resume"
            );
        }
    }

    fn failed(&self, url: &str, error: &str) {
        self.up.set(0);
        self.failures.inc();
        if let Ok(mut d) = self.down.lock() {
            let since = d.as_ref().map_or_else(Instant::now, |(s, _)| *s);
            *d = Some((since, error.to_string()));
        }
        let mut was = AppState::Down;
        self.state.send_if_modified(|s| {
            was = std::mem::replace(s, AppState::Down);
            was != AppState::Down
        });
        match was {
            AppState::Up => tracing::warn!(app = url, error, "app stopped accepting connections; deliveries wait for it without spending their retry budgets"),
            // A native sidecar starts before its app: not yet there is no fault.
            AppState::Unknown => tracing::info!(app = url, error, "app does not accept connections yet; deliveries wait for it"),
            AppState::Down => {}
        }
    }
}

/// One HTTP/1.1 connection: the handle that sends and the state machine that does the IO.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
    idle_since: Instant,
}

struct Driver {
    conn: Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
    /// The connection future finished: the connection is closed.
    done: bool,
    /// Why it finished, when it was an error (more telling than the request's own error).
    error: Option<String>,
}

impl Driver {
    fn finish(&mut self, r: hyper::Result<()>) {
        self.done = true;
        if let Err(e) = r {
            self.error = Some(root_cause(&e));
        }
    }

    /// Runs `f` while polling the connection, so the IO `f` waits for happens in this task.
    async fn drive<F: Future>(&mut self, f: F) -> F::Output {
        tokio::pin!(f);
        if !self.done {
            tokio::select! {
                biased;
                out = &mut f => return out,
                r = self.conn.as_mut() => self.finish(r),
            }
        }
        // Closed: whatever `f` waits for is settled already (data buffered or an error).
        f.await
    }

    /// Whether the app closed the connection while it was idle, without waiting: a read
    /// that returns the app's FIN completes the connection future.
    fn closed_while_idle(&mut self) -> bool {
        if !self.done {
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(r) = self.conn.as_mut().poll(&mut cx) {
                self.finish(r);
            }
        }
        self.done
    }
}

/// A request that failed, and whether it may go again at once on a new connection.
enum Failure {
    /// Not written, or written and the app closed the connection without a byte of
    /// answer: on a kept-alive connection, what an app's idle timeout firing as the
    /// request arrived looks like. Resending is safe: the request carries its
    /// `Idempotency-Key`.
    Resendable(DeliveryError),
    /// Anything else: the retry policy decides.
    Sent(DeliveryError),
}

impl AppClient {
    /// A client for `url`; `connect_timeout` bounds each TCP connect.
    pub fn new(url: &url::Url, connect_timeout: Duration) -> Result<AppClient, TargetError> {
        let bad = |reason: &str| TargetError {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.scheme() != "http" {
            return Err(bad("only http is supported"));
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let dest = match url.host() {
            Some(url::Host::Ipv4(ip)) => Dest::Addr(SocketAddr::new(ip.into(), port)),
            Some(url::Host::Ipv6(ip)) => Dest::Addr(SocketAddr::new(ip.into(), port)),
            Some(url::Host::Domain(name)) => Dest::Name(name.to_string(), port),
            None => return Err(bad("no host")),
        };
        let host_str = url.host_str().unwrap_or_default();
        let host = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_string(),
        };
        let host = HeaderValue::from_str(&host).map_err(|_| bad("host is not a header value"))?;
        let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let uri = path.parse::<Uri>().map_err(|e| bad(&e.to_string()))?;
        Ok(AppClient {
            target: Arc::new(Target {
                url: url.to_string(),
                dest,
                host,
                uri,
                connect_timeout,
            }),
            idle: Arc::default(),
            health: Arc::new(Health::new(Gauge::default(), Counter::default())),
        })
    }

    /// This client, setting `txn_sidecar_app_up` and counting
    /// `txn_sidecar_app_connect_failures_total` in `metrics` (call before cloning).
    pub fn reporting_to(mut self, metrics: &Metrics) -> AppClient {
        self.health = Arc::new(Health::new(
            metrics.app_up.clone(),
            metrics.app_connect_failures.clone(),
        ));
        self
    }

    /// `app.url`.
    pub fn url(&self) -> &str {
        &self.target.url
    }

    /// What the last connect found.
    pub fn status(&self) -> AppStatus {
        AppStatus {
            state: *self.health.state.borrow(),
            down: self.health.down.lock().ok().and_then(|d| d.clone()),
        }
    }

    /// Resolves once a connect (by any clone) has succeeded, at once if the last one did.
    pub async fn until_up(&self) {
        let mut rx = self.health.state.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|s| *s == AppState::Up).await;
    }

    /// Opens a connection to the app without sending a request, updating [`AppStatus`]
    /// (and waking deliveries that wait for the app if it is back). The connection is
    /// kept for the next request.
    pub async fn check(&self) -> Result<(), DeliveryError> {
        let conn = self.connect().await?;
        self.put_idle(conn);
        Ok(())
    }

    /// POSTs `body` with `headers` (plus `Host` and `Content-Length`), within `timeout`
    /// from the first connect to the last byte of the answer.
    pub async fn post(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<AppResponse, DeliveryError> {
        // Set while a connect is under way: a timeout then means no connection could be
        // opened, which is the app's absence rather than a request it did not answer.
        let connecting = AtomicBool::new(false);
        match tokio::time::timeout(timeout, self.exchange(headers, body, &connecting)).await {
            Ok(r) => r,
            Err(_) if connecting.load(Ordering::Relaxed) => {
                let e = format!("connect did not complete within {timeout:?}");
                self.health.failed(&self.target.url, &e);
                Err(DeliveryError::Connect(e))
            }
            Err(_) => Err(DeliveryError::Timeout(timeout)),
        }
    }

    async fn connect_flagged(&self, connecting: &AtomicBool) -> Result<Conn, DeliveryError> {
        connecting.store(true, Ordering::Relaxed);
        let r = self.connect().await;
        connecting.store(false, Ordering::Relaxed);
        r
    }

    async fn exchange(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        connecting: &AtomicBool,
    ) -> Result<AppResponse, DeliveryError> {
        let (mut conn, mut reused) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.connect_flagged(connecting).await?, false),
        };
        loop {
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = self.target.uri.clone();
            *req.headers_mut() = headers.clone();
            req.headers_mut().insert(HOST, self.target.host.clone());
            match Self::roundtrip(&mut conn, req).await {
                Ok((resp, reusable)) => {
                    if reusable {
                        self.put_idle(conn);
                    }
                    return Ok(resp);
                }
                // The app closed a kept-alive connection as we picked it: a fresh
                // connection gets the request without a retry delay, once.
                Err(Failure::Resendable(_)) if reused => {
                    reused = false;
                    conn = self.connect_flagged(connecting).await?;
                }
                Err(Failure::Resendable(e) | Failure::Sent(e)) => return Err(e),
            }
        }
    }

    async fn roundtrip(
        conn: &mut Conn,
        req: Request<Full<Bytes>>,
    ) -> Result<(AppResponse, bool), Failure> {
        let transport = |driver: &Driver, e: &hyper::Error| {
            DeliveryError::Transport(driver.error.clone().unwrap_or_else(|| root_cause(e)))
        };
        if let Err(e) = conn.driver.drive(conn.sender.ready()).await {
            return Err(Failure::Resendable(transport(&conn.driver, &e)));
        }
        let resp = match conn.driver.drive(conn.sender.try_send_request(req)).await {
            Ok(resp) => resp,
            Err(e) => {
                let err = transport(&conn.driver, e.error());
                return Err(
                    if e.message().is_some() || e.error().is_incomplete_message() {
                        Failure::Resendable(err)
                    } else {
                        Failure::Sent(err)
                    },
                );
            }
        };
        let status = resp.status().as_u16();
        let keep_text = !(resp.status().is_success() || status == 409);
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = resp.into_body();
        let (mut text, mut read, mut complete) = (Vec::new(), 0usize, false);
        loop {
            match conn.driver.drive(body.frame()).await {
                None => {
                    complete = true;
                    break;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        read += data.len();
                        if keep_text && text.len() < 1024 {
                            text.extend_from_slice(&data[..data.len().min(1024 - text.len())]);
                        }
                        if read > MAX_DRAIN {
                            break;
                        }
                    }
                }
                // The status has arrived and stands; only the connection is lost.
                Some(Err(_)) => break,
            }
        }
        let body = if keep_text {
            String::from_utf8_lossy(&text).chars().take(256).collect()
        } else {
            String::new()
        };
        let reusable = complete && !conn.driver.done;
        Ok((
            AppResponse {
                status,
                retry_after,
                body,
            },
            reusable,
        ))
    }

    async fn connect(&self) -> Result<Conn, DeliveryError> {
        let t = &self.target;
        let connect = async {
            match &t.dest {
                Dest::Addr(a) => TcpStream::connect(a).await,
                Dest::Name(n, p) => TcpStream::connect((n.as_str(), *p)).await,
            }
        };
        let stream = match tokio::time::timeout(t.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let e = e.to_string();
                self.health.failed(&t.url, &e);
                return Err(DeliveryError::Connect(e));
            }
            Err(_) => {
                let e = format!("connect did not complete within {:?}", t.connect_timeout);
                self.health.failed(&t.url, &e);
                return Err(DeliveryError::Connect(e));
            }
        };
        self.health.connected(&t.url);
        // Small requests and answers: Nagle's delay would be pure latency.
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DeliveryError::Transport(root_cause(&e)))?;
        Ok(Conn {
            sender,
            driver: Driver {
                conn: Box::pin(conn),
                done: false,
                error: None,
            },
            idle_since: Instant::now(),
        })
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        // Most recently used first: the likeliest to be alive, and the rest age out.
        while let Some(mut c) = idle.pop() {
            if c.idle_since.elapsed() < IDLE_TIMEOUT && !c.driver.closed_while_idle() {
                return Some(c);
            }
        }
        None
    }

    fn put_idle(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
    }
}

/// The retry budget of one transaction: `retry.max_attempts` answered attempts and
/// `retry.max_elapsed` of time spent on them. Time spent waiting for an absent app (no
/// connection could be opened) is not charged, and such attempts do not count.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Answered attempts allowed (`0` = unlimited).
    pub max_attempts: u32,
    /// Time allowed, from the first attempt, less waits for an absent app.
    pub max_elapsed: Duration,
    /// `on_failure = "block"`: retried forever, nothing is spent.
    pub unlimited: bool,
}

/// What the retry policy does after a retryable failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    /// Wait this long, then attempt again.
    Retry(Duration),
    /// The budget is spent: dead-letter (`retries_exhausted`). With a note when a
    /// `Retry-After` asked for more than what was left of it.
    Exhausted(Option<String>),
}

impl Budget {
    /// The step after `attempts` answered attempts that took `spent` of the budget's
    /// time, given the policy's next exponential `backoff` and the app's `retry_after`.
    ///
    /// The delay is the larger of the two (`Retry-After: 0` or a past date counts as
    /// zero, so it never shortens the backoff), capped by what is left of
    /// `max_elapsed`; a `Retry-After` longer than that ends the retries now rather than
    /// sleeping past the budget. Unlimited (block mode), a `Retry-After` is honoured up
    /// to `max_elapsed`, so a bogus value cannot park a partition for longer.
    pub fn next_step(
        &self,
        attempts: u32,
        spent: Duration,
        backoff: Duration,
        retry_after: Option<Duration>,
    ) -> NextStep {
        let ra = retry_after.unwrap_or(Duration::ZERO);
        if self.unlimited {
            return NextStep::Retry(backoff.max(ra.min(self.max_elapsed)));
        }
        if self.max_attempts > 0 && attempts >= self.max_attempts {
            return NextStep::Exhausted(None);
        }
        let left = self.max_elapsed.saturating_sub(spent);
        if left.is_zero() {
            return NextStep::Exhausted(None);
        }
        if ra > left {
            return NextStep::Exhausted(Some(format!(
                "Retry-After {}s is longer than the {:.1}s left of retry.max_elapsed",
                ra.as_secs(),
                left.as_secs_f64()
            )));
        }
        NextStep::Retry(backoff.max(ra).min(left))
    }
}

/// The longest wait between connect attempts to an absent app (shorter if
/// `retry.max_backoff` is): how long a delivery may lag behind the app's return when
/// nothing else (another delivery, a readiness probe) notices it first.
pub const APP_WAIT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The HTTP client and retry policy.
#[derive(Clone)]
pub struct Deliverer {
    app: AppClient,
    timeout: Duration,
    names: HeaderNames,
    initial_backoff: Duration,
    max_backoff: Duration,
    budget: Budget,
    block: bool,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    /// A deliverer for `cfg`.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Deliverer, TargetError> {
        let app = AppClient::new(&cfg.app.url, Duration::from_secs(5).min(cfg.app.timeout))?
            .reporting_to(&metrics);
        let block = cfg.on_failure == OnFailure::Block;
        Ok(Deliverer {
            app,
            timeout: cfg.app.timeout,
            names: cfg.headers.clone(),
            initial_backoff: cfg.retry.initial_backoff,
            max_backoff: cfg.retry.max_backoff,
            budget: Budget {
                max_attempts: cfg.retry.max_attempts,
                max_elapsed: cfg.retry.max_elapsed,
                unlimited: block,
            },
            block,
            metrics,
        })
    }

    /// The app's HTTP client (shared state: its [`AppStatus`] is every delivery's).
    pub fn app(&self) -> &AppClient {
        &self.app
    }

    async fn attempt(&self, headers: &HeaderMap, body: &Bytes) -> Result<u16, DeliveryError> {
        let resp = self.app.post(headers, body.clone(), self.timeout).await?;
        if (200..300).contains(&resp.status) || resp.status == 409 {
            return Ok(resp.status);
        }
        Err(DeliveryError::Status {
            status: resp.status,
            retry_after: resp.retry_after,
            body: resp.body,
        })
    }

    fn backoff(&self, max: Duration) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff.min(max))
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Delivers `txn`, retrying per policy, until it succeeds, fails for good or `cancel`
    /// fires. [`Deliverer::deliver_until`] with no `stop`.
    pub async fn deliver(&self, txn: &ReadyTxn, cancel: &CancellationToken) -> Delivered {
        self.deliver_until(txn, &CancellationToken::new(), cancel)
            .await
    }

    /// Delivers `txn`, retrying per policy, until it succeeds or fails for good.
    ///
    /// While the app is absent (no connection can be opened) the delivery waits for it
    /// with capped backoff, without spending the retry budget; a connect by any other
    /// delivery or by `/readyz` that succeeds wakes it at once. `stop` ends such a wait
    /// (nothing is in flight then); `cut` ends the delivery at any point. Both return
    /// [`Delivered::Cancelled`].
    pub async fn deliver_until(
        &self,
        txn: &ReadyTxn,
        stop: &CancellationToken,
        cut: &CancellationToken,
    ) -> Delivered {
        let body = Bytes::from(render_body(txn, &self.names));
        let headers = request_headers(txn);
        let started = Instant::now();
        // Time spent waiting for an absent app: not charged to the budget.
        let mut absent = Duration::ZERO;
        let mut attempts = 0u32;
        let mut backoff = self.backoff(self.max_backoff);
        let app_wait_max = self.max_backoff.min(APP_WAIT_MAX_BACKOFF);
        let mut app_wait = self.backoff(app_wait_max);
        let mut waited_for_app = false;
        loop {
            let attempt_started = Instant::now();
            let result = tokio::select! {
                r = self.attempt(&headers, &body) => r,
                _ = cut.cancelled() => return Delivered::Cancelled,
            };
            let err = match result {
                Ok(status) => {
                    attempts += 1;
                    let result = if status == 409 { "conflict" } else { "success" };
                    self.metrics
                        .delivery_attempts
                        .get_or_create(&ResultLabel { result })
                        .inc();
                    self.metrics
                        .delivery_duration
                        .observe(started.elapsed().as_secs_f64());
                    return Delivered::Ok { attempts };
                }
                Err(DeliveryError::Connect(e)) => {
                    // The app is absent: nothing was sent, nothing is spent. Counted in
                    // `app_connect_failures_total`, not as a delivery attempt.
                    let delay = app_wait.next().unwrap_or(app_wait_max).min(app_wait_max);
                    if !waited_for_app {
                        waited_for_app = true;
                        tracing::info!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, error = %e, "app absent; the transaction waits for it without spending its retry budget");
                    } else {
                        tracing::debug!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, delay_ms = delay.as_millis() as u64, error = %e, "app still absent");
                    }
                    tokio::select! {
                        biased;
                        _ = cut.cancelled() => return Delivered::Cancelled,
                        _ = stop.cancelled() => return Delivered::Cancelled,
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.app.until_up() => {}
                    }
                    absent += attempt_started.elapsed();
                    continue;
                }
                Err(e) => e,
            };
            attempts += 1;
            let retryable = err.is_retryable();
            let result = if retryable { "retryable" } else { "permanent" };
            self.metrics
                .delivery_attempts
                .get_or_create(&ResultLabel { result })
                .inc();
            if !retryable && !self.block {
                tracing::warn!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, error = %err, "app rejected transaction");
                return Delivered::Failed {
                    reason: "rejected",
                    error: err.to_string(),
                    attempts,
                };
            }
            let spent = started.elapsed().saturating_sub(absent);
            let next = backoff.next().unwrap_or(self.max_backoff);
            let delay = match self
                .budget
                .next_step(attempts, spent, next, err.retry_after())
            {
                NextStep::Retry(d) => d,
                NextStep::Exhausted(note) => {
                    let error = match note {
                        Some(n) => format!("{err}; {n}"),
                        None => err.to_string(),
                    };
                    tracing::warn!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, error = %error, "delivery retries exhausted");
                    return Delivered::Failed {
                        reason: "retries_exhausted",
                        error,
                        attempts,
                    };
                }
            };
            tracing::info!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, delay_ms = delay.as_millis() as u64, error = %err, "delivery failed, retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cut.cancelled() => return Delivered::Cancelled,
            }
        }
    }
}

/// The contract's request headers for `txn` (Host and Content-Length are added per request).
fn request_headers(txn: &ReadyTxn) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // A topic name and two numbers: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&txn.idempotency_key()) {
        h.insert(IDEMPOTENCY_KEY, v);
    }
    // An id with a control character cannot travel in a header; the body carries it
    // anyway, and failing the request would fail it on every retry.
    if let Ok(v) = HeaderValue::from_str(&txn.id) {
        h.insert(X_TXN_ID, v);
    }
    for name in [TRACEPARENT, TRACESTATE] {
        if let Some(Some(v)) = txn.marker.header(name.as_str()) {
            if let Ok(v) = HeaderValue::from_bytes(v) {
                h.insert(name, v);
            }
        }
    }
    h
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const X_TXN_ID: HeaderName = HeaderName::from_static("x-txn-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(src) = cur.source() {
        cur = src;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> HeaderNames {
        HeaderNames {
            id: "txn-id".into(),
            kind: "txn-type".into(),
            count: "txn-count".into(),
        }
    }

    fn task(offset: i64, value: &[u8]) -> Record {
        let h: [(&[u8], Option<&[u8]>); 3] = [
            (b"txn-id", Some(b"order-42")),
            (b"txn-type", Some(b"task")),
            (b"h", Some(b"v")),
        ];
        Record::new(offset, None, Some(b"order-42"), Some(value), &h)
    }

    #[test]
    fn body_follows_the_contract() {
        let txn = ReadyTxn {
            topic: "orders.tx".into(),
            partition: 3,
            id: "order-42".into(),
            commit_offset: 1207,
            first_offset: 1201,
            tasks: vec![
                task(1201, br#"{"any": "json"}"#),
                task(1202, b"plain text"),
                task(1203, &[0xff, 0x00]),
            ]
            .into_iter()
            .collect(),
            marker: task(1207, b""),
            committed_at: Instant::now(),
        };
        let v: serde_json::Value = serde_json::from_slice(&render_body(&txn, &names())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "id": "order-42", "topic": "orders.tx", "partition": 3, "commit_offset": 1207,
                "tasks": [
                    {"offset": 1201, "key": "order-42", "headers": {"h": "v"}, "value": {"any": "json"}},
                    {"offset": 1202, "key": "order-42", "headers": {"h": "v"}, "value": "plain text"},
                    {"offset": 1203, "key": "order-42", "headers": {"h": "v"}, "value": "/wA=", "encoding": "base64"},
                ]
            })
        );
        assert_eq!(txn.idempotency_key(), "orders.tx/3/1207");
    }

    /// The body of a one-task transaction holding `rec`, as text (every byte of it is
    /// ASCII or UTF-8 text: base64 never leaves raw bytes in the JSON).
    fn render_one(rec: Record) -> String {
        let txn = ReadyTxn {
            topic: "t".into(),
            partition: 0,
            id: "x".into(),
            commit_offset: 9,
            first_offset: 8,
            tasks: Records::from(rec),
            marker: task(9, b""),
            committed_at: Instant::now(),
        };
        String::from_utf8(render_body(&txn, &names())).unwrap()
    }

    /// The JSON of a one-task body around the task's fields `task`.
    fn one_task_body(task: &str) -> String {
        format!(
            r#"{{"id":"x","topic":"t","partition":0,"commit_offset":9,"tasks":[{{"offset":8,{task}}}]}}"#
        )
    }

    #[test]
    fn task_headers_are_sorted_deduplicated_last_wins_and_escaped() {
        let h: [(&[u8], Option<&[u8]>); 7] = [
            (b"zeta", Some(b"1")),
            (b"txn-type", Some(b"task")),
            (b"alpha", Some(b"first")),
            (b"nul", None),
            (b"alpha", Some(b"second \"quoted\"")),
            (b"txn-id", Some(b"x")),
            (b"\xff", Some(b"name not utf-8")),
        ];
        // The repeated name and the binary name put every rendered header in
        // `header_list` too, in record order.
        assert_eq!(
            render_one(Record::new(8, Some(5), None, None, &h)),
            one_task_body(concat!(
                r#""key":null,"headers":{"alpha":"second \"quoted\"","nul":null,"zeta":"1"},"#,
                r#""header_list":[{"name":"zeta","value":"1"},{"name":"alpha","value":"first"},"#,
                r#"{"name":"nul","value":null},{"name":"alpha","value":"second \"quoted\""},"#,
                r#"{"name":"/w==","value":"name not utf-8","name_encoding":"base64"}],"#,
                r#""value":null"#
            ))
        );
    }

    #[test]
    fn all_text_tasks_render_byte_identical_to_before() {
        // Text keys and headers, unique names: the bytes the renderer wrote before keys
        // and headers were kept lossless (checked against that renderer), no new field.
        let h: [(&[u8], Option<&[u8]>); 6] = [
            (b"txn-id", Some(b"order-42")),
            (b"txn-type", Some(b"task")),
            (b"z", Some(b"\"q\"\n")),
            (b"a", Some("é".as_bytes())),
            (b"txn-count", Some(b"3")),
            (b"m", None),
        ];
        let tasks: Records = vec![
            Record::new(
                1201,
                Some(1),
                Some(b"order-42"),
                Some(br#"{"any": "json"}"#),
                &h,
            ),
            Record::new(
                1202,
                None,
                Some("ключ".as_bytes()),
                Some(b"plain text"),
                &h[..2],
            ),
            Record::new(1203, None, None, Some(&[0xff, 0x00]), &[]),
            Record::new(1204, None, Some(b""), None, &h[4..]),
        ]
        .into_iter()
        .collect();
        let txn = ReadyTxn {
            topic: "orders.tx".into(),
            partition: 3,
            id: "order-42".into(),
            commit_offset: 1207,
            first_offset: 1201,
            tasks,
            marker: task(1207, b""),
            committed_at: Instant::now(),
        };
        assert_eq!(
            String::from_utf8(render_body(&txn, &names())).unwrap(),
            concat!(
                r#"{"id":"order-42","topic":"orders.tx","partition":3,"commit_offset":1207,"tasks":["#,
                r#"{"offset":1201,"key":"order-42","headers":{"a":"é","m":null,"z":"\"q\"\n"},"value":{"any": "json"}},"#,
                r#"{"offset":1202,"key":"ключ","headers":{},"value":"plain text"},"#,
                r#"{"offset":1203,"key":null,"headers":{},"value":"/wA=","encoding":"base64"},"#,
                r#"{"offset":1204,"key":"","headers":{"m":null},"value":null}]}"#
            )
        );
    }

    #[test]
    fn a_binary_key_is_base64_with_key_encoding() {
        let h: [(&[u8], Option<&[u8]>); 1] = [(b"txn-type", Some(b"task"))];
        assert_eq!(
            render_one(Record::new(
                8,
                None,
                Some(&[0xa1, 0x03, 0xff]),
                Some(b"1"),
                &h
            )),
            one_task_body(r#""key":"oQP/","key_encoding":"base64","headers":{},"value":1"#)
        );
    }

    #[test]
    fn a_binary_header_value_is_base64_and_named_in_base64_headers() {
        let h: [(&[u8], Option<&[u8]>); 4] = [
            (b"txn-type", Some(b"task")),
            (b"sig", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
            (b"ct", Some(b"text/plain")),
            (b"blob", Some(&[0x80])),
        ];
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"blob":"gA==","ct":"text/plain","sig":"oQNhYmM="},"#,
                r#""base64_headers":["blob","sig"],"value":1"#
            ))
        );
    }

    #[test]
    fn repeated_header_names_add_a_header_list_in_record_order() {
        let h: [(&[u8], Option<&[u8]>); 5] = [
            (b"b", Some(&[0xa1, 0x03, 0x61, 0x62, 0x63])),
            (b"txn-id", Some(b"x")),
            (b"a", Some(b"1")),
            (b"b", Some(b"text")),
            (b"a", None),
        ];
        // The object keeps the last of each name, so `b` is text there and not in
        // `base64_headers`; the list keeps the binary value it lost.
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"a":null,"b":"text"},"header_list":["#,
                r#"{"name":"b","value":"oQNhYmM=","value_encoding":"base64"},"#,
                r#"{"name":"a","value":"1"},{"name":"b","value":"text"},"#,
                r#"{"name":"a","value":null}],"value":1"#
            ))
        );
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_only_in_header_list() {
        let h: [(&[u8], Option<&[u8]>); 3] = [
            (b"txn-type", Some(b"task")),
            (b"ok", Some(b"1")),
            (&[0xc3, 0x28], Some(&[0xfe])),
        ];
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(concat!(
                r#""key":"k","headers":{"ok":"1"},"header_list":[{"name":"ok","value":"1"},"#,
                r#"{"name":"wyg=","value":"/g==","name_encoding":"base64","value_encoding":"base64"}],"#,
                r#""value":1"#
            ))
        );
    }

    #[test]
    fn dead_letter_headers_of_a_replayed_dead_letter_are_not_rendered() {
        let h: [(&[u8], Option<&[u8]>); 7] = [
            (b"txn-dlq-reason", Some(b"rejected")),
            (b"txn-type", Some(b"task")),
            (b"x", Some(b"1")),
            (b"txn-dlq-source", Some(b"orders.tx/0/2")),
            (b"txn-dlq-reason", Some(b"expired")),
            (b"txn-dlq-\xff", Some(b"not utf-8 either")),
            (b"txn-dlq-timestamp", Some(b"1700000000000")),
        ];
        // Not even in a `header_list`: repeated or binary `txn-dlq-*` names do not make one.
        assert_eq!(
            render_one(Record::new(8, None, Some(b"k"), Some(b"1"), &h)),
            one_task_body(r#""key":"k","headers":{"x":"1"},"value":1"#)
        );
    }

    /// What the raw test app does with a request, given its connection and request number.
    #[derive(Clone, Copy)]
    enum Reply {
        Answer(&'static str),
        /// Answer, then close the connection.
        AnswerAndClose(&'static str),
        Close,
        Hang,
    }

    const OK: Reply = Reply::Answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");

    struct RawApp {
        url: url::Url,
        /// Connections accepted.
        accepted: Arc<std::sync::atomic::AtomicUsize>,
        /// Request heads, in arrival order.
        heads: Arc<Mutex<Vec<String>>>,
    }

    /// A hand-written HTTP/1.1 app on a loopback port, so tests control exactly when
    /// a connection is answered, closed or left hanging.
    async fn raw_app(script: fn(usize, usize) -> Reply) -> RawApp {
        raw_app_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    /// [`raw_app`] listening on `addr`.
    async fn raw_app_on(addr: SocketAddr, script: fn(usize, usize) -> Reply) -> RawApp {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (acc, hs) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let c = acc.fetch_add(1, Ordering::SeqCst);
                let hs = hs.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for r in 0.. {
                        // One request: head, then Content-Length bytes of body.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let mut chunk = [0u8; 4096];
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..head_end + len);
                        hs.lock().unwrap().push(head);
                        match script(c, r) {
                            Reply::Answer(a) => {
                                if sock.write_all(a.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Reply::AnswerAndClose(a) => {
                                let _ = sock.write_all(a.as_bytes()).await;
                                return;
                            }
                            Reply::Close => return,
                            Reply::Hang => std::future::pending::<()>().await,
                        }
                    }
                });
            }
        });
        RawApp {
            url: format!("http://{addr}/txns?v=1").parse().unwrap(),
            accepted,
            heads,
        }
    }

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h
    }

    async fn post(c: &AppClient, timeout_ms: u64) -> Result<AppResponse, DeliveryError> {
        let body = Bytes::from_static(br#"{"id":"x"}"#);
        c.post(&json_headers(), body, Duration::from_millis(timeout_ms))
            .await
    }

    fn accepted(app: &RawApp) -> usize {
        app.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn one_connection_carries_sequential_requests() {
        let app = raw_app(|_, _| OK).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        for _ in 0..3 {
            assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        }
        assert_eq!(accepted(&app), 1);
        let heads = app.heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 3);
        let port = app.url.port().unwrap();
        for h in heads {
            assert!(h.starts_with("post /txns?v=1 http/1.1\r\n"), "{h}");
            assert!(
                h.contains(&format!("\r\nhost: 127.0.0.1:{port}\r\n")),
                "{h}"
            );
            assert!(h.contains("\r\ncontent-length: 10\r\n"), "{h}");
            assert!(h.contains("\r\ncontent-type: application/json\r\n"), "{h}");
        }
    }

    #[tokio::test]
    async fn a_request_the_app_dropped_on_a_kept_alive_connection_goes_again_at_once() {
        // Connection 0 answers its first request and drops the second unanswered, as an
        // app whose idle timeout fires while the request is in flight.
        let app = raw_app(|c, r| if c == 0 && r == 1 { Reply::Close } else { OK }).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        assert_eq!(accepted(&app), 2);
        assert_eq!(app.heads.lock().unwrap().len(), 3);
        // Only once: an app that drops every request is an error for the retry policy.
        let app = raw_app(|c, r| if c == 0 && r == 0 { OK } else { Reply::Close }).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        let e = post(&c, 5000).await.unwrap_err();
        assert!(matches!(e, DeliveryError::Transport(_)), "{e:?}");
        assert!(e.is_retryable());
        assert_eq!(accepted(&app), 2);
    }

    #[tokio::test]
    async fn apps_that_close_after_each_answer_get_a_new_connection_per_request() {
        // `Connection: close`, and a body delimited by the close itself (no length).
        for answer in [
            Reply::Answer("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
            Reply::AnswerAndClose("HTTP/1.1 200 OK\r\n\r\nok"),
        ] {
            static SCRIPT: Mutex<Option<Reply>> = Mutex::new(None);
            *SCRIPT.lock().unwrap() = Some(answer);
            let app = raw_app(|_, _| SCRIPT.lock().unwrap().unwrap()).await;
            let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
            for _ in 0..3 {
                assert_eq!(post(&c, 5000).await.unwrap().status, 200);
            }
            assert_eq!(accepted(&app), 3);
            assert_eq!(app.heads.lock().unwrap().len(), 3);
        }
    }

    #[tokio::test]
    async fn a_silent_app_times_out_and_its_connection_is_not_reused() {
        let app = raw_app(|c, _| if c == 0 { Reply::Hang } else { OK }).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        let started = Instant::now();
        let e = post(&c, 300).await.unwrap_err();
        assert!(matches!(e, DeliveryError::Timeout(_)), "{e:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        assert_eq!(accepted(&app), 2);
    }

    #[tokio::test]
    async fn an_error_answer_keeps_status_retry_after_and_the_start_of_its_body() {
        static ANSWER: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
            let body = "é".repeat(300);
            let a = format!(
                "HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            Box::leak(a.into_boxed_str())
        });
        let app = raw_app(|_, _| Reply::Answer(&ANSWER)).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        let r = post(&c, 5000).await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(r.body, "é".repeat(256));
        // Read in full, so the connection stays.
        post(&c, 5000).await.unwrap();
        assert_eq!(accepted(&app), 1);
    }

    #[tokio::test]
    async fn an_oversized_success_body_is_not_drained_and_its_connection_is_closed() {
        static BIG: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
            let body = "x".repeat(2 * MAX_DRAIN);
            let a = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            Box::leak(a.into_boxed_str())
        });
        let app = raw_app(|c, _| if c == 0 { Reply::Answer(&BIG) } else { OK }).await;
        let c = AppClient::new(&app.url, Duration::from_secs(1)).unwrap();
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        assert_eq!(post(&c, 5000).await.unwrap().status, 200);
        assert_eq!(accepted(&app), 2);
    }

    #[tokio::test]
    async fn a_closed_port_is_a_retryable_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url: url::Url = format!("http://{}/", l.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(l);
        let c = AppClient::new(&url, Duration::from_secs(1)).unwrap();
        let e = post(&c, 5000).await.unwrap_err();
        assert!(matches!(e, DeliveryError::Connect(_)), "{e:?}");
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn a_connect_that_times_out_is_the_apps_absence_not_a_request_timeout() {
        // A listener that never accepts, with a full accept queue: the next SYN is dropped
        // and connecting hangs, as towards an unreachable host.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let _queued = TcpStream::connect(addr).await.unwrap();
        let url: url::Url = format!("http://{addr}/").parse().unwrap();
        // The connect's own timeout, then the request's timeout firing during the connect.
        for (connect_timeout, timeout) in [(300, 5000), (5000, 300)] {
            let metrics = Metrics::new();
            let c = AppClient::new(&url, MS(connect_timeout))
                .unwrap()
                .reporting_to(&metrics);
            let e = post(&c, timeout).await.unwrap_err();
            assert!(
                matches!(&e, DeliveryError::Connect(m) if m.contains("did not complete within 300ms")),
                "{e:?}"
            );
            assert_eq!(c.status().state, AppState::Down);
            assert_eq!(metrics.app_connect_failures.get(), 1);
            assert_eq!(metrics.app_up.get(), 0);
        }
        drop(listener);
    }

    #[test]
    fn an_id_that_cannot_be_a_header_travels_in_the_body_only() {
        let marker_headers: [(&[u8], Option<&[u8]>); 2] = [
            (
                b"traceparent",
                Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
            (b"tracestate", Some(b"bad\nvalue")),
        ];
        let mut txn = ReadyTxn {
            topic: "orders.tx".into(),
            partition: 3,
            id: "order\n42".into(),
            commit_offset: 1207,
            first_offset: 1201,
            tasks: Records::new(),
            marker: Record::new(1207, None, None, None, &marker_headers),
            committed_at: Instant::now(),
        };
        let h = request_headers(&txn);
        assert_eq!(h.get("idempotency-key").unwrap(), "orders.tx/3/1207");
        assert!(h.get("x-txn-id").is_none());
        assert_eq!(
            h.get("traceparent").unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert!(h.get("tracestate").is_none());
        txn.id = "заказ-42".into();
        assert_eq!(
            request_headers(&txn).get("x-txn-id").unwrap().as_bytes(),
            "заказ-42".as_bytes()
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        let later = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn budget(max_attempts: u32, max_elapsed_ms: u64) -> Budget {
        Budget {
            max_attempts,
            max_elapsed: MS(max_elapsed_ms),
            unlimited: false,
        }
    }

    #[test]
    fn a_retry_after_of_zero_or_in_the_past_never_shortens_the_backoff() {
        let b = budget(10, 60_000);
        let past = parse_retry_after(&httpdate::fmt_http_date(
            SystemTime::now() - Duration::from_secs(3600),
        ));
        assert_eq!(past, Some(Duration::ZERO));
        for ra in [None, Some(Duration::ZERO), past, parse_retry_after("0")] {
            assert_eq!(
                b.next_step(1, MS(5), MS(400), ra),
                NextStep::Retry(MS(400)),
                "{ra:?}"
            );
        }
    }

    #[test]
    fn the_delay_is_the_larger_of_retry_after_and_the_backoff() {
        let b = budget(10, 60_000);
        assert_eq!(
            b.next_step(1, MS(0), MS(200), Some(MS(2000))),
            NextStep::Retry(MS(2000))
        );
        assert_eq!(
            b.next_step(1, MS(0), MS(3000), Some(MS(2000))),
            NextStep::Retry(MS(3000))
        );
    }

    #[test]
    fn the_delay_is_capped_by_what_is_left_of_the_budget() {
        let b = budget(10, 10_000);
        // 1.5 s left: a 4 s backoff shrinks to it, and a Retry-After of exactly what is
        // left is still honoured.
        assert_eq!(
            b.next_step(3, MS(8500), MS(4000), None),
            NextStep::Retry(MS(1500))
        );
        assert_eq!(
            b.next_step(3, MS(8500), MS(100), Some(MS(1500))),
            NextStep::Retry(MS(1500))
        );
    }

    #[test]
    fn a_retry_after_longer_than_what_is_left_ends_the_retries_at_once() {
        let b = budget(10, 10_000);
        assert_eq!(
            b.next_step(1, MS(2000), MS(200), Some(Duration::from_secs(60))),
            NextStep::Exhausted(Some(
                "Retry-After 60s is longer than the 8.0s left of retry.max_elapsed".into()
            ))
        );
        // Longer than the whole budget: ends at the first answer.
        assert!(matches!(
            b.next_step(1, MS(0), MS(200), Some(MS(10_001))),
            NextStep::Exhausted(Some(_))
        ));
    }

    #[test]
    fn the_budget_is_attempts_and_time() {
        let b = budget(3, 10_000);
        assert_eq!(
            b.next_step(2, MS(0), MS(200), None),
            NextStep::Retry(MS(200))
        );
        assert_eq!(
            b.next_step(3, MS(0), MS(200), None),
            NextStep::Exhausted(None)
        );
        assert_eq!(
            b.next_step(1, MS(10_000), MS(200), None),
            NextStep::Exhausted(None)
        );
        assert_eq!(
            b.next_step(1, MS(12_000), MS(200), None),
            NextStep::Exhausted(None)
        );
        // `max_attempts = 0`: only time limits it.
        let b = budget(0, 10_000);
        assert_eq!(
            b.next_step(1000, MS(0), MS(200), None),
            NextStep::Retry(MS(200))
        );
    }

    #[test]
    fn block_mode_has_no_budget_and_caps_a_retry_after_at_max_elapsed() {
        let b = Budget {
            max_attempts: 3,
            max_elapsed: MS(10_000),
            unlimited: true,
        };
        assert_eq!(
            b.next_step(50, MS(99_000), MS(200), None),
            NextStep::Retry(MS(200))
        );
        assert_eq!(
            b.next_step(50, MS(99_000), MS(200), Some(Duration::from_secs(3600))),
            NextStep::Retry(MS(10_000))
        );
        assert_eq!(
            b.next_step(50, MS(99_000), MS(200), Some(Duration::ZERO)),
            NextStep::Retry(MS(200))
        );
    }

    fn deliverer(url: &str, extra: &[(&str, &str)]) -> Deliverer {
        let mut s = crate::config::Sources::default();
        for (k, v) in [
            ("topic", "t"),
            ("app.url", url),
            ("retry.initial_backoff", "20ms"),
            ("retry.max_backoff", "100ms"),
        ]
        .iter()
        .chain(extra)
        {
            s.flags.insert(k.to_string(), v.to_string());
        }
        let cfg = Config::load(&s).unwrap();
        Deliverer::new(&cfg, Metrics::new()).unwrap()
    }

    fn ready_txn() -> ReadyTxn {
        ReadyTxn {
            topic: "t".into(),
            partition: 0,
            id: "x".into(),
            commit_offset: 9,
            first_offset: 8,
            tasks: Records::from(task(8, b"1")),
            marker: task(9, b""),
            committed_at: Instant::now(),
        }
    }

    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(MS(5)).await;
        }
    }

    #[tokio::test]
    async fn an_absent_app_spends_no_budget_and_the_delivery_resumes_when_it_listens() {
        let addr = closed_port();
        let d = deliverer(
            &format!("http://{addr}/"),
            &[("retry.max_attempts", "1"), ("retry.max_elapsed", "1s")],
        );
        let m = d.metrics.clone();
        let task = tokio::spawn({
            let d = d.clone();
            async move {
                d.deliver_until(
                    &ready_txn(),
                    &CancellationToken::new(),
                    &CancellationToken::new(),
                )
                .await
            }
        });
        // Past both budgets (one attempt, 1 s), still waiting, nothing counted as an attempt.
        wait_for("connect failures", || m.app_connect_failures.get() >= 5).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!task.is_finished());
        assert_eq!(m.app_up.get(), 0);
        assert_eq!(d.app().status().state, AppState::Down);
        let retryable = m
            .delivery_attempts
            .get_or_create(&ResultLabel {
                result: "retryable",
            })
            .get();
        assert_eq!(retryable, 0);
        let app = raw_app_on(addr, |_, _| OK).await;
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Delivered::Ok { attempts: 1 }), "{r:?}");
        assert_eq!(app.heads.lock().unwrap().len(), 1);
        assert_eq!(m.app_up.get(), 1);
        assert_eq!(d.app().status().state, AppState::Up);
        assert!(d.app().status().down.is_none());
    }

    #[tokio::test]
    async fn a_connect_that_succeeds_elsewhere_wakes_a_waiting_delivery_at_once() {
        let addr = closed_port();
        // Waits between connects would reach 5 s; the wake must not wait for them.
        let d = deliverer(
            &format!("http://{addr}/"),
            &[("retry.initial_backoff", "5s"), ("retry.max_backoff", "5s")],
        );
        let task = tokio::spawn({
            let d = d.clone();
            async move {
                d.deliver_until(
                    &ready_txn(),
                    &CancellationToken::new(),
                    &CancellationToken::new(),
                )
                .await
            }
        });
        let m = d.metrics.clone();
        wait_for("a connect failure", || m.app_connect_failures.get() >= 1).await;
        let _app = raw_app_on(addr, |_, _| OK).await;
        let started = Instant::now();
        d.app().check().await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Delivered::Ok { attempts: 1 }), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stop_ends_a_wait_for_the_app_promptly_and_cut_ends_anything() {
        let addr = closed_port();
        let d = deliverer(&format!("http://{addr}/"), &[]);
        let m = d.metrics.clone();
        for use_stop in [true, false] {
            let (stop, cut) = (CancellationToken::new(), CancellationToken::new());
            let task = tokio::spawn({
                let (d, stop, cut) = (d.clone(), stop.clone(), cut.clone());
                async move { d.deliver_until(&ready_txn(), &stop, &cut).await }
            });
            let before = m.app_connect_failures.get();
            wait_for("connect failures", || {
                m.app_connect_failures.get() >= before + 3
            })
            .await;
            let t = Instant::now();
            if use_stop {
                stop.cancel()
            } else {
                cut.cancel()
            }
            let r = tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(r, Delivered::Cancelled), "{r:?}");
            assert!(
                t.elapsed() < Duration::from_millis(200),
                "{:?}",
                t.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn retry_after_zero_waits_the_backoff_and_a_too_long_one_ends_at_once() {
        // 503 with `Retry-After: 0` three times, then 200.
        let app = raw_app(|c, r| {
            if c == 0 && r < 3 {
                Reply::Answer("HTTP/1.1 503 Busy\r\nretry-after: 0\r\ncontent-length: 0\r\n\r\n")
            } else {
                OK
            }
        })
        .await;
        let d = deliverer(
            app.url.as_str(),
            &[
                ("retry.initial_backoff", "100ms"),
                ("retry.max_backoff", "1s"),
            ],
        );
        let started = Instant::now();
        let r = d.deliver(&ready_txn(), &CancellationToken::new()).await;
        assert!(matches!(r, Delivered::Ok { attempts: 4 }), "{r:?}");
        // At least 100 + 200 + 400 ms of backoff.
        assert!(started.elapsed() >= MS(700), "{:?}", started.elapsed());
        // 503 with `Retry-After: 60` against a 10 s budget: one attempt, then dead.
        let app = raw_app(|_, _| {
            Reply::Answer("HTTP/1.1 503 Busy\r\nretry-after: 60\r\ncontent-length: 0\r\n\r\n")
        })
        .await;
        let d = deliverer(app.url.as_str(), &[("retry.max_elapsed", "10s")]);
        let started = Instant::now();
        let r = d.deliver(&ready_txn(), &CancellationToken::new()).await;
        match r {
            Delivered::Failed {
                reason,
                error,
                attempts,
            } => {
                assert_eq!((reason, attempts), ("retries_exhausted", 1));
                assert!(
                    error.starts_with("app answered 503; Retry-After 60s is longer than the "),
                    "{error}"
                );
            }
            r => panic!("{r:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn classification_matches_the_contract() {
        let s = |status| DeliveryError::Status {
            status,
            retry_after: None,
            body: String::new(),
        };
        for code in [408, 425, 429, 500, 502, 503, 599] {
            assert!(s(code).is_retryable(), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 413, 422] {
            assert!(!s(code).is_retryable(), "{code}");
        }
        assert!(DeliveryError::Connect("refused".into()).is_retryable());
    }
}
