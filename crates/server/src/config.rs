//! Server configuration: the limits behind the `metalbond server` flags
//! (the flags themselves are the binary's `cmd/server.rs`).
//!
//! Owns: `ServerConfig` (what `Server::start` needs, with
//! safe defaults for every limit) and `ServerError` (why the server could not
//! start, one clear line each).
//!
//! Must never: open sockets or start threads; that is `shard`'s job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metalbond_policy::{PolicyError, PolicyStore, UpdateRate};
use metalbond_wire::defaults;

/// Longest `--peer-grace`: a day (a departed peer's routes held longer
/// are no longer a restart).
pub const MAX_PEER_GRACE: Duration = Duration::from_secs(86_400);

/// Default `ServerConfig::peer_grace_max_routes` (`defaults`).
pub const DEFAULT_PEER_GRACE_MAX_ROUTES: usize = defaults::PEER_GRACE_MAX_ROUTES;

/// Default `--max-peers` (`defaults`).
pub const DEFAULT_MAX_PEERS: usize = defaults::MAX_PEERS;

/// Limits that keep one peer from costing unbounded memory or time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLimits {
    /// Encoded frames queued for one peer (shared buffers included) above
    /// which the peer is caught up from the owners' tables instead of sent
    /// the live fan-out (see `catch_up`).
    pub max_queued_bytes: usize,
    /// A peer whose socket stays unwritable this long with output pending is
    /// cut off (`None`: never).
    pub write_stall_timeout: Option<Duration>,
    /// Routes one peer may announce at once (its table entries and its
    /// share of every subscriber's sync); above it the peer is closed.
    pub max_routes_per_peer: usize,
    /// VNIs one peer may subscribe to at once (each costs a table entry on
    /// an owner shard and a sync scan); above it the peer is closed.
    pub max_subscriptions_per_peer: usize,
    /// Time a new connection has to reach ESTABLISHED (`None`: only the
    /// hold timer applies).
    pub handshake_timeout: Option<Duration>,
    /// UPDATEs one peer may send (`None`: no limit); a policy rule's
    /// `limits.max_updates_per_second` replaces it.
    pub update_rate: Option<UpdateRate>,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_queued_bytes: defaults::MAX_QUEUED_BYTES,
            write_stall_timeout: Some(defaults::WRITE_STALL_TIMEOUT),
            max_routes_per_peer: defaults::MAX_ROUTES_PER_PEER,
            max_subscriptions_per_peer: defaults::MAX_SUBSCRIPTIONS_PER_PEER,
            handshake_timeout: Some(defaults::HANDSHAKE_TIMEOUT),
            update_rate: None,
        }
    }
}

/// Everything `Server::start` needs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Addresses to listen on (port 0 picks a free port; see
    /// `ServerHandle::local_addrs`).
    pub listen: Vec<SocketAddr>,
    /// Our keepalive interval; clients may negotiate it down.
    pub keepalive: Duration,
    /// Number of shards (executor threads).
    pub shards: usize,
    /// HTTP status address: `metalbond server` serves the status pages
    /// there (`metalbond_http`); the library itself opens no HTTP port.
    pub http: Option<SocketAddr>,
    /// Connections served at once (`metalbond server --max-peers`).
    pub max_peers: usize,
    /// Per-peer limits (slow subscribers, routes, subscriptions).
    pub limits: PeerLimits,
    /// Routes per SUBSCRIBE sync chunk; the owner yields between chunks.
    pub sync_chunk_routes: usize,
    /// Whether to pin shard `i` to the `i`-th allowed CPU (modulo their
    /// number); off for tests that start many servers in one process.
    pub pin_cpus: bool,
    /// `--peer-grace`: how long a departed peer's routes stay (`None`:
    /// withdrawn at once).
    pub peer_grace: Option<Duration>,
    /// Most routes of departed peers one shard holds for `peer_grace`
    /// (taken as at least twice `limits.max_routes_per_peer`, so one peer's
    /// routes always fit); beyond it the oldest departures are withdrawn
    /// early (bounds what peers reconnecting in a loop can make the server
    /// hold).
    pub peer_grace_max_routes: usize,
    /// The peer policy (`--policy`), shared by every shard; `None`: every
    /// peer may do anything, and no policy code runs.
    pub policy: Option<Arc<PolicyStore>>,
}

impl ServerConfig {
    /// A config listening on `listen` with every default (keepalive 5 s, one
    /// shard per CPU).
    pub fn new(listen: Vec<SocketAddr>) -> ServerConfig {
        ServerConfig {
            listen,
            keepalive: defaults::KEEPALIVE,
            shards: crate::host::available_cpus(),
            http: None,
            max_peers: DEFAULT_MAX_PEERS,
            limits: PeerLimits::default(),
            sync_chunk_routes: 1024,
            pin_cpus: true,
            peer_grace: None,
            peer_grace_max_routes: DEFAULT_PEER_GRACE_MAX_ROUTES,
            policy: None,
        }
    }

    /// Checks what can be checked before any socket or thread exists.
    pub fn validate(&self) -> Result<(), ServerError> {
        if self.shards == 0 {
            return Err(ServerError::Config("--shards must be at least 1".into()));
        }
        if self.shards > 1024 {
            return Err(ServerError::Config(format!(
                "--shards {} is more than the supported 1024",
                self.shards
            )));
        }
        if self.keepalive.as_secs() == 0 {
            return Err(ServerError::Config(
                "--keepalive must be at least 1 second".into(),
            ));
        }
        if self.listen.is_empty() {
            return Err(ServerError::Config("no --listen address given".into()));
        }
        if self.sync_chunk_routes == 0 || self.limits.max_queued_bytes == 0 {
            return Err(ServerError::Config(
                "sync chunk and output limits must be positive".into(),
            ));
        }
        if self.max_peers == 0
            || self.limits.max_routes_per_peer == 0
            || self.limits.max_subscriptions_per_peer == 0
        {
            return Err(ServerError::Config(
                "--max-peers, --max-routes-per-peer and --max-subscriptions-per-peer must be positive"
                    .into(),
            ));
        }
        if self.peer_grace.is_some_and(|g| g > MAX_PEER_GRACE) {
            return Err(ServerError::Config(format!(
                "--peer-grace is at most {} seconds (a day)",
                MAX_PEER_GRACE.as_secs()
            )));
        }
        Ok(())
    }
}

/// Why the server could not start (or stopped abnormally). Each variant
/// renders as one line naming the cause.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A flag or config value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or listening on an address failed (in use, not available...).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// What the OS said (in use, not available, permission...).
        source: std::io::Error,
    },
    /// A shard executor could not be started (e.g. io_uring unavailable).
    #[error("cannot start shard {shard}: {reason}")]
    Shard {
        /// Index of the shard that failed.
        shard: usize,
        /// Why (the executor's error).
        reason: String,
    },
    /// The kernel refuses io_uring, which every shard's executor needs
    /// (`kernel.io_uring_disabled`, a seccomp profile, an old kernel).
    #[error(
        "io_uring is unavailable (io_uring_setup: {0}); allow it: sysctl kernel.io_uring_disabled=0 on the host, and in a container the seccomp profile deploy/seccomp/metalbond-io-uring.json (README \"Containers and io_uring\")"
    )]
    IoUringUnavailable(std::io::Error),
    /// The `--policy` file cannot be read or is invalid (names the place).
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_refusals_are_one_line_naming_the_cause_and_the_fix() {
        let eperm = ServerError::IoUringUnavailable(std::io::Error::from_raw_os_error(libc::EPERM));
        let text = eperm.to_string();
        assert!(
            text.starts_with("io_uring is unavailable (io_uring_setup: Operation not permitted"),
            "{text}"
        );
        assert!(
            text.ends_with("); allow it: sysctl kernel.io_uring_disabled=0 on the host, and in a container the seccomp profile deploy/seccomp/metalbond-io-uring.json (README \"Containers and io_uring\")"),
            "{text}"
        );
        assert!(!text.contains('\n'));
        let enosys =
            ServerError::IoUringUnavailable(std::io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(enosys
            .to_string()
            .contains("io_uring_setup: Function not implemented"));
    }
}
