//! Route messages (RTM_NEWROUTE / RTM_DELROUTE / RTM_GETROUTE) built with
//! netlink-packet-route.
//!
//! Owns: the shape of our kernel routes. Every route is protocol 254,
//! unicast, universe scope, table in RTA_TABLE (so tables above 255 work).
//! IPv4 routes take the Go client's form byte for byte where it matters:
//! RTA_MULTIPATH with one `rtnexthop` per next hop (out of the tunnel
//! device, `RTA_ENCAP_TYPE` ip6 + `RTA_ENCAP` {id 0, dst, src ::, hoplimit
//! 0}), also for a single next hop, so a mixed fleet shows the same
//! `ip route` output and the Go client's start-up cleanup can delete them.
//! IPv6 routes reference a nexthop object (RTA_NH_ID): the kernel refuses
//! device-only IPv6 next hops through the multipath API. Also reading a
//! route dump back (table, prefix, protocol, and the next hops in either
//! form).
//!
//! Must never: choose nexthop ids or talk to the socket.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_core::{DefaultNla, Nla, Parseable, NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteIp6Tunnel, RouteLwEnCapType,
    RouteLwTunnelEncap, RouteMessage, RouteNextHop, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;

use super::socket::Request;

/// `RTM_NEWROUTE`.
pub const RTM_NEWROUTE: u16 = 24;
/// `RTM_DELROUTE`.
pub const RTM_DELROUTE: u16 = 25;
/// `RTM_GETROUTE`.
pub const RTM_GETROUTE: u16 = 26;

/// The route protocol number that marks a route (and nexthop object) as ours.
pub const PROTOCOL_METALBOND: u8 = 254;

/// `LWTUNNEL_IP6_DST`: the outer destination inside a nested `RTA_ENCAP`.
const LWTUNNEL_IP6_DST: u16 = 2;

/// A kernel routing table id (1..=2^32-1; 254 is "main"). Named for the
/// kernel's table so it is not mistaken for a set of routes (the status
/// pages' `RouteTableView`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KernelTable(pub u32);

impl KernelTable {
    /// The main table (`ip route` without `table`).
    pub const MAIN: KernelTable = KernelTable(254);

    /// The table a user's `VNI#TABLE` means: 0 is the main table, as for
    /// the Go client (its netlink library leaves table 0 as "main").
    pub fn from_user(table: u32) -> KernelTable {
        if table == 0 {
            KernelTable::MAIN
        } else {
            KernelTable(table)
        }
    }
}

impl std::fmt::Display for KernelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn header(table: KernelTable, prefix: IpNet, scope: RouteScope, kind: RouteType) -> RouteHeader {
    RouteHeader {
        address_family: match prefix {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        },
        destination_prefix_length: prefix.prefix_len(),
        // Tables above 255 only fit RTA_TABLE; the header then says "unspec".
        table: u8::try_from(table.0).unwrap_or(RouteHeader::RT_TABLE_UNSPEC),
        protocol: RouteProtocol::from(PROTOCOL_METALBOND),
        scope,
        kind,
        ..RouteHeader::default()
    }
}

fn message(header: RouteHeader, attributes: Vec<RouteAttribute>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = header;
    msg.attributes = attributes;
    msg
}

/// `ip route replace PREFIX table TABLE proto 254 nhid NHID` (IPv6 routes).
pub fn replace_nhid_route(table: KernelTable, prefix: IpNet, nhid: u32) -> Request {
    let msg = message(
        header(table, prefix, RouteScope::Universe, RouteType::Unicast),
        vec![
            RouteAttribute::Table(table.0),
            RouteAttribute::Destination(RouteAddress::from(prefix.network())),
            RouteAttribute::NhId(nhid),
        ],
    );
    Request::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &msg)
}

/// Next hops one IPv4 multipath route carries at most (see
/// `replace_multipath_route`).
pub const MAX_MULTIPATH_NEXT_HOPS: usize = 512;

/// `ip route replace PREFIX table TABLE proto 254 nexthop encap ip6 dst A
/// dev OIF [nexthop ...]` (IPv4 routes), as the Go client sends it: one
/// `rtnexthop` per address even when there is only one, each with the
/// encapsulation vishvananda/netlink's `IP6tnlEncap` writes (id 0, dst,
/// src ::, hoplimit 0; no `NLA_F_NESTED`).
///
/// At most `MAX_MULTIPATH_NEXT_HOPS` next hops are sent (the first ones in
/// the caller's stable order): RTA_MULTIPATH has a 16-bit length, which
/// about 780 of these next hops would overflow.
pub fn replace_multipath_route(
    table: KernelTable,
    prefix: IpNet,
    oif: u32,
    next_hops: &[Ipv6Addr],
) -> Request {
    if next_hops.len() > MAX_MULTIPATH_NEXT_HOPS {
        tracing::warn!(
            %prefix,
            next_hops = next_hops.len(),
            max = MAX_MULTIPATH_NEXT_HOPS,
            "too many next hops for one IPv4 route; installing the first ones only"
        );
    }
    let hops = next_hops
        .iter()
        .take(MAX_MULTIPATH_NEXT_HOPS)
        .map(|dst| {
            let mut hop = RouteNextHop::default();
            hop.interface_index = oif;
            hop.attributes = vec![
                RouteAttribute::EncapType(RouteLwEnCapType::Ip6),
                RouteAttribute::Encap(vec![
                    RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Id(0)),
                    RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Destination(*dst)),
                    RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Source(Ipv6Addr::UNSPECIFIED)),
                    RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Hoplimit(0)),
                ]),
            ];
            hop
        })
        .collect();
    let msg = message(
        header(table, prefix, RouteScope::Universe, RouteType::Unicast),
        vec![
            RouteAttribute::Table(table.0),
            RouteAttribute::Destination(RouteAddress::from(prefix.network())),
            RouteAttribute::MultiPath(hops),
        ],
    );
    Request::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &msg)
}

/// `ip route del PREFIX table TABLE proto 254`: only ever matches a
/// protocol-254 route, whatever its next hops (nhid, multipath or plain).
pub fn delete_route(table: KernelTable, prefix: IpNet) -> Request {
    let msg = message(
        header(table, prefix, RouteScope::NoWhere, RouteType::Unspec),
        vec![
            RouteAttribute::Table(table.0),
            RouteAttribute::Destination(RouteAddress::from(prefix.network())),
        ],
    );
    Request::new(RTM_DELROUTE, 0, &msg)
}

/// The body of a dump request for all routes of both families.
pub fn dump_request() -> RouteMessage {
    RouteMessage::default()
}

/// One next hop spelled out in a dumped route.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct InlineNextHop {
    /// Device the next hop leaves through (0 when the kernel gave none).
    pub oif: u32,
    /// `encap ip6 dst`, when the next hop is ip6-encapsulated.
    pub encap_dst: Option<Ipv6Addr>,
}

/// How a dumped route names its next hops: what the read-back compares
/// with what we installed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum KernelNextHops {
    /// RTA_NH_ID: a nexthop object (our IPv6 form, or an earlier version's
    /// IPv4 form).
    Object(u32),
    /// RTA_MULTIPATH, or RTA_OIF + RTA_ENCAP for one next hop (our IPv4
    /// form and the Go client's), in kernel order.
    Inline(Vec<InlineNextHop>),
}

/// What we need to know about a route found in a dump.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DumpedRoute {
    /// Table from RTA_TABLE (or the header when absent).
    pub table: KernelTable,
    /// Destination prefix (default route when no RTA_DST).
    pub prefix: IpNet,
    /// Route protocol number.
    pub protocol: u8,
    /// Its next hops.
    pub next_hops: KernelNextHops,
}

/// The `encap ip6 dst` inside an `RTA_ENCAP`. netlink-packet-route decodes
/// a top-level encapsulation by its type, but inside an `rtnexthop` it has
/// no type to go by and leaves the nested attributes raw.
fn encap_dst(encap: &[RouteLwTunnelEncap]) -> Option<Ipv6Addr> {
    encap.iter().find_map(|e| match e {
        RouteLwTunnelEncap::Ip6(RouteIp6Tunnel::Destination(a)) => Some(*a),
        RouteLwTunnelEncap::Other(nla) => raw_ip6_dst(nla),
        _ => None,
    })
}

fn raw_ip6_dst(nla: &DefaultNla) -> Option<Ipv6Addr> {
    if nla.kind() != LWTUNNEL_IP6_DST || nla.value_len() != 16 {
        return None;
    }
    let mut octets = [0u8; 16];
    nla.emit_value(&mut octets);
    Some(Ipv6Addr::from(octets))
}

/// Parses one RTM_NEWROUTE payload of a dump; `None` for routes we can't
/// express (multicast families, MPLS, malformed).
pub fn parse_dumped(payload: &[u8]) -> Option<DumpedRoute> {
    let msg = RouteMessage::parse(payload).ok()?;
    let mut table = KernelTable(u32::from(msg.header.table));
    let mut dst: Option<IpAddr> = None;
    let mut nhid = None;
    let mut oif = 0;
    let mut top_encap = None;
    let mut multipath = Vec::new();
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = KernelTable(*t),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
            RouteAttribute::NhId(id) => nhid = Some(*id),
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::Encap(e) => top_encap = encap_dst(e),
            RouteAttribute::MultiPath(hops) => {
                multipath = hops
                    .iter()
                    .map(|h| InlineNextHop {
                        oif: h.interface_index,
                        encap_dst: h.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Encap(e) => encap_dst(e),
                            _ => None,
                        }),
                    })
                    .collect()
            }
            _ => {}
        }
    }
    let len = msg.header.destination_prefix_length;
    let addr = match (msg.header.address_family, dst) {
        (_, Some(a)) => a,
        (AddressFamily::Inet, None) => IpAddr::from([0u8; 4]),
        (AddressFamily::Inet6, None) => IpAddr::from([0u16; 8]),
        _ => return None,
    };
    let next_hops = match nhid {
        Some(id) => KernelNextHops::Object(id),
        None if multipath.is_empty() => KernelNextHops::Inline(vec![InlineNextHop {
            oif,
            encap_dst: top_encap,
        }]),
        None => KernelNextHops::Inline(multipath),
    };
    Some(DumpedRoute {
        table,
        prefix: IpNet::new(addr, len).ok()?,
        protocol: u8::from(msg.header.protocol),
        next_hops,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    #[test]
    fn replace_carries_table_attribute_protocol_and_nhid() {
        let req = replace_nhid_route(KernelTable(1000), "2001:db8:9::/64".parse().unwrap(), 10);
        assert_eq!(req.message_type, RTM_NEWROUTE);
        let msg = RouteMessage::parse(req.payload.as_slice()).unwrap();
        assert_eq!(msg.header.table, 0, "table > 255 lives only in RTA_TABLE");
        assert_eq!(u8::from(msg.header.protocol), 254);
        assert_eq!(msg.header.address_family, AddressFamily::Inet6);
        assert_eq!(msg.header.destination_prefix_length, 64);
        assert!(msg.attributes.contains(&RouteAttribute::Table(1000)));
        assert!(msg.attributes.contains(&RouteAttribute::NhId(10)));
        let parsed = parse_dumped(&req.payload).unwrap();
        assert_eq!(parsed.table, KernelTable(1000));
        assert_eq!(parsed.prefix, "2001:db8:9::/64".parse::<IpNet>().unwrap());
        assert_eq!(parsed.protocol, 254);
        assert_eq!(parsed.next_hops, KernelNextHops::Object(10));
    }

    #[test]
    fn ipv4_form_is_multipath_with_ip6_encap_also_for_one_next_hop() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8::2".parse().unwrap();
        for hops in [vec![a], vec![a, b]] {
            let req = replace_multipath_route(
                KernelTable(100),
                "10.0.23.0/24".parse().unwrap(),
                7,
                &hops,
            );
            let msg = RouteMessage::parse(req.payload.as_slice()).unwrap();
            assert_eq!(msg.header.table, 100);
            assert_eq!(msg.header.scope, RouteScope::Universe);
            assert_eq!(msg.header.kind, RouteType::Unicast);
            assert!(!msg
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::NhId(_) | RouteAttribute::Oif(_))));
            let parsed = parse_dumped(&req.payload).unwrap();
            let want: Vec<InlineNextHop> = hops
                .iter()
                .map(|d| InlineNextHop {
                    oif: 7,
                    encap_dst: Some(*d),
                })
                .collect();
            assert_eq!(parsed.next_hops, KernelNextHops::Inline(want));
        }
    }

    #[test]
    fn table_zero_from_the_user_is_main() {
        assert_eq!(KernelTable::from_user(0), KernelTable::MAIN);
        assert_eq!(KernelTable::from_user(100), KernelTable(100));
    }

    #[test]
    fn small_tables_also_go_in_the_header() {
        let req = delete_route(KernelTable(100), "10.0.23.0/24".parse().unwrap());
        let msg = RouteMessage::parse(req.payload.as_slice()).unwrap();
        assert_eq!(msg.header.table, 100);
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
        assert_eq!(req.message_type, RTM_DELROUTE);
        assert_eq!(dump_request().buffer_len(), 12);
    }
}
