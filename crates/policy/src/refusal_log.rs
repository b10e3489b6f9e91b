//! The process-wide budget for policy refusal log lines.
//!
//! Each session already logs a refusal at most once per reason every
//! `peer::LOG_EVERY`, but many sessions each get their first line: 300
//! sessions of a peer no rule matches (or that send forbidden routes) wrote
//! a line each. So every refusal line (a refused UPDATE or SUBSCRIBE, a
//! session closed by the policy) also needs a place in a budget shared by
//! every peer and shard: `BUDGET_LINES` lines per `BUDGET_WINDOW`. Lines
//! over it are counted, not written; at the end of a window that suppressed
//! any, one summary line says how many
//! (`policy: suppressed N refusal log lines in the last 10s ...`), and the
//! total is in the policy's status (`/policy`, `log_lines_suppressed`). The
//! refusal counters (`metalbond_policy_denied_total`) count every refusal,
//! logged or not.
//!
//! Owns: `RefusalLog` (the window, the counts) and the summary line: it is
//! written by a short-lived thread (`mb-policy-log`) started by the first
//! suppressed line of a window, which sleeps until the window ends, writes
//! the summary and exits. Without suppression no thread runs.
//!
//! Must never: block a shard (the lock is held for a few assignments, and
//! only when a line is due, which the per-peer limit already made rare), or
//! drop a count: a summary the thread could not write (it could not be
//! started) is written by the next line's caller.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use metalbond_utils::LockOrRecover;

/// Refusal lines every peer together may write per `BUDGET_WINDOW`: enough
/// to name the first offenders of a burst, few enough that a flood of
/// refused sessions costs a handful of lines.
pub const BUDGET_LINES: u32 = 20;

/// The budget's window, also the period of the summary lines.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// The shared budget (one per `PolicyStore`, so one per server process).
#[derive(Debug)]
pub struct RefusalLog {
    /// Lines per window.
    lines: u32,
    /// The window's length.
    window: Duration,
    /// The current window.
    state: Mutex<Window>,
    /// Lines suppressed since start (the status page's count).
    suppressed_total: AtomicU64,
}

/// One window of the budget.
#[derive(Debug, Default)]
struct Window {
    /// Its number and start; `None` between windows (no line since the
    /// last one ended).
    current: Option<(u64, Instant)>,
    /// Number of the next window.
    next_id: u64,
    /// Lines written in it.
    written: u32,
    /// Lines suppressed in it, not yet reported.
    suppressed: u64,
    /// The window a summary thread is waiting for, if any.
    reporter_for: Option<u64>,
}

impl RefusalLog {
    /// `BUDGET_LINES` per `BUDGET_WINDOW`.
    pub fn new() -> Arc<RefusalLog> {
        RefusalLog::with(BUDGET_LINES, BUDGET_WINDOW)
    }

    /// `lines` per `window` (tests use short windows).
    pub fn with(lines: u32, window: Duration) -> Arc<RefusalLog> {
        Arc::new(RefusalLog {
            lines,
            window,
            state: Mutex::new(Window::default()),
            suppressed_total: AtomicU64::new(0),
        })
    }

    /// May a refusal line be written now? `false`: it is counted as
    /// suppressed, and reported in the window's summary line.
    pub fn admit(self: &Arc<Self>) -> bool {
        let now = Instant::now();
        let mut w = self.state.lock_or_recover();
        if let Some((_, start)) = w.current {
            if now.duration_since(start) >= self.window {
                // The summary thread is late or was never started: the
                // caller reports the ended window.
                let ended = end_window(&mut w, now);
                drop(w);
                if let Some((n, took)) = ended {
                    self.summary(n, took);
                }
                w = self.state.lock_or_recover();
            }
        }
        let (id, start) = match w.current {
            Some(c) => c,
            None => {
                let c = (w.next_id, now);
                w.next_id += 1;
                w.current = Some(c);
                c
            }
        };
        if w.written < self.lines {
            w.written += 1;
            return true;
        }
        w.suppressed += 1;
        self.suppressed_total.fetch_add(1, Ordering::Relaxed);
        if w.reporter_for != Some(id) {
            w.reporter_for = Some(id);
            let weak = Arc::downgrade(self);
            let due = start + self.window;
            let spawned = std::thread::Builder::new()
                .name("mb-policy-log".into())
                .spawn(move || report_when_due(weak, id, due));
            if spawned.is_err() {
                w.reporter_for = None;
            }
        }
        false
    }

    /// Lines suppressed since start.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }

    /// The line about a window that suppressed `n` lines and lasted `took`.
    fn summary(&self, n: u64, took: Duration) {
        tracing::warn!(
            suppressed = n,
            budget = self.lines,
            window_secs = self.window.as_secs(),
            "policy: suppressed {n} refusal log lines in the last {}s (at most {} lines every {}s across all peers; metalbond_policy_denied_total counts every refusal)",
            took.as_secs().max(1),
            self.lines,
            self.window.as_secs()
        );
    }
}

/// Ends the current window: how many lines it suppressed (if any) and how
/// long it lasted.
fn end_window(w: &mut Window, now: Instant) -> Option<(u64, Duration)> {
    let (id, start) = w.current.take()?;
    w.written = 0;
    if w.reporter_for == Some(id) {
        w.reporter_for = None;
    }
    let n = std::mem::take(&mut w.suppressed);
    (n > 0).then(|| (n, now.duration_since(start)))
}

/// The summary thread of window `id`: sleeps until `due`, ends the window
/// if it is still the current one and writes its summary. Exits early when
/// the policy is gone.
fn report_when_due(log: Weak<RefusalLog>, id: u64, due: Instant) {
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    let Some(log) = log.upgrade() else { return };
    let mut w = log.state.lock_or_recover();
    if w.current.is_none_or(|(current, _)| current != id) {
        // A caller already ended it and reported.
        return;
    }
    let ended = end_window(&mut w, Instant::now());
    drop(w);
    if let Some((n, took)) = ended {
        log.summary(n, took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(log: &RefusalLog) -> (u32, u64, Option<u64>) {
        let w = log.state.lock_or_recover();
        (w.written, w.suppressed, w.reporter_for)
    }

    #[test]
    fn the_budget_admits_its_lines_then_counts_until_the_window_ends() {
        let log = RefusalLog::with(3, Duration::from_millis(300));
        let admitted = (0..10).filter(|_| log.admit()).count();
        assert_eq!(admitted, 3);
        assert_eq!(log.suppressed_total(), 7);
        assert_eq!(state(&log), (3, 7, Some(0)), "a summary thread waits");
        // The thread ends the window and reports: a fresh budget follows.
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(&log).1 != 0 {
            assert!(Instant::now() < deadline, "the window never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state(&log), (0, 0, None));
        assert!(log.admit());
        assert_eq!(log.suppressed_total(), 7, "a total, never reset");
    }

    #[test]
    fn a_window_ends_also_without_its_summary_thread() {
        let log = RefusalLog::with(1, Duration::from_millis(50));
        assert!(log.admit());
        // Within budget: no suppression, no thread.
        assert_eq!(state(&log), (1, 0, None));
        std::thread::sleep(Duration::from_millis(60));
        assert!(log.admit(), "a new window");
        assert!(!log.admit());
        {
            // As if the thread of this window could not start (the one that
            // did start may still end the window first: either way it ends).
            log.state.lock_or_recover().reporter_for = None;
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(log.admit(), "the old window ended, a new one began");
        let (written, suppressed, _) = state(&log);
        assert_eq!((written, suppressed), (1, 0));
        assert_eq!(log.suppressed_total(), 1);
    }
}
