//! The MetalBond wire protocol, without I/O or a runtime: what a route is,
//! the bytes of a frame, the messages, and the per-connection session state
//! machine. Server, client and loadgen all speak through it; the contract is
//! `PROTOCOL.md` (framing, schema field numbers, session state machine).
//!
//! - `types`: what a route is (VNI, prefix, next hop), valid by construction.
//! - `codec`: bytes ↔ frames ↔ messages; no sockets.
//! - `session`: the per-connection state machine, sans I/O.
//! - `defaults`: every default of server and client, in one place.
//! - `digest`: the per-VNI route-set digest reflectors and clients are
//!   compared by (order-independent, O(1) per change).
//! - `pb`: the prost types of `proto/metalbond.proto` (unvalidated; use
//!   `codec`).
//!
//! Must never: open a socket, spawn a thread, read a clock it was not
//! handed, or depend on another crate of this workspace.
//!
//! An example of encoding and decoding is in the README (a doctest).

#![deny(missing_docs)]

pub mod codec;
pub mod defaults;
pub mod digest;
pub mod session;
pub mod types;

/// Types generated from `proto/metalbond.proto` by prost (see `build.rs`).
/// Use `codec` rather than these directly: they are unvalidated.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/metalbond.rs"));
}

pub use types::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
