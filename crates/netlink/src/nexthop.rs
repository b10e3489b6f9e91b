//! Nexthop-object messages (RTM_NEWNEXTHOP / RTM_DELNEXTHOP / RTM_GETNEXTHOP),
//! written against the kernel's uapi (`linux/nexthop.h`, `linux/lwtunnel.h`)
//! because netlink-packet-route has no nexthop-object message.
//!
//! Owns: the `nhmsg` header layout, the `NHA_*` attributes we use (id, group,
//! oif, encap type, encap) and the nested `LWTUNNEL_IP6_*` encap attributes;
//! emitting them as a netlink payload and parsing the kernel's dump replies.
//!
//! Must never: open sockets or decide which objects exist; `state` decides,
//! `socket` sends. Unknown attributes in a dump are kept raw, never an error.
//! Walking the received attributes is `walk`'s (netlink-packet-core buffers).
//!
//! ```text
//! struct nhmsg { u8 family; u8 scope; u8 protocol; u8 resvd; u32 flags; }   8 bytes
//! struct nexthop_grp { u32 id; u8 weight; u8 weight_high; u16 resvd2; }     8 bytes
//! attribute: u16 len (header + data, unpadded); u16 type; data; pad to 4
//! ```

use std::net::Ipv6Addr;

use netlink_packet_core::Emitable;

use super::walk;

/// Netlink message type: create or replace a nexthop object.
pub const RTM_NEWNEXTHOP: u16 = 104;
/// Netlink message type: delete a nexthop object.
pub const RTM_DELNEXTHOP: u16 = 105;
/// Netlink message type: get (dump) nexthop objects.
pub const RTM_GETNEXTHOP: u16 = 106;

/// u32: the object's id.
pub const NHA_ID: u16 = 1;
/// Array of `nexthop_grp`: the members of a group.
pub const NHA_GROUP: u16 = 2;
/// u32: output device index.
pub const NHA_OIF: u16 = 5;
/// u16: lightweight-tunnel encapsulation type.
pub const NHA_ENCAP_TYPE: u16 = 7;
/// Nested: encapsulation parameters.
pub const NHA_ENCAP: u16 = 8;

/// `LWTUNNEL_ENCAP_IP6`: encapsulate in an outer IPv6 header.
pub const LWTUNNEL_ENCAP_IP6: u16 = 4;
/// Nested attribute of an ip6 encap: outer destination address.
pub const LWTUNNEL_IP6_DST: u16 = 2;
/// Marks an attribute as nested (set by iproute2 too; the kernel accepts both).
pub const NLA_F_NESTED: u16 = 0x8000;

/// Size of `struct nhmsg`.
pub const NHMSG_LEN: usize = 8;
/// Size of `struct nexthop_grp`.
pub const NEXTHOP_GRP_LEN: usize = 8;

/// `AF_UNSPEC`, used for groups, deletes and dumps.
pub const AF_UNSPEC: u8 = 0;
/// `AF_INET`: nexthop objects usable by IPv4 routes.
pub const AF_INET: u8 = 2;
/// `AF_INET6`: nexthop objects usable by IPv6 routes.
pub const AF_INET6: u8 = 10;

/// The fixed part of every nexthop message (`struct nhmsg`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct NexthopHeader {
    /// Address family the object serves (AF_INET / AF_INET6), AF_UNSPEC for
    /// groups, deletes and dumps.
    pub family: u8,
    /// Scope, filled in by the kernel on dumps.
    pub scope: u8,
    /// Routing protocol that owns the object (254 for ours), so a restart
    /// can find and delete what an earlier run left behind.
    pub protocol: u8,
    /// RTNH_F_* flags.
    pub flags: u32,
}

/// One member of a multipath group (`struct nexthop_grp`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NexthopGroupMember {
    /// Id of an existing nexthop object.
    pub id: u32,
    /// Weight minus one, as the kernel stores it (0 = weight 1).
    pub weight: u8,
}

/// The attributes we write or need to read back.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum NexthopAttribute {
    /// NHA_ID: the object's id (we always choose it; 0 would mean "kernel picks").
    Id(u32),
    /// NHA_GROUP: members of a multipath group.
    Group(Vec<NexthopGroupMember>),
    /// NHA_OIF: device index packets leave through.
    Oif(u32),
    /// NHA_ENCAP_TYPE + NHA_ENCAP{LWTUNNEL_IP6_DST}: `encap ip6 dst ADDR`.
    /// Emitted as the two kernel attributes; parsed back from them.
    EncapIp6Dst(Ipv6Addr),
    /// Anything else seen in a dump: (type without flags, raw data).
    Other(u16, Vec<u8>),
}

/// A whole nexthop message payload: `nhmsg` followed by attributes.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct NexthopMessage {
    /// The fixed header.
    pub header: NexthopHeader,
    /// Attributes in emit order.
    pub attributes: Vec<NexthopAttribute>,
}

/// A nexthop dump reply that could not be parsed.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("malformed nexthop message: {0}")]
pub struct NexthopParseError(pub &'static str);

impl NexthopMessage {
    /// `ip [-6] nexthop add id ID encap ip6 dst DST dev OIF proto PROTOCOL`.
    pub fn encap_ip6(family: u8, id: u32, oif: u32, dst: Ipv6Addr, protocol: u8) -> Self {
        NexthopMessage {
            header: NexthopHeader {
                family,
                protocol,
                ..NexthopHeader::default()
            },
            attributes: vec![
                NexthopAttribute::Id(id),
                NexthopAttribute::EncapIp6Dst(dst),
                NexthopAttribute::Oif(oif),
            ],
        }
    }

    /// `ip nexthop add id ID group A/B/... proto PROTOCOL` (equal weights).
    pub fn group(id: u32, members: &[u32], protocol: u8) -> Self {
        NexthopMessage {
            header: NexthopHeader {
                family: AF_UNSPEC,
                protocol,
                ..NexthopHeader::default()
            },
            attributes: vec![
                NexthopAttribute::Id(id),
                NexthopAttribute::Group(
                    members
                        .iter()
                        .map(|&id| NexthopGroupMember { id, weight: 0 })
                        .collect(),
                ),
            ],
        }
    }

    /// `ip nexthop del id ID`.
    pub fn delete(id: u32) -> Self {
        NexthopMessage {
            header: NexthopHeader::default(),
            attributes: vec![NexthopAttribute::Id(id)],
        }
    }

    /// The body of a dump request for every nexthop object.
    pub fn dump() -> Self {
        NexthopMessage::default()
    }

    /// The object's id, if the message carries one.
    pub fn id(&self) -> Option<u32> {
        self.attributes.iter().find_map(|a| match a {
            NexthopAttribute::Id(id) => Some(*id),
            _ => None,
        })
    }

    /// Is this a group object?
    pub fn is_group(&self) -> bool {
        self.attributes
            .iter()
            .any(|a| matches!(a, NexthopAttribute::Group(_)))
    }

    /// Parses a payload (after the netlink header) from the kernel.
    pub fn parse(payload: &[u8]) -> Result<Self, NexthopParseError> {
        if payload.len() < NHMSG_LEN {
            return Err(NexthopParseError("shorter than nhmsg"));
        }
        let header = NexthopHeader {
            family: payload[0],
            scope: payload[1],
            protocol: payload[2],
            flags: u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]),
        };
        let mut attributes = Vec::new();
        let mut encap_type = None;
        let mut encap_dst = None;
        for attribute in walk::attributes(&payload[NHMSG_LEN..]) {
            let attribute =
                attribute.map_err(|_| NexthopParseError("attribute length out of bounds"))?;
            let data = attribute.value();
            match attribute.kind() {
                NHA_ID => attributes.push(NexthopAttribute::Id(u32_of(data)?)),
                NHA_OIF => attributes.push(NexthopAttribute::Oif(u32_of(data)?)),
                NHA_GROUP => {
                    if data.len() % NEXTHOP_GRP_LEN != 0 {
                        return Err(NexthopParseError("group not a multiple of 8 bytes"));
                    }
                    let members = data
                        .chunks_exact(NEXTHOP_GRP_LEN)
                        .map(|c| NexthopGroupMember {
                            id: u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
                            weight: c[4],
                        })
                        .collect();
                    attributes.push(NexthopAttribute::Group(members));
                }
                NHA_ENCAP_TYPE if data.len() >= 2 => {
                    encap_type = Some(u16::from_ne_bytes([data[0], data[1]]));
                }
                NHA_ENCAP => encap_dst = parse_ip6_dst(data),
                other => attributes.push(NexthopAttribute::Other(other, data.to_vec())),
            }
        }
        if let (Some(LWTUNNEL_ENCAP_IP6), Some(dst)) = (encap_type, encap_dst) {
            attributes.push(NexthopAttribute::EncapIp6Dst(dst));
        }
        Ok(NexthopMessage { header, attributes })
    }
}

fn u32_of(data: &[u8]) -> Result<u32, NexthopParseError> {
    match data {
        [a, b, c, d, ..] => Ok(u32::from_ne_bytes([*a, *b, *c, *d])),
        _ => Err(NexthopParseError("u32 attribute shorter than 4 bytes")),
    }
}

/// Finds LWTUNNEL_IP6_DST inside a nested NHA_ENCAP; `None` when absent or
/// when a malformed attribute comes first.
fn parse_ip6_dst(nested: &[u8]) -> Option<Ipv6Addr> {
    walk::attributes(nested)
        .map_while(Result::ok)
        .find(|a| a.kind() == LWTUNNEL_IP6_DST && a.value().len() == 16)
        .map(|a| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(a.value());
            Ipv6Addr::from(octets)
        })
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Writes one attribute header + data (+ padding) at the start of `buf`,
/// returns the bytes used.
fn put_attr(buf: &mut [u8], kind: u16, data: &[u8]) -> usize {
    let len = 4 + data.len();
    buf[0..2].copy_from_slice(&(len as u16).to_ne_bytes());
    buf[2..4].copy_from_slice(&kind.to_ne_bytes());
    buf[4..len].copy_from_slice(data);
    let padded = align4(len);
    buf[len..padded].fill(0);
    padded
}

impl NexthopAttribute {
    fn wire_len(&self) -> usize {
        match self {
            NexthopAttribute::Id(_) | NexthopAttribute::Oif(_) => 8,
            NexthopAttribute::Group(m) => 4 + m.len() * NEXTHOP_GRP_LEN,
            // NHA_ENCAP_TYPE (4 + 2, padded to 8) + NHA_ENCAP (4 + [4 + 16]).
            NexthopAttribute::EncapIp6Dst(_) => 8 + 24,
            NexthopAttribute::Other(_, d) => align4(4 + d.len()),
        }
    }

    fn emit_into(&self, buf: &mut [u8]) -> usize {
        match self {
            NexthopAttribute::Id(id) => put_attr(buf, NHA_ID, &id.to_ne_bytes()),
            NexthopAttribute::Oif(oif) => put_attr(buf, NHA_OIF, &oif.to_ne_bytes()),
            NexthopAttribute::Group(members) => {
                let mut data = Vec::with_capacity(members.len() * NEXTHOP_GRP_LEN);
                for m in members {
                    data.extend_from_slice(&m.id.to_ne_bytes());
                    data.extend_from_slice(&[m.weight, 0, 0, 0]);
                }
                put_attr(buf, NHA_GROUP, &data)
            }
            NexthopAttribute::EncapIp6Dst(dst) => {
                let used = put_attr(buf, NHA_ENCAP_TYPE, &LWTUNNEL_ENCAP_IP6.to_ne_bytes());
                let mut nested = [0u8; 20];
                put_attr(&mut nested, LWTUNNEL_IP6_DST, &dst.octets());
                used + put_attr(&mut buf[used..], NHA_ENCAP | NLA_F_NESTED, &nested)
            }
            NexthopAttribute::Other(kind, data) => put_attr(buf, *kind, data),
        }
    }
}

impl Emitable for NexthopMessage {
    fn buffer_len(&self) -> usize {
        NHMSG_LEN
            + self
                .attributes
                .iter()
                .map(NexthopAttribute::wire_len)
                .sum::<usize>()
    }

    fn emit(&self, buffer: &mut [u8]) {
        let h = &self.header;
        buffer[0] = h.family;
        buffer[1] = h.scope;
        buffer[2] = h.protocol;
        buffer[3] = 0;
        buffer[4..8].copy_from_slice(&h.flags.to_ne_bytes());
        let mut at = NHMSG_LEN;
        for attr in &self.attributes {
            at += attr.emit_into(&mut buffer[at..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(msg: &NexthopMessage) -> Vec<u8> {
        let mut buf = vec![0xAA; msg.buffer_len()];
        msg.emit(&mut buf);
        buf
    }

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn encap_nexthop_bytes_follow_the_uapi_layout() {
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let msg = NexthopMessage::encap_ip6(AF_INET6, 7, 3, dst, 254);
        let mut want = vec![AF_INET6, 0, 254, 0, 0, 0, 0, 0];
        // NHA_ID = 7
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(NHA_ID));
        want.extend_from_slice(&ne32(7));
        // NHA_ENCAP_TYPE = LWTUNNEL_ENCAP_IP6, padded to 8
        want.extend_from_slice(&ne16(6));
        want.extend_from_slice(&ne16(NHA_ENCAP_TYPE));
        want.extend_from_slice(&ne16(4));
        want.extend_from_slice(&[0, 0]);
        // NHA_ENCAP (nested) { LWTUNNEL_IP6_DST = 2001:db8::1 }
        want.extend_from_slice(&ne16(24));
        want.extend_from_slice(&ne16(NHA_ENCAP | 0x8000));
        want.extend_from_slice(&ne16(20));
        want.extend_from_slice(&ne16(2));
        want.extend_from_slice(&dst.octets());
        // NHA_OIF = 3
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(NHA_OIF));
        want.extend_from_slice(&ne32(3));
        assert_eq!(bytes(&msg), want);
        assert_eq!(msg.buffer_len(), want.len());
    }

    #[test]
    fn group_bytes_list_members_with_weight_one() {
        let msg = NexthopMessage::group(10, &[1, 2], 254);
        let mut want = vec![AF_UNSPEC, 0, 254, 0, 0, 0, 0, 0];
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(NHA_ID));
        want.extend_from_slice(&ne32(10));
        want.extend_from_slice(&ne16(4 + 16));
        want.extend_from_slice(&ne16(NHA_GROUP));
        want.extend_from_slice(&ne32(1));
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&ne32(2));
        want.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(bytes(&msg), want);
    }

    #[test]
    fn delete_and_dump_bytes() {
        let mut want = vec![0u8; 8];
        assert_eq!(bytes(&NexthopMessage::dump()), want);
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(NHA_ID));
        want.extend_from_slice(&ne32(42));
        assert_eq!(bytes(&NexthopMessage::delete(42)), want);
    }

    #[test]
    fn parse_reads_back_what_emit_wrote() {
        let dst: Ipv6Addr = "2001:db8::9".parse().unwrap();
        for msg in [
            NexthopMessage::encap_ip6(AF_INET, 5, 9, dst, 254),
            NexthopMessage::group(11, &[5, 6, 7], 254),
            NexthopMessage::delete(3),
        ] {
            let parsed = NexthopMessage::parse(&bytes(&msg)).unwrap();
            let mut want = msg.clone();
            // Parse reports the encap last (it is assembled from two attributes).
            want.attributes
                .sort_by_key(|a| matches!(a, NexthopAttribute::EncapIp6Dst(_)));
            assert_eq!(parsed, want);
        }
        let g = NexthopMessage::parse(&bytes(&NexthopMessage::group(11, &[5], 254))).unwrap();
        assert!(g.is_group());
        assert_eq!(g.id(), Some(11));
        assert_eq!(g.header.protocol, 254);
    }

    #[test]
    fn parse_refuses_truncated_input_without_panicking() {
        assert!(NexthopMessage::parse(&[0; 4]).is_err());
        let mut b = bytes(&NexthopMessage::delete(3));
        b[8] = 200; // attribute length beyond the buffer
        assert!(NexthopMessage::parse(&b).is_err());
        let mut b = bytes(&NexthopMessage::delete(3));
        b.truncate(10);
        // A dangling partial attribute header is ignored, not read past.
        assert!(NexthopMessage::parse(&b).is_ok());
        let unknown = {
            let mut v = vec![0u8; 8];
            v.extend_from_slice(&ne16(5));
            v.extend_from_slice(&ne16(99));
            v.extend_from_slice(&[1, 0, 0, 0]);
            v
        };
        assert_eq!(
            NexthopMessage::parse(&unknown).unwrap().attributes,
            vec![NexthopAttribute::Other(99, vec![1])]
        );
    }
}
