//! MetalBond: a route reflector and client that distribute overlay routes
//! (per VNI: prefix → IPv6 underlay next hop), wire-compatible with the Go
//! implementation. See `../shared/PROTOCOL.md` for the contract.
//!
//! Layout, one owner per concern:
//! - `types`: what a route is (VNI, prefix, next hop), valid by construction.
//! - `codec`: bytes ↔ frames ↔ messages; no sockets.
//! - `session`: the per-connection state machine, sans I/O.
//! - `server`: the reflector (shards, VNI tables, fan-out).
//! - `client`: sessions to servers, announcements, the embeddable library.
//! - `netlink`: the client's kernel-route shard (rtnetlink, nexthop objects).
//! - `http`: the `--http` status pages and metrics, fed by a `StatusSource`.
//! - `logging`: tracing set-up for the binaries.
//! - `readiness`: sd_notify `READY=1` for systemd `Type=notify` units.
//! - `cli_docs`: man pages and shell completions from the clap definition.

pub mod cli_docs;
pub mod client;
pub mod codec;
pub mod http;
pub mod logging;
pub mod netlink;
pub mod readiness;
pub mod server;
pub mod session;
pub mod types;

/// Types generated from `proto/metalbond.proto` by prost (see `build.rs`).
/// Use `codec` rather than these directly: they are unvalidated.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/metalbond.rs"));
}

pub use types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};
