//! The HTTP-side wire contract: POSTs a committed transaction to the app and classifies
//! its answer (2xx/409 delivered; 408/425/429/5xx/connect/timeout retried; other 4xx
//! permanent), retrying with exponential backoff and jitter that honours `Retry-After`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
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
/// instead of a map node and two `String`s per header (BENCHMARKS.md, "Delivery").
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
    /// The app did not answer within `app.timeout`.
    #[error("app did not answer within {0:?}")]
    Timeout(Duration),
    /// Connecting failed (app down or not started yet).
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
/// been read in full (BENCHMARKS.md, change 6). Dropping a request mid-flight (timeout,
/// revoke, shutdown) drops its connection with it.
#[derive(Clone)]
pub struct AppClient {
    target: Arc<Target>,
    idle: Arc<Mutex<Vec<Conn>>>,
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
                dest,
                host,
                uri,
                connect_timeout,
            }),
            idle: Arc::default(),
        })
    }

    /// POSTs `body` with `headers` (plus `Host` and `Content-Length`), within `timeout`
    /// from the first connect to the last byte of the answer.
    pub async fn post(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<AppResponse, DeliveryError> {
        match tokio::time::timeout(timeout, self.exchange(headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(DeliveryError::Timeout(timeout)),
        }
    }

    async fn exchange(
        &self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<AppResponse, DeliveryError> {
        let (mut conn, mut reused) = match self.take_idle() {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
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
                    conn = self.connect().await?;
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
            Ok(Err(e)) => return Err(DeliveryError::Connect(e.to_string())),
            Err(_) => return Err(DeliveryError::Timeout(t.connect_timeout)),
        };
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

/// The HTTP client and retry policy.
#[derive(Clone)]
pub struct Deliverer {
    app: AppClient,
    timeout: Duration,
    names: HeaderNames,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_attempts: u32,
    max_elapsed: Duration,
    block: bool,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    /// A deliverer for `cfg`.
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Deliverer, TargetError> {
        let app = AppClient::new(&cfg.app.url, Duration::from_secs(5).min(cfg.app.timeout))?;
        Ok(Deliverer {
            app,
            timeout: cfg.app.timeout,
            names: cfg.headers.clone(),
            initial_backoff: cfg.retry.initial_backoff,
            max_backoff: cfg.retry.max_backoff,
            max_attempts: cfg.retry.max_attempts,
            max_elapsed: cfg.retry.max_elapsed,
            block: cfg.on_failure == OnFailure::Block,
            metrics,
        })
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

    /// Delivers `txn`, retrying per policy, until it succeeds, fails for good or `cancel` fires.
    pub async fn deliver(&self, txn: &ReadyTxn, cancel: &CancellationToken) -> Delivered {
        let body = Bytes::from(render_body(txn, &self.names));
        let headers = request_headers(txn);
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            attempts += 1;
            let result = tokio::select! {
                r = self.attempt(&headers, &body) => r,
                _ = cancel.cancelled() => return Delivered::Cancelled,
            };
            let err = match result {
                Ok(status) => {
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
                Err(e) => e,
            };
            let retryable = err.is_retryable();
            let result = if retryable { "retryable" } else { "permanent" };
            self.metrics
                .delivery_attempts
                .get_or_create(&ResultLabel { result })
                .inc();
            let out_of_budget = !self.block
                && ((self.max_attempts > 0 && attempts >= self.max_attempts)
                    || started.elapsed() >= self.max_elapsed);
            if !retryable && !self.block {
                tracing::warn!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, error = %err, "app rejected transaction");
                return Delivered::Failed {
                    reason: "rejected",
                    error: err.to_string(),
                    attempts,
                };
            }
            if out_of_budget {
                tracing::warn!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, error = %err, "delivery retries exhausted");
                return Delivered::Failed {
                    reason: "retries_exhausted",
                    error: err.to_string(),
                    attempts,
                };
            }
            let mut delay = backoff.next().unwrap_or(self.max_backoff);
            if let Some(ra) = err.retry_after() {
                // The app knows its own recovery time better than our backoff does; only
                // the elapsed budget caps it, so a bogus value cannot park a partition.
                delay = ra.min(self.max_elapsed);
            }
            tracing::info!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, attempts, delay_ms = delay.as_millis() as u64, error = %err, "delivery failed, retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Delivered::Cancelled,
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
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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
