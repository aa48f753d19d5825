//! The engine: consume → stage → deliver → commit, per partition, and rebalance handling.
//!
//! One OS thread owns the librdkafka consumer and all staging state; it never blocks on
//! the app. Each assigned partition has one async worker that delivers its committed
//! transactions in marker order (one in flight) and writes dead letters. Workers report
//! back over a channel; the thread turns those reports into safe offsets. Rebalances run
//! inside `poll` on the same thread, like Kafka Connect's open/close: revoke stops the
//! partition's worker (waiting up to `rebalance_grace`), commits its safe offset and
//! drops its state; assign starts clean from the committed offset and its skip set.

use std::collections::{HashSet, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashMap;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::admin::{AdminCommand, PartitionView, Snapshot, TxnView};
use crate::config::Config;
use crate::delivery::{Delivered, Deliverer, ReadyTxn};
use crate::dlq::{DeadLetterWriter, DeadTxn};
use crate::kafka;
use crate::offsets::OffsetTracker;
use crate::protocol::{self, Kind, RecordRef};
use crate::staging::{MemoryStore, OpenTxn, StagingStore};
use crate::telemetry::{
    Metrics, Outcome, PartitionLabel, ReasonLabel, RebalanceLabel, RecordKind, ResultLabel,
};

/// Work for a partition, in partition order.
enum Work {
    /// POST a committed transaction (the delivery worker).
    Deliver(ReadyTxn),
    /// Write records to the dead-letter topic (the dead-letter lane).
    DeadLetter(DlqWork),
}

/// Records for the dead-letter lane. The lane is separate from the delivery worker so a
/// dead-letter topic outage holds the offset without stopping deliveries behind it.
struct DlqWork {
    dead: DeadTxn,
    /// The offset hold to release once written.
    hold: i64,
    /// The offset to mark finished once written (skipped on replay).
    finish: Option<i64>,
    /// The transaction outcome to count, if this was a transaction.
    outcome: Option<Outcome>,
}

/// Reports from workers to the consumer thread.
enum Event {
    Done {
        topic: Arc<str>,
        partition: i32,
        generation: u64,
        hold: i64,
        finish: Option<i64>,
    },
    Stopped {
        topic: Arc<str>,
        partition: i32,
        generation: u64,
    },
}

/// State of one assigned partition.
struct Part {
    topic: Arc<str>,
    partition: i32,
    generation: u64,
    store: Box<dyn StagingStore>,
    offsets: OffsetTracker,
    /// Ids whose transaction overflowed a limit: their remaining records follow it into
    /// the dead-letter topic until the marker, so nothing partial is ever delivered.
    overflowed: HashMap<String, i64>,
    recent_commits: RecentIds,
    tx: UnboundedSender<ReadyTxn>,
    dlq_tx: UnboundedSender<DlqWork>,
    queued: usize,
    stop: CancellationToken,
    cut: CancellationToken,
    /// Tasks (delivery worker, dead-letter lane) that have not reported `Stopped`.
    running: u8,
    paused: bool,
    last_log_ms: i64,
    caught_up: bool,
    consumer_lag: i64,
}

/// Bounded memory of recently committed ids, to name a second commit `duplicate_commit`.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    const CAP: usize = 4096;
    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_string()) {
            self.order.push_back(id.to_string());
            if self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

/// Everything the consumer thread and the rebalance callbacks share.
pub struct Engine {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    deliverer: Deliverer,
    dlq: DeadLetterWriter,
    rt: tokio::runtime::Handle,
    tracker: TaskTracker,
    events_tx: Sender<Event>,
    events_rx: Receiver<Event>,
    parts: HashMap<Arc<str>, HashMap<i32, Part>>,
    generation: u64,
    over_budget: bool,
    last_commit: Instant,
    /// When unchanged commit points were last re-sent (see [`COMMIT_REFRESH`]).
    last_refresh: Instant,
    last_expiry: Instant,
    last_back_pressure: Instant,
    last_snapshot: Instant,
    snapshot: Arc<Mutex<Snapshot>>,
    commands: Receiver<AdminCommand>,
    shutting_down: bool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Engine {
    /// A new engine; workers run on `rt` and are tracked by `tracker`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        deliverer: Deliverer,
        dlq: DeadLetterWriter,
        rt: tokio::runtime::Handle,
        tracker: TaskTracker,
        snapshot: Arc<Mutex<Snapshot>>,
        commands: Receiver<AdminCommand>,
    ) -> Engine {
        let (events_tx, events_rx) = std::sync::mpsc::channel();
        Engine {
            cfg,
            metrics,
            deliverer,
            dlq,
            rt,
            tracker,
            events_tx,
            events_rx,
            parts: HashMap::new(),
            generation: 0,
            over_budget: false,
            last_commit: Instant::now(),
            last_refresh: Instant::now(),
            last_expiry: Instant::now(),
            last_back_pressure: Instant::now(),
            last_snapshot: Instant::now() - Duration::from_secs(10),
            snapshot,
            commands,
            shutting_down: false,
        }
    }

    fn part_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.parts.get_mut(topic)?.get_mut(&partition)
    }

    /// How long the poll loop may block: short while a partition is paused, so it
    /// resumes as soon as its queue has drained rather than up to a poll later.
    fn poll_timeout(&self) -> Duration {
        if self.all_parts().any(|p| p.paused) {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(50)
        }
    }

    fn all_parts(&self) -> impl Iterator<Item = &Part> {
        self.parts.values().flat_map(|m| m.values())
    }

    fn all_parts_mut(&mut self) -> impl Iterator<Item = &mut Part> {
        self.parts.values_mut().flat_map(|m| m.values_mut())
    }

    /// Handles one consumed record.
    fn on_record(&mut self, topic: &str, partition: i32, rec: RecordRef<'_>) {
        // Borrow the fields apart rather than clone the `Arc`s: this runs for every record.
        let Engine {
            cfg,
            metrics,
            parts,
            ..
        } = self;
        let Some(p) = parts.get_mut(topic).and_then(|m| m.get_mut(&partition)) else {
            debug!(
                topic,
                partition,
                offset = rec.offset,
                "record for an unassigned partition ignored"
            );
            return;
        };
        let offset = rec.offset;
        p.offsets.consumed(offset);
        let log_ms = rec.timestamp_ms.filter(|t| *t > 0).unwrap_or_else(now_ms);
        p.last_log_ms = p.last_log_ms.max(log_ms);
        let decoded = protocol::decode(rec, cfg.protocol, &cfg.headers);

        if p.offsets.is_finished(offset) {
            // Handled by an earlier owner: drop what it staged, never redo it.
            if let Ok(m) = &decoded {
                if matches!(m.kind, Kind::Commit { .. } | Kind::Abort) {
                    if let Some(t) = p.store.take(m.id) {
                        p.offsets.release(t.first_offset);
                    }
                    if matches!(m.kind, Kind::Commit { .. }) {
                        metrics.outcome(Outcome::duplicate_skipped);
                        info!(topic, partition, offset, txn_id = %m.id, "already delivered before the handoff, skipped");
                    }
                }
            }
            return;
        }

        let marker = match decoded {
            Ok(m) => m,
            Err(e) => {
                metrics.consumed(RecordKind::invalid);
                warn!(topic, partition, offset, reason = e.reason(), error = %e, "invalid record, dead-lettering it");
                p.offsets.hold(offset);
                let dead = DeadTxn {
                    topic: p.topic.clone(),
                    partition,
                    id: None,
                    records: rec.into(),
                    reason: e.reason(),
                    error: e.to_string(),
                    attempts: 0,
                };
                dead_letter(p, dead, offset, Some(offset), None);
                return;
            }
        };
        match marker.kind {
            Kind::Task => {
                metrics.consumed(RecordKind::task);
                if p.overflowed.contains_key(marker.id) {
                    p.offsets.hold(offset);
                    let dead = single(
                        p,
                        marker.id,
                        rec,
                        "too_large",
                        "a transaction limit was exceeded earlier",
                    );
                    dead_letter(p, dead, offset, Some(offset), None);
                    return;
                }
                let t = p.store.stage(marker.id, rec, log_ms);
                let (tasks, bytes) = (t.tasks.len(), t.bytes);
                if tasks == 1 {
                    // This task opened the transaction: hold the commit point below it.
                    p.offsets.hold(offset);
                }
                if tasks > cfg.limits.max_tasks_per_txn || bytes > cfg.limits.max_txn_bytes {
                    let Some(t) = p.store.take(marker.id) else {
                        return;
                    };
                    let error = format!(
                        "transaction has {tasks} tasks / {bytes} bytes, limits are {} / {}",
                        cfg.limits.max_tasks_per_txn, cfg.limits.max_txn_bytes
                    );
                    warn!(topic, partition, offset, txn_id = %marker.id, tasks, bytes, "transaction too large, dead-lettering it");
                    p.overflowed.insert(marker.id.to_string(), log_ms);
                    let hold = t.first_offset;
                    let dead = DeadTxn {
                        topic: p.topic.clone(),
                        partition,
                        id: Some(marker.id.to_string()),
                        records: t.tasks,
                        reason: "too_large",
                        error,
                        attempts: 0,
                    };
                    dead_letter(p, dead, hold, None, Some(Outcome::dead_lettered));
                }
            }
            Kind::Abort => {
                metrics.consumed(RecordKind::abort);
                if let Some(t) = p.store.take(marker.id) {
                    p.offsets.release(t.first_offset);
                    metrics.outcome(Outcome::aborted);
                    info!(topic, partition, offset, txn_id = %marker.id, tasks = t.tasks.len(), "aborted");
                } else if p.overflowed.remove(marker.id).is_some() {
                    // Its tasks went to the dead-letter topic; the abort follows them so a
                    // replay of that topic aborts too.
                    p.offsets.hold(offset);
                    let dead = single(
                        p,
                        marker.id,
                        rec,
                        "too_large",
                        "abort of a transaction that exceeded a limit",
                    );
                    dead_letter(p, dead, offset, Some(offset), None);
                } else {
                    debug!(topic, partition, offset, txn_id = %marker.id, "abort with no staged tasks");
                }
            }
            Kind::Commit { count } => {
                metrics.consumed(RecordKind::commit);
                if p.overflowed.remove(marker.id).is_some() {
                    p.offsets.hold(offset);
                    let dead = single(
                        p,
                        marker.id,
                        rec,
                        "too_large",
                        "commit of a transaction that exceeded a limit",
                    );
                    dead_letter(p, dead, offset, Some(offset), None);
                    return;
                }
                let Some(t) = p.store.take(marker.id) else {
                    let (reason, error) = if p.recent_commits.contains(marker.id) {
                        (
                            "duplicate_commit",
                            "a second commit for a transaction already committed",
                        )
                    } else {
                        ("empty_commit", "commit with no staged tasks")
                    };
                    warn!(topic, partition, offset, txn_id = %marker.id, reason, "commit without tasks, dead-lettering it");
                    p.offsets.hold(offset);
                    let dead = single(p, marker.id, rec, reason, error);
                    dead_letter(p, dead, offset, Some(offset), Some(Outcome::dead_lettered));
                    return;
                };
                p.recent_commits.insert(marker.id);
                metrics
                    .transaction_open
                    .observe(((log_ms - t.opened_ms).max(0) as f64) / 1000.0);
                if let Some(expected) = count {
                    if expected != t.tasks.len() as u64 {
                        let error = format!(
                            "commit declares {expected} tasks, {} were staged",
                            t.tasks.len()
                        );
                        warn!(topic, partition, offset, txn_id = %marker.id, expected, staged = t.tasks.len(), "task count mismatch, dead-lettering");
                        let hold = t.first_offset;
                        let mut records = t.tasks;
                        records.push(rec);
                        let dead = DeadTxn {
                            topic: p.topic.clone(),
                            partition,
                            id: Some(marker.id.to_string()),
                            records,
                            reason: "count_mismatch",
                            error,
                            attempts: 0,
                        };
                        dead_letter(p, dead, hold, Some(offset), Some(Outcome::dead_lettered));
                        return;
                    }
                }
                debug!(topic, partition, offset, txn_id = %marker.id, tasks = t.tasks.len(), "committed, queued for delivery");
                let txn = ReadyTxn {
                    topic: p.topic.clone(),
                    partition,
                    id: marker.id.to_string(),
                    commit_offset: offset,
                    first_offset: t.first_offset,
                    tasks: t.tasks,
                    marker: rec.to_record(),
                    committed_at: Instant::now(),
                };
                send(p, Work::Deliver(txn));
            }
        }
    }

    /// Applies worker reports; returns how many partitions reported `Stopped`.
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Done {
                topic,
                partition,
                generation,
                hold,
                finish,
            } => {
                if let Some(p) = self.part_mut(&topic, partition) {
                    if p.generation == generation {
                        p.queued = p.queued.saturating_sub(1);
                        p.offsets.release(hold);
                        if let Some(f) = finish {
                            p.offsets.finish(f);
                        }
                    }
                }
            }
            Event::Stopped {
                topic,
                partition,
                generation,
            } => {
                if let Some(p) = self.part_mut(&topic, partition) {
                    if p.generation == generation {
                        p.running = p.running.saturating_sub(1);
                    }
                }
            }
        }
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events_rx.try_recv() {
            self.apply(ev);
        }
    }

    /// Waits until every partition in `tps` has stopped its worker, or `deadline`.
    fn wait_stopped(&mut self, tps: &[(Arc<str>, i32)], deadline: Instant) -> bool {
        loop {
            self.drain_events();
            let all = tps.iter().all(|(t, p)| {
                self.parts
                    .get(t)
                    .and_then(|m| m.get(p))
                    .is_none_or(|p| p.running == 0)
            });
            if all {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .events_rx
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(ev) => self.apply(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Stops the workers of `tps`: no new deliveries at once, in-flight ones get `grace`.
    fn stop_workers(&mut self, tps: &[(Arc<str>, i32)], grace: Duration) {
        for (t, n) in tps {
            if let Some(p) = self.part_mut(t, *n) {
                p.stop.cancel();
            }
        }
        if !self.wait_stopped(tps, Instant::now() + grace) {
            for (t, n) in tps {
                if let Some(p) = self.part_mut(t, *n) {
                    if p.running > 0 {
                        warn!(topic = %t, partition = *n, grace_ms = grace.as_millis() as u64, "in-flight delivery cut off; the next owner redelivers it");
                        p.cut.cancel();
                    }
                }
            }
            self.wait_stopped(tps, Instant::now() + Duration::from_secs(5));
        }
    }

    /// Commits the safe offsets of `tps` synchronously; `Err` carries the broker's refusal.
    fn commit_sync<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tps: &[(Arc<str>, i32)],
    ) -> KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        let mut points = Vec::new();
        for (t, n) in tps {
            let Some(p) = self.part_mut(t, *n) else {
                continue;
            };
            if let Some(cp) = p.offsets.final_commit_point() {
                if cp.dropped > 0 {
                    self.metrics.skip_set_overflow.inc_by(cp.dropped as u64);
                }
                points.push((t.clone(), *n, cp));
            }
        }
        for (t, n, cp) in &points {
            if add_offset(&mut tpl, t, *n, cp.offset, &cp.metadata).is_err() {
                warn!(topic = %t, partition = *n, "cannot build offset commit");
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                for (t, n, cp) in points {
                    if let Some(p) = self.part_mut(&t, n) {
                        p.offsets.committed_at(cp.offset);
                    }
                    info!(topic = %t, partition = n, offset = cp.offset, "committed safe offset");
                }
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit failed; the next owner replays from the last committed offset");
                Err(e)
            }
        }
    }

    /// Sends the commit points that changed, or all of them when `refresh` is set.
    fn commit_async<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, refresh: bool) {
        let mut tpl = TopicPartitionList::new();
        let metrics = self.metrics.clone();
        for p in self.all_parts_mut() {
            let point = if refresh {
                p.offsets.final_commit_point()
            } else {
                p.offsets.commit_point()
            };
            if let Some(cp) = point {
                if cp.dropped > 0 {
                    metrics.skip_set_overflow.inc_by(cp.dropped as u64);
                }
                if add_offset(&mut tpl, &p.topic, p.partition, cp.offset, &cp.metadata).is_ok() {
                    p.offsets.committed_at(cp.offset);
                }
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit could not be sent");
            }
        }
    }

    /// Results of asynchronous commits, should librdkafka report them (rust-rdkafka's
    /// `BaseConsumer` does not today; [`COMMIT_REFRESH`] covers refused commits).
    fn on_commit_result(&mut self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
            }
            Err(e) => {
                self.metrics
                    .offset_commits
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                warn!(error = %e, "offset commit failed, will retry");
                for el in offsets.elements() {
                    if let Some(p) = self.part_mut(el.topic(), el.partition()) {
                        // Forces the next tick to commit again.
                        p.offsets.committed_at(-1);
                    }
                }
            }
        }
    }

    /// Carries out operator requests from the admin server.
    fn run_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                AdminCommand::DeadLetter {
                    topic,
                    partition,
                    id,
                    reply,
                } => {
                    let result = match self.part_mut(&topic, partition) {
                        None => Err(format!(
                            "{topic}/{partition} is not assigned to this member"
                        )),
                        Some(p) => match p.store.take(&id) {
                            None => {
                                Err(format!("no open transaction {id:?} in {topic}/{partition}"))
                            }
                            Some(t) => {
                                let tasks = t.tasks.len();
                                warn!(topic = %topic, partition, offset = t.first_offset, txn_id = %id, tasks, "dead-lettering an open transaction on operator request");
                                let hold = t.first_offset;
                                let dead = DeadTxn {
                                    topic: p.topic.clone(),
                                    partition,
                                    id: Some(id),
                                    records: t.tasks,
                                    reason: "operator",
                                    error: "dead-lettered through the admin API".into(),
                                    attempts: 0,
                                };
                                dead_letter(p, dead, hold, None, Some(Outcome::dead_lettered));
                                Ok(tasks)
                            }
                        },
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Periodic work between polls.
    fn tick<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        self.drain_events();
        self.run_commands();
        let now = Instant::now();
        if now.duration_since(self.last_commit) >= self.cfg.commit_interval {
            self.last_commit = now;
            let refresh = now.duration_since(self.last_refresh) >= COMMIT_REFRESH;
            if refresh {
                self.last_refresh = now;
            }
            self.commit_async(consumer, refresh);
        }
        if now.duration_since(self.last_expiry) >= Duration::from_secs(1) {
            self.last_expiry = now;
            self.expire();
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

    /// Dead-letters transactions open longer than `txn_timeout` in log time.
    ///
    /// Age is the partition's newest record timestamp minus the transaction's first task
    /// timestamp, so a replay after a restart expires exactly what the live run would
    /// have; once the partition is caught up (no lag), wall-clock time stands in for the
    /// newest timestamp, so an orphan on an idle partition still expires.
    fn expire(&mut self) {
        let timeout = self.cfg.txn_timeout.as_millis() as i64;
        let now = now_ms();
        for p in self.all_parts_mut() {
            let reference = if p.caught_up {
                now.max(p.last_log_ms)
            } else {
                p.last_log_ms
            };
            let expired: Vec<String> = p
                .store
                .open()
                .into_iter()
                .filter(|(_, t)| reference - t.opened_ms > timeout)
                .map(|(id, _)| id.to_string())
                .collect();
            for id in expired {
                let Some(t) = p.store.take(&id) else { continue };
                let age_ms = reference - t.opened_ms;
                warn!(topic = %p.topic, partition = p.partition, offset = t.first_offset, txn_id = %id, age_ms, tasks = t.tasks.len(), "transaction expired, dead-lettering it");
                let hold = t.first_offset;
                let dead = DeadTxn {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    id: Some(id),
                    records: t.tasks,
                    reason: "expired",
                    error: format!("no commit or abort within {age_ms} ms of the first task"),
                    attempts: 0,
                };
                dead_letter(p, dead, hold, None, Some(Outcome::expired));
            }
            p.overflowed.retain(|_, ts| reference - *ts <= timeout);
        }
    }

    /// Pauses partitions whose delivery queue is full, and, above the staged-bytes budget,
    /// every partition but the one holding the oldest open transaction (so the budget can
    /// never deadlock: that partition keeps reading towards its marker or a limit).
    fn back_pressure<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let staged: u64 = self.all_parts().map(|p| p.store.bytes()).sum();
        let budget = self.cfg.limits.max_staged_bytes;
        if staged > budget {
            if !self.over_budget {
                warn!(
                    staged,
                    budget, "staged bytes over budget, pausing partitions"
                );
            }
            self.over_budget = true;
        } else if self.over_budget && staged <= budget / 10 * 9 {
            self.over_budget = false;
            info!(
                staged,
                budget, "staged bytes back under budget, resuming partitions"
            );
        }
        let head = if self.over_budget {
            self.all_parts()
                .flat_map(|p| {
                    p.store
                        .open()
                        .into_iter()
                        .map(move |(_, t)| (t.opened_ms, p.topic.clone(), p.partition))
                })
                .min_by_key(|(ms, _, _)| *ms)
                .map(|(_, t, n)| (t, n))
        } else {
            None
        };
        let max_queued = self.cfg.limits.max_queued_per_partition;
        let over = self.over_budget;
        let shutting_down = self.shutting_down;
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let mut changed = Vec::new();
        for p in self.all_parts_mut() {
            let is_head = head
                .as_ref()
                .is_some_and(|(t, n)| *t == p.topic && *n == p.partition);
            let want =
                shutting_down || queue_full(p.paused, p.queued, max_queued) || (over && !is_head);
            if want != p.paused {
                let list = if want { &mut pause } else { &mut resume };
                list.add_partition(&p.topic, p.partition);
                changed.push((p.topic.clone(), p.partition, want));
            }
        }
        let ok_pause = pause.count() == 0 || consumer.pause(&pause).is_ok();
        let ok_resume = resume.count() == 0 || consumer.resume(&resume).is_ok();
        if ok_resume && resume.count() > 0 {
            kafka::wake_fetchers(consumer, &resume);
        }
        for (t, n, want) in changed {
            if (want && ok_pause) || (!want && ok_resume) {
                if let Some(p) = self.part_mut(&t, n) {
                    p.paused = want;
                    debug!(topic = %t, partition = n, paused = want, queued = p.queued, "back-pressure");
                }
                if want {
                    self.metrics.partition_pauses.inc();
                }
            }
        }
        let paused = self.all_parts().filter(|p| p.paused).count();
        self.metrics.paused_partitions.set(paused as i64);
        self.metrics.staged_bytes.set(staged as i64);
        let open: usize = self.all_parts().map(|p| p.store.len()).sum();
        self.metrics.open_transactions.set(open as i64);
    }

    fn publish(&mut self) {
        let now = now_ms();
        let mut partitions = Vec::new();
        // Every open transaction as a borrowed candidate; views are built only for the
        // oldest `MAX_TXN_VIEWS`, which are the ones an operator looks for.
        let mut open: Vec<(&Part, &str, &OpenTxn)> = Vec::new();
        for p in self.all_parts() {
            let label = PartitionLabel {
                topic: p.topic.to_string(),
                partition: p.partition,
            };
            self.metrics
                .commit_lag
                .get_or_create(&label)
                .set(p.offsets.replay_cost());
            partitions.push(PartitionView {
                topic: p.topic.to_string(),
                partition: p.partition,
                committed_offset: p.offsets.committed().filter(|o| *o >= 0),
                consumed_offset: p.offsets.next_offset(),
                safe_offset: p.offsets.safe_offset(),
                open_transactions: p.store.len(),
                staged_bytes: p.store.bytes(),
                queued: p.queued,
                paused: p.paused,
                consumer_lag: p.consumer_lag,
            });
            open.extend(p.store.open().into_iter().map(|(id, t)| (p, id, t)));
        }
        keep_smallest(&mut open, MAX_TXN_VIEWS, |(_, _, t)| t.opened_ms);
        let mut txns: Vec<TxnView> = open
            .into_iter()
            .map(|(p, id, t)| TxnView {
                id: id.to_string(),
                topic: p.topic.to_string(),
                partition: p.partition,
                first_offset: t.first_offset,
                tasks: t.tasks.len(),
                bytes: t.bytes,
                age_seconds: ((now - t.opened_ms).max(0) as f64) / 1000.0,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        txns.sort_by(|a, b| {
            (&a.topic, a.partition, a.first_offset).cmp(&(&b.topic, b.partition, b.first_offset))
        });
        if let Ok(mut s) = self.snapshot.lock() {
            s.partitions = partitions;
            s.transactions = txns;
        }
    }

    fn on_stats(&mut self, stats: &Statistics) {
        let metrics = self.metrics.clone();
        for (tname, t) in &stats.topics {
            for (n, ps) in &t.partitions {
                if *n < 0 {
                    continue;
                }
                if let Some(p) = self.part_mut(tname, *n) {
                    if ps.hi_offset >= 0 && ps.app_offset >= 0 {
                        p.consumer_lag = (ps.hi_offset - ps.app_offset).max(0);
                        p.caught_up = p.consumer_lag == 0;
                        metrics
                            .consumer_lag
                            .get_or_create(&PartitionLabel {
                                topic: tname.clone(),
                                partition: *n,
                            })
                            .set(p.consumer_lag);
                    }
                }
            }
        }
    }

    fn assign<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        self.metrics
            .rebalances
            .get_or_create(&RebalanceLabel { kind: "assign" })
            .inc();
        if self.shutting_down {
            // Served only so the final commit can go through; the next owner takes these.
            info!(
                partitions = tpl.count(),
                "assigned while shutting down; not consuming"
            );
            return;
        }
        if let Ok(mut s) = self.snapshot.lock() {
            s.joined = true;
        }
        // Commits sent while the group was rebalancing were likely refused: resend every
        // kept partition's point at the next commit tick.
        let now = Instant::now();
        self.last_refresh = now.checked_sub(COMMIT_REFRESH).unwrap_or(now);
        if tpl.count() == 0 {
            info!("joined the group with no partitions assigned");
            return;
        }
        let mut query = TopicPartitionList::new();
        for el in tpl.elements() {
            query.add_partition(el.topic(), el.partition());
        }
        let committed = match consumer.committed_offsets(query, Duration::from_secs(30)) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read committed offsets; starting without a skip set (at-least-once)");
                TopicPartitionList::new()
            }
        };
        for el in tpl.elements() {
            let topic: Arc<str> = Arc::from(el.topic());
            let partition = el.partition();
            let (offset, metadata) = match committed.find_partition(el.topic(), partition) {
                Some(c) => match c.offset() {
                    Offset::Offset(o) => (Some(o), kafka::safe_metadata(&c)),
                    _ => (None, String::new()),
                },
                None => (None, String::new()),
            };
            let offsets = OffsetTracker::assigned(offset, &metadata);
            self.generation += 1;
            let generation = self.generation;
            let (tx, rx) = unbounded_channel();
            let (dlq_tx, dlq_rx) = unbounded_channel();
            let stop = CancellationToken::new();
            let cut = CancellationToken::new();
            let lane = DlqLane {
                topic: topic.clone(),
                partition,
                generation,
                rx: dlq_rx,
                dlq: self.dlq.clone(),
                events: self.events_tx.clone(),
                stop: stop.clone(),
                cut: cut.clone(),
                metrics: self.metrics.clone(),
                initial_backoff: self.cfg.retry.initial_backoff,
                max_backoff: self.cfg.retry.max_backoff,
            };
            let worker = Worker {
                topic: topic.clone(),
                partition,
                generation,
                rx,
                deliverer: self.deliverer.clone(),
                lane: dlq_tx.clone(),
                events: self.events_tx.clone(),
                stop: stop.clone(),
                cut: cut.clone(),
                metrics: self.metrics.clone(),
            };
            self.tracker.spawn_on(worker.run(), &self.rt);
            self.tracker.spawn_on(lane.run(), &self.rt);
            info!(topic = %topic, partition, committed = offset.unwrap_or(-1), "partition assigned");
            let part = Part {
                topic: topic.clone(),
                partition,
                generation,
                store: Box::new(MemoryStore::new()),
                offsets,
                overflowed: HashMap::new(),
                recent_commits: RecentIds::default(),
                tx,
                dlq_tx,
                queued: 0,
                stop,
                cut,
                running: 2,
                paused: false,
                last_log_ms: 0,
                caught_up: false,
                consumer_lag: 0,
            };
            self.parts.entry(topic).or_default().insert(partition, part);
        }
        let n: usize = self.parts.values().map(HashMap::len).sum();
        self.metrics.assigned_partitions.set(n as i64);
        self.publish();
    }

    fn revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, tpl: &TopicPartitionList) {
        self.metrics
            .rebalances
            .get_or_create(&RebalanceLabel { kind: "revoke" })
            .inc();
        let tps: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .filter_map(|el| {
                let p = self.parts.get(el.topic())?.get(&el.partition())?;
                Some((p.topic.clone(), p.partition))
            })
            .collect();
        if tps.is_empty() {
            return;
        }
        let busy = tps.iter().any(|(t, n)| {
            self.parts
                .get(t)
                .and_then(|m| m.get(n))
                .is_some_and(|p| p.running > 0)
        });
        if busy && !consumer.assignment_lost() {
            // Commit what is finished before waiting for in-flight deliveries: while this
            // member waits, the others may already rejoin, and a coordinator that refuses
            // commits during a rebalance (librdkafka's mock does; Apache Kafka accepts
            // them from the current generation) would then hand over only the last commit
            // it took. This way at most the deliveries finishing during the wait replay.
            let _ = self.commit_sync(consumer, &tps);
        }
        self.stop_workers(&tps, self.cfg.rebalance_grace);
        if consumer.assignment_lost() {
            warn!("assignment lost (session timed out); not committing, the new owner replays");
        } else {
            let _ = self.commit_sync(consumer, &tps);
        }
        for (t, n) in &tps {
            if let Some(m) = self.parts.get_mut(t) {
                if let Some(mut p) = m.remove(n) {
                    p.store.clear();
                    info!(topic = %t, partition = *n, "partition revoked, staged state dropped");
                }
                if m.is_empty() {
                    self.parts.remove(t);
                }
            }
            self.metrics.commit_lag.remove(&PartitionLabel {
                topic: t.to_string(),
                partition: *n,
            });
            self.metrics.consumer_lag.remove(&PartitionLabel {
                topic: t.to_string(),
                partition: *n,
            });
        }
        let n: usize = self.parts.values().map(HashMap::len).sum();
        self.metrics.assigned_partitions.set(n as i64);
        self.publish();
    }

    /// Graceful stop: no new deliveries, in-flight ones get `shutdown_grace`, then commit.
    /// Stops fetching and delivering and commits; `true` asks for [`Self::final_commit`]
    /// again once the group's rebalance has been served.
    fn drain<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        self.shutting_down = true;
        self.back_pressure(consumer);
        let tps: Vec<(Arc<str>, i32)> = self
            .all_parts()
            .map(|p| (p.topic.clone(), p.partition))
            .collect();
        info!(
            partitions = tps.len(),
            grace_ms = self.cfg.shutdown_grace.as_millis() as u64,
            "draining"
        );
        self.stop_workers(&tps, self.cfg.shutdown_grace);
        self.final_commit(consumer)
    }

    /// Commits every partition still owned; `true` when the coordinator refused it because
    /// the group is rebalancing, so the caller should serve the rebalance and call again.
    ///
    /// A refused final commit hands the next owner everything since the last accepted
    /// one, all of it already delivered. After the rebalance this member still owns the
    /// partitions it kept (cooperative) under the new generation, so the commit goes
    /// through; partitions it loses are committed by the revoke callback.
    fn final_commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        let tps: Vec<(Arc<str>, i32)> = self
            .all_parts()
            .map(|p| (p.topic.clone(), p.partition))
            .collect();
        match self.commit_sync(consumer, &tps) {
            Ok(()) => false,
            Err(e) => matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::RebalanceInProgress | RDKafkaErrorCode::IllegalGeneration)
            ),
        }
    }
}

fn add_offset(
    tpl: &mut TopicPartitionList,
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &str,
) -> KafkaResult<()> {
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    if let Some(mut el) = tpl.find_partition(topic, partition) {
        el.set_metadata(metadata);
    }
    Ok(())
}

fn single(p: &Part, id: &str, rec: RecordRef<'_>, reason: &'static str, error: &str) -> DeadTxn {
    DeadTxn {
        topic: p.topic.clone(),
        partition: p.partition,
        id: Some(id.to_string()),
        records: rec.into(),
        reason,
        error: error.to_string(),
        attempts: 0,
    }
}

/// Queues `dead` for the partition's dead-letter lane, holding the offset at `hold`.
fn dead_letter(
    p: &mut Part,
    dead: DeadTxn,
    hold: i64,
    finish: Option<i64>,
    outcome: Option<Outcome>,
) {
    send(
        p,
        Work::DeadLetter(DlqWork {
            dead,
            hold,
            finish,
            outcome,
        }),
    );
}

fn send(p: &mut Part, work: Work) {
    p.queued += 1;
    // A closed channel means the worker is gone (revoke in progress); the hold stays,
    // so the offset is not committed past this work and the next owner redoes it.
    match work {
        Work::Deliver(txn) => {
            let _ = p.tx.send(txn);
        }
        Work::DeadLetter(d) => {
            let _ = p.dlq_tx.send(d);
        }
    }
}

/// Keeps the `n` entries of `v` with the smallest `key`, in no particular order, in
/// linear time (a sort of every open transaction ten times a second would not be).
fn keep_smallest<T>(v: &mut Vec<T>, n: usize, key: impl FnMut(&T) -> i64) {
    if v.len() > n {
        v.select_nth_unstable_by_key(n, key);
        v.truncate(n);
    }
}

/// Whether a partition's delivery queue holds it paused: from `max` queued transactions
/// until half of them are delivered.
///
/// librdkafka drops what it had prefetched for a paused partition and fetches it again
/// on resume, behind the fetch in flight. Resuming one delivery below the limit paused
/// and refetched after almost every delivery of a backlog (BENCHMARKS.md, change 7).
fn queue_full(paused: bool, queued: usize, max: usize) -> bool {
    if paused {
        queued > max / 2
    } else {
        queued >= max
    }
}

/// Delivers one partition's committed transactions in marker order, one in flight.
struct Worker {
    topic: Arc<str>,
    partition: i32,
    generation: u64,
    rx: UnboundedReceiver<ReadyTxn>,
    deliverer: Deliverer,
    lane: UnboundedSender<DlqWork>,
    events: Sender<Event>,
    stop: CancellationToken,
    cut: CancellationToken,
    metrics: Arc<Metrics>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let txn = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                w = self.rx.recv() => match w { Some(w) => w, None => break },
            };
            match self.deliverer.deliver(&txn, &self.cut).await {
                Delivered::Ok { attempts } => {
                    let m = &self.metrics;
                    m.outcome(Outcome::delivered);
                    m.transaction_tasks.observe(txn.tasks.len() as f64);
                    m.commit_to_delivery
                        .observe(txn.committed_at.elapsed().as_secs_f64());
                    // Counted above; one info line per transaction cost 14 % of the CPU per
                    // delivery in the benchmark (BENCHMARKS.md), so it is a debug line.
                    debug!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, tasks = txn.tasks.len(), attempts, "delivered");
                    let _ = self.events.send(Event::Done {
                        topic: self.topic.clone(),
                        partition: self.partition,
                        generation: self.generation,
                        hold: txn.first_offset,
                        finish: Some(txn.commit_offset),
                    });
                }
                Delivered::Failed {
                    reason,
                    error,
                    attempts,
                } => {
                    let hold = txn.first_offset;
                    let finish = Some(txn.commit_offset);
                    let mut records = txn.tasks;
                    records.push(&txn.marker);
                    let dead = DeadTxn {
                        topic: txn.topic,
                        partition: txn.partition,
                        id: Some(txn.id),
                        records,
                        reason,
                        error,
                        attempts,
                    };
                    // The lane reports `Done` once the write is acknowledged; until then
                    // the hold keeps the offset here while later transactions proceed.
                    let _ = self.lane.send(DlqWork {
                        dead,
                        hold,
                        finish,
                        outcome: Some(Outcome::dead_lettered),
                    });
                }
                Delivered::Cancelled => break,
            }
        }
        let _ = self.events.send(Event::Stopped {
            topic: self.topic.clone(),
            partition: self.partition,
            generation: self.generation,
        });
    }
}

/// Writes one partition's dead letters in order, retrying until acknowledged.
struct DlqLane {
    topic: Arc<str>,
    partition: i32,
    generation: u64,
    rx: UnboundedReceiver<DlqWork>,
    dlq: DeadLetterWriter,
    events: Sender<Event>,
    stop: CancellationToken,
    cut: CancellationToken,
    metrics: Arc<Metrics>,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl DlqLane {
    async fn run(mut self) {
        loop {
            let w = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                w = self.rx.recv() => match w { Some(w) => w, None => break },
            };
            if !self.dead_letter(&w.dead, w.outcome).await {
                break;
            }
            let _ = self.events.send(Event::Done {
                topic: self.topic.clone(),
                partition: self.partition,
                generation: self.generation,
                hold: w.hold,
                finish: w.finish,
            });
        }
        let _ = self.events.send(Event::Stopped {
            topic: self.topic.clone(),
            partition: self.partition,
            generation: self.generation,
        });
    }

    /// Writes `dead` until acknowledged; `false` if cut off first.
    async fn dead_letter(&self, dead: &DeadTxn, outcome: Option<Outcome>) -> bool {
        let mut delay = self.initial_backoff;
        loop {
            let r = tokio::select! {
                r = self.dlq.write(dead) => r,
                _ = self.cut.cancelled() => return false,
            };
            match r {
                Ok(()) => {
                    self.metrics
                        .dead_letters
                        .get_or_create(&ReasonLabel {
                            reason: dead.reason.to_string(),
                        })
                        .inc();
                    if let Some(o) = outcome {
                        self.metrics.outcome(o);
                    }
                    warn!(topic = %dead.topic, partition = dead.partition, offset = dead.source_offset(), txn_id = dead.id.as_deref().unwrap_or(""), reason = dead.reason, records = dead.records.len(), "dead-lettered");
                    return true;
                }
                Err(e) => {
                    error!(topic = %dead.topic, partition = dead.partition, offset = dead.source_offset(), error = %e, retry_ms = delay.as_millis() as u64, "dead-letter write failed; offset held, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cut.cancelled() => return false,
                    }
                    delay = (delay * 2).min(self.max_backoff);
                }
            }
        }
    }
}

/// The consumer context: routes librdkafka callbacks to the engine.
pub struct SidecarContext {
    engine: Arc<Mutex<Engine>>,
}

impl SidecarContext {
    /// A context over `engine`.
    pub fn new(engine: Arc<Mutex<Engine>>) -> SidecarContext {
        SidecarContext { engine }
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// librdkafka may serve statistics or commit results while this thread already holds
    /// the engine (inside a rebalance callback); those are skipped rather than deadlock.
    fn try_engine(&self) -> Option<MutexGuard<'_, Engine>> {
        match self.engine.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl ClientContext for SidecarContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(mut e) = self.try_engine() {
            e.on_stats(&statistics);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                error!(facility = fac, "librdkafka: {log_message}")
            }
            L::Warning => warn!(facility = fac, "librdkafka: {log_message}"),
            L::Notice | L::Info => info!(facility = fac, "librdkafka: {log_message}"),
            L::Debug => debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        warn!(error = %error, "kafka: {reason}");
    }
}

impl ConsumerContext for SidecarContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                info!(
                    partitions = tpl.count(),
                    protocol = kafka::protocol_name(consumer),
                    "rebalance: revoking"
                );
                self.engine().revoke(consumer, tpl);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                let engine = self.engine();
                engine
                    .metrics
                    .rebalances
                    .get_or_create(&RebalanceLabel { kind: "error" })
                    .inc();
                warn!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            info!(
                partitions = tpl.count(),
                protocol = kafka::protocol_name(consumer),
                "rebalance: assigned"
            );
            self.engine().assign(consumer, tpl);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Some(mut e) = self.try_engine() {
            e.on_commit_result(result, offsets);
        }
    }
}

/// Why the consumer loop stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The consumer could not be created or subscribed.
    #[error("kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
    /// librdkafka reported a fatal error (e.g. fenced by a static member).
    #[error("fatal kafka error: {0}")]
    Fatal(String),
}

/// How often unchanged commit points are sent again.
///
/// rust-rdkafka's `BaseConsumer` registers no offset-commit callback, so librdkafka
/// reports nothing back for an asynchronous commit. A commit the coordinator refused
/// (it refuses them while a rebalance is in progress) would otherwise leave the committed
/// offset behind until the partition moves again, and a crash at rest would replay all of
/// it. Re-sending is idempotent and costs one small request per interval.
pub const COMMIT_REFRESH: Duration = Duration::from_secs(5);

/// Open transactions the admin snapshot lists: the oldest, since a stuck transaction is
/// what an operator looks for.
const MAX_TXN_VIEWS: usize = 1000;

/// How long closing the consumer (leaving the group) may take at shutdown.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the consumer loop on the calling (dedicated) thread until `shutdown` fires.
pub fn consume(
    cfg: &Config,
    engine: Arc<Mutex<Engine>>,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let consumer: BaseConsumer<SidecarContext> =
        kafka::consumer_config(cfg).create_with_context(SidecarContext::new(engine.clone()))?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    info!(topics = ?cfg.topics, group = %cfg.group, brokers = %cfg.brokers, "consuming");
    fn lock(e: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
        e.lock().unwrap_or_else(|p| p.into_inner())
    }
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
                lock(&engine).on_record(msg.topic(), msg.partition(), rec);
                burst += 1;
                // Under load, periodic work runs every few dozen records, not per record.
                if burst < 64 {
                    continue;
                }
            }
            Some(Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code))) => {
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
        let mut e = lock(&engine);
        e.tick(&consumer);
        timeout = e.poll_timeout();
    }
    let drain_started = Instant::now();
    let mut retry = lock(&engine).drain(&consumer);
    let deadline = drain_started + cfg.shutdown_grace.max(Duration::from_secs(1));
    while retry && Instant::now() < deadline {
        // The group is rebalancing: poll (without the engine lock, which the rebalance
        // callbacks take) so librdkafka can rejoin, then commit under the new generation.
        // Records fetched meanwhile lie above the committed offset and are not staged.
        let _ = consumer.poll(Duration::from_millis(100));
        retry = lock(&engine).final_commit(&consumer);
        if !retry {
            info!(
                waited_ms = drain_started.elapsed().as_millis() as u64,
                "final offset commit accepted after the rebalance"
            );
        }
    }
    info!("leaving the consumer group");
    // Leaving needs a broker; with none reachable librdkafka's close waits out the
    // session timeout. Offsets are already committed (or cannot be), so bound the wait.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::Builder::new()
        .name("txn-sidecar-close".into())
        .spawn(move || {
            drop(consumer);
            let _ = done_tx.send(());
        });
    if closer.is_ok() && done_rx.recv_timeout(CLOSE_DEADLINE).is_err() {
        warn!(deadline_ms = CLOSE_DEADLINE.as_millis() as u64, "could not leave the group in time (brokers unreachable?); the group evicts this member after its session timeout");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::{keep_smallest, queue_full};

    #[test]
    fn the_admin_snapshot_keeps_the_oldest_open_transactions() {
        // Opening times in a scrambled order, as a hash map hands them out.
        let mut v: Vec<i64> = (0..1500).map(|i| (i * 7919) % 1500).collect();
        keep_smallest(&mut v, 1000, |t| *t);
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<i64>>());
        let mut few = vec![3, 1, 2];
        keep_smallest(&mut few, 1000, |t| *t);
        assert_eq!(few, vec![3, 1, 2]);
    }

    #[test]
    fn a_full_queue_pauses_its_partition_until_half_is_delivered() {
        let max = 10;
        assert!(!queue_full(false, 9, max));
        assert!(queue_full(false, 10, max));
        // Paused: stays so until the queue is down to half, not one below the limit.
        for queued in [10, 9, 6] {
            assert!(queue_full(true, queued, max), "{queued}");
        }
        assert!(!queue_full(true, 5, max));
        // A limit of one still resumes once the queue is empty.
        assert!(queue_full(false, 1, 1));
        assert!(!queue_full(true, 0, 1));
    }
}
