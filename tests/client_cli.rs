//! `metalbond client` as a process: malformed flag values give one line
//! naming the flag, the value and the expected form, with exit status 2;
//! start-up problems of kernel installation are reported before any route;
//! the Go client's spellings (table 0, keepalive 0, host names) are
//! accepted; `--help` documents every value; a server that completes the
//! handshake and then sends garbage is retried with a growing backoff.
//!
//! Servers here are real: the `metalbond server` process in a namespace the
//! test creates, or a scripted passive peer on loopback (the crate's own
//! `PeerSession`) where a test must see or control the exact frames.

use metalbond_test_support::netns as support;
use metalbond_test_support::process::{ChildGuard, CollectedLines};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::session::{PeerSession, Reaction, Role};
use metalbond_wire::{Action, NextHop, Route, Vni};
use support::{wait_until, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_metalbond");
const WAIT: Duration = Duration::from_secs(15);

/// Runs the binary with a time bound (kills it after 10 s).
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn metalbond");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("metalbond client did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn client(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("client").args(args).env("RUST_LOG", "off");
    run_bounded(c)
}

#[test]
fn malformed_values_are_one_line_with_exit_status_2() {
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (
            &["--server", "[::1]:4711", "--announce", "23#10.0.0.0/24"],
            "--announce",
            "23#10.0.0.0/24",
            "VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--announce",
                "23#10.0.0.0/24#2001:db8::1,23#x#y",
            ],
            "--announce",
            "23#x#y",
            "VNI#PREFIX#NEXTHOP",
        ),
        (
            &["--server", "[::1]:4711", "--subscribe", "23,abc"],
            "--subscribe",
            "abc",
            "VNI",
        ),
        (
            &["--server", "[::1]:4711", "--subscribe", "16777216"],
            "--subscribe",
            "16777216",
            "VNI",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--install-routes",
                "23-100",
                "--tun",
                "t",
            ],
            "--install-routes",
            "23-100",
            "VNI#TABLE",
        ),
        (&["--server", "::1"], "--server", "::1", "HOST:PORT"),
        (
            &["--server", "bad host:4711"],
            "--server",
            "bad host:4711",
            "HOST:PORT",
        ),
        (
            &["--server", "[::1]:4711", "--keepalive", "5s"],
            "--keepalive",
            "5s",
            "SECS",
        ),
        (
            &["--server", "[::1]:4711", "--max-routes-per-server", "0"],
            "--max-routes-per-server",
            "0",
            "N",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--install-routes",
                "23#255",
                "--tun",
                "t",
            ],
            "--install-routes",
            "23#255",
            "VNI#TABLE",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--install-routes",
                "23#253",
                "--tun",
                "t",
            ],
            "--install-routes",
            "23#253",
            "VNI#TABLE",
        ),
        (
            &["--server", "[::1]:4711", "--http", "nowhere"],
            "--http",
            "nowhere",
            "IP:PORT",
        ),
    ];
    for (args, flag, value, form) in cases {
        let out = client(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("'{value}'")), "{args:?}: {stderr}");
        assert!(stderr.contains(form), "{args:?}: {stderr}");
    }
}

#[test]
fn install_routes_without_tun_is_a_usage_error() {
    let out = client(&["--server", "[::1]:4711", "--install-routes", "23#100"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tun"));
}

/// `metalbond client` installing VNI 23 into table 100 through `tun`,
/// with a server nobody answers on.
fn installing_client(tun: &str) -> [&str; 7] {
    [
        "client",
        "--server",
        "[::1]:4711",
        "--install-routes",
        "23#100",
        "--tun",
        tun,
    ]
}

#[test]
fn missing_tunnel_device_fails_at_start() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    let mut cmd = ns.command(BIN);
    cmd.args(installing_client("no-such-tun"));
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tunnel device 'no-such-tun' does not exist"),
        "{stderr}"
    );
}

/// The panic policy (`panic_policy`): a netlink thread that panics ends
/// the client at once (status 101, one error line naming the thread),
/// never a client that receives routes and installs none.
#[test]
fn a_panicking_netlink_thread_ends_the_client_at_once() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    ns.add_tunnel("mbtun0");
    let mut cmd = ns.command(BIN);
    cmd.args(installing_client("mbtun0"))
        .env("METALBOND_TEST_FAULT", "netlink")
        .env("NO_COLOR", "1");
    let started = Instant::now();
    let out = run_bounded(cmd);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(metalbond_utils::panic_policy::PANIC_EXIT_STATUS),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(3), "exited after {took:?}");
    let line = stderr
        .lines()
        .find(|l| l.contains("a thread panicked"))
        .unwrap_or_else(|| panic!("no panic line: {stderr}"));
    assert!(line.contains("thread=netlink-shard"), "{line}");
    assert!(line.contains("injected fault"), "{line}");
}

#[test]
fn missing_cap_net_admin_fails_at_start() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        support::prerequisite::missing(
            "setpriv (util-linux) is not installed; cannot drop CAP_NET_ADMIN",
        );
        return;
    }
    ns.add_tunnel("mbtun0");
    // Drop CAP_NET_ADMIN from every set before exec'ing the client.
    let mut cmd = ns.command("setpriv");
    cmd.args([
        "--inh-caps=-net_admin",
        "--ambient-caps=-net_admin",
        "--bounding-set=-net_admin",
        BIN,
    ])
    .args(installing_client("mbtun0"));
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("setpriv:") {
        support::prerequisite::missing(&format!("setpriv cannot drop capabilities here: {stderr}"));
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}

/// A `metalbond` process whose stderr lines are collected as they come;
/// killed (SIGKILL) when dropped unless terminated before.
struct Running {
    /// The process.
    child: ChildGuard,
    /// Its stderr lines so far.
    lines: CollectedLines,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = ChildGuard(
            cmd.env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn metalbond"),
        );
        let lines = CollectedLines::from(child.0.stderr.take().expect("piped stderr"));
        Running { child, lines }
    }

    fn stderr(&self) -> String {
        self.lines.text()
    }

    /// Waits (bounded) for a stderr line containing `text`.
    fn wait_line(&self, text: &str) -> bool {
        self.lines.wait_for(text, 1, WAIT)
    }

    fn lines_containing(&self, text: &str) -> usize {
        self.lines.count(text)
    }

    fn is_running(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// SIGTERM and wait (bounded) for the exit status.
    fn terminate(self) -> Option<i32> {
        self.child.terminate()
    }
}

/// What a scripted server does once a session is ESTABLISHED.
#[derive(Clone, Copy)]
enum Script {
    /// Keeps the session, answers keepalives, records what it receives.
    Serve,
    /// Sends bytes that are no frame (version 0xff) and closes.
    Garbage,
}

/// What a scripted server saw, shared with the test.
#[derive(Default)]
struct Seen {
    /// Connections accepted, with when.
    accepted: Vec<Instant>,
    /// Keepalive intervals offered in the clients' HELLOs.
    hello_keepalives: Vec<u32>,
    /// Messages delivered after ESTABLISHED.
    messages: Vec<Message>,
}

/// A passive peer on 127.0.0.1 (and on [::1] with the same port where that
/// can be bound), the crate's `PeerSession` doing the protocol.
struct ScriptedServer {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl ScriptedServer {
    fn start(script: Script) -> ScriptedServer {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut listeners = vec![v4];
        listeners.extend(TcpListener::bind(("::1", port)).ok());
        for listener in listeners {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    seen.lock().unwrap().accepted.push(Instant::now());
                    let seen = seen.clone();
                    std::thread::spawn(move || serve(stream, script, seen));
                }
            });
        }
        ScriptedServer { port, seen }
    }

    fn accepted(&self) -> Vec<Instant> {
        self.seen.lock().unwrap().accepted.clone()
    }
}

fn serve(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Seen>>) {
    let _ = stream.set_read_timeout(Some(WAIT));
    let mut session = PeerSession::new(Role::Passive, Duration::from_secs(5), Instant::now());
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.extend(&buf[..n]);
        while let Ok(Some(msg)) = decoder.next_message() {
            if let Message::Hello { keepalive_secs, .. } = msg {
                seen.lock().unwrap().hello_keepalives.push(keepalive_secs);
            }
            let mut out = Vec::new();
            match session.on_message(msg, Instant::now()) {
                Ok(Reaction::Reply(m)) => {
                    encode_frame(&m, &mut out);
                }
                Ok(Reaction::Established { reply }) => {
                    if let Some(m) = reply {
                        encode_frame(&m, &mut out);
                    }
                    if let Script::Garbage = script {
                        out.extend_from_slice(&[0xff; 16]);
                        let _ = stream.write_all(&out);
                        return;
                    }
                }
                Ok(Reaction::Deliver(m)) => seen.lock().unwrap().messages.push(m),
                Ok(Reaction::Nothing) => {}
                Err(_) => return,
            }
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn client_process(args: &[&str]) -> Running {
    let mut cmd = Command::new(BIN);
    cmd.arg("client").args(args);
    Running::spawn(cmd)
}

#[test]
fn help_says_every_value_syntax_lists_and_refused_tables() {
    let out = client(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{help}");
    for text in [
        // Every flag's value syntax.
        "--server <HOST:PORT>",
        "[::1]:4711",
        "host name",
        "--subscribe <VNI>",
        "0-16777215",
        "VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]",
        "#NAT#FROM#TO",
        "--install-routes <VNI#TABLE>",
        "--tun <DEV>",
        "--keepalive <SECS>",
        "0 means the default (5)",
        "--http <IP:PORT>",
        "--reconnect-min-ms <MS>",
        "--reconnect-max-secs <SECS>",
        "--max-routes-per-server <N>",
        // Lists.
        "comma-separated list",
        "--subscribe 23,24",
        // Tables: 0, and which are refused and why.
        "0 means the main table (254)",
        "253 (\"default\"",
        "255 (\"local\"",
        "last-resort",
        "local delivery",
    ] {
        assert!(help.contains(text), "--help lacks {text:?}:\n{help}");
    }
}

#[test]
fn keepalive_0_and_a_host_name_reach_a_scripted_server() {
    let server = ScriptedServer::start(Script::Serve);
    let address = format!("localhost:{}", server.port);
    let mut c = client_process(&[
        "--server",
        &address,
        "--keepalive",
        "0",
        "--subscribe",
        "23",
    ]);
    // The name is resolved (127.0.0.1, or ::1 where localhost is that),
    // the HELLO offers the default 5 s, and the session carries on.
    assert!(
        wait_until(WAIT, || !server.seen.lock().unwrap().messages.is_empty()),
        "no SUBSCRIBE from the client: {}",
        c.stderr()
    );
    {
        let seen = server.seen.lock().unwrap();
        assert_eq!(seen.hello_keepalives, vec![5]);
        assert_eq!(
            seen.messages,
            vec![Message::Subscribe(Vni::new(23).unwrap())]
        );
    }
    assert!(
        c.wait_line("--keepalive 0 means the default (5 s)"),
        "{}",
        c.stderr()
    );
    assert_eq!(c.lines_containing("--keepalive 0 means"), 1);
    assert!(c.wait_line("session established"), "{}", c.stderr());
    assert!(c.is_running());
    assert_eq!(c.terminate(), Some(0));
}

#[test]
fn unresolvable_host_name_is_retried_not_a_start_up_error() {
    // In a namespace of our own: the name lookup cannot leave the machine
    // (no route to any name server), so it fails at once.
    let Some(ns) = Netns::create() else { return };
    let mut cmd = ns.command(BIN);
    cmd.args([
        "client",
        "--server",
        "no-such-reflector.invalid:4711",
        "--reconnect-min-ms",
        "50",
        "--reconnect-max-secs",
        "1",
    ]);
    let mut c = Running::spawn(cmd);
    assert!(c.wait_line("cannot connect"), "{}", c.stderr());
    assert!(
        c.stderr().contains("no-such-reflector.invalid"),
        "{}",
        c.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.is_running(), "exited: {}", c.stderr());
    // A failure that does not change is logged once at info.
    assert_eq!(c.lines_containing("cannot connect"), 1, "{}", c.stderr());
    assert_eq!(c.terminate(), Some(0));
}

#[test]
fn garbage_after_the_handshake_gets_a_growing_backoff() {
    // Each session completes HELLO and KEEPALIVE (ESTABLISHED on both
    // sides), then receives bytes that are no frame. Without a growing
    // backoff the client reconnects every 25-50 ms (80+ sessions in 4 s);
    // with it the delays double from 50 ms towards the 2 s cap.
    let server = ScriptedServer::start(Script::Garbage);
    let address = format!("127.0.0.1:{}", server.port);
    let c = client_process(&[
        "--server",
        &address,
        "--reconnect-min-ms",
        "50",
        "--reconnect-max-secs",
        "2",
    ]);
    assert!(
        wait_until(WAIT, || !server.accepted().is_empty()),
        "client never connected: {}",
        c.stderr()
    );
    let first = server.accepted()[0];
    std::thread::sleep(Duration::from_secs(4).saturating_sub(first.elapsed()));
    let window = Duration::from_secs(4);
    let sessions = server
        .accepted()
        .iter()
        .filter(|t| t.duration_since(first) < window)
        .count();
    // Lower bounds of the delays (d/2 with d = 50, 100, ..., 1600, 2000 ms)
    // allow at most 10 sessions in 4 s; the upper bounds at least 6.
    assert!(
        (4..=12).contains(&sessions),
        "{sessions} sessions in {window:?}: {}",
        c.stderr()
    );
    assert!(c.wait_line("session established"), "{}", c.stderr());
    assert!(
        c.stderr().contains("malformed frame"),
        "the cause is logged: {}",
        c.stderr()
    );
    assert_eq!(c.terminate(), Some(0));
}

/// `/proc/PID/status` field `key` (kB).
fn proc_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// User + system CPU ticks of `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Waits until `pid` used no CPU for 2 s in a row (bounded by `limit`).
fn wait_idle(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut last = cpu_ticks(pid);
    let mut still = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = cpu_ticks(pid);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() >= Duration::from_secs(2) {
            return true;
        }
    }
    false
}

/// Client memory per received route (figures in BENCHMARKS.md): a scripted
/// server pushes `MB_ROUTES` (default 1,000,000) ADDs in one VNI (/32s
/// through 64 next hops) to `metalbond client` (no kernel installation),
/// then closes; the client's VmRSS/VmHWM are read from /proc before, after
/// the push and after the withdrawal. `METALBOND_BIN` measures another
/// binary. Run: `cargo test --release --test client_cli -- --ignored
/// --nocapture client_memory_per_received_route`.
#[test]
#[ignore = "measurement, run by hand; figures in BENCHMARKS.md"]
fn client_memory_per_received_route() {
    let routes: u32 = std::env::var("MB_ROUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let bin = std::env::var("METALBOND_BIN").unwrap_or_else(|_| BIN.to_string());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut cmd = Command::new(bin);
    cmd.args(["client", "--server", &address, "--subscribe", "1"]);
    let mut c = Running::spawn(cmd);
    let pid = c.child.pid();
    let (stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    // Handshake, then answer keepalives on a thread while pushing.
    let writer = Arc::new(Mutex::new(stream.try_clone().unwrap()));
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let w = writer.clone();
    let mut reader = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut session = PeerSession::new(Role::Passive, Duration::from_secs(5), Instant::now());
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                return;
            }
            decoder.extend(&buf[..n]);
            while let Ok(Some(msg)) = decoder.next_message() {
                let mut out = Vec::new();
                match session.on_message(msg, Instant::now()) {
                    Ok(Reaction::Reply(m)) | Ok(Reaction::Established { reply: Some(m) }) => {
                        encode_frame(&m, &mut out);
                    }
                    Ok(Reaction::Deliver(Message::Subscribe(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
                if w.lock().unwrap().write_all(&out).is_err() {
                    return;
                }
            }
        }
    });
    subscribed.recv_timeout(WAIT).expect("no SUBSCRIBE");
    assert!(wait_idle(pid, WAIT));
    let baseline = proc_kb(pid, "VmRSS:");
    let vni = Vni::new(1).unwrap();
    let started = Instant::now();
    let mut chunk = Vec::with_capacity(64 * 1024);
    for i in 0..routes {
        let destination = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let hop = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (i % 64 + 1) as u16);
        let route = Route::new(
            vni,
            metalbond_wire::IpNet::new(destination.into(), 32).unwrap(),
            NextHop::standard(hop.into()),
        );
        let update = Message::Update {
            action: Action::Add,
            route,
        };
        encode_frame(&update, &mut chunk);
        if chunk.len() > 60 * 1024 || i + 1 == routes {
            writer.lock().unwrap().write_all(&chunk).unwrap();
            chunk.clear();
        }
    }
    assert!(
        wait_idle(pid, Duration::from_secs(300)),
        "client never settled"
    );
    let took = started.elapsed();
    let (hwm, rss) = (proc_kb(pid, "VmHWM:"), proc_kb(pid, "VmRSS:"));
    assert!(c.is_running(), "{}", c.stderr());
    // Close: the client withdraws everything this server sent.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    assert!(c.wait_line("session closed"), "{}", c.stderr());
    assert!(wait_idle(pid, Duration::from_secs(120)));
    let after = proc_kb(pid, "VmRSS:");
    let per_route = |kb: u64| (kb.saturating_sub(baseline) * 1024) as f64 / f64::from(routes);
    println!(
        "routes {routes}: received and settled in {took:.1?}; VmRSS before {baseline} kB, \
         VmHWM {hwm} kB ({:.0} B/route), VmRSS {rss} kB ({:.0} B/route), \
         VmRSS after withdrawal {after} kB",
        per_route(hwm),
        per_route(rss),
    );
    assert_eq!(c.terminate(), Some(0));
}
