//! The plan of a run: which simulated peer subscribes to which VNIs and
//! announces which routes, and from that, what every peer must end up holding.
//!
//! Owns: the route catalogue (every route a run can announce, each with a
//! dense `RouteId` encoded in its destination prefix so a received route is
//! found again without a hash lookup on the full route), the announcer set of
//! each route, the subscriptions of each peer, and the expectation rule of
//! PROTOCOL.md "Reflector rules": a subscriber of VNI v holds every route of v
//! that some *other* peer announces, exactly once, and never a route only it
//! announces itself.
//!
//! Must never: do I/O or keep time. It is a pure description, built once per
//! run and shared read-only by every shard.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use metalbond_wire::codec::Message;
use metalbond_wire::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

/// Index of a simulated peer in the run (0-based). Peer `p` runs on shard
/// `p % shards` and uses the underlay address `2001:db8::p` as its next hop.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PeerId(pub u32);

/// Dense index of a route in the catalogue. It is encoded in the route's
/// destination (IPv4 `10.0.0.0 + id`/32, or IPv6 `fdaa::id`/128), which is how
/// a received route is mapped back to its plan entry and its send time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RouteId(pub u32);

impl RouteId {
    /// Position in per-route tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// First IPv4 destination of the catalogue (10.0.0.0).
const V4_BASE: u32 = 0x0A00_0000;
/// High 96 bits of the IPv6 destinations of the catalogue (fdaa::/96).
const V6_BASE: u128 = 0xfdaa_u128 << 112;

/// What a peer should hold of one route once the run has converged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Expect {
    /// Subscribed and announced by another peer only: exactly once.
    Must,
    /// The peer announces it itself and so does another peer: whether the
    /// reflector sends it depends on who announced first, so both are right
    /// (still never more than once).
    Either,
    /// Not subscribed, or announced by nobody but the peer itself.
    Never,
}

/// The announcers of one route, inline (at most two).
#[derive(Clone, Copy, Debug, Default)]
struct Announcers {
    /// The first `len` entries are the announcers.
    peers: [PeerId; 2],
    /// How many of `peers` are set.
    len: u8,
}

impl Default for PeerId {
    fn default() -> PeerId {
        PeerId(u32::MAX)
    }
}

/// What one peer does in the run.
#[derive(Clone, Debug, Default)]
pub struct PeerPlan {
    /// VNIs the peer subscribes to once its session is up.
    pub subscriptions: Vec<Vni>,
    /// Routes the peer announces once its session is up.
    pub announcements: Vec<RouteId>,
}

/// The whole expected state of a run.
#[derive(Debug, Default)]
pub struct Plan {
    /// Every route, indexed by `RouteId`.
    routes: Vec<Route>,
    /// Who announces each route: one peer, sometimes two (kept inline: the
    /// receive path looks this up for every update).
    announcers: Vec<Announcers>,
    /// Position of each route in its VNI's route list, so a subscriber can
    /// keep its received routes in a dense array per VNI.
    vni_pos: Vec<u32>,
    /// Routes of each VNI, to enumerate what a subscriber must hold.
    routes_by_vni: HashMap<Vni, Vec<RouteId>>,
    /// Subscribers of each VNI, to know how many copies an update fans out to.
    subscribers_by_vni: HashMap<Vni, Vec<PeerId>>,
    /// Per peer, indexed by `PeerId`.
    peers: Vec<PeerPlan>,
    /// The canonical UPDATE ADD payload of every route, back to back: a
    /// received payload equal to it needs no protobuf decoding.
    payloads: Vec<u8>,
    /// End offset of each route's payload in `payloads`.
    payload_ends: Vec<u32>,
}

impl Plan {
    /// An empty plan for `peers` peers.
    pub fn new(peers: usize) -> Plan {
        Plan {
            peers: vec![PeerPlan::default(); peers],
            ..Plan::default()
        }
    }

    /// Number of peers in the run.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of routes in the catalogue.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// What peer `p` does.
    pub fn peer(&self, p: PeerId) -> &PeerPlan {
        &self.peers[p.0 as usize]
    }

    /// The route with id `r`.
    pub fn route(&self, r: RouteId) -> &Route {
        &self.routes[r.index()]
    }

    /// Who announces `r`.
    pub fn announcers(&self, r: RouteId) -> &[PeerId] {
        let a = &self.announcers[r.index()];
        &a.peers[..usize::from(a.len)]
    }

    /// Position of `r` in `routes_of(its VNI)`.
    pub fn vni_pos(&self, r: RouteId) -> usize {
        self.vni_pos[r.index()] as usize
    }

    /// Routes of VNI `v`.
    pub fn routes_of(&self, v: Vni) -> &[RouteId] {
        self.routes_by_vni.get(&v).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The underlay address peer `p` announces its routes with.
    pub fn underlay(p: PeerId) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(p.0)))
    }

    /// Adds a route of `vni` announced by `announcer` and returns its id.
    /// Destinations and next-hop kinds vary with the id (mostly IPv4 /32
    /// standard routes; some IPv6 /128, NAT and load-balancer next hops) so a
    /// run covers every encoding the protocol has.
    pub fn add_route(&mut self, vni: Vni, announcer: PeerId) -> RouteId {
        let id = u32::try_from(self.routes.len()).unwrap_or(u32::MAX);
        // A host address converts to its /32 or /128 network.
        let destination = IpNet::from(if id % 8 == 3 {
            IpAddr::V6(Ipv6Addr::from(V6_BASE | u128::from(id)))
        } else {
            IpAddr::V4(Ipv4Addr::from(V4_BASE.wrapping_add(id)))
        });
        let kind = match id % 16 {
            7 => NextHopKind::Nat {
                from: 1024,
                to: 2047,
            },
            11 => NextHopKind::LoadBalancerTarget,
            _ => NextHopKind::Standard,
        };
        let next_hop = NextHop {
            target: Plan::underlay(announcer),
            target_vni: 0,
            kind,
        };
        let route = Route::new(vni, destination, next_hop);
        let rid = RouteId(id);
        Message::Update {
            action: Action::Add,
            route,
        }
        .encode_payload(&mut self.payloads);
        self.payload_ends
            .push(u32::try_from(self.payloads.len()).unwrap_or(u32::MAX));
        self.routes.push(route);
        self.announcers.push(Announcers::default());
        let list = self.routes_by_vni.entry(vni).or_default();
        self.vni_pos
            .push(u32::try_from(list.len()).unwrap_or(u32::MAX));
        list.push(rid);
        self.announce(announcer, rid);
        rid
    }

    /// Makes `p` an announcer of the existing route `r` as well. A route has
    /// at most two announcers; returns false when `p` was not added.
    pub fn announce(&mut self, p: PeerId, r: RouteId) -> bool {
        let a = &mut self.announcers[r.index()];
        let n = usize::from(a.len);
        if n >= a.peers.len() || a.peers[..n].contains(&p) {
            return false;
        }
        a.peers[n] = p;
        a.len += 1;
        self.peers[p.0 as usize].announcements.push(r);
        true
    }

    /// Makes `p` a subscriber of `vni`.
    pub fn subscribe(&mut self, p: PeerId, vni: Vni) {
        let subs = &mut self.peers[p.0 as usize].subscriptions;
        if !subs.contains(&vni) {
            subs.push(vni);
            self.subscribers_by_vni.entry(vni).or_default().push(p);
        }
    }

    /// Maps a received route back to its id; `None` for a route this run never
    /// announced (wrong destination, next hop, VNI or kind).
    pub fn id_of(&self, route: &Route) -> Option<RouteId> {
        let raw = match route.destination {
            IpNet::V4(n) if n.prefix_len() == 32 => u32::from(n.addr()).checked_sub(V4_BASE)?,
            IpNet::V6(n) if n.prefix_len() == 128 => {
                let a = u128::from(n.addr());
                if a & !0xffff_ffff != V6_BASE {
                    return None;
                }
                u32::try_from(a & 0xffff_ffff).ok()?
            }
            _ => return None,
        };
        let id = RouteId(raw);
        (self.routes.get(id.index()) == Some(route)).then_some(id)
    }

    /// The canonical ADD payload of `r`.
    fn payload(&self, r: RouteId) -> Option<&[u8]> {
        let end = *self.payload_ends.get(r.index())? as usize;
        let start = match r.index() {
            0 => 0,
            i => self.payload_ends[i - 1] as usize,
        };
        self.payloads.get(start..end)
    }

    /// Recognises a received UPDATE payload that is byte for byte the
    /// canonical encoding (as our codec and proto3 serialisers write it) of a
    /// catalogue route, ADD or REMOVE. `None` means: decode it generically
    /// (another encoding, or not our route), never that it is wrong.
    pub fn recognise(&self, payload: &[u8]) -> Option<(Action, RouteId)> {
        let (action, body) = match payload {
            [0x08, 0x01, rest @ ..] => (Action::Remove, rest),
            _ => (Action::Add, payload),
        };
        let id = candidate_id(body)?;
        (self.payload(id)? == body).then_some((action, id))
    }

    /// What `p` should hold of `r` at convergence, given that `p` has sent
    /// its subscriptions.
    pub fn expect(&self, p: PeerId, r: RouteId) -> Expect {
        let route = &self.routes[r.index()];
        if !self.peer(p).subscriptions.contains(&route.vni) {
            return Expect::Never;
        }
        self.expect_subscribed(p, r)
    }

    /// `expect` for a peer already known to subscribe to `r`'s VNI.
    pub fn expect_subscribed(&self, p: PeerId, r: RouteId) -> Expect {
        let announcers = self.announcers(r);
        let own = announcers.contains(&p);
        let others = announcers.iter().any(|a| *a != p);
        match (own, others) {
            (false, true) => Expect::Must,
            (true, true) => Expect::Either,
            _ => Expect::Never,
        }
    }

    /// How many routes `p` must hold at convergence.
    pub fn must_count(&self, p: PeerId) -> usize {
        self.peer(p)
            .subscriptions
            .iter()
            .flat_map(|v| self.routes_of(*v))
            .filter(|r| self.expect(p, **r) == Expect::Must)
            .count()
    }

    /// How many peers receive an update of `r` sent by its only announcer:
    /// the subscribers of its VNI other than the announcer.
    pub fn fanout(&self, r: RouteId) -> usize {
        let route = &self.routes[r.index()];
        let announcers = self.announcers(r);
        self.subscribers_by_vni
            .get(&route.vni)
            .map(|subs| subs.iter().filter(|s| !announcers.contains(s)).count())
            .unwrap_or(0)
    }

    /// Routes with exactly one announcer: their updates fan out to a number
    /// of subscribers known in advance, so churn uses only these.
    pub fn single_announcer_routes(&self, p: PeerId) -> Vec<RouteId> {
        self.peer(p)
            .announcements
            .iter()
            .copied()
            .filter(|r| self.announcers(*r).len() == 1)
            .collect()
    }

    /// The fleet layout: `peers` peers over `vnis` VNIs (numbered from 100);
    /// peer p subscribes `subscriptions` VNIs (spread evenly) and announces
    /// `routes` routes in each; the first `shared` routes of each peer in each
    /// VNI are also announced by the next subscriber of that VNI, which
    /// exercises the reflector's announcer sets.
    pub fn fleet(
        peers: usize,
        vnis: usize,
        subscriptions: usize,
        routes: usize,
        shared: usize,
    ) -> Plan {
        let mut plan = Plan::new(peers);
        let vnis = vnis.max(1);
        let subscriptions = subscriptions.clamp(1, vnis);
        for p in 0..peers {
            for k in 0..subscriptions {
                let idx = (p * subscriptions + k) % vnis;
                plan.subscribe(peer_id(p), fleet_vni(idx));
            }
        }
        for p in 0..peers {
            let subs = plan.peers[p].subscriptions.clone();
            for vni in subs {
                let next = plan
                    .subscribers_by_vni
                    .get(&vni)
                    .and_then(|s| s.iter().copied().find(|q| q.0 as usize > p))
                    .or_else(|| {
                        plan.subscribers_by_vni
                            .get(&vni)
                            .and_then(|s| s.first().copied())
                    })
                    .filter(|q| q.0 as usize != p);
                for i in 0..routes {
                    let r = plan.add_route(vni, peer_id(p));
                    if let (true, Some(q)) = (i < shared, next) {
                        plan.announce(q, r);
                    }
                }
            }
        }
        plan
    }

    /// The burst layout in VNI 100: peer 0 announces `routes + 1` routes (the
    /// first is a probe that proves the subscriptions are in place), peers
    /// 1..=subscribers subscribe first, and the last peer subscribes late.
    pub fn burst(subscribers: usize, routes: usize) -> Plan {
        let peers = subscribers + 2;
        let mut plan = Plan::new(peers);
        let vni = fleet_vni(0);
        for p in 1..peers {
            plan.subscribe(peer_id(p), vni);
        }
        for _ in 0..=routes {
            plan.add_route(vni, PeerId(0));
        }
        plan
    }
}

/// The route id a canonical ADD payload names in its destination, found by
/// walking the fields our encoder writes first (VNI, then the destination's
/// optional ipVersion and its prefix). Only a candidate: the caller compares
/// the whole payload.
fn candidate_id(body: &[u8]) -> Option<RouteId> {
    let mut i = 0;
    if *body.first()? == 0x10 {
        // Field 2, VNI varint.
        i = 1;
        while body.get(i)? & 0x80 != 0 {
            i += 1;
        }
        i += 1;
    }
    // Field 3, destination, with a one-byte length.
    if *body.get(i)? != 0x1a || body.get(i + 1)? & 0x80 != 0 {
        return None;
    }
    i += 2;
    if *body.get(i)? == 0x08 {
        // ipVersion = IPv6.
        i += 2;
    }
    if *body.get(i)? != 0x12 {
        return None;
    }
    let len = usize::from(*body.get(i + 1)?);
    let bytes = body.get(i + 2..i + 2 + len)?;
    let raw = match len {
        4 => u32::from_be_bytes(bytes.try_into().ok()?).checked_sub(V4_BASE)?,
        16 => {
            let a = u128::from_be_bytes(bytes.try_into().ok()?);
            if a & !0xffff_ffff != V6_BASE {
                return None;
            }
            u32::try_from(a & 0xffff_ffff).ok()?
        }
        _ => return None,
    };
    Some(RouteId(raw))
}

/// `PeerId` of the `p`-th peer (runs never exceed u32 peers).
pub fn peer_id(p: usize) -> PeerId {
    PeerId(u32::try_from(p).unwrap_or(u32::MAX))
}

/// The VNI of index `idx` in fleet and burst runs (100, 101, ...), wrapping
/// inside the 24-bit range (the command line caps the VNI count far below).
pub fn fleet_vni(idx: usize) -> Vni {
    let raw = 100 + (idx % (Vni::MAX as usize - 100)) as u32;
    match Vni::new(raw) {
        Ok(v) => v,
        Err(_) => unreachable!("reduced modulo the VNI range"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_ids_round_trip_through_the_destination() {
        let mut plan = Plan::new(2);
        let vni = fleet_vni(0);
        let ids: Vec<RouteId> = (0..40).map(|_| plan.add_route(vni, PeerId(1))).collect();
        for id in ids {
            assert_eq!(plan.id_of(plan.route(id)), Some(id));
        }
        // A route with another next hop is not ours.
        let mut other = *plan.route(RouteId(0));
        other.next_hop.target = Plan::underlay(PeerId(0));
        assert_eq!(plan.id_of(&other), None);
        // Destinations outside the catalogue are not ours.
        let mut far = other;
        far.destination = "192.168.0.0/24".parse().unwrap();
        assert_eq!(plan.id_of(&far), None);
    }

    #[test]
    fn canonical_payloads_are_recognised_without_decoding() {
        let mut plan = Plan::new(2);
        let ids: Vec<RouteId> = (0..40)
            .map(|i| plan.add_route(fleet_vni(i % 3), PeerId(1)))
            .collect();
        for id in ids {
            for action in [Action::Add, Action::Remove] {
                let msg = Message::Update {
                    action,
                    route: *plan.route(id),
                };
                let mut payload = Vec::new();
                msg.encode_payload(&mut payload);
                assert_eq!(plan.recognise(&payload), Some((action, id)));
                // Any other byte sequence falls back to full decoding.
                let mut changed = payload.clone();
                let last = changed.len() - 1;
                changed[last] ^= 1;
                assert_eq!(plan.recognise(&changed), None);
                assert_eq!(plan.recognise(&payload[..last]), None);
            }
        }
        assert_eq!(plan.recognise(&[]), None);
        assert_eq!(plan.recognise(&[0x08, 0x01]), None);
    }

    #[test]
    fn expectation_follows_the_reflector_rules() {
        let mut plan = Plan::new(3);
        let vni = fleet_vni(0);
        for p in 0..3 {
            plan.subscribe(PeerId(p), vni);
        }
        let solo = plan.add_route(vni, PeerId(0));
        let shared = plan.add_route(vni, PeerId(0));
        plan.announce(PeerId(1), shared);
        // The announcer never gets its own route back.
        assert_eq!(plan.expect(PeerId(0), solo), Expect::Never);
        assert_eq!(plan.expect(PeerId(1), solo), Expect::Must);
        // Co-announcers may or may not see it; the others must.
        assert_eq!(plan.expect(PeerId(0), shared), Expect::Either);
        assert_eq!(plan.expect(PeerId(1), shared), Expect::Either);
        assert_eq!(plan.expect(PeerId(2), shared), Expect::Must);
        assert_eq!(plan.must_count(PeerId(2)), 2);
        assert_eq!(plan.fanout(solo), 2);
        assert_eq!(plan.fanout(shared), 1);
        assert_eq!(plan.single_announcer_routes(PeerId(0)), vec![solo]);
    }

    #[test]
    fn fleet_spreads_subscribers_evenly() {
        let plan = Plan::fleet(40, 4, 1, 5, 1);
        assert_eq!(plan.route_count(), 200);
        for idx in 0..4 {
            assert_eq!(plan.subscribers_by_vni[&fleet_vni(idx)].len(), 10);
        }
        // Peer 0: VNI 100 has 10 peers × 5 routes; its own 5 are not for it;
        // the shared route of its predecessor in the VNI (peer 36) is also
        // announced by peer 0, so that one is Either.
        assert_eq!(plan.must_count(PeerId(0)), 50 - 5 - 1);
    }

    #[test]
    fn burst_has_one_publisher_and_a_late_subscriber() {
        let plan = Plan::burst(3, 10);
        assert_eq!(plan.peer_count(), 5);
        assert_eq!(plan.route_count(), 11);
        assert_eq!(plan.must_count(PeerId(0)), 0);
        assert_eq!(plan.must_count(PeerId(4)), 11);
        assert_eq!(plan.fanout(RouteId(5)), 4);
    }
}
