//! Reader threads: each drains the librdkafka queues of the partitions it owns and feeds
//! their records to the partitions' machines, so that the per-record work (librdkafka's
//! header parse, encoding, decoding) runs on as many cores as there are readers.
//!
//! At assign, every partition's messages are split off the consumer's main queue into a
//! queue of their own (librdkafka's `rd_kafka_queue_get_partition`, forwarded nowhere),
//! before the partition starts fetching; one reader owns that queue, so a partition's
//! records reach its machine in offset order. The consumer thread keeps polling the main
//! queue for rebalances, errors and statistics, and runs the periodic work.
//!
//! A reader applies what it read under the engine lock, one batch per partition at a
//! time. At revoke the consumer thread takes the partition's queue back from its reader
//! and waits until the reader has let go of it (see [`Readers::remove`]): no record
//! read under the old assignment reaches a later owner's machine, and no record fetched
//! for a later assignment is read through the old queue.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use tracing::{error, warn};

use super::{lock, Engine, SidecarContext};
use crate::config::Config;
use crate::kafka;
use crate::machine::Decoded;
use crate::protocol::{self, RecordRef};

/// The consumer every reader shares.
pub(crate) type Consumer = BaseConsumer<SidecarContext>;

/// Most records read from one partition before they are applied: bounds how long a
/// reader holds the engine lock and how far one partition runs ahead of the others.
const BATCH: usize = 64;

/// A batch also ends once it holds this many bytes, and a reader's batch buffer is
/// shrunk back to it after a larger one: what a reader holds outside the staged-bytes
/// budget stays under this plus one record.
const BATCH_BYTES: usize = 1 << 20;

/// How long an idle reader sleeps when no queue signalled new messages.
const IDLE: Duration = Duration::from_millis(100);

/// How long a revoke waits for a reader to let go of a queue.
const REMOVE_WAIT: Duration = Duration::from_secs(10);

enum Cmd {
    Add(Owned),
    /// Drop these queues, then acknowledge.
    Remove(Vec<(Arc<str>, i32)>, Sender<()>),
}

/// A partition queue and the assignment it was split for.
pub(crate) struct Owned {
    pub topic: Arc<str>,
    pub partition: i32,
    pub generation: u64,
    pub queue: PartitionQueue<SidecarContext>,
}

struct Reader {
    cmds: Sender<Cmd>,
    thread: JoinHandle<()>,
    load: usize,
}

/// The reader threads and which of them owns each assigned partition.
pub(crate) struct Readers {
    readers: Vec<Reader>,
    owner: HashMap<(Arc<str>, i32), usize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Readers {
    /// Starts `count` (at least one) reader threads; one that panics sets `failed`.
    ///
    /// # Errors
    /// The operating system refused a thread.
    pub fn start(
        count: usize,
        cfg: &Arc<Config>,
        engine: &Arc<Mutex<Engine>>,
        consumer: &Arc<Consumer>,
        failed: &Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Readers> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut readers = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = channel();
            let (cfg, engine, consumer, stop) =
                (cfg.clone(), engine.clone(), consumer.clone(), stop.clone());
            let failed = failed.clone();
            let thread = std::thread::Builder::new()
                .name(format!("txn-sidecar-read-{i}"))
                .spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(&cfg, &engine, &consumer, &rx, &stop)
                    }));
                    if r.is_err() {
                        // Its partitions would never be read again: the pipeline stops
                        // with an error (the process exits non-zero and is restarted;
                        // the next owner replays from the committed offsets).
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                })?;
            readers.push(Reader {
                cmds: tx,
                thread,
                load: 0,
            });
        }
        Ok(Readers {
            readers,
            owner: HashMap::new(),
            stop,
        })
    }

    /// Hands a newly assigned partition's queue to the reader with the fewest partitions.
    pub fn add(&mut self, mut owned: Owned) {
        let key = (owned.topic.clone(), owned.partition);
        let i = match self.owner.get(&key) {
            // Still owned (assigned twice without a revoke between): the same reader
            // replaces its queue, so no two threads ever read one partition.
            Some(&i) => i,
            None => (0..self.readers.len())
                .min_by_key(|&i| self.readers[i].load)
                .unwrap_or(0),
        };
        let Some(r) = self.readers.get_mut(i) else {
            return;
        };
        let thread = r.thread.thread().clone();
        owned.queue.set_nonempty_callback(move || thread.unpark());
        if r.cmds.send(Cmd::Add(owned)).is_ok() {
            if self.owner.insert(key, i).is_none() {
                r.load += 1;
            }
            r.thread.thread().unpark();
        }
    }

    /// Takes the queues of `tps` back and waits (at most [`REMOVE_WAIT`]) until their
    /// readers have dropped them and applied nothing more from them. Must not be called
    /// with the engine lock held: a reader may be waiting for it to finish a batch.
    pub fn remove(&mut self, tps: &[(Arc<str>, i32)]) {
        let mut per_reader: HashMap<usize, Vec<(Arc<str>, i32)>> = HashMap::new();
        for tp in tps {
            if let Some(i) = self.owner.remove(tp) {
                if let Some(r) = self.readers.get_mut(i) {
                    r.load = r.load.saturating_sub(1);
                }
                per_reader.entry(i).or_default().push(tp.clone());
            }
        }
        let deadline = Instant::now() + REMOVE_WAIT;
        let mut acks = Vec::new();
        for (i, tps) in per_reader {
            let (ack_tx, ack_rx) = channel();
            if let Some(r) = self.readers.get(i) {
                if r.cmds.send(Cmd::Remove(tps, ack_tx)).is_ok() {
                    r.thread.thread().unpark();
                    acks.push(ack_rx);
                }
            }
        }
        for ack in acks {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) = ack.recv_timeout(left) {
                error!(
                    wait_ms = REMOVE_WAIT.as_millis() as u64,
                    "a reader thread did not let go of a revoked partition's queue in time"
                );
            }
        }
    }

    /// Stops every reader and waits for it: afterwards no thread reads a partition queue
    /// or holds the consumer.
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in self.readers {
            drop(r.cmds);
            r.thread.thread().unpark();
            let _ = r.thread.join();
        }
    }
}

/// A record read into the batch buffer: offset, timestamp, where its bytes lie.
type Read = (i64, Option<i64>, std::ops::Range<usize>);

fn run(
    cfg: &Config,
    engine: &Mutex<Engine>,
    consumer: &Consumer,
    cmds: &Receiver<Cmd>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut owned: Vec<Owned> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut batch: Vec<Read> = Vec::with_capacity(BATCH);
    let mut last_error: Option<Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Add(o)) => {
                    owned.retain(|x| !(x.topic == o.topic && x.partition == o.partition));
                    owned.push(o);
                }
                Ok(Cmd::Remove(tps, ack)) => {
                    owned.retain(|x| !tps.iter().any(|(t, n)| *t == x.topic && *n == x.partition));
                    let _ = ack.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let mut busy = false;
        for o in &owned {
            buf.clear();
            batch.clear();
            let mut end_of_log = false;
            while batch.len() < BATCH && buf.len() < BATCH_BYTES {
                match o.queue.poll(Duration::ZERO) {
                    Some(Ok(msg)) => batch.push(kafka::append_record(&msg, &mut buf)),
                    Some(Err(KafkaError::PartitionEOF(_))) => {
                        end_of_log = true;
                        break;
                    }
                    Some(Err(e)) => {
                        // Broker outages surface here too; librdkafka retries by itself.
                        if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            warn!(topic = %o.topic, partition = o.partition, error = %e, "consumer error (librdkafka retries)");
                            last_error = Some(Instant::now());
                        }
                        break;
                    }
                    None => break,
                }
            }
            if batch.is_empty() && !end_of_log {
                continue;
            }
            busy = true;
            // Decoding needs no lock; only the machines do.
            let records: Vec<(RecordRef<'_>, Decoded<'_>)> = batch
                .iter()
                .map(|(offset, ts, range)| {
                    let rec = RecordRef::encoded(*offset, *ts, &buf[range.clone()]);
                    (rec, protocol::decode(rec, cfg.protocol, &cfg.headers))
                })
                .collect();
            lock(engine).on_batch(o, records, end_of_log, consumer);
            if buf.capacity() > BATCH_BYTES {
                buf = Vec::new();
            }
        }
        if !busy {
            std::thread::park_timeout(IDLE);
        }
    }
}
