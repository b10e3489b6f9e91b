//! Measurements the data path records and the status side reads: the layer
//! below `server`, `client`, `netlink` and `http`, so that none of them has
//! to import another to report a figure.
//!
//! Owns: `LatencyHistogram` / `HistogramView` (lock-free latency buckets and
//! their snapshot) and `NetlinkView` (the kernel-route counters of a client).
//!
//! Must never: render anything (that is `http`'s job) or depend on a module
//! above it; recording stays lock-free and allocation-free.

mod histogram;

pub use histogram::{HistogramView, LatencyHistogram};

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
