//! The client's stale rules (hitless restarts, issue #13) against scripted
//! servers on loopback: a lost session's routes stay present until received
//! again (no change for the sink), withdrawn (at once) or swept when the
//! hold ends; a route is present while any server holds it fresh or stale;
//! unsubscribing drops stale routes at once; `stale_hold` zero is the old
//! behaviour.

use metalbond_test_support::client as client_support;

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use metalbond_client::{Client, ClientConfig};
use metalbond_wire::{Action, Route};

use client_support::*;

/// Long enough to see that the sink hears nothing.
const QUIET: Duration = Duration::from_millis(400);

fn client(hold: Duration) -> (Client, Receiver<Seen>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let config = ClientConfig {
        stale_hold: hold,
        ..fast_config()
    };
    let c = Client::new(config, ChannelSink(tx));
    c.subscribe(vni(23)).unwrap();
    (c, rx)
}

fn quiet(rx: &Receiver<Seen>) {
    if let Ok(got) = rx.recv_timeout(QUIET) {
        panic!("the sink heard {got:?}");
    }
}

fn established(c: &Client, server: &ScriptedServer) {
    c.wait_established(&server.address, WAIT)
        .expect("session established");
}

#[test]
fn a_lost_sessions_routes_stay_until_refreshed_withdrawn_or_swept() {
    let hold = Duration::from_secs(2);
    let s = ScriptedServer::start();
    let (c, rx) = client(hold);
    c.add_server(&s.address).unwrap();
    let mut connections = 0;
    s.wait_connections(1, &mut connections);
    established(&c, &s);
    let (refreshed, withdrawn, vanished) = (
        route(23, "10.0.1.0/24", "2001:db8::1"),
        route(23, "10.0.2.0/24", "2001:db8::1"),
        route(23, "10.0.3.0/24", "2001:db8::1"),
    );
    for r in [refreshed, withdrawn, vanished] {
        s.send(Action::Add, r);
        expect(&rx, Seen::Add(r));
    }

    // The session is lost: nothing changes for the sink.
    s.drop_connection();
    let lost = Instant::now();
    s.wait_connections(2, &mut connections);
    established(&c, &s);
    quiet(&rx);
    assert_eq!(c.present_routes().len(), 3);
    let status = &c.servers()[0];
    assert_eq!((status.routes_received, status.routes_stale), (3, 3));

    // The new session's sync: received again, simply fresh. Withdrawn
    // explicitly: at once.
    s.send(Action::Add, refreshed);
    s.send(Action::Remove, withdrawn);
    expect(&rx, Seen::Remove(withdrawn));
    assert!(lost.elapsed() < hold, "too slow to check within the hold");
    quiet(&rx);
    assert_eq!(c.servers()[0].routes_stale, 1);

    // The hold ends: what was not received again goes, nothing else.
    expect(&rx, Seen::Remove(vanished));
    assert!(lost.elapsed() >= hold, "swept after {:?}", lost.elapsed());
    quiet(&rx);
    assert_eq!(c.present_routes(), vec![refreshed]);
    assert_eq!(c.servers()[0].routes_stale, 0);
}

#[test]
fn a_route_stays_while_any_server_holds_it_fresh_or_stale() {
    let hold = Duration::from_secs(1);
    let (a, b) = (ScriptedServer::start(), ScriptedServer::start());
    let (c, rx) = client(hold);
    c.add_server(&a.address).unwrap();
    c.add_server(&b.address).unwrap();
    let (mut na, mut nb) = (0, 0);
    a.wait_connections(1, &mut na);
    b.wait_connections(1, &mut nb);
    established(&c, &a);
    established(&c, &b);
    let (both, only_a) = (
        route(23, "10.0.1.0/24", "2001:db8::1"),
        route(23, "10.0.2.0/24", "2001:db8::1"),
    );
    a.send(Action::Add, both);
    expect(&rx, Seen::Add(both));
    a.send(Action::Add, only_a);
    expect(&rx, Seen::Add(only_a));
    b.send(Action::Add, both);
    quiet(&rx);
    // a's session is lost and a never sends again: after the hold its
    // route goes, the one b holds stays.
    a.drop_connection();
    expect(&rx, Seen::Remove(only_a));
    quiet(&rx);
    assert_eq!(c.present_routes(), vec![both]);
    // b withdraws it: gone.
    b.send(Action::Remove, both);
    expect(&rx, Seen::Remove(both));
}

#[test]
fn unsubscribing_drops_stale_routes_at_once() {
    let s = ScriptedServer::start();
    let (c, rx) = client(Duration::from_secs(60));
    c.add_server(&s.address).unwrap();
    let mut n = 0;
    s.wait_connections(1, &mut n);
    established(&c, &s);
    let r = route(23, "10.0.1.0/24", "2001:db8::1");
    s.send(Action::Add, r);
    expect(&rx, Seen::Add(r));
    s.drop_connection();
    s.wait_connections(2, &mut n);
    quiet(&rx);
    c.unsubscribe(vni(23)).unwrap();
    expect(&rx, Seen::Remove(r));
}

#[test]
fn a_zero_hold_removes_a_lost_sessions_routes_at_once() {
    let s = ScriptedServer::start();
    let (c, rx) = client(Duration::ZERO);
    c.add_server(&s.address).unwrap();
    let mut n = 0;
    s.wait_connections(1, &mut n);
    established(&c, &s);
    let r = route(23, "10.0.1.0/24", "2001:db8::1");
    s.send(Action::Add, r);
    expect(&rx, Seen::Add(r));
    s.drop_connection();
    expect(&rx, Seen::Remove(r));
}

#[test]
fn a_server_whose_table_changed_is_not_cut_off_for_its_stale_copies() {
    let s = ScriptedServer::start();
    let (tx, rx) = crossbeam_channel::unbounded();
    let config = ClientConfig {
        stale_hold: Duration::from_secs(60),
        max_routes_per_server: 3,
        ..fast_config()
    };
    let c = Client::new(config, ChannelSink(tx));
    c.subscribe(vni(23)).unwrap();
    c.add_server(&s.address).unwrap();
    let mut n = 0;
    s.wait_connections(1, &mut n);
    established(&c, &s);
    let old: Vec<Route> = (1..=3)
        .map(|i| route(23, &format!("10.0.{i}.0/24"), "2001:db8::1"))
        .collect();
    for r in &old {
        s.send(Action::Add, *r);
        expect(&rx, Seen::Add(*r));
    }
    s.drop_connection();
    s.wait_connections(2, &mut n);
    established(&c, &s);
    // The new table is another one: at the limit, the stale copies go to
    // make room instead of the session being closed.
    let new = route(23, "10.1.1.0/24", "2001:db8::2");
    s.send(Action::Add, new);
    let mut seen: Vec<Seen> = (0..4)
        .map(|_| rx.recv_timeout(WAIT).expect("a change"))
        .collect();
    seen.sort_by_key(|c| match c {
        Seen::Add(r) | Seen::Remove(r) => *r,
    });
    let mut want: Vec<Seen> = old.iter().map(|r| Seen::Remove(*r)).collect();
    want.push(Seen::Add(new));
    assert_eq!(seen, want);
    assert!(c.disconnects().iter().all(|(reason, _)| *reason != "limit"));
    assert_eq!(c.present_routes(), vec![new]);
}
