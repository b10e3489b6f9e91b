//! What the status pages show, as plain data, and the trait that supplies
//! it: the contract between the parts that own the state (server shards,
//! client sessions; each implements `StatusSource` next to its role) and the
//! part that renders it (`http`, which depends on this module and on nothing
//! above it).
//!
//! Owns: `StatusSource`, `RouteTableView`, `PeerView`, `MetricsView` and
//! their pieces. (The shape of `/routes.json` and `/routes.yaml` is
//! `http::go_document`'s; metric names and help texts are `families`'.)
//!
//! Must never: hold references into live tables, lock anything, or know how
//! the state was gathered. A view is a copy taken at one moment; building one
//! is the state owner's job, rendering it is `http`'s.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use metalbond_utils::LockOrRecover;
use metalbond_wire::session::SessionState;
use metalbond_wire::types::{IpNet, NextHop, NextHopKind, Vni};

use super::families::Family;
pub use super::families::MetricKind;
use super::{HistogramView, NetlinkView};

/// Where the status pages get their data. Implemented by the server's
/// (`metalbond_server::ServerStatusSource`) and the client's
/// (`metalbond_client::ClientStatusSource`) adapters; every method is called
/// on an HTTP thread and must return a copy without blocking the data path
/// for long.
pub trait StatusSource: Send + Sync + 'static {
    /// Server or client (page title, `metalbond_build_info`).
    fn role(&self) -> StatusRole;
    /// The route table now: the server's reflected table, or the client's
    /// received routes.
    fn routes(&self) -> RouteTableView;
    /// Every peer session now.
    fn peers(&self) -> Vec<PeerView>;
    /// Counters and gauges now.
    fn metrics(&self) -> MetricsView;
    /// The active peer policy (`server --policy`): shown on `/` and at
    /// `/policy`. `None` (the default): no policy.
    fn policy(&self) -> Option<PolicyStatus> {
        None
    }
    /// `/readyz`: `Ok(status line)` when the role does its job, `Err(what
    /// it waits for)` before. The rule is the role's, the one that also
    /// sends systemd `READY=1`. Default: ready (a source with no rule).
    fn readiness(&self) -> Result<String, String> {
        Ok("ready".into())
    }
    /// `/api/v1/routes`: the routes `request` selects. `Err(reason)`: the
    /// VNI is unknown here (a 404). Default: from `routes()` (a copy of the
    /// table), no announcers.
    fn route_page(&self, request: &RoutesRequest) -> Result<RoutesPageView, String> {
        let all: Vec<metalbond_wire::types::Route> = self
            .routes()
            .vnis
            .iter()
            .filter(|v| v.vni == request.vni)
            .flat_map(VniRoutesView::routes)
            .collect();
        if all.is_empty() {
            return Err(format!("no routes in VNI {}", request.vni));
        }
        let (routes, next) = request.select_from(&all);
        Ok(RoutesPageView::grouped(
            routes
                .into_iter()
                .map(|r| (r.vni, r.destination, NextHopEntryView::bare(r.next_hop))),
            next,
        ))
    }
    /// Per VNI: routes, subscribers and the route-set digest, for
    /// `/api/v1/summary`. Default: computed from `routes()` (a copy of the
    /// whole table); the roles answer from digests they keep as routes
    /// change.
    fn vni_summaries(&self) -> Vec<VniSummaryView> {
        self.routes()
            .vnis
            .iter()
            .map(|v| VniSummaryView {
                vni: v.vni,
                subscribers: None,
                digest: metalbond_wire::digest::VniDigest::of(&v.routes().collect::<Vec<_>>()),
            })
            .collect()
    }
}

/// Which routes `/api/v1/routes` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteSelect {
    /// Up to `limit` destinations (each with all its next hops) after
    /// destination `after` (from the start when `None`).
    Page {
        /// The cursor: the last destination of the previous page.
        after: Option<IpNet>,
        /// Destinations at most.
        limit: usize,
    },
    /// The routes to exactly this prefix.
    Prefix(IpNet),
    /// The routes to the most specific prefix covering this address
    /// (longest-prefix match, as `birdc show route for` does).
    Lookup(std::net::IpAddr),
}

/// One `/api/v1/routes` request, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutesRequest {
    /// The VNI.
    pub vni: Vni,
    /// Which routes of it.
    pub select: RouteSelect,
}

impl RoutesRequest {
    /// The routes of `routes` (any order) this request selects, sorted,
    /// and the next page's cursor (the last destination when more follow).
    /// For roles that answer from a copy of their table (the client).
    pub fn select_from(
        &self,
        routes: &[metalbond_wire::types::Route],
    ) -> (Vec<metalbond_wire::types::Route>, Option<IpNet>) {
        let mut mine: Vec<metalbond_wire::types::Route> = routes
            .iter()
            .filter(|r| r.vni == self.vni)
            .copied()
            .collect();
        mine.sort();
        match self.select {
            RouteSelect::Prefix(p) => (
                mine.into_iter().filter(|r| r.destination == p).collect(),
                None,
            ),
            RouteSelect::Lookup(addr) => {
                let best = mine
                    .iter()
                    .filter(|r| r.destination.contains(&addr))
                    .map(|r| r.destination)
                    .max_by_key(IpNet::prefix_len);
                (
                    mine.into_iter()
                        .filter(|r| Some(r.destination) == best)
                        .collect(),
                    None,
                )
            }
            RouteSelect::Page { after, limit } => {
                let mut out: Vec<metalbond_wire::types::Route> = Vec::new();
                let mut destinations = 0usize;
                for r in mine
                    .into_iter()
                    .filter(|r| after.is_none_or(|a| r.destination > a))
                {
                    if out.last().is_none_or(|l| l.destination != r.destination) {
                        if destinations == limit {
                            let next = out.last().map(|l| l.destination);
                            return (out, next);
                        }
                        destinations += 1;
                    }
                    out.push(r);
                }
                (out, None)
            }
        }
    }
}

/// One next hop of a route on `/api/v1/routes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHopEntryView {
    /// The next hop.
    pub next_hop: NextHop,
    /// Server: the peers announcing it (address:port); client: the servers
    /// it was received from (as configured).
    pub announced_by: Vec<String>,
    /// Client: the route is held from a lost session only (stale); `None`
    /// on the server.
    pub stale: Option<bool>,
    /// When this next hop appeared: on the server when the route entered
    /// the table, on the client when it was first received (from any
    /// server). Whole seconds.
    pub since: Option<SystemTime>,
    /// Client: where the route stands in the kernel; `None` on the server.
    pub kernel: Option<crate::KernelRouteState>,
}

impl NextHopEntryView {
    /// The next hop with nothing known about who sent it or when.
    pub fn bare(next_hop: NextHop) -> NextHopEntryView {
        NextHopEntryView {
            next_hop,
            announced_by: Vec::new(),
            stale: None,
            since: None,
            kernel: None,
        }
    }
}

/// One destination on `/api/v1/routes` with every selected next hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntryView {
    /// The VNI.
    pub vni: Vni,
    /// The destination prefix.
    pub prefix: IpNet,
    /// Its next hops.
    pub next_hops: Vec<NextHopEntryView>,
}

/// A page of `/api/v1/routes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutesPageView {
    /// The routes, one entry per destination, in table order.
    pub routes: Vec<RouteEntryView>,
    /// The cursor for the next page (`after=`): absent on the last page.
    pub next: Option<IpNet>,
}

impl RoutesPageView {
    /// Groups next hops (sorted by VNI and destination, each with who
    /// announced it and since when) into one entry per destination.
    pub fn grouped(
        hops: impl IntoIterator<Item = (Vni, IpNet, NextHopEntryView)>,
        next: Option<IpNet>,
    ) -> RoutesPageView {
        let mut page = RoutesPageView {
            routes: Vec::new(),
            next,
        };
        for (vni, prefix, hop) in hops {
            match page.routes.last_mut() {
                Some(e) if e.vni == vni && e.prefix == prefix => e.next_hops.push(hop),
                _ => page.routes.push(RouteEntryView {
                    vni,
                    prefix,
                    next_hops: vec![hop],
                }),
            }
        }
        page
    }
}

/// One VNI on `/api/v1/summary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VniSummaryView {
    /// The VNI.
    pub vni: Vni,
    /// Peers subscribed to it (server); `None` where the role has none
    /// (a client's received table).
    pub subscribers: Option<u64>,
    /// Its routes' count and digest (`metalbond_wire::digest`).
    pub digest: metalbond_wire::digest::VniDigest,
}

/// A role's readiness as its start-up rule last decided it, shared between
/// the code that applies the rule (and sends systemd `READY=1`) and the
/// status source that answers `/readyz`, so both say the same. Once ready,
/// it stays ready: the rule is about start-up; how sessions fare later is
/// on `/peers` and `/metrics`.
#[derive(Clone, Debug)]
pub struct ReadyLatch {
    /// `Ok(status line)` once ready, `Err(what it waits for)` before.
    state: std::sync::Arc<std::sync::Mutex<Result<String, String>>>,
}

impl ReadyLatch {
    /// Not ready yet, waiting for `what`.
    pub fn new(what: &str) -> ReadyLatch {
        ReadyLatch {
            state: std::sync::Arc::new(std::sync::Mutex::new(Err(what.into()))),
        }
    }

    /// Records what the rule decided now (`Ok`: ready with this status
    /// line); a latch that was ready stays ready.
    pub fn update(&self, decided: Result<String, String>) {
        let mut state = self.state.lock_or_recover();
        if state.is_err() {
            *state = decided;
        }
    }

    /// The last decision.
    pub fn get(&self) -> Result<String, String> {
        self.state.lock_or_recover().clone()
    }
}

/// Which binary is serving the status pages. Shown on the page and in
/// `metalbond_build_info`, so that a dashboard can tell reflectors from
/// hypervisor clients.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusRole {
    /// `metalbond server`: the route reflector.
    Server,
    /// `metalbond client`: a hypervisor's announcer and route installer.
    Client,
}

impl StatusRole {
    /// Lower-case name ("server" / "client").
    pub fn name(self) -> &'static str {
        match self {
            StatusRole::Server => "server",
            StatusRole::Client => "client",
        }
    }
}

/// The route table at one moment, grouped by VNI then destination, every
/// level sorted, so that two snapshots of the same table render identically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTableView {
    /// One entry per VNI that has at least one route, ascending by VNI.
    pub vnis: Vec<VniRoutesView>,
}

/// One VNI's routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VniRoutesView {
    /// The overlay network.
    pub vni: Vni,
    /// Its destinations, ascending, each with at least one next hop.
    pub destinations: Vec<DestinationView>,
}

/// One destination prefix and every next hop it is reachable through
/// (several means ECMP on the client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationView {
    /// The overlay prefix (host bits cleared, as in `Route`).
    pub prefix: IpNet,
    /// Its next hops, ascending, no duplicates.
    pub next_hops: Vec<NextHop>,
}

impl VniRoutesView {
    /// Every route of this VNI, in destination then next-hop order.
    pub fn routes(&self) -> impl Iterator<Item = metalbond_wire::types::Route> + '_ {
        self.destinations.iter().flat_map(move |d| {
            d.next_hops
                .iter()
                .map(move |h| metalbond_wire::types::Route {
                    vni: self.vni,
                    destination: d.prefix,
                    next_hop: *h,
                })
        })
    }

    /// Routes (destination, next hop pairs) in this VNI.
    pub fn route_count(&self) -> usize {
        self.destinations.iter().map(|d| d.next_hops.len()).sum()
    }
}

impl RouteTableView {
    /// Groups and sorts `(vni, destination, next hop)` triples in any order;
    /// duplicates collapse (a route announced by two peers is one route).
    pub fn from_routes(routes: impl IntoIterator<Item = (Vni, IpNet, NextHop)>) -> RouteTableView {
        let mut grouped: BTreeMap<Vni, BTreeMap<IpNet, Vec<NextHop>>> = BTreeMap::new();
        for (vni, prefix, hop) in routes {
            grouped
                .entry(vni)
                .or_default()
                .entry(prefix.trunc())
                .or_default()
                .push(hop);
        }
        RouteTableView {
            vnis: grouped
                .into_iter()
                .map(|(vni, dests)| VniRoutesView {
                    vni,
                    destinations: dests
                        .into_iter()
                        .map(|(prefix, mut next_hops)| {
                            next_hops.sort_unstable();
                            next_hops.dedup();
                            DestinationView { prefix, next_hops }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Routes (destination, next hop pairs) across all VNIs.
    pub fn route_count(&self) -> usize {
        self.vnis.iter().map(VniRoutesView::route_count).sum()
    }

    /// Routes per VNI, in VNI order (the `metalbond_routes{vni}` family).
    pub fn routes_per_vni(&self) -> Vec<(Vni, u64)> {
        self.vnis
            .iter()
            .map(|v| (v.vni, v.route_count() as u64))
            .collect()
    }

    /// Destinations across all VNIs.
    pub fn destination_count(&self) -> usize {
        self.vnis.iter().map(|v| v.destinations.len()).sum()
    }
}

/// The protobuf enum name of a next hop's kind.
pub fn kind_name(kind: NextHopKind) -> &'static str {
    match kind {
        NextHopKind::Standard => "STANDARD",
        NextHopKind::Nat { .. } => "NAT",
        NextHopKind::LoadBalancerTarget => "LOADBALANCER_TARGET",
    }
}

/// RFC 3339 in UTC to the second ("2026-11-25T11:13:31Z"): every time
/// the `/api/v1` documents carry.
pub fn format_rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// "YYYY-MM-DD HH:MM:SS" in UTC (the Go implementation's `date` layout).
pub fn format_date(t: SystemTime) -> String {
    let rfc = format_rfc3339(t);
    // "2026-11-25T11:13:31Z" → "2026-11-25 11:13:31"
    rfc.trim_end_matches('Z').replacen('T', " ", 1)
}

/// One peer as `/peers` shows it: who, in which state, on which shard, and
/// how much it has exchanged with us.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    /// Remote address (server), or the server's address as configured
    /// (client; may be a host name).
    pub address: String,
    /// Session state, upper case as in PROTOCOL.md.
    #[serde(serialize_with = "ser_state")]
    pub state: SessionState,
    /// Shard holding the connection (server only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
    /// Negotiated keepalive interval (ours until the HELLO exchange);
    /// `None` (null) where the role does not know it.
    #[serde(rename = "keepalive_seconds", serialize_with = "ser_secs")]
    pub keepalive: Option<Duration>,
    /// Routes this peer announces (server: received from it; client: ours to it).
    pub routes_announced: u64,
    /// Routes received from this peer that are held now, where the role
    /// tracks it per peer (client: routes this server gave us).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes_received: Option<u64>,
    /// VNIs the peer is subscribed to (server) or we subscribed to (client).
    #[serde(serialize_with = "ser_vnis")]
    pub vnis_subscribed: Vec<Vni>,
    /// Frames received from the peer; `None` (null) where the role does not count it.
    pub frames_in: Option<u64>,
    /// Bytes received from the peer; `None` (null) where the role does not count it.
    pub bytes_in: Option<u64>,
    /// Frames written to the peer; `None` (null) where the role does not count it.
    pub frames_out: Option<u64>,
    /// Bytes written to the peer; `None` (null) where the role does not count it.
    pub bytes_out: Option<u64>,
    /// Bytes queued for the peer and not yet written, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_bytes: Option<u64>,
    /// When the connection was made (RFC 3339, UTC); `None` while not connected.
    #[serde(serialize_with = "ser_time")]
    pub connected_since: Option<SystemTime>,
    /// Server with `--peer-grace`: this peer's session has ended and its
    /// routes are held for this much longer (whole seconds); `None` for
    /// live sessions (the field is then left out).
    #[serde(
        rename = "grace_seconds_left",
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_secs"
    )]
    pub grace_left: Option<Duration>,
    /// Server: the session's id (`shard.sequence`), as logs name it
    /// (`peer_id=`); left out on the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_id: Option<String>,
    /// Client: of `routes_received`, those held from a lost session only
    /// (stale, `--stale-hold`); left out on the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes_stale: Option<u64>,
    /// Server with `--policy`: the rule this peer's session applies (the
    /// first whose `peers` match its address, as the session resolves it at
    /// connect and after each reload); `(no rule)` for a peer no rule
    /// matches; left out without a policy and on the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<String>,
    /// Client: whether the session is signed with TCP-MD5 (a key file is
    /// configured for this server), so a connect timeout can be read as a
    /// likely key mismatch; left out on the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_md5: Option<bool>,
    /// Server: the peer is waiting for its update rate now (its socket
    /// is read more slowly: `--max-updates-per-second`, a rule's
    /// `limits.max_updates_per_second`); left out on the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttled: Option<bool>,
}

fn ser_state<S: Serializer>(state: &SessionState, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(state.name())
}

fn ser_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        None => s.serialize_none(),
        Some(d) if d.subsec_nanos() == 0 => s.serialize_u64(d.as_secs()),
        Some(d) => s.serialize_f64(d.as_secs_f64()),
    }
}

fn ser_vnis<S: Serializer>(vnis: &[Vni], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(vnis.iter().map(|v| v.get()))
}

fn ser_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// Every number `/metrics` exposes, as values copied at one moment.
///
/// Typed fields for what every fleet dashboard needs (so nothing on the
/// issue's list can be forgotten silently), `Option` where only one role has
/// it, and `extra` for the counters a role wants to add without changing this
/// contract.
#[derive(Clone, Debug, Default)]
pub struct MetricsView {
    /// Peers per session state (`metalbond_peers{state}`), keyed by
    /// `SessionState::name()`; built with `count_states`, which lists the
    /// role's usual states even at zero so dashboards see every series.
    pub peers_by_state: Vec<(String, u64)>,
    /// Routes per VNI (`metalbond_vni_routes{vni}`).
    pub routes_per_vni: Vec<(Vni, u64)>,
    /// Routes in all VNIs (`metalbond_routes`).
    pub routes_total: u64,
    /// UPDATE messages received (`metalbond_updates_received_total`).
    /// `None` only where a role does not count them (the family is then
    /// left out rather than shown as a false zero).
    pub updates_in: Option<u64>,
    /// UPDATE messages sent (`metalbond_updates_sent_total`).
    pub updates_out: Option<u64>,
    /// Frames written, all types (`metalbond_frames_written_total`).
    pub frames_written: Option<u64>,
    /// Bytes written (`metalbond_bytes_written_total`).
    pub bytes_written: Option<u64>,
    /// Frames read, where counted (`metalbond_frames_read_total`).
    pub frames_read: Option<u64>,
    /// Bytes read, where counted (`metalbond_bytes_read_total`).
    pub bytes_read: Option<u64>,
    /// Sessions ended, by `CloseReason::label()` or a role-specific cause
    /// (`metalbond_disconnects_total{reason}`).
    pub disconnects_by_reason: Vec<(String, u64)>,
    /// Time from an UPDATE's arrival to its copies being written
    /// (`metalbond_fanout_latency_seconds`); server only.
    pub fanout_latency: Option<HistogramView>,
    /// Queue depths (`metalbond_queue_depth{queue}`), e.g. bytes queued to
    /// peers or batches waiting between shards.
    pub queue_depths: Vec<QueueDepth>,
    /// Kernel route operations; client only (`None` on the server).
    pub netlink: Option<NetlinkView>,
    /// Further families a role exposes (reconnects, coalescing, ...).
    pub extra: Vec<MetricFamily>,
}

/// Peers per state for `MetricsView::peers_by_state`: every state in
/// `always` (in that order, zeros included), then any other state seen.
pub fn count_states(
    always: &[SessionState],
    states: impl IntoIterator<Item = SessionState>,
) -> Vec<(String, u64)> {
    let mut counts: Vec<(String, u64)> =
        always.iter().map(|st| (st.name().to_string(), 0)).collect();
    for st in states {
        match counts.iter_mut().find(|(name, _)| name == st.name()) {
            Some((_, n)) => *n += 1,
            None => counts.push((st.name().to_string(), 1)),
        }
    }
    counts
}

/// One queue's depth at the snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueDepth {
    /// What is queued where, e.g. "peer_out_bytes" or "shard_inbox".
    pub queue: String,
    /// The shard the queue belongs to, when queues are per shard.
    pub shard: Option<usize>,
    /// Items (or bytes, as the queue name says) waiting.
    pub depth: u64,
}

/// A free-form family for `MetricsView::extra`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricFamily {
    /// Metric name; invalid characters are replaced by `_` when rendered.
    pub name: String,
    /// One-line description for `# HELP`.
    pub help: String,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// The samples: label pairs and value.
    pub samples: Vec<MetricSample>,
}

/// One sample of a `MetricFamily`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSample {
    /// Label name/value pairs (names sanitised, values escaped when rendered).
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl MetricFamily {
    /// A family with a single unlabelled sample.
    pub fn single(name: &str, help: &str, kind: MetricKind, value: f64) -> MetricFamily {
        MetricFamily {
            name: name.to_string(),
            help: help.to_string(),
            kind,
            samples: vec![MetricSample {
                labels: Vec::new(),
                value,
            }],
        }
    }

    /// A family of the table (`telemetry::families`) with these samples.
    pub fn of(family: &Family, samples: Vec<MetricSample>) -> MetricFamily {
        MetricFamily {
            name: family.name.to_string(),
            help: family.help.to_string(),
            kind: family.kind,
            samples,
        }
    }

    /// A family of the table with a single unlabelled sample.
    pub fn single_of(family: &Family, value: f64) -> MetricFamily {
        MetricFamily::single(family.name, family.help, family.kind, value)
    }
}

impl MetricSample {
    /// A sample with a fractional value (seconds).
    pub fn float(labels: &[(&str, &str)], value: f64) -> MetricSample {
        MetricSample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    /// A sample with `labels` (name, value) and an integer value.
    pub fn new(labels: &[(&str, &str)], value: u64) -> MetricSample {
        MetricSample {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: value as f64,
        }
    }
}

/// The active peer policy as the status pages show it (the policy crate
/// fills it; the status model owns its shape).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyStatus {
    /// The file.
    pub path: String,
    /// Format version read.
    pub format_version: u32,
    /// The file's `revision`.
    pub revision: Option<String>,
    /// Successful loads so far (1 = the start-up load, +1 per reload).
    pub generation: u64,
    /// When the active policy was loaded.
    #[serde(serialize_with = "ser_loaded_at")]
    pub loaded_at: SystemTime,
    /// Reloads that failed since start (the old policy stayed).
    pub failed_reloads: u64,
    /// Refusal log lines the process-wide budget suppressed since start
    /// (each window that suppressed some ends with a summary line).
    pub log_lines_suppressed: u64,
    /// The active file's warnings (`Policy::warnings`).
    pub warnings: Vec<String>,
    /// Per rule (active ones in file order, then removed ones, then the
    /// peers no rule matched).
    pub rules: Vec<RuleStatus>,
}

/// Label used for refusals of peers no rule matches (rule names cannot
/// contain parentheses or spaces, so it never collides with one).
pub const NO_RULE_LABEL: &str = "(no rule)";

/// `rule` label of the update-rate counters of a server without a policy
/// (`--max-updates-per-second` alone).
pub const NO_POLICY_LABEL: &str = "(no policy)";

/// One rule's counts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuleStatus {
    /// Rule name (or `NO_RULE_LABEL`).
    pub name: String,
    /// In the active policy (false: removed by a reload).
    pub active: bool,
    /// Sessions that resolved to it.
    pub hits: u64,
    /// Refusals by reason label (only non-zero ones).
    pub denied: std::collections::BTreeMap<&'static str, u64>,
    /// Routes withdrawn because a reload no longer allowed them.
    pub withdrawn: u64,
    /// UPDATEs admitted under the rule's (or the server's) update rate.
    pub updates_admitted: u64,
    /// Seconds its peers spent waiting for their update rate.
    pub throttled_seconds: f64,
}

fn ser_loaded_at<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339(*t))
}
