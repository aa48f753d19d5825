//! The app's HTTP/1.1 client: [`AppClient`] with keep-alive connections driven in the
//! caller's task and an idle pool, and the reading of its answers ([`AppResponse`],
//! [`parse_retry_after`]). The app's reachability it records lives in `health`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, HOST, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;

use crate::telemetry::Metrics;

use super::health::Health;
pub use super::health::{AppState, AppStatus};
use super::DeliveryError;

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

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(src) = cur.source() {
        cur = src;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use http::header::CONTENT_TYPE;

    use super::*;
    use crate::delivery::testing::{raw_app, RawApp, Reply, MS, OK};

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
}
