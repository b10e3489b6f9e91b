//! The client's configuration: session timing, the route limit per
//! server, the stale hold, per-server options. Every default comes from
//! `metalbond_wire::defaults`.

use std::net::IpAddr;
use std::time::Duration;

/// Timing of sessions and reconnects.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our keepalive interval (the session uses min(ours, server's)).
    pub keepalive: Duration,
    /// First reconnect delay after a failure.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (the backoff doubles up to this).
    pub reconnect_max: Duration,
    /// Give up one TCP connect attempt after this long.
    pub connect_timeout: Duration,
    /// Most routes one server may hold for us at once. One more ADD closes
    /// that session ("server limit exceeded", disconnect reason `limit`)
    /// and withdraws everything it sent, so a hostile or broken server
    /// cannot make the client grow without bound.
    pub max_routes_per_server: usize,
    /// Hitless restarts (`--stale-hold`): when a session to a server is
    /// lost, that server's routes stay present as *stale* for this long
    /// after the loss; received again from the server they are fresh (no
    /// change for the sink), withdrawn explicitly they go at once, and those
    /// not received again by then are removed. Zero removes them at the loss
    /// (the Go client's behaviour). A session closed for a fault of the
    /// server (malformed frame, protocol violation, route limit) drops its
    /// routes at once whatever this says.
    pub stale_hold: Duration,
}

/// Default `ClientConfig::stale_hold`: a reflector restart, and the
/// announcers reconnecting to it, fit in a minute with room to spare.
pub const DEFAULT_STALE_HOLD: Duration = metalbond_wire::defaults::STALE_HOLD;

/// Default of `ClientConfig::max_routes_per_server`: twice the largest
/// table the reflector accepts from one peer by default, with room for a
/// region's routes.
pub const DEFAULT_MAX_ROUTES_PER_SERVER: usize = metalbond_wire::defaults::MAX_ROUTES_PER_SERVER;

/// Every field from `metalbond_wire::defaults`.
impl Default for ClientConfig {
    fn default() -> Self {
        use metalbond_wire::defaults;
        ClientConfig {
            keepalive: defaults::KEEPALIVE,
            reconnect_min: defaults::RECONNECT_MIN,
            reconnect_max: defaults::RECONNECT_MAX,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            max_routes_per_server: defaults::MAX_ROUTES_PER_SERVER,
            stale_hold: defaults::STALE_HOLD,
        }
    }
}

/// Per-server settings for `Client::add_server_with`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Source address of the TCP connection (Go's `AddPeer(addr, localIP)`):
    /// bound before connecting, port chosen by the kernel. `None`: the
    /// kernel picks the source by its routes.
    pub local_address: Option<IpAddr>,
    /// Sign the session with TCP-MD5 (RFC 2385), the key read from this
    /// file at every connect attempt (so a new key takes effect at the next
    /// reconnect; a file every user may read is refused). A wrong or
    /// missing key shows as a connect timeout: the server drops the SYN.
    pub md5_key_file: Option<std::path::PathBuf>,
}
