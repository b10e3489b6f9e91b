//! Codec contract tests: byte-exact golden frames worked out by hand from the
//! schema in PROTOCOL.md, one test per rejection rule, and property tests for
//! round trips, prost agreement and arbitrary stream splits.

use bytes::{Bytes, BytesMut};
use metalbond_test_support::vni;
use metalbond_wire::codec::{encode_frame, DecodeError, FrameDecoder, Message, MAX_PAYLOAD};
use metalbond_wire::pb;
use metalbond_wire::{Action, IpNet, NextHop, NextHopKind, Route, Vni};
use proptest::prelude::*;
use prost::Message as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    let n = encode_frame(msg, &mut buf);
    assert_eq!(n, buf.len());
    buf
}

/// Decodes a byte string that must hold exactly whole frames.
fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let mut dec = FrameDecoder::new();
    dec.extend(bytes);
    let mut out = Vec::new();
    while let Some(m) = dec.next_message()? {
        out.push(m);
    }
    assert_eq!(dec.buffered(), 0, "trailing bytes left in decoder");
    Ok(out)
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn golden(msg: Message, bytes: &str) {
    let want = hex(bytes);
    assert_eq!(encode(&msg), want, "encoding of {msg:?}");
    assert_eq!(decode_all(&want).expect("decodes"), vec![msg]);
}

#[test]
fn golden_keepalive() {
    golden(Message::Keepalive, "01 0000 02");
}

#[test]
fn golden_hello() {
    golden(
        Message::Hello {
            keepalive_secs: 5,
            is_server: false,
            reads_stream: false,
        },
        "01 0002 01  08 05",
    );
    golden(
        Message::Hello {
            keepalive_secs: 300,
            is_server: true,
            reads_stream: false,
        },
        "01 0005 01  08 ac02  10 01",
    );
    // Ours: `readsStream` (field 100, varint) after the Go schema's fields.
    golden(
        Message::Hello {
            keepalive_secs: 5,
            is_server: true,
            reads_stream: true,
        },
        "01 0007 01  08 05  10 01  a006 01",
    );
}

/// A Go peer's HELLO carries no `readsStream`: it decodes as a peer that
/// must be paced. A HELLO with fields we do not know (a later Go schema)
/// still decodes, as proto3 requires.
#[test]
fn hello_without_or_with_unknown_fields_decodes() {
    let go = decode_all(&frame(1, &[0x08, 0x05])).unwrap();
    assert_eq!(
        go,
        vec![Message::Hello {
            keepalive_secs: 5,
            is_server: false,
            reads_stream: false,
        }]
    );
    // field 3 (varint 7) and field 9 (bytes "ab"), unknown to us
    let later = decode_all(&frame(1, &[0x08, 0x05, 0x18, 0x07, 0x4a, 0x02, b'a', b'b'])).unwrap();
    assert_eq!(later, go);
}

#[test]
fn golden_subscribe_unsubscribe() {
    golden(Message::Subscribe(vni(23)), "01 0002 03  08 17");
    golden(Message::Unsubscribe(vni(23)), "01 0002 04  08 17");
    // VNI 0 is the proto3 default: the field is omitted.
    golden(Message::Subscribe(vni(0)), "01 0000 03");
    golden(Message::Subscribe(vni(Vni::MAX)), "01 0005 03  08 ffffff07");
}

#[test]
fn golden_update_ipv4_standard() {
    let route = Route::new(
        vni(23),
        "10.0.23.0/24".parse().unwrap(),
        NextHop::standard("2001:db8::1".parse().unwrap()),
    );
    golden(
        Message::Update {
            action: Action::Add,
            route,
        },
        "01 0020 05
         10 17
         1a 08  12 04 0a001700  18 18
         22 12  0a 10 20010db8000000000000000000000001",
    );
}

#[test]
fn golden_update_ipv6_nat_remove() {
    let route = Route::new(
        vni(100),
        "2001:db8:9::/64".parse().unwrap(),
        NextHop {
            target: "2001:db8::2".parse().unwrap(),
            target_vni: 7,
            kind: NextHopKind::Nat {
                from: 1000,
                to: 2000,
            },
        },
    );
    golden(
        Message::Update {
            action: Action::Remove,
            route,
        },
        "01 003a 05
         08 01
         10 64
         1a 16  08 01  12 10 20010db8000900000000000000000000  18 40
         22 1c  0a 10 20010db8000000000000000000000002  10 07  18 01  20 e807  28 d00f",
    );
}

#[test]
fn golden_update_loadbalancer_default_route() {
    let route = Route::new(
        vni(1),
        "0.0.0.0/0".parse().unwrap(),
        NextHop {
            target: "2001:db8::3".parse().unwrap(),
            target_vni: 0,
            kind: NextHopKind::LoadBalancerTarget,
        },
    );
    golden(
        Message::Update {
            action: Action::Add,
            route,
        },
        "01 0020 05
         10 01
         1a 06  12 04 00000000
         22 14  0a 10 20010db8000000000000000000000003  18 02",
    );
}

// ---- rejection rules: one test each -------------------------------------

fn frame(msg_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![1, (payload.len() >> 8) as u8, payload.len() as u8, msg_type];
    f.extend_from_slice(payload);
    f
}

fn update_payload(u: pb::Update) -> Vec<u8> {
    u.encode_to_vec()
}

fn good_pb_update() -> pb::Update {
    pb::Update {
        action: 0,
        vni: 23,
        destination: Some(pb::Destination {
            ip_version: 0,
            prefix: Bytes::from_static(&[10, 0, 23, 0]),
            prefix_length: 24,
        }),
        next_hop: Some(pb::NextHop {
            target_address: Bytes::copy_from_slice(&Ipv6Addr::LOCALHOST.octets()),
            target_vni: 0,
            r#type: 0,
            nat_port_range_from: 0,
            nat_port_range_to: 0,
        }),
    }
}

fn reject(bytes: &[u8]) -> DecodeError {
    match decode_all(bytes) {
        Err(e) => e,
        Ok(m) => panic!("expected rejection, decoded {m:?}"),
    }
}

#[test]
fn good_pb_update_is_accepted() {
    let msgs = decode_all(&frame(5, &update_payload(good_pb_update()))).unwrap();
    assert_eq!(msgs.len(), 1);
}

#[test]
fn rejects_bad_version() {
    let mut f = encode(&Message::Keepalive);
    f[0] = 2;
    assert!(matches!(reject(&f), DecodeError::Version(2)));
}

#[test]
fn rejects_bad_version_before_payload_arrives() {
    let mut dec = FrameDecoder::new();
    dec.extend(&[0, 0x04, 0xa4, 5]);
    assert!(matches!(dec.next_message(), Err(DecodeError::Version(0))));
}

#[test]
fn rejects_unknown_type() {
    assert!(matches!(
        reject(&frame(6, &[])),
        DecodeError::UnknownType(6)
    ));
    assert!(matches!(
        reject(&frame(0, &[])),
        DecodeError::UnknownType(0)
    ));
}

#[test]
fn rejects_oversized_payload_from_header_alone() {
    let mut dec = FrameDecoder::new();
    let len = (MAX_PAYLOAD + 1) as u16;
    dec.extend(&[1, (len >> 8) as u8, len as u8, 5]);
    assert!(matches!(
        dec.next_message(),
        Err(DecodeError::PayloadTooLong(1189))
    ));
}

#[test]
fn accepts_payload_of_exactly_max_len() {
    // A HELLO padded with an unknown field to exactly 1188 bytes: unknown
    // fields are skipped by proto3, the length is legal.
    let mut payload = vec![0x08, 0x05, 0x1a]; // field 3, length-delimited
    let body = MAX_PAYLOAD - payload.len() - 2;
    payload.push(0x80 | (body & 0x7f) as u8);
    payload.push((body >> 7) as u8);
    payload.resize(MAX_PAYLOAD, 0);
    let msgs = decode_all(&frame(1, &payload)).expect("max-size payload is legal");
    assert_eq!(
        msgs,
        vec![Message::Hello {
            keepalive_secs: 5,
            is_server: false,
            reads_stream: false,
        }]
    );
}

#[test]
fn rejects_undecodable_protobuf() {
    let e = reject(&frame(5, &[0x1a, 0x10, 0x00]));
    assert!(matches!(e, DecodeError::Protobuf { .. }), "{e}");
    assert!(e.to_string().contains("UPDATE"));
}

#[test]
fn rejects_keepalive_with_payload() {
    assert!(matches!(
        reject(&frame(2, &[0x08, 0x01])),
        DecodeError::KeepalivePayload(2)
    ));
}

#[test]
fn rejects_update_without_destination() {
    let mut u = good_pb_update();
    u.destination = None;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::MissingDestination
    ));
}

#[test]
fn rejects_update_without_next_hop() {
    let mut u = good_pb_update();
    u.next_hop = None;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::MissingNextHop
    ));
}

#[test]
fn rejects_prefix_bytes_inconsistent_with_version() {
    let mut u = good_pb_update();
    u.destination.as_mut().unwrap().ip_version = 1; // IPv6 with 4 bytes
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::PrefixBytes {
            ip_version: 6,
            len: 4
        }
    ));
    let mut u = good_pb_update();
    u.destination.as_mut().unwrap().prefix = Bytes::from_static(&[10, 0, 23]);
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::PrefixBytes {
            ip_version: 4,
            len: 3
        }
    ));
}

#[test]
fn rejects_prefix_length_too_long() {
    let mut u = good_pb_update();
    u.destination.as_mut().unwrap().prefix_length = 33;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::PrefixLength { family: 4, len: 33 }
    ));
    let mut u = good_pb_update();
    let d = u.destination.as_mut().unwrap();
    d.ip_version = 1;
    d.prefix = Bytes::copy_from_slice(&[0u8; 16]);
    d.prefix_length = 129;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::PrefixLength {
            family: 6,
            len: 129
        }
    ));
}

#[test]
fn rejects_next_hop_address_of_wrong_size() {
    for len in [0usize, 5, 15, 17] {
        let mut u = good_pb_update();
        u.next_hop.as_mut().unwrap().target_address = Bytes::from(vec![1u8; len]);
        let e = reject(&frame(5, &update_payload(u)));
        assert!(matches!(e, DecodeError::NextHopBytes(l) if l == len), "{e}");
    }
}

#[test]
fn rejects_bad_nat_ranges() {
    for (from, to) in [(2000, 1000), (0, 65536), (70000, 70001)] {
        let mut u = good_pb_update();
        let nh = u.next_hop.as_mut().unwrap();
        nh.r#type = 1;
        nh.nat_port_range_from = from;
        nh.nat_port_range_to = to;
        let e = reject(&frame(5, &update_payload(u)));
        assert!(
            matches!(e, DecodeError::NatPortRange { from: f, to: t } if f == from && t == to),
            "{e}"
        );
    }
}

#[test]
fn rejects_vni_above_24_bits() {
    let mut u = good_pb_update();
    u.vni = 1 << 24;
    let e = reject(&frame(5, &update_payload(u)));
    assert!(
        matches!(e, DecodeError::VniOutOfRange { field: "Update.vni", value } if value == 1 << 24)
    );
    let mut u = good_pb_update();
    u.next_hop.as_mut().unwrap().target_vni = u32::MAX;
    let e = reject(&frame(5, &update_payload(u)));
    assert!(matches!(
        e,
        DecodeError::VniOutOfRange {
            field: "NextHop.targetVNI",
            ..
        }
    ));
    let sub = pb::Subscription { vni: 1 << 24 }.encode_to_vec();
    assert!(matches!(
        reject(&frame(3, &sub)),
        DecodeError::VniOutOfRange { .. }
    ));
    assert!(matches!(
        reject(&frame(4, &sub)),
        DecodeError::VniOutOfRange { .. }
    ));
}

#[test]
fn rejects_unknown_enum_values() {
    let mut u = good_pb_update();
    u.action = 2;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::UnknownEnum {
            field: "Update.action",
            value: 2
        }
    ));
    let mut u = good_pb_update();
    u.destination.as_mut().unwrap().ip_version = 7;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::UnknownEnum {
            field: "Destination.ipVersion",
            ..
        }
    ));
    let mut u = good_pb_update();
    u.next_hop.as_mut().unwrap().r#type = 3;
    assert!(matches!(
        reject(&frame(5, &update_payload(u))),
        DecodeError::UnknownEnum {
            field: "NextHop.type",
            ..
        }
    ));
}

#[test]
fn host_bits_are_cleared_on_receive() {
    let mut u = good_pb_update();
    u.destination.as_mut().unwrap().prefix = Bytes::from_static(&[10, 0, 23, 77]);
    let msgs = decode_all(&frame(5, &update_payload(u))).unwrap();
    match msgs[0] {
        Message::Update { route, .. } => {
            assert_eq!(route.destination.to_string(), "10.0.23.0/24")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn largest_message_is_far_below_the_limit() {
    let route = Route::new(
        vni(Vni::MAX),
        "ffff::/128".parse().unwrap(),
        NextHop {
            target: IpAddr::V6(Ipv6Addr::from([0xff; 16])),
            target_vni: Vni::MAX,
            kind: NextHopKind::Nat {
                from: u16::MAX,
                to: u16::MAX,
            },
        },
    );
    let msg = Message::Update {
        action: Action::Remove,
        route,
    };
    assert!(msg.payload_len() < 100);
    assert!(msg.payload_len() <= MAX_PAYLOAD);
}

#[test]
fn partial_frame_waits_for_more() {
    let f = encode(&Message::Subscribe(vni(5)));
    let mut dec = FrameDecoder::new();
    for (i, b) in f.iter().enumerate() {
        assert!(dec.next_message().unwrap().is_none(), "early at byte {i}");
        dec.extend(&[*b]);
    }
    assert_eq!(
        dec.next_message().unwrap(),
        Some(Message::Subscribe(vni(5)))
    );
    assert_eq!(dec.next_message().unwrap(), None);
}

// ---- properties -----------------------------------------------------------

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ]
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32).prop_map(|(o, l)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(o)),
            l
        )
        .unwrap()),
        (any::<[u8; 16]>(), 0u8..=128).prop_map(|(o, l)| IpNet::new(
            IpAddr::V6(Ipv6Addr::from(o)),
            l
        )
        .unwrap()),
    ]
}

fn arb_kind() -> impl Strategy<Value = NextHopKind> {
    prop_oneof![
        Just(NextHopKind::Standard),
        Just(NextHopKind::LoadBalancerTarget),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| NextHopKind::Nat {
            from: a.min(b),
            to: a.max(b)
        }),
    ]
}

fn arb_vni() -> impl Strategy<Value = Vni> {
    prop_oneof![Just(0u32), 1u32..1000, 0..=Vni::MAX].prop_map(vni)
}

fn arb_message() -> impl Strategy<Value = Message> {
    let route = (arb_vni(), arb_net(), arb_ip(), arb_vni(), arb_kind()).prop_map(
        |(v, net, target, tv, kind)| {
            Route::new(
                v,
                net,
                NextHop {
                    target,
                    target_vni: tv.get(),
                    kind,
                },
            )
        },
    );
    prop_oneof![
        (any::<u32>(), any::<bool>(), any::<bool>()).prop_map(|(k, s, r)| Message::Hello {
            keepalive_secs: k,
            is_server: s,
            reads_stream: r,
        }),
        Just(Message::Keepalive),
        arb_vni().prop_map(Message::Subscribe),
        arb_vni().prop_map(Message::Unsubscribe),
        (any::<bool>(), route).prop_map(|(add, route)| Message::Update {
            action: if add { Action::Add } else { Action::Remove },
            route
        }),
    ]
}

/// The same message built as prost types, to compare encodings.
fn to_prost_payload(msg: &Message) -> Vec<u8> {
    fn ip(a: IpAddr) -> Bytes {
        match a {
            IpAddr::V4(a) => Bytes::copy_from_slice(&a.octets()),
            IpAddr::V6(a) => Bytes::copy_from_slice(&a.octets()),
        }
    }
    match *msg {
        Message::Hello {
            keepalive_secs,
            is_server,
            reads_stream,
        } => pb::Hello {
            keepalive_interval: keepalive_secs,
            is_server,
            reads_stream,
        }
        .encode_to_vec(),
        Message::Keepalive => Vec::new(),
        Message::Subscribe(v) | Message::Unsubscribe(v) => {
            pb::Subscription { vni: v.get() }.encode_to_vec()
        }
        Message::Update { action, route } => {
            let (t, f, to) = match route.next_hop.kind {
                NextHopKind::Standard => (0, 0, 0),
                NextHopKind::Nat { from, to } => (1, from.into(), to.into()),
                NextHopKind::LoadBalancerTarget => (2, 0, 0),
            };
            pb::Update {
                action: if action == Action::Add { 0 } else { 1 },
                vni: route.vni.get(),
                destination: Some(pb::Destination {
                    ip_version: matches!(route.destination, IpNet::V6(_)) as i32,
                    prefix: ip(route.destination.network()),
                    prefix_length: route.destination.prefix_len().into(),
                }),
                next_hop: Some(pb::NextHop {
                    target_address: ip(route.next_hop.target),
                    target_vni: route.next_hop.target_vni,
                    r#type: t,
                    nat_port_range_from: f,
                    nat_port_range_to: to,
                }),
            }
            .encode_to_vec()
        }
    }
}

proptest! {
    #[test]
    fn every_valid_message_round_trips(msg in arb_message()) {
        let bytes = encode(&msg);
        prop_assert_eq!(decode_all(&bytes).unwrap(), vec![msg]);
    }

    #[test]
    fn hand_encoder_matches_prost(msg in arb_message()) {
        let mut payload = BytesMut::new();
        msg.encode_payload(&mut payload);
        prop_assert_eq!(payload.len(), msg.payload_len());
        prop_assert_eq!(&payload[..], &to_prost_payload(&msg)[..]);
    }

    #[test]
    fn arbitrary_splits_decode_the_same(
        msgs in proptest::collection::vec(arb_message(), 1..40),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..30),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream);
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for w in points.windows(2) {
            dec.extend(&stream[w[0]..w[1]]);
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut dec = FrameDecoder::new();
        dec.extend(&bytes);
        while let Ok(Some(_)) = dec.next_message() {}
    }
}
