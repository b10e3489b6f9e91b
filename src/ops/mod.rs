//! Operator commands that look at a running fleet from outside: `metalbond
//! show` and `metalbond diff` (a daemon's status port), `metalbond watch`
//! (a read-only MetalBond session), and the shapes they print.
//!
//! Owns: `fetch` (one bounded HTTP GET to a status port), `show` (one
//! daemon's summary, peers, routes, as tables or JSON), `diff` (compares
//! two daemons' route sets by their per-VNI digests), and the JSON shape of
//! a route that every command prints (`route_json`, with the next-hop
//! object of the `/api/v1` documents, `http::next_hop_json`).
//!
//! Must never: change anything on a daemon, or speak the protocol other
//! than through the `client` library (`watch`).

pub mod diff;
pub mod fetch;
pub mod show;
pub mod watch;

use metalbond_http::next_hop_json;
use metalbond_wire::types::Route;

/// A route as a JSON object: `vni`, `prefix`, `next_hop`.
pub fn route_json(r: &Route) -> serde_json::Value {
    serde_json::json!({
        "vni": r.vni.get(),
        "prefix": r.destination.to_string(),
        "next_hop": next_hop_json(&r.next_hop),
    })
}
