//! The expected-state checker: what one simulated peer holds, compared with
//! what the `Plan` says it must hold.
//!
//! Owns: `HeldRoutes` (the routes a session has received, as a multiset, with
//! an incremental count of how far it is from the expected state, so that
//! convergence is known without a scan), the protocol violations seen on the
//! way (an ADD for a route already held, a REMOVE for one not held, a route
//! the run never announced) and `Difference`, the one-line findings that make
//! a run fail.
//!
//! Must never: do I/O or keep time; the shard feeds it decoded updates. It is
//! a pure struct so its rules are unit-tested without a server.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use metalbond_wire::{Action, Route, Vni};

use crate::plan::{Expect, PeerId, Plan, RouteId};

/// How many individual violations one peer keeps for the report (the counts
/// stay exact); a broken server must not make the checker grow without bound.
const MAX_RECORDED_VIOLATIONS: usize = 64;

/// How many differences one peer lists at the final check; the rest are
/// summed up in one line (a server that lost everything would otherwise
/// produce peers × routes lines).
pub const MAX_LISTED_PER_PEER: usize = 100;

/// A multiplicative hasher for `RouteId` keys: ids are dense small integers,
/// so SipHash's protection against chosen keys buys nothing and costs time
/// on the receive path.
#[derive(Default, Clone, Copy)]
pub struct RouteIdHasher(u64);

impl Hasher for RouteIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Map keyed by route id with the cheap hasher.
type RouteIdMap<V> = HashMap<RouteId, V, BuildHasherDefault<RouteIdHasher>>;

/// One finding of the final check. Any finding fails the run.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Difference {
    /// The peer should hold this route and does not.
    Missing { peer: PeerId, route: Route },
    /// The peer holds a route it should not (its own, an unsubscribed VNI's,
    /// a withdrawn one, or one the run never announced).
    Extra { peer: PeerId, route: Route },
    /// The peer holds the route more than once (duplicate ADDs).
    Duplicate {
        peer: PeerId,
        route: Route,
        times: u32,
    },
    /// The server sent ADD for a route the session already held.
    DuplicateAdd { peer: PeerId, route: Route },
    /// The server sent REMOVE for a route the session did not hold.
    RemoveNotHeld { peer: PeerId, route: Route },
    /// More violations than were recorded individually.
    MoreViolations { peer: PeerId, count: u64 },
    /// More differences of this peer than are listed.
    MoreDifferences { peer: PeerId, count: usize },
    /// The session ended when it should not have.
    SessionLost { peer: PeerId, reason: String },
    /// The server sent something a client never receives (SUBSCRIBE...).
    Unexpected { peer: PeerId, what: String },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing { peer, route } => write!(f, "peer {}: missing {route}", peer.0),
            Difference::Extra { peer, route } => write!(f, "peer {}: extra {route}", peer.0),
            Difference::Duplicate { peer, route, times } => {
                write!(f, "peer {}: holds {times} times {route}", peer.0)
            }
            Difference::DuplicateAdd { peer, route } => {
                write!(f, "peer {}: ADD for a route already held: {route}", peer.0)
            }
            Difference::RemoveNotHeld { peer, route } => {
                write!(f, "peer {}: REMOVE for a route not held: {route}", peer.0)
            }
            Difference::MoreViolations { peer, count } => {
                write!(f, "peer {}: {count} more protocol violations", peer.0)
            }
            Difference::MoreDifferences { peer, count } => {
                write!(f, "peer {}: {count} more differences", peer.0)
            }
            Difference::SessionLost { peer, reason } => {
                write!(f, "peer {}: session lost: {reason}", peer.0)
            }
            Difference::Unexpected { peer, what } => {
                write!(f, "peer {}: unexpected {what} from server", peer.0)
            }
        }
    }
}

/// The routes one session has received, and how far that is from the plan.
#[derive(Debug)]
pub struct HeldRoutes {
    /// Which peer this is (expectations depend on it).
    peer: PeerId,
    /// Whether the peer has sent its SUBSCRIBEs: before that it must hold
    /// nothing at all.
    subscribed: bool,
    /// A session that replaces a dropped one of the same peer may be sent
    /// its own routes: to the server the old session is another peer that
    /// still announced them when the new one subscribed (PROTOCOL.md rules),
    /// and the old session's withdrawal then leaves them in place because
    /// the new session announces them too. So they are `Either` here.
    own_may_echo: bool,
    /// Per subscribed VNI, the multiplicity (ADDs minus REMOVEs, saturating
    /// at 255) of each of its catalogue routes, indexed by `Plan::vni_pos`:
    /// dense arrays, so the receive path does no hashing.
    dense: Vec<(Vni, Vec<u8>)>,
    /// Catalogue routes received outside the subscribed VNIs (or before
    /// subscribing), with their multiplicity: all unexpected.
    sparse: RouteIdMap<u32>,
    /// Received routes that are not in the catalogue: always extra.
    foreign: HashMap<Route, u32>,
    /// `Must` routes not held yet.
    missing: usize,
    /// Held routes that are `Never`, plus foreign ones, plus surplus copies.
    surplus: usize,
    /// Individual violations, at most `MAX_RECORDED_VIOLATIONS`.
    violations: Vec<Difference>,
    /// All violations, including those not recorded individually.
    violation_count: u64,
}

impl HeldRoutes {
    /// A fresh session's state: nothing held, nothing subscribed yet.
    pub fn new(peer: PeerId) -> HeldRoutes {
        HeldRoutes {
            peer,
            subscribed: false,
            own_may_echo: false,
            dense: Vec::new(),
            sparse: RouteIdMap::default(),
            foreign: HashMap::new(),
            missing: 0,
            surplus: 0,
            violations: Vec::new(),
            violation_count: 0,
        }
    }

    /// The peer has sent its SUBSCRIBEs: from now on the plan's routes for
    /// it are due. Call once, before routes can arrive.
    pub fn mark_subscribed(&mut self, plan: &Plan) {
        if self.subscribed {
            return;
        }
        self.subscribed = true;
        self.dense = plan
            .peer(self.peer)
            .subscriptions
            .iter()
            .map(|v| (*v, vec![0u8; plan.routes_of(*v).len()]))
            .collect();
        // Anything received before now moves to its dense slot, and the
        // distance to the expected state is recomputed from scratch.
        let early: Vec<(RouteId, u32)> = self.sparse.drain().collect();
        for (r, n) in early {
            match self.slot(plan, r) {
                Some((k, i)) => self.dense[k].1[i] = n.min(255) as u8,
                None => {
                    self.sparse.insert(r, n);
                }
            }
        }
        self.missing = plan.must_count(self.peer);
        self.surplus = self.foreign.values().map(|n| *n as usize).sum::<usize>()
            + self.sparse.values().map(|n| *n as usize).sum::<usize>();
        for (v, counts) in &self.dense {
            for (i, n) in counts.iter().enumerate() {
                if *n == 0 {
                    continue;
                }
                let n = usize::from(*n);
                match self.expect_subscribed(plan, plan.routes_of(*v)[i]) {
                    Expect::Must => {
                        self.missing -= 1;
                        self.surplus += n - 1;
                    }
                    Expect::Either => self.surplus += n - 1,
                    Expect::Never => self.surplus += n,
                }
            }
        }
    }

    /// Marks this as a session that replaced a dropped one (see
    /// `own_may_echo`).
    pub fn allow_own_echo(&mut self) {
        self.own_may_echo = true;
    }

    /// Where `r` is counted when its VNI is subscribed: (index in `dense`,
    /// position in that VNI).
    fn slot(&self, plan: &Plan, r: RouteId) -> Option<(usize, usize)> {
        let vni = plan.route(r).vni;
        let k = self.dense.iter().position(|(v, _)| *v == vni)?;
        Some((k, plan.vni_pos(r)))
    }

    /// The expectation for a route of a subscribed VNI.
    fn expect_subscribed(&self, plan: &Plan, r: RouteId) -> Expect {
        match plan.expect_subscribed(self.peer, r) {
            Expect::Never if self.own_may_echo && plan.announcers(r).contains(&self.peer) => {
                Expect::Either
            }
            e => e,
        }
    }

    /// Whether the peer holds exactly what it should (ignoring violations
    /// already recorded, which are reported at the end).
    pub fn is_satisfied(&self) -> bool {
        self.missing == 0 && self.surplus == 0
    }

    /// Applies one received UPDATE. Returns the route's id when it is in the
    /// catalogue (the caller looks up its send time for the latency).
    pub fn apply(&mut self, plan: &Plan, action: Action, route: &Route) -> Option<RouteId> {
        let Some(id) = plan.id_of(route) else {
            self.apply_foreign(action, route);
            return None;
        };
        self.apply_id(plan, action, id);
        Some(id)
    }

    /// Applies one received UPDATE of a catalogue route known by its id.
    pub fn apply_id(&mut self, plan: &Plan, action: Action, id: RouteId) {
        let slot = self.slot(plan, id);
        let (before, expect) = match slot {
            Some((k, i)) => (
                u32::from(self.dense[k].1[i]),
                self.expect_subscribed(plan, id),
            ),
            None => (self.sparse.get(&id).copied().unwrap_or(0), Expect::Never),
        };
        let route = plan.route(id);
        let after = match action {
            Action::Add => {
                if before >= 1 {
                    self.surplus += 1;
                    self.violation(Difference::DuplicateAdd {
                        peer: self.peer,
                        route: *route,
                    });
                } else {
                    match expect {
                        Expect::Must => self.missing -= 1,
                        Expect::Either => {}
                        Expect::Never => self.surplus += 1,
                    }
                }
                before + 1
            }
            Action::Remove => {
                if before == 0 {
                    self.violation(Difference::RemoveNotHeld {
                        peer: self.peer,
                        route: *route,
                    });
                    return;
                }
                if before > 1 {
                    self.surplus -= 1;
                } else {
                    match expect {
                        Expect::Must => self.missing += 1,
                        Expect::Either => {}
                        Expect::Never => self.surplus -= 1,
                    }
                }
                before - 1
            }
        };
        match slot {
            // Saturates: 255 copies of one route is a broken server either
            // way, and every extra copy is already on record as a violation.
            Some((k, i)) => self.dense[k].1[i] = after.min(255) as u8,
            None if after == 0 => {
                self.sparse.remove(&id);
            }
            None => {
                self.sparse.insert(id, after);
            }
        }
    }

    fn apply_foreign(&mut self, action: Action, route: &Route) {
        match action {
            Action::Add => {
                *self.foreign.entry(*route).or_insert(0) += 1;
                self.surplus += 1;
            }
            Action::Remove => match self.foreign.get_mut(route) {
                Some(n) => {
                    *n -= 1;
                    self.surplus -= 1;
                    if *n == 0 {
                        self.foreign.remove(route);
                    }
                }
                None => self.violation(Difference::RemoveNotHeld {
                    peer: self.peer,
                    route: *route,
                }),
            },
        }
    }

    /// Records a finding that is not about the final state (a message a
    /// client never receives, for instance).
    pub fn violation(&mut self, d: Difference) {
        self.violation_count += 1;
        if self.violations.len() < MAX_RECORDED_VIOLATIONS {
            self.violations.push(d);
        }
    }

    /// Everything that differs from the plan, plus the violations seen on
    /// the way. Empty means this peer is correct.
    pub fn differences(&self, plan: &Plan) -> Vec<Difference> {
        let peer = self.peer;
        let mut out = self.violations.clone();
        let recorded = self.violations.len() as u64;
        if self.violation_count > recorded {
            out.push(Difference::MoreViolations {
                peer,
                count: self.violation_count - recorded,
            });
        }
        for (v, counts) in &self.dense {
            for (i, n) in counts.iter().enumerate() {
                let r = plan.routes_of(*v)[i];
                let expect = self.expect_subscribed(plan, r);
                let route = *plan.route(r);
                match (*n, expect) {
                    (0, Expect::Must) => out.push(Difference::Missing { peer, route }),
                    (0, _) => {}
                    (_, Expect::Never) => out.push(Difference::Extra { peer, route }),
                    (1, _) => {}
                    (times, _) => out.push(Difference::Duplicate {
                        peer,
                        route,
                        times: u32::from(times),
                    }),
                }
            }
        }
        let mut sparse: Vec<&RouteId> = self.sparse.keys().collect();
        sparse.sort_unstable();
        for r in sparse {
            out.push(Difference::Extra {
                peer,
                route: *plan.route(*r),
            });
        }
        let mut foreign: Vec<&Route> = self.foreign.keys().collect();
        foreign.sort();
        for route in foreign {
            out.push(Difference::Extra {
                peer,
                route: *route,
            });
        }
        if out.len() > MAX_LISTED_PER_PEER {
            let count = out.len() - MAX_LISTED_PER_PEER;
            out.truncate(MAX_LISTED_PER_PEER);
            out.push(Difference::MoreDifferences { peer, count });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::fleet_vni;

    /// Three peers in one VNI, all subscribed: peer 0 announces `solo`,
    /// peers 0 and 1 both announce `shared`; a fourth route is in a VNI
    /// nobody subscribes to.
    fn plan() -> (Plan, RouteId, RouteId, RouteId) {
        let mut plan = Plan::new(3);
        let vni = fleet_vni(0);
        for p in 0..3 {
            plan.subscribe(PeerId(p), vni);
        }
        let solo = plan.add_route(vni, PeerId(0));
        let shared = plan.add_route(vni, PeerId(0));
        plan.announce(PeerId(1), shared);
        let elsewhere = plan.add_route(fleet_vni(1), PeerId(2));
        (plan, solo, shared, elsewhere)
    }

    #[test]
    fn exact_state_is_satisfied_and_clean() {
        let (plan, solo, shared, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        assert!(!h.is_satisfied());
        assert_eq!(h.apply(&plan, Action::Add, plan.route(solo)), Some(solo));
        assert!(!h.is_satisfied());
        h.apply(&plan, Action::Add, plan.route(shared));
        assert!(h.is_satisfied());
        assert!(h.differences(&plan).is_empty());
    }

    #[test]
    fn own_route_from_a_stale_session_is_tolerated_after_reconnect() {
        let (plan, solo, _, elsewhere) = plan();
        let mut h = HeldRoutes::new(PeerId(0));
        h.allow_own_echo();
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Add, plan.route(solo));
        assert!(h.is_satisfied());
        assert!(h.differences(&plan).is_empty());
        // Still only for its own routes in its own VNIs.
        h.apply(&plan, Action::Add, plan.route(elsewhere));
        assert!(!h.is_satisfied());
    }

    #[test]
    fn missing_route_is_listed() {
        let (plan, solo, shared, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Add, plan.route(solo));
        assert!(!h.is_satisfied());
        assert_eq!(
            h.differences(&plan),
            vec![Difference::Missing {
                peer: PeerId(2),
                route: *plan.route(shared)
            }]
        );
    }

    #[test]
    fn own_route_echoed_back_is_extra() {
        let (plan, solo, _, _) = plan();
        let mut h = HeldRoutes::new(PeerId(0));
        h.mark_subscribed(&plan);
        assert!(
            h.is_satisfied(),
            "peer 0 must hold nothing: shared is Either"
        );
        h.apply(&plan, Action::Add, plan.route(solo));
        assert!(!h.is_satisfied());
        assert_eq!(
            h.differences(&plan),
            vec![Difference::Extra {
                peer: PeerId(0),
                route: *plan.route(solo)
            }]
        );
    }

    #[test]
    fn co_announced_route_may_or_may_not_arrive() {
        let (plan, solo, shared, _) = plan();
        for with_shared in [false, true] {
            let mut h = HeldRoutes::new(PeerId(1));
            h.mark_subscribed(&plan);
            h.apply(&plan, Action::Add, plan.route(solo));
            if with_shared {
                h.apply(&plan, Action::Add, plan.route(shared));
            }
            assert!(h.is_satisfied());
            assert!(h.differences(&plan).is_empty());
        }
    }

    #[test]
    fn duplicate_add_is_a_violation_and_a_duplicate() {
        let (plan, solo, shared, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Add, plan.route(solo));
        h.apply(&plan, Action::Add, plan.route(shared));
        h.apply(&plan, Action::Add, plan.route(shared));
        assert!(!h.is_satisfied());
        let d = h.differences(&plan);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(matches!(d[0], Difference::DuplicateAdd { .. }));
        assert!(matches!(d[1], Difference::Duplicate { times: 2, .. }));
        // A REMOVE takes one copy away: the held state is right again, but
        // the violation stays on record.
        h.apply(&plan, Action::Remove, plan.route(shared));
        assert!(h.is_satisfied());
        assert_eq!(h.differences(&plan).len(), 1);
    }

    #[test]
    fn remove_of_route_not_held_is_a_violation() {
        let (plan, solo, _, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Remove, plan.route(solo));
        assert!(matches!(
            h.differences(&plan)[0],
            Difference::RemoveNotHeld { .. }
        ));
    }

    #[test]
    fn withdraw_then_reannounce_converges_again() {
        let (plan, solo, shared, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Add, plan.route(solo));
        h.apply(&plan, Action::Add, plan.route(shared));
        h.apply(&plan, Action::Remove, plan.route(solo));
        assert!(!h.is_satisfied());
        h.apply(&plan, Action::Add, plan.route(solo));
        assert!(h.is_satisfied());
        assert!(h.differences(&plan).is_empty());
    }

    #[test]
    fn unsubscribed_vni_and_foreign_routes_are_extra() {
        let (plan, _, _, elsewhere) = plan();
        let mut h = HeldRoutes::new(PeerId(0));
        h.mark_subscribed(&plan);
        h.apply(&plan, Action::Add, plan.route(elsewhere));
        let mut foreign = *plan.route(elsewhere);
        foreign.destination = "192.0.2.0/24".parse().unwrap();
        assert_eq!(h.apply(&plan, Action::Add, &foreign), None);
        assert!(!h.is_satisfied());
        assert_eq!(h.differences(&plan).len(), 2);
        h.apply(&plan, Action::Remove, &foreign);
        h.apply(&plan, Action::Remove, plan.route(elsewhere));
        assert!(h.is_satisfied());
        assert!(h.differences(&plan).is_empty());
    }

    #[test]
    fn nothing_is_due_before_subscribing() {
        let (plan, solo, _, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        assert!(h.is_satisfied());
        h.apply(&plan, Action::Add, plan.route(solo));
        assert!(!h.is_satisfied(), "a route before SUBSCRIBE is extra");
        h.mark_subscribed(&plan);
        // Now it counts as due; only `shared` is missing.
        assert_eq!(h.differences(&plan).len(), 1);
    }

    #[test]
    fn listed_differences_are_bounded_per_peer() {
        let mut plan = Plan::new(2);
        let vni = fleet_vni(0);
        plan.subscribe(PeerId(1), vni);
        for _ in 0..500 {
            plan.add_route(vni, PeerId(0));
        }
        let mut h = HeldRoutes::new(PeerId(1));
        h.mark_subscribed(&plan);
        let d = h.differences(&plan);
        assert_eq!(d.len(), MAX_LISTED_PER_PEER + 1);
        assert_eq!(
            d[MAX_LISTED_PER_PEER],
            Difference::MoreDifferences {
                peer: PeerId(1),
                count: 500 - MAX_LISTED_PER_PEER
            }
        );
    }

    #[test]
    fn recorded_violations_are_bounded() {
        let (plan, solo, _, _) = plan();
        let mut h = HeldRoutes::new(PeerId(2));
        h.mark_subscribed(&plan);
        for _ in 0..1000 {
            h.apply(&plan, Action::Remove, plan.route(solo));
        }
        let d = h.differences(&plan);
        assert!(d.len() < 100);
        assert!(d.contains(&Difference::MoreViolations {
            peer: PeerId(2),
            count: 1000 - MAX_RECORDED_VIOLATIONS as u64
        }));
    }
}
