//! Rebalances, like Kafka Connect's open/close: revoke stops the partition's workers
//! (waiting up to `rebalance_grace`), commits its safe offset and drops its machine;
//! assign starts a new machine from the committed offset, its skip set and the log's
//! bounds. Also the librdkafka context that routes callbacks here.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::readers::{Consumer, Owned, Readers};
use super::workers::{supervised, DlqLane, Lane, Worker};
use super::{carry_out, lock, lock_unless_held, Engine, Held, Part, COMMIT_REFRESH};
use crate::kafka;
use crate::machine::{Assignment, PartitionMachine};
use crate::telemetry::{PartitionLabel, RebalanceLabel};

/// How long reading a new partition's committed offset or log bounds may take.
const ASSIGN_QUERY_TIMEOUT: Duration = Duration::from_secs(10);

impl Engine {
    pub(super) fn assign<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) {
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
            s.group_lost = None;
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
        let committed = match consumer.committed_offsets(query, ASSIGN_QUERY_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read committed offsets; starting without a skip set (at-least-once)");
                TopicPartitionList::new()
            }
        };
        let settings = self.settings();
        let now_ms = self.clock();
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
            // Metadata this sidecar wrote, read back: the broker keeps it.
            if metadata.starts_with("txs") && !self.metadata_dropped {
                self.metadata_kept = true;
            }
            // The log's bounds tell an offset gap (retention, truncation) from control
            // records, which also leave the first record above the committed offset.
            let (log_start, log_end) = match offset {
                Some(_) => {
                    match consumer.fetch_watermarks(el.topic(), partition, ASSIGN_QUERY_TIMEOUT) {
                        Ok((lo, hi)) => (Some(lo), Some(hi)),
                        Err(e) => {
                            warn!(topic = %topic, partition, error = %e, "cannot read the log's bounds; offset gaps at the committed offset go undetected");
                            (None, None)
                        }
                    }
                }
                None => (None, None),
            };
            let assignment = Assignment {
                committed: offset,
                metadata,
                log_start,
                log_end,
            };
            let mut machine = PartitionMachine::assigned(
                topic.clone(),
                partition,
                settings,
                &assignment,
                now_ms,
                &mut self.actions,
            );
            if self.metadata_dropped {
                machine.metadata_unreliable();
            } else if self.metadata_kept {
                machine.metadata_kept();
            }
            self.generation += 1;
            let generation = self.generation;
            let (tx, rx) = unbounded_channel();
            let (dlq_tx, dlq_rx) = unbounded_channel();
            let stop = CancellationToken::new();
            let cut = CancellationToken::new();
            let lane = Lane {
                topic: topic.clone(),
                partition,
                generation,
                events: self.events_tx.clone(),
                stop: stop.clone(),
                cut: cut.clone(),
                metrics: self.metrics.clone(),
            };
            let dlq_lane = DlqLane {
                lane: lane.clone(),
                rx: dlq_rx,
                dlq: self.dlq.clone(),
                initial_backoff: self.cfg.retry.initial_backoff,
                max_backoff: self.cfg.retry.max_backoff,
            };
            let worker = Worker {
                lane: lane.clone(),
                rx,
                deliverer: self.deliverer.clone(),
                dlq: dlq_tx.clone(),
            };
            let failed = &self.workers_failed;
            self.tracker.spawn_on(
                supervised(worker.run(), lane.clone(), failed.clone()),
                &self.rt,
            );
            self.tracker
                .spawn_on(supervised(dlq_lane.run(), lane, failed.clone()), &self.rt);
            info!(topic = %topic, partition, committed = offset.unwrap_or(-1), log_start = log_start.unwrap_or(-1), log_end = log_end.unwrap_or(-1), "partition assigned");
            let mut part = Part {
                machine,
                generation,
                tx,
                dlq_tx,
                stop,
                cut,
                running: 2,
                paused: false,
                resumed_at: None,
                at_end: false,
                last_end_query: None,
                consumer_lag: 0,
                sent: Default::default(),
                overflow: (0, 0),
                held: None,
            };
            carry_out(&mut part, &mut self.actions, &self.metrics);
            self.parts.entry(topic).or_default().insert(partition, part);
        }
        if self.metadata_kept && !self.metadata_dropped {
            for p in self.all_parts_mut() {
                p.machine.metadata_kept();
            }
        }
        // librdkafka keeps an application's pause across unassign: a partition paused by
        // back-pressure before it was revoked would come back paused while its new state
        // believes otherwise, and never be fetched again. Every assigned partition starts
        // fetching.
        if let Err(e) = consumer.resume(tpl) {
            debug!(error = %e, "resume of newly assigned partitions");
        }
        let n: usize = self.parts.values().map(HashMap::len).sum();
        self.metrics.assigned_partitions.set(n as i64);
        self.publish();
    }

    /// Every assigned partition with its generation.
    fn generations(&self) -> Vec<(Arc<str>, i32, u64)> {
        self.all_parts()
            .map(|p| {
                (
                    p.machine.topic().clone(),
                    p.machine.partition(),
                    p.generation,
                )
            })
            .collect()
    }

    pub(super) fn revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) {
        self.metrics
            .rebalances
            .get_or_create(&RebalanceLabel { kind: "revoke" })
            .inc();
        if consumer.assignment_lost() {
            // `/readyz` says so until the next assign.
            if let Ok(mut s) = self.snapshot.lock() {
                s.group_lost = Some(crate::admin::GroupLost {
                    since: Instant::now(),
                    reason: "assignment lost: session timed out, max.poll.interval.ms exceeded or fenced".into(),
                });
            }
        }
        let tps: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .filter_map(|el| {
                let p = self.parts.get(el.topic())?.get(&el.partition())?;
                Some((p.machine.topic().clone(), p.machine.partition()))
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
        // Whatever pause this member set must not outlive its ownership (see `assign`).
        let mut resume = TopicPartitionList::new();
        for (t, n) in &tps {
            if self
                .parts
                .get(t)
                .and_then(|m| m.get(n))
                .is_some_and(|p| p.paused)
            {
                resume.add_partition(t, *n);
            }
        }
        if resume.count() > 0 {
            let _ = consumer.resume(&resume);
        }
        for (t, n) in &tps {
            if let Some(m) = self.parts.get_mut(t) {
                if m.remove(n).is_some() {
                    info!(topic = %t, partition = *n, "partition revoked, staged state dropped");
                }
                if m.is_empty() {
                    self.parts.remove(t);
                }
            }
            let label = PartitionLabel {
                topic: t.to_string(),
                partition: *n,
            };
            self.metrics.commit_lag.remove(&label);
            self.metrics.offset_held.remove(&label);
            self.metrics.consumer_lag.remove(&label);
        }
        let n: usize = self.parts.values().map(HashMap::len).sum();
        self.metrics.assigned_partitions.set(n as i64);
        self.publish();
    }

    /// Waits until every partition in `tps` has stopped its workers, or `deadline`.
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
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
    }

    /// Stops the workers of `tps`: no new deliveries at once, in-flight ones get `grace`.
    pub(super) fn stop_workers(&mut self, tps: &[(Arc<str>, i32)], grace: Duration) {
        self.stop_workers_within(tps, grace, Duration::from_secs(5));
    }

    /// [`Engine::stop_workers`], then at most `after_cut` for cut-off workers to report.
    pub(super) fn stop_workers_within(
        &mut self,
        tps: &[(Arc<str>, i32)],
        grace: Duration,
        after_cut: Duration,
    ) {
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
            self.wait_stopped(tps, Instant::now() + after_cut);
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
}

/// A partition queue split off at the start of an assign: topic, partition, queue.
type Split = (Arc<str>, i32, PartitionQueue<SidecarContext>);

/// The consumer context: routes librdkafka callbacks to the engine, and hands each
/// assigned partition's queue to a reader thread.
pub struct SidecarContext {
    engine: Arc<Mutex<Engine>>,
    /// The consumer this context belongs to, to split partition queues off it.
    consumer: OnceLock<Weak<Consumer>>,
    /// The reader threads, while they run.
    readers: Mutex<Option<Readers>>,
    /// Set by a reader thread that panicked.
    readers_failed: Arc<std::sync::atomic::AtomicBool>,
    /// Queues split at the start of an assign, handed out at its end.
    pending: Mutex<Vec<Split>>,
}

impl SidecarContext {
    /// A context over `engine`.
    pub fn new(engine: Arc<Mutex<Engine>>) -> SidecarContext {
        SidecarContext {
            engine,
            consumer: OnceLock::new(),
            readers: Mutex::new(None),
            readers_failed: Default::default(),
            pending: Mutex::new(Vec::new()),
        }
    }

    fn engine(&self) -> Held<'_> {
        lock(&self.engine)
    }

    /// librdkafka may serve statistics or commit results while this thread already holds
    /// the engine (inside a rebalance callback); those are skipped rather than deadlock.
    fn try_engine(&self) -> Option<Held<'_>> {
        lock_unless_held(&self.engine)
    }

    /// Starts reading partition queues on `readers` threads; until then (and after
    /// [`SidecarContext::stop_readers`]) records arrive through the consumer's own poll.
    pub(crate) fn start_readers(
        &self,
        consumer: &Arc<Consumer>,
        count: usize,
        cfg: &Arc<crate::config::Config>,
    ) -> std::io::Result<()> {
        let _ = self.consumer.set(Arc::downgrade(consumer));
        let readers = Readers::start(count, cfg, &self.engine, consumer, &self.readers_failed)?;
        *self.readers.lock().unwrap_or_else(|p| p.into_inner()) = Some(readers);
        Ok(())
    }

    /// Whether a reader thread died (panicked): its partitions are no longer read. One
    /// atomic load, as the poll loop asks every turn.
    pub(crate) fn readers_failed(&self) -> bool {
        self.readers_failed
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the reader threads and lets go of every partition queue (which hold the
    /// consumer): the consumer can then be closed.
    pub(crate) fn stop_readers(&self) {
        let readers = self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(r) = readers {
            r.stop();
        }
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Splits each partition of `tpl` off the main queue, before it starts fetching.
    fn split_queues(&self, tpl: &TopicPartitionList) {
        if self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for el in tpl.elements() {
            // `None` only for a topic name librdkafka cannot take; its records then
            // arrive through the consumer's own poll.
            if let Some(q) = consumer.split_partition_queue(el.topic(), el.partition()) {
                pending.push((Arc::from(el.topic()), el.partition(), q));
            }
        }
    }

    /// Hands the queues split for this assign to the readers, each with its partition's
    /// new generation (`generations`); a queue of a partition not taken up is dropped.
    fn hand_out_queues(&self, generations: &[(Arc<str>, i32, u64)]) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(readers) = readers.as_mut() else {
            return;
        };
        for (topic, partition, queue) in pending {
            if let Some((_, _, generation)) = generations
                .iter()
                .find(|(t, n, _)| *t == topic && *n == partition)
            {
                readers.add(Owned {
                    topic,
                    partition,
                    generation: *generation,
                    queue,
                });
            }
        }
    }

    /// Takes the queues of `tpl` back from the readers (see [`Readers::remove`]).
    fn take_back_queues(&self, tpl: &TopicPartitionList) {
        let tps: Vec<(Arc<str>, i32)> = tpl
            .elements()
            .iter()
            .map(|el| (Arc::from(el.topic()), el.partition()))
            .collect();
        if let Some(r) = self
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            r.remove(&tps);
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
        // The end of a partition is the expiry clock's signal, delivered through poll
        // (`enable.partition.eof`), not a fault.
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
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
                // First, so nothing is staged after the revoke's commit (and without
                // the engine lock, which a reader may need to finish its batch).
                self.take_back_queues(tpl);
                self.engine().revoke(consumer, tpl);
            }
            Rebalance::Assign(tpl) => self.split_queues(tpl),
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
            let generations = {
                let mut engine = self.engine();
                engine.assign(consumer, tpl);
                engine.generations()
            };
            self.hand_out_queues(&generations);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Some(mut e) = self.try_engine() {
            e.on_commit_result(result, offsets);
        }
    }
}
