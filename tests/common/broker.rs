//! Which broker the process-level suites run against, and the second one: tansu.
//!
//! `TXN_SIDECAR_TEST_BROKER=mock` (the default) runs them on librdkafka's mock cluster;
//! `TXN_SIDECAR_TEST_BROKER=tansu` runs them on a tansu broker process (an independent,
//! Kafka-compatible implementation with an in-memory store), installed by
//! `scripts/install-test-deps.sh` at `$HOME/.cache/txn-sidecar/tansu/tansu` (or where
//! `TXN_SIDECAR_TANSU` points). Tests that need the mock's fault injection, or a client
//! that cannot talk to tansu (kcat 1.7), stay on the mock whatever the switch says.
//! `TXN_SIDECAR_TANSU_LOG` sets tansu's own `RUST_LOG` (default `warn`); its log is kept
//! under `target/tmp/` when a test fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The environment variable that selects the broker.
pub const SWITCH: &str = "TXN_SIDECAR_TEST_BROKER";

/// A broker implementation the suites can run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// librdkafka's mock cluster (in-process, or in `txn-sidecar mock-kafka`).
    Mock,
    /// A tansu broker process.
    Tansu,
}

impl BrokerKind {
    /// What `TXN_SIDECAR_TEST_BROKER` selects (unset or empty: the mock).
    pub fn selected() -> BrokerKind {
        match std::env::var(SWITCH).as_deref().map(str::trim) {
            Err(_) | Ok("") | Ok("mock") => BrokerKind::Mock,
            Ok("tansu") => BrokerKind::Tansu,
            Ok(other) => panic!("{SWITCH}={other:?}: expected \"mock\" or \"tansu\""),
        }
    }

    /// Whether the broker keeps offset-commit metadata (the sidecar's skip set).
    /// tansu drops it: there a handoff redelivers what the skip set would have skipped.
    pub fn keeps_commit_metadata(self) -> bool {
        self == BrokerKind::Mock
    }

    /// Properties the tests' own producers need on this broker.
    ///
    /// tansu 0.6.0 answers ListOffsets (latest) with the base offset of the partition's
    /// last record batch + 1, not the log end offset (measured: 150 records in batches
    /// of several records read back as 121). The sidecar asks for the log's end when a
    /// partition is assigned and takes an end below the committed offset for a
    /// truncation (it then dead-letters the transactions of the next `txn_timeout` that
    /// have no `txn-count` as `offset_gap`). With one record per batch the answer is
    /// right, so the tests' producers write one record per batch on tansu.
    pub fn producer_properties(self) -> &'static [(&'static str, &'static str)] {
        match self {
            BrokerKind::Mock => &[],
            BrokerKind::Tansu => &[("batch.num.messages", "1")],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Mock => "mock",
            BrokerKind::Tansu => "tansu",
        }
    }
}

/// Where the tansu binary is.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TXN_SIDECAR_TANSU").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    Path::new(&home).join(".cache/txn-sidecar/tansu/tansu")
}

/// A tansu broker process on a loopback port, killed (and reaped) on drop.
pub struct Tansu {
    child: Child,
    /// `127.0.0.1:PORT`, for clients' `bootstrap.servers`.
    pub bootstrap: String,
    /// The broker's stdout and stderr.
    pub log: PathBuf,
    /// Remove the log when dropped outside a panic (tests that keep no log directory).
    pub remove_log_on_clean_drop: bool,
}

impl Tansu {
    /// Starts a broker with `topics` (name, partitions) created; its log goes to
    /// `log_dir/tansu-<port>.log`.
    pub fn start(log_dir: &Path, topics: &[(&str, i32)]) -> Tansu {
        let bin = tansu_bin();
        assert!(
            bin.is_file(),
            "{} is missing: run scripts/install-test-deps.sh (it installs the tansu broker)",
            bin.display()
        );
        std::fs::create_dir_all(log_dir).expect("tansu log dir");
        // The port is picked free just before the start; should another process take it
        // meanwhile, tansu exits at once and is started again on another port.
        let mut attempt = 0;
        let broker = loop {
            attempt += 1;
            let port = free_port();
            let log = log_dir.join(format!("tansu-{port}.log"));
            let out = File::create(&log).expect("tansu log");
            let url = format!("tcp://127.0.0.1:{port}");
            let child = Command::new(&bin)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"])
                // tansu reads RUST_LOG too: at info it logs every request (gigabytes).
                .env(
                    "RUST_LOG",
                    std::env::var("TXN_SIDECAR_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("tansu log"))
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut t = Tansu {
                child,
                bootstrap: format!("127.0.0.1:{port}"),
                log,
                remove_log_on_clean_drop: false,
            };
            match t.wait_ready(Duration::from_secs(20)) {
                Ok(()) => break t,
                Err(why) if attempt < 3 => {
                    eprintln!("tansu on port {port}: {why}; starting it again");
                }
                Err(why) => panic!("tansu did not start: {why}"),
            }
        };
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions);
        }
        broker
    }

    /// Waits for tansu's "ready" line while the process stays alive.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("exited {status}: {text}"));
            }
            if text.lines().any(|l| l.starts_with("ready in")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("no \"ready\" line within {timeout:?}: {text}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `tansu topic create NAME --partitions N`.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let out = Command::new(tansu_bin())
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://{}", self.bootstrap)])
            .stdin(Stdio::null())
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {topic} --partitions {partitions}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        // Memory storage: nothing to flush, so SIGKILL is a clean stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.remove_log_on_clean_drop && !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
