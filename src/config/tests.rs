//! Unit tests of loading: defaults, layers, every refusal and its message.

use super::reader::parse_size;
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
