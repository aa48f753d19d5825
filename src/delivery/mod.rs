//! The HTTP-side wire contract: POSTs a committed transaction to the app and classifies
//! its answer (2xx/409 delivered; 408/425/429/5xx/timeout retried; other 4xx permanent),
//! retrying with exponential backoff and jitter that a `Retry-After` can lengthen but never
//! shorten.
//!
//! A connection that cannot be opened is not an answer: the app is absent (restarting,
//! crash-looping), which is not the transaction's fault. Such a delivery waits for the app
//! without spending its retry budget, and the client's [`AppState`] (exported as
//! `txn_sidecar_app_up`, read by `/readyz`) says so.
//!
//! The request body the app receives is rendered in `body`; the app's HTTP/1.1 client
//! (keep-alive connections) is `client`, and the reachability it records `health`. This module holds the request
//! headers, the retry policy ([`Budget`]) and the [`Deliverer`] that applies it.

mod body;
mod client;
mod health;
#[cfg(test)]
mod testing;

pub use body::render_body;
pub use client::{parse_retry_after, AppClient, AppResponse, AppState, AppStatus, TargetError};

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, HeaderNames, OnFailure};
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
            // The app answered or took the connection: a later absence is a new one, so
            // its wait starts again from the initial backoff (not from where the last
            // absence left it) and is logged again.
            app_wait = self.backoff(app_wait_max);
            waited_for_app = false;
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use super::testing::{raw_app, raw_app_on, task, Reply, MS, OK};
    use super::*;

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

    /// Takes one connection on `listener`, answers its one request with `answer`
    /// (which must close the connection) and drops the listener.
    async fn answer_once_then_close(listener: tokio::net::TcpListener, answer: &'static str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut sock, _) = listener.accept().await.unwrap();
        drop(listener);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request never came whole");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
        sock.write_all(answer.as_bytes()).await.unwrap();
    }

    #[tokio::test]
    async fn a_new_absence_of_the_app_waits_from_the_initial_backoff_again() {
        let addr = closed_port();
        let d = deliverer(
            &format!("http://{addr}/"),
            &[
                ("retry.initial_backoff", "20ms"),
                ("retry.max_backoff", "1s"),
                ("retry.max_attempts", "10"),
            ],
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
        // A long absence: the waits between connects grow to the 1 s cap.
        wait_for("the waits to reach their cap", || {
            m.app_connect_failures.get() >= 8
        })
        .await;
        // The app is back for one answer (503, connection closed), then gone again.
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        answer_once_then_close(
            listener,
            "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let (failures, t) = (m.app_connect_failures.get(), Instant::now());
        // Waits of 20, 40, 80, 160 ms (each up to twice that with jitter): at least three
        // connects in 700 ms. Waits that stayed at the cap would allow at most one.
        tokio::time::sleep(MS(700)).await;
        let again = m.app_connect_failures.get() - failures;
        assert!(
            again >= 3,
            "{again} connects in {:?} after the app left again",
            t.elapsed()
        );
        let app = raw_app_on(addr, |_, _| OK).await;
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(r, Delivered::Ok { attempts: 2 }), "{r:?}");
        assert_eq!(app.heads.lock().unwrap().len(), 1);
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
