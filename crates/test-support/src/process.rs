//! The `metalbond server` binary as a child process: start it, wait for it
//! to listen or exit, read its stderr and its memory from `/proc`. The child
//! is killed when the guard drops, also when a test fails.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::WAIT;

/// Kills the child if the test fails before it exits.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, sig);
        }
    }

    /// SIGTERM, then waits (`WAIT`, scaled by the patience) for the exit;
    /// its exit code (`None`: ended by a signal). Panics when it does not
    /// exit.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        exit_status(&mut self, "the process did not exit on SIGTERM").code()
    }

    /// SIGKILL: the process dies without any goodbye.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago on `ip` (`127.0.0.1`, `[::1]`).
pub fn free_port(ip: &str) -> SocketAddr {
    let l = TcpListener::bind(format!("{ip}:0")).unwrap();
    l.local_addr().unwrap()
}

/// A free port on `ip` below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), for a test that leaves its port
/// unbound between restarts: a port from `free_port` is an ephemeral one,
/// and any test's outgoing connection may be given it meanwhile (then the
/// restart fails with "in use"). Takes one from 10,000 up to the range's
/// start; falls back to `free_port` when the range starts at or below
/// 10,000 or none there is free.
pub fn free_port_outside_ephemeral(ip: &str) -> SocketAddr {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if low <= 10_000 {
        return free_port(ip);
    }
    // Start where other test processes are unlikely to: an offset from
    // our pid, then walk the range.
    let span = u32::from(low - 10_000);
    let start = std::process::id() % span;
    (0..span)
        .map(|i| 10_000 + ((start + i) % span) as u16)
        .find_map(|port| {
            TcpListener::bind(format!("{ip}:{port}"))
                .ok()
                .and_then(|l| l.local_addr().ok())
        })
        .unwrap_or_else(|| free_port(ip))
}

/// `metalbond server ARGS`, stderr piped, stdout discarded.
pub fn server(args: &[&str]) -> ChildGuard {
    server_command(args)
        .spawn()
        .map(ChildGuard)
        .expect("spawn metalbond")
}

/// The command `server` runs, to adjust before spawning (limits, env).
pub fn server_command(args: &[&str]) -> Command {
    let mut c = Command::new(crate::metalbond_bin());
    c.arg("server")
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Waits until every address in `addrs` accepts; `Err(stderr)` when the
/// server exits first.
pub fn wait_listening(child: &mut ChildGuard, addrs: &[SocketAddr]) -> Result<(), String> {
    let deadline = Instant::now() + crate::patient(WAIT);
    for addr in addrs {
        loop {
            if child.0.try_wait().unwrap().is_some() {
                return Err(stderr_of(child));
            }
            if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "server never listened on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Waits for the child to exit (bounded by `WAIT`, scaled by the
/// patience).
pub fn wait_exit(child: &mut ChildGuard) -> std::process::ExitStatus {
    exit_status(child, "the process did not exit")
}

/// The child's exit status, looked at every 5 ms (tests time what follows
/// an exit from the moment this returns), within `WAIT` scaled by the
/// patience; panics with `what` otherwise.
fn exit_status(child: &mut ChildGuard, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + crate::patient(WAIT);
    loop {
        if let Some(status) = child.0.try_wait().ok().flatten() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {:?}",
            crate::patient(WAIT)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Everything the child wrote to stderr (call after it exited, or after
/// killing it: reads to EOF).
pub fn stderr_of(child: &mut ChildGuard) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`) or plain count
/// (`Threads`).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The lines a child writes to a pipe, collected by a thread as they come
/// (so the child never blocks on a full pipe, and a test can wait for a
/// line while the child runs).
#[derive(Clone, Default)]
pub struct CollectedLines(Arc<Mutex<Vec<String>>>);

impl CollectedLines {
    /// Starts collecting the lines of `pipe` (a child's stdout or stderr).
    pub fn from(pipe: impl Read + Send + 'static) -> CollectedLines {
        let lines = CollectedLines::default();
        let sink = lines.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        lines
    }

    /// Every line so far, joined by newlines.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// How many lines so far contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Waits (`limit`, scaled by the patience) until `times` lines contain
    /// `text`.
    pub fn wait_for(&self, text: &str, times: usize, limit: Duration) -> bool {
        crate::wait_until(limit, || self.count(text) >= times)
    }
}
