//! The present set: which received routes the client treats as live.
//!
//! Owns: each server's received routes kept apart, the per-route count of
//! servers holding it, loop prevention (a route whose VNI and prefix we
//! announce ourselves is held but not present), and turning every event into
//! the exact list of present-set changes, so the sink hears about a route
//! once when it appears and once when it goes.
//!
//! Must never: do I/O, lock, or call the sink; callers get `PresentChange`s
//! back and deliver them. Pure, so every rule is a unit test.
//!
//! A route is present ⇔ at least one server holds it (fresh or stale) ∧ we
//! announce no route with the same (VNI, prefix).
//!
//! Stale routes (hitless restarts): when a server's session is lost and the
//! client keeps its routes for a while (`server_stale`), they stay held but
//! are marked *stale*. Received again from that server (the new session's
//! sync) a route is simply fresh again: no change for the sink. An explicit
//! REMOVE drops it at once, stale or not, together with every other
//! server's stale copy of it. Each loss makes one *generation* of stale
//! routes, so routes that went stale at an earlier loss keep their earlier
//! deadline: `sweep_oldest` drops the oldest generation's leftovers
//! when the hold is over; `server_lost` drops everything (no hold).
//!
//! Memory: a received route costs one entry in its server's hash set and one
//! entry in the ordered `held` map (routes of one (VNI, prefix) are adjacent
//! there, so loop prevention finds them by a range scan instead of a map of
//! maps; see BENCHMARKS.md "Client memory per received route").

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

use metalbond_utils::Since;
use metalbond_wire::digest::VniDigest;
use metalbond_wire::types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

/// Identifies one server session slot of the client (stable across
/// reconnects to that server).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ServerId(pub u64);

/// A change of the present set, for the sink.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PresentChange {
    /// The route became present.
    Add(Route),
    /// The route is no longer present.
    Remove(Route),
}

/// What the client keeps per received route besides the route itself.
#[derive(Clone, Copy, Debug)]
struct HeldRoute {
    /// Servers holding it (fresh or stale).
    servers: u32,
    /// When it was first received from any server (the routes API's
    /// `since`); kept while servers come and go, reset once none holds it.
    since: Since,
}

/// Received routes per server and the resulting present set.
#[derive(Default, Debug)]
pub struct PresentRoutes {
    /// Every route each server currently holds for us, received in its
    /// current (or last) session.
    per_server: HashMap<ServerId, HashSet<Route>>,
    /// Routes each server held in an earlier session and has not sent
    /// again since (see the module doc), one set per lost session, oldest
    /// first. Disjoint from `per_server` and from each other.
    stale: HashMap<ServerId, VecDeque<HashSet<Route>>>,
    /// Route → number of servers holding it and when it was first
    /// received. Ordered so that the routes of one (VNI, prefix) are
    /// adjacent (`Route` orders by VNI, prefix, next hop): loop prevention
    /// reaches them with one range scan.
    held: BTreeMap<Route, HeldRoute>,
    /// (VNI, prefix) we announce → number of our routes with that key.
    own: HashMap<(Vni, IpNet), u32>,
    /// Digest of the received routes (`held`'s keys) per VNI, whether
    /// present or not (loop prevention aside): what the reflectors hold
    /// for us, comparable with their digests (`metalbond_wire::digest`).
    digests: HashMap<Vni, VniDigest>,
}

impl PresentRoutes {
    /// Empty: no servers, no routes.
    pub fn new() -> PresentRoutes {
        PresentRoutes::default()
    }

    fn key(route: &Route) -> (Vni, IpNet) {
        (route.vni, route.destination)
    }

    fn is_own(&self, key: &(Vni, IpNet)) -> bool {
        self.own.contains_key(key)
    }

    /// Is `route` present?
    #[cfg(test)]
    pub fn is_present(&self, route: &Route) -> bool {
        !self.is_own(&Self::key(route)) && self.held.contains_key(route)
    }

    /// The digest of the received routes of each VNI that has any,
    /// ascending by VNI.
    pub fn digests(&self) -> Vec<(Vni, VniDigest)> {
        let mut all: Vec<(Vni, VniDigest)> = self.digests.iter().map(|(v, d)| (*v, *d)).collect();
        all.sort_by_key(|(v, _)| *v);
        all
    }

    /// Every present route, sorted.
    pub fn present(&self) -> Vec<Route> {
        self.held
            .keys()
            .filter(|r| !self.is_own(&Self::key(r)))
            .copied()
            .collect()
    }

    /// The present routes of `vni` with when each was first received,
    /// sorted (one range of the ordered map, not a copy of every VNI).
    pub fn present_in(&self, vni: Vni) -> Vec<(Route, Since)> {
        // The smallest destination: 0.0.0.0/0.
        let first = Self::first_route((vni, IpNet::V4(Default::default())));
        self.held
            .range(first..)
            .take_while(|(r, _)| r.vni == vni)
            .filter(|(r, _)| !self.is_own(&Self::key(r)))
            .map(|(r, h)| (*r, h.since))
            .collect()
    }

    /// Number of routes `server` holds, fresh and stale.
    pub fn held_by(&self, server: ServerId) -> usize {
        self.per_server.get(&server).map_or(0, HashSet::len) + self.stale_held_by(server)
    }

    /// Number of stale routes `server` holds.
    pub fn stale_held_by(&self, server: ServerId) -> usize {
        self.stale
            .get(&server)
            .map_or(0, |gens| gens.iter().map(HashSet::len).sum())
    }

    /// Does `server` hold `route` from its current session (not stale)?
    /// (The status pages' `stale` flag.)
    pub fn holds_fresh(&self, server: ServerId, route: &Route) -> bool {
        self.per_server
            .get(&server)
            .is_some_and(|routes| routes.contains(route))
    }

    /// Does `server` hold `route` (fresh or stale)?
    pub fn holds(&self, server: ServerId, route: &Route) -> bool {
        self.per_server
            .get(&server)
            .is_some_and(|routes| routes.contains(route))
            || self
                .stale
                .get(&server)
                .is_some_and(|gens| gens.iter().any(|g| g.contains(route)))
    }

    /// Takes `route` out of `server`'s stale generations; true if it was
    /// there.
    fn unstale(&mut self, server: ServerId, route: &Route) -> bool {
        self.stale
            .get_mut(&server)
            .is_some_and(|gens| gens.iter_mut().any(|g| g.remove(route)))
    }

    /// An UPDATE from `server`. Duplicates and removals of routes the
    /// server never sent change nothing.
    pub fn received(
        &mut self,
        server: ServerId,
        action: Action,
        route: Route,
        out: &mut Vec<PresentChange>,
    ) {
        let was_stale = self.unstale(server, &route);
        let routes = self.per_server.entry(server).or_default();
        match action {
            // A stale route received again is fresh: still held once.
            Action::Add if was_stale => {
                routes.insert(route);
            }
            Action::Add => {
                if routes.insert(route) {
                    self.hold(route, out);
                }
            }
            // An explicit REMOVE drops it, stale or not, and also the other
            // servers' stale copies: a live server's REMOVE is newer news
            // than what a lost session said.
            Action::Remove => {
                if !(routes.remove(&route) || was_stale) {
                    return; // never sent by this server: changes nothing
                }
                self.release(route, out);
                let mut copies = 0;
                for (other, gens) in self.stale.iter_mut() {
                    if *other != server && gens.iter_mut().any(|g| g.remove(&route)) {
                        copies += 1;
                    }
                }
                for _ in 0..copies {
                    self.release(route, out);
                }
            }
        }
    }

    /// `server` is gone for good (removed, or lost with no stale hold):
    /// everything it held, fresh and stale, is dropped.
    pub fn server_lost(&mut self, server: ServerId, out: &mut Vec<PresentChange>) {
        let fresh = self.per_server.remove(&server).unwrap_or_default();
        let stale = self.stale.remove(&server).unwrap_or_default();
        for route in fresh.into_iter().chain(stale.into_iter().flatten()) {
            self.release(route, out);
        }
    }

    /// `server`'s session ended and its routes are kept as stale: nothing
    /// changes for the sink. They become a new generation (even when empty,
    /// so that generations and the caller's deadlines stay one to one).
    /// Returns how many routes this loss made stale.
    pub fn server_stale(&mut self, server: ServerId) -> usize {
        let fresh = self.per_server.remove(&server).unwrap_or_default();
        let n = fresh.len();
        self.stale.entry(server).or_default().push_back(fresh);
        n
    }

    /// The hold of `server`'s oldest lost session is over: its routes that
    /// were not sent again are dropped. Returns how many were.
    pub fn sweep_oldest(&mut self, server: ServerId, out: &mut Vec<PresentChange>) -> usize {
        let Some(gens) = self.stale.get_mut(&server) else {
            return 0;
        };
        let oldest = gens.pop_front().unwrap_or_default();
        if gens.is_empty() {
            self.stale.remove(&server);
        }
        let n = oldest.len();
        for route in oldest {
            self.release(route, out);
        }
        n
    }

    /// Drops every stale route of `server` (all generations). Returns how
    /// many there were.
    pub fn sweep_all(&mut self, server: ServerId, out: &mut Vec<PresentChange>) -> usize {
        let gens = self.stale.remove(&server).unwrap_or_default();
        let mut n = 0;
        for route in gens.into_iter().flatten() {
            n += 1;
            self.release(route, out);
        }
        n
    }

    /// We unsubscribed from `vni`: no server will tell us about it any more,
    /// so every server's routes of that VNI are dropped.
    pub fn vni_dropped(&mut self, vni: Vni, out: &mut Vec<PresentChange>) {
        let mut dropped = Vec::new();
        let stale_sets = self.stale.values_mut().flat_map(|gens| gens.iter_mut());
        for routes in self.per_server.values_mut().chain(stale_sets) {
            routes.retain(|r| {
                if r.vni == vni {
                    dropped.push(*r);
                    false
                } else {
                    true
                }
            });
        }
        for route in dropped {
            self.release(route, out);
        }
    }

    /// We now announce `route`: received routes with its (VNI, prefix) stop
    /// being present (loop prevention).
    pub fn own_announced(&mut self, route: &Route, out: &mut Vec<PresentChange>) {
        let key = Self::key(route);
        let count = self.own.entry(key).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.emit_all(key, out, PresentChange::Remove);
        }
    }

    /// We withdrew `route`: if it was our last route with that (VNI,
    /// prefix), received routes for it become present again.
    pub fn own_withdrawn(&mut self, route: &Route, out: &mut Vec<PresentChange>) {
        let key = Self::key(route);
        match self.own.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.own.remove(&key);
                self.emit_all(key, out, PresentChange::Add);
            }
            None => {}
        }
    }

    /// The smallest route of `key` in `Route`'s order (VNI, destination,
    /// next hop): where a range over the held routes of `key` starts.
    fn first_route(key: (Vni, IpNet)) -> Route {
        Route {
            vni: key.0,
            destination: key.1,
            // The smallest next hop in `NextHop`'s order.
            next_hop: NextHop {
                target: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                target_vni: 0,
                kind: NextHopKind::Standard,
            },
        }
    }

    /// Every held route of `key`, in next-hop order.
    fn held_with_key(&self, key: (Vni, IpNet)) -> impl Iterator<Item = Route> + '_ {
        self.held
            .range(Self::first_route(key)..)
            .map(|(r, _)| *r)
            .take_while(move |r| Self::key(r) == key)
    }

    fn emit_all(
        &self,
        key: (Vni, IpNet),
        out: &mut Vec<PresentChange>,
        make: fn(Route) -> PresentChange,
    ) {
        out.extend(self.held_with_key(key).map(make));
    }

    fn hold(&mut self, route: Route, out: &mut Vec<PresentChange>) {
        let held = self.held.entry(route).or_insert(HeldRoute {
            servers: 0,
            since: Since::now(),
        });
        held.servers += 1;
        if held.servers == 1 {
            self.digests.entry(route.vni).or_default().add(&route);
            if !self.own.contains_key(&Self::key(&route)) {
                out.push(PresentChange::Add(route));
            }
        }
    }

    fn release(&mut self, route: Route, out: &mut Vec<PresentChange>) {
        match self.held.get_mut(&route) {
            Some(held) if held.servers > 1 => held.servers -= 1,
            Some(_) => {
                self.held.remove(&route);
                if let Some(d) = self.digests.get_mut(&route.vni) {
                    d.remove(&route);
                    if d.is_empty() {
                        self.digests.remove(&route.vni);
                    }
                }
                if !self.own.contains_key(&Self::key(&route)) {
                    out.push(PresentChange::Remove(route));
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ServerId = ServerId(1);
    const B: ServerId = ServerId(2);

    fn route(vni: u32, prefix: &str, hop: &str) -> Route {
        Route::new(
            Vni::new(vni).unwrap(),
            prefix.parse().unwrap(),
            NextHop::standard(hop.parse().unwrap()),
        )
    }

    fn run(f: impl FnOnce(&mut Vec<PresentChange>)) -> Vec<PresentChange> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn present_in_is_one_vnis_present_routes_with_their_since() {
        let mut p = PresentRoutes::new();
        let routes = [
            route(22, "2001:db8::/64", "2001:db8::1"),
            route(23, "0.0.0.0/0", "2001:db8::1"),
            route(23, "10.0.0.0/24", "2001:db8::1"),
            route(23, "2001:db8::/64", "2001:db8::2"),
            route(24, "0.0.0.0/0", "2001:db8::1"),
        ];
        for r in routes {
            run(|o| p.received(A, Action::Add, r, o));
        }
        let own = route(23, "10.0.0.0/24", "2001:db8::9");
        run(|o| p.own_announced(&own, o));
        let before = Since::now();
        let got = p.present_in(Vni::new(23).unwrap());
        let got_routes: Vec<Route> = got.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            got_routes,
            [routes[1], routes[3]],
            "VNI 23 only, sorted, not what we announce ourselves"
        );
        assert!(got.iter().all(|(_, s)| *s <= before));
        assert!(p.present_in(Vni::new(25).unwrap()).is_empty());
    }

    #[test]
    fn the_digest_is_of_the_received_routes_once_each_whoever_sent_them() {
        let mut p = PresentRoutes::new();
        let (r, s) = (
            route(23, "10.0.0.0/24", "2001:db8::1"),
            route(23, "10.0.1.0/24", "2001:db8::1"),
        );
        run(|o| p.received(A, Action::Add, r, o));
        run(|o| p.received(B, Action::Add, r, o));
        run(|o| p.received(B, Action::Add, s, o));
        assert_eq!(p.digests(), vec![(r.vni, VniDigest::of(&[r, s]))]);
        // Announcing the same prefix ourselves hides it, but it is still
        // what the reflectors hold for us.
        run(|o| p.own_announced(&r, o));
        assert_eq!(p.digests(), vec![(r.vni, VniDigest::of(&[s, r]))]);
        run(|o| p.received(A, Action::Remove, r, o));
        assert_eq!(
            p.digests(),
            vec![(r.vni, VniDigest::of(&[r, s]))],
            "B holds r"
        );
        run(|o| p.received(B, Action::Remove, r, o));
        run(|o| p.received(B, Action::Remove, s, o));
        assert!(p.digests().is_empty());
    }

    #[test]
    fn a_route_is_present_while_any_server_holds_it() {
        let mut p = PresentRoutes::new();
        let r = route(23, "10.0.0.0/24", "2001:db8::1");
        assert_eq!(
            run(|o| p.received(A, Action::Add, r, o)),
            vec![PresentChange::Add(r)]
        );
        assert!(run(|o| p.received(B, Action::Add, r, o)).is_empty());
        assert!(
            run(|o| p.received(A, Action::Add, r, o)).is_empty(),
            "duplicate"
        );
        assert!(run(|o| p.received(A, Action::Remove, r, o)).is_empty());
        assert!(p.is_present(&r));
        assert!(
            run(|o| p.received(A, Action::Remove, r, o)).is_empty(),
            "not held by A"
        );
        assert_eq!(
            run(|o| p.received(B, Action::Remove, r, o)),
            vec![PresentChange::Remove(r)]
        );
        assert!(!p.is_present(&r));
    }

    #[test]
    fn losing_a_server_withdraws_only_what_no_other_server_holds() {
        let mut p = PresentRoutes::new();
        let shared = route(23, "10.0.0.0/24", "2001:db8::1");
        let only_a = route(23, "10.0.1.0/24", "2001:db8::1");
        run(|o| p.received(A, Action::Add, shared, o));
        run(|o| p.received(A, Action::Add, only_a, o));
        run(|o| p.received(B, Action::Add, shared, o));
        assert_eq!(
            run(|o| p.server_lost(A, o)),
            vec![PresentChange::Remove(only_a)]
        );
        assert_eq!(p.held_by(A), 0);
        assert_eq!(p.present(), vec![shared]);
        assert_eq!(
            run(|o| p.server_lost(B, o)),
            vec![PresentChange::Remove(shared)]
        );
        assert!(run(|o| p.server_lost(B, o)).is_empty());
    }

    #[test]
    fn stale_routes_stay_until_refreshed_removed_or_swept() {
        let mut p = PresentRoutes::new();
        let refreshed = route(23, "10.0.0.0/24", "2001:db8::1");
        let removed = route(23, "10.0.1.0/24", "2001:db8::1");
        let vanished = route(23, "10.0.2.0/24", "2001:db8::1");
        for r in [refreshed, removed, vanished] {
            run(|o| p.received(A, Action::Add, r, o));
        }
        // The session is lost: nothing changes for the sink.
        assert_eq!(p.server_stale(A), 3);
        assert_eq!(p.present().len(), 3);
        assert_eq!((p.held_by(A), p.stale_held_by(A)), (3, 3));
        assert!(p.holds(A, &vanished));
        // The new session's sync: received again, simply fresh.
        assert!(run(|o| p.received(A, Action::Add, refreshed, o)).is_empty());
        assert_eq!(p.stale_held_by(A), 2);
        // An explicit REMOVE of a stale route: at once.
        assert_eq!(
            run(|o| p.received(A, Action::Remove, removed, o)),
            vec![PresentChange::Remove(removed)]
        );
        // The hold is over: what was not received again goes.
        let mut out = Vec::new();
        assert_eq!(p.sweep_oldest(A, &mut out), 1);
        assert_eq!(out, vec![PresentChange::Remove(vanished)]);
        assert_eq!(p.present(), vec![refreshed]);
        assert_eq!((p.held_by(A), p.stale_held_by(A)), (1, 0));
        assert_eq!(p.sweep_oldest(A, &mut out), 0);
    }

    #[test]
    fn a_route_is_present_while_any_server_holds_it_fresh_or_stale() {
        let mut p = PresentRoutes::new();
        let both = route(23, "10.0.0.0/24", "2001:db8::1");
        let only_a = route(23, "10.0.1.0/24", "2001:db8::1");
        run(|o| p.received(A, Action::Add, both, o));
        run(|o| p.received(A, Action::Add, only_a, o));
        run(|o| p.received(B, Action::Add, both, o));
        p.server_stale(A);
        // B goes too and comes back without `both`: A still holds it stale.
        p.server_stale(B);
        p.sweep_oldest(B, &mut Vec::new());
        assert!(p.is_present(&both));
        // Lost twice before the sweep: still one holder each.
        p.server_stale(A);
        assert_eq!(p.stale_held_by(A), 2);
        let mut swept = run(|o| {
            p.sweep_oldest(A, o);
        });
        swept.sort_by_key(|c| match c {
            PresentChange::Add(r) | PresentChange::Remove(r) => *r,
        });
        assert_eq!(
            swept,
            vec![PresentChange::Remove(both), PresentChange::Remove(only_a)]
        );
    }

    #[test]
    fn each_loss_is_a_generation_swept_on_its_own() {
        let mut p = PresentRoutes::new();
        let (r1, r2) = (
            route(23, "10.0.1.0/24", "2001:db8::1"),
            route(23, "10.0.2.0/24", "2001:db8::1"),
        );
        run(|o| p.received(A, Action::Add, r1, o));
        assert_eq!(p.server_stale(A), 1);
        // The next session brings r2 only, then is lost too.
        run(|o| p.received(A, Action::Add, r2, o));
        assert_eq!(p.server_stale(A), 1);
        assert_eq!(p.stale_held_by(A), 2);
        // The first loss's hold ends: r1 goes, r2 keeps its own deadline.
        assert_eq!(
            run(|o| {
                p.sweep_oldest(A, o);
            }),
            vec![PresentChange::Remove(r1)]
        );
        assert_eq!(p.present(), vec![r2]);
        // A REMOVE from a server that never sent the route changes nothing.
        assert!(run(|o| p.received(B, Action::Remove, r2, o)).is_empty());
        assert_eq!(
            run(|o| {
                p.sweep_all(A, o);
            }),
            vec![PresentChange::Remove(r2)]
        );
    }

    #[test]
    fn a_live_servers_remove_also_drops_other_servers_stale_copies() {
        let mut p = PresentRoutes::new();
        let r = route(23, "10.0.0.0/24", "2001:db8::1");
        run(|o| p.received(A, Action::Add, r, o));
        run(|o| p.received(B, Action::Add, r, o));
        p.server_stale(A);
        assert_eq!(
            run(|o| p.received(B, Action::Remove, r, o)),
            vec![PresentChange::Remove(r)]
        );
        assert_eq!((p.held_by(A), p.held_by(B)), (0, 0));
        assert!(run(|o| {
            p.sweep_oldest(A, o);
        })
        .is_empty());
    }

    #[test]
    fn unsubscribing_and_removing_a_server_drop_stale_routes_too() {
        let mut p = PresentRoutes::new();
        let r23 = route(23, "10.0.0.0/24", "2001:db8::1");
        let r24 = route(24, "10.0.0.0/24", "2001:db8::1");
        run(|o| p.received(A, Action::Add, r23, o));
        run(|o| p.received(A, Action::Add, r24, o));
        p.server_stale(A);
        assert_eq!(
            run(|o| p.vni_dropped(Vni::new(23).unwrap(), o)),
            vec![PresentChange::Remove(r23)]
        );
        assert_eq!(
            run(|o| p.server_lost(A, o)),
            vec![PresentChange::Remove(r24)]
        );
        assert_eq!(p.held_by(A), 0);
        assert!(p.present().is_empty());
    }

    #[test]
    fn own_prefixes_are_never_present() {
        let mut p = PresentRoutes::new();
        let mine = route(23, "10.0.0.0/24", "2001:db8::99");
        let theirs = route(23, "10.0.0.0/24", "2001:db8::1");
        let other_vni = route(24, "10.0.0.0/24", "2001:db8::1");
        assert!(run(|o| p.own_announced(&mine, o)).is_empty());
        assert!(run(|o| p.received(A, Action::Add, theirs, o)).is_empty());
        assert_eq!(
            run(|o| p.received(A, Action::Add, other_vni, o)),
            vec![PresentChange::Add(other_vni)]
        );
        // Our last announcement of the prefix goes: theirs becomes present.
        assert_eq!(
            run(|o| p.own_withdrawn(&mine, o)),
            vec![PresentChange::Add(theirs)]
        );
        // And we announce again: it is withdrawn from the sink.
        assert_eq!(
            run(|o| p.own_announced(&mine, o)),
            vec![PresentChange::Remove(theirs)]
        );
        assert!(run(|o| p.received(A, Action::Remove, theirs, o)).is_empty());
        assert!(run(|o| p.own_withdrawn(&mine, o)).is_empty());
    }

    #[test]
    fn two_own_routes_on_one_prefix_need_both_withdrawn() {
        let mut p = PresentRoutes::new();
        let m1 = route(23, "10.0.0.0/24", "2001:db8::98");
        let m2 = route(23, "10.0.0.0/24", "2001:db8::99");
        let theirs = route(23, "10.0.0.0/24", "2001:db8::1");
        run(|o| p.own_announced(&m1, o));
        run(|o| p.own_announced(&m2, o));
        run(|o| p.received(A, Action::Add, theirs, o));
        assert!(run(|o| p.own_withdrawn(&m1, o)).is_empty());
        assert_eq!(
            run(|o| p.own_withdrawn(&m2, o)),
            vec![PresentChange::Add(theirs)]
        );
    }

    #[test]
    fn dropping_a_vni_withdraws_its_routes_from_every_server() {
        let mut p = PresentRoutes::new();
        let r23 = route(23, "10.0.0.0/24", "2001:db8::1");
        let r24 = route(24, "10.0.0.0/24", "2001:db8::1");
        run(|o| p.received(A, Action::Add, r23, o));
        run(|o| p.received(B, Action::Add, r23, o));
        run(|o| p.received(B, Action::Add, r24, o));
        assert_eq!(
            run(|o| p.vni_dropped(Vni::new(23).unwrap(), o)),
            vec![PresentChange::Remove(r23)]
        );
        assert_eq!(p.present(), vec![r24]);
        assert_eq!(p.held_by(A), 0);
    }

    #[test]
    fn announcing_a_prefix_hides_exactly_its_next_hops() {
        let mut p = PresentRoutes::new();
        let mine = route(23, "10.0.1.0/24", "2001:db8::99");
        let hops = [
            route(23, "10.0.1.0/24", "2001:db8::2"),
            route(23, "10.0.1.0/24", "10.1.1.1"),
            Route::new(
                Vni::new(23).unwrap(),
                "10.0.1.0/24".parse().unwrap(),
                NextHop {
                    target: "2001:db8::1".parse().unwrap(),
                    target_vni: 7,
                    kind: NextHopKind::Nat { from: 1, to: 2 },
                },
            ),
        ];
        // Neighbours in the map's order: another VNI, the prefix before
        // and after, a longer prefix on the same address.
        let neighbours = [
            route(22, "10.0.1.0/24", "2001:db8::2"),
            route(23, "10.0.0.0/24", "2001:db8::2"),
            route(23, "10.0.2.0/24", "2001:db8::2"),
            route(23, "10.0.1.0/25", "2001:db8::2"),
            route(24, "10.0.1.0/24", "2001:db8::2"),
        ];
        for r in hops.iter().chain(&neighbours) {
            run(|o| p.received(A, Action::Add, *r, o));
        }
        let mut want: Vec<PresentChange> = hops.iter().map(|r| PresentChange::Remove(*r)).collect();
        want.sort_by_key(|c| match c {
            PresentChange::Add(r) | PresentChange::Remove(r) => *r,
        });
        assert_eq!(run(|o| p.own_announced(&mine, o)), want);
        let mut left = neighbours.to_vec();
        left.sort();
        assert_eq!(p.present(), left);
        assert!(p.holds(A, &hops[0]) && !p.is_present(&hops[0]));
        assert!(!p.holds(B, &hops[0]));
    }
}
