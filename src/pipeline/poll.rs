//! The poll loop on the consumer thread: serves rebalances (records arrive through the
//! [`super::readers`], or here when they cannot run), runs the periodic work between polls (commits, expiry ticks, back-pressure, the admin
//! snapshot), and drains on shutdown.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    carry_out, lock, Engine, PipelineError, SidecarContext, COMMIT_REFRESH, RESUME_SETTLE,
};
use crate::config::Config;
use crate::kafka;

/// The least time closing the consumer (leaving the group) gets at shutdown, even when
/// the grace is spent: a LeaveGroup answered at once spares the group a session timeout.
const CLOSE_MIN: Duration = Duration::from_millis(500);

/// How often the log end is asked for, per partition, to confirm that a partition with
/// something old enough to expire is caught up.
const END_QUERY_INTERVAL: Duration = Duration::from_secs(2);

/// Most log-end queries per expiry tick, so that many partitions and a slow broker do not
/// stall the poll loop (the rest are asked at the next tick).
const MAX_END_QUERIES: usize = 4;

impl Engine {
    /// Periodic work between polls.
    fn tick<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        self.clock();
        self.drain_events();
        self.run_commands();
        let now = Instant::now();
        if now.duration_since(self.last_commit) >= self.cfg.commit_interval {
            self.last_commit = now;
            let refresh = now.duration_since(self.last_refresh) >= COMMIT_REFRESH;
            if refresh {
                self.last_refresh = now;
            }
            if refresh || !(self.metadata_kept || self.metadata_dropped) {
                // Before sending again: the last commits have landed by now. Until the
                // broker's handling of commit metadata is known, every tick asks.
                self.check_metadata_kept(consumer);
            }
            self.commit_async(consumer, refresh);
        }
        if now.duration_since(self.last_expiry) >= Duration::from_secs(1) {
            self.last_expiry = now;
            self.expire(consumer);
        }
        // Pausing is per-partition work; a few milliseconds of reaction time is plenty.
        if now.duration_since(self.last_back_pressure) >= Duration::from_millis(5) {
            self.last_back_pressure = now;
            self.back_pressure(consumer);
        }
        if now.duration_since(self.last_snapshot) >= Duration::from_millis(100) {
            self.last_snapshot = now;
            self.publish();
        }
    }

    /// Ticks every machine with whether its partition is caught up (the machine's
    /// expiry rule needs it only when something is old enough to expire).
    fn expire<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let now_ms = self.now_ms;
        let keys: Vec<(Arc<str>, i32)> = self
            .all_parts()
            .filter(|p| p.machine.wants_caught_up(now_ms))
            .map(|p| (p.machine.topic().clone(), p.machine.partition()))
            .collect();
        let mut queries = 0;
        for (t, n) in keys {
            let caught_up = self.caught_up(consumer, &t, n, &mut queries);
            let Engine {
                parts,
                actions,
                metrics,
                ..
            } = self;
            if let Some(p) = parts.get_mut(&t).and_then(|m| m.get_mut(&n)) {
                p.machine.tick(now_ms, caught_up, actions);
                carry_out(p, actions, metrics);
            }
        }
    }

    /// Whether partition `t`/`n` has been consumed to the end of its log and is being
    /// fetched. Asked only when something is old enough to expire. librdkafka's
    /// end-of-log signal (`enable.partition.eof`, no statistics needed) rules a partition
    /// out cheaply: a record consumed since says it was not at the end. It cannot rule one
    /// in: after it, fetches may fail (a leader moving, a broker unreachable) while the
    /// producers go on. So the consumer's position is compared with the log end read from
    /// the broker, at most every [`END_QUERY_INTERVAL`] per partition and
    /// [`MAX_END_QUERIES`] per tick; a query that fails means not caught up.
    fn caught_up<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        t: &str,
        n: i32,
        queries: &mut usize,
    ) -> bool {
        // The signal names no topic: where several topics share the partition number it
        // says nothing.
        let ambiguous = self.parts.values().filter(|m| m.contains_key(&n)).count() > 1;
        let Some(p) = self.part_mut(t, n) else {
            return false;
        };
        if p.paused || p.resumed_at.is_some_and(|r| r.elapsed() < RESUME_SETTLE) {
            return false;
        }
        if !p.at_end && !ambiguous {
            return false;
        }
        if *queries >= MAX_END_QUERIES
            || p.last_end_query
                .is_some_and(|q| q.elapsed() < END_QUERY_INTERVAL)
        {
            return false;
        }
        *queries += 1;
        p.last_end_query = Some(Instant::now());
        // The position counts control records (transaction markers), which the log end
        // does too; the last consumed offset does not.
        let position =
            consumer
                .position()
                .ok()
                .and_then(|pos| match pos.find_partition(t, n)?.offset() {
                    rdkafka::Offset::Offset(o) => Some(o),
                    _ => None,
                });
        let end = consumer
            .fetch_watermarks(t, n, Duration::from_secs(1))
            .ok()
            .map(|(_, hi)| hi);
        let caught = matches!((position, end), (Some(pos), Some(end)) if pos >= end);
        if !caught {
            if let Some(p) = self.part_mut(t, n) {
                p.at_end = false;
            }
        }
        caught
    }

    /// Graceful stop: no new deliveries; in-flight ones get `shutdown_grace`, less a
    /// reserve for the final commit and leaving the group, which `consume` does next.
    fn drain<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, deadline: Instant) {
        self.shutting_down = true;
        self.back_pressure(consumer);
        let tps: Vec<(Arc<str>, i32)> = self
            .all_parts()
            .map(|p| (p.machine.topic().clone(), p.machine.partition()))
            .collect();
        // In-flight deliveries get the grace but for what the commit and the goodbye to
        // the group need at the end.
        let grace = self.cfg.shutdown_grace;
        let reserve = (grace / 4).min(Duration::from_secs(2));
        let left = deadline.saturating_duration_since(Instant::now());
        info!(
            partitions = tps.len(),
            grace_ms = grace.as_millis() as u64,
            "draining"
        );
        self.stop_workers_within(&tps, left.saturating_sub(reserve), reserve / 2);
    }
}

/// Runs the consumer loop on the calling (dedicated) thread until `shutdown` fires.
pub fn consume(
    cfg: &Config,
    engine: Arc<Mutex<Engine>>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    // `kafka::consumer_config` sets `enable.partition.eof`: the expiry clock's end-of-log
    // signal (see `Engine::caught_up`).
    let consumer: Arc<BaseConsumer<SidecarContext>> = Arc::new(
        kafka::consumer_config(cfg).create_with_context(SidecarContext::new(engine.clone()))?,
    );
    let readers = cfg.reader_threads;
    if readers > 0 {
        let shared_cfg = lock(&engine).cfg.clone();
        if let Err(e) = consumer
            .context()
            .start_readers(&consumer, readers, &shared_cfg)
        {
            // Records then arrive through this thread's own poll.
            warn!(error = %e, "cannot start reader threads; reading on the consumer thread");
        }
    }
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    info!(topics = ?cfg.topics, group = %cfg.group, brokers = %cfg.brokers, readers, "consuming");
    // The loop runs under `catch_unwind` so that a panic (a bug) still takes the drain
    // below: in-flight deliveries finish, nothing is committed (the panic may have left
    // a machine half-updated, see `lock`), and leaving the group keeps its deadline.
    // Unwinding out of this function would drop the consumer instead, whose close
    // waits on the brokers without a bound and commits on revoke.
    let looped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        poll_loop(&consumer, &engine, &shutdown)
    }));
    let mut result = looped.unwrap_or_else(|_| {
        error!("the consumer thread panicked; stopping without committing");
        Err(PipelineError::Panicked("consumer thread"))
    });
    // A fatal error drains too: `/readyz` answers 503 (`shutting_down`) from here on,
    // as it does after SIGTERM.
    shutdown.cancel();
    // Every step from here runs inside `shutdown_grace`, whatever the brokers do.
    let drain_started = Instant::now();
    let deadline = drain_started + cfg.shutdown_grace.max(Duration::from_secs(1));
    // Nothing is staged from here on; the readers let go of the consumer.
    consumer.context().stop_readers();
    lock(&engine).drain(&consumer, deadline);
    // A drain step that panics (a bug) is reported as the process's error, so the exit
    // says what happened rather than 0.
    let mut panicked = |step: &'static str| {
        error!(
            step,
            "a shutdown step panicked; the next owner replays from the last committed offset"
        );
        if result.is_ok() {
            result = Err(PipelineError::Panicked(step));
        }
    };
    let mut retry = match commit_within(&engine, &consumer, deadline) {
        Ok(retry) => retry,
        Err(RecvTimeoutError::Timeout) => {
            warn!(
                grace_ms = cfg.shutdown_grace.as_millis() as u64,
                "the final offset commit got no answer within the shutdown grace (coordinator unreachable?); the next owner replays from the last committed offset"
            );
            false
        }
        Err(RecvTimeoutError::Disconnected) => {
            panicked("final offset commit");
            false
        }
    };
    while retry && Instant::now() < deadline {
        // The group is rebalancing: poll (without the engine lock, which the rebalance
        // callbacks take) so librdkafka can rejoin, then commit under the new generation.
        // Records fetched meanwhile lie above the committed offset and are not staged.
        let _ = consumer.poll(Duration::from_millis(100));
        retry = match commit_within(&engine, &consumer, deadline) {
            Ok(true) => true,
            Ok(false) => {
                info!(
                    waited_ms = drain_started.elapsed().as_millis() as u64,
                    "final offset commit accepted after the rebalance"
                );
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => {
                panicked("final offset commit");
                false
            }
        };
    }
    info!("leaving the consumer group");
    // Leaving needs a broker; with none reachable librdkafka's close waits out the
    // session timeout. Offsets are already committed (or cannot be), so bound the wait.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::Builder::new()
        .name("txn-sidecar-close".into())
        .spawn(move || {
            // Nothing without the `failpoints` feature; tests/panics.rs panics here.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("drain::close");
            drop(consumer);
            let _ = done_tx.send(());
        });
    let close_deadline = deadline
        .saturating_duration_since(Instant::now())
        .max(CLOSE_MIN);
    if closer.is_ok() {
        match done_rx.recv_timeout(close_deadline) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) => {
                warn!(deadline_ms = close_deadline.as_millis() as u64, "could not leave the group in time (brokers unreachable?); the group evicts this member after its session timeout");
            }
            Err(RecvTimeoutError::Disconnected) => panicked("consumer's close"),
        }
    }
    // A panic that surfaced as "no answer in time" (a step that panicked after its
    // deadline, or a revoke that panicked inside a close that then overran) still left
    // the engine poisoned or tainted. `try_lock`: a close still running may hold it.
    let tainted = match engine.try_lock() {
        Ok(e) => e.tainted,
        Err(std::sync::TryLockError::Poisoned(_)) => true,
        Err(std::sync::TryLockError::WouldBlock) => false,
    };
    if tainted && result.is_ok() {
        error!("a shutdown step panicked while it held the partitions' state; nothing was committed from it");
        result = Err(PipelineError::Panicked("shutdown step"));
    }
    result
}

/// Polls and applies records, ticks the engine, until shutdown or an error.
fn poll_loop(
    consumer: &Arc<BaseConsumer<SidecarContext>>,
    engine: &Arc<Mutex<Engine>>,
    shutdown: &CancellationToken,
) -> Result<(), PipelineError> {
    let mut result = Ok(());
    let mut last_error: Option<Instant> = None;
    let mut burst = 0u32;
    let mut timeout = Duration::from_millis(50);
    // Every record is encoded here first; staging copies it on (see `kafka::record_ref`).
    let mut scratch = Vec::new();
    while !shutdown.is_cancelled() {
        match consumer.poll(timeout) {
            Some(Ok(msg)) => {
                let rec = kafka::record_ref(&msg, &mut scratch);
                lock(engine).on_record(msg.topic(), msg.partition(), rec);
                burst += 1;
                // Under load, periodic work runs every few dozen records, not per record.
                if burst < 64 {
                    continue;
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                lock(engine).on_end_of_log(partition);
            }
            Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                error!(error = %code, "fatal consumer error");
                result = Err(PipelineError::Fatal(code.to_string()));
                break;
            }
            // Broker outages surface here; librdkafka reconnects by itself.
            Some(Err(e)) if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) => {
                warn!(error = %e, "consumer error (librdkafka retries)");
                last_error = Some(Instant::now());
            }
            Some(Err(_)) => {}
            None => {}
        }
        burst = 0;
        if consumer.context().readers_failed() {
            error!(
                "a reader thread died; stopping so the partitions are read again after a restart"
            );
            result = Err(PipelineError::Panicked("reader thread"));
            break;
        }
        let mut e = lock(engine);
        e.tick(consumer);
        if e.workers_failed.load(std::sync::atomic::Ordering::SeqCst) {
            error!("a partition's worker died; stopping so its transactions are delivered after a restart");
            result = Err(PipelineError::Panicked("delivery worker"));
            break;
        }
        timeout = e.poll_timeout();
    }
    result
}

/// The final commit, on a thread of its own so that a coordinator that never answers
/// cannot hold the process past `deadline`: whether to commit again after a rebalance,
/// or `Timeout` when it did not return in time (the thread is left behind; the process
/// is exiting) or could not be started, and `Disconnected` when it panicked.
fn commit_within(
    engine: &Arc<Mutex<Engine>>,
    consumer: &Arc<BaseConsumer<SidecarContext>>,
    deadline: Instant,
) -> Result<bool, RecvTimeoutError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (engine, consumer) = (engine.clone(), consumer.clone());
    std::thread::Builder::new()
        .name("txn-sidecar-commit".into())
        .spawn(move || {
            let mut e = lock(&engine);
            // Nothing without the `failpoints` feature; tests/panics.rs panics here, with
            // the engine locked, as a panic inside the commit would.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("drain::commit");
            let retry = e.final_commit(&consumer);
            drop(e);
            let _ = tx.send(retry);
        })
        .map_err(|_| RecvTimeoutError::Timeout)?;
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
}

/// Warns when a source topic's `cleanup.policy` includes `compact`: compaction keeps only
/// the newest record per key and so deletes tasks of transactions keyed by their id, in
/// gaps inside the log the sidecar cannot see. Best effort: a broker that does not
/// answer `DescribeConfigs` is logged at debug level.
pub async fn warn_if_compacted(cfg: Arc<Config>) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = match kafka::base_config(&cfg).create() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "cannot check the topics' cleanup.policy");
            return;
        }
    };
    let specs: Vec<ResourceSpecifier<'_>> = cfg
        .topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    match admin.describe_configs(&specs, &opts).await {
        Ok(results) => {
            for (topic, r) in cfg.topics.iter().zip(results) {
                let policy = r
                    .ok()
                    .and_then(|c| c.get("cleanup.policy").and_then(|e| e.value.clone()));
                if let Some(p) = policy.filter(|p| p.contains("compact")) {
                    warn!(topic = %topic, cleanup_policy = %p, "source topic is compacted: compaction deletes tasks of transactions keyed by their id, in gaps the sidecar cannot detect; use cleanup.policy=delete");
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot check the topics' cleanup.policy"),
    }
}
