//! Typed configuration: layered defaults < TOML file < `TXN_SIDECAR_*` env < flags, validated once.
//!
//! Every setting has one dotted key (`app.url`); its environment variable is that key
//! upper-cased with dots as underscores behind the prefix (`TXN_SIDECAR_APP_URL`).
//! librdkafka properties live under `kafka.` and pass through untouched. Loading
//! collects every problem before failing, so a user fixes a bad config in one go.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

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

/// Whether a librdkafka property holds a credential that must never be printed.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || k == "ssl.key.pem"
        || k.contains("sasl.oauthbearer.config")
        || k.contains("token")
}

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

/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

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

/// The environment variable of a setting key.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace(['.', '-'], "_").to_ascii_uppercase()
    )
}

/// A figment provider over a flat `dotted key → string` map.
struct Layer {
    name: &'static str,
    dict: Dict,
}

impl Layer {
    fn from_flat(name: &'static str, flat: &BTreeMap<String, String>) -> Layer {
        let mut dict = Dict::new();
        for (k, v) in flat {
            insert_dotted(&mut dict, k, v);
        }
        Layer { name, dict }
    }

    fn from_env(name: &'static str, env: &BTreeMap<String, String>) -> Layer {
        let mut dict = Dict::new();
        for (var, v) in env {
            if let Some(key) = env_key(var) {
                insert_dotted(&mut dict, &key, v);
            }
        }
        Layer { name, dict }
    }
}

/// The setting key an environment variable sets, if any.
///
/// `TXN_SIDECAR_<KEY>` sets a known key and `TXN_SIDECAR_KAFKA_<PROP>` the librdkafka
/// property `<prop>` (lower-cased, underscores as dots). Every other variable is ignored,
/// and so is anything shaped like a variable Kubernetes injects for a Service (see
/// [`is_service_link_variable`]): a Service named `txn-sidecar-kafka` yields
/// `TXN_SIDECAR_KAFKA_SERVICE_HOST`, which must not become a property `service.host`.
pub fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    if is_service_link_variable(var) {
        return None;
    }
    if let Some(key) = KNOWN_KEYS.iter().find(|k| env_name(k) == var) {
        return Some(key.to_string());
    }
    let prop = rest.strip_prefix("KAFKA_")?;
    if prop.is_empty() {
        return None;
    }
    Some(format!(
        "kafka.{}",
        prop.to_ascii_lowercase().replace('_', ".")
    ))
}

/// Whether `var` has the shape of a variable the kubelet injects for every Service in
/// the namespace (`enableServiceLinks`, on unless a pod turns it off), whatever the
/// Service is called: `<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT`,
/// `<SVC>_SERVICE_PORT_<PORT NAME>`, `<SVC>_PORT`, `<SVC>_PORT_<n>_<PROTO>` and the
/// latter with `_PROTO`, `_PORT` or `_ADDR` appended (Docker's legacy links use the same
/// `_PORT` shapes). No setting's variable and no librdkafka property has these shapes,
/// and a unit test keeps it so.
pub fn is_service_link_variable(var: &str) -> bool {
    if var.ends_with("_SERVICE_HOST")
        || var.ends_with("_SERVICE_PORT")
        || var.contains("_SERVICE_PORT_")
        || var.ends_with("_PORT")
    {
        return true;
    }
    let mut rest = var;
    while let Some(i) = rest.find("_PORT_") {
        let after = &rest[i + "_PORT_".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            let tail = &after[digits..];
            for proto in ["_TCP", "_UDP", "_SCTP"] {
                if let Some(t) = tail.strip_prefix(proto) {
                    if matches!(t, "" | "_PROTO" | "_PORT" | "_ADDR") {
                        return true;
                    }
                }
            }
        }
        rest = &rest[i + 1..];
    }
    false
}

fn insert_dotted(dict: &mut Dict, key: &str, v: &str) {
    let value = Value::from(v.to_string());
    if let Some(prop) = key.strip_prefix("kafka.") {
        let kafka = dict
            .entry("kafka".to_string())
            .or_insert_with(|| Value::from(Dict::new()));
        if let Value::Dict(_, d) = kafka {
            d.insert(prop.to_string(), value);
        }
        return;
    }
    match key.split_once('.') {
        Some((section, leaf)) => {
            let sec = dict
                .entry(section.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, d) = sec {
                d.insert(leaf.to_string(), value);
            }
        }
        None => {
            dict.insert(key.to_string(), value);
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// Typed access to the merged layers that records every problem.
struct Reader<'a> {
    figment: &'a Figment,
    root: &'a Dict,
    sources: &'a Sources,
    errors: Vec<(String, String)>,
}

impl Reader<'_> {
    fn value(&self, key: &str) -> Option<Value> {
        let (section, leaf) = match key.split_once('.') {
            Some((s, l)) => (Some(s), l),
            None => (None, key),
        };
        let v = match section {
            Some(s) => match self.root.get(s) {
                Some(Value::Dict(_, d)) => d.get(leaf).cloned(),
                _ => None,
            },
            None => self.root.get(leaf).cloned(),
        };
        // An empty string from env or a flag means "unset", as in most tools.
        match v {
            Some(Value::String(_, s)) if s.is_empty() => None,
            v => v,
        }
    }

    fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(md) if md.name == "environment" => format!(" (from env {})", env_name(key)),
            Some(md) if md.name == "command-line flag" => " (from a command-line flag)".into(),
            Some(md) => match &md.source {
                Some(src) => format!(" (from {src})"),
                None => format!(" (from {})", md.name),
            },
            None => String::new(),
        }
    }

    /// Where the librdkafka property `prop` came from (figment cannot find dotted
    /// property names inside the `kafka` table): the last layer that sets it.
    fn kafka_origin(&self, prop: &str) -> String {
        let key = format!("kafka.{prop}");
        if self.sources.flags.contains_key(&key) {
            return " (from a command-line flag)".into();
        }
        if let Some(var) = self
            .sources
            .env
            .keys()
            .rev()
            .find(|var| env_key(var).as_deref() == Some(key.as_str()))
        {
            return format!(" (from env {var})");
        }
        match &self.sources.file {
            Some(f) => format!(" (from {})", f.display()),
            None => String::new(),
        }
    }

    /// Records a problem with the librdkafka property `prop`, naming where it came from.
    fn fail_kafka(&mut self, prop: &str, msg: impl Into<String>) {
        let origin = self.kafka_origin(prop);
        self.errors
            .push((format!("kafka.{prop}"), format!("{}{origin}", msg.into())));
    }

    fn fail(&mut self, key: &str, msg: impl Into<String>) {
        let origin = self.origin(key);
        self.errors
            .push((key.to_string(), format!("{}{origin}", msg.into())));
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.value(key)? {
            Value::String(_, s) => Some(interpolate(&s).unwrap_or_else(|e| {
                self.fail(key, e);
                String::new()
            })),
            Value::Num(..) | Value::Bool(..) | Value::Char(..) => {
                self.fail(key, "expected a string");
                None
            }
            _ => {
                self.fail(key, "expected a string");
                None
            }
        }
    }

    fn string_or(&mut self, key: &str, default: &str) -> String {
        self.string(key).unwrap_or_else(|| default.to_string())
    }

    fn u64_or(&mut self, key: &str, default: u64) -> u64 {
        match self.value(key) {
            None => default,
            // TOML integers are signed: `to_u128` alone would refuse every one of them.
            Some(Value::Num(_, n)) => match n.to_u128_lossy().and_then(|v| u64::try_from(v).ok()) {
                Some(v) => v,
                None => {
                    self.fail(key, "expected a non-negative integer");
                    default
                }
            },
            Some(Value::String(_, s)) => match parse_size(&s) {
                Some(v) => v,
                None => {
                    self.fail(key, format!("expected a non-negative integer, got {s:?}"));
                    default
                }
            },
            Some(_) => {
                self.fail(key, "expected a non-negative integer");
                default
            }
        }
    }

    fn duration_or(&mut self, key: &str, default: Duration) -> Duration {
        let (d, shown) = match self.value(key) {
            None => return default,
            Some(Value::String(_, s)) => match humantime::parse_duration(s.trim()) {
                Ok(d) => (d, format!("{s:?}")),
                Err(e) => {
                    self.fail(
                        key,
                        format!(
                            "invalid duration {s:?}: {e} (use e.g. \"500ms\", \"30s\", \"5m\")"
                        ),
                    );
                    return default;
                }
            },
            Some(Value::Num(_, n)) => match n.to_u128_lossy() {
                // A bare number is seconds, as most operators would read it.
                Some(v) => (
                    Duration::from_secs(v.min(u64::MAX as u128) as u64),
                    v.to_string(),
                ),
                None => {
                    self.fail(key, "expected a duration such as \"30s\"");
                    return default;
                }
            },
            Some(_) => {
                self.fail(key, "expected a duration such as \"30s\"");
                return default;
            }
        };
        if d > MAX_DURATION {
            self.fail(
                key,
                format!(
                    "{shown} is too long: a duration is at most {} (longer ones overflow the \
                     32-bit millisecond timeouts of librdkafka)",
                    humantime::format_duration(MAX_DURATION)
                ),
            );
            return default;
        }
        d
    }

    fn topics(&mut self) -> Vec<String> {
        let raw: Vec<String> = match self.value("topic") {
            None => Vec::new(),
            Some(Value::String(_, s)) => s.split(',').map(|t| t.trim().to_string()).collect(),
            Some(Value::Array(_, items)) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(_, s) => out.push(s.trim().to_string()),
                        _ => self.fail("topic", "expected strings"),
                    }
                }
                out
            }
            Some(_) => {
                self.fail("topic", "expected a comma-separated string or an array");
                Vec::new()
            }
        };
        let topics: Vec<String> = raw.into_iter().filter(|t| !t.is_empty()).collect();
        if topics.is_empty() {
            self.fail(
                "topic",
                "is required (set --topic, TXN_SIDECAR_TOPIC or `topic` in the file)",
            );
        }
        for t in &topics {
            if let Err(e) = validate_topic_name(t) {
                self.fail("topic", e);
            }
        }
        topics
    }

    fn kafka(&mut self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let dict = match self.root.get("kafka") {
            None => return out,
            Some(Value::Dict(_, d)) => d.clone(),
            Some(_) => {
                self.fail("kafka", "expected a table of librdkafka properties");
                return out;
            }
        };
        for (k, v) in dict {
            let s = match v {
                Value::String(_, s) => s,
                Value::Num(_, n) => match (n.to_i128(), n.to_f64()) {
                    (Some(i), _) => i.to_string(),
                    (None, Some(f)) => f.to_string(),
                    _ => String::new(),
                },
                Value::Bool(_, b) => b.to_string(),
                _ => {
                    self.fail_kafka(&k, "expected a string, number or boolean");
                    continue;
                }
            };
            match interpolate(&s) {
                Ok(s) => {
                    out.insert(k, s);
                }
                Err(e) => self.fail_kafka(&k, e),
            }
        }
        out
    }

    fn check_unknown(&mut self) {
        let mut unknown = Vec::new();
        for (k, v) in self.root {
            match (k.as_str(), v) {
                ("kafka", _) => {}
                (section, Value::Dict(_, d)) => {
                    for leaf in d.keys() {
                        let full = format!("{section}.{leaf}");
                        if !KNOWN_KEYS.contains(&full.as_str()) {
                            unknown.push(full);
                        }
                    }
                    if !KNOWN_KEYS
                        .iter()
                        .any(|kk| kk.starts_with(&format!("{section}.")))
                    {
                        // Reported through its leaves above.
                    }
                }
                (key, _) => {
                    if !KNOWN_KEYS.contains(&key) {
                        unknown.push(key.to_string());
                    }
                }
            }
        }
        for key in unknown {
            let hint = KNOWN_KEYS
                .iter()
                .find(|k| similar(k, &key))
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            self.fail(&key, format!("unknown key{hint}"));
        }
    }
}

fn similar(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.replace(['_', '-', '.'], "").to_ascii_lowercase();
    let (a, b) = (norm(a), norm(b));
    a == b || (a.len() > 3 && (a.contains(&b) || b.contains(&a)))
}

/// Resolves `${env:NAME}` and `${file:/path}` references so credentials can come from
/// Kubernetes Secrets without appearing in the config file.
fn interpolate(s: &str) -> Result<String, String> {
    if !s.contains("${") {
        return Ok(s.to_string());
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` reference".to_string())?;
        let reference = &after[..end];
        if let Some(name) = reference.strip_prefix("env:") {
            let v = std::env::var(name)
                .map_err(|_| format!("references env {name}, which is not set"))?;
            out.push_str(&v);
        } else if let Some(path) = reference.strip_prefix("file:") {
            let v = std::fs::read_to_string(Path::new(path))
                .map_err(|e| format!("references file {path}, which cannot be read: {e}"))?;
            out.push_str(v.trim_end_matches(['\n', '\r']));
        } else {
            return Err(format!(
                "unknown reference `${{{reference}}}` (use ${{env:NAME}} or ${{file:/path}})"
            ));
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses `1048576`, `64KiB`, `16MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "ki" => 1 << 10,
        "mib" | "mi" => 1 << 20,
        "gib" | "gi" => 1 << 30,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn validate_topic_name(t: &str) -> Result<(), String> {
    if t.len() > 249 {
        return Err(format!("topic name {t:?} is longer than 249 characters"));
    }
    if t == "." || t == ".." {
        return Err(format!("topic name {t:?} is not allowed"));
    }
    if !t
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
    {
        return Err(format!(
            "topic name {t:?} may only contain ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Properties the sidecar owns, each with what to use instead; a user value would break
/// its guarantees.
const OWNED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "offsets are committed only up to the safe offset",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed only up to the safe offset",
    ),
    ("group.id", "use the `group` setting"),
    ("bootstrap.servers", "use the `brokers` setting"),
    ("isolation.level", "the sidecar reads read_committed"),
    (
        "enable.partition.eof",
        "the sidecar enables it to learn when a partition is caught up",
    ),
];

/// Properties librdkafka refuses with `group.protocol=consumer` (KIP-848), each with what
/// takes its place (librdkafka 2.12, `rd_kafka_conf_finalize`).
const CLASSIC_ONLY_PROPERTIES: &[(&str, &str)] = &[
    (
        "session.timeout.ms",
        "the broker sets it (group.consumer.session.timeout.ms)",
    ),
    (
        "heartbeat.interval.ms",
        "the broker sets it (group.consumer.heartbeat.interval.ms)",
    ),
    (
        "partition.assignment.strategy",
        "use kafka.group.remote.assignor (uniform or range) instead",
    ),
    ("group.protocol.type", "it belongs to the classic protocol"),
];

/// The consumer group protocol, from `kafka.group.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    /// The classic protocol: JoinGroup/SyncGroup, client-side assignment.
    Classic,
    /// KIP-848 (`group.protocol=consumer`): heartbeats carry the assignment, which the
    /// broker computes; session and heartbeat timing are the broker's.
    Consumer,
}

impl GroupProtocol {
    /// The group protocol `kafka` selects (librdkafka matches the value ignoring case).
    pub fn of(kafka: &BTreeMap<String, String>) -> GroupProtocol {
        match kafka.get("group.protocol") {
            Some(v) if v.trim().eq_ignore_ascii_case("consumer") => GroupProtocol::Consumer,
            _ => GroupProtocol::Classic,
        }
    }

    /// The value of `group.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupProtocol::Classic => "classic",
            GroupProtocol::Consumer => "consumer",
        }
    }
}

/// The librdkafka properties: owned ones, ones the group protocol forbids, ones that
/// would break a guarantee, a `max.poll.interval.ms` a revoke can outlast, and whatever
/// librdkafka itself refuses, each reported with its key before any client exists.
fn check_kafka(r: &mut Reader<'_>, kafka: &BTreeMap<String, String>, rebalance_grace: Duration) {
    let mut reported: Vec<&str> = Vec::new();
    for (owned, instead) in OWNED_KAFKA_PROPERTIES {
        if kafka.contains_key(*owned) {
            r.fail_kafka(
                owned,
                format!("is managed by txn-sidecar and cannot be overridden ({instead})"),
            );
            reported.push(owned);
        }
    }
    if GroupProtocol::of(kafka) == GroupProtocol::Consumer {
        for (prop, instead) in CLASSIC_ONLY_PROPERTIES {
            if kafka.contains_key(*prop) {
                r.fail_kafka(
                    prop,
                    format!(
                        "is not supported with kafka.group.protocol=consumer (KIP-848): {instead}"
                    ),
                );
                reported.push(prop);
            }
        }
    }
    if kafka
        .get("transactional.id")
        .is_some_and(|v| !v.trim().is_empty())
    {
        r.fail_kafka(
            "transactional.id",
            "is not supported: [kafka] properties also reach the dead-letter producer, which \
             is idempotent and not transactional (a transactional.id would make every \
             dead-letter write fail)",
        );
        reported.push("transactional.id");
    }
    if let Some(v) = kafka.get("auto.offset.reset") {
        let why = match v.trim().to_ascii_lowercase().as_str() {
            "latest" | "largest" | "end" => Some(
                "would silently skip every transaction already in the topic whenever the \
                 group has no committed offset or it fell out of retention",
            ),
            "none" | "error" => Some(
                "would stop a partition with an error whenever the group has no committed \
                 offset or it fell out of retention",
            ),
            _ => None,
        };
        if let Some(why) = why {
            r.fail_kafka(
                "auto.offset.reset",
                format!(
                    "{v:?} {why}; the sidecar needs \"earliest\" (to start a new group at the end \
                     of the topic, reset its offsets with kafka-consumer-groups.sh \
                     --reset-offsets --to-latest before the first start)"
                ),
            );
            reported.push("auto.offset.reset");
        }
    }
    let revoke = rebalance_grace.saturating_add(REVOKE_MARGIN);
    let max_poll = kafka.get("max.poll.interval.ms");
    match max_poll.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(ms)) if Duration::from_millis(ms) < revoke => {
            r.fail_kafka(
                "max.poll.interval.ms",
                format!(
                    "{ms} ms is shorter than a revoke may take (rebalance_grace {} + {}), so the \
                     member would be evicted mid-revoke; set it to at least {} or lower \
                     rebalance_grace",
                    humantime::format_duration(rebalance_grace),
                    humantime::format_duration(REVOKE_MARGIN),
                    revoke.as_millis()
                ),
            );
            reported.push("max.poll.interval.ms");
        }
        None if revoke > Duration::from_millis(DEFAULT_MAX_POLL_INTERVAL_MS) => {
            r.fail(
                "rebalance_grace",
                format!(
                    "{} + {} is longer than librdkafka's max.poll.interval.ms ({DEFAULT_MAX_POLL_INTERVAL_MS} \
                     ms by default), so the member would be evicted mid-revoke; lower it or set \
                     kafka.max.poll.interval.ms to at least {}",
                    humantime::format_duration(rebalance_grace),
                    humantime::format_duration(REVOKE_MARGIN),
                    revoke.as_millis()
                ),
            );
        }
        _ => {}
    }
    // Plugins add properties librdkafka only knows once they are loaded.
    if kafka.contains_key("plugin.library.paths") {
        return;
    }
    for (k, v) in kafka {
        if reported.contains(&k.as_str()) {
            continue;
        }
        if let Err(e) = ClientConfig::new().set(k, v).create_native_config() {
            let msg = match e {
                KafkaError::ClientConfig(_, desc, _, _) => desc,
                other => other.to_string(),
            };
            let msg = if is_secret_property(k) && !v.is_empty() {
                msg.replace(v.as_str(), REDACTED)
            } else {
                msg
            };
            r.fail_kafka(k, format!("librdkafka refuses it: {msg}"));
        }
    }
}

/// Settings for which a value that is set but empty in the environment is an error, not
/// "unset": an empty Secret or ConfigMap key there would otherwise run against a default
/// (`localhost:9092`, the default group) and never become ready.
const NOT_EMPTY_IN_ENV: [&str; 4] = ["brokers", "topic", "group", "app.url"];

fn build(r: &mut Reader<'_>) -> Option<Config> {
    for key in NOT_EMPTY_IN_ENV {
        let var = env_name(key);
        if r.sources.env.get(&var).is_some_and(|v| v.trim().is_empty())
            && !r.sources.flags.contains_key(key)
        {
            r.errors.push((
                key.to_string(),
                format!("is set but empty (from env {var}); give it a value or unset the variable"),
            ));
        }
    }
    let brokers = r.string_or("brokers", "localhost:9092");
    if brokers.split(',').all(|b| b.trim().is_empty()) {
        r.fail("brokers", "must name at least one host:port");
    }
    let topics = r.topics();
    let group = r.string_or("group", "txn-sidecar");
    if group.trim().is_empty() {
        r.fail("group", "must not be empty");
    }
    let protocol = match r.string_or("protocol", "headers").as_str() {
        "headers" => Protocol::Headers,
        "key-prefix" | "key_prefix" => Protocol::KeyPrefix,
        other => {
            r.fail(
                "protocol",
                format!("must be \"headers\" or \"key-prefix\", got {other:?}"),
            );
            Protocol::Headers
        }
    };
    let dlq_topic = r.string("dlq_topic");
    if let Some(t) = &dlq_topic {
        if let Err(e) = validate_topic_name(t) {
            r.fail("dlq_topic", e);
        }
        if topics.contains(t) {
            r.fail("dlq_topic", "must differ from the consumed topic");
        }
    }
    let txn_timeout = r.duration_or("txn_timeout", Duration::from_secs(300));
    if txn_timeout.is_zero() {
        r.fail("txn_timeout", "must be greater than zero");
    }
    let on_failure = match r.string_or("on_failure", "dead-letter").as_str() {
        "dead-letter" | "dead_letter" | "dlq" => OnFailure::DeadLetter,
        "block" => OnFailure::Block,
        other => {
            r.fail(
                "on_failure",
                format!("must be \"dead-letter\" or \"block\", got {other:?}"),
            );
            OnFailure::DeadLetter
        }
    };
    let commit_interval = r.duration_or("commit_interval", Duration::from_secs(1));
    if commit_interval.is_zero() {
        r.fail("commit_interval", "must be greater than zero");
    }
    let shutdown_grace = r.duration_or("shutdown_grace", Duration::from_secs(20));
    let rebalance_grace = r.duration_or("rebalance_grace", Duration::from_secs(10));
    let reader_threads = r.u64_or("reader_threads", 0);
    if reader_threads > 64 {
        r.fail("reader_threads", "at most 64");
    }
    let log_format = match r.string_or("log_format", "json").as_str() {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            r.fail(
                "log_format",
                format!("must be \"json\" or \"text\", got {other:?}"),
            );
            LogFormat::Json
        }
    };
    let url = parse_url(r, "app.url", "http://127.0.0.1:8080/transactions");
    let health_url = r
        .string("app.health_url")
        .and_then(|s| match url::Url::parse(&s) {
            Ok(u) => Some(u),
            Err(e) => {
                r.fail("app.health_url", format!("invalid URL {s:?}: {e}"));
                None
            }
        });
    let app_timeout = r.duration_or("app.timeout", Duration::from_secs(30));
    if app_timeout.is_zero() {
        r.fail("app.timeout", "must be greater than zero");
    }
    let retry = RetryConfig {
        initial_backoff: r.duration_or("retry.initial_backoff", Duration::from_millis(200)),
        max_backoff: r.duration_or("retry.max_backoff", Duration::from_secs(30)),
        max_attempts: {
            let v = r.u64_or("retry.max_attempts", 10);
            u32::try_from(v).unwrap_or_else(|_| {
                r.fail("retry.max_attempts", "is too large");
                10
            })
        },
        max_elapsed: r.duration_or("retry.max_elapsed", Duration::from_secs(300)),
    };
    if retry.initial_backoff > retry.max_backoff {
        r.fail("retry.initial_backoff", "must not exceed retry.max_backoff");
    }
    let addr_s = r.string_or("admin.addr", "127.0.0.1:9464");
    let addr = match addr_s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(e) => {
            r.fail(
                "admin.addr",
                format!(
                    "invalid socket address {addr_s:?}: {e} (use host:port, e.g. 127.0.0.1:9464)"
                ),
            );
            None
        }
    };
    let token = r.string("admin.token");
    if let Some(t) = &token {
        if t.trim().is_empty() {
            // `${env:ADMIN_TOKEN}` of a Secret not yet filled: an empty token would
            // match an empty `Authorization`, so it is never a way to disable the endpoint.
            r.fail(
                "admin.token",
                "is empty after interpolation; unset admin.token to disable the mutating \
                 endpoints, or give a non-empty token",
            );
        } else if t.trim() != t {
            r.fail(
                "admin.token",
                "begins or ends with whitespace, which an Authorization header cannot carry",
            );
        }
    }
    let headers = HeaderNames {
        id: r.string_or("headers.id", "txn-id"),
        kind: r.string_or("headers.type", "txn-type"),
        count: r.string_or("headers.count", "txn-count"),
    };
    let names = [
        ("headers.id", &headers.id),
        ("headers.type", &headers.kind),
        ("headers.count", &headers.count),
    ];
    for (i, (k, v)) in names.iter().enumerate() {
        if v.trim().is_empty() {
            r.fail(k, "must not be empty");
        } else if let Some((other, _)) = names[..i].iter().find(|(_, o)| o == v) {
            r.fail(
                k,
                format!("must differ from {other} (both are {v:?}): one header cannot carry both"),
            );
        } else if v.starts_with("txn-dlq-") {
            r.fail(
                k,
                format!("{v:?} is a dead-letter header name (txn-dlq-*); choose another"),
            );
        }
    }
    let limits = Limits {
        max_tasks_per_txn: r.u64_or("limits.max_tasks_per_txn", 10_000) as usize,
        // With the consumer's prefetch and fetch defaults (`kafka::consumer_config`), these
        // add up to a 512 MiB pod limit at 8 partitions (README, "The memory budget").
        max_txn_bytes: r.u64_or("limits.max_txn_bytes", 16 << 20),
        max_staged_bytes: r.u64_or("limits.max_staged_bytes", 192 << 20),
        max_queued_per_partition: r.u64_or("limits.max_queued_per_partition", 1_000) as usize,
    };
    for (k, v) in [
        ("limits.max_tasks_per_txn", limits.max_tasks_per_txn as u64),
        ("limits.max_txn_bytes", limits.max_txn_bytes),
        ("limits.max_staged_bytes", limits.max_staged_bytes),
        (
            "limits.max_queued_per_partition",
            limits.max_queued_per_partition as u64,
        ),
    ] {
        if v == 0 {
            r.fail(k, "must be greater than zero");
        }
    }
    if limits.max_txn_bytes > limits.max_staged_bytes {
        r.fail(
            "limits.max_txn_bytes",
            "must not exceed limits.max_staged_bytes, or a transaction could never fit",
        );
    }
    let kafka = r.kafka();
    check_kafka(r, &kafka, rebalance_grace);
    Some(Config {
        brokers,
        topics,
        group,
        protocol,
        headers,
        dlq_topic,
        txn_timeout,
        on_failure,
        app: AppConfig {
            url: url?,
            timeout: app_timeout,
            health_url,
        },
        retry,
        admin: AdminConfig { addr: addr?, token },
        limits,
        commit_interval,
        shutdown_grace,
        rebalance_grace,
        reader_threads: reader_threads.min(64) as usize,
        log_format,
        kafka,
        warnings: unknown_env_warnings(&r.sources.env),
    })
}

/// One line per `TXN_SIDECAR_*` variable that sets nothing (a typo, most likely), with
/// the setting it resembles. Not an error: other tools may share the prefix, and the
/// variables Kubernetes injects for Services are skipped.
fn unknown_env_warnings(env: &BTreeMap<String, String>) -> Vec<String> {
    env.keys()
        .filter(|var| {
            var.starts_with(ENV_PREFIX)
                && *var != "TXN_SIDECAR_CONFIG"
                && !is_service_link_variable(var)
                && env_key(var).is_none()
        })
        .map(|var| {
            let rest = var.trim_start_matches(ENV_PREFIX);
            let hint = KNOWN_KEYS
                .iter()
                .find(|k| similar(k, rest))
                .map(|k| format!("; did you mean {} (`{k}`)?", env_name(k)))
                .unwrap_or_default();
            format!("environment variable {var} sets no setting and is ignored{hint}")
        })
        .collect()
}

fn parse_url(r: &mut Reader<'_>, key: &str, default: &str) -> Option<url::Url> {
    let s = r.string_or(key, default);
    match url::Url::parse(&s) {
        Ok(u) if u.scheme() == "http" => Some(u),
        Ok(u) => {
            r.fail(
                key,
                format!(
                    "scheme {:?} is not supported; the app is reached over plain http on localhost",
                    u.scheme()
                ),
            );
            None
        }
        Err(e) => {
            r.fail(key, format!("invalid URL {s:?}: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(pairs: &[(&str, &str)]) -> Sources {
        let mut s = Sources::default();
        for (k, v) in pairs {
            s.flags.insert(k.to_string(), v.to_string());
        }
        s
    }

    #[test]
    fn defaults_match_the_brief() {
        let c = Config::load(&flags(&[("topic", "orders.tx")])).unwrap();
        assert_eq!(c.brokers, "localhost:9092");
        assert_eq!(c.group, "txn-sidecar");
        assert_eq!(c.app.url.as_str(), "http://127.0.0.1:8080/transactions");
        assert_eq!(c.admin.addr.to_string(), "127.0.0.1:9464");
        assert_eq!(c.protocol, Protocol::Headers);
        assert_eq!(c.dlq_topic_for("orders.tx"), "orders.tx.dlq");
        assert_eq!(c.txn_timeout, Duration::from_secs(300));
        assert_eq!(c.on_failure, OnFailure::DeadLetter);
        assert_eq!(c.headers.id, "txn-id");
    }

    #[test]
    fn layers_override_in_order_file_env_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "topic = \"a\"\ngroup = \"from-file\"\nprotocol = \"key-prefix\"\n[app]\nurl = \"http://127.0.0.1:1/file\"\n[kafka]\n\"session.timeout.ms\" = 6000\n",
        )
        .unwrap();
        let mut s = Sources {
            file: Some(path),
            ..Default::default()
        };
        s.env.insert("TXN_SIDECAR_GROUP".into(), "from-env".into());
        s.env.insert(
            "TXN_SIDECAR_APP_URL".into(),
            "http://127.0.0.1:2/env".into(),
        );
        s.env
            .insert("TXN_SIDECAR_KAFKA_SASL_USERNAME".into(), "u".into());
        s.env.insert(
            "TXN_SIDECAR_SERVICE_PORT".into(),
            "tcp://10.0.0.1:80".into(),
        );
        s.flags
            .insert("app.url".into(), "http://127.0.0.1:3/flag".into());
        let c = Config::load(&s).unwrap();
        assert_eq!(c.group, "from-env");
        assert_eq!(c.app.url.as_str(), "http://127.0.0.1:3/flag");
        assert_eq!(c.protocol, Protocol::KeyPrefix);
        assert_eq!(c.kafka.get("session.timeout.ms").unwrap(), "6000");
        assert_eq!(c.kafka.get("sasl.username").unwrap(), "u");
    }

    #[test]
    fn an_essential_setting_set_but_empty_in_the_environment_is_an_error() {
        for (var, key) in [
            ("TXN_SIDECAR_BROKERS", "brokers"),
            ("TXN_SIDECAR_GROUP", "group"),
            ("TXN_SIDECAR_APP_URL", "app.url"),
        ] {
            let mut s = flags(&[("topic", "orders.tx")]);
            s.env.insert(var.into(), " ".into());
            let e = Config::load(&s).unwrap_err();
            let line = e.to_string();
            assert!(
                line.contains(key) && line.contains("set but empty"),
                "{line}"
            );
            assert!(line.contains(var), "{line}");
        }
        // A flag that sets it wins over the empty variable, as flags always do.
        let mut s = flags(&[("topic", "orders.tx"), ("group", "g")]);
        s.env.insert("TXN_SIDECAR_GROUP".into(), "".into());
        assert_eq!(Config::load(&s).unwrap().group, "g");
        let s = flags(&[("topic", "orders.tx"), ("brokers", " , ")]);
        let line = Config::load(&s).unwrap_err().to_string();
        assert!(
            line.contains("brokers") && line.contains("host:port"),
            "{line}"
        );
    }

    #[test]
    fn a_mistyped_environment_variable_is_reported_with_the_setting_it_resembles() {
        let mut s = flags(&[("topic", "orders.tx")]);
        s.env
            .insert("TXN_SIDECAR_RETRY_MAX_ATTEMPT".into(), "3".into());
        s.env.insert("TXN_SIDECAR_APPURL".into(), "http://x".into());
        s.env
            .insert("TXN_SIDECAR_ADMIN_SERVICE_HOST".into(), "10.0.0.1".into());
        let c = Config::load(&s).unwrap();
        assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("TXN_SIDECAR_APPURL")
                && c.warnings[0].contains("TXN_SIDECAR_APP_URL"),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings[1].contains("TXN_SIDECAR_RETRY_MAX_ATTEMPTS"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let mut s = flags(&[
            ("topic", "orders.tx"),
            ("txn_timeout", "soon"),
            ("on_failure", "explode"),
        ]);
        s.env
            .insert("TXN_SIDECAR_APP_URL".into(), "not a url".into());
        let err = Config::load(&s).unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["txn_timeout", "on_failure", "app.url"]);
        let line = err.to_string();
        assert!(line.contains("from env TXN_SIDECAR_APP_URL"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn unknown_keys_are_rejected_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "topic = \"a\"\ntxntimeout = \"1m\"\n[app]\nuri = \"x\"\n",
        )
        .unwrap();
        let s = Sources {
            file: Some(path),
            ..Default::default()
        };
        let err = Config::load(&s).unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            keys.contains(&"txntimeout") && keys.contains(&"app.uri"),
            "{err}"
        );
        assert!(
            err.to_string().contains("did you mean `txn_timeout`"),
            "{err}"
        );
    }

    #[test]
    fn missing_topic_and_owned_properties_are_errors() {
        let err = Config::load(&flags(&[("kafka.enable.auto.commit", "true")])).unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["topic", "kafka.enable.auto.commit"]);
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("pw");
        std::fs::write(&secret, "hunter2\n").unwrap();
        let s = flags(&[
            ("topic", "t"),
            (
                "kafka.sasl.password",
                &format!("${{file:{}}}", secret.display()),
            ),
            ("admin.token", "tok-123"),
        ]);
        let c = Config::load(&s).unwrap();
        assert_eq!(c.kafka["sasl.password"], "hunter2");
        let dump = c.redacted_toml();
        assert!(
            !dump.contains("hunter2") && !dump.contains("tok-123"),
            "{dump}"
        );
        assert!(
            dump.contains("\"sasl.password\" = \"<redacted>\""),
            "{dump}"
        );
        assert!(!format!("{c:?}").contains("tok-123"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let bad = flags(&[
            ("topic", "t"),
            ("kafka.sasl.password", "${env:TXN_SIDECAR_TEST_UNSET_VAR}"),
        ]);
        let err = Config::load(&bad).unwrap_err();
        assert_eq!(err.errors[0].0, "kafka.sasl.password");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("1x"), None);
        let c = Config::load(&flags(&[
            ("topic", "t"),
            ("limits.max_txn_bytes", "1MiB"),
            ("txn_timeout", "90s"),
        ]))
        .unwrap();
        assert_eq!(c.limits.max_txn_bytes, 1 << 20);
        assert_eq!(c.txn_timeout, Duration::from_secs(90));
    }

    fn keys_of(err: &ConfigError) -> Vec<&str> {
        err.errors.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Loads `topic = "t"` plus `pairs` as flags; the error's keys, or none.
    fn refused_keys(pairs: &[(&str, &str)]) -> Vec<String> {
        let mut all = vec![("topic", "t")];
        all.extend_from_slice(pairs);
        match Config::load(&flags(&all)) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.into_iter().map(|(k, _)| k).collect(),
        }
    }

    /// What the kubelet injects for a Service (see tests/common for the full form).
    fn service_links(service: &str, ports: &[(&str, u16, &str)]) -> Vec<String> {
        let n = service.to_ascii_uppercase().replace('-', "_");
        let mut v = vec![
            format!("{n}_SERVICE_HOST"),
            format!("{n}_SERVICE_PORT"),
            format!("{n}_PORT"),
        ];
        for (name, port, proto) in ports {
            if !name.is_empty() {
                v.push(format!(
                    "{n}_SERVICE_PORT_{}",
                    name.to_ascii_uppercase().replace('-', "_")
                ));
            }
            let p = format!("{n}_PORT_{port}_{proto}");
            v.extend([
                p.clone(),
                format!("{p}_PROTO"),
                format!("{p}_PORT"),
                format!("{p}_ADDR"),
            ]);
        }
        v
    }

    #[test]
    fn service_link_variables_never_become_settings_or_properties() {
        // Services named like the sidecar, and like each section and setting of it.
        let mut services = vec![
            "txn-sidecar".to_string(),
            "txn-sidecar-kafka".to_string(),
            "txn-sidecar-admin".to_string(),
            "txn-sidecar-kafka-sasl".to_string(),
        ];
        for k in KNOWN_KEYS {
            services.push(format!("txn-sidecar-{}", k.replace(['.', '_'], "-")));
        }
        let ports = [
            ("admin", 9464, "TCP"),
            ("", 9092, "TCP"),
            ("dns", 53, "UDP"),
            ("x", 7, "SCTP"),
        ];
        for svc in &services {
            for var in service_links(svc, &ports) {
                assert!(is_service_link_variable(&var), "{var}");
                assert_eq!(env_key(&var), None, "{var} would set a key");
            }
        }
        // Real settings and properties still map.
        assert_eq!(
            env_key("TXN_SIDECAR_ADMIN_ADDR").as_deref(),
            Some("admin.addr")
        );
        assert_eq!(
            env_key("TXN_SIDECAR_APP_HEALTH_URL").as_deref(),
            Some("app.health_url")
        );
        assert_eq!(
            env_key("TXN_SIDECAR_KAFKA_SASL_USERNAME").as_deref(),
            Some("kafka.sasl.username")
        );
        assert_eq!(
            env_key("TXN_SIDECAR_KAFKA_SASL_KERBEROS_SERVICE_NAME").as_deref(),
            Some("kafka.sasl.kerberos.service.name")
        );
        assert_eq!(env_key("TXN_SIDECAR_KAFKA_"), None);
        assert_eq!(env_key("TXN_SIDECAR_SOMETHING_ELSE"), None);
        assert_eq!(env_key("OTHER_ADMIN_ADDR"), None);
    }

    #[test]
    fn no_setting_has_the_shape_of_a_service_link_variable() {
        // A future key such as `admin.port` would be unsettable from the environment.
        for k in KNOWN_KEYS {
            let var = env_name(k);
            assert!(!is_service_link_variable(&var), "{k} ({var})");
            assert_eq!(env_key(&var).as_deref(), Some(*k));
        }
        // Nor does any librdkafka property this build knows.
        let native = rdkafka::ClientConfig::new().create_native_config().unwrap();
        for prop in [
            "sasl.kerberos.service.name",
            "ssl.endpoint.identification.algorithm",
        ] {
            assert!(native.get(prop).is_ok(), "{prop}");
            let var = format!(
                "TXN_SIDECAR_KAFKA_{}",
                prop.replace('.', "_").to_ascii_uppercase()
            );
            assert!(!is_service_link_variable(&var), "{var}");
        }
    }

    #[test]
    fn an_environment_with_service_links_loads_the_same_config() {
        let mut base = Sources::default();
        base.flags.insert("topic".into(), "t".into());
        base.env
            .insert("TXN_SIDECAR_ADMIN_ADDR".into(), "0.0.0.0:9464".into());
        base.env
            .insert("TXN_SIDECAR_KAFKA_SASL_USERNAME".into(), "u".into());
        let mut linked = base.clone();
        for svc in ["txn-sidecar", "txn-sidecar-kafka", "txn-sidecar-admin"] {
            for var in service_links(svc, &[("admin", 9464, "TCP"), ("kafka", 9092, "TCP")]) {
                let value = if var.ends_with("_PORT") && !var.contains("_TCP") {
                    "tcp://10.96.0.12:9464"
                } else {
                    "10.96.0.12"
                };
                linked.env.insert(var, value.into());
            }
        }
        assert!(linked.env.contains_key("TXN_SIDECAR_KAFKA_SERVICE_HOST"));
        assert!(linked.env.contains_key("TXN_SIDECAR_ADMIN_PORT"));
        let (a, b) = (Config::load(&base).unwrap(), Config::load(&linked).unwrap());
        assert_eq!(a.redacted_toml(), b.redacted_toml());
        assert_eq!(b.admin.addr.to_string(), "0.0.0.0:9464");
        assert_eq!(b.kafka.len(), 1, "{:?}", b.kafka);
    }

    #[test]
    fn an_admin_token_blank_after_interpolation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let from_file = format!("${{file:{}}}", empty.display());
        for t in [from_file.as_str(), "   ", "\t", " tok", "tok "] {
            assert_eq!(
                refused_keys(&[("admin.token", t)]),
                ["admin.token"],
                "{t:?}"
            );
        }
        // An empty literal means unset (the endpoint is disabled); a token is a token.
        let c = Config::load(&flags(&[("topic", "t"), ("admin.token", "")])).unwrap();
        assert!(c.admin.token.is_none());
        assert!(refused_keys(&[("admin.token", "tok")]).is_empty());
    }

    #[test]
    fn a_duration_longer_than_the_clocks_take_is_an_error() {
        let keys = [
            "txn_timeout",
            "commit_interval",
            "shutdown_grace",
            "rebalance_grace",
            "app.timeout",
            "retry.initial_backoff",
            "retry.max_backoff",
            "retry.max_elapsed",
        ];
        for k in keys {
            assert_eq!(refused_keys(&[(k, "25d")]), [k]);
            assert_eq!(refused_keys(&[(k, "500000000y")]), [k]);
        }
        assert!(refused_keys(&[("txn_timeout", "24d"), ("retry.max_elapsed", "24d")]).is_empty());
        // Every one of them fits the clocks it feeds.
        assert!(MAX_DURATION.as_millis() <= i32::MAX as u128);
        assert!(std::time::Instant::now()
            .checked_add(MAX_DURATION * 2)
            .is_some());
        // A bare number of seconds from the file, as large as TOML allows.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "topic = \"t\"\ncommit_interval = 9223372036854775807\n",
        )
        .unwrap();
        let err = Config::load(&Sources {
            file: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(keys_of(&err), ["commit_interval"]);
    }

    #[test]
    fn marker_header_names_are_distinct() {
        assert_eq!(
            refused_keys(&[("headers.type", "txn-id")]),
            ["headers.type"]
        );
        assert_eq!(
            refused_keys(&[("headers.count", "txn-id")]),
            ["headers.count"]
        );
        assert_eq!(
            refused_keys(&[("headers.count", "txn-type")]),
            ["headers.count"]
        );
        assert_eq!(
            refused_keys(&[
                ("headers.id", "h"),
                ("headers.type", "h"),
                ("headers.count", "h")
            ]),
            ["headers.type", "headers.count"]
        );
        assert_eq!(
            refused_keys(&[("headers.id", "txn-dlq-source")]),
            ["headers.id"]
        );
        assert!(
            refused_keys(&[("headers.id", "Txn-Id")]).is_empty(),
            "names are case-sensitive"
        );
    }

    #[test]
    fn a_transactional_id_is_an_error() {
        assert_eq!(
            refused_keys(&[("kafka.transactional.id", "orders")]),
            ["kafka.transactional.id"]
        );
    }

    #[test]
    fn auto_offset_reset_must_not_skip_or_stop() {
        for v in ["latest", "largest", "end", "Latest", "none", "error"] {
            assert_eq!(
                refused_keys(&[("kafka.auto.offset.reset", v)]),
                ["kafka.auto.offset.reset"],
                "{v}"
            );
        }
        for v in ["earliest", "smallest", "beginning"] {
            assert!(
                refused_keys(&[("kafka.auto.offset.reset", v)]).is_empty(),
                "{v}"
            );
        }
    }

    #[test]
    fn max_poll_interval_must_outlast_a_revoke() {
        assert_eq!(
            refused_keys(&[("kafka.max.poll.interval.ms", "14999")]),
            ["kafka.max.poll.interval.ms"]
        );
        assert!(refused_keys(&[("kafka.max.poll.interval.ms", "15000")]).is_empty());
        assert!(refused_keys(&[
            ("kafka.max.poll.interval.ms", "7000"),
            ("rebalance_grace", "2s")
        ])
        .is_empty());
        assert_eq!(
            refused_keys(&[("rebalance_grace", "296s")]),
            ["rebalance_grace"]
        );
        assert!(refused_keys(&[("rebalance_grace", "295s")]).is_empty());
        // Not a number: librdkafka's own check names it.
        assert_eq!(
            refused_keys(&[("kafka.max.poll.interval.ms", "soon")]),
            ["kafka.max.poll.interval.ms"]
        );
    }

    #[test]
    fn enable_partition_eof_is_owned() {
        for v in ["true", "false"] {
            assert_eq!(
                refused_keys(&[("kafka.enable.partition.eof", v)]),
                ["kafka.enable.partition.eof"]
            );
        }
    }

    #[test]
    fn kip848_refuses_the_classic_only_properties() {
        let kip848 = ("kafka.group.protocol", "consumer");
        for p in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
            "group.protocol.type",
        ] {
            let key = format!("kafka.{p}");
            let value = match p {
                "partition.assignment.strategy" => "range",
                "group.protocol.type" => "consumer",
                _ => "6000",
            };
            assert_eq!(refused_keys(&[kip848, (&key, value)]), [key.as_str()]);
            assert!(
                refused_keys(&[(&key, value)]).is_empty(),
                "{p} is fine for classic"
            );
        }
        let c = Config::load(&flags(&[
            ("topic", "t"),
            ("kafka.group.protocol", " Consumer"),
        ]));
        assert_eq!(c.unwrap().group_protocol(), GroupProtocol::Consumer);
        assert_eq!(
            Config::for_topic("b", "t").group_protocol(),
            GroupProtocol::Classic
        );
        assert!(refused_keys(&[kip848, ("kafka.group.remote.assignor", "uniform")]).is_empty());
    }

    #[test]
    fn librdkafka_refusals_name_the_property_and_its_origin() {
        let mut s = flags(&[("topic", "t"), ("kafka.no.such.property", "1")]);
        s.env
            .insert("TXN_SIDECAR_KAFKA_FETCH_WAIT_MAX_MS".into(), "soon".into());
        let err = Config::load(&s).unwrap_err();
        assert_eq!(
            keys_of(&err),
            ["kafka.fetch.wait.max.ms", "kafka.no.such.property"]
        );
        let line = err.to_string();
        assert!(
            line.contains("(from env TXN_SIDECAR_KAFKA_FETCH_WAIT_MAX_MS)"),
            "{line}"
        );
        assert!(line.contains("(from a command-line flag)"), "{line}");
    }

    #[test]
    fn integers_in_the_file_are_numbers_and_bare_durations_are_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "topic = \"t\"\ntxn_timeout = 90\n[retry]\nmax_attempts = 3\n[limits]\nmax_tasks_per_txn = 100\n",
        )
        .unwrap();
        let c = Config::load(&Sources {
            file: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.txn_timeout, Duration::from_secs(90));
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.limits.max_tasks_per_txn, 100);
        std::fs::write(
            &path,
            "topic = \"t\"\ntxn_timeout = -1\n[retry]\nmax_attempts = -3\n",
        )
        .unwrap();
        let err = Config::load(&Sources {
            file: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(keys_of(&err), ["txn_timeout", "retry.max_attempts"]);
    }

    #[test]
    fn a_toml_syntax_error_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "topic = \"t\"\ntxn_timeout = 18446744073709551615\n").unwrap();
        let err = Config::load(&Sources {
            file: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("invalid config: config: TOML parse error at line 2"),
            "{line}"
        );
    }
}
