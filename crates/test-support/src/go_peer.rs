//! A model of what a deployed Go MetalBond peer can take: the receive path
//! of `peer.go` in ironcore-dev/metalbond at 11ad382, as a client
//! (`GoClientModel`) and as a server (`GoServerModel`), over real TCP on
//! loopback. Tests use it to check that what our server and client write is
//! something the Go peers in the field survive (issue #30: they crash-loop
//! on a fast sync).
//!
//! What is modelled, each as the Go code does it:
//! - `rxLoop`: one 65,535-byte read buffer. A read that returns 65,535
//!   bytes or more resets the session ("too many messages in inbound queue.
//!   Closing connection."). The bytes of one read are parsed frame by frame
//!   on the assumption that the read ends on a frame boundary; there is no
//!   reassembly across reads, so a read that ends inside a frame is a reset
//!   here too ([`Reset::SplitFrame`]: the Go peer parses stale buffer bytes
//!   as the frame's rest, or panics on a slice out of range). The next read
//!   happens only after every frame of the previous one was handed on.
//! - The hand-over: each parsed message goes into a bounded channel per type
//!   (`rxHello` and `rxKeepalive` hold 5, `rxSubscribe`, `rxUnsubscribe` and
//!   `rxUpdate` 100), and the reader blocks while the channel is full.
//! - `handle()`: one consumer takes from all channels (Go's `select`, which
//!   picks at random among the ready ones: `crossbeam_channel::select!`
//!   does the same) and processes one message at a time. An UPDATE costs
//!   the configured processing time (the Go peers log a line per route and
//!   manage about 4,000-8,000 routes a second); see [`GoPeerConfig`].
//! - The handshake and keepalives of `processRxHello`, `processRxKeepalive`
//!   and `keepaliveLoop`: the client sends HELLO{interval, isServer=false},
//!   on the server's HELLO starts its keepalive loop (a KEEPALIVE at once,
//!   then one per interval) and becomes ESTABLISHED on the first KEEPALIVE
//!   after that, then subscribes; it never answers KEEPALIVEs and takes
//!   extra ones in ESTABLISHED silently. The server answers HELLO with
//!   HELLO{min interval, isServer=true}, becomes ESTABLISHED on the first
//!   KEEPALIVE and answers every KEEPALIVE. Both reset when no KEEPALIVE
//!   was *processed* within 2.5 intervals: the timer is reset by the
//!   consumer, so a KEEPALIVE stuck behind a backlog of UPDATEs counts late,
//!   as in Go.
//! - `txLoop`: every message the model sends is one write of one frame
//!   (written by the thread that sends it; Go queues it for its writer
//!   goroutine, which differs only when the other side stops reading).
//!
//! What is not modelled: the reconnect after a reset (the Go client waits
//! 5-9 s and starts over; the model stops at the first reset and records
//! it, because a test wants to know about the first one), the Go route
//! table and the Go server's reflection to other peers, and the Go peer's
//! own looser decoding (a frame the crate's codec refuses is recorded as
//! [`Reset::Undecodable`]).
//!
//! The framing check is made on the raw bytes of each read; the crate's
//! codec is used only to encode what the model sends and to decode the
//! payload of a frame the model has cut out of a read.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, select, Receiver, Sender};
use metalbond_wire::codec::{encode_frame, Message, MessageType, HEADER_LEN, VERSION};
use metalbond_wire::{Action, Route, Vni};

/// The Go reader's buffer (`buf := make([]byte, 65535)`): a read of this
/// size or more resets the session.
pub const GO_READ_BUFFER: usize = 65_535;
/// Capacity of Go's `rxUpdate`, `rxSubscribe` and `rxUnsubscribe` channels.
pub const GO_MESSAGE_QUEUE: usize = 100;
/// Capacity of Go's `rxHello` and `rxKeepalive` channels.
pub const GO_CONTROL_QUEUE: usize = 5;
/// The Go peers' default keepalive interval (`NewMetalBond`: 0 means 5 s).
pub const GO_KEEPALIVE_SECS: u32 = 5;
/// Processing time per UPDATE of a deployed Go peer: about 6,700 routes a
/// second, inside the 4,000-8,000 measured (issue #30).
pub const GO_PER_ROUTE: Duration = Duration::from_micros(150);
/// How often the keepalive thread looks at its clocks (Go uses timers; the
/// model polls, which only makes its timeouts up to this much later).
const KEEPALIVE_POLL: Duration = Duration::from_millis(20);
/// How often `wait_until` looks at the record.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// How a model peer behaves.
#[derive(Clone, Debug)]
pub struct GoPeerConfig {
    /// Keepalive interval offered in HELLO, in seconds (the session uses the
    /// smaller of both sides'). Also sets the 2.5-interval timeout.
    pub keepalive_secs: u32,
    /// Time the consumer spends on each UPDATE. The model keeps the average
    /// rate exact (a virtual clock, slept off in the consumer thread) rather
    /// than spinning: the machine's cores are shared.
    pub per_route: Duration,
}

impl Default for GoPeerConfig {
    /// A deployed Go peer: 5 s keepalives, 0.15 ms per route.
    fn default() -> GoPeerConfig {
        GoPeerConfig {
            keepalive_secs: GO_KEEPALIVE_SECS,
            per_route: GO_PER_ROUTE,
        }
    }
}

/// Why a model session was reset: each is a point where the Go peer closes
/// (or, for `UnknownType`, stops reading) the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reset {
    /// A read returned `bytes` >= 65,535: "too many messages in inbound
    /// queue. Closing connection."
    FullRead {
        /// Bytes that one read returned.
        bytes: usize,
    },
    /// A read of `read` bytes ended inside a frame that starts at `at`; the
    /// frame needs `frame` bytes (`None`: not even its header is complete).
    /// The Go reader would parse stale bytes as the rest.
    SplitFrame {
        /// Bytes of the read.
        read: usize,
        /// Offset of the incomplete frame in it.
        at: usize,
        /// The frame's full length (header included), when its header is in.
        frame: Option<usize>,
    },
    /// A frame header with a version other than 1: "Incompatible Client
    /// version. Closing connection."
    BadVersion {
        /// The version byte.
        version: u8,
    },
    /// A type byte Go does not know: "Unknown Packet received. Closing
    /// connection." (Go then stops reading without closing.)
    UnknownType {
        /// The type byte.
        msg_type: u8,
    },
    /// A payload that does not decode: "Cannot deserialize ... message".
    Undecodable {
        /// What the crate's decoder said.
        error: String,
    },
    /// HELLO with a keepalive interval below 1: "Keepalive Interval too low".
    KeepaliveIntervalTooLow,
    /// A KEEPALIVE where Go expects none: "Received KEEPALIVE while in
    /// wrong state. Closing connection."
    KeepaliveInWrongState {
        /// The model's state when it came.
        state: GoState,
    },
    /// No KEEPALIVE processed for 2.5 intervals: "Connection timed out.
    /// Closing."
    KeepaliveTimeout,
    /// The other side closed the connection: "Connection closed by peer".
    ClosedByPeer,
    /// A read failed: "Error reading from socket".
    ReadError(String),
    /// A write failed: "Could not transmit message completely".
    WriteError(String),
}

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reset::FullRead { bytes } => write!(
                f,
                "a read returned {bytes} bytes (>= {GO_READ_BUFFER}): \"too many messages in inbound queue\""
            ),
            Reset::SplitFrame { read, at, frame } => match frame {
                Some(len) => write!(
                    f,
                    "split frame: a read of {read} bytes ends inside a {len}-byte frame at offset {at}"
                ),
                None => write!(
                    f,
                    "split frame: a read of {read} bytes ends inside a frame header at offset {at}"
                ),
            },
            Reset::BadVersion { version } => write!(f, "frame version {version}"),
            Reset::UnknownType { msg_type } => write!(f, "unknown message type {msg_type}"),
            Reset::Undecodable { error } => write!(f, "undecodable payload: {error}"),
            Reset::KeepaliveIntervalTooLow => write!(f, "HELLO with keepalive interval 0"),
            Reset::KeepaliveInWrongState { state } => write!(f, "KEEPALIVE in state {state:?}"),
            Reset::KeepaliveTimeout => write!(f, "no KEEPALIVE processed within 2.5 intervals"),
            Reset::ClosedByPeer => write!(f, "connection closed by peer"),
            Reset::ReadError(e) => write!(f, "read error: {e}"),
            Reset::WriteError(e) => write!(f, "write error: {e}"),
        }
    }
}

/// The Go peer's connection states that the model goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoState {
    /// Connected, nothing exchanged yet (the server before HELLO).
    Connecting,
    /// The client sent HELLO; the server answered the client's HELLO.
    HelloSent,
    /// The client got the server's HELLO and sent its first KEEPALIVE.
    HelloReceived,
    /// Handshake complete.
    Established,
}

/// Which side of the session the model plays.
#[derive(Clone, Debug)]
enum Side {
    /// The Go client: subscribes to these VNIs once ESTABLISHED.
    Client { subscribe: Vec<Vni> },
    /// The Go server.
    Server,
}

/// What one model session saw and did; tests read it as a [`Summary`] and
/// the route set.
#[derive(Clone, Debug)]
struct SessionRecord {
    /// The other end of the connection.
    peer: SocketAddr,
    /// Where the handshake got to.
    state: GoState,
    /// Routes present after every ADD and REMOVE applied so far.
    routes: HashSet<Route>,
    /// UPDATE ADDs applied.
    adds: u64,
    /// UPDATE REMOVEs applied.
    removes: u64,
    /// ADDs of a route already present (Go logs "Could not add received
    /// route"); a correct sender sends none.
    duplicate_adds: u64,
    /// REMOVEs of a route not present (Go logs "Could not remove received
    /// route"); a correct sender sends none.
    unknown_removes: u64,
    /// VNIs the other side subscribed to (server side).
    subscriptions: BTreeSet<Vni>,
    /// Reads that returned data.
    reads: u64,
    /// Bytes they returned.
    bytes_read: u64,
    /// The largest read: how close the sender came to the 65,535-byte limit.
    max_read: usize,
    /// Why the session ended, if it did (the model records the first reset
    /// only: the Go peer closes the connection there).
    reset: Option<Reset>,
}

impl SessionRecord {
    fn new(peer: SocketAddr, state: GoState) -> SessionRecord {
        SessionRecord {
            peer,
            state,
            routes: HashSet::new(),
            adds: 0,
            removes: 0,
            duplicate_adds: 0,
            unknown_removes: 0,
            subscriptions: BTreeSet::new(),
            reads: 0,
            bytes_read: 0,
            max_read: 0,
            reset: None,
        }
    }

    /// The record without the route set (cheap to copy while polling).
    fn summary(&self) -> Summary {
        Summary {
            peer: self.peer,
            state: self.state,
            routes: self.routes.len(),
            adds: self.adds,
            removes: self.removes,
            duplicate_adds: self.duplicate_adds,
            unknown_removes: self.unknown_removes,
            subscriptions: self.subscriptions.iter().copied().collect(),
            reads: self.reads,
            bytes_read: self.bytes_read,
            max_read: self.max_read,
            reset: self.reset.clone(),
        }
    }
}

/// A session's counters without its route set: what a test polls.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The other end of the connection.
    pub peer: SocketAddr,
    /// Where the handshake got to.
    pub state: GoState,
    /// Routes present.
    pub routes: usize,
    /// UPDATE ADDs applied.
    pub adds: u64,
    /// UPDATE REMOVEs applied.
    pub removes: u64,
    /// ADDs of a route already present.
    pub duplicate_adds: u64,
    /// REMOVEs of a route not present.
    pub unknown_removes: u64,
    /// VNIs the other side subscribed to, in order (server side).
    pub subscriptions: Vec<Vni>,
    /// Reads that returned data.
    pub reads: u64,
    /// Bytes they returned.
    pub bytes_read: u64,
    /// The largest read.
    pub max_read: usize,
    /// Why the session ended, if it did.
    pub reset: Option<Reset>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer {} {:?}: {} routes ({} ADD, {} REMOVE, {} duplicate ADD, {} unknown REMOVE), \
             {} reads, {} bytes, largest read {} bytes, reset: {}",
            self.peer,
            self.state,
            self.routes,
            self.adds,
            self.removes,
            self.duplicate_adds,
            self.unknown_removes,
            self.reads,
            self.bytes_read,
            self.max_read,
            match &self.reset {
                Some(r) => r.to_string(),
                None => "none".to_string(),
            }
        )
    }
}

/// A parsed message on its way from the reader to the consumer, stamped
/// with the time it was handed over (for the consumer's virtual clock).
type Queued = (Instant, Message);

/// The reader's ends of Go's five `rx*` channels.
struct Inbound {
    /// `rxHello` (5).
    hello: Sender<Queued>,
    /// `rxKeepalive` (5).
    keepalive: Sender<Queued>,
    /// `rxSubscribe` (100).
    subscribe: Sender<Queued>,
    /// `rxUnsubscribe` (100).
    unsubscribe: Sender<Queued>,
    /// `rxUpdate` (100): the one a sync fills.
    update: Sender<Queued>,
}

/// The consumer's ends.
struct Outbound {
    /// `rxHello`.
    hello: Receiver<Queued>,
    /// `rxKeepalive`.
    keepalive: Receiver<Queued>,
    /// `rxSubscribe`.
    subscribe: Receiver<Queued>,
    /// `rxUnsubscribe`.
    unsubscribe: Receiver<Queued>,
    /// `rxUpdate`.
    update: Receiver<Queued>,
}

fn channels() -> (Inbound, Outbound) {
    let (hello, hello_rx) = bounded(GO_CONTROL_QUEUE);
    let (keepalive, keepalive_rx) = bounded(GO_CONTROL_QUEUE);
    let (subscribe, subscribe_rx) = bounded(GO_MESSAGE_QUEUE);
    let (unsubscribe, unsubscribe_rx) = bounded(GO_MESSAGE_QUEUE);
    let (update, update_rx) = bounded(GO_MESSAGE_QUEUE);
    (
        Inbound {
            hello,
            keepalive,
            subscribe,
            unsubscribe,
            update,
        },
        Outbound {
            hello: hello_rx,
            keepalive: keepalive_rx,
            subscribe: subscribe_rx,
            unsubscribe: unsubscribe_rx,
            update: update_rx,
        },
    )
}

impl Inbound {
    /// Hands `msg` to the consumer, blocking while its channel is full
    /// (Go's `p.rxUpdate <- *upd`). False when the consumer is gone.
    fn push(&self, msg: Message) -> bool {
        let channel = match msg {
            Message::Hello { .. } => &self.hello,
            Message::Keepalive => &self.keepalive,
            Message::Subscribe(_) => &self.subscribe,
            Message::Unsubscribe(_) => &self.unsubscribe,
            Message::Update { .. } => &self.update,
        };
        channel.send((Instant::now(), msg)).is_ok()
    }
}

impl Outbound {
    /// The next message from any channel, picked at random among the ready
    /// ones like Go's `select`; `None` once the reader has gone.
    fn next(&self) -> Option<Queued> {
        let got = select! {
            recv(self.hello) -> m => m,
            recv(self.keepalive) -> m => m,
            recv(self.subscribe) -> m => m,
            recv(self.unsubscribe) -> m => m,
            recv(self.update) -> m => m,
        };
        got.ok()
    }
}

/// One modelled connection: a reader thread (`rxLoop`), a consumer thread
/// (`handle`), and once HELLO arrived a keepalive thread (`keepaliveLoop`).
struct Session {
    /// Client or server: which handshake and keepalive rules apply.
    side: Side,
    /// Keepalive interval offered and processing time per UPDATE.
    config: GoPeerConfig,
    /// For shutting the socket down from any thread.
    stream: TcpStream,
    /// Every frame is one `write_all` under this lock (Go's `txLoop`).
    writer: Mutex<TcpStream>,
    /// What the session saw, for the test.
    record: Mutex<SessionRecord>,
    /// Set at the first reset or when the test drops the model; every
    /// thread stops when it sees it.
    closed: AtomicBool,
    /// The negotiated interval and when a KEEPALIVE was last processed.
    keepalive: Mutex<KeepaliveClock>,
    /// Reader, consumer and keepalive threads, joined when the model drops.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The keepalive timer's inputs, owned by the consumer.
struct KeepaliveClock {
    /// Negotiated interval in seconds; `None` until HELLO was processed.
    interval: Option<u32>,
    /// When the consumer last processed a KEEPALIVE (or HELLO, which
    /// starts the timer in Go).
    last: Instant,
}

impl Session {
    /// Starts the reader and consumer on `stream`; the client sends its
    /// HELLO at once (Go's `handle()` after connecting).
    fn start(stream: TcpStream, side: Side, config: GoPeerConfig) -> std::io::Result<Arc<Session>> {
        let peer = stream.peer_addr()?;
        let initial = match side {
            Side::Client { .. } => GoState::HelloSent,
            Side::Server => GoState::Connecting,
        };
        let session = Arc::new(Session {
            side,
            config,
            writer: Mutex::new(stream.try_clone()?),
            stream,
            record: Mutex::new(SessionRecord::new(peer, initial)),
            closed: AtomicBool::new(false),
            keepalive: Mutex::new(KeepaliveClock {
                interval: None,
                last: Instant::now(),
            }),
            threads: Mutex::new(Vec::new()),
        });
        let (inbound, outbound) = channels();
        let reader = {
            let s = session.clone();
            std::thread::Builder::new()
                .name("go-model-rx".into())
                .spawn(move || s.rx_loop(inbound))?
        };
        let consumer = {
            let s = session.clone();
            std::thread::Builder::new()
                .name("go-model-handle".into())
                .spawn(move || s.handle(outbound))?
        };
        session.threads().extend([reader, consumer]);
        if let Side::Client { .. } = session.side {
            session.send(&Message::Hello {
                keepalive_secs: session.config.keepalive_secs,
                is_server: false,
                reads_stream: false,
            });
        }
        Ok(session)
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self) -> MutexGuard<'_, SessionRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn clock(&self) -> MutexGuard<'_, KeepaliveClock> {
        self.keepalive.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the session for `why` (the first reset is the one recorded).
    fn reset(&self, why: Reset) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.record().reset = Some(why);
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }

    /// Ends the session without recording anything (the test is done).
    fn stop(&self) {
        self.closed.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Stops the session and waits for its threads.
    fn stop_and_join(&self) {
        self.stop();
        // The keepalive thread may be added by the consumer meanwhile:
        // take until none is left.
        loop {
            let Some(t) = self.threads().pop() else {
                return;
            };
            let _ = t.join();
        }
    }

    /// One frame, one write (Go's `sendMessage` + `txLoop`).
    fn send(&self, msg: &Message) {
        if self.is_closed() {
            return;
        }
        let mut frame = Vec::new();
        encode_frame(msg, &mut frame);
        let written = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&frame);
        if let Err(e) = written {
            self.reset(Reset::WriteError(e.to_string()));
        }
    }

    /// Go's `rxLoop`: read into one 65,535-byte buffer, parse whole frames
    /// out of that one read, hand each on (blocking), read again.
    fn rx_loop(&self, inbound: Inbound) {
        let mut buf = vec![0u8; GO_READ_BUFFER];
        loop {
            let read = (&self.stream).read(&mut buf);
            if self.is_closed() {
                return;
            }
            let n = match read {
                Ok(0) => return self.reset(Reset::ClosedByPeer),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return self.reset(Reset::ReadError(e.to_string())),
            };
            {
                let mut r = self.record();
                r.reads += 1;
                r.bytes_read += n as u64;
                r.max_read = r.max_read.max(n);
            }
            if n >= GO_READ_BUFFER {
                return self.reset(Reset::FullRead { bytes: n });
            }
            let mut at = 0;
            while at < n && !self.is_closed() {
                let (msg, next) = match parse_frame(&buf[..n], at) {
                    Ok(parsed) => parsed,
                    Err(why) => return self.reset(why),
                };
                if !inbound.push(msg) {
                    return;
                }
                at = next;
            }
        }
    }

    /// Go's `handle()`: one message at a time from the five channels.
    fn handle(self: &Arc<Self>, outbound: Outbound) {
        let mut pace = Pace::new(self.config.per_route);
        while let Some((queued, msg)) = outbound.next() {
            if self.is_closed() {
                // Reset: drain without work so the reader can finish.
                continue;
            }
            match msg {
                Message::Hello { keepalive_secs, .. } => self.on_hello(keepalive_secs),
                Message::Keepalive => self.on_keepalive(),
                Message::Subscribe(vni) => {
                    self.record().subscriptions.insert(vni);
                }
                Message::Unsubscribe(vni) => {
                    self.record().subscriptions.remove(&vni);
                }
                Message::Update { action, route } => {
                    pace.spend(queued);
                    self.apply(action, route);
                }
            }
        }
    }

    /// `processRxHello`.
    fn on_hello(self: &Arc<Self>, theirs: u32) {
        if theirs < 1 {
            return self.reset(Reset::KeepaliveIntervalTooLow);
        }
        let interval = theirs.min(self.config.keepalive_secs);
        let first = {
            let mut clock = self.clock();
            let first = clock.interval.is_none();
            clock.interval = Some(interval);
            clock.last = Instant::now();
            first
        };
        self.record().state = GoState::HelloReceived;
        // Go starts another keepalive loop on every HELLO; one is enough to
        // model the timeout and the client's sending.
        if first {
            let s = self.clone();
            let t = std::thread::Builder::new()
                .name("go-model-keepalive".into())
                .spawn(move || s.keepalive_loop())
                .expect("keepalive thread");
            self.threads().push(t);
        }
        if let Side::Server = self.side {
            self.send(&Message::Hello {
                keepalive_secs: interval,
                is_server: true,
                reads_stream: false,
            });
            self.record().state = GoState::HelloSent;
        }
    }

    /// `processRxKeepalive`.
    fn on_keepalive(&self) {
        let state = self.record().state;
        let established = match (&self.side, state) {
            (Side::Server, GoState::HelloSent) | (Side::Client { .. }, GoState::HelloReceived) => {
                true
            }
            (_, GoState::Established) => false,
            (_, state) => return self.reset(Reset::KeepaliveInWrongState { state }),
        };
        if established {
            self.record().state = GoState::Established;
            // `setState(ESTABLISHED)`: the client subscribes.
            if let Side::Client { subscribe } = &self.side {
                for vni in subscribe {
                    self.send(&Message::Subscribe(*vni));
                }
            }
        }
        self.clock().last = Instant::now();
        if let Side::Server = self.side {
            self.send(&Message::Keepalive);
        }
    }

    /// `processRxUpdate`, recorded in the route set.
    fn apply(&self, action: Action, route: Route) {
        let mut r = self.record();
        match action {
            Action::Add => {
                r.adds += 1;
                if !r.routes.insert(route) {
                    r.duplicate_adds += 1;
                }
            }
            Action::Remove => {
                r.removes += 1;
                if !r.routes.remove(&route) {
                    r.unknown_removes += 1;
                }
            }
        }
    }

    /// `keepaliveLoop`: the client sends a KEEPALIVE at once and then every
    /// interval; both sides reset when none was processed for 2.5 intervals.
    fn keepalive_loop(&self) {
        let Some(interval) = self.clock().interval else {
            return;
        };
        let every = Duration::from_secs(u64::from(interval));
        let timeout = every * 5 / 2;
        let sends = matches!(self.side, Side::Client { .. });
        if sends {
            self.send(&Message::Keepalive);
        }
        let mut next_send = Instant::now() + every;
        while !self.is_closed() {
            std::thread::sleep(KEEPALIVE_POLL);
            let now = Instant::now();
            if sends && now >= next_send {
                self.send(&Message::Keepalive);
                next_send += every;
            }
            if now.duration_since(self.clock().last) > timeout {
                self.reset(Reset::KeepaliveTimeout);
            }
        }
    }
}

/// Cuts the frame starting at `at` out of one read's bytes and decodes it.
/// Returns the message and where the next frame starts, or the reset the Go
/// reader's assumptions lead to.
fn parse_frame(read: &[u8], at: usize) -> Result<(Message, usize), Reset> {
    let rest = &read[at..];
    if rest.len() < HEADER_LEN {
        return Err(Reset::SplitFrame {
            read: read.len(),
            at,
            frame: None,
        });
    }
    if rest[0] != VERSION {
        return Err(Reset::BadVersion { version: rest[0] });
    }
    let len = HEADER_LEN + usize::from(u16::from_be_bytes([rest[1], rest[2]]));
    if rest.len() < len {
        return Err(Reset::SplitFrame {
            read: read.len(),
            at,
            frame: Some(len),
        });
    }
    let msg_type =
        MessageType::from_byte(rest[3]).ok_or(Reset::UnknownType { msg_type: rest[3] })?;
    let payload = Bytes::copy_from_slice(&rest[HEADER_LEN..len]);
    let msg = Message::decode(msg_type, payload).map_err(|e| Reset::Undecodable {
        error: e.to_string(),
    })?;
    Ok((msg, at + len))
}

/// The consumer's processing time as a virtual clock: each UPDATE finishes
/// `per_route` after the later of the previous one's finish and its own
/// hand-over, and the consumer sleeps until then. Oversleeping one UPDATE
/// is made up on the next ones, so the average rate is exact without
/// spinning a core.
struct Pace {
    /// Processing time of one UPDATE.
    per_route: Duration,
    /// When the UPDATE in hand is done (the virtual clock).
    due: Instant,
}

impl Pace {
    fn new(per_route: Duration) -> Pace {
        Pace {
            per_route,
            due: Instant::now(),
        }
    }

    fn spend(&mut self, queued: Instant) {
        if self.per_route.is_zero() {
            return;
        }
        self.due = self.due.max(queued) + self.per_route;
        let now = Instant::now();
        if self.due > now {
            std::thread::sleep(self.due - now);
        }
    }
}

/// Polls `probe` until `done` holds for what it returns or `limit` passes.
/// Returns the last value probed and whether `done` held.
fn poll<T>(limit: Duration, probe: impl Fn() -> T, done: impl Fn(&T) -> bool) -> (T, bool) {
    let deadline = Instant::now() + limit;
    loop {
        let seen = probe();
        if done(&seen) {
            return (seen, true);
        }
        if Instant::now() >= deadline {
            return (seen, false);
        }
        std::thread::sleep(WAIT_POLL);
    }
}

/// The Go client: connects to `addr`, does the client handshake, subscribes
/// to its VNIs, and reads with `rxLoop` semantics. Stops at its first reset
/// (no reconnect). Stopped and joined on drop.
pub struct GoClientModel {
    /// The one connection (no reconnect).
    session: Arc<Session>,
}

impl GoClientModel {
    /// Connects and starts the handshake; the subscriptions go out once the
    /// session is ESTABLISHED.
    pub fn connect(addr: SocketAddr, subscribe: &[Vni], config: GoPeerConfig) -> GoClientModel {
        let stream = TcpStream::connect(addr).expect("the Go client model connects");
        let side = Side::Client {
            subscribe: subscribe.to_vec(),
        };
        let session = Session::start(stream, side, config).expect("the Go client model starts");
        GoClientModel { session }
    }

    /// The session's counters.
    pub fn summary(&self) -> Summary {
        self.session.record().summary()
    }

    /// A copy of the routes present.
    pub fn routes(&self) -> HashSet<Route> {
        self.session.record().routes.clone()
    }

    /// Waits until `done` holds for the summary, the session was reset, or
    /// `limit` passed; returns the last summary seen. Nothing changes after
    /// a reset, so a reset ends the wait at once.
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&Summary) -> bool) -> Summary {
        poll(limit, || self.summary(), |s| done(s) || s.reset.is_some()).0
    }
}

impl Drop for GoClientModel {
    fn drop(&mut self) {
        self.session.stop_and_join();
    }
}

/// The Go server: listens on 127.0.0.1, accepts any number of sessions,
/// does the server handshake and reads each with `rxLoop` semantics. A
/// reset ends that one session. Stopped and joined on drop.
pub struct GoServerModel {
    /// The listening address on 127.0.0.1.
    addr: SocketAddr,
    /// Every session accepted, in order (reset ones stay, for the record).
    sessions: Arc<Mutex<Vec<Arc<Session>>>>,
    /// Tells the accept thread to stop.
    stopping: Arc<AtomicBool>,
    /// The accept thread, joined on drop.
    acceptor: Option<JoinHandle<()>>,
}

impl GoServerModel {
    /// Listens on a free loopback port.
    pub fn start(config: GoPeerConfig) -> GoServerModel {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the Go server model listens");
        let addr = listener.local_addr().expect("listening address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let sessions: Arc<Mutex<Vec<Arc<Session>>>> = Arc::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (sessions, stopping) = (sessions.clone(), stopping.clone());
            std::thread::Builder::new()
                .name("go-model-accept".into())
                .spawn(move || accept_loop(listener, config, &sessions, &stopping))
                .expect("accept thread")
        };
        GoServerModel {
            addr,
            sessions,
            stopping,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every session's counters, in the order they were accepted.
    pub fn summaries(&self) -> Vec<Summary> {
        self.sessions()
            .iter()
            .map(|s| s.record().summary())
            .collect()
    }

    /// The routes of the sessions still open (Go drops a peer's received
    /// routes when its session ends).
    pub fn routes(&self) -> HashSet<Route> {
        let mut all = HashSet::new();
        for s in self.sessions() {
            let r = s.record();
            if r.reset.is_none() {
                all.extend(r.routes.iter().copied());
            }
        }
        all
    }

    /// Waits until `done` holds for the sessions' summaries, some session
    /// was reset, or `limit` passed; returns the last summaries seen.
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&[Summary]) -> bool) -> Vec<Summary> {
        poll(
            limit,
            || self.summaries(),
            |all| done(all) || all.iter().any(|s| s.reset.is_some()),
        )
        .0
    }
}

/// Accepts until `stopping`; each connection becomes a server session.
fn accept_loop(
    listener: TcpListener,
    config: GoPeerConfig,
    sessions: &Mutex<Vec<Arc<Session>>>,
    stopping: &AtomicBool,
) {
    while !stopping.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                // The model's reader blocks in read(), as Go's does from
                // the goroutine's point of view; do not rely on what the
                // accepted socket inherits from the non-blocking listener.
                let started = stream
                    .set_nonblocking(false)
                    .and_then(|()| Session::start(stream, Side::Server, config.clone()));
                if let Ok(s) = started {
                    sessions.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(WAIT_POLL);
            }
            Err(_) => std::thread::sleep(WAIT_POLL),
        }
    }
}

impl Drop for GoServerModel {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self.sessions() {
            s.stop_and_join();
        }
    }
}
