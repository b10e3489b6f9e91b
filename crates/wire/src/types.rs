//! Domain types of MetalBond: what a route *is*, independent of the wire.
//!
//! Owns: `Vni`, `NextHop`/`NextHopKind`, `Route`, `Action` and the rules that
//! make a value valid (24-bit VNI, prefix with host bits cleared, NAT range
//! ordered). Every value of these types is valid by construction, so the rest
//! of the crate never re-checks.
//!
//! Must never: know about bytes, frames, sockets or the kernel. Conversion from
//! and to the protobuf schema lives in `codec::message`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

pub use ipnet::IpNet;

/// A VXLAN network identifier: 24 bits on the wire of every fleet we talk to.
///
/// Kept apart from `u32` so that a table id, a port or a count can never be
/// passed where a VNI is meant, and so the 24-bit rule is checked exactly once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI (2^24 - 1).
    pub const MAX: u32 = (1 << 24) - 1;

    /// Checks the 24-bit range. The error carries the refused value.
    pub fn new(value: u32) -> Result<Vni, VniOutOfRange> {
        if value <= Self::MAX {
            Ok(Vni(value))
        } else {
            Err(VniOutOfRange(value))
        }
    }

    /// The numeric value, for the wire and for display.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The VNI in the low 24 bits of `value`, upper bits ignored: for
    /// values already known valid (a VNI stored in a server's compact
    /// route key, always in range after the mask). Outside input goes
    /// through `Vni::new`.
    pub const fn from_low_bits(value: u32) -> Vni {
        Vni(value & Self::MAX)
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Vni {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("VNI '{s}' is not a number"))?;
        Vni::new(v).map_err(|e| e.to_string())
    }
}

/// A value above 2^24 - 1 was offered as a VNI.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("VNI {0} is out of range (at most {max})", max = Vni::MAX)]
pub struct VniOutOfRange(pub u32);

/// Add or withdraw; the verb of an UPDATE.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Action {
    /// The sender now announces the route.
    Add,
    /// The sender no longer announces the route.
    Remove,
}

/// What kind of target a next hop is. NAT carries its port range, which is
/// part of the route's identity (two NAT next hops to the same host with
/// different ranges are different routes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum NextHopKind {
    /// Plain overlay forwarding to a hypervisor.
    Standard,
    /// NAT gateway owning ports `from..=to` (`from <= to`, checked at the edge).
    Nat {
        /// First port of the range.
        from: u16,
        /// Last port of the range.
        to: u16,
    },
    /// One target behind a load balancer.
    LoadBalancerTarget,
}

/// The underlay side of a route: where encapsulated packets go.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct NextHop {
    /// Underlay address of the target (normally IPv6).
    pub target: IpAddr,
    /// VNI used on the target side (0 when not meaningful).
    pub target_vni: u32,
    /// Standard, NAT with its port range, or load-balancer target.
    pub kind: NextHopKind,
}

impl NextHop {
    /// A standard next hop to `target` with target VNI 0, the common case.
    pub fn standard(target: IpAddr) -> NextHop {
        NextHop {
            target,
            target_vni: 0,
            kind: NextHopKind::Standard,
        }
    }
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.target)?;
        if self.target_vni != 0 {
            write!(f, " vni {}", self.target_vni)?;
        }
        match self.kind {
            NextHopKind::Standard => Ok(()),
            NextHopKind::Nat { from, to } => write!(f, " nat {from}-{to}"),
            NextHopKind::LoadBalancerTarget => write!(f, " lb"),
        }
    }
}

/// One overlay route: in `vni`, packets for `destination` go to `next_hop`.
///
/// Equality covers all three parts: the same prefix through two next hops is
/// two routes (ECMP on the client side).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Route {
    /// The overlay network the route belongs to.
    pub vni: Vni,
    /// Destination prefix, host bits always cleared.
    pub destination: IpNet,
    /// Where matching packets are sent.
    pub next_hop: NextHop,
}

impl Route {
    /// Builds a route, clearing host bits of `destination` so equal networks
    /// compare equal however they were written.
    pub fn new(vni: Vni, destination: IpNet, next_hop: NextHop) -> Route {
        Route {
            vni,
            destination: destination.trunc(),
            next_hop,
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vni {} {} via {}",
            self.vni, self.destination, self.next_hop
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vni_range_is_24_bits() {
        assert_eq!(Vni::new(0).map(Vni::get), Ok(0));
        assert_eq!(Vni::new(Vni::MAX).map(Vni::get), Ok(16_777_215));
        assert_eq!(Vni::new(Vni::MAX + 1), Err(VniOutOfRange(16_777_216)));
        assert!("16777216".parse::<Vni>().is_err());
        assert!("x".parse::<Vni>().is_err());
        assert_eq!("23".parse::<Vni>().map(Vni::get), Ok(23));
    }

    #[test]
    fn route_clears_host_bits() {
        let nh = NextHop::standard("2001:db8::1".parse().unwrap());
        let a = Route::new(Vni(1), "10.0.23.7/24".parse().unwrap(), nh);
        let b = Route::new(Vni(1), "10.0.23.0/24".parse().unwrap(), nh);
        assert_eq!(a, b);
        assert_eq!(a.destination.to_string(), "10.0.23.0/24");
    }
}
