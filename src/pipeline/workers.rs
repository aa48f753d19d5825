//! Per-partition async workers: one delivers committed transactions in marker order (one
//! in flight), one writes dead letters in order. Both report completions to the consumer
//! thread, which hands them to the partition's state machine.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::delivery::{Delivered, Deliverer, ReadyTxn};
use crate::dlq::{DeadLetterWriter, DeadTxn};
use crate::machine::{self, Release};
use crate::telemetry::{KindLabel2, Metrics, Outcome, ReasonLabel};

/// Reports from workers to the consumer thread.
pub(crate) enum Event {
    /// A work item is complete: delivered, or its dead-letter write acknowledged.
    Done {
        topic: Arc<str>,
        partition: i32,
        generation: u64,
        release: Release,
    },
    /// A worker stopped (revoke, shutdown).
    Stopped {
        topic: Arc<str>,
        partition: i32,
        generation: u64,
    },
}

/// Work for the dead-letter lane.
pub(crate) struct DlqWork {
    pub dead: DeadTxn,
    pub release: Release,
    /// The transaction outcome to count once written, if this was a whole transaction.
    pub outcome: Option<Outcome>,
}

/// Identity and plumbing shared by a partition's two workers.
#[derive(Clone)]
pub(crate) struct Lane {
    pub topic: Arc<str>,
    pub partition: i32,
    pub generation: u64,
    pub events: Sender<Event>,
    pub stop: CancellationToken,
    pub cut: CancellationToken,
    pub metrics: Arc<Metrics>,
}

impl Lane {
    fn done(&self, release: Release) {
        let _ = self.events.send(Event::Done {
            topic: self.topic.clone(),
            partition: self.partition,
            generation: self.generation,
            release,
        });
    }

    fn stopped(&self) {
        let _ = self.events.send(Event::Stopped {
            topic: self.topic.clone(),
            partition: self.partition,
            generation: self.generation,
        });
    }
}

/// Runs a partition's worker (delivery or dead-letter lane) so that a panic in it (a bug)
/// is not silent. tokio would catch it and drop the task: the partition's transactions
/// would queue to a closed channel with their offset held, `/readyz` would stay ready,
/// and every revoke and the drain would wait out their grace for a `Stopped` that never
/// comes. Here the panic reports the lane stopped and sets `failed`, which the poll loop
/// reads and stops on ([`super::PipelineError::Panicked`]). A worker shares no state with
/// the machines, and what it had not finished stays held, so the final commit is safe.
pub(crate) async fn supervised(
    work: impl Future<Output = ()>,
    lane: Lane,
    failed: Arc<AtomicBool>,
) {
    use futures_util::FutureExt;
    if std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .is_err()
    {
        error!(topic = %lane.topic, partition = lane.partition, "a partition's worker panicked; stopping (what it had not finished stays held and is replayed)");
        failed.store(true, Ordering::SeqCst);
        lane.stopped();
    }
}

/// Delivers one partition's committed transactions in marker order, one in flight.
pub(crate) struct Worker {
    pub lane: Lane,
    pub rx: UnboundedReceiver<(ReadyTxn, Release)>,
    pub deliverer: Deliverer,
    pub dlq: UnboundedSender<DlqWork>,
}

impl Worker {
    pub async fn run(mut self) {
        loop {
            let (txn, release) = tokio::select! {
                biased;
                _ = self.lane.stop.cancelled() => break,
                w = self.rx.recv() => match w { Some(w) => w, None => break },
            };
            // Nothing without the `failpoints` feature; tests/panics.rs panics here.
            #[cfg(feature = "failpoints")]
            fail::fail_point!("worker::deliver");
            match self
                .deliverer
                .deliver_until(&txn, &self.lane.stop, &self.lane.cut)
                .await
            {
                Delivered::Ok { attempts } => {
                    let m = &self.lane.metrics;
                    m.outcome(Outcome::delivered);
                    m.transaction_tasks.observe(txn.tasks.len() as f64);
                    m.commit_to_delivery
                        .observe(txn.committed_at.elapsed().as_secs_f64());
                    // Counted above; one info line per transaction cost 14 % of the CPU per
                    // delivery in the benchmark (docs/benchmarks-history.md), so it is a debug line.
                    debug!(topic = %txn.topic, partition = txn.partition, offset = txn.commit_offset, txn_id = %txn.id, tasks = txn.tasks.len(), attempts, "delivered");
                    self.lane.done(release);
                }
                Delivered::Failed {
                    reason,
                    error,
                    attempts,
                } => {
                    // The lane reports `Done` once the write is acknowledged; until then
                    // the hold keeps the offset here while later transactions proceed.
                    let dead = machine::failed_delivery(txn, reason, error, attempts);
                    let _ = self.dlq.send(DlqWork {
                        dead,
                        release,
                        outcome: Some(Outcome::dead_lettered),
                    });
                }
                Delivered::Cancelled => break,
            }
        }
        self.lane.stopped();
    }
}

/// Writes one partition's dead letters in order, retrying until acknowledged.
pub(crate) struct DlqLane {
    pub lane: Lane,
    pub rx: UnboundedReceiver<DlqWork>,
    pub dlq: DeadLetterWriter,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl DlqLane {
    pub async fn run(mut self) {
        loop {
            let w = tokio::select! {
                biased;
                _ = self.lane.stop.cancelled() => break,
                w = self.rx.recv() => match w { Some(w) => w, None => break },
            };
            if !self.dead_letter(&w.dead, w.outcome).await {
                break;
            }
            self.lane.done(w.release);
        }
        self.lane.stopped();
    }

    /// Writes `dead` until acknowledged; `false` if cut off first.
    async fn dead_letter(&self, dead: &DeadTxn, outcome: Option<Outcome>) -> bool {
        let mut delay = self.initial_backoff;
        let mut progress = crate::dlq::WriteProgress::default();
        loop {
            let r = tokio::select! {
                r = self.dlq.write(dead, &mut progress) => r,
                _ = self.lane.cut.cancelled() => return false,
            };
            match r {
                Ok(()) => {
                    let m = &self.lane.metrics;
                    m.dead_letters
                        .get_or_create(&ReasonLabel {
                            reason: dead.reason.to_string(),
                        })
                        .inc();
                    if let Some(o) = outcome {
                        m.outcome(o);
                    }
                    warn!(topic = %dead.topic, partition = dead.partition, offset = dead.source_offset(), txn_id = dead.id.as_deref().unwrap_or(""), reason = dead.reason, records = dead.records.len(), "dead-lettered");
                    return true;
                }
                Err(e) => {
                    let kind = e.kind();
                    self.lane
                        .metrics
                        .dead_letter_write_errors
                        .get_or_create(&KindLabel2 { kind })
                        .inc();
                    error!(topic = %dead.topic, partition = dead.partition, offset = dead.source_offset(), kind, error = %e, retry_ms = delay.as_millis() as u64, "dead-letter write failed; offset held, retrying (see offset_held_seconds)");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.lane.cut.cancelled() => return false,
                    }
                    delay = (delay * 2).min(self.max_backoff);
                }
            }
        }
    }
}
