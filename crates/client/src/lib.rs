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

mod connection;
mod delivery;
pub mod error;
mod present;
mod status_source;
pub use status_source::ClientStatusSource;
mod stream;
mod traffic;
mod wait;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;

use connection::Event;
pub use connection::STABLE_SESSION;
use delivery::{Delivery, DeliveryQueue};
pub use error::ClientError;
use metalbond_utils::LockOrRecover;
use metalbond_wire::codec::{FrameBuffer, Message};
use metalbond_wire::session::SessionState;
/// The route types of the API, so an embedder needs this one dependency.
pub use metalbond_wire::types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

pub use present::PresentChange;
use present::{PresentRoutes, ServerId};
pub use stream::{ChangeStream, DEFAULT_STREAM_CAPACITY};
pub use traffic::Traffic;
use traffic::{TrafficCounters, TrafficMeter};

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

/// Timing of sessions and reconnects.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our keepalive interval (the session uses min(ours, server's)).
    pub keepalive: Duration,
    /// First reconnect delay after a failure.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (the backoff doubles up to this).
    pub reconnect_max: Duration,
    /// Give up one TCP connect attempt after this long.
    pub connect_timeout: Duration,
    /// Most routes one server may hold for us at once. One more ADD closes
    /// that session ("server limit exceeded", disconnect reason `limit`)
    /// and withdraws everything it sent, so a hostile or broken server
    /// cannot make the client grow without bound.
    pub max_routes_per_server: usize,
    /// Hitless restarts (`--stale-hold`): when a session to a server is
    /// lost, that server's routes stay present as *stale* for this long
    /// after the loss; received again from the server they are fresh (no
    /// change for the sink), withdrawn explicitly they go at once, and those
    /// not received again by then are removed. Zero removes them at the loss
    /// (the Go client's behaviour). A session closed for a fault of the
    /// server (malformed frame, protocol violation, route limit) drops its
    /// routes at once whatever this says.
    pub stale_hold: Duration,
}

/// Default `ClientConfig::stale_hold`: a reflector restart, and the
/// announcers reconnecting to it, fit in a minute with room to spare.
pub const DEFAULT_STALE_HOLD: Duration = metalbond_wire::defaults::STALE_HOLD;

/// How often held stale routes are checked for the end of their hold.
const STALE_SWEEP_TICK: Duration = Duration::from_millis(100);

/// Default of `ClientConfig::max_routes_per_server`: twice the largest
/// table the reflector accepts from one peer by default, with room for a
/// region's routes.
pub const DEFAULT_MAX_ROUTES_PER_SERVER: usize = metalbond_wire::defaults::MAX_ROUTES_PER_SERVER;

/// Every field from `metalbond_wire::defaults`.
impl Default for ClientConfig {
    fn default() -> Self {
        use metalbond_wire::defaults;
        ClientConfig {
            keepalive: defaults::KEEPALIVE,
            reconnect_min: defaults::RECONNECT_MIN,
            reconnect_max: defaults::RECONNECT_MAX,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            max_routes_per_server: defaults::MAX_ROUTES_PER_SERVER,
            stale_hold: defaults::STALE_HOLD,
        }
    }
}

/// Per-server settings for `Client::add_server_with`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Source address of the TCP connection (Go's `AddPeer(addr, localIP)`):
    /// bound before connecting, port chosen by the kernel. `None`: the
    /// kernel picks the source by its routes.
    pub local_address: Option<IpAddr>,
}

/// A server sent more routes than `ClientConfig::max_routes_per_server`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("server limit exceeded: more than {limit} routes received (--max-routes-per-server)")]
pub(crate) struct RouteLimitExceeded {
    /// The limit that was passed.
    pub(crate) limit: usize,
}

/// One server's session state, as reported by `Client::servers`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ServerStatus {
    /// The address as given to `add_server`.
    pub address: String,
    /// Session state (RETRY while waiting to reconnect).
    pub state: SessionState,
    /// Routes this server currently holds for us (fresh and stale).
    pub routes_received: usize,
    /// Of those, routes kept from a lost session and not received again yet
    /// (see `ClientConfig::stale_hold`).
    pub routes_stale: usize,
    /// Keepalive interval agreed in the HELLO exchange; `None` unless
    /// ESTABLISHED.
    pub keepalive: Option<Duration>,
    /// When the current TCP connection was made; `None` while not connected.
    pub connected_since: Option<SystemTime>,
    /// What the current connection has read and written (zero while not
    /// connected; starts again at each reconnect).
    pub traffic: Traffic,
    /// The source address asked for in `ServerOptions` (`None`: the
    /// kernel's choice).
    pub local_address: Option<IpAddr>,
}

/// Most queued subscription changes before a session is reset and resynced
/// instead (bounds memory when a server stops reading).
const MAX_QUEUED_SUBSCRIPTION_CHANGES: usize = 4096;

/// Most distinct routes with a queued change before a session is reset and
/// resynced instead (a server that stopped reading costs at most this).
const MAX_QUEUED_ROUTE_CHANGES: usize = 1 << 20;

/// Messages for one established session, coalesced while it is busy.
/// Bounded: routes by `MAX_QUEUED_ROUTE_CHANGES` (latest action per route wins),
/// subscriptions by `MAX_QUEUED_SUBSCRIPTION_CHANGES`.
#[derive(Default, Debug)]
struct SessionBacklog {
    /// SUBSCRIBE (true) / UNSUBSCRIBE (false), in call order; sent first.
    subscriptions: Vec<(Vni, bool)>,
    /// Latest announce (Add) or withdraw (Remove) per route.
    routes: HashMap<Route, Action>,
    /// Too many changes queued: reset the session (it resyncs on reconnect).
    overflowed: bool,
}

impl SessionBacklog {
    fn subscription(&mut self, vni: Vni, subscribe: bool) {
        if self.subscriptions.last() == Some(&(vni, subscribe)) {
            return;
        }
        if self.subscriptions.len() >= MAX_QUEUED_SUBSCRIPTION_CHANGES {
            self.overflowed = true;
            return;
        }
        self.subscriptions.push((vni, subscribe));
    }

    fn route(&mut self, route: Route, action: Action) {
        if self.routes.len() >= MAX_QUEUED_ROUTE_CHANGES && !self.routes.contains_key(&route) {
            self.overflowed = true;
            return;
        }
        self.routes.insert(route, action);
    }
}

/// One server the client talks to.
struct ServerSlot {
    /// Address as given (HOST:PORT), resolved at each connect.
    address: String,
    /// Source address to bind before connecting, if asked for.
    local_address: Option<IpAddr>,
    /// Current session state.
    state: SessionState,
    /// Pending messages while ESTABLISHED; `None` otherwise (the next
    /// ESTABLISHED sends a full snapshot instead).
    backlog: Option<SessionBacklog>,
    /// Wakes the server thread.
    wake: Sender<Event>,
    /// Tells the server thread to stop.
    stop: Arc<AtomicBool>,
    /// The live connection, so stopping can interrupt a blocked write.
    stream: Option<TcpStream>,
    /// Counters of the current connection (fresh at each connect).
    traffic: Arc<TrafficCounters>,
    /// When the current connection was made.
    connected_since: Option<SystemTime>,
    /// The agreed keepalive interval while ESTABLISHED.
    keepalive: Option<Duration>,
    /// When each generation of this server's stale routes is removed
    /// (`stale_hold` after the loss that made it), oldest first: one entry
    /// per generation in the present set.
    stale_until: VecDeque<Instant>,
}

/// Capacity of the scratch list of present-set changes kept between
/// deliveries (more is given back after a large withdrawal).
const MAX_KEPT_CHANGES: usize = 4096;

/// Everything behind the client's lock.
struct Core {
    /// VNIs we subscribe to (sent to every server).
    subscriptions: BTreeSet<Vni>,
    /// Routes we announce (sent to every server).
    announcements: BTreeSet<Route>,
    /// Server slots by id.
    servers: BTreeMap<ServerId, ServerSlot>,
    /// Received routes per server and the present set.
    present: PresentRoutes,
    /// Where present-set changes go (in order) on their way to the sink.
    delivery: Arc<DeliveryQueue>,
    /// Scratch list of changes to queue.
    changes: Vec<PresentChange>,
    /// Set once by shutdown; every later call fails with `ShutDown`.
    shut_down: bool,
    /// Next `ServerId`.
    next_server: u64,
    /// Sessions that ended, by `CloseReason::label()` ("shutdown" when we
    /// stopped them), since the client started.
    disconnects: BTreeMap<&'static str, u64>,
    /// Sessions that reached ESTABLISHED since the client started.
    sessions_established: u64,
    /// Per subscribed VNI, when its routes last moved: the subscription, or
    /// the last UPDATE received for it (for `Client::settled`).
    vni_activity: HashMap<Vni, Instant>,
    /// When a session last became ESTABLISHED (its server then sends the
    /// tables of every VNI we subscribe to).
    last_established: Option<Instant>,
    /// The stale sweeper thread runs (it ends when no server holds stale
    /// routes; `session_lost` starts it again).
    sweeper_running: bool,
}

impl Core {
    /// Queues pending present-set changes for the sink, in order. Never
    /// blocks (the delivery thread calls the sink later, without our lock).
    fn deliver(&mut self) {
        self.delivery.push_changes(&mut self.changes);
        // Losing a server with a million routes fills this scratch list
        // once; do not keep tens of MB for the ordinary small batches.
        self.changes.shrink_to(MAX_KEPT_CHANGES);
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if self.shut_down {
            Err(ClientError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// Queues `f` on every established session's backlog and wakes them.
    fn queue_for_sessions(&mut self, f: impl Fn(&mut SessionBacklog)) {
        for slot in self.servers.values_mut() {
            if let Some(backlog) = slot.backlog.as_mut() {
                f(backlog);
                let _ = slot.wake.try_send(Event::Wake);
            }
        }
    }

    fn find_server(&self, address: &str) -> Option<ServerId> {
        self.servers
            .iter()
            .find(|(_, s)| s.address == address)
            .map(|(id, _)| *id)
    }
}

/// State shared by the handles and the server threads.
struct ClientInner {
    /// Session timing.
    config: ClientConfig,
    /// The one lock.
    core: Mutex<Core>,
    /// The queue to the delivery thread (also in `Core`; here so waiters
    /// and server threads reach it without the lock).
    delivery: Arc<DeliveryQueue>,
    /// Frames, bytes and UPDATEs of every session since the start (atomics,
    /// outside the lock).
    totals: Arc<TrafficCounters>,
    /// Notified on every change a waiter may be waiting for: session
    /// states, received UPDATEs, delivery progress, shutdown.
    changed: Arc<event_listener::Event>,
}

impl ClientInner {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock_or_recover()
    }

    /// Wakes every waiter (`Client::established`, `settled`, ...).
    fn notify(&self) {
        self.changed.notify(usize::MAX);
    }

    fn with_slot<R>(&self, id: ServerId, f: impl FnOnce(&mut ServerSlot) -> R) -> Option<R> {
        self.lock().servers.get_mut(&id).map(f)
    }

    fn set_state(&self, id: ServerId, state: SessionState) {
        self.with_slot(id, |slot| slot.state = state);
        self.notify();
    }

    /// A TCP connection to server `id` was made: fresh session counters.
    /// Returns the meter its reader and writer count with, or `None` when
    /// the slot is gone (removed or shut down: the thread must stop).
    fn connected(&self, id: ServerId, stream: &TcpStream) -> Option<TrafficMeter> {
        let session = Arc::new(TrafficCounters::default());
        self.with_slot(id, |slot| {
            slot.stream = stream.try_clone().ok();
            slot.traffic = session.clone();
            slot.connected_since = Some(SystemTime::now());
            slot.keepalive = None;
        })?;
        Some(TrafficMeter {
            session,
            total: self.totals.clone(),
        })
    }

    /// The session became ESTABLISHED with `keepalive` agreed: encode the
    /// full snapshot into `out` and open the backlog. Returns
    /// (subscriptions, announcements) sent, or `None` when the slot is gone.
    fn established(
        &self,
        id: ServerId,
        keepalive: Duration,
        out: &mut FrameBuffer,
    ) -> Option<(usize, usize)> {
        let mut guard = self.lock();
        let core = &mut *guard;
        let slot = core.servers.get_mut(&id)?;
        slot.backlog = Some(SessionBacklog::default());
        slot.state = SessionState::Established;
        slot.keepalive = Some(keepalive);
        for vni in &core.subscriptions {
            out.push(&Message::Subscribe(*vni));
        }
        for route in &core.announcements {
            out.push(&Message::Update {
                action: Action::Add,
                route: *route,
            });
        }
        core.sessions_established += 1;
        core.last_established = Some(Instant::now());
        let sent = (core.subscriptions.len(), core.announcements.len());
        drop(guard);
        self.notify();
        Some(sent)
    }

    /// UPDATEs from server `id` (drained from `updates`). An ADD that would
    /// make the server hold more than `max_routes_per_server` routes stops
    /// the batch there with `Err` (the caller closes the session, which
    /// withdraws what the server sent). A slot that is gone changes nothing.
    fn received(
        &self,
        id: ServerId,
        updates: &mut Vec<(Action, Route)>,
    ) -> Result<(), RouteLimitExceeded> {
        if updates.is_empty() {
            return Ok(());
        }
        let limit = self.config.max_routes_per_server;
        let mut guard = self.lock();
        let core = &mut *guard;
        if core.shut_down || !core.servers.contains_key(&id) {
            updates.clear();
            return Ok(());
        }
        let now = Instant::now();
        let mut last_vni = None;
        let mut result = Ok(());
        for (action, route) in updates.drain(..) {
            if !core.subscriptions.contains(&route.vni) {
                tracing::debug!(%route, "update for a VNI we do not subscribe to; ignored");
                continue;
            }
            if last_vni != Some(route.vni) {
                last_vni = Some(route.vni);
                core.vni_activity.insert(route.vni, now);
            }
            if action == Action::Add
                && core.present.held_by(id) >= limit
                && !core.present.holds(id, &route)
            {
                // Stale copies count against the limit (they cost memory),
                // but a server whose table changed across a restart must
                // not be cut off for them: they go first.
                if core.present.stale_held_by(id) > 0 {
                    let swept = core.present.sweep_all(id, &mut core.changes);
                    if let Some(slot) = core.servers.get_mut(&id) {
                        slot.stale_until.clear();
                        // On the session's thread: its span names the server.
                        tracing::info!(
                            routes = swept,
                            "route limit reached: stale routes withdrawn early to make room"
                        );
                    }
                }
                if core.present.held_by(id) >= limit {
                    result = Err(RouteLimitExceeded { limit });
                    break;
                }
            }
            tracing::trace!(?action, %route, "received");
            core.present.received(id, action, route, &mut core.changes);
        }
        updates.clear();
        core.deliver();
        drop(guard);
        self.notify();
        result
    }

    /// Server `id`'s session ended (`reason`: a `CloseReason::label()`, or
    /// "shutdown"). With `keep` (the connection was lost, not closed for a
    /// fault of the server) and a `stale_hold`, its routes stay as stale
    /// until received again, withdrawn, or swept when the hold ends;
    /// otherwise they are dropped now (unless the client is shutting down:
    /// then the sink keeps what it has; or the slot is gone: then
    /// `remove_server` withdrew them already).
    fn session_lost(self: &Arc<Self>, id: ServerId, reason: &'static str, keep: bool) {
        let hold = self.config.stale_hold;
        let mut guard = self.lock();
        let core = &mut *guard;
        *core.disconnects.entry(reason).or_default() += 1;
        let Some(slot) = core.servers.get_mut(&id) else {
            return;
        };
        slot.backlog = None;
        slot.stream = None;
        slot.connected_since = None;
        slot.keepalive = None;
        slot.traffic = Arc::new(TrafficCounters::default());
        if !core.shut_down {
            if keep && !hold.is_zero() {
                // Each loss is a generation with its own deadline: routes
                // that went stale earlier keep theirs, so a session that
                // keeps failing cannot keep them forever.
                let stale = core.present.server_stale(id);
                let now = Instant::now();
                slot.stale_until
                    .push_back(now.checked_add(hold).unwrap_or(now + MAX_HOLD));
                if stale > 0 {
                    tracing::info!(
                        routes = stale,
                        hold_secs = hold.as_secs(),
                        "session lost: its routes stay as stale until received again or the hold ends"
                    );
                }
                if !core.sweeper_running {
                    core.sweeper_running = spawn_sweeper(Arc::downgrade(self));
                }
            } else {
                slot.stale_until.clear();
                core.present.server_lost(id, &mut core.changes);
                core.deliver();
            }
        }
        drop(guard);
        self.notify();
    }

    /// Removes the stale routes of every server whose hold has ended.
    /// Returns false when no server holds stale routes any more (or the
    /// client shut down): the sweeper then ends.
    fn sweep_stale(&self) -> bool {
        let mut guard = self.lock();
        let core = &mut *guard;
        if core.shut_down {
            core.sweeper_running = false;
            return false;
        }
        let now = Instant::now();
        let mut pending = false;
        let mut due = Vec::new();
        for (id, slot) in core.servers.iter_mut() {
            while slot.stale_until.front().is_some_and(|t| *t <= now) {
                slot.stale_until.pop_front();
                due.push((*id, slot.address.clone()));
            }
            pending |= !slot.stale_until.is_empty();
        }
        for (id, address) in due {
            let swept = core.present.sweep_oldest(id, &mut core.changes);
            if swept > 0 {
                tracing::info!(server = %address, routes = swept, "stale hold over: routes not received again are withdrawn");
            }
        }
        core.deliver();
        if !pending {
            core.sweeper_running = false;
        }
        drop(guard);
        self.notify();
        pending
    }

    /// Stops every session; later calls fail with `ShutDown`. Waits for
    /// nothing.
    fn shutdown(&self) {
        let slots: Vec<ServerSlot> = {
            let mut core = self.lock();
            if core.shut_down {
                return;
            }
            core.shut_down = true;
            // Under the lock: nothing can be queued after the close.
            core.delivery.close();
            std::mem::take(&mut core.servers).into_values().collect()
        };
        for slot in slots {
            stop_slot(slot);
        }
        self.notify();
        tracing::info!("client shut down");
    }
}

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
/// Checks the `HOST:PORT` form: HOST is an IPv6 address in brackets, an
/// IPv4 address or a DNS name (resolved at each connect, so it may not
/// resolve yet); PORT is 0-65535. `Err` says what is wrong.
pub fn check_address(address: &str) -> Result<(), String> {
    let no_port = || "no ':PORT'".to_string();
    let (host, port) = if address.starts_with('[') {
        let end = address
            .find(']')
            .ok_or_else(|| format!("'{address}' lacks the closing ']'"))?;
        let port = address[end + 1..].strip_prefix(':').ok_or_else(no_port)?;
        (&address[..=end], port)
    } else {
        address.rsplit_once(':').ok_or_else(no_port)?
    };
    port.parse::<u16>()
        .map_err(|_| format!("port '{port}' is not a number 0-65535"))?;
    check_host(host)
}

/// The HOST part of `HOST:PORT` (see `check_address`).
fn check_host(host: &str) -> Result<(), String> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("'{host}' lacks the closing ']'"))?;
        // A zone is allowed after the address as the interface index
        // (fe80::1%2): names (%eth0) are not resolved on connect.
        let (addr, zone) = inner.split_once('%').unwrap_or((inner, "0"));
        let zone_ok = !zone.is_empty() && zone.chars().all(|c| c.is_ascii_digit());
        return match addr.parse::<std::net::Ipv6Addr>() {
            Ok(_) if zone_ok => Ok(()),
            _ => Err(format!("'{inner}' is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets: [ADDR]:PORT".into());
    }
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return host
            .parse::<std::net::Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| format!("'{host}' is not an IPv4 address"));
    }
    // A DNS name: labels of letters, digits, '-' and '_' (1-63 each, not
    // starting or ending with '-'), 253 characters at most, a final '.'
    // allowed.
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("'{host}' is not a host name or IP address"));
    }
    Ok(())
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
            stop,
        };
        let inner = self.inner().clone();
        // Detached: stopping never joins it (see the module doc).
        let spawned = std::thread::Builder::new()
            .name(format!("mb-server-{address}"))
            .spawn(move || connection::run_server(inner, target, rx, tx));
        match spawned {
            Ok(_) => {
                tracing::info!(server = %address, local = ?options.local_address, "server added");
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

/// The sink of `Client::new_cyclic` until `make_sink` has made the real one
/// (nothing can be delivered before that: no server or subscription exists
/// yet).
struct DeferredSink(Arc<Mutex<Option<Box<dyn RouteSink>>>>);

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

/// Stand-in for a `stale_hold` too long for the clock: a year.
const MAX_HOLD: Duration = Duration::from_secs(365 * 86_400);

/// Starts the thread that ends stale holds (`ClientConfig::stale_hold`); it
/// runs while some server holds stale routes. Returns whether it started.
fn spawn_sweeper(inner: std::sync::Weak<ClientInner>) -> bool {
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

/// Signals a server thread to stop and interrupts its socket. Does not wait
/// for the thread: it notices within `connection::STOP_POLL` (or, in a DNS
/// lookup, abandons it) and can no longer change anything.
fn stop_slot(slot: ServerSlot) {
    slot.stop.store(true, Ordering::SeqCst);
    if let Some(stream) = slot.stream {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let _ = slot.wake.try_send(Event::Wake);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_need_host_and_port() {
        for good in [
            "[::1]:4711",
            "[fe80::1%2]:4711",
            "127.0.0.1:4711",
            "reflector.example:4711",
            "reflector.example.:4711",
            "localhost:4711",
            "rr-1_a.dc2.example:1",
        ] {
            assert_eq!(check_address(good), Ok(()), "{good}");
        }
        for (bad, cause) in [
            ("::1:4711", "needs brackets"),
            ("[::1]", "no ':PORT'"),
            ("host", "no ':PORT'"),
            (":4711", "empty"),
            ("host:port", "not a number"),
            ("host:70000", "not a number"),
            ("[::1:4711", "closing"),
            ("[10.0.0.1]:4711", "not an IPv6 address"),
            ("[fe80::1%]:4711", "not an IPv6 address"),
            ("[fe80::1%eth0]:4711", "not an IPv6 address"),
            ("10.0.0.300:4711", "not an IPv4 address"),
            ("bad host:4711", "not a host name"),
            ("-host:4711", "not a host name"),
            ("a..b:4711", "not a host name"),
            ("x/y:4711", "not a host name"),
        ] {
            let err = check_address(bad).unwrap_err();
            assert!(err.contains(cause), "{bad}: {err}");
        }
        let c = Client::new(ClientConfig::default(), LogSink);
        assert_eq!(
            c.add_server("bad host:1"),
            Err(ClientError::InvalidServerAddress("bad host:1".into()))
        );
    }

    #[test]
    fn session_backlog_coalesces_routes_and_overflows_to_a_resync() {
        let v = Vni::new(23).unwrap();
        let r = Route::new(
            v,
            "10.0.0.0/24".parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        );
        let mut o = SessionBacklog::default();
        o.route(r, Action::Add);
        o.route(r, Action::Remove);
        o.subscription(v, true);
        o.subscription(v, true);
        let mut out = FrameBuffer::with_capacity(64);
        assert_eq!(o.drain_into(&mut out), Ok(()));
        assert_eq!((out.frames(), out.updates()), (2, 1));
        let mut d = metalbond_wire::codec::FrameDecoder::new();
        d.extend(out.as_bytes());
        assert_eq!(d.next_message().unwrap(), Some(Message::Subscribe(v)));
        assert_eq!(
            d.next_message().unwrap(),
            Some(Message::Update {
                action: Action::Remove,
                route: r
            })
        );
        assert_eq!(d.next_message().unwrap(), None);
        for i in 0..=MAX_QUEUED_SUBSCRIPTION_CHANGES {
            o.subscription(v, i % 2 == 0);
        }
        assert_eq!(o.drain_into(&mut out), Err(()));
    }

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
