//! The admin view of the pipeline: the snapshot `/v1/partitions` and `/v1/transactions`
//! serve, and operator commands from the admin server.

use tracing::warn;

use super::{carry_out, Engine, Part};
use crate::admin::{AdminCommand, PartitionView, TxnView};
use crate::machine::OperatorRefusal;
use crate::staging::OpenTxn;
use crate::telemetry::PartitionLabel;

/// Open transactions the admin snapshot lists: the oldest, since a stuck transaction is
/// what an operator looks for.
const MAX_TXN_VIEWS: usize = 1000;

impl Engine {
    /// Carries out operator requests from the admin server.
    pub(super) fn run_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                AdminCommand::DeadLetter {
                    topic,
                    partition,
                    id,
                    reply,
                } => {
                    let Engine {
                        parts,
                        actions,
                        metrics,
                        ..
                    } = self;
                    let result = match parts
                        .get_mut(topic.as_str())
                        .and_then(|m| m.get_mut(&partition))
                    {
                        None => Err(format!(
                            "{topic}/{partition} is not assigned to this member"
                        )),
                        Some(p) => match p.machine.operator_dead_letter(&id, actions) {
                            Err(OperatorRefusal::NotOpen) => {
                                Err(format!("no open transaction {id:?} in {topic}/{partition}"))
                            }
                            Err(e) => Err(format!("{topic}/{partition}: {e}")),
                            Ok(tasks) => {
                                warn!(topic = %topic, partition, txn_id = %id, tasks, "dead-lettering an open transaction on operator request");
                                carry_out(p, actions, metrics);
                                Ok(tasks)
                            }
                        },
                    };
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Publishes the admin snapshot and the per-partition gauges.
    pub(super) fn publish(&mut self) {
        let now = self.now_ms;
        let mut partitions = Vec::new();
        // Every open transaction as a borrowed candidate; views are built only for the
        // oldest `MAX_TXN_VIEWS`, which are the ones an operator looks for.
        let instant = std::time::Instant::now();
        let metrics = self.metrics.clone();
        for p in self.all_parts_mut() {
            let (safe, next) = (
                p.machine.offsets().safe_offset(),
                p.machine.offsets().next_offset(),
            );
            p.held = match (safe, next) {
                (Some(s), Some(n)) if s < n => match p.held {
                    Some((o, since)) if o == s => Some((o, since)),
                    _ => Some((s, instant)),
                },
                _ => None,
            };
            let held = p
                .held
                .map_or(0.0, |(_, since)| since.elapsed().as_secs_f64());
            metrics
                .offset_held
                .get_or_create(&PartitionLabel {
                    topic: p.machine.topic().to_string(),
                    partition: p.machine.partition(),
                })
                .set(held);
        }
        let mut open: Vec<(&Part, &str, &OpenTxn)> = Vec::new();
        for p in self.all_parts() {
            let m = &p.machine;
            let label = PartitionLabel {
                topic: m.topic().to_string(),
                partition: m.partition(),
            };
            self.metrics
                .commit_lag
                .get_or_create(&label)
                .set(m.offsets().replay_cost());
            partitions.push(PartitionView {
                topic: m.topic().to_string(),
                partition: m.partition(),
                committed_offset: m.offsets().committed().filter(|o| *o >= 0),
                consumed_offset: m.offsets().next_offset(),
                safe_offset: m.offsets().safe_offset(),
                open_transactions: m.open_count(),
                staged_bytes: m.staged_bytes(),
                queued: m.queued(),
                paused: p.paused,
                consumer_lag: p.consumer_lag,
            });
            open.extend(m.open().into_iter().map(|(id, t)| (p, id, t)));
        }
        keep_smallest(&mut open, MAX_TXN_VIEWS, |(_, _, t)| t.opened_ms);
        let mut txns: Vec<TxnView> = open
            .into_iter()
            .map(|(p, id, t)| TxnView {
                id: id.to_string(),
                topic: p.machine.topic().to_string(),
                partition: p.machine.partition(),
                first_offset: t.first_offset,
                tasks: t.tasks.len(),
                bytes: t.bytes,
                age_seconds: (now.saturating_sub(t.opened_ms) as f64) / 1000.0,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        txns.sort_by(|a, b| {
            (&a.topic, a.partition, a.first_offset).cmp(&(&b.topic, b.partition, b.first_offset))
        });
        let tombstones: usize = self.all_parts().map(|p| p.machine.tombstone_count()).sum();
        self.metrics.tombstones.set(tombstones as i64);
        if let Ok(mut s) = self.snapshot.lock() {
            s.partitions = partitions;
            s.transactions = txns;
        }
    }
}

/// Keeps the `n` entries of `v` with the smallest `key`, in no particular order, in
/// linear time (a sort of every open transaction ten times a second would not be).
fn keep_smallest<T, K: Ord>(v: &mut Vec<T>, n: usize, key: impl FnMut(&T) -> K) {
    if v.len() > n {
        v.select_nth_unstable_by_key(n, key);
        v.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::keep_smallest;

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
}
