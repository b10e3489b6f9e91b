//! The `metalbond server` binary as a real process: signals, exit status,
//! start-up errors as one clear line, several listen addresses.

mod server_support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use server_support::*;

/// Kills the child if the test fails before it exits.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap()
}

fn server(args: &[&str]) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_metalbond"))
        .arg("server")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn metalbond");
    ChildGuard(child)
}

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

/// Waits until every address in `addrs` accepts; `Err(stderr)` when the
/// server exits first.
fn wait_listening(child: &mut ChildGuard, addrs: &[SocketAddr]) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    for addr in addrs {
        loop {
            if child.0.try_wait().unwrap().is_some() {
                return Err(stderr_of(child));
            }
            if std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "server never listened on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn wait_exit(child: &mut ChildGuard) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut ChildGuard) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
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
    a.send(&metalbond::codec::Message::Subscribe(vni(1)));
    a.sync_point();
    b.send(&add(route(1, 1, 1)));
    assert_eq!(
        a.recv_update(WAIT),
        Some((metalbond::Action::Add, route(1, 1, 1)))
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
    // Listening is detected without connecting (a bind of our own fails),
    // so the server's first accept is still queued when it is stopped.
    let addr = free_port("127.0.0.1");
    for round in 0..40 {
        let mut child = server(&["--listen", &addr.to_string(), "--shards", "2"]);
        let deadline = Instant::now() + WAIT;
        while TcpListener::bind(addr).is_ok() {
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
