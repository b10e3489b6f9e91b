//! Test support for the client library: a scripted MetalBond server on
//! loopback (the passive side, driven by the test with the crate's own
//! `PeerSession`), and what a test sink saw.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use metalbond_client::{ClientConfig, RouteSink};
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::session::{PeerSession, Reaction, Role};
use metalbond_wire::{Action, IpNet, NextHop, Route, Vni};

/// Generous bound for anything that should take milliseconds.
pub const WAIT: Duration = Duration::from_secs(10);
/// A valid VNI (one definition for every test).
pub use crate::vni;

pub fn route(v: u32, prefix: &str, hop: &str) -> Route {
    Route::new(
        vni(v),
        prefix.parse().unwrap(),
        NextHop::standard(hop.parse().unwrap()),
    )
}

pub fn fast_config() -> ClientConfig {
    ClientConfig {
        keepalive: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    }
}

/// A passive MetalBond peer on 127.0.0.1 driven by the test.
pub struct ScriptedServer {
    pub address: String,
    /// The latest accepted connection (to send UPDATEs on).
    pub conn: Arc<Mutex<Option<TcpStream>>>,
    /// Source addresses of accepted connections, in order.
    pub peers: Receiver<SocketAddr>,
    /// Messages the client sent after ESTABLISHED (SUBSCRIBE, UPDATE...).
    pub received: Receiver<Message>,
    /// Connections accepted so far.
    accepted: Arc<Mutex<usize>>,
}

impl ScriptedServer {
    pub fn start() -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let conn: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let (peer_tx, peers) = crossbeam_channel::unbounded();
        let (msg_tx, received) = crossbeam_channel::unbounded();
        let accepted: Arc<Mutex<usize>> = Arc::default();
        let (c, a) = (conn.clone(), accepted.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if let Ok(peer) = stream.peer_addr() {
                    let _ = peer_tx.send(peer);
                }
                *c.lock().unwrap() = Some(stream.try_clone().unwrap());
                *a.lock().unwrap() += 1;
                let tx = msg_tx.clone();
                std::thread::spawn(move || serve(stream, tx));
            }
        });
        ScriptedServer {
            address,
            conn,
            peers,
            received,
            accepted,
        }
    }

    pub fn send(&self, action: Action, route: Route) {
        let mut buf = Vec::new();
        encode_frame(&Message::Update { action, route }, &mut buf);
        let conn = self.conn.lock().unwrap();
        // The client may have gone already: that is what some tests check.
        if let Some(c) = conn.as_ref() {
            let _ = (&*c).write_all(&buf);
        }
    }
}

impl ScriptedServer {
    /// Closes the current connection (the client sees its session lost and
    /// reconnects; the next connection becomes the current one).
    pub fn drop_connection(&self) {
        if let Some(c) = self.conn.lock().unwrap().take() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Collects messages the client sent until `n` arrived (or `WAIT`
    /// passed).
    pub fn expect_messages(&self, n: usize) -> Vec<Message> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        while out.len() < n {
            match self.received.recv_deadline(deadline) {
                Ok(m) => out.push(m),
                Err(_) => break,
            }
        }
        out
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }

    /// Waits until the client has connected `n` times in all.
    pub fn wait_connections(&self, n: usize, seen: &mut usize) {
        while *seen < n {
            self.peers
                .recv_timeout(WAIT)
                .expect("the client reconnects");
            *seen += 1;
        }
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        if let Some(c) = self.conn.lock().unwrap().take() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Answers HELLO and keepalives; passes what the client sends after
/// ESTABLISHED to `tx`.
pub fn serve(mut stream: TcpStream, tx: Sender<Message>) {
    let mut session = PeerSession::new(Role::Passive, Duration::from_secs(1), Instant::now());
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.extend(&buf[..n]);
        while let Ok(Some(msg)) = decoder.next_message() {
            let mut out = Vec::new();
            match session.on_message(msg, Instant::now()) {
                Ok(Reaction::Reply(m)) | Ok(Reaction::Established { reply: Some(m) }) => {
                    encode_frame(&m, &mut out);
                }
                Ok(Reaction::Deliver(m)) => {
                    let _ = tx.send(m);
                }
                Ok(_) => {}
                Err(_) => return,
            }
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

/// What a sink saw, sent to the test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Add(Route),
    Remove(Route),
}

pub fn expect(rx: &Receiver<Seen>, want: Seen) {
    match rx.recv_timeout(WAIT) {
        Ok(got) => assert_eq!(got, want),
        Err(_) => panic!("the sink never saw {want:?}"),
    }
}

/// A sink that sends every call to the test.
pub struct ChannelSink(pub Sender<Seen>);

impl RouteSink for ChannelSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let _ = self
            .0
            .send(Seen::Add(Route::new(vni, destination, next_hop)));
    }
    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        let _ = self
            .0
            .send(Seen::Remove(Route::new(vni, destination, next_hop)));
    }
}
