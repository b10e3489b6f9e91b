//! Typed errors of the client library, stable so embedders can match on them.
//!
//! Owns: `ClientError`, one variant per refusal of a handle call.
//! Must never: carry I/O errors of sessions; those are logged and retried
//! by the connection loop, never returned to a caller.

use std::net::IpAddr;

use metalbond_wire::types::{Route, Vni};

/// Why a `Client` call was refused (nothing changed when one is returned),
/// or why a wait ended without its condition.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `subscribe` for a VNI we already subscribe to.
    #[error("already subscribed to VNI {0}")]
    AlreadySubscribed(Vni),
    /// `unsubscribe` for a VNI we do not subscribe to.
    #[error("not subscribed to VNI {0}")]
    NotSubscribed(Vni),
    /// `announce` of a route we already announce.
    #[error("route already announced: {0}")]
    RouteAlreadyAnnounced(Route),
    /// `withdraw` of a route we do not announce.
    #[error("route not announced: {0}")]
    RouteNotAnnounced(Route),
    /// `add_server` for an address already in the list.
    #[error("server {0} already added")]
    ServerAlreadyAdded(String),
    /// `remove_server` / `server_state` for an address not in the list.
    #[error("server {0} is not one of ours")]
    UnknownServer(String),
    /// A server address that is not `HOST:PORT`.
    #[error("server address '{0}' is not HOST:PORT (e.g. [::1]:4711)")]
    InvalidServerAddress(String),
    /// `add_server_with` a local address of the other IP family than the
    /// server's address.
    #[error("local address {local} cannot reach server {server}: not the same IP family")]
    LocalAddressFamily {
        /// The server address as given.
        server: String,
        /// The local address asked for.
        local: IpAddr,
    },
    /// A blocking wait (`wait_established`, `wait_settled`, ...) ran out of
    /// time before its condition held.
    #[error("timed out waiting")]
    TimedOut,
    /// The client was shut down.
    #[error("the client has been shut down")]
    ShutDown,
}
