//! Peer grace (`--peer-grace SECS`): when a peer's session ends, its
//! announcements stay in the VNI tables for a while, held by a *ghost* of
//! the departed peer, so that an agent restarting (a new connection from a
//! new port) does not make the whole fleet withdraw and re-add its routes.
//!
//! Owns: `GhostIndex`, what every ghost of every shard still holds, by the
//! address its session came from (shared by all shards, one lock), and
//! `GraceHolds`, one shard's ghosts in the order their grace ends, with the
//! bounds that push the oldest out and the ghosts due for withdrawal. The
//! task that withdraws what a ghost still holds when its grace is over is
//! the shard's grace sweeper (`peer::sweep_ghosts`): this module is state
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
//! from the ghost's IP address. When it announces a route a ghost of its
//! address holds (or withdraws one it announced itself), the route leaves
//! the ghost's set here (`GhostIndex::take_over`) and the successor's shard
//! drops the ghost's claim right after its own input (same shard, same
//! channel to the owner, so in order): an explicit REMOVE takes effect at
//! once, and at expiry the ghost no longer holds what its successor took
//! over. A REMOVE of a route the session never announced does nothing (as
//! PROTOCOL.md says), also to a ghost: on a shared address (NAT, several
//! agents on one host) one process cannot withdraw another's held routes
//! without announcing them itself. A ghost whose last route was taken over
//! is gone: it leaves the index, the gauges and `/peers` at once, and no
//! longer counts against the bounds; its entry in its shard's deadline
//! order is skipped when reached (and compacted away, so that a peer
//! reconnecting in a loop cannot pile entries up there either).
//!
//! ```text
//!  peer task ends ──routes──▶ peer::hold_as_ghost ──▶ GraceHolds::add_ghost ──▶ GhostIndex
//!                                                       (deadline order)      (routes by address)
//!  successor ADD/REMOVE ──▶ GhostIndex::take_over ──▶ Withdraw{ghost} to the owner
//!  sweeper: deadline │ pushed out ──▶ GraceHolds::next_expired ──▶ ShardContext::withdraw_all
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use smallvec::SmallVec;

use super::local_event::LocalEvent;
use super::route_set::RouteSet;
use super::snapshot::PeerInfo;
use super::PeerId;
use metalbond_utils::LockOrRecover;
use metalbond_wire::session::SessionState;
use metalbond_wire::types::{Route, Vni};

/// Most ghosts one shard keeps; beyond this the oldest are withdrawn early.
pub(crate) const MAX_GHOSTS_PER_SHARD: usize = 10_000;

/// Most ghosts of one address (over all shards); beyond this its oldest is
/// withdrawn early. Every route a peer from the address announces is looked
/// up in each of them (under the index's lock, which every shard takes), so
/// this bounds what a peer reconnecting in a loop with new routes each time
/// can make every announcement of its address cost. One address is one
/// host, or a NAT: a few agents restarting at once.
pub(crate) const MAX_GHOSTS_PER_ADDRESS: usize = 256;

/// Entries of ghosts already gone that a shard's deadline order may keep
/// before it is compacted (besides one per live ghost).
const GONE_ENTRIES_SLACK: usize = 64;

/// What one ghost still holds.
#[derive(Debug)]
struct Held {
    /// The departed peer, still the announcer of these routes in the owners'
    /// tables.
    ghost: PeerId,
    /// Where its session came from (for the log when it is pushed out).
    addr: SocketAddr,
    /// Its routes not yet taken over by a successor, per VNI (no empty set).
    routes: HashMap<Vni, RouteSet>,
    /// Routes in `routes` (never 0: a ghost holding nothing is removed).
    count: usize,
}

/// The routes every ghost of every shard still holds, by the IP address
/// its session came from: a live peer from that address is the ghosts'
/// successor. Shared by all shards; its lock is taken per ghost departure
/// or expiry and per route a peer from an address with ghosts announces or
/// withdraws, never across an await.
#[derive(Debug)]
pub(crate) struct GhostIndex {
    /// Ghosts in the map: the common case (none) costs one atomic load.
    count: AtomicUsize,
    /// Address → its ghosts (oldest first, at most
    /// `MAX_GHOSTS_PER_ADDRESS`) and what they hold.
    by_ip: Mutex<HashMap<IpAddr, Vec<Held>>>,
    /// Routes held by each shard's ghosts (the `metalbond_grace_routes`
    /// gauge), kept with the map under its lock, read without it.
    routes_of_shard: Box<[AtomicUsize]>,
    /// Ghosts of each shard (the bound `MAX_GHOSTS_PER_SHARD`).
    ghosts_of_shard: Box<[AtomicUsize]>,
}

impl GhostIndex {
    /// An empty index for `shards` shards.
    pub(crate) fn new(shards: usize) -> GhostIndex {
        GhostIndex {
            count: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
            routes_of_shard: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            ghosts_of_shard: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Routes held by the ghosts of `shard`.
    pub(crate) fn routes_of(&self, shard: usize) -> usize {
        self.routes_of_shard
            .get(shard)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Ghosts of `shard` that hold a route.
    pub(crate) fn ghosts_of(&self, shard: usize) -> usize {
        self.ghosts_of_shard
            .get(shard)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Counts `routes` more (or fewer) routes and `ghosts` ghosts for
    /// `shard`. Called with the map's lock held.
    fn account(&self, shard: usize, routes: isize, ghosts: isize) {
        let add = |c: &AtomicUsize, n: isize| {
            if n >= 0 {
                c.fetch_add(n as usize, Ordering::Relaxed);
            } else {
                c.fetch_sub(n.unsigned_abs(), Ordering::Relaxed);
            }
        };
        if let Some(c) = self.routes_of_shard.get(shard) {
            add(c, routes);
        }
        if let Some(c) = self.ghosts_of_shard.get(shard) {
            add(c, ghosts);
        }
        add(&self.count, ghosts);
    }

    /// `ghost` (from `addr`) holds `routes`, `count` of them (at least
    /// one). Returns the oldest ghost of the address, taken out of the index,
    /// if that made more than `MAX_GHOSTS_PER_ADDRESS`: its routes are to be
    /// withdrawn now (by the caller's shard: any shard may send a ghost's
    /// withdrawals, the owners only look at the `PeerId`).
    fn insert(
        &self,
        addr: SocketAddr,
        ghost: PeerId,
        routes: HashMap<Vni, RouteSet>,
        count: usize,
    ) -> Option<Expired> {
        let mut map = self.by_ip.lock_or_recover();
        let list = map.entry(host_of(&addr)).or_default();
        list.push(Held {
            ghost,
            addr,
            routes,
            count,
        });
        self.account(ghost.shard(), count as isize, 1);
        if list.len() <= MAX_GHOSTS_PER_ADDRESS {
            return None;
        }
        let oldest = list.remove(0);
        self.account(oldest.ghost.shard(), -(oldest.count as isize), -1);
        Some(Expired {
            peer: oldest.ghost,
            addr: oldest.addr,
            routes: oldest.routes,
            count: oldest.count,
        })
    }

    /// Takes everything `ghost` (from `ip`) still holds out of the index:
    /// its grace is over. `None` if a successor took over all of it.
    fn take(&self, ip: IpAddr, ghost: PeerId) -> Option<(HashMap<Vni, RouteSet>, usize)> {
        let mut map = self.by_ip.lock_or_recover();
        let list = map.get_mut(&ip)?;
        let i = list.iter().position(|h| h.ghost == ghost)?;
        let held = list.remove(i);
        if list.is_empty() {
            map.remove(&ip);
        }
        self.account(ghost.shard(), -(held.count as isize), -1);
        Some((held.routes, held.count))
    }

    /// Routes `ghost` (from `ip`) still holds; `None` if it holds none.
    fn held_by(map: &HashMap<IpAddr, Vec<Held>>, ip: IpAddr, ghost: PeerId) -> Option<usize> {
        map.get(&ip)?
            .iter()
            .find(|h| h.ghost == ghost)
            .map(|h| h.count)
    }

    /// A live peer from `ip` announced `route` (or withdrew a route it had
    /// announced): every ghost of that address holding it gives it up.
    /// Returns those ghosts (usually none): the caller drops their claims
    /// at the owner. A ghost left holding nothing is gone.
    pub(crate) fn take_over(&self, ip: IpAddr, route: &Route) -> SmallVec<[PeerId; 1]> {
        let mut taken = SmallVec::new();
        if self.count.load(Ordering::Relaxed) == 0 {
            return taken;
        }
        let mut map = self.by_ip.lock_or_recover();
        let Some(list) = map.get_mut(&ip) else {
            return taken;
        };
        list.retain_mut(|h| {
            let Some(set) = h.routes.get_mut(&route.vni) else {
                return true;
            };
            if !set.remove(route) {
                return true;
            }
            if set.len() == 0 {
                h.routes.remove(&route.vni);
            }
            h.count -= 1;
            taken.push(h.ghost);
            let gone = h.count == 0;
            self.account(h.ghost.shard(), -1, if gone { -1 } else { 0 });
            !gone
        });
        if list.is_empty() {
            map.remove(&ip);
        }
        taken
    }
}

/// The address a peer is known by for succession (IPv4-mapped IPv6
/// addresses as IPv4).
pub(crate) fn host_of(addr: &SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

/// A ghost in its shard's deadline order. What it holds is in the
/// `GhostIndex` (where a successor on any shard can take it over); an entry
/// whose ghost holds nothing any more is skipped.
struct Entry {
    /// The departed peer.
    peer: PeerId,
    /// Where the session came from: the index's key, `/peers`, the logs.
    addr: SocketAddr,
    /// When the session ended (shown as `connected_since`).
    departed: SystemTime,
    /// When the routes are withdrawn unless pushed out earlier.
    deadline: Instant,
}

/// A ghost whose grace is over (or was cut short): its routes are to be
/// withdrawn now.
pub(crate) struct Expired {
    /// The departed peer, the announcer of the routes.
    pub(crate) peer: PeerId,
    /// Where its session came from, for the log.
    pub(crate) addr: SocketAddr,
    /// The routes it still held.
    pub(crate) routes: HashMap<Vni, RouteSet>,
    /// How many.
    pub(crate) count: usize,
}

/// The ghosts of one shard, in the order their grace ends.
pub(crate) struct GraceHolds {
    /// Ghosts by departure; one grace for all, so also by deadline.
    entries: RefCell<VecDeque<Entry>>,
    /// Ghosts pushed out by the bounds, taken out of the index, waiting for
    /// the sweeper to withdraw their routes.
    pushed_out: RefCell<VecDeque<Expired>>,
    /// Wakes the sweeper: a new ghost (an earlier deadline than it waits
    /// for, or none), or ghosts pushed out.
    wake: LocalEvent,
    /// The sweeper task runs (started with the shard's first ghost, it
    /// lives until shutdown).
    sweeping: Cell<bool>,
    /// Every shard's ghosts by address.
    index: Arc<GhostIndex>,
}

impl GraceHolds {
    /// This shard's holds, registered in the servers-wide `index`.
    pub(crate) fn new(index: Arc<GhostIndex>) -> GraceHolds {
        GraceHolds {
            entries: RefCell::new(VecDeque::new()),
            pushed_out: RefCell::new(VecDeque::new()),
            wake: LocalEvent::default(),
            sweeping: Cell::new(false),
            index,
        }
    }

    /// Every shard's ghosts by address.
    pub(crate) fn index(&self) -> &GhostIndex {
        &self.index
    }

    /// Notified when the sweeper has something new to look at.
    pub(crate) fn event(&self) -> &LocalEvent {
        &self.wake
    }

    /// True once: the caller starts the sweeper.
    pub(crate) fn start_sweeper(&self) -> bool {
        !self.sweeping.replace(true)
    }

    /// `/peers` entries for the ghosts that still hold routes: state
    /// CLOSED, the routes they hold and the time left.
    pub(crate) fn peers(&self, shard: usize, keepalive: Duration) -> Vec<PeerInfo> {
        let now = Instant::now();
        let entries = self.entries.borrow();
        let map = self.index.by_ip.lock_or_recover();
        entries
            .iter()
            .filter_map(|e| {
                let routes = GhostIndex::held_by(&map, host_of(&e.addr), e.peer)?;
                Some(PeerInfo {
                    id: e.peer,
                    addr: e.addr,
                    state: SessionState::Closed,
                    shard,
                    keepalive,
                    routes_announced: routes,
                    vnis_subscribed: Vec::new(),
                    frames_in: 0,
                    bytes_in: 0,
                    frames_out: 0,
                    bytes_out: 0,
                    queued_bytes: 0,
                    throttled: false,
                    connected_since: e.departed,
                    grace_left: Some(e.deadline.saturating_duration_since(now)),
                })
            })
            .collect()
    }

    /// The session of `peer` (from `addr`) ended while it announced `count`
    /// routes (`routes`): its ghost holds them until `grace` from now. Then
    /// pushes out the oldest ghost of its address if they are more than
    /// `MAX_GHOSTS_PER_ADDRESS`, and the oldest ghosts of the shard (never
    /// this one: a single peer's routes are bounded by
    /// `--max-routes-per-peer`) while the shard's ghosts hold more than
    /// `max_routes` routes or are more than `MAX_GHOSTS_PER_SHARD`; this
    /// shard's sweeper withdraws theirs at once.
    pub(crate) fn add_ghost(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        routes: HashMap<Vni, RouteSet>,
        count: usize,
        grace: Duration,
        max_routes: usize,
    ) {
        let shard = peer.shard();
        if let Some(e) = self.index.insert(addr, peer, routes, count) {
            tracing::warn!(peer = %e.addr, peer_id = %e.peer, routes = e.count, "grace cut short: more than {MAX_GHOSTS_PER_ADDRESS} departed peers held for this address");
            self.pushed_out.borrow_mut().push_back(e);
        }
        let mut entries = self.entries.borrow_mut();
        entries.push_back(Entry {
            peer,
            addr,
            departed: SystemTime::now(),
            deadline: Instant::now() + grace,
        });
        while self.index.routes_of(shard) > max_routes
            || self.index.ghosts_of(shard) > MAX_GHOSTS_PER_SHARD
        {
            let Some(oldest) = entries.front() else {
                break;
            };
            if oldest.peer == peer {
                break;
            }
            let Some(e) = entries.pop_front() else {
                break;
            };
            // A ghost whose routes were all taken over is skipped.
            if let Some((routes, count)) = self.index.take(host_of(&e.addr), e.peer) {
                tracing::warn!(peer = %e.addr, peer_id = %e.peer, routes = count, "grace cut short: more than {max_routes} routes or {MAX_GHOSTS_PER_SHARD} departed peers held on this shard");
                self.pushed_out.borrow_mut().push_back(Expired {
                    peer: e.peer,
                    addr: e.addr,
                    routes,
                    count,
                });
            }
        }
        // Entries of ghosts already gone (taken over) go once they are as
        // many as the live ones: the order stays within twice the bound.
        if entries.len() > 2 * self.index.ghosts_of(shard) + GONE_ENTRIES_SLACK {
            let map = self.index.by_ip.lock_or_recover();
            entries.retain(|e| GhostIndex::held_by(&map, host_of(&e.addr), e.peer).is_some());
        }
        drop(entries);
        self.wake.notify();
    }

    /// The next ghost whose routes must be withdrawn now (pushed out, or
    /// its grace over at `now`), taken out of the index; `None` if there is
    /// none yet. Entries of ghosts that hold nothing any more are dropped
    /// on the way.
    pub(crate) fn next_expired(&self, now: Instant) -> Option<Expired> {
        if let Some(e) = self.pushed_out.borrow_mut().pop_front() {
            return Some(e);
        }
        let mut entries = self.entries.borrow_mut();
        while entries.front().is_some_and(|e| e.deadline <= now) {
            let e = entries.pop_front()?;
            if let Some((routes, count)) = self.index.take(host_of(&e.addr), e.peer) {
                return Some(Expired {
                    peer: e.peer,
                    addr: e.addr,
                    routes,
                    count,
                });
            }
        }
        None
    }

    /// When the next grace ends, if any ghost is waiting for it.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.entries.borrow().front().map(|e| e.deadline)
    }

    /// Entries in the deadline order, live or gone (for tests of the
    /// compaction).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.entries.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::NextHop;

    fn route(i: u32) -> Route {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
        Route::new(
            Vni::new(23).unwrap(),
            format!("{ip}/32").parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    fn routes(rs: &[Route]) -> HashMap<Vni, RouteSet> {
        let mut m: HashMap<Vni, RouteSet> = HashMap::new();
        for r in rs {
            m.entry(r.vni).or_default().insert(*r);
        }
        m
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn addr2() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 2], 1))
    }

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn a_successor_takes_over_routes_and_an_emptied_ghost_is_gone() {
        let index = Arc::new(GhostIndex::new(2));
        let holds = GraceHolds::new(index.clone());
        let (g, r1, r2) = (PeerId::new(1, 7), route(1), route(2));
        holds.add_ghost(g, addr(1000), routes(&[r1, r2]), 2, GRACE, 100);
        assert_eq!((index.routes_of(1), index.ghosts_of(1)), (2, 1));
        // Another address takes nothing.
        let other: IpAddr = [192, 0, 2, 2].into();
        assert!(index.take_over(other, &r1).is_empty());
        let ip = host_of(&addr(2000));
        assert_eq!(index.take_over(ip, &r1).as_slice(), &[g]);
        assert!(index.take_over(ip, &r1).is_empty(), "taken once");
        assert_eq!(holds.peers(1, GRACE)[0].routes_announced, 1);
        assert_eq!(index.take_over(ip, &r2).as_slice(), &[g]);
        assert_eq!((index.routes_of(1), index.ghosts_of(1)), (0, 0));
        assert!(
            holds.peers(1, GRACE).is_empty(),
            "a ghost holding nothing is gone"
        );
        // Its deadline passes: nothing to withdraw.
        assert!(holds.next_expired(Instant::now() + GRACE).is_none());
        assert_eq!(holds.next_deadline(), None);
    }

    #[test]
    fn the_oldest_live_ghosts_are_pushed_out_and_gone_ones_take_no_place() {
        let index = Arc::new(GhostIndex::new(1));
        let holds = GraceHolds::new(index.clone());
        let ip = host_of(&addr(1));
        // Bound of 3 routes: three ghosts of one route each; the second's
        // route is taken over, so a fourth pushes out the first only.
        for i in 0..3 {
            holds.add_ghost(
                PeerId::new(0, i),
                addr(1),
                routes(&[route(i as u32)]),
                1,
                GRACE,
                3,
            );
        }
        index.take_over(ip, &route(1));
        holds.add_ghost(PeerId::new(0, 3), addr(1), routes(&[route(3)]), 1, GRACE, 3);
        assert!(
            holds.next_expired(Instant::now()).is_none(),
            "3 routes held: none pushed out"
        );
        holds.add_ghost(PeerId::new(0, 4), addr(1), routes(&[route(4)]), 1, GRACE, 3);
        let e = holds
            .next_expired(Instant::now())
            .expect("the oldest pushed out");
        assert_eq!((e.peer, e.count), (PeerId::new(0, 0), 1));
        assert!(holds.next_expired(Instant::now()).is_none());
        assert_eq!(index.routes_of(0), 3);
        // At the deadline the three left expire, oldest first.
        let later = Instant::now() + GRACE;
        let expired: Vec<u64> = std::iter::from_fn(|| holds.next_expired(later))
            .map(|e| e.peer.seq())
            .collect();
        assert_eq!(expired, vec![2, 3, 4]);
        assert_eq!((index.routes_of(0), index.ghosts_of(0)), (0, 0));
    }

    #[test]
    fn an_address_keeps_at_most_its_newest_ghosts_on_any_shard() {
        let index = Arc::new(GhostIndex::new(2));
        let (a, b) = (
            GraceHolds::new(index.clone()),
            GraceHolds::new(index.clone()),
        );
        let n = MAX_GHOSTS_PER_ADDRESS as u64;
        for i in 0..n {
            let shard = &[&a, &b][i as usize % 2];
            let p = PeerId::new(i as usize % 2, i);
            shard.add_ghost(p, addr(1), routes(&[route(i as u32)]), 1, GRACE, 1_000_000);
        }
        assert!(a.next_expired(Instant::now()).is_none());
        // One more, on shard 0: the oldest, on shard 0 too, goes; then one
        // on shard 1: the next oldest (of shard 1) goes, withdrawn by the
        // shard that pushed it out.
        a.add_ghost(
            PeerId::new(0, n),
            addr(1),
            routes(&[route(0)]),
            1,
            GRACE,
            1_000_000,
        );
        assert_eq!(
            a.next_expired(Instant::now()).map(|e| e.peer),
            Some(PeerId::new(0, 0))
        );
        b.add_ghost(
            PeerId::new(1, n + 1),
            addr(1),
            routes(&[route(1)]),
            1,
            GRACE,
            1_000_000,
        );
        assert_eq!(
            b.next_expired(Instant::now()).map(|e| e.peer),
            Some(PeerId::new(1, 1))
        );
        assert_eq!(
            index.ghosts_of(0) + index.ghosts_of(1),
            MAX_GHOSTS_PER_ADDRESS
        );
        // Another address is not affected.
        a.add_ghost(
            PeerId::new(0, n + 2),
            addr2(),
            routes(&[route(0)]),
            1,
            GRACE,
            1_000_000,
        );
        assert!(a.next_expired(Instant::now()).is_none());
    }

    #[test]
    fn entries_of_gone_ghosts_do_not_pile_up() {
        let index = Arc::new(GhostIndex::new(1));
        let holds = GraceHolds::new(index.clone());
        let ip = host_of(&addr(1));
        // A peer reconnecting in a loop, each session taking over the last
        // one's route: one live ghost at a time.
        for i in 0..10_000 {
            index.take_over(ip, &route(0));
            holds.add_ghost(
                PeerId::new(0, i),
                addr(1),
                routes(&[route(0)]),
                1,
                GRACE,
                100,
            );
        }
        assert_eq!((index.routes_of(0), index.ghosts_of(0)), (1, 1));
        assert!(
            holds.entries() <= 2 + GONE_ENTRIES_SLACK,
            "{}",
            holds.entries()
        );
        assert_eq!(holds.peers(0, GRACE).len(), 1);
    }
}
