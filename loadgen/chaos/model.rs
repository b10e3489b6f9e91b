//! What every hypervisor's kernel must hold: the fleet's announcements and
//! the reflector and client rules of PROTOCOL.md applied to them.
//!
//! Owns: the layout (who subscribes to which VNI, who announces which
//! prefix: each hypervisor its own VMs in two VNIs, the first twelve also a
//! shared IPv4 and IPv6 destination per VNI, so those are ECMP routes with
//! three next hops; each flapper fifty routes in one VNI, withdrawn and
//! re-announced at once when it flaps), and `expected`: per hypervisor and
//! VNI (kernel table = VNI), each destination with its next hops and who
//! announces each — a destination the hypervisor announces itself is not
//! installed (loop prevention), only IPv6 next hops are.
//!
//! Must never: look at a kernel or a process; it is the model, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv6Addr;

use ipnet::IpNet;

/// Who announces a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Announcer {
    /// Hypervisor `h`'s client.
    Hypervisor(usize),
    /// Flapping announcer `f`.
    Flapper(usize),
}

impl std::fmt::Display for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Announcer::Hypervisor(h) => write!(f, "h{h}"),
            Announcer::Flapper(n) => write!(f, "f{n}"),
        }
    }
}

/// One announced route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub by: Announcer,
    pub vni: u32,
    pub prefix: IpNet,
    /// The announcer's own underlay address (the policy says `self`).
    pub next_hop: Ipv6Addr,
}

/// The fleet's shape and who announces what.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub reflectors: usize,
    pub hypervisors: usize,
    pub flappers: usize,
    /// VNIs used: `FIRST_VNI ..`.
    pub vnis: u32,
}

/// The first VNI; the kernel table of a VNI is its number.
const FIRST_VNI: u32 = 100;
/// Hypervisors announcing each VNI's shared destinations (ECMP).
const ECMP_ANNOUNCERS: usize = 12;
/// Routes of one flapper.
pub const FLAPPER_ROUTES: u32 = 50;

/// A kernel table as the model and the checker see it: (VNI, destination)
/// → next hop → who announces it.
pub type Expected = BTreeMap<(u32, IpNet), BTreeMap<Ipv6Addr, BTreeSet<Announcer>>>;

fn net(text: String) -> IpNet {
    text.parse()
        .unwrap_or_else(|e| panic!("model prefix {text}: {e}"))
}

impl Layout {
    /// The VNIs, lowest and highest.
    pub fn vni_range(&self) -> (u32, u32) {
        (FIRST_VNI, FIRST_VNI + self.vnis - 1)
    }

    /// The two VNIs hypervisor `h` subscribes to (and installs).
    pub fn subscriptions(&self, h: usize) -> Vec<u32> {
        let a = FIRST_VNI + (h as u32 % self.vnis);
        let b = FIRST_VNI + ((h as u32 + 1) % self.vnis);
        if a == b {
            vec![a]
        } else {
            vec![a, b]
        }
    }

    /// What `by` announces, with `addr` as next hop.
    pub fn announcements_of(&self, by: Announcer, addr: Ipv6Addr) -> Vec<Announcement> {
        let a = |vni: u32, prefix: IpNet| Announcement {
            by,
            vni,
            prefix,
            next_hop: addr,
        };
        match by {
            Announcer::Hypervisor(h) => {
                let subs = self.subscriptions(h);
                let first = subs[0];
                let mut out = vec![
                    a(first, net(format!("10.{}.{h}.0/24", first - FIRST_VNI))),
                    a(first, net(format!("2001:db8:{first:x}:{h:x}::/64"))),
                ];
                if let Some(second) = subs.get(1) {
                    out.push(a(
                        *second,
                        net(format!("10.{}.{}.0/24", second - FIRST_VNI, 100 + h)),
                    ));
                }
                if h < ECMP_ANNOUNCERS {
                    out.push(a(first, net(format!("192.168.{}.0/24", first - FIRST_VNI))));
                    out.push(a(first, net(format!("2001:db8:{first:x}:ffff::/64"))));
                }
                out
            }
            Announcer::Flapper(f) => {
                let vni = FIRST_VNI + (f as u32 % self.vnis);
                (0..FLAPPER_ROUTES)
                    .map(|i| a(vni, net(format!("10.{}.{i}.0/24", 200 + f))))
                    .collect()
            }
        }
    }

    /// What hypervisor `h`'s kernel must hold when every announcer in
    /// `all` is up (`all` = every announcement of the fleet).
    pub fn expected(&self, h: usize, all: &[Announcement]) -> Expected {
        let subs = self.subscriptions(h);
        let me = Announcer::Hypervisor(h);
        let own: BTreeSet<(u32, IpNet)> = all
            .iter()
            .filter(|a| a.by == me)
            .map(|a| (a.vni, a.prefix))
            .collect();
        let mut out = Expected::new();
        for a in all {
            if a.by == me || !subs.contains(&a.vni) || own.contains(&(a.vni, a.prefix)) {
                continue;
            }
            out.entry((a.vni, a.prefix))
                .or_default()
                .entry(a.next_hop)
                .or_default()
                .insert(a.by);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            reflectors: 3,
            hypervisors: 24,
            flappers: 2,
            vnis: 4,
        }
    }

    fn addr(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, n, 0, 0, 0, 2)
    }

    fn fleet(l: &Layout) -> Vec<Announcement> {
        let mut all = Vec::new();
        for h in 0..l.hypervisors {
            all.extend(l.announcements_of(Announcer::Hypervisor(h), addr(h as u16 + 10)));
        }
        for f in 0..l.flappers {
            all.extend(l.announcements_of(Announcer::Flapper(f), addr(f as u16 + 100)));
        }
        all
    }

    #[test]
    fn shared_destinations_are_ecmp_and_own_ones_are_not_installed() {
        let l = layout();
        let all = fleet(&l);
        // h20 subscribes 100 and 101 and announces no shared destination.
        let e = l.expected(20, &all);
        let shared = e
            .get(&(100, "192.168.0.0/24".parse().unwrap()))
            .expect("the ECMP route");
        assert_eq!(shared.len(), 3, "{shared:?}");
        assert!(
            e.contains_key(&(100, "10.200.7.0/24".parse().unwrap())),
            "f0's routes"
        );
        assert!(e.keys().all(|(v, _)| *v == 100 || *v == 101));
        assert!(
            !e.contains_key(&(100, "10.0.20.0/24".parse().unwrap())),
            "its own"
        );
        // h0 announces the shared destination itself: not installed there.
        let e0 = l.expected(0, &all);
        assert!(!e0.contains_key(&(100, "192.168.0.0/24".parse().unwrap())));
        assert!(
            e0.contains_key(&(100, "10.0.4.0/24".parse().unwrap())),
            "h4's VM"
        );
    }
}
