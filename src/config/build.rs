//! `build`: every setting read, defaulted and cross-checked into a `Config`.

use std::net::SocketAddr;
use std::time::Duration;

use super::kafka::check_kafka;
use super::reader::Reader;
use super::sources::unknown_env_warnings;
use super::{
    env_name, AdminConfig, AppConfig, Config, HeaderNames, Limits, LogFormat, OnFailure, Protocol,
    RetryConfig,
};

pub(super) fn validate_topic_name(t: &str) -> Result<(), String> {
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

/// Settings for which a value that is set but empty in the environment is an error, not
/// "unset": an empty Secret or ConfigMap key there would otherwise run against a default
/// (`localhost:9092`, the default group) and never become ready.
const NOT_EMPTY_IN_ENV: [&str; 4] = ["brokers", "topic", "group", "app.url"];

pub(super) fn build(r: &mut Reader<'_>) -> Option<Config> {
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
