//! Shared test fixtures: an embedded Kafka (librdkafka's mock cluster on real TCP, or a
//! tansu broker process, see [`broker`]), a recording HTTP app on a loopback port, and
//! condition waits with deadlines.
#![allow(dead_code)]

pub mod broker;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
pub use txn_sidecar::config::GroupProtocol;
use txn_sidecar::config::{Config, Sources};
use txn_sidecar::embedded::{fast_group_properties, EmbeddedKafka};

pub use broker::BrokerKind;
use broker::Tansu;

/// A loopback port that was free a moment ago, for a process that binds it itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; panics with `what` then.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The broker behind a [`Kafka`].
pub enum Backend {
    Mock(EmbeddedKafka),
    Tansu(Tansu),
}

/// A broker with the test topics plus a producer for writing test records.
pub struct Kafka {
    // The producer is declared first so that it is dropped before the broker.
    producer: ThreadedProducer<DefaultProducerContext>,
    pub brokers: String,
    pub backend: Backend,
}

impl Kafka {
    /// librdkafka's mock cluster, in-process, whatever `TXN_SIDECAR_TEST_BROKER` says.
    pub fn start(topics: &[(&str, i32)]) -> Kafka {
        Kafka::start_on(BrokerKind::Mock, topics)
    }

    /// The broker `TXN_SIDECAR_TEST_BROKER` selects (`mock`, the default, or `tansu`).
    pub fn start_selected(topics: &[(&str, i32)]) -> Kafka {
        Kafka::start_on(BrokerKind::selected(), topics)
    }

    pub fn start_on(kind: BrokerKind, topics: &[(&str, i32)]) -> Kafka {
        let backend = match kind {
            BrokerKind::Mock => {
                let inner = EmbeddedKafka::start(1).expect("mock cluster");
                for (t, p) in topics {
                    inner.create_topic(t, *p).expect("create topic");
                }
                Backend::Mock(inner)
            }
            BrokerKind::Tansu => {
                let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tansu");
                let mut t = Tansu::start(&dir, topics);
                t.remove_log_on_clean_drop = true;
                Backend::Tansu(t)
            }
        };
        let brokers = match &backend {
            Backend::Mock(m) => m.bootstrap_servers(),
            Backend::Tansu(t) => t.bootstrap.clone(),
        };
        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &brokers)
            .set("linger.ms", "0")
            .set("enable.idempotence", "true");
        for (k, v) in kind.producer_properties() {
            pc.set(*k, *v);
        }
        let producer = pc.create().expect("producer");
        Kafka {
            producer,
            brokers,
            backend,
        }
    }

    pub fn kind(&self) -> BrokerKind {
        match self.backend {
            Backend::Mock(_) => BrokerKind::Mock,
            Backend::Tansu(_) => BrokerKind::Tansu,
        }
    }

    /// The mock cluster, for its fault injection; panics on another broker.
    pub fn mock(&self) -> &EmbeddedKafka {
        match &self.backend {
            Backend::Mock(m) => m,
            Backend::Tansu(_) => panic!("this test needs librdkafka's mock cluster"),
        }
    }

    /// Waits until every record sent so far is acknowledged.
    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(10)).expect("flush");
    }

    /// Queues one record for an explicit partition (idempotent producer: order is kept).
    pub fn send(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        value: Option<&[u8]>,
    ) {
        self.send_at(topic, partition, key, headers, value, None);
    }

    /// [`Kafka::send`] with an explicit record timestamp (ms since the epoch).
    pub fn send_at(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        value: Option<&[u8]>,
        timestamp_ms: Option<i64>,
    ) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).partition(partition).headers(h);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        if let Some(ts) = timestamp_ms {
            rec = rec.timestamp(ts);
        }
        self.producer.send(rec).map_err(|(e, _)| e).expect("send");
    }

    /// Queues one record whose headers may have null values (`None`), unlike
    /// [`Kafka::send`].
    pub fn send_raw(
        &self,
        topic: &str,
        partition: i32,
        headers: &[(&str, Option<&[u8]>)],
        value: Option<&[u8]>,
    ) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: *v });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).partition(partition).headers(h);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.producer.send(rec).map_err(|(e, _)| e).expect("send");
    }

    /// Headers-protocol task.
    pub fn task(&self, topic: &str, partition: i32, id: &str, value: &str) {
        self.send(
            topic,
            partition,
            Some(id.as_bytes()),
            &[("txn-id", id.as_bytes()), ("txn-type", b"task")],
            Some(value.as_bytes()),
        );
    }

    /// Headers-protocol commit.
    pub fn commit(&self, topic: &str, partition: i32, id: &str) {
        self.send(
            topic,
            partition,
            Some(id.as_bytes()),
            &[("txn-id", id.as_bytes()), ("txn-type", b"commit")],
            None,
        );
    }

    /// Headers-protocol abort.
    pub fn abort(&self, topic: &str, partition: i32, id: &str) {
        self.send(
            topic,
            partition,
            Some(id.as_bytes()),
            &[("txn-id", id.as_bytes()), ("txn-type", b"abort")],
            None,
        );
    }

    /// The committed offset and metadata of `group` for `topic`/`partition`.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> (Option<i64>, String) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let r = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let el = r.find_partition(topic, partition).expect("partition");
        let off = match el.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        (off, el.metadata().to_string())
    }

    /// The log end offset (high watermark) of `topic`/`partition`.
    pub fn end_offset(&self, topic: &str, partition: i32) -> i64 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .expect("consumer");
        c.fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("watermarks")
            .1
    }

    /// Every record in `topic`/`partition` from the start, as (key, headers, value).
    pub fn read_all(&self, topic: &str, partition: i32, expect: usize) -> Vec<ReadRecord> {
        use rdkafka::message::{Headers, Message};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let mut headers = BTreeMap::new();
                let mut header_list = Vec::new();
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let hh = h.get(i);
                        headers.insert(
                            hh.key.to_string(),
                            String::from_utf8_lossy(hh.value.unwrap_or_default()).into_owned(),
                        );
                        header_list.push((hh.key.to_string(), hh.value.map(<[u8]>::to_vec)));
                    }
                }
                out.push(ReadRecord {
                    header_list,
                    timestamp: m.timestamp().to_millis(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    value: m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                });
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub offset: i64,
    /// Every header in record order, duplicates kept.
    pub header_list: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp: Option<i64>,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub value: Option<String>,
}

/// A config for tests: fast group timing, quick commits, admin on a free port.
pub fn config(brokers: &str, topic: &str, app_url: &str, extra: &[(&str, &str)]) -> Config {
    config_with(GroupProtocol::Classic, brokers, topic, app_url, extra)
}

/// [`config`] under a group protocol: KIP-848 (`Consumer`) takes its group timing from
/// the embedded cluster and refuses the classic session and heartbeat properties.
pub fn config_with(
    protocol: GroupProtocol,
    brokers: &str,
    topic: &str,
    app_url: &str,
    extra: &[(&str, &str)],
) -> Config {
    let mut s = Sources::default();
    for (k, v) in [
        ("brokers", brokers),
        ("topic", topic),
        ("group", "test-group"),
        ("app.url", app_url),
        ("admin.addr", "127.0.0.1:0"),
        ("commit_interval", "200ms"),
        ("log_format", "text"),
        ("retry.initial_backoff", "20ms"),
        ("retry.max_backoff", "200ms"),
    ] {
        s.flags.insert(k.into(), v.into());
    }
    for (k, v) in fast_group_properties(protocol) {
        s.flags.insert(format!("kafka.{k}"), v.to_string());
    }
    // `TXN_SIDECAR_READER_THREADS` runs the in-process sidecars with reader threads too
    // (spawned binaries read it themselves), so the suite can be run with them on.
    if let Ok(n) = std::env::var("TXN_SIDECAR_READER_THREADS") {
        s.flags.insert("reader_threads".into(), n);
    }
    for (k, v) in extra {
        s.flags.insert(k.to_string(), v.to_string());
    }
    Config::load(&s).expect("valid test config")
}

/// One request the app received.
#[derive(Debug, Clone)]
pub struct Got {
    pub idempotency_key: String,
    pub txn_id_header: String,
    pub traceparent: Option<String>,
    pub body: serde_json::Value,
    pub at: Instant,
}

impl Got {
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
    pub fn task_values(&self) -> Vec<serde_json::Value> {
        self.body["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|t| t["value"].clone())
            .collect()
    }
    pub fn task_offsets(&self) -> Vec<i64> {
        self.body["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|t| t["offset"].as_i64().unwrap())
            .collect()
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
    pub retry_after: Option<String>,
}

impl Answer {
    pub fn status(status: u16) -> Answer {
        Answer {
            status,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }
}

#[derive(Default)]
struct AppInner {
    /// Every request, including non-2xx ones.
    attempts: Vec<Got>,
    /// Requests answered 2xx.
    accepted: Vec<Got>,
    script: VecDeque<Answer>,
    default: Option<Answer>,
    /// Answers for transactions whose id starts with a prefix, until cleared.
    rules: Vec<(String, Answer)>,
}

/// A real HTTP server on a loopback port that records every transaction.
#[derive(Clone)]
pub struct RecordingApp {
    inner: Arc<Mutex<AppInner>>,
    pub addr: SocketAddr,
}

impl RecordingApp {
    pub async fn start() -> RecordingApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = RecordingApp {
            inner: Arc::default(),
            addr,
        };
        let router = Router::new()
            .route("/transactions", post(receive))
            .route("/transactions", get(|| async { "ok" }))
            .with_state(app.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        app
    }

    pub fn url(&self) -> String {
        format!("http://{}/transactions", self.addr)
    }

    /// Answers the next requests with `answers`, in order.
    pub fn script(&self, answers: Vec<Answer>) {
        self.inner.lock().unwrap().script.extend(answers);
    }

    /// Answers every unscripted request with `a` (None = 200).
    pub fn set_default(&self, a: Option<Answer>) {
        self.inner.lock().unwrap().default = a;
    }

    /// Answers every request for an id starting with `prefix` with `a`, until cleared.
    pub fn rule(&self, prefix: &str, a: Answer) {
        self.inner
            .lock()
            .unwrap()
            .rules
            .push((prefix.to_string(), a));
    }

    pub fn clear_rules(&self) {
        self.inner.lock().unwrap().rules.clear();
    }

    pub fn accepted(&self) -> Vec<Got> {
        self.inner.lock().unwrap().accepted.clone()
    }

    pub fn attempts(&self) -> Vec<Got> {
        self.inner.lock().unwrap().attempts.clone()
    }

    pub fn accepted_ids(&self) -> Vec<String> {
        self.accepted().iter().map(|g| g.id().to_string()).collect()
    }

    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Got> {
        let me = self.clone();
        wait_until(timeout, &format!("{n} accepted transactions"), move || {
            me.accepted().len() >= n
        })
        .await;
        self.accepted()
    }
}

async fn receive(State(app): State<RecordingApp>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let got = Got {
        idempotency_key: h("idempotency-key").unwrap_or_default(),
        txn_id_header: h("x-txn-id").unwrap_or_default(),
        traceparent: h("traceparent"),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        at: Instant::now(),
    };
    let answer = {
        let mut inner = app.inner.lock().unwrap();
        inner.attempts.push(got.clone());
        let id = got.id().to_string();
        let rule = inner
            .rules
            .iter()
            .find(|(p, _)| id.starts_with(p.as_str()))
            .map(|(_, a)| a.clone());
        rule.or_else(|| inner.script.pop_front())
            .or_else(|| inner.default.clone())
    };
    let answer = answer.unwrap_or(Answer::status(200));
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    if (200..300).contains(&answer.status) || answer.status == 409 {
        app.inner.lock().unwrap().accepted.push(got);
    }
    let mut resp = StatusCode::from_u16(answer.status).unwrap().into_response();
    if let Some(ra) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    resp
}

/// GETs a path of the admin server.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// Value of one sample line of a Prometheus exposition (`name{labels}` exactly as printed).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_txn-sidecar");

/// What a finished `txn-sidecar` process left.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `txn-sidecar <args>` to completion (at most 20 s) with `env` on top of the
/// test's environment less every `TXN_SIDECAR_*` variable.
pub fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Finished {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("TXN_SIDECAR_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("spawn txn-sidecar");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "txn-sidecar {args:?} did not exit within 20 s: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// A `txn-sidecar run` process whose stderr goes to a log file (a pipe nobody reads
/// would fill up and block it).
pub struct SidecarProcess {
    child: std::process::Child,
    pub admin: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SidecarProcess {
    /// `txn-sidecar run <args>` with `env` on top of the test's environment less every
    /// `TXN_SIDECAR_*` variable; `admin` is where its admin server will listen (the
    /// caller passes it in `args` or `env`).
    pub fn spawn(admin: SocketAddr, args: &[String], env: &[(String, String)]) -> SidecarProcess {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sidecar.log");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("TXN_SIDECAR_") {
                cmd.env_remove(k);
            }
        }
        if !env.iter().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd.spawn().expect("spawn txn-sidecar run");
        SidecarProcess {
            child,
            admin,
            log,
            _dir: dir,
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GETs an admin path; `None` while nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.unwrap_or_default()))
    }

    /// Waits for `/readyz` to answer 200 (joined the group, the app answers).
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "txn-sidecar exited ({s}) before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The partitions it owns, from `/v1/partitions`, as (topic, partition).
    pub async fn partitions(&self) -> Vec<(String, i32)> {
        let Some((200, body)) = self.get("/v1/partitions").await else {
            return Vec::new();
        };
        let v: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        v.iter()
            .map(|p| {
                (
                    p["topic"].as_str().unwrap_or_default().to_string(),
                    p["partition"].as_i64().unwrap_or(-1) as i32,
                )
            })
            .collect()
    }

    /// SIGTERM (with `kill`, as an operator would), then the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {timeout:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The variables the kubelet injects into every container for a Service named
/// `service` with cluster IP `ip` and `ports` (name, port, protocol), as
/// `pkg/kubelet/envvars` writes them: `<SVC>_SERVICE_HOST`, `<SVC>_SERVICE_PORT`,
/// `<SVC>_SERVICE_PORT_<NAME>` per named port, `<SVC>_PORT` (first port as a URL), and
/// per port `<SVC>_PORT_<n>_<PROTO>` with `_PROTO`, `_PORT` and `_ADDR`.
pub fn service_link_env(
    service: &str,
    ip: &str,
    ports: &[(&str, u16, &str)],
) -> Vec<(String, String)> {
    let name = service.to_ascii_uppercase().replace('-', "_");
    let mut v = vec![(format!("{name}_SERVICE_HOST"), ip.to_string())];
    let (_, first, first_proto) = ports[0];
    v.push((format!("{name}_SERVICE_PORT"), first.to_string()));
    for (pname, port, _) in ports {
        if !pname.is_empty() {
            v.push((
                format!(
                    "{name}_SERVICE_PORT_{}",
                    pname.to_ascii_uppercase().replace('-', "_")
                ),
                port.to_string(),
            ));
        }
    }
    v.push((
        format!("{name}_PORT"),
        format!("{}://{ip}:{first}", first_proto.to_ascii_lowercase()),
    ));
    for (_, port, proto) in ports {
        let prefix = format!("{name}_PORT_{port}_{}", proto.to_ascii_uppercase());
        let lower = proto.to_ascii_lowercase();
        v.push((prefix.clone(), format!("{lower}://{ip}:{port}")));
        v.push((format!("{prefix}_PROTO"), lower));
        v.push((format!("{prefix}_PORT"), port.to_string()));
        v.push((format!("{prefix}_ADDR"), ip.to_string()));
    }
    v
}
