//! Route-keyed sets and maps that grow without long pauses: what one peer
//! announces in one VNI (`RouteSet`), and a slow subscriber's coalesced
//! pending changes (`RouteMap`, in `out_queue`).
//!
//! Owns: `RouteMap` and `RouteSet`. A single `HashMap` doubles its table
//! when it fills, and at a million routes that one insert moves ~64 MiB into
//! freshly faulted memory: ~0.35 s measured on the shard thread in a 1 M-route
//! burst, during which no other peer of the shard is served. Above
//! `SPLIT_AT` routes a map is split into `PARTS` parts picked by a hash of
//! their own, so a growth step moves at most 1/`PARTS` of the routes.
//!
//! Must never: change what a map holds when it splits, or iterate in an order
//! anyone relies on (there is none).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use crate::types::Route;

/// Routes a map holds before it is split into parts.
const SPLIT_AT: usize = 16 * 1024;
/// Parts of a split map (a power of two, at most 2^63).
const PARTS: usize = 64;

/// A map from routes to `V`; see the module doc.
#[derive(Debug)]
pub(crate) struct RouteMap<V> {
    /// One part until `SPLIT_AT` routes, then `PARTS` parts.
    parts: Vec<HashMap<Route, V>>,
    /// Picks a route's part once split. Separate from the parts' own
    /// hashers, so the routes of one part still spread over its table.
    pick: RandomState,
    /// Routes in all parts.
    len: usize,
}

impl<V> Default for RouteMap<V> {
    fn default() -> RouteMap<V> {
        RouteMap {
            parts: vec![HashMap::new()],
            pick: RandomState::new(),
            len: 0,
        }
    }
}

impl<V> RouteMap<V> {
    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Nothing held?
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Is `route` held?
    pub(crate) fn contains_key(&self, route: &Route) -> bool {
        self.parts[self.part(route)].contains_key(route)
    }

    /// The value of `route`, to change it.
    pub(crate) fn get_mut(&mut self, route: &Route) -> Option<&mut V> {
        let p = self.part(route);
        self.parts[p].get_mut(route)
    }

    /// Sets `route` to `value`; the previous value, if any.
    pub(crate) fn insert(&mut self, route: Route, value: V) -> Option<V> {
        if self.parts.len() == 1 && self.len >= SPLIT_AT {
            self.split();
        }
        let p = self.part(&route);
        let old = self.parts[p].insert(route, value);
        self.len += usize::from(old.is_none());
        old
    }

    /// Removes `route`; its value, if it was held.
    pub(crate) fn remove(&mut self, route: &Route) -> Option<V> {
        let p = self.part(route);
        let old = self.parts[p].remove(route);
        self.len -= usize::from(old.is_some());
        old
    }

    /// Keeps only the entries for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Route, &mut V) -> bool) {
        for part in &mut self.parts {
            part.retain(&mut keep);
        }
        self.len = self.parts.iter().map(HashMap::len).sum();
    }

    /// Removes and returns up to `n` entries (any of them).
    pub(crate) fn take_some(&mut self, n: usize) -> Vec<(Route, V)> {
        let mut out = Vec::with_capacity(n.min(self.len));
        for part in &mut self.parts {
            let room = n - out.len();
            if room == 0 {
                break;
            }
            let keys: Vec<Route> = part.keys().take(room).copied().collect();
            for route in keys {
                if let Some(v) = part.remove(&route) {
                    out.push((route, v));
                }
            }
        }
        self.len -= out.len();
        out
    }

    fn part(&self, route: &Route) -> usize {
        if self.parts.len() == 1 {
            0
        } else {
            // The top bits: PARTS is a power of two.
            (self.pick.hash_one(route) >> (64 - PARTS.trailing_zeros())) as usize
        }
    }

    /// From one part to `PARTS` (moves `SPLIT_AT` routes once).
    fn split(&mut self) {
        let fresh = (0..PARTS).map(|_| HashMap::new()).collect();
        let old = std::mem::replace(&mut self.parts, fresh);
        for (route, v) in old.into_iter().flatten() {
            let p = self.part(&route);
            self.parts[p].insert(route, v);
        }
    }
}

impl<V> IntoIterator for RouteMap<V> {
    type Item = (Route, V);
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<HashMap<Route, V>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.parts.into_iter().flatten()
    }
}

/// A set of routes; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct RouteSet {
    /// The routes, with nothing attached.
    map: RouteMap<()>,
}

impl RouteSet {
    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Is `route` held?
    pub(crate) fn contains(&self, route: &Route) -> bool {
        self.map.contains_key(route)
    }

    /// Adds `route`; false if it was already held.
    pub(crate) fn insert(&mut self, route: Route) -> bool {
        self.map.insert(route, ()).is_none()
    }

    /// Removes `route`; false if it was not held.
    pub(crate) fn remove(&mut self, route: &Route) -> bool {
        self.map.remove(route).is_some()
    }

    /// Moves the routes for which `take` holds into a new set (a policy
    /// reload takes out what became forbidden).
    pub(crate) fn take_if(&mut self, mut take: impl FnMut(&Route) -> bool) -> RouteSet {
        let mut taken = RouteSet::default();
        self.map.retain(|r, _| {
            if take(r) {
                taken.insert(*r);
                false
            } else {
                true
            }
        });
        taken
    }
}

impl IntoIterator for RouteSet {
    type Item = Route;
    type IntoIter = std::iter::Map<
        std::iter::Flatten<std::vec::IntoIter<HashMap<Route, ()>>>,
        fn((Route, ())) -> Route,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter().map(|(r, ())| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NextHop, Vni};

    fn route(i: u32) -> Route {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
        Route::new(
            Vni::new(1 + i % 2).unwrap(),
            format!("{ip}/32").parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    #[test]
    fn set_holds_the_same_routes_before_and_after_splitting() {
        let mut s = RouteSet::default();
        let n = SPLIT_AT as u32 * 3;
        for i in 0..n {
            assert!(s.insert(route(i)));
            assert!(!s.insert(route(i)), "second insert of {i}");
        }
        assert_eq!(s.map.parts.len(), PARTS, "split once past SPLIT_AT");
        assert!(
            s.map.parts.iter().all(|p| !p.is_empty()),
            "the routes spread over all parts"
        );
        assert_eq!(s.len(), n as usize);
        assert!((0..n).all(|i| s.contains(&route(i))));
        assert!(!s.contains(&route(n)));
        for i in (0..n).step_by(2) {
            assert!(s.remove(&route(i)));
            assert!(!s.remove(&route(i)));
        }
        assert_eq!(s.len(), n as usize / 2);
        let mut left: Vec<Route> = s.into_iter().collect();
        left.sort();
        let want: Vec<Route> = (1..n).step_by(2).map(route).collect();
        assert_eq!(left, want);
    }

    #[test]
    fn map_values_retain_and_take_some_across_parts() {
        let mut m = RouteMap::default();
        let n = SPLIT_AT as u32 * 2;
        for i in 0..n {
            assert_eq!(m.insert(route(i), i), None);
        }
        assert_eq!(m.insert(route(7), 70), Some(7));
        *m.get_mut(&route(8)).unwrap() = 80;
        assert_eq!(m.len(), n as usize);
        // Route i has VNI 1 + i % 2: keep the VNI 2 ones.
        m.retain(|r, _| r.vni == Vni::new(2).unwrap());
        assert_eq!(m.len(), n as usize / 2);
        let mut got = Vec::new();
        loop {
            let some = m.take_some(1000);
            assert!(some.len() <= 1000);
            if some.is_empty() {
                break;
            }
            got.extend(some);
        }
        assert!(m.is_empty());
        got.sort();
        let want: Vec<(Route, u32)> = (1..n)
            .step_by(2)
            .map(|i| (route(i), if i == 7 { 70 } else { i }))
            .collect();
        assert_eq!(got, want);
    }
}
