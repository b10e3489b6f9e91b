//! One shard: a glommio executor pinned to a core, and the channels between
//! shards.
//!
//! Owns: executor set-up, the per-destination outboxes (batches of
//! `ShardMsg`, one channel message and one wake-up per batch), the receive
//! tasks, the accept loops (connections are handed round-robin to shards and
//! stay there), the sync pump, the control loop (snapshots, shutdown) and the
//! map of this shard's peers.
//!
//! Deadlock freedom: a task that *handles* messages never awaits a channel
//! send. Handlers only append to an outbox; a dedicated flusher task per
//! destination awaits the bounded channel. Two shards sending to each other
//! therefore never wait on each other's handlers. Outboxes are bounded in
//! practice by back-pressure: peer readers whose last read produced owner
//! inputs stop reading from their sockets while the shard's outboxes hold
//! more than `OUTBOX_HIGH` messages (a reader that only got session frames
//! reads on, adding at most one read's worth), and a leaving peer's
//! withdrawals wait the same way.
//!
//! Liveness: every loop whose length depends on a batch or table size
//! yields in bounded chunks (`handle_batch`, the sync pump, and in `peer`
//! the withdrawals of a leaving peer and the writer), so one peer's million
//! routes never hold up the keepalive replies of the shard's other peers.
//! Owner state is borrowed only between awaits, never across one.
//!
//! Must never: block the thread (no std locks held across awaits, no
//! blocking syscalls), run a table- or batch-sized loop without yielding,
//! or hold route logic (that is `owner`/`vni_table`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::future;
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::net::{AcceptedTcpStream, TcpListener};

use super::admission::{Admission, Admit, PeerSlot};
use super::config::ServerConfig;
use super::grace::{GhostIndex, GraceHolds};
use super::owner::{Delivery, OwnerInput, VniOwner};
use super::peer::{self, PeerConn};
use super::stats::{PeerInfo, ShardCounters, VniRoutes};
use super::PeerId;
use crate::session::CloseReason;
use crate::types::{Route, Vni};

/// Messages pending in a shard's outboxes above which peer readers pause.
pub(crate) const OUTBOX_HIGH: usize = 64 * 1024;
/// Batches a shard-to-shard channel holds before the flusher waits.
pub(crate) const CHANNEL_BATCHES: usize = 16;
/// Routes a status-page snapshot copies between chances to yield.
const SNAPSHOT_STEP_ROUTES: usize = 16 * 1024;
/// Messages `Shard::handle_batch` handles between two yields at most (a
/// few milliseconds of table work; fan-out buffers fill at ~1,500 changes,
/// so flushing this often does not shrink them).
const HANDLE_CHUNK: usize = 4096;

/// What shards tell each other.
pub(crate) enum ShardMsg {
    /// For the owner of the input's VNI.
    Owner(OwnerInput),
    /// Frames for peers on the receiving shard.
    Deliver(Delivery),
    /// A new connection handed over by an accept loop, with its place
    /// under `--max-peers`.
    Connection(AcceptedTcpStream, PeerSlot),
    /// Close this peer of the receiving shard if it is still in its
    /// handshake: an accept loop gave its place to a new connection
    /// (`Shard::evict`).
    Evict(PeerId),
}

/// One channel message: many shard messages, one wake-up.
pub(crate) type Batch = Vec<ShardMsg>;

/// Requests from outside the shards (the `ServerHandle`).
pub(crate) enum Control {
    /// Close listeners and peers, then stop.
    Shutdown,
    /// Reply with the routes of the VNIs this shard owns.
    Routes(crossbeam_channel::Sender<Vec<VniRoutes>>),
    /// Reply with this shard's peers.
    Peers(crossbeam_channel::Sender<Vec<PeerInfo>>),
    /// The peer policy was reloaded: every peer resolves its rule again.
    PolicyReloaded,
}

/// A single-threaded wake-up: every `wait` created before a `notify`
/// completes. Waiters check their condition, then create the wait future
/// and await it with no await in between, so no wake-up is lost.
#[derive(Default)]
pub(crate) struct LocalEvent {
    /// Bumped by each notify.
    generation: Cell<u64>,
    /// Tasks to wake on the next notify.
    wakers: RefCell<Vec<Waker>>,
}

impl LocalEvent {
    /// Wakes every current waiter.
    pub(crate) fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// Completes at the next `notify` after this call.
    pub(crate) fn wait(&self) -> EventWait<'_> {
        EventWait {
            event: self,
            generation: self.generation.get(),
        }
    }
}

/// Future returned by `LocalEvent::wait`.
pub(crate) struct EventWait<'a> {
    event: &'a LocalEvent,
    generation: u64,
}

impl Future for EventWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = self.event.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Everything a shard thread is started with.
pub(crate) struct ShardSetup {
    /// This shard's index.
    pub index: usize,
    /// The server's configuration.
    pub config: Arc<ServerConfig>,
    /// Listening sockets whose accept loop runs here, with the round-robin
    /// start offset for each.
    pub listeners: Vec<(std::net::TcpListener, usize)>,
    /// Sending ends to every shard (`None` at our own index).
    pub senders: Vec<Option<SharedSender<Batch>>>,
    /// Receiving ends from every other shard.
    pub receivers: Vec<SharedReceiver<Batch>>,
    /// Requests from the handle.
    pub control: crossbeam_channel::Receiver<Control>,
    /// Counters, shared with the handle.
    pub counters: Arc<ShardCounters>,
    /// Places under `--max-peers` and the handshake queue, shared by all
    /// shards.
    pub admission: Arc<Admission>,
    /// Departed peers' ghosts by address, shared by all shards (see `grace`).
    pub ghosts: Arc<GhostIndex>,
    /// Reports that the shard is up (or why not).
    pub ready: std::sync::mpsc::Sender<Result<(), (usize, String)>>,
}

/// A shard's state, shared by its tasks (single thread, `Rc`).
pub(crate) struct Shard {
    /// This shard's index.
    pub index: usize,
    /// Number of shards.
    pub shards: usize,
    /// The server's configuration.
    pub config: Arc<ServerConfig>,
    /// Counters, shared with the handle.
    pub counters: Arc<ShardCounters>,
    /// The VNIs this shard owns.
    owner: RefCell<VniOwner>,
    /// Wakes the sync pump when a sync may progress.
    sync_wake: LocalEvent,
    /// Pending messages per destination shard.
    outboxes: Vec<RefCell<Batch>>,
    /// Wakes the flusher of each destination.
    outbox_wake: Vec<LocalEvent>,
    /// Messages in all outboxes.
    outbox_pending: Cell<usize>,
    /// Notified when outboxes are drained (paused readers resume).
    pub outbox_drained: LocalEvent,
    /// This shard's peers.
    pub peers: RefCell<HashMap<PeerId, Rc<PeerConn>>>,
    /// Next peer sequence number.
    next_peer: Cell<u64>,
    /// Set once shutdown begins.
    pub shutting_down: Cell<bool>,
    /// Wakes accept loops and peers on shutdown.
    pub shutdown_event: LocalEvent,
    /// Places under `--max-peers` and the handshake queue, shared by all
    /// shards (peers enter the queue on start, see `peer`).
    pub admission: Arc<Admission>,
    /// Routes of departed peers held for `--peer-grace` (see `grace`).
    pub grace: GraceHolds,
}

impl Shard {
    /// The shard owning `vni`.
    pub(crate) fn owner_of(&self, vni: Vni) -> usize {
        (vni.get() as usize) % self.shards
    }

    /// A fresh id for a peer accepted on this shard.
    pub(crate) fn new_peer_id(&self) -> PeerId {
        let n = self.next_peer.get();
        self.next_peer.set(n + 1);
        PeerId::new(self.index, n)
    }

    /// Sends `input` to the owner of `vni` (batched).
    pub(crate) fn to_owner(&self, vni: Vni, input: OwnerInput) {
        let dest = self.owner_of(vni);
        self.push(dest, ShardMsg::Owner(input));
    }

    /// Messages waiting in outboxes (readers pause above `OUTBOX_HIGH`).
    pub(crate) fn outbox_pending(&self) -> usize {
        self.outbox_pending.get()
    }

    /// Back-pressure: waits while this shard's outboxes hold more than
    /// `OUTBOX_HIGH` messages, or until `stop()` holds (`stop_event` is
    /// notified when it may have changed).
    pub(crate) async fn outbox_room(&self, stop: impl Fn() -> bool, stop_event: &LocalEvent) {
        while self.outbox_pending() > OUTBOX_HIGH && !stop() {
            future::or(self.outbox_drained.wait(), stop_event.wait()).await;
        }
    }

    fn push(&self, dest: usize, msg: ShardMsg) {
        self.outboxes[dest].borrow_mut().push(msg);
        self.outbox_pending.set(self.outbox_pending.get() + 1);
        self.outbox_wake[dest].notify();
    }

    /// Routes owner output: deliveries to our own peers directly (keeping
    /// order, since all of them take this path), others via outboxes.
    fn route(&self, out: Vec<(usize, Delivery)>) {
        for (dest, d) in out {
            if dest == self.index {
                self.deliver(d);
            } else {
                self.push(dest, ShardMsg::Deliver(d));
            }
        }
    }

    /// Closes peer `id` of this shard to free its place under
    /// `--max-peers` (it was the oldest connection still in its handshake
    /// when the accept loop chose it). A peer that completed its handshake
    /// while the request travelled here is left alone: the count then
    /// stays one over the limit until any connection leaves.
    fn evict(&self, id: PeerId) {
        let conn = self.peers.borrow().get(&id).cloned();
        if let Some(conn) = conn {
            if conn.is_established() {
                tracing::debug!(peer = %conn.addr(), "eviction skipped: handshake completed meanwhile");
                return;
            }
            conn.close(CloseReason::Evicted {
                limit: format!("--max-peers {} reached", self.admission.max()),
            });
        }
    }

    fn deliver(&self, d: Delivery) {
        let peers = self.peers.borrow();
        for id in d.recipients.iter() {
            if let Some(conn) = peers.get(id) {
                conn.deliver(&d, &self.counters);
            }
        }
    }

    /// Handles one batch from any shard (ourselves included), yielding to
    /// the executor every `HANDLE_CHUNK` messages and whenever glommio's
    /// preemption timer has expired: a batch can hold a million messages (a
    /// disconnected peer's withdrawals, a burst), and applying them in one
    /// go starved every other task of the shard, keepalive replies
    /// included, for seconds. Before each yield the owner's pending fan-out
    /// is flushed and routed, exactly as at the end of a batch, so a sync
    /// step or another batch handled meanwhile never overtakes changes
    /// already applied. Callers await this before taking their next batch,
    /// so the order of one source's messages is kept.
    async fn handle_batch(self: &Rc<Self>, batch: Batch) {
        let mut out = Vec::new();
        let mut owner_touched = false;
        let mut handled = 0usize;
        for msg in batch {
            match msg {
                ShardMsg::Owner(input) => {
                    self.owner.borrow_mut().apply(input, &mut out);
                    owner_touched = true;
                }
                ShardMsg::Deliver(d) => self.deliver(d),
                ShardMsg::Connection(accepted, slot) => {
                    let stream = accepted.bind_to_executor();
                    peer::spawn(self.clone(), stream, slot);
                }
                ShardMsg::Evict(id) => self.evict(id),
            }
            handled += 1;
            if handled % HANDLE_CHUNK == 0 || glommio::executor().need_preempt() {
                self.end_chunk(&mut out, &mut owner_touched);
                // Tasks already woken (a reader with a KEEPALIVE, a writer
                // with its reply) run now; the executor also polls for I/O
                // here when its preemption timer has expired.
                future::yield_now().await;
            }
        }
        self.end_chunk(&mut out, &mut owner_touched);
    }

    /// Ends a run of `handle_batch` without an await: flushes the owner's
    /// pending fan-out if it was touched and routes everything produced.
    /// Borrows the owner only inside, never across an await.
    fn end_chunk(&self, out: &mut Vec<(usize, Delivery)>, owner_touched: &mut bool) {
        if std::mem::take(owner_touched) {
            let mut owner = self.owner.borrow_mut();
            owner.flush(out);
            self.counters.set_routes(owner.route_count());
            if owner.has_sync_work() {
                self.sync_wake.notify();
            }
        }
        self.route(std::mem::take(out));
    }

    /// Copies the owned tables for the status pages, in steps of
    /// `SNAPSHOT_STEP_ROUTES` with a chance to yield between them, so that a
    /// table of millions of routes does not hold up this shard's peers. A
    /// route changed while the copy is under way may show in its old or new
    /// state (each route at most once): good enough for a status page.
    async fn routes_snapshot(&self) -> Vec<VniRoutes> {
        let vnis: Vec<Vni> = self
            .owner
            .borrow()
            .tables()
            .filter(|(_, t)| t.route_count() > 0)
            .map(|(vni, _)| *vni)
            .collect();
        let mut snapshot = Vec::with_capacity(vnis.len());
        for vni in vnis {
            let mut routes = Vec::new();
            let mut after: Option<Route> = None;
            loop {
                let finished = {
                    let owner = self.owner.borrow();
                    let Some(table) = owner.table(vni) else { break };
                    let before = routes.len();
                    for r in table
                        .routes_after(after.as_ref())
                        .take(SNAPSHOT_STEP_ROUTES)
                    {
                        routes.push((r.destination, r.next_hop));
                        after = Some(r);
                    }
                    routes.len() - before < SNAPSHOT_STEP_ROUTES
                };
                if finished {
                    break;
                }
                glommio::yield_if_needed().await;
            }
            if !routes.is_empty() {
                snapshot.push(VniRoutes { vni, routes });
            }
        }
        snapshot
    }

    /// Live peers, then the ghosts of departed ones (`--peer-grace`).
    fn peers_snapshot(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .peers
            .borrow()
            .values()
            .map(|c| c.info(self.index))
            .collect();
        peers.extend(self.grace.peers(self.index, self.config.keepalive));
        peers
    }
}

/// The body of a shard thread: connects channels, starts the tasks, serves
/// control requests until shutdown, then closes every peer.
pub(crate) async fn run(setup: ShardSetup) {
    let ShardSetup {
        index,
        config,
        listeners,
        senders,
        receivers,
        control,
        counters,
        admission,
        ghosts,
        ready,
    } = setup;
    let shards = senders.len();

    // Connect every channel end concurrently: each connect waits for its
    // peer shard to connect the other end.
    let sender_tasks: Vec<_> = senders
        .into_iter()
        .map(|s| {
            glommio::spawn_local(async move {
                match s {
                    Some(s) => Some(s.connect().await),
                    None => None,
                }
            })
        })
        .collect();
    let receiver_tasks: Vec<_> = receivers
        .into_iter()
        .map(|r| glommio::spawn_local(r.connect()))
        .collect();
    let mut connected_senders: Vec<Option<ConnectedSender<Batch>>> = Vec::new();
    for t in sender_tasks {
        connected_senders.push(t.await);
    }
    let mut connected_receivers: Vec<ConnectedReceiver<Batch>> = Vec::new();
    for t in receiver_tasks {
        connected_receivers.push(t.await);
    }

    let mut glommio_listeners = Vec::new();
    for (l, start) in listeners {
        let fd = l.into_raw_fd();
        // SAFETY: the fd comes from a std listener we own and give up here.
        let gl = unsafe { TcpListener::from_raw_fd(fd) };
        glommio_listeners.push((gl, fd, start));
    }

    let shard = Rc::new(Shard {
        index,
        shards,
        owner: RefCell::new(VniOwner::new(config.sync_chunk_routes)),
        config,
        counters,
        sync_wake: LocalEvent::default(),
        outboxes: (0..shards).map(|_| RefCell::new(Vec::new())).collect(),
        outbox_wake: (0..shards).map(|_| LocalEvent::default()).collect(),
        outbox_pending: Cell::new(0),
        outbox_drained: LocalEvent::default(),
        peers: RefCell::new(HashMap::new()),
        next_peer: Cell::new(0),
        shutting_down: Cell::new(false),
        shutdown_event: LocalEvent::default(),
        admission,
        grace: GraceHolds::new(ghosts),
    });

    for rx in connected_receivers {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                shard.counters.shard_batch_in();
                shard.handle_batch(batch).await;
                glommio::yield_if_needed().await;
            }
        })
        .detach();
    }
    for (dest, sender) in connected_senders.into_iter().enumerate() {
        glommio::spawn_local(flusher(shard.clone(), dest, sender)).detach();
    }
    glommio::spawn_local(sync_pump(shard.clone())).detach();
    glommio::spawn_local(memory_return(shard.clone())).detach();
    for (listener, fd, start) in glommio_listeners {
        glommio::spawn_local(accept_loop(shard.clone(), listener, fd, start)).detach();
    }
    let _ = ready.send(Ok(()));

    // Control loop: polled, so the handle needs no executor of its own.
    loop {
        match control.try_recv() {
            Ok(Control::Shutdown) | Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            Ok(Control::Routes(reply)) => {
                let _ = reply.send(shard.routes_snapshot().await);
            }
            Ok(Control::Peers(reply)) => {
                let _ = reply.send(shard.peers_snapshot());
            }
            Ok(Control::PolicyReloaded) => {
                for p in shard.peers.borrow().values() {
                    p.policy_event.notify();
                }
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    // Shutdown: stop accepting, close every peer, give them a moment to
    // finish (their sockets are closed when their tasks end).
    shard.shutting_down.set(true);
    shard.shutdown_event.notify();
    let peers: Vec<Rc<PeerConn>> = shard.peers.borrow().values().cloned().collect();
    for p in peers {
        p.close(CloseReason::Local("server shutting down".into()));
    }
    let give_up = std::time::Instant::now() + Duration::from_secs(3);
    while !shard.peers.borrow().is_empty() && std::time::Instant::now() < give_up {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Moves one destination's outbox into its channel, a whole batch at a time
/// (or handles it in place when the destination is this shard).
async fn flusher(shard: Rc<Shard>, dest: usize, sender: Option<ConnectedSender<Batch>>) {
    loop {
        let wait = shard.outbox_wake[dest].wait();
        if shard.outboxes[dest].borrow().is_empty() {
            wait.await;
            continue;
        }
        let batch = std::mem::take(&mut *shard.outboxes[dest].borrow_mut());
        shard
            .outbox_pending
            .set(shard.outbox_pending.get().saturating_sub(batch.len()));
        shard.outbox_drained.notify();
        match &sender {
            None => shard.handle_batch(batch).await,
            Some(s) => {
                if s.send(batch).await.is_err() {
                    // The other shard has stopped (shutdown): nothing to do.
                    if !shard.shutting_down.get() {
                        tracing::warn!(shard = shard.index, dest, "shard channel closed");
                    }
                    return;
                }
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// How often a shard checks whether freed memory should go back to the
/// system.
const MEMORY_RETURN_EVERY: Duration = Duration::from_secs(1);
/// Rounds of `memory_return` after a peer left.
const MEMORY_RETURN_ROUNDS: u8 = 5;

/// Gives freed memory back to the system after peers left: mimalloc keeps
/// freed pages of a thread's heap for reuse, so a departed peer's million
/// routes (or a hostile peer's queue) stayed in RSS for good (224 MiB after
/// a 1 M-route burst had left, against 19 MiB before it). At most once per
/// `MEMORY_RETURN_EVERY`, and only for `MEMORY_RETURN_ROUNDS` rounds after
/// an established session ended (on any shard: its withdrawals free table
/// memory on the owners; probes that never complete a handshake do not
/// count): a collection walks the shard's heap. Freeing memory of another
/// shard's heap only queues it there, so every shard collects its own.
async fn memory_return(shard: Rc<Shard>) {
    let mut departures = shard.admission.departures();
    let mut rounds = 0u8;
    while !shard.shutting_down.get() {
        glommio::timer::sleep(MEMORY_RETURN_EVERY).await;
        let now = shard.admission.departures();
        if now != departures {
            departures = now;
            rounds = MEMORY_RETURN_ROUNDS;
        }
        if rounds > 0 {
            rounds -= 1;
            // SAFETY: mi_collect only walks this thread's mimalloc heap; it
            // is a no-op for memory of any other allocator.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    }
}

/// Sends SUBSCRIBE sync chunks, one per step, yielding between steps so the
/// shard's other peers keep being served during a large sync.
async fn sync_pump(shard: Rc<Shard>) {
    loop {
        let wait = shard.sync_wake.wait();
        let mut out = Vec::new();
        let progressed = shard.owner.borrow_mut().sync_step(&mut out);
        shard.route(out);
        if progressed {
            future::yield_now().await;
        } else {
            wait.await;
        }
    }
}

/// How often a shard logs that it refuses connections (`--max-peers`) or
/// that accepting fails (out of file descriptors).
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long an accept loop waits after a failed accept before trying again
/// (out of descriptors: a retry at once would fail at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A warning that would repeat many times a second (refused or failed
/// accepts): logged at most once per `ACCEPT_LOG_EVERY`, with the number of
/// occurrences since the last line.
#[derive(Default)]
struct RepeatedWarning {
    /// When the last line was written.
    last: Option<std::time::Instant>,
    /// Occurrences not yet reported.
    unlogged: u64,
}

impl RepeatedWarning {
    /// Counts one occurrence; returns how many to report if a line is due.
    fn occurred(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < ACCEPT_LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Accepts connections and hands them round-robin to the shards. Above
/// `--max-peers` the oldest connection still in its handshake is closed to
/// make room; when every connection is established, the new one is closed
/// at once, counted, and logged at most once per `ACCEPT_LOG_EVERY`. A
/// failed accept (out of file descriptors) backs off and is logged the same
/// way; the loop never stops before shutdown. `fd` is `listener`'s
/// descriptor, for the shutdown at the end.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, fd: RawFd, start: usize) {
    let mut next = start;
    let mut refusals = RepeatedWarning::default();
    let mut failures = RepeatedWarning::default();
    loop {
        if shard.shutting_down.get() {
            break;
        }
        let accepted = future::or(async { Some(listener.shared_accept().await) }, async {
            shard.shutdown_event.wait().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let slot = match shard.admission.admit() {
                    Admit::Slot(slot) => slot,
                    Admit::InPlaceOf { slot, evict } => {
                        if evict.shard() == shard.index {
                            shard.evict(evict);
                        } else {
                            shard.push(evict.shard(), ShardMsg::Evict(evict));
                        }
                        slot
                    }
                    Admit::Refused => {
                        shard.counters.connection_refused();
                        if let Some(refused) = refusals.occurred() {
                            let peer = stream.peer_addr().ok();
                            tracing::warn!(
                                ?peer,
                                refused,
                                max_peers = shard.admission.max(),
                                "connection refused: --max-peers reached"
                            );
                        }
                        // An `AcceptedTcpStream` does not close its fd when
                        // dropped; a bound `TcpStream` does.
                        drop(stream.bind_to_executor());
                        continue;
                    }
                };
                let dest = next % shard.shards;
                next = next.wrapping_add(1);
                if dest == shard.index {
                    peer::spawn(shard.clone(), stream.bind_to_executor(), slot);
                } else {
                    shard.push(dest, ShardMsg::Connection(stream, slot));
                }
            }
            Some(Err(e)) => {
                // E.g. out of file descriptors: log, back off, keep serving.
                if let Some(failed) = failures.occurred() {
                    tracing::warn!(error = %e, failed, "accept failed; retrying");
                }
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    // Dropping the listener closes the socket, but an accept still queued in
    // io_uring holds it open until the kernel tears the ring down, after the
    // process may have exited: a restarted server then found the port "in
    // use" (seen in 4 of 30 quick restarts). shutdown() takes the socket out
    // of LISTEN at once, so a new SO_REUSEADDR bind succeeds.
    // SAFETY: `fd` belongs to `listener`, which is still alive here.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "shutdown of a listening socket failed");
    }
    drop(listener);
}
