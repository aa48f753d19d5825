//! Runs one profile: broker process, recording app, producer, sidecar processes driven by
//! the schedule; then waits for the group to settle and hands the evidence to the report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::app::{App, Mode, Req};
use super::procs::{metric, Broker, CommittedPos, GroupReader, Sidecar, SidecarSettings};
use super::report::{self, Evidence, KillRecord, Report};
use super::schedule::{Action, Schedule};
use super::workload::{self, Plan, ProducerRun, Shape};
pub use txn_sidecar::config::GroupProtocol;
use txn_sidecar::embedded::fast_group_properties;

pub const TOPIC: &str = "fault.tx";
pub const DLQ: &str = "fault.tx.dlq";
pub const GROUP: &str = "fault-suite";

/// What to run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub seed: u64,
    pub shape: Shape,
    /// How long the producer spreads the records over.
    pub produce_for: Duration,
    pub schedule: Schedule,
    /// How long the group may take to deliver everything after the schedule.
    pub settle_timeout: Duration,
    /// The consumer group protocol every sidecar uses.
    pub protocol: GroupProtocol,
}

/// The key of a committed transaction: what `Idempotency-Key` carries.
pub type Key = (i32, i64);

pub fn key(r: &Req) -> Key {
    (r.partition, r.commit_offset)
}

/// The sidecar settings of the suite (also printed in the report).
pub fn sidecar_args(protocol: GroupProtocol) -> Vec<String> {
    let mut args: Vec<String> = [
        "--set",
        "commit_interval=100ms",
        "--set",
        "rebalance_grace=10s",
        "--set",
        "shutdown_grace=15s",
        "--set",
        "retry.initial_backoff=20ms",
        "--set",
        "retry.max_backoff=500ms",
        "--set",
        "retry.max_attempts=0",
        "--set",
        "retry.max_elapsed=10m",
        "--set",
        "app.timeout=10s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Classic: session.timeout.ms=6000, heartbeat.interval.ms=500. KIP-848: the broker's
    // (the embedded cluster sets the same 6 s and 500 ms).
    for (k, v) in fast_group_properties(protocol) {
        args.push("-X".into());
        args.push(format!("{k}={v}"));
    }
    args
}

struct Runner {
    t0: Instant,
    dir: PathBuf,
    app: App,
    settings: SidecarSettings,
    slots: Vec<Option<Sidecar>>,
    used_slots: BTreeSet<usize>,
    next_inc: usize,
    reader: GroupReader,
    /// The app phase in force and when it ends.
    phase: Option<(Mode, Instant)>,
    kills: Vec<KillRecord>,
    exit_failures: Vec<String>,
    metrics: BTreeMap<usize, String>,
    counts: BTreeMap<&'static str, usize>,
    timeline: Vec<String>,
}

impl Runner {
    fn log(&mut self, line: String) {
        let l = format!("[{:>7.2}s] {line}", self.t0.elapsed().as_secs_f64());
        println!("{l}");
        self.timeline.push(l);
    }

    fn count(&mut self, what: &'static str) {
        *self.counts.entry(what).or_default() += 1;
    }

    fn tick(&mut self) {
        if let Some((_, until)) = self.phase {
            if Instant::now() >= until {
                self.phase = None;
                self.app.set_mode(Mode::Normal);
                self.log("app back to normal".into());
            }
        }
    }

    fn sleep(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.tick();
            std::thread::sleep(
                Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    fn spawn(&mut self, slot: usize) {
        assert!(self.slots[slot].is_none(), "slot {slot} busy");
        let inc = self.next_inc;
        self.next_inc += 1;
        let restart = !self.used_slots.insert(slot);
        let url = self.app.url(inc);
        // The admin port is picked free just before the start; if another process took it
        // meanwhile the sidecar exits at once, and it is started again on another port.
        let mut attempt = 0;
        let sc = loop {
            attempt += 1;
            let mut sc = Sidecar::spawn(&self.settings, &self.dir, slot, inc, &url);
            let deadline = Instant::now() + Duration::from_secs(5);
            while sc.alive() && sc.admin_get("/healthz").is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if sc.alive() || attempt >= 3 {
                break sc;
            }
            self.log(format!("slot {slot}: process #{inc} exited at start (attempt {attempt}); starting it again"));
        };
        self.log(format!(
            "slot {slot}: started process #{inc} (pid {}){}",
            sc.pid(),
            if restart { ", a restart" } else { "" }
        ));
        self.count(if restart { "restarts" } else { "joins" });
        self.slots[slot] = Some(sc);
    }

    fn scrape(&mut self, sc: &Sidecar) {
        if let Some(m) = sc.admin_get("/metrics") {
            self.metrics.insert(sc.inc, m);
        }
    }

    /// SIGTERM (unless already sent) and wait for exit 0.
    fn terminate(&mut self, slot: usize, why: &str, already_signalled: bool) {
        let mut sc = self.slots[slot].take().expect("running slot");
        if !already_signalled {
            self.scrape(&sc);
        }
        let t = Instant::now();
        let status = if already_signalled {
            sc.wait_exit(Duration::from_secs(45))
        } else {
            sc.terminate(Duration::from_secs(45))
        };
        let ok = status.is_some_and(|s| s.success());
        self.log(format!(
            "slot {slot}: process #{} {why}: {} after {} ms",
            sc.inc,
            match status {
                Some(s) => format!("exited {s}"),
                None => "DID NOT EXIT".into(),
            },
            t.elapsed().as_millis()
        ));
        if !ok {
            self.exit_failures.push(format!(
                "process #{} ({why}) {status:?}; log {}",
                sc.inc,
                sc.log.display()
            ));
        }
        if !already_signalled {
            self.count("graceful leaves");
        }
    }

    fn committed(&self) -> BTreeMap<i32, CommittedPos> {
        for _ in 0..20 {
            match self.reader.committed() {
                Ok(c) => return c,
                Err(e) => {
                    eprintln!("reading committed offsets: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("cannot read committed offsets");
    }

    fn kill(&mut self, step: usize, slot: usize, mid_request: bool) {
        let mut sc = self.slots[slot].take().expect("running slot");
        let mut forced_slow = false;
        if mid_request {
            if !matches!(self.app.mode(), Mode::Slow { .. }) {
                self.app.set_mode(Mode::Slow {
                    min_ms: 300,
                    max_ms: 900,
                });
                forced_slow = true;
            }
            let deadline = Instant::now() + Duration::from_secs(4);
            while self.app.in_flight(sc.inc) == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.scrape(&sc);
        let at = Instant::now();
        sc.kill9();
        let reaped = Instant::now();
        if forced_slow {
            let m = self.phase.map_or(Mode::Normal, |(m, _)| m);
            self.app.set_mode(m);
        }
        // The killed process can commit nothing more: what the broker holds now is what
        // the next owner starts from.
        let committed = self.committed();
        let reqs = self.app.requests();
        let mine: Vec<&Req> = reqs.iter().filter(|r| r.inc == sc.inc).collect();
        let in_flight_reqs: Vec<&&Req> = mine
            .iter()
            .filter(|r| r.start <= reaped && r.end.is_none_or(|e| e >= at))
            .collect();
        let in_flight: BTreeSet<Key> = in_flight_reqs.iter().map(|r| key(r)).collect();
        let exposed: BTreeSet<Key> = mine
            .iter()
            .filter(|r| {
                r.accepted
                    && !committed
                        .get(&r.partition)
                        .is_some_and(|c| c.covers(r.commit_offset))
            })
            .map(|r| key(r))
            .collect();
        // Accepted well before the kill (more than 10 commit intervals): a healthy
        // sidecar would normally have committed these already.
        let stale: BTreeSet<Key> = mine
            .iter()
            .filter(|r| {
                r.accepted && exposed.contains(&key(r)) && r.start + Duration::from_secs(1) < at
            })
            .map(|r| key(r))
            .collect();
        let accepted_in_flight = in_flight_reqs.iter().filter(|r| r.accepted).count();
        self.log(format!(
            "slot {slot}: process #{} SIGKILLed: {} request(s) in flight ({} already processed by the app), {} accepted transaction(s) not covered by the committed offsets",
            sc.inc,
            in_flight_reqs.len(),
            accepted_in_flight,
            exposed.len()
        ));
        self.kills.push(KillRecord {
            step,
            inc: sc.inc,
            at,
            in_flight_requests: in_flight_reqs.len(),
            in_flight,
            exposed,
            stale: stale.len(),
        });
        self.count("SIGKILLs");
    }

    /// Partitions that no live process reports as consumed to `end` with nothing in flight.
    fn partitions_not_caught_up(&self, end: &[i64]) -> Vec<i32> {
        let mut ok = BTreeSet::new();
        for sc in self.slots.iter().flatten() {
            let Some(body) = sc.admin_get("/v1/partitions") else {
                continue;
            };
            let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
            for v in views {
                let p = v["partition"].as_i64().unwrap_or(-1) as i32;
                let Some(&e) = end.get(p as usize) else {
                    continue;
                };
                let pos = v["consumed_offset"]
                    .as_i64()
                    .or_else(|| v["committed_offset"].as_i64());
                let idle =
                    v["queued"].as_u64() == Some(0) && v["open_transactions"].as_u64() == Some(0);
                if pos == Some(e) && idle {
                    ok.insert(p);
                }
            }
        }
        (0..end.len() as i32).filter(|p| !ok.contains(p)).collect()
    }

    /// Starts one fresh process after everyone left, waits until it owns every partition
    /// and has consumed to the end, then stops it. Returns its incarnation number.
    fn probe(&mut self, end: &[i64]) -> usize {
        let slot = self.slots.len();
        self.slots.push(None);
        self.spawn(slot);
        *self.counts.entry("joins").or_default() -= 1;
        let inc = self.slots[slot].as_ref().unwrap().inc;
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut caught_up = false;
        while Instant::now() < deadline {
            if self.partitions_not_caught_up(end).is_empty() {
                caught_up = true;
                break;
            }
            self.sleep(Duration::from_millis(200));
        }
        // Let any redelivery it started finish before it is stopped.
        self.sleep(Duration::from_millis(500));
        let delivered = self
            .app
            .requests()
            .iter()
            .filter(|q| q.inc == inc && q.accepted)
            .count();
        self.log(format!(
            "probe process #{inc}: {} caught up, {delivered} transaction(s) redelivered",
            if caught_up {
                "all partitions"
            } else {
                "NOT all partitions"
            }
        ));
        if !caught_up {
            self.exit_failures
                .push(format!("probe process #{inc} did not catch up within 40 s"));
        }
        self.terminate(slot, "SIGTERM (probe)", false);
        *self.counts.entry("graceful leaves").or_default() -= 1;
        inc
    }

    fn set_phase(&mut self, mode: Mode, ms: u64) {
        self.app.set_mode(mode);
        self.phase = Some((mode, Instant::now() + Duration::from_millis(ms)));
    }

    fn step(&mut self, n: usize, a: Action) {
        self.log(format!("step {n}: {a}"));
        match a {
            Action::Join { slot } => self.spawn(slot),
            Action::Leave { slot } => self.terminate(slot, "SIGTERM", false),
            Action::Kill { slot, mid_request } => self.kill(n, slot, mid_request),
            Action::Bounce { slot, mid_request } => {
                self.kill(n, slot, mid_request);
                self.spawn(slot);
            }
            Action::Roll { slot } => {
                self.terminate(slot, "SIGTERM (rolling restart)", false);
                self.spawn(slot);
            }
            Action::Errors { ms } => {
                self.set_phase(Mode::Errors, ms);
                self.count("5xx bursts");
            }
            Action::Slow { ms, min_ms, max_ms } => {
                self.set_phase(Mode::Slow { min_ms, max_ms }, ms);
                self.count("slow phases");
            }
        }
    }
}

/// Runs `profile` and returns the report (not yet judged).
pub fn run(profile: &Profile) -> Report {
    let wall = Instant::now();
    let kind = crate::common::BrokerKind::selected();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "fault-suite-{}-seed{}{}",
        profile.name,
        profile.seed,
        match kind {
            crate::common::BrokerKind::Mock => "",
            crate::common::BrokerKind::Tansu => "-tansu",
        }
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("log dir");
    let parts = profile.shape.partitions;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(App::start(profile.seed));
    let broker = Broker::start(&dir, &[(TOPIC, parts), (DLQ, parts)]);
    let plan: Plan = workload::plan(profile.seed, &profile.shape);
    let settings = SidecarSettings {
        brokers: broker.bootstrap.clone(),
        topic: TOPIC.into(),
        group: GROUP.into(),
        extra: sidecar_args(profile.protocol),
    };
    let reader = GroupReader::new(&broker.bootstrap, GROUP, TOPIC, parts);
    let mut r = Runner {
        t0: Instant::now(),
        dir: dir.clone(),
        app: app.clone(),
        settings,
        slots: (0..profile.schedule.slots).map(|_| None).collect(),
        used_slots: BTreeSet::new(),
        next_inc: 1,
        reader,
        phase: None,
        kills: Vec::new(),
        exit_failures: Vec::new(),
        metrics: BTreeMap::new(),
        counts: BTreeMap::new(),
        timeline: Vec::new(),
    };
    r.log(format!(
        "broker {} at {} (pid {}, owned by this test), app {}, logs in {}",
        broker.kind.name(),
        broker.bootstrap,
        broker.pid(),
        app.addr,
        dir.display()
    ));
    for &s in &profile.schedule.initial {
        r.spawn(s);
    }
    let mut producer = ProducerRun::start(
        &broker.bootstrap,
        broker.kind.producer_properties(),
        TOPIC,
        &plan,
        profile.produce_for,
    );
    r.log(format!(
        "producing {} transactions ({} records) over {:?}",
        plan.txns.len(),
        plan.ops.len(),
        profile.produce_for
    ));
    for (n, s) in profile.schedule.steps.iter().enumerate() {
        r.sleep(Duration::from_millis(s.gap_ms));
        r.step(n + 1, s.action);
    }
    // Let the producer finish, end any app phase, and let the group deliver everything.
    while producer.done.load(std::sync::atomic::Ordering::Relaxed) < plan.ops.len() {
        r.sleep(Duration::from_millis(100));
    }
    producer.join().expect("producer");
    r.log("producer done".into());
    if let Some((_, until)) = r.phase {
        r.sleep(until.saturating_duration_since(Instant::now()));
        r.tick();
    }
    let expected: BTreeSet<&str> = plan
        .txns
        .iter()
        .filter(|t| !t.abort)
        .map(|t| t.id.as_str())
        .collect();
    let records_per_partition = {
        let mut v = vec![0i64; parts as usize];
        for op in &plan.ops {
            let t = match *op {
                workload::Op::Task { txn, .. }
                | workload::Op::Commit(txn)
                | workload::Op::Abort(txn) => txn,
            };
            v[plan.txns[t].partition as usize] += 1;
        }
        v
    };
    let end = records_per_partition.clone();
    let settle = Instant::now();
    let mut settled = false;
    let mut last_note = Instant::now();
    while settle.elapsed() < profile.settle_timeout {
        let reqs = app.requests();
        let got: BTreeSet<&str> = reqs
            .iter()
            .filter(|q| q.accepted)
            .map(|q| q.id.as_str())
            .collect();
        let missing = expected.iter().filter(|id| !got.contains(*id)).count();
        let behind = r.partitions_not_caught_up(&end);
        if missing == 0 && behind.is_empty() {
            settled = true;
            break;
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            last_note = Instant::now();
            r.log(format!("settling: {missing} transaction(s) not yet delivered; partitions not caught up: {behind:?}"));
        }
        r.sleep(Duration::from_millis(200));
    }
    r.log(if settled {
        format!(
            "settled after {} ms: everything delivered, every partition owned, consumed to its end, nothing in flight",
            settle.elapsed().as_millis()
        )
    } else {
        format!("NOT settled within {:?}", profile.settle_timeout)
    });
    // The owners commit every commit_interval; give them a few to reach the end.
    let commit_wait = Instant::now();
    let mut committed_at_end = false;
    while commit_wait.elapsed() < Duration::from_secs(15) {
        let c = r.committed();
        if (0..parts).all(|p| c[&p].offset == Some(end[p as usize])) {
            committed_at_end = true;
            break;
        }
        r.sleep(Duration::from_millis(100));
    }
    let before_stop = r.committed();
    r.log(format!(
        "committed offsets before the final stop: {} (ends {:?})",
        fmt_committed(&before_stop),
        end
    ));
    // Everyone leaves gracefully at once (a scale to zero); exits are checked like any other.
    let running: Vec<usize> = (0..r.slots.len())
        .filter(|&s| r.slots[s].is_some())
        .collect();
    if broker.kind == crate::common::BrokerKind::Tansu {
        final_stop_one_by_one(&mut r, &running, &end);
    } else {
        for &s in &running {
            let sc = r.slots[s].take().unwrap();
            r.scrape(&sc);
            super::procs::kill_cmd(sc.pid(), "-TERM");
            r.slots[s] = Some(sc);
        }
        r.log(format!("final stop: SIGTERM to slots {running:?} at once"));
        for &s in &running {
            r.terminate(s, "SIGTERM at the end", true);
        }
    }
    let after_stop = r.committed();
    r.log(format!(
        "committed offsets after the final stop: {}",
        fmt_committed(&after_stop)
    ));
    // Probe: a fresh member of the group must find nothing left to deliver. Anything it
    // delivers was handed over by a graceful stop and counts as such a duplicate.
    let probe_inc = r.probe(&end);
    let final_committed = r.committed();
    let high = r.reader.high_watermarks(TOPIC, parts).unwrap_or_default();
    let dlq = r
        .reader
        .high_watermarks(DLQ, parts)
        .unwrap_or_default()
        .iter()
        .sum::<i64>();
    let sum = |series: &str| -> f64 { r.metrics.values().map(|m| metric(m, series)).sum() };
    let skipped = sum("txn_sidecar_transactions_total{outcome=\"duplicate_skipped\"}");
    let overflow = sum("txn_sidecar_skip_set_overflow_total");
    let commit_errors = sum("txn_sidecar_offset_commits_total{result=\"error\"}");
    let lost_assignments = count_in_logs(&dir, "assignment lost");
    let failed_commits_logged = count_in_logs(&dir, "offset commit failed; the next owner replays");
    let cut_off_logged = count_in_logs(&dir, "in-flight delivery cut off");
    let ev = Evidence {
        broker: broker.kind,
        profile: profile.clone(),
        plan,
        requests: app.requests(),
        kills: std::mem::take(&mut r.kills),
        exit_failures: std::mem::take(&mut r.exit_failures),
        counts: std::mem::take(&mut r.counts),
        settled,
        committed_at_end,
        before_stop: before_stop.clone(),
        probe_inc,
        end_offsets: records_per_partition,
        high_watermarks: high,
        final_committed,
        dlq_records: dlq,
        skipped_by_skip_set: skipped as u64,
        skip_set_overflow: overflow as u64,
        commit_errors: commit_errors as u64,
        lost_assignments,
        refused: super::logs::refused_handoffs(&dir),
        failed_commits_logged,
        cut_off_logged,
        processes: r.next_inc - 1,
        wall: wall.elapsed(),
        dir: dir.clone(),
        timeline: std::mem::take(&mut r.timeline),
    };
    let _ = std::fs::write(dir.join("timeline.txt"), ev.timeline.join("\n") + "\n");
    drop(r);
    drop(broker);
    report::analyse(ev)
}

/// The final stop on tansu: one member at a time, each once the members left own every
/// partition again. tansu 0.6.0 keeps a member that leaves while it is the elected leader
/// of a pending generation (between its JoinGroup response and its SyncGroup) as the
/// leader of every later generation: the group never forms again, and the probe would
/// wait forever. Members leaving at once hit that about every other run.
fn final_stop_one_by_one(r: &mut Runner, running: &[usize], end: &[i64]) {
    r.log(format!(
        "final stop: SIGTERM to slots {running:?} one at a time (tansu: see final_stop_one_by_one)"
    ));
    for (i, &s) in running.iter().enumerate() {
        if i > 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !r.partitions_not_caught_up(end).is_empty() && Instant::now() < deadline {
                r.sleep(Duration::from_millis(100));
            }
            let behind = r.partitions_not_caught_up(end);
            if !behind.is_empty() {
                r.exit_failures.push(format!(
                    "after a leave in the final stop, partitions {behind:?} were not owned and caught up within 60 s"
                ));
            }
        }
        r.terminate(s, "SIGTERM at the end", false);
        *r.counts.entry("graceful leaves").or_default() -= 1;
    }
}

fn fmt_committed(c: &BTreeMap<i32, CommittedPos>) -> String {
    c.iter()
        .map(|(p, pos)| {
            format!(
                "p{p}@{}{}",
                pos.offset.unwrap_or(-1),
                if pos.skip.is_empty() {
                    String::new()
                } else {
                    format!("+skip{}", pos.skip.len())
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn count_in_logs(dir: &std::path::Path, needle: &str) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("sidecar-") {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    n += s.lines().filter(|l| l.contains(needle)).count();
                }
            }
        }
    }
    n
}
