//! Typed configuration: layered defaults < TOML file < `TXN_SIDECAR_*` env < flags, validated once.
//!
//! Every setting has one dotted key (`app.url`); its environment variable is that key
//! upper-cased with dots as underscores behind the prefix (`TXN_SIDECAR_APP_URL`).
//! librdkafka properties live under `kafka.` and pass through untouched. Loading
//! collects every problem before failing, so a user fixes a bad config in one go.

mod build;
mod kafka;
mod reader;
mod sources;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::Dict;
use figment::Figment;

pub use kafka::{is_secret_property, GroupProtocol};
pub use sources::{env_key, env_name, is_service_link_variable};

use build::build;
use reader::Reader;
use sources::Layer;

/// Prefix of every environment variable the sidecar reads.
pub const ENV_PREFIX: &str = "TXN_SIDECAR_";

/// The marker protocol producers use to tag records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `txn-id` / `txn-type` / `txn-count` headers; the key is the id when `txn-id` is absent.
    Headers,
    /// Record key `task-<id>`, `commit-<id>` or `clear-<id>`.
    KeyPrefix,
}

impl Protocol {
    /// The name used in config and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Headers => "headers",
            Protocol::KeyPrefix => "key-prefix",
        }
    }
}

/// What to do with a transaction the app rejects or that runs out of retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Write it to the dead-letter topic and move on.
    DeadLetter,
    /// Retry forever; its partition waits.
    Block,
}

impl OnFailure {
    /// The name used in config and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::DeadLetter => "dead-letter",
            OnFailure::Block => "block",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line: what log collectors in containers expect.
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Names of the marker headers (headers protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNames {
    /// Header carrying the transaction id (`txn-id`).
    pub id: String,
    /// Header carrying `task` | `commit` | `abort` (`txn-type`).
    pub kind: String,
    /// Optional header on a commit with the expected task count (`txn-count`).
    pub count: String,
}

/// Where and how transactions are POSTed.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Endpoint that receives each committed transaction.
    pub url: url::Url,
    /// Timeout of one HTTP attempt.
    pub timeout: Duration,
    /// Where `/readyz` checks that the app answers; any HTTP status counts as up.
    pub health_url: Option<url::Url>,
}

/// Retry policy for retryable delivery failures.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// First backoff delay.
    pub initial_backoff: Duration,
    /// Cap on the exponential backoff (before jitter); a longer `Retry-After` is
    /// honoured within what is left of `max_elapsed`.
    pub max_backoff: Duration,
    /// Answered attempts per transaction before it counts as failed (`0` = unlimited);
    /// connects that fail (the app absent) are not attempts.
    pub max_attempts: u32,
    /// Time budget per transaction before it counts as failed, from its first attempt
    /// less the time spent waiting for an absent app.
    pub max_elapsed: Duration,
}

/// Admin HTTP server.
#[derive(Clone)]
pub struct AdminConfig {
    /// Listen address of `/metrics`, `/healthz`, `/readyz`, `/v1/*`.
    pub addr: SocketAddr,
    /// Bearer token mutating endpoints require; none disables them.
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| REDACTED))
            .finish()
    }
}

/// Bounds that keep one bad producer from exhausting the sidecar.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most tasks one transaction may have; more is dead-lettered as `too_large`.
    pub max_tasks_per_txn: usize,
    /// Most bytes (keys + values + headers) one transaction may stage.
    pub max_txn_bytes: u64,
    /// Budget of staged bytes across all partitions; above it the fullest partitions pause.
    pub max_staged_bytes: u64,
    /// Committed transactions queued for delivery per partition before it pauses; it
    /// resumes once half of them are delivered.
    pub max_queued_per_partition: usize,
}

/// The validated configuration of `txn-sidecar run`.
#[derive(Clone)]
pub struct Config {
    /// Problems that do not stop the start (ignored `TXN_SIDECAR_*` variables), logged
    /// once logging is up.
    pub warnings: Vec<String>,
    /// Bootstrap servers.
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group: String,
    /// Marker protocol.
    pub protocol: Protocol,
    /// Marker header names.
    pub headers: HeaderNames,
    /// Dead-letter topic; `None` means `<source topic>.dlq`.
    pub dlq_topic: Option<String>,
    /// Age after which an open transaction is dead-lettered as `expired`.
    pub txn_timeout: Duration,
    /// Policy for transactions that fail permanently or exhaust retries.
    pub on_failure: OnFailure,
    /// The app endpoint.
    pub app: AppConfig,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Admin server.
    pub admin: AdminConfig,
    /// Bounds.
    pub limits: Limits,
    /// How often safe offsets are committed.
    pub commit_interval: Duration,
    /// How long SIGTERM waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    /// How long a revoke waits for an in-flight delivery before cutting it off.
    pub rebalance_grace: Duration,
    /// Threads that read partition queues and stage records (0: the consumer thread
    /// does, the default). From `reader_threads`; at most 64.
    pub reader_threads: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// librdkafka properties passed through to every client.
    pub kafka: BTreeMap<String, String>,
}

impl fmt::Debug for Config {
    /// Debug output is the redacted TOML: a `{:?}` in a log line must not leak a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_toml())
    }
}

impl Config {
    /// The dead-letter topic for records of `source_topic`.
    pub fn dlq_topic_for(&self, source_topic: &str) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{source_topic}.dlq"))
    }

    /// The consumer group protocol `kafka.group.protocol` selects.
    pub fn group_protocol(&self) -> GroupProtocol {
        GroupProtocol::of(&self.kafka)
    }

    /// A minimal valid config for `topic` on `brokers`; tests and the demo start here.
    pub fn for_topic(brokers: &str, topic: &str) -> Config {
        let mut sources = Sources::default();
        sources.flags.insert("brokers".into(), brokers.into());
        sources.flags.insert("topic".into(), topic.into());
        Config::load(&sources).expect("the built-in defaults are valid")
    }

    /// Loads and validates the layers in `sources`.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = &sources.file {
            if !path.exists() {
                return Err(ConfigError::single(
                    "config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Layer::from_env("environment", &sources.env));
        figment = figment.merge(Layer::from_flat("command-line flag", &sources.flags));
        let root = match figment.extract::<Dict>() {
            Ok(d) => d,
            Err(e) => return Err(ConfigError::single("config", one_line(&e.to_string()))),
        };
        let mut r = Reader {
            figment: &figment,
            root: &root,
            sources,
            errors: Vec::new(),
        };
        let cfg = build(&mut r);
        r.check_unknown();
        match (cfg, r.errors.is_empty()) {
            (Some(cfg), true) => Ok(cfg),
            _ => Err(ConfigError { errors: r.errors }),
        }
    }

    /// The effective config as TOML with every secret replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        let mut out = String::new();
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let d = |d: Duration| q(&humantime::format_duration(d).to_string());
        out.push_str(&format!("brokers = {}\n", q(&self.brokers)));
        out.push_str(&format!("topic = {}\n", q(&self.topics.join(","))));
        out.push_str(&format!("group = {}\n", q(&self.group)));
        out.push_str(&format!("protocol = {}\n", q(self.protocol.as_str())));
        if let Some(t) = &self.dlq_topic {
            out.push_str(&format!("dlq_topic = {}\n", q(t)));
        }
        out.push_str(&format!("txn_timeout = {}\n", d(self.txn_timeout)));
        out.push_str(&format!("on_failure = {}\n", q(self.on_failure.as_str())));
        out.push_str(&format!("commit_interval = {}\n", d(self.commit_interval)));
        out.push_str(&format!("shutdown_grace = {}\n", d(self.shutdown_grace)));
        out.push_str(&format!("rebalance_grace = {}\n", d(self.rebalance_grace)));
        out.push_str(&format!("reader_threads = {}\n", self.reader_threads));
        let lf = match self.log_format {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        };
        out.push_str(&format!("log_format = {}\n", q(lf)));
        out.push_str("\n[app]\n");
        out.push_str(&format!("url = {}\n", q(self.app.url.as_str())));
        out.push_str(&format!("timeout = {}\n", d(self.app.timeout)));
        if let Some(h) = &self.app.health_url {
            out.push_str(&format!("health_url = {}\n", q(h.as_str())));
        }
        out.push_str("\n[retry]\n");
        out.push_str(&format!(
            "initial_backoff = {}\n",
            d(self.retry.initial_backoff)
        ));
        out.push_str(&format!("max_backoff = {}\n", d(self.retry.max_backoff)));
        out.push_str(&format!("max_attempts = {}\n", self.retry.max_attempts));
        out.push_str(&format!("max_elapsed = {}\n", d(self.retry.max_elapsed)));
        out.push_str("\n[admin]\n");
        out.push_str(&format!("addr = {}\n", q(&self.admin.addr.to_string())));
        if self.admin.token.is_some() {
            out.push_str(&format!("token = {}\n", q(REDACTED)));
        }
        out.push_str("\n[headers]\n");
        out.push_str(&format!("id = {}\n", q(&self.headers.id)));
        out.push_str(&format!("type = {}\n", q(&self.headers.kind)));
        out.push_str(&format!("count = {}\n", q(&self.headers.count)));
        out.push_str("\n[limits]\n");
        let l = &self.limits;
        out.push_str(&format!("max_tasks_per_txn = {}\n", l.max_tasks_per_txn));
        out.push_str(&format!("max_txn_bytes = {}\n", l.max_txn_bytes));
        out.push_str(&format!("max_staged_bytes = {}\n", l.max_staged_bytes));
        out.push_str(&format!(
            "max_queued_per_partition = {}\n",
            l.max_queued_per_partition
        ));
        out.push_str("\n[kafka]\n");
        for (k, v) in &self.kafka {
            let v = if is_secret_property(k) { REDACTED } else { v };
            out.push_str(&format!("{} = {}\n", q(k), q(v)));
        }
        out
    }

    /// librdkafka properties with secrets replaced, for logs.
    pub fn redacted_kafka(&self) -> BTreeMap<String, String> {
        self.kafka
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    REDACTED.to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }
}

/// A multi-line message (a TOML parse error draws the offending line) as one line: the
/// text lines joined, the drawing left out.
fn one_line(msg: &str) -> String {
    let parts: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .collect();
    parts.join(": ")
}

/// What replaces a secret in any output.
pub const REDACTED: &str = "<redacted>";

/// The raw layers a config is built from.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// `TXN_SIDECAR_*` environment variables (name → value).
    pub env: BTreeMap<String, String>,
    /// Command-line flags as dotted keys (`app.url` → value); `kafka.<prop>` for `-X`.
    pub flags: BTreeMap<String, String>,
}

impl Sources {
    /// Collects `TXN_SIDECAR_*` variables from the process environment.
    pub fn env_from_process() -> BTreeMap<String, String> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect()
    }
}

/// Every problem found in a config, each naming its key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// `(key, problem)` pairs.
    pub errors: Vec<(String, String)>,
}

impl ConfigError {
    fn single(key: &str, msg: String) -> ConfigError {
        ConfigError {
            errors: vec![(key.to_string(), msg)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: ")?;
        for (i, (k, m)) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{k}: {m}")?;
        }
        Ok(())
    }
}

/// The longest duration any setting takes: 24 days.
///
/// Durations feed `Instant` arithmetic (a revoke's deadline, inside a librdkafka
/// callback), millisecond counters and, as librdkafka timeouts, C `int` milliseconds
/// (at most 2^31 − 1 ms, about 24.8 days). Anything longer would overflow one of them,
/// so it is refused up front rather than panicking or wrapping at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 24 * 60 * 60);

/// What a revoke may take beyond `rebalance_grace`: after the grace, a cut-off delivery
/// gets up to 5 s to stop, then the safe offsets are committed synchronously.
pub const REVOKE_MARGIN: Duration = Duration::from_secs(5);

/// Keys of every scalar setting; `kafka.*` is free-form.
const KNOWN_KEYS: &[&str] = &[
    "brokers",
    "topic",
    "group",
    "protocol",
    "dlq_topic",
    "txn_timeout",
    "on_failure",
    "commit_interval",
    "shutdown_grace",
    "rebalance_grace",
    "reader_threads",
    "log_format",
    "app.url",
    "app.timeout",
    "app.health_url",
    "retry.initial_backoff",
    "retry.max_backoff",
    "retry.max_attempts",
    "retry.max_elapsed",
    "admin.addr",
    "admin.token",
    "headers.id",
    "headers.type",
    "headers.count",
    "limits.max_tasks_per_txn",
    "limits.max_txn_bytes",
    "limits.max_staged_bytes",
    "limits.max_queued_per_partition",
];
