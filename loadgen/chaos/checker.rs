//! The checker: reads every hypervisor's kernel tables while the faults
//! run and after they stop, and reports each violation with the time, the
//! client, the route and the faults in force.
//!
//! Owns: the fault timeline (when each fault started and ended, recorded by
//! the injector just before it acts and just after it undoes), the rule
//! "a path is up" (some reflector that is up, and neither the announcer nor
//! the client cut from it, each continuously so for the warm-up before the
//! sample), the continuous sampler (every hypervisor's tables read in turn,
//! each expected next hop with a path up must be in the kernel; every
//! process's exit and memory watched), and the exact comparison of the
//! settled state.
//!
//! Must never: inject a fault, or judge a route whose path was disturbed
//! within the warm-up (a restarted client, a reflector coming back, a
//! healed partition all take a sync to be whole again).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::fleet::{lock, Fleet, TUNNEL};
use super::model::{Announcer, Expected, Layout};
use super::schedule::{Fault, FaultKind};

/// One fault as it happened.
#[derive(Clone, Debug)]
struct Happened {
    fault: Fault,
    start: Instant,
    end: Option<Instant>,
}

/// When each fault started and ended.
pub struct Timeline {
    happened: Mutex<Vec<Happened>>,
    /// How long a path stays "disturbed" after its fault ended.
    warmup: Duration,
    /// Start of the fault phase (violation times are offsets from it).
    pub origin: Instant,
}

/// One violation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Violation {
    /// Seconds from the start of the fault phase.
    pub at: f64,
    /// What was wrong.
    pub what: String,
    /// The hypervisor (or process) concerned.
    pub client: String,
    /// The route, if one.
    pub route: Option<String>,
    /// Faults in force then (started, and not yet past their warm-up).
    pub faults: Vec<String>,
    /// Consecutive samples that found the same violation.
    pub samples: u64,
}

impl Timeline {
    pub fn new(warmup: Duration) -> Timeline {
        Timeline {
            happened: Mutex::new(Vec::new()),
            warmup,
            origin: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Happened>> {
        self.happened.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `fault` starts now (called just before it is applied).
    pub fn started(&self, fault: &Fault) {
        self.lock().push(Happened {
            fault: fault.clone(),
            start: Instant::now(),
            end: None,
        });
    }

    /// `fault` has ended (called just after it was undone).
    pub fn ended(&self, id: usize) {
        if let Some(h) = self.lock().iter_mut().rev().find(|h| h.fault.id == id) {
            h.end = Some(Instant::now());
        }
    }

    /// Faults in force at `t`: started, and not past their warm-up.
    fn in_force(&self, t: Instant) -> Vec<Happened> {
        self.lock()
            .iter()
            .filter(|h| h.start <= t && h.end.is_none_or(|e| t <= e + self.warmup))
            .cloned()
            .collect()
    }

    /// Is there a path from `from` through some reflector to hypervisor
    /// `to` at `t`, undisturbed for the warm-up?
    pub fn path_up(&self, from: Announcer, to: usize, reflectors: usize, t: Instant) -> bool {
        let force = self.in_force(t);
        let node_down = |who: Announcer, as_receiver: bool| {
            force.iter().any(|h| match (&h.fault.kind, who) {
                (FaultKind::ClientKill { hypervisor }, Announcer::Hypervisor(x))
                | (FaultKind::Loss { hypervisor, .. }, Announcer::Hypervisor(x))
                | (FaultKind::Delay { hypervisor, .. }, Announcer::Hypervisor(x)) => {
                    *hypervisor == x
                }
                (FaultKind::TunnelBounce { hypervisor }, Announcer::Hypervisor(x)) => {
                    as_receiver && *hypervisor == x
                }
                (FaultKind::FlapBurst { flapper }, Announcer::Flapper(x)) => *flapper == x,
                _ => false,
            })
        };
        if node_down(Announcer::Hypervisor(to), true) || node_down(from, false) {
            return false;
        }
        let cut = |who: Announcer, r: usize| {
            force.iter().any(|h| match (&h.fault.kind, who) {
                (
                    FaultKind::Partition {
                        hypervisor,
                        reflectors,
                    },
                    Announcer::Hypervisor(x),
                ) => *hypervisor == x && reflectors.contains(&r),
                _ => false,
            })
        };
        (0..reflectors).any(|r| {
            let down = force.iter().any(|h| {
                matches!(h.fault.kind,
                    FaultKind::ReflectorKill { reflector } | FaultKind::ReflectorRestart { reflector }
                    if reflector == r)
            });
            !down && !cut(from, r) && !cut(Announcer::Hypervisor(to), r)
        })
    }

    /// The faults in force at `t`, as report lines.
    fn describe(&self, t: Instant) -> Vec<String> {
        self.in_force(t)
            .iter()
            .map(|h| {
                let at = h.start.duration_since(self.origin).as_secs_f64();
                let state = match h.end {
                    None => "active".to_string(),
                    Some(e) => format!(
                        "ended {:.1}s ago",
                        t.saturating_duration_since(e).as_secs_f64()
                    ),
                };
                format!(
                    "#{} {} at {at:.1}s ({state}): {}",
                    h.fault.id,
                    h.fault.kind.name(),
                    serde_json::to_string(&h.fault.kind).unwrap_or_default()
                )
            })
            .collect()
    }
}

/// A hypervisor's kernel: (VNI, destination) → next hops.
pub type Kernel = BTreeMap<(u32, IpNet), BTreeSet<Ipv6Addr>>;

/// Reads the tables of `vnis` in namespace `ns` (`ip route show`, both
/// families). `Err` if `ip` fails or a route is not of our form.
pub fn read_kernel(ns: &str, vnis: &[u32]) -> Result<Kernel, String> {
    let mut out = Kernel::new();
    for vni in vnis {
        for family in ["-4", "-6"] {
            let shown = Command::new("ip")
                .args(["-n", ns, family, "route", "show", "table", &vni.to_string()])
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if !shown.status.success() {
                return Err(String::from_utf8_lossy(&shown.stderr).trim().to_string());
            }
            let text = String::from_utf8_lossy(&shown.stdout);
            for r in metalbond_test_support::netns::parse_routes(&text) {
                if !r.protocol_254 || r.devices.iter().any(|d| d != TUNNEL) {
                    continue; // not ours (the kernel's own routes of a table)
                }
                let prefix: IpNet = r
                    .prefix
                    .parse()
                    .or_else(|_| {
                        let len = if r.prefix.contains(':') { 128 } else { 32 };
                        format!("{}/{len}", r.prefix).parse()
                    })
                    .map_err(|e| format!("{}: {e}", r.text))?;
                let hops = r
                    .encap_dsts
                    .iter()
                    .map(|d| d.parse().map_err(|e| format!("{}: {e}", r.text)))
                    .collect::<Result<BTreeSet<Ipv6Addr>, String>>()?;
                out.insert((*vni, prefix), hops);
            }
        }
    }
    Ok(out)
}

/// What a settled kernel lacks or has too much of, one line each.
pub fn differences(expected: &Expected, kernel: &Kernel) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ((vni, prefix), hops) in expected {
        let want: BTreeSet<Ipv6Addr> = hops.keys().copied().collect();
        let route = format!("vni {vni} {prefix}");
        match kernel.get(&(*vni, *prefix)) {
            None => out.push((route, format!("missing (want via {want:?})"))),
            Some(got) if *got != want => {
                out.push((route, format!("next hops {got:?}, want {want:?}")))
            }
            Some(_) => {}
        }
    }
    for ((vni, prefix), got) in kernel {
        if !expected.contains_key(&(*vni, *prefix)) {
            out.push((
                format!("vni {vni} {prefix}"),
                format!("extra (via {got:?})"),
            ));
        }
    }
    out
}

/// Watches hypervisor `h`'s route deletions (`ip -n NS monitor route`)
/// until the sampler stops: a deletion of an expected destination while a
/// path to one of its next hops was up is a violation, however briefly the
/// route was gone (the sampler alone could miss a delete and re-add
/// between two reads). Returns the watcher thread and the `ip monitor`
/// pid, to be killed when the run ends.
pub fn watch_deletions(
    sampler: Arc<Sampler>,
    h: usize,
    ns: String,
    name: String,
    layout: Layout,
    expected: Arc<Vec<Expected>>,
    timeline: Arc<Timeline>,
) -> Result<(std::thread::JoinHandle<()>, u32), String> {
    use std::io::BufRead;
    let mut child = Command::new("ip")
        .args(["-n", &ns, "monitor", "route"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("ip monitor: {e}"))?;
    let Some(out) = child.stdout.take() else {
        return Err("ip monitor: no stdout".into());
    };
    let pid = child.id();
    let thread = std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(out).lines();
        while !sampler.stop.load(Ordering::Relaxed) {
            let Some(Ok(line)) = lines.next() else { break };
            let Some(rest) = line.strip_prefix("Deleted ") else {
                continue;
            };
            let now = Instant::now();
            let words: Vec<&str> = rest.split_whitespace().collect();
            let table = words
                .iter()
                .position(|w| *w == "table")
                .and_then(|i| words.get(i + 1))
                .and_then(|t| t.parse::<u32>().ok());
            let prefix = words.first().and_then(|p| p.parse::<IpNet>().ok());
            let (Some(vni), Some(prefix)) = (table, prefix) else {
                continue;
            };
            let Some(hops) = expected[h].get(&(vni, prefix)) else {
                continue;
            };
            sampler
                .counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .deletions_seen += 1;
            let up: Vec<String> = hops
                .values()
                .flatten()
                .filter(|a| timeline.path_up(**a, h, layout.reflectors, now))
                .map(ToString::to_string)
                .collect();
            if !up.is_empty() {
                sampler.violation(Violation {
                    at: now.duration_since(timeline.origin).as_secs_f64(),
                    what: format!(
                        "route deleted from the kernel while a reflector path from {} was up",
                        up.join(",")
                    ),
                    client: name.clone(),
                    route: Some(format!("vni {vni} {prefix}")),
                    faults: timeline.describe(now),
                    samples: 1,
                });
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    });
    Ok((thread, pid))
}

/// Counters of the continuous checks.
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
pub struct CheckCounts {
    /// Kernel reads (one hypervisor's tables each).
    pub samples: u64,
    /// Next hops checked with a path up.
    pub route_checks: u64,
    /// Next hops skipped because their path was disturbed.
    pub skipped: u64,
    /// Process checks (exit and memory).
    pub process_checks: u64,
    /// Deletions of expected destinations seen by `ip monitor`.
    pub deletions_seen: u64,
}

/// The continuous sampler's shared state.
pub struct Sampler {
    pub violations: Mutex<Vec<Violation>>,
    pub counts: Mutex<CheckCounts>,
    stop: AtomicBool,
}

impl Sampler {
    pub fn new() -> Arc<Sampler> {
        Arc::new(Sampler {
            violations: Mutex::new(Vec::new()),
            counts: Mutex::new(CheckCounts::default()),
            stop: AtomicBool::new(false),
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Records a violation; the same one found again by the next sample
    /// only bumps its count.
    pub fn violation(&self, v: Violation) {
        let mut all = self.violations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = all
            .iter_mut()
            .rev()
            .find(|x| x.client == v.client && x.route == v.route && x.what == v.what)
        {
            if v.at - last.at < 5.0 + last.samples as f64 * 2.0 {
                last.samples += 1;
                return;
            }
        }
        all.push(v);
    }

    /// Samples until stopped: each hypervisor's tables in turn, then every
    /// process's exit and memory.
    pub fn run(
        self: Arc<Sampler>,
        fleet: Arc<Fleet>,
        layout: Layout,
        expected: Arc<Vec<Expected>>,
        timeline: Arc<Timeline>,
        max_rss: u64,
    ) {
        while !self.stop.load(Ordering::Relaxed) {
            for (h, node) in fleet.hypervisors.iter().enumerate() {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                let (ns, name) = {
                    let n = lock(node);
                    (n.ns.clone(), n.name.clone())
                };
                let before = Instant::now();
                let kernel = read_kernel(&ns, &layout.subscriptions(h));
                let after = Instant::now();
                let at = before.duration_since(timeline.origin).as_secs_f64();
                let kernel = match kernel {
                    Ok(k) => k,
                    Err(e) => {
                        self.violation(Violation {
                            at,
                            what: format!("kernel table unreadable: {e}"),
                            client: name,
                            route: None,
                            faults: timeline.describe(before),
                            samples: 1,
                        });
                        continue;
                    }
                };
                let mut counts = CheckCounts {
                    samples: 1,
                    ..CheckCounts::default()
                };
                for ((vni, prefix), hops) in expected[h].iter() {
                    for (hop, by) in hops {
                        let up = by.iter().any(|a| {
                            timeline.path_up(*a, h, layout.reflectors, before)
                                && timeline.path_up(*a, h, layout.reflectors, after)
                        });
                        if !up {
                            counts.skipped += 1;
                            continue;
                        }
                        counts.route_checks += 1;
                        let present = kernel
                            .get(&(*vni, *prefix))
                            .is_some_and(|got| got.contains(hop));
                        if !present {
                            let by: Vec<String> = by.iter().map(ToString::to_string).collect();
                            self.violation(Violation {
                                at,
                                what: format!(
                                    "next hop missing from the kernel while a reflector path from {} was up",
                                    by.join(",")
                                ),
                                client: name.clone(),
                                route: Some(format!("vni {vni} {prefix} via {hop}")),
                                faults: timeline.describe(before),
                                samples: 1,
                            });
                        }
                    }
                }
                let mut total = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                total.samples += counts.samples;
                total.route_checks += counts.route_checks;
                total.skipped += counts.skipped;
            }
            self.check_processes(&fleet, &timeline, max_rss);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every process: exited without the harness stopping it? Over the
    /// memory bound?
    pub fn check_processes(&self, fleet: &Fleet, timeline: &Timeline, max_rss: u64) {
        let now = Instant::now();
        let at = now.duration_since(timeline.origin).as_secs_f64();
        for node in fleet.nodes() {
            let mut n = lock(node);
            if let Some(status) = n.reap() {
                let name = n.name.clone();
                let log = n.log.display().to_string();
                drop(n);
                self.violation(Violation {
                    at,
                    what: format!("exited on its own ({status}); log {log}"),
                    client: name,
                    route: None,
                    faults: timeline.describe(now),
                    samples: 1,
                });
                continue;
            }
            if let Some(rss) = n.sample_rss() {
                if rss > max_rss {
                    let name = n.name.clone();
                    drop(n);
                    self.violation(Violation {
                        at,
                        what: format!(
                            "RSS {} MiB over the bound of {} MiB",
                            rss >> 20,
                            max_rss >> 20
                        ),
                        client: name,
                        route: None,
                        faults: timeline.describe(now),
                        samples: 1,
                    });
                }
            }
        }
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_checks += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WARMUP: Duration = Duration::from_secs(5);

    /// A timeline with `fault` from `start` to `end` seconds after origin.
    fn timeline(faults: &[(FaultKind, u64, Option<u64>)]) -> Timeline {
        let t = Timeline::new(WARMUP);
        for (id, (kind, start, end)) in faults.iter().enumerate() {
            t.lock().push(Happened {
                fault: Fault {
                    id,
                    at: Duration::from_secs(*start),
                    lasts: Duration::ZERO,
                    kind: kind.clone(),
                },
                start: t.origin + Duration::from_secs(*start),
                end: end.map(|e| t.origin + Duration::from_secs(e)),
            });
        }
        t
    }

    fn at(t: &Timeline, secs: u64) -> Instant {
        t.origin + Duration::from_secs(secs)
    }

    const H1: Announcer = Announcer::Hypervisor(1);

    #[test]
    fn one_reflector_down_leaves_a_path_and_a_partition_from_the_others_does_not() {
        let t = timeline(&[
            (FaultKind::ReflectorKill { reflector: 0 }, 10, Some(20)),
            (
                FaultKind::Partition {
                    hypervisor: 2,
                    reflectors: vec![1, 2],
                },
                12,
                Some(14),
            ),
        ]);
        assert!(t.path_up(H1, 2, 3, at(&t, 11)), "r1 and r2 carry it");
        assert!(
            !t.path_up(H1, 2, 3, at(&t, 13)),
            "r0 down, h2 cut from r1, r2"
        );
        assert!(
            !t.path_up(H1, 2, 3, at(&t, 18)),
            "the partition healed 4 s ago: still warming up"
        );
        assert!(t.path_up(H1, 2, 3, at(&t, 20)), "warmed up via r1");
        assert!(t.path_up(H1, 3, 3, at(&t, 13)), "h3 is not cut");
    }

    #[test]
    fn a_dead_announcer_or_a_bounced_tunnel_suspends_the_check() {
        let t = timeline(&[
            (FaultKind::ClientKill { hypervisor: 1 }, 10, Some(12)),
            (FaultKind::TunnelBounce { hypervisor: 4 }, 30, None),
            (FaultKind::FlapBurst { flapper: 0 }, 50, Some(51)),
            (FaultKind::PolicyReload { reflector: 0 }, 60, Some(60)),
        ]);
        assert!(!t.path_up(H1, 2, 3, at(&t, 16)), "h1 restarted 4 s ago");
        assert!(t.path_up(H1, 2, 3, at(&t, 18)));
        assert!(!t.path_up(H1, 4, 3, at(&t, 40)), "h4's tunnel is down");
        assert!(
            t.path_up(Announcer::Hypervisor(4), 2, 3, at(&t, 40)),
            "h4 still announces"
        );
        assert!(!t.path_up(Announcer::Flapper(0), 2, 3, at(&t, 52)));
        assert!(
            t.path_up(H1, 2, 3, at(&t, 60)),
            "a policy reload must not disturb anything"
        );
        assert_eq!(
            t.describe(at(&t, 52)).len(),
            2,
            "{:?}",
            t.describe(at(&t, 52))
        );
    }

    #[test]
    fn differences_name_missing_extra_and_wrong_ecmp() {
        let p = |s: &str| -> IpNet { s.parse().unwrap() };
        let a = |n: u16| Ipv6Addr::new(0xfd00, 0, 0, n, 0, 0, 0, 2);
        let mut expected = Expected::new();
        for (prefix, hops) in [("10.0.1.0/24", vec![1, 2]), ("10.0.2.0/24", vec![3])] {
            let e = expected.entry((100, p(prefix))).or_default();
            for h in hops {
                e.entry(a(h))
                    .or_default()
                    .insert(Announcer::Hypervisor(h as usize));
            }
        }
        let mut kernel = Kernel::new();
        kernel.insert((100, p("10.0.1.0/24")), [a(1)].into());
        kernel.insert((100, p("10.0.9.0/24")), [a(9)].into());
        let d = differences(&expected, &kernel);
        let text = format!("{d:?}");
        assert_eq!(d.len(), 3, "{text}");
        assert!(
            text.contains("10.0.2.0/24") && text.contains("missing"),
            "{text}"
        );
        assert!(
            text.contains("10.0.9.0/24") && text.contains("extra"),
            "{text}"
        );
        assert!(text.contains("next hops"), "{text}");
        kernel.insert((100, p("10.0.1.0/24")), [a(1), a(2)].into());
        kernel.insert((100, p("10.0.2.0/24")), [a(3)].into());
        kernel.remove(&(100, p("10.0.9.0/24")));
        assert!(differences(&expected, &kernel).is_empty());
    }
}
