//! Every default of the server and the client, in one place: the `Default`
//! impls of `ServerConfig` / `PeerLimits` / `ClientConfig`, the clap
//! `default_value_t`s of both command lines and their help texts take the
//! numbers from here, so a default cannot differ between the library, the
//! command line and the docs.
//!
//! Owns: the default values and why each is what it is.
//!
//! Must never: hold a limit that is not a default (maxima such as
//! `MAX_PEER_GRACE` stay with the code that enforces them) or depend on any
//! other module.

use std::time::Duration;

/// The keepalive interval both roles offer unless told otherwise
/// (PROTOCOL.md "Default keepalive interval: 5 s", as the Go
/// implementation); also what `--keepalive 0` means, as for the Go binary.
/// The one name of this default.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// Server: `--listen`, every interface on the MetalBond port.
pub const LISTEN: &str = "[::]:4711";

/// Server: `--max-queued-bytes`, per-peer output above which a slow
/// subscriber is caught up from the table (4 MiB: a few seconds of heavy
/// churn).
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Server: `--write-stall-timeout`, seconds a subscriber's socket may stay
/// unwritable with output pending before it is cut off.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Server: `--max-peers`, a region's hypervisors with room to spare, and
/// well below what the default file-descriptor limits of a service allow.
pub const MAX_PEERS: usize = 20_000;

/// Server: `--max-routes-per-peer`.
pub const MAX_ROUTES_PER_PEER: usize = 1_000_000;

/// Server: `--max-subscriptions-per-peer` (VNIs are 24-bit: without a cap
/// one peer could ask for 16 M syncs).
pub const MAX_SUBSCRIPTIONS_PER_PEER: usize = 10_000;

/// Server: `--handshake-timeout`. A client on the same fabric completes
/// the handshake in one round trip; a connection silent this long is a
/// squatter or broken, and holds a place under `--max-peers` meanwhile.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Server: `--peer-grace`, 0: a departed peer's routes are withdrawn at
/// once, as the Go server does.
pub const PEER_GRACE: Duration = Duration::ZERO;

/// Server: routes departed peers may hold per shard under `--peer-grace`:
/// two peers' worth at the default `--max-routes-per-peer`.
pub const PEER_GRACE_MAX_ROUTES: usize = 2 * MAX_ROUTES_PER_PEER;

/// Client: `--reconnect-min-ms`, the first reconnect delay (doubling).
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);

/// Client: `--reconnect-max-secs`, the largest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Client: how long a TCP connect to a server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Client: `--max-routes-per-server`, twice the largest table the
/// reflector accepts from one peer by default, with room for a region's
/// routes.
pub const MAX_ROUTES_PER_SERVER: usize = 2_000_000;

/// Client: `--stale-hold`. A reflector restart, and the announcers
/// reconnecting to it, fit in a minute with room to spare.
pub const STALE_HOLD: Duration = Duration::from_secs(60);

/// Client with `--install-routes`: how often the netlink worker compares
/// the kernel's routes with what it installed (and repairs the difference).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
