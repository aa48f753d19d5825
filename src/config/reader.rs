//! The `Reader`: typed reads of the merged layers, collecting every problem with its origin.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::value::{Dict, Value};
use figment::Figment;

use super::build::validate_topic_name;
use super::{env_key, env_name, Sources, KNOWN_KEYS, MAX_DURATION};

/// Typed access to the merged layers that records every problem.
pub(super) struct Reader<'a> {
    pub(super) figment: &'a Figment,
    pub(super) root: &'a Dict,
    pub(super) sources: &'a Sources,
    pub(super) errors: Vec<(String, String)>,
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
    pub(super) fn fail_kafka(&mut self, prop: &str, msg: impl Into<String>) {
        let origin = self.kafka_origin(prop);
        self.errors
            .push((format!("kafka.{prop}"), format!("{}{origin}", msg.into())));
    }

    pub(super) fn fail(&mut self, key: &str, msg: impl Into<String>) {
        let origin = self.origin(key);
        self.errors
            .push((key.to_string(), format!("{}{origin}", msg.into())));
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
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

    pub(super) fn string_or(&mut self, key: &str, default: &str) -> String {
        self.string(key).unwrap_or_else(|| default.to_string())
    }

    pub(super) fn u64_or(&mut self, key: &str, default: u64) -> u64 {
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

    pub(super) fn duration_or(&mut self, key: &str, default: Duration) -> Duration {
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

    pub(super) fn topics(&mut self) -> Vec<String> {
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

    pub(super) fn kafka(&mut self) -> BTreeMap<String, String> {
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

    pub(super) fn check_unknown(&mut self) {
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

pub(super) fn similar(a: &str, b: &str) -> bool {
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
pub(super) fn parse_size(s: &str) -> Option<u64> {
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
