//! The per-connection session state machine of PROTOCOL.md "Session", sans I/O.
//!
//! Owns: the states (CONNECTING → HELLO_SENT / HELLO_RECEIVED → ESTABLISHED,
//! CLOSED), keepalive negotiation, the keepalive send schedule and the hold
//! timer (2.5 × interval). Both roles live here: the active side (client) and
//! the passive side (server), so both speak exactly the same protocol.
//!
//! Must never: touch sockets, clocks or the route table. The caller feeds it
//! decoded messages and the current `Instant`, and carries out what it returns
//! (send a frame, hand a message up, close). That keeps every rule testable by
//! replaying events, with no network and no sleeping.
//!
//! ```text
//!  active (client)                         passive (server)
//!  CONNECTING --start: send HELLO-->       CONNECTING
//!  HELLO_SENT                               |  recv HELLO(k>0): reply HELLO(min)
//!   | recv HELLO: send KEEPALIVE            v
//!  HELLO_RECEIVED                          HELLO_RECEIVED
//!   | recv KEEPALIVE                        | recv KEEPALIVE: reply KEEPALIVE
//!  ESTABLISHED: SUBSCRIBE/UPDATE flow      ESTABLISHED: reply every KEEPALIVE
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::{DecodeError, Message};

/// Which end of the TCP connection we are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// We connected out (client); we speak first.
    Active,
    /// We accepted (server); we answer.
    Passive,
}

/// Session states as PROTOCOL.md names them. `Retry` belongs to the client's
/// reconnect loop, which reports it; this machine itself ends in `Closed`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum SessionState {
    /// TCP connect in progress (active side) or just accepted.
    Connecting,
    /// Our HELLO is out; waiting for the peer's.
    HelloSent,
    /// The peer's HELLO arrived; ours answers it.
    HelloReceived,
    /// Both HELLOs exchanged: routes and subscriptions flow.
    Established,
    /// Waiting to reconnect (client only).
    Retry,
    /// The session is over.
    Closed,
}

impl SessionState {
    /// Upper-case name as in PROTOCOL.md, for logs and status pages.
    pub fn name(self) -> &'static str {
        match self {
            SessionState::Connecting => "CONNECTING",
            SessionState::HelloSent => "HELLO_SENT",
            SessionState::HelloReceived => "HELLO_RECEIVED",
            SessionState::Established => "ESTABLISHED",
            SessionState::Retry => "RETRY",
            SessionState::Closed => "CLOSED",
        }
    }
}

/// Why a session ended. Every close carries one, for the log line
/// (`reason=` the text, `kind=` the label) and the disconnect counters (by
/// `label()`): a typed reason, so no caller infers the category from flags
/// or from the text.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum CloseReason {
    /// The peer offered keepalive interval 0.
    #[error("peer offered keepalive interval 0")]
    ZeroKeepalive,
    /// Nothing heard for 2.5 × the interval.
    #[error("no keepalive from peer within {0:?}")]
    KeepaliveTimeout(Duration),
    /// The handshake (HELLO, then the first KEEPALIVE) did not complete
    /// within the handshake timeout: a connection that never speaks must not
    /// hold a place for a whole hold time.
    #[error("handshake not completed within {waited:?} ({missing})")]
    HandshakeTimeout {
        /// The handshake timeout that ran out.
        waited: Duration,
        /// What was still missing: "no HELLO" or "no KEEPALIVE after HELLO".
        missing: &'static str,
    },
    /// Closed before completing its handshake to make room for a new
    /// connection when the connection limit was reached (oldest first).
    #[error(
        "closed before completing the handshake to make room: --max-peers {max_peers} reached"
    )]
    Evicted {
        /// The `--max-peers` limit that was reached.
        max_peers: usize,
    },
    /// Far more KEEPALIVEs than the negotiated interval allows (a flood:
    /// each one costs a reply and a wake-up).
    #[error("keepalive flood: more than {max} KEEPALIVEs within {interval:?}")]
    KeepaliveFlood {
        /// KEEPALIVEs allowed per interval (`MAX_KEEPALIVES_PER_INTERVAL`).
        max: u32,
        /// The negotiated interval.
        interval: Duration,
    },
    /// A message the state machine does not allow in this state.
    #[error("unexpected {message} in state {state}")]
    Unexpected {
        /// The message type that arrived.
        message: &'static str,
        /// The state it arrived in.
        state: &'static str,
    },
    /// A frame that failed to decode.
    #[error("malformed frame: {0}")]
    Malformed(Cause<DecodeError>),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    PeerClosed,
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(Cause<io::Error>),
    /// Our side is stopping: the server shuts down, or the client was shut
    /// down or the server removed from it.
    #[error("shutting down")]
    Shutdown,
    /// A subscriber's socket took no data for `--write-stall-timeout`.
    #[error("slow subscriber: socket not writable for {0:?}")]
    WriteStall(Duration),
    /// A peer passed one of the server's per-peer limits (routes,
    /// subscriptions), set by a flag or a policy rule.
    #[error("peer limit exceeded: more than {max} {what} (raise with {origin})")]
    PeerLimit {
        /// What was counted: "routes announced", "subscriptions".
        what: &'static str,
        /// The limit.
        max: usize,
        /// Where the limit comes from (the flag, or the policy rule's key).
        origin: String,
    },
    /// A server sent a client more routes than `--max-routes-per-server`.
    #[error("server limit exceeded: more than {limit} routes received (--max-routes-per-server)")]
    ServerRouteLimit {
        /// The limit that was passed.
        limit: usize,
    },
    /// The peer policy (`--policy`) closes the session: no rule matches the
    /// peer, or it violated a rule with `on_violation: close` (the policy's
    /// own description).
    #[error("{0}")]
    Policy(String),
    /// A policy reload changed the TCP-MD5 key of the peer's rule: the
    /// session was signed with the old key (or none), the peer reconnects
    /// with the new one. Not the peer's fault.
    #[error("the TCP-MD5 key of the peer's policy rule changed: reconnect with the new key")]
    KeyChanged,
    /// The client queued more changes for a busy server than it may hold:
    /// it reconnects to resync instead.
    #[error("too many queued changes for a busy server; reconnecting to resync")]
    ResyncBacklog,
    /// The client's reader thread is gone (its event channel closed).
    #[error("event channel closed")]
    ReaderGone,
}

impl CloseReason {
    /// A short stable label, the same for the log field (`kind=`) and the
    /// disconnect metrics (`reason=`): dashboards and alerts use these
    /// values, so they never change.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ZeroKeepalive
            | CloseReason::Unexpected { .. }
            | CloseReason::KeepaliveFlood { .. } => "protocol",
            CloseReason::Malformed(_) => "malformed",
            CloseReason::KeepaliveTimeout(_) => "timeout",
            CloseReason::HandshakeTimeout { .. } => "handshake_timeout",
            CloseReason::Evicted { .. } => "evicted",
            CloseReason::PeerClosed => "eof",
            CloseReason::Io(_) => "io",
            CloseReason::Shutdown => "shutdown",
            CloseReason::WriteStall(_) => "slow_peer",
            CloseReason::PeerLimit { .. } | CloseReason::ServerRouteLimit { .. } => "limit",
            CloseReason::Policy(_) | CloseReason::KeyChanged => "policy",
            CloseReason::ResyncBacklog | CloseReason::ReaderGone => "local",
        }
    }

    /// Did the peer cause it by what it sent (a limit, a malformed frame, a
    /// protocol violation, the policy)? What such a peer sent is suspect.
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            CloseReason::Malformed(_)
                | CloseReason::Unexpected { .. }
                | CloseReason::ZeroKeepalive
                | CloseReason::KeepaliveFlood { .. }
                | CloseReason::PeerLimit { .. }
                | CloseReason::ServerRouteLimit { .. }
                | CloseReason::Policy(_)
        )
    }
}

/// A typed error kept in a `CloseReason`: shared by its clones (the reason
/// is recorded once, then read by the log line and the counters), compared
/// by its message (io and decode errors are not comparable themselves).
#[derive(Debug)]
pub struct Cause<E>(Arc<E>);

impl<E> Cause<E> {
    /// The error itself (e.g. `io::Error::kind`).
    pub fn get(&self) -> &E {
        &self.0
    }
}

impl<E> Clone for Cause<E> {
    fn clone(&self) -> Self {
        Cause(self.0.clone())
    }
}

impl<E> From<E> for Cause<E> {
    fn from(e: E) -> Self {
        Cause(Arc::new(e))
    }
}

impl<E: fmt::Display> fmt::Display for Cause<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Display> PartialEq for Cause<E> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl<E: fmt::Display> Eq for Cause<E> {}

/// KEEPALIVEs a peer may send within one negotiated interval before it is
/// closed as a flood. A well-behaved peer sends one; the margin covers
/// timers firing late and early. (A peer streaming KEEPALIVEs at line rate
/// made the server queue one reply each: gigabytes within seconds.)
pub const MAX_KEEPALIVES_PER_INTERVAL: u32 = 100;

/// What the caller must do after feeding the session a message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reaction {
    /// Nothing to do (a keepalive that only refreshed the hold timer).
    Nothing,
    /// Send this message to the peer.
    Reply(Message),
    /// The session just became ESTABLISHED; send `reply` first if any.
    /// The active side now sends its SUBSCRIBEs and UPDATEs.
    Established {
        /// The HELLO to answer with, on the passive side.
        reply: Option<Message>,
    },
    /// A SUBSCRIBE / UNSUBSCRIBE / UPDATE for the layer above.
    Deliver(Message),
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct PeerSession {
    /// Active or passive; decides who speaks first and who answers keepalives.
    role: Role,
    /// Where in the handshake we are.
    state: SessionState,
    /// Our configured interval; the negotiated one is never larger.
    own_interval: Duration,
    /// min(own, peer's) once HELLOs are exchanged; our own before that.
    interval: Duration,
    /// When we last heard from the peer (any valid frame proves liveness).
    last_heard: Instant,
    /// Active side only: when our next KEEPALIVE is due.
    next_keepalive: Option<Instant>,
    /// Start of the current keepalive window and the KEEPALIVEs received in
    /// it (see `MAX_KEEPALIVES_PER_INTERVAL`).
    keepalive_window: (Instant, u32),
    /// Until ESTABLISHED: when the handshake must have completed, and the
    /// timeout it was set from (`None`: only the hold timer applies).
    handshake_deadline: Option<(Instant, Duration)>,
    /// Our HELLO says we read as a stream (`Hello.readsStream`): true for
    /// everything in this crate, which reassembles frames across reads;
    /// loadgen clears it to be paced as a Go peer is.
    declares_stream: bool,
    /// The peer's HELLO said it reads as a stream: our writer need not pace
    /// it (`metalbond_utils::pacing`).
    peer_reads_stream: bool,
}

impl PeerSession {
    /// A new session for a connection that has just been set up.
    pub fn new(role: Role, own_interval: Duration, now: Instant) -> PeerSession {
        PeerSession {
            role,
            state: SessionState::Connecting,
            own_interval,
            interval: own_interval,
            last_heard: now,
            next_keepalive: None,
            keepalive_window: (now, 0),
            handshake_deadline: None,
            declares_stream: true,
            peer_reads_stream: false,
        }
    }

    /// Whether our HELLO declares that we read as a stream (default: yes).
    /// `false` makes this side look like a Go peer to a pacing writer.
    pub fn declaring_stream(mut self, declares: bool) -> PeerSession {
        self.declares_stream = declares;
        self
    }

    /// Did the peer's HELLO say that it reads as a stream? False until its
    /// HELLO arrived, and for every Go peer.
    pub fn peer_reads_stream(&self) -> bool {
        self.peer_reads_stream
    }

    /// The handshake must reach ESTABLISHED within `timeout` of `now` (the
    /// connection's start), or `on_tick` closes it with
    /// `CloseReason::HandshakeTimeout`. Without this only the hold timer
    /// (2.5 × interval) bounds a silent connection.
    pub fn with_handshake_timeout(mut self, timeout: Duration, now: Instant) -> PeerSession {
        self.handshake_deadline = Some((now + timeout, timeout));
        self
    }

    /// Current state.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// The negotiated keepalive interval (our own until HELLOs are exchanged).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long the peer may stay silent before it is declared dead.
    pub fn hold_time(&self) -> Duration {
        self.interval * 5 / 2
    }

    /// Is the session ESTABLISHED?
    pub fn is_established(&self) -> bool {
        self.state == SessionState::Established
    }

    /// The first message on a new connection: the active side's HELLO.
    /// The passive side says nothing first (`None`).
    pub fn start(&mut self) -> Option<Message> {
        match (self.role, self.state) {
            (Role::Active, SessionState::Connecting) => {
                self.state = SessionState::HelloSent;
                Some(Message::Hello {
                    keepalive_secs: secs(self.own_interval),
                    is_server: false,
                    reads_stream: self.declares_stream,
                })
            }
            _ => None,
        }
    }

    /// Marks the session closed (the caller is dropping the connection).
    pub fn close(&mut self) {
        self.state = SessionState::Closed;
    }

    /// Feeds one received message. `Err` means: close the connection now.
    pub fn on_message(&mut self, msg: Message, now: Instant) -> Result<Reaction, CloseReason> {
        if self.state == SessionState::Closed {
            return Err(self.unexpected(&msg));
        }
        self.last_heard = now;
        if msg == Message::Keepalive {
            self.count_keepalive(now)?;
        }
        match (msg, self.role, self.state) {
            (
                Message::Hello {
                    keepalive_secs: 0, ..
                },
                _,
                _,
            ) => Err(CloseReason::ZeroKeepalive),
            (
                Message::Hello {
                    keepalive_secs,
                    reads_stream,
                    ..
                },
                Role::Passive,
                SessionState::Connecting,
            ) => {
                self.negotiate(keepalive_secs);
                self.peer_reads_stream = reads_stream;
                self.state = SessionState::HelloReceived;
                Ok(Reaction::Reply(Message::Hello {
                    keepalive_secs: secs(self.interval),
                    is_server: true,
                    reads_stream: self.declares_stream,
                }))
            }
            (
                Message::Hello {
                    keepalive_secs,
                    reads_stream,
                    ..
                },
                Role::Active,
                SessionState::HelloSent,
            ) => {
                self.negotiate(keepalive_secs);
                self.peer_reads_stream = reads_stream;
                self.state = SessionState::HelloReceived;
                self.next_keepalive = Some(now + self.interval);
                Ok(Reaction::Reply(Message::Keepalive))
            }
            (Message::Keepalive, Role::Passive, SessionState::HelloReceived) => {
                self.state = SessionState::Established;
                Ok(Reaction::Established {
                    reply: Some(Message::Keepalive),
                })
            }
            (Message::Keepalive, Role::Passive, SessionState::Established) => {
                Ok(Reaction::Reply(Message::Keepalive))
            }
            (Message::Keepalive, Role::Active, SessionState::HelloReceived) => {
                self.state = SessionState::Established;
                Ok(Reaction::Established { reply: None })
            }
            (Message::Keepalive, Role::Active, SessionState::Established) => Ok(Reaction::Nothing),
            (
                Message::Subscribe(_) | Message::Unsubscribe(_) | Message::Update { .. },
                _,
                SessionState::Established,
            ) => Ok(Reaction::Deliver(msg)),
            _ => Err(self.unexpected(&msg)),
        }
    }

    /// Checks the timers. Returns a KEEPALIVE to send when one is due (active
    /// side), or `Err` when the peer has been silent for the hold time.
    pub fn on_tick(&mut self, now: Instant) -> Result<Option<Message>, CloseReason> {
        if self.state == SessionState::Closed {
            return Ok(None);
        }
        if let Some((deadline, waited)) = self.handshake_deadline {
            if self.state != SessionState::Established && now >= deadline {
                let missing = match self.state {
                    SessionState::Connecting | SessionState::HelloSent => "no HELLO",
                    _ => "no KEEPALIVE after HELLO",
                };
                return Err(CloseReason::HandshakeTimeout { waited, missing });
            }
        }
        if now.saturating_duration_since(self.last_heard) >= self.hold_time() {
            return Err(CloseReason::KeepaliveTimeout(self.hold_time()));
        }
        match self.next_keepalive {
            Some(due) if now >= due => {
                self.next_keepalive = Some(now + self.interval);
                Ok(Some(Message::Keepalive))
            }
            _ => Ok(None),
        }
    }

    /// The next instant at which `on_tick` has something to do.
    pub fn next_deadline(&self) -> Instant {
        let mut hold = self.last_heard + self.hold_time();
        if let Some((deadline, _)) = self.handshake_deadline {
            if self.state != SessionState::Established {
                hold = hold.min(deadline);
            }
        }
        match self.next_keepalive {
            Some(k) => k.min(hold),
            None => hold,
        }
    }

    /// Counts a received KEEPALIVE in the current window of one interval.
    fn count_keepalive(&mut self, now: Instant) -> Result<(), CloseReason> {
        let (start, count) = &mut self.keepalive_window;
        if now.saturating_duration_since(*start) >= self.interval {
            *start = now;
            *count = 0;
        }
        *count += 1;
        if *count > MAX_KEEPALIVES_PER_INTERVAL {
            return Err(CloseReason::KeepaliveFlood {
                max: MAX_KEEPALIVES_PER_INTERVAL,
                interval: self.interval,
            });
        }
        Ok(())
    }

    fn negotiate(&mut self, peer_secs: u32) {
        self.interval = self.own_interval.min(Duration::from_secs(peer_secs.into()));
    }

    fn unexpected(&self, msg: &Message) -> CloseReason {
        CloseReason::Unexpected {
            message: msg.message_type().name(),
            state: self.state.name(),
        }
    }
}

/// Whole seconds for a HELLO, at least 1 (an interval of 0 is a protocol error).
fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Vni;

    const FIVE: Duration = Duration::from_secs(5);

    /// A HELLO as this crate sends it (it reads as a stream).
    fn hello(k: u32, is_server: bool) -> Message {
        Message::Hello {
            keepalive_secs: k,
            is_server,
            reads_stream: true,
        }
    }

    /// A HELLO as a Go peer sends it: no `readsStream`.
    fn go_hello(k: u32, is_server: bool) -> Message {
        Message::Hello {
            keepalive_secs: k,
            is_server,
            reads_stream: false,
        }
    }

    #[test]
    fn each_side_learns_whether_the_other_reads_as_a_stream_from_its_hello() {
        let t0 = Instant::now();
        let mut ours = PeerSession::new(Role::Passive, FIVE, t0);
        assert!(
            !ours.peer_reads_stream(),
            "nothing is known before the HELLO"
        );
        ours.on_message(hello(5, false), t0).unwrap();
        assert!(ours.peer_reads_stream());

        let mut beside_go = PeerSession::new(Role::Passive, FIVE, t0);
        assert_eq!(
            beside_go.on_message(go_hello(5, false), t0),
            Ok(Reaction::Reply(hello(5, true))),
            "our reply says we read as a stream, whoever asks"
        );
        assert!(!beside_go.peer_reads_stream());

        let mut active = PeerSession::new(Role::Active, FIVE, t0);
        active.start();
        active.on_message(go_hello(5, true), t0).unwrap();
        assert!(!active.peer_reads_stream(), "a Go server is paced");

        let mut like_go = PeerSession::new(Role::Active, FIVE, t0).declaring_stream(false);
        assert_eq!(like_go.start(), Some(go_hello(5, false)));
        like_go.on_message(hello(5, true), t0).unwrap();
        assert!(like_go.peer_reads_stream());
    }

    fn sub() -> Message {
        Message::Subscribe(Vni::new(1).unwrap())
    }

    #[test]
    fn passive_handshake_negotiates_minimum_and_answers_keepalives() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        assert_eq!(s.start(), None);
        assert_eq!(
            s.on_message(hello(3, false), t0),
            Ok(Reaction::Reply(hello(3, true)))
        );
        assert_eq!(s.interval(), Duration::from_secs(3));
        assert_eq!(s.state(), SessionState::HelloReceived);
        assert_eq!(
            s.on_message(Message::Keepalive, t0),
            Ok(Reaction::Established {
                reply: Some(Message::Keepalive)
            })
        );
        assert_eq!(
            s.on_message(Message::Keepalive, t0),
            Ok(Reaction::Reply(Message::Keepalive))
        );
        assert_eq!(s.on_message(sub(), t0), Ok(Reaction::Deliver(sub())));
    }

    #[test]
    fn passive_never_raises_interval_above_its_own() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        assert_eq!(
            s.on_message(hello(60, false), t0),
            Ok(Reaction::Reply(hello(5, true)))
        );
    }

    #[test]
    fn active_handshake_sends_keepalive_then_establishes_on_first_keepalive() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Active, FIVE, t0);
        assert_eq!(s.start(), Some(hello(5, false)));
        assert_eq!(s.state(), SessionState::HelloSent);
        assert_eq!(
            s.on_message(hello(2, true), t0),
            Ok(Reaction::Reply(Message::Keepalive))
        );
        assert_eq!(s.interval(), Duration::from_secs(2));
        assert_eq!(
            s.on_message(Message::Keepalive, t0),
            Ok(Reaction::Established { reply: None })
        );
        assert_eq!(s.on_message(Message::Keepalive, t0), Ok(Reaction::Nothing));
        // Keepalives every negotiated interval.
        assert_eq!(s.on_tick(t0 + Duration::from_millis(1999)), Ok(None));
        assert_eq!(
            s.on_tick(t0 + Duration::from_secs(2)),
            Ok(Some(Message::Keepalive))
        );
    }

    #[test]
    fn zero_interval_hello_closes() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        assert_eq!(
            s.on_message(hello(0, false), t0),
            Err(CloseReason::ZeroKeepalive)
        );
        let mut a = PeerSession::new(Role::Active, FIVE, t0);
        a.start();
        assert_eq!(
            a.on_message(hello(0, true), t0),
            Err(CloseReason::ZeroKeepalive)
        );
    }

    #[test]
    fn keepalive_where_none_is_expected_closes() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        assert!(matches!(
            s.on_message(Message::Keepalive, t0),
            Err(CloseReason::Unexpected { .. })
        ));
        let mut a = PeerSession::new(Role::Active, FIVE, t0);
        a.start();
        assert!(matches!(
            a.on_message(Message::Keepalive, t0),
            Err(CloseReason::Unexpected { .. })
        ));
    }

    #[test]
    fn routing_messages_before_established_close() {
        let t0 = Instant::now();
        for pre in [0, 1] {
            let mut s = PeerSession::new(Role::Passive, FIVE, t0);
            if pre == 1 {
                s.on_message(hello(5, false), t0).unwrap();
            }
            let e = s.on_message(sub(), t0).unwrap_err();
            assert!(e.to_string().contains("SUBSCRIBE"), "{e}");
        }
    }

    #[test]
    fn second_hello_closes() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        s.on_message(hello(5, false), t0).unwrap();
        assert!(s.on_message(hello(5, false), t0).is_err());
    }

    #[test]
    fn silence_for_hold_time_closes() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        s.on_message(hello(2, false), t0).unwrap();
        s.on_message(Message::Keepalive, t0).unwrap();
        assert_eq!(s.next_deadline(), t0 + Duration::from_secs(5));
        assert_eq!(s.on_tick(t0 + Duration::from_millis(4999)), Ok(None));
        assert!(matches!(
            s.on_tick(t0 + Duration::from_secs(5)),
            Err(CloseReason::KeepaliveTimeout(_))
        ));
    }

    #[test]
    fn silent_connection_without_hello_times_out_on_own_interval() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        assert!(s.on_tick(t0 + Duration::from_millis(12_499)).is_ok());
        assert!(s.on_tick(t0 + Duration::from_millis(12_500)).is_err());
    }

    #[test]
    fn handshake_timeout_names_what_is_missing_and_stops_once_established() {
        let t0 = Instant::now();
        let two = Duration::from_secs(2);
        let mut s = PeerSession::new(Role::Passive, FIVE, t0).with_handshake_timeout(two, t0);
        assert_eq!(
            s.next_deadline(),
            t0 + two,
            "the handshake deadline comes first"
        );
        assert_eq!(s.on_tick(t0 + Duration::from_millis(1999)), Ok(None));
        assert_eq!(
            s.on_tick(t0 + two),
            Err(CloseReason::HandshakeTimeout {
                waited: two,
                missing: "no HELLO"
            })
        );
        assert_eq!(
            s.on_tick(t0 + two).unwrap_err().label(),
            "handshake_timeout"
        );

        let mut s = PeerSession::new(Role::Passive, FIVE, t0).with_handshake_timeout(two, t0);
        s.on_message(hello(5, false), t0).unwrap();
        let e = s.on_tick(t0 + two).unwrap_err();
        assert!(e.to_string().contains("no KEEPALIVE after HELLO"), "{e}");

        let mut s = PeerSession::new(Role::Passive, FIVE, t0).with_handshake_timeout(two, t0);
        s.on_message(hello(5, false), t0).unwrap();
        s.on_message(Message::Keepalive, t0).unwrap();
        assert_eq!(
            s.on_tick(t0 + two),
            Ok(None),
            "established: only the hold timer"
        );
        assert_eq!(s.next_deadline(), t0 + Duration::from_millis(12_500));
    }

    #[test]
    fn a_keepalive_flood_closes_and_a_steady_peer_never_does() {
        let t0 = Instant::now();
        let mut s = PeerSession::new(Role::Passive, FIVE, t0);
        s.on_message(hello(1, false), t0).unwrap();
        // A steady peer: one a second for a long time, and a few late/early.
        for i in 0..1000u64 {
            let t = t0 + Duration::from_millis(i * 1000 + (i % 3) * 10);
            assert!(s.on_message(Message::Keepalive, t).is_ok(), "{i}");
        }
        let t1 = t0 + Duration::from_secs(2000);
        for _ in 0..MAX_KEEPALIVES_PER_INTERVAL {
            assert!(s.on_message(Message::Keepalive, t1).is_ok());
        }
        let e = s.on_message(Message::Keepalive, t1).unwrap_err();
        assert!(matches!(e, CloseReason::KeepaliveFlood { .. }), "{e}");
        assert_eq!(e.label(), "protocol");
    }
}
