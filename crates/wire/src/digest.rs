//! The route-set digest: one 64-bit value per VNI that is equal on every
//! reflector (and every client) holding the same routes, whatever order
//! they arrived in, kept in O(1) per change.
//!
//! Owns: `route_hash` (a fixed 64-bit hash of one route) and `VniDigest`
//! (the wrapping sum of the hashes of a VNI's routes, and their count).
//! A sum is order-independent and takes a route out by subtracting it, so
//! the table that holds the routes updates it where a route enters or
//! leaves, never by a scan. Two sets that differ give different digests
//! except with probability about 2⁻⁶⁴ per comparison; the digest is for
//! finding drift between honest replicas, not for resisting a forger.
//!
//! The hash is part of what operators compare across versions and
//! implementations, so it is specified here and pinned by a test: eight
//! 64-bit words, each folded in as `h = mix(h ^ word)` from the seed
//! `0x6d62_6469_6765_7374` (ASCII "mbdigest"), `mix` being the splitmix64
//! finalizer. The words: `vni | family << 32 | prefix_len << 40` (family
//! 4 or 6); the prefix's address as a big-endian 128-bit number (IPv4 in
//! the low 32 bits), high then low half; the next hop's family and address
//! the same way (`family` alone, then high, then low); `target_vni | type
//! << 32` (type as on the wire: 0 standard, 1 NAT, 2 load balancer); and
//! `nat_port_from | nat_port_to << 16`.
//!
//! Must never: depend on a process's random state (std's `RandomState`) or
//! on the platform's byte order.

use std::fmt;
use std::net::IpAddr;

use crate::types::{IpNet, NextHopKind, Route};

/// Seed of `route_hash` (ASCII "mbdigest").
const SEED: u64 = 0x6d62_6469_6765_7374;

/// The splitmix64 finalizer: a bijection on 64-bit values that spreads
/// every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Family (4 or 6) and the address as a 128-bit number.
fn address(ip: IpAddr) -> (u64, u128) {
    match ip {
        IpAddr::V4(a) => (4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (6, u128::from(a)),
    }
}

/// The 64-bit hash of one route (see the module doc for its definition).
pub fn route_hash(route: &Route) -> u64 {
    let (family, prefix) = address(route.destination.network());
    let prefix_len = match route.destination {
        IpNet::V4(n) => n.prefix_len(),
        IpNet::V6(n) => n.prefix_len(),
    };
    let nh = route.next_hop;
    let (nh_family, nh_address) = address(nh.target);
    let (kind, from, to) = match nh.kind {
        NextHopKind::Standard => (0u64, 0u64, 0u64),
        NextHopKind::Nat { from, to } => (1, u64::from(from), u64::from(to)),
        NextHopKind::LoadBalancerTarget => (2, 0, 0),
    };
    let words = [
        u64::from(route.vni.get()) | family << 32 | u64::from(prefix_len) << 40,
        (prefix >> 64) as u64,
        prefix as u64,
        nh_family,
        (nh_address >> 64) as u64,
        nh_address as u64,
        u64::from(nh.target_vni) | kind << 32,
        from | to << 16,
    ];
    words.iter().fold(SEED, |h, w| mix(h ^ w))
}

/// The digest of one VNI's route set: how many routes and the wrapping sum
/// of their hashes. Empty: zero routes, sum 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VniDigest {
    /// Routes in the set.
    routes: u64,
    /// Wrapping sum of `route_hash` over the set.
    sum: u64,
}

impl VniDigest {
    /// `route` entered the set (call once per route, when it enters).
    pub fn add(&mut self, route: &Route) {
        self.routes += 1;
        self.sum = self.sum.wrapping_add(route_hash(route));
    }

    /// `route` left the set (call once, when it leaves).
    pub fn remove(&mut self, route: &Route) {
        self.routes = self.routes.saturating_sub(1);
        self.sum = self.sum.wrapping_sub(route_hash(route));
    }

    /// The digest of a whole set, computed from scratch (tests, and the
    /// side of a comparison that holds a list rather than a table).
    pub fn of<'a>(routes: impl IntoIterator<Item = &'a Route>) -> VniDigest {
        let mut d = VniDigest::default();
        for r in routes {
            d.add(r);
        }
        d
    }

    /// A digest read back from its parts (a count and the sum, as
    /// `/api/v1/summary` shows them).
    pub fn from_parts(routes: u64, sum: u64) -> VniDigest {
        VniDigest { routes, sum }
    }

    /// Routes in the set.
    pub fn routes(&self) -> u64 {
        self.routes
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.routes == 0
    }
}

/// 16 lower-case hex digits of the sum, as the API and `diff` show it.
impl fmt::Display for VniDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NextHop, Vni};

    fn route(vni: u32, prefix: &str, hop: &str, kind: NextHopKind) -> Route {
        Route {
            vni: Vni::new(vni).unwrap(),
            destination: prefix.parse().unwrap(),
            next_hop: NextHop {
                target: hop.parse().unwrap(),
                target_vni: 0,
                kind,
            },
        }
    }

    /// The hash is a published definition: these values must never change
    /// (reflectors of different versions are compared by it).
    #[test]
    fn the_hash_of_a_route_is_pinned() {
        let r = route(23, "10.0.23.0/24", "2001:db8::1", NextHopKind::Standard);
        assert_eq!(route_hash(&r), PINNED[0]);
        let r = route(
            7,
            "2001:db8:7::/48",
            "2001:db8::2",
            NextHopKind::Nat {
                from: 1024,
                to: 2047,
            },
        );
        assert_eq!(route_hash(&r), PINNED[1]);
    }

    // Also computed by an independent Python rendering of the module doc.
    const PINNED: [u64; 2] = [6_029_403_611_058_898_719, 17_066_064_451_109_904_585];

    #[test]
    fn the_digest_ignores_order_and_tells_sets_apart() {
        let a = route(23, "10.0.0.0/24", "2001:db8::1", NextHopKind::Standard);
        let b = route(23, "10.0.1.0/24", "2001:db8::1", NextHopKind::Standard);
        let c = route(23, "10.0.0.0/24", "2001:db8::2", NextHopKind::Standard);
        let lb = route(
            23,
            "10.0.0.0/24",
            "2001:db8::1",
            NextHopKind::LoadBalancerTarget,
        );
        assert_eq!(VniDigest::of(&[a, b, c]), VniDigest::of(&[c, a, b]));
        let mut d = VniDigest::of(&[a, b, c]);
        d.remove(&b);
        assert_eq!(d, VniDigest::of(&[c, a]));
        d.remove(&a);
        d.remove(&c);
        assert_eq!(d, VniDigest::default());
        assert!(d.is_empty());
        for (x, y) in [(a, b), (a, c), (a, lb), (b, c)] {
            assert_ne!(VniDigest::of(&[x]), VniDigest::of(&[y]), "{x:?} vs {y:?}");
        }
        assert_eq!(VniDigest::of(&[a, b]).to_string().len(), 16);
    }
}
