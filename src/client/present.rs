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
//! A route is present ⇔ at least one server holds it ∧ we announce no route
//! with the same (VNI, prefix).

use std::collections::{HashMap, HashSet};

use crate::types::{Action, IpNet, NextHop, Route, Vni};

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

/// Received routes per server and the resulting present set.
#[derive(Default, Debug)]
pub struct PresentRoutes {
    /// Every route each server currently holds for us.
    per_server: HashMap<ServerId, HashSet<Route>>,
    /// (VNI, prefix) → next hop → number of servers holding that route.
    held: HashMap<(Vni, IpNet), HashMap<NextHop, u32>>,
    /// (VNI, prefix) we announce → number of our routes with that key.
    own: HashMap<(Vni, IpNet), u32>,
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
    pub fn is_present(&self, route: &Route) -> bool {
        let key = Self::key(route);
        !self.is_own(&key)
            && self
                .held
                .get(&key)
                .is_some_and(|hops| hops.contains_key(&route.next_hop))
    }

    /// Every present route (unordered).
    pub fn present(&self) -> Vec<Route> {
        self.held
            .iter()
            .filter(|(key, _)| !self.is_own(key))
            .flat_map(|(&(vni, destination), hops)| {
                hops.keys().map(move |next_hop| Route {
                    vni,
                    destination,
                    next_hop: *next_hop,
                })
            })
            .collect()
    }

    /// Number of routes `server` holds.
    pub fn held_by(&self, server: ServerId) -> usize {
        self.per_server.get(&server).map_or(0, HashSet::len)
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
        let routes = self.per_server.entry(server).or_default();
        match action {
            Action::Add => {
                if routes.insert(route) {
                    self.hold(route, out);
                }
            }
            Action::Remove => {
                if routes.remove(&route) {
                    self.release(route, out);
                }
            }
        }
    }

    /// `server`'s session ended: everything it held is dropped.
    pub fn server_lost(&mut self, server: ServerId, out: &mut Vec<PresentChange>) {
        if let Some(routes) = self.per_server.remove(&server) {
            for route in routes {
                self.release(route, out);
            }
        }
    }

    /// We unsubscribed from `vni`: no server will tell us about it any more,
    /// so every server's routes of that VNI are dropped.
    pub fn vni_dropped(&mut self, vni: Vni, out: &mut Vec<PresentChange>) {
        let mut dropped = Vec::new();
        for routes in self.per_server.values_mut() {
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

    fn emit_all(
        &self,
        key: (Vni, IpNet),
        out: &mut Vec<PresentChange>,
        make: fn(Route) -> PresentChange,
    ) {
        if let Some(hops) = self.held.get(&key) {
            let mut hops: Vec<&NextHop> = hops.keys().collect();
            hops.sort();
            out.extend(hops.into_iter().map(|next_hop| {
                make(Route {
                    vni: key.0,
                    destination: key.1,
                    next_hop: *next_hop,
                })
            }));
        }
    }

    fn hold(&mut self, route: Route, out: &mut Vec<PresentChange>) {
        let key = Self::key(&route);
        let count = self
            .held
            .entry(key)
            .or_default()
            .entry(route.next_hop)
            .or_insert(0);
        *count += 1;
        if *count == 1 && !self.own.contains_key(&key) {
            out.push(PresentChange::Add(route));
        }
    }

    fn release(&mut self, route: Route, out: &mut Vec<PresentChange>) {
        let key = Self::key(&route);
        let own = self.own.contains_key(&key);
        let Some(hops) = self.held.get_mut(&key) else {
            return;
        };
        match hops.get_mut(&route.next_hop) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                hops.remove(&route.next_hop);
                if hops.is_empty() {
                    self.held.remove(&key);
                }
                if !own {
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
}
