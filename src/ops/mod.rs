//! Operator commands that read a running daemon from outside: `metalbond
//! diff` (and the shapes they print).
//!
//! Owns: `fetch` (one bounded HTTP GET to a status port), `diff` (compares
//! two daemons' route sets by their per-VNI digests), and the JSON shape of
//! a route that every command prints (`route_json`, the same next-hop
//! object as the `/api/v1` documents).
//!
//! Must never: talk the MetalBond protocol (that is `client`; `watch` lives
//! there) or change anything on a daemon.

pub mod diff;
pub mod fetch;

use crate::types::{NextHop, NextHopKind, Route};

/// A next hop as a JSON object: `address`, `type` (`standard` | `nat` |
/// `loadbalancer`), `target_vni`, `nat_port_from`, `nat_port_to`.
pub fn next_hop_json(nh: &NextHop) -> serde_json::Value {
    let (kind, from, to) = match nh.kind {
        NextHopKind::Standard => ("standard", 0, 0),
        NextHopKind::Nat { from, to } => ("nat", from, to),
        NextHopKind::LoadBalancerTarget => ("loadbalancer", 0, 0),
    };
    serde_json::json!({
        "address": nh.target.to_string(),
        "type": kind,
        "target_vni": nh.target_vni,
        "nat_port_from": from,
        "nat_port_to": to,
    })
}

/// A route as a JSON object: `vni`, `prefix`, `next_hop`.
pub fn route_json(r: &Route) -> serde_json::Value {
    serde_json::json!({
        "vni": r.vni.get(),
        "prefix": r.destination.to_string(),
        "next_hop": next_hop_json(&r.next_hop),
    })
}
