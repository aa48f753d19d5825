//! The staging store: tasks of open transactions, per partition, until their marker arrives.
//!
//! The pipeline only talks to [`StagingStore`], so a disk-backed store can replace the
//! in-memory one without touching it. Nothing here must outlive a crash: staged state is
//! rebuilt by replaying from the committed offset, which never passes an open transaction.

use hashbrown::HashMap;

use crate::protocol::{RecordRef, Records};

/// A transaction whose commit or abort marker has not arrived yet.
#[derive(Debug, Clone)]
pub struct OpenTxn {
    /// Offset of its first task: the committed offset must not pass it.
    pub first_offset: i64,
    /// Tasks in offset order.
    pub tasks: Records,
    /// Staged bytes (keys, values, headers).
    pub bytes: u64,
    /// Driver clock (ms, monotonic) when its first task was consumed; expiry compares
    /// against this, never against record timestamps.
    pub opened_ms: u64,
    /// Opened just after an offset gap: it may have lost records, so only a matching
    /// `txn-count` lets it be delivered.
    pub suspect: bool,
}

/// Storage for the open transactions of one partition.
pub trait StagingStore: Send {
    /// Appends a copy of `task` to transaction `id`, opening it at clock `now_ms` if
    /// needed; returns its state after (one task: this call opened it).
    fn stage(&mut self, id: &str, task: RecordRef<'_>, now_ms: u64) -> &OpenTxn;
    /// Marks the open transaction `id` as possibly missing records (see [`OpenTxn::suspect`]).
    fn mark_suspect(&mut self, id: &str);
    /// Removes and returns transaction `id` (on commit, abort, expiry or overflow).
    fn take(&mut self, id: &str) -> Option<OpenTxn>;
    /// The open transaction `id`, if any.
    fn get(&self, id: &str) -> Option<&OpenTxn>;
    /// Number of open transactions.
    fn len(&self) -> usize;
    /// Whether no transaction is open.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Staged bytes across open transactions.
    fn bytes(&self) -> u64;
    /// Every open transaction with its id, in no particular order.
    fn open(&self) -> Vec<(&str, &OpenTxn)>;
    /// Drops everything (on revoke).
    fn clear(&mut self);
}

/// The default store: a hash map in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The id lives only in the key: a second copy per transaction was measurable in
    /// staged memory at small transactions (docs/benchmarks-history.md, "Memory"). hashbrown's
    /// raw entry hashes a task's id once and allocates it only for a new transaction;
    /// its default hasher (foldhash, seeded per process) is cheaper than SipHash.
    txns: HashMap<Box<str>, OpenTxn>,
    bytes: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl StagingStore for MemoryStore {
    fn stage(&mut self, id: &str, task: RecordRef<'_>, now_ms: u64) -> &OpenTxn {
        let size = task.size();
        self.bytes += size;
        let (_, txn) = self.txns.raw_entry_mut().from_key(id).or_insert_with(|| {
            let txn = OpenTxn {
                first_offset: task.offset,
                tasks: Records::new(),
                bytes: 0,
                opened_ms: now_ms,
                suspect: false,
            };
            (id.into(), txn)
        });
        txn.bytes += size;
        txn.tasks.push(task);
        txn
    }

    fn mark_suspect(&mut self, id: &str) {
        if let Some(t) = self.txns.get_mut(id) {
            t.suspect = true;
        }
    }

    fn take(&mut self, id: &str) -> Option<OpenTxn> {
        let txn = self.txns.remove(id)?;
        self.bytes -= txn.bytes;
        Some(txn)
    }

    fn get(&self, id: &str) -> Option<&OpenTxn> {
        self.txns.get(id)
    }

    fn len(&self) -> usize {
        self.txns.len()
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn open(&self) -> Vec<(&str, &OpenTxn)> {
        self.txns.iter().map(|(id, t)| (&**id, t)).collect()
    }

    fn clear(&mut self) {
        self.txns.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Record;

    fn task(offset: i64, value: &str) -> Record {
        Record::new(offset, None, None, Some(value.as_bytes()), &[])
    }

    fn stage(s: &mut MemoryStore, id: &str, offset: i64, value: &str) -> usize {
        s.stage(id, task(offset, value).view(), 0).tasks.len()
    }

    #[test]
    fn interleaved_transactions_keep_their_own_tasks_and_bytes() {
        let mut s = MemoryStore::new();
        assert_eq!(stage(&mut s, "a", 1, "a1"), 1);
        assert_eq!(stage(&mut s, "b", 2, "b1x"), 1);
        assert_eq!(stage(&mut s, "a", 3, "a2"), 2);
        assert_eq!(s.len(), 2);
        assert_eq!(s.bytes(), 7);
        let a = s.take("a").unwrap();
        assert_eq!(a.first_offset, 1);
        assert_eq!(
            a.tasks.iter().map(|t| t.offset).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(s.bytes(), 3);
        assert!(s.take("a").is_none());
        s.clear();
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }
}
