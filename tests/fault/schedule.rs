//! The fault schedule: a deterministic (seeded) list of membership changes and app
//! failure phases, executed in order with seeded gaps between steps.

use std::fmt;

use super::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Start a new sidecar process in an empty slot (a join, or a restart of a slot
    /// whose previous process left or was killed).
    Join { slot: usize },
    /// SIGTERM (`kill -TERM`): drain, commit, leave the group; must exit 0.
    Leave { slot: usize },
    /// SIGKILL. With `mid_request`, the app turns slow first and the kill waits until
    /// the victim has a request in flight.
    Kill { slot: usize, mid_request: bool },
    /// SIGKILL and start a new process in the same slot at once (crash + restart).
    Bounce { slot: usize, mid_request: bool },
    /// SIGTERM, wait for the exit, start a new process at once (rolling restart).
    Roll { slot: usize },
    /// A burst of 5xx answers for `ms`.
    Errors { ms: u64 },
    /// Slow answers (`min_ms..=max_ms` each) for `ms`.
    Slow { ms: u64, min_ms: u64, max_ms: u64 },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Join { slot } => write!(f, "join      slot {slot}"),
            Action::Leave { slot } => write!(f, "SIGTERM   slot {slot} (graceful leave)"),
            Action::Kill { slot, mid_request } => {
                write!(
                    f,
                    "SIGKILL   slot {slot}{}",
                    if mid_request { " mid-request" } else { "" }
                )
            }
            Action::Bounce { slot, mid_request } => write!(
                f,
                "SIGKILL   slot {slot}{} + restart",
                if mid_request { " mid-request" } else { "" }
            ),
            Action::Roll { slot } => write!(f, "SIGTERM   slot {slot} + restart (rolling)"),
            Action::Errors { ms } => write!(f, "app 5xx burst for {ms} ms"),
            Action::Slow { ms, min_ms, max_ms } => {
                write!(f, "app slow ({min_ms}-{max_ms} ms per request) for {ms} ms")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    /// Pause before this step, after the previous one completed.
    pub gap_ms: u64,
    pub action: Action,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub slots: usize,
    /// Slots started before the first step.
    pub initial: Vec<usize>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Join,
    Leave,
    Kill,
    KillMid,
    Bounce,
    BounceMid,
    Roll,
    Errors,
    Slow,
}

struct Sim {
    running: Vec<bool>,
}

impl Sim {
    fn up(&self) -> Vec<usize> {
        (0..self.running.len())
            .filter(|&s| self.running[s])
            .collect()
    }
    fn down(&self) -> Vec<usize> {
        (0..self.running.len())
            .filter(|&s| !self.running[s])
            .collect()
    }
    fn valid(&self, k: Kind) -> bool {
        let up = self.up().len();
        match k {
            Kind::Join => up < self.running.len(),
            // Never remove the last member for good: someone must keep delivering.
            Kind::Leave | Kind::Kill | Kind::KillMid => up >= 2,
            Kind::Bounce | Kind::BounceMid | Kind::Roll => up >= 1,
            Kind::Errors | Kind::Slow => true,
        }
    }
    fn action(&mut self, k: Kind, rng: &mut Rng) -> Action {
        let up = self.up();
        let down = self.down();
        match k {
            Kind::Join => {
                let slot = rng.pick(&down);
                self.running[slot] = true;
                Action::Join { slot }
            }
            Kind::Leave => {
                let slot = rng.pick(&up);
                self.running[slot] = false;
                Action::Leave { slot }
            }
            Kind::Kill | Kind::KillMid => {
                let slot = rng.pick(&up);
                self.running[slot] = false;
                Action::Kill {
                    slot,
                    mid_request: k == Kind::KillMid,
                }
            }
            Kind::Bounce | Kind::BounceMid => Action::Bounce {
                slot: rng.pick(&up),
                mid_request: k == Kind::BounceMid,
            },
            Kind::Roll => Action::Roll {
                slot: rng.pick(&up),
            },
            Kind::Errors => Action::Errors {
                ms: rng.range(800, 2500),
            },
            Kind::Slow => {
                let min_ms = rng.range(50, 200);
                Action::Slow {
                    ms: rng.range(1500, 4000),
                    min_ms,
                    max_ms: min_ms + rng.range(100, 600),
                }
            }
        }
    }
}

/// The short form: every kind of fault once, in a seeded order of slots and gaps.
pub fn short(seed: u64) -> Schedule {
    let mut rng = Rng::fork(seed, "schedule-short");
    let kinds = [
        Kind::Join,
        Kind::Errors,
        Kind::KillMid,
        Kind::Leave,
        Kind::Join,
        Kind::Slow,
        Kind::Roll,
        Kind::BounceMid,
    ];
    build(&mut rng, 3, &[0, 1], &kinds, (2500, 4000))
}

/// The long form: a seeded random walk over all kinds of faults.
pub fn long(seed: u64, steps: usize) -> Schedule {
    let mut rng = Rng::fork(seed, "schedule-long");
    let weights: [(Kind, u64); 9] = [
        (Kind::Join, 6),
        (Kind::Leave, 4),
        (Kind::Kill, 2),
        (Kind::KillMid, 2),
        (Kind::Bounce, 2),
        (Kind::BounceMid, 2),
        (Kind::Roll, 3),
        (Kind::Errors, 3),
        (Kind::Slow, 3),
    ];
    let slots = 4;
    let mut sim = Sim {
        running: vec![false; slots],
    };
    for s in [0, 1] {
        sim.running[s] = true;
    }
    let mut out = Vec::new();
    while out.len() < steps {
        let valid: Vec<(Kind, u64)> = weights
            .iter()
            .copied()
            .filter(|(k, _)| sim.valid(*k))
            .collect();
        let total: u64 = valid.iter().map(|(_, w)| w).sum();
        let mut r = rng.below(total);
        let mut kind = valid[0].0;
        for (k, w) in &valid {
            if r < *w {
                kind = *k;
                break;
            }
            r -= w;
        }
        let gap_ms = rng.range(3000, 8000);
        out.push(Step {
            gap_ms,
            action: sim.action(kind, &mut rng),
        });
    }
    Schedule {
        slots,
        initial: vec![0, 1],
        steps: out,
    }
}

fn build(
    rng: &mut Rng,
    slots: usize,
    initial: &[usize],
    kinds: &[Kind],
    gaps: (u64, u64),
) -> Schedule {
    let mut sim = Sim {
        running: vec![false; slots],
    };
    for &s in initial {
        sim.running[s] = true;
    }
    let steps = kinds
        .iter()
        .map(|&k| {
            assert!(sim.valid(k), "short schedule template is invalid at {k:?}");
            let gap_ms = rng.range(gaps.0, gaps.1);
            Step {
                gap_ms,
                action: sim.action(k, rng),
            }
        })
        .collect();
    Schedule {
        slots,
        initial: initial.to_vec(),
        steps,
    }
}
