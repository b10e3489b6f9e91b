//! The netlink thread: installs the client's present routes as kernel routes.
//!
//! Owns: one thread with one rtnetlink socket (opened in the caller's network
//! namespace), the desired route set per (table, prefix), coalescing of
//! changes, start-up checks (tunnel device, CAP_NET_ADMIN, a probe nexthop
//! object), at start either the take-over (`stale_hold`) or the deletion of
//! the protocol-254 routes (whatever their form: our IPv4 multipath and IPv6
//! `nhid` routes, an earlier version's IPv4 `nhid` routes, the Go client's
//! routes) and protocol-254 nexthop objects an earlier run left, the sweep
//! of taken-over routes nobody refreshed,
//! the health check (nexthop objects flushed, tunnel device bounced), the
//! periodic read-back that puts back routes deleted or changed by hand
//! (`reconcile`), and `--cleanup` at exit. Counters for `/metrics` live in
//! `counters`. Table 0 in the configuration means the main table (254), and
//! there, as in every table, only protocol-254 routes are ever touched.
//!
//! Must never: block the caller on the kernel. `KernelRouteSink::add`/`remove`
//! only update the desired set under a short lock and wake the netlink thread; a burst
//! of changes to one prefix costs the kernel one route message. Memory is
//! bounded by the number of present routes, never by churn.
//!
//! ```text
//!  session threads ──add/remove──> DesiredRoutes (Mutex: per key next-hop
//!    (RouteSink)                   counts + dirty keys) ──wake (bounded 1)──┐
//!                                                                           v
//!                    kernel <──batches, acks── netlink thread: take dirty keys,
//!                                              InstalledRoutes::apply, report
//!                                              applied generation (flush)
//! ```
//!
//! Mapping: a present route (VNI, prefix, next hop) becomes next hop
//! `encap ip6 dst <target> dev <tun>` of route `prefix` in the VNI's table:
//! for IPv4 prefixes inline in the route (the Go client's multipath form, so
//! its start-up cleanup can delete our routes after a rollback), for IPv6
//! prefixes through a shared nexthop object (`nhid`). Several present routes
//! with the same target address (e.g. NAT ranges) are one kernel next hop.
//! Routes of unmapped VNIs are logged once.

#![deny(missing_docs)]

mod counters;
#[cfg(test)]
mod fake_kernel;
mod link;
mod nexthop;
mod routes;
mod socket;
mod state;
mod status;
mod walk;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};

pub use counters::KernelRouteStats;
use counters::NetlinkCounters;
use metalbond_utils::{wait_timeout_or_recover, LockOrRecover};
use metalbond_wire::types::{NextHop, Vni};
use nexthop::{NexthopMessage, AF_INET6, RTM_DELNEXTHOP, RTM_GETNEXTHOP, RTM_NEWNEXTHOP};
pub use routes::{KernelTable, PROTOCOL_METALBOND};

use link::KernelLink;
use routes::{RTM_GETROUTE, RTM_NEWROUTE};
pub use socket::KernelError;
use socket::{Request, RouteSocket};
use state::InstalledRoutes;
pub use state::{ApplyReport, RouteChange, RouteKey};
pub use status::KernelStatus;

/// What the netlink thread needs to know, from `--install-routes`, `--tun`,
/// `--ipv4-only` and `--cleanup`.
#[derive(Clone, Debug)]
pub struct KernelRoutesConfig {
    /// VNI → routing table. Routes of other VNIs are not installed.
    /// `KernelTable(0)` is taken as the main table (254).
    pub tables: BTreeMap<Vni, KernelTable>,
    /// Name of the tunnel device every next hop leaves through.
    pub device: String,
    /// Skip IPv6 destinations.
    pub ipv4_only: bool,
    /// Delete our routes and nexthop objects when the netlink thread shuts down.
    pub cleanup_on_exit: bool,
    /// How often our tables are read back from the kernel and routes of
    /// ours that someone deleted (`ip route del`, `ip route flush table`)
    /// are put back. `DEFAULT_RECONCILE_INTERVAL` unless a test wants it
    /// sooner: each pass dumps the kernel's routes.
    pub reconcile_interval: Duration,
    /// `Some(hold)`: routes and nexthop objects an earlier run (this
    /// client, an earlier version or the Go client) left in our tables are
    /// taken over as *stale* at start instead of deleted: they stay in the
    /// kernel, a present route with the same prefix refreshes them (no
    /// delete, at most a replace), and those still not refreshed `hold`
    /// after the start are deleted. `None`: deleted at start.
    pub stale_hold: Option<Duration>,
}

/// Stand-in for a `stale_hold` too long for the clock: a year.
const MAX_STALE_HOLD: Duration = Duration::from_secs(365 * 86_400);

/// Default `KernelRoutesConfig::reconcile_interval`: hand-deleted routes
/// are back within half a minute, and a host with 100,000 routes spends a
/// dump on it twice a minute, not every few seconds.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = metalbond_wire::defaults::RECONCILE_INTERVAL;

/// Why the netlink thread could not start (or stop cleanly). Start-up problems are
/// found before the first route, with the cause named.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// `--tun` names no device in this network namespace.
    #[error("tunnel device '{0}' does not exist (create it with: ip link add {0} type ip6tnl mode any external)")]
    NoSuchDevice(String),
    /// Installing routes needs CAP_NET_ADMIN.
    #[error("installing kernel routes needs CAP_NET_ADMIN, which this process does not have")]
    MissingCapability,
    /// The rtnetlink socket failed.
    #[error("rtnetlink socket: {0}")]
    Socket(#[from] io::Error),
    /// The kernel refused a test nexthop object on the device.
    #[error("kernel refused a nexthop object 'encap ip6 dst ... dev {device}': {error}")]
    Probe {
        /// The tunnel device.
        device: String,
        /// What the kernel said.
        error: KernelError,
    },
    /// The netlink thread is gone (it panicked).
    #[error("netlink thread stopped unexpectedly")]
    ThreadGone,
}

/// Desired kernel state, written by sinks and taken by the netlink thread.
#[derive(Default)]
struct DesiredRoutes {
    /// Per route: underlay address → how many present routes use it.
    routes: HashMap<RouteKey, BTreeMap<Ipv6Addr, u32>>,
    /// Keys changed since the netlink thread last looked.
    dirty: HashSet<RouteKey>,
    /// Bumped on every change; `flush` waits for the netlink thread to reach it.
    generation: u64,
    /// Set by shutdown: the netlink thread exits after its current batch.
    shutdown: bool,
}

/// Routes taken over at start that no present route has refreshed yet.
struct StaleRoutes {
    /// The taken-over routes (refreshed ones are filtered out at the sweep).
    keys: Vec<RouteKey>,
    /// When the ones not refreshed are deleted.
    sweep_at: Instant,
}

/// Shared between the handle, the sinks and the netlink thread.
struct Shared {
    /// What we want in the kernel.
    desired: Mutex<DesiredRoutes>,
    /// What the kernel acknowledged (locked by the netlink thread while applying).
    installed: Mutex<InstalledRoutes>,
    /// Generation of `desired` the kernel has caught up with.
    applied: Mutex<u64>,
    /// Signalled whenever `applied` moves.
    applied_changed: Condvar,
    /// Wakes the netlink thread; capacity 1, a full channel already means "wake".
    wake: Sender<()>,
    /// VNI → table and family filter, for the sinks.
    config: KernelRoutesConfig,
    /// VNIs / addresses we already warned about (logged once).
    warned: Mutex<HashSet<String>>,
    /// Netlink verdicts per operation and the pending count, for `/metrics`.
    counters: Arc<NetlinkCounters>,
    /// Taken over at start, waiting for the sweep (`stale_hold`).
    stale: Mutex<Option<StaleRoutes>>,
}

impl Shared {
    /// Marks `keys` for the netlink thread's next batch (a retry, a re-install) and
    /// wakes it; keeps the pending-routes gauge in step.
    fn mark_dirty(&self, keys: impl IntoIterator<Item = RouteKey>) {
        let mut desired = lock(&self.desired);
        desired.dirty.extend(keys);
        self.counters.set_pending(desired.dirty.len());
        drop(desired);
        let _ = self.wake.try_send(());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock_or_recover()
}

/// Handle of the running netlink thread. Dropping it shuts the thread down (running
/// `--cleanup` if configured).
pub struct KernelRoutes {
    /// State shared with the thread and the sinks.
    shared: Arc<Shared>,
    /// The netlink thread, joined on shutdown.
    thread: Option<JoinHandle<()>>,
}

/// Feeds present-route changes to the netlink thread. Cheap to clone; never blocks
/// on the kernel.
#[derive(Clone)]
pub struct KernelRouteSink {
    /// The netlink thread's shared state.
    shared: Arc<Shared>,
}

/// The client's sink for kernel routes: `Client::new(config, kernel.sink())`
/// installs what the client holds present.
impl metalbond_client::RouteSink for KernelRouteSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.add(vni, destination, &next_hop);
    }

    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        self.remove(vni, destination, &next_hop);
    }
}

impl KernelRoutes {
    /// Checks the device and privileges, deletes stale routes and nexthop
    /// objects of earlier runs, and starts the netlink thread. The netlink
    /// socket belongs to the calling thread's network namespace.
    pub fn start(mut config: KernelRoutesConfig) -> Result<KernelRoutes, NetlinkError> {
        for table in config.tables.values_mut() {
            *table = KernelTable::from_user(table.0);
        }
        let oif = device_index(&config.device)?;
        if !has_net_admin() {
            return Err(NetlinkError::MissingCapability);
        }
        let mut socket = RouteSocket::open()?;
        let tables: HashSet<KernelTable> = config.tables.values().copied().collect();
        let (mut installed, stale) = match config.stale_hold {
            None => {
                let foreign = remove_stale(&mut socket, &tables)?;
                (InstalledRoutes::new(oif, foreign), None)
            }
            Some(hold) => {
                let (installed, keys) = take_over(&mut socket, &tables, oif, hold)?;
                let now = Instant::now();
                let stale = StaleRoutes {
                    keys,
                    // A hold too long to represent never ends.
                    sweep_at: now.checked_add(hold).unwrap_or(now + MAX_STALE_HOLD),
                };
                (installed, Some(stale))
            }
        };
        probe(&mut socket, &mut installed, oif, &config.device)?;
        let (wake, woken) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            desired: Mutex::new(DesiredRoutes::default()),
            installed: Mutex::new(installed),
            applied: Mutex::new(0),
            applied_changed: Condvar::new(),
            wake,
            config,
            warned: Mutex::new(HashSet::new()),
            counters: socket.counters(),
            stale: Mutex::new(stale),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            // The name predates "netlink thread" and is what `ps`/`top` show:
            // kept for operators' scripts.
            .name("netlink-shard".into())
            .spawn(move || netlink_thread_loop(thread_shared, socket, woken))?;
        tracing::info!(
            device = %shared.config.device,
            tables = ?shared.config.tables,
            "kernel route installation ready"
        );
        Ok(KernelRoutes {
            shared,
            thread: Some(thread),
        })
    }

    /// What the client's status source shows of the kernel: counters and
    /// each received route's kernel state.
    pub fn status(&self) -> KernelStatus {
        KernelStatus {
            stats: self.stats(),
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// A sink for present-route changes.
    pub fn sink(&self) -> KernelRouteSink {
        KernelRouteSink {
            shared: self.shared.clone(),
        }
    }

    /// Counters for the status pages (netlink operations and errors, routes
    /// waiting to be written).
    pub fn stats(&self) -> KernelRouteStats {
        KernelRouteStats {
            counters: self.shared.counters.clone(),
        }
    }

    /// Waits until every change made so far has been applied to the kernel
    /// (or refused and logged). `false` on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = lock(&self.shared.desired).generation;
        let deadline = Instant::now() + timeout;
        let mut applied = lock(&self.shared.applied);
        while *applied < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            applied = wait_timeout_or_recover(
                &self.shared.applied_changed,
                applied,
                left.min(Duration::from_millis(100)),
            )
            .0;
        }
        true
    }

    /// Has every change made so far been applied to the kernel (or refused
    /// and logged)? The non-blocking side of `flush`.
    pub fn is_caught_up(&self) -> bool {
        let target = lock(&self.shared.desired).generation;
        *lock(&self.shared.applied) >= target
    }

    /// The routes the kernel acknowledged, with their next hops.
    pub fn installed(&self) -> Vec<RouteChange> {
        lock(&self.shared.installed).snapshot()
    }

    /// Stops the netlink thread; with `cleanup_on_exit`, deletes our routes and
    /// nexthop objects first.
    pub fn shutdown(mut self) -> Result<(), NetlinkError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), NetlinkError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        lock(&self.shared.desired).shutdown = true;
        let _ = self.shared.wake.try_send(());
        thread.join().map_err(|_| NetlinkError::ThreadGone)
    }
}

impl Drop for KernelRoutes {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("netlink thread: {e}");
        }
    }
}

impl KernelRouteSink {
    /// A present route appeared.
    pub fn add(&self, vni: Vni, destination: IpNet, next_hop: &NextHop) {
        self.change(vni, destination, next_hop, true);
    }

    /// A present route disappeared.
    pub fn remove(&self, vni: Vni, destination: IpNet, next_hop: &NextHop) {
        self.change(vni, destination, next_hop, false);
    }

    fn warn_once(&self, what: String, message: &str) {
        if lock(&self.shared.warned).insert(what.clone()) {
            tracing::warn!("{message}: {what}");
        }
    }

    fn change(&self, vni: Vni, destination: IpNet, next_hop: &NextHop, add: bool) {
        let config = &self.shared.config;
        let Some(table) = config.tables.get(&vni).copied() else {
            self.warn_once(
                format!("vni {vni}"),
                "routes of a VNI without --install-routes mapping are not installed",
            );
            return;
        };
        if config.ipv4_only && matches!(destination, IpNet::V6(_)) {
            tracing::debug!(%vni, %destination, "IPv6 destination skipped (--ipv4-only)");
            return;
        }
        let IpAddr::V6(target) = next_hop.target else {
            self.warn_once(
                next_hop.target.to_string(),
                "next hop is not IPv6 and cannot be an ip6 encap destination; not installed",
            );
            return;
        };
        let key = RouteKey {
            table,
            prefix: destination.trunc(),
        };
        {
            let mut desired = lock(&self.shared.desired);
            if add {
                *desired
                    .routes
                    .entry(key)
                    .or_default()
                    .entry(target)
                    .or_insert(0) += 1;
            } else {
                let Some(hops) = desired.routes.get_mut(&key) else {
                    return;
                };
                match hops.get_mut(&target) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        hops.remove(&target);
                    }
                    None => return,
                }
                if hops.is_empty() {
                    desired.routes.remove(&key);
                }
            }
            desired.dirty.insert(key);
            desired.generation += 1;
            self.shared.counters.set_pending(desired.dirty.len());
        }
        let _ = self.shared.wake.try_send(());
    }
}

/// The netlink thread: waits for changes, applies them in batches.
fn netlink_thread_loop(shared: Arc<Shared>, mut socket: RouteSocket, woken: Receiver<()>) {
    if metalbond_utils::panic_policy::injected_fault("netlink") {
        panic!(
            "injected fault: the netlink thread panics ({})",
            metalbond_utils::panic_policy::FAULT_VAR
        );
    }
    let reconcile_every = shared.config.reconcile_interval;
    let mut last_reconcile = Instant::now();
    let mut device_was_down = false;
    loop {
        // Every sender lives in `shared`, so recv only fails if that is gone.
        let mut wait = HEALTH_CHECK_INTERVAL.min(reconcile_every);
        if let Some(stale) = lock(&shared.stale).as_ref() {
            wait = wait.min(stale.sweep_at.saturating_duration_since(Instant::now()));
        }
        match woken.recv_timeout(wait) {
            Ok(()) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                health_check(&shared, &mut socket, &mut device_was_down);
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
        if last_reconcile.elapsed() >= reconcile_every {
            reconcile(&shared, &mut socket);
            last_reconcile = Instant::now();
        }
        sweep_if_due(&shared, &mut socket);
        let (changes, generation, shutdown) = take_changes(&shared);
        if !changes.is_empty() && !shutdown {
            let started = Instant::now();
            let result = lock(&shared.installed).apply(&mut socket, &changes);
            match result {
                Ok(report) => tracing::debug!(
                    changes = changes.len(),
                    ?report,
                    elapsed = ?started.elapsed(),
                    "kernel routes updated"
                ),
                Err(e) => {
                    tracing::error!(
                        "netlink socket failed, {} changes will be retried: {e}",
                        changes.len()
                    );
                    // Put the keys back so the next wake-up retries them.
                    shared.mark_dirty(changes.iter().map(|c| c.key));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        if shutdown {
            if shared.config.cleanup_on_exit {
                cleanup(&shared, &mut socket);
            } else {
                leave_for_go_cleanup(&shared, &mut socket);
            }
            *lock(&shared.applied) = generation;
            shared.applied_changed.notify_all();
            return;
        }
        *lock(&shared.applied) = generation;
        shared.applied_changed.notify_all();
    }
}

/// The routes changed since the last batch, with their desired next hops
/// (empty: delete), in key order; the generation they bring the kernel to;
/// whether shutdown was asked for.
fn take_changes(shared: &Shared) -> (Vec<RouteChange>, u64, bool) {
    let mut desired = lock(&shared.desired);
    let dirty = std::mem::take(&mut desired.dirty);
    shared.counters.set_pending(0);
    let mut changes: Vec<RouteChange> = dirty
        .into_iter()
        .map(|key| RouteChange {
            key,
            next_hops: desired
                .routes
                .get(&key)
                .map(|h| h.keys().copied().collect())
                .unwrap_or_default(),
        })
        .collect();
    changes.sort_by_key(|a| a.key);
    (changes, desired.generation, desired.shutdown)
}

/// The hold of the routes taken over at start is over: those no present
/// route refreshed are marked for deletion (the batch below deletes them:
/// their desired next-hop set is empty). Refreshed ones are left alone. One
/// the read-back forgot meanwhile (changed in the kernel) is deleted here if
/// the kernel still has a protocol-254 route at its key.
fn sweep_if_due(shared: &Shared, socket: &mut impl KernelLink) {
    let due = {
        let mut stale = lock(&shared.stale);
        match stale.as_ref() {
            Some(s) if s.sweep_at <= Instant::now() => stale.take(),
            _ => None,
        }
    };
    let Some(stale) = due else { return };
    let unrefreshed: Vec<RouteKey> = {
        let desired = lock(&shared.desired);
        stale
            .keys
            .into_iter()
            .filter(|k| !desired.routes.contains_key(k))
            .collect()
    };
    tracing::info!(
        routes = unrefreshed.len(),
        "stale hold over: deleting the taken-over kernel routes no server refreshed"
    );
    let (installed, forgotten): (Vec<RouteKey>, Vec<RouteKey>) = {
        let state = lock(&shared.installed);
        unrefreshed.into_iter().partition(|k| state.has(k))
    };
    if !forgotten.is_empty() {
        delete_if_ours(shared, socket, &forgotten);
    }
    if !installed.is_empty() {
        shared.mark_dirty(installed);
    }
}

/// Deletes the protocol-254 routes at `keys` the kernel has (one dump).
fn delete_if_ours(shared: &Shared, socket: &mut impl KernelLink, keys: &[RouteKey]) {
    let tables: HashSet<KernelTable> = shared.config.tables.values().copied().collect();
    let wanted: HashSet<&RouteKey> = keys.iter().collect();
    let found = match protocol_routes(socket, &tables) {
        Ok(routes) => routes,
        Err(e) => {
            tracing::warn!("route dump for the stale sweep failed: {e}");
            return;
        }
    };
    let requests: Vec<Request> = found
        .iter()
        .filter(|r| {
            wanted.contains(&RouteKey {
                table: r.table,
                prefix: r.prefix,
            })
        })
        .map(|r| routes::delete_route(r.table, r.prefix))
        .collect();
    match socket.execute(&requests) {
        Ok(verdicts) => {
            for e in verdicts.into_iter().filter_map(Result::err) {
                if !e.is_not_found() {
                    tracing::error!(error = %e, "cannot delete a stale kernel route");
                }
            }
        }
        Err(e) => tracing::warn!("stale sweep: {e}"),
    }
}

/// How often the netlink thread checks that the kernel still has our nexthop objects
/// and retries routes the kernel refused.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(3);

/// The kernel flushes nexthop objects (and the routes using them) when the
/// tunnel device goes down or loses carrier, and IPv4 routes whose next hops
/// all leave through it when it goes down. Finds that out (objects missing,
/// or the device seen down at an earlier check and up now), sweeps what is
/// left of ours and re-installs every desired route; also retries routes
/// the kernel refused earlier. `device_was_down` carries what the previous
/// check saw.
fn health_check(shared: &Shared, socket: &mut impl KernelLink, device_was_down: &mut bool) {
    // A bounce is forgotten only once the re-install below is under way:
    // a failed dump or sweep leaves it for the next check.
    let bounced = match device_is_up(&shared.config.device) {
        Some(false) => {
            *device_was_down = true;
            false
        }
        Some(true) => *device_was_down,
        None => false,
    };
    let ids = match socket.dump(RTM_GETNEXTHOP, RTM_NEWNEXTHOP, &NexthopMessage::dump()) {
        Ok(replies) => replies
            .iter()
            .filter_map(|p| NexthopMessage::parse(p).ok())
            .filter_map(|m| m.id())
            .collect::<HashSet<u32>>(),
        Err(e) => {
            tracing::warn!("nexthop dump for the health check failed: {e}");
            return;
        }
    };
    let mut installed = lock(&shared.installed);
    let lost = installed
        .object_ids()
        .iter()
        .filter(|id| !ids.contains(id))
        .count();
    let mut retry = installed.failing_keys();
    if lost > 0 || bounced {
        tracing::warn!(
            lost,
            bounced,
            device = %shared.config.device,
            "the kernel dropped routes or nexthop objects of ours (tunnel device down?); re-installing every route"
        );
        let tables: HashSet<KernelTable> = shared.config.tables.values().copied().collect();
        match remove_stale(socket, &tables) {
            Ok(foreign) => installed.reset(foreign),
            Err(e) => {
                tracing::error!("sweep before re-install failed: {e}");
                return;
            }
        }
        retry = lock(&shared.desired).routes.keys().copied().collect();
        *device_was_down = false;
    }
    drop(installed);
    if !retry.is_empty() {
        shared.mark_dirty(retry);
    }
}

/// Reads our tables back from the kernel: every route we installed that is
/// gone (deleted by hand, or by a tool that flushed the table) or now has
/// other next hops (replaced by hand) is forgotten and marked dirty, so the
/// next batch installs it again. IPv4 routes are recognised by their inline
/// next hops (each `encap ip6 dst` out of our device), IPv6 routes by the
/// nexthop object they reference. Routes the kernel has that we did not
/// install are left alone here (start-up removes stale ones).
fn reconcile(shared: &Shared, socket: &mut impl KernelLink) {
    let tables: HashSet<KernelTable> = shared.config.tables.values().copied().collect();
    let in_kernel: HashMap<RouteKey, routes::KernelNextHops> =
        match protocol_routes(socket, &tables) {
            Ok(routes) => routes
                .into_iter()
                .map(|r| {
                    (
                        RouteKey {
                            table: r.table,
                            prefix: r.prefix,
                        },
                        r.next_hops,
                    )
                })
                .collect(),
            Err(e) => {
                tracing::warn!("route dump for reconciliation failed: {e}");
                return;
            }
        };
    let missing = lock(&shared.installed).forget_changed(&in_kernel);
    if missing.is_empty() {
        return;
    }
    tracing::warn!(
        routes = missing.len(),
        "kernel routes of ours were deleted or changed outside metalbond; installing them again"
    );
    for key in &missing {
        tracing::debug!(route = %key, "kernel route missing or changed, re-installing");
    }
    shared.mark_dirty(missing);
}

/// `--cleanup`: delete every route and object we installed, then sweep for
/// anything of ours the state does not know about.
fn cleanup(shared: &Shared, socket: &mut impl KernelLink) {
    let mut installed = lock(&shared.installed);
    let changes: Vec<RouteChange> = installed
        .keys()
        .into_iter()
        .map(|key| RouteChange {
            key,
            next_hops: Vec::new(),
        })
        .collect();
    match installed.apply(socket, &changes) {
        Ok(report) => tracing::info!(
            routes = report.deleted,
            objects = report.objects_deleted,
            "cleanup: deleted our kernel routes"
        ),
        Err(e) => tracing::error!("cleanup failed: {e}"),
    }
    let tables: HashSet<KernelTable> = shared.config.tables.values().copied().collect();
    if let Err(e) = remove_stale(socket, &tables) {
        tracing::error!("cleanup sweep failed: {e}");
    }
}

/// Stopping without `--cleanup`: routes stay for the next start, but in a
/// form the Go client's start-up cleanup can delete after a rollback. It
/// deletes each dumped route with the attributes it dumped; the kernel dumps
/// an IPv6 route on a nexthop group with one RTA_MULTIPATH entry per member,
/// and deletes such a request entry by entry: the first deletes the route,
/// the second finds nothing (ESRCH) and the Go client exits. IPv6 routes with
/// one next hop (one RTA_OIF) and our IPv4 multipath routes delete cleanly.
/// So every IPv6 route with several next hops is left with its first one
/// (a replace to that next hop's shared object) until the next start
/// installs the full set again.
fn leave_for_go_cleanup(shared: &Shared, socket: &mut impl KernelLink) {
    let mut installed = lock(&shared.installed);
    let changes: Vec<RouteChange> = installed
        .snapshot()
        .into_iter()
        .filter(|r| matches!(r.key.prefix, IpNet::V6(_)) && r.next_hops.len() > 1)
        .map(|mut r| {
            r.next_hops.truncate(1);
            r
        })
        .collect();
    if changes.is_empty() {
        return;
    }
    match installed.apply(socket, &changes) {
        Ok(report) => tracing::info!(
            routes = report.replaced,
            failed = report.failed,
            "IPv6 ECMP routes left with their first next hop until the next start \
             (so the Go client's start-up cleanup can delete them)"
        ),
        Err(e) => tracing::error!("leaving IPv6 routes with one next hop failed: {e}"),
    }
}

fn device_index(name: &str) -> Result<u32, NetlinkError> {
    let c = CString::new(name).map_err(|_| NetlinkError::NoSuchDevice(name.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        Err(NetlinkError::NoSuchDevice(name.into()))
    } else {
        Ok(index)
    }
}

/// Is `name` administratively up (IFF_UP)? `None` when the kernel cannot
/// be asked. Asked with SIOCGIFFLAGS on a socket of the calling thread's
/// network namespace (the netlink thread's: the one routes are installed in).
fn device_is_up(name: &str) -> Option<bool> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh socket this function owns from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name (NUL-terminated: shorter than
    // IFNAMSIZ, rest zero) and writes ifru_flags of our own ifreq.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    if rc != 0 {
        return None;
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds the flags.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    Some(i32::from(flags) & libc::IFF_UP != 0)
}

/// Reads the effective capability set of this process (bit 12 = NET_ADMIN).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return true; // cannot tell; the probe will find out
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Creates and deletes one nexthop object on the device, so a kernel or
/// device that cannot do `encap ip6` fails at start, not at the first route.
/// An id another process took since our dump (EEXIST: a second client in
/// the same namespace starting at the same moment) is skipped, a few times.
fn probe(
    socket: &mut impl KernelLink,
    installed: &mut InstalledRoutes,
    oif: u32,
    device: &str,
) -> Result<(), NetlinkError> {
    const ATTEMPTS: usize = 16;
    for attempt in 1..=ATTEMPTS {
        let id = installed.allocate_id();
        let create =
            NexthopMessage::encap_ip6(AF_INET6, id, oif, Ipv6Addr::LOCALHOST, PROTOCOL_METALBOND);
        // The delete goes out only after the create succeeded: in one batch
        // it would run even when the create failed with EEXIST, and delete
        // the object of the process that took the id.
        let verdicts = socket.execute(&[Request::new(
            RTM_NEWNEXTHOP,
            NLM_F_CREATE | NLM_F_EXCL,
            &create,
        )])?;
        match verdicts.into_iter().next() {
            Some(Err(error)) if error.errno == libc::EPERM => {
                return Err(NetlinkError::MissingCapability)
            }
            Some(Err(error)) if error.errno == libc::EEXIST && attempt < ATTEMPTS => {
                installed.id_taken_elsewhere(id);
            }
            Some(Err(error)) => {
                return Err(NetlinkError::Probe {
                    device: device.into(),
                    error,
                })
            }
            _ => {
                let deleted = socket.execute(&[Request::new(
                    RTM_DELNEXTHOP,
                    0,
                    &NexthopMessage::delete(id),
                )])?;
                if let Some(Err(error)) = deleted.into_iter().next() {
                    tracing::warn!(id, %error, "cannot delete the probe's nexthop object");
                }
                return Ok(());
            }
        }
    }
    Ok(()) // unreachable: the last attempt returns
}

/// The kernel's protocol-254 routes in `tables` (one route dump).
fn protocol_routes(
    socket: &mut impl KernelLink,
    tables: &HashSet<KernelTable>,
) -> io::Result<Vec<routes::DumpedRoute>> {
    Ok(socket
        .dump(RTM_GETROUTE, RTM_NEWROUTE, &routes::dump_request())?
        .iter()
        .filter_map(|p| routes::parse_dumped(p))
        .filter(|r| r.protocol == PROTOCOL_METALBOND && tables.contains(&r.table))
        .collect())
}

/// `stale_hold`: takes over the protocol-254 routes in `tables` and the
/// protocol-254 nexthop objects an earlier run left, as stale (see
/// `InstalledRoutes::adopt`); deletes only what cannot be taken over.
/// Returns the state and the keys taken over.
fn take_over(
    socket: &mut impl KernelLink,
    tables: &HashSet<KernelTable>,
    oif: u32,
    hold: Duration,
) -> Result<(InstalledRoutes, Vec<RouteKey>), NetlinkError> {
    let mut foreign = HashSet::new();
    let mut ours = Vec::new();
    for payload in socket.dump(RTM_GETNEXTHOP, RTM_NEWNEXTHOP, &NexthopMessage::dump())? {
        let Ok(msg) = NexthopMessage::parse(&payload) else {
            continue;
        };
        let Some(id) = msg.id() else { continue };
        if msg.header.protocol == PROTOCOL_METALBOND {
            ours.push(msg);
        } else {
            foreign.insert(id);
        }
    }
    let routes = protocol_routes(socket, tables)?;
    let mut installed = InstalledRoutes::new(oif, foreign);
    let adoption = installed.adopt(&ours, &routes);
    // Routes before the objects they use; groups (first in the list)
    // before their members.
    let route_requests: Vec<Request> = adoption
        .unusable_routes
        .iter()
        .map(|k| routes::delete_route(k.table, k.prefix))
        .collect();
    let object_requests: Vec<Request> = adoption
        .unusable_objects
        .iter()
        .map(|id| Request::new(RTM_DELNEXTHOP, 0, &NexthopMessage::delete(*id)))
        .collect();
    for batch in [route_requests, object_requests] {
        for verdict in socket.execute(&batch)? {
            if let Err(e) = verdict {
                if !e.is_not_found() {
                    tracing::error!(error = %e, "cannot delete a leftover route or nexthop object");
                }
            }
        }
    }
    tracing::info!(
        routes = adoption.routes.len(),
        objects = adoption.objects,
        deleted_routes = adoption.unusable_routes.len(),
        deleted_objects = adoption.unusable_objects.len(),
        hold_secs = hold.as_secs(),
        "took over the kernel routes an earlier run left, as stale until refreshed"
    );
    Ok((installed, adoption.routes))
}

/// Deletes protocol-254 routes in `tables` and every protocol-254 nexthop
/// object (what an earlier run left behind). Returns the ids of nexthop
/// objects that are not ours, which must never be reused.
fn remove_stale(
    socket: &mut impl KernelLink,
    tables: &HashSet<KernelTable>,
) -> Result<HashSet<u32>, NetlinkError> {
    let stale_routes = protocol_routes(socket, tables)?;
    let requests: Vec<Request> = stale_routes
        .iter()
        .map(|r| routes::delete_route(r.table, r.prefix))
        .collect();
    let mut deleted = 0;
    for (route, verdict) in stale_routes.iter().zip(socket.execute(&requests)?) {
        match verdict {
            Ok(()) => deleted += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                tracing::error!(prefix = %route.prefix, table = %route.table, error = %e, "cannot delete stale route")
            }
        }
    }

    let mut foreign = HashSet::new();
    let mut ours_groups = Vec::new();
    let mut ours_single = Vec::new();
    for payload in socket.dump(RTM_GETNEXTHOP, RTM_NEWNEXTHOP, &NexthopMessage::dump())? {
        let Ok(msg) = NexthopMessage::parse(&payload) else {
            continue;
        };
        let Some(id) = msg.id() else { continue };
        if msg.header.protocol != PROTOCOL_METALBOND {
            foreign.insert(id);
        } else if msg.is_group() {
            ours_groups.push(id);
        } else {
            ours_single.push(id);
        }
    }
    let objects = ours_groups.len() + ours_single.len();
    for ids in [ours_groups, ours_single] {
        let requests: Vec<Request> = ids
            .iter()
            .map(|id| Request::new(RTM_DELNEXTHOP, 0, &NexthopMessage::delete(*id)))
            .collect();
        for (id, verdict) in ids.iter().zip(socket.execute(&requests)?) {
            if let Err(e) = verdict {
                if !e.is_not_found() {
                    tracing::error!(id, error = %e, "cannot delete stale nexthop object");
                }
            }
        }
    }
    if deleted > 0 || objects > 0 {
        tracing::info!(
            routes = deleted,
            objects,
            "deleted stale protocol-254 routes and nexthop objects"
        );
    }
    Ok(foreign)
}

/// The netlink thread's logic against `fake_kernel::FakeKernel`: what it
/// does with routes an earlier run left, routes deleted by hand, the stale
/// sweep and the two ways of stopping. (`tests/netlink_kernel.rs` runs the
/// same paths against the real kernel in a namespace.)
#[cfg(test)]
mod tests {
    use super::*;
    use fake_kernel::FakeKernel;
    use routes::{replace_multipath_route, replace_nhid_route};

    /// The tunnel device's index in these tests.
    const OIF: u32 = 3;
    /// Our table.
    const TABLE: KernelTable = KernelTable(100);

    fn hv(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)
    }

    fn key(prefix: &str) -> RouteKey {
        RouteKey {
            table: TABLE,
            prefix: prefix.parse().unwrap(),
        }
    }

    /// The netlink thread's shared state around `installed`, for VNI 23 →
    /// table 100 on a device that does not exist here (so the health check
    /// never sees it bounce).
    fn shared(installed: InstalledRoutes) -> Shared {
        let (wake, _woken) = crossbeam_channel::bounded(1);
        Shared {
            desired: Mutex::new(DesiredRoutes::default()),
            installed: Mutex::new(installed),
            applied: Mutex::new(0),
            applied_changed: Condvar::new(),
            wake,
            config: KernelRoutesConfig {
                tables: [(Vni::new(23).unwrap(), TABLE)].into(),
                device: "mb-no-such-dev".into(),
                ipv4_only: false,
                cleanup_on_exit: false,
                reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
                stale_hold: None,
            },
            warned: Mutex::new(HashSet::new()),
            counters: Arc::new(NetlinkCounters::default()),
            stale: Mutex::new(None),
        }
    }

    /// Makes `hops` the desired next hops of `prefix` (as the sinks do).
    fn want(shared: &Shared, prefix: &str, hops: &[Ipv6Addr]) {
        let mut desired = lock(&shared.desired);
        desired
            .routes
            .insert(key(prefix), hops.iter().map(|h| (*h, 1)).collect());
        desired.dirty.insert(key(prefix));
    }

    /// One batch of the netlink thread.
    fn run_batch(shared: &Shared, kernel: &mut FakeKernel) {
        let (changes, _, _) = take_changes(shared);
        lock(&shared.installed).apply(kernel, &changes).unwrap();
    }

    fn tables() -> HashSet<KernelTable> {
        [TABLE].into()
    }

    fn prefixes(kernel: &FakeKernel) -> Vec<String> {
        kernel.routes().keys().map(|(_, p)| p.to_string()).collect()
    }

    #[test]
    fn start_up_deletes_what_an_earlier_run_left_and_keeps_other_programs_objects() {
        let mut kernel = FakeKernel::default();
        kernel.add_object(7, hv(1), PROTOCOL_METALBOND);
        kernel.add_object(9, hv(9), 4); // another program's
        kernel.add_route(&replace_nhid_route(
            TABLE,
            "2001:db8:9::/64".parse().unwrap(),
            7,
        ));
        kernel.add_route(&replace_multipath_route(
            TABLE,
            "10.0.0.0/24".parse().unwrap(),
            OIF,
            &[hv(1), hv(2)],
        ));
        let foreign = remove_stale(&mut kernel, &tables()).unwrap();
        assert_eq!(foreign, [9].into());
        assert!(kernel.routes().is_empty());
        assert_eq!(kernel.object_ids(), vec![9]);
    }

    #[test]
    fn a_route_deleted_by_hand_is_installed_again() {
        let mut kernel = FakeKernel::default();
        let shared = shared(InstalledRoutes::new(OIF, HashSet::new()));
        want(&shared, "10.0.0.0/24", &[hv(1), hv(2)]);
        want(&shared, "2001:db8:9::/64", &[hv(1)]);
        run_batch(&shared, &mut kernel);
        assert_eq!(prefixes(&kernel), ["10.0.0.0/24", "2001:db8:9::/64"]);

        // Nothing changed: the read-back finds everything in place.
        reconcile(&shared, &mut kernel);
        assert!(lock(&shared.desired).dirty.is_empty());

        assert!(kernel.delete_by_hand(TABLE, "2001:db8:9::/64".parse().unwrap()));
        reconcile(&shared, &mut kernel);
        assert_eq!(lock(&shared.desired).dirty, [key("2001:db8:9::/64")].into());
        run_batch(&shared, &mut kernel);
        assert_eq!(prefixes(&kernel), ["10.0.0.0/24", "2001:db8:9::/64"]);
    }

    #[test]
    fn a_lost_nexthop_object_reinstalls_every_route() {
        let mut kernel = FakeKernel::default();
        let shared = shared(InstalledRoutes::new(OIF, HashSet::new()));
        want(&shared, "2001:db8:9::/64", &[hv(1)]);
        want(&shared, "2001:db8:8::/64", &[hv(2)]);
        run_batch(&shared, &mut kernel);
        let objects = kernel.object_ids();
        assert_eq!(objects.len(), 2);
        // The kernel flushes one object (a device bounce): its route goes too.
        kernel
            .execute(&[Request::new(
                RTM_DELNEXTHOP,
                0,
                &NexthopMessage::delete(objects[0]),
            )])
            .unwrap();
        assert_eq!(kernel.routes().len(), 1);
        let mut was_down = false;
        health_check(&shared, &mut kernel, &mut was_down);
        run_batch(&shared, &mut kernel);
        assert_eq!(prefixes(&kernel), ["2001:db8:8::/64", "2001:db8:9::/64"]);
        assert_eq!(kernel.object_ids().len(), 2);
    }

    #[test]
    fn taken_over_routes_stay_until_the_hold_ends_and_refreshed_ones_after() {
        // An earlier run installed two routes.
        let mut kernel = FakeKernel::default();
        let earlier = shared(InstalledRoutes::new(OIF, HashSet::new()));
        want(&earlier, "2001:db8:9::/64", &[hv(1)]);
        want(&earlier, "10.0.0.0/24", &[hv(2)]);
        run_batch(&earlier, &mut kernel);
        let sent = kernel.sent.len();

        // This run takes them over: nothing is deleted.
        let (installed, keys) =
            take_over(&mut kernel, &tables(), OIF, Duration::from_secs(60)).unwrap();
        assert_eq!(kernel.sent.len(), sent, "take-over sends nothing");
        assert_eq!(keys.len(), 2);
        let shared = shared(installed);
        *lock(&shared.stale) = Some(StaleRoutes {
            keys,
            sweep_at: Instant::now(),
        });
        // One of them is present again before the hold ends.
        want(&shared, "10.0.0.0/24", &[hv(2)]);
        sweep_if_due(&shared, &mut kernel);
        run_batch(&shared, &mut kernel);
        assert_eq!(prefixes(&kernel), ["10.0.0.0/24"]);
        assert!(lock(&shared.stale).is_none());
    }

    #[test]
    fn each_received_route_has_its_kernel_state() {
        use metalbond_telemetry::{KernelRouteState as S, KernelStatsSource};
        let mut kernel = FakeKernel::default();
        kernel.refuse_dst = Some(hv(3));
        let shared = Arc::new(shared(InstalledRoutes::new(OIF, HashSet::new())));
        let status = KernelStatus {
            stats: KernelRouteStats {
                counters: shared.counters.clone(),
            },
            shared: Arc::downgrade(&shared),
        };
        want(&shared, "10.0.0.0/24", &[hv(1), hv(2)]);
        want(&shared, "2001:db8:9::/64", &[hv(1)]);
        want(&shared, "2001:db8:7::/64", &[hv(3)]);
        run_batch(&shared, &mut kernel);
        want(&shared, "2001:db8:6::/64", &[hv(1)]);
        let vni23 = Vni::new(23).unwrap();
        let ask = |vni: Vni, hops: &[(&str, &str)]| {
            let hops: Vec<(IpNet, IpAddr)> = hops
                .iter()
                .map(|(p, h)| (p.parse().unwrap(), h.parse().unwrap()))
                .collect();
            status.route_states(vni, &hops)
        };
        assert_eq!(
            ask(
                vni23,
                &[
                    ("10.0.0.0/24", "2001:db8::1"),
                    ("10.0.0.0/24", "2001:db8::2"),
                    ("2001:db8:9::/64", "2001:db8::1"),
                    ("2001:db8:7::/64", "2001:db8::3"),
                    ("2001:db8:6::/64", "2001:db8::1"),
                    ("10.0.0.0/24", "2001:db8::5"),
                    ("10.0.0.0/24", "192.0.2.1"),
                ]
            ),
            [
                S::Installed,
                S::Installed,
                S::Installed,
                S::Failed,
                S::Pending,
                S::Pending,
                S::NotInstalled,
            ],
            "installed, refused, queued, queued next to installed ones, not IPv6"
        );
        assert_eq!(
            ask(Vni::new(24).unwrap(), &[("10.0.0.0/24", "2001:db8::1")]),
            [S::NotInstalled],
            "a VNI without a table"
        );
        drop(shared);
        assert_eq!(
            ask(vni23, &[("10.0.0.0/24", "2001:db8::1")]),
            [S::NotInstalled],
            "the netlink thread is gone"
        );
    }

    #[test]
    fn stopping_with_cleanup_deletes_ours_and_without_leaves_one_hop_for_go() {
        let mut kernel = FakeKernel::default();
        kernel.add_object(9, hv(9), 4);
        let shared = shared(InstalledRoutes::new(OIF, [9].into()));
        want(&shared, "2001:db8:9::/64", &[hv(1), hv(2)]);
        want(&shared, "2001:db8:8::/64", &[hv(1)]);
        want(&shared, "10.0.0.0/24", &[hv(1), hv(2)]);
        run_batch(&shared, &mut kernel);

        leave_for_go_cleanup(&shared, &mut kernel);
        let routes = kernel.routes();
        assert_eq!(routes.len(), 3, "every route stays");
        let hops = |prefix: &str| {
            lock(&shared.installed)
                .snapshot()
                .into_iter()
                .find(|r| r.key == key(prefix))
                .map(|r| r.next_hops)
        };
        assert_eq!(
            hops("2001:db8:9::/64"),
            Some(vec![hv(1)]),
            "IPv6 ECMP: one hop"
        );
        assert_eq!(hops("10.0.0.0/24"), Some(vec![hv(1), hv(2)]), "IPv4 kept");

        cleanup(&shared, &mut kernel);
        assert!(kernel.routes().is_empty());
        assert_eq!(
            kernel.object_ids(),
            vec![9],
            "another program's object stays"
        );
    }

    #[test]
    fn the_probe_skips_an_id_another_process_took() {
        let mut kernel = FakeKernel::default();
        let mut installed = InstalledRoutes::new(OIF, HashSet::new());
        let first = installed.allocate_id();
        let mut installed = InstalledRoutes::new(OIF, HashSet::new());
        kernel.add_object(first, hv(9), PROTOCOL_METALBOND);
        probe(&mut kernel, &mut installed, OIF, "tun").unwrap();
        assert_eq!(kernel.object_ids(), vec![first], "the probe left nothing");
        assert_ne!(installed.allocate_id(), first);
    }
}
