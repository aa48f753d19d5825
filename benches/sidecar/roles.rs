//! The helper processes the driver starts: the sink app, the HTTP load generator and the
//! bare consumer. Each is this same binary run as `sidecar role <name> ...`, so every
//! party has its own process and its own CPU and RSS figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use txn_sidecar::config::{Config, Sources};

use crate::util::{now_us, proc_cpu_secs, proc_rss, scan_int, sched_delta, thread_sched_secs};

/// `--key value` pairs after the role name.
pub fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut it = args.iter().peekable();
    while let Some(k) = it.next() {
        if let Some(k) = k.strip_prefix("--") {
            // A flag without a value (`--quick`) is followed by the next flag or nothing.
            let v = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().cloned().unwrap_or_default(),
                _ => String::new(),
            };
            m.insert(k.to_string(), v);
        }
    }
    m
}

fn flag<T: std::str::FromStr>(f: &BTreeMap<String, String>, k: &str, default: T) -> T {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// sink: the "fast local app" both the sidecar and the load generator POST to.

/// One POST the sink received: (receive time µs, route, partition, latency µs or -1).
type Ev = (u64, u8, i32, i64);

#[derive(Default)]
struct Sink {
    events: Mutex<Vec<Ev>>,
    count: AtomicU64,
}

async fn receive(s: &Sink, route: u8, body: &[u8]) -> StatusCode {
    let t = now_us();
    // Cheap field scans instead of a JSON parse: the sink must stay faster than its clients.
    let partition = scan_int(body, b"\"partition\":").unwrap_or(-1) as i32;
    let lat = scan_int(body, b"\"t_us\":").map_or(-1, |t0| t as i64 - t0);
    s.events.lock().unwrap().push((t, route, partition, lat));
    s.count.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

/// `role sink --addr 127.0.0.1:PORT`: 200 to every POST on /a /b /d /l, records it.
pub fn sink(args: &[String]) -> anyhow::Result<()> {
    let f = flags(args);
    let addr: std::net::SocketAddr = f
        .get("addr")
        .ok_or_else(|| anyhow::anyhow!("--addr"))?
        .parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let state = Arc::new(Sink::default());
        let mut router = Router::new();
        for (path, route) in [("/a", 0u8), ("/b", 1), ("/d", 2), ("/l", 3)] {
            router = router.route(
                path,
                post(move |State(s): State<Arc<Sink>>, body: Bytes| async move {
                    receive(&s, route, &body).await
                }),
            );
        }
        let router = router
            .route(
                "/count",
                get(|State(s): State<Arc<Sink>>| async move {
                    s.count.load(Ordering::Relaxed).to_string()
                }),
            )
            .route(
                "/report",
                get(
                    |State(s): State<Arc<Sink>>, RawQuery(q): RawQuery| async move {
                        let since: u64 = q
                            .as_deref()
                            .and_then(|q| q.strip_prefix("since="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let ev = s.events.lock().unwrap();
                        let sel: Vec<&Ev> = ev.iter().filter(|e| e.0 > since).collect();
                        serde_json::to_string(&sel).unwrap_or_default()
                    },
                ),
            )
            .route(
                "/reset",
                post(|State(s): State<Arc<Sink>>| async move {
                    s.events.lock().unwrap().clear();
                    s.count.store(0, Ordering::Relaxed);
                    "ok"
                }),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("ready");
        axum::serve(listener, router).await?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// loadgen: the sink's own maximum POST rate, with the sidecar's request shape and client.

/// The body and headers the sidecar sends for a 10-task transaction of 100-byte values.
fn sample_body(tasks: usize) -> Vec<u8> {
    use txn_sidecar::delivery::{render_body, ReadyTxn};
    use txn_sidecar::protocol::Record;
    let id = "tx-bench-00000001";
    let rec = |offset: i64, kind: &str, value: Option<Vec<u8>>| {
        let headers: [(&[u8], Option<&[u8]>); 2] = [
            (b"txn-id", Some(id.as_bytes())),
            (b"txn-type", Some(kind.as_bytes())),
        ];
        Record::new(
            offset,
            Some(1),
            Some(id.as_bytes()),
            value.as_deref(),
            &headers,
        )
    };
    let txn = ReadyTxn {
        topic: Arc::from("deliver"),
        partition: 0,
        id: id.to_string(),
        commit_offset: 1_000_010,
        first_offset: 1_000_000,
        tasks: (0..tasks as i64)
            .map(|i| {
                rec(
                    1_000_000 + i,
                    "task",
                    Some(crate::util::task_value(1_700_000_000_000_000)),
                )
            })
            .collect(),
        marker: rec(1_000_010, "commit", None),
        committed_at: Instant::now(),
    };
    let names = txn_sidecar::config::HeaderNames {
        id: "txn-id".into(),
        kind: "txn-type".into(),
        count: "txn-count".into(),
    };
    // No latency field: the sink must not count these as latency samples.
    let body = render_body(&txn, &names);
    String::from_utf8(body)
        .unwrap()
        .replace("\"t_us\"", "\"t_xx\"")
        .into_bytes()
}

/// `role loadgen --url URL --concurrency C --warmup-ms W --duration-ms D [--client app|reqwest]`.
pub fn loadgen(args: &[String]) -> anyhow::Result<()> {
    let f = flags(args);
    let url: String = f
        .get("url")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("--url"))?;
    let conc: usize = flag(&f, "concurrency", 4);
    let warmup = Duration::from_millis(flag(&f, "warmup-ms", 500));
    let duration = Duration::from_millis(flag(&f, "duration-ms", 3000));
    let body = sample_body(10);
    // Same runtime shape as the sidecar binary (multi-thread, one worker per core).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async move {
        // reqwest with the settings the sidecar used up to change 6, or the sidecar's own
        // client (`txn_sidecar::delivery::AppClient`); the driver takes the faster as the
        // sink's maximum.
        let reqwest_client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        let app_client =
            txn_sidecar::delivery::AppClient::new(&url.parse()?, Duration::from_secs(5))?;
        let use_app = match f.get("client").map(String::as_str) {
            None | Some("app") => true,
            Some("reqwest") => false,
            Some(other) => anyhow::bail!("--client {other}: app or reqwest"),
        };
        let body = bytes::Bytes::from(body);
        let count = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..conc {
            let (client, app, url, body, count, errors, stop) = (
                reqwest_client.clone(),
                app_client.clone(),
                url.clone(),
                body.clone(),
                count.clone(),
                errors.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                use http::header::{HeaderMap, HeaderValue};
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("deliver/{w}/{n}");
                    let ok = if use_app {
                        let mut h = HeaderMap::with_capacity(6);
                        h.insert("content-type", HeaderValue::from_static("application/json"));
                        if let Ok(v) = HeaderValue::from_str(&key) {
                            h.insert("idempotency-key", v);
                        }
                        h.insert("x-txn-id", HeaderValue::from_static("tx-bench-00000001"));
                        let r = app.post(&h, body.clone(), Duration::from_secs(30)).await;
                        matches!(r, Ok(r) if (200..300).contains(&r.status))
                    } else {
                        let r = client
                            .post(&url)
                            .timeout(Duration::from_secs(30))
                            .header("content-type", "application/json")
                            .header("idempotency-key", key)
                            .header("x-txn-id", "tx-bench-00000001")
                            .body(body.clone())
                            .send()
                            .await;
                        match r {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        }
                    };
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(warmup).await;
        let (n0, t0, c0) = (
            count.load(Ordering::Relaxed),
            Instant::now(),
            proc_cpu_secs(std::process::id()),
        );
        tokio::time::sleep(duration).await;
        let (n1, t1, c1) = (
            count.load(Ordering::Relaxed),
            Instant::now(),
            proc_cpu_secs(std::process::id()),
        );
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let n = (n1 - n0) as f64;
        anyhow::Ok(json!({
            "rate": n / (t1 - t0).as_secs_f64(),
            "requests": n,
            "errors": errors.load(Ordering::Relaxed),
            "body_bytes": body.len(),
            "cpu_per_request_us": (c1 - c0) / n * 1e6,
        }))
    })?;
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// bare: an rdkafka BaseConsumer with the sidecar's own consumer config that does nothing.

/// `role bare --brokers B --topic T --group G --mode count|latency|idle --expect N --timeout-ms MS [--kafka k=v,k=v]`.
pub fn bare(args: &[String]) -> anyhow::Result<()> {
    let f = flags(args);
    let mut s = Sources::default();
    for k in ["brokers", "topic", "group"] {
        s.flags.insert(
            k.into(),
            f.get(k).cloned().ok_or_else(|| anyhow::anyhow!("--{k}"))?,
        );
    }
    for kv in f
        .get("kafka")
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--kafka {kv}"))?;
        s.flags.insert(format!("kafka.{k}"), v.into());
    }
    let cfg = Config::load(&s).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Exactly the client configuration the sidecar uses (read_committed, no auto commit,
    // cooperative-sticky, statistics), so only what happens after poll() differs.
    let consumer: BaseConsumer = txn_sidecar::kafka::consumer_config(&cfg).create()?;
    consumer.subscribe(&[cfg.topics[0].as_str()])?;
    let mode = f.get("mode").cloned().unwrap_or_else(|| "count".into());
    let expect: u64 = flag(&f, "expect", 0);
    let deadline = Instant::now() + Duration::from_millis(flag(&f, "timeout-ms", 120_000));
    let me = std::process::id();
    let mut announced = false;
    fn announce(c: &BaseConsumer, announced: &mut bool) {
        if !*announced && c.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            println!("assigned");
            *announced = true;
        }
    }
    let out = match mode.as_str() {
        "count" | "count-headers" => {
            let read_headers = mode == "count-headers";
            let mut n = 0u64;
            let (mut t0, mut c0, mut t1, mut c1) = (0u64, 0.0, 0u64, 0.0);
            while n < expect && Instant::now() < deadline {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    if read_headers {
                        // What any consumer of the header protocol pays in librdkafka:
                        // the lazy header parse behind rd_kafka_message_headers().
                        std::hint::black_box(m.headers().map(|h| h.count()));
                    }
                    drop(m);
                    n += 1;
                    if n == 1 {
                        (t0, c0) = (now_us(), proc_cpu_secs(me));
                    }
                    if n == expect {
                        (t1, c1) = (now_us(), proc_cpu_secs(me));
                    }
                }
            }
            let (rss, hwm) = proc_rss(me);
            json!({
                "records": n,
                "rate": (n.saturating_sub(1)) as f64 / ((t1.saturating_sub(t0)) as f64 / 1e6),
                "cpu_per_record_us": (c1 - c0) / (n.saturating_sub(1)) as f64 * 1e6,
                "rss": rss, "hwm": hwm,
            })
        }
        "latency" => {
            let (mut lat, mut commits, mut records) = (Vec::<(i64, i64)>::new(), 0u64, 0u64);
            let c0 = proc_cpu_secs(me);
            // Per-thread scheduling from the first record to the last, read here because
            // librdkafka's threads are gone once the consumer is dropped.
            let mut sched0 = (Instant::now(), Default::default(), 0.0);
            while commits < expect && Instant::now() < deadline {
                announce(&consumer, &mut announced);
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let t = now_us();
                    records += 1;
                    if records == 1 {
                        sched0 = (Instant::now(), thread_sched_secs(me), proc_cpu_secs(me));
                    }
                    let is_commit = m.headers().is_some_and(|h| {
                        h.iter()
                            .any(|h| h.key == "txn-type" && h.value == Some(b"commit".as_slice()))
                    });
                    if is_commit {
                        commits += 1;
                        if let Some(t0) = m.payload().and_then(|p| scan_int(p, b"\"t_us\":")) {
                            lat.push((t0, t as i64 - t0));
                        }
                    }
                }
            }
            let cpu = proc_cpu_secs(me) - c0;
            let window = sched0.0.elapsed().as_secs_f64();
            let sched = sched_delta(&sched0.1, &thread_sched_secs(me), window);
            let window_cpu = proc_cpu_secs(me) - sched0.2;
            json!({
                "commits": commits, "records": records, "cpu_s": cpu, "samples": lat,
                "sched": sched, "window_s": window, "window_cpu_s": window_cpu,
            })
        }
        "idle" => {
            while Instant::now() < deadline && !announced {
                let _ = consumer.poll(Duration::from_millis(50));
                announce(&consumer, &mut announced);
            }
            let until = Instant::now() + Duration::from_millis(flag(&f, "idle-ms", 2000));
            while Instant::now() < until {
                let _ = consumer.poll(Duration::from_millis(50));
            }
            let (rss, hwm) = proc_rss(me);
            json!({"rss": rss, "hwm": hwm})
        }
        m => anyhow::bail!("unknown mode {m}"),
    };
    println!("{out}");
    drop(consumer);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// mock: a mock cluster whose group coordinator does not add seconds of its own.

/// `role mock --initial-rebalance-delay-ms MS --topic NAME:PARTITIONS ...`: prints the
/// bootstrap servers, then serves until killed.
///
/// librdkafka's mock coordinator waits `session.timeout.ms - 1000` before completing the
/// join after a member leaves (a real broker completes it once every remaining member
/// rejoined), and `txn-sidecar mock-kafka` keeps the 3 s initial rebalance delay, which
/// forbids session timeouts below ~4 s. This cluster sets that delay to MS so members
/// can use a short session timeout and the coordinator's own wait shrinks accordingly.
pub fn mock(args: &[String]) -> anyhow::Result<()> {
    use rdkafka::producer::{BaseProducer, Producer};
    let mut delay = 100;
    let mut topics = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--initial-rebalance-delay-ms" => {
                delay = it.next().and_then(|v| v.parse().ok()).unwrap_or(100)
            }
            "--topic" => topics.push(it.next().cloned().unwrap_or_default()),
            _ => {}
        }
    }
    let host: BaseProducer = rdkafka::ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .set("client.id", "bench-mock")
        .create()?;
    anyhow::ensure!(
        txn_sidecar_ffi::set_mock_group_initial_rebalance_delay(host.client(), delay),
        "mock cluster"
    );
    let cluster = host
        .client()
        .mock_cluster()
        .ok_or_else(|| anyhow::anyhow!("mock cluster"))?;
    for t in &topics {
        let (name, parts) = t.split_once(':').unwrap_or((t, "1"));
        cluster
            .create_topic(name, parts.parse()?, 1)
            .map_err(|e| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    println!("{}", cluster.bootstrap_servers());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
