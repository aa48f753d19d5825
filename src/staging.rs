//! The staging store: tasks of open transactions, per partition, until their marker arrives.
//!
//! The pipeline only talks to [`StagingStore`], so a disk-backed store can replace the
//! in-memory one without touching it. Nothing here must outlive a crash: staged state is
//! rebuilt by replaying from the committed offset, which never passes an open transaction.

use std::collections::HashMap;

use crate::protocol::{Record, Records};

/// A transaction whose commit or abort marker has not arrived yet.
#[derive(Debug, Clone)]
pub struct OpenTxn {
    /// Offset of its first task: the committed offset must not pass it.
    pub first_offset: i64,
    /// Tasks in offset order.
    pub tasks: Records,
    /// Staged bytes (keys, values, headers).
    pub bytes: u64,
    /// Log time (ms) of the first task; expiry compares against this.
    pub opened_ms: i64,
}

/// Storage for the open transactions of one partition.
pub trait StagingStore: Send {
    /// Appends `task` to transaction `id`, opening it if needed; returns its state after.
    fn stage(&mut self, id: &str, task: Record, log_time_ms: i64) -> &OpenTxn;
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
    /// staged memory at small transactions (BENCHMARKS.md, "Memory").
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
    fn stage(&mut self, id: &str, task: Record, log_time_ms: i64) -> &OpenTxn {
        let size = task.size();
        self.bytes += size;
        // Look up before inserting: `entry` would allocate the id for every task.
        if !self.txns.contains_key(id) {
            let txn = OpenTxn {
                first_offset: task.offset,
                tasks: Records::new(),
                bytes: 0,
                opened_ms: log_time_ms,
            };
            self.txns.insert(id.into(), txn);
        }
        let txn = self.txns.get_mut(id).expect("inserted above");
        txn.bytes += size;
        txn.tasks.push(&task);
        txn
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

    fn task(offset: i64, value: &str) -> Record {
        Record::new(offset, None, None, Some(value.as_bytes()), &[])
    }

    #[test]
    fn interleaved_transactions_keep_their_own_tasks_and_bytes() {
        let mut s = MemoryStore::new();
        s.stage("a", task(1, "a1"), 0);
        s.stage("b", task(2, "b1x"), 0);
        s.stage("a", task(3, "a2"), 0);
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
