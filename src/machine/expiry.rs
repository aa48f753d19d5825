//! The clock: expiry of open transactions and silent tombstones once the partition is
//! caught up, and the window after an offset gap in which new instances are suspect.

use std::collections::HashSet;

use crate::staging::StagingStore;

use super::{Action, PartitionMachine};

/// After an offset gap: instances first seen before `until_ms` may have lost records.
#[derive(Debug)]
pub(super) struct GapWindow {
    pub(super) until_ms: u64,
    /// Ids whose marker was seen since the gap: their next instance is whole.
    pub(super) cleared: HashSet<Box<str>>,
}

impl PartitionMachine {
    /// Whether an open transaction or a tombstone is old enough to expire if the
    /// partition is caught up: the driver checks the log end only then.
    pub fn wants_caught_up(&self, now_ms: u64) -> bool {
        let t = self.settings.txn_timeout_ms;
        self.store
            .open()
            .iter()
            .any(|(_, x)| now_ms.saturating_sub(x.opened_ms) > t)
            || self
                .tombstones
                .values()
                .any(|x| now_ms.saturating_sub(x.last_ms) > t)
            || self.gap.as_ref().is_some_and(|g| now_ms > g.until_ms)
    }

    /// The clock advanced to `now_ms`; `caught_up` says whether the partition has been
    /// consumed to the end of its log and is being fetched (not paused). Expires open
    /// transactions and forgets silent tombstones only when caught up.
    pub fn tick(&mut self, now_ms: u64, caught_up: bool, out: &mut Vec<Action>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if !caught_up {
            return;
        }
        let timeout = self.settings.txn_timeout_ms;
        if self.gap.as_ref().is_some_and(|g| now > g.until_ms) {
            self.gap = None;
        }
        let mut expired: Vec<(i64, Box<str>)> = self
            .store
            .open()
            .into_iter()
            .filter(|(_, t)| now.saturating_sub(t.opened_ms) > timeout)
            .map(|(id, t)| (t.first_offset, id.into()))
            .collect();
        // Oldest first, so the dead-letter topic holds them in log order.
        expired.sort_unstable();
        for (_, id) in expired {
            if let Some(t) = self.store.take(&id) {
                let age_ms = now.saturating_sub(t.opened_ms);
                let error = format!(
                    "no commit or abort within {age_ms} ms of consuming the first task, with the partition caught up"
                );
                self.tombstone_open(&id, t, "expired", error, age_ms, out);
            }
        }
        let mut silent: Vec<(i64, Box<str>)> = self
            .tombstones
            .iter()
            .filter(|(_, t)| now.saturating_sub(t.last_ms) > timeout)
            .map(|(id, t)| (t.first, id.clone()))
            .collect();
        silent.sort_unstable();
        for (_, id) in silent {
            self.forget(&id, "silent", out);
        }
    }

    pub(super) fn clear_gap(&mut self, id: &str) {
        if let Some(g) = &mut self.gap {
            g.cleared.insert(id.into());
        }
    }
}
