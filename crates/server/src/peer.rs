//! One peer: its session, what it announced and subscribed, and the
//! exactly-once cleanup when it leaves.
//!
//! Owns: the per-peer state (`PeerConn`: session state, subscriptions,
//! counts for snapshots), the session task (`run`:
//! handshake, the read loop turning frames into owner inputs, limits and
//! policy) and the cleanup on disconnect: whatever ends the connection (EOF,
//! error, keepalive timeout, protocol violation, slow peer, shutdown),
//! `Connection::close` records the first reason and wakes both tasks, and
//! the session task then withdraws every route and subscription once
//! (routes in chunks, `withdraw_all`, so a million of them do not stall the
//! shard).
//!
//! ```text
//!   connection::next_read_event ──frames──▶ read_loop ──OwnerInput──▶ ShardContext::to_owner
//!                                              │ replies (HELLO, KEEPALIVE)
//!                                              ▼
//!   connection::write_loop ◀── OutQueue ◀── PeerConn::deliver ◀── shard (ShardDelivery)
//! ```
//!
//! Session events (info, warn) name their peer in fields (`peer`,
//! `peer_id`, `shard`); per-route events (debug, trace) run inside the
//! peer's span, which exists only when debug logging is on (at info it
//! cost ~350 bytes a session, issue #28).
//!
//! The writer task runs only while the peer has output: the session task
//! starts it when output is queued for a parked writer, and the writer
//! parks again (its state boxed in the `Connection`) once the queue is
//! drained, so an idle session holds one task, not two.
//!
//! Must never: keep a session alive after dropping an update for it, touch
//! the socket other than through `connection`, or import `shard` (it
//! reaches its shard only through `ShardContext`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::io::ReadHalf;
use glommio::net::TcpStream;
use tracing::Instrument;

use super::admission::HandshakeTicket;
use super::connection::{self, Connection, ReadBuf, ReadEvent, Transport, WriterState};
use super::context::ShardContext;
use super::local_event::LocalEvent;
use super::owner::{OwnerInput, ShardDelivery};
use super::route_set::RouteSet;
use super::snapshot::PeerInfo;
use super::update_budget::UpdateBudget;
use super::vni_map::VniMap;
use super::PeerId;
use metalbond_policy::{PeerPolicy, Verdict};
use metalbond_utils::Since;
use metalbond_wire::codec::{FrameDecoder, Message};
use metalbond_wire::session::{CloseReason, PeerSession, Reaction, Role, SessionState};
use metalbond_wire::types::{Action, Route, Vni};

/// A peer as its shard sees it: shared by its session task, its writer
/// and the shard (deliveries, snapshots, eviction, shutdown).
pub(crate) struct PeerConn {
    /// Identity (shard + sequence).
    id: PeerId,
    /// Remote address, for snapshots and policy.
    addr: SocketAddr,
    /// The transport: output queue, close latch, traffic counts.
    io: Connection,
    /// Wakes the reader: the peer policy was reloaded (it resolves its rule
    /// again and withdraws what became forbidden), or its session deadline
    /// is due (the shard's `SessionClock`).
    wake_event: LocalEvent,
    /// Session state, for snapshots and counters.
    state: Cell<SessionState>,
    /// Negotiated keepalive, in milliseconds (a `Duration` is 16 bytes and
    /// took `PeerConn` out of its 448-byte size class).
    keepalive_ms: Cell<u32>,
    /// Routes currently announced.
    routes_announced: Cell<usize>,
    /// VNIs subscribed, each with its subscription's state (see
    /// `Subscription`).
    subscribed: RefCell<VniMap<Subscription>>,
    /// SUBSCRIBEs so far (wrapping): numbers each subscription.
    subscribe_count: Cell<u32>,
    /// Waiting for its update rate (`UpdateBudget`) now: `/peers` says so.
    throttled: Cell<bool>,
    /// Listed by its shard for the shard's write task (`list_for_write`):
    /// listed once however many deliveries it gets meanwhile.
    write_listed: Cell<bool>,
    /// When the connection was accepted, to the second (4 bytes: a
    /// `SystemTime`'s 16 took `PeerConn` out of its size class).
    connected_since: Since,
}

impl PeerConn {
    /// A peer just accepted from `addr` on `shard`, with id `id`.
    pub(crate) fn new(id: PeerId, addr: SocketAddr, shard: &ShardContext) -> PeerConn {
        PeerConn {
            id,
            addr,
            io: Connection::new(id, &shard.config().limits),
            wake_event: LocalEvent::default(),
            state: Cell::new(SessionState::Connecting),
            keepalive_ms: Cell::new(millis(shard.config().keepalive)),
            routes_announced: Cell::new(0),
            subscribed: RefCell::new(VniMap::default()),
            subscribe_count: Cell::new(0),
            throttled: Cell::new(false),
            write_listed: Cell::new(false),
            connected_since: Since::now(),
        }
    }

    /// Closes the connection for `reason` unless already closing (the first
    /// reason wins and is the one logged and counted).
    pub(crate) fn close(&self, reason: CloseReason) {
        self.io.close(reason);
    }

    /// Has the session completed its handshake?
    pub(crate) fn is_established(&self) -> bool {
        self.state.get() == SessionState::Established
    }

    /// The span of this peer's per-route events: debug only (at info a
    /// span per session cost ~350 bytes of the log subscriber's state for
    /// each of 10,000s of idle sessions, issue #28). Built once per session
    /// by its task.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::debug_span!("peer", peer = %self.addr, peer_id = %self.id, shard = self.id.shard())
    }

    /// The peer policy was reloaded: the session resolves its rule again.
    pub(crate) fn policy_reloaded(&self) {
        self.wake_event.notify();
    }

    /// Its session deadline is due (the shard's clock task).
    pub(crate) fn deadline_due(&self) {
        self.wake_event.notify();
    }

    /// Queues a delivery from an owner and says whether the shard should
    /// list the peer for its write task (see `list_for_write`). A live
    /// delivery that leaves the queue past its limit has the VNI's owner
    /// catch the peer up from its table instead (once per subscription
    /// until the catch-up's first chunk arrives): the queue then holds what
    /// was already on its way, nothing per route the peer is behind.
    pub(crate) fn deliver(self: &Rc<Self>, d: &ShardDelivery, shard: &Rc<ShardContext>) -> bool {
        if self.io.is_closed() {
            return false;
        }
        let mut subscribed = self.subscribed.borrow_mut();
        let sub = match (subscribed.get_mut(&d.vni), d.sync) {
            // Unsubscribed after the owner sent this: PROTOCOL.md says the
            // peer stops receiving the VNI at its UNSUBSCRIBE. (A pending sync
            // chunk is dropped too; the owner forgets the sync job when the
            // UNSUBSCRIBE reaches it.)
            (None, _) => return false,
            // This subscription's sync or catch-up: what follows is for it
            // too, and the owner has heard of any lag reported.
            (Some(sub), Some(tag)) if tag.epoch == sub.epoch => {
                sub.synced = true;
                sub.lag_reported = false;
                sub
            }
            // From a previous subscription of the same VNI: a sync chunk
            // of it, or anything before this subscription's first chunk.
            (Some(_), Some(_)) => return false,
            (Some(sub), None) if !sub.synced => return false,
            (Some(sub), None) => sub,
        };
        let behind = {
            let mut out = self.io.out().borrow_mut();
            match d.sync {
                Some(tag) => {
                    out.push_sync(&d.batch, tag);
                    false
                }
                None => out.push_fanout(&d.batch),
            }
        };
        if behind && !sub.lag_reported {
            sub.lag_reported = true;
            shard.counters().catch_up_episode();
            tracing::debug!(
                peer = %self.addr,
                peer_id = %self.id,
                vni = %d.vni,
                queued = self.io.out().borrow().queued_bytes(),
                "slow subscriber: catching it up from the table"
            );
            shard.to_owner(
                d.vni,
                OwnerInput::Lagging {
                    peer: self.id,
                    vni: d.vni,
                    epoch: sub.epoch,
                },
            );
        }
        drop(subscribed);
        self.list_for_write()
    }

    /// Output was queued by a delivery: true when the shard should list
    /// this peer for its write task (its writer is parked and it is not
    /// listed yet).
    fn list_for_write(&self) -> bool {
        if self.write_listed.get()
            || !self.io.writer_parked()
            || !self.io.out().borrow().has_output()
        {
            return false;
        }
        self.write_listed.set(true);
        true
    }

    /// The shard's write task got to this listed peer: writes what the
    /// deliveries queued (`start_writer`).
    pub(crate) fn write_queued(self: &Rc<Self>, shard: &Rc<ShardContext>) {
        self.write_listed.set(false);
        start_writer(shard, self);
    }

    /// Like `write_queued` when the write task has run long: a writer
    /// task writes, so the shard's other tasks run first.
    pub(crate) fn write_later(self: &Rc<Self>, shard: &Rc<ShardContext>) {
        self.write_listed.set(false);
        spawn_writer(shard, self);
    }

    /// Snapshot for `ServerHandle::peers`.
    pub(crate) fn info(&self, shard: usize) -> PeerInfo {
        let out = self.io.out().borrow();
        let traffic = self.io.traffic();
        PeerInfo {
            id: self.id,
            addr: self.addr,
            state: self.state.get(),
            shard,
            keepalive: Duration::from_millis(u64::from(self.keepalive_ms.get())),
            routes_announced: self.routes_announced.get(),
            vnis_subscribed: self.subscribed.borrow().keys().collect(),
            frames_in: traffic.frames_in,
            bytes_in: traffic.bytes_in,
            frames_out: traffic.frames_out,
            bytes_out: traffic.bytes_out,
            queued_bytes: out.queued_bytes(),
            throttled: self.throttled.get(),
            connected_since: self.connected_since.to_system_time(),
            grace_left: None,
        }
    }
}

/// `d` in whole milliseconds, saturating (a keepalive is seconds).
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// One subscription of a peer, as its shard sees it.
#[derive(Clone, Copy, Debug)]
struct Subscription {
    /// Which of the peer's SUBSCRIBEs made it: its sync chunks carry this
    /// number, chunks of an earlier subscription of the VNI another.
    epoch: u32,
    /// Its first sync chunk has arrived. Until then, other deliveries for
    /// the VNI are leftovers of an earlier subscription (sent before the
    /// owner saw the UNSUBSCRIBE) and are dropped: the sync covers them.
    synced: bool,
    /// The owner was told the peer fell behind on this VNI and has not yet
    /// sent the catch-up's first chunk: no second report meanwhile.
    lag_reported: bool,
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
    announced: VniMap<RouteSet>,
    /// Routes an UNSUBSCRIBE took out of `announced` whose withdrawals the
    /// read loop still has to send (with `withdraw_all`, before it handles
    /// the peer's next message, so they stay in order).
    withdrawing: Vec<(Vni, RouteSet)>,
    /// The peer's policy rule (`--policy`), resolved at session start and
    /// again after a reload; `None` without a policy. Boxed: without
    /// `--policy` a session holds a null pointer instead of 88 bytes.
    policy: Option<Box<PeerPolicy>>,
    /// The messages read since the last back-pressure check included a
    /// routing message (work for an owner): the reader is subject to
    /// back-pressure before its next read.
    routed: bool,
    /// The peer's update rate, if one applies (a rule's, or the server's
    /// `--max-updates-per-second`). Boxed: most sessions have none.
    update_budget: Option<Box<UpdateBudget>>,
    /// The deadline registered with the shard's clock, if any.
    clock_entry: Option<Instant>,
}

/// The session of a freshly accepted connection, from the handshake to
/// the cleanup; returns once the peer is gone and counted. The caller runs
/// it inside `conn.span()` and has registered `conn` with its shard.
///
/// This future is most of what an idle session costs (10,000 of them are
/// held at once): what it keeps across its awaits is kept small. The
/// set-up is a plain function, the read loop holds only what a waiting
/// reader needs, and the rare paths (withdrawals, the cleanup) are boxed
/// futures allocated when they run. `transport` comes boxed: an async
/// fn's arguments stay in its future for its whole life, the box is freed
/// as soon as the session has started.
pub(crate) async fn run(shard: Rc<ShardContext>, conn: Rc<PeerConn>, transport: Box<Transport>) {
    let (mut rs, reader) = start(&shard, &conn, transport);
    let reason = read_loop(&shard, &conn, reader, &mut rs).await;
    shard.clock().cancel(conn.id, rs.clock_entry.take());
    conn.close(reason);
    // A running writer sees the close and parks: then the socket is ours.
    loop {
        let parked = conn.io.writer_event().wait();
        if conn.io.writer_parked() {
            break;
        }
        parked.await;
    }
    Box::pin(finish(shard, conn, rs)).await;
}

/// Writes output waiting for a parked writer (see the module doc): at
/// once, as far as the socket takes it (`Connection::write_while_parked`),
/// and what is left by a writer task, which parks itself again when the
/// queue is drained. Called wherever output is queued: the shard's write
/// task for the peers deliveries listed, and the read loop after the
/// replies of a read (before it may wait for back-pressure).
fn start_writer(shard: &Rc<ShardContext>, conn: &Rc<PeerConn>) {
    if !conn.io.out().borrow().has_output() || conn.io.write_while_parked(shard) {
        return;
    }
    spawn_writer(shard, conn);
}

/// Starts the writer task if output waits for a parked writer.
fn spawn_writer(shard: &Rc<ShardContext>, conn: &Rc<PeerConn>) {
    if !conn.io.out().borrow().has_output() {
        return;
    }
    let Some(state) = conn.io.unpark_writer() else {
        return;
    };
    let shard = shard.clone();
    let conn = conn.clone();
    glommio::spawn_local(
        async move { connection::write_loop(&shard, &conn.io, state).await }
            .instrument(tracing::Span::current()),
    )
    .detach();
}

/// The start of a session: counts and logs the connection, parks its
/// writer (started when output is queued) and resolves the peer's policy
/// rule. Returns the reader's state and the reading half.
// Boxed on purpose: the box comes from `spawn_peer` through `run`, and is
// freed here rather than at the end of `run` (see the comment inside).
#[allow(clippy::boxed_local)]
fn start(
    shard: &Rc<ShardContext>,
    conn: &Rc<PeerConn>,
    transport: Box<Transport>,
) -> (ReaderState, ReadHalf<TcpStream>) {
    // Unboxed here, so the box is freed when this returns: moved out of in
    // `run`, it would be freed only when `run` ends (64 bytes a session).
    let Transport {
        reader,
        writer,
        remote: _,
    } = *transport;
    shard.counters().peer_connected();
    tracing::info!(
        peer = %conn.addr,
        peer_id = %conn.id,
        shard = shard.index(),
        "peer connected"
    );

    conn.io.park_writer(WriterState::new(writer));
    let now = Instant::now();
    let mut session = PeerSession::new(Role::Passive, shard.config().keepalive, now);
    if let Some(timeout) = shard.config().limits.handshake_timeout {
        session = session.with_handshake_timeout(timeout, now);
    }
    // The peer's source address is fixed for the session: its rule is
    // found once. No rule: it may do nothing, so it is closed at once.
    let policy = match &shard.config().policy {
        None => None,
        Some(store) => match PeerPolicy::resolve(store, conn.addr) {
            Ok(p) => Some(Box::new(p)),
            Err(reason) => {
                close_for_policy(conn, reason);
                None
            }
        },
    };
    let update_budget = update_budget_for(shard, policy.as_deref(), now);
    let rs = ReaderState {
        session,
        handshake: Some(shard.admission().enter_handshake(conn.id)),
        decoder: FrameDecoder::new(),
        announced: VniMap::default(),
        withdrawing: Vec::new(),
        policy,
        routed: false,
        update_budget,
        clock_entry: None,
    };
    (rs, reader)
}

/// The update rate a session is held to: its rule's, else the server's
/// (`--max-updates-per-second`), else none.
fn update_budget_for(
    shard: &ShardContext,
    policy: Option<&PeerPolicy>,
    now: Instant,
) -> Option<Box<UpdateBudget>> {
    let rate = policy
        .and_then(PeerPolicy::update_rate)
        .or(shard.config().limits.update_rate)?;
    let counters = policy.map(|p| p.counters().clone());
    Some(Box::new(UpdateBudget::new(rate, counters, now)))
}

/// Takes a token of the peer's update rate for one UPDATE, waiting for it
/// (and reading nothing meanwhile) when there is none; `Err` if the
/// connection closed while waiting. Boxed by the caller only when a wait
/// is needed, so the read loop's future stays small.
async fn throttle(
    shard: &ShardContext,
    conn: &PeerConn,
    budget: &mut UpdateBudget,
    mut wait: Duration,
) -> Result<(), CloseReason> {
    conn.throttled.set(true);
    loop {
        let started = Instant::now();
        let closed = conn.io.close_event().wait();
        futures_lite::future::or(
            async {
                glommio::timer::sleep(wait).await;
            },
            closed,
        )
        .await;
        budget.waited(started.elapsed());
        if let Some(reason) = conn.io.close_reason() {
            conn.throttled.set(false);
            return Err(reason);
        }
        match budget.take(Instant::now()) {
            Ok(()) => break,
            Err(more) => wait = more,
        }
    }
    conn.throttled.set(false);
    if let Some((admitted, waited)) = budget.flush() {
        shard.counters().rate_limited(admitted, waited);
    }
    Ok(())
}

/// The exactly-once cleanup of a session whose read loop ended and whose
/// writer has stopped: unsubscribes, withdraws (or hands the routes to a
/// ghost), counts and logs the departure. Only the session task gets here.
async fn finish(shard: Rc<ShardContext>, conn: Rc<PeerConn>, mut rs: ReaderState) {
    let id = conn.id;
    let was_established = rs.session.is_established();
    if was_established {
        // Its routes and buffers are being freed: shards give the memory
        // back to the system over the next seconds.
        shard.admission().note_departure();
    }
    rs.session.close();
    conn.state.set(SessionState::Closed);
    let subscribed = std::mem::take(&mut *conn.subscribed.borrow_mut());
    for vni in subscribed.keys() {
        shard.to_owner(vni, OwnerInput::Unsubscribe { peer: id, vni });
    }
    // Routes of an explicit UNSUBSCRIBE still being withdrawn go at once.
    withdraw_taken(&shard, id, std::mem::take(&mut rs.withdrawing)).await;
    let announced = std::mem::take(&mut rs.announced);
    let reason = conn.io.close_reason().unwrap_or(CloseReason::PeerClosed);
    // A peer cut off for its own fault (a limit, a malformed frame, a
    // protocol violation, the policy) gets no grace: what it sent is
    // suspect.
    match shard.config().peer_grace {
        // `--peer-grace`: a ghost holds them for a while (not when the
        // server itself is shutting down: the tables go with it).
        Some(grace) if !shard.is_shutting_down() && !reason.is_peer_fault() => {
            hold_as_ghost(
                &shard,
                id,
                conn.addr,
                announced.into_iter().collect(),
                grace,
            );
        }
        _ => {
            for (vni, routes) in announced {
                shard.withdraw_all(id, vni, routes).await;
            }
        }
    }
    shard.counters().peer_gone(was_established, &reason);
    tracing::info!(
        peer = %conn.addr,
        peer_id = %id,
        shard = id.shard(),
        reason = %reason,
        kind = reason.label(),
        "peer disconnected"
    );
}

/// Withdraws routes taken out of the peer's announcements (by an
/// UNSUBSCRIBE or a policy reload), in order, in chunks (`withdraw_all`).
/// The read loop boxes this future when it has something to withdraw, so
/// its state is no part of a session that never does.
async fn withdraw_taken(shard: &ShardContext, peer: PeerId, taken: Vec<(Vni, RouteSet)>) {
    for (vni, routes) in taken {
        shard.withdraw_all(peer, vni, routes).await;
    }
}

/// `--peer-grace`: the session of `peer` (from `addr`) ended while it
/// announced `routes`: a ghost holds them for `grace` (see `grace`), then
/// what is left is withdrawn by the shard's grace sweeper (started here with
/// the shard's first ghost). Returns at once.
fn hold_as_ghost(
    shard: &Rc<ShardContext>,
    peer: PeerId,
    addr: SocketAddr,
    routes: HashMap<Vni, RouteSet>,
    grace: Duration,
) {
    let count: usize = routes.values().map(RouteSet::len).sum();
    if count == 0 {
        return;
    }
    let max_routes = shard
        .config()
        .peer_grace_max_routes
        .max(shard.config().limits.max_routes_per_peer.saturating_mul(2));
    shard
        .grace()
        .add_ghost(peer, addr, routes, count, grace, max_routes);
    tracing::info!(
        peer = %addr,
        peer_id = %peer,
        routes = count,
        grace_secs = grace.as_secs(),
        "peer gone: its routes are held for the grace period"
    );
    if shard.grace().start_sweeper() {
        let span = tracing::info_span!(parent: None, "grace", shard = shard.index());
        glommio::spawn_local(sweep_ghosts(shard.clone()).instrument(span)).detach();
    }
}

/// The shard's grace sweeper (`--peer-grace`), one task for all its ghosts:
/// withdraws what a ghost still holds when its grace is over or when the
/// bounds push it out, oldest first, and sleeps until the next deadline in
/// between. Ghosts emptied by their successors are skipped. Lives until
/// shutdown (the tables go with the server, nothing is withdrawn then).
///
/// One long-lived task instead of one per ghost: a task per ghost cost a
/// task and a timer per departed session, and each one's wait on the
/// shard's shutdown event stayed registered there (with the whole task
/// allocation) until shutdown, ~1.5 KB per departed session (BENCHMARKS
/// "Hostile round three: ghosts").
async fn sweep_ghosts(shard: Rc<ShardContext>) {
    while !shard.is_shutting_down() {
        let woken = shard.grace().event().wait();
        if let Some(e) = shard.grace().next_expired(Instant::now()) {
            for (vni, set) in e.routes {
                shard.withdraw_all(e.peer, vni, set).await;
            }
            tracing::info!(
                peer = %e.addr,
                peer_id = %e.peer,
                routes = e.count,
                "grace over: the departed peer's remaining routes are withdrawn"
            );
            continue;
        }
        let wake = futures_lite::future::or(woken, shard.shutdown_event().wait());
        match shard.grace().next_deadline() {
            Some(at) => {
                let sleep = glommio::timer::sleep(at.saturating_duration_since(Instant::now()));
                futures_lite::future::or(sleep, wake).await;
            }
            None => wake.await,
        }
    }
}

/// `--peer-grace`: the peer announced `route`, or withdrew a route it had
/// announced, so ghosts of earlier sessions from its address (usually
/// none; see `grace`) that hold it give it up. Sent after the peer's own
/// input, on the same channel to the owner: an ADD keeps the route
/// without a flap, a REMOVE takes effect at once. (A REMOVE of a route
/// the peer never announced does not come here: see `grace`.)
fn drop_ghost_claims(shard: &ShardContext, conn: &PeerConn, route: Route) {
    if shard.config().peer_grace.is_none() {
        return;
    }
    let ip = super::grace::host_of(&conn.addr);
    for ghost in shard.grace().index().take_over(ip, &route) {
        tracing::debug!(%route, ghost = %ghost, "taken over from a departed session");
        shard.to_owner(route.vni, OwnerInput::Withdraw { peer: ghost, route });
    }
}

/// Reads and handles the peer's frames until the session ends; returns
/// why it ended.
async fn read_loop(
    shard: &Rc<ShardContext>,
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
                .outbox_room(|| conn.io.is_closed(), conn.io.close_event())
                .await;
        }
        let closed = conn.io.close_event().wait();
        if let Some(r) = conn.io.close_reason() {
            return r;
        }
        let woken = conn.wake_event.wait();
        if let Err(reason) = reapply_policy(shard, conn, rs) {
            return reason;
        }
        start_writer(shard, conn);
        if !rs.withdrawing.is_empty() {
            Box::pin(withdraw_taken(
                shard,
                conn.id,
                std::mem::take(&mut rs.withdrawing),
            ))
            .await;
        }
        let deadline = rs.session.next_deadline();
        if Instant::now() >= deadline {
            // Quiet peer: give back a grown buffer and the decoder's,
            // and the output queue's slots once it is drained.
            buf.shrink();
            if rs.decoder.buffered() == 0 {
                rs.decoder = FrameDecoder::new();
            }
            conn.io.out().borrow_mut().release_if_drained();
            match rs.session.on_tick(Instant::now()) {
                Err(reason) => return reason,
                Ok(Some(msg)) => {
                    conn.io.push_control(&msg, rs.session.interval());
                    start_writer(shard, conn);
                }
                Ok(None) => {}
            }
            continue;
        }
        // The shard's clock wakes the reader at the deadline.
        rs.clock_entry = Some(shard.clock().wait_until(conn.id, deadline, rs.clock_entry));
        let event = connection::next_read_event(&mut reader, &mut buf, [closed, woken]).await;
        match event {
            // The reason, the new policy or the deadline is picked up above.
            ReadEvent::Woken => continue,
            ReadEvent::Data(Ok(0)) => return CloseReason::PeerClosed,
            ReadEvent::Data(Err(e)) => return CloseReason::Io(e.into()),
            ReadEvent::Data(Ok(n)) => {
                rs.decoder.extend(&buf.as_mut()[..n]);
                let mut frames = 0u64;
                let failure = loop {
                    match rs.decoder.next_message() {
                        Ok(None) => break None,
                        Ok(Some(msg)) => {
                            frames += 1;
                            if let (Message::Update { .. }, Some(budget)) =
                                (&msg, rs.update_budget.as_deref_mut())
                            {
                                if let Err(wait) = budget.take(Instant::now()) {
                                    let waited =
                                        Box::pin(throttle(shard, conn, budget, wait)).await;
                                    if let Err(reason) = waited {
                                        break Some(reason);
                                    }
                                }
                            }
                            if let Err(reason) = on_message(shard, conn, rs, msg) {
                                break Some(reason);
                            }
                            if !rs.withdrawing.is_empty() {
                                let taken = std::mem::take(&mut rs.withdrawing);
                                Box::pin(withdraw_taken(shard, conn.id, taken)).await;
                            }
                        }
                        Err(e) => break Some(CloseReason::Malformed(e.into())),
                    }
                };
                conn.io.count_read(frames, n);
                shard.counters().read(frames, n);
                // What the update rate admitted in this read is counted now
                // (once per read, not per UPDATE), so /metrics is current.
                if let Some((admitted, waited)) = rs
                    .update_budget
                    .as_deref_mut()
                    .and_then(UpdateBudget::flush)
                {
                    shard.counters().rate_limited(admitted, waited);
                }
                if let Some(reason) = failure {
                    return reason;
                }
                // The decoder's buffer grew to hold this read and would keep
                // it for the connection's life: once it holds no partial
                // frame, start afresh (a new decoder owns nothing). After
                // every read, not only large ones: an idle peer's KEEPALIVE
                // left ~64 bytes, a fleet peer's first read ~290 (issue #28).
                if rs.decoder.buffered() == 0 {
                    rs.decoder = FrameDecoder::new();
                }
                buf.adapt(n);
                // The replies of this read go out before any wait below.
                start_writer(shard, conn);
                // Let the shard's other tasks run between large reads.
                glommio::yield_if_needed().await;
            }
        }
    }
}

/// Feeds one message to the session and carries out its reaction.
fn on_message(
    shard: &ShardContext,
    conn: &PeerConn,
    rs: &mut ReaderState,
    msg: Message,
) -> Result<(), CloseReason> {
    let hello = matches!(msg, Message::Hello { .. });
    let reaction = rs.session.on_message(msg, Instant::now())?;
    if hello && rs.session.peer_reads_stream() {
        conn.io.peer_reads_stream();
    }
    conn.state.set(rs.session.state());
    conn.keepalive_ms.set(millis(rs.session.interval()));
    match reaction {
        Reaction::Nothing => {}
        Reaction::Reply(m) => conn.io.push_control(&m, rs.session.interval()),
        Reaction::Established { reply } => {
            if let Some(m) = reply {
                conn.io.push_control(&m, rs.session.interval());
            }
            rs.handshake = None;
            shard.counters().peer_established();
            tracing::info!(
                peer = %conn.addr,
                peer_id = %conn.id,
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
/// withdrawn) with a reason naming the limit and where it comes from (the
/// flag that raises it, or the policy rule).
fn over_limit(conn: &PeerConn, what: &'static str, max: usize, origin: String) -> CloseReason {
    let reason = CloseReason::PeerLimit { what, max, origin };
    tracing::warn!(peer = %conn.addr, peer_id = %conn.id, %reason, "closing peer");
    reason
}

/// The peer policy closes the session: no rule matches the peer, or it
/// violated a rule with `on_violation: close`. Also closes `conn` (for the
/// start of a session, where nothing returns the reason). The policy has
/// logged the "closing peer" line, within its process-wide budget.
fn close_for_policy(conn: &PeerConn, reason: String) -> CloseReason {
    let reason = CloseReason::Policy(reason);
    conn.close(reason.clone());
    reason
}

/// After a policy reload (the store's generation moved): resolves the
/// peer's rule again, closes the session if the rule's TCP-MD5 key
/// changed, takes the routes the new rule refuses out of
/// `announced` into `withdrawing` (the caller withdraws them, as if the peer
/// had sent REMOVE) and drops the subscriptions it refuses. Newly allowed
/// routes are not invented: the peer sends them again on its next session.
fn reapply_policy(
    shard: &ShardContext,
    conn: &PeerConn,
    rs: &mut ReaderState,
) -> Result<(), CloseReason> {
    let (Some(store), Some(old)) = (&shard.config().policy, &rs.policy) else {
        return Ok(());
    };
    if old.generation() == store.generation() {
        return Ok(());
    }
    let policy = PeerPolicy::resolve(store, conn.addr).map_err(|r| close_for_policy(conn, r))?;
    let key = |p: &PeerPolicy| p.rule().auth.as_ref().map(|a| a.key.clone());
    if key(old) != key(&policy) {
        // Signed with the old key (or unsigned): the peer reconnects and
        // the listener asks for the new one. Not its fault: it keeps its
        // grace.
        let reason = CloseReason::KeyChanged;
        conn.close(reason.clone());
        return Err(reason);
    }
    let mut withdrawn = 0usize;
    for (vni, set) in rs.announced.iter_mut() {
        let refused = set.take_if(|r| {
            let refuse = !policy.allows(r);
            if refuse {
                // A ghost of this address must not keep it visible either.
                drop_ghost_claims(shard, conn, *r);
            }
            refuse
        });
        if refused.len() > 0 {
            withdrawn += refused.len();
            rs.withdrawing.push((vni, refused));
        }
    }
    rs.announced.retain(|_, set| set.len() > 0);
    conn.routes_announced
        .set(conn.routes_announced.get() - withdrawn);
    let dropped: Vec<Vni> = conn
        .subscribed
        .borrow()
        .keys()
        .filter(|v| !policy.allows_subscribe(*v))
        .collect();
    for vni in &dropped {
        conn.subscribed.borrow_mut().remove(vni);
        conn.io.out().borrow_mut().forget_vni(*vni);
        shard.to_owner(
            *vni,
            OwnerInput::Unsubscribe {
                peer: conn.id,
                vni: *vni,
            },
        );
    }
    let rate = policy.update_rate().or(shard.config().limits.update_rate);
    if rate != rs.update_budget.as_ref().map(|b| b.rate()) {
        if let Some((admitted, waited)) = rs.update_budget.as_mut().and_then(|b| b.flush()) {
            shard.counters().rate_limited(admitted, waited);
        }
        rs.update_budget = update_budget_for(shard, Some(&policy), Instant::now());
    }
    policy.rule().counters.withdrawn(withdrawn as u64);
    tracing::info!(
        peer = %conn.addr,
        peer_id = %conn.id,
        rule = %policy.rule().name,
        routes_withdrawn = withdrawn,
        subscriptions_dropped = dropped.len(),
        "policy reloaded for peer"
    );
    rs.policy = Some(Box::new(policy));
    Ok(())
}

/// Handles an UPDATE, SUBSCRIBE or UNSUBSCRIBE of an established session:
/// limits and policy first, then the owner input.
fn on_routing_message(
    shard: &ShardContext,
    conn: &PeerConn,
    rs: &mut ReaderState,
    msg: Message,
) -> Result<(), CloseReason> {
    match msg {
        Message::Update {
            action: Action::Add,
            route,
        } => {
            shard.counters().update_in();
            on_announce(shard, conn, rs, route)
        }
        Message::Update {
            action: Action::Remove,
            route,
        } => {
            shard.counters().update_in();
            on_withdraw(shard, conn, rs, route);
            Ok(())
        }
        Message::Subscribe(vni) => on_subscribe(shard, conn, rs, vni),
        Message::Unsubscribe(vni) => {
            on_unsubscribe(shard, conn, rs, vni);
            Ok(())
        }
        // The session only delivers the three routing messages.
        Message::Hello { .. } | Message::Keepalive => Ok(()),
    }
}

/// An UPDATE ADD: the policy's verdict, the route limit (the rule's or
/// `--max-routes-per-peer`), then the owner learns of a new route.
fn on_announce(
    shard: &ShardContext,
    conn: &PeerConn,
    rs: &mut ReaderState,
    route: Route,
) -> Result<(), CloseReason> {
    let vni = route.vni;
    let mut rule_limit = None;
    if let Some(p) = &mut rs.policy {
        match p.on_announce(conn.addr, &route) {
            Verdict::Allow => rule_limit = p.route_limit(),
            Verdict::Refuse => return Ok(()),
            Verdict::Close(reason) => return Err(close_for_policy(conn, reason)),
        }
    }
    let max = rule_limit.unwrap_or(shard.config().limits.max_routes_per_peer);
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
        return Err(over_limit(conn, "routes announced", max, flag));
    }
    if rs.announced.get_or_default(vni).insert(route) {
        conn.routes_announced.set(conn.routes_announced.get() + 1);
        tracing::debug!(%route, "ADD");
        shard.to_owner(
            vni,
            OwnerInput::Announce {
                peer: conn.id,
                route,
            },
        );
        drop_ghost_claims(shard, conn, route);
    } else {
        tracing::debug!(%route, "duplicate ADD ignored");
    }
    Ok(())
}

/// An UPDATE REMOVE: only a route this session announced is withdrawn.
fn on_withdraw(shard: &ShardContext, conn: &PeerConn, rs: &mut ReaderState, route: Route) {
    let vni = route.vni;
    let removed = rs
        .announced
        .get_mut(&vni)
        .is_some_and(|set| set.remove(&route));
    if removed {
        conn.routes_announced.set(conn.routes_announced.get() - 1);
        tracing::debug!(%route, "REMOVE");
        shard.to_owner(
            vni,
            OwnerInput::Withdraw {
                peer: conn.id,
                route,
            },
        );
        drop_ghost_claims(shard, conn, route);
    } else {
        // Also for ghosts of its address: a session cannot withdraw what
        // another (a departed one, or another process behind the same
        // address) announced.
        tracing::debug!(%route, "REMOVE of a route the peer does not announce ignored");
    }
}

/// A SUBSCRIBE: the policy's verdict, the subscription limit (the rule's
/// or `--max-subscriptions-per-peer`), then a new subscription epoch and
/// the owner starts the sync.
fn on_subscribe(
    shard: &ShardContext,
    conn: &PeerConn,
    rs: &mut ReaderState,
    vni: Vni,
) -> Result<(), CloseReason> {
    let mut rule_limit = None;
    if let Some(p) = &mut rs.policy {
        match p.on_subscribe(conn.addr, vni) {
            Verdict::Allow => rule_limit = p.subscription_limit(),
            // The peer gets nothing of the VNI: no sync, no updates.
            Verdict::Refuse => return Ok(()),
            Verdict::Close(reason) => return Err(close_for_policy(conn, reason)),
        }
    }
    let max = rule_limit.unwrap_or(shard.config().limits.max_subscriptions_per_peer);
    {
        let subscribed = conn.subscribed.borrow();
        if subscribed.len() >= max && !subscribed.contains_key(&vni) {
            drop(subscribed);
            let flag = match (&rs.policy, rule_limit) {
                (Some(p), Some(_)) => p.limit_origin("max_subscriptions"),
                _ => "--max-subscriptions-per-peer".into(),
            };
            return Err(over_limit(conn, "subscriptions", max, flag));
        }
    }
    if !conn.subscribed.borrow().contains_key(&vni) {
        let epoch = conn.subscribe_count.get().wrapping_add(1);
        conn.subscribe_count.set(epoch);
        let sub = Subscription {
            epoch,
            synced: false,
            lag_reported: false,
        };
        conn.subscribed.borrow_mut().insert(vni, sub);
        tracing::debug!(%vni, "SUBSCRIBE");
        shard.to_owner(
            vni,
            OwnerInput::Subscribe {
                peer: conn.id,
                vni,
                epoch,
            },
        );
    }
    Ok(())
}

/// An UNSUBSCRIBE: nothing more of the VNI is written to the peer, and (as
/// in the Go implementation) the routes it announced in the VNI go too.
fn on_unsubscribe(shard: &ShardContext, conn: &PeerConn, rs: &mut ReaderState, vni: Vni) {
    if conn.subscribed.borrow_mut().remove(&vni).is_some() {
        tracing::debug!(%vni, "UNSUBSCRIBE");
        // Coalesced changes of the VNI would be written after this point:
        // drop them (queued frames were due before it).
        conn.io.out().borrow_mut().forget_vni(vni);
        shard.to_owner(vni, OwnerInput::Unsubscribe { peer: conn.id, vni });
    }
    // Its routes in the VNI are withdrawn by the read loop, in chunks,
    // before the next message.
    if let Some(routes) = rs.announced.remove(&vni) {
        conn.routes_announced
            .set(conn.routes_announced.get() - routes.len());
        rs.withdrawing.push((vni, routes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds one `PeerConn` in an `Rc` (16 bytes of
    /// counts) for its life: 10,000 idle peers hold 10,000 of them (issue
    /// #15). Within 448 bytes it stays in mimalloc's 448-byte size class
    /// (issue #28; it was 512); past it, each costs 512. Fields only the
    /// status page needs should be small types; rarely used state belongs
    /// behind a pointer.
    #[test]
    fn peer_state_stays_in_its_size_class() {
        let size = std::mem::size_of::<PeerConn>() + 16;
        assert!(
            size <= 448,
            "Rc<PeerConn> is {size} bytes (bound 448): 10,000 idle peers hold one each"
        );
    }
}
