//! The driver: feeds each partition's [`crate::machine::PartitionMachine`] and carries
//! out what it decides.
//!
//! One OS thread owns the librdkafka consumer and reads the records, or, with
//! `reader_threads` set, reader threads drain the partitions' queues; every partition's
//! state machine lives in the [`Engine`], behind one lock. None of them ever blocks on
//! the app. The transaction rules live in the machine; this
//! module and its children only move records, events and actions between it and the
//! outside:
//!
//! | module | role |
//! |---|---|
//! | `poll` | the poll loop on the consumer thread, and shutdown draining |
//! | `readers` | reader threads: partition queues to machines, in offset order |
//! | `rebalance` | librdkafka's callbacks: assign (start clean from the committed offset), revoke (stop, commit, drop) |
//! | `commits` | offset commits of each machine's commit point |
//! | `back_pressure` | pausing partitions whose queue or the staged-bytes budget is full |
//! | `workers` | per-partition delivery worker and dead-letter lane (async) |
//! | `report` | the one place where machine events are logged and counted |
//! | `view` | the admin snapshot and operator commands |

mod back_pressure;
mod commits;
mod poll;
mod readers;
mod rebalance;
mod report;
mod view;
mod workers;

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::admin::{AdminCommand, Snapshot};
use crate::config::Config;
use crate::delivery::{Deliverer, ReadyTxn};
use crate::dlq::DeadLetterWriter;
use crate::machine::{Action, Decoded, Fate, PartitionMachine, Release, Settings};
use crate::protocol::{self, RecordRef};
use crate::telemetry::{Metrics, Outcome};

pub use poll::{consume, warn_if_compacted};
pub use rebalance::SidecarContext;
use workers::{DlqWork, Event};

thread_local! {
    /// How many engine locks this thread holds (see [`lock`]).
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// The engine, locked by this thread.
pub(crate) struct Held<'a>(MutexGuard<'a, Engine>);

impl std::ops::Deref for Held<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.0
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.0
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

/// Locks the engine (a panic elsewhere does not poison it for the rest).
pub(crate) fn lock(engine: &Mutex<Engine>) -> Held<'_> {
    let g = engine.lock().unwrap_or_else(|poisoned| {
        // A thread panicked while it held the engine: a machine may be half-way through a
        // record (consumed, not yet staged), and a commit point taken from it could pass
        // a task that was never staged. Nothing is committed from here on; the process
        // stops and the next owner replays from the last commit.
        let mut g = poisoned.into_inner();
        if !g.tainted {
            g.tainted = true;
            error!("a thread panicked while it held the partitions' state; no offset is committed from here on, the next owner replays from the last commit");
        }
        g
    });
    HELD.with(|h| h.set(h.get() + 1));
    Held(g)
}

/// Locks the engine unless this thread already holds it: librdkafka serves some
/// callbacks (a synchronous commit's result) inside calls made under the lock, and
/// those skip rather than deadlock.
pub(crate) fn lock_unless_held(engine: &Mutex<Engine>) -> Option<Held<'_>> {
    if HELD.with(Cell::get) > 0 {
        None
    } else {
        Some(lock(engine))
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
    /// A thread or task of the sidecar panicked (a bug): it stopped, committing nothing
    /// from state the panic may have left half-updated; the next start replays from the
    /// last commit.
    #[error("the {0} panicked")]
    Panicked(&'static str),
}

/// How often unchanged commit points are sent again.
///
/// rust-rdkafka's `BaseConsumer` registers no offset-commit callback, so librdkafka
/// reports nothing back for an asynchronous commit. A commit the coordinator refused
/// (it refuses them while a rebalance is in progress) would otherwise leave the committed
/// offset behind until the partition moves again, and a crash at rest would replay all of
/// it. Re-sending is idempotent and costs one small request per interval.
pub const COMMIT_REFRESH: Duration = Duration::from_secs(5);

/// How long after a resume a partition counts as not caught up: librdkafka's end-of-log
/// signal is from before the pause, and records written meanwhile are one fetch away.
const RESUME_SETTLE: Duration = Duration::from_secs(1);

/// State of one assigned partition: its machine and the plumbing to its workers.
pub(crate) struct Part {
    machine: PartitionMachine,
    generation: u64,
    tx: UnboundedSender<(ReadyTxn, Release)>,
    dlq_tx: UnboundedSender<DlqWork>,
    stop: CancellationToken,
    cut: CancellationToken,
    /// Tasks (delivery worker, dead-letter lane) that have not reported `Stopped`.
    running: u8,
    paused: bool,
    resumed_at: Option<Instant>,
    /// librdkafka reported the end of the log and no record was consumed since.
    at_end: bool,
    /// When the log end was last asked for directly (see [`Engine::caught_up`]).
    last_end_query: Option<Instant>,
    consumer_lag: i64,
    /// Offsets recently committed with metadata, until one is read back (see
    /// [`Engine::check_metadata_kept`]).
    sent: std::collections::VecDeque<i64>,
    /// Skip-set entries and tombstones the last commit left out (counted by increase).
    overflow: (u64, u64),
    /// The safe offset while it lies below the consumed position, and since when.
    held: Option<(i64, Instant)>,
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
    /// The machines' clock: milliseconds since `epoch`, refreshed every loop turn.
    epoch: Instant,
    now_ms: u64,
    actions: Vec<Action>,
    last_commit: Instant,
    /// When unchanged commit points were last re-sent (see [`COMMIT_REFRESH`]).
    last_refresh: Instant,
    last_expiry: Instant,
    last_back_pressure: Instant,
    last_snapshot: Instant,
    snapshot: Arc<Mutex<Snapshot>>,
    commands: Receiver<AdminCommand>,
    shutting_down: bool,
    /// The broker was seen dropping offset-commit metadata (logged once).
    metadata_dropped: bool,
    /// A commit was read back with its metadata: the broker keeps it.
    metadata_kept: bool,
    /// A thread panicked while holding the engine (see [`lock`]): commits are off.
    tainted: bool,
    /// Set by a partition's worker that panicked (see `workers::supervised`).
    workers_failed: Arc<std::sync::atomic::AtomicBool>,
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
        let now = Instant::now();
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
            epoch: now,
            now_ms: 0,
            actions: Vec::new(),
            last_commit: now,
            last_refresh: now,
            last_expiry: now,
            last_back_pressure: now,
            last_snapshot: now.checked_sub(Duration::from_secs(10)).unwrap_or(now),
            snapshot,
            commands,
            shutting_down: false,
            metadata_dropped: false,
            metadata_kept: false,
            tainted: false,
            workers_failed: Default::default(),
        }
    }

    fn settings(&self) -> Settings {
        let l = &self.cfg.limits;
        Settings {
            max_tasks_per_txn: l.max_tasks_per_txn,
            max_txn_bytes: l.max_txn_bytes,
            txn_timeout_ms: u64::try_from(self.cfg.txn_timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn clock(&mut self) -> u64 {
        self.now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms
    }

    fn part_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Part> {
        self.parts.get_mut(topic)?.get_mut(&partition)
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
            actions,
            now_ms,
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
        p.at_end = false;
        let decoded = protocol::decode(rec, cfg.protocol, &cfg.headers);
        p.machine.on_record(rec, decoded, *now_ms, actions);
        carry_out(p, actions, metrics);
    }

    /// Handles a batch a reader thread read from one partition's queue, in offset order,
    /// then the end of the log if the queue reported it. A batch from an earlier
    /// assignment of the partition is dropped.
    fn on_batch(
        &mut self,
        from: &readers::Owned,
        records: Vec<(RecordRef<'_>, Decoded<'_>)>,
        end_of_log: bool,
        consumer: &readers::Consumer,
    ) {
        let now_ms = self.clock();
        let Engine {
            metrics,
            parts,
            actions,
            ..
        } = self;
        let Some(p) = parts
            .get_mut(&from.topic)
            .and_then(|m| m.get_mut(&from.partition))
            .filter(|p| p.generation == from.generation)
        else {
            return;
        };
        if !records.is_empty() {
            p.at_end = false;
        }
        for (rec, decoded) in records {
            // A record read again after a pause (back-pressure runs on every thread) is
            // ignored by the machine itself (`PartitionMachine::on_record`).
            p.machine.on_record(rec, decoded, now_ms, actions);
            carry_out(p, actions, metrics);
        }
        if end_of_log {
            p.at_end = true;
        }
        // Back-pressure reacts to what readers stage at once, not at the consumer
        // thread's next turn.
        let now = Instant::now();
        if now.duration_since(self.last_back_pressure) >= Duration::from_millis(5) {
            self.last_back_pressure = now;
            self.back_pressure(consumer);
        }
    }

    /// Applies worker reports.
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Done {
                topic,
                partition,
                generation,
                release,
            } => {
                if let Some(p) = self.part_mut(&topic, partition) {
                    if p.generation == generation {
                        p.machine.done(release);
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

    /// Marks the end of the log reached for partition number `partition`
    /// (librdkafka's partition EOF, which names no topic): only when one assigned topic
    /// has that partition; otherwise [`Engine::caught_up`] asks the broker.
    fn on_end_of_log(&mut self, partition: i32) {
        let mut found = self
            .parts
            .values_mut()
            .filter_map(|m| m.get_mut(&partition));
        if let (Some(p), None) = (found.next(), found.next()) {
            p.at_end = true;
        }
    }
}

/// Carries out a machine's actions for partition `p`.
fn carry_out(p: &mut Part, actions: &mut Vec<Action>, metrics: &Metrics) {
    for a in actions.drain(..) {
        match a {
            Action::Deliver(c, release) => {
                let txn = c.into_ready(
                    p.machine.topic().clone(),
                    p.machine.partition(),
                    Instant::now(),
                );
                // A closed channel means the worker is gone (revoke in progress); the
                // hold stays, so the offset is not committed past it and the next owner
                // redoes it.
                let _ = p.tx.send((txn, release));
            }
            Action::DeadLetter(dead, release, fate) => {
                let outcome = fate.map(|f| match f {
                    Fate::Expired => Outcome::expired,
                    Fate::DeadLettered => Outcome::dead_lettered,
                });
                let _ = p.dlq_tx.send(DlqWork {
                    dead,
                    release,
                    outcome,
                });
            }
            Action::Report(r) => report::report(metrics, &p.machine, r),
        }
    }
}
