//! The layers: env variables and flags as figment providers, and which variable sets what.

use std::collections::BTreeMap;

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::reader::similar;
use super::{ENV_PREFIX, KNOWN_KEYS};

/// The environment variable of a setting key.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace(['.', '-'], "_").to_ascii_uppercase()
    )
}

/// A figment provider over a flat `dotted key → string` map.
pub(super) struct Layer {
    name: &'static str,
    dict: Dict,
}

impl Layer {
    pub(super) fn from_flat(name: &'static str, flat: &BTreeMap<String, String>) -> Layer {
        let mut dict = Dict::new();
        for (k, v) in flat {
            insert_dotted(&mut dict, k, v);
        }
        Layer { name, dict }
    }

    pub(super) fn from_env(name: &'static str, env: &BTreeMap<String, String>) -> Layer {
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

/// One line per `TXN_SIDECAR_*` variable that sets nothing (a typo, most likely), with
/// the setting it resembles. Not an error: other tools may share the prefix, and the
/// variables Kubernetes injects for Services are skipped.
pub(super) fn unknown_env_warnings(env: &BTreeMap<String, String>) -> Vec<String> {
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
