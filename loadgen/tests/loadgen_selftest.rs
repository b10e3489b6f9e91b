//! Self-test of the `loadgen` binary against a small reference reflector
//! that lives in this file, so the verifier is exercised as a real process
//! over real TCP independently of the production server: every scenario must
//! pass against a correct reflector, and each kind of reflector bug (own
//! routes echoed, duplicate ADDs, lost updates) must make loadgen fail and
//! name the difference.
//!
//! The reference reflector is deliberately simple: one thread per
//! connection, one global lock, PROTOCOL.md "Reflector rules" written out
//! directly, the crate's codec and `PeerSession` for framing and handshake.
//! It must never be used for anything but these tests.

use metalbond_test_support::loadgen as loadgen_support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use loadgen_support::{run_bounded, text};

use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::session::{PeerSession, Reaction, Role};
use metalbond_wire::{Action, Route, Vni};

/// A deliberate deviation from the reflector rules.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    /// Correct behaviour.
    None,
    /// On SUBSCRIBE, also send the subscriber's own routes (the Go server's
    /// known behaviour).
    EchoOwn,
    /// Send every ADD twice.
    DuplicateAdd,
    /// Drop every 50th fan-out copy.
    LoseUpdates,
    /// Close the first peer connection (id 1: loadgen probes with one plain
    /// connection first) when it subscribes.
    CloseFirstSession,
}

/// The reflector's table, under one lock.
#[derive(Default)]
struct Table {
    /// Route → connections announcing it.
    announcers: HashMap<Route, HashSet<u64>>,
    /// VNI → subscribed connections.
    subscribers: HashMap<Vni, HashSet<u64>>,
    /// Connection → its socket for writing.
    writers: HashMap<u64, TcpStream>,
    /// Fan-out copies sent, for `Bug::LoseUpdates`.
    copies: u64,
}

impl Table {
    fn send(&mut self, to: u64, msg: &Message, bug: Bug) {
        self.copies += 1;
        if bug == Bug::LoseUpdates && self.copies % 50 == 0 {
            return;
        }
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf);
        if bug == Bug::DuplicateAdd
            && matches!(
                msg,
                Message::Update {
                    action: Action::Add,
                    ..
                }
            )
        {
            encode_frame(msg, &mut buf);
        }
        if let Some(w) = self.writers.get_mut(&to) {
            let _ = w.write_all(&buf);
        }
    }

    fn fan_out(&mut self, from: u64, action: Action, route: Route, bug: Bug) {
        let subs: Vec<u64> = self
            .subscribers
            .get(&route.vni)
            .map(|s| s.iter().copied().filter(|p| *p != from).collect())
            .unwrap_or_default();
        for s in subs {
            self.send(s, &Message::Update { action, route }, bug);
        }
    }

    fn add(&mut self, from: u64, route: Route, bug: Bug) {
        let set = self.announcers.entry(route).or_default();
        let new = set.is_empty();
        if set.insert(from) && new {
            self.fan_out(from, Action::Add, route, bug);
        }
    }

    fn remove(&mut self, from: u64, route: Route, bug: Bug) {
        let Some(set) = self.announcers.get_mut(&route) else {
            return;
        };
        if set.remove(&from) && set.is_empty() {
            self.announcers.remove(&route);
            self.fan_out(from, Action::Remove, route, bug);
        }
    }

    fn subscribe(&mut self, from: u64, vni: Vni, bug: Bug) {
        if !self.subscribers.entry(vni).or_default().insert(from) {
            return;
        }
        let routes: Vec<Route> = self
            .announcers
            .iter()
            .filter(|(r, a)| r.vni == vni && (a.iter().any(|p| *p != from) || bug == Bug::EchoOwn))
            .map(|(r, _)| *r)
            .collect();
        for route in routes {
            self.send(
                from,
                &Message::Update {
                    action: Action::Add,
                    route,
                },
                bug,
            );
        }
    }

    fn disconnect(&mut self, from: u64, bug: Bug) {
        self.writers.remove(&from);
        for subs in self.subscribers.values_mut() {
            subs.remove(&from);
        }
        let mine: Vec<Route> = self
            .announcers
            .iter()
            .filter(|(_, a)| a.contains(&from))
            .map(|(r, _)| *r)
            .collect();
        for r in mine {
            self.remove(from, r, bug);
        }
    }
}

/// A running reference reflector; stops accepting when dropped.
struct Reflector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Reflector {
    fn start(bug: Bug) -> Reflector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Mutex::new(Table::default()));
        let ids = Arc::new(AtomicU64::new(0));
        let stop2 = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let table = table.clone();
                let stop = stop2.clone();
                thread::spawn(move || serve(id, conn, table, bug, stop));
            }
        });
        Reflector { addr, stop }
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(id: u64, conn: TcpStream, table: Arc<Mutex<Table>>, bug: Bug, stop: Arc<AtomicBool>) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let Ok(writer) = conn.try_clone() else { return };
    table.lock().unwrap().writers.insert(id, writer);
    let mut session = PeerSession::new(Role::Passive, Duration::from_secs(5), Instant::now());
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = conn;
    'conn: while !stop.load(Ordering::Relaxed) {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        decoder.extend(&buf[..n]);
        loop {
            let msg = match decoder.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => break 'conn,
            };
            let mut t = table.lock().unwrap();
            match session.on_message(msg, Instant::now()) {
                Err(_) => break 'conn,
                Ok(Reaction::Nothing) => {}
                Ok(Reaction::Reply(m)) | Ok(Reaction::Established { reply: Some(m) }) => {
                    t.send(id, &m, Bug::None)
                }
                Ok(Reaction::Established { reply: None }) => {}
                Ok(Reaction::Deliver(Message::Subscribe(_)))
                    if bug == Bug::CloseFirstSession && id == 1 =>
                {
                    break 'conn
                }
                Ok(Reaction::Deliver(Message::Subscribe(v))) => t.subscribe(id, v, bug),
                Ok(Reaction::Deliver(Message::Unsubscribe(v))) => {
                    if let Some(s) = t.subscribers.get_mut(&v) {
                        s.remove(&id);
                    }
                }
                Ok(Reaction::Deliver(Message::Update { action, route })) => match action {
                    Action::Add => t.add(id, route, bug),
                    Action::Remove => t.remove(id, route, bug),
                },
                Ok(Reaction::Deliver(_)) => break 'conn,
            }
        }
    }
    let mut t = table.lock().unwrap();
    if let Some(w) = t.writers.get(&id) {
        let _ = w.shutdown(Shutdown::Both);
    }
    t.disconnect(id, bug);
}

/// Runs loadgen with `args` against `server`, bounded in time.
fn loadgen(server: SocketAddr, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args)
        .args(["--server", &server.to_string(), "--quiet"]);
    if !args.contains(&"--time-limit") {
        cmd.args(["--time-limit", "20"]);
    }
    run_bounded(cmd)
}

fn assert_pass(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS"),
        "{}",
        text(out)
    );
}

fn assert_fail_with(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL"), "{}", text(out));
    assert!(
        stdout.contains(needle),
        "expected '{needle}' in:\n{}",
        text(out)
    );
}

const FLEET: &[&str] = &[
    "--peers", "40", "--vnis", "4", "--routes", "5", "--shared", "1",
];

#[test]
fn fleet_passes_against_a_correct_reflector() {
    let r = Reflector::start(Bug::None);
    let mut args = vec!["fleet"];
    args.extend_from_slice(FLEET);
    assert_pass(&loadgen(r.addr, &args));
}

#[test]
fn fleet_json_record_has_the_figures() {
    let r = Reflector::start(Bug::None);
    let mut args = vec!["fleet", "--json"];
    args.extend_from_slice(FLEET);
    let out = loadgen(r.addr, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["sessions_held"], 40);
    let phase = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fleet")
        .unwrap();
    // 40 peers × 5 routes, each to the 9 other subscribers of its VNI; the
    // 40 shared routes go to 8 non-announcers plus 0, 1 or 2 of their
    // co-announcers, depending on the order of SUBSCRIBE and ADD.
    let delivered = phase["delivered_updates"].as_u64().unwrap();
    assert!(
        (1760..=1840).contains(&delivered),
        "{delivered}: {}",
        text(&out)
    );
    assert!(phase["latency"]["p99_us"].as_f64().unwrap() > 0.0);
}

#[test]
fn burst_with_late_sync_passes() {
    let r = Reflector::start(Bug::None);
    let out = loadgen(r.addr, &["burst", "--routes", "2000", "--subscribers", "3"]);
    assert_pass(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("late-sync"), "{}", text(&out));
}

#[test]
fn churn_passes() {
    let r = Reflector::start(Bug::None);
    let mut args = vec!["churn", "--rate", "2000", "--duration", "1"];
    args.extend_from_slice(FLEET);
    assert_pass(&loadgen(r.addr, &args));
}

#[test]
fn reconnect_passes() {
    let r = Reflector::start(Bug::None);
    let mut args = vec!["reconnect"];
    args.extend_from_slice(FLEET);
    assert_pass(&loadgen(r.addr, &args));
}

#[test]
fn idle_peers_are_held_with_keepalives() {
    let r = Reflector::start(Bug::None);
    let out = loadgen(
        r.addr,
        &[
            "idle",
            "--peers",
            "50",
            "--duration",
            "2.5",
            "--keepalive",
            "1",
        ],
    );
    assert_pass(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sessions held 50"),
        "{}",
        text(&out)
    );
}

#[test]
fn own_routes_echoed_on_subscribe_fail_the_run() {
    let r = Reflector::start(Bug::EchoOwn);
    let mut args = vec!["fleet", "--settle-ms", "300"];
    args.extend_from_slice(FLEET);
    assert_fail_with(&loadgen(r.addr, &args), "extra");
}

#[test]
fn duplicate_adds_fail_the_run() {
    let r = Reflector::start(Bug::DuplicateAdd);
    let mut args = vec!["fleet", "--settle-ms", "300"];
    args.extend_from_slice(FLEET);
    assert_fail_with(&loadgen(r.addr, &args), "ADD for a route already held");
}

#[test]
fn lost_updates_fail_the_run() {
    let r = Reflector::start(Bug::LoseUpdates);
    let mut args = vec!["fleet", "--time-limit", "3"];
    args.extend_from_slice(FLEET);
    // The run cannot converge, so it ends at the limit and lists what is
    // missing.
    assert_fail_with(&loadgen(r.addr, &args), "missing");
}

#[test]
fn a_lost_session_fails_the_run_without_waiting_for_the_time_limit() {
    let r = Reflector::start(Bug::CloseFirstSession);
    let t0 = Instant::now();
    let mut args = vec!["fleet", "--time-limit", "25"];
    args.extend_from_slice(FLEET);
    let out = loadgen(r.addr, &args);
    assert_fail_with(&out, "session lost");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn unreachable_server_fails_at_once_with_a_clear_error() {
    // A port nothing listens on: bind one, note it, release it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fleet", "--server", &addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect to the server"),
        "{}",
        text(&out)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn non_loopback_server_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fleet", "--server", "192.0.2.1:4711"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--allow-remote"),
        "{}",
        text(&out)
    );
}
