//! The workload: N transactions of several tasks across several partitions, interleaved
//! within each partition, some aborted and some left open for a long time, produced at a
//! steady rate by a plain idempotent producer while the schedule runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use super::rng::Rng;

/// One planned transaction.
#[derive(Debug, Clone)]
pub struct TxnPlan {
    pub id: String,
    pub partition: i32,
    /// Task values in order (JSON text).
    pub values: Vec<String>,
    pub abort: bool,
    /// Stays open while many others commit around it (exercises the skip set).
    pub long: bool,
}

impl TxnPlan {
    /// The task values the app must receive, in order.
    pub fn expected(&self) -> Vec<serde_json::Value> {
        self.values
            .iter()
            .map(|v| serde_json::from_str(v).expect("planned JSON"))
            .collect()
    }
}

/// One record to write, in production order.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Task { txn: usize, k: usize },
    Commit(usize),
    Abort(usize),
}

/// The whole plan: transactions and the interleaved order of their records.
pub struct Plan {
    pub txns: Vec<TxnPlan>,
    pub ops: Vec<Op>,
}

/// Workload shape.
#[derive(Debug, Clone)]
pub struct Shape {
    pub transactions: usize,
    pub partitions: i32,
    /// Open transactions per partition at once (interleaving width).
    pub interleave: usize,
    pub max_tasks: usize,
    pub abort_ratio: f64,
    pub long_ratio: f64,
}

/// Builds the plan from the seed.
pub fn plan(seed: u64, shape: &Shape) -> Plan {
    let mut rng = Rng::fork(seed, "workload");
    let mut txns: Vec<TxnPlan> = Vec::with_capacity(shape.transactions);
    let mut ops = Vec::new();
    // Per partition: open transactions as (index, tasks written).
    let mut open: Vec<Vec<(usize, usize)>> = vec![Vec::new(); shape.partitions as usize];
    loop {
        let all_planned = txns.len() >= shape.transactions;
        if all_planned && open.iter().all(Vec::is_empty) {
            break;
        }
        let p = rng.below(shape.partitions as u64) as usize;
        let can_open = !all_planned && open[p].len() < shape.interleave;
        if can_open && (open[p].is_empty() || rng.chance(0.3)) {
            let i = txns.len();
            let id = format!("f{i:06}");
            let n = rng.range(1, shape.max_tasks as u64) as usize;
            let abort = rng.chance(shape.abort_ratio);
            let long = !abort && rng.chance(shape.long_ratio);
            let values = (0..n)
                .map(|k| {
                    let pad = "x".repeat(rng.range(8, 160) as usize);
                    format!(r#"{{"txn":"{id}","k":{k},"of":{n},"pad":"{pad}"}}"#)
                })
                .collect();
            txns.push(TxnPlan {
                id,
                partition: p as i32,
                values,
                abort,
                long,
            });
            ops.push(Op::Task { txn: i, k: 0 });
            open[p].push((i, 1));
            continue;
        }
        if open[p].is_empty() {
            continue;
        }
        let j = rng.below(open[p].len() as u64) as usize;
        let (i, written) = open[p][j];
        // A long transaction advances rarely, so dozens commit above its first task.
        if txns[i].long && !rng.chance(0.03) && !all_planned {
            continue;
        }
        if written < txns[i].values.len() {
            ops.push(Op::Task { txn: i, k: written });
            open[p][j].1 += 1;
        } else {
            ops.push(if txns[i].abort {
                Op::Abort(i)
            } else {
                Op::Commit(i)
            });
            open[p].remove(j);
        }
    }
    Plan { txns, ops }
}

/// A producer thread writing the plan's records at a steady rate.
pub struct ProducerRun {
    pub done: Arc<AtomicUsize>,
    pub stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl ProducerRun {
    /// Starts writing `plan` to `topic` over about `duration`; `extra` are producer
    /// properties the broker needs (see `BrokerKind::producer_properties`).
    pub fn start(
        brokers: &str,
        extra: &[(&str, &str)],
        topic: &str,
        plan: &Plan,
        duration: Duration,
    ) -> ProducerRun {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5");
        for (k, v) in extra {
            config.set(*k, *v);
        }
        let producer: ThreadedProducer<DefaultProducerContext> = config.create().expect("producer");
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let txns = plan.txns.clone();
        let ops = plan.ops.clone();
        let topic = topic.to_string();
        let (d, s) = (done.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name("fault-producer".into())
            .spawn(move || {
                let start = Instant::now();
                let per_op = duration.as_secs_f64() / ops.len().max(1) as f64;
                for (n, op) in ops.iter().enumerate() {
                    if s.load(Ordering::Relaxed) {
                        return Err("stopped".into());
                    }
                    let due = start + Duration::from_secs_f64(per_op * n as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let (txn, kind, value) = match *op {
                        Op::Task { txn, k } => (txn, "task", Some(txns[txn].values[k].as_str())),
                        Op::Commit(txn) => (txn, "commit", None),
                        Op::Abort(txn) => (txn, "abort", None),
                    };
                    let t = &txns[txn];
                    send(&producer, &topic, t.partition, &t.id, kind, value)?;
                    d.store(n + 1, Ordering::Relaxed);
                }
                producer
                    .flush(Duration::from_secs(60))
                    .map_err(|e| format!("flush: {e}"))?;
                Ok(())
            })
            .expect("spawn producer");
        ProducerRun {
            done,
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until every record is written and acknowledged.
    pub fn join(&mut self) -> Result<(), String> {
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| "producer thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for ProducerRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    partition: i32,
    id: &str,
    kind: &str,
    value: Option<&str>,
) -> Result<(), String> {
    loop {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "txn-id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "txn-type",
                value: Some(kind.as_bytes()),
            });
        let mut rec: BaseRecord<'_, str, str> = BaseRecord::to(topic)
            .partition(partition)
            .key(id)
            .headers(headers);
        if let Some(v) = value {
            rec = rec.payload(v);
        }
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(format!("produce {id}/{kind}: {e}")),
        }
    }
}
