//! The client library as an embedder uses it (issue #12), over real TCP on
//! loopback against a scripted server: a sink that calls back into the
//! client (even `remove_server` and `shutdown`), a tokio program that reads
//! the change stream and awaits the client's waits with no blocking call,
//! `remove_server` / `shutdown` / `Drop` during a pending connect and a
//! pending handshake (timed), replay of a VNI's routes, a caller that is not
//! held up by a stuck sink, and the local source address of a session.
//!
//! The scripted server speaks the passive side with the crate's own
//! `PeerSession` (so the test decides exactly what the client receives);
//! end-to-end runs against the real reflector are in `client_e2e.rs`.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use metalbond_client::PresentChange;
use metalbond_client::{Client, ClientError, RouteSink, ServerOptions, WeakClient};
use metalbond_wire::{Action, IpNet, NextHop, Route, Vni};

use client_support::*;
use metalbond_test_support::client as client_support;

/// The bound for remove_server / shutdown / drop during a connect.
const PROMPT: Duration = Duration::from_secs(1);

/// Runs `f` on a helper thread and fails the test if it takes longer than
/// `bound` (so a hang is a failure, not a stuck test run).
fn within<T: Send + 'static>(
    bound: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(bound) {
        Ok(v) => v,
        Err(_) => panic!(
            "{what} took more than {bound:?} (started {:?} ago)",
            start.elapsed()
        ),
    }
}

/// What the re-entrant sink found when it looked at the client.
#[derive(Debug)]
struct Looked {
    subscriptions: Vec<Vni>,
    subscribed: bool,
    announced: bool,
    routes: Vec<Route>,
    servers: usize,
}

/// A sink that calls back into the client from inside every call, like
/// metalnet's callback does with the Go library.
struct ReentrantSink {
    client: WeakClient,
    own: Route,
    looked: Sender<Looked>,
    seen: Sender<Seen>,
}

impl ReentrantSink {
    fn look(&self, vni: Vni) {
        let Some(client) = self.client.upgrade() else {
            return;
        };
        let _ = self.looked.send(Looked {
            subscriptions: client.subscriptions(),
            subscribed: client.is_subscribed(vni),
            announced: client.is_announced(&self.own),
            routes: client.routes(vni),
            servers: client.servers().len(),
        });
    }
}

impl RouteSink for ReentrantSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.look(vni);
        let _ = self
            .seen
            .send(Seen::Add(Route::new(vni, destination, next_hop)));
    }
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.look(vni);
        let _ = self
            .seen
            .send(Seen::Remove(Route::new(vni, destination, next_hop)));
    }
}

#[test]
fn a_sink_that_calls_back_into_the_client_does_not_hang() {
    let server = ScriptedServer::start();
    let own = route(23, "10.9.0.0/24", "2001:db8::99");
    let (looked_tx, looked) = crossbeam_channel::unbounded();
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let client = Client::new_cyclic(fast_config(), |weak| ReentrantSink {
        client: weak,
        own,
        looked: looked_tx,
        seen: seen_tx,
    });
    client.subscribe(vni(23)).unwrap();
    client.announce(own).unwrap();
    client.add_server(&server.address).unwrap();
    client.wait_established(&server.address, WAIT).unwrap();

    let r1 = route(23, "10.0.1.0/24", "2001:db8::1");
    server.send(Action::Add, r1);
    expect(&seen, Seen::Add(r1));
    let l = looked.recv_timeout(WAIT).unwrap();
    assert_eq!(l.subscriptions, vec![vni(23)]);
    assert!(l.subscribed && l.announced);
    assert_eq!(
        l.routes,
        vec![r1],
        "routes() inside the sink includes the change being told"
    );
    assert_eq!(l.servers, 1);

    // Announcing our own prefix hides r1: the removal reaches the sink on
    // the delivery thread, which again calls back into the client.
    let shadow = route(23, "10.0.1.0/24", "2001:db8::98");
    within(PROMPT, "announce", {
        let client = client.clone();
        move || client.announce(shadow).unwrap()
    });
    expect(&seen, Seen::Remove(r1));
    let l = looked.recv_timeout(WAIT).unwrap();
    assert!(l.routes.is_empty(), "{:?}", l.routes);
    assert!(client.shutdown_timeout(WAIT), "the sink was not dropped");
}

/// A sink that removes server A when A's route arrives and shuts the
/// client down when the stop route arrives: both from the delivery thread.
struct StoppingSink {
    client: WeakClient,
    server: String,
    removes_server: Route,
    stops: Route,
    seen: Sender<Seen>,
    results: Sender<Result<(), ClientError>>,
}

impl RouteSink for StoppingSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let r = Route::new(vni, destination, next_hop);
        let _ = self.seen.send(Seen::Add(r));
        let Some(client) = self.client.upgrade() else {
            return;
        };
        if r == self.removes_server {
            let _ = self.results.send(client.remove_server(&self.server));
        } else if r == self.stops {
            client.shutdown();
            // From inside the sink this cannot wait for the sink's own end:
            // it says so at once instead of hanging.
            let _ = self.results.send(if client.shutdown_timeout(WAIT) {
                Err(ClientError::TimedOut)
            } else {
                Ok(())
            });
        }
    }
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let _ = self
            .seen
            .send(Seen::Remove(Route::new(vni, destination, next_hop)));
    }
}

#[test]
fn a_sink_may_remove_a_server_and_shut_the_client_down() {
    let a = ScriptedServer::start();
    let b = ScriptedServer::start();
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (results_tx, results) = crossbeam_channel::unbounded();
    let from_a = route(23, "10.0.1.0/24", "2001:db8::1");
    let stop = route(23, "10.0.3.0/24", "2001:db8::3");
    let address = a.address.clone();
    let client = Client::new_cyclic(fast_config(), |weak| StoppingSink {
        client: weak,
        server: address,
        removes_server: from_a,
        stops: stop,
        seen: seen_tx,
        results: results_tx,
    });
    client.subscribe(vni(23)).unwrap();
    client.add_server(&a.address).unwrap();
    client.add_server(&b.address).unwrap();
    client.wait_established(&a.address, WAIT).unwrap();
    client.wait_established(&b.address, WAIT).unwrap();
    a.send(Action::Add, from_a);
    expect(&seen, Seen::Add(from_a));
    assert_eq!(results.recv_timeout(WAIT).unwrap(), Ok(()), "remove_server");
    // The removed server's routes are withdrawn...
    expect(&seen, Seen::Remove(from_a));
    assert_eq!(
        client.server_state(&a.address),
        Err(ClientError::UnknownServer(a.address.clone()))
    );
    // ...and nothing it sends later arrives.
    a.send(Action::Add, route(23, "10.0.2.0/24", "2001:db8::1"));
    assert!(seen.recv_timeout(Duration::from_millis(300)).is_err());
    b.send(Action::Add, stop);
    expect(&seen, Seen::Add(stop));
    assert_eq!(results.recv_timeout(WAIT).unwrap(), Ok(()), "shutdown");
    assert_eq!(client.subscribe(vni(24)), Err(ClientError::ShutDown));
    assert!(client.shutdown_timeout(WAIT), "the delivery thread ends");
}

#[tokio::test(flavor = "current_thread")]
async fn a_tokio_program_consumes_changes_from_the_stream() {
    use futures_lite::StreamExt;

    let server = ScriptedServer::start();
    let (client, mut changes) = Client::with_stream(fast_config(), 16);
    client.subscribe(vni(23)).unwrap();
    client.subscribe(vni(24)).unwrap();
    client.add_server(&server.address).unwrap();
    tokio::time::timeout(WAIT, client.established(&server.address))
        .await
        .expect("established in time")
        .unwrap();
    // More routes than the stream holds: the delivery thread waits for us.
    let mut sent: Vec<Route> = (0..50)
        .map(|i| route(23, &format!("10.0.{i}.0/24"), "2001:db8::1"))
        .collect();
    for r in &sent {
        server.send(Action::Add, *r);
    }
    server.send(Action::Add, route(24, "10.1.0.0/24", "2001:db8::2"));
    let mut got = Vec::new();
    while got.len() < sent.len() + 1 {
        match tokio::time::timeout(WAIT, changes.next()).await {
            Ok(Some(PresentChange::Add(r))) => got.push(r),
            other => panic!("unexpected {other:?} after {} changes", got.len()),
        }
    }
    got.retain(|r| r.vni == vni(23));
    sent.sort();
    got.sort();
    assert_eq!(got, sent);
    tokio::time::timeout(WAIT, client.settled(vni(23), Duration::from_millis(200)))
        .await
        .expect("settled in time")
        .unwrap();
    assert_eq!(client.routes(vni(23)), sent);

    server.send(Action::Remove, sent[0]);
    match tokio::time::timeout(WAIT, changes.next()).await {
        Ok(Some(PresentChange::Remove(r))) => assert_eq!(r, sent[0]),
        other => panic!("unexpected {other:?}"),
    }
    // An unknown VNI is an error, not a hang.
    assert_eq!(
        client.settled(vni(99), Duration::from_millis(1)).await,
        Err(ClientError::NotSubscribed(vni(99)))
    );
    client.shutdown();
    match tokio::time::timeout(WAIT, changes.next()).await {
        Ok(None) => {}
        other => panic!("the stream should end after shutdown, got {other:?}"),
    }
}

/// A listener whose accept queue is full (backlog 0, one connection
/// queued and never accepted): SYNs to it are dropped, so a connect to it
/// stays pending like one to a blackholed address, on loopback.
fn blackholed_listener() -> (socket2::Socket, TcpStream, String) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&addr.into()).unwrap();
    listener.listen(0).unwrap();
    let address = listener.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(address).unwrap();
    (listener, filler, address.to_string())
}

/// A listener that accepts connections and never says anything.
fn silent_listener() -> (String, Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    (address, rx)
}

fn timed(what: &str, f: impl FnOnce()) {
    let start = Instant::now();
    f();
    let took = start.elapsed();
    assert!(took < PROMPT, "{what} took {took:?}");
}

#[test]
fn stopping_during_a_pending_connect_or_handshake_is_prompt() {
    let (_listener, _filler, blackholed) = blackholed_listener();
    let (silent, accepted) = silent_listener();

    // A connect that never completes.
    let client = Client::new(fast_config(), metalbond_client::LogSink);
    client.add_server(&blackholed).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s = &client.servers()[0];
    assert!(
        s.connected_since.is_none(),
        "the connect should be pending: {s:?}"
    );
    timed("remove_server during a connect", || {
        client.remove_server(&blackholed).unwrap()
    });
    assert!(client.servers().is_empty());
    client.add_server(&blackholed).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    timed("shutdown during a connect", || client.shutdown());
    let client = Client::new(fast_config(), metalbond_client::LogSink);
    client.add_server(&blackholed).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    timed("drop during a connect", || drop(client));

    // A server that accepts TCP and never answers HELLO.
    let client = Client::new(fast_config(), metalbond_client::LogSink);
    client.add_server(&silent).unwrap();
    let _conn = accepted.recv_timeout(WAIT).expect("the client connects");
    assert_eq!(
        client.wait_established(&silent, Duration::from_millis(200)),
        Err(ClientError::TimedOut)
    );
    timed("remove_server during a handshake", || {
        client.remove_server(&silent).unwrap()
    });
    client.add_server(&silent).unwrap();
    let _conn2 = accepted
        .recv_timeout(WAIT)
        .expect("the client connects again");
    timed("shutdown during a handshake", || client.shutdown());
    let client = Client::new(fast_config(), metalbond_client::LogSink);
    client.add_server(&silent).unwrap();
    let _conn3 = accepted.recv_timeout(WAIT).expect("the client connects");
    timed("drop during a handshake", || drop(client));
}

/// A sink that blocks in its first call until the test releases it.
struct StuckSink {
    entered: Sender<()>,
    release: Receiver<()>,
    seen: Sender<Seen>,
}

impl RouteSink for StuckSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let _ = self.entered.send(());
        let _ = self.release.recv_timeout(WAIT);
        let _ = self
            .seen
            .send(Seen::Add(Route::new(vni, destination, next_hop)));
    }
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let _ = self
            .seen
            .send(Seen::Remove(Route::new(vni, destination, next_hop)));
    }
}

#[test]
fn a_stuck_sink_does_not_hold_up_callers_and_order_is_kept() {
    let server = ScriptedServer::start();
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (release_tx, release) = crossbeam_channel::unbounded();
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let client = Client::new(
        fast_config(),
        StuckSink {
            entered: entered_tx,
            release,
            seen: seen_tx,
        },
    );
    client.subscribe(vni(23)).unwrap();
    client.add_server(&server.address).unwrap();
    client.wait_established(&server.address, WAIT).unwrap();
    let r1 = route(23, "10.0.1.0/24", "2001:db8::1");
    let r2 = route(23, "10.0.2.0/24", "2001:db8::1");
    server.send(Action::Add, r1);
    entered.recv_timeout(WAIT).expect("the sink is called");
    // The sink is stuck in add_route(r1). Callers go on.
    timed("calls while the sink is stuck", || {
        assert_eq!(client.subscriptions(), vec![vni(23)]);
        client
            .announce(route(23, "10.0.9.0/24", "2001:db8::99"))
            .unwrap();
        assert!(client.present_routes().contains(&r1));
        assert_eq!(client.routes(vni(23)), vec![r1]);
        client.unsubscribe(vni(23)).unwrap();
    });
    server.send(Action::Add, r2); // not subscribed any more: ignored
    release_tx.send(()).unwrap();
    expect(&seen, Seen::Add(r1));
    expect(&seen, Seen::Remove(r1));
    assert!(seen.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(client.routes(vni(23)).is_empty());
    assert!(client.shutdown_timeout(WAIT));
}

/// Records into a vector (for `replay`).
#[derive(Default)]
struct Collect(Vec<Route>);

impl RouteSink for Collect {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.0.push(Route::new(vni, destination, next_hop));
    }
    fn remove_route(&mut self, _: Vni, _: IpNet, _: NextHop) {
        panic!("replay only adds");
    }
}

#[test]
fn replay_hands_the_present_routes_of_one_vni() {
    let server = ScriptedServer::start();
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let client = Client::new(fast_config(), ChannelSink(seen_tx));
    client.subscribe(vni(23)).unwrap();
    client.subscribe(vni(24)).unwrap();
    client.add_server(&server.address).unwrap();
    client.wait_established(&server.address, WAIT).unwrap();
    let mut in_23: Vec<Route> = (1..=3)
        .map(|i| route(23, &format!("10.0.{i}.0/24"), "2001:db8::1"))
        .collect();
    in_23.sort();
    for r in &in_23 {
        server.send(Action::Add, *r);
    }
    server.send(Action::Add, route(24, "10.1.0.0/24", "2001:db8::1"));
    client
        .wait_settled(vni(23), Duration::from_millis(200), WAIT)
        .unwrap();
    for _ in 0..4 {
        seen.recv_timeout(WAIT).unwrap();
    }
    let mut replayed = Collect::default();
    assert_eq!(client.replay(vni(23), &mut replayed), 3);
    assert_eq!(replayed.0, in_23);
    assert_eq!(client.replay(vni(25), &mut replayed), 0);
    // resend: the client's own sink hears them again, in order.
    client.resend(vni(23)).unwrap();
    for r in &in_23 {
        expect(&seen, Seen::Add(*r));
    }
    assert!(seen.recv_timeout(Duration::from_millis(200)).is_err());
}

#[test]
fn the_server_sees_the_local_source_address() {
    let server = ScriptedServer::start();
    let local: IpAddr = "127.0.0.2".parse().unwrap();
    let client = Client::new(fast_config(), metalbond_client::LogSink);
    assert!(matches!(
        client.add_server_with(
            &server.address,
            ServerOptions {
                local_address: Some("::1".parse().unwrap()),
                ..ServerOptions::default()
            }
        ),
        Err(ClientError::LocalAddressFamily { .. })
    ));
    client
        .add_server_with(
            &server.address,
            ServerOptions {
                local_address: Some(local),
                ..ServerOptions::default()
            },
        )
        .unwrap();
    client.wait_established(&server.address, WAIT).unwrap();
    let peer = server.peers.recv_timeout(WAIT).unwrap();
    assert_eq!(peer.ip(), local);
    assert_eq!(client.servers()[0].local_address, Some(local));
}
