//! The stale-route sweeper: a thread that runs while some server holds
//! routes kept from a lost session (`ClientConfig::stale_hold`) and ends
//! their hold in time.
//!
//! Must never: keep the client alive (it holds a `Weak`).

use std::time::Duration;

use crate::state::ClientInner;

/// How often held stale routes are checked for the end of their hold.
pub(crate) const STALE_SWEEP_TICK: Duration = Duration::from_millis(100);

/// Stand-in for a `stale_hold` too long for the clock: a year.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(365 * 86_400);

/// Starts the thread that ends stale holds (`ClientConfig::stale_hold`); it
/// runs while some server holds stale routes. Returns whether it started.
pub(crate) fn spawn_sweeper(inner: std::sync::Weak<ClientInner>) -> bool {
    let spawned = std::thread::Builder::new()
        .name("mb-stale-sweep".into())
        .spawn(move || loop {
            std::thread::sleep(STALE_SWEEP_TICK);
            let Some(inner) = inner.upgrade() else { return };
            if !inner.sweep_stale() {
                return;
            }
        });
    match spawned {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("cannot start the stale-route sweeper: {e}; stale routes stay until their server sends again");
            false
        }
    }
}
