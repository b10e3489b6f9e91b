//! Compact route keys, and the sets of routes one peer announces in one
//! VNI (`RouteSet`, and `RouteKeySet` behind it for large announcements).
//!
//! Owns: the compact form of a route the server's big structures hold
//! (`V4Key`/`V6Key`/`TableKey`: destination bytes, prefix length and a
//! `NextHopId` instead of the 56-byte `Route`), the next-hop interning table
//! behind it (`NextHopTable`: a fleet has few hypervisors, so a million
//! routes share a handful of next hops), and `RouteKeySet`/`RouteSet`.
//!
//! Key bytes are big-endian, so the derived order of a key is the order of
//! `(destination, next-hop id)`: for one VNI, IPv4 keys sort like the
//! `Route`s they stand for except that routes to the same destination sort
//! by next-hop id (the order the next hops were first seen) rather than by
//! next hop. Anything that relies on an order (the owner's sync cursor)
//! compares keys, never `Route`s against keys.
//!
//! Growth: a large set keeps its keys in sorted chunks (`ChunkMap`), so no
//! insert moves more than one chunk; the hash tables it replaced doubled
//! when they filled, and at a million routes one insert moved the whole
//! table (~0.35 s on the shard thread with 56-byte keys) until they were
//! split in parts.
//!
//! Hashing: the next-hop index (and the owner's side map of further
//! announcers) hash with foldhash and a per-map random seed instead of
//! std's SipHash. Keys come from peers, so the hash must be seeded (a fixed
//! hash such as FxHash would let a peer pick colliding keys); foldhash is
//! seeded and several times faster on short keys.
//!
//! Must never: iterate in an order anyone relies on beyond the key order
//! documented here, or hand out a `NextHopId` to another table (ids mean
//! something only in the table that issued them).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::chunk_map::{ChunkMap, ChunkMapIntoIter};
use metalbond_wire::types::{IpNet, NextHop, Route, Vni};

/// The seeded hasher of the server's hash maps keyed by what peers send
/// (see the module doc).
pub(crate) type FastHash = foldhash::fast::RandomState;

/// A next hop's number in one `NextHopTable`: 4 bytes in a key instead of
/// the 28-byte `NextHop`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) struct NextHopId(u32);

impl NextHopId {
    /// The highest id: with a destination, a key after every route to it.
    pub(crate) const LAST: NextHopId = NextHopId(u32::MAX);
    /// The lowest id: with a destination, a key before every route to it.
    pub(crate) const FIRST: NextHopId = NextHopId(0);
}

/// An IPv4 route's key within one VNI: address (4 bytes, big-endian),
/// prefix length, next-hop id (4 bytes, big-endian).
pub(crate) type V4Key = [u8; 9];
/// An IPv6 route's key within one VNI: address (16 bytes), prefix length,
/// next-hop id (4 bytes).
pub(crate) type V6Key = [u8; 21];

/// A route's key within one VNI (the VNI is implied by the table holding
/// it). Every IPv4 key sorts before every IPv6 key, as `IpNet` does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) enum TableKey {
    /// An IPv4 destination.
    V4(V4Key),
    /// An IPv6 destination.
    V6(V6Key),
}

impl TableKey {
    /// The key of a route to `destination` through next hop `hop`.
    pub(crate) fn new(destination: &IpNet, hop: NextHopId) -> TableKey {
        let id = hop.0.to_be_bytes();
        match destination {
            IpNet::V4(net) => {
                let mut k = [0u8; 9];
                k[..4].copy_from_slice(&net.addr().octets());
                k[4] = net.prefix_len();
                k[5..].copy_from_slice(&id);
                TableKey::V4(k)
            }
            IpNet::V6(net) => {
                let mut k = [0u8; 21];
                k[..16].copy_from_slice(&net.addr().octets());
                k[16] = net.prefix_len();
                k[17..].copy_from_slice(&id);
                TableKey::V6(k)
            }
        }
    }

    /// The destination prefix the key was made from.
    pub(crate) fn destination(&self) -> IpNet {
        match self {
            TableKey::V4(k) => v4_destination(k),
            TableKey::V6(k) => v6_destination(k),
        }
    }

    /// The next hop's id in the issuing table.
    pub(crate) fn hop(&self) -> NextHopId {
        match self {
            TableKey::V4(k) => v4_hop(k),
            TableKey::V6(k) => v6_hop(k),
        }
    }
}

/// The destination of an IPv4 key.
pub(crate) fn v4_destination(k: &V4Key) -> IpNet {
    let addr = Ipv4Addr::new(k[0], k[1], k[2], k[3]);
    // Keys are made from valid prefixes only (at most 32 bits).
    IpNet::V4(Ipv4Net::new(addr, k[4].min(32)).unwrap_or_default())
}

/// The destination of an IPv6 key.
pub(crate) fn v6_destination(k: &V6Key) -> IpNet {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&k[..16]);
    // Keys are made from valid prefixes only (at most 128 bits).
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(octets), k[16].min(128)).unwrap_or_default())
}

/// The next-hop id of an IPv4 key.
pub(crate) fn v4_hop(k: &V4Key) -> NextHopId {
    NextHopId(u32::from_be_bytes([k[5], k[6], k[7], k[8]]))
}

/// The next-hop id of an IPv6 key.
pub(crate) fn v6_hop(k: &V6Key) -> NextHopId {
    NextHopId(u32::from_be_bytes([k[17], k[18], k[19], k[20]]))
}

/// The next hops used by one table's routes, each stored once, counted by
/// the routes that use it.
///
/// An id whose last route left stays mapped to its next hop ("dormant")
/// until a new next hop needs an id, so a change just made can still be
/// turned into its key; a dormant id is revived by its own next hop, or
/// reused for another one (which, since no route holds it, changes no key
/// in use; a key held elsewhere, such as a sync cursor, keeps its place in
/// the order).
///
/// A table of up to `HOPS_BY_SCAN` next hops finds one by scanning `hops`;
/// only a larger one keeps the hash index `ids`. A fleet's VNI has a
/// next hop per hypervisor in it, a score or so: 1,000 such VNIs held
/// ~1.2 MB of hash indexes (issue #28).
#[derive(Debug, Default)]
pub(crate) struct NextHopTable {
    /// Next hop per id, each next hop at most once.
    hops: Vec<NextHop>,
    /// Routes holding each id.
    users: Vec<u32>,
    /// Id per next hop, live or dormant, once `hops` is longer than
    /// `HOPS_BY_SCAN` (empty before).
    ids: HashMap<NextHop, NextHopId, FastHash>,
    /// Ids whose count fell to zero, each listed once (`listed`); one that
    /// was revived since is skipped when popped.
    free: Vec<NextHopId>,
    /// Is the id in `free`?
    listed: Vec<bool>,
}

/// Next hops a `NextHopTable` finds by a scan: 32 comparisons of a few
/// words cost about what hashing the next hop does.
const HOPS_BY_SCAN: usize = 32;

impl NextHopTable {
    /// The id of `hop` if it has one (live or dormant).
    pub(crate) fn id_of(&self, hop: &NextHop) -> Option<NextHopId> {
        if self.hops.len() <= HOPS_BY_SCAN {
            // At most 32 ids: the position fits.
            self.hops
                .iter()
                .position(|h| h == hop)
                .map(|i| NextHopId(i as u32))
        } else {
            self.ids.get(hop).copied()
        }
    }

    /// The next hop of `id` (an id this table issued).
    pub(crate) fn hop(&self, id: NextHopId) -> NextHop {
        self.hops[id.0 as usize]
    }

    /// One more route uses `hop`: its id.
    pub(crate) fn acquire(&mut self, hop: NextHop) -> NextHopId {
        if let Some(id) = self.id_of(&hop) {
            self.users[id.0 as usize] += 1;
            return id;
        }
        while let Some(id) = self.free.pop() {
            let i = id.0 as usize;
            self.listed[i] = false;
            if self.users[i] == 0 {
                if self.hops.len() > HOPS_BY_SCAN {
                    self.ids.remove(&self.hops[i]);
                    self.ids.insert(hop, id);
                }
                self.hops[i] = hop;
                self.users[i] = 1;
                return id;
            }
        }
        // More next hops than u32 ids would need more routes than memory.
        let id = NextHopId(u32::try_from(self.hops.len()).unwrap_or(u32::MAX));
        self.hops.push(hop);
        self.users.push(1);
        self.listed.push(false);
        if self.hops.len() == HOPS_BY_SCAN + 1 {
            // From now on by the index: every next hop, this one included.
            self.ids = (0u32..)
                .zip(&self.hops)
                .map(|(i, h)| (*h, NextHopId(i)))
                .collect();
        } else if self.hops.len() > HOPS_BY_SCAN {
            self.ids.insert(hop, id);
        }
        id
    }

    /// A route using `id` is gone.
    pub(crate) fn release(&mut self, id: NextHopId) {
        let i = id.0 as usize;
        self.users[i] = self.users[i].saturating_sub(1);
        if self.users[i] == 0 && !self.listed[i] {
            self.listed[i] = true;
            self.free.push(id);
        }
    }

    /// Next hops with at least one route.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        self.users.iter().filter(|u| **u > 0).count()
    }

    /// References held, over all next hops (one per route using one).
    #[cfg(test)]
    pub(crate) fn references(&self) -> usize {
        self.users.iter().map(|u| *u as usize).sum()
    }
}

/// A set of one VNI's routes, each held as its compact key within the VNI
/// (`V4Key`/`V6Key`) in sorted chunks (`ChunkMap`), with the VNI and the
/// next hops once: what a peer announcing more than `FEW_ROUTES` routes in
/// a VNI holds. Every route a set holds has the VNI of its first one (its
/// owner keeps sets by VNI); a route of another VNI is never held:
/// `contains` is false for it, `insert` refuses it.
///
/// Why chunks and not a hash table: a peer announces its routes once and
/// the set is asked about them only on a change of that peer, so what
/// counts is the bytes each route costs while it sits there. A hash table
/// doubles when it fills and sits between 44 % and 88 % full: a
/// million-route announcement held 16.1 MB in hash tables of 9-byte keys
/// (48 % full); in chunks that an announcement in order fills completely
/// it is ~10 bytes a route, and no insert ever moves more than one chunk
/// (issue #28).
#[derive(Debug, Default)]
pub(crate) struct RouteKeySet {
    /// The VNI of the routes held (of the first inserted).
    vni: Option<Vni>,
    /// IPv4 routes.
    v4: ChunkMap<V4Key, ()>,
    /// IPv6 routes.
    v6: ChunkMap<V6Key, ()>,
    /// The next hops of the routes held.
    hops: NextHopTable,
}

/// The route a set's key of `vni` stands for.
fn route_of(vni: Vni, key: TableKey, hops: &NextHopTable) -> Route {
    Route {
        vni,
        destination: key.destination(),
        next_hop: hops.hop(key.hop()),
    }
}

impl RouteKeySet {
    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// The key `route` has here, if it is of this set's VNI and its next
    /// hop is known.
    fn key_of(&self, route: &Route) -> Option<TableKey> {
        if self.vni != Some(route.vni) {
            return None;
        }
        let id = self.hops.id_of(&route.next_hop)?;
        Some(TableKey::new(&route.destination, id))
    }

    /// Is `route` held?
    pub(crate) fn contains(&self, route: &Route) -> bool {
        match self.key_of(route) {
            Some(TableKey::V4(k)) => self.v4.get(&k).is_some(),
            Some(TableKey::V6(k)) => self.v6.get(&k).is_some(),
            None => false,
        }
    }

    /// Adds `route`; false if it was held already or is of another VNI
    /// than the set's.
    pub(crate) fn insert(&mut self, route: Route) -> bool {
        match self.vni {
            None => self.vni = Some(route.vni),
            Some(vni) if vni != route.vni => return false,
            Some(_) => {}
        }
        // One look-up: take the next hop's id first, give the extra
        // reference back if the route was held already.
        let id = self.hops.acquire(route.next_hop);
        let added = match TableKey::new(&route.destination, id) {
            TableKey::V4(k) => self.v4.insert_new(k, ()).is_ok(),
            TableKey::V6(k) => self.v6.insert_new(k, ()).is_ok(),
        };
        if !added {
            self.hops.release(id);
        }
        added
    }

    /// Removes `route`; false if it was not held.
    pub(crate) fn remove(&mut self, route: &Route) -> bool {
        let Some(key) = self.key_of(route) else {
            return false;
        };
        let removed = match key {
            TableKey::V4(k) => self.v4.remove(&k).is_some(),
            TableKey::V6(k) => self.v6.remove(&k).is_some(),
        };
        if removed {
            self.hops.release(key.hop());
        }
        removed
    }

    /// Keeps only the routes for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Route) -> bool) {
        let Some(vni) = self.vni else { return };
        let hops = &self.hops;
        let mut gone = Vec::new();
        self.v4.retain(|k, ()| {
            let kept = keep(&route_of(vni, TableKey::V4(*k), hops));
            if !kept {
                gone.push(v4_hop(k));
            }
            kept
        });
        self.v6.retain(|k, ()| {
            let kept = keep(&route_of(vni, TableKey::V6(*k), hops));
            if !kept {
                gone.push(v6_hop(k));
            }
            kept
        });
        for id in gone {
            self.hops.release(id);
        }
    }
}

/// The routes of a `RouteKeySet`, consumed (IPv4 first, each family in key
/// order).
pub(crate) struct RouteKeySetIntoIter {
    /// The set's VNI (`None`: it never held a route).
    vni: Option<Vni>,
    /// IPv4 keys left.
    v4: ChunkMapIntoIter<V4Key, ()>,
    /// IPv6 keys left.
    v6: ChunkMapIntoIter<V6Key, ()>,
    /// Next hops of both.
    hops: NextHopTable,
}

impl Iterator for RouteKeySetIntoIter {
    type Item = Route;

    fn next(&mut self) -> Option<Route> {
        let vni = self.vni?;
        if let Some((k, ())) = self.v4.next() {
            return Some(route_of(vni, TableKey::V4(k), &self.hops));
        }
        let (k, ()) = self.v6.next()?;
        Some(route_of(vni, TableKey::V6(k), &self.hops))
    }
}

impl IntoIterator for RouteKeySet {
    type Item = Route;
    type IntoIter = RouteKeySetIntoIter;

    fn into_iter(self) -> RouteKeySetIntoIter {
        RouteKeySetIntoIter {
            vni: self.vni,
            v4: self.v4.into_iter(),
            v6: self.v6.into_iter(),
            hops: self.hops,
        }
    }
}

/// A set of routes; see the module doc. A peer announcing a few routes in
/// a VNI (a fleet's hypervisors announce a handful each, all through their
/// own underlay address) holds their prefixes and, once, the VNI and the
/// next hop (`OneHop`); a few routes through several next hops are a
/// plain vector of exactly their number; past `FEW_ROUTES` the set becomes
/// a `RouteKeySet`. A fleet of 19,000 peers × 5 routes held ~900 bytes per
/// peer in maps (a boxed map, its next-hop table and per-family tables),
/// 280 in vectors of routes, 160 with one next hop (issue #28). A set
/// holds routes of one VNI (a peer's sets are kept by VNI): `insert`
/// refuses a route of another VNI than its first, as `RouteKeySet` does.
#[derive(Debug, Default)]
pub(crate) struct RouteSet {
    /// The routes, in one of three forms.
    form: SetForm,
}

/// Most routes a `RouteSet` holds in a vector: a linear search over this
/// many is as quick as a look-up in sorted chunks, and a peer cannot make
/// it longer.
const FEW_ROUTES: usize = 16;

/// The three forms of a `RouteSet`.
#[derive(Debug)]
enum SetForm {
    /// Up to `FEW_ROUTES` routes through one next hop. Boxed: the VNI and
    /// the next hop would make every set (a peer's first one sits in its
    /// session task) 40 bytes larger.
    OneHop(Box<OneHop>),
    /// Up to `FEW_ROUTES` routes, unordered, capacity kept at their number
    /// (none while empty).
    Few(Vec<Route>),
    /// More. Boxed: a peer's sets live in a map by VNI whose slots (spare
    /// ones included) would each hold the ~200-byte key set inline.
    Many(Box<RouteKeySet>),
}

/// Routes of one VNI through one next hop: 18 bytes a route instead of 56.
#[derive(Debug)]
struct OneHop {
    /// The routes' VNI.
    vni: Vni,
    /// The routes' next hop.
    hop: NextHop,
    /// Their destinations, unordered, unique, capacity kept at their
    /// number; never empty (an emptied set goes back to `Few`).
    prefixes: Vec<IpNet>,
}

impl OneHop {
    /// Does this set hold `route`?
    fn holds(&self, route: &Route) -> bool {
        route.vni == self.vni
            && route.next_hop == self.hop
            && self.prefixes.contains(&route.destination)
    }

    /// The routes, by value.
    fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        self.prefixes.iter().map(|p| Route {
            vni: self.vni,
            destination: *p,
            next_hop: self.hop,
        })
    }
}

impl Default for SetForm {
    fn default() -> SetForm {
        SetForm::Few(Vec::new())
    }
}

impl RouteSet {
    /// Routes held.
    pub(crate) fn len(&self) -> usize {
        match &self.form {
            SetForm::OneHop(o) => o.prefixes.len(),
            SetForm::Few(v) => v.len(),
            SetForm::Many(m) => m.len(),
        }
    }

    /// Is `route` held?
    pub(crate) fn contains(&self, route: &Route) -> bool {
        match &self.form {
            SetForm::OneHop(o) => o.holds(route),
            SetForm::Few(v) => v.contains(route),
            SetForm::Many(m) => m.contains(route),
        }
    }

    /// Adds `route`; false if it was already held (or is of another VNI).
    pub(crate) fn insert(&mut self, route: Route) -> bool {
        match &mut self.form {
            SetForm::Few(v) if v.is_empty() => {
                self.form = SetForm::OneHop(Box::new(OneHop {
                    vni: route.vni,
                    hop: route.next_hop,
                    prefixes: vec![route.destination],
                }));
                true
            }
            SetForm::OneHop(o) => {
                if o.vni != route.vni || o.holds(&route) {
                    return false;
                }
                if o.hop == route.next_hop && o.prefixes.len() < FEW_ROUTES {
                    o.prefixes.reserve_exact(1);
                    o.prefixes.push(route.destination);
                    return true;
                }
                // Another next hop, or one route too many: the routes held
                // and this one in the form their number calls for.
                let held: Vec<Route> = o.routes().chain([route]).collect();
                self.form = if held.len() <= FEW_ROUTES {
                    SetForm::Few(held)
                } else {
                    SetForm::Many(Box::new(Self::map_of(held)))
                };
                true
            }
            SetForm::Few(v) => {
                if v.contains(&route) || v.first().is_some_and(|r| r.vni != route.vni) {
                    return false;
                }
                if v.len() < FEW_ROUTES {
                    v.reserve_exact(1);
                    v.push(route);
                } else {
                    let held: Vec<Route> = v.drain(..).chain([route]).collect();
                    self.form = SetForm::Many(Box::new(Self::map_of(held)));
                }
                true
            }
            SetForm::Many(m) => m.insert(route),
        }
    }

    /// A map of `routes`, all of one VNI (checked by the caller).
    fn map_of(routes: Vec<Route>) -> RouteKeySet {
        let mut map = RouteKeySet::default();
        for r in routes {
            map.insert(r);
        }
        map
    }

    /// Removes `route`; false if it was not held.
    pub(crate) fn remove(&mut self, route: &Route) -> bool {
        match &mut self.form {
            SetForm::OneHop(o) => {
                if !o.holds(route) {
                    return false;
                }
                o.prefixes.retain(|p| *p != route.destination);
                if o.prefixes.is_empty() {
                    self.form = SetForm::default();
                } else {
                    o.prefixes.shrink_to_fit();
                }
                true
            }
            SetForm::Few(v) => match v.iter().position(|r| r == route) {
                Some(i) => {
                    v.swap_remove(i);
                    v.shrink_to_fit();
                    true
                }
                None => false,
            },
            SetForm::Many(m) => m.remove(route),
        }
    }

    /// Moves the routes for which `take` holds into a new set (a policy
    /// reload takes out what became forbidden).
    pub(crate) fn take_if(&mut self, mut take: impl FnMut(&Route) -> bool) -> RouteSet {
        let mut taken = RouteSet::default();
        match &mut self.form {
            SetForm::OneHop(_) => {
                let mut kept = RouteSet::default();
                for r in std::mem::take(self) {
                    if take(&r) {
                        taken.insert(r);
                    } else {
                        kept.insert(r);
                    }
                }
                *self = kept;
            }
            SetForm::Few(v) => {
                v.retain(|r| {
                    if take(r) {
                        taken.insert(*r);
                        false
                    } else {
                        true
                    }
                });
                v.shrink_to_fit();
            }
            SetForm::Many(m) => m.retain(|r| {
                if take(r) {
                    taken.insert(*r);
                    false
                } else {
                    true
                }
            }),
        }
        taken
    }
}

/// The routes of a `RouteSet`, by value.
pub(crate) enum RouteSetIntoIter {
    /// Of a set through one next hop.
    OneHop {
        /// The routes' VNI.
        vni: Vni,
        /// Their next hop.
        hop: NextHop,
        /// Their destinations.
        prefixes: std::vec::IntoIter<IpNet>,
    },
    /// Of a set in vector form.
    Few(std::vec::IntoIter<Route>),
    /// Of a set in key-set form (boxed: its iterator is several times the
    /// vector's).
    Many(Box<RouteKeySetIntoIter>),
}

impl Iterator for RouteSetIntoIter {
    type Item = Route;

    fn next(&mut self) -> Option<Route> {
        match self {
            RouteSetIntoIter::OneHop { vni, hop, prefixes } => prefixes.next().map(|p| Route {
                vni: *vni,
                destination: p,
                next_hop: *hop,
            }),
            RouteSetIntoIter::Few(it) => it.next(),
            RouteSetIntoIter::Many(it) => it.next(),
        }
    }
}

impl IntoIterator for RouteSet {
    type Item = Route;
    type IntoIter = RouteSetIntoIter;

    fn into_iter(self) -> RouteSetIntoIter {
        match self.form {
            SetForm::OneHop(o) => {
                let OneHop { vni, hop, prefixes } = *o;
                RouteSetIntoIter::OneHop {
                    vni,
                    hop,
                    prefixes: prefixes.into_iter(),
                }
            }
            SetForm::Few(v) => RouteSetIntoIter::Few(v.into_iter()),
            SetForm::Many(m) => RouteSetIntoIter::Many(Box::new((*m).into_iter())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::NextHopKind;

    fn route(i: u32) -> Route {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
        Route::new(
            Vni::new(1).unwrap(),
            format!("{ip}/32").parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    fn v6_route(i: u32, hop: u8) -> Route {
        Route::new(
            Vni::new(1).unwrap(),
            format!("2001:db8:{i:x}::/64").parse().unwrap(),
            NextHop {
                target: format!("2001:db8::{hop}").parse().unwrap(),
                target_vni: 9,
                kind: NextHopKind::Nat { from: 10, to: 20 },
            },
        )
    }

    /// Is this `route(i)` of an odd `i`?
    fn odd(r: &Route) -> bool {
        match r.destination.addr() {
            std::net::IpAddr::V4(a) => u32::from(a) % 2 == 1,
            std::net::IpAddr::V6(_) => false,
        }
    }

    #[test]
    fn a_set_holds_routes_of_its_first_routes_vni_only() {
        let other = |i: u32| Route {
            vni: Vni::new(2).unwrap(),
            ..route(i)
        };
        let mut s = RouteSet::default();
        assert!(s.insert(route(1)));
        assert!(!s.insert(other(2)), "another VNI, vector form");
        assert!(!s.contains(&other(1)));
        for i in 2..=FEW_ROUTES as u32 + 1 {
            assert!(s.insert(route(i)));
        }
        assert!(matches!(s.form, SetForm::Many(_)));
        assert!(!s.insert(other(1)), "another VNI, key-set form");
        assert!(!s.contains(&other(1)) && !s.remove(&other(1)));
        assert_eq!(s.len(), FEW_ROUTES + 1);
        let mut m = RouteKeySet::default();
        assert!(m.insert(route(1)));
        assert!(!m.insert(route(1)) && !m.insert(other(1)));
        assert_eq!(
            m.hops.references(),
            1,
            "a duplicate gives its reference back"
        );
        assert!(!m.contains(&other(1)) && !m.remove(&other(1)));
        assert_eq!(m.len(), 1);
    }

    /// `route(i)` through next hop `2001:db8::{hop}` instead.
    fn via(i: u32, hop: u16) -> Route {
        Route {
            next_hop: NextHop::standard(std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, 0, 0, 0, 0, hop,
            ))),
            ..route(i)
        }
    }

    #[test]
    fn a_few_routes_are_their_prefixes_or_a_vector_of_their_number_and_more_a_key_set() {
        let mut s = RouteSet::default();
        for i in 0..FEW_ROUTES as u32 {
            assert!(s.insert(route(i)));
            assert!(!s.insert(route(i)), "second insert of {i}");
            let SetForm::OneHop(o) = &s.form else {
                panic!("{} routes through one next hop", i + 1)
            };
            assert_eq!(o.prefixes.capacity(), i as usize + 1, "no spare room");
        }
        assert!(!s.contains(&via(3, 9)), "same prefix, another next hop");
        assert!(!s.remove(&via(3, 9)));
        assert!(s.remove(&route(3)));
        assert!(!s.remove(&route(3)));
        assert!(!s.contains(&route(3)));
        assert!(s.insert(route(3)));
        // One more than FEW_ROUTES: a key set with every route.
        assert!(s.insert(route(100)));
        assert!(matches!(s.form, SetForm::Many(_)));
        assert!(!s.insert(route(5)), "held before the change of form");
        assert_eq!(s.len(), FEW_ROUTES + 1);
        assert!((0..FEW_ROUTES as u32).all(|i| s.contains(&route(i))));

        // A second next hop: a vector of routes, then a key set.
        let mut mixed = RouteSet::default();
        assert!(mixed.insert(route(1)) && mixed.insert(route(2)));
        assert!(mixed.insert(via(1, 9)), "same prefix, another next hop");
        let SetForm::Few(v) = &mixed.form else {
            panic!("two next hops are a vector")
        };
        assert_eq!(v.capacity(), 3);
        assert!(mixed.contains(&route(1)) && mixed.contains(&via(1, 9)));
        for i in 3..FEW_ROUTES as u32 {
            assert!(mixed.insert(via(i, 9)));
        }
        assert!(matches!(mixed.form, SetForm::Few(_)));
        assert!(mixed.insert(via(100, 9)));
        assert!(matches!(mixed.form, SetForm::Many(_)));
        assert_eq!(mixed.len(), FEW_ROUTES + 1);

        // Emptied, a one-hop set holds nothing on the heap; a full one
        // turns into a key set when a second next hop comes.
        let mut one = RouteSet::default();
        assert!(one.insert(route(1)) && one.remove(&route(1)));
        assert!(matches!(&one.form, SetForm::Few(v) if v.capacity() == 0));
        for i in 0..FEW_ROUTES as u32 {
            one.insert(route(i));
        }
        assert!(one.insert(via(0, 9)));
        assert!(matches!(one.form, SetForm::Many(_)));
        assert_eq!(one.len(), FEW_ROUTES + 1);
        let mut back: Vec<Route> = one.into_iter().collect();
        back.sort();
        let mut want: Vec<Route> = (0..FEW_ROUTES as u32).map(route).collect();
        want.push(via(0, 9));
        want.sort();
        assert_eq!(back, want);

        // take_if in both small forms.
        let mut few = RouteSet::default();
        for i in 0..6 {
            few.insert(route(i));
        }
        let taken = few.take_if(|r| !odd(r));
        let mut got: Vec<Route> = taken.into_iter().collect();
        got.sort();
        assert_eq!(got, vec![route(0), route(2), route(4)]);
        let mut left: Vec<Route> = few.into_iter().collect();
        left.sort();
        assert_eq!(left, vec![route(1), route(3), route(5)]);
        let mut few = RouteSet::default();
        for i in 0..6 {
            few.insert(if i % 3 == 0 { via(i, 9) } else { route(i) });
        }
        assert!(matches!(few.form, SetForm::Few(_)));
        let taken = few.take_if(|r| !odd(r));
        let mut got: Vec<Route> = taken.into_iter().collect();
        got.sort();
        let mut want = vec![via(0, 9), route(2), route(4)];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(few.len(), 3);
    }

    /// A large set, built in order and out of order, against a `BTreeSet`:
    /// same answers, same routes back, and an in-order announcement fills
    /// its chunks (what makes it ~10 bytes a route).
    #[test]
    fn a_large_set_holds_exactly_its_routes_in_any_insert_order() {
        let n = 50_000u32;
        // In order, then a scattered order (a multiplicative permutation).
        let scattered: Vec<u32> = (0..n).map(|i| i.wrapping_mul(40_503) % n).collect();
        for order in [(0..n).collect::<Vec<u32>>(), scattered] {
            let mut s = RouteSet::default();
            let mut reference = std::collections::BTreeSet::new();
            for &i in &order {
                assert!(s.insert(route(i)));
                assert!(!s.insert(route(i)), "second insert of {i}");
                reference.insert(route(i));
            }
            let SetForm::Many(set) = &s.form else {
                panic!("a set of {n} routes is a key set")
            };
            assert_eq!(set.v4.len(), n as usize);
            assert_eq!(s.len(), n as usize);
            assert!((0..n).all(|i| s.contains(&route(i))));
            assert!(!s.contains(&route(n)) && !s.contains(&via(1, 9)));
            for i in (0..n).step_by(2) {
                assert!(s.remove(&route(i)));
                assert!(!s.remove(&route(i)));
                reference.remove(&route(i));
            }
            assert_eq!(s.len(), reference.len());
            let SetForm::Many(set) = &s.form else {
                panic!("still a key set")
            };
            assert_eq!(
                set.hops.references(),
                set.len(),
                "a reference per route held"
            );
            let left: Vec<Route> = s.into_iter().collect();
            assert_eq!(
                left,
                reference.into_iter().collect::<Vec<_>>(),
                "in key order"
            );
        }
    }

    #[test]
    fn retain_releases_the_next_hops_of_what_it_drops() {
        let mut m = RouteKeySet::default();
        let n = 1_000u32;
        for i in 0..n {
            assert!(m.insert(if i % 2 == 1 { route(i) } else { via(i, 9) }));
        }
        assert_eq!(m.hops.live(), 2);
        // Keep the odd-numbered ones: every route through 2001:db8::9 goes.
        m.retain(odd);
        assert_eq!((m.len(), m.hops.live()), (n as usize / 2, 1));
        assert_eq!(m.hops.references(), m.len(), "a reference per route held");
        assert!(!m.contains(&via(2, 9)) && m.contains(&route(3)));
        let got: Vec<Route> = m.into_iter().collect();
        let want: Vec<Route> = (1..n).step_by(2).map(route).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_routes_and_many_next_hops_come_back_whole() {
        let mut s = RouteSet::default();
        let mut want = Vec::new();
        for i in 0..300u32 {
            let r = v6_route(i, (i % 5) as u8);
            assert!(s.insert(r));
            want.push(r);
            // The same destination through another next hop is another route.
            let other = v6_route(i, 200);
            assert!(s.insert(other));
            want.push(other);
            assert!(s.insert(route(i)));
            want.push(route(i));
        }
        assert_eq!(s.len(), 900);
        assert!(s.contains(&v6_route(3, 3)));
        assert!(
            !s.contains(&v6_route(3, 4)),
            "next hop 4 only for i % 5 == 4"
        );
        let taken = s.take_if(|r| r.destination.addr().is_ipv4());
        assert_eq!((taken.len(), s.len()), (300, 600));
        let mut got: Vec<Route> = s.into_iter().chain(taken).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn next_hop_ids_are_reused_only_after_their_last_route_left() {
        let a = NextHop::standard("2001:db8::a".parse().unwrap());
        let b = NextHop::standard("2001:db8::b".parse().unwrap());
        let c = NextHop::standard("2001:db8::c".parse().unwrap());
        let mut t = NextHopTable::default();
        let ia = t.acquire(a);
        assert_eq!(t.acquire(a), ia);
        let ib = t.acquire(b);
        assert_ne!(ia, ib);
        t.release(ia);
        t.release(ia);
        // Dormant: still known, revived by its own next hop.
        assert_eq!(t.id_of(&a), Some(ia));
        assert_eq!(t.acquire(a), ia);
        t.release(ia);
        // Reused for a new next hop once nothing holds it.
        let ic = t.acquire(c);
        assert_eq!(ic, ia);
        assert_eq!(t.hop(ic), c);
        assert_eq!(t.id_of(&a), None);
        assert_eq!((t.live(), t.hops.len(), t.free.len()), (2, 2, 0));
        // Release/revive cycles do not grow the free list.
        for _ in 0..100 {
            t.release(ib);
            t.acquire(b);
        }
        assert!(t.free.len() <= 1);
    }

    #[test]
    fn next_hops_are_found_alike_by_scan_and_by_index() {
        let hop = |i: u16| {
            NextHop::standard(std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, 0, 0, 0, 1, i,
            )))
        };
        let mut t = NextHopTable::default();
        let n = HOPS_BY_SCAN as u16 * 3;
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(t.acquire(hop(i)));
            assert_eq!(t.ids.is_empty(), usize::from(i) < HOPS_BY_SCAN, "{i}");
            assert!((0..=i).all(|j| t.id_of(&hop(j)) == Some(ids[usize::from(j)])));
            assert_eq!(t.id_of(&hop(i + 1)), None);
        }
        assert_eq!(t.ids.len(), usize::from(n));
        // A dormant id reused by the index keeps it exact.
        t.release(ids[5]);
        let reused = t.acquire(hop(1000));
        assert_eq!(reused, ids[5]);
        assert_eq!(
            (t.id_of(&hop(5)), t.id_of(&hop(1000))),
            (None, Some(reused))
        );
        assert_eq!(t.ids.len(), usize::from(n));
        // And by the scan.
        let mut small = NextHopTable::default();
        let a = small.acquire(hop(1));
        small.release(a);
        assert_eq!(small.acquire(hop(2)), a);
        assert_eq!(
            (small.id_of(&hop(1)), small.id_of(&hop(2))),
            (None, Some(a))
        );
        assert!(small.ids.is_empty());
    }

    #[test]
    fn keys_sort_like_their_destinations() {
        let hop = NextHopId(3);
        let nets: Vec<IpNet> = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.0.0.0/24",
            "10.0.1.0/24",
            "192.168.0.0/16",
            "::/0",
            "2001:db8::/32",
            "2001:db8::/64",
            "fe80::/10",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let keys: Vec<TableKey> = nets.iter().map(|n| TableKey::new(n, hop)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys, "listed in IpNet order");
        for (n, k) in nets.iter().zip(&keys) {
            assert_eq!((k.destination(), k.hop()), (*n, hop));
        }
    }
}
