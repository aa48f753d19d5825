//! The binary as users start it (issue 14): every documented knob either works or is
//! refused at start with exit code 2 and one line naming its key; environments that
//! Kubernetes injects never break start; KIP-848 delivers and rebalances between two
//! processes.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "orders.tx";
const DLQ: &str = "orders.tx.dlq";
const WAIT: Duration = Duration::from_secs(30);

/// `txn-sidecar run` with `args` after a minimal valid command line; asserts it is
/// refused with exit code 2 and exactly one line that names `key`, and returns the line.
fn refused(args: &[&str], env: &[(&str, &str)], key: &str) -> String {
    let mut full = vec![
        "run",
        "--topic",
        T,
        "--brokers",
        "127.0.0.1:1",
        "--admin-addr",
        "127.0.0.1:0",
    ];
    full.extend_from_slice(args);
    let out = run_bin(&full, env);
    let line = out.stderr.trim_end();
    assert_eq!(out.code, Some(2), "{args:?} was not refused: {line}");
    assert_eq!(line.lines().count(), 1, "not one line: {line}");
    assert!(
        line.starts_with("txn-sidecar: invalid config: "),
        "not a config error: {line}"
    );
    assert!(
        line.contains(&format!("{key}: ")),
        "{key} is not named: {line}"
    );
    println!("{args:?} -> {line}");
    line.to_string()
}

/// `txn-sidecar config` with `args` (and `env`) is accepted; returns what it printed.
fn accepted(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut full = vec!["config", "--topic", T];
    full.extend_from_slice(args);
    let out = run_bin(&full, env);
    assert_eq!(out.code, Some(0), "{args:?} was refused: {}", out.stderr);
    out.stdout
}

#[test]
fn kip848_refuses_each_classic_only_property_naming_it() {
    for (prop, value) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("group.protocol.type", "consumer"),
    ] {
        let set = format!("{prop}={value}");
        let line = refused(
            &["-X", "group.protocol=consumer", "-X", &set],
            &[],
            &format!("kafka.{prop}"),
        );
        assert!(line.contains("group.protocol=consumer"), "{line}");
        // The same property is fine under the classic protocol.
        accepted(&["-X", &set], &[]);
    }
    // librdkafka matches the protocol name ignoring case; so does the check.
    refused(
        &[
            "-X",
            "group.protocol=CONSUMER",
            "-X",
            "session.timeout.ms=6000",
        ],
        &[],
        "kafka.session.timeout.ms",
    );
    let effective = accepted(&["-X", "group.protocol=consumer"], &[]);
    assert!(
        effective.contains("\"group.protocol\" = \"consumer\""),
        "{effective}"
    );
}

#[test]
fn an_admin_token_empty_or_blank_after_interpolation_is_refused() {
    let line = refused(
        &["--set", "admin.token=${env:ADMIN_TOKEN}"],
        &[("ADMIN_TOKEN", "")],
        "admin.token",
    );
    assert!(line.contains("empty after interpolation"), "{line}");
    refused(&[], &[("TXN_SIDECAR_ADMIN_TOKEN", "   ")], "admin.token");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "\n").unwrap();
    let set = format!("admin.token=${{file:{}}}", file.display());
    refused(&["--set", &set], &[], "admin.token");
    refused(&["--set", "admin.token= tok "], &[], "admin.token");
    // A real token is fine, and an unset one disables the endpoint.
    accepted(
        &["--set", "admin.token=${env:ADMIN_TOKEN}"],
        &[("ADMIN_TOKEN", "s3cret")],
    );
    accepted(&[], &[]);
}

#[test]
fn a_duration_too_long_for_its_clock_is_refused_naming_the_key() {
    for key in [
        "txn_timeout",
        "commit_interval",
        "shutdown_grace",
        "rebalance_grace",
        "app.timeout",
        "retry.initial_backoff",
        "retry.max_backoff",
        "retry.max_elapsed",
    ] {
        let set = format!("{key}=25d");
        let line = refused(&["--set", &set], &[], key);
        assert!(line.contains("at most 24days"), "{line}");
        // Far beyond any clock: from the environment, as a number of seconds in a file.
        let var = format!("TXN_SIDECAR_{}", key.replace('.', "_").to_ascii_uppercase());
        refused(&[], &[(&var, "584942417355y")], key);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    // Seconds as a TOML integer (the largest one TOML has).
    std::fs::write(&path, "txn_timeout = 9223372036854775807\n").unwrap();
    let line = refused(&["--config", path.to_str().unwrap()], &[], "txn_timeout");
    assert!(line.contains("too long"), "{line}");
    // Larger than TOML's integers: a parse error, on one line too.
    std::fs::write(&path, "txn_timeout = 18446744073709551615\n").unwrap();
    let line = refused(&["--config", path.to_str().unwrap()], &[], "config");
    assert!(line.contains("line 1, column 15"), "{line}");
    // The bound itself is fine (with room for a revoke in max.poll.interval.ms).
    accepted(
        &["--txn-timeout", "24d", "--set", "retry.max_elapsed=24d"],
        &[],
    );
}

#[test]
fn integers_in_the_config_file_are_taken_as_numbers() {
    // TOML integers are signed; they used to be refused as "not a non-negative integer".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "txn_timeout = 90\n[retry]\nmax_attempts = 3\n[limits]\nmax_tasks_per_txn = 100\n",
    )
    .unwrap();
    let effective = accepted(&["--config", path.to_str().unwrap()], &[]);
    for line in [
        "txn_timeout = \"1m 30s\"",
        "max_attempts = 3",
        "max_tasks_per_txn = 100",
    ] {
        assert!(effective.contains(line), "{line} missing in {effective}");
    }
}

#[test]
fn marker_header_names_must_differ_from_one_another() {
    refused(&["--set", "headers.type=txn-id"], &[], "headers.type");
    refused(&["--set", "headers.count=txn-id"], &[], "headers.count");
    refused(&["--set", "headers.count=txn-type"], &[], "headers.count");
    refused(
        &["--set", "headers.id=x", "--set", "headers.type=x"],
        &[],
        "headers.type",
    );
    refused(&["--set", "headers.id=txn-dlq-source"], &[], "headers.id");
    accepted(
        &["--set", "headers.id=tid", "--set", "headers.type=ttype"],
        &[],
    );
}

#[test]
fn a_transactional_id_is_refused_before_it_reaches_the_dead_letter_producer() {
    let line = refused(
        &["-X", "transactional.id=orders"],
        &[],
        "kafka.transactional.id",
    );
    assert!(line.contains("dead-letter producer"), "{line}");
    refused(
        &[],
        &[("TXN_SIDECAR_KAFKA_TRANSACTIONAL_ID", "orders")],
        "kafka.transactional.id",
    );
}

#[test]
fn auto_offset_reset_latest_or_none_is_refused() {
    for v in ["latest", "largest", "end", "LATEST", "none", "error"] {
        let set = format!("auto.offset.reset={v}");
        let line = refused(&["-X", &set], &[], "kafka.auto.offset.reset");
        assert!(line.contains("earliest"), "{line}");
    }
    for v in ["earliest", "smallest", "beginning"] {
        accepted(&["-X", &format!("auto.offset.reset={v}")], &[]);
    }
}

#[test]
fn a_max_poll_interval_shorter_than_a_revoke_is_refused() {
    // rebalance_grace (10 s by default) + 5 s.
    let line = refused(
        &["-X", "max.poll.interval.ms=14999"],
        &[],
        "kafka.max.poll.interval.ms",
    );
    assert!(line.contains("at least 15000"), "{line}");
    refused(
        &[
            "-X",
            "max.poll.interval.ms=20000",
            "--set",
            "rebalance_grace=16s",
        ],
        &[],
        "kafka.max.poll.interval.ms",
    );
    // Against librdkafka's default of 300000 ms, the grace is the key to name.
    refused(&["--set", "rebalance_grace=296s"], &[], "rebalance_grace");
    accepted(&["-X", "max.poll.interval.ms=15000"], &[]);
    accepted(
        &[
            "-X",
            "max.poll.interval.ms=7000",
            "--set",
            "rebalance_grace=2s",
        ],
        &[],
    );
}

#[test]
fn enable_partition_eof_is_owned_by_the_sidecar() {
    for v in ["true", "false"] {
        let line = refused(
            &["-X", &format!("enable.partition.eof={v}")],
            &[],
            "kafka.enable.partition.eof",
        );
        assert!(line.contains("managed by txn-sidecar"), "{line}");
    }
}

#[test]
fn a_property_librdkafka_refuses_is_a_config_error_naming_it() {
    let line = refused(&["-X", "no.such.property=1"], &[], "kafka.no.such.property");
    assert!(line.contains("(from a command-line flag)"), "{line}");
    refused(
        &[],
        &[("TXN_SIDECAR_KAFKA_SESSION_TIMEOUT_MS", "soon")],
        "kafka.session.timeout.ms",
    );
}

/// What the kubelet would inject for Services named `txn-sidecar`, `txn-sidecar-kafka`
/// and `txn-sidecar-admin` (and the API server's `kubernetes`). Real cluster IPs are
/// 10.96.x.x; loopback stand-ins guarantee no test traffic could ever leave the machine
/// even if one of them were mistaken for an address.
fn injected() -> Vec<(String, String)> {
    let mut env = Vec::new();
    env.extend(service_link_env(
        "txn-sidecar",
        "127.0.96.11",
        &[
            ("admin", 9464, "TCP"),
            ("http", 80, "TCP"),
            ("statsd", 8125, "UDP"),
        ],
    ));
    env.extend(service_link_env(
        "txn-sidecar-kafka",
        "127.0.96.12",
        &[("kafka", 9092, "TCP"), ("controller", 9093, "TCP")],
    ));
    env.extend(service_link_env(
        "txn-sidecar-admin",
        "127.0.96.13",
        &[("", 9464, "TCP")],
    ));
    env.extend(service_link_env(
        "kubernetes",
        "127.0.96.1",
        &[("https", 443, "TCP")],
    ));
    env
}

#[test]
fn injected_service_links_change_nothing_in_the_effective_config() {
    let env = injected();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for expected in [
        "TXN_SIDECAR_PORT",
        "TXN_SIDECAR_SERVICE_HOST",
        "TXN_SIDECAR_PORT_9464_TCP_ADDR",
        "TXN_SIDECAR_KAFKA_SERVICE_HOST",
        "TXN_SIDECAR_KAFKA_PORT_9092_TCP",
        "TXN_SIDECAR_ADMIN_PORT",
        "TXN_SIDECAR_ADMIN_PORT_9464_TCP_ADDR",
        "TXN_SIDECAR_SERVICE_PORT_STATSD",
        "TXN_SIDECAR_PORT_8125_UDP_PROTO",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut real = vec![("TXN_SIDECAR_ADMIN_ADDR", "0.0.0.0:9464")];
    let plain = accepted(&[], &real);
    real.extend(env.iter().copied());
    let with_links = accepted(&[], &real);
    assert_eq!(plain, with_links, "service links changed the config");
    assert!(plain.contains("addr = \"0.0.0.0:9464\""), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_injected_service_links_the_sidecar_starts_becomes_ready_and_delivers() {
    let kafka = Kafka::start(&[(T, 1), (DLQ, 1)]);
    let app = RecordingApp::start().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Settings come from the environment too, as in a pod: the real TXN_SIDECAR_ADMIN_ADDR
    // sits next to TXN_SIDECAR_ADMIN_PORT, TXN_SIDECAR_ADMIN_SERVICE_HOST and the rest.
    let mut env = injected();
    for (k, v) in [
        ("TXN_SIDECAR_BROKERS", kafka.brokers.clone()),
        ("TXN_SIDECAR_TOPIC", T.to_string()),
        ("TXN_SIDECAR_GROUP", "links".to_string()),
        ("TXN_SIDECAR_APP_URL", app.url()),
        ("TXN_SIDECAR_ADMIN_ADDR", admin.to_string()),
        ("TXN_SIDECAR_LOG_FORMAT", "text".to_string()),
        ("TXN_SIDECAR_KAFKA_SESSION_TIMEOUT_MS", "6000".to_string()),
        ("TXN_SIDECAR_KAFKA_HEARTBEAT_INTERVAL_MS", "500".to_string()),
    ] {
        env.push((k.to_string(), v));
    }
    let started = Instant::now();
    let mut p = SidecarProcess::spawn(admin, &[], &env);
    p.wait_ready(WAIT).await;
    println!("ready after {:?}", started.elapsed());
    kafka.task(T, 0, "linked", "1");
    kafka.commit(T, 0, "linked");
    app.wait_accepted(1, WAIT).await;
    assert_eq!(app.accepted_ids(), vec!["linked"]);
    let log = p.log();
    let starting = log
        .lines()
        .find(|l| l.contains("starting"))
        .expect("a starting line");
    for leaked in ["service", "port", "127.0.96"] {
        assert!(
            !starting.to_ascii_lowercase().contains(leaked),
            "{leaked} reached the Kafka properties: {starting}"
        );
    }
    assert_eq!(p.terminate(WAIT), Some(0), "{}", p.log());
}

/// A transaction delivered by one process is not redelivered by the next owner of its
/// partition: the revoke commits the safe offset (held at an open transaction) with the
/// skip set in its metadata, and the next owner skips exactly those.
async fn two_processes_hand_over_a_partition(protocol: GroupProtocol) {
    let kafka = Kafka::start(&[(T, 2), (DLQ, 2)]);
    let app = RecordingApp::start().await;
    let group = format!("handover-{}", protocol.as_str());
    // KIP-848: no periodic commit, so whatever is committed was committed by the revoke.
    // Classic: librdkafka's mock refuses every commit while a join is pending (up to
    // `session.timeout.ms` − 1 s), the revoke's included, so the skip set travels in the
    // periodic commits made before the second member joins.
    let commit_interval = match protocol {
        GroupProtocol::Consumer => "commit_interval=1h",
        GroupProtocol::Classic => "commit_interval=200ms",
    };
    let spawn = || {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = [
            "--brokers",
            &kafka.brokers,
            "--topic",
            T,
            "--group",
            &group,
            "--app-url",
            &app.url(),
            "--admin-addr",
            &admin.to_string(),
            "--log-format",
            "text",
            "--set",
            commit_interval,
            "--set",
            "rebalance_grace=5s",
            "-X",
            "debug=cgrp",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in txn_sidecar::embedded::fast_group_properties(protocol) {
            args.push("-X".into());
            args.push(format!("{k}={v}"));
        }
        let env = [(
            "RUST_LOG".to_string(),
            // rdkafka sets librdkafka's log level from the `librdkafka` target.
            "info,librdkafka=debug,txn_sidecar::pipeline=debug".to_string(),
        )];
        SidecarProcess::spawn(admin, &args, &env)
    };
    let started = Instant::now();
    let mut p1 = spawn();
    p1.wait_ready(WAIT).await;
    // Per partition: an open transaction holds the offset at 0; two delivered above it.
    for p in 0..2 {
        kafka.task(T, p, &format!("open-{p}"), "0");
        for id in ["a", "b"] {
            kafka.task(T, p, &format!("{id}-{p}"), "1");
            kafka.commit(T, p, &format!("{id}-{p}"));
        }
    }
    kafka.flush();
    app.wait_accepted(4, WAIT).await;
    for p in 0..2 {
        match protocol {
            GroupProtocol::Consumer => {
                assert_eq!(kafka.committed(&group, T, p).0, None, "no periodic commit")
            }
            GroupProtocol::Classic => {
                let k = &kafka;
                let g = &group;
                wait_until(WAIT, "a periodic commit with the skip set", || {
                    let (o, m) = k.committed(g, T, p);
                    o == Some(0) && m.starts_with("txs2:")
                })
                .await;
            }
        }
    }

    // A second process joins: one partition moves to it.
    let mut p2 = spawn();
    let deadline = Instant::now() + WAIT;
    let moved = loop {
        let (two, one) = (p2.partitions().await, p1.partitions().await);
        if two.len() == 1 && one.len() == 1 && one != two {
            break two[0].1;
        }
        assert!(
            Instant::now() < deadline,
            "no handover: p1 {one:?}, p2 {two:?}\n{}",
            p1.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "partition {moved} moved after {:?} ({})",
        started.elapsed(),
        protocol.as_str()
    );
    // Commit on revoke (KIP-848; see above for classic): the offset of the open
    // transaction, with the skip set.
    let (offset, metadata) = kafka.committed(&group, T, moved);
    assert_eq!(offset, Some(0), "committed on revoke");
    assert!(metadata.starts_with("txs2:"), "skip set: {metadata:?}");
    assert!(
        p1.log()
            .lines()
            .any(|l| l.contains("partition revoked") && l.contains(&format!("partition={moved}"))),
        "{}",
        p1.log()
    );
    // The new owner replays from 0: it stages the open transaction again, skips the
    // two it finds in the skip set, and delivers the open one once it commits.
    let deadline = Instant::now() + WAIT;
    loop {
        let open = p2
            .get("/v1/transactions")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default();
        if open.contains(&format!("\"open-{moved}\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "never restaged: {open}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kafka.commit(T, moved, &format!("open-{moved}"));
    kafka.flush();
    let got = app.wait_accepted(5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for g in app.attempts() {
        *per_id.entry(g.id().to_string()).or_default() += 1;
    }
    assert!(
        per_id.values().all(|&n| n == 1) && per_id.len() == 5,
        "redelivered after the handover: {per_id:?}"
    );
    assert_eq!(got[4].id(), format!("open-{moved}"));
    let (_, m) = p2.get("/metrics").await.unwrap();
    assert_eq!(
        metric(
            &m,
            "txn_sidecar_transactions_total{outcome=\"duplicate_skipped\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(p2.terminate(WAIT), Some(0), "{}", p2.log());
    assert_eq!(p1.terminate(WAIT), Some(0), "{}", p1.log());
    // Both really spoke the protocol under test (librdkafka's debug lines reach the log
    // by the time the process has exited).
    let (kip848, classic) = ("ConsumerGroupHeartbeat", "JoinGroup");
    for (name, log) in [("p1", p1.log()), ("p2", p2.log())] {
        match protocol {
            GroupProtocol::Consumer => assert!(
                log.contains(kip848) && !log.contains(classic),
                "{name} did not use KIP-848:\n{log}"
            ),
            GroupProtocol::Classic => assert!(
                log.contains(classic) && !log.contains(kip848),
                "{name} did not use the classic protocol:\n{log}"
            ),
        }
    }
    println!("done after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kip848_two_processes_deliver_and_hand_over_a_partition_with_its_skip_set() {
    two_processes_hand_over_a_partition(GroupProtocol::Consumer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_two_processes_deliver_and_hand_over_a_partition_with_its_skip_set() {
    two_processes_hand_over_a_partition(GroupProtocol::Classic).await;
}
