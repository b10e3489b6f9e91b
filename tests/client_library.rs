//! The client library over real TCP on loopback, against two scripted
//! servers, with a recording sink: present-set semantics across servers,
//! re-subscription and re-announcement on reconnect, loop prevention, the
//! per-server route limit.
//!
//! The scripted server is the smallest thing that lets a test decide
//! exactly which server holds which route: it speaks the passive side with
//! the crate's own `PeerSession` and sends the UPDATEs the test asks for.
//! End-to-end behaviour against the real reflector is in `client_e2e.rs`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalbond_client::{Client, ClientConfig, ClientError, RouteSink};
use metalbond_wire::codec::Message;
use metalbond_wire::session::SessionState;
use metalbond_wire::{Action, IpNet, NextHop, Route, Vni};

use client_support::{fast_config, route, vni, ScriptedServer, Seen, WAIT};
use metalbond_test_support::client as client_support;

/// Records every sink call.
#[derive(Clone, Default)]
struct RecordingSink(Arc<Mutex<Vec<Seen>>>);

impl RouteSink for RecordingSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.0
            .lock()
            .unwrap()
            .push(Seen::Add(Route::new(vni, destination, next_hop)));
    }
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.0
            .lock()
            .unwrap()
            .push(Seen::Remove(Route::new(vni, destination, next_hop)));
    }
}

impl RecordingSink {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn wait_len(&self, n: usize) -> Vec<Seen> {
        let deadline = Instant::now() + WAIT;
        while self.0.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.take()
    }
}

fn wait_established(client: &Client, address: &str) {
    let deadline = Instant::now() + WAIT;
    while client.server_state(address).unwrap() != SessionState::Established {
        assert!(Instant::now() < deadline, "{address} never established");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn present_set_across_two_servers() {
    let a = ScriptedServer::start();
    let b = ScriptedServer::start();
    let sink = RecordingSink::default();
    // A lost server's routes go at once here (stale holds are covered by
    // tests/client_stale.rs).
    let config = ClientConfig {
        stale_hold: Duration::ZERO,
        ..fast_config()
    };
    let client = Client::new(config, sink.clone());
    let own = route(23, "10.9.0.0/24", "2001:db8::99");
    client.subscribe(vni(23)).unwrap();
    client.announce(own).unwrap();
    client.add_server(&a.address).unwrap();
    client.add_server(&b.address).unwrap();
    wait_established(&client, &a.address);
    wait_established(&client, &b.address);

    // Both servers get the same subscriptions and announcements.
    let expected = vec![
        Message::Subscribe(vni(23)),
        Message::Update {
            action: Action::Add,
            route: own,
        },
    ];
    assert_eq!(a.expect_messages(2), expected);
    assert_eq!(b.expect_messages(2), expected);

    let x = route(23, "10.0.1.0/24", "2001:db8::1");
    a.send(Action::Add, x);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(x)]);
    b.send(Action::Add, x);
    a.send(Action::Add, x); // duplicate from A
    a.send(Action::Remove, x);
    // Nothing changes while B still holds x: a marker route proves the
    // updates above were processed.
    let marker = route(23, "10.0.2.0/24", "2001:db8::2");
    a.send(Action::Add, marker);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(marker)]);
    b.send(Action::Remove, x);
    assert_eq!(sink.wait_len(1), vec![Seen::Remove(x)]);

    // Loop prevention: a received route for our own (VNI, prefix) is held
    // but never present. Unsubscribed VNIs are ignored.
    a.send(Action::Add, route(23, "10.9.0.0/24", "2001:db8::5"));
    a.send(Action::Add, route(99, "10.99.0.0/24", "2001:db8::5"));
    let marker2 = route(23, "10.0.3.0/24", "2001:db8::2");
    a.send(Action::Add, marker2);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(marker2)]);

    // Withdrawing our route makes the received one on that prefix present.
    client.withdraw(own).unwrap();
    assert_eq!(
        sink.wait_len(1),
        vec![Seen::Add(route(23, "10.9.0.0/24", "2001:db8::5"))]
    );
    assert_eq!(
        a.expect_messages(1),
        vec![Message::Update {
            action: Action::Remove,
            route: own
        }]
    );
    assert_eq!(
        client.withdraw(own),
        Err(ClientError::RouteNotAnnounced(own))
    );

    // Failover: y held by both; A's session drops → still present; the
    // client reconnects to A, re-subscribes and re-announces.
    let y = route(23, "2001:db8:7::/64", "2001:db8::3");
    a.send(Action::Add, y);
    b.send(Action::Add, y);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(y)]);
    let own2 = route(23, "10.8.0.0/24", "2001:db8::99");
    client.announce(own2).unwrap();
    assert_eq!(a.expect_messages(1).len(), 1);
    assert_eq!(b.expect_messages(1).len(), 1);
    a.drop_connection();
    let deadline = Instant::now() + WAIT;
    while a.accepted() < 2 {
        assert!(Instant::now() < deadline, "client did not reconnect");
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_established(&client, &a.address);
    assert_eq!(
        a.expect_messages(2),
        vec![
            Message::Subscribe(vni(23)),
            Message::Update {
                action: Action::Add,
                route: own2
            }
        ]
    );
    // A's routes (marker, marker2, the 10.9 route) went with its session;
    // y stays because B holds it.
    let mut removed = sink.wait_len(3);
    removed.sort_by_key(|s| format!("{s:?}"));
    let mut want = vec![
        Seen::Remove(marker),
        Seen::Remove(marker2),
        Seen::Remove(route(23, "10.9.0.0/24", "2001:db8::5")),
    ];
    want.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(removed, want);
    assert!(client.present_routes().contains(&y));

    // Removing server B withdraws what only B held.
    client.remove_server(&b.address).unwrap();
    assert_eq!(sink.wait_len(1), vec![Seen::Remove(y)]);
    assert_eq!(client.servers().len(), 1);
    assert!(client.present_routes().is_empty());

    // Shutdown does not tell the sink to remove anything.
    a.send(Action::Add, x);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(x)]);
    client.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    assert!(sink.take().is_empty());
}

#[test]
fn unsubscribe_withdraws_received_routes_and_reannounces() {
    let a = ScriptedServer::start();
    let sink = RecordingSink::default();
    let client = Client::new(fast_config(), sink.clone());
    client.add_server(&a.address).unwrap();
    wait_established(&client, &a.address);
    client.subscribe(vni(23)).unwrap();
    let own = route(23, "10.9.0.0/24", "2001:db8::99");
    client.announce(own).unwrap();
    assert_eq!(a.expect_messages(2).len(), 2);
    let x = route(23, "10.0.1.0/24", "2001:db8::1");
    a.send(Action::Add, x);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(x)]);
    client.unsubscribe(vni(23)).unwrap();
    assert_eq!(sink.wait_len(1), vec![Seen::Remove(x)]);
    // UNSUBSCRIBE, then our announcement again (servers drop a peer's
    // routes in a VNI it leaves).
    assert_eq!(
        a.expect_messages(2),
        vec![
            Message::Unsubscribe(vni(23)),
            Message::Update {
                action: Action::Add,
                route: own
            }
        ]
    );
    assert_eq!(
        client.unsubscribe(vni(23)),
        Err(ClientError::NotSubscribed(vni(23)))
    );
}

#[test]
fn unreachable_server_is_retried_and_reported() {
    // A port with nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let client = Client::new(fast_config(), RecordingSink::default());
    client.add_server(&address).unwrap();
    assert_eq!(
        client.add_server(&address),
        Err(ClientError::ServerAlreadyAdded(address.clone()))
    );
    let deadline = Instant::now() + WAIT;
    while client.server_state(&address).unwrap() != SessionState::Retry {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    // A server appearing later is picked up by the retry loop.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                drop(conn);
                break;
            }
            Err(_) => {
                assert!(Instant::now() < deadline, "client never retried");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    client.remove_server(&address).unwrap();
    assert!(client.servers().is_empty());
}

#[test]
fn handle_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Client>();
}

#[test]
fn http_status_serves_present_routes_as_json() {
    let a = ScriptedServer::start();
    let client = Client::new(fast_config(), RecordingSink::default());
    client.subscribe(vni(23)).unwrap();
    client.add_server(&a.address).unwrap();
    wait_established(&client, &a.address);
    let x = route(23, "10.0.1.0/24", "2001:db8::1");
    a.send(Action::Add, x);
    let deadline = Instant::now() + WAIT;
    while client.present_routes().is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let http = metalbond_http::serve(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(metalbond_client::ClientStatusSource::new(&client, None)),
    )
    .unwrap();
    let get = |path: &str| {
        let mut conn = TcpStream::connect(http.local_addr()).unwrap();
        conn.set_read_timeout(Some(WAIT)).unwrap();
        write!(conn, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text
    };
    let json = get("/routes.json");
    assert!(json.starts_with("HTTP/1.0 200"), "{json}");
    let body = json.split("\r\n\r\n").nth(1).unwrap();
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        doc["vnet"]["23"][r#"{"IPVersion":4,"Prefix":"10.0.1.0/24"}"#][0]["TargetAddress"],
        "2001:db8::1"
    );
    assert!(get("/").contains("VNI 23"));
    assert!(get("/routes.yaml").contains("10.0.1.0/24"));
    assert!(get("/nope").starts_with("HTTP/1.0 404"));
}

#[test]
fn server_past_the_route_limit_is_cut_and_its_routes_withdrawn() {
    let a = ScriptedServer::start();
    let b = ScriptedServer::start();
    let sink = RecordingSink::default();
    let limit = 100;
    let client = Client::new(
        ClientConfig {
            max_routes_per_server: limit,
            // Slow enough that A's reconnect cannot race the checks below.
            reconnect_min: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(4),
            ..fast_config()
        },
        sink.clone(),
    );
    client.subscribe(vni(23)).unwrap();
    client.add_server(&a.address).unwrap();
    client.add_server(&b.address).unwrap();
    wait_established(&client, &a.address);
    wait_established(&client, &b.address);
    assert_eq!(a.expect_messages(1).len(), 1);
    assert_eq!(b.expect_messages(1).len(), 1);
    let routes: Vec<Route> = (0..=limit)
        .map(|i| {
            route(
                23,
                &format!("10.1.{}.{}/32", i / 256, i % 256),
                "2001:db8::1",
            )
        })
        .collect();
    // B holds the first of them too; the limit is per server.
    b.send(Action::Add, routes[0]);
    assert_eq!(sink.wait_len(1), vec![Seen::Add(routes[0])]);
    // Exactly the limit is fine, and so are repeats and removals at it.
    for r in &routes[..limit] {
        a.send(Action::Add, *r);
    }
    a.send(Action::Add, routes[1]);
    a.send(Action::Remove, routes[2]);
    a.send(Action::Add, routes[2]);
    let seen = sink.wait_len(limit + 1);
    assert_eq!(seen.len(), limit + 1, "{seen:?}");
    assert_eq!(client.servers()[0].routes_received, limit);
    assert_eq!(
        client.server_state(&a.address).unwrap(),
        SessionState::Established
    );
    // One more distinct route closes A's session with the limit as reason;
    // everything only A held is withdrawn, routes[0] stays through B.
    a.send(Action::Add, routes[limit]);
    let mut removed = sink.wait_len(limit - 1);
    removed.sort_by_key(|s| format!("{s:?}"));
    let mut want: Vec<Seen> = routes[1..limit].iter().map(|r| Seen::Remove(*r)).collect();
    want.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(removed, want);
    assert_eq!(client.present_routes(), vec![routes[0]]);
    assert!(
        client.disconnects().contains(&("limit", 1)),
        "{:?}",
        client.disconnects()
    );
    assert_ne!(
        client.server_state(&a.address).unwrap(),
        SessionState::Established
    );
    assert_eq!(
        client.server_state(&b.address).unwrap(),
        SessionState::Established
    );
    // A is tried again (after the backoff) like any other lost session.
    let deadline = Instant::now() + WAIT;
    while a.accepted() < 2 {
        assert!(Instant::now() < deadline, "client did not reconnect to A");
        std::thread::sleep(Duration::from_millis(20));
    }
    client.shutdown();
}
