//! The client's shared state: the server slots with their sessions'
//! backlogs, the present set, subscriptions and announcements under one
//! lock (`Core`), and `ClientInner`, what every `Client` clone and every
//! server thread shares.
//!
//! Owns: the rules of what is queued for which server and when a session
//! must resync instead. Must never: do I/O under the lock (server threads
//! and the delivery thread do it), or call the sink.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;

use crate::connection::Event;
use crate::delivery::DeliveryQueue;
use crate::present::{PresentRoutes, ServerId};
use crate::stale::{spawn_sweeper, MAX_HOLD};
use crate::traffic::{Traffic, TrafficCounters, TrafficMeter};
use crate::{ClientConfig, ClientError, PresentChange};
use metalbond_utils::LockOrRecover;
use metalbond_wire::codec::{FrameBuffer, Message};
use metalbond_wire::session::SessionState;
use metalbond_wire::types::{Action, Route, Vni};

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
    /// The session is signed with TCP-MD5 (`ServerOptions::md5_key_file`).
    pub md5: bool,
}

/// Most queued subscription changes before a session is reset and resynced
/// instead (bounds memory when a server stops reading).
pub(crate) const MAX_QUEUED_SUBSCRIPTION_CHANGES: usize = 4096;

/// Most distinct routes with a queued change before a session is reset and
/// resynced instead (a server that stopped reading costs at most this).
pub(crate) const MAX_QUEUED_ROUTE_CHANGES: usize = 1 << 20;

/// Messages for one established session, coalesced while it is busy.
/// Bounded: routes by `MAX_QUEUED_ROUTE_CHANGES` (latest action per route wins),
/// subscriptions by `MAX_QUEUED_SUBSCRIPTION_CHANGES`.
#[derive(Default, Debug)]
pub(crate) struct SessionBacklog {
    /// SUBSCRIBE (true) / UNSUBSCRIBE (false), in call order; sent first.
    pub(crate) subscriptions: Vec<(Vni, bool)>,
    /// Latest announce (Add) or withdraw (Remove) per route.
    pub(crate) routes: HashMap<Route, Action>,
    /// Too many changes queued: reset the session (it resyncs on reconnect).
    pub(crate) overflowed: bool,
}

impl SessionBacklog {
    pub(crate) fn subscription(&mut self, vni: Vni, subscribe: bool) {
        if self.subscriptions.last() == Some(&(vni, subscribe)) {
            return;
        }
        if self.subscriptions.len() >= MAX_QUEUED_SUBSCRIPTION_CHANGES {
            self.overflowed = true;
            return;
        }
        self.subscriptions.push((vni, subscribe));
    }

    pub(crate) fn route(&mut self, route: Route, action: Action) {
        if self.routes.len() >= MAX_QUEUED_ROUTE_CHANGES && !self.routes.contains_key(&route) {
            self.overflowed = true;
            return;
        }
        self.routes.insert(route, action);
    }
}

/// One server the client talks to.
pub(crate) struct ServerSlot {
    /// Address as given (HOST:PORT), resolved at each connect.
    pub(crate) address: String,
    /// Source address to bind before connecting, if asked for.
    pub(crate) local_address: Option<IpAddr>,
    /// The session is signed with TCP-MD5 (a key file is configured).
    pub(crate) md5: bool,
    /// Current session state.
    pub(crate) state: SessionState,
    /// Pending messages while ESTABLISHED; `None` otherwise (the next
    /// ESTABLISHED sends a full snapshot instead).
    pub(crate) backlog: Option<SessionBacklog>,
    /// Wakes the server thread.
    pub(crate) wake: Sender<Event>,
    /// Tells the server thread to stop.
    pub(crate) stop: Arc<AtomicBool>,
    /// The live connection, so stopping can interrupt a blocked write.
    pub(crate) stream: Option<TcpStream>,
    /// Counters of the current connection (fresh at each connect).
    pub(crate) traffic: Arc<TrafficCounters>,
    /// When the current connection was made.
    pub(crate) connected_since: Option<SystemTime>,
    /// The agreed keepalive interval while ESTABLISHED.
    pub(crate) keepalive: Option<Duration>,
    /// When each generation of this server's stale routes is removed
    /// (`stale_hold` after the loss that made it), oldest first: one entry
    /// per generation in the present set.
    pub(crate) stale_until: VecDeque<Instant>,
}

/// Capacity of the scratch list of present-set changes kept between
/// deliveries (more is given back after a large withdrawal).
pub(crate) const MAX_KEPT_CHANGES: usize = 4096;

/// Everything behind the client's lock.
pub(crate) struct Core {
    /// VNIs we subscribe to (sent to every server).
    pub(crate) subscriptions: BTreeSet<Vni>,
    /// Routes we announce (sent to every server).
    pub(crate) announcements: BTreeSet<Route>,
    /// Server slots by id.
    pub(crate) servers: BTreeMap<ServerId, ServerSlot>,
    /// Received routes per server and the present set.
    pub(crate) present: PresentRoutes,
    /// Where present-set changes go (in order) on their way to the sink.
    pub(crate) delivery: Arc<DeliveryQueue>,
    /// Scratch list of changes to queue.
    pub(crate) changes: Vec<PresentChange>,
    /// Set once by shutdown; every later call fails with `ShutDown`.
    pub(crate) shut_down: bool,
    /// Next `ServerId`.
    pub(crate) next_server: u64,
    /// Sessions that ended, by `CloseReason::label()` ("shutdown" when we
    /// stopped them), since the client started.
    pub(crate) disconnects: BTreeMap<&'static str, u64>,
    /// Sessions that reached ESTABLISHED since the client started.
    pub(crate) sessions_established: u64,
    /// Per subscribed VNI, when its routes last moved: the subscription, or
    /// the last UPDATE received for it (for `Client::settled`).
    pub(crate) vni_activity: HashMap<Vni, Instant>,
    /// When a session last became ESTABLISHED (its server then sends the
    /// tables of every VNI we subscribe to).
    pub(crate) last_established: Option<Instant>,
    /// The stale sweeper thread runs (it ends when no server holds stale
    /// routes; `session_lost` starts it again).
    pub(crate) sweeper_running: bool,
}

impl Core {
    /// Queues pending present-set changes for the sink, in order. Never
    /// blocks (the delivery thread calls the sink later, without our lock).
    pub(crate) fn deliver(&mut self) {
        self.delivery.push_changes(&mut self.changes);
        // Losing a server with a million routes fills this scratch list
        // once; do not keep tens of MB for the ordinary small batches.
        self.changes.shrink_to(MAX_KEPT_CHANGES);
    }

    pub(crate) fn check_open(&self) -> Result<(), ClientError> {
        if self.shut_down {
            Err(ClientError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// Queues `f` on every established session's backlog and wakes them.
    pub(crate) fn queue_for_sessions(&mut self, f: impl Fn(&mut SessionBacklog)) {
        for slot in self.servers.values_mut() {
            if let Some(backlog) = slot.backlog.as_mut() {
                f(backlog);
                let _ = slot.wake.try_send(Event::Wake);
            }
        }
    }

    pub(crate) fn find_server(&self, address: &str) -> Option<ServerId> {
        self.servers
            .iter()
            .find(|(_, s)| s.address == address)
            .map(|(id, _)| *id)
    }
}

/// State shared by the handles and the server threads.
pub(crate) struct ClientInner {
    /// Session timing.
    pub(crate) config: ClientConfig,
    /// The one lock.
    pub(crate) core: Mutex<Core>,
    /// The queue to the delivery thread (also in `Core`; here so waiters
    /// and server threads reach it without the lock).
    pub(crate) delivery: Arc<DeliveryQueue>,
    /// Frames, bytes and UPDATEs of every session since the start (atomics,
    /// outside the lock).
    pub(crate) totals: Arc<TrafficCounters>,
    /// Notified on every change a waiter may be waiting for: session
    /// states, received UPDATEs, delivery progress, shutdown.
    pub(crate) changed: Arc<event_listener::Event>,
}

impl ClientInner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock_or_recover()
    }

    /// Wakes every waiter (`Client::established`, `settled`, ...).
    pub(crate) fn notify(&self) {
        self.changed.notify(usize::MAX);
    }

    pub(crate) fn with_slot<R>(
        &self,
        id: ServerId,
        f: impl FnOnce(&mut ServerSlot) -> R,
    ) -> Option<R> {
        self.lock().servers.get_mut(&id).map(f)
    }

    pub(crate) fn set_state(&self, id: ServerId, state: SessionState) {
        self.with_slot(id, |slot| slot.state = state);
        self.notify();
    }

    /// A TCP connection to server `id` was made: fresh session counters.
    /// Returns the meter its reader and writer count with, or `None` when
    /// the slot is gone (removed or shut down: the thread must stop).
    pub(crate) fn connected(&self, id: ServerId, stream: &TcpStream) -> Option<TrafficMeter> {
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
    pub(crate) fn established(
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
    pub(crate) fn received(
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
    pub(crate) fn session_lost(self: &Arc<Self>, id: ServerId, reason: &'static str, keep: bool) {
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
    pub(crate) fn sweep_stale(&self) -> bool {
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
    pub(crate) fn shutdown(&self) {
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

/// Signals a server thread to stop and interrupts its socket. Does not wait
/// for the thread: it notices within `connection::STOP_POLL` (or, in a DNS
/// lookup, abandons it) and can no longer change anything.
pub(crate) fn stop_slot(slot: ServerSlot) {
    slot.stop.store(true, Ordering::SeqCst);
    if let Some(stream) = slot.stream {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let _ = slot.wake.try_send(Event::Wake);
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::NextHop;

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
}
