//! The client's `StatusSource`: what the status pages (`/`, `/routes.json`,
//! `/routes.yaml`, `/peers`, `/metrics`; served by `http`, which the binary
//! wires to it for `--http ADDR`) show of the client's state.
//!
//! Owns: `ClientStatusSource`, the mapping from the client's core (servers,
//! subscriptions, announcements, present routes, disconnects), its traffic
//! counters and the kernel-route worker's counters and per-route states to
//! the status views.
//!
//! Must never: hold the client lock while rendering or writing (each view
//! is copied under one short lock), or keep a stopped client alive (it
//! holds a `Weak`).

use std::net::IpAddr;
use std::sync::{Arc, Weak};

use super::state::ClientInner;
use super::Client;
use metalbond_telemetry::families::{self, queue};
use metalbond_telemetry::status::{
    count_states, MetricFamily, MetricsView, NextHopEntryView, PeerView, QueueDepth, ReadyLatch,
    RouteTableView, RoutesPageView, RoutesRequest, StatusRole, StatusSource, VniSummaryView,
};
use metalbond_telemetry::{KernelRouteState, KernelStatsSource};
use metalbond_wire::session::SessionState;
use metalbond_wire::types::{IpNet, Route, Vni};

/// The client as the status pages see it.
pub struct ClientStatusSource {
    /// The client's shared state; gone once the client is dropped.
    inner: Weak<ClientInner>,
    /// The kernel-route worker's counters, when routes are installed.
    netlink: Option<Box<dyn KernelStatsSource>>,
    /// What the start-up rule decided (the binary's `readiness::ClientReadiness`,
    /// which `metalbond client` applies); `None`: an embedder's client with no
    /// rule, always ready.
    ready: Option<ReadyLatch>,
}

impl ClientStatusSource {
    /// Status of `client`; `netlink` adds the kernel-route worker's
    /// counters to `/metrics` when the client installs routes. Hand it to
    /// `http::serve` (the binary does, for `--http`).
    pub fn new(client: &Client, netlink: Option<Box<dyn KernelStatsSource>>) -> ClientStatusSource {
        ClientStatusSource {
            inner: Arc::downgrade(client.inner()),
            netlink,
            ready: None,
        }
    }

    /// `/readyz` answers what `latch` holds (the binary shares it with the
    /// rule that sends systemd `READY=1`).
    pub fn with_readiness(mut self, latch: ReadyLatch) -> ClientStatusSource {
        self.ready = Some(latch);
        self
    }
}

impl StatusSource for ClientStatusSource {
    fn role(&self) -> StatusRole {
        StatusRole::Client
    }

    fn readiness(&self) -> Result<String, String> {
        match &self.ready {
            Some(latch) => latch.get(),
            None => Ok("ready".into()),
        }
    }

    fn route_page(&self, request: &RoutesRequest) -> Result<RoutesPageView, String> {
        let Some(inner) = self.inner.upgrade() else {
            return Err("the client has shut down".into());
        };
        let core = inner.lock();
        // Sorted by route, so each route's `since` is a binary search away.
        let received = core.present.present_in(request.vni);
        if received.is_empty() {
            return Err(format!("no routes received in VNI {}", request.vni));
        }
        let all: Vec<Route> = received.iter().map(|(r, _)| *r).collect();
        let (routes, next) = request.select_from(&all);
        let since = |r: &Route| {
            received
                .binary_search_by(|(x, _)| x.cmp(r))
                .ok()
                .map(|i| received[i].1.to_system_time())
        };
        let hops: Vec<NextHopEntryView> = routes
            .iter()
            .map(|r| {
                let mut from = Vec::new();
                let mut fresh = false;
                for (id, s) in &core.servers {
                    if core.present.holds(*id, r) {
                        from.push(s.address.clone());
                        fresh |= core.present.holds_fresh(*id, r);
                    }
                }
                from.sort();
                NextHopEntryView {
                    next_hop: r.next_hop,
                    announced_by: from,
                    stale: Some(!fresh),
                    since: since(r),
                    kernel: None,
                }
            })
            .collect();
        drop(core);
        // The kernel's view after the client's lock is released: the two
        // locks are never held together.
        let keys: Vec<(IpNet, IpAddr)> = routes
            .iter()
            .map(|r| (r.destination, r.next_hop.target))
            .collect();
        let states = match &self.netlink {
            Some(kernel) => kernel.route_states(request.vni, &keys),
            None => vec![KernelRouteState::NotInstalled; keys.len()],
        };
        let annotated = routes
            .iter()
            .zip(hops)
            .zip(states)
            .map(|((r, mut hop), state)| {
                hop.kernel = Some(state);
                (r.vni, r.destination, hop)
            });
        Ok(RoutesPageView::grouped(annotated, next))
    }

    fn vni_summaries(&self) -> Vec<VniSummaryView> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let digests = inner.lock().present.digests();
        digests
            .into_iter()
            .map(|(vni, digest)| VniSummaryView {
                vni,
                subscribers: None,
                digest,
            })
            .collect()
    }

    fn routes(&self) -> RouteTableView {
        let routes = match self.inner.upgrade() {
            Some(inner) => inner.lock().present.present(),
            None => Vec::new(),
        };
        RouteTableView::from_routes(
            routes
                .into_iter()
                .map(|r| (r.vni, r.destination, r.next_hop)),
        )
    }

    fn peers(&self) -> Vec<PeerView> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        let core = inner.lock();
        let announced = core.announcements.len() as u64;
        let subscribed: Vec<Vni> = core.subscriptions.iter().copied().collect();
        core.servers
            .iter()
            .map(|(id, s)| {
                let traffic = s.traffic.snapshot();
                PeerView {
                    address: s.address.clone(),
                    state: s.state,
                    shard: None,
                    keepalive: s.keepalive,
                    routes_announced: announced,
                    routes_received: Some(core.present.held_by(*id) as u64),
                    vnis_subscribed: subscribed.clone(),
                    frames_in: Some(traffic.frames_in),
                    bytes_in: Some(traffic.bytes_in),
                    frames_out: Some(traffic.frames_out),
                    bytes_out: Some(traffic.bytes_out),
                    queued_bytes: None,
                    connected_since: s.connected_since,
                    grace_left: None,
                    peer_id: None,
                    routes_stale: Some(core.present.stale_held_by(*id) as u64),
                    policy_rule: None,
                    tcp_md5: Some(s.md5),
                    throttled: None,
                }
            })
            .collect()
    }

    fn metrics(&self) -> MetricsView {
        let Some(inner) = self.inner.upgrade() else {
            return MetricsView::default();
        };
        let (states, present, disconnects, established, stale) = {
            let core = inner.lock();
            let states: Vec<SessionState> = core.servers.values().map(|s| s.state).collect();
            let disconnects: Vec<(String, u64)> = core
                .disconnects
                .iter()
                .map(|(reason, n)| (reason.to_string(), *n))
                .collect();
            let stale: usize = core
                .servers
                .keys()
                .map(|id| core.present.stale_held_by(*id))
                .sum();
            (
                states,
                core.present.present(),
                disconnects,
                core.sessions_established,
                stale,
            )
        };
        let traffic = inner.totals.snapshot();
        let peers_by_state = count_states(
            &[
                SessionState::Connecting,
                SessionState::HelloSent,
                SessionState::Established,
                SessionState::Retry,
            ],
            states,
        );
        let table = RouteTableView::from_routes(
            present
                .into_iter()
                .map(|r| (r.vni, r.destination, r.next_hop)),
        );
        MetricsView {
            peers_by_state,
            routes_per_vni: table.routes_per_vni(),
            routes_total: table.route_count() as u64,
            updates_in: Some(traffic.updates_in),
            updates_out: Some(traffic.updates_out),
            frames_written: Some(traffic.frames_out),
            bytes_written: Some(traffic.bytes_out),
            frames_read: Some(traffic.frames_in),
            bytes_read: Some(traffic.bytes_in),
            disconnects_by_reason: disconnects,
            netlink: self.netlink.as_ref().map(|n| n.view()),
            queue_depths: self
                .netlink
                .as_ref()
                .map(|n| {
                    vec![QueueDepth {
                        queue: queue::NETLINK_PENDING_ROUTES.into(),
                        shard: None,
                        depth: n.pending_routes(),
                    }]
                })
                .unwrap_or_default(),
            extra: vec![
                MetricFamily::single_of(&families::SESSIONS_ESTABLISHED, established as f64),
                MetricFamily::single_of(&families::STALE_ROUTES, stale as f64),
            ],
            ..MetricsView::default()
        }
    }
}
