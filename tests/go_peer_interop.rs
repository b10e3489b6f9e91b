//! Interop with the Go MetalBond peers deployed in the field (issue #30):
//! they read into one 65,535-byte buffer, reset the session when a read
//! fills it, cannot reassemble a frame split across two reads, and process
//! about 6,700 routes a second. A sender that writes a sync faster than
//! that, or lets 64 KiB pile up unread, makes them crash-loop.
//!
//! Each Go peer is played by the model in `go_peer_support` (see its module
//! doc for what it reproduces of `peer.go`). The `model_*` tests check that
//! the model sees what it claims to see: a full read, a split frame, a
//! clean paced stream, the Go server's handshake.

mod go_peer_support;
mod server_support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use go_peer_support::{
    GoClientModel, GoPeerConfig, GoServerModel, GoState, Reset, Summary, GO_KEEPALIVE_SECS,
    GO_READ_BUFFER,
};
use metalbond::codec::{FrameDecoder, Message};
use metalbond::Route;
use server_support::{add, frame, route, vni, TestPeer, WAIT};

/// Bound of every wait for a Go peer: generous for 15 s of processing on a
/// busy two-core machine, finite.
const LIMIT: Duration = Duration::from_secs(90);
/// The VNI every test uses.
const VNI: u32 = 23;

/// `n` distinct IPv4 /32 routes in `VNI` over 16 next hops.
fn numbered(n: u32) -> Vec<Route> {
    (0..n).map(|i| route(VNI, i, (i % 16) as u16 + 1)).collect()
}

/// Asserts that a Go peer's session took exactly `want`, cleanly.
fn assert_took_exactly(who: &str, seen: &Summary, routes: &HashSet<Route>, want: &HashSet<Route>) {
    eprintln!("{who}: {seen}");
    assert_eq!(seen.reset, None, "{who} was reset: {seen}");
    assert_eq!(
        (seen.duplicate_adds, seen.unknown_removes),
        (0, 0),
        "{who} got inconsistent updates: {seen}"
    );
    assert_eq!(
        routes.len(),
        want.len(),
        "{who} did not converge within {LIMIT:?}: {seen}"
    );
    assert!(routes == want, "{who} holds other routes than announced");
}

// The model itself: it must see what it claims to see, or tests with it
// would pass for the wrong reason. A scripted server on a raw socket does
// the passive handshake and then writes exactly the bytes each test wants.

/// Reads from `s` until the next whole message.
fn next_message(s: &mut TcpStream, decoder: &mut FrameDecoder) -> Message {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = decoder.next_message().expect("a valid frame") {
            return m;
        }
        let n = s.read(&mut buf).expect("the model's next frame in time");
        assert!(n > 0, "the model closed the connection");
        decoder.extend(&buf[..n]);
    }
}

/// A Go client model connected to a raw socket that has done the passive
/// handshake with it and seen its SUBSCRIBE.
fn scripted_go_client(config: GoPeerConfig) -> (GoClientModel, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let go = GoClientModel::connect(listener.local_addr().unwrap(), &[vni(VNI)], config);
    let (mut s, _) = listener.accept().expect("the model connects");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut decoder = FrameDecoder::new();
    let hello = next_message(&mut s, &mut decoder);
    assert_eq!(
        hello,
        Message::Hello {
            keepalive_secs: GO_KEEPALIVE_SECS,
            is_server: false
        }
    );
    s.write_all(&frame(&Message::Hello {
        keepalive_secs: GO_KEEPALIVE_SECS,
        is_server: true,
    }))
    .unwrap();
    assert_eq!(next_message(&mut s, &mut decoder), Message::Keepalive);
    s.write_all(&frame(&Message::Keepalive)).unwrap();
    assert_eq!(
        next_message(&mut s, &mut decoder),
        Message::Subscribe(vni(VNI))
    );
    (go, s)
}

/// Frames of ADDs for `routes`, back to back.
fn adds(routes: &[Route]) -> Vec<u8> {
    routes.iter().flat_map(|r| frame(&add(*r))).collect()
}

#[test]
fn model_takes_whole_frames_written_no_faster_than_it_processes() {
    let (go, mut s) = scripted_go_client(GoPeerConfig::default());
    let want = numbered(3_000);
    // Closed loop: the next write only after the model applied the last.
    for (i, chunk) in want.chunks(100).enumerate() {
        s.write_all(&adds(chunk)).unwrap();
        let applied = (i + 1) * 100;
        go.wait_until(WAIT, |seen| seen.routes >= applied);
    }
    let seen = go.summary();
    assert_took_exactly(
        "the model",
        &seen,
        &go.routes(),
        &want.iter().copied().collect(),
    );
    assert!(seen.max_read <= adds(&want[..100]).len(), "{seen}");
}

#[test]
fn model_resets_when_one_read_fills_its_buffer() {
    // 5 ms per route: the first 200 routes keep the reader blocked on the
    // full channel for about half a second, while 80 KB more arrive.
    let config = GoPeerConfig {
        per_route: Duration::from_millis(5),
        ..GoPeerConfig::default()
    };
    let (go, mut s) = scripted_go_client(config);
    let want = numbered(2_200);
    s.write_all(&adds(&want[..200])).unwrap();
    go.wait_until(WAIT, |seen| seen.routes > 0);
    s.write_all(&adds(&want[200..])).unwrap();
    let seen = go.wait_until(WAIT, |_| false);
    eprintln!("the model: {seen}");
    assert_eq!(
        seen.reset,
        Some(Reset::FullRead {
            bytes: GO_READ_BUFFER
        })
    );
    assert_eq!(seen.max_read, GO_READ_BUFFER);
    assert!(
        seen.routes <= 200,
        "nothing of the full read is applied: {seen}"
    );
}

#[test]
fn model_resets_on_a_frame_split_across_two_reads() {
    let (go, mut s) = scripted_go_client(GoPeerConfig::default());
    let bytes = adds(&numbered(2));
    let first = frame(&add(numbered(1)[0])).len();
    // One whole frame and 10 bytes of the next, then (later) the rest. The
    // whole frame is parsed (`at` is past it); whether it is also applied
    // before the reset is a race, in Go as in the model.
    s.write_all(&bytes[..first + 10]).unwrap();
    let seen = go.wait_until(WAIT, |_| false);
    let _ = s.write_all(&bytes[first + 10..]);
    eprintln!("the model: {seen}");
    assert_eq!(
        seen.reset,
        Some(Reset::SplitFrame {
            read: first + 10,
            at: first,
            frame: Some(bytes.len() - first),
        })
    );
}

#[test]
fn model_server_handshakes_answers_keepalives_and_records_routes() {
    let go = GoServerModel::start(GoPeerConfig::default());
    // TestPeer checks the server's HELLO (isServer) and its KEEPALIVE reply.
    let (mut peer, interval) = TestPeer::established(go.addr(), 60);
    assert_eq!(interval, GO_KEEPALIVE_SECS, "the smaller interval");
    let want = numbered(500);
    peer.send(&Message::Subscribe(vni(VNI)));
    peer.send_all(&want.iter().map(|r| add(*r)).collect::<Vec<_>>());
    assert!(
        peer.sync_point().is_empty(),
        "every KEEPALIVE is answered, nothing else is sent"
    );
    let sessions = go.wait_until(WAIT, |all| all.iter().any(|s| s.routes >= want.len()));
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].subscriptions, vec![vni(VNI)]);
    assert_took_exactly(
        "the model",
        &sessions[0],
        &go.routes(),
        &want.iter().copied().collect(),
    );

    // A KEEPALIVE before HELLO is a protocol error to the Go server.
    let early = TestPeer::connect(go.addr());
    early.send(&Message::Keepalive);
    let sessions = go.wait_until(WAIT, |all| all.len() == 2 && all[1].reset.is_some());
    assert_eq!(
        sessions[1].reset,
        Some(Reset::KeepaliveInWrongState {
            state: GoState::Connecting
        })
    );
    assert_eq!(sessions[0].reset, None, "the first session carries on");
}
