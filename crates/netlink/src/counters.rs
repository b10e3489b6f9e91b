//! Netlink work the netlink thread has done, for `/metrics`: requests the kernel
//! acknowledged and requests it refused, per operation, plus the number of
//! routes waiting to be written.
//!
//! Owns: `NetlinkCounters` (atomics bumped by `RouteSocket::execute` for
//! every verdict, and by the sinks and the netlink thread for the pending count) and
//! `KernelRouteStats`, the clonable read side the status pages hold.
//!
//! Must never: take a lock or make a decision. Nothing in the netlink thread reads
//! these numbers back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::nexthop::{RTM_DELNEXTHOP, RTM_NEWNEXTHOP};
use super::routes::{RTM_DELROUTE, RTM_NEWROUTE};
use metalbond_telemetry::families::netlink_op;
use metalbond_telemetry::NetlinkView;

/// The operations counted separately; anything else is "other".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    RouteAdd,
    RouteDelete,
    NexthopAdd,
    NexthopDelete,
    Other,
}

impl Operation {
    /// Every operation, in the order `/metrics` lists them.
    const ALL: [Operation; 5] = [
        Operation::RouteAdd,
        Operation::RouteDelete,
        Operation::NexthopAdd,
        Operation::NexthopDelete,
        Operation::Other,
    ];

    fn of(message_type: u16) -> Operation {
        match message_type {
            RTM_NEWROUTE => Operation::RouteAdd,
            RTM_DELROUTE => Operation::RouteDelete,
            RTM_NEWNEXTHOP => Operation::NexthopAdd,
            RTM_DELNEXTHOP => Operation::NexthopDelete,
            _ => Operation::Other,
        }
    }

    /// The `op` label value (from the table in `telemetry::families`).
    fn label(self) -> &'static str {
        match self {
            Operation::RouteAdd => netlink_op::ROUTE_ADD,
            Operation::RouteDelete => netlink_op::ROUTE_DELETE,
            Operation::NexthopAdd => netlink_op::NEXTHOP_ADD,
            Operation::NexthopDelete => netlink_op::NEXTHOP_DELETE,
            Operation::Other => netlink_op::OTHER,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one netlink thread (shared by its socket, its sinks and the
/// status pages).
#[derive(Debug, Default)]
pub struct NetlinkCounters {
    /// Acknowledged requests, indexed by `Operation::index`.
    acknowledged: [AtomicU64; 5],
    /// Refused requests (kernel error, or the socket failed mid-batch).
    refused: [AtomicU64; 5],
    /// Route keys changed and not yet written to the kernel.
    pending_routes: AtomicU64,
}

impl NetlinkCounters {
    /// One request of type `message_type` got its verdict.
    pub(super) fn record(&self, message_type: u16, acknowledged: bool) {
        let i = Operation::of(message_type).index();
        let counter = if acknowledged {
            &self.acknowledged[i]
        } else {
            &self.refused[i]
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` route keys are waiting for the netlink thread.
    pub(super) fn set_pending(&self, n: usize) {
        self.pending_routes.store(n as u64, Ordering::Relaxed);
    }
}

/// Read side of a netlink thread's counters, cheap to clone; outlives the netlink thread
/// (the figures then stay where they were).
#[derive(Clone, Debug)]
pub struct KernelRouteStats {
    /// The netlink thread's counters.
    pub(super) counters: Arc<NetlinkCounters>,
}

impl KernelRouteStats {
    /// Operations and errors per `op`, every operation listed (zeros
    /// included, so a dashboard sees the series from the start).
    pub fn view(&self) -> NetlinkView {
        let list = |counters: &[AtomicU64; 5]| {
            Operation::ALL
                .iter()
                .map(|op| {
                    (
                        op.label().to_string(),
                        counters[op.index()].load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        NetlinkView {
            operations: list(&self.counters.acknowledged),
            errors: list(&self.counters.refused),
        }
    }

    /// Route keys changed and not yet written to the kernel.
    pub fn pending_routes(&self) -> u64 {
        self.counters.pending_routes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_counted_per_operation() {
        let counters = Arc::new(NetlinkCounters::default());
        counters.record(RTM_NEWROUTE, true);
        counters.record(RTM_NEWROUTE, true);
        counters.record(RTM_DELNEXTHOP, false);
        counters.record(9999, true);
        counters.set_pending(7);
        let stats = KernelRouteStats { counters };
        let view = stats.view();
        let get =
            |list: &[(String, u64)], op: &str| list.iter().find(|(o, _)| o == op).map(|(_, n)| *n);
        assert_eq!(get(&view.operations, "route_add"), Some(2));
        assert_eq!(get(&view.operations, "other"), Some(1));
        assert_eq!(get(&view.operations, "route_delete"), Some(0));
        assert_eq!(get(&view.errors, "nexthop_delete"), Some(1));
        assert_eq!(get(&view.errors, "route_add"), Some(0));
        assert_eq!(stats.pending_routes(), 7);
    }
}
