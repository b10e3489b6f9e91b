//! The five MetalBond messages as domain values, and their payload encoding.
//!
//! Owns: `Message`, the mapping between protobuf payloads and domain types, and
//! every validation rule of PROTOCOL.md "Validation we apply on receive".
//! Decoding goes through the prost-generated types (zero-copy `Bytes` fields);
//! encoding is written by hand against the schema so that it appends straight
//! into the caller's buffer without building intermediate messages. A property
//! test checks that both agree byte for byte with prost.
//!
//! Must never: know about frame headers, streams or sockets (see `frame`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, Bytes};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message as _;

use super::error::DecodeError;
use crate::pb;
use crate::types::{Action, NextHop, NextHopKind, Route, Vni};

/// The message type byte of a frame header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum MessageType {
    /// Session opening.
    Hello = 1,
    /// Liveness.
    Keepalive = 2,
    /// Start receiving a VNI's routes.
    Subscribe = 3,
    /// Stop receiving a VNI's routes.
    Unsubscribe = 4,
    /// Announce or withdraw a route.
    Update = 5,
}

impl MessageType {
    /// Maps the header byte to a type; `None` for anything unknown.
    pub fn from_byte(byte: u8) -> Option<MessageType> {
        Some(match byte {
            1 => MessageType::Hello,
            2 => MessageType::Keepalive,
            3 => MessageType::Subscribe,
            4 => MessageType::Unsubscribe,
            5 => MessageType::Update,
            _ => return None,
        })
    }

    /// Name as PROTOCOL.md spells it, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "HELLO",
            MessageType::Keepalive => "KEEPALIVE",
            MessageType::Subscribe => "SUBSCRIBE",
            MessageType::Unsubscribe => "UNSUBSCRIBE",
            MessageType::Update => "UPDATE",
        }
    }
}

/// One decoded, validated protocol message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Message {
    /// Session opening: the sender's keepalive interval in seconds and its role.
    /// An interval of 0 is representable here; refusing it is the session's job.
    Hello {
        /// The sender's keepalive interval in seconds.
        keepalive_secs: u32,
        /// True when the sender is a server (reflector).
        is_server: bool,
        /// True when the sender reads its socket as a byte stream and may
        /// be written to unpaced (`Hello.readsStream`, field 100: ours; a
        /// Go peer never sets it, see `metalbond_utils::pacing`).
        reads_stream: bool,
    },
    /// Liveness; empty payload.
    Keepalive,
    /// Start receiving the routes of a VNI.
    Subscribe(Vni),
    /// Stop receiving the routes of a VNI.
    Unsubscribe(Vni),
    /// Announce or withdraw one route.
    Update {
        /// Add or remove.
        action: Action,
        /// The route concerned.
        route: Route,
    },
}

impl Message {
    /// The header type byte this message travels under.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Keepalive => MessageType::Keepalive,
            Message::Subscribe(_) => MessageType::Subscribe,
            Message::Unsubscribe(_) => MessageType::Unsubscribe,
            Message::Update { .. } => MessageType::Update,
        }
    }

    /// Decodes and validates a payload of the given type.
    pub fn decode(msg_type: MessageType, payload: Bytes) -> Result<Message, DecodeError> {
        let malformed = |source| DecodeError::Protobuf { msg_type, source };
        match msg_type {
            MessageType::Hello => {
                let h = pb::Hello::decode(payload).map_err(malformed)?;
                Ok(Message::Hello {
                    keepalive_secs: h.keepalive_interval,
                    is_server: h.is_server,
                    reads_stream: h.reads_stream,
                })
            }
            MessageType::Keepalive => {
                if payload.is_empty() {
                    Ok(Message::Keepalive)
                } else {
                    Err(DecodeError::KeepalivePayload(payload.len()))
                }
            }
            MessageType::Subscribe | MessageType::Unsubscribe => {
                let s = pb::Subscription::decode(payload).map_err(malformed)?;
                let vni = vni_field("Subscription.vni", s.vni)?;
                Ok(if msg_type == MessageType::Subscribe {
                    Message::Subscribe(vni)
                } else {
                    Message::Unsubscribe(vni)
                })
            }
            MessageType::Update => {
                let u = pb::Update::decode(payload).map_err(malformed)?;
                update_from_wire(u)
            }
        }
    }

    /// Exact payload length `encode_payload` will write.
    pub fn payload_len(&self) -> usize {
        match *self {
            Message::Hello {
                keepalive_secs,
                is_server,
                reads_stream,
            } => {
                varint_field_len(u64::from(keepalive_secs))
                    + if is_server { 2 } else { 0 }
                    + if reads_stream {
                        key_len(READS_STREAM_FIELD) + 1
                    } else {
                        0
                    }
            }
            Message::Keepalive => 0,
            Message::Subscribe(vni) | Message::Unsubscribe(vni) => {
                varint_field_len(u64::from(vni.get()))
            }
            Message::Update { action, route } => update_lens(action, &route).0,
        }
    }

    /// Appends the protobuf payload (no header) to `buf`, exactly as the Go
    /// implementation's proto3 marshaller would: fields in number order,
    /// zero values omitted.
    pub fn encode_payload(&self, buf: &mut impl BufMut) {
        match *self {
            Message::Hello {
                keepalive_secs,
                is_server,
                reads_stream,
            } => {
                put_varint_field(1, u64::from(keepalive_secs), buf);
                put_varint_field(2, u64::from(is_server), buf);
                put_varint_field(READS_STREAM_FIELD, u64::from(reads_stream), buf);
            }
            Message::Keepalive => {}
            Message::Subscribe(vni) | Message::Unsubscribe(vni) => {
                put_varint_field(1, u64::from(vni.get()), buf);
            }
            Message::Update { action, route } => encode_update(action, &route, buf),
        }
    }
}

/// Field number of `Hello.readsStream` (ours; proto/metalbond.proto).
const READS_STREAM_FIELD: u32 = 100;

/// Length of a non-default varint field with a one-byte key, 0 when omitted.
fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

/// Writes a varint field unless it holds the proto3 default (0).
fn put_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

/// Writes a length-delimited field (always, even when empty: sub-messages
/// are always set by the Go sender, and addresses are never empty).
fn put_len_field(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn len_field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn ip_bytes_len(addr: IpAddr) -> usize {
    match addr {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}

fn put_ip(addr: IpAddr, buf: &mut impl BufMut) {
    match addr {
        IpAddr::V4(a) => buf.put_slice(&a.octets()),
        IpAddr::V6(a) => buf.put_slice(&a.octets()),
    }
}

fn action_number(action: Action) -> u64 {
    match action {
        Action::Add => pb::Action::Add as u64,
        Action::Remove => pb::Action::Remove as u64,
    }
}

/// (type number, port from, port to) as they go on the wire.
fn kind_numbers(kind: NextHopKind) -> (u64, u64, u64) {
    match kind {
        NextHopKind::Standard => (pb::NextHopType::Standard as u64, 0, 0),
        NextHopKind::Nat { from, to } => (pb::NextHopType::Nat as u64, from.into(), to.into()),
        NextHopKind::LoadBalancerTarget => (pb::NextHopType::LoadbalancerTarget as u64, 0, 0),
    }
}

/// (whole payload, Destination body, NextHop body) lengths of an UPDATE.
fn update_lens(action: Action, route: &Route) -> (usize, usize, usize) {
    let dest = route.destination;
    let v6 = matches!(dest, IpNet::V6(_));
    let dest_len = varint_field_len(u64::from(v6))
        + len_field_len(ip_bytes_len(dest.network()))
        + varint_field_len(u64::from(dest.prefix_len()));
    let nh = route.next_hop;
    let (kind, from, to) = kind_numbers(nh.kind);
    let nh_len = len_field_len(ip_bytes_len(nh.target))
        + varint_field_len(u64::from(nh.target_vni))
        + varint_field_len(kind)
        + varint_field_len(from)
        + varint_field_len(to);
    let total = varint_field_len(action_number(action))
        + varint_field_len(u64::from(route.vni.get()))
        + len_field_len(dest_len)
        + len_field_len(nh_len);
    (total, dest_len, nh_len)
}

fn encode_update(action: Action, route: &Route, buf: &mut impl BufMut) {
    let (_, dest_len, nh_len) = update_lens(action, route);
    put_varint_field(1, action_number(action), buf);
    put_varint_field(2, u64::from(route.vni.get()), buf);

    let dest = route.destination;
    put_len_field(3, dest_len, buf);
    put_varint_field(1, u64::from(matches!(dest, IpNet::V6(_))), buf);
    put_len_field(2, ip_bytes_len(dest.network()), buf);
    put_ip(dest.network(), buf);
    put_varint_field(3, u64::from(dest.prefix_len()), buf);

    let nh = route.next_hop;
    let (kind, from, to) = kind_numbers(nh.kind);
    put_len_field(4, nh_len, buf);
    put_len_field(1, ip_bytes_len(nh.target), buf);
    put_ip(nh.target, buf);
    put_varint_field(2, u64::from(nh.target_vni), buf);
    put_varint_field(3, kind, buf);
    put_varint_field(4, from, buf);
    put_varint_field(5, to, buf);
}

fn vni_field(field: &'static str, value: u32) -> Result<Vni, DecodeError> {
    Vni::new(value).map_err(|_| DecodeError::VniOutOfRange { field, value })
}

fn update_from_wire(u: pb::Update) -> Result<Message, DecodeError> {
    let action = match pb::Action::try_from(u.action) {
        Ok(pb::Action::Add) => Action::Add,
        Ok(pb::Action::Remove) => Action::Remove,
        Err(_) => {
            return Err(DecodeError::UnknownEnum {
                field: "Update.action",
                value: u.action,
            })
        }
    };
    let vni = vni_field("Update.vni", u.vni)?;
    let dest = u.destination.ok_or(DecodeError::MissingDestination)?;
    let nh = u.next_hop.ok_or(DecodeError::MissingNextHop)?;
    let destination = destination_from_wire(&dest)?;
    let next_hop = next_hop_from_wire(&nh)?;
    Ok(Message::Update {
        action,
        route: Route::new(vni, destination, next_hop),
    })
}

fn destination_from_wire(d: &pb::Destination) -> Result<IpNet, DecodeError> {
    let version = pb::IpVersion::try_from(d.ip_version).map_err(|_| DecodeError::UnknownEnum {
        field: "Destination.ipVersion",
        value: d.ip_version,
    })?;
    let plen = d.prefix_length;
    let net = match (version, d.prefix.len()) {
        (pb::IpVersion::IPv4, 4) => {
            let octets: [u8; 4] = [d.prefix[0], d.prefix[1], d.prefix[2], d.prefix[3]];
            let len = u8::try_from(plen).ok().filter(|l| *l <= 32);
            let len = len.ok_or(DecodeError::PrefixLength {
                family: 4,
                len: plen,
            })?;
            Ipv4Net::new(Ipv4Addr::from(octets), len).map(IpNet::V4)
        }
        (pb::IpVersion::IPv6, 16) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&d.prefix);
            let len = u8::try_from(plen).ok().filter(|l| *l <= 128);
            let len = len.ok_or(DecodeError::PrefixLength {
                family: 6,
                len: plen,
            })?;
            Ipv6Net::new(Ipv6Addr::from(octets), len).map(IpNet::V6)
        }
        (version, len) => {
            return Err(DecodeError::PrefixBytes {
                ip_version: if version == pb::IpVersion::IPv4 { 4 } else { 6 },
                len,
            })
        }
    };
    // The length was checked above, so construction cannot fail; map it anyway
    // rather than unwrap.
    net.map(|n| n.trunc())
        .map_err(|_| DecodeError::PrefixLength {
            family: 0,
            len: plen,
        })
}

fn next_hop_from_wire(nh: &pb::NextHop) -> Result<NextHop, DecodeError> {
    let target = match nh.target_address.len() {
        4 => IpAddr::V4(Ipv4Addr::new(
            nh.target_address[0],
            nh.target_address[1],
            nh.target_address[2],
            nh.target_address[3],
        )),
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&nh.target_address);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        len => return Err(DecodeError::NextHopBytes(len)),
    };
    let kind = match pb::NextHopType::try_from(nh.r#type) {
        Ok(pb::NextHopType::Standard) => NextHopKind::Standard,
        Ok(pb::NextHopType::LoadbalancerTarget) => NextHopKind::LoadBalancerTarget,
        Ok(pb::NextHopType::Nat) => {
            let (from, to) = (nh.nat_port_range_from, nh.nat_port_range_to);
            match (u16::try_from(from), u16::try_from(to)) {
                (Ok(f), Ok(t)) if f <= t => NextHopKind::Nat { from: f, to: t },
                _ => return Err(DecodeError::NatPortRange { from, to }),
            }
        }
        Err(_) => {
            return Err(DecodeError::UnknownEnum {
                field: "NextHop.type",
                value: nh.r#type,
            })
        }
    };
    Ok(NextHop {
        target,
        target_vni: vni_field("NextHop.targetVNI", nh.target_vni)?.get(),
        kind,
    })
}
