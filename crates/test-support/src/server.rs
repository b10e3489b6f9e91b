//! Shared helpers for the server tests: an in-process server on loopback
//! (shut down on drop) and a blocking test peer speaking the protocol with
//! the crate's own codec, so every assertion is about bytes on a real socket.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metalbond_server::{PeerInfo, Server, ServerConfig, ServerHandle, ServerStats};
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::{Action, NextHop, Route};

/// The process helpers, where the server tests have always found them.
pub use crate::process;

/// Generous bound for anything a test waits for (never reached when correct).
pub const WAIT: Duration = Duration::from_secs(20);

/// An in-process server on 127.0.0.1 with a free port; shut down on drop.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
}

impl TestServer {
    pub fn start(shards: usize) -> TestServer {
        TestServer::with(shards, |_| {})
    }

    pub fn with(shards: usize, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut c = ServerConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
        c.shards = shards;
        c.pin_cpus = false;
        tweak(&mut c);
        let handle = Server::start(c).expect("server starts");
        let addr = handle.local_addrs()[0];
        TestServer {
            handle: Some(handle),
            addr,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    /// Waits until `f` holds for the peers snapshot.
    pub fn wait_peers(&self, what: &str, f: impl Fn(&[PeerInfo]) -> bool) -> Vec<PeerInfo> {
        let deadline = Instant::now() + WAIT;
        loop {
            let peers = self.handle().peers();
            if f(&peers) {
                return peers;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `f` holds for the counters (they are updated just after
    /// a socket is closed, so a test that saw the close polls them).
    pub fn wait_stats(&self, what: &str, f: impl Fn(&ServerStats) -> bool) -> ServerStats {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = self.handle().stats();
            if f(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the server's table holds exactly `n` routes.
    pub fn wait_route_count(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let have: usize = self.handle().routes().iter().map(|v| v.routes.len()).sum();
            if have == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} routes (have {have})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// A valid VNI (one definition for every test).
pub use crate::vni;

/// A distinct IPv4 /32 route number `i` in `v` via 2001:db8::`hop`.
pub fn route(v: u32, i: u32, hop: u16) -> Route {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
    Route::new(
        vni(v),
        format!("{ip}/32").parse().unwrap(),
        NextHop::standard(std::net::IpAddr::V6(std::net::Ipv6Addr::new(
            0x2001, 0xdb8, 0, 0, 0, 0, 0, hop,
        ))),
    )
}

pub fn add(r: Route) -> Message {
    Message::Update {
        action: Action::Add,
        route: r,
    }
}

pub fn remove(r: Route) -> Message {
    Message::Update {
        action: Action::Remove,
        route: r,
    }
}

pub fn frame(msg: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_frame(msg, &mut b);
    b.to_vec()
}

/// A blocking protocol peer on a real TCP connection.
pub struct TestPeer {
    pub stream: TcpStream,
    writer: Arc<Mutex<TcpStream>>,
    decoder: FrameDecoder,
    inbox: VecDeque<Message>,
    keepalive_stop: Arc<AtomicBool>,
    /// True once the server closed the connection.
    pub eof: bool,
}

impl TestPeer {
    pub fn connect(addr: SocketAddr) -> TestPeer {
        TestPeer::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from source address `source` (e.g. 127.0.0.2: the peer
    /// policy tells peers apart by their source address).
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> TestPeer {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .expect("socket");
        sock.bind(&SocketAddr::new(source, 0).into())
            .expect("bind the source address");
        sock.connect_timeout(&addr.into(), WAIT).expect("connect");
        TestPeer::from_stream(sock.into())
    }

    fn from_stream(stream: TcpStream) -> TestPeer {
        stream.set_nodelay(true).unwrap();
        let writer = Arc::new(Mutex::new(stream.try_clone().unwrap()));
        TestPeer {
            stream,
            writer,
            decoder: FrameDecoder::new(),
            inbox: VecDeque::new(),
            keepalive_stop: Arc::new(AtomicBool::new(false)),
            eof: false,
        }
    }

    /// Connects and completes the handshake offering `keepalive` seconds;
    /// returns the server's HELLO interval.
    pub fn established(addr: SocketAddr, keepalive: u32) -> (TestPeer, u32) {
        let mut p = TestPeer::connect(addr);
        let k = p.handshake(keepalive);
        (p, k)
    }

    /// The handshake with a HELLO as a Go client sends it (no
    /// `readsStream`: the server paces this peer until it proves it streams).
    pub fn handshake(&mut self, keepalive: u32) -> u32 {
        self.handshake_declaring(keepalive, false)
    }

    /// The handshake, our HELLO saying whether we read as a stream.
    pub fn handshake_declaring(&mut self, keepalive: u32, reads_stream: bool) -> u32 {
        self.send(&Message::Hello {
            keepalive_secs: keepalive,
            is_server: false,
            reads_stream,
        });
        let k = match self.recv(WAIT) {
            Some(Message::Hello {
                keepalive_secs,
                is_server: true,
                ..
            }) => keepalive_secs,
            other => panic!("expected server HELLO, got {other:?}"),
        };
        self.send(&Message::Keepalive);
        match self.recv(WAIT) {
            Some(Message::Keepalive) => {}
            other => panic!("expected KEEPALIVE, got {other:?}"),
        }
        k
    }

    /// Sends a KEEPALIVE every `every` from a background thread (like a
    /// real client), until the peer is dropped.
    pub fn keep_alive(&self, every: Duration) {
        let w = self.writer.clone();
        let stop = self.keepalive_stop.clone();
        std::thread::spawn(move || {
            let ka = frame(&Message::Keepalive);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                if w.lock().unwrap().write_all(&ka).is_err() {
                    return;
                }
            }
        });
    }

    /// The writing half, for a test that writes from another thread.
    pub fn writer_clone(&self) -> Arc<Mutex<TcpStream>> {
        self.writer.clone()
    }

    pub fn send(&self, msg: &Message) {
        self.send_raw(&frame(msg));
    }

    pub fn send_all(&self, msgs: &[Message]) {
        let mut b = BytesMut::new();
        for m in msgs {
            encode_frame(m, &mut b);
        }
        self.send_raw(&b);
    }

    pub fn send_raw(&self, bytes: &[u8]) {
        let _ = self.writer.lock().unwrap().write_all(bytes);
    }

    /// Next message other than KEEPALIVE replies... no: next message of any
    /// type, or None on timeout/EOF.
    pub fn recv(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(m) = self.inbox.pop_front() {
                return Some(m);
            }
            if let Ok(Some(m)) = self.decoder.next_message() {
                return Some(m);
            }
            if self.eof {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .unwrap();
            let mut buf = [0u8; 65536];
            match self.stream.read(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self.decoder.extend(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => self.eof = true,
            }
        }
    }

    /// Next UPDATE (skipping keepalives), or None.
    pub fn recv_update(&mut self, timeout: Duration) -> Option<(Action, Route)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Message::Update { action, route } => return Some((action, route)),
                _ => continue,
            }
        }
    }

    /// Asserts no UPDATE arrives within `quiet`.
    pub fn expect_no_update(&mut self, quiet: Duration) {
        if let Some(u) = self.recv_update(quiet) {
            panic!("unexpected update {u:?}");
        }
    }

    /// Round trip: sends a KEEPALIVE and reads until its reply; returns the
    /// updates that arrived before it (everything the server had queued).
    pub fn sync_point(&mut self) -> Vec<(Action, Route)> {
        self.send(&Message::Keepalive);
        let mut ups = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(Message::Keepalive) => return ups,
                Some(Message::Update { action, route }) => ups.push((action, route)),
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("no KEEPALIVE reply (eof={})", self.eof),
            }
        }
    }

    /// Applies updates until the route set equals `want` (asserting each ADD
    /// is new and each REMOVE known), within the timeout.
    pub fn converge(&mut self, state: &mut BTreeSet<Route>, want: &BTreeSet<Route>) {
        let deadline = Instant::now() + WAIT;
        while state != want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_update(left) {
                Some((a, r)) => apply(state, a, r),
                None => panic!(
                    "did not converge: have {} routes, want {} (eof={})",
                    state.len(),
                    want.len(),
                    self.eof
                ),
            }
        }
    }

    /// True if the server closes the connection within `timeout`
    /// (messages received before the close are discarded).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.inbox.clear();
            let _ = self.recv(left);
        }
        true
    }

    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        self.keepalive_stop.store(true, Ordering::Relaxed);
    }
}

/// Applies one update to a subscriber's view, asserting it is consistent.
pub fn apply(state: &mut BTreeSet<Route>, a: Action, r: Route) {
    match a {
        Action::Add => assert!(state.insert(r), "duplicate ADD {r}"),
        Action::Remove => assert!(state.remove(&r), "REMOVE of unknown {r}"),
    }
}
