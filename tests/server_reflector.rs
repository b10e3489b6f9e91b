//! PROTOCOL.md "Reflector" rules, one test each, against an in-process
//! server on loopback (2 shards, so most pairs of peers span shards).

use metalbond_test_support::server as server_support;

use std::collections::BTreeSet;
use std::time::Duration;

use metalbond_wire::codec::Message;
use metalbond_wire::Action;
use server_support::*;

const QUIET: Duration = Duration::from_millis(300);

#[test]
fn update_fans_out_to_subscribers_but_not_to_the_origin() {
    let srv = TestServer::start(2);
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    let (mut b, _) = TestPeer::established(srv.addr, 5);
    let (mut c, _) = TestPeer::established(srv.addr, 5);
    for p in [&a, &b, &c] {
        p.send(&Message::Subscribe(vni(23)));
    }
    // Everyone is subscribed once each has had a round trip.
    for p in [&mut a, &mut b, &mut c] {
        p.sync_point();
    }
    srv.wait_peers("3 subscribers", |ps| {
        ps.iter()
            .filter(|p| p.vnis_subscribed == vec![vni(23)])
            .count()
            == 3
    });
    let r = route(23, 1, 1);
    a.send(&add(r));
    assert_eq!(b.recv_update(WAIT), Some((Action::Add, r)));
    assert_eq!(c.recv_update(WAIT), Some((Action::Add, r)));
    a.expect_no_update(QUIET);
    // Other VNIs are not sent.
    a.send(&add(route(24, 1, 1)));
    b.expect_no_update(QUIET);
}

#[test]
fn subscribe_syncs_existing_routes_except_own() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut b, _) = TestPeer::established(srv.addr, 5);
    let theirs: BTreeSet<_> = (0..50).map(|i| route(7, i, 1)).collect();
    let own = route(7, 1000, 2);
    a.send_all(&theirs.iter().map(|r| add(*r)).collect::<Vec<_>>());
    b.send(&add(own));
    srv.wait_route_count(51);
    b.send(&Message::Subscribe(vni(7)));
    let mut state = BTreeSet::new();
    b.converge(&mut state, &theirs);
    b.expect_no_update(QUIET);
    assert!(!state.contains(&own));
}

#[test]
fn second_subscribe_is_a_no_op() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut b, _) = TestPeer::established(srv.addr, 5);
    a.send(&add(route(3, 1, 1)));
    srv.wait_route_count(1);
    b.send(&Message::Subscribe(vni(3)));
    assert_eq!(b.recv_update(WAIT), Some((Action::Add, route(3, 1, 1))));
    b.send(&Message::Subscribe(vni(3)));
    b.expect_no_update(QUIET);
}

#[test]
fn duplicate_announcers_are_seen_once_and_removed_after_the_last() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (b, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.send(&Message::Subscribe(vni(9)));
    s.sync_point();
    srv.wait_peers("subscriber", |ps| {
        ps.iter().any(|p| !p.vnis_subscribed.is_empty())
    });
    let r = route(9, 5, 1);
    a.send(&add(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    b.send(&add(r));
    a.send(&add(r)); // same peer again: nothing either
    s.expect_no_update(QUIET);
    a.send(&remove(r));
    s.expect_no_update(QUIET);
    b.send(&remove(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, r)));
    srv.wait_route_count(0);
}

#[test]
fn remove_of_a_route_not_announced_is_ignored() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (b, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.send(&Message::Subscribe(vni(9)));
    let r = route(9, 5, 1);
    a.send(&add(r));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, r)));
    b.send(&remove(r)); // b never announced it
    s.expect_no_update(QUIET);
    srv.wait_route_count(1);
}

#[test]
fn unsubscribe_stops_updates_and_withdraws_own_routes_in_that_vni() {
    let srv = TestServer::start(2);
    let (mut a, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    a.send(&Message::Subscribe(vni(5)));
    s.send(&Message::Subscribe(vni(5)));
    a.sync_point();
    s.sync_point();
    let mine = route(5, 1, 1);
    let other_vni = route(6, 1, 1);
    a.send(&add(mine));
    a.send(&add(other_vni));
    assert_eq!(s.recv_update(WAIT), Some((Action::Add, mine)));
    a.send(&Message::Unsubscribe(vni(5)));
    assert_eq!(s.recv_update(WAIT), Some((Action::Remove, mine)));
    s.send(&add(route(5, 2, 2)));
    a.expect_no_update(QUIET);
    // Its route in the other VNI stays.
    srv.wait_route_count(2);
    let routes = srv.handle().routes();
    assert!(routes.iter().any(|v| v.vni == vni(6)));
}

#[test]
fn disconnect_withdraws_routes_and_subscriptions_exactly_once() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.send(&Message::Subscribe(vni(1)));
    s.send(&Message::Subscribe(vni(2)));
    a.send(&Message::Subscribe(vni(1)));
    let mut want = BTreeSet::new();
    for i in 0..20 {
        for v in [1, 2] {
            a.send(&add(route(v, i, 1)));
            want.insert(route(v, i, 1));
        }
    }
    let mut state = BTreeSet::new();
    s.converge(&mut state, &want);
    a.close();
    drop(a);
    s.converge(&mut state, &BTreeSet::new());
    s.expect_no_update(QUIET);
    srv.wait_route_count(0);
    let peers = srv.wait_peers("one peer left", |ps| ps.len() == 1);
    assert_eq!(peers[0].vnis_subscribed, vec![vni(1), vni(2)]);
    srv.wait_stats("one eof, no routes", |s| {
        s.sum(|s| s.disconnects.eof) == 1 && s.sum(|s| s.routes) == 0
    });
}

#[test]
fn every_subscriber_sees_the_same_order_for_a_route() {
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let mut subs: Vec<TestPeer> = (0..4)
        .map(|_| TestPeer::established(srv.addr, 5).0)
        .collect();
    for s in &mut subs {
        s.send(&Message::Subscribe(vni(11)));
        s.sync_point();
    }
    srv.wait_peers("subscribers", |ps| {
        ps.iter().filter(|p| !p.vnis_subscribed.is_empty()).count() == 4
    });
    let r = route(11, 1, 1);
    let mut msgs = Vec::new();
    for _ in 0..100 {
        msgs.push(add(r));
        msgs.push(remove(r));
    }
    msgs.push(add(r));
    a.send_all(&msgs);
    for s in &mut subs {
        let mut seen = Vec::new();
        for _ in 0..201 {
            seen.push(s.recv_update(WAIT).expect("update").0);
        }
        let want: Vec<Action> = (0..201)
            .map(|i| {
                if i % 2 == 0 {
                    Action::Add
                } else {
                    Action::Remove
                }
            })
            .collect();
        assert_eq!(seen, want);
    }
}

#[test]
fn nothing_arrives_for_a_vni_after_its_unsubscribe_even_under_load() {
    // Announcer and owner (VNI 4) on shard 0, subscriber on shard 1: the
    // deliveries cross shards, so some are in flight at the UNSUBSCRIBE.
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    s.send(&Message::Subscribe(vni(4)));
    s.sync_point();
    srv.wait_peers("subscribed", |ps| {
        ps.iter().any(|p| !p.vnis_subscribed.is_empty())
    });
    // Flood from another thread while the subscriber leaves.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Message> = (i..i + 500)
                    .flat_map(|k| [add(route(4, k, 1)), remove(route(4, k, 1))])
                    .collect();
                a.send_all(&batch);
                i += 500;
            }
            a
        })
    };
    assert!(
        s.recv_update(WAIT).is_some(),
        "flood reaches the subscriber"
    );
    s.send(&Message::Unsubscribe(vni(4)));
    // Everything before the KEEPALIVE reply may still come; nothing after.
    s.sync_point();
    s.expect_no_update(QUIET);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _a = flood.join().unwrap();
}

#[test]
fn unsubscribe_and_resubscribe_in_one_write_gives_a_clean_resync() {
    // Announcer and owner (VNI 4) on shard 0, subscriber on shard 1, flood
    // of changes: deliveries of the first subscription are in flight when
    // the second one starts; none of them may reach the peer after its
    // UNSUBSCRIBE, or the resync would show duplicate ADDs.
    let srv = TestServer::start(2);
    let (a, _) = TestPeer::established(srv.addr, 5);
    let (mut s, _) = TestPeer::established(srv.addr, 5);
    let base: Vec<Message> = (0..200).map(|k| add(route(4, 100_000 + k, 2))).collect();
    a.send_all(&base);
    s.send(&Message::Subscribe(vni(4)));
    s.sync_point();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<Message> = (i..i + 500)
                    .flat_map(|k| [add(route(4, k, 1)), remove(route(4, k, 1))])
                    .collect();
                a.send_all(&batch);
                i += 500;
            }
            a
        })
    };
    for round in 0..20 {
        s.send_all(&[
            Message::Unsubscribe(vni(4)),
            Message::Keepalive,
            Message::Subscribe(vni(4)),
        ]);
        // Up to the KEEPALIVE reply: the old subscription. After it: a
        // fresh view that must be consistent and hold the 200 base routes.
        s.sync_point();
        let mut view = BTreeSet::new();
        let want: BTreeSet<_> = (0..200).map(|k| route(4, 100_000 + k, 2)).collect();
        while !want.is_subset(&view) {
            let (act, r) = s
                .recv_update(WAIT)
                .unwrap_or_else(|| panic!("round {round}"));
            apply(&mut view, act, r);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _a = flood.join().unwrap();
}
