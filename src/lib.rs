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
//! - `netlink`: the client's kernel-route thread (rtnetlink, nexthop objects).
//! - `http`: the `--http` status pages and metrics, serving any
//!   `telemetry::StatusSource` (the binary wires the server's or the
//!   client's to it).
//! - `telemetry`: below server, client, netlink and http: histograms and
//!   counter views the others record into, the status model and trait, and
//!   the one table of metric families.
//! - `defaults`: every default of server and client, in one place.
//! - `digest`: the per-VNI route-set digest reflectors and clients are
//!   compared by (order-independent, O(1) per change).
//! - `util`: poison-tolerant locking and a TTL cache (std only).
//! - `panic_policy`: a panic on any thread ends the process (the binaries
//!   install it); the test-only fault hook that proves it.
//! - `pacing`: how much a session may write that the peer has not read
//!   yet (deployed Go peers reset when 64 KiB wait unread); both roles'
//!   writers ask it.
//! - `policy`: `--policy` peer rules (who may announce / subscribe what).
//! - `logging`: tracing set-up for the binaries.
//! - `version`: the build's version and git commit.
//! - `readiness`: sd_notify `READY=1` for systemd `Type=notify` units.
//! - `cli_docs`: man pages and shell completions from the clap definition.
//! - `ops`: operator commands that look at a running fleet (`metalbond
//!   show`, `diff`, `watch`); above `client` and `http`, which never import it.
//!
//! Cargo features (all on by default): `client` (the library, std threads
//! only), `netlink` (kernel routes for the client), `server` (the glommio
//! reflector), `http` (status pages and `/metrics`), `cli` (the binaries'
//! glue). An embedder that only needs the client depends on
//! `metalbond = { default-features = false, features = ["client"] }`.

#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod cli_docs;
#[cfg(feature = "client")]
pub mod client;
pub mod codec;
pub mod defaults;
pub mod digest;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "cli")]
pub mod logging;
#[cfg(feature = "netlink")]
pub mod netlink;
#[cfg(feature = "cli")]
pub mod ops;
#[cfg(any(feature = "server", feature = "client"))]
pub mod pacing;
pub mod panic_policy;
#[cfg(any(feature = "server", feature = "http"))]
pub mod policy;
#[cfg(feature = "cli")]
pub mod readiness;
#[cfg(feature = "server")]
pub mod server;
pub mod session;
#[cfg(any(feature = "server", feature = "netlink", feature = "http"))]
pub mod telemetry;
pub mod types;
pub mod util;
pub mod version;

/// Types generated from `proto/metalbond.proto` by prost (see `build.rs`).
/// Use `codec` rather than these directly: they are unvalidated.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/metalbond.rs"));
}

pub use types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};
