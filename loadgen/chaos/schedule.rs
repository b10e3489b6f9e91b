//! The fault schedule: drawn once from the seed before the run starts, so
//! the same seed replays the same faults at the same offsets on the same
//! targets.
//!
//! Owns: the PRNG (SplitMix64, written out here rather than taken from a
//! crate so that a seed means the same schedule whatever version of a
//! dependency builds it), the fault kinds and how long each lasts, and the
//! rules that keep a schedule useful: at most one reflector down at a time,
//! a target never under two faults of one kind, a partition cuts a client
//! from one or two reflectors (never all three, so a path stays).
//!
//! Must never: touch a process or a namespace (`fleet` applies faults),
//! or read a clock.

use std::time::Duration;

/// SplitMix64: small, fast, and the same numbers everywhere.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// What a fault does, and to whom (indices into the fleet's reflectors,
/// hypervisors and flappers).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a reflector; restart it when the fault ends.
    ReflectorKill { reflector: usize },
    /// SIGTERM a reflector and start it again at once.
    ReflectorRestart { reflector: usize },
    /// Drop every packet between a hypervisor and these reflectors.
    Partition {
        hypervisor: usize,
        reflectors: Vec<usize>,
    },
    /// Drop this percentage of a hypervisor's packets, both ways.
    Loss { hypervisor: usize, percent: u8 },
    /// Delay a hypervisor's packets (tc netem; only where the kernel has it).
    Delay { hypervisor: usize, millis: u32 },
    /// SIGKILL a hypervisor's client; restart it when the fault ends.
    ClientKill { hypervisor: usize },
    /// Stop a flapping announcer (its routes are withdrawn at once) and
    /// start it again (re-announced at once) when the fault ends.
    FlapBurst { flapper: usize },
    /// Reload a reflector's policy (SIGHUP, a new revision, same rules).
    PolicyReload { reflector: usize },
    /// Take a hypervisor's tunnel device down (the kernel flushes its
    /// routes); up again when the fault ends.
    TunnelBounce { hypervisor: usize },
}

impl FaultKind {
    /// The kind's name, for the report's counts.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::ReflectorKill { .. } => "reflector_kill",
            FaultKind::ReflectorRestart { .. } => "reflector_restart",
            FaultKind::Partition { .. } => "partition",
            FaultKind::Loss { .. } => "loss",
            FaultKind::Delay { .. } => "delay",
            FaultKind::ClientKill { .. } => "client_kill",
            FaultKind::FlapBurst { .. } => "flap_burst",
            FaultKind::PolicyReload { .. } => "policy_reload",
            FaultKind::TunnelBounce { .. } => "tunnel_bounce",
        }
    }

    /// The reflector this fault takes down, if any.
    fn reflector_down(&self) -> Option<usize> {
        match self {
            FaultKind::ReflectorKill { reflector } | FaultKind::ReflectorRestart { reflector } => {
                Some(*reflector)
            }
            _ => None,
        }
    }

    /// The target a second fault of the same family must not hit meanwhile.
    fn target(&self) -> (&'static str, usize) {
        match self {
            FaultKind::ReflectorKill { reflector }
            | FaultKind::ReflectorRestart { reflector }
            | FaultKind::PolicyReload { reflector } => ("reflector", *reflector),
            FaultKind::Partition { hypervisor, .. }
            | FaultKind::Loss { hypervisor, .. }
            | FaultKind::Delay { hypervisor, .. } => ("network", *hypervisor),
            FaultKind::ClientKill { hypervisor } | FaultKind::TunnelBounce { hypervisor } => {
                ("client", *hypervisor)
            }
            FaultKind::FlapBurst { flapper } => ("flapper", *flapper),
        }
    }
}

/// One fault of the schedule.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Fault {
    /// Position in the schedule (the report and the log name faults by it).
    pub id: usize,
    /// When it starts, from the start of the fault phase.
    #[serde(serialize_with = "as_secs")]
    pub at: Duration,
    /// How long it lasts (zero: an instant fault such as a reload).
    #[serde(serialize_with = "as_secs")]
    pub lasts: Duration,
    /// What it does.
    #[serde(flatten)]
    pub kind: FaultKind,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// The fleet's shape, as far as the schedule needs it.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub reflectors: usize,
    pub hypervisors: usize,
    pub flappers: usize,
    /// The hold time of a session (2.5 × keepalive): partitions are drawn
    /// shorter and longer than it.
    pub hold: Duration,
    /// Whether `tc netem` works here (delay faults are drawn only then).
    pub netem: bool,
}

/// Draws the faults of a run of `length` from `seed`: one every 1–4 s.
pub fn draw(seed: u64, length: Duration, shape: Shape) -> Vec<Fault> {
    let mut rng = SplitMix64::new(seed);
    let mut faults: Vec<Fault> = Vec::new();
    let mut at = Duration::from_secs(1);
    let hold_ms = shape.hold.as_millis() as u64;
    while at < length {
        let busy = |faults: &[Fault], kind: &FaultKind| {
            faults.iter().any(|f| {
                let until = f.at + f.lasts + Duration::from_millis(500);
                until > at
                    && (f.kind.target() == kind.target()
                        || (kind.reflector_down().is_some() && f.kind.reflector_down().is_some()))
            })
        };
        let h = rng.range(0, shape.hypervisors as u64 - 1) as usize;
        let r = rng.range(0, shape.reflectors as u64 - 1) as usize;
        let (kind, lasts) = match rng.range(0, 9) {
            0 => (
                FaultKind::ReflectorKill { reflector: r },
                rng.millis(500, 5000),
            ),
            1 => (FaultKind::ReflectorRestart { reflector: r }, Duration::ZERO),
            2 | 3 => {
                let cut = rng.range(1, (shape.reflectors as u64 - 1).min(2)) as usize;
                let first = r;
                let reflectors = (0..cut).map(|i| (first + i) % shape.reflectors).collect();
                // Half shorter than the hold time, half longer.
                let lasts = if rng.range(0, 1) == 0 {
                    rng.millis(hold_ms / 4, hold_ms * 3 / 4)
                } else {
                    rng.millis(hold_ms * 3 / 2, hold_ms * 4)
                };
                (
                    FaultKind::Partition {
                        hypervisor: h,
                        reflectors,
                    },
                    lasts,
                )
            }
            4 if shape.netem && rng.range(0, 1) == 0 => (
                FaultKind::Delay {
                    hypervisor: h,
                    millis: rng.range(20, 300) as u32,
                },
                rng.millis(1000, 6000),
            ),
            4 => (
                FaultKind::Loss {
                    hypervisor: h,
                    percent: rng.range(2, 20) as u8,
                },
                rng.millis(1000, 6000),
            ),
            5 => (
                FaultKind::ClientKill { hypervisor: h },
                rng.millis(200, 4000),
            ),
            6 | 7 => (
                FaultKind::FlapBurst {
                    flapper: rng.range(0, shape.flappers as u64 - 1) as usize,
                },
                rng.millis(300, 3000),
            ),
            8 => (FaultKind::PolicyReload { reflector: r }, Duration::ZERO),
            _ => (
                FaultKind::TunnelBounce { hypervisor: h },
                rng.millis(200, 2000),
            ),
        };
        if !busy(&faults, &kind) {
            faults.push(Fault {
                id: faults.len(),
                at,
                lasts,
                kind,
            });
        }
        at += rng.millis(1000, 4000);
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            reflectors: 3,
            hypervisors: 24,
            flappers: 2,
            hold: Duration::from_millis(2500),
            netem: false,
        }
    }

    #[test]
    fn a_seed_is_a_schedule() {
        let a = draw(7, Duration::from_secs(300), shape());
        let b = draw(7, Duration::from_secs(300), shape());
        let c = draw(8, Duration::from_secs(300), shape());
        let text = |f: &[Fault]| serde_json::to_string(f).unwrap();
        assert_eq!(text(&a), text(&b));
        assert_ne!(text(&a), text(&c));
        assert!(a.len() > 60, "{}", a.len());
    }

    #[test]
    fn never_two_reflectors_down_nor_a_client_cut_from_all() {
        for seed in 0..50 {
            let faults = draw(seed, Duration::from_secs(600), shape());
            for (i, f) in faults.iter().enumerate() {
                if let FaultKind::Partition { reflectors, .. } = &f.kind {
                    assert!(!reflectors.is_empty() && reflectors.len() < 3);
                }
                assert!(!matches!(f.kind, FaultKind::Delay { .. }), "no netem here");
                let Some(_) = f.kind.reflector_down() else {
                    continue;
                };
                for g in &faults[..i] {
                    if g.kind.reflector_down().is_some() {
                        assert!(g.at + g.lasts < f.at, "seed {seed}: {g:?} and {f:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_kind_is_drawn() {
        let faults = draw(1, Duration::from_secs(600), shape());
        let kinds: std::collections::BTreeSet<&str> =
            faults.iter().map(|f| f.kind.name()).collect();
        assert_eq!(kinds.len(), 8, "{kinds:?}");
    }
}
