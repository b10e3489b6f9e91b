//! What the status side reads of the netlink thread: its counters and, per
//! received route, where it stands in the kernel (the client's routes API
//! `kernel` field).
//!
//! Owns: `KernelStatus`, the `KernelStatsSource` the client's status source
//! holds, and the rule that names a route's kernel state from the desired
//! set's configuration and the acknowledged state: *installed* when the
//! kernel acknowledged a route to the destination through that underlay
//! address, *failed* when the route's last change was refused, *pending*
//! otherwise (queued for the netlink thread), *not_installed* when the
//! route is not for the kernel at all (unmapped VNI, `--ipv4-only`, a
//! next hop that is not IPv6) or the netlink thread has stopped.
//!
//! Must never: change anything, or hold the installed-state lock longer
//! than one page's look-ups (the netlink thread waits on it to apply).

use std::net::IpAddr;
use std::sync::Weak;

use ipnet::IpNet;

use super::{lock, KernelRouteStats, RouteKey, Shared};
use metalbond_telemetry::{KernelRouteState, KernelStatsSource, NetlinkView};
use metalbond_wire::types::Vni;

/// The netlink thread as the status pages see it; holds no reference that
/// keeps the thread's state alive after it stopped.
pub struct KernelStatus {
    /// Netlink verdicts and the pending count.
    pub(super) stats: KernelRouteStats,
    /// The thread's shared state, for per-route look-ups.
    pub(super) shared: Weak<Shared>,
}

impl KernelStatsSource for KernelStatus {
    fn view(&self) -> NetlinkView {
        self.stats.view()
    }

    fn pending_routes(&self) -> u64 {
        self.stats.pending_routes()
    }

    fn route_states(&self, vni: Vni, hops: &[(IpNet, IpAddr)]) -> Vec<KernelRouteState> {
        let not_installed = || vec![KernelRouteState::NotInstalled; hops.len()];
        let Some(shared) = self.shared.upgrade() else {
            return not_installed();
        };
        let config = &shared.config;
        let Some(table) = config.tables.get(&vni).copied() else {
            return not_installed();
        };
        let installed = lock(&shared.installed);
        hops.iter()
            .map(|(prefix, next_hop)| {
                let IpAddr::V6(next_hop) = *next_hop else {
                    return KernelRouteState::NotInstalled;
                };
                if config.ipv4_only && matches!(prefix, IpNet::V6(_)) {
                    return KernelRouteState::NotInstalled;
                }
                let key = RouteKey {
                    table,
                    prefix: prefix.trunc(),
                };
                if installed.routes_via(&key, next_hop) {
                    KernelRouteState::Installed
                } else if installed.is_failing(&key) {
                    KernelRouteState::Failed
                } else {
                    KernelRouteState::Pending
                }
            })
            .collect()
    }
}
