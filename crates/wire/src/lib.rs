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
//! ```
//! use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
//! use metalbond_wire::{Action, NextHop, Route, Vni};
//!
//! let route = Route {
//!     vni: Vni::new(23).unwrap(),
//!     destination: "10.0.23.0/24".parse().unwrap(),
//!     next_hop: NextHop::standard("2001:db8::1".parse().unwrap()),
//! };
//! let mut bytes = Vec::new();
//! encode_frame(&Message::Update { action: Action::Add, route }, &mut bytes);
//! let mut decoder = FrameDecoder::new();
//! decoder.extend(&bytes);
//! assert!(matches!(decoder.next_message().unwrap(), Some(Message::Update { .. })));
//! ```

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
