//! `StatusSource` for the route reflector: turns `ServerHandle`'s counters
//! and snapshots into the status views (`telemetry::status`). The binary
//! hands it to `http::serve`; the server itself never imports `http`.
//!
//! Owns: the mapping from `ServerStats` / `PeerInfo` / `VniRoutes` to
//! `MetricsView` / `PeerView` / `RouteTableView`, and the cache that keeps
//! per-VNI route counts from costing a table copy on every scrape.
//!
//! Must never: call into the shards more than the handle's own snapshot
//! methods do (counters are atomics; `routes()` and `peers()` are one
//! control message per shard, answered between two tasks).

use std::sync::Arc;
use std::time::Duration;

use super::{DisconnectCounts, PeerId, PeerInfo, RouteQuery, ServerHandle, ShardStats};
use metalbond_telemetry::families::{self, Family};
use metalbond_telemetry::status::{
    count_states, MetricFamily, MetricSample, MetricsView, NextHopEntryView, PeerView, QueueDepth,
    RouteSelect, RouteTableView, RoutesPageView, RoutesRequest, StatusRole, StatusSource,
    VniSummaryView,
};
use metalbond_utils::TtlCache;
use metalbond_wire::session::SessionState;
use metalbond_wire::types::Vni;

/// How long per-VNI route counts for `/metrics` are reused. The total comes
/// from the shards' atomics and is always current.
pub const VNI_COUNTS_MAX_AGE: Duration = Duration::from_secs(2);

/// Route count per VNI, ascending by VNI.
type VniCounts = Vec<(Vni, u64)>;

/// The reflector as the status pages see it.
pub struct ServerStatusSource {
    /// The running server (shared with `metalbond server`, which shuts it down
    /// after the HTTP side has stopped).
    handle: Arc<ServerHandle>,
    /// Per-VNI route counts, reused for `VNI_COUNTS_MAX_AGE`.
    vni_counts: TtlCache<VniCounts>,
    /// Peer addresses by id, reused for `VNI_COUNTS_MAX_AGE`.
    peer_addresses: TtlCache<Arc<std::collections::HashMap<PeerId, std::net::SocketAddr>>>,
}

impl ServerStatusSource {
    /// Status of `handle`.
    pub fn new(handle: Arc<ServerHandle>) -> ServerStatusSource {
        ServerStatusSource {
            handle,
            vni_counts: TtlCache::new(VNI_COUNTS_MAX_AGE),
            peer_addresses: TtlCache::new(VNI_COUNTS_MAX_AGE),
        }
    }

    /// Peer id → address of every peer and ghost, reused for
    /// `VNI_COUNTS_MAX_AGE` (a route page names its announcers by id).
    fn peer_addresses(&self) -> Arc<std::collections::HashMap<PeerId, std::net::SocketAddr>> {
        self.peer_addresses.get_or_compute(|| {
            Arc::new(
                self.handle
                    .peers()
                    .into_iter()
                    .map(|p| (p.id, p.addr))
                    .collect(),
            )
        })
    }

    fn routes_per_vni(&self) -> VniCounts {
        self.vni_counts.get_or_compute(|| {
            self.handle
                .routes()
                .iter()
                .map(|v| (v.vni, v.routes.len() as u64))
                .collect()
        })
    }
}

impl StatusSource for ServerStatusSource {
    fn role(&self) -> StatusRole {
        StatusRole::Server
    }

    fn readiness(&self) -> Result<String, String> {
        Ok(self.handle.ready_line())
    }

    fn route_page(&self, request: &RoutesRequest) -> Result<RoutesPageView, String> {
        let query = match request.select {
            RouteSelect::Page { after, limit } => RouteQuery::Page {
                after,
                destinations: limit,
            },
            RouteSelect::Prefix(p) => RouteQuery::Prefix(p),
            RouteSelect::Lookup(a) => RouteQuery::Lookup(a),
        };
        let Some(page) = self.handle.route_query(request.vni, query) else {
            return Err(format!("no routes or subscribers in VNI {}", request.vni));
        };
        let addresses = self.peer_addresses();
        let next = if page.more {
            page.routes.last().map(|r| r.route.destination)
        } else {
            None
        };
        // Each route with its announcers' addresses, in page order.
        let annotated = page.routes.into_iter().map(|r| {
            let announced_by = r
                .announcers
                .iter()
                .map(|id| {
                    addresses
                        .get(id)
                        .map_or_else(|| format!("peer {id}"), ToString::to_string)
                })
                .collect();
            let hop = NextHopEntryView {
                next_hop: r.route.next_hop,
                announced_by,
                stale: None,
                since: Some(r.since.to_system_time()),
                kernel: None,
            };
            (r.route.vni, r.route.destination, hop)
        });
        Ok(RoutesPageView::grouped(annotated, next))
    }

    fn vni_summaries(&self) -> Vec<VniSummaryView> {
        self.handle
            .vni_summaries()
            .into_iter()
            .map(|v| VniSummaryView {
                vni: v.vni,
                subscribers: Some(v.subscribers),
                digest: v.digest,
            })
            .collect()
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
        let policy = self.handle.policy().map(|p| p.current());
        self.handle
            .peers()
            .into_iter()
            .map(|p| {
                let rule = policy.as_ref().map(|policy| {
                    policy.rule_for(p.addr.ip()).map_or_else(
                        || metalbond_telemetry::status::NO_RULE_LABEL.to_string(),
                        |r| r.name.clone(),
                    )
                });
                PeerView {
                    policy_rule: rule,
                    tcp_md5: None,
                    ..peer_view(p)
                }
            })
            .collect()
    }

    fn policy(&self) -> Option<metalbond_telemetry::status::PolicyStatus> {
        self.handle.policy().map(|p| p.status())
    }

    fn metrics(&self) -> MetricsView {
        let stats = self.handle.stats();
        let peers = self.handle.peers();
        let sum = |f: fn(&ShardStats) -> u64| stats.sum(f);

        let mut queue_depths = Vec::new();
        for shard in &stats.shards {
            let on_shard = peers.iter().filter(|p| p.shard == shard.shard);
            let bytes = on_shard.fold(0u64, |b, p| b + p.queued_bytes as u64);
            queue_depths.push(QueueDepth {
                queue: families::queue::PEER_OUT_BYTES.into(),
                shard: Some(shard.shard),
                depth: bytes,
            });
            queue_depths.push(QueueDepth {
                queue: families::queue::PEER_CATCH_UPS.into(),
                shard: Some(shard.shard),
                depth: shard.catch_ups,
            });
        }

        let mut disconnects_by_reason: Vec<(String, u64)> = DisconnectCounts::default()
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

        let per_shard = |family: &Family, f: fn(&ShardStats) -> u64| {
            MetricFamily::of(
                family,
                stats
                    .shards
                    .iter()
                    .map(|s| MetricSample::new(&[("shard", &s.shard.to_string())], f(s)))
                    .collect(),
            )
        };

        let mut extra = vec![
            per_shard(&families::CONNECTIONS_REFUSED, |s| s.connections_refused),
            per_shard(&families::WRITE_CALLS, |s| s.write_calls),
            per_shard(&families::CATCH_UP_EPISODES, |s| s.catch_up_episodes),
            per_shard(&families::SHARD_BATCHES_RECEIVED, |s| s.shard_batches_in),
            per_shard(&families::SHARD_ROUTES, |s| s.routes),
            per_shard(&families::GRACE_ROUTES, |s| s.grace_routes),
            MetricFamily::single_of(
                &families::GRACE_PEERS,
                peers.iter().filter(|p| p.grace_left.is_some()).count() as f64,
            ),
            per_shard(&families::SHARD_PEERS, |s| {
                s.peers_established + s.peers_handshaking
            }),
        ];
        if self
            .handle
            .policy()
            .is_some_and(|p| p.current().rules.iter().any(|r| r.auth.is_some()))
        {
            extra.push(md5_drops());
        }
        match self.handle.policy() {
            Some(policy) => extra.extend(policy_families(&policy.status())),
            None => {
                // `--max-updates-per-second` without a policy: one series.
                let admitted: u64 = stats.shards.iter().map(|s| s.rate_admitted).sum();
                let micros: u64 = stats.shards.iter().map(|s| s.rate_throttled_micros).sum();
                if admitted > 0 || micros > 0 {
                    let label = [("rule", metalbond_telemetry::status::NO_POLICY_LABEL)];
                    extra.push(MetricFamily::of(
                        &families::UPDATE_RATE_ADMITTED,
                        vec![MetricSample::new(&label, admitted)],
                    ));
                    extra.push(MetricFamily::of(
                        &families::UPDATE_RATE_THROTTLED,
                        vec![MetricSample::float(&label, micros as f64 / 1e6)],
                    ));
                }
            }
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

/// The kernel's TCP-MD5 drop counters (`/proc/net/netstat`, `TcpExt`
/// `TCPMD5NotFound`, `TCPMD5Unexpected`, `TCPMD5Failure`): what a keyed
/// rule turned away. Namespace-wide, as the kernel counts them; zeros if
/// the file cannot be read.
fn md5_drops() -> MetricFamily {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let counters = tcp_ext_counters(&netstat);
    let samples = [
        ("missing", "TCPMD5NotFound"),
        ("unexpected", "TCPMD5Unexpected"),
        ("wrong", "TCPMD5Failure"),
    ]
    .iter()
    .map(|(reason, field)| {
        let n = counters
            .iter()
            .find(|(k, _)| k == field)
            .map_or(0, |(_, v)| *v);
        MetricSample::new(&[("reason", reason)], n)
    })
    .collect();
    MetricFamily::of(&families::TCP_MD5_DROPPED, samples)
}

/// The `TcpExt:` counters of `/proc/net/netstat` text (a line of names,
/// then a line of values).
fn tcp_ext_counters(netstat: &str) -> Vec<(String, u64)> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// The policy's families: refusals per rule and reason (non-zero series
/// only: 1,000 rules × 7 reasons would be mostly zeros), sessions per rule,
/// routes withdrawn by reloads, the active revision and generation.
fn policy_families(p: &metalbond_telemetry::status::PolicyStatus) -> Vec<MetricFamily> {
    let mut denied = Vec::new();
    let mut hits = Vec::new();
    let mut withdrawn = Vec::new();
    let mut admitted = Vec::new();
    let mut throttled = Vec::new();
    for r in &p.rules {
        if r.updates_admitted > 0 || r.throttled_seconds > 0.0 {
            admitted.push(MetricSample::new(&[("rule", &r.name)], r.updates_admitted));
            throttled.push(MetricSample::float(
                &[("rule", &r.name)],
                r.throttled_seconds,
            ));
        }
        for (reason, n) in &r.denied {
            denied.push(MetricSample::new(
                &[("rule", &r.name), ("reason", reason)],
                *n,
            ));
        }
        if r.name != metalbond_telemetry::status::NO_RULE_LABEL {
            hits.push(MetricSample::new(&[("rule", &r.name)], r.hits));
        }
        if r.withdrawn > 0 {
            withdrawn.push(MetricSample::new(&[("rule", &r.name)], r.withdrawn));
        }
    }
    vec![
        MetricFamily::of(&families::POLICY_DENIED, denied),
        MetricFamily::of(&families::POLICY_RULE_HITS, hits),
        MetricFamily::of(&families::POLICY_WITHDRAWN, withdrawn),
        MetricFamily::of(&families::UPDATE_RATE_ADMITTED, admitted),
        MetricFamily::of(&families::UPDATE_RATE_THROTTLED, throttled),
        MetricFamily::of(
            &families::POLICY_INFO,
            vec![MetricSample::new(
                &[
                    ("revision", p.revision.as_deref().unwrap_or("")),
                    ("format_version", &p.format_version.to_string()),
                ],
                1,
            )],
        ),
        MetricFamily::of(
            &families::POLICY_GENERATION,
            vec![MetricSample::new(&[], p.generation)],
        ),
        MetricFamily::of(
            &families::POLICY_RELOAD_FAILURES,
            vec![MetricSample::new(&[], p.failed_reloads)],
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
        peer_id: Some(p.id.to_string()),
        routes_stale: None,
        policy_rule: None,
        tcp_md5: None,
        throttled: Some(p.throttled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_ext_counters_pair_names_with_values() {
        let text = "TcpExt: SyncookiesSent TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure\nTcpExt: 0 7 1 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        let c = tcp_ext_counters(text);
        assert_eq!(c.len(), 4);
        assert!(c.contains(&("TCPMD5NotFound".to_string(), 7)));
        assert!(c.contains(&("TCPMD5Failure".to_string(), 3)));
        assert!(tcp_ext_counters("").is_empty());
    }
}
