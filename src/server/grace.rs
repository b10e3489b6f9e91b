//! Peer grace (`--peer-grace SECS`): when a peer's session ends, its
//! announcements stay in the VNI tables for a while, held by a *ghost* of
//! the departed peer, so that an agent restarting (a new connection from a
//! new port) does not make the whole fleet withdraw and re-add its routes.
//!
//! Owns: `GraceHolds`, the ghosts of one shard (address, routes held,
//! deadline, the bounds that push the oldest out) and `GhostIndex`. The
//! task per ghost that withdraws what it still holds when the grace is over
//! is the departed peer's (`peer::hold_as_ghost`): this module is state
//! only and depends on no task or shard module.
//!
//! How it works: a ghost keeps the departed peer's `PeerId` as the
//! announcer of its routes; nothing is sent to the owners when the session
//! ends, so subscribers see nothing. A peer announcing the same route in the
//! meantime becomes a second announcer of it (the owner sends nothing new:
//! the route was present already). At expiry the ghost's routes are
//! withdrawn as if the peer had sent REMOVE for each: a route still
//! announced by someone else stays, the others go.
//!
//! The restarted agent is the ghost's successor: a live peer connecting
//! from the ghost's IP address (`GhostIndex`, shared by all shards). When it
//! announces a route the ghost holds, or withdraws one, the ghost's claim on
//! that route is dropped right after (same shard, same channel to the
//! owner, so in order): its explicit REMOVE takes effect at once, and at
//! expiry the ghost no longer holds what its successor took over.
//!
//! ```text
//!  peer task ends ──announced routes──▶ peer::hold_as_ghost ──▶ GraceHolds::add_ghost
//!                                          │ ghost task: sleep(grace) │ pushed out │ shutdown
//!                                          ▼
//!                     ShardContext::withdraw_all (chunks) ──▶ owners ──▶ subscribers
//! ```
//!
//! Must never: delay an explicit REMOVE of the ghost's successor, outlive
//! a server shutdown, or hold more than `ServerConfig::peer_grace_max_routes`
//! routes or `MAX_GHOSTS_PER_SHARD` ghosts on one shard (beyond that the
//! oldest ghosts are withdrawn early, so a peer that reconnects in a loop
//! cannot grow the server through its ghosts).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::event::LocalEvent;
use super::stats::PeerInfo;
use super::PeerId;
use crate::session::SessionState;
use crate::util::LockOrRecover;

/// Most ghosts one shard keeps; beyond this the oldest are withdrawn early
/// (each ghost is a task and a timer, whatever it holds).
pub(crate) const MAX_GHOSTS_PER_SHARD: usize = 10_000;

/// Ghosts by the IP address their session came from, for every shard: a
/// live peer from that address is their successor.
#[derive(Default, Debug)]
pub(crate) struct GhostIndex {
    /// Ghosts in the map: the common case (none) costs one atomic load.
    count: AtomicUsize,
    /// Address → ghosts from it.
    by_ip: Mutex<HashMap<IpAddr, Vec<PeerId>>>,
}

impl GhostIndex {
    fn add(&self, ip: IpAddr, ghost: PeerId) {
        let mut map = self.by_ip.lock_or_recover();
        map.entry(ip).or_default().push(ghost);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self, ip: IpAddr, ghost: PeerId) {
        let mut map = self.by_ip.lock_or_recover();
        if let Some(list) = map.get_mut(&ip) {
            if let Some(i) = list.iter().position(|g| *g == ghost) {
                list.swap_remove(i);
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                map.remove(&ip);
            }
        }
    }

    /// Ghosts of earlier sessions from `ip` (not `me`), usually none.
    pub(crate) fn of(&self, ip: IpAddr, me: PeerId) -> Vec<PeerId> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let map = self.by_ip.lock_or_recover();
        map.get(&ip)
            .map(|l| l.iter().copied().filter(|g| *g != me).collect())
            .unwrap_or_default()
    }
}

/// The address a peer is known by for succession (IPv4-mapped IPv6
/// addresses as IPv4).
pub(crate) fn host_of(addr: &SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// One departed peer whose routes are held.
struct Ghost {
    /// The peer (still the announcer of its routes in the owners' tables).
    peer: PeerId,
    /// Where the session came from, for `/peers` and the logs.
    addr: SocketAddr,
    /// Routes held.
    routes: usize,
    /// When the session ended (shown as `connected_since` is not).
    departed: SystemTime,
    /// When the routes are withdrawn unless pushed out earlier.
    until: SystemTime,
    /// Wakes the ghost's task to withdraw at once.
    expire: Rc<Expire>,
}

/// "Withdraw now": set by the memory bound, read by the ghost's task.
#[derive(Default)]
pub(crate) struct Expire {
    /// Set once; the task checks it before and after each wait.
    now: Cell<bool>,
    /// Wakes the task when `now` is set.
    event: LocalEvent,
}

/// The ghosts of one shard, oldest departure first.
pub(crate) struct GraceHolds {
    /// Ghosts in the order their sessions ended.
    ghosts: RefCell<VecDeque<Ghost>>,
    /// Routes held by all of them.
    routes: Cell<usize>,
    /// Every shard's ghosts by address.
    index: Arc<GhostIndex>,
}

impl GraceHolds {
    /// This shard's holds, registered in the servers-wide `index`.
    pub(crate) fn new(index: Arc<GhostIndex>) -> GraceHolds {
        GraceHolds {
            ghosts: RefCell::new(VecDeque::new()),
            routes: Cell::new(0),
            index,
        }
    }

    /// Every shard's ghosts by address.
    pub(crate) fn index(&self) -> &GhostIndex {
        &self.index
    }

    /// Routes held by this shard's ghosts.
    pub(crate) fn routes(&self) -> usize {
        self.routes.get()
    }

    /// `/peers` entries for the ghosts: state CLOSED, the routes they hold
    /// and the time left.
    pub(crate) fn peers(&self, shard: usize, keepalive: Duration) -> Vec<PeerInfo> {
        let now = SystemTime::now();
        self.ghosts
            .borrow()
            .iter()
            .map(|g| PeerInfo {
                addr: g.addr,
                state: SessionState::Closed,
                shard,
                keepalive,
                routes_announced: g.routes,
                vnis_subscribed: Vec::new(),
                frames_in: 0,
                bytes_in: 0,
                frames_out: 0,
                bytes_out: 0,
                queued_bytes: 0,
                coalesced_routes: 0,
                connected_since: g.departed,
                grace_left: Some(g.until.duration_since(now).unwrap_or_default()),
            })
            .collect()
    }

    /// Forgets `peer`'s ghost (its task is about to withdraw or drop its
    /// routes).
    pub(crate) fn remove(&self, peer: PeerId) {
        let mut ghosts = self.ghosts.borrow_mut();
        if let Some(i) = ghosts.iter().position(|g| g.peer == peer) {
            if let Some(g) = ghosts.remove(i) {
                self.routes.set(self.routes.get() - g.routes);
                self.index.remove(host_of(&g.addr), g.peer);
            }
        }
    }
}

impl Expire {
    /// Must the ghost's routes go now (pushed out by the memory bound)?
    pub(crate) fn is_due(&self) -> bool {
        self.now.get()
    }

    /// Notified when the ghost is pushed out.
    pub(crate) fn event(&self) -> &LocalEvent {
        &self.event
    }
}

impl GraceHolds {
    /// The session of `peer` (from `addr`) ended while it announced `count`
    /// routes: records its ghost until `grace` from now, and pushes out the
    /// oldest ghosts (never this one: a single peer's routes are bounded by
    /// `--max-routes-per-peer`) while more than `max_routes` routes or
    /// `MAX_GHOSTS_PER_SHARD` ghosts are held. Returns the handle the
    /// ghost's task waits on (`Expire::is_due`, `Expire::event`).
    pub(crate) fn add_ghost(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        count: usize,
        grace: Duration,
        max_routes: usize,
    ) -> Rc<Expire> {
        let expire = Rc::new(Expire::default());
        let now = SystemTime::now();
        self.ghosts.borrow_mut().push_back(Ghost {
            peer,
            addr,
            routes: count,
            departed: now,
            until: now + grace,
            expire: expire.clone(),
        });
        self.routes.set(self.routes.get() + count);
        self.index.add(host_of(&addr), peer);
        let ghosts = self.ghosts.borrow();
        let (mut held, mut kept) = ghosts
            .iter()
            .filter(|g| !g.expire.now.get())
            .fold((0, 0), |(r, n), g| (r + g.routes, n + 1));
        for g in ghosts.iter() {
            if (held <= max_routes && kept <= MAX_GHOSTS_PER_SHARD) || g.peer == peer {
                break;
            }
            if !g.expire.now.get() {
                tracing::warn!(peer = %g.addr, routes = g.routes, "grace cut short: more than {max_routes} routes or {MAX_GHOSTS_PER_SHARD} departed peers held on this shard");
                g.expire.now.set(true);
                g.expire.event.notify();
                held -= g.routes;
                kept -= 1;
            }
        }
        expire
    }
}
