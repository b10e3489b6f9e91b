//! Pieces every role of MetalBond shares that are neither protocol nor
//! role: poison-tolerant locking and a TTL cache (`LockOrRecover`,
//! `TtlCache`), `Since` (a 4-byte wall-clock second for per-route
//! timestamps), the panic policy and its test-only fault hook
//! (`panic_policy`), and the output pacing a session to a deployed Go peer
//! needs (`pacing`, which reads the kernel's `TCP_INFO` of a socket it is
//! handed), and TCP-MD5 keys and their installation on a socket
//! (`tcp_md5`).
//!
//! Must never: own a socket, a thread or a table; depend on a role crate.

#![deny(missing_docs)]

pub mod pacing;
pub mod panic_policy;
mod since;
pub mod tcp_md5;
mod util;

pub use since::Since;
pub use util::*;
