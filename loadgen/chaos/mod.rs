//! `loadgen chaos`: a fleet of real `metalbond` processes in network
//! namespaces, faults drawn from a seed, and a checker that every
//! hypervisor's kernel holds what it must — during the faults (no route
//! leaves a kernel while a reflector path to its announcer is up) and
//! exactly after them.
//!
//! ```text
//!   main ─ Fleet::build (namespaces, links, policy) ─ start_all
//!     │                                     wait for the first convergence
//!     ├─ Sampler thread: read each hypervisor's tables in turn; check every
//!     │    expected next hop whose path is up (Timeline::path_up); reap
//!     │    processes, sample RSS                          → Violations
//!     ├─ injector (this thread): schedule::draw(seed) → start/end events
//!     │    in time order, each recorded in the Timeline around its action
//!     └─ settle: every fault undone, wait until each kernel equals the
//!          model (bounded), list every difference          → Report
//! ```
//!
//! Owns: the run's options, its phases and the report. Must never run
//! without a time bound, or leave a namespace or process behind (the
//! `Fleet` cleans up on drop, also after a panic).

mod checker;
mod fleet;
mod model;
mod schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ipnet::IpNet;

use checker::{differences, read_kernel, CheckCounts, Sampler, Timeline, Violation};
use fleet::{lock, Fleet, Node, Timing};
use model::{Announcement, Announcer, Expected, Layout};
use schedule::{Fault, FaultKind, Shape};

/// Options of `loadgen chaos`.
#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Seed of the fault schedule (printed; the same seed replays the same
    /// schedule). Default: drawn from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of faults.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Hypervisors (each a `metalbond client` installing routes).
    #[arg(long, default_value_t = 24)]
    hypervisors: usize,
    /// Flapping announcers.
    #[arg(long, default_value_t = 2)]
    flappers: usize,
    /// Keepalive interval of every session, seconds.
    #[arg(long, default_value_t = 1)]
    keepalive: u64,
    /// The clients' --stale-hold, seconds.
    #[arg(long, default_value_t = 8)]
    stale_hold: u64,
    /// The reflectors' --peer-grace, seconds.
    #[arg(long, default_value_t = 3)]
    peer_grace: u64,
    /// Memory bound of every process, MiB.
    #[arg(long, default_value_t = 256)]
    max_rss_mib: u64,
    /// The `metalbond` binary (default: next to this loadgen).
    #[arg(long)]
    metalbond: Option<PathBuf>,
    /// Print the report as one JSON record.
    #[arg(long)]
    json: bool,
    /// Checks the checker: halfway through, delete one route by hand in a
    /// hypervisor's kernel without telling the checker (the run must then
    /// fail, naming that route).
    #[arg(long, hide = true)]
    self_test_delete: bool,
}

/// The run's outcome.
#[derive(Debug, serde::Serialize)]
struct ChaosReport {
    passed: bool,
    seed: u64,
    duration_seconds: u64,
    reflectors: usize,
    hypervisors: usize,
    flappers: usize,
    /// Seconds to the first convergence, before any fault.
    first_convergence_seconds: f64,
    /// Seconds from the last fault's end to the exact state.
    settle_seconds: Option<f64>,
    faults_by_kind: BTreeMap<&'static str, u64>,
    delay_faults: &'static str,
    checks: CheckCounts,
    violations: Vec<Violation>,
    peak_rss_mib: BTreeMap<String, f64>,
    logs: String,
    faults: Vec<Fault>,
}

/// Runs `loadgen chaos`: exit 0 with no violation, 1 with violations, 2
/// when the run could not be made (no root, no `nft`, …).
pub fn main(args: ChaosArgs) -> ExitCode {
    match run(&args) {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{text}");
            }
            for v in &report.violations {
                eprintln!(
                    "chaos: VIOLATION seed {} at {:.1}s on {}: {}{}; faults in force: {}",
                    report.seed,
                    v.at,
                    v.client,
                    v.route
                        .as_deref()
                        .map_or(String::new(), |r| format!("{r}: ")),
                    v.what,
                    if v.faults.is_empty() {
                        "none".to_string()
                    } else {
                        v.faults.join("; ")
                    }
                );
            }
            eprintln!(
                "chaos: seed {} — {} faults, {} route checks, {} violations{}",
                report.seed,
                report.faults.len(),
                report.checks.route_checks,
                report.violations.len(),
                if report.passed { "" } else { " (FAILED)" }
            );
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadgen chaos: {e}");
            ExitCode::from(2)
        }
    }
}

fn metalbond_bin(args: &ChaosArgs) -> Result<PathBuf, String> {
    let bin = match &args.metalbond {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("own path: {e}"))?
            .with_file_name("metalbond"),
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is not built (or pass --metalbond PATH)",
            bin.display()
        ))
    }
}

/// Every announcement of the fleet, with each node's real address.
fn all_announcements(fleet: &Fleet, layout: &Layout) -> Vec<Announcement> {
    let mut all = Vec::new();
    for (h, node) in fleet.hypervisors.iter().enumerate() {
        all.extend(layout.announcements_of(Announcer::Hypervisor(h), lock(node).addr));
    }
    for (f, node) in fleet.flappers.iter().enumerate() {
        all.extend(layout.announcements_of(Announcer::Flapper(f), lock(node).addr));
    }
    all
}

/// Waits (at most `limit`) until every hypervisor's kernel equals the
/// model; the differences left when it does not.
fn converge(
    fleet: &Fleet,
    layout: &Layout,
    expected: &[Expected],
    limit: Duration,
) -> Result<Duration, Vec<(String, String, String)>> {
    let start = Instant::now();
    loop {
        let mut left = Vec::new();
        for (h, node) in fleet.hypervisors.iter().enumerate() {
            let (ns, name) = {
                let n = lock(node);
                (n.ns.clone(), n.name.clone())
            };
            match read_kernel(&ns, &layout.subscriptions(h)) {
                Ok(kernel) => left.extend(
                    differences(&expected[h], &kernel)
                        .into_iter()
                        .map(|(route, what)| (name.clone(), route, what)),
                ),
                Err(e) => left.push((name, String::new(), e)),
            }
        }
        if left.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(left);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Applies the start (`start`) or the end of `fault`.
fn apply(fleet: &Fleet, layout: &Layout, fault: &Fault, start: bool) -> Result<(), String> {
    let hyp = |h: usize| -> &std::sync::Mutex<Node> { &fleet.hypervisors[h] };
    match (&fault.kind, start) {
        (FaultKind::ReflectorKill { reflector }, true) => {
            fleet.stop(&fleet.reflectors[*reflector], true);
            Ok(())
        }
        (FaultKind::ReflectorKill { reflector }, false) => {
            fleet.restart(&fleet.reflectors[*reflector])
        }
        (FaultKind::ReflectorRestart { reflector }, true) => {
            fleet.stop(&fleet.reflectors[*reflector], false);
            fleet.restart(&fleet.reflectors[*reflector])
        }
        (FaultKind::ReflectorRestart { .. }, false) => Ok(()),
        (
            FaultKind::Partition {
                hypervisor,
                reflectors,
            },
            true,
        ) => {
            let peers: Vec<_> = reflectors
                .iter()
                .map(|r| lock(&fleet.reflectors[*r]).addr)
                .collect();
            fleet.partition(hyp(*hypervisor), &peers)
        }
        (FaultKind::Partition { hypervisor, .. }, false) => {
            fleet.heal(hyp(*hypervisor), "chaos_partition")
        }
        (
            FaultKind::Loss {
                hypervisor,
                percent,
            },
            true,
        ) => fleet.loss(hyp(*hypervisor), *percent),
        (FaultKind::Loss { hypervisor, .. }, false) => fleet.heal(hyp(*hypervisor), "chaos_loss"),
        (FaultKind::Delay { hypervisor, millis }, true) => {
            fleet.delay(hyp(*hypervisor), Some(*millis))
        }
        (FaultKind::Delay { hypervisor, .. }, false) => fleet.delay(hyp(*hypervisor), None),
        (FaultKind::ClientKill { hypervisor }, true) => {
            fleet.stop(hyp(*hypervisor), true);
            Ok(())
        }
        (FaultKind::ClientKill { hypervisor }, false) => fleet.restart(hyp(*hypervisor)),
        (FaultKind::FlapBurst { flapper }, true) => {
            fleet.stop(&fleet.flappers[*flapper], false);
            Ok(())
        }
        (FaultKind::FlapBurst { flapper }, false) => fleet.restart(&fleet.flappers[*flapper]),
        (FaultKind::PolicyReload { reflector }, true) => {
            fleet.reload(&fleet.reflectors[*reflector], layout)
        }
        (FaultKind::PolicyReload { .. }, false) => Ok(()),
        (FaultKind::TunnelBounce { hypervisor }, up) => fleet.tunnel(hyp(*hypervisor), !up),
    }
}

fn run(args: &ChaosArgs) -> Result<ChaosReport, String> {
    if args.hypervisors < 4 || args.hypervisors > 200 || args.flappers == 0 || args.flappers > 8 {
        return Err("--hypervisors must be 4..=200 and --flappers 1..=8".into());
    }
    if args.duration > 24 * 3600 || args.keepalive == 0 || args.keepalive > 60 {
        return Err("--duration at most a day, --keepalive 1..=60".into());
    }
    let bin = metalbond_bin(args)?;
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!(
                "`{tool}` is not installed (the chaos run needs iproute2 and nftables)"
            ));
        }
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!(
        "chaos: seed {seed} (replay: loadgen chaos --seed {seed} --duration {} --hypervisors {} --flappers {})",
        args.duration, args.hypervisors, args.flappers
    );
    let layout = Layout {
        reflectors: 3,
        hypervisors: args.hypervisors,
        flappers: args.flappers,
        vnis: 4,
    };
    let timing = Timing {
        keepalive: args.keepalive,
        stale_hold: args.stale_hold,
        peer_grace: args.peer_grace,
    };
    let fleet = Arc::new(Fleet::build(&bin, &layout, timing)?);
    let netem = fleet::netem_available(fleet.underlay());
    let hold = Duration::from_millis(args.keepalive * 2500);
    let faults = schedule::draw(
        seed,
        Duration::from_secs(args.duration),
        Shape {
            reflectors: layout.reflectors,
            hypervisors: layout.hypervisors,
            flappers: layout.flappers,
            hold,
            netem,
        },
    );
    let all = all_announcements(&fleet, &layout);
    let expected: Arc<Vec<Expected>> = Arc::new(
        (0..layout.hypervisors)
            .map(|h| layout.expected(h, &all))
            .collect(),
    );
    fleet.start_all()?;
    let first = converge(&fleet, &layout, &expected, Duration::from_secs(60)).map_err(|left| {
        format!(
            "the fleet did not converge before any fault ({} differences, first: {:?}); logs in {}",
            left.len(),
            left.first(),
            fleet.dir.display()
        )
    })?;
    eprintln!(
        "chaos: converged in {:.1}s; {} faults follow",
        first.as_secs_f64(),
        faults.len()
    );

    // A path is judged only once its last disturbance is this far behind:
    // the hold time (a session lost to a fault ends), a reconnect (backoff
    // at most 1 s) and a sync.
    let warmup = hold + Duration::from_secs(4);
    let timeline = Arc::new(Timeline::new(warmup));
    let sampler = Sampler::new();
    let max_rss = args.max_rss_mib << 20;
    let sampling = {
        let (s, f, e, t) = (
            sampler.clone(),
            fleet.clone(),
            expected.clone(),
            timeline.clone(),
        );
        std::thread::spawn(move || s.run(f, layout, e, t, max_rss))
    };
    let mut watchers = Vec::new();
    let mut monitors = Vec::new();
    for (h, node) in fleet.hypervisors.iter().enumerate() {
        let (ns, name) = {
            let n = lock(node);
            (n.ns.clone(), n.name.clone())
        };
        let (thread, pid) = checker::watch_deletions(
            sampler.clone(),
            h,
            ns,
            name,
            layout,
            expected.clone(),
            timeline.clone(),
        )?;
        watchers.push(thread);
        monitors.push(pid);
    }
    if args.self_test_delete {
        // Deleted by hand, unknown to the timeline: the checker must say so.
        let fault_phase_middle = timeline.origin + Duration::from_secs(args.duration / 2);
        let node = &fleet.hypervisors[1];
        let ns = lock(node).ns.clone();
        // Every hypervisor expects routes (the layout gives each VNI
        // several announcers).
        let (vni, prefix) = expected[1]
            .keys()
            .next()
            .copied()
            .unwrap_or((100, IpNet::default()));
        let timeline = timeline.clone();
        watchers.push(std::thread::spawn(move || {
            if let Some(wait) = fault_phase_middle.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            eprintln!("chaos: self-test: deleting vni {vni} {prefix} by hand on h1");
            let _ = Command::new("ip")
                .args([
                    "-n",
                    &ns,
                    "route",
                    "del",
                    &prefix.to_string(),
                    "table",
                    &vni.to_string(),
                ])
                .output();
            drop(timeline);
        }));
    }

    // Start and end events in time order.
    let mut events: Vec<(Duration, bool, usize)> = Vec::new();
    for f in &faults {
        events.push((f.at, true, f.id));
        events.push((f.at + f.lasts, false, f.id));
    }
    events.sort_by_key(|(at, start, id)| (*at, !*start, *id));
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (at, start, id) in events {
        let due = timeline.origin + at;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let fault = &faults[id];
        if start {
            timeline.started(fault);
            *by_kind.entry(fault.kind.name()).or_default() += 1;
        }
        if let Err(e) = apply(&fleet, &layout, fault, start) {
            sampler.violation(Violation {
                at: timeline.origin.elapsed().as_secs_f64(),
                what: format!("the harness could not apply fault #{id}: {e}"),
                client: "harness".into(),
                route: None,
                faults: Vec::new(),
                samples: 1,
            });
        }
        if !start {
            timeline.ended(id);
        }
    }
    // Settle: every fault is undone; the stale hold, the peer grace and a
    // sync bound how long the last leftovers may take.
    let faults_over = Instant::now();
    let limit = Duration::from_secs(args.stale_hold + args.peer_grace + 30);
    let settled = converge(&fleet, &layout, &expected, limit);
    sampler.stop();
    let _ = sampling.join();
    for pid in monitors {
        // SAFETY: kill(2) on our own `ip monitor` child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    for w in watchers {
        let _ = w.join();
    }
    sampler.check_processes(&fleet, &timeline, max_rss);
    let mut violations = sampler
        .violations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let settle_seconds = match settled {
        Ok(_) => Some(faults_over.elapsed().as_secs_f64()),
        Err(left) => {
            let at = timeline.origin.elapsed().as_secs_f64();
            violations.extend(left.into_iter().map(|(client, route, what)| Violation {
                at,
                what: format!(
                    "after the faults and {}s of settling: {what}",
                    limit.as_secs()
                ),
                client,
                route: Some(route),
                faults: Vec::new(),
                samples: 1,
            }));
            None
        }
    };
    let mut peak: BTreeMap<String, f64> = BTreeMap::new();
    for (role, nodes) in [
        ("reflector", &fleet.reflectors),
        ("hypervisor_client", &fleet.hypervisors),
        ("flapper", &fleet.flappers),
    ] {
        let max = nodes.iter().map(|n| lock(n).peak_rss).max().unwrap_or(0);
        peak.insert(role.into(), (max as f64 / 1048576.0 * 10.0).round() / 10.0);
    }
    let counts = *sampler.counts.lock().unwrap_or_else(|e| e.into_inner());
    let passed = violations.is_empty();
    // The processes' logs are kept for a failed run only.
    let logs = if passed {
        let _ = std::fs::remove_dir_all(&fleet.dir);
        "removed (the run passed)".to_string()
    } else {
        fleet.dir.display().to_string()
    };
    Ok(ChaosReport {
        passed,
        seed,
        duration_seconds: args.duration,
        reflectors: layout.reflectors,
        hypervisors: layout.hypervisors,
        flappers: layout.flappers,
        first_convergence_seconds: (first.as_secs_f64() * 10.0).round() / 10.0,
        settle_seconds,
        faults_by_kind: by_kind,
        delay_faults: if netem {
            "tc netem"
        } else {
            "not injected: this kernel has no sch_netem"
        },
        checks: counts,
        violations,
        peak_rss_mib: peak,
        logs,
        faults,
    })
}

use std::process::Command;
