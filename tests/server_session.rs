//! PROTOCOL.md "Session" rules on the server side, one test each, over real
//! TCP on loopback.

use metalbond_test_support::server as server_support;

use std::time::{Duration, Instant};

use metalbond_wire::codec::Message;
use metalbond_wire::Action;
use server_support::*;

#[test]
fn hello_negotiates_the_smaller_interval_and_server_says_it_is_the_server() {
    let srv = TestServer::start(1);
    let (_a, k) = TestPeer::established(srv.addr, 3);
    assert_eq!(k, 3, "client offered less than our 5");
    let (_b, k) = TestPeer::established(srv.addr, 60);
    assert_eq!(k, 5, "never above our own");
    let peers = srv.wait_peers("2 established", |ps| {
        ps.len() == 2 && ps.iter().all(|p| p.state.name() == "ESTABLISHED")
    });
    let mut ks: Vec<u64> = peers.iter().map(|p| p.keepalive.as_secs()).collect();
    ks.sort();
    assert_eq!(ks, vec![3, 5]);
}

#[test]
fn every_keepalive_is_answered() {
    let srv = TestServer::start(1);
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    for _ in 0..5 {
        a.send(&Message::Keepalive);
        assert_eq!(a.recv(WAIT), Some(Message::Keepalive));
    }
}

#[test]
fn hello_with_interval_zero_closes() {
    let srv = TestServer::start(1);
    let mut a = TestPeer::connect(srv.addr);
    a.send(&Message::Hello {
        keepalive_secs: 0,
        is_server: false,
        reads_stream: false,
    });
    assert!(a.closed_within(WAIT));
    srv.wait_stats("protocol disconnect", |s| {
        s.sum(|s| s.disconnects.protocol) == 1
    });
}

#[test]
fn keepalive_before_hello_closes() {
    let srv = TestServer::start(1);
    let mut a = TestPeer::connect(srv.addr);
    a.send(&Message::Keepalive);
    assert!(a.closed_within(WAIT));
}

#[test]
fn routing_messages_before_established_close() {
    let srv = TestServer::start(1);
    for early in [
        Message::Subscribe(vni(1)),
        Message::Unsubscribe(vni(1)),
        add(route(1, 1, 1)),
    ] {
        // Before HELLO.
        let mut a = TestPeer::connect(srv.addr);
        a.send(&early);
        assert!(a.closed_within(WAIT), "{early:?} before HELLO");
        // After HELLO, before the first KEEPALIVE.
        let mut b = TestPeer::connect(srv.addr);
        b.send(&Message::Hello {
            keepalive_secs: 5,
            is_server: false,
            reads_stream: false,
        });
        assert!(matches!(b.recv(WAIT), Some(Message::Hello { .. })));
        b.send(&early);
        assert!(b.closed_within(WAIT), "{early:?} after HELLO");
    }
    srv.wait_route_count(0);
}

#[test]
fn second_hello_closes() {
    let srv = TestServer::start(1);
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    a.send(&Message::Hello {
        keepalive_secs: 5,
        is_server: false,
        reads_stream: false,
    });
    assert!(a.closed_within(WAIT));
}

#[test]
fn keepalive_timeout_closes_and_withdraws_routes() {
    // Server interval 1 s: a silent peer is dead after 2.5 s.
    let srv = TestServer::with(2, |c| c.keepalive = Duration::from_secs(1));
    let (mut silent, k) = TestPeer::established(srv.addr, 5);
    assert_eq!(k, 1);
    let (mut watcher, _) = TestPeer::established(srv.addr, 5);
    watcher.keep_alive(Duration::from_millis(300));
    watcher.send(&Message::Subscribe(vni(4)));
    let r = route(4, 1, 1);
    silent.send(&add(r));
    let t0 = Instant::now();
    assert_eq!(watcher.recv_update(WAIT), Some((Action::Add, r)));
    assert!(silent.closed_within(WAIT), "silent peer closed");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(2000),
        "closed only after the hold time, not at once ({waited:?})"
    );
    assert_eq!(watcher.recv_update(WAIT), Some((Action::Remove, r)));
    srv.wait_stats("timeout disconnect", |s| {
        s.sum(|s| s.disconnects.timeout) == 1
    });
    // The watcher, which keeps sending keepalives, is still there.
    let peers = srv.wait_peers("watcher alone", |ps| ps.len() == 1);
    assert_eq!(peers[0].vnis_subscribed, vec![vni(4)]);
    assert!(watcher.sync_point().is_empty());
}

#[test]
fn peer_that_keeps_sending_keepalives_stays() {
    let srv = TestServer::with(1, |c| c.keepalive = Duration::from_secs(1));
    let (a, _) = TestPeer::established(srv.addr, 1);
    a.keep_alive(Duration::from_millis(400));
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!a.eof);
    assert_eq!(srv.handle().peers().len(), 1);
    assert_eq!(srv.handle().stats().sum(|s| s.disconnects.total()), 0);
}
