//! Hostile and broken peers against the real server (in-process, real TCP on
//! loopback): each test misbehaves in one way, then checks that only the
//! misbehaving peer was affected, that every other peer's view is exactly
//! right, that a fresh peer still handshakes, and that the server's own
//! counters (peers, routes, disconnects by cause) are back to baseline.
//!
//! Must never: depend on speed (every wait is bounded by `WAIT`, nothing
//! asserts a duration), or leave sockets or servers behind (the server shuts
//! down on drop, sockets close with their peers).

use metalbond_test_support::server as server_support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use metalbond_server::ServerStats;
use metalbond_wire::codec::Message;
use metalbond_wire::Route;
use server_support::*;

/// Peers connected (any state) according to the counters.
fn live_peers(s: &ServerStats) -> u64 {
    s.sum(|x| x.peers_handshaking + x.peers_established)
}

/// The server still serves: a new peer handshakes, subscribes and receives
/// exactly `want` for `v`.
fn fresh_peer_sees(server: &TestServer, v: u32, want: &BTreeSet<Route>) {
    let (mut p, _) = TestPeer::established(server.addr, 5);
    p.send(&Message::Subscribe(vni(v)));
    let mut state = BTreeSet::new();
    p.converge(&mut state, want);
    assert!(p.sync_point().is_empty(), "nothing beyond the table");
}

/// A subscriber of `v` that keeps its session alive.
fn subscriber(server: &TestServer, v: u32) -> TestPeer {
    let (mut s, _) = TestPeer::established(server.addr, 5);
    s.keep_alive(Duration::from_millis(500));
    s.send(&Message::Subscribe(vni(v)));
    s.sync_point();
    s
}

#[test]
fn half_a_header_then_silence_is_dropped_at_the_hold_timer() {
    let server = TestServer::with(2, |c| c.keepalive = Duration::from_secs(1));
    let mut sub = subscriber(&server, 7);
    let (mut a, _) = TestPeer::established(server.addr, 1);
    let r = route(7, 1, 1);
    a.send(&add(r));
    assert_eq!(
        sub.recv_update(WAIT),
        Some((metalbond_wire::Action::Add, r))
    );
    // Two bytes of a header, then nothing (no keepalives either).
    a.send_raw(&[1, 0]);
    assert!(a.closed_within(WAIT), "silent peer dropped");
    server.wait_stats("hold-timer disconnect", |s| {
        s.sum(|x| x.disconnects.timeout) == 1
    });
    assert_eq!(
        sub.recv_update(WAIT),
        Some((metalbond_wire::Action::Remove, r))
    );
    assert!(sub.sync_point().is_empty());
    fresh_peer_sees(&server, 7, &BTreeSet::new());
}

#[test]
fn ten_thousand_connections_opened_and_dropped() {
    let server = TestServer::start(2);
    let mut sub = subscriber(&server, 3);
    let (a, _) = TestPeer::established(server.addr, 5);
    a.keep_alive(Duration::from_millis(500));
    let routes: BTreeSet<Route> = (0..10).map(|i| route(3, i, 1)).collect();
    a.send_all(&routes.iter().map(|r| add(*r)).collect::<Vec<_>>());
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &routes);
    // Waves, each gone from the server before the next, keep this process
    // (whose fds include the server's ends, and other tests' sockets) far
    // from its fd limit (~20,000).
    for _ in 0..20 {
        let wave: Vec<TcpStream> = (0..500)
            .map(|_| TcpStream::connect(server.addr).expect("connect"))
            .collect();
        drop(wave);
        server.wait_stats("wave gone", |s| live_peers(s) == 2);
    }
    assert!(sub.sync_point().is_empty(), "the subscriber saw no change");
    fresh_peer_sees(&server, 3, &routes);
    server.wait_stats("only the two real peers left", |s| live_peers(s) == 2);
}

#[test]
fn max_peers_refuses_extra_connections_at_once() {
    let server = TestServer::with(2, |c| c.max_peers = 3);
    let peers: Vec<TestPeer> = (0..3)
        .map(|_| TestPeer::established(server.addr, 5).0)
        .collect();
    let mut extra = TestPeer::connect(server.addr);
    assert!(extra.closed_within(WAIT), "4th connection closed at once");
    let s = server.wait_stats("refusal counted", |s| s.sum(|x| x.connections_refused) >= 1);
    assert_eq!(live_peers(&s), 3);
    assert_eq!(
        s.sum(|x| x.disconnects.total()),
        0,
        "a refusal is no disconnect"
    );
    // A place frees up when a peer leaves.
    peers[0].close();
    server.wait_stats("peer gone", |s| live_peers(s) == 2);
    let (_p, k) = TestPeer::established(server.addr, 5);
    assert_eq!(k, 5);
}

#[test]
fn a_connection_that_does_not_complete_its_handshake_is_closed_with_its_own_reason() {
    // The hold timer (keepalive 5 s: 12.5 s) is far beyond the handshake
    // timeout, so only the latter can close these.
    let server = TestServer::with(2, |c| {
        c.limits.handshake_timeout = Some(Duration::from_secs(1));
    });
    let mut silent = TestPeer::connect(server.addr);
    let mut half = TestPeer::connect(server.addr);
    half.send(&Message::Hello {
        keepalive_secs: 5,
        is_server: false,
        reads_stream: false,
    });
    assert!(matches!(half.recv(WAIT), Some(Message::Hello { .. })));
    let (mut done, _) = TestPeer::established(server.addr, 5);
    done.keep_alive(Duration::from_millis(300));
    assert!(silent.closed_within(WAIT), "no HELLO: closed");
    assert!(half.closed_within(WAIT), "HELLO but no KEEPALIVE: closed");
    let s = server.wait_stats("handshake timeouts counted", |s| {
        s.sum(|x| x.disconnects.handshake_timeout) == 2
    });
    assert_eq!(
        s.sum(|x| x.disconnects.timeout),
        0,
        "not a keepalive timeout"
    );
    assert_eq!(live_peers(&s), 1);
    // The established peer outlives the handshake timeout.
    std::thread::sleep(Duration::from_millis(1500));
    done.send(&Message::Subscribe(vni(4)));
    assert!(done.sync_point().is_empty());
    assert_eq!(
        server
            .handle()
            .stats()
            .sum(|x| x.disconnects.handshake_timeout),
        2
    );
}

#[test]
fn squatters_at_max_peers_make_room_for_real_peers_oldest_first() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const MAX: usize = 100;
    let server = TestServer::with(2, |c| {
        c.max_peers = MAX;
        c.limits.handshake_timeout = None; // eviction alone must do it
    });
    let (mut first, _) = TestPeer::established(server.addr, 5);
    first.keep_alive(Duration::from_millis(300));

    // The squatter: keeps MAX silent connections open, reconnecting as soon
    // as one is closed.
    let stop = Arc::new(AtomicBool::new(false));
    let squatter = {
        let (stop, addr) = (stop.clone(), server.addr);
        std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = Vec::new();
            let mut reconnects = 0u64;
            while !stop.load(Ordering::Relaxed) {
                conns.retain(|c| {
                    matches!(c.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while conns.len() < MAX {
                    let Ok(c) = TcpStream::connect(addr) else {
                        break;
                    };
                    c.set_nonblocking(true).unwrap();
                    conns.push(c);
                    reconnects += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            reconnects
        })
    };
    server.wait_stats("every place taken", |s| live_peers(s) >= MAX as u64);

    // Real peers still get in, every one of them, each while every place
    // is taken (by squatters, `first` and the real peers before it, which
    // stay connected: a place a real peer freed would let the next one in
    // without an eviction).
    let mut real = Vec::new();
    for _ in 0..60 {
        server.wait_stats("every place taken", |s| live_peers(s) >= MAX as u64);
        let (mut p, k) = TestPeer::established(server.addr, 5);
        assert_eq!(k, 5);
        p.keep_alive(Duration::from_millis(300));
        p.send(&Message::Subscribe(vni(6)));
        assert!(p.sync_point().is_empty(), "the real peer is served");
        real.push(p);
    }
    stop.store(true, Ordering::Relaxed);
    let reconnects = squatter.join().expect("squatter thread");
    assert!(
        reconnects > MAX as u64,
        "the squatter came back ({reconnects})"
    );
    // Each real peer took a squatter's place.
    let s = server.wait_stats("evictions counted", |s| {
        s.sum(|x| x.disconnects.evicted) >= 60
    });
    assert_eq!(
        s.sum(|x| x.connections_refused),
        0,
        "squatters were evicted, nobody refused"
    );
    // The established session was never evicted.
    first.send(&Message::Subscribe(vni(6)));
    assert!(first.sync_point().is_empty());
}

#[test]
fn too_many_routes_closes_only_that_peer_and_withdraws_its_routes() {
    let server = TestServer::with(2, |c| c.limits.max_routes_per_peer = 10);
    let mut sub = subscriber(&server, 9);
    let (mut other, _) = TestPeer::established(server.addr, 5);
    other.keep_alive(Duration::from_millis(500));
    let kept = route(9, 1000, 2);
    other.send(&add(kept));
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &BTreeSet::from([kept]));

    let (mut a, _) = TestPeer::established(server.addr, 5);
    let ten: Vec<Route> = (0..10).map(|i| route(9, i, 1)).collect();
    let mut msgs: Vec<Message> = ten.iter().map(|r| add(*r)).collect();
    // A repeated ADD is not a new route: still within the limit.
    msgs.push(add(ten[0]));
    a.send_all(&msgs);
    let mut want: BTreeSet<Route> = ten.iter().copied().collect();
    want.insert(kept);
    sub.converge(&mut state, &want);
    a.send(&add(route(9, 10, 1)));
    assert!(a.closed_within(WAIT), "11th route closes the peer");
    sub.converge(&mut state, &BTreeSet::from([kept]));
    assert!(sub.sync_point().is_empty(), "each route withdrawn once");
    let s = server.wait_stats("limit disconnect", |s| s.sum(|x| x.disconnects.limit) == 1);
    assert_eq!(s.sum(|x| x.routes), 1);
    assert!(
        other.sync_point().is_empty(),
        "the other announcer unaffected"
    );
    fresh_peer_sees(&server, 9, &BTreeSet::from([kept]));
}

#[test]
fn subscribing_to_100k_vnis_is_refused_by_default() {
    let server = TestServer::start(2);
    let mut sub = subscriber(&server, 5);
    let (mut a, _) = TestPeer::established(server.addr, 5);
    let subs: Vec<Message> = (1..=100_000).map(|v| Message::Subscribe(vni(v))).collect();
    a.send_all(&subs);
    assert!(a.closed_within(WAIT), "closed past 10,000 subscriptions");
    server.wait_stats("limit disconnect", |s| {
        s.sum(|x| x.disconnects.limit) == 1 && live_peers(s) == 1
    });
    assert!(sub.sync_point().is_empty());
    fresh_peer_sees(&server, 5, &BTreeSet::new());
}

#[test]
fn subscribing_to_100k_vnis_works_with_a_raised_limit_and_is_undone_on_disconnect() {
    let server = TestServer::with(2, |c| c.limits.max_subscriptions_per_peer = 200_000);
    let (b, _) = TestPeer::established(server.addr, 5);
    b.keep_alive(Duration::from_millis(500));
    let r = route(77_777, 1, 3);
    b.send(&add(r));
    server.wait_route_count(1);

    let (mut a, _) = TestPeer::established(server.addr, 5);
    a.keep_alive(Duration::from_millis(500));
    let subs: Vec<Message> = (1..=100_000).map(|v| Message::Subscribe(vni(v))).collect();
    a.send_all(&subs);
    let mut state = BTreeSet::new();
    a.converge(&mut state, &BTreeSet::from([r]));
    let peers = server.wait_peers("100k subscriptions", |p| {
        p.iter().any(|i| i.vnis_subscribed.len() == 100_000)
    });
    assert_eq!(peers.len(), 2);
    a.close();
    drop(a);
    let peers = server.wait_peers("subscriber gone", |p| p.len() == 1);
    assert!(peers[0].vnis_subscribed.is_empty());
    assert_eq!(peers[0].queued_bytes, 0);
    let s = server.handle().stats();
    assert_eq!(s.sum(|x| x.routes), 1, "only b's route left");
    assert_eq!(s.sum(|x| x.disconnects.limit), 0);
    fresh_peer_sees(&server, 77_777, &BTreeSet::from([r]));
}

#[test]
fn update_flood_from_one_peer_converges_exactly() {
    const N: u32 = 200_000;
    let server = TestServer::start(2);
    let mut sub = subscriber(&server, 11);
    let (a, _) = TestPeer::established(server.addr, 5);
    a.keep_alive(Duration::from_millis(500));
    let routes: Vec<Route> = (0..N).map(|i| route(11, i, 1)).collect();
    let sender = std::thread::spawn(move || {
        for chunk in routes.chunks(10_000) {
            a.send_all(&chunk.iter().map(|r| add(*r)).collect::<Vec<_>>());
        }
        a
    });
    let want: BTreeSet<Route> = (0..N).map(|i| route(11, i, 1)).collect();
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &want);
    let a = sender.join().unwrap();
    assert!(sub.sync_point().is_empty(), "no duplicates or extras");
    server.wait_route_count(N as usize);
    // And all of it goes away with the announcer.
    a.close();
    drop(a);
    sub.converge(&mut state, &BTreeSet::new());
    server.wait_stats("table empty", |s| s.sum(|x| x.routes) == 0);
}

#[test]
fn garbage_after_valid_frames_closes_only_that_peer() {
    let server = TestServer::start(2);
    let mut sub = subscriber(&server, 21);
    let (mut other, _) = TestPeer::established(server.addr, 5);
    other.keep_alive(Duration::from_millis(500));
    let kept = route(21, 99, 2);
    other.send(&add(kept));
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &BTreeSet::from([kept]));
    let (mut a, _) = TestPeer::established(server.addr, 5);
    let mut bytes = Vec::new();
    for i in 0..5 {
        bytes.extend_from_slice(&frame(&add(route(21, i, 1))));
    }
    bytes.extend_from_slice(&[9, 0, 4, 5, 0xde, 0xad, 0xbe, 0xef]);
    a.send_raw(&bytes);
    assert!(a.closed_within(WAIT), "garbage closes the peer");
    server.wait_stats("malformed close, its routes withdrawn", |s| {
        s.sum(|x| x.disconnects.malformed) == 1 && s.sum(|x| x.routes) == 1
    });
    // Whatever of its routes reached the subscriber is withdrawn again.
    while let Some((act, r)) = sub.recv_update(Duration::from_secs(1)) {
        apply(&mut state, act, r);
    }
    assert_eq!(state, BTreeSet::from([kept]));
    assert!(other.sync_point().is_empty(), "the other peer unaffected");
    fresh_peer_sees(&server, 21, &BTreeSet::from([kept]));
}

#[test]
fn keepalive_zero_is_refused() {
    let server = TestServer::start(2);
    let mut p = TestPeer::connect(server.addr);
    p.send(&Message::Hello {
        keepalive_secs: 0,
        is_server: false,
        reads_stream: false,
    });
    assert!(p.closed_within(WAIT));
    server.wait_stats("protocol disconnect", |s| {
        s.sum(|x| x.disconnects.protocol) == 1 && live_peers(s) == 0
    });
    fresh_peer_sees(&server, 1, &BTreeSet::new());
}

#[test]
fn tcp_reset_mid_frame_withdraws_routes_exactly_once() {
    let server = TestServer::start(2);
    let mut sub = subscriber(&server, 31);
    let (a, _) = TestPeer::established(server.addr, 5);
    let mine: BTreeSet<Route> = (0..50).map(|i| route(31, i, 1)).collect();
    a.send_all(&mine.iter().map(|r| add(*r)).collect::<Vec<_>>());
    let mut state = BTreeSet::new();
    sub.converge(&mut state, &mine);
    // Half a frame, then a reset (SO_LINGER 0 makes close send RST).
    let half = frame(&add(route(31, 999, 1)));
    let mut raw = a.stream.try_clone().unwrap();
    raw.write_all(&half[..half.len() / 2]).unwrap();
    socket2::SockRef::from(&raw)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(raw);
    drop(a);
    sub.converge(&mut state, &BTreeSet::new());
    assert!(sub.sync_point().is_empty(), "each REMOVE exactly once");
    server.wait_stats("peer gone, table empty", |s| {
        live_peers(s) == 1 && s.sum(|x| x.routes) == 0 && s.sum(|x| x.disconnects.total()) == 1
    });
    fresh_peer_sees(&server, 31, &BTreeSet::new());
}

/// A peer that subscribes to a large VNI and never reads is cut off after
/// `--write-stall-timeout`: its paced writes never wait for room in the
/// socket, the reader's window tells that it takes nothing.
#[test]
fn a_subscriber_that_never_reads_is_cut_off_at_the_write_stall_timeout() {
    let server = TestServer::with(1, |c| {
        c.limits.write_stall_timeout = Some(Duration::from_secs(2))
    });
    let (announcer, _) = TestPeer::established(server.addr, 5);
    announcer.keep_alive(Duration::from_millis(500));
    let table: Vec<Route> = (0..20_000).map(|i| route(9, i, 1)).collect();
    announcer.send_all(&table.iter().map(|r| add(*r)).collect::<Vec<_>>());
    server.wait_route_count(table.len());
    let (mut sleeper, _) = TestPeer::established(server.addr, 60);
    sleeper.keep_alive(Duration::from_millis(500));
    sleeper.send(&Message::Subscribe(vni(9)));
    server.wait_stats("the sleeper cut off as a slow peer", |s| {
        s.sum(|x| x.disconnects.slow_peer) >= 1
    });
    assert!(sleeper.closed_within(WAIT), "its connection is closed");
    fresh_peer_sees(&server, 9, &table.iter().copied().collect());
}
