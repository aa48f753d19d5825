//! Back-pressure: pauses partitions whose delivery queue is full or, above the
//! staged-bytes budget, every partition but the one holding the oldest open transaction.
//! The poll loop keeps polling, so a slow app never turns into a `max.poll.interval.ms`
//! rebalance.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::TopicPartitionList;
use tracing::{debug, info, warn};

use super::Engine;
use crate::kafka;

impl Engine {
    /// How long the poll loop may block: short while a partition is paused, so it
    /// resumes as soon as its queue has drained rather than up to a poll later.
    pub(super) fn poll_timeout(&self) -> Duration {
        if self.all_parts().any(|p| p.paused) {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(50)
        }
    }

    /// Pauses and resumes partitions (the budget can never deadlock: the partition with
    /// the oldest open transaction keeps reading towards its marker or a limit).
    pub(super) fn back_pressure<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        // The budget covers every record held in memory: staged in open transactions,
        // queued for delivery, being delivered, or waiting for a dead-letter write.
        let staged: u64 = self.all_parts().map(|p| p.machine.staged_bytes()).sum();
        let held: u64 = staged
            + self
                .all_parts()
                .map(|p| p.machine.queued_bytes())
                .sum::<u64>();
        let budget = self.cfg.limits.max_staged_bytes;
        if held > budget {
            if !self.over_budget {
                warn!(
                    staged,
                    held,
                    budget,
                    "bytes held (staged, queued, awaiting dead-letter writes) over budget, pausing partitions"
                );
            }
            self.over_budget = true;
        } else if self.over_budget && held <= budget / 10 * 9 {
            self.over_budget = false;
            info!(
                staged,
                held, budget, "bytes held back under budget, resuming partitions"
            );
        }
        let head = if self.over_budget {
            self.all_parts()
                .flat_map(|p| {
                    p.machine.open().into_iter().map(move |(_, t)| {
                        (
                            t.opened_ms,
                            p.machine.topic().clone(),
                            p.machine.partition(),
                        )
                    })
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
            let (topic, partition) = (p.machine.topic().clone(), p.machine.partition());
            let is_head = head
                .as_ref()
                .is_some_and(|(t, n)| *t == topic && *n == partition);
            let want = shutting_down
                || queue_full(p.paused, p.machine.queued(), max_queued)
                || (over && !is_head);
            if want != p.paused {
                let list = if want { &mut pause } else { &mut resume };
                list.add_partition(&topic, partition);
                changed.push((topic, partition, want));
            }
        }
        let ok_pause = pause.count() == 0 || consumer.pause(&pause).is_ok();
        let ok_resume = resume.count() == 0 || consumer.resume(&resume).is_ok();
        if ok_resume && resume.count() > 0 {
            kafka::wake_fetchers(consumer, &resume);
        }
        let now = Instant::now();
        for (t, n, want) in changed {
            if (want && ok_pause) || (!want && ok_resume) {
                if let Some(p) = self.part_mut(&t, n) {
                    p.paused = want;
                    if !want {
                        p.resumed_at = Some(now);
                    }
                    debug!(topic = %t, partition = n, paused = want, queued = p.machine.queued(), "back-pressure");
                }
                if want {
                    self.metrics.partition_pauses.inc();
                }
            }
        }
        let paused = self.all_parts().filter(|p| p.paused).count();
        self.metrics.paused_partitions.set(paused as i64);
        self.metrics.staged_bytes.set(staged as i64);
        let open: usize = self.all_parts().map(|p| p.machine.open_count()).sum();
        self.metrics.open_transactions.set(open as i64);
    }
}

/// Whether a partition's delivery queue holds it paused: from `max` queued transactions
/// until half of them are delivered.
///
/// librdkafka drops what it had prefetched for a paused partition and fetches it again
/// on resume, behind the fetch in flight. Resuming one delivery below the limit paused
/// and refetched after almost every delivery of a backlog (docs/benchmarks-history.md, change 7).
pub(super) fn queue_full(paused: bool, queued: usize, max: usize) -> bool {
    if paused {
        queued > max / 2
    } else {
        queued >= max
    }
}

#[cfg(test)]
mod tests {
    use super::queue_full;

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
