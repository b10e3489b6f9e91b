//! Start-up readiness for a service manager (systemd `Type=notify`).
//!
//! Owns: the `READY=1` and `STATUS=...` datagrams sent to `$NOTIFY_SOCKET`
//! (through the `sd-notify` crate: no libsystemd), and the wait that sends
//! `READY=1` once a caller's condition holds while still answering SIGINT /
//! SIGTERM, and the client's condition (`ClientReadiness`: every server up
//! or failed once). The server is ready where it says so (`server::run`,
//! once listening).
//!
//! Must never: fail or slow down a process that no manager supervises
//! (without `$NOTIFY_SOCKET` nothing is sent and nothing is logged), or
//! change what a session does: it only reads `Client::servers()`.

use std::collections::BTreeSet;
use std::time::Duration;

use signal_hook::iterator::Signals;

use crate::client::Client;
use crate::session::SessionState;

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

/// When `metalbond client` is ready: every server has had an ESTABLISHED
/// session or has failed once (RETRY, waiting to reconnect) since start, so
/// units ordered after the client start once every reachable reflector's
/// routes are arriving, and an unreachable one delays nobody longer than
/// one connect attempt.
#[derive(Debug, Default)]
pub struct ClientReadiness {
    /// Addresses of the servers seen ESTABLISHED or in RETRY at least once
    /// (a later state does not undo it).
    settled: BTreeSet<String>,
}

impl ClientReadiness {
    /// The status line (`N of M servers established`) once every server of
    /// `client` has settled; before, what it waits for (`/readyz` says it).
    pub fn check(&mut self, client: &Client) -> Result<String, String> {
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
        if settled == servers.len() {
            Ok(format!("{up} of {} servers established", servers.len()))
        } else {
            Err(format!(
                "{settled} of {} servers have had a session or a failed attempt since start",
                servers.len()
            ))
        }
    }
}
