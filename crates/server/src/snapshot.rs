//! Counters and snapshots readable from outside the shards.
//!
//! Owns: `ShardCounters` (relaxed atomics each shard bumps on its own
//! thread; readers on other threads never lock or slow it) and the plain
//! snapshot structs returned by `ServerHandle::{stats, peers, routes}` for
//! the HTTP/metrics work.
//!
//! Must never: hold a lock on the data path, or carry protocol logic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use metalbond_telemetry::{HistogramView, LatencyHistogram};
use metalbond_wire::session::{CloseReason, SessionState};
use metalbond_wire::types::{IpNet, NextHop, Vni};

/// Why peers left, one counter per cause (see `DisconnectCounts`).
#[derive(Debug, Default)]
struct DisconnectCounters {
    eof: AtomicU64,
    io: AtomicU64,
    timeout: AtomicU64,
    protocol: AtomicU64,
    malformed: AtomicU64,
    slow_peer: AtomicU64,
    limit: AtomicU64,
    shutdown: AtomicU64,
    handshake_timeout: AtomicU64,
    evicted: AtomicU64,
    policy: AtomicU64,
}

impl DisconnectCounters {
    /// The counter of a `CloseReason::label()` (the names of
    /// `DisconnectCounts::by_reason`); `None` for labels only the client
    /// uses.
    fn by_label(&self, label: &str) -> Option<&AtomicU64> {
        Some(match label {
            "eof" => &self.eof,
            "io" => &self.io,
            "timeout" => &self.timeout,
            "protocol" => &self.protocol,
            "malformed" => &self.malformed,
            "slow_peer" => &self.slow_peer,
            "limit" => &self.limit,
            "shutdown" => &self.shutdown,
            "handshake_timeout" => &self.handshake_timeout,
            "evicted" => &self.evicted,
            "policy" => &self.policy,
            _ => return None,
        })
    }
}

/// One shard's live counters. Written only by the shard's thread.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Peers before the handshake completes (CONNECTING / HELLO_RECEIVED).
    peers_handshaking: AtomicU64,
    /// Peers ESTABLISHED.
    peers_established: AtomicU64,
    /// Routes in the VNI tables this shard owns.
    routes: AtomicU64,
    /// UPDATE messages received from this shard's peers.
    updates_in: AtomicU64,
    /// UPDATE frames written to this shard's peers.
    updates_out: AtomicU64,
    /// Frames of any type written to this shard's peers.
    frames_written: AtomicU64,
    /// Bytes written to this shard's peers.
    bytes_written: AtomicU64,
    /// Write syscalls (vectored or not) to this shard's peers.
    write_calls: AtomicU64,
    /// Frames of any type decoded from this shard's peers.
    frames_read: AtomicU64,
    /// Bytes read from this shard's peers.
    bytes_read: AtomicU64,
    /// Times a peer fell behind on a VNI and was handed to catch-up.
    catch_up_episodes: AtomicU64,
    /// Catch-ups in progress on this shard's owned VNIs (a gauge).
    catch_ups: AtomicU64,
    /// Batches of messages received from other shards.
    shard_batches_in: AtomicU64,
    /// Connections accepted and closed at once: `--max-peers` reached with
    /// every place held by an established session (nobody to evict).
    connections_refused: AtomicU64,
    /// UPDATEs admitted under `--max-updates-per-second` (sessions
    /// without a policy rule; a rule counts its own).
    rate_admitted: AtomicU64,
    /// Microseconds those sessions waited for their update rate.
    rate_throttled_micros: AtomicU64,
    /// Disconnects by cause.
    disconnects: DisconnectCounters,
    /// Time from the owner taking a change to the fan-out batch carrying it
    /// being written to a subscriber of this shard (lock-free buckets).
    fanout_latency: LatencyHistogram,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl ShardCounters {
    pub(crate) fn peer_connected(&self) {
        add(&self.peers_handshaking, 1);
    }
    pub(crate) fn peer_established(&self) {
        self.peers_handshaking.fetch_sub(1, Ordering::Relaxed);
        add(&self.peers_established, 1);
    }
    /// A peer's task ended for `reason`: counted under `reason.label()`,
    /// the same label its log line carries.
    pub(crate) fn peer_gone(&self, was_established: bool, reason: &CloseReason) {
        if was_established {
            self.peers_established.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.peers_handshaking.fetch_sub(1, Ordering::Relaxed);
        }
        match self.disconnects.by_label(reason.label()) {
            Some(c) => add(c, 1),
            None => tracing::error!(
                kind = reason.label(),
                "no disconnect counter for this close reason"
            ),
        }
    }
    pub(crate) fn set_routes(&self, n: usize) {
        self.routes.store(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn update_in(&self) {
        add(&self.updates_in, 1);
    }
    pub(crate) fn written(&self, frames: usize, updates: usize, bytes: usize, calls: usize) {
        add(&self.frames_written, frames as u64);
        add(&self.updates_out, updates as u64);
        add(&self.bytes_written, bytes as u64);
        add(&self.write_calls, calls as u64);
    }
    /// Sessions without a policy rule: `admitted` UPDATEs passed their
    /// update rate after waiting `waited` in all.
    pub(crate) fn rate_limited(&self, admitted: u64, waited: std::time::Duration) {
        add(&self.rate_admitted, admitted);
        add(&self.rate_throttled_micros, waited.as_micros() as u64);
    }
    /// One read of `bytes` bytes from a peer, `frames` frames decoded.
    pub(crate) fn read(&self, frames: u64, bytes: usize) {
        add(&self.frames_read, frames);
        add(&self.bytes_read, bytes as u64);
    }
    pub(crate) fn catch_up_episode(&self) {
        add(&self.catch_up_episodes, 1);
    }

    /// Sets the gauge of catch-ups in progress on this shard's VNIs.
    pub(crate) fn set_catch_ups(&self, n: usize) {
        self.catch_ups.store(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn shard_batch_in(&self) {
        add(&self.shard_batches_in, 1);
    }
    pub(crate) fn connection_refused(&self) {
        add(&self.connections_refused, 1);
    }

    pub(crate) fn fanout_written(&self, latency: Duration) {
        self.fanout_latency.record(latency);
    }

    /// Adds this shard's fan-out latency counts into `view`.
    pub fn fanout_latency_into(&self, view: &mut HistogramView) {
        self.fanout_latency.add_to(view);
    }

    /// A consistent-enough copy (each field read once, relaxed).
    /// `grace_routes` is the level the ghost index keeps for the shard (a
    /// successor on any shard can lower it, so it is not a counter here).
    pub fn snapshot(&self, shard: usize, grace_routes: u64) -> ShardStats {
        let d = &self.disconnects;
        ShardStats {
            shard,
            peers_handshaking: get(&self.peers_handshaking),
            peers_established: get(&self.peers_established),
            routes: get(&self.routes),
            updates_in: get(&self.updates_in),
            updates_out: get(&self.updates_out),
            frames_written: get(&self.frames_written),
            bytes_written: get(&self.bytes_written),
            write_calls: get(&self.write_calls),
            frames_read: get(&self.frames_read),
            bytes_read: get(&self.bytes_read),
            catch_up_episodes: get(&self.catch_up_episodes),
            catch_ups: get(&self.catch_ups),
            shard_batches_in: get(&self.shard_batches_in),
            connections_refused: get(&self.connections_refused),
            rate_admitted: get(&self.rate_admitted),
            rate_throttled_micros: get(&self.rate_throttled_micros),
            grace_routes,
            disconnects: DisconnectCounts {
                eof: get(&d.eof),
                io: get(&d.io),
                timeout: get(&d.timeout),
                protocol: get(&d.protocol),
                malformed: get(&d.malformed),
                slow_peer: get(&d.slow_peer),
                limit: get(&d.limit),
                shutdown: get(&d.shutdown),
                handshake_timeout: get(&d.handshake_timeout),
                evicted: get(&d.evicted),
                policy: get(&d.policy),
            },
        }
    }
}

/// Disconnects by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisconnectCounts {
    /// The peer closed its side.
    pub eof: u64,
    /// A socket error.
    pub io: u64,
    /// No keepalive within 2.5 × the interval.
    pub timeout: u64,
    /// A message not allowed in the session state (or keepalive 0).
    pub protocol: u64,
    /// A frame that failed validation.
    pub malformed: u64,
    /// Cut off by the slow-subscriber policy.
    pub slow_peer: u64,
    /// Closed for exceeding a per-peer limit (routes or subscriptions).
    pub limit: u64,
    /// Closed because the server shut down.
    pub shutdown: u64,
    /// No complete handshake within `--handshake-timeout`.
    pub handshake_timeout: u64,
    /// Closed before completing the handshake to make room for a new
    /// connection at `--max-peers`.
    pub evicted: u64,
    /// Closed by the peer policy (`--policy`): no rule matches its address,
    /// or it violated a rule with `on_violation: close`.
    pub policy: u64,
}

impl DisconnectCounts {
    /// Every cause with its metric label (`metalbond_disconnects_total{reason}`),
    /// in a fixed order.
    pub fn by_reason(&self) -> [(&'static str, u64); 11] {
        [
            ("eof", self.eof),
            ("io", self.io),
            ("timeout", self.timeout),
            ("protocol", self.protocol),
            ("malformed", self.malformed),
            ("slow_peer", self.slow_peer),
            ("limit", self.limit),
            ("shutdown", self.shutdown),
            ("handshake_timeout", self.handshake_timeout),
            ("evicted", self.evicted),
            ("policy", self.policy),
        ]
    }

    /// All causes together.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }
}

/// One shard's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Shard index.
    pub shard: usize,
    /// Peers still in the handshake.
    pub peers_handshaking: u64,
    /// Peers ESTABLISHED.
    pub peers_established: u64,
    /// Routes in the VNI tables this shard owns.
    pub routes: u64,
    /// UPDATEs received from this shard's peers.
    pub updates_in: u64,
    /// UPDATE frames written to this shard's peers.
    pub updates_out: u64,
    /// Frames written (all types).
    pub frames_written: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Write syscalls.
    pub write_calls: u64,
    /// Frames read (all types).
    pub frames_read: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Times a peer fell behind on a VNI and was handed to catch-up.
    pub catch_up_episodes: u64,
    /// Subscriptions being caught up from this shard's tables now.
    pub catch_ups: u64,
    /// Batches received from other shards.
    pub shard_batches_in: u64,
    /// Connections refused because `--max-peers` was reached (accepted and
    /// closed at once; not counted as peers or disconnects).
    pub connections_refused: u64,
    /// UPDATEs admitted under `--max-updates-per-second` (sessions without
    /// a policy rule).
    pub rate_admitted: u64,
    /// Microseconds those sessions waited for their update rate.
    pub rate_throttled_micros: u64,
    /// Routes of departed peers held for `--peer-grace` now (what their
    /// ghosts still hold: not what a successor took over).
    pub grace_routes: u64,
    /// Disconnects by cause.
    pub disconnects: DisconnectCounts,
}

/// Counters of every shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// One entry per shard, by index.
    pub shards: Vec<ShardStats>,
}

impl ServerStats {
    /// Sum of a field over all shards, e.g. `stats.sum(|s| s.routes)`.
    pub fn sum(&self, field: impl Fn(&ShardStats) -> u64) -> u64 {
        self.shards.iter().map(field).sum()
    }
}

/// One connected peer, as its shard sees it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The session's id (shard and sequence): what route queries name as
    /// a route's announcer.
    pub id: super::PeerId,
    /// Remote address.
    pub addr: SocketAddr,
    /// Session state.
    pub state: SessionState,
    /// Shard holding the connection.
    pub shard: usize,
    /// Negotiated keepalive interval (ours until the HELLO exchange).
    pub keepalive: Duration,
    /// Routes the peer currently announces.
    pub routes_announced: usize,
    /// VNIs the peer is subscribed to, sorted.
    pub vnis_subscribed: Vec<Vni>,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Frames written to it.
    pub frames_out: u64,
    /// Bytes written to it.
    pub bytes_out: u64,
    /// Bytes queued for it and not yet written.
    pub queued_bytes: usize,
    /// Waiting for its update rate now (its socket read more slowly).
    pub throttled: bool,
    /// When the connection was accepted; for a departed peer whose routes
    /// are held (`grace_left` is set), when its session ended.
    pub connected_since: SystemTime,
    /// `--peer-grace`: this is a departed peer whose routes are still held
    /// for this long (state CLOSED); `None` for live sessions.
    pub grace_left: Option<Duration>,
}

/// Which routes of one VNI a route query wants (`ServerHandle::route_query`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteQuery {
    /// Up to `destinations` whole destinations after `after` (from the
    /// start when `None`), in table order.
    Page {
        /// The last destination of the previous page.
        after: Option<IpNet>,
        /// Destinations at most.
        destinations: usize,
    },
    /// Every route to this destination exactly.
    Prefix(IpNet),
    /// Every route to the most specific destination covering this address.
    Lookup(std::net::IpAddr),
}

/// The answer to a `RouteQuery`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePage {
    /// The routes found, grouped by destination, with their announcers
    /// (peer ids; `ServerHandle::peers` gives their addresses).
    pub routes: Vec<super::vni_table::AnnouncedRoute>,
    /// More destinations follow this page (`RouteQuery::Page` only).
    pub more: bool,
}

/// One owned VNI at a glance: no route list, so no table scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VniSummary {
    /// The VNI.
    pub vni: Vni,
    /// Routes in its table.
    pub routes: u64,
    /// Peers subscribed to it.
    pub subscribers: u64,
    /// The digest of its route set (`metalbond_wire::digest`).
    pub digest: metalbond_wire::digest::VniDigest,
}

/// One VNI's routes: (destination, next hop), sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VniRoutes {
    /// The VNI.
    pub vni: Vni,
    /// Its routes.
    pub routes: Vec<(IpNet, NextHop)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::codec::DecodeError;

    /// Every reason the server closes a peer for is counted under the label
    /// its log line carries (`kind=`), once.
    #[test]
    fn each_server_close_reason_counts_under_its_label() {
        let reasons = [
            CloseReason::PeerClosed,
            CloseReason::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()),
            CloseReason::KeepaliveTimeout(Duration::from_secs(12)),
            CloseReason::ZeroKeepalive,
            CloseReason::Malformed(DecodeError::Version(2).into()),
            CloseReason::WriteStall(Duration::from_secs(30)),
            CloseReason::PeerLimit {
                what: "routes announced",
                max: 5,
                origin: "--max-routes-per-peer".into(),
            },
            CloseReason::Shutdown,
            CloseReason::HandshakeTimeout {
                waited: Duration::from_secs(1),
                missing: "no HELLO",
            },
            CloseReason::Evicted { max_peers: 3 },
            CloseReason::Policy("no rule matches".into()),
        ];
        for reason in reasons {
            let counters = ShardCounters::default();
            counters.peer_connected();
            counters.peer_gone(false, &reason);
            let counts = counters.snapshot(0, 0).disconnects;
            assert_eq!(counts.total(), 1, "{reason}");
            assert!(
                counts
                    .by_reason()
                    .iter()
                    .any(|(name, n)| *name == reason.label() && *n == 1),
                "{reason} ({}): {counts:?}",
                reason.label()
            );
        }
    }
}
