//! The controller: runs a scenario's phases by commanding the shards, waits
//! for convergence, samples the server's memory, prints progress, and puts
//! the findings of the final check into the report.
//!
//! ```text
//!  main thread: Controller --Command per shard--> shard 0 .. shard N-1
//!               waits on Reply, polls Counters (200 us) for convergence,
//!               samples /proc/PID/status (100 ms), progress line (1 s)
//! ```
//!
//! Owns: the order of phases of each scenario (fleet, burst, churn,
//! reconnect, idle), what "converged" means for each, and the time limit.
//!
//! Must never: touch sockets or peers itself (shards do), or wait past the
//! run's deadline.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use metalbond_wire::Action;

use crate::checker::Difference;
use crate::plan::{peer_id, PeerId, RouteId};
use crate::report::{proc_status_bytes, LatencySummary, PhaseReport};
use crate::shard::{Command, Reply, Shared};

/// How long after the deadline a shard may take to answer before the run
/// is abandoned (shards stop waiting at the deadline themselves).
const SHARD_GRACE: Duration = Duration::from_secs(10);

/// How long the server's RSS must not rise after the peers closed before
/// its high-water mark counts as final (`server_hwm_after_close`).
const QUIET_AFTER_CLOSE: Duration = Duration::from_millis(500);

/// Counter values at one instant, to measure a phase by difference.
#[derive(Clone, Copy, Default, Debug)]
struct Snapshot {
    /// ADDs received so far.
    adds: u64,
    /// REMOVEs received so far.
    removes: u64,
    /// UPDATEs sent so far.
    sent: u64,
    /// Sessions lost so far.
    lost: usize,
}

/// Runs phases by commanding the shards.
pub struct Controller {
    /// What shards and controller share (plan, counters, deadline).
    shared: Arc<Shared>,
    /// One command channel per shard.
    commands: Vec<Sender<Command>>,
    /// Replies of all shards, tagged with the shard index.
    replies: Receiver<(usize, Reply)>,
    /// Quiet time a converged state must hold before it counts.
    settle: Duration,
    /// The server's pid as text, for /proc.
    server_pid: Option<String>,
    /// Highest server VmRSS sampled.
    pub rss_peak: Option<u64>,
    /// The server's VmRSS when the controller was made (before any peer).
    pub rss_start: Option<u64>,
    /// When the server's RSS was last sampled.
    last_rss: Instant,
    /// When the last progress line was printed.
    last_progress: Instant,
    /// Name of the running phase, for progress lines.
    phase: String,
    /// Start of the run.
    started: Instant,
    /// Print progress lines on stderr.
    progress: bool,
    /// Set when the deadline cut a wait short.
    pub time_limit_hit: bool,
    /// Findings of the controller itself (failed connects, no convergence).
    pub findings: Vec<String>,
}

impl Controller {
    /// A controller for shards listening on `commands`.
    pub fn new(
        shared: Arc<Shared>,
        commands: Vec<Sender<Command>>,
        replies: Receiver<(usize, Reply)>,
        settle: Duration,
        server_pid: Option<u32>,
        progress: bool,
    ) -> Controller {
        let now = Instant::now();
        let server_pid = server_pid.map(|p| p.to_string());
        let rss_start = server_pid
            .as_deref()
            .and_then(|pid| proc_status_bytes(pid, "VmRSS"));
        Controller {
            shared,
            commands,
            replies,
            settle,
            server_pid,
            rss_peak: None,
            rss_start,
            last_rss: now,
            last_progress: now,
            phase: "connect".into(),
            started: now,
            progress,
            time_limit_hit: false,
            findings: Vec::new(),
        }
    }

    fn shards(&self) -> usize {
        self.commands.len()
    }

    /// All peers of the plan.
    pub fn all_peers(&self) -> Vec<PeerId> {
        (0..self.shared.plan.peer_count()).map(peer_id).collect()
    }

    /// Sum over peers of the routes each must hold: the ADDs a fresh fleet
    /// needs at least.
    pub fn must_total(&self) -> u64 {
        let plan = &self.shared.plan;
        (0..plan.peer_count())
            .map(|p| plan.must_count(peer_id(p)) as u64)
            .sum()
    }

    fn by_shard(&self, peers: &[PeerId]) -> Vec<Vec<PeerId>> {
        let mut out = vec![Vec::new(); self.shards()];
        for p in peers {
            out[p.0 as usize % self.shards()].push(*p);
        }
        out
    }

    /// Samples the server's RSS and prints a progress line when due.
    fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_rss) >= Duration::from_millis(100) {
            self.last_rss = now;
            self.sample_rss();
        }
        if self.progress && now.duration_since(self.last_progress) >= Duration::from_secs(1) {
            self.last_progress = now;
            let c = &self.shared.counters;
            let mut line = format!(
                "[{:>6.1}s {}] established {} satisfied {}/{} sent {} received {}",
                now.duration_since(self.started).as_secs_f64(),
                self.phase,
                c.established.load(Ordering::Relaxed),
                c.satisfied.load(Ordering::Relaxed),
                self.shared.plan.peer_count(),
                c.sent_updates.load(Ordering::Relaxed),
                c.adds.load(Ordering::Relaxed) + c.removes.load(Ordering::Relaxed),
            );
            if let Some(rss) = self.rss_peak {
                line.push_str(&format!(" server-rss {:.1}MiB", rss as f64 / 1048576.0));
            }
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }

    fn sample_rss(&mut self) {
        if let Some(pid) = &self.server_pid {
            if let Some(rss) = proc_status_bytes(pid, "VmRSS") {
                self.rss_peak = Some(self.rss_peak.map_or(rss, |p| p.max(rss)));
            }
        }
    }

    /// The server's VmHWM now.
    pub fn server_hwm(&self) -> Option<u64> {
        self.server_pid
            .as_deref()
            .and_then(|pid| proc_status_bytes(pid, "VmHWM"))
    }

    /// Waits (at most 5 s) until the server has taken in the closing of
    /// every peer, then returns its VmHWM: done once its RSS has not risen
    /// for half a second. The departures' peak comes a moment after the
    /// sockets close, not when they do.
    pub fn server_hwm_after_close(&self) -> Option<u64> {
        let pid = self.server_pid.as_deref()?;
        let start = Instant::now();
        let mut high = proc_status_bytes(pid, "VmRSS")?;
        let mut risen = start;
        while start.elapsed() < Duration::from_secs(5) && risen.elapsed() < QUIET_AFTER_CLOSE {
            std::thread::sleep(Duration::from_millis(20));
            let rss = proc_status_bytes(pid, "VmRSS")?;
            if rss > high {
                high = rss;
                risen = Instant::now();
            }
        }
        self.server_hwm()
    }

    /// Sends one command per shard (`make(shard)`; `None` skips the shard)
    /// and collects the replies.
    fn broadcast(
        &mut self,
        mut make: impl FnMut(usize) -> Option<Command>,
    ) -> Result<Vec<Reply>, String> {
        let mut expected = 0;
        for i in 0..self.shards() {
            if let Some(cmd) = make(i) {
                self.commands[i]
                    .send(cmd)
                    .map_err(|_| format!("shard {i} has stopped"))?;
                expected += 1;
            }
        }
        let mut out = Vec::with_capacity(expected);
        while out.len() < expected {
            match self.replies.recv_timeout(Duration::from_millis(50)) {
                Ok((_, reply)) => out.push(reply),
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    if Instant::now() > self.shared.deadline + SHARD_GRACE {
                        return Err("a shard did not answer within the time limit".into());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("a shard stopped unexpectedly".into())
                }
            }
        }
        Ok(out)
    }

    /// Opens sessions for `peers`; returns how many are established.
    pub fn connect(&mut self, peers: &[PeerId], start: bool) -> Result<usize, String> {
        let mut split = self.by_shard(peers);
        let replies = self.broadcast(|i| {
            let peers = std::mem::take(&mut split[i]);
            (!peers.is_empty()).then_some(Command::Connect { peers, start })
        })?;
        let mut failed = 0;
        for r in replies {
            if let Reply::Connected { failed: f } = r {
                failed += f.len();
                for (p, reason) in f.iter().take(10) {
                    self.findings.push(format!("peer {}: {reason}", p.0));
                }
            }
        }
        Ok(peers.len() - failed)
    }

    /// Sets the send time of every route to now: a late subscriber's sync is
    /// then timed from its SUBSCRIBE rather than from the announcements.
    pub fn restamp_all(&self) {
        let stamp = self.shared.ns(Instant::now()) + 1;
        for t in &self.shared.sent_at {
            t.store(stamp, Ordering::Relaxed);
        }
    }

    /// Established peers send subscriptions and/or announcements.
    pub fn start(
        &mut self,
        peers: &[PeerId],
        subscribe: bool,
        announce: bool,
    ) -> Result<(), String> {
        let mut split = self.by_shard(peers);
        self.broadcast(|i| {
            let peers = std::mem::take(&mut split[i]);
            (!peers.is_empty()).then_some(Command::Start {
                peers,
                subscribe,
                announce,
            })
        })?;
        Ok(())
    }

    /// One peer sends `routes` with `action`.
    pub fn announce(
        &mut self,
        peer: PeerId,
        routes: Vec<RouteId>,
        action: Action,
    ) -> Result<(), String> {
        let shard = peer.0 as usize % self.shards();
        let mut routes = Some(routes);
        self.broadcast(|i| {
            (i == shard).then(|| Command::Announce {
                peer,
                routes: routes.take().unwrap_or_default(),
                action,
            })
        })?;
        Ok(())
    }

    /// Closes these peers' sessions on purpose.
    pub fn drop_sessions(&mut self, peers: &[PeerId]) -> Result<(), String> {
        let mut split = self.by_shard(peers);
        self.broadcast(|i| {
            let peers = std::mem::take(&mut split[i]);
            (!peers.is_empty()).then_some(Command::Drop { peers })
        })?;
        Ok(())
    }

    /// Churn on every shard at `rate` updates/s in total; returns the UPDATEs
    /// sent and the ADDs and REMOVEs they must cause.
    pub fn churn(
        &mut self,
        rate: f64,
        duration: Duration,
        window: usize,
    ) -> Result<(u64, u64, u64), String> {
        let per_shard = rate / self.shards() as f64;
        let window = window.div_ceil(self.shards());
        let replies = self.broadcast(|_| {
            Some(Command::Churn {
                rate: per_shard,
                duration,
                window,
            })
        })?;
        let mut totals = (0, 0, 0);
        for r in replies {
            if let Reply::Churned {
                sent,
                expected_adds,
                expected_removes,
            } = r
            {
                totals.0 += sent;
                totals.1 += expected_adds;
                totals.2 += expected_removes;
            }
        }
        Ok(totals)
    }

    /// Merged latency histogram since the last call.
    pub fn take_latency(&mut self) -> Result<Histogram<u64>, String> {
        let replies = self.broadcast(|_| Some(Command::TakeLatency))?;
        let mut merged: Option<Histogram<u64>> = None;
        for r in replies {
            if let Reply::Latency(h) = r {
                match &mut merged {
                    None => merged = Some(*h),
                    Some(m) => m.add(&*h).map_err(|e| format!("merging latencies: {e}"))?,
                }
            }
        }
        merged.ok_or_else(|| "no shard answered".to_string())
    }

    /// The final check over all shards: findings and sessions established.
    pub fn verify(&mut self) -> Result<(Vec<Difference>, usize), String> {
        let replies = self.broadcast(|_| Some(Command::Verify))?;
        let mut diffs = Vec::new();
        let mut established = 0;
        for r in replies {
            if let Reply::Verified {
                differences,
                established: e,
            } = r
            {
                diffs.extend(differences);
                established += e;
            }
        }
        Ok((diffs, established))
    }

    /// Stops every shard.
    pub fn shutdown(&mut self) {
        let _ = self.broadcast(|_| Some(Command::Shutdown));
    }

    fn snapshot(&self) -> Snapshot {
        let c = &self.shared.counters;
        Snapshot {
            adds: c.adds.load(Ordering::Relaxed),
            removes: c.removes.load(Ordering::Relaxed),
            sent: c.sent_updates.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
        }
    }

    /// Marks the start of a measured phase.
    pub fn begin(&mut self, name: &str) -> PhaseStart {
        self.phase = name.to_string();
        PhaseStart {
            name: name.to_string(),
            at: Instant::now(),
            base: self.snapshot(),
        }
    }

    /// Waits until `live` sessions are established and satisfied and at
    /// least `min_adds` ADDs and `min_removes` REMOVEs arrived since the
    /// phase began, and the state held for the settle time. With
    /// `need_satisfied = false` only the counts matter (a probe phase).
    pub fn converge(
        &mut self,
        phase: &PhaseStart,
        live: usize,
        min_adds: u64,
        min_removes: u64,
        need_satisfied: bool,
    ) -> Result<PhaseReport, String> {
        let shared = self.shared.clone();
        let c = &shared.counters;
        let mut reached: Option<(Instant, Snapshot)> = None;
        let converged = loop {
            let now = Instant::now();
            let snap = self.snapshot();
            let ok = c.established.load(Ordering::Relaxed) >= live
                && (!need_satisfied || c.satisfied.load(Ordering::Relaxed) >= live)
                && snap.adds - phase.base.adds >= min_adds
                && snap.removes - phase.base.removes >= min_removes;
            if ok {
                let (at, _) = *reached.get_or_insert((now, snap));
                if now.duration_since(at) >= self.settle {
                    break true;
                }
            } else {
                reached = None;
            }
            if snap.lost > phase.base.lost {
                // A lost session cannot come back: the phase can no longer
                // converge, so stop waiting (the final check names it).
                self.findings.push(format!(
                    "phase {}: {} session(s) lost, stopped waiting for convergence",
                    phase.name,
                    snap.lost - phase.base.lost
                ));
                break false;
            }
            if now >= self.shared.deadline {
                self.time_limit_hit = true;
                self.findings.push(format!(
                    "phase {}: no convergence within the time limit ({} of {live} peers satisfied, {} of {min_adds} ADDs, {} of {min_removes} REMOVEs)",
                    phase.name,
                    c.satisfied.load(Ordering::Relaxed),
                    snap.adds - phase.base.adds,
                    snap.removes - phase.base.removes,
                ));
                break false;
            }
            self.tick();
            std::thread::sleep(Duration::from_micros(200));
        };
        let (end, snap) = match reached {
            Some(r) if converged => r,
            _ => (Instant::now(), self.snapshot()),
        };
        let latency = self.take_latency()?;
        let seconds = end.duration_since(phase.at).as_secs_f64();
        let delivered = (snap.adds - phase.base.adds) + (snap.removes - phase.base.removes);
        Ok(PhaseReport {
            name: phase.name.clone(),
            converged,
            seconds,
            sent_updates: snap.sent - phase.base.sent,
            delivered_updates: delivered,
            delivered_per_sec: if seconds > 0.0 {
                delivered as f64 / seconds
            } else {
                0.0
            },
            latency: LatencySummary::from_ns(&latency),
            notes: Vec::new(),
        })
    }

    /// Reports a connect phase: how long it took to establish the sessions.
    pub fn connected(&mut self, phase: &PhaseStart, all: bool) -> Result<PhaseReport, String> {
        let latency = self.take_latency()?;
        Ok(PhaseReport {
            name: phase.name.clone(),
            converged: all,
            seconds: phase.at.elapsed().as_secs_f64(),
            sent_updates: 0,
            delivered_updates: 0,
            delivered_per_sec: 0.0,
            latency: LatencySummary::from_ns(&latency),
            notes: Vec::new(),
        })
    }

    /// Holds the sessions for `duration` (keepalives flow), then reports.
    pub fn hold(&mut self, phase: &PhaseStart, duration: Duration) -> Result<PhaseReport, String> {
        let end = (Instant::now() + duration).min(self.shared.deadline);
        while Instant::now() < end {
            self.tick();
            std::thread::sleep(Duration::from_millis(10));
        }
        let latency = self.take_latency()?;
        let snap = self.snapshot();
        let seconds = phase.at.elapsed().as_secs_f64();
        let lost = self.shared.counters.lost.load(Ordering::Relaxed);
        Ok(PhaseReport {
            name: phase.name.clone(),
            converged: lost == 0,
            seconds,
            sent_updates: snap.sent - phase.base.sent,
            delivered_updates: 0,
            delivered_per_sec: 0.0,
            latency: LatencySummary::from_ns(&latency),
            notes: Vec::new(),
        })
    }
}

/// Where a measured phase began.
pub struct PhaseStart {
    /// The phase's name for the report.
    name: String,
    /// When its first update was sent.
    at: Instant,
    /// Counters at that instant.
    base: Snapshot,
}
