//! The `metalbond server` binary as a real process: signals, exit status,
//! start-up errors as one clear line, several listen addresses.

use metalbond_test_support::server as server_support;

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use server_support::process::*;
use server_support::*;

/// Connects until the server accepts, then handshakes.
fn connect_when_up(addr: SocketAddr) -> TestPeer {
    let deadline = Instant::now() + WAIT;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "server never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    TestPeer::established(addr, 5).0
}

fn signal_exits_zero_and_closes_peers(sig: i32) {
    let addr = free_port("127.0.0.1");
    let mut child = server(&["--listen", &addr.to_string(), "--shards", "2"]);
    let mut a = connect_when_up(addr);
    let mut b = connect_when_up(addr);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.0.id() as i32, sig);
    }
    let status = wait_exit(&mut child);
    assert!(status.success(), "exit status {status:?}");
    assert!(a.closed_within(WAIT));
    assert!(b.closed_within(WAIT));
    assert!(std::net::TcpStream::connect(addr).is_err());
    let log = stderr_of(&mut child);
    assert!(log.contains("shutting down"), "{log}");
}

/// The panic policy (`panic_policy`): a shard whose task panics takes the
/// whole process with it at once, status 101 and one error line naming the
/// thread; its peers see their sessions end (so their own restart rules
/// apply) instead of a reflector that stopped routing but looks alive.
#[test]
fn a_panicking_shard_ends_the_process_at_once() {
    let addr = free_port("127.0.0.1");
    let mut cmd = server_command(&["--listen", &addr.to_string(), "--shards", "2"]);
    // Shard 0's task panics 200 ms after the shards are ready.
    cmd.env("METALBOND_TEST_FAULT", "shard");
    let mut child = ChildGuard(cmd.spawn().expect("spawn metalbond"));
    let mut peer = connect_when_up(addr);
    let up = Instant::now();
    let status = wait_exit(&mut child);
    let after = up.elapsed();
    assert_eq!(
        status.code(),
        Some(metalbond_utils::panic_policy::PANIC_EXIT_STATUS),
        "{status:?}"
    );
    assert!(
        after < Duration::from_millis(1_500),
        "exited {after:?} after start"
    );
    assert!(peer.closed_within(WAIT));
    let log = stderr_of(&mut child);
    let line = log
        .lines()
        .find(|l| l.contains("a thread panicked"))
        .unwrap_or_else(|| panic!("no panic line: {log}"));
    assert!(line.contains("level=error"), "{line}");
    assert!(line.contains("thread=mb-shard-0"), "{line}");
    assert!(line.contains("injected fault"), "{line}");
}

#[test]
fn sigterm_shuts_down_cleanly_with_status_zero() {
    signal_exits_zero_and_closes_peers(libc::SIGTERM);
}

#[test]
fn sigint_shuts_down_cleanly_with_status_zero() {
    signal_exits_zero_and_closes_peers(libc::SIGINT);
}

#[test]
fn port_in_use_is_one_clear_error_line() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut child = server(&["--listen", &addr.to_string()]);
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let log = stderr_of(&mut child);
    let line = log
        .lines()
        .find(|l| l.starts_with("metalbond: "))
        .unwrap_or_else(|| panic!("no error line in {log}"));
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert!(line.contains("in use"), "{line}");
}

#[test]
fn address_not_available_is_one_clear_error_line() {
    // TEST-NET-1: not assigned to any local interface.
    let mut child = server(&["--listen", "192.0.2.1:4711"]);
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let log = stderr_of(&mut child);
    assert!(
        log.contains("cannot listen on 192.0.2.1:4711: Cannot assign requested address"),
        "{log}"
    );
}

#[test]
fn zero_shards_is_refused() {
    let mut child = server(&["--listen", "127.0.0.1:0", "--shards", "0"]);
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let log = stderr_of(&mut child);
    assert!(log.contains("--shards must be at least 1"), "{log}");
}

#[test]
fn listens_on_ipv6_and_ipv4_at_once() {
    // Ports are picked free and released, so another process on the
    // machine may take one before the server binds it: then the server
    // exits with "address in use" and we try other ports (a few times).
    let mut attempt = 0;
    let (mut child, v6, v4) = loop {
        attempt += 1;
        let v6 = free_port("[::1]");
        let v4 = SocketAddr::from(([127, 0, 0, 1], v6.port()));
        if TcpListener::bind(v4).is_err() {
            continue; // port taken on v4 by someone else
        }
        let mut http = free_port("[::1]");
        while http.port() == v6.port() {
            http = free_port("[::1]");
        }
        let mut child = server(&[
            "--listen",
            &v6.to_string(),
            "--listen",
            &v4.to_string(),
            "--http",
            &http.to_string(),
        ]);
        match wait_listening(&mut child, &[v6, v4, http]) {
            Ok(()) => break (child, v6, v4),
            Err(log) if log.contains("in use") && attempt < 5 => continue,
            Err(log) => panic!("server did not start: {log}"),
        }
    };
    let mut a = connect_when_up(v6);
    let b = connect_when_up(v4);
    a.send(&metalbond_wire::codec::Message::Subscribe(vni(1)));
    a.sync_point();
    b.send(&add(route(1, 1, 1)));
    assert_eq!(
        a.recv_update(WAIT),
        Some((metalbond_wire::Action::Add, route(1, 1, 1)))
    );
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    assert!(wait_exit(&mut child).success());
    let log = stderr_of(&mut child);
    assert!(log.contains("HTTP status server listening"), "{log}");
}

#[test]
fn a_restart_on_the_same_port_binds_at_once() {
    // An operator's restart: stop (SIGTERM, wait for the exit), start again
    // on the same port straight away. The old process's listening socket
    // must not linger (an accept queued in io_uring used to keep it in
    // LISTEN after exit, so 1 restart in 5 to 15 failed with "in use").
    // Listening is detected without connecting and without binding (from
    // /proc/net/tcp), so the server's first accept is still queued when it
    // is stopped, and no probe of ours holds the port when it binds (a
    // bind-and-drop probe did, for a moment every 10 ms).
    // The port is outside the ephemeral range: between two rounds nothing
    // holds it, and an ephemeral one was once handed to another test's
    // outgoing connection meanwhile ("in use" in round 4).
    let addr = free_port_outside_ephemeral("127.0.0.1");
    for round in 0..40 {
        let mut child = server(&["--listen", &addr.to_string(), "--shards", "2"]);
        let deadline = Instant::now() + WAIT;
        while !listening_on(addr) {
            if child.0.try_wait().unwrap().is_some() {
                panic!("restart {round} failed: {}", stderr_of(&mut child));
            }
            assert!(Instant::now() < deadline, "server never listened on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.0.id() as i32, libc::SIGTERM);
        }
        assert!(wait_exit(&mut child).success(), "round {round}");
    }
}

/// Is a socket listening on IPv4 `addr`? From `/proc/net/tcp` (local
/// address as the host-order hex of the network-order u32, state `0A`),
/// touching no socket.
fn listening_on(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        panic!("listening_on reads /proc/net/tcp: IPv4 only, not {addr}");
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        cols.nth(1) == Some(local.as_str()) && cols.nth(1) == Some("0A")
    })
}

/// Starts a server on a free loopback port with stderr written to a file
/// (as under systemd with `StandardError=file:` or a shell redirect) and
/// `extra` flags; returns the child, its address and the log path.
fn server_logging_to_file(extra: &[&str]) -> (ChildGuard, SocketAddr, std::path::PathBuf) {
    let addr = free_port("127.0.0.1");
    let path = std::env::temp_dir().join(format!(
        "metalbond-log-{}-{}.log",
        std::process::id(),
        addr.port()
    ));
    let file = std::fs::File::create(&path).expect("log file");
    let a = addr.to_string();
    let mut args = vec!["--listen", a.as_str()];
    args.extend_from_slice(extra);
    let mut cmd = server_command(&args);
    cmd.env_remove("NO_COLOR").stderr(file);
    let mut child = ChildGuard(cmd.spawn().expect("spawn metalbond"));
    wait_listening(&mut child, &[addr]).expect("server starts");
    (child, addr, path)
}

/// Stops the child (SIGTERM), removes the log file and returns its text.
fn stop_and_read_log(mut child: ChildGuard, path: &std::path::Path) -> String {
    child.signal(libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    let log = std::fs::read_to_string(path).expect("read log");
    let _ = std::fs::remove_file(path);
    log
}

#[test]
fn a_log_file_has_no_escape_codes_and_logfmt_lines_starting_with_the_version() {
    let (child, addr, path) = server_logging_to_file(&[]);
    drop(connect_when_up(addr));
    let log = stop_and_read_log(child, &path);
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
    let first = log.lines().next().expect("a first line");
    assert!(first.starts_with("time=\""), "{first}");
    assert!(first.contains("level=info"), "{first}");
    assert!(
        first.contains(&format!(
            "msg=\"MetalBond Version: {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{first}"
    );
    assert!(first.contains(" role=server"), "{first}");
    assert!(first.contains(" commit="), "{first}");
    for line in log.lines() {
        assert!(
            line.starts_with("time=\"") && line.contains(" msg="),
            "not logfmt: {line}"
        );
    }
    assert!(log.contains("msg=\"peer connected\""), "{log}");
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let (child, addr, path) = server_logging_to_file(&["--log-format", "json"]);
    drop(connect_when_up(addr));
    let log = stop_and_read_log(child, &path);
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        messages[0].starts_with("MetalBond Version: "),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "peer connected"),
        "{messages:?}"
    );
}

#[test]
fn sighup_is_logged_and_ignored() {
    let (child, addr, path) = server_logging_to_file(&[]);
    let mut before = connect_when_up(addr);
    before.keep_alive(Duration::from_millis(500));
    child.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    child.signal(libc::SIGHUP); // a second one too (signals of one kind may merge)
    std::thread::sleep(Duration::from_millis(300));
    let mut child = child;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the server"
    );
    // Still serving: the old session and a new one.
    before.send(&metalbond_wire::codec::Message::Subscribe(vni(2)));
    assert!(before.sync_point().is_empty());
    drop(connect_when_up(addr));
    let log = stop_and_read_log(child, &path);
    assert!(log.contains("msg=\"SIGHUP received: ignored"), "{log}");
}

#[test]
fn version_flag_names_version_and_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metalbond"))
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("metalbond {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[test]
fn listen_accepts_a_host_name_and_keepalive_zero_means_five() {
    let addr = free_port("127.0.0.1");
    let by_name = format!("localhost:{}", addr.port());
    let mut child = server(&["--listen", &by_name, "--keepalive", "0"]);
    // localhost resolves to 127.0.0.1 (and ::1 where configured).
    wait_listening(&mut child, &[addr]).expect("listening on localhost");
    let mut p = TestPeer::connect(addr);
    assert_eq!(p.handshake(30), 5, "keepalive 0 is the default 5 s");
    child.signal(libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
}
