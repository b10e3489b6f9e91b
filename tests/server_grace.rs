//! `--peer-grace`: a departed peer's routes are held by a ghost for the
//! grace period (subscribers see nothing), a new announcer of the same route
//! keeps it, the rest is withdrawn at expiry; explicit REMOVE and
//! UNSUBSCRIBE are never delayed; the held routes are bounded (per shard
//! and per address); a ghost whose routes were all taken over is gone; a
//! REMOVE of a route the session never announced leaves a ghost's claim
//! alone (issue #24). Plus the
//! other half of a reflector restart: SIGTERM closes every session at once.
//! In-process server on loopback (2 shards) with raw TCP peers, and the real
//! binary for the signal.

use metalbond_test_support::server as server_support;

use std::time::{Duration, Instant};

use metalbond_wire::codec::Message;
use metalbond_wire::Action;
use server_support::process::{free_port, server, wait_exit, wait_listening};
use server_support::*;

/// Long enough to see that nothing happens within the grace period.
const QUIET: Duration = Duration::from_millis(500);

/// Subscriber `s` is subscribed to `v` and the server knows it.
fn subscribed(srv: &TestServer, s: &mut TestPeer, v: u32) {
    s.send(&Message::Subscribe(vni(v)));
    s.sync_point();
    srv.wait_peers("the subscription", |ps| {
        ps.iter().any(|p| p.vnis_subscribed.contains(&vni(v)))
    });
}

#[test]
fn a_departed_peers_routes_stay_for_the_grace_and_only_unclaimed_ones_go_after() {
    let grace = Duration::from_secs(3);
    let srv = TestServer::with(2, |c| c.peer_grace = Some(grace));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.keep_alive(Duration::from_secs(1));
    subscribed(&srv, &mut s, 23);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (kept, dropped) = (route(23, 1, 1), route(23, 2, 1));
    a.send_all(&[add(kept), add(dropped)]);
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, kept)));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, dropped)));

    // The announcer goes away: subscribers see nothing, the server shows a
    // ghost holding both routes.
    a.close();
    drop(a);
    let departed = Instant::now();
    let peers = srv.wait_peers("the ghost", |ps| ps.iter().any(|p| p.grace_left.is_some()));
    let ghost = peers.iter().find(|p| p.grace_left.is_some()).unwrap();
    assert_eq!(ghost.routes_announced, 2);
    assert!(ghost.grace_left.unwrap() <= grace);
    srv.wait_stats("2 routes held", |st| {
        st.shards.iter().map(|s| s.grace_routes).sum::<u64>() == 2
    });
    s.expect_no_update(QUIET);
    srv.wait_route_count(2);

    // The restarted agent (a new connection) announces one of them again:
    // still nothing for the subscribers.
    let (a2, _) = TestPeer::established(srv.addr, 5);
    a2.keep_alive(Duration::from_secs(1));
    a2.send(&add(kept));
    s.expect_no_update(QUIET);
    assert!(
        departed.elapsed() < grace,
        "the machine was too slow to check within the grace period"
    );

    // Expiry: the route nobody re-announced goes, the other stays.
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, dropped)));
    assert!(departed.elapsed() >= grace - Duration::from_millis(50));
    s.expect_no_update(QUIET);
    srv.wait_route_count(1);
    srv.wait_stats("nothing held", |st| {
        st.shards.iter().map(|s| s.grace_routes).sum::<u64>() == 0
    });
    srv.wait_peers("no ghost", |ps| ps.iter().all(|p| p.grace_left.is_none()));
}

#[test]
fn explicit_remove_and_unsubscribe_are_not_delayed_by_the_grace() {
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    subscribed(&srv, &mut s, 23);
    subscribed(&srv, &mut s, 24);
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    let (r1, r2) = (route(23, 1, 1), route(24, 1, 1));
    a.send(&Message::Subscribe(vni(24)));
    a.send_all(&[add(r1), add(r2)]);
    a.sync_point();
    // Two VNIs, two owners: no order between them.
    let mut added = [s.recv_update(WAIT), s.recv_update(WAIT)];
    added.sort_by_key(|u| u.map(|(_, r)| r));
    assert_eq!(added, [Some((Action::Add, r1)), Some((Action::Add, r2))]);
    // REMOVE from a live session: at once.
    let t = Instant::now();
    a.send(&remove(r1));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r1)));
    // UNSUBSCRIBE drops the peer's announcements in that VNI: at once.
    a.send(&Message::Unsubscribe(vni(24)));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r2)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Nothing left to hold when it goes.
    a.close();
    drop(a);
    s.expect_no_update(QUIET);
    srv.wait_route_count(0);
    srv.wait_peers("the peer gone, no ghost", |ps| {
        ps.len() == 1 && ps.iter().all(|p| p.grace_left.is_none())
    });
}

#[test]
fn held_routes_are_bounded_per_shard_oldest_departure_first() {
    // One shard so that all ghosts count against the same bound: 4 routes
    // (twice the 2 routes one peer may announce).
    let srv = TestServer::with(1, |c| {
        c.peer_grace = Some(Duration::from_secs(60));
        c.peer_grace_max_routes = 1;
        c.limits.max_routes_per_peer = 2;
    });
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.keep_alive(Duration::from_secs(1));
    subscribed(&srv, &mut s, 5);
    let first = [route(5, 1, 1), route(5, 2, 1)];
    let second = [route(5, 3, 2), route(5, 4, 2)];
    let third = [route(5, 5, 3), route(5, 6, 3)];
    for routes in [&first, &second, &third] {
        let (p, _) = TestPeer::established(srv.addr, 5);
        p.send_all(&routes.iter().map(|r| add(*r)).collect::<Vec<_>>());
        for r in routes.iter() {
            assert_eq!(s.recv_update(WAIT), Some((Action::Add, *r)));
        }
        p.close();
        drop(p);
        srv.wait_stats("the departure held", |st| {
            st.shards.iter().map(|s| s.grace_routes).sum::<u64>() >= 2
        });
    }
    // 6 routes > 4: the first departure's routes go now, the others stay.
    let mut removed = vec![
        s.recv_update(WAIT).expect("a removal"),
        s.recv_update(WAIT).expect("a removal"),
    ];
    removed.sort_by_key(|(_, r)| *r);
    assert_eq!(
        removed,
        vec![(Action::Remove, first[0]), (Action::Remove, first[1])]
    );
    s.expect_no_update(QUIET);
    srv.wait_route_count(4);
}

#[test]
fn the_restarted_peers_remove_takes_effect_at_once() {
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    subscribed(&srv, &mut s, 23);
    let r = route(23, 1, 1);
    let (a, _) = TestPeer::established(srv.addr, 5);
    a.send(&add(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    a.close();
    drop(a);
    srv.wait_peers("the ghost", |ps| ps.iter().any(|p| p.grace_left.is_some()));
    // Its successor (same address) takes the route over, then the VM goes:
    // the REMOVE is not held back by the ghost.
    let (mut a2, _) = TestPeer::established(srv.addr, 5);
    a2.send(&add(r));
    a2.sync_point();
    s.expect_no_update(QUIET);
    let t = Instant::now();
    a2.send(&remove(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    srv.wait_route_count(0);
}

#[test]
fn a_restarted_subscriber_sees_its_own_route_only_while_the_ghost_holds_it() {
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    subscribed(&srv, &mut s, 23);
    let r = route(23, 1, 1);
    // The agent subscribes to the VNI it announces in (as metalnet does).
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    a.send(&Message::Subscribe(vni(23)));
    a.send(&add(r));
    a.sync_point();
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    a.close();
    drop(a);
    srv.wait_peers("the ghost", |ps| ps.iter().any(|p| p.grace_left.is_some()));
    // Restarted: it subscribes first and is synced the ghost's route (held
    // by another peer), then announces it again: now only it announces the
    // route, so it is told to forget it.
    let (mut a2, _) = TestPeer::established(srv.addr, 5);
    a2.send(&Message::Subscribe(vni(23)));
    assert_eq!(a2.recv_update(WAIT), Some((Action::Add, r)));
    a2.send(&add(r));
    assert_eq!(a2.recv_update(WAIT), Some((Action::Remove, r)));
    s.expect_no_update(QUIET);
    // It withdraws: subscribers hear it, the agent's own view stays empty.
    a2.send(&remove(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    a2.expect_no_update(QUIET);
}

#[test]
fn without_grace_a_departure_withdraws_at_once() {
    let srv = TestServer::start(2);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    subscribed(&srv, &mut s, 23);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let r = route(23, 1, 1);
    a.send(&add(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    a.close();
    drop(a);
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    assert!(srv.handle().peers().iter().all(|p| p.grace_left.is_none()));
}

#[test]
fn sigterm_closes_every_session_at_once_and_leaves_no_ghosts() {
    let addr = free_port("127.0.0.1");
    let listen = addr.to_string();
    let mut child = server(&["--listen", &listen, "--peer-grace", "60"]);
    wait_listening(&mut child, &[addr]).expect("server listens");
    let mut peers: Vec<TestPeer> = (0..3).map(|_| TestPeer::established(addr, 5).0).collect();
    peers[0].send(&add(route(23, 1, 1)));
    peers[0].sync_point();
    let t = Instant::now();
    child.signal(libc::SIGTERM);
    for p in &mut peers {
        assert!(p.closed_within(WAIT), "session not closed on SIGTERM");
    }
    // The sessions end promptly (clients reconnect to the next process at
    // once); the bound is generous for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(wait_exit(&mut child).success());
}

#[test]
fn a_ghost_whose_routes_were_all_taken_over_is_gone() {
    // Issue #24: 200 sessions from one address, each announcing the same
    // route and leaving, left 201 ghosts and 203 "held" routes for a table
    // of one route, each in `/peers` and the gauges until its grace ended.
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.keep_alive(Duration::from_secs(1));
    subscribed(&srv, &mut s, 23);
    let r = route(23, 1, 1);
    for _ in 0..200 {
        // Sessions alternate between the two shards: successors take over
        // from ghosts on their own shard and on the other.
        let (mut a, _) = TestPeer::established(srv.addr, 5);
        a.send(&add(r));
        a.sync_point();
        a.close();
        drop(a);
        // Its ghost is in place before the next session announces.
        srv.wait_peers("the session over", |ps| {
            ps.iter().filter(|p| p.grace_left.is_none()).count() == 1
        });
    }
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    s.expect_no_update(QUIET);
    let peers = srv.handle().peers();
    let ghosts: Vec<_> = peers.iter().filter(|p| p.grace_left.is_some()).collect();
    assert_eq!(ghosts.len(), 1, "one ghost, the last session's");
    assert_eq!(ghosts[0].routes_announced, 1);
    let held: u64 = srv
        .handle()
        .stats()
        .shards
        .iter()
        .map(|s| s.grace_routes)
        .sum();
    assert_eq!(held, 1, "one route held");
    srv.wait_route_count(1);
}

#[test]
fn a_remove_of_a_route_the_session_never_announced_leaves_a_ghosts_route_alone() {
    // Another process behind the ghost's address (NAT, several agents on a
    // host) sends REMOVE for a route it never announced: PROTOCOL.md says
    // such a REMOVE is ignored, and it is for the ghost's claim too.
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.keep_alive(Duration::from_secs(1));
    subscribed(&srv, &mut s, 23);
    let r = route(23, 1, 1);
    let (a, _) = TestPeer::established(srv.addr, 5);
    a.send(&add(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    a.close();
    drop(a);
    srv.wait_peers("the ghost", |ps| ps.iter().any(|p| p.grace_left.is_some()));
    let (mut b, _) = TestPeer::established(srv.addr, 5);
    b.send(&remove(r));
    b.sync_point();
    s.expect_no_update(QUIET);
    let held: u64 = srv
        .handle()
        .stats()
        .shards
        .iter()
        .map(|s| s.grace_routes)
        .sum();
    assert_eq!(held, 1, "the ghost still holds the route");
    // Announcing it first makes the session its successor: then its REMOVE
    // takes effect at once.
    b.send_all(&[add(r), remove(r)]);
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    srv.wait_route_count(0);
    srv.wait_peers("no ghost", |ps| ps.iter().all(|p| p.grace_left.is_none()));
    let held: u64 = srv
        .handle()
        .stats()
        .shards
        .iter()
        .map(|s| s.grace_routes)
        .sum();
    assert_eq!(held, 0);
}

#[test]
fn a_remove_of_a_route_announced_before_the_ghost_existed_takes_effect_at_once() {
    // The new session was up before the old one was found dead (a reboot:
    // the old session ends at its keepalive timeout), and had announced
    // the route already: its REMOVE still ends the ghost's claim.
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    subscribed(&srv, &mut s, 23);
    let r = route(23, 1, 1);
    let (mut old, _) = TestPeer::established(srv.addr, 5);
    old.send(&add(r));
    old.sync_point();
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    let (mut new, _) = TestPeer::established(srv.addr, 5);
    new.send(&add(r));
    new.sync_point();
    old.close();
    drop(old);
    srv.wait_stats("the route held", |st| {
        st.shards.iter().map(|s| s.grace_routes).sum::<u64>() == 1
    });
    s.expect_no_update(QUIET);
    new.send(&remove(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    srv.wait_peers("no ghost", |ps| ps.iter().all(|p| p.grace_left.is_none()));
}

#[test]
fn an_address_keeps_at_most_256_ghosts_oldest_withdrawn_first() {
    // Each route a peer announces is looked up in the ghosts of its
    // address: a peer reconnecting in a loop with new routes each time
    // must not make that cost grow up to the shards' bounds.
    let srv = TestServer::with(2, |c| c.peer_grace = Some(Duration::from_secs(60)));
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.keep_alive(Duration::from_secs(1));
    subscribed(&srv, &mut s, 23);
    for i in 0..257 {
        let (mut a, _) = TestPeer::established(srv.addr, 5);
        a.send(&add(route(23, i, 1)));
        a.sync_point();
        a.close();
        drop(a);
        srv.wait_peers("the session over", |ps| {
            ps.iter().filter(|p| p.grace_left.is_none()).count() == 1
        });
    }
    let mut seen = Vec::new();
    while let Some(u) = s.recv_update(QUIET) {
        seen.push(u);
    }
    assert_eq!(
        seen.len(),
        258,
        "257 ADDs and one REMOVE: {:?}",
        seen.last()
    );
    assert_eq!(seen.last(), Some(&(Action::Remove, route(23, 0, 1))));
    let held: u64 = srv
        .handle()
        .stats()
        .shards
        .iter()
        .map(|s| s.grace_routes)
        .sum();
    assert_eq!(held, 256);
    srv.wait_route_count(256);
}
