//! A compiled policy rule and the checks a peer's messages go through.
//!
//! Owns: `Rule` (which peers it covers, which VNIs they may subscribe to,
//! which routes they may announce, per-rule limits, what a violation gets),
//! `TargetVnis` (which `NextHop.targetVNI` an announced route may carry),
//! `VniSet` (sorted ranges), `Denial` (why something was refused, with its
//! metric label) and `RuleCounters` (hits and denials per reason, atomics).
//!
//! Must never: parse text (that is `file`) or touch sessions and sockets (the
//! server asks `Rule::check_announce` / `Rule::may_subscribe` and acts on the
//! answer). Every check here is a few comparisons: it runs per UPDATE.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metalbond_wire::types::{IpNet, NextHopKind, Route, Vni};

/// A set of VNIs as sorted, disjoint, non-adjacent inclusive ranges: a
/// tenant's block of 10,000 VNIs is one entry, and membership is a binary
/// search.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VniSet {
    /// `(first, last)` inclusive, sorted, merged.
    ranges: Vec<(u32, u32)>,
}

impl VniSet {
    /// The set of the given inclusive ranges (overlaps merged).
    pub fn from_ranges(mut ranges: Vec<(u32, u32)>) -> VniSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        VniSet { ranges: merged }
    }

    /// Is `vni` in the set?
    pub fn contains(&self, vni: Vni) -> bool {
        let v = vni.get();
        match self.ranges.binary_search_by(|&(a, _)| a.cmp(&v)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => self.ranges[i - 1].1 >= v,
        }
    }

    /// No VNI at all.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges, for `policy check` output.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }
}

impl std::fmt::Display for VniSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("none");
        }
        for (i, (a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

/// The kinds of next hop a grant allows (a bit set of three).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopTypes {
    /// Plain overlay forwarding (`standard`).
    pub standard: bool,
    /// Load-balancer targets (`loadbalancer`).
    pub load_balancer: bool,
    /// NAT with a port range (`nat`).
    pub nat: bool,
}

impl NextHopTypes {
    /// Does the set allow `kind`?
    pub fn allows(&self, kind: NextHopKind) -> bool {
        match kind {
            NextHopKind::Standard => self.standard,
            NextHopKind::LoadBalancerTarget => self.load_balancer,
            NextHopKind::Nat { .. } => self.nat,
        }
    }
}

impl std::fmt::Display for NextHopTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = [
            (self.standard, "standard"),
            (self.load_balancer, "loadbalancer"),
            (self.nat, "nat"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        f.write_str(&names.join(", "))
    }
}

/// Which next-hop addresses a grant allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NextHopAddrs {
    /// The peer's own source address (`self`): a hypervisor announcing
    /// its own VMs. An IPv4 source also matches its IPv4-mapped IPv6 form.
    pub own_address: bool,
    /// Literal prefixes the next hop must lie in (gateways, LB pools).
    pub prefixes: Vec<IpNet>,
}

impl NextHopAddrs {
    /// Does the set allow `target` for a peer whose source is `source`
    /// (both canonical: IPv4-mapped IPv6 turned into IPv4)?
    fn allows(&self, target: IpAddr, source: IpAddr) -> bool {
        (self.own_address && target == source) || self.prefixes.iter().any(|p| p.contains(&target))
    }
}

/// Which `NextHop.targetVNI` values a grant allows. The target VNI tells
/// the receiving hypervisor which VNI to encapsulate into: a tenant that
/// may set it freely can steer its traffic into another tenant's overlay,
/// so it is granted like the VNI of the route itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetVnis {
    /// The route's own VNI (`same`): what a gateway that keeps traffic in
    /// the tenant's overlay sends.
    pub same: bool,
    /// Literal VNIs and ranges; 0 is "not meaningful", what the Go client
    /// sends for an ordinary route.
    pub vnis: VniSet,
}

impl Default for TargetVnis {
    /// What an entry without `target_vnis` allows: 0 and the route's own
    /// VNI, the two values Go clients send, so policy files written before
    /// the key existed keep accepting them.
    fn default() -> TargetVnis {
        TargetVnis {
            same: true,
            vnis: VniSet::from_ranges(vec![(0, 0)]),
        }
    }
}

impl TargetVnis {
    /// Does the set allow `target_vni` on a route in `route_vni`?
    pub fn allows(&self, target_vni: u32, route_vni: Vni) -> bool {
        (self.same && target_vni == route_vni.get())
            // Validated on receive (24 bits); anything else is refused.
            || Vni::new(target_vni).is_ok_and(|v| self.vnis.contains(v))
    }
}

impl std::fmt::Display for TargetVnis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.vnis.is_empty(), self.same) {
            (false, true) => write!(f, "{} or the route's own", self.vnis),
            (false, false) => write!(f, "{}", self.vnis),
            (true, true) => f.write_str("the route's own"),
            (true, false) => f.write_str("none"),
        }
    }
}

/// One `announce` entry: a route is allowed when its VNI, destination, next
/// hop type, next hop address and target VNI all fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceGrant {
    /// VNIs it may announce into.
    pub vnis: VniSet,
    /// Supernets the destination prefix must lie within (same family, at
    /// least as long).
    pub prefixes: Vec<IpNet>,
    /// Next-hop kinds allowed.
    pub next_hop_types: NextHopTypes,
    /// Next-hop addresses allowed.
    pub next_hops: NextHopAddrs,
    /// `NextHop.targetVNI` values allowed (default: 0 and the route's own).
    pub target_vnis: TargetVnis,
}

/// Why a peer's UPDATE, SUBSCRIBE or session was refused; its `label()` is
/// the `reason` of `metalbond_policy_denied_total{rule,reason}`. Ordered by
/// how far an UPDATE got through a grant's checks, so the reason reported
/// for a refused route is the one of the grant it came closest to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Denial {
    /// No rule matches the peer's source address.
    NoRule,
    /// SUBSCRIBE of a VNI the rule does not grant.
    SubscribeVni,
    /// UPDATE into a VNI no grant covers.
    AnnounceVni,
    /// Destination outside every allowed supernet.
    Prefix,
    /// Next hop of a kind not allowed (e.g. NAT from a hypervisor).
    NextHopType,
    /// Next hop address neither the peer's own nor in an allowed prefix.
    NextHop,
    /// `NextHop.targetVNI` not allowed (e.g. another tenant's VNI).
    TargetVni,
}

impl Denial {
    /// Every reason, in label order (counter slots).
    pub const ALL: [Denial; 7] = [
        Denial::NoRule,
        Denial::SubscribeVni,
        Denial::AnnounceVni,
        Denial::Prefix,
        Denial::NextHopType,
        Denial::NextHop,
        Denial::TargetVni,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Denial::NoRule => "no_rule",
            Denial::SubscribeVni => "subscribe_vni",
            Denial::AnnounceVni => "announce_vni",
            Denial::Prefix => "prefix",
            Denial::NextHopType => "next_hop_type",
            Denial::NextHop => "next_hop",
            Denial::TargetVni => "target_vni",
        }
    }

    /// Words for a log line or a close reason.
    pub fn describe(self) -> &'static str {
        match self {
            Denial::NoRule => "no policy rule matches the peer's address",
            Denial::SubscribeVni => "VNI not granted for SUBSCRIBE",
            Denial::AnnounceVni => "VNI not granted for announcing",
            Denial::Prefix => "destination outside the allowed prefixes",
            Denial::NextHopType => "next hop type not allowed",
            Denial::NextHop => "next hop address not allowed",
            Denial::TargetVni => "next hop target VNI not allowed",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// What a violation gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnViolation {
    /// The message is dropped and counted; the session stays up.
    #[default]
    Refuse,
    /// The session is closed (its routes withdrawn), counted as
    /// `disconnects{reason="policy"}`.
    Close,
}

/// Per-rule limits replacing the global `--max-routes-per-peer` /
/// `--max-subscriptions-per-peer` for the peers the rule covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleLimits {
    /// Routes a peer may announce at once.
    pub max_routes: Option<usize>,
    /// VNIs a peer may subscribe to at once.
    pub max_subscriptions: Option<usize>,
    /// UPDATEs a peer may send: replaces `--max-updates-per-second`.
    pub update_rate: Option<UpdateRate>,
}

/// A per-peer update rate: a token bucket of `burst` UPDATEs refilled at
/// `per_second`. A peer over it is read more slowly (TCP back-pressure);
/// nothing it sends is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateRate {
    /// Sustained UPDATEs per second (≥ 1).
    pub per_second: u32,
    /// UPDATEs at once (≥ 1).
    pub burst: u32,
}

/// Counters of one rule name; kept across reloads (a rule keeps its name),
/// so Prometheus counters do not reset on SIGHUP.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Sessions that resolved to the rule (at start and on each reload).
    hits: AtomicU64,
    /// Refusals, one slot per `Denial`.
    denied: [AtomicU64; Denial::ALL.len()],
    /// Routes withdrawn because a reload no longer allowed them.
    withdrawn: AtomicU64,
    /// UPDATEs admitted under an update rate.
    admitted: AtomicU64,
    /// Microseconds peers spent waiting for their update rate.
    throttled_micros: AtomicU64,
}

impl RuleCounters {
    /// A session resolved to this rule.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }
    /// Something was refused for `why`.
    pub fn denied(&self, why: Denial) {
        self.denied[why.slot()].fetch_add(1, Ordering::Relaxed);
    }
    /// `n` UPDATEs were admitted under the update rate, after waiting
    /// `waited` for it.
    pub fn rate_limited(&self, n: u64, waited: std::time::Duration) {
        self.admitted.fetch_add(n, Ordering::Relaxed);
        if !waited.is_zero() {
            self.throttled_micros
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// UPDATEs admitted under an update rate.
    pub fn admitted_count(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Seconds peers spent waiting for their update rate.
    pub fn throttled_seconds(&self) -> f64 {
        self.throttled_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// `n` routes were withdrawn by a reload.
    pub fn withdrawn(&self, n: u64) {
        self.withdrawn.fetch_add(n, Ordering::Relaxed);
    }
    /// Sessions resolved to the rule so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Refusals for `why` so far.
    pub fn denied_count(&self, why: Denial) -> u64 {
        self.denied[why.slot()].load(Ordering::Relaxed)
    }
    /// Routes withdrawn by reloads so far.
    pub fn withdrawn_count(&self) -> u64 {
        self.withdrawn.load(Ordering::Relaxed)
    }
}

/// One compiled rule: first match on the peer's source address wins.
#[derive(Debug)]
pub struct Rule {
    /// Unique name (metric label, log field).
    pub name: String,
    /// 1-based position in the file (for `policy check`).
    pub position: usize,
    /// Source prefixes the rule covers.
    pub peers: Vec<IpNet>,
    /// VNIs the peers may subscribe to.
    pub subscribe: VniSet,
    /// What the peers may announce; a route needs one grant that allows it.
    pub announce: Vec<AnnounceGrant>,
    /// Limits replacing the global ones.
    pub limits: RuleLimits,
    /// Refuse the message, or close the session.
    pub on_violation: OnViolation,
    /// Hits and denials (shared with the store, across reloads).
    pub counters: Arc<RuleCounters>,
    /// `auth:`: the TCP-MD5 key its peers must sign with.
    pub auth: Option<RuleAuth>,
}

/// A rule's session protection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleAuth {
    /// Where the key was read from (shown; the key never is).
    pub key_file: std::path::PathBuf,
    /// The key.
    pub key: metalbond_utils::tcp_md5::Md5Key,
}

impl Rule {
    /// The first of `peers` containing `source` (canonical form).
    pub fn matching_prefix(&self, source: IpAddr) -> Option<&IpNet> {
        self.peers.iter().find(|p| p.contains(&source))
    }

    /// May a peer with source `source` (canonical) subscribe to `vni`?
    pub fn may_subscribe(&self, vni: Vni) -> bool {
        self.subscribe.contains(vni)
    }

    /// May a peer with source `source` (canonical) announce `route`? On
    /// refusal, the reason of the grant that came closest.
    pub fn check_announce(&self, route: &Route, source: IpAddr) -> Result<(), Denial> {
        let mut closest = Denial::AnnounceVni;
        for g in &self.announce {
            if !g.vnis.contains(route.vni) {
                continue;
            }
            let dest = route.destination;
            if !g.prefixes.iter().any(|p| within(&dest, p)) {
                closest = closest.max(Denial::Prefix);
                continue;
            }
            if !g.next_hop_types.allows(route.next_hop.kind) {
                closest = closest.max(Denial::NextHopType);
                continue;
            }
            if !g
                .next_hops
                .allows(route.next_hop.target.to_canonical(), source)
            {
                closest = closest.max(Denial::NextHop);
                continue;
            }
            if !g.target_vnis.allows(route.next_hop.target_vni, route.vni) {
                closest = closest.max(Denial::TargetVni);
                continue;
            }
            return Ok(());
        }
        Err(closest)
    }
}

/// Is `inner` within `outer` (same family, at least as long, inside it)?
pub fn within(inner: &IpNet, outer: &IpNet) -> bool {
    outer.contains(inner)
}
