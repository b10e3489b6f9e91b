//! One shard: a glommio executor pinned to a core, its VNI owner and its
//! peers.
//!
//! Owns: executor set-up (connecting the channels to the other shards), the
//! receive task per source shard and the flusher per destination (moving
//! `ShardOutbox` batches into the bounded channels, see `mesh`), handling
//! of batches (owner inputs, deliveries to this shard's peers, handed-over
//! connections, evictions), the sync pump, memory return, the control loop
//! (snapshots, policy reload, shutdown) and the map of this shard's peers.
//!
//! ```text
//!   accept loop (accept) ──local──────────────┐
//!   receive task per source ──Batch──┐        │
//!   flusher to self ──────── Batch ──┴──▶ handle_batch ──▶ VniOwner::apply
//!                                          │  ShardMsg::Connection ▼
//!                                          │     peer task (peer::run, in its span)
//!                                          │       └─ writer task (connection::write_loop)
//!                                          ▼
//!                    end_chunk: owner flush → route(ShardDelivery)
//!                        ├─ this shard: PeerConn::deliver → OutQueue
//!                        └─ other shards: ShardOutbox ──▶ flusher per dest ──▶ channel
//!   sync pump: VniOwner::sync_step → route      control loop: snapshots, shutdown
//! ```
//! Peer tasks use their shard only through `ShardContext` (`context`); this
//! module is the only one that sees the owner tables and the peer map.
//!
//! Liveness: every loop whose length depends on a batch or table size
//! yields in bounded chunks (`handle_batch`, the sync pump, and in `peer`
//! the withdrawals of a leaving peer and in `connection` the writer), so one
//! peer's million routes never hold up the keepalive replies of the shard's
//! other peers. Owner state is borrowed only between awaits, never across
//! one.
//!
//! Must never: block the thread (no std locks held across awaits, no
//! blocking syscalls), run a table- or batch-sized loop without yielding,
//! or hold route logic (that is `owner`/`vni_table`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::net::TcpStream;
use glommio::{Latency, Shares};
use tracing::Instrument;

use super::accept::{accept_loop, Handover};
use super::admission::{Admission, PeerSlot};
use super::config::ServerConfig;
use super::connection::{Listener, Transport};
use super::context::ShardContext;
use super::grace::{GhostIndex, GraceHolds};
use super::local_event::LocalEvent;
use super::mesh::{Batch, ShardMsg};
use super::owner::{ShardDelivery, VniOwner};
use super::peer::{self, PeerConn};
use super::snapshot::{PeerInfo, RoutePage, RouteQuery, ShardCounters, VniRoutes, VniSummary};
use super::PeerId;
use metalbond_wire::session::CloseReason;
use metalbond_wire::types::{Route, Vni};

/// Routes a status-page snapshot copies between chances to yield.
const SNAPSHOT_STEP_ROUTES: usize = 16 * 1024;
/// Messages `Shard::handle_batch` handles between two yields at most (a
/// few milliseconds of table work; fan-out buffers fill at ~1,500 changes,
/// so flushing this often does not shrink them).
const HANDLE_CHUNK: usize = 4096;
/// Capacity of the write task's list kept between rounds (one pointer
/// each): a fan-out to more peers allocates its list for the round.
const KEEP_LISTED: usize = 4096;

/// Requests from outside the shards (the `ServerHandle`).
pub(crate) enum Control {
    /// Close listeners and peers, then stop.
    Shutdown,
    /// Reply with the routes of the VNIs this shard owns.
    Routes(crossbeam_channel::Sender<Vec<VniRoutes>>),
    /// Reply with a summary of each VNI this shard owns (O(VNIs)).
    Summary(crossbeam_channel::Sender<Vec<VniSummary>>),
    /// Reply with the routes of an owned VNI the query selects (`None`:
    /// the shard holds no table for it). Bounded work: one page.
    RouteQuery(
        Vni,
        RouteQuery,
        crossbeam_channel::Sender<Option<RoutePage>>,
    ),
    /// Reply with this shard's peers.
    Peers(crossbeam_channel::Sender<Vec<PeerInfo>>),
    /// The peer policy was reloaded: every peer resolves its rule again.
    PolicyReloaded,
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
    /// What peer tasks may use: identity, config, counters, outboxes,
    /// shutdown, admission, grace holds.
    ctx: Rc<ShardContext>,
    /// The VNIs this shard owns.
    owner: RefCell<VniOwner>,
    /// Wakes the sync pump when a sync may progress.
    sync_wake: LocalEvent,
    /// This shard's peers.
    peers: RefCell<HashMap<PeerId, Rc<PeerConn>>>,
    /// Peers delivery passes queued output for while their writer was
    /// parked: written by the shard's write task (`write_listed`), which
    /// runs once the tasks already woken have run, so a peer's deliveries
    /// of every pass in between go out in one call, and no writer task
    /// starts for output the socket takes at once.
    to_write: RefCell<Vec<Rc<PeerConn>>>,
    /// Wakes the write task: `to_write` is no longer empty.
    write_wake: LocalEvent,
}

impl Shard {
    /// Routes owner output: deliveries to our own peers directly (keeping
    /// order, since all of them take this path), others via outboxes.
    fn route(&self, out: Vec<(usize, ShardDelivery)>) {
        for (dest, d) in out {
            if dest == self.ctx.index() {
                self.deliver(&d);
            } else {
                self.ctx.send(dest, ShardMsg::Deliver(Box::new(d)));
            }
        }
    }

    /// Handles a connection or an eviction of this very shard at once (an
    /// accept loop of this shard chose it).
    fn handle_local(self: &Rc<Self>, handover: Handover) {
        match handover {
            Handover::Connection(accepted, slot) => self.spawn_peer(accepted.bind(), slot),
            Handover::Evict(id) => self.evict(id),
        }
    }

    /// Starts the session task of a freshly accepted connection on this
    /// shard, in the peer's span. `slot` is the connection's place under
    /// `--max-peers`, held until the task ends.
    ///
    /// The task's future is held for the session's life, 10,000 of them
    /// when as many peers idle: `peer_task` says what it may hold, and
    /// `tests::session_task_stays_small` bounds its size.
    fn spawn_peer(self: &Rc<Self>, stream: TcpStream, slot: PeerSlot) {
        // Boxed: a task's arguments stay in its future for the session's
        // life; the box is freed as soon as the session has started.
        let transport = Box::new(Transport::new(stream));
        glommio::spawn_local(Self::peer_task(self.clone(), transport, slot)).detach();
    }

    /// The task `spawn_peer` spawns: registers the peer, runs its session
    /// in its span, unregisters it. Takes the connection already split
    /// (`Transport`), so it holds two pointers and not the stream.
    async fn peer_task(shard: Rc<Self>, transport: Box<Transport>, slot: PeerSlot) {
        if shard.ctx.is_shutting_down() {
            return;
        }
        let id = shard.ctx.new_peer_id();
        let conn = Rc::new(PeerConn::new(id, transport.remote, &shard.ctx));
        shard.peers.borrow_mut().insert(id, conn.clone());
        let span = conn.span();
        peer::run(shard.ctx.clone(), conn, transport)
            .instrument(span)
            .await;
        shard.peers.borrow_mut().remove(&id);
        drop(slot);
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
                tracing::debug!(peer_id = %id, "eviction skipped: handshake completed meanwhile");
                return;
            }
            conn.close(CloseReason::Evicted {
                max_peers: self.ctx.admission().max(),
            });
        }
    }

    /// Queues a delivery for its recipients on this shard; those whose
    /// writer is parked are listed for `write_listed`.
    fn deliver(&self, d: &ShardDelivery) {
        let peers = self.peers.borrow();
        let mut to_write = self.to_write.borrow_mut();
        let was_empty = to_write.is_empty();
        for id in d.recipients.iter() {
            if let Some(conn) = peers.get(id) {
                if conn.deliver(d, &self.ctx) {
                    to_write.push(conn.clone());
                }
            }
        }
        if was_empty && !to_write.is_empty() {
            self.write_wake.notify();
        }
    }

    /// Writes what delivery passes queued for the listed peers, each in
    /// one call where the socket takes it. When glommio's preemption time
    /// has passed meanwhile, the rest are written by writer tasks instead,
    /// so the shard's other tasks run first.
    fn write_listed(&self) {
        let mut listed = std::mem::take(&mut *self.to_write.borrow_mut());
        let mut late = false;
        for conn in listed.drain(..) {
            late = late || glommio::executor().need_preempt();
            if late {
                conn.write_later(&self.ctx);
            } else {
                conn.write_queued(&self.ctx);
            }
        }
        // The emptied list's room serves the next round.
        let mut to_write = self.to_write.borrow_mut();
        if to_write.is_empty() && listed.capacity() <= KEEP_LISTED {
            *to_write = listed;
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
                ShardMsg::Deliver(d) => self.deliver(&d),
                ShardMsg::Connection(accepted, slot) => self.spawn_peer(accepted.bind(), slot),
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
    fn end_chunk(&self, out: &mut Vec<(usize, ShardDelivery)>, owner_touched: &mut bool) {
        if std::mem::take(owner_touched) {
            let mut owner = self.owner.borrow_mut();
            owner.flush(out);
            self.ctx.counters().set_routes(owner.route_count());
            self.ctx.counters().set_catch_ups(owner.catch_ups_active());
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

    /// Each owned VNI with routes or subscribers: counts and digest, read
    /// from the tables' own fields (no scan of routes).
    fn vni_summaries(&self) -> Vec<VniSummary> {
        self.owner
            .borrow()
            .tables()
            .filter(|(_, t)| !t.is_empty())
            .map(|(vni, t)| VniSummary {
                vni: *vni,
                routes: t.route_count() as u64,
                subscribers: t.subscriber_count() as u64,
                digest: t.digest(),
            })
            .collect()
    }

    /// The routes of owned VNI `vni` that `query` selects.
    fn route_query(&self, vni: Vni, query: RouteQuery) -> Option<RoutePage> {
        let owner = self.owner.borrow();
        let table = owner.table(vni)?;
        Some(match query {
            RouteQuery::Page {
                after,
                destinations,
            } => {
                let (routes, more) = table.announced_page(after.as_ref(), destinations);
                RoutePage { routes, more }
            }
            RouteQuery::Prefix(net) => RoutePage {
                routes: table.announced_routes_to(&net),
                more: false,
            },
            RouteQuery::Lookup(addr) => RoutePage {
                routes: table
                    .most_specific_covering(addr)
                    .map(|net| table.announced_routes_to(&net))
                    .unwrap_or_default(),
                more: false,
            },
        })
    }

    /// Live peers, then the ghosts of departed ones (`--peer-grace`).
    fn peers_snapshot(&self) -> Vec<PeerInfo> {
        let index = self.ctx.index();
        let mut peers: Vec<PeerInfo> = self
            .peers
            .borrow()
            .values()
            .map(|c| c.info(index))
            .collect();
        peers.extend(self.ctx.grace().peers(index, self.ctx.config().keepalive));
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
    let (connected_senders, connected_receivers) = connect_mesh(senders, receivers).await;
    let ctx = Rc::new(ShardContext::new(
        index,
        shards,
        config.clone(),
        counters,
        admission,
        GraceHolds::new(ghosts),
    ));
    let shard = Rc::new(Shard {
        ctx: ctx.clone(),
        owner: RefCell::new(VniOwner::new(config.sync_chunk_routes)),
        sync_wake: LocalEvent::default(),
        peers: RefCell::new(HashMap::new()),
        to_write: RefCell::new(Vec::new()),
        write_wake: LocalEvent::default(),
    });
    start_tasks(&shard, connected_senders, connected_receivers, listeners);
    let _ = ready.send(Ok(()));
    if index == 0 && metalbond_utils::panic_policy::injected_fault("shard") {
        glommio::spawn_local(async {
            glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
            panic!(
                "injected fault: a shard task panics ({})",
                metalbond_utils::panic_policy::FAULT_VAR
            );
        })
        .detach();
    }
    serve_control(&shard, &control).await;
    shut_down(&shard).await;
}

/// Connects every channel end concurrently: each connect waits for its
/// peer shard to connect the other end.
async fn connect_mesh(
    senders: Vec<Option<SharedSender<Batch>>>,
    receivers: Vec<SharedReceiver<Batch>>,
) -> (
    Vec<Option<ConnectedSender<Batch>>>,
    Vec<ConnectedReceiver<Batch>>,
) {
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
    let mut connected_senders = Vec::new();
    for t in sender_tasks {
        connected_senders.push(t.await);
    }
    let mut connected_receivers = Vec::new();
    for t in receiver_tasks {
        connected_receivers.push(t.await);
    }
    (connected_senders, connected_receivers)
}

/// Starts the shard's tasks: a receiver per other shard, a flusher per
/// destination, the sync pump, the memory return and an accept loop per
/// listener.
fn start_tasks(
    shard: &Rc<Shard>,
    senders: Vec<Option<ConnectedSender<Batch>>>,
    receivers: Vec<ConnectedReceiver<Batch>>,
    listeners: Vec<(std::net::TcpListener, usize)>,
) {
    for rx in receivers {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Some(batch) = rx.recv().await {
                shard.ctx.counters().shard_batch_in();
                shard.handle_batch(batch).await;
                glommio::yield_if_needed().await;
            }
        })
        .detach();
    }
    for (dest, sender) in senders.into_iter().enumerate() {
        glommio::spawn_local(flusher(shard.clone(), dest, sender)).detach();
    }
    glommio::spawn_local(sync_pump(shard.clone())).detach();
    glommio::spawn_local(write_task(shard.clone())).detach();
    glommio::spawn_local(memory_return(shard.clone())).detach();
    glommio::spawn_local(session_clock_task(shard.clone())).detach();
    // Accepts run in a task queue of their own whose I/O is latency
    // sensitive: glommio then preempts the shard's other tasks as soon as
    // a connection is accepted, where in the shared queue an accept waited
    // behind thousands of new sessions' handshakes and the backlog (4,096)
    // overflowed while a region's hypervisors connected at once: each
    // dropped SYN costs its peer a second (issue #28).
    let accepts = glommio::executor().create_task_queue(
        Shares::Static(1000),
        Latency::Matters(ACCEPT_LATENCY),
        "accept",
    );
    for (listener, start) in listeners {
        let local = {
            let shard = shard.clone();
            move |msg| shard.handle_local(msg)
        };
        let listener = Listener::from_std(listener);
        let task = accept_loop(shard.ctx.clone(), listener, start, local);
        if let Err(e) = glommio::spawn_local_into(task, accepts).map(|t| t.detach()) {
            // The queue was just created on this executor: not expected.
            tracing::error!(error = %e, shard = shard.ctx.index(), "accept loop not started");
        }
    }
}

/// How soon an accepted connection is taken from the kernel when the shard
/// is busy (see `start_tasks`).
const ACCEPT_LATENCY: Duration = Duration::from_millis(5);

/// Answers the handle's requests until it asks for shutdown (or is gone).
/// Polled, so the handle needs no executor of its own.
async fn serve_control(shard: &Rc<Shard>, control: &crossbeam_channel::Receiver<Control>) {
    loop {
        match control.try_recv() {
            Ok(Control::Shutdown) | Err(crossbeam_channel::TryRecvError::Disconnected) => break,
            Ok(Control::Routes(reply)) => {
                let _ = reply.send(shard.routes_snapshot().await);
            }
            Ok(Control::Peers(reply)) => {
                let _ = reply.send(shard.peers_snapshot());
            }
            Ok(Control::Summary(reply)) => {
                let _ = reply.send(shard.vni_summaries());
            }
            Ok(Control::RouteQuery(vni, query, reply)) => {
                let _ = reply.send(shard.route_query(vni, query));
            }
            Ok(Control::PolicyReloaded) => {
                for p in shard.peers.borrow().values() {
                    p.policy_reloaded();
                }
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Shutdown: stop accepting, close every peer, give them a moment to
/// finish (their sockets are closed when their tasks end).
async fn shut_down(shard: &Rc<Shard>) {
    shard.ctx.begin_shutdown();
    let peers: Vec<Rc<PeerConn>> = shard.peers.borrow().values().cloned().collect();
    for p in peers {
        p.close(CloseReason::Shutdown);
    }
    let give_up = Instant::now() + Duration::from_secs(3);
    while !shard.peers.borrow().is_empty() && Instant::now() < give_up {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Moves one destination's outbox into its channel, a whole batch at a time
/// (or handles it in place when the destination is this shard).
async fn flusher(shard: Rc<Shard>, dest: usize, sender: Option<ConnectedSender<Batch>>) {
    loop {
        let batch = shard.ctx.outbox().next_batch(dest).await;
        match &sender {
            None => shard.handle_batch(batch).await,
            Some(s) => {
                if s.send(batch).await.is_err() {
                    // The other shard has stopped (shutdown): nothing to do.
                    if !shard.ctx.is_shutting_down() {
                        tracing::warn!(shard = shard.ctx.index(), dest, "shard channel closed");
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
    let mut departures = shard.ctx.admission().departures();
    let mut rounds = 0u8;
    while !shard.ctx.is_shutting_down() {
        glommio::timer::sleep(MEMORY_RETURN_EVERY).await;
        let now = shard.ctx.admission().departures();
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

/// The shard's one timer for its sessions' deadlines (`session_clock`):
/// sleeps until the earliest, wakes the readers of the sessions due, and
/// re-arms when an earlier deadline is registered. Ends at shutdown.
async fn session_clock_task(shard: Rc<Shard>) {
    let mut due = Vec::new();
    while !shard.ctx.is_shutting_down() {
        let earlier = shard.ctx.clock().earlier().wait();
        let stop = shard.ctx.shutdown_event().wait();
        let next = shard.ctx.clock().take_due(Instant::now(), &mut due);
        {
            let peers = shard.peers.borrow();
            for id in due.drain(..) {
                if let Some(conn) = peers.get(&id) {
                    conn.deadline_due();
                }
            }
        }
        let woken = future::or(earlier, stop);
        match next {
            Some(at) => {
                let sleep = glommio::timer::sleep(at.saturating_duration_since(Instant::now()));
                future::or(sleep, woken).await;
            }
            None => woken.await,
        }
    }
}

/// Writes the output delivery passes queued for peers whose writer is
/// parked (`Shard::write_listed`), after the tasks woken before it: a
/// write per delivery pass made more, smaller writes than the per-peer
/// writer tasks it replaced, which ran after every task woken before them
/// (a 19,000-peer fleet converged ~20 % slower). Ends at shutdown.
async fn write_task(shard: Rc<Shard>) {
    while !shard.ctx.is_shutting_down() {
        let wake = shard.write_wake.wait();
        let stop = shard.ctx.shutdown_event().wait();
        if shard.to_write.borrow().is_empty() {
            future::or(wake, stop).await;
            continue;
        }
        shard.write_listed();
        glommio::yield_if_needed().await;
    }
}

/// Sends SUBSCRIBE sync chunks, one per step, yielding between steps so the
/// shard's other peers keep being served during a large sync. Waits for a
/// wake-up (a chunk written, a new subscription) when no job can go on, and
/// also for the sync budget's next stall time while chunks out hold it.
async fn sync_pump(shard: Rc<Shard>) {
    loop {
        let wait = shard.sync_wake.wait();
        let mut out = Vec::new();
        let (progressed, budget_frees_at) = {
            let mut owner = shard.owner.borrow_mut();
            let progressed = owner.sync_step(&mut out);
            shard.ctx.counters().set_catch_ups(owner.catch_ups_active());
            let frees_at = owner
                .sync_waits_for_budget()
                .then(|| owner.sync_budget_frees_at())
                .flatten();
            (progressed, frees_at)
        };
        shard.route(out);
        if progressed {
            future::yield_now().await;
        } else if let Some(at) = budget_frees_at {
            // The budget is held by chunks not yet written: a report frees
            // it, or the oldest stops counting at `at` (its peer does not read).
            let sleep = glommio::timer::sleep(at.saturating_duration_since(Instant::now()));
            future::or(wait, sleep).await;
        } else {
            wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `task` returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_task: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A peer's session task is allocated once per connection and held for
    /// its life: at 10,000 idle peers every 100 bytes of it are 1 MiB of the
    /// server's memory (issue #15: under 60 MiB; it was 4,144 bytes, most
    /// of them state of paths an idle peer never takes, 1,128 since, 936
    /// with no timer and a 64-byte quiet read buffer, issue #28). The
    /// bound: with glommio's task header and schedule handle (48 bytes)
    /// the allocation stays in mimalloc's 1,024-byte size class; one byte
    /// more and every session costs 1,280. A change that grows it past the
    /// bound should box what it adds to a rare path (as `peer::run` does
    /// with its cleanup and withdrawals) instead.
    #[test]
    fn session_task_stays_small() {
        let size = future_size(Shard::peer_task);
        assert!(
            size <= 1024 - 48,
            "the session task of every peer is {size} bytes (bound {}): \
             10,000 idle peers hold 10,000 of them, so keep rare paths boxed",
            1024 - 48
        );
    }
}
