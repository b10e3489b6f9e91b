//! The route reflector: thread-per-core shards, one owner shard per VNI.
//!
//! Owns: starting and stopping the shards (`Server::start`, `ServerHandle`),
//! the `metalbond server` entry point (`run`) and the public API the HTTP,
//! metrics and load-generator work builds on (config, counters, snapshots).
//!
//! ```text
//!  listener(s): accept loop (accept.rs) on shard k % N hands connections
//!  round-robin to the shards, where they stay for life
//!            │
//!  ┌─ shard i: glommio executor pinned to a CPU ───────────────────────────┐
//!  │ peer task (peer.rs), one per connection, in the peer's span           │
//!  │   reader: socket → FrameDecoder → PeerSession ──OwnerInput──┐         │
//!  │   writer (connection.rs): OutQueue (shared frames, sync chunks)       │
//!  │           → sendmsg(iovec)  ▲                                ▼        │
//!  │                             │ ShardDelivery     ShardOutbox[owner(vni)]    │
//!  │ deliver ────────────────────┘                           │             │
//!  │   ▲                                  flusher per dest:  │ whole batch │
//!  │   │                                                     ▼             │
//!  │ receive task per source ◀──── bounded SPSC channels ────▶ other shards│
//!  │   │ OwnerInput                                                        │
//!  │   ▼                                                                   │
//!  │ shard.rs — VniOwner (VNIs with vni % N == i): VniTable per VNI;       │
//!  │   FanoutBuilder                                                       │
//!  │   encodes each change once → one ShardDelivery per shard with subscribers; │
//!  │   sync pump: SUBSCRIBE scans in chunks, two chunks in flight          │
//!  │ control loop: stats / routes / peers snapshots, shutdown              │
//!  └───────────────────────────────────────────────────────────────────────┘
//! ```
//! A change from a peer on shard A for VNI v goes A → owner(v) → every shard
//! with live subscribers of v, as one shared buffer per shard; each
//! subscriber's writer sends it with vectored writes, minus the frames the
//! subscriber originated itself.
//!
//! Must never: block a shard thread, or let one peer's slowness grow memory
//! or stall others (see `out_queue`).

#![deny(missing_docs)]

mod accept;
mod admission;
mod catch_up;
mod chunk_map;
mod config;
mod connection;
mod context;
mod fanout;
mod grace;
mod host;
mod listener_keys;
mod local_event;
mod mesh;
mod out_queue;
mod owner;
mod peer;
mod peer_id;
mod route_set;
mod session_clock;
mod shard;
mod snapshot;
mod status_source;
mod sync_budget;
mod update_budget;
mod vni_map;
mod vni_table;

/// The VNI owner's table and fan-out logic without shards or sockets, as
/// `benches/fanout.rs` drives it to measure encode-once fan-out. Not a
/// stable API: it changes with the implementation.
pub mod owner_logic {
    pub use super::owner::{OwnerInput, ShardDelivery, VniOwner};
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};

pub use config::{PeerLimits, ServerConfig, ServerError};
pub use peer_id::PeerId;
pub use snapshot::{
    DisconnectCounts, PeerInfo, RoutePage, RouteQuery, ServerStats, ShardStats, VniRoutes,
    VniSummary,
};
pub use status_source::{ServerStatusSource, VNI_COUNTS_MAX_AGE};
pub use vni_table::AnnouncedRoute;

use mesh::{Batch, CHANNEL_BATCHES};
use shard::{Control, ShardSetup};
use snapshot::ShardCounters;

/// Entry point for starting a server in-process.
pub struct Server;

impl Server {
    /// Binds every listen address, starts the shards and returns once all of
    /// them serve. Errors name the cause (address in use, io_uring missing...).
    pub fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        config.validate()?;
        host::probe_io_uring()?;
        let n = config.shards;
        let (listeners, addrs) = bind_all(&config.listen)?;
        let keys = config
            .policy
            .as_ref()
            .map_or_else(Vec::new, |p| p.current().md5_keys());
        // Keys before listen(): the kernel completes handshakes into the
        // backlog as soon as a socket listens, so a peer of a keyed rule
        // connecting in between would be accepted unsigned.
        let listener_keys = listener_keys::ListenerKeys::install(&listeners, &addrs, keys)?;
        listen_all(&listeners, &addrs)?;
        let (senders, receivers) = shard_mesh(n);
        let config = Arc::new(config);
        // Listeners are spread over the shards; each remembers its place in
        // the round-robin of accepted connections.
        let mut shard_listeners: Vec<Vec<(std::net::TcpListener, usize)>> =
            (0..n).map(|_| Vec::new()).collect();
        for (k, l) in listeners.into_iter().enumerate() {
            shard_listeners[k % n].push((l, k));
        }
        let cpus = host::allowed_cpu_ids();
        let admission = admission::Admission::new(config.max_peers);
        let ghosts = Arc::new(grace::GhostIndex::new(n));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut handle = ServerHandle {
            addrs,
            controls: Vec::new(),
            threads: Vec::new(),
            counters: Vec::new(),
            ghosts: ghosts.clone(),
            config: config.clone(),
            listener_keys,
        };
        let shard_inputs = senders
            .into_iter()
            .zip(receivers)
            .zip(shard_listeners)
            .enumerate();
        for (index, ((senders, receivers), listeners)) in shard_inputs {
            let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
            let counters = Arc::new(ShardCounters::default());
            let setup = ShardSetup {
                index,
                config: config.clone(),
                listeners,
                senders,
                receivers,
                control: ctl_rx,
                counters: counters.clone(),
                admission: admission.clone(),
                ghosts: ghosts.clone(),
                ready: ready_tx.clone(),
            };
            let placement = if config.pin_cpus {
                Placement::Fixed(cpus[index % cpus.len()])
            } else {
                Placement::Unbound
            };
            match spawn_shard(index, placement, setup) {
                Ok(t) => {
                    handle.controls.push(ctl_tx);
                    handle.threads.push(t);
                    handle.counters.push(counters);
                }
                Err(e) => {
                    handle.abandon();
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        if let Err(failure) = await_shards(n, &ready_rx) {
            handle.abandon();
            return Err(failure);
        }
        tracing::info!(
            addrs = ?handle.addrs,
            shards = n,
            keepalive = ?handle.config.keepalive,
            "route reflector listening"
        );
        Ok(handle)
    }
}

/// Binds every address of `--listen` (v6-only when there are several);
/// returns the sockets, not yet listening (`listen_all`), and the addresses
/// they got (a port 0 resolved).
fn bind_all(
    listen: &[SocketAddr],
) -> Result<(Vec<std::net::TcpListener>, Vec<SocketAddr>), ServerError> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for addr in listen {
        let l = bind(*addr, listen.len() > 1)?;
        addrs.push(l.local_addr().map_err(|source| ServerError::Listen {
            addr: *addr,
            source,
        })?);
        listeners.push(l);
    }
    Ok((listeners, addrs))
}

/// Starts every bound socket listening.
fn listen_all(
    listeners: &[std::net::TcpListener],
    addrs: &[SocketAddr],
) -> Result<(), ServerError> {
    for (l, addr) in listeners.iter().zip(addrs) {
        // A region's hypervisors reconnect at once after a reflector
        // restart: a connection the backlog has no room for waits for its
        // SYN's retransmission (1 s, then 3 s). 4096 is the kernel's
        // default cap (net.core.somaxconn); 1024 overflowed at ~19,500
        // peers connecting.
        socket2::SockRef::from(l)
            .listen(LISTEN_BACKLOG)
            .map_err(|source| ServerError::Listen {
                addr: *addr,
                source,
            })?;
    }
    Ok(())
}

/// Per shard, its senders to every other shard and its receivers from
/// them.
type ShardMesh = (
    Vec<Vec<Option<shared_channel::SharedSender<Batch>>>>,
    Vec<Vec<shared_channel::SharedReceiver<Batch>>>,
);

/// One bounded channel per ordered pair of `n` shards: `senders[from][to]`
/// (none to itself) and `receivers[to]`.
fn shard_mesh(n: usize) -> ShardMesh {
    let mut senders: Vec<Vec<Option<shared_channel::SharedSender<Batch>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<shared_channel::SharedReceiver<Batch>>> =
        (0..n).map(|_| Vec::new()).collect();
    for (from, row) in senders.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(CHANNEL_BATCHES);
                *slot = Some(tx);
                receivers[to].push(rx);
            }
        }
    }
    (senders, receivers)
}

/// Starts shard `index`'s thread and executor; it reports on
/// `setup.ready` once it serves, or why it could not start.
fn spawn_shard(
    index: usize,
    placement: Placement,
    setup: ShardSetup,
) -> Result<std::thread::JoinHandle<()>, ServerError> {
    std::thread::Builder::new()
        .name(format!("mb-shard-{index}"))
        .spawn(move || {
            let ready = setup.ready.clone();
            // glommio panics (rather than failing) on some ring set-up
            // errors: turn that into a start-up error too.
            let made = metalbond_utils::panic_policy::catch_expected(|| {
                LocalExecutorBuilder::new(placement)
                    .name(&format!("mb-shard-{index}"))
                    .io_memory(SHARD_IO_MEMORY)
                    .ring_depth(SHARD_RING_DEPTH)
                    .make()
            });
            match made {
                Ok(Ok(ex)) => ex.run(shard::run(setup)),
                Ok(Err(e)) => {
                    let reason = format!("cannot create executor: {e}{}", memlock_hint(&e));
                    let _ = ready.send(Err((index, reason)));
                }
                Err(_) => {
                    let _ = ready.send(Err((
                        index,
                        "cannot create executor: glommio panicked (see above)".into(),
                    )));
                }
            }
        })
        .map_err(|e| ServerError::Shard {
            shard: index,
            reason: format!("cannot spawn thread: {e}"),
        })
}

/// Waits until all `n` shards report that they serve (30 s at most); the
/// first failure names its shard.
fn await_shards(
    n: usize,
    ready: &std::sync::mpsc::Receiver<Result<(), (usize, String)>>,
) -> Result<(), ServerError> {
    for _ in 0..n {
        match ready.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err((shard, reason))) => return Err(ServerError::Shard { shard, reason }),
            Err(_) => {
                return Err(ServerError::Shard {
                    shard: 0,
                    reason: "shards did not report ready in time".into(),
                })
            }
        }
    }
    Ok(())
}

/// Binds a socket to listen on (`listen_all` starts it): SO_REUSEADDR, and
/// v6-only for IPv6 when several addresses are given (so `[::]:4711` and
/// `0.0.0.0:4711` can coexist).
fn bind(addr: SocketAddr, v6_only: bool) -> Result<std::net::TcpListener, ServerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| ServerError::Listen { addr, source };
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    if addr.is_ipv6() && v6_only {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

/// A running server: its addresses, counters and snapshots; shuts it down.
/// Dropping the handle shuts the server down too.
pub struct ServerHandle {
    /// Bound addresses, in `ServerConfig::listen` order.
    addrs: Vec<SocketAddr>,
    /// Control channel of each shard.
    controls: Vec<crossbeam_channel::Sender<Control>>,
    /// Shard threads, joined on shutdown.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Counters of each shard.
    counters: Vec<Arc<ShardCounters>>,
    /// Departed peers' held routes (`--peer-grace`), for the gauge.
    ghosts: Arc<grace::GhostIndex>,
    /// The configuration the server runs with.
    config: Arc<ServerConfig>,
    /// TCP-MD5 keys of the policy's `auth` rules on the listening sockets.
    listener_keys: listener_keys::ListenerKeys,
}

/// The fix for glommio's refusal to start under a small RLIMIT_MEMLOCK
/// (`MemLockLimit(have/need)`, need 512 KiB), which hits unprivileged
/// servers under old defaults (64 KiB); empty for every other error.
fn memlock_hint(e: &glommio::GlommioError<()>) -> &'static str {
    if e.to_string().contains("MemLockLimit") {
        "; raise the locked-memory limit to at least 512 KiB (ulimit -l, systemd LimitMEMLOCK=, docker run --ulimit memlock=)"
    } else {
        ""
    }
}

/// glommio's pre-registered buffer pool per executor. It serves file
/// (DMA) and UDP I/O only; our TCP sockets never draw from it, and
/// glommio's 10 MiB default is pinned memory on every shard. 64 KiB is
/// glommio's minimum.
const SHARD_IO_MEMORY: usize = 64 << 10;
/// Submission entries of each of a shard's io_uring rings (glommio's
/// default is 128). The kernel sizes a ring's table of cancellable
/// requests from it (2^(log2(completion entries) − 5) hash buckets, at
/// most 256), and every pending socket read is such a request: with 128
/// there were 8 buckets for 10,000s of idle sessions, and each
/// cancellation glommio submits walked thousands of them: 45 % of the server's CPU while
/// 19,500 peers connected, which took 8–23 s instead of 4–5 (issue #28).
/// 2048 gives 128 buckets, for ~1 MiB of ring memory per shard.
const SHARD_RING_DEPTH: usize = 2048;
/// Pending connections the listening socket queues (see `listen_socket`).
const LISTEN_BACKLOG: i32 = 4096;

/// How long a snapshot request waits for a shard.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

impl ServerHandle {
    /// The actually bound addresses (a port 0 in the config is resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The server's readiness line (systemd `STATUS=` and `/readyz`): a
    /// handle exists only once every shard is up and every listener
    /// accepts, so a server that has one is ready.
    pub fn ready_line(&self) -> String {
        format!("listening on {:?}", self.local_addrs())
    }

    /// The configuration in effect.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Per-shard counters (atomics: never waits for the shards).
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            shards: self
                .counters
                .iter()
                .enumerate()
                .map(|(i, c)| c.snapshot(i, self.ghosts.routes_of(i) as u64))
                .collect(),
        }
    }

    /// The route table: per VNI (sorted) its (destination, next hop) list.
    /// Asks each shard for the VNIs it owns; each shard answers between two
    /// tasks, so the cost is one table copy.
    pub fn routes(&self) -> Vec<VniRoutes> {
        let mut all: Vec<VniRoutes> = self.ask(Control::Routes).into_iter().flatten().collect();
        all.sort_by_key(|v| v.vni);
        all
    }

    /// Every VNI with routes or subscribers: route and subscriber counts and
    /// the route-set digest, ascending by VNI. Each shard answers from its
    /// tables' fields, without scanning routes.
    pub fn vni_summaries(&self) -> Vec<VniSummary> {
        let mut all: Vec<VniSummary> = self.ask(Control::Summary).into_iter().flatten().collect();
        all.sort_by_key(|v| v.vni);
        all
    }

    /// The routes of `vni` that `query` selects, from the VNI's owner shard
    /// only (one page of work there); `None` when no shard holds a table
    /// for `vni` (no routes, no subscribers) or the shard did not answer.
    pub fn route_query(
        &self,
        vni: metalbond_wire::types::Vni,
        query: RouteQuery,
    ) -> Option<RoutePage> {
        let owner = self
            .controls
            .get(vni.get() as usize % self.controls.len().max(1))?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        owner.send(Control::RouteQuery(vni, query, tx)).ok()?;
        rx.recv_timeout(SNAPSHOT_TIMEOUT).ok().flatten()
    }

    /// Fan-out latency over all shards: from the owner taking the first
    /// change of a batch to that batch being written to a subscriber's
    /// socket, one observation per (batch, subscriber). Atomics only.
    pub fn fanout_latency(&self) -> metalbond_telemetry::HistogramView {
        let mut view = metalbond_telemetry::HistogramView::empty();
        for c in &self.counters {
            c.fanout_latency_into(&mut view);
        }
        view
    }

    /// Every connected peer (sorted by shard, then address).
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut all: Vec<PeerInfo> = self.ask(Control::Peers).into_iter().flatten().collect();
        all.sort_by_key(|p| (p.shard, p.addr));
        all
    }

    fn ask<T>(&self, make: impl Fn(crossbeam_channel::Sender<T>) -> Control) -> Vec<T> {
        let mut replies = Vec::new();
        let mut pending = Vec::new();
        for c in &self.controls {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if c.send(make(tx)).is_ok() {
                pending.push(rx);
            }
        }
        for rx in pending {
            if let Ok(r) = rx.recv_timeout(SNAPSHOT_TIMEOUT) {
                replies.push(r);
            }
        }
        replies
    }

    /// The peer policy (`--policy`), if any: status and counters.
    pub fn policy(&self) -> Option<&Arc<metalbond_policy::PolicyStore>> {
        self.config.policy.as_ref()
    }

    /// Re-reads the `--policy` file. On success every peer resolves its rule
    /// again (routes it no longer allows are withdrawn, subscriptions it no
    /// longer allows dropped); on failure the running policy stays and the
    /// error names the place in the file. `Ok(None)`: no policy configured.
    pub fn reload_policy(&self) -> Result<Option<u64>, metalbond_policy::PolicyError> {
        let Some(store) = &self.config.policy else {
            return Ok(None);
        };
        let policy = store.reload()?;
        // Keys first: a session the reload closes for a changed key must
        // find the new key when it reconnects.
        if let Err((prefix, addr, e)) = self.listener_keys.apply(policy.md5_keys()) {
            tracing::error!(
                peers = %prefix,
                listen = %addr,
                "cannot install the TCP-MD5 key of the reloaded policy: {e}"
            );
        }
        for c in &self.controls {
            let _ = c.send(Control::PolicyReloaded);
        }
        Ok(Some(store.generation()))
    }

    /// Closes listeners and every peer, stops the shards and joins them.
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        for c in &self.controls {
            let _ = c.send(Control::Shutdown);
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a shard thread panicked");
            }
        }
        self.controls.clear();
    }

    /// Startup failed part-way: tell started shards to stop but do not wait
    /// for them (they may be waiting on a shard that never started).
    fn abandon(&mut self) {
        for c in &self.controls {
            let _ = c.send(Control::Shutdown);
        }
        self.controls.clear();
        self.threads.clear();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}
