//! Route messages (RTM_NEWROUTE / RTM_DELROUTE / RTM_GETROUTE) built with
//! netlink-packet-route.
//!
//! Owns: the shape of our kernel routes: protocol 254, unicast, universe
//! scope, table in RTA_TABLE (so tables above 255 work), next hops only by
//! reference to a nexthop object (RTA_NH_ID), which is the one form the
//! kernel accepts for both IPv4 and IPv6 destinations with encapsulated
//! device-only next hops. Also reading a route dump back.
//!
//! Must never: choose nexthop ids or talk to the socket.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{Parseable, NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
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

/// A kernel routing table id (1..=2^32-1; 254 is "main").
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RouteTable(pub u32);

impl std::fmt::Display for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn header(table: RouteTable, prefix: IpNet, scope: RouteScope, kind: RouteType) -> RouteHeader {
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

/// `ip route replace PREFIX table TABLE proto 254 nhid NHID`.
pub fn replace_route(table: RouteTable, prefix: IpNet, nhid: u32) -> Request {
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

/// `ip route del PREFIX table TABLE proto 254`: only ever matches our routes.
pub fn delete_route(table: RouteTable, prefix: IpNet) -> Request {
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

/// What we need to know about a route found in a dump.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DumpedRoute {
    /// Table from RTA_TABLE (or the header when absent).
    pub table: RouteTable,
    /// Destination prefix (default route when no RTA_DST).
    pub prefix: IpNet,
    /// Route protocol number.
    pub protocol: u8,
}

/// Parses one RTM_NEWROUTE payload of a dump; `None` for routes we can't
/// express (multicast families, MPLS, malformed).
pub fn parse_dumped(payload: &[u8]) -> Option<DumpedRoute> {
    let msg = RouteMessage::parse(payload).ok()?;
    let mut table = RouteTable(u32::from(msg.header.table));
    let mut dst: Option<IpAddr> = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = RouteTable(*t),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some((*a).into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some((*a).into()),
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
    Some(DumpedRoute {
        table,
        prefix: IpNet::new(addr, len).ok()?,
        protocol: u8::from(msg.header.protocol),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    #[test]
    fn replace_carries_table_attribute_protocol_and_nhid() {
        let req = replace_route(RouteTable(1000), "2001:db8:9::/64".parse().unwrap(), 10);
        assert_eq!(req.message_type, RTM_NEWROUTE);
        let msg = RouteMessage::parse(req.payload.as_slice()).unwrap();
        assert_eq!(msg.header.table, 0, "table > 255 lives only in RTA_TABLE");
        assert_eq!(u8::from(msg.header.protocol), 254);
        assert_eq!(msg.header.address_family, AddressFamily::Inet6);
        assert_eq!(msg.header.destination_prefix_length, 64);
        assert!(msg.attributes.contains(&RouteAttribute::Table(1000)));
        assert!(msg.attributes.contains(&RouteAttribute::NhId(10)));
        let parsed = parse_dumped(&req.payload).unwrap();
        assert_eq!(parsed.table, RouteTable(1000));
        assert_eq!(parsed.prefix, "2001:db8:9::/64".parse::<IpNet>().unwrap());
        assert_eq!(parsed.protocol, 254);
    }

    #[test]
    fn small_tables_also_go_in_the_header() {
        let req = delete_route(RouteTable(100), "10.0.23.0/24".parse().unwrap());
        let msg = RouteMessage::parse(req.payload.as_slice()).unwrap();
        assert_eq!(msg.header.table, 100);
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
        assert_eq!(req.message_type, RTM_DELROUTE);
        assert_eq!(dump_request().buffer_len(), 12);
    }
}
