//! Processes: the broker (`txn-sidecar mock-kafka`, or tansu with
//! `TXN_SIDECAR_TEST_BROKER=tansu`; either outlives the sidecars) and the sidecars
//! (`txn-sidecar run`), plus a reader of the group's committed offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::common::broker::{BrokerKind, Tansu};
use crate::common::free_port;

pub const BIN: &str = env!("CARGO_BIN_EXE_txn-sidecar");

/// Sends `sig` (e.g. "-TERM") with the `kill` command, as an operator would.
pub fn kill_cmd(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The broker in its own process: the mock cluster (`txn-sidecar mock-kafka`) or tansu.
pub struct Broker {
    pub kind: BrokerKind,
    process: BrokerProcess,
    pub bootstrap: String,
}

enum BrokerProcess {
    Mock(Child),
    Tansu(Tansu),
}

impl Broker {
    /// Starts the broker `TXN_SIDECAR_TEST_BROKER` selects; its log goes to `dir`.
    pub fn start(dir: &Path, topics: &[(&str, i32)]) -> Broker {
        let kind = BrokerKind::selected();
        match kind {
            BrokerKind::Mock => {
                let (child, bootstrap) = start_mock(dir, topics);
                Broker {
                    kind,
                    process: BrokerProcess::Mock(child),
                    bootstrap,
                }
            }
            BrokerKind::Tansu => {
                let t = Tansu::start(dir, topics);
                let bootstrap = t.bootstrap.clone();
                Broker {
                    kind,
                    process: BrokerProcess::Tansu(t),
                    bootstrap,
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        match &self.process {
            BrokerProcess::Mock(c) => c.id(),
            BrokerProcess::Tansu(t) => t.pid(),
        }
    }
}

fn start_mock(dir: &Path, topics: &[(&str, i32)]) -> (Child, String) {
    let file = dir.join("bootstrap.txt");
    let log = File::create(dir.join("broker.log")).expect("broker log");
    let mut cmd = Command::new(BIN);
    cmd.args(["mock-kafka", "--brokers", "1", "--bootstrap-file"])
        .arg(&file);
    for (t, p) in topics {
        cmd.args(["--topic", &format!("{t}:{p}")]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mock-kafka");
    let deadline = Instant::now() + Duration::from_secs(20);
    let bootstrap = loop {
        if let Ok(s) = std::fs::read_to_string(&file) {
            if !s.trim().is_empty() {
                break s.trim().to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "mock-kafka did not write {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (child, bootstrap)
}

impl Drop for Broker {
    fn drop(&mut self) {
        // tansu is killed by its own Drop.
        let BrokerProcess::Mock(child) = &mut self.process else {
            return;
        };
        kill_cmd(child.id(), "-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Settings every sidecar of the suite gets.
#[derive(Debug, Clone)]
pub struct SidecarSettings {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub extra: Vec<String>,
}

/// One sidecar process (an "incarnation" of a slot).
pub struct Sidecar {
    pub slot: usize,
    pub inc: usize,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub started: Instant,
    child: Child,
}

impl Sidecar {
    pub fn spawn(
        s: &SidecarSettings,
        dir: &Path,
        slot: usize,
        inc: usize,
        app_url: &str,
    ) -> Sidecar {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("sidecar-{inc:02}-slot{slot}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("sidecar log");
        let child = Command::new(BIN)
            .args([
                "run",
                "--brokers",
                &s.brokers,
                "--topic",
                &s.topic,
                "--group",
                &s.group,
            ])
            .args([
                "--app-url",
                app_url,
                "--admin-addr",
                &admin.to_string(),
                "--log-format",
                "text",
            ])
            .args(&s.extra)
            .env("RUST_LOG", "info")
            .env_remove("TXN_SIDECAR_CONFIG")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn txn-sidecar run");
        Sidecar {
            slot,
            inc,
            admin,
            log,
            started: Instant::now(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM with `kill -TERM`, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        kill_cmd(self.pid(), "-TERM");
        self.wait_exit(timeout)
    }

    /// SIGKILL, then reaps.
    pub fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reap")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GET an admin path (plain HTTP/1.0 over a socket; no client runtime needed).
    pub fn admin_get(&self, path: &str) -> Option<String> {
        http_get(self.admin, path)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Value of one sample of a Prometheus exposition (`name{labels}` exactly as printed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The group's committed position of one partition: offset and skip set.
#[derive(Debug, Clone, Default)]
pub struct CommittedPos {
    pub offset: Option<i64>,
    pub metadata: String,
    pub skip: BTreeSet<i64>,
}

impl CommittedPos {
    /// Whether a new owner would not redeliver the transaction whose marker is at `commit_offset`.
    pub fn covers(&self, commit_offset: i64) -> bool {
        match self.offset {
            Some(o) => commit_offset < o || self.skip.contains(&commit_offset),
            None => false,
        }
    }
}

/// Reads committed offsets of the group (without joining it) and high watermarks.
pub struct GroupReader {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl GroupReader {
    pub fn new(brokers: &str, group: &str, topic: &str, partitions: i32) -> GroupReader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader consumer");
        GroupReader {
            consumer,
            topic: topic.to_string(),
            partitions,
        }
    }

    pub fn committed(&self) -> Result<BTreeMap<i32, CommittedPos>, String> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let r = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let mut out = BTreeMap::new();
        for p in 0..self.partitions {
            let mut pos = CommittedPos::default();
            if let Some(el) = r.find_partition(&self.topic, p) {
                if let Offset::Offset(o) = el.offset() {
                    pos.offset = Some(o);
                    pos.metadata = el.metadata().to_string();
                    pos.skip = decode_skip_set(o, &pos.metadata);
                }
            }
            out.insert(p, pos);
        }
        Ok(out)
    }

    pub fn high_watermarks(&self, topic: &str, partitions: i32) -> Result<Vec<i64>, String> {
        (0..partitions)
            .map(|p| {
                self.consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(_, hi)| hi)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// Decodes the skip set independently of the sidecar's code:
/// `txs2:<base>:d1,d2,...[;tombstone...]`, deltas from the committed offset, which must be
/// `<base>`. Anything else is an empty set (what the sidecar does too).
pub fn decode_skip_set(base: i64, metadata: &str) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    let Some(rest) = metadata.strip_prefix("txs2:") else {
        return out;
    };
    let Some((b, body)) = rest.split_once(':') else {
        return out;
    };
    if b.parse::<i64>() != Ok(base) {
        return out;
    }
    let body = body.split(';').next().unwrap_or_default();
    let mut prev = base;
    for d in body.split(',').filter(|s| !s.is_empty()) {
        match d.parse::<i64>() {
            Ok(d) if d >= 0 => {
                prev += d;
                out.insert(prev);
            }
            _ => return BTreeSet::new(),
        }
    }
    out
}
