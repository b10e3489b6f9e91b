//! `metalbond server`: the flags, their translation into a `ServerConfig`,
//! and the process around the reflector library: signals (SIGINT/SIGTERM
//! stop, SIGHUP reloads `--policy`), the `--http` status pages and systemd
//! readiness.
//!
//! Owns: `ServerArgs` and `run`. Must never: hold reflector logic (that is
//! `metalbond_server`); the library installs no signal handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metalbond_policy::{PolicyStore, UpdateRate};
use metalbond_server::{PeerLimits, Server, ServerConfig, ServerError, ServerStatusSource};
use metalbond_wire::defaults;

/// `metalbond server` flags, compatible with the existing server.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on, `IP:PORT` or `HOST:PORT` (a name is resolved
    /// at start; every address it resolves to is listened on); repeatable or
    /// comma separated (e.g. `[::]:4711,0.0.0.0:4711`). With several
    /// addresses IPv6 sockets are v6-only.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR:PORT",
        default_value = defaults::LISTEN
    )]
    pub listen: Vec<String>,
    /// Keepalive interval in seconds offered to clients (the negotiated
    /// interval is the smaller of both sides); 0 means the default, 5, as
    /// for the Go server.
    #[arg(long, value_name = "SECS", default_value_t = defaults::KEEPALIVE.as_secs() as u32)]
    pub keepalive: u32,
    /// Number of shards (pinned executor threads); default: one per CPU.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Address for the HTTP status pages and metrics (`/`, `/routes.json`,
    /// `/routes.yaml`, `/peers`, `/metrics`), `IP:PORT` or `HOST:PORT`
    /// (resolved at start, first address).
    #[arg(long, value_name = "ADDR:PORT")]
    pub http: Option<String>,
    /// Per-peer output limit in bytes above which a slow subscriber gets no
    /// more live fan-out and is caught up from the table instead.
    #[arg(long, default_value_t = defaults::MAX_QUEUED_BYTES)]
    pub max_queued_bytes: usize,
    /// No effect since slow subscribers are caught up from the table (they
    /// hold nothing per route any more); accepted so that existing command
    /// lines keep working.
    #[arg(long, hide = true, value_name = "N")]
    pub max_coalesced_routes: Option<usize>,
    /// Seconds a subscriber may leave its socket unwritable (not reading at
    /// all) while output is pending before it is disconnected; 0 disables.
    #[arg(long, default_value_t = defaults::WRITE_STALL_TIMEOUT.as_secs())]
    pub write_stall_timeout: u64,
    /// Connections served at once. Beyond it the oldest connection still in
    /// its handshake is closed to make room for the new one; only when every
    /// place is held by an established session is a new connection closed
    /// at once (counted, logged at most once a second per shard).
    #[arg(long, default_value_t = defaults::MAX_PEERS)]
    pub max_peers: usize,
    /// Routes one peer may announce at once; one more closes that peer
    /// (its routes are withdrawn).
    #[arg(long, default_value_t = defaults::MAX_ROUTES_PER_PEER)]
    pub max_routes_per_peer: usize,
    /// VNIs one peer may subscribe to at once; one more closes that peer.
    #[arg(long, default_value_t = defaults::MAX_SUBSCRIPTIONS_PER_PEER)]
    pub max_subscriptions_per_peer: usize,
    /// UPDATEs one peer may send per second (0: no limit). A peer above it
    /// is read more slowly (TCP back-pressure): nothing is dropped, its
    /// subscribers get every change later, its session stays up. A policy
    /// rule's `limits.max_updates_per_second` replaces it.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_updates_per_second: u32,
    /// UPDATEs a peer may send at once before --max-updates-per-second
    /// applies (default: one second's worth).
    #[arg(long, value_name = "N")]
    pub update_burst: Option<u32>,
    /// Seconds a new connection has to complete its handshake (HELLO, then
    /// the first KEEPALIVE) before it is closed; 0 leaves only the keepalive
    /// hold timer (2.5 × interval).
    #[arg(long, value_name = "SECS", default_value_t = defaults::HANDSHAKE_TIMEOUT.as_secs())]
    pub handshake_timeout: u64,
    /// Seconds the routes of a peer whose session ended (for any reason but
    /// this server's own shutdown) stay announced, held for it, so that an
    /// agent's restart is not a fleet-wide withdrawal; a peer announcing the
    /// same route meanwhile keeps it. 0 withdraws at once (as the Go server).
    #[arg(long, value_name = "SECS", default_value_t = defaults::PEER_GRACE.as_secs())]
    pub peer_grace: u64,
    /// Peer policy file (YAML, see README "Peer policy"): which source
    /// addresses may subscribe to and announce what. Without it every peer
    /// may do anything (as the Go server). SIGHUP re-reads it; a file that
    /// does not parse keeps the running policy.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

impl TryFrom<ServerArgs> for ServerConfig {
    type Error = ServerError;

    /// Resolves the addresses (host names too) and applies the defaults:
    /// what `metalbond server` runs with.
    fn try_from(a: ServerArgs) -> Result<ServerConfig, ServerError> {
        let mut listen = Vec::new();
        for text in &a.listen {
            for addr in resolve("--listen", text)? {
                if !listen.contains(&addr) {
                    listen.push(addr);
                }
            }
        }
        let mut c = ServerConfig::new(listen);
        if a.keepalive > 0 {
            c.keepalive = Duration::from_secs(a.keepalive.into());
        }
        if let Some(n) = a.shards {
            c.shards = n;
        }
        c.http = match &a.http {
            Some(text) => resolve("--http", text)?.into_iter().next(),
            None => None,
        };
        c.max_peers = a.max_peers;
        c.limits = PeerLimits {
            max_queued_bytes: a.max_queued_bytes,
            write_stall_timeout: (a.write_stall_timeout > 0)
                .then(|| Duration::from_secs(a.write_stall_timeout)),
            max_routes_per_peer: a.max_routes_per_peer,
            max_subscriptions_per_peer: a.max_subscriptions_per_peer,
            update_rate: (a.max_updates_per_second > 0).then(|| UpdateRate {
                per_second: a.max_updates_per_second,
                burst: a.update_burst.unwrap_or(a.max_updates_per_second).max(1),
            }),
            handshake_timeout: (a.handshake_timeout > 0)
                .then(|| Duration::from_secs(a.handshake_timeout)),
        };
        c.peer_grace = (a.peer_grace > 0).then(|| Duration::from_secs(a.peer_grace));
        if let Some(path) = &a.policy {
            let store = PolicyStore::load(path)?;
            tracing::info!(
                file = %path.display(),
                rules = store.current().rules.len(),
                "peer policy loaded"
            );
            c.policy = Some(Arc::new(store));
        }
        Ok(c)
    }
}

/// `IP:PORT` or `HOST:PORT` (IPv6 in brackets) → the addresses it stands
/// for; `flag` names the flag in the error.
fn resolve(flag: &str, text: &str) -> Result<Vec<SocketAddr>, ServerError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let bad = |why: String| ServerError::Config(format!("{flag} {text:?}: {why}"));
    if text
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(bad("expected IP:PORT or HOST:PORT, e.g. [::]:4711".into()));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("the name resolves to no address".into()));
    }
    Ok(addrs)
}

/// `metalbond server`: starts the shards, serves until SIGINT or SIGTERM,
/// shuts down cleanly (exit status 0). With `--policy`, SIGHUP reloads the
/// policy (without, `main` logs and ignores SIGHUP). `--http` serves the
/// status pages (`metalbond_http`).
pub fn run(args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    // Install the handler first, so a signal during start-up is not fatal.
    let mut watched = vec![SIGINT, SIGTERM];
    if args.policy.is_some() {
        watched.push(SIGHUP);
    }
    let mut signals = signal_hook::iterator::Signals::new(&watched)
        .map_err(|e| format!("cannot install signal handler: {e}"))?;
    let handle = Arc::new(Server::start(ServerConfig::try_from(args)?)?);
    // `--http`: status pages on their own threads, reading the handle's
    // atomics and snapshots (a bind failure stops the server: Drop).
    let http = match handle.config().http {
        Some(addr) => Some(metalbond_http::serve(
            addr,
            Arc::new(ServerStatusSource::new(handle.clone())),
        )?),
        None => None,
    };
    // systemd Type=notify: ready once every listener accepts and --http is bound.
    crate::readiness::notify_ready(&handle.ready_line());
    for sig in signals.forever() {
        if sig == SIGHUP {
            match handle.reload_policy() {
                Ok(generation) => {
                    tracing::info!(?generation, "SIGHUP: peer policy reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: policy not reloaded, the running policy stays")
                }
            }
            continue;
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    // Stop the HTTP side first: it holds the other reference to the handle.
    drop(http);
    match Arc::try_unwrap(handle) {
        Ok(handle) => handle.shutdown(),
        Err(shared) => drop(shared),
    }
    tracing::info!("server stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_addresses_and_host_names_and_keepalive_zero_is_the_default() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ServerArgs,
        }
        let parse = |argv: &[&str]| {
            let cli = Cli::try_parse_from([&["metalbond"], argv].concat()).unwrap();
            ServerConfig::try_from(cli.args)
        };
        let c = parse(&["--listen", "localhost:4711", "--keepalive", "0"]).unwrap();
        assert!(!c.listen.is_empty());
        assert!(c
            .listen
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 4711));
        assert_eq!(c.keepalive, defaults::KEEPALIVE);
        let c = parse(&["--listen", "[::]:4711,0.0.0.0:4711", "--http", "[::1]:4712"]).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.http, Some("[::1]:4712".parse().unwrap()));
        let e = parse(&["--listen", "4711"]).unwrap_err().to_string();
        assert!(
            e.contains("--listen \"4711\": expected IP:PORT or HOST:PORT"),
            "{e}"
        );
        let e = parse(&["--listen", "no-such-host.invalid:4711"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot resolve"), "{e}");
    }
}
