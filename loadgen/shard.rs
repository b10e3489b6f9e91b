//! One loadgen shard: a glommio executor on its own thread that runs the TCP
//! sessions of its share of the simulated peers (peer p lives on shard
//! p % shards) and carries out the controller's commands for them.
//!
//! ```text
//!  controller (main thread) --Command--> shard command loop (polls, 1 ms)
//!        ^                                  | connect / start / churn / verify
//!        +------------Reply-----------------+
//!  per peer: reader task  socket -> FrameDecoder -> PeerSession -> HeldRoutes
//!            writer task  out buffer (many frames) -> one write per wake-up
//!  per shard: ticker task  keepalives due and hold-timer expiry, every 100 ms
//! ```
//!
//! Owns: the sockets, the per-peer session state and received routes, the
//! per-shard latency histogram, and the shared counters it updates.
//!
//! Must never: block its thread (everything waits asynchronously, so the
//! other peers of the shard keep being read), build frames by hand (the codec
//! and `PeerSession` do that), or talk to anything but the configured server.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use glommio::task::JoinHandle;
use glommio::timer::sleep;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message, MessageType};
use metalbond_wire::session::{CloseReason, PeerSession, Reaction, Role};
use metalbond_wire::Action;

use crate::checker::{Difference, HeldRoutes};
use crate::connect::{connect, SourceAddrs};
use crate::plan::{PeerId, Plan, RouteId};

/// Settings and state every shard and the controller share.
pub struct Shared {
    /// The expected state of the run.
    pub plan: Plan,
    /// The server under test.
    pub server: SocketAddr,
    /// Keepalive interval offered in our HELLO.
    pub keepalive: Duration,
    /// Our HELLO says we read as a stream (`--go-hello` clears it).
    pub declare_stream: bool,
    /// Receive buffer per peer: larger reads fewer syscalls, smaller keeps
    /// 10,000 idle peers cheap.
    pub read_buf: usize,
    /// Connection attempts a shard has in flight at once (the server's
    /// accept backlog is finite).
    pub connect_concurrency: usize,
    /// Where each peer's connection comes from.
    pub sources: SourceAddrs,
    /// The run's time limit: nothing waits past it.
    pub deadline: Instant,
    /// Zero point of the send-time table.
    pub epoch: Instant,
    /// Per route: when it was last announced or withdrawn, in ns since
    /// `epoch`, plus one (0 = never). Read on receipt for the latency.
    pub sent_at: Vec<AtomicU64>,
    /// Live totals for convergence detection and progress lines.
    pub counters: Counters,
}

impl Shared {
    /// Nanoseconds since the epoch, the unit of `sent_at`.
    pub fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Totals over all shards. Relaxed atomics: they are only compared against
/// targets, and the final verdict comes from the per-peer check.
#[derive(Default)]
pub struct Counters {
    /// Sessions currently ESTABLISHED.
    pub established: AtomicUsize,
    /// Established sessions holding exactly what the plan says.
    pub satisfied: AtomicUsize,
    /// UPDATE ADDs received, all peers.
    pub adds: AtomicU64,
    /// UPDATE REMOVEs received, all peers.
    pub removes: AtomicU64,
    /// UPDATEs sent, all peers.
    pub sent_updates: AtomicU64,
    /// Sessions that ended without being asked to.
    pub lost: AtomicUsize,
    /// Failed connection attempts that were retried.
    pub connect_retries: AtomicU64,
}

/// What the controller asks a shard to do. Peer lists only ever hold peers
/// of that shard.
pub enum Command {
    /// Open sessions for these peers; with `start`, each sends its
    /// subscriptions and announcements as soon as it is established.
    Connect { peers: Vec<PeerId>, start: bool },
    /// Send subscriptions and/or announcements of established peers.
    Start {
        peers: Vec<PeerId>,
        subscribe: bool,
        announce: bool,
    },
    /// One peer sends these routes with this action, back to back.
    Announce {
        peer: PeerId,
        routes: Vec<RouteId>,
        action: Action,
    },
    /// Withdraw and re-announce this shard's single-announcer routes at
    /// `rate` updates/s for `duration`, at most `window` withdrawn at a
    /// time (each re-announced after `window` further withdrawals); at the
    /// end re-announce what is still withdrawn.
    Churn {
        rate: f64,
        duration: Duration,
        window: usize,
    },
    /// Close these peers' sessions on purpose (not counted as lost).
    Drop { peers: Vec<PeerId> },
    /// Hand over the latency histogram and start a new one.
    TakeLatency,
    /// Compare every peer with the plan.
    Verify,
    /// Close everything and stop the shard.
    Shutdown,
}

/// A shard's answer to one command.
pub enum Reply {
    /// The command is carried out.
    Done,
    /// Connect finished: these peers could not be established.
    Connected { failed: Vec<(PeerId, String)> },
    /// Churn finished: updates sent and the deliveries they must cause.
    Churned {
        sent: u64,
        expected_adds: u64,
        expected_removes: u64,
    },
    /// Announce-to-receipt latencies (ns) since the last `TakeLatency`.
    Latency(Box<Histogram<u64>>),
    /// Findings of the final check and the sessions still established.
    Verified {
        differences: Vec<Difference>,
        established: usize,
    },
}

/// Where a simulated peer's session is.
#[derive(Clone, PartialEq, Eq, Debug)]
enum PeerStatus {
    /// TCP is up, HELLO/KEEPALIVE exchange in progress.
    Handshaking,
    /// ESTABLISHED: routes flow.
    Established,
    /// Ended without being asked to (the reason is a finding).
    Lost(String),
    /// Closed on purpose by a `Drop` command.
    Dropped,
}

/// One simulated peer's live session on this shard.
struct LivePeer {
    /// Which peer of the plan this is.
    id: PeerId,
    /// Protocol state: handshake, keepalive schedule, hold timer.
    session: RefCell<PeerSession>,
    /// Routes received in this session, checked against the plan.
    held: RefCell<HeldRoutes>,
    /// Frames waiting for the writer task; many frames per write.
    out: RefCell<PeerWrites>,
    /// Wakes the writer task (capacity 1: one pending wake-up is enough).
    wake: LocalSender<()>,
    /// Where the session is.
    status: RefCell<PeerStatus>,
    /// Whether this peer is counted in `Counters::satisfied`.
    satisfied: Cell<bool>,
    /// Send subscriptions and announcements as soon as ESTABLISHED.
    start_on_established: bool,
    /// Reader and writer tasks, cancelled when the session is closed.
    tasks: RefCell<Vec<JoinHandle<()>>>,
}

/// Size at which route frames start a new segment of the out queue.
const SEGMENT: usize = 64 * 1024;

/// Frames waiting for one peer's writer. Session frames (HELLO, KEEPALIVE)
/// go ahead of route frames, which are kept in segments of whole frames: a
/// keepalive then waits for at most one segment, not behind a burst of a
/// million announcements (the server would hear no keepalive for the whole
/// burst and we would see no reply, and time out). Everything else keeps
/// its order (announcements before SUBSCRIBE, updates of one route in order).
#[derive(Default)]
struct PeerWrites {
    /// HELLO and KEEPALIVE frames, written first.
    urgent: Vec<u8>,
    /// SUBSCRIBE and UPDATE frames, in order, at most about `SEGMENT`
    /// bytes per segment.
    segments: VecDeque<Vec<u8>>,
}

impl PeerWrites {
    /// Appends one frame in its lane.
    fn push(&mut self, msg: &Message) {
        match msg {
            Message::Hello { .. } | Message::Keepalive => {
                encode_frame(msg, &mut self.urgent);
            }
            _ => {
                if self.segments.back().is_none_or(|s| s.len() >= SEGMENT) {
                    // Grows as needed: most peers queue a few frames, not 64 KiB.
                    self.segments.push_back(Vec::new());
                }
                if let Some(seg) = self.segments.back_mut() {
                    encode_frame(msg, seg);
                }
            }
        }
    }

    /// What to write next: all urgent frames, else the oldest segment.
    fn next_write(&mut self) -> Option<Vec<u8>> {
        if !self.urgent.is_empty() {
            return Some(std::mem::take(&mut self.urgent));
        }
        self.segments.pop_front()
    }
}

impl LivePeer {
    /// Queues one frame and wakes the writer.
    fn send(&self, msg: &Message) {
        self.out.borrow_mut().push(msg);
        // Full means a wake-up is already pending: nothing lost.
        let _ = self.wake.try_send(());
    }

    fn is_live(&self) -> bool {
        matches!(
            *self.status.borrow(),
            PeerStatus::Handshaking | PeerStatus::Established
        )
    }
}

/// The shard's own state, shared by its tasks.
struct Shard {
    /// Run-wide settings and counters.
    shared: Arc<Shared>,
    /// This shard's peers that have (had) a session, by id.
    peers: RefCell<HashMap<PeerId, Rc<LivePeer>>>,
    /// Peers whose connection could not be set up before the deadline.
    failed: RefCell<HashMap<PeerId, String>>,
    /// Announce-to-receipt latencies in ns.
    latency: RefCell<Histogram<u64>>,
    /// Set at shutdown so the ticker stops.
    stopping: Cell<bool>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 1 h with 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

/// Starts shard `index` on its own thread. It runs until `Shutdown` or until
/// the controller hangs up.
pub fn spawn(
    index: usize,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    replies: Sender<(usize, Reply)>,
) -> Result<glommio::ExecutorJoinHandle<()>, String> {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(&format!("loadgen-{index}"))
        // glommio's buffer pool serves file and UDP I/O only, and its 10 MiB
        // default is pinned per shard; TCP peers never use it.
        .io_memory(64 << 10)
        .spawn(move || async move {
            shard_main(index, shared, commands, replies).await;
        })
        .map_err(|e| format!("cannot start shard {index}: {e}"))
}

async fn shard_main(
    index: usize,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    replies: Sender<(usize, Reply)>,
) {
    let shard = Rc::new(Shard {
        shared,
        peers: RefCell::new(HashMap::new()),
        failed: RefCell::new(HashMap::new()),
        latency: RefCell::new(new_histogram()),
        stopping: Cell::new(false),
    });
    let ticker = glommio::spawn_local(tick_loop(shard.clone())).detach();
    loop {
        let cmd = match commands.try_recv() {
            Ok(cmd) => cmd,
            Err(TryRecvError::Empty) => {
                sleep(Duration::from_millis(1)).await;
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let stop = matches!(cmd, Command::Shutdown);
        let reply = handle(&shard, cmd).await;
        if replies.send((index, reply)).is_err() || stop {
            break;
        }
    }
    shard.stopping.set(true);
    ticker.cancel();
    let peers: Vec<Rc<LivePeer>> = shard.peers.borrow().values().cloned().collect();
    for peer in peers {
        close_peer(&shard, &peer, None);
    }
    // Let cancelled tasks drop their sockets before the executor goes away.
    sleep(Duration::from_millis(10)).await;
}

async fn handle(shard: &Rc<Shard>, cmd: Command) -> Reply {
    match cmd {
        Command::Connect { peers, start } => connect_all(shard, &peers, start).await,
        Command::Start {
            peers,
            subscribe,
            announce,
        } => {
            for p in peers {
                let peer = shard.peers.borrow().get(&p).cloned();
                if let Some(peer) = peer {
                    start_peer(shard, &peer, subscribe, announce);
                }
            }
            Reply::Done
        }
        Command::Announce {
            peer,
            routes,
            action,
        } => {
            let peer = shard.peers.borrow().get(&peer).cloned();
            if let Some(peer) = peer {
                send_updates(shard, &peer, &routes, action);
            }
            Reply::Done
        }
        Command::Churn {
            rate,
            duration,
            window,
        } => churn(shard, rate, duration, window).await,
        Command::Drop { peers } => {
            for p in peers {
                let peer = shard.peers.borrow().get(&p).cloned();
                if let Some(peer) = peer {
                    close_peer(shard, &peer, None);
                }
            }
            // Give the cancelled tasks a turn so the sockets really close now.
            sleep(Duration::from_millis(1)).await;
            Reply::Done
        }
        Command::TakeLatency => {
            let h = std::mem::replace(&mut *shard.latency.borrow_mut(), new_histogram());
            Reply::Latency(Box::new(h))
        }
        Command::Verify => verify(shard),
        Command::Shutdown => Reply::Done,
    }
}

/// Opens sessions for `peers`, a limited number of connects at a time, and
/// waits until each is ESTABLISHED, lost, or the deadline passes.
async fn connect_all(shard: &Rc<Shard>, peers: &[PeerId], start: bool) -> Reply {
    // A window of `concurrency` attempts, refilled as each one ends (not
    // chunks waited for whole: one slow attempt, a SYN retransmitted after
    // a second, held up the 63 behind it).
    let window = Rc::new(glommio::sync::Semaphore::new(
        shard.shared.connect_concurrency.max(1) as u64,
    ));
    let mut tasks = Vec::with_capacity(peers.len());
    for p in peers {
        let Ok(permit) = window.acquire_static_permit(1).await else {
            break; // the semaphore is never closed
        };
        let (shard, p) = (shard.clone(), *p);
        tasks.push(glommio::spawn_local(async move {
            connect_peer(shard, p, start).await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await;
    }
    loop {
        let pending = peers.iter().any(|p| {
            shard
                .peers
                .borrow()
                .get(p)
                .is_some_and(|peer| *peer.status.borrow() == PeerStatus::Handshaking)
        });
        if !pending || Instant::now() >= shard.shared.deadline {
            break;
        }
        sleep(Duration::from_millis(1)).await;
    }
    let mut failed = Vec::new();
    for p in peers {
        if let Some(reason) = shard.failed.borrow().get(p) {
            failed.push((*p, reason.clone()));
            continue;
        }
        match shard
            .peers
            .borrow()
            .get(p)
            .map(|peer| peer.status.borrow().clone())
        {
            Some(PeerStatus::Established) => {}
            Some(PeerStatus::Lost(reason)) => failed.push((*p, reason)),
            Some(PeerStatus::Handshaking) => {
                failed.push((*p, "handshake not finished by the time limit".into()))
            }
            Some(PeerStatus::Dropped) | None => failed.push((*p, "no session".into())),
        }
    }
    Reply::Connected { failed }
}

/// Connects one peer (retrying with backoff until the deadline: a busy
/// server's backlog may refuse some), sends HELLO and starts its tasks.
async fn connect_peer(shard: Rc<Shard>, p: PeerId, start: bool) {
    let shared = &shard.shared;
    let mut delay = Duration::from_millis(20);
    let stream = loop {
        let err = match connect(shared.server, p, shared.sources, Duration::from_secs(3)).await {
            Ok(s) => break s,
            Err(e) => e.to_string(),
        };
        if Instant::now() + delay >= shared.deadline {
            tracing::warn!(peer = p.0, "connect failed: {err}");
            shard
                .failed
                .borrow_mut()
                .insert(p, format!("connect failed: {err}"));
            return;
        }
        shared
            .counters
            .connect_retries
            .fetch_add(1, Ordering::Relaxed);
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    };
    shard.failed.borrow_mut().remove(&p);
    let _ = stream.set_nodelay(true);
    let (wake, wake_rx) = local_channel::new_bounded(1);
    let mut held = HeldRoutes::new(p);
    if shard.peers.borrow().contains_key(&p) {
        held.allow_own_echo();
    }
    let peer = Rc::new(LivePeer {
        id: p,
        session: RefCell::new(
            PeerSession::new(Role::Active, shared.keepalive, Instant::now())
                .declaring_stream(shared.declare_stream),
        ),
        held: RefCell::new(held),
        out: RefCell::new(PeerWrites::default()),
        wake,
        status: RefCell::new(PeerStatus::Handshaking),
        satisfied: Cell::new(false),
        start_on_established: start,
        tasks: RefCell::new(Vec::new()),
    });
    let hello = peer.session.borrow_mut().start();
    if let Some(hello) = hello {
        peer.send(&hello);
    }
    let (rd, wr) = futures_lite::io::split(stream);
    let reader = glommio::spawn_local(read_loop(shard.clone(), peer.clone(), rd)).detach();
    let writer =
        glommio::spawn_local(write_loop(shard.clone(), peer.clone(), wr, wake_rx)).detach();
    peer.tasks.borrow_mut().extend([reader, writer]);
    let old = shard.peers.borrow_mut().insert(p, peer);
    if let Some(old) = old {
        close_peer(&shard, &old, None);
    }
}

/// Ends a session. `reason: None` is a deliberate close; `Some` is a loss
/// that the final check reports.
fn close_peer(shard: &Shard, peer: &LivePeer, reason: Option<String>) {
    let was = peer.status.borrow().clone();
    if !matches!(was, PeerStatus::Handshaking | PeerStatus::Established) {
        return;
    }
    let c = &shard.shared.counters;
    if was == PeerStatus::Established {
        c.established.fetch_sub(1, Ordering::Relaxed);
    }
    if peer.satisfied.replace(false) {
        c.satisfied.fetch_sub(1, Ordering::Relaxed);
    }
    *peer.status.borrow_mut() = match reason {
        Some(r) => {
            tracing::warn!(peer = peer.id.0, "session lost: {r}");
            c.lost.fetch_add(1, Ordering::Relaxed);
            PeerStatus::Lost(r)
        }
        None => PeerStatus::Dropped,
    };
    peer.session.borrow_mut().close();
    for t in peer.tasks.borrow_mut().drain(..) {
        t.cancel();
    }
}

/// Re-evaluates whether the peer holds exactly its expected routes and
/// keeps the shared count in step.
fn update_satisfied(shard: &Shard, peer: &LivePeer) {
    let now = *peer.status.borrow() == PeerStatus::Established && peer.held.borrow().is_satisfied();
    if peer.satisfied.replace(now) != now {
        let c = &shard.shared.counters.satisfied;
        if now {
            c.fetch_add(1, Ordering::Relaxed);
        } else {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Sends the peer's SUBSCRIBEs and/or its announcements.
fn start_peer(shard: &Shard, peer: &LivePeer, subscribe: bool, announce: bool) {
    // Announcements go first: the SUBSCRIBE that follows then checks the
    // rule that a subscriber is never sent its own routes (the Go server
    // echoes them).
    let plan = &shard.shared.plan;
    if subscribe {
        peer.held.borrow_mut().mark_subscribed(plan);
    }
    if announce {
        send_updates(shard, peer, &plan.peer(peer.id).announcements, Action::Add);
    }
    if subscribe {
        for v in &plan.peer(peer.id).subscriptions {
            peer.send(&Message::Subscribe(*v));
        }
    }
    update_satisfied(shard, peer);
}

/// Queues UPDATEs for `routes` and stamps their send time.
fn send_updates(shard: &Shard, peer: &LivePeer, routes: &[RouteId], action: Action) {
    if !peer.is_live() {
        return;
    }
    let shared = &shard.shared;
    let stamp = shared.ns(Instant::now()) + 1;
    {
        let mut out = peer.out.borrow_mut();
        for r in routes {
            shared.sent_at[r.index()].store(stamp, Ordering::Relaxed);
            out.push(&Message::Update {
                action,
                route: *shared.plan.route(*r),
            });
        }
    }
    shared
        .counters
        .sent_updates
        .fetch_add(routes.len() as u64, Ordering::Relaxed);
    let _ = peer.wake.try_send(());
}

/// Reads the socket, decodes frames, drives the session and checks every
/// received route.
async fn read_loop(shard: Rc<Shard>, peer: Rc<LivePeer>, mut rd: ReadHalf<TcpStream>) {
    let mut buf = vec![0u8; shard.shared.read_buf];
    let mut decoder = FrameDecoder::new();
    loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => {
                close_peer(&shard, &peer, Some(CloseReason::PeerClosed.to_string()));
                return;
            }
            Ok(n) => n,
            Err(e) => {
                close_peer(&shard, &peer, Some(CloseReason::Io(e.into()).to_string()));
                return;
            }
        };
        decoder.extend(&buf[..n]);
        if let Err(reason) = on_frames(&shard, &peer, &mut decoder) {
            close_peer(&shard, &peer, Some(reason.to_string()));
            return;
        }
        // A socket that always has data would otherwise keep this task
        // running and starve the ticker (keepalives) and the other peers.
        glommio::yield_if_needed().await;
    }
}

/// Handles every complete frame buffered in `decoder`.
fn on_frames(
    shard: &Shard,
    peer: &LivePeer,
    decoder: &mut FrameDecoder,
) -> Result<(), CloseReason> {
    let shared = &shard.shared;
    let now = Instant::now();
    let now_ns = shared.ns(now) + 1;
    let (mut adds, mut removes) = (0u64, 0u64);
    let mut result = Ok(());
    {
        let mut held = peer.held.borrow_mut();
        let mut latency = shard.latency.borrow_mut();
        loop {
            let (msg_type, payload) = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    result = Err(CloseReason::Malformed(e.into()));
                    break;
                }
            };
            // Fast path: an UPDATE that is byte for byte the canonical
            // encoding of a planned route needs no protobuf decoding.
            let known = match msg_type {
                MessageType::Update => shared.plan.recognise(&payload),
                _ => None,
            };
            let msg = match known {
                Some((action, id)) => Message::Update {
                    action,
                    route: *shared.plan.route(id),
                },
                None => match Message::decode(msg_type, payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        result = Err(CloseReason::Malformed(e.into()));
                        break;
                    }
                },
            };
            let reaction = peer.session.borrow_mut().on_message(msg, now);
            match reaction {
                Err(reason) => {
                    result = Err(reason);
                    break;
                }
                Ok(Reaction::Nothing) => {}
                Ok(Reaction::Reply(m)) => peer.send(&m),
                Ok(Reaction::Established { reply }) => {
                    if let Some(m) = reply {
                        peer.send(&m);
                    }
                    *peer.status.borrow_mut() = PeerStatus::Established;
                    shared.counters.established.fetch_add(1, Ordering::Relaxed);
                    if peer.start_on_established {
                        drop(held);
                        drop(latency);
                        start_peer(shard, peer, true, true);
                        held = peer.held.borrow_mut();
                        latency = shard.latency.borrow_mut();
                    }
                }
                Ok(Reaction::Deliver(Message::Update { action, route })) => {
                    match action {
                        Action::Add => adds += 1,
                        Action::Remove => removes += 1,
                    }
                    let id = match known {
                        Some((_, id)) => {
                            held.apply_id(&shared.plan, action, id);
                            Some(id)
                        }
                        None => held.apply(&shared.plan, action, &route),
                    };
                    if let Some(id) = id {
                        let sent = shared.sent_at[id.index()].load(Ordering::Relaxed);
                        if sent != 0 && now_ns >= sent {
                            latency.saturating_record((now_ns - sent).max(1));
                        }
                    }
                }
                Ok(Reaction::Deliver(other)) => held.violation(Difference::Unexpected {
                    peer: peer.id,
                    what: other.message_type().name().to_string(),
                }),
            }
        }
    }
    let c = &shared.counters;
    if adds > 0 {
        c.adds.fetch_add(adds, Ordering::Relaxed);
    }
    if removes > 0 {
        c.removes.fetch_add(removes, Ordering::Relaxed);
    }
    update_satisfied(shard, peer);
    result
}

/// Writes whatever is queued, session frames first, route frames a segment
/// per write, until the session ends.
async fn write_loop(
    shard: Rc<Shard>,
    peer: Rc<LivePeer>,
    mut wr: WriteHalf<TcpStream>,
    wake: LocalReceiver<()>,
) {
    while wake.recv().await.is_some() {
        loop {
            let next = peer.out.borrow_mut().next_write();
            let Some(buf) = next else { break };
            if let Err(e) = wr.write_all(&buf).await {
                close_peer(&shard, &peer, Some(CloseReason::Io(e.into()).to_string()));
                return;
            }
        }
    }
}

/// Sends keepalives when due and closes sessions whose server went silent.
///
/// If this shard itself was too busy to tick on time, silence is not held
/// against the server in that round: the readers may not have had their
/// turn either, and a loss must be the server's, not the loadgen's.
async fn tick_loop(shard: Rc<Shard>) {
    const PERIOD: Duration = Duration::from_millis(100);
    let mut last = Instant::now();
    while !shard.stopping.get() {
        sleep(PERIOD).await;
        let now = Instant::now();
        let late = now.duration_since(last) > PERIOD * 5;
        if late {
            tracing::debug!(gap = ?now.duration_since(last), "ticker ran late");
        }
        last = now;
        let peers: Vec<Rc<LivePeer>> = shard.peers.borrow().values().cloned().collect();
        for peer in peers {
            if !peer.is_live() {
                continue;
            }
            let tick = peer.session.borrow_mut().on_tick(now);
            match tick {
                Ok(Some(m)) => peer.send(&m),
                Ok(None) => {}
                Err(_) if late => {}
                Err(reason) => close_peer(&shard, &peer, Some(reason.to_string())),
            }
        }
    }
}

/// Withdraws and re-announces this shard's single-announcer routes at
/// `rate` updates/s for `duration`: withdrawals walk the routes round robin,
/// and once `window` routes are withdrawn each further update re-announces
/// the oldest, so the offered load is an even mix of both. After
/// `duration` the still withdrawn routes (at most `window`) are re-announced
/// at the same rate, so the run ends in the planned state without a closing
/// burst that would dominate the latency figures.
async fn churn(shard: &Rc<Shard>, rate: f64, duration: Duration, window: usize) -> Reply {
    let plan = &shard.shared.plan;
    // Interleaved across peers (first route of every peer, then the second
    // ...) so consecutive updates hit different peers and VNIs.
    let mut targets: Vec<(Rc<LivePeer>, RouteId)> = Vec::new();
    {
        let peers = shard.peers.borrow();
        let mut ids: Vec<&PeerId> = peers.keys().collect();
        ids.sort();
        let lists: Vec<(Rc<LivePeer>, Vec<RouteId>)> = ids
            .iter()
            .map(|p| (peers[*p].clone(), plan.single_announcer_routes(**p)))
            .collect();
        let longest = lists.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
        for k in 0..longest {
            for (peer, list) in &lists {
                if let Some(r) = list.get(k) {
                    targets.push((peer.clone(), *r));
                }
            }
        }
    }
    let mut state = ChurnState {
        announced: vec![true; targets.len()],
        ..ChurnState::default()
    };
    let n = targets.len();
    let window = window.clamp(1, n.max(1));
    if n > 0 && rate > 0.0 {
        let start = Instant::now();
        let end = start + duration;
        let mut cursor = 0usize;
        let mut withdrawn: VecDeque<usize> = VecDeque::with_capacity(window);
        loop {
            let now = Instant::now();
            let closing = now >= end;
            if (closing && withdrawn.is_empty()) || now >= shard.shared.deadline {
                break;
            }
            let due = (rate * now.duration_since(start).as_secs_f64()) as u64;
            while state.sent < due {
                let i = cursor % n;
                if closing && withdrawn.is_empty() {
                    break;
                }
                if closing || withdrawn.len() >= window || !state.announced[i] {
                    // Re-announce the route withdrawn longest ago.
                    match withdrawn.pop_front() {
                        Some(j) => {
                            state.flip(shard, &targets, j);
                        }
                        None => {
                            cursor += 1;
                            state.sent += 1;
                        }
                    }
                } else {
                    if state.flip(shard, &targets, i) {
                        withdrawn.push_back(i);
                    }
                    cursor += 1;
                }
            }
            sleep(Duration::from_millis(1)).await;
        }
        for i in 0..n {
            if !state.announced[i] {
                state.flip(shard, &targets, i);
            }
        }
    }
    let ChurnState {
        sent,
        expected_adds,
        expected_removes,
        ..
    } = state;
    Reply::Churned {
        sent,
        expected_adds,
        expected_removes,
    }
}

/// Progress of one shard's churn.
#[derive(Default)]
struct ChurnState {
    /// Per churned route: currently announced?
    announced: Vec<bool>,
    /// UPDATEs sent.
    sent: u64,
    /// ADD deliveries the re-announcements must cause.
    expected_adds: u64,
    /// REMOVE deliveries the withdrawals must cause.
    expected_removes: u64,
}

impl ChurnState {
    /// Withdraws target `i` if announced, re-announces it otherwise.
    /// Returns false when its peer's session is gone (nothing sent).
    fn flip(&mut self, shard: &Shard, targets: &[(Rc<LivePeer>, RouteId)], i: usize) -> bool {
        let (peer, r) = &targets[i];
        if !peer.is_live() {
            // Count it as done so the rate loop cannot spin on dead peers.
            self.sent += 1;
            return false;
        }
        let fanout = shard.shared.plan.fanout(*r) as u64;
        if self.announced[i] {
            send_updates(shard, peer, &[*r], Action::Remove);
            self.expected_removes += fanout;
        } else {
            send_updates(shard, peer, &[*r], Action::Add);
            self.expected_adds += fanout;
        }
        self.announced[i] = !self.announced[i];
        self.sent += 1;
        true
    }
}

/// The final check of this shard's peers.
fn verify(shard: &Shard) -> Reply {
    let plan = &shard.shared.plan;
    let mut differences = Vec::new();
    let mut established = 0;
    let peers = shard.peers.borrow();
    let mut ids: Vec<&PeerId> = peers.keys().collect();
    ids.sort();
    for p in ids {
        let peer = &peers[p];
        match &*peer.status.borrow() {
            PeerStatus::Established => established += 1,
            PeerStatus::Lost(reason) => differences.push(Difference::SessionLost {
                peer: *p,
                reason: reason.clone(),
            }),
            PeerStatus::Handshaking => differences.push(Difference::SessionLost {
                peer: *p,
                reason: "handshake never finished".into(),
            }),
            PeerStatus::Dropped => {}
        }
        differences.extend(peer.held.borrow().differences(plan));
    }
    for (p, reason) in shard.failed.borrow().iter() {
        differences.push(Difference::SessionLost {
            peer: *p,
            reason: reason.clone(),
        });
    }
    Reply::Verified {
        differences,
        established,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::Vni;

    fn decode_all(bufs: &[Vec<u8>]) -> Vec<Message> {
        let mut d = FrameDecoder::new();
        for b in bufs {
            d.extend(b);
        }
        let mut out = Vec::new();
        while let Some(m) = d.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn keepalives_overtake_queued_route_frames_by_at_most_one_segment() {
        let plan = Plan::burst(1, 10_000);
        let mut q = PeerWrites::default();
        for r in 0..10_000 {
            q.push(&Message::Update {
                action: Action::Add,
                route: *plan.route(RouteId(r)),
            });
        }
        q.push(&Message::Subscribe(Vni::new(100).unwrap()));
        assert!(q.segments.len() > 3, "{} segments", q.segments.len());
        // The writer takes one segment, then a keepalive is queued: it is
        // the next write.
        let first = q.next_write().unwrap();
        q.push(&Message::Keepalive);
        let second = q.next_write().unwrap();
        assert_eq!(
            decode_all(std::slice::from_ref(&second)),
            vec![Message::Keepalive]
        );
        // Route frames keep their order and every segment holds whole frames.
        let mut rest = vec![first];
        while let Some(b) = q.next_write() {
            assert!(b.len() <= SEGMENT + 256);
            assert!(!decode_all(std::slice::from_ref(&b)).is_empty());
            rest.push(b);
        }
        let msgs = decode_all(&rest);
        assert_eq!(msgs.len(), 10_001);
        for (i, m) in msgs[..10_000].iter().enumerate() {
            assert_eq!(
                *m,
                Message::Update {
                    action: Action::Add,
                    route: *plan.route(RouteId(i as u32))
                }
            );
        }
        assert_eq!(msgs[10_000], Message::Subscribe(Vni::new(100).unwrap()));
    }
}
