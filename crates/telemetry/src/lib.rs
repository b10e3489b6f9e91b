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

pub use histogram::{HistogramView, LatencyHistogram};
pub use status::{
    count_states, format_date, kind_name, DestinationView, MetricFamily, MetricKind, MetricSample,
    MetricsView, NextHopEntryView, PeerView, QueueDepth, RouteEntryView, RouteSelect,
    RouteTableView, RoutesPageView, RoutesRequest, StatusRole, StatusSource, VniRoutesView,
    VniSummaryView,
};

/// What the status side reads of the client's kernel-route worker (the
/// netlink crate implements it; the client's status source shows it
/// without depending on that crate).
pub trait KernelStatsSource: Send + Sync {
    /// Operations and errors per operation.
    fn view(&self) -> NetlinkView;
    /// Route keys changed and not yet written to the kernel.
    fn pending_routes(&self) -> u64;
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
