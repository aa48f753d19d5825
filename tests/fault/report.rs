//! Turns the evidence of a run into figures, a verdict and a printable table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::app::Req;
use super::logs;
use super::procs::CommittedPos;
use super::runner::{key, Key, Profile, TOPIC};
use super::workload::Plan;
use crate::common::BrokerKind;

/// What a SIGKILL could leave behind.
#[derive(Debug, Clone)]
pub struct KillRecord {
    pub step: usize,
    pub inc: usize,
    pub at: Instant,
    /// Requests of the victim whose handler had started and not answered at the kill.
    pub in_flight_requests: usize,
    pub in_flight: BTreeSet<Key>,
    /// Transactions the victim had delivered that the committed offsets (read after the
    /// kill) do not cover: the next owner must redeliver them.
    pub exposed: BTreeSet<Key>,
    /// Of `exposed`, those accepted more than 1 s before the kill.
    pub stale: usize,
}

impl KillRecord {
    fn allows(&self, k: &Key) -> bool {
        self.in_flight.contains(k) || self.exposed.contains(k)
    }
    pub fn allowance(&self) -> usize {
        self.in_flight.union(&self.exposed).count()
    }
}

/// Everything a run observed.
pub struct Evidence {
    /// The broker the run used. One that drops offset-commit metadata (tansu) loses the
    /// skip set at every handoff: there duplicates are allowed (reported, not judged).
    pub broker: BrokerKind,
    pub profile: Profile,
    pub plan: Plan,
    pub requests: Vec<Req>,
    pub kills: Vec<KillRecord>,
    pub exit_failures: Vec<String>,
    pub counts: BTreeMap<&'static str, usize>,
    pub settled: bool,
    /// The group's committed offsets reached the end of every partition before the final stop.
    pub committed_at_end: bool,
    /// The group's committed offsets once idle, just before the final stop.
    pub before_stop: BTreeMap<i32, CommittedPos>,
    /// The fresh process started after the final stop.
    pub probe_inc: usize,
    pub end_offsets: Vec<i64>,
    pub high_watermarks: Vec<i64>,
    pub final_committed: BTreeMap<i32, CommittedPos>,
    pub dlq_records: i64,
    pub skipped_by_skip_set: u64,
    pub skip_set_overflow: u64,
    pub commit_errors: u64,
    pub lost_assignments: usize,
    /// Handoffs whose final offset commit the broker refused (from the sidecars' logs).
    pub refused: Vec<logs::RefusedHandoff>,
    pub failed_commits_logged: usize,
    pub cut_off_logged: usize,
    pub processes: usize,
    pub wall: Duration,
    pub dir: PathBuf,
    pub timeline: Vec<String>,
}

/// The judged figures.
pub struct Report {
    pub rows: Vec<(String, String)>,
    pub kill_rows: Vec<String>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub dir: PathBuf,
    pub figures: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn table(&self) -> String {
        let w = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(10);
        let v = self
            .rows
            .iter()
            .map(|(_, v)| v.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let line = format!("+-{}-+-{}-+\n", "-".repeat(w), "-".repeat(v));
        let mut out = String::new();
        out.push_str(&line);
        for (k, val) in &self.rows {
            if k.is_empty() {
                out.push_str(&line);
            } else {
                let _ = writeln!(out, "| {k:<w$} | {val:>v$} |");
            }
        }
        out.push_str(&line);
        if !self.kill_rows.is_empty() {
            out.push_str(
                "\nSIGKILLs (requests in flight at the kill; transactions the victim delivered that the committed offsets did not cover; redeliveries attributed):\n",
            );
            for r in &self.kill_rows {
                let _ = writeln!(out, "  {r}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        if self.failures.is_empty() {
            out.push_str("\nVERDICT: PASS\n");
        } else {
            out.push_str("\nVERDICT: FAIL\n");
            for f in &self.failures {
                let _ = writeln!(out, "  - {f}");
            }
        }
        let _ = writeln!(out, "logs: {}", self.dir.display());
        out
    }
}

pub fn analyse(ev: Evidence) -> Report {
    let plan = &ev.plan;
    let by_id: HashMap<&str, usize> = plan
        .txns
        .iter()
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    let committed_txns = plan.txns.iter().filter(|t| !t.abort).count();
    let aborted_txns = plan.txns.len() - committed_txns;
    let long_txns = plan.txns.iter().filter(|t| t.long).count();
    let tasks: usize = plan.txns.iter().map(|t| t.values.len()).sum();

    let mut accepted: Vec<&Req> = ev.requests.iter().filter(|r| r.accepted).collect();
    accepted.sort_by_key(|r| r.accept_seq);
    let mut failures = Vec::new();
    let mut notes = Vec::new();

    // Identity, completeness, abort and shape checks.
    let mut unknown = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    let mut partial = BTreeMap::new();
    let mut aborted_delivered = BTreeSet::new();
    let mut key_of: HashMap<&str, Key> = HashMap::new();
    let mut unstable_keys = BTreeSet::new();
    for r in &accepted {
        let Some(&i) = by_id.get(r.id.as_str()) else {
            unknown.insert(r.id.clone());
            continue;
        };
        let t = &plan.txns[i];
        if t.abort {
            aborted_delivered.insert(t.id.clone());
            continue;
        }
        delivered.insert(t.id.clone());
        let offsets_ok = r.task_offsets.windows(2).all(|w| w[0] < w[1])
            && r.task_offsets.last().is_some_and(|&o| o < r.commit_offset);
        if r.task_values != t.expected() || !offsets_ok || r.partition != t.partition {
            partial.entry(t.id.clone()).or_insert_with(|| {
                format!(
                    "{}: got {} task(s) at offsets {:?}, expected {}",
                    t.id,
                    r.task_values.len(),
                    r.task_offsets,
                    t.values.len()
                )
            });
        }
        let k = key(r);
        if r.idempotency_key != format!("{TOPIC}/{}/{}", k.0, k.1)
            || *key_of.entry(t.id.as_str()).or_insert(k) != k
        {
            unstable_keys.insert(t.id.clone());
        }
    }
    let lost: Vec<&str> = plan
        .txns
        .iter()
        .filter(|t| !t.abort && !delivered.contains(&t.id))
        .map(|t| t.id.as_str())
        .collect();

    // Order: within a partition, first acceptances must follow commit-marker order.
    let mut seen = BTreeSet::new();
    let mut max_by_part: BTreeMap<i32, (i64, String)> = BTreeMap::new();
    let mut reordered = Vec::new();
    for r in &accepted {
        if !seen.insert(key(r)) {
            continue;
        }
        let m = max_by_part
            .entry(r.partition)
            .or_insert((-1, String::new()));
        if r.commit_offset < m.0 {
            reordered.push(format!(
                "partition {}: {} (marker {}) first delivered after {} (marker {})",
                r.partition, r.id, r.commit_offset, m.1, m.0
            ));
        } else {
            *m = (r.commit_offset, r.id.clone());
        }
    }

    // Duplicates, each attributed to a SIGKILL that could have caused it, or not.
    let mut kills = ev.kills.clone();
    kills.sort_by_key(|k| k.at);
    let mut by_key: BTreeMap<Key, Vec<&Req>> = BTreeMap::new();
    for r in &accepted {
        by_key.entry(key(r)).or_default().push(r);
    }
    let mut used: BTreeSet<(usize, Key)> = BTreeSet::new();
    let mut dup_total = 0u64;
    let mut dup_after_kill = 0u64;
    let mut dup_mid_request = 0u64;
    let mut per_kill = vec![0u64; kills.len()];
    let mut unexplained = Vec::new();
    let mut dup_refused = 0u64;
    let mut refused_used: BTreeSet<(usize, Key)> = BTreeSet::new();
    for (k, reqs) in &by_key {
        for (j, d) in reqs.iter().enumerate().skip(1) {
            dup_total += 1;
            let hit = kills
                .iter()
                .enumerate()
                .find(|(i, kr)| kr.at <= d.start && kr.allows(k) && !used.contains(&(*i, *k)));
            if let Some((i, kr)) = hit {
                used.insert((i, *k));
                dup_after_kill += 1;
                per_kill[i] += 1;
                if kr.in_flight.contains(k) {
                    dup_mid_request += 1;
                }
                continue;
            }
            let prev = reqs[j - 1];
            let refused = ev.refused.iter().enumerate().find(|(i, h)| {
                !refused_used.contains(&(*i, *k))
                    && logs::explains(h, prev.inc, k.0, prev.wall, d.wall)
            });
            if let Some((i, _)) = refused {
                refused_used.insert((i, *k));
                dup_refused += 1;
                continue;
            }
            unexplained.push(format!(
                "{} (partition {}, marker {}): delivered by process(es) {:?}",
                d.id,
                k.0,
                k.1,
                reqs.iter().map(|r| r.inc).collect::<Vec<_>>()
            ));
        }
    }
    let probe_redelivered = accepted.iter().filter(|r| r.inc == ev.probe_inc).count();
    // Delivered transactions a crash at rest (everything delivered, consumed and idle)
    // would redeliver: the committed offsets must have caught up by then.
    let exposed_at_rest: BTreeSet<Key> = by_key
        .keys()
        .filter(|(p, o)| !ev.before_stop.get(p).is_some_and(|c| c.covers(*o)))
        .copied()
        .collect();
    let in_flight_at_kills: usize = kills.iter().map(|k| k.in_flight_requests).sum();
    let exposed_at_kills: usize = kills.iter().map(|k| k.exposed.len()).sum();
    let allowance: usize = kills.iter().map(KillRecord::allowance).sum();
    let kill_rows = kills
        .iter()
        .zip(&per_kill)
        .map(|(k, d)| {
            format!(
                "step {:>2}: process #{:<2} in flight {:>2}, accepted-but-uncommitted {:>3} (older than 1 s: {:>3}), allowance {:>3}, redelivered {:>3}",
                k.step,
                k.inc,
                k.in_flight_requests,
                k.exposed.len(),
                k.stale,
                k.allowance(),
                d
            )
        })
        .collect();

    let attempts = ev.requests.len();
    let errors_answered = ev.requests.iter().filter(|r| r.status >= 500).count();
    let dropped = ev.requests.iter().filter(|r| r.dropped).count();
    let slow = ev
        .requests
        .iter()
        .filter(|r| {
            r.end
                .zip(Some(r.start))
                .is_some_and(|(e, s)| e - s >= Duration::from_millis(50))
        })
        .count();

    // Verdict.
    let ex = |v: &[&str]| v.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if !ev.settled {
        failures.push(
            "the group did not deliver everything and commit to the end of every partition in time"
                .into(),
        );
    }
    if !lost.is_empty() {
        failures.push(format!(
            "{} lost transaction(s), e.g. {}",
            lost.len(),
            ex(&lost)
        ));
    }
    if !partial.is_empty() {
        failures.push(format!(
            "{} partial/wrong transaction(s): {}",
            partial.len(),
            partial
                .values()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !aborted_delivered.is_empty() {
        failures.push(format!(
            "{} aborted transaction(s) delivered: {:?}",
            aborted_delivered.len(),
            aborted_delivered.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !reordered.is_empty() {
        failures.push(format!(
            "{} reordered: {}",
            reordered.len(),
            reordered
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !unknown.is_empty() {
        failures.push(format!(
            "{} unknown transaction id(s) delivered",
            unknown.len()
        ));
    }
    if !unstable_keys.is_empty() {
        failures.push(format!(
            "{} transaction(s) with an unstable Idempotency-Key",
            unstable_keys.len()
        ));
    }
    // Duplicates are judged only where the skip set survives a handoff; on a broker that
    // drops commit metadata delivery is plain at-least-once and they are reported.
    let judge_duplicates = ev.broker.keeps_commit_metadata();
    let mut duplicate_findings = Vec::new();
    if !unexplained.is_empty() {
        duplicate_findings.push(format!(
            "{} duplicate(s) not explained by a SIGKILL (i.e. after a graceful handoff): {}",
            unexplained.len(),
            unexplained
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if dup_after_kill as usize > allowance {
        duplicate_findings.push(format!(
            "{dup_after_kill} duplicates after SIGKILLs exceed the allowance {allowance}"
        ));
    }
    if judge_duplicates {
        failures.extend(duplicate_findings);
    } else {
        for f in duplicate_findings {
            notes.push(format!(
                "allowed on {} (offset-commit metadata is dropped, no skip set survives a handoff): {f}",
                ev.broker.name()
            ));
        }
    }
    for f in &ev.exit_failures {
        failures.push(format!("graceful exit failed: {f}"));
    }
    if ev.dlq_records > 0 {
        failures.push(format!(
            "{} record(s) dead-lettered although retries were unlimited",
            ev.dlq_records
        ));
    }
    if ev.high_watermarks != ev.end_offsets {
        failures.push(format!(
            "broker holds {:?} records per partition, the plan wrote {:?}",
            ev.high_watermarks, ev.end_offsets
        ));
    }
    let final_ok = ev
        .final_committed
        .iter()
        .all(|(p, c)| c.offset == ev.end_offsets.get(*p as usize).copied());
    if !final_ok {
        failures.push("after the final graceful stop, committed offsets are not at the end of every partition".into());
    }
    if !ev.committed_at_end {
        let mut per_part: BTreeMap<i32, usize> = BTreeMap::new();
        for (p, _) in &exposed_at_rest {
            *per_part.entry(*p).or_default() += 1;
        }
        failures.push(format!(
            "committed offsets stale at rest: 15 s after everything was delivered and consumed the group had committed {} \
             (ends {:?}); a crash then would redeliver {} transaction(s) {:?} (partition: count)",
            ev.before_stop
                .iter()
                .map(|(p, c)| format!("p{p}@{}", c.offset.unwrap_or(-1)))
                .collect::<Vec<_>>()
                .join(" "),
            ev.end_offsets,
            exposed_at_rest.len(),
            per_part
        ));
    }
    if !ev.refused.is_empty() {
        notes.push(format!(
            "{} handoff(s) of a partition after the broker refused the final offset commit (the mock's coordinator takes no commits while JOINING/SYNCING); {} duplicate(s) followed them",
            ev.refused.len(),
            dup_refused
        ));
    }
    if ev.lost_assignments > 0 {
        notes.push(format!(
            "{} \"assignment lost\" event(s) in the logs (a member's session expired)",
            ev.lost_assignments
        ));
    }
    if ev.failed_commits_logged > 0 {
        notes.push(format!(
            "{} synchronous offset commit(s) failed on revoke/shutdown (see logs)",
            ev.failed_commits_logged
        ));
    }
    if ev.cut_off_logged > 0 {
        notes.push(format!(
            "{} in-flight deliveries cut off at a grace deadline",
            ev.cut_off_logged
        ));
    }

    let c = |k: &str| ev.counts.get(k).copied().unwrap_or(0).to_string();
    let sched = &ev.profile.schedule;
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row(
        "profile",
        format!("{} (seed {})", ev.profile.name, ev.profile.seed),
    );
    row(
        "broker",
        format!(
            "{} (duplicates {})",
            ev.broker.name(),
            if judge_duplicates {
                "judged"
            } else {
                "allowed"
            }
        ),
    );
    row("wall time", format!("{:.1} s", ev.wall.as_secs_f64()));
    row(
        "partitions / process slots",
        format!("{} / {}", ev.profile.shape.partitions, sched.slots),
    );
    row("sidecar processes started", ev.processes.to_string());
    row(
        "joins / restarts",
        format!("{} / {}", c("joins"), c("restarts")),
    );
    row("graceful leaves (SIGTERM mid-run)", c("graceful leaves"));
    row("SIGKILLs", c("SIGKILLs"));
    row(
        "app 5xx bursts / slow phases",
        format!("{} / {}", c("5xx bursts"), c("slow phases")),
    );
    row("", String::new());
    row("transactions produced", plan.txns.len().to_string());
    row(
        "  committed / aborted",
        format!("{committed_txns} / {aborted_txns}"),
    );
    row("  long-open (skip-set stress)", long_txns.to_string());
    row("  tasks", tasks.to_string());
    row("HTTP requests (attempts)", attempts.to_string());
    row(
        "  answered 5xx / slow (>=50 ms)",
        format!("{errors_answered} / {slow}"),
    );
    row("  connection dropped mid-request", dropped.to_string());
    row("", String::new());
    row("delivered (unique)", delivered.len().to_string());
    row("lost", lost.len().to_string());
    row("partial (wrong task set)", partial.len().to_string());
    row("aborted but delivered", aborted_delivered.len().to_string());
    row("reordered within a partition", reordered.len().to_string());
    row("duplicate deliveries", dup_total.to_string());
    row("  after graceful handoffs", unexplained.len().to_string());
    row(
        "  after a handoff whose final commit the broker refused",
        dup_refused.to_string(),
    );
    row("  after SIGKILLs", dup_after_kill.to_string());
    row(
        "    of which cut off mid-request",
        dup_mid_request.to_string(),
    );
    row(
        "  redelivered by a fresh member after the final stop",
        probe_redelivered.to_string(),
    );
    row(
        "exposed at rest (a crash would redeliver)",
        exposed_at_rest.len().to_string(),
    );
    row(
        "SIGKILL allowance (in flight + uncommitted)",
        allowance.to_string(),
    );
    row(
        "  requests in flight at the kills",
        in_flight_at_kills.to_string(),
    );
    row(
        "  accepted, not yet committed at the kills",
        exposed_at_kills.to_string(),
    );
    row("", String::new());
    row(
        "redeliveries avoided by the skip set",
        ev.skipped_by_skip_set.to_string(),
    );
    row(
        "skip-set overflow (metadata full)",
        ev.skip_set_overflow.to_string(),
    );
    row(
        "offset commit errors (sidecar metric)",
        ev.commit_errors.to_string(),
    );
    row("dead-lettered records", ev.dlq_records.to_string());

    let mut figures = BTreeMap::new();
    figures.insert("produced", plan.txns.len() as u64);
    figures.insert("delivered", delivered.len() as u64);
    figures.insert("lost", lost.len() as u64);
    figures.insert("partial", partial.len() as u64);
    figures.insert("aborted_delivered", aborted_delivered.len() as u64);
    figures.insert("reordered", reordered.len() as u64);
    figures.insert("duplicates", dup_total);
    figures.insert("duplicates_graceful", unexplained.len() as u64);
    figures.insert("duplicates_after_kill", dup_after_kill);
    figures.insert("duplicates_mid_request", dup_mid_request);
    figures.insert("allowance", allowance as u64);
    figures.insert("duplicates_refused_commit", dup_refused);
    figures.insert("refused_handoffs", ev.refused.len() as u64);
    figures.insert("probe_redelivered", probe_redelivered as u64);
    figures.insert("exposed_at_rest", exposed_at_rest.len() as u64);

    Report {
        rows,
        kill_rows,
        failures,
        notes,
        dir: ev.dir,
        figures,
    }
}
