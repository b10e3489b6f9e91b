//! Where present-route changes go: the `RouteSink` trait an embedder (or
//! the netlink crate) implements, `LogSink` for a client that installs
//! nothing, and the stand-in sink of `Client::new_cyclic`.
//!
//! Must never: be called with a client lock held (the delivery thread
//! calls sinks, one change at a time).

use std::sync::{Arc, Mutex};

use metalbond_utils::LockOrRecover;
use metalbond_wire::types::{IpNet, NextHop, Vni};

/// Receives changes of the present route set. Implemented by the embedder
/// (or by the netlink thread). Calls come one at a time, in order, from
/// the client's one delivery thread, never while a client lock is held: a
/// sink may call any `Client` method. Keep calls short (queue slow work
/// elsewhere): while the sink is behind, server threads stop reading.
pub trait RouteSink: Send + 'static {
    /// `next_hop` for `destination` in `vni` became present.
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop);
    /// `next_hop` for `destination` in `vni` is no longer present.
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop);
}

/// A sink that only logs (debug), for clients that do not install routes.
#[derive(Debug, Default)]
pub struct LogSink;

impl RouteSink for LogSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        tracing::debug!(%vni, %destination, %next_hop, "route present");
    }

    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        tracing::debug!(%vni, %destination, %next_hop, "route withdrawn");
    }
}

/// The sink of `Client::new_cyclic` until `make_sink` has made the real one
/// (nothing can be delivered before that: no server or subscription exists
/// yet).
pub(crate) struct DeferredSink(pub(crate) Arc<Mutex<Option<Box<dyn RouteSink>>>>);

impl DeferredSink {
    fn with(&mut self, f: impl FnOnce(&mut dyn RouteSink)) {
        let mut slot = self.0.lock_or_recover();
        if let Some(sink) = slot.as_mut() {
            f(&mut **sink);
        }
    }
}

impl RouteSink for DeferredSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.with(|s| s.add_route(vni, destination, next_hop));
    }

    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.with(|s| s.remove_route(vni, destination, next_hop));
    }
}
