//! The MetalBond client library (what `metalbond client` runs, and what an
//! embedder links): sessions to reflectors, announcements, received routes.
//!
//! Owns: the `Client` handle (servers, subscriptions, announcements, status,
//! waits), the `RouteSink` trait through which embedders hear about
//! present-route changes (or the `ChangeStream` for async code), one thread
//! per server (`connection`), the one delivery thread (`delivery`), the
//! present set (`present`), the traffic counters (`traffic`), the typed
//! errors (`error`) and its `StatusSource` for the status pages (`status`).
//! The command line lives in the `metalbond` binary; kernel routes in
//! `metalbond-netlink`, whose `KernelRouteSink` is a `RouteSink`.
//!
//! Must never: make an embedder run an async runtime, call the sink while a
//! client lock is held or on a caller's thread, or make a caller wait for
//! the network. The handle is sync, `Send + Sync`, `Clone`, and every call
//! returns promptly: it updates the desired state under one short lock and
//! wakes the server threads, which do the I/O.
//!
//! ```text
//!  embedder / CLI ──Client::{subscribe, announce, ...}──┐
//!                                                       v
//!                   Core (Mutex): subscriptions, announcements,
//!                   per-server slot {state, backlog}, PresentRoutes
//!                     ^  wake                       │ present changes (pushed under the lock,
//!                     │                             v  never blocking)
//!  server thread ×N (connection.rs) <─TCP─> server  DeliveryQueue ──> delivery thread
//!   PeerSession(Active), backoff, resync             (delivery.rs)      │ Client::routes map
//!   waits while the queue is above its high-water mark                  v
//!                                                  RouteSink (embedder's, ChangeStream,
//!                                                  or netlink::KernelRouteSink)
//! ```
//!
//! Rules (PROTOCOL.md "Client rules"): every server gets the same
//! subscriptions and announcements; received routes are kept per server; a
//! route is present while at least one server holds it; a received route
//! whose (VNI, prefix) we announce is not present (loop prevention).
//!
//! # Threads and ordering
//!
//! - The sink is called from exactly one thread, the client's delivery
//!   thread (`mb-deliver`), one call at a time, in the order the present set
//!   changed, and only on real changes (a route is added once when it
//!   appears and removed once when it goes). No client lock is held during
//!   a call, so the sink may call any `Client` method, `shutdown` and
//!   `remove_server` included. It is never called on a caller's thread:
//!   `announce`, `unsubscribe` and `remove_server` queue their changes and
//!   return.
//! - `Client::routes(vni)` is what the sink has been told so far (updated
//!   just before each call, so inside the sink it already includes the
//!   change being delivered). It does not take the client's lock.
//! - Memory: server threads stop reading their sockets while more than
//!   65 536 changes wait for the sink (a slow sink slows the servers' TCP
//!   windows instead of growing a queue). Changes made by a caller
//!   (`unsubscribe`, an `announce` that hides received routes,
//!   `remove_server`) are queued regardless, so a caller never waits.
//!
//! # Bounds
//!
//! Every handle call returns after at most one short lock (no I/O, no
//! join). `remove_server` and `shutdown` stop the server threads and do not
//! wait for them: a pending connect notices within 50 ms, a pending DNS
//! lookup is left to finish on its own thread and its result is dropped. A
//! stopped server thread can no longer change anything (its slot is gone,
//! and slot ids are never reused): after `remove_server` returns, that
//! server's routes are withdrawn (queued for the sink) and nothing from it
//! arrives later. Dropping the last `Client` clone shuts the client down
//! the same way; `Drop` never waits.
//!
//! When the client shuts down the sink is *not* told to remove anything:
//! installed routes stay for a restart (the CLI's `--cleanup` removes
//! kernel routes explicitly). Changes queued before `shutdown` are still
//! delivered, then the delivery thread drops the sink; `shutdown_timeout`
//! waits for that.

#![deny(missing_docs)]

mod address;
mod config;
mod connection;
mod delivery;
pub mod error;
mod present;
mod sink;
mod stale;
mod state;
mod status_source;
pub use status_source::ClientStatusSource;
mod stream;
mod traffic;
mod wait;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub use address::check_address;
pub use config::{ClientConfig, ServerOptions, DEFAULT_MAX_ROUTES_PER_SERVER, DEFAULT_STALE_HOLD};
pub use connection::STABLE_SESSION;
use delivery::{Delivery, DeliveryQueue};
pub use error::ClientError;
use metalbond_utils::LockOrRecover;
use metalbond_wire::session::SessionState;
/// The route types of the API, so an embedder needs this one dependency.
pub use metalbond_wire::types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};
use sink::DeferredSink;
pub use sink::{LogSink, RouteSink};
pub use state::ServerStatus;
use state::{stop_slot, ClientInner, Core, ServerSlot};

pub use present::PresentChange;
use present::{PresentRoutes, ServerId};
pub use stream::{ChangeStream, DEFAULT_STREAM_CAPACITY};
pub use traffic::Traffic;
use traffic::TrafficCounters;

/// The client handle. `Send + Sync` and cheap to clone: clones share one
/// client. Dropping the last clone shuts the client down (without waiting;
/// see the module doc). A sink that needs the client holds a `WeakClient`
/// (see `Client::new_cyclic`), so it does not keep the client alive.
#[derive(Clone)]
pub struct Client {
    /// Shared by the clones; its drop shuts the client down.
    owner: Arc<ShutdownGuard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.servers().len())
            .field("subscriptions", &self.subscriptions().len())
            .finish_non_exhaustive()
    }
}

/// What the `Client` clones share: dropping the last one shuts down.
struct ShutdownGuard {
    /// Shared with the server threads.
    inner: Arc<ClientInner>,
}

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

/// A handle that does not keep the client alive (for sinks and callbacks
/// that the client itself owns). `upgrade` gives a `Client` while any
/// other clone exists.
#[derive(Clone, Debug)]
pub struct WeakClient {
    /// The owner, if still alive.
    owner: Weak<ShutdownGuard>,
}

impl WeakClient {
    /// The client, unless every `Client` clone has been dropped.
    pub fn upgrade(&self) -> Option<Client> {
        self.owner.upgrade().map(|owner| Client { owner })
    }
}

impl std::fmt::Debug for ShutdownGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownGuard")
    }
}
impl Client {
    /// A client with no servers yet; present-route changes go to `sink`,
    /// called from the client's delivery thread (see the module doc).
    ///
    /// If the delivery thread cannot be started (the system is out of
    /// threads), this is logged and the client starts shut down: every call
    /// returns `ClientError::ShutDown`.
    pub fn new(config: ClientConfig, sink: impl RouteSink) -> Client {
        Client::build(config, Box::new(sink))
    }

    /// Like `new`, for a sink that calls back into the client: `make_sink`
    /// gets a `WeakClient` of the client being made (upgrade it inside the
    /// sink's methods). Holding a `WeakClient` rather than a `Client` keeps
    /// the sink from keeping the client alive.
    pub fn new_cyclic<S: RouteSink>(
        config: ClientConfig,
        make_sink: impl FnOnce(WeakClient) -> S,
    ) -> Client {
        let sink_slot: Arc<Mutex<Option<Box<dyn RouteSink>>>> = Arc::default();
        let client = Client::build(config, Box::new(DeferredSink(sink_slot.clone())));
        let sink = make_sink(client.downgrade());
        *sink_slot.lock_or_recover() = Some(Box::new(sink));
        client
    }

    /// A client whose present-route changes come out of the returned
    /// `ChangeStream` (a `futures_core::Stream`, usable from any async
    /// runtime, or by blocking receives) instead of a sink. At most
    /// `capacity` changes wait in the stream; past that the client's
    /// delivery thread waits for the reader (and past the high-water mark
    /// the server threads stop reading), never a caller. Read the stream
    /// while you await `settled`: settling includes delivery, so a stream
    /// nobody reads keeps a large VNI from settling.
    pub fn with_stream(config: ClientConfig, capacity: usize) -> (Client, ChangeStream) {
        let (sink, stream) = stream::ChannelSink::channel(capacity);
        (Client::build(config, Box::new(sink)), stream)
    }

    fn build(config: ClientConfig, sink: Box<dyn RouteSink>) -> Client {
        let delivery = Arc::new(DeliveryQueue::default());
        let changed = Arc::new(event_listener::Event::new());
        let progress = {
            let changed = changed.clone();
            Arc::new(move || {
                changed.notify(usize::MAX);
            })
        };
        let started = delivery::spawn(delivery.clone(), sink, progress);
        let client = Client {
            owner: Arc::new(ShutdownGuard {
                inner: Arc::new(ClientInner {
                    config,
                    core: Mutex::new(Core {
                        subscriptions: BTreeSet::new(),
                        announcements: BTreeSet::new(),
                        servers: BTreeMap::new(),
                        present: PresentRoutes::new(),
                        delivery: delivery.clone(),
                        changes: Vec::new(),
                        shut_down: false,
                        next_server: 1,
                        disconnects: BTreeMap::new(),
                        sessions_established: 0,
                        vni_activity: HashMap::new(),
                        last_established: None,
                        sweeper_running: false,
                    }),
                    delivery,
                    totals: Arc::new(TrafficCounters::default()),
                    changed,
                }),
            }),
        };
        if let Err(e) = started {
            tracing::error!("cannot start the client's delivery thread: {e}");
            client.inner().shutdown();
        }
        client
    }

    fn inner(&self) -> &Arc<ClientInner> {
        &self.owner.inner
    }

    /// A handle that does not keep the client alive.
    pub fn downgrade(&self) -> WeakClient {
        WeakClient {
            owner: Arc::downgrade(&self.owner),
        }
    }

    /// Starts a session to `address` (`HOST:PORT`: `[::1]:4711`,
    /// `10.0.0.1:4711` or `reflector.example:4711`), reconnecting forever
    /// until `remove_server` or shutdown. A host name is resolved at every
    /// connect attempt; one that does not resolve is a failed attempt
    /// (logged, retried with backoff), not an error here. Returns at once.
    pub fn add_server(&self, address: &str) -> Result<(), ClientError> {
        self.add_server_with(address, ServerOptions::default())
    }

    /// `add_server` with per-server settings, e.g. the source address of
    /// the connection (Go's `AddPeer(addr, localIP)`). A local address of
    /// the other family than a literal server address is refused here; for
    /// a host name it is a failed connect attempt (logged, retried).
    pub fn add_server_with(
        &self,
        address: &str,
        options: ServerOptions,
    ) -> Result<(), ClientError> {
        check_address(address).map_err(|_| ClientError::InvalidServerAddress(address.into()))?;
        if let (Some(local), Ok(server)) = (options.local_address, address.parse::<SocketAddr>()) {
            if local.is_ipv4() != server.is_ipv4() {
                return Err(ClientError::LocalAddressFamily {
                    server: address.into(),
                    local,
                });
            }
        }
        let mut core = self.inner().lock();
        core.check_open()?;
        if core.find_server(address).is_some() {
            return Err(ClientError::ServerAlreadyAdded(address.into()));
        }
        let id = ServerId(core.next_server);
        core.next_server += 1;
        let (tx, rx) = crossbeam_channel::bounded(connection::EVENT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        core.servers.insert(
            id,
            ServerSlot {
                address: address.into(),
                local_address: options.local_address,
                md5: options.md5_key_file.is_some(),
                state: SessionState::Connecting,
                backlog: None,
                wake: tx.clone(),
                stop: stop.clone(),
                stream: None,
                traffic: Arc::new(TrafficCounters::default()),
                connected_since: None,
                keepalive: None,
                stale_until: VecDeque::new(),
            },
        );
        let target = connection::Target {
            id,
            address: address.to_string(),
            local_address: options.local_address,
            md5_key_file: options.md5_key_file.clone(),
            stop,
        };
        let inner = self.inner().clone();
        // Detached: stopping never joins it (see the module doc).
        let spawned = std::thread::Builder::new()
            .name(format!("mb-server-{address}"))
            .spawn(move || connection::run_server(inner, target, rx, tx));
        match spawned {
            Ok(_) => {
                tracing::info!(
                    server = %address,
                    local = ?options.local_address,
                    tcp_md5 = options.md5_key_file.is_some(),
                    "server added"
                );
                Ok(())
            }
            Err(e) => {
                core.servers.remove(&id);
                tracing::error!(server = %address, "cannot start server thread: {e}");
                Err(ClientError::ShutDown)
            }
        }
    }

    /// Ends the session to `address`; routes only it held are withdrawn
    /// (queued for the sink before this returns). Returns at once: the
    /// server's thread is told to stop and not waited for; nothing it does
    /// afterwards reaches the sink.
    pub fn remove_server(&self, address: &str) -> Result<(), ClientError> {
        let slot = {
            let mut core = self.inner().lock();
            let core = &mut *core;
            core.check_open()?;
            let id = core
                .find_server(address)
                .ok_or_else(|| ClientError::UnknownServer(address.into()))?;
            let slot = core.servers.remove(&id);
            core.present.server_lost(id, &mut core.changes);
            core.deliver();
            slot
        };
        if let Some(slot) = slot {
            stop_slot(slot);
        }
        self.inner().notify();
        tracing::info!(server = %address, "server removed");
        Ok(())
    }

    /// Subscribes to `vni` on every server.
    pub fn subscribe(&self, vni: Vni) -> Result<(), ClientError> {
        let mut core = self.inner().lock();
        core.check_open()?;
        if !core.subscriptions.insert(vni) {
            return Err(ClientError::AlreadySubscribed(vni));
        }
        core.vni_activity.insert(vni, Instant::now());
        core.queue_for_sessions(|o| o.subscription(vni, true));
        drop(core);
        self.inner().notify();
        tracing::info!(%vni, "subscribed");
        Ok(())
    }

    /// Unsubscribes from `vni`: its received routes are withdrawn from the
    /// sink (queued; the caller does not wait). Servers drop a peer's
    /// announcements in a VNI it unsubscribes from, so our own
    /// announcements there are sent again.
    pub fn unsubscribe(&self, vni: Vni) -> Result<(), ClientError> {
        let mut core = self.inner().lock();
        let core = &mut *core;
        core.check_open()?;
        if !core.subscriptions.remove(&vni) {
            return Err(ClientError::NotSubscribed(vni));
        }
        core.vni_activity.remove(&vni);
        let ours: Vec<Route> = core
            .announcements
            .iter()
            .filter(|r| r.vni == vni)
            .copied()
            .collect();
        core.queue_for_sessions(|o| {
            o.subscription(vni, false);
            for r in &ours {
                o.route(*r, Action::Add);
            }
        });
        core.present.vni_dropped(vni, &mut core.changes);
        core.deliver();
        self.inner().notify();
        tracing::info!(%vni, "unsubscribed");
        Ok(())
    }

    /// Announces `route` to every server. Received routes with its VNI and
    /// prefix stop being present (their removal is queued for the sink).
    pub fn announce(&self, route: Route) -> Result<(), ClientError> {
        let mut core = self.inner().lock();
        let core = &mut *core;
        core.check_open()?;
        if !core.announcements.insert(route) {
            return Err(ClientError::RouteAlreadyAnnounced(route));
        }
        core.queue_for_sessions(|o| {
            o.route(route, Action::Add);
        });
        core.present.own_announced(&route, &mut core.changes);
        core.deliver();
        tracing::debug!(%route, "announced");
        Ok(())
    }

    /// Withdraws `route` from every server.
    pub fn withdraw(&self, route: Route) -> Result<(), ClientError> {
        let mut core = self.inner().lock();
        let core = &mut *core;
        core.check_open()?;
        if !core.announcements.remove(&route) {
            return Err(ClientError::RouteNotAnnounced(route));
        }
        core.queue_for_sessions(|o| {
            o.route(route, Action::Remove);
        });
        core.present.own_withdrawn(&route, &mut core.changes);
        core.deliver();
        tracing::debug!(%route, "withdrawn");
        Ok(())
    }

    /// Every server with its session state.
    pub fn servers(&self) -> Vec<ServerStatus> {
        let core = self.inner().lock();
        core.servers
            .iter()
            .map(|(id, s)| ServerStatus {
                address: s.address.clone(),
                state: s.state,
                routes_received: core.present.held_by(*id),
                routes_stale: core.present.stale_held_by(*id),
                keepalive: s.keepalive,
                connected_since: s.connected_since,
                traffic: s.traffic.snapshot(),
                local_address: s.local_address,
                md5: s.md5,
            })
            .collect()
    }

    /// Frames, bytes and UPDATEs of every session since the client started.
    pub fn traffic(&self) -> Traffic {
        self.inner().totals.snapshot()
    }

    /// Sessions that ended since the client started, by reason
    /// (`CloseReason::label()`, or "shutdown"), sorted by reason.
    pub fn disconnects(&self) -> Vec<(&'static str, u64)> {
        self.inner()
            .lock()
            .disconnects
            .iter()
            .map(|(r, n)| (*r, *n))
            .collect()
    }

    /// Sessions that reached ESTABLISHED since the client started (a
    /// figure that grows with every reconnect).
    pub fn sessions_established(&self) -> u64 {
        self.inner().lock().sessions_established
    }

    /// The session state of one server.
    pub fn server_state(&self, address: &str) -> Result<SessionState, ClientError> {
        self.inner()
            .lock()
            .servers
            .values()
            .find(|s| s.address == address)
            .map(|s| s.state)
            .ok_or_else(|| ClientError::UnknownServer(address.into()))
    }

    /// VNIs we subscribe to, sorted (Go's `GetSubscribedVnis`).
    pub fn subscriptions(&self) -> Vec<Vni> {
        self.inner().lock().subscriptions.iter().copied().collect()
    }

    /// Do we subscribe to `vni`? (Go's `IsSubscribed`.)
    pub fn is_subscribed(&self, vni: Vni) -> bool {
        self.inner().lock().subscriptions.contains(&vni)
    }

    /// Routes we announce, sorted.
    pub fn announcements(&self) -> Vec<Route> {
        self.inner().lock().announcements.iter().copied().collect()
    }

    /// Do we announce `route`? (Go's `IsRouteAnnounced`.)
    pub fn is_announced(&self, route: &Route) -> bool {
        self.inner().lock().announcements.contains(route)
    }

    /// The present routes of the client's present set, sorted. This is the
    /// client's own view, which may be ahead of the sink by the changes
    /// still queued for it; `routes(vni)` is what the sink has been told.
    pub fn present_routes(&self) -> Vec<Route> {
        let mut routes = self.inner().lock().present.present();
        routes.sort();
        routes
    }

    /// The digest (`metalbond_wire::digest`) of the routes received in each VNI,
    /// ascending by VNI: every route some server holds for us, once,
    /// including those loop prevention keeps out of the present set. For a
    /// client that announces nothing in a VNI it equals the reflectors'
    /// digest of that VNI (`/api/v1/summary`, `metalbond diff`).
    pub fn digests(&self) -> Vec<(Vni, metalbond_wire::digest::VniDigest)> {
        self.inner().lock().present.digests()
    }

    /// The present routes of `vni` that the sink has been told about, sorted
    /// (Go's `GetRoutesForVni`). Does not take the client's lock; inside the
    /// sink it includes the change being delivered.
    pub fn routes(&self, vni: Vni) -> Vec<Route> {
        self.inner()
            .delivery
            .routes
            .get(&vni)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Hands the present routes of `vni` (as `routes(vni)` has them) to
    /// `sink` as adds, on the caller's thread (Go's `AddRoutesForVni`, e.g.
    /// to fill a table that was made after the routes arrived). Returns how
    /// many routes were handed over.
    pub fn replay(&self, vni: Vni, sink: &mut dyn RouteSink) -> usize {
        let routes = self.routes(vni);
        for r in &routes {
            sink.add_route(r.vni, r.destination, r.next_hop);
        }
        routes.len()
    }

    /// Tells the client's own sink every present route of `vni` again (as
    /// adds), queued in order with the other changes (Go's
    /// `AddRoutesForVni` on the client's callback). Returns at once.
    pub fn resend(&self, vni: Vni) -> Result<(), ClientError> {
        let core = self.inner().lock();
        core.check_open()?;
        core.delivery.push(Delivery::Replay(vni));
        Ok(())
    }

    /// Stops every session. Returns at once: server threads are told to
    /// stop and not waited for (see the module doc). The sink is not told
    /// to remove anything; changes queued before are still delivered.
    /// Later calls return `ShutDown`.
    pub fn shutdown(&self) {
        self.inner().shutdown();
    }

    /// `shutdown`, then waits at most `timeout` until every queued change
    /// has reached the sink and the sink has been dropped (e.g. before
    /// cleaning up what it installed). `true` when it has; `false` on
    /// timeout, and at once when called from inside the sink (which cannot
    /// be dropped while it runs).
    pub fn shutdown_timeout(&self, timeout: Duration) -> bool {
        self.shutdown();
        let delivery = &self.inner().delivery;
        if delivery.on_delivery_thread() {
            return false;
        }
        delivery.wait_finished(Instant::now() + timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_errors_are_typed_and_change_nothing() {
        let c = Client::new(ClientConfig::default(), LogSink);
        let v = Vni::new(23).unwrap();
        let r = Route::new(
            v,
            "10.0.0.0/24".parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        );
        assert_eq!(c.unsubscribe(v), Err(ClientError::NotSubscribed(v)));
        c.subscribe(v).unwrap();
        assert_eq!(c.subscribe(v), Err(ClientError::AlreadySubscribed(v)));
        assert_eq!(c.withdraw(r), Err(ClientError::RouteNotAnnounced(r)));
        c.announce(r).unwrap();
        assert_eq!(c.announce(r), Err(ClientError::RouteAlreadyAnnounced(r)));
        assert_eq!(c.subscriptions(), vec![v]);
        assert_eq!(c.announcements(), vec![r]);
        assert!(matches!(
            c.remove_server("[::1]:1"),
            Err(ClientError::UnknownServer(_))
        ));
        c.shutdown();
        assert_eq!(
            c.subscribe(Vni::new(24).unwrap()),
            Err(ClientError::ShutDown)
        );
    }
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
