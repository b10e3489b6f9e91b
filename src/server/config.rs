//! Server configuration: the `metalbond server` flags and the limits behind them.
//!
//! Owns: `ServerArgs` (clap), `ServerConfig` (what `Server::start` needs, with
//! safe defaults for every limit) and `ServerError` (why the server could not
//! start, one clear line each).
//!
//! Must never: open sockets or start threads; that is `shard`'s job.

use std::net::SocketAddr;
use std::time::Duration;

/// `metalbond server` flags, compatible with the existing server.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on; repeatable or comma separated (e.g. `[::]:4711`
    /// and `0.0.0.0:4711`). With several addresses IPv6 sockets are v6-only.
    #[arg(long, value_delimiter = ',', default_value = "[::]:4711")]
    pub listen: Vec<SocketAddr>,
    /// Keepalive interval in seconds offered to clients (the negotiated
    /// interval is the smaller of both sides).
    #[arg(long, default_value_t = 5)]
    pub keepalive: u32,
    /// Number of shards (pinned executor threads); default: one per CPU.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Address for the HTTP status page (accepted, not served yet).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Per-peer output limit in bytes before a slow subscriber is switched to
    /// per-route coalescing.
    #[arg(long, default_value_t = PeerLimits::default().max_queued_bytes)]
    pub max_queued_bytes: usize,
    /// Pending coalesced route changes a slow subscriber may accumulate
    /// before it is disconnected (it then reconnects and resyncs).
    #[arg(long, default_value_t = PeerLimits::default().max_coalesced_routes)]
    pub max_coalesced_routes: usize,
    /// Seconds a subscriber may leave its socket unwritable (not reading at
    /// all) while output is pending before it is disconnected; 0 disables.
    #[arg(long, default_value_t = 120)]
    pub write_stall_timeout: u64,
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Limits that keep one peer from costing unbounded memory or time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLimits {
    /// Encoded frames queued for one peer (shared buffers included) above
    /// which new changes are coalesced per route instead of queued.
    pub max_queued_bytes: usize,
    /// Coalesced pending route changes above which the peer is cut off with
    /// a logged reason (memory stays bounded whatever the churn).
    pub max_coalesced_routes: usize,
    /// A peer whose socket stays unwritable this long with output pending is
    /// cut off (`None`: never).
    pub write_stall_timeout: Option<Duration>,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            max_queued_bytes: 4 << 20,
            max_coalesced_routes: 4_000_000,
            write_stall_timeout: Some(Duration::from_secs(120)),
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
    /// HTTP status address; stored for the HTTP work, not served yet.
    pub http: Option<SocketAddr>,
    /// Per-peer limits (slow subscribers).
    pub limits: PeerLimits,
    /// Routes per SUBSCRIBE sync chunk; the owner yields between chunks.
    pub sync_chunk_routes: usize,
    /// Whether to pin shard `i` to the `i`-th allowed CPU (modulo their
    /// number); off for tests that start many servers in one process.
    pub pin_cpus: bool,
}

impl ServerConfig {
    /// A config listening on `listen` with every default (keepalive 5 s, one
    /// shard per CPU).
    pub fn new(listen: Vec<SocketAddr>) -> ServerConfig {
        ServerConfig {
            listen,
            keepalive: Duration::from_secs(5),
            shards: available_cpus(),
            http: None,
            limits: PeerLimits::default(),
            sync_chunk_routes: 1024,
            pin_cpus: true,
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
        Ok(())
    }
}

impl From<ServerArgs> for ServerConfig {
    fn from(a: ServerArgs) -> ServerConfig {
        let mut c = ServerConfig::new(a.listen);
        c.keepalive = Duration::from_secs(a.keepalive.into());
        if let Some(n) = a.shards {
            c.shards = n;
        }
        c.http = a.http;
        c.limits = PeerLimits {
            max_queued_bytes: a.max_queued_bytes,
            max_coalesced_routes: a.max_coalesced_routes,
            write_stall_timeout: (a.write_stall_timeout > 0)
                .then(|| Duration::from_secs(a.write_stall_timeout)),
        };
        c
    }
}

/// CPUs this process may run on (at least 1).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The ids of the CPUs this process may run on (its affinity mask), so that
/// shards are pinned only to CPUs the scheduler allows (cgroups, taskset).
pub fn allowed_cpu_ids() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for pid 0
    // (this thread) and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let ids: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&i| libc::CPU_ISSET(i, &set))
                .collect();
            if !ids.is_empty() {
                return ids;
            }
        }
    }
    (0..available_cpus()).collect()
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
    /// Installing the SIGINT/SIGTERM handler failed.
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
}
