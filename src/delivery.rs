//! The HTTP-side wire contract: POSTs a committed transaction to the app and classifies
//! its answer (2xx/409 delivered; 408/425/429/5xx/connect/timeout retried; other 4xx
//! permanent), retrying with exponential backoff and jitter that honours `Retry-After`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;
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
    key: Option<&'a str>,
    headers: TaskHeaders<'a>,
    value: TaskValue<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'static str>,
}

/// A task's headers as a JSON object: sorted by name, the last of a repeated name wins.
///
/// Borrowed from the staged record, so rendering allocates one small `Vec` per task
/// instead of a map node and two `String`s per header (BENCHMARKS.md, "Delivery").
struct TaskHeaders<'a>(Vec<(&'a str, Option<Cow<'a, str>>)>);

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

#[derive(Serialize)]
#[serde(untagged)]
enum TaskValue<'a> {
    Json(&'a RawValue),
    Text(&'a str),
    Base64(String),
    Null,
}

/// Renders the request body of the brief's HTTP contract.
pub fn render_body(txn: &ReadyTxn, names: &HeaderNames) -> Vec<u8> {
    let marker_headers = [names.id.as_str(), names.kind.as_str(), names.count.as_str()];
    let tasks: Vec<TaskBody<'_>> = txn
        .tasks
        .iter()
        .map(|t| {
            let mut headers: Vec<(&str, Option<Cow<'_, str>>)> =
                Vec::with_capacity(t.header_count());
            for (k, v) in t.headers() {
                let Ok(k) = std::str::from_utf8(k) else {
                    continue;
                };
                if marker_headers.contains(&k) {
                    continue;
                }
                headers.push((k, v.map(String::from_utf8_lossy)));
            }
            // Stable sort, then keep the last of each name: what a JSON object built by
            // inserting in record order would hold.
            headers.sort_by(|a, b| a.0.cmp(b.0));
            headers.reverse();
            headers.dedup_by(|later, kept| later.0 == kept.0);
            headers.reverse();
            let (value, encoding) = match t.value() {
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
                key: t.key().and_then(|k| std::str::from_utf8(k).ok()),
                headers: TaskHeaders(headers),
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
    serde_json::to_vec(&body).unwrap_or_default()
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

/// The pooled HTTP client and retry policy.
#[derive(Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    url: url::Url,
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
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Deliverer, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5).min(cfg.app.timeout))
            .no_proxy()
            .build()?;
        Ok(Deliverer {
            client,
            url: cfg.app.url.clone(),
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

    /// The shared HTTP client (the admin server reuses it for `/readyz`).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    async fn attempt(&self, txn: &ReadyTxn, body: &[u8]) -> Result<u16, DeliveryError> {
        let mut req = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .header("idempotency-key", txn.idempotency_key())
            .header("x-txn-id", txn.id.as_str())
            .body(body.to_vec());
        for name in ["traceparent", "tracestate"] {
            if let Some(Some(v)) = txn.marker.header(name) {
                if let Ok(v) = std::str::from_utf8(v) {
                    req = req.header(name, v);
                }
            }
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                DeliveryError::Timeout(self.timeout)
            } else if e.is_connect() {
                DeliveryError::Connect(root_cause(&e))
            } else {
                DeliveryError::Transport(root_cause(&e))
            }
        })?;
        let status = resp.status().as_u16();
        if resp.status().is_success() || status == 409 {
            // Drain so the connection goes back to the pool.
            let _ = resp.bytes().await;
            return Ok(status);
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = resp.text().await.unwrap_or_default();
        Err(DeliveryError::Status {
            status,
            retry_after,
            body: body.chars().take(256).collect(),
        })
    }

    /// Delivers `txn`, retrying per policy, until it succeeds, fails for good or `cancel` fires.
    pub async fn deliver(&self, txn: &ReadyTxn, cancel: &CancellationToken) -> Delivered {
        let body = render_body(txn, &self.names);
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
                r = self.attempt(txn, &body) => r,
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

    #[test]
    fn task_headers_are_sorted_deduplicated_last_wins_and_escaped() {
        let h: [(&[u8], Option<&[u8]>); 7] = [
            (b"zeta", Some(b"1")),
            (b"txn-type", Some(b"task")),
            (b"alpha", Some(b"first")),
            (b"nul", None),
            (b"alpha", Some(b"second \"quoted\"")),
            (b"txn-id", Some(b"x")),
            (b"\xff", Some(b"dropped: not utf-8")),
        ];
        let txn = ReadyTxn {
            topic: "t".into(),
            partition: 0,
            id: "x".into(),
            commit_offset: 9,
            first_offset: 8,
            tasks: Records::from(Record::new(8, Some(5), None, None, &h)),
            marker: task(9, b""),
            committed_at: Instant::now(),
        };
        assert_eq!(
            String::from_utf8(render_body(&txn, &names())).unwrap(),
            r#"{"id":"x","topic":"t","partition":0,"commit_offset":9,"tasks":[{"offset":8,"key":null,"headers":{"alpha":"second \"quoted\"","nul":null,"zeta":"1"},"value":null}]}"#
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
