//! `StatusSource` for the route reflector: turns `ServerHandle`'s counters
//! and snapshots into the status views.
//!
//! Owns: the mapping from `ServerStats` / `PeerInfo` / `VniRoutes` to
//! `MetricsView` / `PeerView` / `RouteTableView`, and the cache that keeps
//! per-VNI route counts from costing a table copy on every scrape.
//!
//! Must never: call into the shards more than the handle's own snapshot
//! methods do (counters are atomics; `routes()` and `peers()` are one
//! control message per shard, answered between two tasks).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::server::{PeerInfo, ServerHandle};
use crate::session::SessionState;
use crate::types::Vni;

use super::model::{
    count_states, MetricFamily, MetricKind, MetricsView, PeerView, QueueDepth, RouteTableView,
    StatusRole,
};
use super::StatusSource;

/// How long per-VNI route counts for `/metrics` are reused. The total comes
/// from the shards' atomics and is always current.
pub const VNI_COUNTS_MAX_AGE: Duration = Duration::from_secs(2);

/// Route count per VNI, ascending by VNI.
type VniCounts = Vec<(Vni, u64)>;

/// The reflector as the status pages see it.
pub struct ServerStatusSource {
    /// The running server (shared with `server::run`, which shuts it down
    /// after the HTTP side has stopped).
    handle: Arc<ServerHandle>,
    /// Per-VNI route counts and when they were taken.
    vni_counts: Mutex<Option<(Instant, VniCounts)>>,
}

impl ServerStatusSource {
    /// Status of `handle`.
    pub fn new(handle: Arc<ServerHandle>) -> ServerStatusSource {
        ServerStatusSource {
            handle,
            vni_counts: Mutex::new(None),
        }
    }

    fn routes_per_vni(&self) -> VniCounts {
        let mut slot = match self.vni_counts.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((at, counts)) = slot.as_ref() {
            if at.elapsed() < VNI_COUNTS_MAX_AGE {
                return counts.clone();
            }
        }
        let counts: VniCounts = self
            .handle
            .routes()
            .iter()
            .map(|v| (v.vni, v.routes.len() as u64))
            .collect();
        *slot = Some((Instant::now(), counts.clone()));
        counts
    }
}

impl StatusSource for ServerStatusSource {
    fn role(&self) -> StatusRole {
        StatusRole::Server
    }

    fn routes(&self) -> RouteTableView {
        RouteTableView::from_routes(
            self.handle
                .routes()
                .into_iter()
                .flat_map(|v| v.routes.into_iter().map(move |(d, h)| (v.vni, d, h))),
        )
    }

    fn peers(&self) -> Vec<PeerView> {
        self.handle.peers().into_iter().map(peer_view).collect()
    }

    fn policy(&self) -> Option<crate::policy::PolicyStatus> {
        self.handle.policy().map(|p| p.status())
    }

    fn metrics(&self) -> MetricsView {
        let stats = self.handle.stats();
        let peers = self.handle.peers();
        let sum = |f: fn(&crate::server::ShardStats) -> u64| stats.sum(f);

        let mut queue_depths = Vec::new();
        for shard in &stats.shards {
            let on_shard = peers.iter().filter(|p| p.shard == shard.shard);
            let (bytes, coalesced) = on_shard.fold((0u64, 0u64), |(b, c), p| {
                (b + p.queued_bytes as u64, c + p.coalesced_routes as u64)
            });
            queue_depths.push(QueueDepth {
                queue: "peer_out_bytes".into(),
                shard: Some(shard.shard),
                depth: bytes,
            });
            queue_depths.push(QueueDepth {
                queue: "peer_coalesced_routes".into(),
                shard: Some(shard.shard),
                depth: coalesced,
            });
        }

        let mut disconnects_by_reason: Vec<(String, u64)> =
            crate::server::DisconnectCounts::default()
                .by_reason()
                .iter()
                .map(|(reason, _)| (reason.to_string(), 0))
                .collect();
        for shard in &stats.shards {
            let counts = shard.disconnects.by_reason();
            for (slot, (_, n)) in disconnects_by_reason.iter_mut().zip(counts) {
                slot.1 += n;
            }
        }

        let per_shard =
            |name: &str, help: &str, kind: MetricKind, f: fn(&crate::server::ShardStats) -> u64| {
                MetricFamily {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    samples: stats
                        .shards
                        .iter()
                        .map(|s| super::model::MetricSample {
                            labels: vec![("shard".to_string(), s.shard.to_string())],
                            value: f(s) as f64,
                        })
                        .collect(),
                }
            };

        let mut extra = vec![
            per_shard(
                "metalbond_connections_refused_total",
                "Connections accepted and closed at once because --max-peers was reached, per shard.",
                MetricKind::Counter,
                |s| s.connections_refused,
            ),
            per_shard(
                "metalbond_write_calls_total",
                "Write syscalls (vectored or not) to peers, per shard.",
                MetricKind::Counter,
                |s| s.write_calls,
            ),
            per_shard(
                "metalbond_coalesce_episodes_total",
                "Times a slow subscriber was switched to per-route coalescing, per shard.",
                MetricKind::Counter,
                |s| s.coalesce_episodes,
            ),
            per_shard(
                "metalbond_shard_batches_received_total",
                "Batches of changes received from other shards, per shard.",
                MetricKind::Counter,
                |s| s.shard_batches_in,
            ),
            per_shard(
                "metalbond_shard_routes",
                "Routes in the VNI tables each shard owns.",
                MetricKind::Gauge,
                |s| s.routes,
            ),
            per_shard(
                "metalbond_grace_routes",
                "Routes of departed peers still held for --peer-grace, per shard.",
                MetricKind::Gauge,
                |s| s.grace_routes,
            ),
            MetricFamily::single(
                "metalbond_grace_peers",
                "Departed peers whose routes are held for --peer-grace.",
                MetricKind::Gauge,
                peers.iter().filter(|p| p.grace_left.is_some()).count() as f64,
            ),
            per_shard(
                "metalbond_shard_peers",
                "Peers (any state) held by each shard.",
                MetricKind::Gauge,
                |s| s.peers_established + s.peers_handshaking,
            ),
        ];
        if let Some(policy) = self.handle.policy() {
            extra.extend(policy_families(&policy.status()));
        }

        MetricsView {
            peers_by_state: count_states(
                &[
                    SessionState::Connecting,
                    SessionState::HelloReceived,
                    SessionState::Established,
                ],
                peers
                    .iter()
                    .filter(|p| p.grace_left.is_none())
                    .map(|p| p.state),
            ),
            routes_per_vni: self.routes_per_vni(),
            routes_total: sum(|s| s.routes),
            updates_in: Some(sum(|s| s.updates_in)),
            updates_out: Some(sum(|s| s.updates_out)),
            frames_written: Some(sum(|s| s.frames_written)),
            bytes_written: Some(sum(|s| s.bytes_written)),
            frames_read: Some(sum(|s| s.frames_read)),
            bytes_read: Some(sum(|s| s.bytes_read)),
            disconnects_by_reason,
            fanout_latency: Some(self.handle.fanout_latency()),
            queue_depths,
            netlink: None,
            extra,
        }
    }
}

/// The policy's families: refusals per rule and reason (non-zero series
/// only: 1,000 rules × 6 reasons would be mostly zeros), sessions per rule,
/// routes withdrawn by reloads, the active revision and generation.
fn policy_families(p: &crate::policy::PolicyStatus) -> Vec<MetricFamily> {
    use super::model::MetricSample;
    let sample = |labels: Vec<(&str, &str)>, value: u64| MetricSample {
        labels: labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        value: value as f64,
    };
    let family = |name: &str, help: &str, kind, samples| MetricFamily {
        name: name.into(),
        help: help.into(),
        kind,
        samples,
    };
    let mut denied = Vec::new();
    let mut hits = Vec::new();
    let mut withdrawn = Vec::new();
    for r in &p.rules {
        for (reason, n) in &r.denied {
            denied.push(sample(vec![("rule", &r.name), ("reason", reason)], *n));
        }
        if r.name != crate::policy::NO_RULE_LABEL {
            hits.push(sample(vec![("rule", &r.name)], r.hits));
        }
        if r.withdrawn > 0 {
            withdrawn.push(sample(vec![("rule", &r.name)], r.withdrawn));
        }
    }
    vec![
        family(
            "metalbond_policy_denied_total",
            "UPDATEs, SUBSCRIBEs and sessions refused by the peer policy, per rule and reason (rule \"(no rule)\": the peer's address matches none).",
            MetricKind::Counter,
            denied,
        ),
        family(
            "metalbond_policy_rule_hits_total",
            "Sessions whose source address resolved to the rule (at start and on each reload).",
            MetricKind::Counter,
            hits,
        ),
        family(
            "metalbond_policy_withdrawn_total",
            "Routes withdrawn because a policy reload no longer allowed them, per rule.",
            MetricKind::Counter,
            withdrawn,
        ),
        family(
            "metalbond_policy_info",
            "The active peer policy (always 1): its file's revision and format version.",
            MetricKind::Gauge,
            vec![sample(
                vec![
                    ("revision", p.revision.as_deref().unwrap_or("")),
                    ("format_version", &p.format_version.to_string()),
                ],
                1,
            )],
        ),
        family(
            "metalbond_policy_generation",
            "Successful policy loads since start (1 = the start-up load).",
            MetricKind::Gauge,
            vec![sample(vec![], p.generation)],
        ),
        family(
            "metalbond_policy_reload_failures_total",
            "Policy reloads that failed (the running policy stayed).",
            MetricKind::Counter,
            vec![sample(vec![], p.failed_reloads)],
        ),
    ]
}

fn peer_view(p: PeerInfo) -> PeerView {
    PeerView {
        address: p.addr.to_string(),
        state: p.state,
        shard: Some(p.shard),
        keepalive: Some(p.keepalive),
        routes_announced: p.routes_announced as u64,
        routes_received: None,
        vnis_subscribed: p.vnis_subscribed,
        frames_in: Some(p.frames_in),
        bytes_in: Some(p.bytes_in),
        frames_out: Some(p.frames_out),
        bytes_out: Some(p.bytes_out),
        queued_bytes: Some(p.queued_bytes as u64),
        connected_since: Some(p.connected_since),
        grace_left: p.grace_left.map(|d| Duration::from_secs(d.as_secs())),
    }
}
