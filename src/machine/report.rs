//! What the machine tells its driver happened ([`Report`]), for the driver to log and
//! count in one place; the kinds of consumed records; why an operator's request was
//! refused.

/// What an event was, for the driver to log and count in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A record was consumed; `kind` is its protocol meaning.
    Consumed(ConsumedKind),
    /// An abort discarded `tasks` staged tasks.
    Aborted {
        /// Offset of the abort marker.
        offset: i64,
        /// Transaction id.
        id: String,
        /// Tasks discarded.
        tasks: usize,
    },
    /// A record below the next offset to consume was ignored: this machine already
    /// applied that offset (see `PartitionMachine::on_record`). The one just below
    /// `next` is librdkafka handing a record out again; anything lower means the log
    /// went back (truncated or reset below the position).
    ReadAgain {
        /// Offset of the record.
        offset: i64,
        /// The next offset the machine expected.
        next: i64,
    },
    /// A commit marker at `offset` was handled before this owner (skip set).
    DuplicateSkipped {
        /// Offset of the commit marker.
        offset: i64,
        /// Transaction id.
        id: String,
    },
    /// The open transaction `id` was dead-lettered while open and became a tombstone.
    Tombstoned {
        /// First offset of the instance.
        offset: i64,
        /// Transaction id.
        id: String,
        /// Why.
        reason: &'static str,
        /// Tasks in the first dead-lettered group.
        tasks: usize,
        /// Milliseconds it had been open (driver's clock), for `expired`.
        age_ms: u64,
    },
    /// A record was dead-lettered on its own or as part of a group; `error` says why.
    Rejected {
        /// Offset of the record that decided it.
        offset: i64,
        /// Transaction id, if known.
        id: Option<String>,
        /// Stable reason label.
        reason: &'static str,
        /// Human-readable error.
        error: String,
    },
    /// A tombstone was forgotten: a later record of `id` opens a new instance.
    TombstoneForgotten {
        /// First offset of the dead instance.
        offset: i64,
        /// Transaction id.
        id: String,
        /// `silent` (no record within `txn_timeout`) or `capacity`.
        why: &'static str,
    },
    /// The log does not continue where the committed offset says.
    OffsetGap {
        /// `retention` (committed below the log start), `truncation` (above its end), or
        /// `reset` (first record below the committed offset).
        kind: &'static str,
        /// The committed offset.
        committed: i64,
        /// The offset the log offers instead (log start, log end or first record).
        found: i64,
    },
    /// A transaction was committed and queued for delivery.
    Committed {
        /// Milliseconds between its first task and its commit (driver's clock).
        open_ms: u64,
    },
}

/// Protocol meaning of a consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumedKind {
    /// A task.
    Task,
    /// A commit marker.
    Commit,
    /// An abort marker.
    Abort,
    /// A record whose marker fields do not decode.
    Invalid,
}

/// Why an operator's dead-letter request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorRefusal {
    /// The id has no open transaction in this partition.
    #[error("no open transaction with that id")]
    NotOpen,
    /// The partition is replaying records an earlier owner already handled.
    #[error("the partition is replaying records an earlier owner handled (up to offset {until}); the transaction may already be delivered, try again once past it")]
    Replaying {
        /// Highest offset of the skip set loaded on assign.
        until: i64,
    },
}
