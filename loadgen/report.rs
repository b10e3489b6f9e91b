//! What a run reports: per-phase figures (time to converge, delivered
//! updates per second, latency percentiles), sessions held, memory, and the
//! findings of the final check; as a human summary or as one JSON record.
//!
//! Owns: the `Report` record, its two renderings, and reading RSS figures
//! from /proc.
//!
//! Must never: decide pass or fail by itself (the controller fills in the
//! findings) or print anything but the report.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Announce-to-receipt latency of one phase, in microseconds.
#[derive(Serialize, Debug, Clone)]
pub struct LatencySummary {
    /// Number of routes whose receipt was timed.
    pub samples: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds; `None` when it is empty.
    pub fn from_ns(h: &Histogram<u64>) -> Option<LatencySummary> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(LatencySummary {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

/// One measured phase of a scenario.
#[derive(Serialize, Debug, Clone)]
pub struct PhaseReport {
    /// Phase name ("fleet", "burst", "late-sync", "churn", "reconnect", "hold").
    pub name: String,
    /// Whether every peer reached its expected state within the time limit.
    pub converged: bool,
    /// From the phase's first send to convergence (or to giving up).
    pub seconds: f64,
    /// UPDATEs the loadgen sent in the phase.
    pub sent_updates: u64,
    /// UPDATEs the peers received in the phase.
    pub delivered_updates: u64,
    /// `delivered_updates / seconds`.
    pub delivered_per_sec: f64,
    /// Announce-to-receipt latency, if any route was timed.
    pub latency: Option<LatencySummary>,
    /// Extra figures of this phase (e.g. churn's offered rate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<(String, f64)>,
}

/// The record of one run.
#[derive(Serialize, Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Server address.
    pub server: String,
    /// The scenario's parameters as given.
    pub parameters: serde_json::Value,
    /// Simulated peers.
    pub peers: usize,
    /// Loadgen shards (threads).
    pub shards: usize,
    /// Routes in the plan.
    pub routes: usize,
    /// Measured phases, in order.
    pub phases: Vec<PhaseReport>,
    /// Sessions ESTABLISHED at the final check.
    pub sessions_held: usize,
    /// Failed connection attempts that were retried.
    pub connect_retries: u64,
    /// Highest server RSS sampled during the run (`--server-pid`), bytes.
    pub server_rss_peak_bytes: Option<u64>,
    /// The server's own high-water mark (VmHWM) at the end of the run's
    /// phases and check, before the simulated peers close, bytes.
    pub server_rss_hwm_bytes: Option<u64>,
    /// VmHWM again once every simulated peer has closed, bytes: all of them
    /// leaving at once (every route withdrawn and fanned out to those still
    /// there) is a peak of its own, reported apart from the run's.
    pub server_rss_hwm_after_close_bytes: Option<u64>,
    /// The server's RSS before the first peer connected, bytes: the base
    /// the per-route figure is measured from.
    pub server_rss_start_bytes: Option<u64>,
    /// The loadgen's own high-water mark, bytes.
    pub loadgen_rss_hwm_bytes: Option<u64>,
    /// Whole run, seconds.
    pub total_seconds: f64,
    /// Whether the time limit cut the run short.
    pub time_limit_hit: bool,
    /// Number of findings (the list below may be shortened).
    pub difference_count: usize,
    /// Findings, one line each.
    pub differences: Vec<String>,
    /// No findings and every phase converged.
    pub passed: bool,
}

impl Report {
    /// The server's peak RSS above its RSS before the run, per route of
    /// the plan: what a route costs all in (tables, queues, allocator
    /// slack) at the worst moment. Meaningful where routes dominate (a
    /// burst of many routes); `None` without `--server-pid` or routes.
    pub fn server_bytes_per_route(&self) -> Option<f64> {
        let (peak, start) = (self.server_rss_peak_bytes?, self.server_rss_start_bytes?);
        (self.routes > 0).then(|| peak.saturating_sub(start) as f64 / self.routes as f64)
    }
}

/// How many findings the report lists.
pub const MAX_LISTED: usize = 1000;
/// How many findings the human summary prints.
const MAX_PRINTED: usize = 25;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// "1.23 M" style rendering for rates.
fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0} ")
    }
}

impl Report {
    /// The human summary.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadgen {} against {}: {} peers on {} shards, {} routes",
            self.scenario, self.server, self.peers, self.shards, self.routes
        );
        for p in &self.phases {
            if p.name == "hold" || p.name == "connect" {
                let _ = writeln!(
                    s,
                    "  {:<10} {} after {:.3} s",
                    p.name,
                    if p.converged {
                        "all sessions up"
                    } else {
                        "sessions LOST or missing"
                    },
                    p.seconds
                );
                continue;
            }
            let _ = write!(
                s,
                "  {:<10} {} in {:.3} s: sent {}, delivered {} ({}updates/s)",
                p.name,
                if p.converged {
                    "converged"
                } else {
                    "NOT converged"
                },
                p.seconds,
                p.sent_updates,
                p.delivered_updates,
                si(p.delivered_per_sec)
            );
            if let Some(l) = &p.latency {
                let _ = write!(
                    s,
                    "; latency p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
                    l.p50_us, l.p99_us, l.p999_us, l.max_us
                );
            }
            for (k, v) in &p.notes {
                let _ = write!(s, "; {k} {v:.0}");
            }
            s.push('\n');
        }
        let _ = write!(s, "  sessions held {}", self.sessions_held);
        if self.connect_retries > 0 {
            let _ = write!(s, " (connect retries {})", self.connect_retries);
        }
        if let Some(b) = self.server_rss_peak_bytes {
            let _ = write!(s, "; server RSS peak {:.1} MiB", mib(b));
        }
        if let Some(b) = self.server_rss_hwm_bytes {
            let _ = write!(s, " (VmHWM {:.1} MiB", mib(b));
            if let Some(c) = self.server_rss_hwm_after_close_bytes.filter(|&c| c > b) {
                let _ = write!(s, "; {:.1} MiB once the peers closed", mib(c));
            }
            let _ = write!(s, ")");
        }
        if let Some(per_route) = self.server_bytes_per_route() {
            let _ = write!(s, "; {per_route:.0} B per route over the start");
        }
        if let Some(b) = self.loadgen_rss_hwm_bytes {
            let _ = write!(s, "; loadgen VmHWM {:.1} MiB", mib(b));
        }
        let _ = writeln!(s, "; total {:.2} s", self.total_seconds);
        if self.time_limit_hit {
            let _ = writeln!(s, "  time limit reached");
        }
        for d in self.differences.iter().take(MAX_PRINTED) {
            let _ = writeln!(s, "  DIFF {d}");
        }
        if self.difference_count > MAX_PRINTED {
            let _ = writeln!(
                s,
                "  ... {} more differences (--json lists up to {MAX_LISTED})",
                self.difference_count - MAX_PRINTED
            );
        }
        let _ = writeln!(
            s,
            "{}",
            if self.passed {
                "PASS: every peer holds exactly its expected routes"
            } else {
                "FAIL"
            }
        );
        s
    }
}

/// A `kB` field of /proc/PID/status, in bytes.
pub fn proc_status_bytes(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        let rss = proc_status_bytes("self", "VmRSS").unwrap();
        assert!(rss > 0);
        assert!(proc_status_bytes("self", "NoSuchField").is_none());
        assert!(proc_status_bytes("0", "VmRSS").is_none());
    }

    #[test]
    fn latency_summary_in_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        assert!(LatencySummary::from_ns(&h).is_none());
        for i in 1..=1000u64 {
            h.record(i * 1000).unwrap();
        }
        let l = LatencySummary::from_ns(&h).unwrap();
        assert_eq!(l.samples, 1000);
        assert!((l.p50_us - 500.0).abs() < 1.0, "{}", l.p50_us);
        assert!((l.max_us - 1000.0).abs() < 1.0, "{}", l.max_us);
    }
}
