//! Peer grace (`--peer-grace SECS`): when a peer's session ends, its
//! announcements stay in the VNI tables for a while, held by a *ghost* of
//! the departed peer, so that an agent restarting (a new connection from a
//! new port) does not make the whole fleet withdraw and re-add its routes.
//!
//! Owns: `GraceHolds`, the ghosts of one shard (address, routes held,
//! deadline) with their gauges, and the task per ghost that withdraws what
//! the ghost still holds when the grace is over.
//!
//! How it works: a ghost keeps the departed peer's `PeerId` as the
//! announcer of its routes; nothing is sent to the owners when the session
//! ends, so subscribers see nothing. A peer announcing the same route in the
//! meantime becomes a second announcer of it (the owner sends nothing new:
//! the route was present already). At expiry the ghost's routes are
//! withdrawn as if the peer had sent REMOVE for each: a route still
//! announced by someone else stays, the others go.
//!
//! ```text
//!  peer task ends ──announced routes──▶ GraceHolds::hold
//!                                          │ ghost task: sleep(grace) │ pushed out │ shutdown
//!                                          ▼
//!                               withdraw_all (chunks) ──▶ owners ──▶ subscribers
//! ```
//!
//! Must never: delay an explicit REMOVE or UNSUBSCRIBE (those never come
//! here), outlive a server shutdown, or hold more than
//! `ServerConfig::peer_grace_max_routes` routes on one shard (beyond that the
//! oldest ghosts are withdrawn early, so a peer that reconnects in a loop
//! cannot grow the server through its ghosts).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use futures_lite::future;

use super::peer::withdraw_all;
use super::route_set::RouteSet;
use super::shard::{LocalEvent, Shard};
use super::stats::PeerInfo;
use super::PeerId;
use crate::session::SessionState;
use crate::types::Vni;

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
struct Expire {
    /// Set once; the task checks it before and after each wait.
    now: Cell<bool>,
    /// Wakes the task when `now` is set.
    event: LocalEvent,
}

/// The ghosts of one shard, oldest departure first.
#[derive(Default)]
pub(crate) struct GraceHolds {
    /// Ghosts in the order their sessions ended.
    ghosts: RefCell<VecDeque<Ghost>>,
    /// Routes held by all of them.
    routes: Cell<usize>,
}

impl GraceHolds {
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
    fn remove(&self, peer: PeerId) {
        let mut ghosts = self.ghosts.borrow_mut();
        if let Some(i) = ghosts.iter().position(|g| g.peer == peer) {
            if let Some(g) = ghosts.remove(i) {
                self.routes.set(self.routes.get() - g.routes);
            }
        }
    }
}

/// The session of `peer` (from `addr`) ended while it announced `routes`:
/// keep them for `grace` as a ghost, then withdraw what is left. Returns at
/// once; the withdrawal runs in its own task on this shard.
pub(crate) fn hold(
    shard: &Rc<Shard>,
    peer: PeerId,
    addr: SocketAddr,
    routes: HashMap<Vni, RouteSet>,
    grace: Duration,
) {
    let count: usize = routes.values().map(RouteSet::len).sum();
    if count == 0 {
        return;
    }
    let holds = &shard.grace;
    let expire = Rc::new(Expire::default());
    let now = SystemTime::now();
    holds.ghosts.borrow_mut().push_back(Ghost {
        peer,
        addr,
        routes: count,
        departed: now,
        until: now + grace,
        expire: expire.clone(),
    });
    holds.routes.set(holds.routes.get() + count);
    shard.counters.set_grace_routes(holds.routes.get());
    tracing::info!(peer = %addr, routes = count, grace_secs = grace.as_secs(), "peer gone: its routes are held for the grace period");
    // The bound: push out the oldest ghosts (never the one just added
    // alone: a single peer's routes are bounded by --max-routes-per-peer).
    let max = shard.config.peer_grace_max_routes;
    {
        let ghosts = holds.ghosts.borrow();
        let mut held: usize = ghosts
            .iter()
            .filter(|g| !g.expire.now.get())
            .map(|g| g.routes)
            .sum();
        for g in ghosts.iter() {
            if held <= max || g.peer == peer {
                break;
            }
            if !g.expire.now.get() {
                tracing::warn!(peer = %g.addr, routes = g.routes, "grace cut short: more than {max} routes held for departed peers on this shard");
                g.expire.now.set(true);
                g.expire.event.notify();
                held -= g.routes;
            }
        }
    }
    let shard = shard.clone();
    glommio::spawn_local(async move {
        if !expire.now.get() && !shard.shutting_down.get() {
            future::or(
                glommio::timer::sleep(grace),
                future::or(expire.event.wait(), shard.shutdown_event.wait()),
            )
            .await;
        }
        shard.grace.remove(peer);
        shard.counters.set_grace_routes(shard.grace.routes());
        if shard.shutting_down.get() {
            // The tables go with the server.
            return;
        }
        for (vni, set) in routes {
            withdraw_all(&shard, peer, vni, set).await;
        }
        tracing::info!(peer = %addr, routes = count, "grace over: the departed peer's remaining routes are withdrawn");
    })
    .detach();
}
