#![forbid(unsafe_code)]
//! `scripts/bench.sh` → this driver: every figure next to a baseline measured in the same
//! run on the same machine, repeated, medians reported.
//!
//! Processes (each its own, so CPU and RSS are per party):
//! - `txn-sidecar mock-kafka`: the broker (librdkafka's mock cluster);
//! - `txn-sidecar run`: the sidecar under test, exactly as users run it (default logging);
//! - `sidecar role sink`: the fast local app (axum, 200 to every POST);
//! - `sidecar role loadgen`: a client loop measuring the sink's own max POST rate, with
//!   reqwest and with the sidecar's own client (the faster is the baseline);
//! - `sidecar role bare`: an rdkafka `BaseConsumer` with the sidecar's consumer config
//!   that does nothing with what it polls.
//!
//! The driver (this process) produces the data, paces the latency load, scrapes the
//! sidecar's `/metrics` and reads `/proc/<pid>/{stat,status}`.

mod roles;
mod util;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use util::*;

/// Group timing the brief prescribes against the mock cluster (FAST_GROUP_PROPERTIES).
const TEST_GROUP: &[(&str, &str)] = &[
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "500"),
];

struct Opts {
    reps: usize,
    /// Staging: partitions × task records per partition (fits the mock's 5 MB per partition).
    stage_parts: i32,
    stage_per_part: usize,
    /// Delivery: partitions (= concurrency) × transactions per partition.
    deliver_parts: i32,
    deliver_per_part: usize,
    /// Latency: seconds of paced load, and its partitions.
    latency_secs: f64,
    latency_parts: i32,
    /// Latency: the producer's `linger.ms`.
    latency_linger_ms: usize,
    /// Load of the latency run when the delivery benchmark did not run (txn/s, = 2× half).
    latency_default_rate: u32,
    /// Memory: partitions × open task records per partition.
    mem_parts: i32,
    mem_per_part: usize,
    only: Vec<String>,
    /// librdkafka properties added to every consumer, sidecar and bare alike (`--kafka k=v,k=v`).
    kafka: Vec<(String, String)>,
    out: PathBuf,
    bin: PathBuf,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench and scripts/bench.sh passes `run`. `cargo test
    // --all-targets` (CI) runs this binary with no arguments: do nothing then.
    let bench =
        args.iter().any(|a| a == "--bench") || args.get(1).map(String::as_str) == Some("run");
    let args: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--bench" && a != "run")
        .collect();
    let r = if args.get(1).map(String::as_str) == Some("role") {
        match args.get(2).map(String::as_str) {
            Some("sink") => roles::sink(&args[3..]),
            Some("loadgen") => roles::loadgen(&args[3..]),
            Some("bare") => roles::bare(&args[3..]),
            Some("mock") => roles::mock(&args[3..]),
            r => Err(anyhow!("unknown role {r:?}")),
        }
    } else if bench {
        driver(&args[1..])
    } else {
        println!("txn-sidecar benchmarks: run scripts/bench.sh (or cargo bench --bench sidecar)");
        Ok(())
    };
    if let Err(e) = r {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn opts(args: &[String]) -> Result<Opts> {
    let f = roles::flags(args);
    let quick = args.iter().any(|a| a == "--quick");
    let get = |k: &str, d: usize| f.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let bin = f
        .get("sidecar-bin")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/txn-sidecar"));
    if !bin.exists() {
        bail!(
            "{} not found: build it with cargo build --release (scripts/bench.sh does)",
            bin.display()
        );
    }
    Ok(Opts {
        reps: get("reps", if quick { 1 } else { 3 }),
        stage_parts: get("stage-partitions", 16) as i32,
        stage_per_part: get("stage-records", if quick { 10_000 } else { 25_000 }),
        deliver_parts: get("deliver-partitions", 4) as i32,
        deliver_per_part: get("deliver-txns", if quick { 1_000 } else { 2_500 }),
        latency_secs: get("latency-secs", if quick { 3 } else { 6 }) as f64,
        latency_parts: 4,
        latency_linger_ms: get("latency-linger-ms", 0),
        latency_default_rate: get("latency-max-rate", 8000) as u32,
        mem_parts: 8,
        mem_per_part: get("mem-records", 25_000),
        kafka: f
            .get("kafka")
            .map(|s| {
                s.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        only: f
            .get("only")
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        out: f
            .get("out")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/bench")),
        bin,
    })
}

// ---------------------------------------------------------------------------------------
// processes

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status();
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGTERM and wait up to `timeout` for the exit.
    fn stop(&mut self, timeout: Duration) -> bool {
        if self.exited() {
            return true;
        }
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "bench: {} did not stop within {timeout:?}, killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    fn stdout_lines(&mut self) -> BufReader<ChildStdout> {
        BufReader::new(self.child.stdout.take().expect("piped stdout"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

struct Ctx {
    o: Opts,
    me: PathBuf,
    brokers: String,
    sink: SocketAddr,
    logs: PathBuf,
    /// Process ids of the broker and the sink, for their CPU under load.
    mock_pid: u32,
    sink_pid: u32,
}

impl Ctx {
    fn log_file(&self, name: &str) -> Result<File> {
        Ok(File::create(self.logs.join(format!("{name}.log")))?)
    }

    /// Runs this binary as a role; stdout piped, stderr to a log file.
    fn role(&self, name: &str, args: &[String]) -> Result<Proc> {
        let child = Command::new(&self.me)
            .arg("role")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(self.log_file(name)?)
            .spawn()
            .with_context(|| format!("spawn role {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    fn sink_reset(&self) -> Result<()> {
        http(self.sink, "POST", "/reset", b"")?;
        Ok(())
    }

    /// Sink events after `since` (µs): (t_us, route, partition, latency_us).
    fn sink_events(&self, since: u64) -> Vec<(u64, u8, i32, i64)> {
        let (_, body) =
            http(self.sink, "GET", &format!("/report?since={since}"), b"").unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or_default()
    }

    fn sidecar(
        &self,
        name: &str,
        topic: &str,
        group: &str,
        route: &str,
        kafka: &[(&str, &str)],
        sets: &[(&str, &str)],
    ) -> Result<Sidecar> {
        self.sidecar_on(&self.brokers, name, topic, group, route, kafka, sets)
    }

    #[allow(clippy::too_many_arguments)]
    fn sidecar_on(
        &self,
        brokers: &str,
        name: &str,
        topic: &str,
        group: &str,
        route: &str,
        kafka: &[(&str, &str)],
        sets: &[(&str, &str)],
    ) -> Result<Sidecar> {
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut cmd = Command::new(&self.o.bin);
        cmd.arg("run")
            .args(["--brokers", brokers, "--topic", topic, "--group", group])
            .args(["--app-url", &format!("http://{}/{route}", self.sink)])
            .args(["--admin-addr", &admin.to_string()]);
        for (k, v) in kafka
            .iter()
            .copied()
            .chain(self.o.kafka.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            cmd.arg("-X").arg(format!("{k}={v}"));
        }
        for (k, v) in sets {
            cmd.arg("--set").arg(format!("{k}={v}"));
        }
        // Default logging (info, JSON), as deployed; written to a file like a container log.
        let log = self.log_file(name)?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn txn-sidecar")?;
        let mut s = Sidecar {
            proc: Proc {
                child,
                name: name.to_string(),
            },
            admin,
            perf: None,
        };
        // Profiling aid: BENCH_PERF=DIR attaches `perf record` to every sidecar (the
        // figures of such a run are not comparable: perf costs CPU).
        if let Some(dir) = std::env::var_os("BENCH_PERF") {
            let out = PathBuf::from(dir).join(format!("{name}.perf.data"));
            // BENCH_PERF_ARGS replaces the sampling options, e.g. for off-CPU time:
            // "-e sched:sched_switch --call-graph dwarf,16384".
            let opts = std::env::var("BENCH_PERF_ARGS")
                .unwrap_or_else(|_| "-F 499 --call-graph dwarf,16384".into());
            let child = Command::new("perf")
                .arg("record")
                .args(opts.split_whitespace())
                .args(["-p", &s.proc.pid().to_string(), "-o"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(self.log_file(&format!("{name}.perf"))?)
                .spawn()
                .context("spawn perf")?;
            s.perf = Some(Proc {
                child,
                name: format!("perf {name}"),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while http(admin, "GET", "/healthz", b"").map(|r| r.0).ok() != Some(200) {
            if Instant::now() > deadline || s.proc.exited() {
                bail!(
                    "sidecar {name} did not come up (see {}/{name}.log)",
                    self.logs.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

struct Sidecar {
    proc: Proc,
    admin: SocketAddr,
    perf: Option<Proc>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut p) = self.perf.take() {
            p.signal("INT");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !p.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Sidecar {
    fn scrape(&self) -> String {
        get_text(self.admin, "/metrics")
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&self.scrape(), series).unwrap_or(f64::NAN)
    }

    fn wait_metric(
        &self,
        series: &str,
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(series);
            if ok(v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{}: {series} = {v} after {timeout:?}", self.proc.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

const TASKS: &str = "txn_sidecar_records_consumed_total{kind=\"task\"}";
const DELIVERED: &str = "txn_sidecar_transactions_total{outcome=\"delivered\"}";
const ASSIGNED: &str = "txn_sidecar_assigned_partitions";

// ---------------------------------------------------------------------------------------
// producing

struct Producer(ThreadedProducer<DefaultProducerContext>);

impl Producer {
    fn new(brokers: &str, linger_ms: &str) -> Result<Producer> {
        Ok(Producer(
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("linger.ms", linger_ms)
                .set("enable.idempotence", "true")
                .set("queue.buffering.max.messages", "1000000")
                .set("queue.buffering.max.kbytes", "1048576")
                .create()?,
        ))
    }

    /// One record of the headers protocol, keyed by the transaction id.
    fn send(&self, topic: &str, partition: i32, id: &str, kind: &str, value: Option<&[u8]>) {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "txn-id",
                value: Some(id),
            })
            .insert(Header {
                key: "txn-type",
                value: Some(kind),
            });
        let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .partition(partition)
            .key(id)
            .headers(headers);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        self.enqueue(rec);
    }

    /// Hands `rec` to the producer, waiting while its queue is full.
    fn enqueue(&self, mut rec: BaseRecord<'_, str, [u8]>) {
        loop {
            match self.0.send(rec) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }

    /// One record of the key-prefix protocol: key `<kind>-<id>`, no headers.
    fn send_key_prefix(&self, topic: &str, partition: i32, key: &str, value: &[u8]) {
        self.enqueue(
            BaseRecord::to(topic)
                .partition(partition)
                .key(key)
                .payload(value),
        );
    }

    /// `tasks` tasks then the `end` marker (`commit`, `abort`; `None` leaves it open).
    fn txn(
        &self,
        topic: &str,
        partition: i32,
        id: &str,
        tasks: usize,
        t_us: u64,
        end: Option<&str>,
    ) {
        let v = task_value(t_us);
        for _ in 0..tasks {
            self.send(topic, partition, id, "task", Some(&v));
        }
        if let Some(kind) = end {
            self.send(topic, partition, id, kind, Some(&v));
        }
    }

    fn flush(&self) -> Result<()> {
        self.0.flush(Duration::from_secs(60))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// the driver

fn driver(args: &[String]) -> Result<()> {
    let o = opts(args)?;
    let logs = o.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let me = std::env::current_exe()?;
    let only = o.only.clone();
    let want = move |k: &str| only.is_empty() || only.iter().any(|x| x == k);
    eprintln!("bench: {} repetitions; logs in {}", o.reps, logs.display());

    // The broker: one mock-cluster process for the whole run; per-repetition topics where
    // a fresh (empty) topic matters.
    let mut topics = vec![
        "warmup:1".to_string(),
        format!("stage:{}", o.stage_parts),
        format!("stagekp:{}", o.stage_parts),
        format!("deliver:{}", o.deliver_parts),
    ];
    for r in 0..o.reps {
        topics.push(format!("lat-{r}:{}", o.latency_parts));
        topics.push(format!("latlow-{r}:{}", o.latency_parts));
        topics.push(format!("mem-{r}:{}", o.mem_parts));
        topics.push(format!("reb-{r}:4"));
    }
    let bootstrap_file = o.out.join("bootstrap.txt");
    let _ = std::fs::remove_file(&bootstrap_file);
    let mut mk = Command::new(&o.bin);
    mk.arg("mock-kafka")
        .arg("--bootstrap-file")
        .arg(&bootstrap_file);
    for t in &topics {
        mk.arg("--topic").arg(t);
    }
    let log = File::create(logs.join("mock-kafka.log"))?;
    let mock = Proc {
        child: mk
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn mock-kafka")?,
        name: "mock-kafka".into(),
    };
    let brokers = wait_file(&bootstrap_file, Duration::from_secs(15))?;

    // The sink app.
    let sink: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut ctx = Ctx {
        o,
        me,
        brokers,
        sink,
        logs,
        mock_pid: mock.pid(),
        sink_pid: 0,
    };
    let mut sink_proc = ctx.role("sink", &["sink".into(), "--addr".into(), sink.to_string()])?;
    ctx.sink_pid = sink_proc.pid();
    let mut line = String::new();
    sink_proc.stdout_lines().read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("sink did not start");
    }

    // A second broker whose coordinator completes a join as soon as it can (see roles::mock).
    let mut fast_args = vec![
        "mock".to_string(),
        "--initial-rebalance-delay-ms".into(),
        "100".into(),
    ];
    for r in 0..ctx.o.reps {
        fast_args.extend(["--topic".to_string(), format!("rebfast-{r}:4")]);
    }
    let mut fast_mock = ctx.role("mock-fast", &fast_args)?;
    let mut fast_brokers = String::new();
    fast_mock.stdout_lines().read_line(&mut fast_brokers)?;
    let fast_brokers = fast_brokers.trim().to_string();

    // Pre-produced data: read again by a fresh consumer group in every repetition.
    let o = &ctx.o;
    let bulk = Producer::new(&ctx.brokers, "5")?;
    let t = Instant::now();
    if want("staging") {
        for j in 0..o.stage_per_part / 10 {
            for p in 0..o.stage_parts {
                bulk.txn("stage", p, &format!("s{p}-{j:07}"), 10, now_us(), None);
            }
        }
    }
    if want("staging-key-prefix") {
        // The same transactions in the key-prefix protocol: key `task-<id>`, no headers.
        for j in 0..o.stage_per_part / 10 {
            for p in 0..o.stage_parts {
                let (key, v) = (format!("task-s{p}-{j:07}"), task_value(now_us()));
                for _ in 0..10 {
                    bulk.send_key_prefix("stagekp", p, &key, &v);
                }
            }
        }
    }
    if want("delivery") {
        for j in 0..o.deliver_per_part {
            for p in 0..o.deliver_parts {
                bulk.txn(
                    "deliver",
                    p,
                    &format!("d{p}-{j:07}"),
                    10,
                    now_us(),
                    Some("commit"),
                );
            }
        }
    }
    bulk.flush()?;
    eprintln!("bench: data produced in {:.1}s", t.elapsed().as_secs_f64());

    let mut reps: Vec<Value> = Vec::new();
    for r in 0..ctx.o.reps {
        let mut rep = serde_json::Map::new();
        let mut deliver_rate = f64::NAN;
        if want("staging") {
            let v = staging(&ctx, r)?;
            eprintln!("bench: rep {r} staging {v}");
            rep.insert("staging".into(), v);
        }
        if want("staging-key-prefix") {
            let v = staging_key_prefix(&ctx, r)?;
            eprintln!("bench: rep {r} staging-key-prefix {v}");
            rep.insert("staging_kp".into(), v);
        }
        if want("delivery") {
            let v = delivery(&ctx, r)?;
            eprintln!("bench: rep {r} delivery {v}");
            deliver_rate = v["sidecar_rate"].as_f64().unwrap_or(f64::NAN);
            rep.insert("delivery".into(), v);
        }
        if want("latency") {
            if deliver_rate.is_nan() {
                deliver_rate = f64::from(ctx.o.latency_default_rate);
            }
            let v = latency(&ctx, r, "lat", deliver_rate / 2.0, false)?;
            eprintln!("bench: rep {r} latency {}", summary(&v));
            rep.insert("latency".into(), v);
            // The same at a fixed light load, to show how the tail depends on CPU contention;
            // with a second bare consumer as the control for the measurement's own noise.
            let v = latency(&ctx, r, "latlow", 1000.0, true)?;
            eprintln!("bench: rep {r} latency (1000 txn/s) {}", summary(&v));
            rep.insert("latency_low".into(), v);
        }
        if want("memory") {
            let v = memory(&ctx, r)?;
            eprintln!("bench: rep {r} memory {v}");
            rep.insert("memory".into(), v);
        }
        if want("rebalance") {
            let v = rebalance(&ctx, &ctx.brokers, r, &format!("reb-{r}"), TEST_GROUP)?;
            eprintln!("bench: rep {r} rebalance {v}");
            rep.insert("rebalance".into(), v);
            let fast = [
                ("session.timeout.ms", "1500"),
                ("heartbeat.interval.ms", "250"),
            ];
            let v = rebalance(&ctx, &fast_brokers, r, &format!("rebfast-{r}"), &fast)?;
            eprintln!("bench: rep {r} rebalance (fast coordinator) {v}");
            rep.insert("rebalance_fast".into(), v);
        }
        reps.push(Value::Object(rep));
    }
    drop(sink_proc);
    drop(fast_mock);
    drop(mock);

    let table = table(&reps, &ctx.o);
    println!("{table}");
    std::fs::write(
        ctx.o.out.join("results.json"),
        serde_json::to_string_pretty(&json!({"machine": machine(), "reps": reps}))?,
    )?;
    std::fs::write(ctx.o.out.join("table.md"), &table)?;
    eprintln!(
        "bench: wrote {}/results.json and table.md",
        ctx.o.out.display()
    );
    Ok(())
}

fn summary(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, _| !k.ends_with("_samples"));
    }
    v
}

fn wait_file(p: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.trim().is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("mock-kafka did not write {}", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bare_args(
    ctx: &Ctx,
    topic: &str,
    group: &str,
    mode: &str,
    expect: u64,
    kafka: &[(&str, &str)],
) -> Vec<String> {
    let kafka: Vec<String> = kafka
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(ctx.o.kafka.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    [
        "bare",
        "--brokers",
        &ctx.brokers,
        "--topic",
        topic,
        "--group",
        group,
        "--mode",
        mode,
        "--expect",
        &expect.to_string(),
        "--kafka",
        &kafka.join(","),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Reads the role's stdout until its JSON result line.
fn role_result(p: &mut Proc, timeout: Duration) -> Result<Value> {
    let mut lines = p.stdout_lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        while lines.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
            if l.trim_start().starts_with('{') {
                let _ = tx.send(l.clone());
                return;
            }
            l.clear();
        }
    });
    let l = rx
        .recv_timeout(timeout)
        .map_err(|_| anyhow!("{} gave no result within {timeout:?}", p.name))?;
    Ok(serde_json::from_str(&l)?)
}

/// Waits for a role to print `assigned`, handing back the reader for its result.
fn role_assigned(p: &mut Proc, timeout: Duration) -> Result<std::sync::mpsc::Receiver<String>> {
    let mut lines = p.stdout_lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        while lines.read_line(&mut l).map(|n| n > 0).unwrap_or(false) {
            let _ = tx.send(l.clone());
            l.clear();
        }
    });
    let first = rx
        .recv_timeout(timeout)
        .map_err(|_| anyhow!("{} never got partitions", p.name))?;
    if first.trim() != "assigned" {
        bail!("{}: unexpected {first}", p.name);
    }
    Ok(rx)
}

// ---------------------------------------------------------------------------------------
// 1. staging throughput and CPU: pre-produced open transactions, no HTTP at all

/// A bare consumer reading all `n` records of `topic` in `mode` (`count`, `count-headers`).
fn stage_bare(ctx: &Ctx, topic: &str, mode: &str, n: u64, r: usize) -> Result<Value> {
    let name = format!("bare-{topic}-{mode}-{r}");
    let mut b = ctx.role(&name, &bare_args(ctx, topic, &name, mode, n, TEST_GROUP))?;
    role_result(&mut b, Duration::from_secs(120))
}

/// A sidecar staging all `n` records of `topic` (no HTTP: no transaction commits).
fn stage_sidecar(
    ctx: &Ctx,
    topic: &str,
    settings: &[(&str, &str)],
    n: f64,
    r: usize,
) -> Result<Value> {
    {
        let group = format!("sc-{topic}-{r}");
        let mut all = vec![("limits.max_staged_bytes", "2GiB")];
        all.extend_from_slice(settings);
        let s = ctx.sidecar(&group, topic, &group, "d", TEST_GROUP, &all)?;
        let pid = s.proc.pid();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut first: Option<(Instant, f64, f64)> = None;
        let last = loop {
            let text = s.scrape();
            let (t, c) = (Instant::now(), proc_cpu_secs(pid));
            let k = metric(&text, TASKS).unwrap_or(0.0);
            if first.is_none() && k > 0.0 {
                first = Some((t, k, c));
            }
            if k >= n {
                break (t, k, c);
            }
            if Instant::now() > deadline {
                bail!("sidecar staged only {k} of {n}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (t0, k0, c0) = first.unwrap();
        let (rss, hwm) = proc_rss(pid);
        let staged = s.metric("txn_sidecar_staged_bytes");
        Ok(json!({
            "rate": (last.1 - k0) / (last.0 - t0).as_secs_f64(),
            "cpu_per_record_us": (last.2 - c0) / (last.1 - k0) * 1e6,
            "rss": rss, "hwm": hwm, "staged_bytes": staged,
        }))
    }
}

fn staging(ctx: &Ctx, r: usize) -> Result<Value> {
    let n = (ctx.o.stage_parts as usize * ctx.o.stage_per_part) as f64;
    let run_bare = |mode: &str| stage_bare(ctx, "stage", mode, n as u64, r);
    let run_sidecar = || stage_sidecar(ctx, "stage", &[], n, r);
    // Alternate the order so drift (builds, other load) does not favour one side.
    let (b, h, s) = if r.is_multiple_of(2) {
        let b = run_bare("count")?;
        let h = run_bare("count-headers")?;
        (b, h, run_sidecar()?)
    } else {
        let s = run_sidecar()?;
        let h = run_bare("count-headers")?;
        (run_bare("count")?, h, s)
    };
    Ok(json!({
        "records": n,
        "bare_rate": b["rate"], "bare_cpu_per_record_us": b["cpu_per_record_us"], "bare_hwm": b["hwm"],
        "bare_headers_rate": h["rate"], "bare_headers_cpu_per_record_us": h["cpu_per_record_us"],
        "ratio_vs_headers": s["rate"].as_f64().unwrap_or(f64::NAN) / h["rate"].as_f64().unwrap_or(f64::NAN),
        "sidecar_rate": s["rate"], "sidecar_cpu_per_record_us": s["cpu_per_record_us"],
        "sidecar_hwm": s["hwm"], "sidecar_rss_after": s["rss"], "sidecar_staged_bytes": s["staged_bytes"],
        "ratio": s["rate"].as_f64().unwrap_or(f64::NAN) / b["rate"].as_f64().unwrap_or(f64::NAN),
    }))
}

/// Staging in the key-prefix protocol: the same transactions keyed `task-<id>` without
/// headers, against a bare consumer that polls them (the protocol needs nothing more).
fn staging_key_prefix(ctx: &Ctx, r: usize) -> Result<Value> {
    let n = (ctx.o.stage_parts as usize * ctx.o.stage_per_part) as f64;
    let run_bare = || stage_bare(ctx, "stagekp", "count", n as u64, r);
    let run_sidecar = || stage_sidecar(ctx, "stagekp", &[("protocol", "key-prefix")], n, r);
    let (b, s) = if r.is_multiple_of(2) {
        let b = run_bare()?;
        (b, run_sidecar()?)
    } else {
        let s = run_sidecar()?;
        (run_bare()?, s)
    };
    Ok(json!({
        "records": n,
        "bare_rate": b["rate"], "bare_cpu_per_record_us": b["cpu_per_record_us"],
        "sidecar_rate": s["rate"], "sidecar_cpu_per_record_us": s["cpu_per_record_us"],
        "ratio": s["rate"].as_f64().unwrap_or(f64::NAN) / b["rate"].as_f64().unwrap_or(f64::NAN),
    }))
}

// ---------------------------------------------------------------------------------------
// 2. delivery throughput: sidecar → sink vs reqwest loop → sink, same concurrency

fn delivery(ctx: &Ctx, r: usize) -> Result<Value> {
    let parts = ctx.o.deliver_parts;
    let txns = (parts as usize * ctx.o.deliver_per_part) as f64;
    let run_loadgen_with = |client: &str| -> Result<Value> {
        ctx.sink_reset()?;
        let args: Vec<String> = [
            "loadgen",
            "--url",
            &format!("http://{}/d", ctx.sink),
            "--concurrency",
            &parts.to_string(),
            "--duration-ms",
            "3000",
            "--client",
            client,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut p = ctx.role(&format!("loadgen-{client}-{r}"), &args)?;
        role_result(&mut p, Duration::from_secs(30))
    };
    // The sink's maximum is the faster of two clients: reqwest (what the sidecar used up
    // to change 6) and the sidecar's own `AppClient`.
    let run_loadgen = || -> Result<Value> {
        let a = run_loadgen_with("app")?;
        let q = run_loadgen_with("reqwest")?;
        let rate = |v: &Value| v["rate"].as_f64().unwrap_or(0.0);
        let best = if rate(&a) >= rate(&q) { &a } else { &q };
        Ok(json!({
            "rate": rate(best),
            "cpu_per_request_us": best["cpu_per_request_us"],
            "body_bytes": best["body_bytes"],
            "rate_app_client": rate(&a),
            "rate_reqwest": rate(&q),
            "cpu_per_request_us_app_client": a["cpu_per_request_us"],
            "cpu_per_request_us_reqwest": q["cpu_per_request_us"],
        }))
    };
    let run_sidecar = || -> Result<Value> {
        ctx.sink_reset()?;
        let group = format!("sc-deliver-{r}");
        let s = ctx.sidecar(&group, "deliver", &group, "d", TEST_GROUP, &[])?;
        let pid = s.proc.pid();
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut first: Option<(f64, f64)> = None;
        let started = Instant::now();
        let (mut t_first, mut t_consumed) = (None, None);
        let mut threads0 = Default::default();
        let mut system0 = f64::NAN;
        let mut max_paused = 0.0f64;
        let (end_cpu, end_text) = loop {
            let text = s.scrape();
            let c = proc_cpu_secs(pid);
            let k = metric(&text, TASKS).unwrap_or(0.0);
            if first.is_none() && k > 0.0 {
                first = Some((k, c));
                t_first = Some(started.elapsed());
                threads0 = thread_cpu_secs(pid);
                system0 = system_busy_secs();
            }
            max_paused =
                max_paused.max(metric(&text, "txn_sidecar_paused_partitions").unwrap_or(0.0));
            if t_consumed.is_none() && k >= txns * 10.0 {
                t_consumed = Some(started.elapsed());
            }
            if metric(&text, DELIVERED).unwrap_or(0.0) >= txns {
                break (c, text);
            }
            if Instant::now() > deadline {
                bail!("sidecar delivered too few within 180 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (k0, c0) = first.unwrap();
        // Busy cores of the whole machine (sidecar, sink, broker, driver) over the run.
        let system_busy_cores = (system_busy_secs() - system0)
            / (started.elapsed() - t_first.unwrap_or_default()).as_secs_f64();
        // CPU seconds per thread name over the run: which thread paces it.
        let threads: serde_json::Map<String, Value> = thread_cpu_secs(pid)
            .into_iter()
            .map(|(name, secs)| {
                let before = threads0.get(&name).copied().unwrap_or(0.0);
                (name, json!(((secs - before) * 1000.0).round() / 1000.0))
            })
            .collect();
        let mut times: Vec<u64> = ctx
            .sink_events(0)
            .into_iter()
            .filter(|e| e.1 == 2)
            .map(|e| e.0)
            .collect();
        times.sort_unstable();
        let span =
            (times.last().copied().unwrap_or(0) - times.first().copied().unwrap_or(0)) as f64 / 1e6;
        // Where a delivery's time goes: the HTTP exchange itself (the sidecar's
        // `delivery_duration_seconds`, mean) against the interval between deliveries on
        // one partition; and how long consuming took next to delivering.
        let hist_mean = |name: &str| {
            metric(&end_text, &format!("{name}_sum")).unwrap_or(f64::NAN)
                / metric(&end_text, &format!("{name}_count")).unwrap_or(f64::NAN)
        };
        let consume_s = match (t_first, t_consumed) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        };
        Ok(json!({
            "rate": (times.len() as f64 - 1.0) / span,
            "received": times.len(),
            "delivery_mean_us": hist_mean("txn_sidecar_delivery_duration_seconds") * 1e6,
            "interval_per_partition_us": span / (times.len() as f64 - 1.0) * parts as f64 * 1e6,
            "consume_s": consume_s,
            "deliver_s": span,
            "thread_cpu_s": threads,
            // Deliveries per 50 ms from the first: shows stalls a mean rate hides.
            "per_50ms": times.iter().fold(Vec::<u64>::new(), |mut v, t| {
                let i = ((t - times[0]) / 50_000) as usize;
                if v.len() <= i {
                    v.resize(i + 1, 0);
                }
                v[i] += 1;
                v
            }),
            "system_busy_cores": system_busy_cores,
            "max_paused_partitions": max_paused,
            "cpu_per_task_us": (end_cpu - c0) / (txns * 10.0 - k0) * 1e6,
            "cpu_per_txn_us": (end_cpu - c0) / txns * 1e6,
        }))
    };
    let (l, s) = if r.is_multiple_of(2) {
        let l = run_loadgen()?;
        (l, run_sidecar()?)
    } else {
        let s = run_sidecar()?;
        (run_loadgen()?, s)
    };
    // How fast the same data can be consumed at all: a bare consumer that reads each
    // record's headers, on the same topic from the same broker.
    let bare = {
        let name = format!("bare-deliver-{r}");
        let mut b = ctx.role(
            &name,
            &bare_args(
                ctx,
                "deliver",
                &name,
                "count-headers",
                txns as u64 * 11,
                TEST_GROUP,
            ),
        )?;
        role_result(&mut b, Duration::from_secs(120))?
    };
    Ok(json!({
        "transactions": txns, "concurrency": parts,
        "sink_max_rate": l["rate"], "loadgen_cpu_per_request_us": l["cpu_per_request_us"], "body_bytes": l["body_bytes"],
        "sink_rate_app_client": l["rate_app_client"], "sink_rate_reqwest": l["rate_reqwest"],
        "loadgen_cpu_us_app_client": l["cpu_per_request_us_app_client"], "loadgen_cpu_us_reqwest": l["cpu_per_request_us_reqwest"],
        "sidecar_rate": s["rate"], "sidecar_received": s["received"],
        "sidecar_cpu_per_task_us": s["cpu_per_task_us"], "sidecar_cpu_per_txn_us": s["cpu_per_txn_us"],
        "sidecar_delivery_mean_us": s["delivery_mean_us"], "sidecar_interval_per_partition_us": s["interval_per_partition_us"],
        "sidecar_consume_s": s["consume_s"], "sidecar_deliver_s": s["deliver_s"],
        "sidecar_thread_cpu_s": s["thread_cpu_s"], "system_busy_cores": s["system_busy_cores"], "sidecar_max_paused_partitions": s["max_paused_partitions"], "sidecar_per_50ms": s["per_50ms"],
        "bare_headers_rate_records": bare["rate"], "bare_headers_rate_txns": bare["rate"].as_f64().unwrap_or(f64::NAN) / 11.0,
        "ratio": s["rate"].as_f64().unwrap_or(f64::NAN) / l["rate"].as_f64().unwrap_or(f64::NAN),
    }))
}

// ---------------------------------------------------------------------------------------
// 3. added latency at half of the sidecar's max delivery rate (+ CPU per record there)

/// `control`: also run a second bare consumer and pair it with the first, which gives the
/// "added" figure of a consumer that adds nothing: the measurement's own noise floor.
fn latency(ctx: &Ctx, r: usize, prefix: &str, rate: f64, control: bool) -> Result<Value> {
    let topic = format!("{prefix}-{r}");
    let parts = ctx.o.latency_parts;
    let k = (rate * ctx.o.latency_secs).round() as u64;
    ctx.sink_reset()?;
    let group = format!("sc-{topic}");
    // librdkafka's mock answers an empty fetch only after fetch.wait.max.ms (a real
    // broker answers as soon as data arrives): both consumers poll the broker every 1 ms
    // so neither waits up to 500 ms for data that is already there.
    let props = [TEST_GROUP[0], TEST_GROUP[1], ("fetch.wait.max.ms", "1")];
    let s = ctx.sidecar(&group, &topic, &group, "l", &props, &[])?;
    let mut bare = ctx.role(
        &format!("bare-{topic}"),
        &bare_args(ctx, &topic, &format!("bare-{topic}"), "latency", k, &props),
    )?;
    let rx = role_assigned(&mut bare, Duration::from_secs(60))?;
    let mut ctl = None;
    if control {
        let mut c = ctx.role(
            &format!("control-{topic}"),
            &bare_args(
                ctx,
                &topic,
                &format!("control-{topic}"),
                "latency",
                k,
                &props,
            ),
        )?;
        let crx = role_assigned(&mut c, Duration::from_secs(60))?;
        ctl = Some((c, crx));
    }
    s.wait_metric(ASSIGNED, Duration::from_secs(60), |v| v >= parts as f64)?;
    std::thread::sleep(Duration::from_millis(500));
    let c0 = proc_cpu_secs(s.proc.pid());
    // The idempotent producer gets its producer id on first use; without this warm-up the
    // first few hundred ms of transactions would be held back and arrive as one burst.
    let p = Producer::new(&ctx.brokers, &ctx.o.latency_linger_ms.to_string())?;
    p.send("warmup", 0, "warmup", "task", Some(b"{}"));
    p.flush()?;
    // Where the time goes under load, from the first paced transaction until the last is
    // delivered: each sidecar thread's time on a CPU against its time runnable but waiting
    // for one (the bare consumer reads its own, from its first record to its last), and
    // the CPU of every party: who keeps the machine busy.
    let parties = [
        ("sidecar", s.proc.pid()),
        ("broker", ctx.mock_pid),
        ("sink", ctx.sink_pid),
        ("driver", std::process::id()),
    ];
    let (sched_s0, busy0, t0) = (
        thread_sched_secs(s.proc.pid()),
        system_busy_secs(),
        Instant::now(),
    );
    let cpu0 = parties.map(|(_, pid)| proc_cpu_secs(pid));
    let t_start = now_us();
    let warm_until = t_start + 500_000;
    let start = Instant::now();
    for i in 0..k {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let part = (i % parts as u64) as i32;
        p.txn(
            &topic,
            part,
            &format!("l{r}-{i:08}"),
            10,
            now_us(),
            Some("commit"),
        );
    }
    let produce_secs = start.elapsed().as_secs_f64();
    p.flush()?;
    s.wait_metric(DELIVERED, Duration::from_secs(60), |v| v >= k as f64)?;
    let c1 = proc_cpu_secs(s.proc.pid());
    let window = t0.elapsed().as_secs_f64();
    let sched_sidecar = sched_delta(&sched_s0, &thread_sched_secs(s.proc.pid()), window);
    let busy_cores = (system_busy_secs() - busy0) / window;
    let mut party_cores: serde_json::Map<String, Value> = parties
        .iter()
        .zip(cpu0)
        .map(|((name, pid), c0)| (name.to_string(), json!((proc_cpu_secs(*pid) - c0) / window)))
        .collect();
    let text = s.scrape();
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("bare latency consumer gave no result"))?;
    let b: Value = serde_json::from_str(&line)?;
    // The bare consumer has exited by now: its CPU over its own first to last record.
    party_cores.insert(
        "bare".into(),
        json!(
            b["window_cpu_s"].as_f64().unwrap_or(f64::NAN)
                / b["window_s"].as_f64().unwrap_or(f64::NAN)
        ),
    );
    let control_samples: Option<Value> = match &ctl {
        Some((_, crx)) => {
            let line = crx
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| anyhow!("control latency consumer gave no result"))?;
            Some(serde_json::from_str::<Value>(&line)?["samples"].clone())
        }
        None => None,
    };

    let mut side: Vec<f64> = ctx
        .sink_events(t_start)
        .into_iter()
        .filter(|e| e.1 == 3 && e.3 >= 0 && (e.0 as i64 - e.3) as u64 >= warm_until)
        .map(|e| e.3 as f64 / 1000.0)
        .collect();
    let mut base: Vec<f64> = b["samples"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x[0].as_u64()?, x[1].as_f64()?)))
                .filter(|x| x.0 >= warm_until)
                .map(|x| x.1 / 1000.0)
                .collect()
        })
        .unwrap_or_default();
    // Raw samples for offline analysis (tail clustering): (receive µs, partition, latency µs).
    let raw: Vec<(u64, i32, i64)> = ctx
        .sink_events(t_start)
        .into_iter()
        .filter(|e| e.1 == 3)
        .map(|e| (e.0, e.2, e.3))
        .collect();
    let _ = std::fs::write(
        ctx.o.out.join(format!("{topic}-sidecar.json")),
        serde_json::to_string(&raw).unwrap_or_default(),
    );
    let _ = std::fs::write(
        ctx.o.out.join(format!("{topic}-bare.json")),
        b["samples"].to_string(),
    );
    // Added latency per transaction: the same transaction's produce → app (sidecar) minus
    // produce → bare consumer, which cancels the producer and broker delay both share.
    let bare_by_t: std::collections::HashMap<i64, i64> = b["samples"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x[0].as_i64()?, x[1].as_i64()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut paired: Vec<f64> = raw
        .iter()
        .filter(|e| e.2 >= 0 && (e.0 as i64 - e.2) as u64 >= warm_until)
        .filter_map(|e| {
            bare_by_t
                .get(&(e.0 as i64 - e.2))
                .map(|bl| (e.2 - bl) as f64 / 1000.0)
        })
        .collect();
    paired.sort_by(f64::total_cmp);
    // The control: second bare consumer minus the first, per transaction, same window.
    let mut control_paired: Vec<f64> = control_samples
        .as_ref()
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x[0].as_i64()?, x[1].as_i64()?)))
                .filter(|x| x.0 as u64 >= warm_until)
                .filter_map(|(t, l)| bare_by_t.get(&t).map(|bl| (l - bl) as f64 / 1000.0))
                .collect()
        })
        .unwrap_or_default();
    control_paired.sort_by(f64::total_cmp);
    side.sort_by(f64::total_cmp);
    base.sort_by(f64::total_cmp);
    let h = buckets(&text, "txn_sidecar_commit_to_delivery_seconds");
    let q = |v: &[f64], x| pct(v, x);
    Ok(json!({
        "target_rate": rate, "achieved_rate": k as f64 / produce_secs, "transactions": k, "samples": side.len(),
        "sidecar_e2e_p50_ms": q(&side, 0.5), "sidecar_e2e_p99_ms": q(&side, 0.99), "sidecar_e2e_max_ms": q(&side, 1.0),
        "bare_e2e_p50_ms": q(&base, 0.5), "bare_e2e_p99_ms": q(&base, 0.99), "bare_e2e_max_ms": q(&base, 1.0),
        "added_p50_ms": q(&paired, 0.5), "added_p99_ms": q(&paired, 0.99), "added_max_ms": q(&paired, 1.0),
        "paired_samples": paired.len(),
        "control_p50_ms": q(&control_paired, 0.5), "control_p99_ms": q(&control_paired, 0.99), "control_max_ms": q(&control_paired, 1.0),
        "control_samples": control_paired.len(),
        "hist_p50_ms": bucket_quantile(&h, 0.5) * 1e3, "hist_p99_ms": bucket_quantile(&h, 0.99) * 1e3,
        "hist_le_1ms": bucket_fraction(&h, 0.001), "hist_le_2_5ms": bucket_fraction(&h, 0.0025),
        "sidecar_cpu_per_task_us": (c1 - c0) / (k as f64 * 10.0) * 1e6,
        "sched_sidecar": sched_sidecar, "sched_bare": b["sched"].clone(), "busy_cores": busy_cores, "party_cores": party_cores,
        "sched_window_s": window, "bare_window_s": b["window_s"].clone(),
        "bare_cpu_per_record_us": b["cpu_s"].as_f64().unwrap_or(f64::NAN) / b["records"].as_f64().unwrap_or(f64::NAN) * 1e6,
    }))
}

// ---------------------------------------------------------------------------------------
// 4. memory: RSS idle, then with N MB of open transactions staged

fn memory(ctx: &Ctx, r: usize) -> Result<Value> {
    let topic = format!("mem-{r}");
    let parts = ctx.o.mem_parts;
    let n = parts as usize * ctx.o.mem_per_part;
    let mut bare = ctx.role(
        &format!("bare-mem-{r}"),
        &bare_args(ctx, &topic, &format!("bare-mem-{r}"), "idle", 0, TEST_GROUP),
    )?;
    let group = format!("sc-mem-{r}");
    let s = ctx.sidecar(
        &group,
        &topic,
        &group,
        "d",
        TEST_GROUP,
        &[("limits.max_staged_bytes", "2GiB")],
    )?;
    s.wait_metric(ASSIGNED, Duration::from_secs(60), |v| v >= parts as f64)?;
    std::thread::sleep(Duration::from_secs(2));
    let (idle, _) = proc_rss(s.proc.pid());
    let b = role_result(&mut bare, Duration::from_secs(60))?;

    // Paced at 50k records/s so librdkafka's fetch queue stays near empty and the RSS
    // growth is the staged state, not transient fetch buffers.
    let p = Producer::new(&ctx.brokers, "5")?;
    let paced = |phase: &str, end: Option<&str>| {
        let start = Instant::now();
        let mut sent = 0u64;
        for j in 0..ctx.o.mem_per_part / 10 {
            for part in 0..parts {
                p.txn(
                    &topic,
                    part,
                    &format!("{phase}{part}-{j:07}"),
                    10,
                    now_us(),
                    end,
                );
                sent += 10;
                let due = start + Duration::from_micros(sent * 20);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
    };
    // Warm-up: the same traffic, each transaction aborted at once. It leaves behind what
    // consuming costs whatever is staged (librdkafka's buffers, allocator arenas, metric
    // series), so the second phase's growth over it is the staged state's own cost.
    paced("w", Some("abort"));
    p.flush()?;
    s.wait_metric(TASKS, Duration::from_secs(60), |v| v >= n as f64)?;
    s.wait_metric("txn_sidecar_staged_bytes", Duration::from_secs(60), |v| {
        v == 0.0
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let (warm, _) = proc_rss(s.proc.pid());
    paced("m", None);
    p.flush()?;
    s.wait_metric(TASKS, Duration::from_secs(60), |v| v >= 2.0 * n as f64)?;
    std::thread::sleep(Duration::from_millis(1500));
    let (staged_rss, hwm) = proc_rss(s.proc.pid());
    let staged = s.metric("txn_sidecar_staged_bytes");
    let values = (n * 100) as f64;
    Ok(json!({
        "idle_rss": idle, "bare_idle_rss": b["rss"], "warm_rss": warm,
        "staged_rss": staged_rss, "staged_hwm": hwm, "records": n,
        "staged_bytes": staged, "value_bytes": values,
        "overhead_vs_staged_bytes": (staged_rss as f64 - warm as f64) / staged,
        "overhead_vs_value_bytes": (staged_rss as f64 - warm as f64) / values,
        "overhead_vs_idle": (staged_rss as f64 - idle as f64) / staged,
    }))
}

// ---------------------------------------------------------------------------------------
// 5. rebalance handoff: member A leaves gracefully (SIGTERM), member B takes over

fn rebalance(
    ctx: &Ctx,
    brokers: &str,
    r: usize,
    topic: &str,
    group_props: &[(&str, &str)],
) -> Result<Value> {
    ctx.sink_reset()?;
    let group = format!("sc-{topic}");
    let mut a = ctx.sidecar_on(
        brokers,
        &format!("{topic}-a"),
        topic,
        &group,
        "a",
        group_props,
        &[],
    )?;
    a.wait_metric(ASSIGNED, Duration::from_secs(60), |v| v >= 4.0)?;
    // Continuous load: 100 transactions/s per partition, so a gap shows within 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, brokers, topic) = (stop.clone(), brokers.to_string(), topic.to_string());
        std::thread::spawn(move || -> Result<()> {
            let p = Producer::new(&brokers, "0")?;
            let start = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_micros(i * 2500);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                p.txn(
                    &topic,
                    (i % 4) as i32,
                    &format!("r{r}-{i:08}"),
                    10,
                    now_us(),
                    Some("commit"),
                );
                i += 1;
            }
            p.flush()
        })
    };
    let b = ctx.sidecar_on(
        brokers,
        &format!("{topic}-b"),
        topic,
        &group,
        "b",
        group_props,
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (na, nb) = (a.metric(ASSIGNED), b.metric(ASSIGNED));
        if nb >= 1.0 && na + nb == 4.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{topic}: B never got partitions (A {na}, B {nb})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let recent = now_us() - 500_000;
    let mut a_parts: Vec<i32> = ctx
        .sink_events(recent)
        .into_iter()
        .filter(|e| e.1 == 0)
        .map(|e| e.2)
        .collect();
    a_parts.sort_unstable();
    a_parts.dedup();
    if a_parts.is_empty() {
        bail!("{topic}: A delivered nothing before the leave");
    }

    let t0 = now_us();
    a.proc.signal("TERM");
    let (mut t_exit, mut t_assigned, mut first_b) =
        (None, None, std::collections::BTreeMap::<i32, u64>::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut cursor = t0;
    let mut last_sink_poll = Instant::now();
    while first_b.len() < a_parts.len() || t_assigned.is_none() {
        if t_exit.is_none() && a.proc.exited() {
            t_exit = Some(now_us());
        }
        if t_assigned.is_none() && b.metric(ASSIGNED) >= 4.0 {
            t_assigned = Some(now_us());
        }
        // The sink timestamps each delivery itself; polling it only needs to be frequent
        // enough to notice the end.
        if last_sink_poll.elapsed() >= Duration::from_millis(100) {
            last_sink_poll = Instant::now();
            for e in ctx.sink_events(cursor) {
                cursor = cursor.max(e.0);
                if e.1 == 1 && a_parts.contains(&e.2) {
                    let f = first_b.entry(e.2).or_insert(e.0);
                    *f = (*f).min(e.0);
                }
            }
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    while t_exit.is_none() && Instant::now() < deadline {
        if a.proc.exited() {
            t_exit = Some(now_us());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = producer.join();
    drop(b);
    let s = |t: Option<u64>| t.map_or(f64::NAN, |t| (t as f64 - t0 as f64) / 1e6);
    let handoff = if first_b.len() == a_parts.len() {
        first_b
            .values()
            .max()
            .map(|t| (*t - t0) as f64 / 1e6)
            .unwrap()
    } else {
        f64::NAN
    };
    Ok(json!({
        "session_timeout_ms": group_props[0].1, "heartbeat_ms": group_props[1].1,
        "moved_partitions": a_parts.len(),
        "handoff_s": handoff,
        "a_exit_s": s(t_exit),
        "b_assigned_s": s(t_assigned),
        "first_delivery_after_assign_s": handoff - s(t_assigned),
    }))
}

// ---------------------------------------------------------------------------------------
// report

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu, "mem": mem,
    })
}

fn col(reps: &[Value], a: &str, b: &str) -> Vec<f64> {
    reps.iter()
        .map(|r| r[a][b].as_f64().unwrap_or(f64::NAN))
        .collect()
}

/// "median (min–max)" with a unit scale and precision.
fn fmt(v: &[f64], scale: f64, prec: usize) -> String {
    let m = median(v) * scale;
    if m.is_nan() {
        return "–".into();
    }
    if v.len() < 2 {
        return format!("{m:.prec$}");
    }
    let (lo, hi) = range(v);
    format!("{m:.prec$} ({:.prec$}–{:.prec$})", lo * scale, hi * scale)
}

/// "met" / "missed", or "–" when the figure was not measured in this run.
fn judge(m: f64, ok: bool) -> &'static str {
    if m.is_nan() {
        "–"
    } else {
        verdict(ok)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn table(reps: &[Value], o: &Opts) -> String {
    let m = machine();
    let mut t = String::new();
    t.push_str(&format!(
        "Machine: {} cores, {}; {} repetition(s), median (min–max).\n\n",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        reps.len()
    ));
    t.push_str("| benchmark | txn-sidecar | baseline (same run) | ratio / added | goal | |\n|---|---|---|---|---|---|\n");
    let has = |k: &str| reps.iter().any(|r| r.get(k).is_some());
    if has("staging") {
        let ratio = col(reps, "staging", "ratio");
        t.push_str(&format!(
            "| Staging throughput, records/s ({} partitions, {} task records of 100 B, 10 per txn) | {} | bare BaseConsumer: {} | {}× | ≥ 0.9× | {} |\n",
            o.stage_parts,
            o.stage_parts as usize * o.stage_per_part,
            fmt(&col(reps, "staging", "sidecar_rate"), 1e-3, 0) + "k",
            fmt(&col(reps, "staging", "bare_rate"), 1e-3, 0) + "k",
            fmt(&ratio, 1.0, 2),
            judge(median(&ratio), median(&ratio) >= 0.9)
        ));
        t.push_str(&format!(
            "| ↳ same data, bare consumer that also reads each record's headers (librdkafka's cost floor of the header protocol) | | {} | {}× | | |\n",
            fmt(&col(reps, "staging", "bare_headers_rate"), 1e-3, 0) + "k",
            fmt(&col(reps, "staging", "ratio_vs_headers"), 1.0, 2),
        ));
    }
    if has("staging_kp") {
        let ratio = col(reps, "staging_kp", "ratio");
        t.push_str(&format!(
            "| Staging throughput, key-prefix protocol, records/s (same transactions and values, key `task-<id>`, no headers) | {} | bare BaseConsumer: {} | {}× | ≥ 0.9× | {} |\n",
            fmt(&col(reps, "staging_kp", "sidecar_rate"), 1e-3, 0) + "k",
            fmt(&col(reps, "staging_kp", "bare_rate"), 1e-3, 0) + "k",
            fmt(&ratio, 1.0, 2),
            judge(median(&ratio), median(&ratio) >= 0.9)
        ));
        t.push_str(&format!(
            "| ↳ CPU per record, µs: sidecar · bare consumer | {} · {} | | | | |\n",
            fmt(
                &col(reps, "staging_kp", "sidecar_cpu_per_record_us"),
                1.0,
                2
            ),
            fmt(&col(reps, "staging_kp", "bare_cpu_per_record_us"), 1.0, 2),
        ));
    }
    if has("delivery") {
        let ratio = col(reps, "delivery", "ratio");
        t.push_str(&format!(
            "| Delivery throughput, txn/s (10 tasks/txn, {} partitions → {} in flight) | {} | sink max, faster of two client loops, {} in flight: {} (AppClient {}, reqwest {}) | {}× | ≥ 0.8× | {} |\n",
            o.deliver_parts,
            o.deliver_parts,
            fmt(&col(reps, "delivery", "sidecar_rate"), 1.0, 0),
            o.deliver_parts,
            fmt(&col(reps, "delivery", "sink_max_rate"), 1.0, 0),
            fmt(&col(reps, "delivery", "sink_rate_app_client"), 1.0, 0),
            fmt(&col(reps, "delivery", "sink_rate_reqwest"), 1.0, 0),
            fmt(&ratio, 1.0, 2),
            judge(median(&ratio), median(&ratio) >= 0.8)
        ));
    }
    for (key, what) in [
        ("latency", "half of the max delivery rate"),
        ("latency_low", "light load"),
    ] {
        if !has(key) {
            continue;
        }
        let c = |k| col(reps, key, k);
        let added99 = c("added_p99_ms");
        t.push_str(&format!(
            "| Added latency at {what} ({} txn/s), ms: same transaction, produce → app receives via sidecar minus produce → bare consumer; p50 / p99 / max | {} / {} / {} | e2e via sidecar {} / {} / {} · e2e bare consumer {} / {} / {} | | p99 ≤ 2 ms | {} |\n",
            fmt(&c("target_rate"), 1.0, 0),
            fmt(&c("added_p50_ms"), 1.0, 2), fmt(&added99, 1.0, 2), fmt(&c("added_max_ms"), 1.0, 1),
            fmt(&c("sidecar_e2e_p50_ms"), 1.0, 2), fmt(&c("sidecar_e2e_p99_ms"), 1.0, 2), fmt(&c("sidecar_e2e_max_ms"), 1.0, 1),
            fmt(&c("bare_e2e_p50_ms"), 1.0, 2), fmt(&c("bare_e2e_p99_ms"), 1.0, 2), fmt(&c("bare_e2e_max_ms"), 1.0, 1),
            judge(median(&added99), median(&added99) <= 2.0)
        ));
        let ctl99 = c("control_p99_ms");
        if ctl99.iter().any(|v| !v.is_nan()) {
            t.push_str(&format!(
                "| ↳ control: a second bare consumer minus the first, same transactions (what the method measures for a consumer that adds nothing), p50 / p99 / max | {} / {} / {} | | | | |\n",
                fmt(&c("control_p50_ms"), 1.0, 2), fmt(&ctl99, 1.0, 2), fmt(&c("control_max_ms"), 1.0, 1),
            ));
        }
        t.push_str(&format!(
            "| ↳ sidecar's own histogram `commit_to_delivery_seconds` (commit consumed → app answered), p50 / p99 bucket-interpolated | {} / {} ms; ≤ 1 ms: {}%, ≤ 2.5 ms: {}% | | | | |\n",
            fmt(&c("hist_p50_ms"), 1.0, 2), fmt(&c("hist_p99_ms"), 1.0, 2),
            fmt(&c("hist_le_1ms"), 100.0, 1), fmt(&c("hist_le_2_5ms"), 100.0, 1),
        ));
    }
    if has("latency") {
        // Thread groups by name: the sidecar's consumer thread ("txn-sidecar-consumer",
        // truncated to 15 bytes by the kernel), tokio workers, librdkafka's threads.
        let group = |r: &Value, side: &str, g: &str, field: &str| -> f64 {
            let Some(m) = r["latency"][side].as_object().filter(|m| !m.is_empty()) else {
                return f64::NAN;
            };
            m.iter()
                .filter(|(name, _)| match g {
                    "consumer" => name.starts_with("txn-sidecar-con"),
                    "tokio" => name.starts_with("tokio"),
                    "librdkafka" => name.starts_with("rdk:"),
                    "other" => {
                        !name.starts_with("txn-sidecar-con")
                            && !name.starts_with("tokio")
                            && !name.starts_with("rdk:")
                    }
                    _ => !name.starts_with("rdk:"),
                })
                .map(|(_, v)| v[field].as_f64().unwrap_or(0.0))
                .sum()
        };
        let g = |side: &str, grp: &str| {
            let run: Vec<f64> = reps
                .iter()
                .map(|r| group(r, side, grp, "run_ms_per_s"))
                .collect();
            let wait: Vec<f64> = reps
                .iter()
                .map(|r| group(r, side, grp, "wait_ms_per_s"))
                .collect();
            // Times scheduled in per transaction: the wake-ups each one costs.
            let window = if side == "sched_bare" {
                "bare_window_s"
            } else {
                "sched_window_s"
            };
            let per_txn: Vec<f64> = reps
                .iter()
                .map(|r| {
                    let l = &r["latency"];
                    group(r, side, grp, "scheduled_per_s") * l[window].as_f64().unwrap_or(f64::NAN)
                        / l["transactions"].as_f64().unwrap_or(f64::NAN)
                })
                .collect();
            format!(
                "{} / {} ({} per txn)",
                fmt(&run, 1.0, 0),
                fmt(&wait, 1.0, 0),
                fmt(&per_txn, 1.0, 2)
            )
        };
        t.push_str(&format!(
            "| ↳ at half load, ms per second on a CPU / runnable but waiting for one (times scheduled in per transaction; `/proc/*/task/*/schedstat`): consumer thread {} · tokio workers {} · librdkafka {} · other {} | machine busy {} of {} cores | bare consumer: its own threads {} · librdkafka {} | | | |\n",
            g("sched_sidecar", "consumer"),
            g("sched_sidecar", "tokio"),
            g("sched_sidecar", "librdkafka"),
            g("sched_sidecar", "other"),
            fmt(&col(reps, "latency", "busy_cores"), 1.0, 2),
            m["nproc"],
            g("sched_bare", "own"),
            g("sched_bare", "librdkafka"),
        ));
        let party = |p: &str| -> String {
            let v: Vec<f64> = reps
                .iter()
                .map(|r| r["latency"]["party_cores"][p].as_f64().unwrap_or(f64::NAN))
                .collect();
            fmt(&v, 1.0, 2)
        };
        t.push_str(&format!(
            "| ↳ at half load, cores used by each party: sidecar {} · bare consumer {} | broker {} · the driver (its producer paces the load) {} · sink {} | | | | |\n",
            party("sidecar"),
            party("bare"),
            party("broker"),
            party("driver"),
            party("sink"),
        ));
    }
    if has("delivery") || has("staging") || has("latency") {
        let full = col(reps, "delivery", "sidecar_cpu_per_task_us");
        t.push_str(&format!(
            "| CPU per task record, µs (process user+sys / task records): full pipeline at max delivery rate | {} | bare consumer (staging run): {} | | ≤ 10 µs | {} |\n",
            fmt(&full, 1.0, 1),
            fmt(&col(reps, "staging", "bare_cpu_per_record_us"), 1.0, 2),
            judge(median(&full), median(&full) <= 10.0)
        ));
        t.push_str(&format!(
            "| ↳ staging only (no HTTP) / full pipeline at half load | {} / {} | bare consumer at half load: {} | | | |\n",
            fmt(&col(reps, "staging", "sidecar_cpu_per_record_us"), 1.0, 2),
            fmt(&col(reps, "latency", "sidecar_cpu_per_task_us"), 1.0, 1),
            fmt(&col(reps, "latency", "bare_cpu_per_record_us"), 1.0, 2),
        ));
    }
    if has("memory") {
        let idle = col(reps, "memory", "idle_rss");
        let ov = col(reps, "memory", "overhead_vs_staged_bytes");
        t.push_str(&format!(
            "| RSS idle, MB (assigned {} partitions, no data) | {} | bare consumer idle: {} | | ≤ 30 MB | {} |\n",
            o.mem_parts,
            fmt(&idle, 1e-6, 1),
            fmt(&col(reps, "memory", "bare_idle_rss"), 1e-6, 1),
            judge(median(&idle), median(&idle) <= 30e6)
        ));
        t.push_str(&format!(
            "| RSS growth with open transactions staged: (RSS staged − RSS warm) / staged bytes | {} MB staged ({} records; values {} MB): RSS idle {} → warm {} → staged {} MB | payload = staged_bytes (key + value + headers); warm = after the same traffic aborted | {}× (vs values only: {}×; staged − idle: {}×) | ≤ 1.5× | {} |\n",
            fmt(&col(reps, "memory", "staged_bytes"), 1e-6, 1),
            o.mem_parts as usize * o.mem_per_part,
            fmt(&col(reps, "memory", "value_bytes"), 1e-6, 0),
            fmt(&idle, 1e-6, 1),
            fmt(&col(reps, "memory", "warm_rss"), 1e-6, 1),
            fmt(&col(reps, "memory", "staged_rss"), 1e-6, 1),
            fmt(&ov, 1.0, 2),
            fmt(&col(reps, "memory", "overhead_vs_value_bytes"), 1.0, 2),
            fmt(&col(reps, "memory", "overhead_vs_idle"), 1.0, 2),
            judge(median(&ov), median(&ov) <= 1.5)
        ));
    }
    if has("rebalance") {
        for (k, what) in [
            ("rebalance", "brief's test settings"),
            ("rebalance_fast", "fast coordinator"),
        ] {
            let c = |x| col(reps, k, x);
            let h = c("handoff_s");
            let props = reps
                .iter()
                .find_map(|r| r.get(k))
                .map(|v| {
                    format!(
                        "session {} ms, heartbeat {} ms",
                        v["session_timeout_ms"].as_str().unwrap_or(""),
                        v["heartbeat_ms"].as_str().unwrap_or("")
                    )
                })
                .unwrap_or_default();
            t.push_str(&format!(
                "| Rebalance handoff, s: SIGTERM to A → B delivers on all of A's partitions (cooperative-sticky; {what}: {props}) | {} | A exited {} · B assigned {} · first delivery {} after assign | | ≤ 2 s | {} |\n",
                fmt(&h, 1.0, 2),
                fmt(&c("a_exit_s"), 1.0, 2),
                fmt(&c("b_assigned_s"), 1.0, 2),
                fmt(&c("first_delivery_after_assign_s"), 1.0, 3),
                judge(median(&h), median(&h) <= 2.0)
            ));
        }
    }
    t
}
