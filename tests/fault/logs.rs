//! Reads the sidecars' own logs for one fact the broker does not expose: a handoff whose
//! final offset commit the broker refused.
//!
//! librdkafka's mock cluster refuses OffsetCommit while its group is JOINING or SYNCING
//! (`rd_kafka_mock_cgrp_classic_check_state`), for up to `session.timeout.ms - 1 s` per
//! rebalance phase. A real Kafka coordinator accepts commits with the current generation
//! in PreparingRebalance and refuses them only in CompletingRebalance. With cooperative
//! rebalancing on the mock, a member whose revoke callback runs after another member has
//! already rejoined cannot commit at all, so the next owner replays from the last commit
//! the mock did accept. Duplicates caused that way are reported on their own line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A partition handed off (revoked) after its final commit was refused.
#[derive(Debug, Clone)]
pub struct RefusedHandoff {
    pub inc: usize,
    pub partition: i32,
    pub at: SystemTime,
}

/// How far back a handoff's own commit attempts can lie (revoke waits for in-flight work).
const HANDOFF_WINDOW: Duration = Duration::from_secs(15);

fn stamp(line: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(line.split_whitespace().next()?.trim_end_matches('Z')).ok()
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(name))
}

/// Refused handoffs in every `sidecar-<inc>-slot<n>.log` of `dir`.
pub fn refused_handoffs(dir: &Path) -> Vec<RefusedHandoff> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(inc) = name
            .strip_prefix("sidecar-")
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        // (time, Some(partition) = commit of that partition succeeded / None = a commit failed)
        let mut commits: Vec<(SystemTime, Option<i32>)> = Vec::new();
        let mut revokes: Vec<(SystemTime, i32)> = Vec::new();
        for line in text.lines() {
            let Some(t) = stamp(line) else { continue };
            let part = || field(line, "partition=").and_then(|p| p.parse::<i32>().ok());
            if line.contains("offset commit failed; the next owner replays") {
                commits.push((t, None));
            } else if line.contains("committed safe offset") {
                if let Some(p) = part() {
                    commits.push((t, Some(p)));
                }
            } else if line.contains("partition revoked") {
                if let Some(p) = part() {
                    revokes.push((t, p));
                }
            }
        }
        let mut last_refused: BTreeMap<i32, SystemTime> = BTreeMap::new();
        for (t, p) in revokes {
            let from = t
                .checked_sub(HANDOFF_WINDOW)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            // The handoff's last word on this partition: a success naming it, or a failure
            // (failures name no partition; one failed commit covers every revoked one).
            let last = commits
                .iter()
                .rfind(|(c, what)| *c >= from && *c <= t && what.is_none_or(|q| q == p));
            let refused = matches!(last, Some((_, None)));
            if refused && last_refused.get(&p) != Some(&t) {
                last_refused.insert(p, t);
                out.push(RefusedHandoff {
                    inc,
                    partition: p,
                    at: t,
                });
            }
        }
    }
    out.sort_by_key(|r| r.at);
    out
}

/// Whether a duplicate of a transaction on `partition`, first delivered by `inc` at
/// `first` and delivered again starting at `again`, follows a refused handoff of that
/// partition by `inc` (within the rebalance windows that refused the commits).
pub fn explains(
    r: &RefusedHandoff,
    inc: usize,
    partition: i32,
    first: SystemTime,
    again: SystemTime,
) -> bool {
    r.inc == inc
        && r.partition == partition
        && r.at >= first
        && r.at <= again
        && r.at.duration_since(first).unwrap_or_default() <= HANDOFF_WINDOW
}
