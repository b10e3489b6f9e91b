//! One connection: its reader, its writer, and what it announced.
//!
//! Owns: the read loop (socket → `FrameDecoder` → `PeerSession` → owner
//! inputs), the writer (the peer's `OutQueue` → vectored non-blocking
//! `sendmsg` of shared buffers, falling back to glommio's readiness wait when
//! the socket is full), the per-peer record of announced routes and
//! subscriptions, and the exactly-once cleanup on disconnect: whatever ends
//! the connection (EOF, error, keepalive timeout, protocol violation, slow
//! peer, shutdown), `PeerConn::close` records the first reason and wakes both
//! tasks, and the peer task then withdraws every route and subscription once
//! (routes in chunks, `withdraw_all`, so a million of them do not stall the
//! shard).
//!
//! ```text
//!   socket ──read──▶ reader task ──OwnerInput──▶ outbox ──▶ owner shard
//!      ▲                 │ replies (HELLO, KEEPALIVE)
//!      │                 ▼
//!   writer task ◀── OutQueue ◀── Delivery (shared frames) ◀── owner shard
//! ```
//!
//! Must never: keep a session alive after dropping an update for it, or let
//! one peer's socket stall the shard (all socket I/O is non-blocking).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::admission::{HandshakeTicket, PeerSlot};
use super::out_queue::OutQueue;
use super::owner::{Delivery, OwnerInput};
use super::route_set::RouteSet;
use super::shard::{LocalEvent, Shard};
use super::stats::{LocalCause, PeerInfo, ShardCounters};
use super::PeerId;
use crate::codec::{FrameDecoder, Message};
use crate::policy::{PeerPolicy, Verdict};
use crate::session::{CloseReason, PeerSession, Reaction, Role, SessionState};
use crate::types::{Action, Route, Vni};

/// Read buffer of a quiet peer: holds a HELLO, KEEPALIVEs and a few
/// frames; most of a large fleet's peers never need more. Kept small because
/// it lives as long as the connection (10,000 idle peers × 64 KiB was most
/// of the server's memory).
const READ_BUF_MIN: usize = 4 * 1024;
/// Read buffer of a peer streaming UPDATEs: the buffer grows ×4 up to this
/// size while reads fill it, and falls back to `READ_BUF_MIN` as soon as a
/// read comes back short of the minimum or the peer goes quiet (a session
/// deadline fires).
const READ_BUF_MAX: usize = 64 * 1024;
/// Bytes handed to one write at most.
const WRITE_BYTES: usize = 256 * 1024;
/// Buffers per vectored write at most.
const WRITE_PARTS: usize = 64;

/// A connection as its shard sees it: shared by the reader, the writer, the
/// shard (deliveries, snapshots, shutdown).
pub(crate) struct PeerConn {
    /// Identity (shard + sequence).
    id: PeerId,
    /// Remote address, for logs and snapshots.
    addr: SocketAddr,
    /// Pending output.
    out: RefCell<OutQueue>,
    /// Wakes the writer when output is queued or the peer is closed.
    writer_wake: LocalEvent,
    /// Wakes the reader when the peer is closed from elsewhere.
    close_event: LocalEvent,
    /// The first reason the connection was closed for; `Some` = closing.
    close_reason: RefCell<Option<CloseReason>>,
    /// Why the server closed it, when it did (a limit, the policy): counted
    /// apart in the stats.
    local_cause: Cell<LocalCause>,
    /// Notified when the peer policy was reloaded: the reader resolves its
    /// rule again and withdraws what became forbidden.
    pub(crate) policy_event: LocalEvent,
    /// Session state, for snapshots and counters.
    state: Cell<SessionState>,
    /// Negotiated keepalive.
    keepalive: Cell<Duration>,
    /// Routes currently announced.
    routes_announced: Cell<usize>,
    /// VNIs subscribed, each with whether the owner's first sync delivery
    /// for this subscription has arrived. Until it has, other deliveries for
    /// the VNI are leftovers of an earlier subscription (sent before the
    /// owner saw the UNSUBSCRIBE) and are dropped: the sync covers them.
    subscribed: RefCell<BTreeMap<Vni, bool>>,
    /// Frames received.
    frames_in: Cell<u64>,
    /// Bytes received.
    bytes_in: Cell<u64>,
    /// Frames written.
    frames_out: Cell<u64>,
    /// Bytes written.
    bytes_out: Cell<u64>,
    /// When the connection was accepted.
    connected_since: SystemTime,
}

impl PeerConn {
    /// Closes the connection for `reason` unless already closing (the first
    /// reason wins and is the one logged and counted).
    pub(crate) fn close(&self, reason: CloseReason) {
        {
            let mut r = self.close_reason.borrow_mut();
            if r.is_some() {
                return;
            }
            *r = Some(reason);
        }
        self.close_event.notify();
        self.writer_wake.notify();
    }

    fn is_closed(&self) -> bool {
        self.close_reason.borrow().is_some()
    }

    /// Queues a session reply (a KEEPALIVE only if none is waiting already,
    /// see `OutQueue::push_control`). A peer that does not read at all is
    /// cut off by the writer's stall timeout; meanwhile it costs one reply.
    fn push_control(&self, msg: &Message) {
        if self.out.borrow_mut().push_control(msg) {
            self.writer_wake.notify();
        }
    }

    /// Has the session completed its handshake?
    pub(crate) fn is_established(&self) -> bool {
        self.state.get() == SessionState::Established
    }

    /// The peer's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a delivery from an owner (or coalesces it, or cuts the peer
    /// off if even coalescing is over its limit).
    pub(crate) fn deliver(&self, d: &Delivery, counters: &ShardCounters) {
        if self.is_closed() {
            return;
        }
        match self.subscribed.borrow_mut().get_mut(&d.vni) {
            // Unsubscribed after the owner sent this: PROTOCOL.md says the
            // peer stops receiving the VNI at its UNSUBSCRIBE. (A pending sync
            // chunk is dropped too; the owner forgets the sync job when the
            // UNSUBSCRIBE reaches it.)
            None => return,
            Some(sync_seen) if d.sync.is_some() => *sync_seen = true,
            // From a previous subscription of the same VNI.
            Some(false) => return,
            Some(true) => {}
        }
        let result = {
            let mut out = self.out.borrow_mut();
            let episodes = out.coalesce_episodes;
            let r = match d.sync {
                Some(vni) => {
                    out.push_sync(&d.batch, vni);
                    Ok(())
                }
                None => out.push_fanout(&d.batch),
            };
            if out.coalesce_episodes != episodes {
                counters.coalesce_episode();
                tracing::info!(
                    peer = %self.addr,
                    queued = out.queued_bytes(),
                    "slow subscriber: coalescing pending changes per route"
                );
            }
            r
        };
        match result {
            Ok(()) => self.writer_wake.notify(),
            Err(overflow) => {
                self.close(CloseReason::Local(overflow.to_string()));
            }
        }
    }

    /// Snapshot for `ServerHandle::peers`.
    pub(crate) fn info(&self, shard: usize) -> PeerInfo {
        let out = self.out.borrow();
        PeerInfo {
            addr: self.addr,
            state: self.state.get(),
            shard,
            keepalive: self.keepalive.get(),
            routes_announced: self.routes_announced.get(),
            vnis_subscribed: self.subscribed.borrow().keys().copied().collect(),
            frames_in: self.frames_in.get(),
            bytes_in: self.bytes_in.get(),
            frames_out: self.frames_out.get(),
            bytes_out: self.bytes_out.get(),
            queued_bytes: out.queued_bytes(),
            coalesced_routes: out.coalesced_len(),
            connected_since: self.connected_since,
            grace_left: None,
        }
    }
}

/// Starts the tasks of a freshly accepted connection on this shard.
/// `slot` is the connection's place under `--max-peers`, held until the
/// task ends.
pub(crate) fn spawn(shard: Rc<Shard>, stream: TcpStream, slot: PeerSlot) {
    glommio::spawn_local(async move {
        run(shard, stream).await;
        drop(slot);
    })
    .detach();
}

/// What the reader keeps about its peer.
struct ReaderState {
    /// The protocol state machine.
    session: PeerSession,
    /// The connection's place in the handshake queue (eviction candidates
    /// at `--max-peers`), until ESTABLISHED.
    handshake: Option<HandshakeTicket>,
    /// Bytes → frames.
    decoder: FrameDecoder,
    /// Routes the peer announces, per VNI (withdrawn on disconnect).
    announced: HashMap<Vni, RouteSet>,
    /// Routes an UNSUBSCRIBE took out of `announced` whose withdrawals the
    /// read loop still has to send (with `withdraw_all`, before it handles
    /// the peer's next message, so they stay in order).
    withdrawing: Vec<(Vni, RouteSet)>,
    /// The peer's policy rule (`--policy`), resolved at session start and
    /// again after a reload; `None` without a policy.
    policy: Option<PeerPolicy>,
    /// The messages read since the last back-pressure check included a
    /// routing message (work for an owner): the reader is subject to
    /// back-pressure before its next read.
    routed: bool,
}

async fn run(shard: Rc<Shard>, stream: TcpStream) {
    if shard.shutting_down.get() {
        return;
    }
    let addr = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)));
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let id = shard.new_peer_id();
    let limits = &shard.config.limits;
    let conn = Rc::new(PeerConn {
        id,
        addr,
        out: RefCell::new(OutQueue::new(
            id,
            limits.max_queued_bytes,
            limits.max_coalesced_routes,
        )),
        writer_wake: LocalEvent::default(),
        close_event: LocalEvent::default(),
        close_reason: RefCell::new(None),
        local_cause: Cell::new(LocalCause::Other),
        policy_event: LocalEvent::default(),
        state: Cell::new(SessionState::Connecting),
        keepalive: Cell::new(shard.config.keepalive),
        routes_announced: Cell::new(0),
        subscribed: RefCell::new(BTreeMap::new()),
        frames_in: Cell::new(0),
        bytes_in: Cell::new(0),
        frames_out: Cell::new(0),
        bytes_out: Cell::new(0),
        connected_since: SystemTime::now(),
    });
    shard.peers.borrow_mut().insert(id, conn.clone());
    shard.counters.peer_connected();
    tracing::info!(peer = %addr, shard = shard.index, "peer connected");

    let (reader, writer) = futures_lite::io::split(stream);
    let writer_task = glommio::spawn_local(write_loop(shard.clone(), conn.clone(), writer, fd));
    let now = Instant::now();
    let mut session = PeerSession::new(Role::Passive, shard.config.keepalive, now);
    if let Some(timeout) = limits.handshake_timeout {
        session = session.with_handshake_timeout(timeout, now);
    }
    // The peer's source address is fixed for the session: its rule is
    // found once. No rule: it may do nothing, so it is closed at once.
    let policy = match &shard.config.policy {
        None => None,
        Some(store) => match PeerPolicy::resolve(store, addr) {
            Ok(p) => Some(p),
            Err(reason) => {
                close_for_policy(&conn, reason);
                None
            }
        },
    };
    let mut rs = ReaderState {
        session,
        handshake: Some(shard.admission.enter_handshake(id)),
        decoder: FrameDecoder::new(),
        announced: HashMap::new(),
        withdrawing: Vec::new(),
        policy,
        routed: false,
    };
    let reason = read_loop(&shard, &conn, reader, &mut rs).await;
    conn.close(reason);
    writer_task.await;

    // Exactly-once cleanup: this task is the only one that gets here.
    let was_established = rs.session.is_established();
    if was_established {
        // Its routes and buffers are being freed: shards give the memory
        // back to the system over the next seconds.
        shard.admission.note_departure();
    }
    rs.session.close();
    conn.state.set(SessionState::Closed);
    let subscribed = std::mem::take(&mut *conn.subscribed.borrow_mut());
    for vni in subscribed.into_keys() {
        shard.to_owner(vni, OwnerInput::Unsubscribe { peer: id, vni });
    }
    // Routes of an explicit UNSUBSCRIBE still being withdrawn go at once.
    for (vni, routes) in std::mem::take(&mut rs.withdrawing) {
        withdraw_all(&shard, id, vni, routes).await;
    }
    let announced = std::mem::take(&mut rs.announced);
    // A peer cut off for its own fault (a limit, a malformed frame, a
    // protocol violation) gets no grace: what it sent is suspect.
    let fault = conn.local_cause.get() != LocalCause::Other
        || matches!(
            conn.close_reason.borrow().as_ref(),
            Some(
                CloseReason::Malformed(_)
                    | CloseReason::Unexpected { .. }
                    | CloseReason::ZeroKeepalive
                    | CloseReason::KeepaliveFlood { .. }
            )
        );
    match shard.config.peer_grace {
        // `--peer-grace`: a ghost holds them for a while (not when the
        // server itself is shutting down: the tables go with it).
        Some(grace) if !shard.shutting_down.get() && !fault => {
            super::grace::hold(&shard, id, addr, announced, grace);
        }
        _ => {
            for (vni, routes) in announced {
                withdraw_all(&shard, id, vni, routes).await;
            }
        }
    }
    shard.peers.borrow_mut().remove(&id);
    let reason = conn
        .close_reason
        .borrow()
        .clone()
        .unwrap_or(CloseReason::PeerClosed);
    shard.counters.peer_gone(
        was_established,
        &reason,
        shard.shutting_down.get(),
        conn.local_cause.get(),
    );
    tracing::info!(peer = %addr, reason = %reason, kind = reason.label(), "peer disconnected");
}

/// `--peer-grace`: the peer announced or withdrew `route`, so ghosts of
/// earlier sessions from its address (usually none; see `grace`) give up
/// their claim on it. Sent after the peer's own input, on the same channel
/// to the owner: an ADD keeps the route without a flap, a REMOVE takes
/// effect at once.
fn drop_ghost_claims(shard: &Shard, conn: &PeerConn, id: PeerId, route: Route) {
    if shard.config.peer_grace.is_none() {
        return;
    }
    for ghost in shard
        .grace
        .index()
        .of(super::grace::host_of(&conn.addr), id)
    {
        shard.to_owner(route.vni, OwnerInput::Withdraw { peer: ghost, route });
    }
}

/// Owner inputs sent between two checks for a yield in `withdraw_all`.
const WITHDRAW_CHUNK: usize = 1024;

/// Sends a `Withdraw` of each of `routes` (all in `vni`, announced by
/// `peer`) to the VNI's owner, all of them, in chunks: between chunks it
/// yields when glommio asks for it, and it waits while the shard's outboxes
/// hold more than `OUTBOX_HIGH` messages (as readers do), so a peer that
/// announced a million routes neither stalls its shard while they are queued
/// nor builds a million-message batch for the owner. Never stops early: a
/// route not withdrawn would stay in the table for good. Holds no borrow
/// across its awaits.
pub(super) async fn withdraw_all(shard: &Shard, peer: PeerId, vni: Vni, routes: RouteSet) {
    let mut routes = routes.into_iter().peekable();
    while routes.peek().is_some() {
        for route in routes.by_ref().take(WITHDRAW_CHUNK) {
            shard.to_owner(vni, OwnerInput::Withdraw { peer, route });
        }
        // At shutdown the flushers stop and the outboxes never drain.
        shard
            .outbox_room(|| shard.shutting_down.get(), &shard.shutdown_event)
            .await;
        glommio::yield_if_needed().await;
    }
}

/// What woke the reader.
enum ReadEvent {
    /// The socket read returned (bytes, EOF or error).
    Data(io::Result<usize>),
    /// The session's next deadline passed (keepalive due or hold timer).
    Deadline,
    /// The connection was closed from elsewhere (writer, shard, shutdown).
    Closed,
    /// The peer policy was reloaded.
    PolicyReloaded,
}

async fn read_loop(
    shard: &Rc<Shard>,
    conn: &Rc<PeerConn>,
    mut reader: ReadHalf<TcpStream>,
    rs: &mut ReaderState,
) -> CloseReason {
    let mut buf = ReadBuf::new();
    loop {
        // Back-pressure: while the shard cannot move changes out, a peer
        // whose last read gave the owners work stops being read (TCP then
        // slows it down). A peer that sent only session frames is read on:
        // it adds nothing, and pausing it too would starve its KEEPALIVE
        // replies for as long as someone else's flood (or a leaving peer's
        // withdrawals) keeps the outboxes full. Its next read adds at most
        // one read buffer's worth of changes before it pauses as well.
        if std::mem::take(&mut rs.routed) {
            shard
                .outbox_room(|| conn.is_closed(), &conn.close_event)
                .await;
        }
        let closed = conn.close_event.wait();
        if let Some(r) = conn.close_reason.borrow().clone() {
            return r;
        }
        let policy_reloaded = conn.policy_event.wait();
        if let Err(reason) = reapply_policy(shard, conn, rs) {
            return reason;
        }
        for (vni, routes) in std::mem::take(&mut rs.withdrawing) {
            withdraw_all(shard, conn.id, vni, routes).await;
        }
        let wait = rs
            .session
            .next_deadline()
            .saturating_duration_since(Instant::now());
        let event = future::or(
            async { ReadEvent::Data(reader.read(buf.as_mut()).await) },
            future::or(
                async {
                    glommio::timer::sleep(wait).await;
                    ReadEvent::Deadline
                },
                future::or(
                    async {
                        closed.await;
                        ReadEvent::Closed
                    },
                    async {
                        policy_reloaded.await;
                        ReadEvent::PolicyReloaded
                    },
                ),
            ),
        )
        .await;
        match event {
            // The reason, or the new policy, is picked up above.
            ReadEvent::Closed | ReadEvent::PolicyReloaded => continue,
            ReadEvent::Deadline => {
                // Quiet peer: give back a grown buffer and the decoder's.
                buf.shrink();
                if rs.decoder.buffered() == 0 {
                    rs.decoder = FrameDecoder::new();
                }
                match rs.session.on_tick(Instant::now()) {
                    Err(reason) => return reason,
                    Ok(Some(msg)) => conn.push_control(&msg),
                    Ok(None) => {}
                }
            }
            ReadEvent::Data(Ok(0)) => return CloseReason::PeerClosed,
            ReadEvent::Data(Err(e)) => return CloseReason::Io(e.to_string()),
            ReadEvent::Data(Ok(n)) => {
                conn.bytes_in.set(conn.bytes_in.get() + n as u64);
                rs.decoder.extend(&buf.as_mut()[..n]);
                let mut frames = 0u64;
                let failure = loop {
                    match rs.decoder.next_message() {
                        Ok(None) => break None,
                        Ok(Some(msg)) => {
                            frames += 1;
                            if let Err(reason) = on_message(shard, conn, rs, msg) {
                                break Some(reason);
                            }
                            for (vni, routes) in std::mem::take(&mut rs.withdrawing) {
                                withdraw_all(shard, conn.id, vni, routes).await;
                            }
                        }
                        Err(e) => break Some(CloseReason::Malformed(e.to_string())),
                    }
                };
                conn.frames_in.set(conn.frames_in.get() + frames);
                shard.counters.read(frames, n);
                if let Some(reason) = failure {
                    return reason;
                }
                // The decoder's buffer grew to hold this read and would keep
                // that capacity for the connection's life: once it holds no
                // partial frame, start afresh (a new decoder owns nothing).
                if n > READ_BUF_MIN && rs.decoder.buffered() == 0 {
                    rs.decoder = FrameDecoder::new();
                }
                buf.adapt(n);
                // Let the shard's other tasks run between large reads.
                glommio::yield_if_needed().await;
            }
        }
    }
}

/// The reader's socket buffer: small while the peer is quiet, grown while
/// its reads fill the buffer (a burst of UPDATEs), shrunk again after.
struct ReadBuf {
    /// The bytes; its length is the current read size.
    bytes: Vec<u8>,
}

impl ReadBuf {
    /// A buffer of `READ_BUF_MIN`.
    fn new() -> ReadBuf {
        ReadBuf {
            bytes: vec![0u8; READ_BUF_MIN],
        }
    }

    /// The slice to read into.
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Current size.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.bytes.len()
    }

    /// After a read of `n` bytes: grow when it filled the buffer, shrink
    /// when it was shorter than the minimum (the burst is over).
    fn adapt(&mut self, n: usize) {
        let len = self.bytes.len();
        if n == len && len < READ_BUF_MAX {
            self.bytes = vec![0u8; (len * 4).min(READ_BUF_MAX)];
        } else if n < READ_BUF_MIN {
            self.shrink();
        }
    }

    /// Back to `READ_BUF_MIN`, releasing a grown buffer.
    fn shrink(&mut self) {
        if self.bytes.len() > READ_BUF_MIN {
            self.bytes = vec![0u8; READ_BUF_MIN];
        }
    }
}

fn on_message(
    shard: &Shard,
    conn: &PeerConn,
    rs: &mut ReaderState,
    msg: Message,
) -> Result<(), CloseReason> {
    let reaction = rs.session.on_message(msg, Instant::now())?;
    conn.state.set(rs.session.state());
    conn.keepalive.set(rs.session.interval());
    match reaction {
        Reaction::Nothing => {}
        Reaction::Reply(m) => conn.push_control(&m),
        Reaction::Established { reply } => {
            if let Some(m) = reply {
                conn.push_control(&m);
            }
            rs.handshake = None;
            shard.counters.peer_established();
            tracing::info!(
                peer = %conn.addr,
                keepalive = ?rs.session.interval(),
                "session established"
            );
        }
        Reaction::Deliver(m) => {
            rs.routed = true;
            on_routing_message(shard, conn, rs, m)?
        }
    }
    Ok(())
}

/// The peer went over one of its `PeerLimits`: it is closed (and its routes
/// withdrawn) with a reason naming the limit and the flag that raises it.
fn over_limit(conn: &PeerConn, what: &str, max: usize, flag: &str) -> CloseReason {
    conn.local_cause.set(LocalCause::Limit);
    let reason = format!("peer limit exceeded: more than {max} {what} (raise with {flag})");
    tracing::warn!(peer = %conn.addr, %reason, "closing peer");
    CloseReason::Local(reason)
}

/// The peer policy closes the session: no rule matches the peer, or it
/// violated a rule with `on_violation: close`. Also closes `conn` (for the
/// start of a session, where nothing returns the reason).
fn close_for_policy(conn: &PeerConn, reason: String) -> CloseReason {
    conn.local_cause.set(LocalCause::Policy);
    tracing::warn!(peer = %conn.addr, %reason, "closing peer");
    let reason = CloseReason::Local(reason);
    conn.close(reason.clone());
    reason
}

/// After a policy reload (the store's generation moved): resolves the
/// peer's rule again, takes the routes the new rule refuses out of
/// `announced` into `withdrawing` (the caller withdraws them, as if the peer
/// had sent REMOVE) and drops the subscriptions it refuses. Newly allowed
/// routes are not invented: the peer sends them again on its next session.
fn reapply_policy(shard: &Shard, conn: &PeerConn, rs: &mut ReaderState) -> Result<(), CloseReason> {
    let (Some(store), Some(old)) = (&shard.config.policy, &rs.policy) else {
        return Ok(());
    };
    if old.generation() == store.generation() {
        return Ok(());
    }
    let policy = PeerPolicy::resolve(store, conn.addr).map_err(|r| close_for_policy(conn, r))?;
    let mut withdrawn = 0usize;
    for (vni, set) in rs.announced.iter_mut() {
        let refused = set.take_if(|r| {
            let refuse = !policy.allows(r);
            if refuse {
                // A ghost of this address must not keep it visible either.
                drop_ghost_claims(shard, conn, conn.id, *r);
            }
            refuse
        });
        if refused.len() > 0 {
            withdrawn += refused.len();
            rs.withdrawing.push((*vni, refused));
        }
    }
    rs.announced.retain(|_, set| set.len() > 0);
    conn.routes_announced
        .set(conn.routes_announced.get() - withdrawn);
    let dropped: Vec<Vni> = conn
        .subscribed
        .borrow()
        .keys()
        .copied()
        .filter(|v| !policy.allows_subscribe(*v))
        .collect();
    for vni in &dropped {
        conn.subscribed.borrow_mut().remove(vni);
        conn.out.borrow_mut().forget_vni(*vni);
        shard.to_owner(
            *vni,
            OwnerInput::Unsubscribe {
                peer: conn.id,
                vni: *vni,
            },
        );
    }
    policy.rule().counters.withdrawn(withdrawn as u64);
    tracing::info!(
        peer = %conn.addr,
        rule = %policy.rule().name,
        routes_withdrawn = withdrawn,
        subscriptions_dropped = dropped.len(),
        "policy reloaded for peer"
    );
    rs.policy = Some(policy);
    Ok(())
}

fn on_routing_message(
    shard: &Shard,
    conn: &PeerConn,
    rs: &mut ReaderState,
    msg: Message,
) -> Result<(), CloseReason> {
    let id = conn.id;
    let limits = &shard.config.limits;
    match msg {
        Message::Update { action, route } => {
            shard.counters.update_in();
            let vni = route.vni;
            match action {
                Action::Add => {
                    let mut rule_limit = None;
                    if let Some(p) = &mut rs.policy {
                        match p.on_announce(conn.addr, &route) {
                            Verdict::Allow => rule_limit = p.route_limit(),
                            Verdict::Refuse => return Ok(()),
                            Verdict::Close(reason) => return Err(close_for_policy(conn, reason)),
                        }
                    }
                    let max = rule_limit.unwrap_or(limits.max_routes_per_peer);
                    if conn.routes_announced.get() >= max
                        && !rs
                            .announced
                            .get(&vni)
                            .is_some_and(|set| set.contains(&route))
                    {
                        let flag = match (&rs.policy, rule_limit) {
                            (Some(p), Some(_)) => p.limit_origin("max_routes"),
                            _ => "--max-routes-per-peer".into(),
                        };
                        return Err(over_limit(conn, "routes announced", max, &flag));
                    }
                    if rs.announced.entry(vni).or_default().insert(route) {
                        conn.routes_announced.set(conn.routes_announced.get() + 1);
                        tracing::debug!(peer = %conn.addr, %route, "ADD");
                        shard.to_owner(vni, OwnerInput::Announce { peer: id, route });
                        drop_ghost_claims(shard, conn, id, route);
                    } else {
                        tracing::debug!(peer = %conn.addr, %route, "duplicate ADD ignored");
                    }
                }
                Action::Remove => {
                    let removed = rs
                        .announced
                        .get_mut(&vni)
                        .is_some_and(|set| set.remove(&route));
                    if removed {
                        conn.routes_announced.set(conn.routes_announced.get() - 1);
                        tracing::debug!(peer = %conn.addr, %route, "REMOVE");
                        shard.to_owner(vni, OwnerInput::Withdraw { peer: id, route });
                        drop_ghost_claims(shard, conn, id, route);
                    } else {
                        tracing::debug!(peer = %conn.addr, %route, "REMOVE of a route the peer does not announce ignored");
                        // A restarted agent may withdraw what its previous
                        // session announced: its ghost's claim ends now.
                        drop_ghost_claims(shard, conn, id, route);
                    }
                }
            }
        }
        Message::Subscribe(vni) => {
            let mut rule_limit = None;
            if let Some(p) = &mut rs.policy {
                match p.on_subscribe(conn.addr, vni) {
                    Verdict::Allow => rule_limit = p.subscription_limit(),
                    // The peer gets nothing of the VNI: no sync, no updates.
                    Verdict::Refuse => return Ok(()),
                    Verdict::Close(reason) => return Err(close_for_policy(conn, reason)),
                }
            }
            let max = rule_limit.unwrap_or(limits.max_subscriptions_per_peer);
            {
                let subscribed = conn.subscribed.borrow();
                if subscribed.len() >= max && !subscribed.contains_key(&vni) {
                    drop(subscribed);
                    let flag = match (&rs.policy, rule_limit) {
                        (Some(p), Some(_)) => p.limit_origin("max_subscriptions"),
                        _ => "--max-subscriptions-per-peer".into(),
                    };
                    return Err(over_limit(conn, "subscriptions", max, &flag));
                }
            }
            if conn.subscribed.borrow_mut().insert(vni, false).is_none() {
                tracing::debug!(peer = %conn.addr, %vni, "SUBSCRIBE");
                shard.to_owner(vni, OwnerInput::Subscribe { peer: id, vni });
            }
        }
        Message::Unsubscribe(vni) => {
            if conn.subscribed.borrow_mut().remove(&vni).is_some() {
                tracing::debug!(peer = %conn.addr, %vni, "UNSUBSCRIBE");
                // Coalesced changes of the VNI would be written after this
                // point: drop them (queued frames were due before it).
                conn.out.borrow_mut().forget_vni(vni);
                shard.to_owner(vni, OwnerInput::Unsubscribe { peer: id, vni });
            }
            // As in the existing implementation: its routes in the VNI go too
            // (sent by the read loop, in chunks, before the next message).
            if let Some(routes) = rs.announced.remove(&vni) {
                conn.routes_announced
                    .set(conn.routes_announced.get() - routes.len());
                rs.withdrawing.push((vni, routes));
            }
        }
        // The session only delivers the three routing messages.
        Message::Hello { .. } | Message::Keepalive => {}
    }
    Ok(())
}

async fn write_loop(
    shard: Rc<Shard>,
    conn: Rc<PeerConn>,
    mut writer: WriteHalf<TcpStream>,
    fd: RawFd,
) {
    loop {
        let wake = conn.writer_wake.wait();
        if conn.is_closed() {
            return;
        }
        let wb = conn
            .out
            .borrow_mut()
            .take_for_write(WRITE_BYTES, WRITE_PARTS);
        if wb.parts.is_empty() && wb.sync_written.is_empty() {
            wake.await;
            continue;
        }
        if !wb.parts.is_empty() {
            let stall = shard.config.limits.write_stall_timeout;
            match write_parts(&conn, &mut writer, fd, &wb.parts, stall).await {
                Ok(calls) => {
                    conn.out.borrow_mut().written(wb.bytes);
                    conn.frames_out
                        .set(conn.frames_out.get() + wb.frames as u64);
                    conn.bytes_out.set(conn.bytes_out.get() + wb.bytes as u64);
                    shard
                        .counters
                        .written(wb.frames, wb.updates, wb.bytes, calls);
                    if !wb.fanout_born.is_empty() {
                        let now = Instant::now();
                        for born in &wb.fanout_born {
                            shard
                                .counters
                                .fanout_written(now.saturating_duration_since(*born));
                        }
                    }
                }
                Err(reason) => {
                    conn.close(reason);
                    return;
                }
            }
        }
        for vni in wb.sync_written {
            shard.to_owner(vni, OwnerInput::SyncWritten { peer: conn.id, vni });
        }
        // A subscriber that reads as fast as we write never fills its
        // socket, so nothing above waits: without this, draining a large
        // backlog (or a coalesced map of millions of routes) would hold the
        // shard.
        glommio::yield_if_needed().await;
    }
}

/// Writes all of `parts`: vectored non-blocking `sendmsg` while the socket
/// takes data, glommio's readiness-aware write when it is full. Returns the
/// number of write calls made.
async fn write_parts(
    conn: &PeerConn,
    writer: &mut WriteHalf<TcpStream>,
    fd: RawFd,
    parts: &[Bytes],
    stall: Option<Duration>,
) -> Result<usize, CloseReason> {
    let mut idx = 0;
    let mut off = 0;
    let mut calls = 0;
    while idx < parts.len() {
        let n = match send_vectored(fd, &parts[idx..], off) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Socket full: wait for room (bounded by the stall timeout),
                // or for the connection to be closed from elsewhere.
                let closed = conn.close_event.wait();
                if conn.is_closed() {
                    return Err(CloseReason::Local("closed".into()));
                }
                let write = async { Some(writer.write(&parts[idx][off..]).await) };
                let stop = async {
                    match stall {
                        Some(d) => {
                            future::or(closed, glommio::timer::sleep(d)).await;
                        }
                        None => closed.await,
                    }
                    None
                };
                match future::or(write, stop).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(CloseReason::Io(e.to_string())),
                    None if conn.is_closed() => return Err(CloseReason::Local("closed".into())),
                    None => {
                        return Err(CloseReason::Local(format!(
                            "slow subscriber: socket not writable for {:?}",
                            stall.unwrap_or_default()
                        )))
                    }
                }
            }
            Err(e) => return Err(CloseReason::Io(e.to_string())),
        };
        calls += 1;
        // Advance over what was written.
        let mut left = n;
        while left > 0 && idx < parts.len() {
            let avail = parts[idx].len() - off;
            if left >= avail {
                left -= avail;
                idx += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
    }
    Ok(calls)
}

/// One non-blocking `sendmsg` of `parts` (the first starting at `offset`).
fn send_vectored(fd: RawFd, parts: &[Bytes], offset: usize) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len().min(WRITE_PARTS));
    for (i, p) in parts.iter().take(WRITE_PARTS).enumerate() {
        let slice = if i == 0 { &p[offset..] } else { &p[..] };
        iov.push(libc::iovec {
            iov_base: slice.as_ptr() as *mut libc::c_void,
            iov_len: slice.len(),
        });
    }
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: every iovec points into a `Bytes` that outlives the call; the
    // kernel only reads from them. MSG_DONTWAIT keeps the shard from
    // blocking, MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffer_grows_while_reads_fill_it_and_shrinks_after() {
        let mut b = ReadBuf::new();
        assert_eq!(b.len(), READ_BUF_MIN);
        b.adapt(100);
        assert_eq!(b.len(), READ_BUF_MIN, "a short read keeps the minimum");
        b.adapt(READ_BUF_MIN);
        assert_eq!(b.len(), READ_BUF_MIN * 4);
        b.adapt(READ_BUF_MIN * 4);
        assert_eq!(b.len(), READ_BUF_MAX);
        b.adapt(READ_BUF_MAX);
        assert_eq!(b.len(), READ_BUF_MAX, "never beyond the maximum");
        b.adapt(READ_BUF_MIN * 2);
        assert_eq!(b.len(), READ_BUF_MAX, "a medium read keeps the size");
        b.adapt(10);
        assert_eq!(b.len(), READ_BUF_MIN, "a short read gives it back");
        b.adapt(READ_BUF_MIN);
        b.shrink();
        assert_eq!(b.len(), READ_BUF_MIN, "an idle peer gives it back");
    }
}
