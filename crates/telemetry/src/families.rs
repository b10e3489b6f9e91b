//! The one table of metric families: every name `/metrics` can show, its
//! `# HELP` text, its type, its label names and which role exports it, plus
//! the fixed label values this crate owns (`queue`, `op`).
//!
//! Owns: `Family`, the `const`s naming each family, `ALL` (the table the
//! README list is generated from and checked against), and the label value
//! constants. Renderers (`http::metrics`) and status adapters
//! (`server::status_source`, `client::status_source`) take names and help
//! texts from here instead of writing them out.
//!
//! Must never: change a name, a help text or a label value: dashboards
//! (`deploy/grafana`), alert rules (`deploy/prometheus`) and scrapers depend
//! on them byte for byte. Add families; do not rename them.

/// Whether a family only grows (counter), goes up and down (gauge) or is a
/// distribution (histogram).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MetricKind {
    /// Monotonic since start; name should end in `_total`.
    Counter,
    /// A current level.
    Gauge,
    /// Buckets, sum and count (`HistogramView`); in a free-form
    /// `MetricFamily` its samples are written as given (`_bucket` etc. are
    /// the caller's).
    Histogram,
}

/// Which role exports a family (the README table's "exported by" column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exporter {
    /// Server and client.
    Both,
    /// `metalbond server` only.
    Server,
    /// `metalbond client` only (the netlink families: with `--install-routes`).
    Client,
}

impl Exporter {
    /// The README's words for it.
    pub fn name(self) -> &'static str {
        match self {
            Exporter::Both => "both",
            Exporter::Server => "server",
            Exporter::Client => "client",
        }
    }
}

/// One metric family as `/metrics` declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// Metric name (already valid for Prometheus).
    pub name: &'static str,
    /// One-line `# HELP` text.
    pub help: &'static str,
    /// `# TYPE`.
    pub kind: MetricKind,
    /// Label names its samples carry, in order (the shard label of
    /// `queue_depth` only on per-shard queues).
    pub labels: &'static [&'static str],
    /// Who exports it.
    pub exporter: Exporter,
}

/// Shorthand for the table below.
const fn family(
    name: &'static str,
    help: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    exporter: Exporter,
) -> Family {
    Family {
        name,
        help,
        kind,
        labels,
        exporter,
    }
}

use Exporter::{Both, Client, Server};
use MetricKind::{Counter, Gauge, Histogram};

/// `metalbond_build_info{version,role}`.
pub const BUILD_INFO: Family = family(
    "metalbond_build_info",
    "Version and role of this process (always 1).",
    Gauge,
    &["version", "role"],
    Both,
);
/// `metalbond_peers{state}` (state: `SessionState::name()`).
pub const PEERS: Family = family(
    "metalbond_peers",
    "Peers (sessions) per session state.",
    Gauge,
    &["state"],
    Both,
);
/// `metalbond_routes`.
pub const ROUTES: Family = family(
    "metalbond_routes",
    "Routes (destination, next hop pairs) in all VNIs.",
    Gauge,
    &[],
    Both,
);
/// `metalbond_vni_routes{vni}`.
pub const VNI_ROUTES: Family = family(
    "metalbond_vni_routes",
    "Routes (destination, next hop pairs) per VNI.",
    Gauge,
    &["vni"],
    Both,
);
/// `metalbond_updates_received_total`.
pub const UPDATES_RECEIVED: Family = family(
    "metalbond_updates_received_total",
    "UPDATE messages received from peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_updates_sent_total`.
pub const UPDATES_SENT: Family = family(
    "metalbond_updates_sent_total",
    "UPDATE messages sent to peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_frames_written_total`.
pub const FRAMES_WRITTEN: Family = family(
    "metalbond_frames_written_total",
    "Frames of any type written to peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_bytes_written_total`.
pub const BYTES_WRITTEN: Family = family(
    "metalbond_bytes_written_total",
    "Bytes written to peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_frames_read_total`.
pub const FRAMES_READ: Family = family(
    "metalbond_frames_read_total",
    "Frames of any type read from peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_bytes_read_total`.
pub const BYTES_READ: Family = family(
    "metalbond_bytes_read_total",
    "Bytes read from peers.",
    Counter,
    &[],
    Both,
);
/// `metalbond_disconnects_total{reason}` (server: `CloseReason::label()`;
/// client: its session end causes).
pub const DISCONNECTS: Family = family(
    "metalbond_disconnects_total",
    "Sessions ended, by reason.",
    Counter,
    &["reason"],
    Both,
);
/// `metalbond_fanout_latency_seconds` (histogram).
pub const FANOUT_LATENCY: Family = family(
    "metalbond_fanout_latency_seconds",
    "Time from an UPDATE's arrival to its copies being written to subscribers.",
    Histogram,
    &[],
    Server,
);
/// `metalbond_queue_depth{queue,shard}` (queue: the `queue` constants).
pub const QUEUE_DEPTH: Family = family(
    "metalbond_queue_depth",
    "Items (or bytes, as the queue name says) waiting in a queue.",
    Gauge,
    &["queue", "shard"],
    Both,
);
/// `metalbond_netlink_operations_total{op}` (op: `NETLINK_OPS`).
pub const NETLINK_OPERATIONS: Family = family(
    "metalbond_netlink_operations_total",
    "Netlink requests acknowledged by the kernel, per operation.",
    Counter,
    &["op"],
    Client,
);
/// `metalbond_netlink_errors_total{op}` (op: `NETLINK_OPS`).
pub const NETLINK_ERRORS: Family = family(
    "metalbond_netlink_errors_total",
    "Netlink requests refused by the kernel, per operation.",
    Counter,
    &["op"],
    Client,
);
/// `metalbond_connections_refused_total{shard}`.
pub const CONNECTIONS_REFUSED: Family = family(
    "metalbond_connections_refused_total",
    "Connections accepted and closed at once because --max-peers was reached, per shard.",
    Counter,
    &["shard"],
    Server,
);
/// `metalbond_write_calls_total{shard}`.
pub const WRITE_CALLS: Family = family(
    "metalbond_write_calls_total",
    "Write syscalls (vectored or not) to peers, per shard.",
    Counter,
    &["shard"],
    Server,
);
/// `metalbond_catch_up_episodes_total{shard}`.
pub const CATCH_UP_EPISODES: Family = family(
    "metalbond_catch_up_episodes_total",
    "Times a subscriber fell behind on a VNI and was caught up from the owner's table instead of sent the live fan-out, per shard of the subscriber.",
    Counter,
    &["shard"],
    Server,
);
/// `metalbond_shard_batches_received_total{shard}`.
pub const SHARD_BATCHES_RECEIVED: Family = family(
    "metalbond_shard_batches_received_total",
    "Batches of changes received from other shards, per shard.",
    Counter,
    &["shard"],
    Server,
);
/// `metalbond_shard_routes{shard}`.
pub const SHARD_ROUTES: Family = family(
    "metalbond_shard_routes",
    "Routes in the VNI tables each shard owns.",
    Gauge,
    &["shard"],
    Server,
);
/// `metalbond_grace_routes{shard}`.
pub const GRACE_ROUTES: Family = family(
    "metalbond_grace_routes",
    "Routes of departed peers still held for --peer-grace, per shard.",
    Gauge,
    &["shard"],
    Server,
);
/// `metalbond_grace_peers`.
pub const GRACE_PEERS: Family = family(
    "metalbond_grace_peers",
    "Departed peers whose routes are held for --peer-grace.",
    Gauge,
    &[],
    Server,
);
/// `metalbond_shard_peers{shard}`.
pub const SHARD_PEERS: Family = family(
    "metalbond_shard_peers",
    "Peers (any state) held by each shard.",
    Gauge,
    &["shard"],
    Server,
);
/// `metalbond_policy_denied_total{rule,reason}` (with `--policy`).
pub const POLICY_DENIED: Family = family(
    "metalbond_policy_denied_total",
    "UPDATEs, SUBSCRIBEs and sessions refused by the peer policy, per rule and reason (rule \"(no rule)\": the peer's address matches none).",
    Counter,
    &["rule", "reason"],
    Server,
);
/// `metalbond_policy_rule_hits_total{rule}` (with `--policy`).
pub const POLICY_RULE_HITS: Family = family(
    "metalbond_policy_rule_hits_total",
    "Sessions whose source address resolved to the rule (at start and on each reload).",
    Counter,
    &["rule"],
    Server,
);
/// `metalbond_policy_withdrawn_total{rule}` (with `--policy`).
pub const POLICY_WITHDRAWN: Family = family(
    "metalbond_policy_withdrawn_total",
    "Routes withdrawn because a policy reload no longer allowed them, per rule.",
    Counter,
    &["rule"],
    Server,
);
/// `metalbond_update_rate_admitted_total{rule}` (with an update rate).
pub const UPDATE_RATE_ADMITTED: Family = family(
    "metalbond_update_rate_admitted_total",
    "UPDATEs admitted under a per-peer update rate (--max-updates-per-second or the rule's limits.max_updates_per_second), per rule (\"(no policy)\" without --policy).",
    Counter,
    &["rule"],
    Server,
);
/// `metalbond_update_rate_throttled_seconds_total{rule}` (with an update rate).
pub const UPDATE_RATE_THROTTLED: Family = family(
    "metalbond_update_rate_throttled_seconds_total",
    "Seconds peers spent waiting for their update rate (their sockets read more slowly, nothing dropped), per rule.",
    Counter,
    &["rule"],
    Server,
);
/// `metalbond_tcp_md5_dropped_total{reason}` (with a keyed policy rule).
pub const TCP_MD5_DROPPED: Family = family(
    "metalbond_tcp_md5_dropped_total",
    "TCP segments the kernel dropped for their TCP-MD5 signature, in the server's network namespace (all sockets): reason missing (unsigned where a key is set), unexpected (signed where none is), wrong (bad signature).",
    Counter,
    &["reason"],
    Server,
);
/// `metalbond_policy_info{revision,format_version}` (with `--policy`).
pub const POLICY_INFO: Family = family(
    "metalbond_policy_info",
    "The active peer policy (always 1): its file's revision and format version.",
    Gauge,
    &["revision", "format_version"],
    Server,
);
/// `metalbond_policy_generation` (with `--policy`).
pub const POLICY_GENERATION: Family = family(
    "metalbond_policy_generation",
    "Successful policy loads since start (1 = the start-up load).",
    Gauge,
    &[],
    Server,
);
/// `metalbond_policy_reload_failures_total` (with `--policy`).
pub const POLICY_RELOAD_FAILURES: Family = family(
    "metalbond_policy_reload_failures_total",
    "Policy reloads that failed (the running policy stayed).",
    Counter,
    &[],
    Server,
);
/// `metalbond_sessions_established_total`.
pub const SESSIONS_ESTABLISHED: Family = family(
    "metalbond_sessions_established_total",
    "Sessions that reached ESTABLISHED since the client started (grows with every reconnect).",
    Counter,
    &[],
    Client,
);
/// `metalbond_stale_routes`.
pub const STALE_ROUTES: Family = family(
    "metalbond_stale_routes",
    "Routes kept from lost server sessions and not received again yet (--stale-hold), summed over servers.",
    Gauge,
    &[],
    Client,
);

/// Every family, in the order `/metrics` shows them (server families after
/// the common ones, the policy's last; client families after the common
/// ones).
pub const ALL: &[Family] = &[
    BUILD_INFO,
    PEERS,
    ROUTES,
    VNI_ROUTES,
    UPDATES_RECEIVED,
    UPDATES_SENT,
    FRAMES_WRITTEN,
    BYTES_WRITTEN,
    FRAMES_READ,
    BYTES_READ,
    DISCONNECTS,
    FANOUT_LATENCY,
    QUEUE_DEPTH,
    NETLINK_OPERATIONS,
    NETLINK_ERRORS,
    CONNECTIONS_REFUSED,
    WRITE_CALLS,
    CATCH_UP_EPISODES,
    SHARD_BATCHES_RECEIVED,
    SHARD_ROUTES,
    GRACE_ROUTES,
    GRACE_PEERS,
    SHARD_PEERS,
    POLICY_DENIED,
    POLICY_RULE_HITS,
    POLICY_WITHDRAWN,
    UPDATE_RATE_ADMITTED,
    UPDATE_RATE_THROTTLED,
    TCP_MD5_DROPPED,
    POLICY_INFO,
    POLICY_GENERATION,
    POLICY_RELOAD_FAILURES,
    SESSIONS_ESTABLISHED,
    STALE_ROUTES,
];

/// Values of the `queue` label of `metalbond_queue_depth`.
pub mod queue {
    /// Server, per shard: bytes queued to that shard's peers.
    pub const PEER_OUT_BYTES: &str = "peer_out_bytes";
    /// Server, per shard: subscriptions being caught up from that shard's
    /// tables (subscribers that fell behind).
    pub const PEER_CATCH_UPS: &str = "peer_catch_ups";
    /// Client with `--install-routes`: route keys changed and not yet
    /// written to the kernel.
    pub const NETLINK_PENDING_ROUTES: &str = "netlink_pending_routes";
    /// Every value, for the README.
    pub const ALL: [&str; 3] = [PEER_OUT_BYTES, PEER_CATCH_UPS, NETLINK_PENDING_ROUTES];
}

/// Values of the `op` label of the netlink families, in the order
/// `/metrics` lists them.
pub mod netlink_op {
    /// RTM_NEWROUTE.
    pub const ROUTE_ADD: &str = "route_add";
    /// RTM_DELROUTE.
    pub const ROUTE_DELETE: &str = "route_delete";
    /// RTM_NEWNEXTHOP.
    pub const NEXTHOP_ADD: &str = "nexthop_add";
    /// RTM_DELNEXTHOP.
    pub const NEXTHOP_DELETE: &str = "nexthop_delete";
    /// Anything else.
    pub const OTHER: &str = "other";
    /// Every value, in order.
    pub const ALL: [&str; 5] = [ROUTE_ADD, ROUTE_DELETE, NEXTHOP_ADD, NEXTHOP_DELETE, OTHER];
}

/// The README's metric table (between its `metrics-table` markers),
/// generated from `ALL` so the two cannot drift.
pub fn readme_table() -> String {
    let mut out =
        String::from("| family | type | labels | exported by | meaning |\n|---|---|---|---|---|\n");
    for f in ALL {
        let kind = match f.kind {
            Counter => "counter",
            Gauge => "gauge",
            Histogram => "histogram",
        };
        let labels = f
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "| `{}` | {kind} | {labels} | {} | {} |\n",
            f.name,
            f.exporter.name(),
            f.help.replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are unique and valid (lower case, digits, `_`; `metalbond_`
    /// first), counters end in `_total`.
    #[test]
    fn names_are_unique_and_well_formed() {
        for (i, f) in ALL.iter().enumerate() {
            assert!(ALL[i + 1..].iter().all(|g| g.name != f.name), "{}", f.name);
            assert!(f.name.starts_with("metalbond_"), "{}", f.name);
            assert!(
                f.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                f.name
            );
            assert_eq!(f.kind == Counter, f.name.ends_with("_total"), "{}", f.name);
        }
    }
}
