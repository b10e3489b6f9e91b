//! One server slot: connect, run the session, reconnect forever.
//!
//! Owns: the thread of one server address: resolving and connecting, the
//! active-side `PeerSession`, the full resync (SUBSCRIBE every VNI, ADD every
//! announcement) each time the session becomes ESTABLISHED, draining the
//! slot's coalesced backlog, handing received UPDATEs to the present set
//! (closing the session when the server passes the route limit), and
//! capped exponential backoff with jitter between attempts. The backoff
//! starts again from the minimum only after a *healthy* session: one that
//! stayed ESTABLISHED for `STABLE_SESSION` and did not end in a fault of
//! the server (malformed frame, protocol violation, route limit); any other
//! session counts as one more failed attempt, so a broken server that
//! completes HELLO and then misbehaves is retried ever more slowly, like
//! one that refuses connections. A helper thread
//! per connection reads and decodes frames (split anywhere) and passes them
//! on in batches over a bounded channel, so a flood from the server stalls
//! its TCP window instead of growing a queue.
//!
//! Must never: hold the client lock while doing socket I/O, touch another
//! server's routes, or change anything once its slot is gone (every change
//! goes through the slot id, which is never reused). Nobody joins this
//! thread: a pending connect or DNS lookup is abandoned on stop.
//!
//! ```text
//!  reader thread ──Received(gen, msgs) / Closed(gen, why)──┐  (bounded)
//!  Client handle ──Wake (try_send)─────────────────────────┤
//!                                                          v
//!  server thread: PeerSession (hold timer, keepalives) ──> writes frames
//!                 ├─ Established: snapshot subscriptions + announcements
//!                 ├─ UPDATE: Core.present.received → delivery queue (waits while it
//!                 │          is above its high-water mark)
//!                 └─ closed: Core.present.server_lost → delivery queue; backoff; retry
//! ```

use std::io::Read;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rand::Rng;
use socket2::{Domain, Protocol, Socket, Type};

use super::present::ServerId;
use super::state::{ClientInner, SessionBacklog};
use super::traffic::TrafficMeter;
use super::writer::SessionWriter;
use metalbond_utils::tcp_md5::{install_key, Md5Key, Md5KeyError};
use metalbond_wire::codec::{FrameBuffer, FrameDecoder, Message};
use metalbond_wire::session::{CloseReason, PeerSession, Reaction, Role, SessionState};
use metalbond_wire::types::{Action, IpNet, Route};

/// What wakes a server thread.
pub(super) enum Event {
    /// Decoded messages from connection number `.0`.
    Received(u64, Vec<Message>),
    /// Connection number `.0` ended (EOF, socket error or bad frame).
    Closed(u64, CloseReason),
    /// The handle queued messages or asked us to stop.
    Wake,
}

/// Bound of the per-server event channel (batches of frames, not frames).
pub(super) const EVENT_QUEUE: usize = 64;

/// How long a session must stay ESTABLISHED (and then end without a fault
/// of the server) before the reconnect backoff starts again from the
/// minimum. Longer than the default hold time (2.5 × 5 s), so a server
/// that completes the handshake and then goes silent or misbehaves cannot
/// reset it; short enough that a reflector restart after half a minute of
/// service is retried at once.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Does a session that ended this way start the backoff again from the
/// minimum? `established_for` is how long it was ESTABLISHED (`None`:
/// never), `server_fault` whether it ended in a fault of the server.
fn resets_backoff(established_for: Option<Duration>, server_fault: bool) -> bool {
    !server_fault && established_for.is_some_and(|d| d >= STABLE_SESSION)
}

/// Did the session end through a fault of the server (it sent something it
/// must not send), rather than a loss of the connection or our own stop?
fn is_server_fault(reason: &CloseReason, over_limit: bool) -> bool {
    over_limit
        || matches!(
            reason,
            CloseReason::Malformed(_)
                | CloseReason::Unexpected { .. }
                | CloseReason::ZeroKeepalive
                | CloseReason::KeepaliveFlood { .. }
        )
}

/// Capped exponential backoff with jitter: attempt n waits a random time in
/// [d/2, d] with d = min(min · 2^n, max).
#[derive(Debug)]
pub(super) struct Backoff {
    /// First delay.
    min: Duration,
    /// Largest delay.
    max: Duration,
    /// Failed attempts (connects, and sessions that were not healthy)
    /// since the last healthy session.
    attempt: u32,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay (and counts the attempt).
    pub(super) fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let low = ceiling / 2;
        let span = ceiling.saturating_sub(low).as_micros() as u64;
        low + Duration::from_micros(rand::rng().random_range(0..=span))
    }

    /// A healthy session ended: start again from `min`.
    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What a server thread needs to know about its slot.
pub(super) struct Target {
    /// The slot's id: every change the thread makes goes through it, and a
    /// removed slot's id is never reused, so a stopped thread changes nothing.
    pub(super) id: ServerId,
    /// `HOST:PORT` as given.
    pub(super) address: String,
    /// Source address to bind before connecting.
    pub(super) local_address: Option<IpAddr>,
    /// TCP-MD5 key file, read at each connect attempt.
    pub(super) md5_key_file: Option<PathBuf>,
    /// Set when the slot is removed or the client shuts down.
    pub(super) stop: Arc<AtomicBool>,
}

/// How often a pending connect or DNS lookup looks at the stop flag.
pub(super) const STOP_POLL: Duration = Duration::from_millis(50);

/// The body of a server slot's thread; returns when the slot is stopped
/// (or gone). Nobody joins it.
pub(super) fn run_server(
    inner: Arc<ClientInner>,
    target: Target,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
) {
    let Target {
        id,
        address,
        local_address,
        md5_key_file,
        stop,
    } = target;
    // Every event of this server's sessions (this thread and its reader
    // threads) carries the address from here instead of repeating it.
    let span = tracing::info_span!("server_session", server = %address);
    let _entered = span.enter();
    let config = inner.config.clone();
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut generation = 0u64;
    let mut last_error: Option<ConnectError> = None;
    while !stop.load(Ordering::SeqCst) {
        inner.set_state(id, SessionState::Connecting);
        let from = Source {
            local: local_address,
            md5_key_file: md5_key_file.as_deref(),
        };
        match connect(&address, &from, config.connect_timeout, &stop) {
            Ok(stream) => {
                generation += 1;
                last_error = None;
                let Some(meter) = inner.connected(id, &stream) else {
                    // The slot went away while we connected.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                };
                let mut link = Link {
                    meter,
                    inner: &inner,
                    id,
                    address: &address,
                    generation,
                    events: &events,
                    stop: &stop,
                    established_at: None,
                    over_limit: false,
                };
                let reason = link.run(stream, events_tx.clone());
                let established_for = link.established_at.map(|t| t.elapsed());
                let fault = is_server_fault(&reason, link.over_limit);
                if resets_backoff(established_for, fault) {
                    backoff.reset();
                }
                let label = if stop.load(Ordering::SeqCst) {
                    tracing::info!("session closed (server removed or client shutting down)");
                    "shutdown"
                } else if link.over_limit {
                    tracing::warn!(reason = %reason, label = "limit", "session closed; its routes are withdrawn");
                    "limit"
                } else if fault {
                    tracing::warn!(reason = %reason, label = reason.label(), ?established_for, "session closed by a fault of the server; backoff keeps growing");
                    reason.label()
                } else {
                    tracing::info!(reason = %reason, label = reason.label(), ?established_for, "session closed");
                    reason.label()
                };
                // A lost connection keeps the routes as stale (a reflector
                // restart); a fault of the server drops them.
                inner.session_lost(id, label, !fault && !link.over_limit);
                inner.delivery.wait_room(&stop);
            }
            Err(e) => {
                // Log a changed error at info, repeats at debug.
                if last_error.as_ref().is_some_and(|last| last.same_cause(&e)) {
                    tracing::debug!("cannot connect: {e}");
                } else {
                    tracing::info!("cannot connect: {e}");
                    last_error = Some(e);
                }
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        inner.set_state(id, SessionState::Retry);
        let delay = backoff.next_delay();
        tracing::debug!(?delay, "reconnecting after delay");
        let until = Instant::now() + delay;
        while !stop.load(Ordering::SeqCst) {
            match events.recv_deadline(until) {
                Ok(_) => continue, // stale frames or wake-ups
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
    inner.set_state(id, SessionState::Closed);
}

/// Why one connect attempt failed. Displayed as one line (the log's
/// "cannot connect: ..."); `same_cause` decides whether a retry failed the
/// same way (logged at debug) or differently (at info).
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    /// The server was removed or the client shut down meanwhile.
    #[error("stopped")]
    Stopped,
    /// The name resolved, to nothing.
    #[error("{address} resolves to no address")]
    NoAddress {
        /// The server address as given.
        address: String,
    },
    /// The system resolver failed (or its thread ended without a result).
    #[error("cannot resolve {address}: {reason}")]
    Resolve {
        /// The server address as given.
        address: String,
        /// What the resolver said.
        reason: String,
    },
    /// No thread could be started for the lookup.
    #[error("cannot start a resolver thread: {0}")]
    ResolverThread(std::io::Error),
    /// No socket could be made.
    #[error("cannot make a socket: {0}")]
    Socket(std::io::Error),
    /// The local address (`ServerOptions::local_address`) cannot be bound.
    #[error("cannot bind local address {ip}: {source}")]
    BindLocal {
        /// The local address.
        ip: IpAddr,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The TCP connect to one of the addresses failed.
    #[error("{addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// What the kernel said (refused, unreachable, ...).
        source: std::io::Error,
    },
    /// The TCP connect to one of the addresses did not complete in time.
    #[error("{addr}: connect timed out after {after:?}{}", if *signed { " (the session is signed with TCP-MD5: a server that expects another key, or none, drops the SYN like this)" } else { "" })]
    TimedOut {
        /// The address tried.
        addr: SocketAddr,
        /// The connect timeout.
        after: Duration,
        /// A TCP-MD5 key was configured (the likely cause, then).
        signed: bool,
    },
    /// The TCP-MD5 key file cannot be used (names the file, never the key).
    #[error("{0}")]
    Md5Key(Md5KeyError),
    /// The kernel refused the TCP-MD5 key on the socket.
    #[error("cannot sign the session with TCP-MD5: {0}")]
    Md5Install(std::io::Error),
}

impl ConnectError {
    /// Did `other` fail for the same reason (same kind, same address, same
    /// OS error)? A server that stays down is logged once at info.
    fn same_cause(&self, other: &ConnectError) -> bool {
        use ConnectError::*;
        let os = |e: &std::io::Error| (e.kind(), e.raw_os_error());
        match (self, other) {
            (Stopped, Stopped) => true,
            (NoAddress { address: a }, NoAddress { address: b }) => a == b,
            (
                Resolve {
                    address: a,
                    reason: r,
                },
                Resolve {
                    address: b,
                    reason: s,
                },
            ) => a == b && r == s,
            (ResolverThread(a), ResolverThread(b)) | (Socket(a), Socket(b)) => os(a) == os(b),
            (BindLocal { ip: a, source: e }, BindLocal { ip: b, source: f }) => {
                a == b && os(e) == os(f)
            }
            (Connect { addr: a, source: e }, Connect { addr: b, source: f }) => {
                a == b && os(e) == os(f)
            }
            (TimedOut { addr: a, .. }, TimedOut { addr: b, .. }) => a == b,
            (Md5Key(a), Md5Key(b)) => a.to_string() == b.to_string(),
            (Md5Install(a), Md5Install(b)) => os(a) == os(b),
            _ => false,
        }
    }
}

/// Resolves `address` and connects to the first address that answers,
/// from `local` if given. Gives up within `STOP_POLL` once `stop` is set:
/// a DNS lookup is left running on its own thread (its result is dropped),
/// a pending TCP connect is abandoned.
fn connect(
    address: &str,
    from: &Source<'_>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<TcpStream, ConnectError> {
    let addrs = resolve(address, stop)?;
    let mut last = ConnectError::NoAddress {
        address: address.to_string(),
    };
    for addr in addrs {
        if stop.load(Ordering::SeqCst) {
            return Err(ConnectError::Stopped);
        }
        match connect_one(addr, from, timeout, stop) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `address` as socket addresses: an IP literal directly, a host name by
/// the system resolver on a helper thread that is abandoned on `stop`
/// (getaddrinfo cannot be interrupted).
fn resolve(address: &str, stop: &AtomicBool) -> Result<Vec<SocketAddr>, ConnectError> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let name = address.to_string();
    std::thread::Builder::new()
        .name("mb-resolve".into())
        .spawn(move || {
            let result = name
                .to_socket_addrs()
                .map(|addrs| addrs.collect::<Vec<_>>())
                .map_err(|e| e.to_string());
            let _ = tx.send(result);
        })
        .map_err(ConnectError::ResolverThread)?;
    let failed = |reason: String| ConnectError::Resolve {
        address: address.to_string(),
        reason,
    };
    loop {
        match rx.recv_timeout(STOP_POLL) {
            Ok(Ok(addrs)) => return Ok(addrs),
            Ok(Err(e)) => return Err(failed(e)),
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => {
                return Err(ConnectError::Stopped)
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(failed("resolver thread ended".into()))
            }
        }
    }
}

/// Where a connection comes from: its source address and signature.
pub(super) struct Source<'a> {
    /// Bound before connecting, if given.
    local: Option<IpAddr>,
    /// Sign with the TCP-MD5 key in this file, if given.
    md5_key_file: Option<&'a Path>,
}

/// One TCP connect to `addr` (bound and signed as `from` says), abandoned
/// after `timeout` or once `stop` is set.
fn connect_one(
    addr: SocketAddr,
    from: &Source<'_>,
    timeout: Duration,
    stop: &AtomicBool,
) -> Result<TcpStream, ConnectError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Socket)?;
    if let Some(ip) = from.local {
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(|source| ConnectError::BindLocal { ip, source })?;
    }
    if let Some(path) = from.md5_key_file {
        let key = Md5Key::read(path).map_err(ConnectError::Md5Key)?;
        // SAFETY: `socket` outlives the borrow (socket2 0.4 has no `AsFd`).
        let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
        install_key(fd, addr.is_ipv6(), IpNet::from(addr.ip()), Some(&key))
            .map_err(ConnectError::Md5Install)?;
    }
    let failed = |source| ConnectError::Connect { addr, source };
    socket.set_nonblocking(true).map_err(failed)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            match wait_connected(&socket, timeout, stop) {
                Ok(()) => {}
                Err(WaitFailed::Stopped) => return Err(ConnectError::Stopped),
                Err(WaitFailed::TimedOut) => {
                    return Err(ConnectError::TimedOut {
                        addr,
                        after: timeout,
                        signed: from.md5_key_file.is_some(),
                    })
                }
                Err(WaitFailed::Io(e)) => return Err(failed(e)),
            }
        }
        Err(e) => return Err(failed(e)),
    }
    socket.set_nonblocking(false).map_err(failed)?;
    Ok(socket.into())
}

/// Why a non-blocking connect did not complete.
enum WaitFailed {
    /// `stop` was set.
    Stopped,
    /// The timeout passed.
    TimedOut,
    /// The connect failed (or poll did).
    Io(std::io::Error),
}

/// Waits for a non-blocking connect to finish, looking at `stop` every
/// `STOP_POLL`.
fn wait_connected(socket: &Socket, timeout: Duration, stop: &AtomicBool) -> Result<(), WaitFailed> {
    let deadline = Instant::now() + timeout;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Err(WaitFailed::Stopped);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitFailed::TimedOut);
        }
        let slice = (deadline - now).min(STOP_POLL);
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = slice.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd that outlives the call, and the
        // count passed is 1.
        let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(WaitFailed::Io(e));
        }
        if ready > 0 {
            return match socket.take_error() {
                Ok(None) => Ok(()),
                Ok(Some(e)) | Err(e) => Err(WaitFailed::Io(e)),
            };
        }
    }
}

/// One TCP connection to the server.
struct Link<'a> {
    /// The client's shared state (present set, session backlogs, sink).
    inner: &'a ClientInner,
    /// Our server slot.
    id: ServerId,
    /// The server address, for logs.
    address: &'a str,
    /// Tags events of this connection; older readers' events are ignored.
    generation: u64,
    /// Frames from the reader thread and wake-ups from the handle.
    events: &'a Receiver<Event>,
    /// Set when the slot is removed or the client shuts down.
    stop: &'a AtomicBool,
    /// When this connection reached ESTABLISHED (`None`: it did not); a
    /// long enough healthy session resets the backoff.
    established_at: Option<Instant>,
    /// The server passed `max_routes_per_server` (disconnect reason
    /// `limit`, a fault of the server).
    over_limit: bool,
    /// Counts what this connection reads and writes.
    meter: TrafficMeter,
}

impl Link<'_> {
    fn run(&mut self, stream: TcpStream, events_tx: Sender<Event>) -> CloseReason {
        let reason = self.session(&stream, events_tx);
        let _ = stream.shutdown(Shutdown::Both);
        reason
    }

    fn session(&mut self, stream: &TcpStream, events_tx: Sender<Event>) -> CloseReason {
        let config = &self.inner.config;
        let _ = stream.set_nodelay(true);
        // A server that stops reading must not wedge us beyond its hold time.
        let _ = stream.set_write_timeout(Some(config.keepalive.saturating_mul(3)));
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => return CloseReason::Io(e.into()),
        };
        let generation = self.generation;
        let meter = self.meter.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("mb-read-{}", self.address))
            .spawn({
                let span = tracing::Span::current();
                move || span.in_scope(|| read_loop(reader, generation, events_tx, meter))
            });
        if let Err(e) = spawned {
            let context = format!("cannot start reader thread: {e}");
            return CloseReason::Io(std::io::Error::new(e.kind(), context).into());
        }
        let mut stream = stream;
        let mut session = PeerSession::new(Role::Active, config.keepalive, Instant::now());
        let mut out = SessionWriter::new(stream);
        if let Some(hello) = session.start() {
            out.push_session(&hello);
        }
        let mut reported = SessionState::Connecting;
        loop {
            if session.state() != reported {
                reported = session.state();
                self.inner.set_state(self.id, reported);
            }
            let mut deadline = session.next_deadline();
            match out.flush(&mut stream, &self.meter) {
                Ok(None) => {}
                // Paced: the server has not read enough yet; look again.
                Ok(Some(wait)) => deadline = deadline.min(Instant::now() + wait),
                Err(e) => return CloseReason::Io(e.into()),
            }
            match self.events.recv_deadline(deadline) {
                Ok(Event::Received(g, messages)) if g == self.generation => {
                    if let Err(reason) = self.on_messages(&mut session, messages, &mut out) {
                        return reason;
                    }
                }
                Ok(Event::Closed(g, reason)) if g == self.generation => return reason,
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return CloseReason::ReaderGone,
            }
            if self.stop.load(Ordering::SeqCst) {
                return CloseReason::Shutdown;
            }
            match session.on_tick(Instant::now()) {
                Ok(Some(keepalive)) => out.push_session(&keepalive),
                Ok(None) => {}
                Err(reason) => return reason,
            }
            if session.is_established() {
                let drained = self.inner.with_slot(self.id, |slot| {
                    slot.backlog
                        .as_mut()
                        .map(|backlog| backlog.drain_into(out.routes()))
                });
                if let Some(Some(Err(()))) = drained {
                    return CloseReason::ResyncBacklog;
                }
            }
        }
    }

    fn on_messages(
        &mut self,
        session: &mut PeerSession,
        messages: Vec<Message>,
        out: &mut SessionWriter,
    ) -> Result<(), CloseReason> {
        let mut updates: Vec<(Action, Route)> = Vec::new();
        for msg in messages {
            let hello = matches!(msg, Message::Hello { .. });
            let reaction = session.on_message(msg, Instant::now())?;
            if hello && session.peer_reads_stream() {
                out.peer_reads_stream();
            }
            match reaction {
                Reaction::Nothing => {}
                Reaction::Reply(reply) => out.push_session(&reply),
                Reaction::Established { reply } => {
                    if let Some(reply) = reply {
                        out.push_session(&reply);
                    }
                    let Some((vnis, routes)) =
                        self.inner
                            .established(self.id, session.interval(), out.routes())
                    else {
                        return Err(CloseReason::Shutdown);
                    };
                    self.established_at = Some(Instant::now());
                    tracing::info!(
                        keepalive = ?session.interval(),
                        subscriptions = vnis,
                        announcements = routes,
                        "session established"
                    );
                }
                Reaction::Deliver(Message::Update { action, route }) => {
                    updates.push((action, route));
                }
                Reaction::Deliver(other) => {
                    return Err(CloseReason::Unexpected {
                        message: other.message_type().name(),
                        state: "ESTABLISHED (a server never subscribes)",
                    });
                }
            }
        }
        let result = self.inner.received(self.id, &mut updates).map_err(|e| {
            self.over_limit = true;
            CloseReason::ServerRouteLimit { limit: e.limit }
        });
        // Back-pressure: stop reading while the sink is far behind.
        self.inner.delivery.wait_room(self.stop);
        result
    }
}

/// Reads the socket, decodes frames and forwards them in batches.
fn read_loop(mut stream: TcpStream, generation: u64, events: Sender<Event>, meter: TrafficMeter) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                let _ = events.send(Event::Closed(generation, CloseReason::PeerClosed));
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = events.send(Event::Closed(generation, CloseReason::Io(e.into())));
                return;
            }
        };
        meter.read_bytes(n);
        decoder.extend(&buf[..n]);
        let mut messages = Vec::new();
        let failure = loop {
            match decoder.next_message() {
                Ok(Some(m)) => messages.push(m),
                Ok(None) => break None,
                Err(e) => break Some(CloseReason::Malformed(e.into())),
            }
        };
        let updates = messages
            .iter()
            .filter(|m| matches!(m, Message::Update { .. }))
            .count();
        meter.read_frames(messages.len(), updates);
        if !messages.is_empty() && events.send(Event::Received(generation, messages)).is_err() {
            return;
        }
        if let Some(reason) = failure {
            let _ = events.send(Event::Closed(generation, reason));
            return;
        }
    }
}

impl SessionBacklog {
    /// Encodes every queued message into `out` and empties the backlog.
    /// `Err` when the subscription queue overflowed (resync needed).
    pub(super) fn drain_into(&mut self, out: &mut FrameBuffer) -> Result<(), ()> {
        if self.overflowed {
            return Err(());
        }
        for (vni, subscribe) in self.subscriptions.drain(..) {
            let msg = if subscribe {
                Message::Subscribe(vni)
            } else {
                Message::Unsubscribe(vni)
            };
            out.push(&msg);
        }
        for (route, action) in self.routes.drain() {
            out.push(&Message::Update { action, route });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_that_stays_down_fails_for_the_same_cause() {
        let refused = |port| ConnectError::Connect {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert!(refused(4711).same_cause(&refused(4711)));
        assert!(!refused(4711).same_cause(&refused(4712)));
        let unreachable = ConnectError::Connect {
            addr: SocketAddr::from(([127, 0, 0, 1], 4711)),
            source: std::io::Error::from_raw_os_error(libc::ENETUNREACH),
        };
        assert!(!refused(4711).same_cause(&unreachable));
        let timed_out = |signed| ConnectError::TimedOut {
            addr: SocketAddr::from(([127, 0, 0, 1], 4711)),
            after: Duration::from_secs(3),
            signed,
        };
        assert!(!refused(4711).same_cause(&timed_out(false)));
        assert_eq!(
            timed_out(false).to_string(),
            "127.0.0.1:4711: connect timed out after 3s"
        );
        assert!(
            timed_out(true).to_string().contains("signed with TCP-MD5"),
            "a configured key is named as the likely cause"
        );
        assert_eq!(
            refused(4711).to_string(),
            format!(
                "127.0.0.1:4711: {}",
                std::io::Error::from_raw_os_error(libc::ECONNREFUSED)
            )
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let first = b.next_delay();
        assert!(first >= min / 2 && first <= min, "{first:?}");
        let mut last = Duration::ZERO;
        for _ in 0..30 {
            last = b.next_delay();
            assert!(last <= max);
        }
        assert!(last >= max / 2, "{last:?}");
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn only_long_healthy_sessions_reset_the_backoff() {
        let long = Some(STABLE_SESSION);
        let short = Some(STABLE_SESSION - Duration::from_millis(1));
        assert!(resets_backoff(long, false));
        assert!(!resets_backoff(long, true), "a faulty server never resets");
        assert!(!resets_backoff(short, false), "too short");
        assert!(!resets_backoff(None, false), "never established");
        let garbage = CloseReason::Malformed(metalbond_wire::codec::DecodeError::Version(2).into());
        assert!(is_server_fault(&garbage, false));
        assert!(is_server_fault(&CloseReason::PeerClosed, true), "limit");
        assert!(!is_server_fault(&CloseReason::PeerClosed, false));
        assert!(!is_server_fault(
            &CloseReason::KeepaliveTimeout(Duration::from_secs(1)),
            false
        ));
    }
}
