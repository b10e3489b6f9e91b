//! One VNI's state on its owner shard: which peers announce each route, and
//! who is subscribed (still being synced, or live).
//!
//! Owns: the reflector rules of PROTOCOL.md on a single VNI: a route is in
//! the table while at least one peer announces it (ADD is fanned out when the
//! announcer set becomes non-empty, REMOVE when it becomes empty), duplicate
//! subscriptions are no-ops, and the SUBSCRIBE sync is a resumable scan in
//! route order (`sync_chunk`), so changes behind the cursor can be told from
//! changes the scan will still pick up.
//!
//! Must never: touch sockets, channels or encoding. It answers "did the table
//! change?" and "who must hear about it?"; the owner turns that into frames.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use super::PeerId;
use crate::types::Route;

/// The peers announcing one route. Nearly always one, so that case has no
/// heap allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Announcers {
    /// The common case: one hypervisor announces its own route.
    One(PeerId),
    /// Several peers announce the same route (redundant announcers).
    Many(Vec<PeerId>),
}

impl Announcers {
    fn contains(&self, peer: PeerId) -> bool {
        match self {
            Announcers::One(p) => *p == peer,
            Announcers::Many(v) => v.contains(&peer),
        }
    }

    /// True if some peer other than `peer` announces the route.
    fn has_other_than(&self, peer: PeerId) -> bool {
        match self {
            Announcers::One(p) => *p != peer,
            Announcers::Many(v) => v.iter().any(|p| *p != peer),
        }
    }

    /// Adds `peer`; false if it was already there.
    fn insert(&mut self, peer: PeerId) -> bool {
        if self.contains(peer) {
            return false;
        }
        match self {
            Announcers::One(p) => *self = Announcers::Many(vec![*p, peer]),
            Announcers::Many(v) => v.push(peer),
        }
        true
    }

    /// Removes `peer`; returns (was present, set is now empty).
    fn remove(&mut self, peer: PeerId) -> (bool, bool) {
        match self {
            Announcers::One(p) => {
                if *p == peer {
                    (true, true)
                } else {
                    (false, false)
                }
            }
            Announcers::Many(v) => {
                let before = v.len();
                v.retain(|p| *p != peer);
                let removed = v.len() != before;
                if v.len() == 1 {
                    *self = Announcers::One(v[0]);
                }
                (removed, matches!(self, Announcers::Many(v) if v.is_empty()))
            }
        }
    }
}

/// What an announce or withdraw changed for the subscribers of a VNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing any subscriber must hear.
    None,
    /// The route entered or left the table: every subscriber but the
    /// origin hears it.
    Table,
    /// The route became visible (announce) or invisible (withdraw) to this
    /// one peer only: it was, or is now, the route's sole announcer.
    ForOne(PeerId),
}

/// Live subscribers grouped by shard: (shard index, its peers).
pub type LiveGroups = Arc<Vec<(usize, Arc<[PeerId]>)>>;

/// Where a subscriber stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscriber {
    /// Being sent the table in route order. Changes to routes at or before
    /// `cursor` must be sent to it individually; routes after it will be
    /// picked up by the scan with their state at that time.
    Syncing {
        /// Last route the scan has passed (`None`: nothing scanned yet).
        cursor: Option<Route>,
    },
    /// Has the whole table; receives the shared fan-out.
    Live,
}

/// What a scan step produced.
#[derive(Debug, PartialEq, Eq)]
pub struct SyncChunk {
    /// Routes to send as ADD, in order.
    pub routes: Vec<Route>,
    /// Where the next step resumes (last route scanned).
    pub cursor: Option<Route>,
    /// The scan reached the end of the table.
    pub done: bool,
}

/// One VNI's routes and subscribers.
#[derive(Debug, Default)]
pub struct VniTable {
    /// Route → announcing peers, ordered so a sync scan can resume.
    routes: BTreeMap<Route, Announcers>,
    /// Subscribed peers and their sync state.
    subscribers: HashMap<PeerId, Subscriber>,
    /// Live subscribers grouped by shard, rebuilt lazily after a change so
    /// each fan-out sends one shared list per shard.
    live_by_shard: Option<LiveGroups>,
}

impl VniTable {
    /// An empty table.
    pub fn new() -> VniTable {
        VniTable::default()
    }

    /// Number of routes (each counted once however many announce it).
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// True when nothing remains (no routes, no subscribers): the owner may
    /// drop the table.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.subscribers.is_empty()
    }

    /// `peer` announces `route`. True if the route is new to the table (fan
    /// out ADD); false if it was already there (announced by `peer` or another).
    pub fn announce(&mut self, route: Route, peer: PeerId) -> bool {
        self.announce_change(route, peer) == Change::Table
    }

    /// `peer` announces `route`: what changed for the subscribers. A
    /// subscriber sees a route while some peer *other than itself* announces
    /// it, so a second announcer makes the route visible to the first one
    /// (`Change::ForOne`).
    pub fn announce_change(&mut self, route: Route, peer: PeerId) -> Change {
        match self.routes.get_mut(&route) {
            Some(a) => {
                let sole = match a {
                    Announcers::One(p) if *p != peer => Some(*p),
                    _ => None,
                };
                match (a.insert(peer), sole) {
                    (true, Some(first)) => Change::ForOne(first),
                    _ => Change::None,
                }
            }
            None => {
                self.routes.insert(route, Announcers::One(peer));
                Change::Table
            }
        }
    }

    /// `peer` withdraws `route`. True if the route left the table (fan out
    /// REMOVE); false if others still announce it or `peer` never did.
    pub fn withdraw(&mut self, route: &Route, peer: PeerId) -> bool {
        self.withdraw_change(route, peer) == Change::Table
    }

    /// `peer` withdraws `route`: what changed for the subscribers. When one
    /// announcer is left, the route stops being visible to that one
    /// (`Change::ForOne`): only it announces the route now.
    pub fn withdraw_change(&mut self, route: &Route, peer: PeerId) -> Change {
        let Some(a) = self.routes.get_mut(route) else {
            return Change::None;
        };
        let (removed, empty) = a.remove(peer);
        if empty {
            self.routes.remove(route);
            return Change::Table;
        }
        match a {
            Announcers::One(left) if removed => Change::ForOne(*left),
            _ => Change::None,
        }
    }

    /// Has `peer` been sent the current state of `route` (live, or syncing
    /// with its scan past the route)? A subscriber whose scan has not reached
    /// the route yet will see it as it is then.
    pub fn has_seen(&self, peer: PeerId, route: &Route) -> bool {
        match self.subscribers.get(&peer) {
            Some(Subscriber::Live) => true,
            Some(Subscriber::Syncing { cursor: Some(c) }) => route <= c,
            _ => false,
        }
    }

    /// Does `peer` announce `route`?
    pub fn is_announced_by(&self, route: &Route, peer: PeerId) -> bool {
        self.routes.get(route).is_some_and(|a| a.contains(peer))
    }

    /// Adds a subscriber in `Syncing` state; false if already subscribed.
    pub fn subscribe(&mut self, peer: PeerId) -> bool {
        if self.subscribers.contains_key(&peer) {
            return false;
        }
        self.subscribers
            .insert(peer, Subscriber::Syncing { cursor: None });
        true
    }

    /// Removes a subscriber; false if it was not subscribed.
    pub fn unsubscribe(&mut self, peer: PeerId) -> bool {
        let was = self.subscribers.remove(&peer);
        if matches!(was, Some(Subscriber::Live)) {
            self.live_by_shard = None;
        }
        was.is_some()
    }

    /// The subscriber's state, if subscribed.
    pub fn subscriber(&self, peer: PeerId) -> Option<Subscriber> {
        self.subscribers.get(&peer).copied()
    }

    /// Number of subscribers (syncing and live).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Next step of `peer`'s sync: up to `max` routes after its cursor that
    /// some other peer announces. Advances the cursor; when the scan is done
    /// the subscriber becomes `Live`. Scans at most `4 * max` entries so a
    /// VNI full of the subscriber's own routes cannot stall the shard either.
    pub fn sync_chunk(&mut self, peer: PeerId, max: usize) -> Option<SyncChunk> {
        let Some(Subscriber::Syncing { cursor }) = self.subscribers.get(&peer).copied() else {
            return None;
        };
        let start = match &cursor {
            Some(c) => Bound::Excluded(c),
            None => Bound::Unbounded,
        };
        let mut routes = Vec::with_capacity(max.min(self.routes.len()));
        let mut last = cursor;
        let mut done = true;
        for (scanned, (route, announcers)) in
            self.routes.range((start, Bound::Unbounded)).enumerate()
        {
            if routes.len() >= max || scanned >= max.saturating_mul(4) {
                done = false;
                break;
            }
            last = Some(*route);
            if announcers.has_other_than(peer) {
                routes.push(*route);
            }
        }
        let state = if done {
            self.live_by_shard = None;
            Subscriber::Live
        } else {
            Subscriber::Syncing { cursor: last }
        };
        self.subscribers.insert(peer, state);
        Some(SyncChunk {
            routes,
            cursor: last,
            done,
        })
    }

    /// Subscribers still syncing whose cursor is at or past `route`: they
    /// must be sent a change to `route` individually. (Those before it will
    /// see the route's state when their scan reaches it.)
    pub fn syncing_past<'a>(&'a self, route: &'a Route) -> impl Iterator<Item = PeerId> + 'a {
        self.subscribers
            .iter()
            .filter_map(move |(peer, s)| match s {
                Subscriber::Syncing { cursor: Some(c) } if route <= c => Some(*peer),
                _ => None,
            })
    }

    /// True if any subscriber is still syncing.
    pub fn has_syncing(&self) -> bool {
        self.subscribers
            .values()
            .any(|s| matches!(s, Subscriber::Syncing { .. }))
    }

    /// Live subscribers grouped by shard index (`PeerId::shard`), shared so a
    /// fan-out clones only a reference count.
    pub fn live_by_shard(&mut self) -> LiveGroups {
        if let Some(cached) = &self.live_by_shard {
            return cached.clone();
        }
        let mut groups: BTreeMap<usize, Vec<PeerId>> = BTreeMap::new();
        for (peer, s) in &self.subscribers {
            if *s == Subscriber::Live {
                groups.entry(peer.shard()).or_default().push(*peer);
            }
        }
        let built: LiveGroups = Arc::new(
            groups
                .into_iter()
                .map(|(shard, peers)| (shard, Arc::from(peers)))
                .collect(),
        );
        self.live_by_shard = Some(built.clone());
        built
    }

    /// The routes after `after` (all when `None`), in order: a snapshot
    /// copied in steps resumes where the previous step stopped.
    pub fn routes_after(&self, after: Option<&Route>) -> impl Iterator<Item = &Route> {
        let start = match after {
            Some(r) => Bound::Excluded(r),
            None => Bound::Unbounded,
        };
        self.routes
            .range::<Route, _>((start, Bound::Unbounded))
            .map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NextHop, Vni};

    fn route(i: u32) -> Route {
        let net = format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255);
        Route::new(
            Vni::new(7).unwrap(),
            net.parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    fn p(shard: usize, n: u64) -> PeerId {
        PeerId::new(shard, n)
    }

    #[test]
    fn first_announcer_adds_last_withdrawer_removes() {
        let mut t = VniTable::new();
        assert!(t.announce(route(1), p(0, 1)));
        assert!(!t.announce(route(1), p(0, 1)), "same peer again: nothing");
        assert!(!t.announce(route(1), p(1, 2)), "second announcer: not new");
        assert_eq!(t.route_count(), 1);
        assert!(!t.withdraw(&route(1), p(0, 1)), "one announcer left");
        assert!(!t.withdraw(&route(1), p(0, 3)), "never announced");
        assert!(t.withdraw(&route(1), p(1, 2)), "last one: REMOVE");
        assert_eq!(t.route_count(), 0);
        assert!(!t.withdraw(&route(1), p(1, 2)), "already gone");
        assert!(t.is_empty());
    }

    #[test]
    fn a_sole_announcer_sees_the_route_exactly_while_another_peer_announces_it() {
        let mut t = VniTable::new();
        let (a, b, c) = (p(0, 1), p(1, 2), p(0, 3));
        assert_eq!(t.announce_change(route(1), a), Change::Table);
        assert_eq!(t.announce_change(route(1), a), Change::None);
        // b joins: a now sees the route (someone else announces it).
        assert_eq!(t.announce_change(route(1), b), Change::ForOne(a));
        // A third announcer changes nothing for anyone.
        assert_eq!(t.announce_change(route(1), c), Change::None);
        assert_eq!(t.withdraw_change(&route(1), c), Change::None);
        assert_eq!(t.withdraw_change(&route(1), c), Change::None, "not its");
        // b leaves: a is the sole announcer again and stops seeing it.
        assert_eq!(t.withdraw_change(&route(1), b), Change::ForOne(a));
        assert_eq!(t.withdraw_change(&route(1), a), Change::Table);
    }

    #[test]
    fn three_announcers_shrink_back_to_one() {
        let mut t = VniTable::new();
        t.announce(route(1), p(0, 1));
        t.announce(route(1), p(0, 2));
        t.announce(route(1), p(0, 3));
        assert!(!t.withdraw(&route(1), p(0, 2)));
        assert!(t.is_announced_by(&route(1), p(0, 1)));
        assert!(!t.is_announced_by(&route(1), p(0, 2)));
        assert!(!t.withdraw(&route(1), p(0, 1)));
        assert!(t.withdraw(&route(1), p(0, 3)));
    }

    #[test]
    fn subscribe_twice_is_a_no_op() {
        let mut t = VniTable::new();
        assert!(t.subscribe(p(0, 1)));
        assert!(!t.subscribe(p(0, 1)));
        assert_eq!(t.subscriber_count(), 1);
        assert!(t.unsubscribe(p(0, 1)));
        assert!(!t.unsubscribe(p(0, 1)));
    }

    #[test]
    fn sync_scans_in_chunks_skips_own_routes_then_goes_live() {
        let mut t = VniTable::new();
        let me = p(1, 9);
        for i in 0..10 {
            t.announce(route(i), if i == 3 { me } else { p(0, 1) });
        }
        // Shared with another peer: still sent (another peer announces it).
        t.announce(route(5), me);
        t.subscribe(me);
        let mut got = Vec::new();
        let mut steps = 0;
        loop {
            let c = t.sync_chunk(me, 4).unwrap();
            steps += 1;
            got.extend(c.routes);
            if c.done {
                break;
            }
            assert!(matches!(t.subscriber(me), Some(Subscriber::Syncing { .. })));
        }
        assert!(steps >= 3);
        let want: Vec<Route> = (0..10).filter(|i| *i != 3).map(route).collect();
        assert_eq!(got, want);
        assert_eq!(t.subscriber(me), Some(Subscriber::Live));
        assert_eq!(t.sync_chunk(me, 4), None, "live: nothing to scan");
        let groups = t.live_by_shard();
        assert_eq!(groups.as_slice().len(), 1);
        assert_eq!(groups[0].0, 1);
        assert_eq!(&*groups[0].1, &[me]);
    }

    #[test]
    fn syncing_past_reports_only_subscribers_behind_the_route() {
        let mut t = VniTable::new();
        for i in 0..10 {
            t.announce(route(i), p(0, 1));
        }
        let a = p(1, 1);
        let b = p(1, 2);
        t.subscribe(a);
        t.subscribe(b);
        t.sync_chunk(a, 5); // a's cursor at route(4)
        let behind: Vec<PeerId> = t.syncing_past(&route(2)).collect();
        assert_eq!(behind, vec![a]);
        assert_eq!(t.syncing_past(&route(7)).count(), 0);
        assert!(t.has_syncing());
        // Live subscribers are not in the per-route list.
        while !t.sync_chunk(a, 5).unwrap().done {}
        assert_eq!(t.syncing_past(&route(2)).count(), 0);
    }

    #[test]
    fn live_groups_follow_subscription_changes() {
        let mut t = VniTable::new();
        for (s, n) in [(0, 1), (1, 2), (1, 3)] {
            t.subscribe(p(s, n));
            t.sync_chunk(p(s, n), 10);
        }
        let g = t.live_by_shard();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].1.len(), 2);
        t.unsubscribe(p(1, 2));
        let g = t.live_by_shard();
        assert_eq!(&*g[1].1, &[p(1, 3)]);
    }
}
