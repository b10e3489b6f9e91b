//! Byte-stream framing and bad input on the server: frames split at every
//! byte, thousands of frames per write, and each malformed input closing only
//! its own connection.

use metalbond_test_support::server as server_support;

use std::collections::BTreeSet;
use std::time::Duration;

use metalbond_wire::codec::Message;
use metalbond_wire::Action;
use server_support::*;

#[test]
fn frames_split_at_every_byte_are_understood() {
    let srv = TestServer::start(2);
    let (mut sub, _) = TestPeer::established(srv.addr, 5);
    sub.send(&Message::Subscribe(vni(8)));
    sub.sync_point();
    let mut stream = Vec::new();
    stream.extend(frame(&Message::Hello {
        keepalive_secs: 5,
        is_server: false,
        reads_stream: false,
    }));
    stream.extend(frame(&Message::Keepalive));
    stream.extend(frame(&add(route(8, 1, 1))));
    stream.extend(frame(&add(route(8, 2, 1))));
    stream.extend(frame(&remove(route(8, 1, 1))));
    stream.extend(frame(&remove(route(8, 2, 1))));
    let mut state = BTreeSet::new();
    for cut in 1..stream.len() {
        let p = TestPeer::connect(srv.addr);
        // Two writes with a pause between: the server's first read ends at
        // `cut`, wherever that falls (header, payload, frame boundary).
        p.send_raw(&stream[..cut]);
        std::thread::sleep(Duration::from_millis(2));
        p.send_raw(&stream[cut..]);
        // The subscriber sees the four updates, in order, for every cut.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (a, r) = sub.recv_update(WAIT).expect("update");
            apply(&mut state, a, r);
            seen.push(a);
        }
        assert_eq!(
            seen,
            vec![Action::Add, Action::Add, Action::Remove, Action::Remove],
            "cut at {cut}"
        );
        assert!(!p.eof);
    }
    assert!(state.is_empty());
}

#[test]
fn one_byte_per_write_is_understood() {
    let srv = TestServer::start(1);
    let p = TestPeer::connect(srv.addr);
    let mut bytes = frame(&Message::Hello {
        keepalive_secs: 5,
        is_server: false,
        reads_stream: false,
    });
    bytes.extend(frame(&Message::Keepalive));
    bytes.extend(frame(&add(route(1, 1, 1))));
    for b in &bytes {
        p.send_raw(std::slice::from_ref(b));
    }
    srv.wait_route_count(1);
}

#[test]
fn thousands_of_frames_in_one_write() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut sub, _) = TestPeer::established(srv.addr, 5);
    sub.send(&Message::Subscribe(vni(2)));
    sub.sync_point();
    let want: BTreeSet<_> = (0..20_000).map(|i| route(2, i, 1)).collect();
    let msgs: Vec<Message> = want.iter().map(|r| add(*r)).collect();
    a.send_all(&msgs); // one write of ~20k frames
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &want);
    srv.wait_route_count(20_000);
}

/// Each of these closes its connection; the process and other peers carry on.
fn malformed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let upd = frame(&add(route(1, 1, 1)));
    let mut bad_version = upd.clone();
    bad_version[0] = 2;
    let mut bad_type = upd.clone();
    bad_type[3] = 9;
    let mut too_long = vec![1u8, 0x04, 0xa5, 5]; // length 1189
    too_long.extend(vec![0u8; 1189]);
    let garbage_protobuf = vec![1u8, 0, 3, 5, 0xff, 0xff, 0xff];
    let keepalive_payload = vec![1u8, 0, 1, 2, 0];
    // Subscription.vni = 2^24 (field 1 varint 0x1000000).
    let vni_too_big = vec![1u8, 0, 5, 3, 0x08, 0x80, 0x80, 0x80, 0x08];
    // Update with only action and vni: no destination.
    let no_destination = vec![1u8, 0, 2, 5, 0x10, 0x01];
    // Update with destination ipVersion IPv4 but a 16-byte prefix.
    let mut prefix = vec![0x12u8, 20, 0x12, 16];
    prefix.extend([0u8; 16]);
    prefix.extend([0x18, 24]);
    let mut bad_prefix = vec![1u8, 0, prefix.len() as u8 + 2, 5, 0x10, 0x01];
    bad_prefix.extend(&prefix);
    vec![
        ("version 2", bad_version),
        ("unknown type 9", bad_type),
        ("payload 1189 bytes", too_long),
        ("bad protobuf", garbage_protobuf),
        ("keepalive with payload", keepalive_payload),
        ("vni 2^24", vni_too_big),
        ("update without destination", no_destination),
        ("prefix bytes vs ipVersion", bad_prefix),
    ]
}

#[test]
fn each_malformed_input_closes_only_that_connection() {
    let srv = TestServer::start(2);
    let (mut bystander, _) = TestPeer::established(srv.addr, 5);
    bystander.send(&Message::Subscribe(vni(1)));
    let (announcer, _) = TestPeer::established(srv.addr, 5);
    announcer.send(&add(route(1, 1, 1)));
    assert_eq!(
        bystander.recv_update(WAIT),
        Some((Action::Add, route(1, 1, 1)))
    );
    let inputs = malformed_inputs();
    for (what, bytes) in &inputs {
        let (mut bad, _) = TestPeer::established(srv.addr, 5);
        bad.send(&add(route(1, 100, 9)));
        assert_eq!(
            bystander.recv_update(WAIT),
            Some((Action::Add, route(1, 100, 9))),
            "{what}"
        );
        bad.send_raw(bytes);
        assert!(bad.closed_within(WAIT), "{what}: connection closed");
        // Its route is withdrawn; everyone else carries on.
        assert_eq!(
            bystander.recv_update(WAIT),
            Some((Action::Remove, route(1, 100, 9))),
            "{what}"
        );
        assert!(bystander.sync_point().is_empty());
    }
    srv.wait_route_count(1);
    srv.wait_stats("malformed disconnects", |s| {
        s.sum(|s| s.disconnects.malformed) == inputs.len() as u64
    });
    assert_eq!(srv.handle().peers().len(), 2);
}

#[test]
fn malformed_input_during_handshake_closes() {
    let srv = TestServer::start(1);
    for (what, bytes) in malformed_inputs() {
        let mut p = TestPeer::connect(srv.addr);
        p.send_raw(&bytes);
        assert!(p.closed_within(WAIT), "{what}");
    }
}
