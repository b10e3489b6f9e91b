//! Start-up readiness for a service manager (systemd `Type=notify`).
//!
//! Owns: the `READY=1` and `STATUS=...` datagrams sent to `$NOTIFY_SOCKET`
//! (through the `sd-notify` crate: no libsystemd), and the wait that sends
//! `READY=1` once a caller's condition holds while still answering SIGINT /
//! SIGTERM, and the client's condition (`ClientReadiness`: every server up
//! or failed once, and the first sync received and in the kernel). The server is ready where it says so (`server::run`,
//! once listening).
//!
//! Must never: fail or slow down a process that no manager supervises
//! (without `$NOTIFY_SOCKET` nothing is sent and nothing is logged), or
//! change what a session does: it only reads the client's and the kernel
//! thread's state.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use signal_hook::iterator::Signals;

use metalbond_client::Client;
use metalbond_wire::session::SessionState;

/// How often `serve_until_signal` asks whether the process is ready. Short
/// against the client's smallest reconnect delay (`--reconnect-min-ms` 500
/// waits at least 250 ms in RETRY), so a state is not missed.
pub const READY_POLL: Duration = Duration::from_millis(20);

/// Tells the service manager that start-up is complete, with a one-line
/// status for `systemctl status`. Without a manager this does nothing.
pub fn notify_ready(status: &str) {
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Sends `states` (nothing without `$NOTIFY_SOCKET`); a failure is logged,
/// never fatal: the service manager then times the start-up out by itself.
fn send(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager ($NOTIFY_SOCKET)");
    }
}

/// Waits for the first of SIGINT/SIGTERM (whatever `signals` holds) and
/// returns it. Until `ready()` first returns a status line, asks it every
/// `READY_POLL`; then sends `READY=1` with that status and only waits for a
/// signal. A signal before readiness is returned at once (no `READY=1`).
pub fn serve_until_signal(
    signals: &mut Signals,
    mut ready: impl FnMut() -> Option<String>,
) -> Option<i32> {
    loop {
        if let Some(signal) = signals.pending().next() {
            return Some(signal);
        }
        if let Some(status) = ready() {
            tracing::info!(status = %status, "ready");
            notify_ready(&status);
            return signals.forever().next();
        }
        std::thread::sleep(READY_POLL);
    }
}

/// Quiet time after which a subscribed VNI's first sync counts as received
/// (MetalBond has no end-of-table marker; see `client::wait`).
pub const SYNC_QUIET: Duration = Duration::from_millis(500);

/// Longest wait for the first sync after every server settled: under
/// endless churn a VNI is never quiet, and readiness must still come.
pub const SYNC_WAIT_MAX: Duration = Duration::from_secs(30);

/// When `metalbond client` is ready: every server has had an ESTABLISHED
/// session or has failed once (RETRY, waiting to reconnect) since start, so
/// an unreachable one delays nobody longer than one connect attempt; and,
/// when a session is up, the first sync is in: every subscribed VNI quiet
/// for `SYNC_QUIET` with everything received handed on, and the kernel
/// caught up with it (`--install-routes`), so units ordered after the
/// client start with the routes in place. After `SYNC_WAIT_MAX` of churn it
/// is ready anyway, and says so.
#[derive(Debug, Default)]
pub struct ClientReadiness {
    /// Addresses of the servers seen ESTABLISHED or in RETRY at least once
    /// (a later state does not undo it).
    settled: BTreeSet<String>,
    /// When every server had settled (the first sync's wait starts).
    servers_settled_at: Option<Instant>,
}

impl ClientReadiness {
    /// The status line (`N of M servers established`) once every server of
    /// `client` has settled; before, what it waits for (`/readyz` says it).
    pub fn check(
        &mut self,
        client: &Client,
        kernel: Option<&metalbond_netlink::KernelRoutes>,
    ) -> Result<String, String> {
        let servers = client.servers();
        let up = servers
            .iter()
            .filter(|s| s.state == SessionState::Established)
            .count();
        self.settled.extend(
            servers
                .iter()
                .filter(|s| matches!(s.state, SessionState::Established | SessionState::Retry))
                .map(|s| s.address.clone()),
        );
        let settled = servers
            .iter()
            .filter(|s| self.settled.contains(&s.address))
            .count();
        if settled != servers.len() {
            return Err(format!(
                "{settled} of {} servers have had a session or a failed attempt since start",
                servers.len()
            ));
        }
        let line = format!("{up} of {} servers established", servers.len());
        if up == 0 {
            return Ok(line); // nothing to sync from
        }
        let since = *self.servers_settled_at.get_or_insert_with(Instant::now);
        let vnis = client.subscriptions();
        let waiting: Vec<u32> = vnis
            .iter()
            .filter(|v| !client.is_settled(**v, SYNC_QUIET))
            .map(|v| v.get())
            .collect();
        let kernel_behind = kernel.is_some_and(|k| !k.is_caught_up());
        let into = if kernel.is_some() {
            "in the kernel"
        } else {
            "received"
        };
        if waiting.is_empty() && !kernel_behind {
            return Ok(if vnis.is_empty() {
                line
            } else {
                format!("{line}; first sync of {} VNIs {into}", vnis.len())
            });
        }
        if since.elapsed() >= SYNC_WAIT_MAX {
            return Ok(format!(
                "{line}; first sync not complete after {SYNC_WAIT_MAX:?} (churn?): ready anyway"
            ));
        }
        Err(if waiting.is_empty() {
            format!("{line}; waiting for the kernel to install the first sync")
        } else {
            format!("{line}; waiting for the first sync of VNIs {waiting:?}")
        })
    }
}
