//! A set of routes that grows without long pauses: the record of what one
//! peer announces in one VNI.
//!
//! Owns: `RouteSet`. A single `HashSet` doubles its table when it fills, and
//! at a million routes that one insert moves ~64 MiB into freshly faulted
//! memory: ~0.35 s measured on the shard thread in a 1 M-route burst, during
//! which no other peer of the shard is served. Above `SPLIT_AT` routes the
//! set is split into `PARTS` parts picked by a hash of their own, so a growth
//! step moves at most 1/`PARTS` of the routes.
//!
//! Must never: change what a set holds when it splits, or iterate in an order
//! anyone relies on (there is none).

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;

use crate::types::Route;

/// Routes a set holds before it is split into parts.
const SPLIT_AT: usize = 16 * 1024;
/// Parts of a split set (a power of two, at most 2^63).
const PARTS: usize = 64;

/// A set of routes; see the module doc.
#[derive(Debug)]
pub(crate) struct RouteSet {
    /// One part until `SPLIT_AT` routes, then `PARTS` parts.
    parts: Vec<HashSet<Route>>,
    /// Picks a route's part once split. Separate from the parts' own
    /// hashers, so the routes of one part still spread over its table.
    pick: RandomState,
    /// Routes in all parts.
    len: usize,
}

impl Default for RouteSet {
    fn default() -> RouteSet {
        RouteSet {
            parts: vec![HashSet::new()],
            pick: RandomState::new(),
            len: 0,
        }
    }
}

impl RouteSet {
    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Is `route` held?
    pub(crate) fn contains(&self, route: &Route) -> bool {
        self.parts[self.part(route)].contains(route)
    }

    /// Adds `route`; false if it was already held.
    pub(crate) fn insert(&mut self, route: Route) -> bool {
        if self.parts.len() == 1 && self.len >= SPLIT_AT {
            self.split();
        }
        let p = self.part(&route);
        let added = self.parts[p].insert(route);
        self.len += usize::from(added);
        added
    }

    /// Removes `route`; false if it was not held.
    pub(crate) fn remove(&mut self, route: &Route) -> bool {
        let p = self.part(route);
        let removed = self.parts[p].remove(route);
        self.len -= usize::from(removed);
        removed
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
        let old = std::mem::replace(&mut self.parts, vec![HashSet::new(); PARTS]);
        for route in old.into_iter().flatten() {
            let p = self.part(&route);
            self.parts[p].insert(route);
        }
    }
}

impl IntoIterator for RouteSet {
    type Item = Route;
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<HashSet<Route>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.parts.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NextHop, Vni};

    fn route(i: u32) -> Route {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
        Route::new(
            Vni::new(1).unwrap(),
            format!("{ip}/32").parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    #[test]
    fn holds_the_same_routes_before_and_after_splitting() {
        let mut s = RouteSet::default();
        let n = SPLIT_AT as u32 * 3;
        for i in 0..n {
            assert!(s.insert(route(i)));
            assert!(!s.insert(route(i)), "second insert of {i}");
        }
        assert!(s.parts.len() == PARTS, "split once past SPLIT_AT");
        assert!(
            s.parts.iter().all(|p| !p.is_empty()),
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
}
