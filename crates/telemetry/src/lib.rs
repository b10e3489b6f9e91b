//! Measurements the data path records and the status side reads: the layer
//! below `server`, `client`, `netlink` and `http`, so that none of them has
//! to import another to report a figure.
//!
//! Owns: `LatencyHistogram` / `HistogramView` (lock-free latency buckets and
//! their snapshot), `NetlinkView` (the kernel-route counters of a client),
//! the status model and the `StatusSource` trait the status pages read
//! (`status`, implemented by `metalbond_server::ServerStatusSource` and
//! `metalbond_client::ClientStatusSource`), and the one table of metric
//! families and label values (`families`).
//!
//! Must never: render anything (that is `http`'s job) or depend on a module
//! above it; recording stays lock-free and allocation-free.
//!
//! ```text
//!   server::status ─┐                         ┌─► http (pages, /metrics)
//!   client::status ─┼─► telemetry::StatusSource ┤
//!   netlink counters┘   (+ families, views)     └─ the binary wires them
//! ```

#![deny(missing_docs)]

pub mod families;
mod histogram;
pub mod status;

use std::net::IpAddr;

use metalbond_wire::types::{IpNet, Vni};

pub use histogram::{HistogramView, LatencyHistogram};
pub use status::{
    count_states, format_date, format_rfc3339, kind_name, DestinationView, MetricFamily,
    MetricKind, MetricSample, MetricsView, NextHopEntryView, PeerView, QueueDepth, RouteEntryView,
    RouteSelect, RouteTableView, RoutesPageView, RoutesRequest, StatusRole, StatusSource,
    VniRoutesView, VniSummaryView,
};

/// What the status side reads of the client's kernel-route worker (the
/// netlink crate implements it; the client's status source shows it
/// without depending on that crate).
pub trait KernelStatsSource: Send + Sync {
    /// Operations and errors per operation.
    fn view(&self) -> NetlinkView;
    /// Route keys changed and not yet written to the kernel.
    fn pending_routes(&self) -> u64;
    /// Where each of `hops` (destination, next-hop address) of `vni` stands
    /// in the kernel, in the same order: one look-up under one lock for a
    /// whole page of the routes API.
    fn route_states(&self, vni: Vni, hops: &[(IpNet, IpAddr)]) -> Vec<KernelRouteState>;
}

/// Where a received route's next hop stands in the kernel (the client's
/// routes API `kernel` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRouteState {
    /// The kernel acknowledged a route to the destination through this
    /// next hop.
    Installed,
    /// Not written yet: the netlink thread has it queued.
    Pending,
    /// The kernel refused the route's last change (retried periodically;
    /// the error is in the log and `metalbond_netlink_errors_total`).
    Failed,
    /// Not to be installed: the client installs no routes, the VNI has no
    /// `--install-routes` table, the destination is IPv6 under
    /// `--ipv4-only`, or the next hop is not an IPv6 address.
    NotInstalled,
}

impl KernelRouteState {
    /// The API's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelRouteState::Installed => "installed",
            KernelRouteState::Pending => "pending",
            KernelRouteState::Failed => "failed",
            KernelRouteState::NotInstalled => "not_installed",
        }
    }
}

/// Netlink work done by the client, per operation ("route_add",
/// "route_del", "nexthop_add", ...).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetlinkView {
    /// Requests sent and acknowledged, per operation
    /// (`metalbond_netlink_operations_total{op}`).
    pub operations: Vec<(String, u64)>,
    /// Requests the kernel refused, per operation
    /// (`metalbond_netlink_errors_total{op}`).
    pub errors: Vec<(String, u64)>,
}
