//! `metalbond client`: flags, their `#`-separated values, and the run loop.
//!
//! Owns: `ClientArgs` (every flag of PROTOCOL.md "Command line", repeatable
//! and comma-separated), turning them into typed settings with a one-line
//! error naming the flag, the value and the expected form (exit status 2),
//! and running the client (with the netlink thread for `--install-routes`)
//! until SIGINT/SIGTERM.
//!
//! Must never: panic on user input, or start sessions before every flag is
//! known to be valid.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metalbond_client::ClientStatusSource;
use metalbond_client::{Client, ClientConfig, ClientError, LogSink};
use metalbond_netlink::{KernelRoutes, KernelRoutesConfig, KernelTable};
use metalbond_telemetry::status::ReadyLatch;
use metalbond_wire::defaults;
use metalbond_wire::types::{IpNet, NextHop, NextHopKind, Route, Vni};

/// Expected form of `--announce`.
pub const ANNOUNCE_FORM: &str = "VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]";
/// Expected form of `--install-routes`.
pub const INSTALL_FORM: &str = "VNI#TABLE";
/// Expected form of `--server`.
pub const SERVER_FORM: &str = "HOST:PORT, e.g. [::1]:4711, 10.0.0.1:4711 or reflector.example:4711";

/// Text after the flag list of `metalbond client --help`: the rules shared
/// by several flags.
const AFTER_HELP: &str = "\
Lists: --server, --subscribe, --announce and --install-routes may be given
several times, and each value may also be a comma-separated list
(--subscribe 23,24 is --subscribe 23 --subscribe 24).

Tables (--install-routes VNI#TABLE): TABLE is a kernel table id
1-4294967295. 0 means the main table (254), as in the Go client (one info
line says so at start). Refused: 253 (\"default\": the system's last-resort
table, looked up after main by the default rules) and 255 (\"local\": the
kernel's own local and broadcast addresses; routes there would take over
local delivery). At start, protocol-254 routes left in the mapped tables are
deleted, so map only tables where protocol 254 means metalbond.

A malformed value ends start-up with one line naming the flag, the value and
the expected form, exit status 2. A host name in --server is resolved at
every connect attempt: one that does not resolve is logged and retried with
backoff.";

/// `metalbond client --help` text of `--install-routes`.
const INSTALL_HELP: &str = "Install received routes of VNI into kernel table TABLE (VNI#TABLE, \
e.g. 23#100; TABLE 1-4294967295, 0 = main (254); 253 and 255 are refused, see below). \
Repeatable or comma-separated. Needs --tun";

/// `metalbond client` flags. Each value is checked by its clap value parser
/// (the `parse_*` functions below), which fails with a `FlagValueError`;
/// `one_line_error` turns that into the same one-line error (flag, value,
/// expected form, exit status 2) for every malformed value. What depends on
/// several flags is checked by `ClientArgs::settings`.
#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct ClientArgs {
    /// Reflector to connect to: HOST:PORT, HOST an IPv6 address in brackets
    /// ([::1]:4711), an IPv4 address or a host name (resolved at every
    /// connect). Repeatable or comma-separated.
    #[arg(
        long = "server",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        required = true,
        value_parser = parse_server
    )]
    pub servers: Vec<String>,
    /// VNI to receive routes of, 0-16777215. Repeatable or comma-separated.
    #[arg(long = "subscribe", value_name = "VNI", value_delimiter = ',', value_parser = parse_subscribe)]
    pub subscribe: Vec<Vni>,
    /// Route to announce: VNI#PREFIX#NEXTHOP, optionally #STD, #LB or
    /// #NAT#FROM#TO (NAT needs its port range), e.g.
    /// 23#10.0.23.0/24#2001:db8::1. Repeatable or comma-separated.
    #[arg(long = "announce", value_name = ANNOUNCE_FORM, value_delimiter = ',', value_parser = parse_announce_flag)]
    pub announce: Vec<Route>,
    /// Kernel, HTTP and timing flags (boxed: keeps the command enum small).
    #[command(flatten)]
    pub options: Box<ClientOptions>,
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

/// The less common `metalbond client` flags.
#[derive(clap::Args, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// `--install-routes VNI#TABLE`.
    #[arg(long = "install-routes", value_name = INSTALL_FORM, value_delimiter = ',', help = INSTALL_HELP, value_parser = parse_install_flag)]
    pub install_routes: Vec<TableMapping>,
    /// Tunnel device for installed routes, a network interface name (the
    /// operator makes it: ip link add DEV type ip6tnl mode any external).
    #[arg(long = "tun", value_name = "DEV")]
    pub tun: Option<String>,
    /// Install only IPv4 destinations.
    #[arg(long = "ipv4-only")]
    pub ipv4_only: bool,
    /// Keepalive interval, whole seconds; 0 means the default (5), as in
    /// the Go client.
    #[arg(long = "keepalive", value_name = "SECS", default_value_t = defaults::KEEPALIVE.as_secs(), value_parser = parse_keepalive)]
    pub keepalive: u64,
    /// Serve status pages and metrics over HTTP on IP:PORT, e.g.
    /// [::1]:4712 (JSON at /routes.json).
    #[arg(long = "http", value_name = "IP:PORT", value_parser = parse_http)]
    pub http: Option<SocketAddr>,
    /// Delete our kernel routes and nexthop objects on exit.
    #[arg(long = "cleanup")]
    pub cleanup: bool,
    /// First reconnect delay, whole milliseconds (doubles with each failed
    /// attempt up to the maximum; starts again only after a session stayed
    /// up 30 s without a fault of the server).
    #[arg(long = "reconnect-min-ms", value_name = "MS", default_value_t = defaults::RECONNECT_MIN.as_millis() as u64, value_parser = parse_reconnect_min)]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, whole seconds.
    #[arg(long = "reconnect-max-secs", value_name = "SECS", default_value_t = defaults::RECONNECT_MAX.as_secs(), value_parser = parse_reconnect_max)]
    pub reconnect_max_secs: u64,
    /// Most routes one server may send us (held at once), a whole number
    /// ≥ 1. One more closes that session with an error and withdraws its
    /// routes; the client reconnects with backoff.
    #[arg(
        long = "max-routes-per-server",
        value_name = "N",
        default_value_t = defaults::MAX_ROUTES_PER_SERVER,
        value_parser = parse_max_routes
    )]
    pub max_routes_per_server: usize,
    /// Hitless restarts: seconds a lost server's routes stay installed as
    /// stale (refreshed when received again from the server, removed when
    /// withdrawn, swept when this ends), and the hold of the routes an
    /// earlier run left in the kernel, which are taken over at start instead
    /// of deleted. 0: remove at once and delete at start (the Go client's
    /// behaviour).
    #[arg(long = "stale-hold", value_name = "SECS", default_value_t = defaults::STALE_HOLD.as_secs(), value_parser = parse_stale_hold)]
    pub stale_hold: u64,
    /// Sign the sessions with TCP-MD5 (RFC 2385), the key read from PATH
    /// (refused if every user may read it; one trailing newline is not part
    /// of the key; re-read at every connect, so a new key applies from the
    /// next reconnect). SERVER=PATH signs only the session to that --server
    /// (as written there); a bare PATH every other session. Repeatable.
    #[arg(long = "md5-key-file", value_name = "[SERVER=]PATH")]
    pub md5_key_files: Vec<String>,
}

/// The command line's defaults (what clap fills in when no flag is given).
impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            install_routes: Vec::new(),
            tun: None,
            ipv4_only: false,
            keepalive: defaults::KEEPALIVE.as_secs(),
            http: None,
            cleanup: false,
            reconnect_min_ms: defaults::RECONNECT_MIN.as_millis() as u64,
            reconnect_max_secs: defaults::RECONNECT_MAX.as_secs(),
            max_routes_per_server: defaults::MAX_ROUTES_PER_SERVER,
            stale_hold: defaults::STALE_HOLD.as_secs(),
            md5_key_files: Vec::new(),
        }
    }
}

/// One `--install-routes VNI#TABLE` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableMapping {
    /// The VNI whose received routes are installed.
    pub vni: Vni,
    /// The kernel table they go to (0 already replaced by main).
    pub table: KernelTable,
    /// The value said 0 (the Go client's spelling of main): noted at start.
    pub main_alias: bool,
}

/// A malformed flag value, as a value parser reports it: what is wrong and
/// the form expected. Clap adds the flag and the value; `one_line_error`
/// puts the four together.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FlagValueError {
    /// What exactly is wrong.
    pub cause: String,
    /// The expected form.
    pub expected: &'static str,
}

impl fmt::Display for FlagValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; expected {}", self.cause, self.expected)
    }
}

impl std::error::Error for FlagValueError {}

/// The one line `metalbond client` prints for a clap error caused by one of
/// its value parsers (`invalid value 'V' for --flag: cause; expected FORM`),
/// or `None` for any other clap error (help, a missing or unknown flag:
/// clap prints those itself).
pub fn one_line_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    use std::error::Error as _;
    let FlagValueError { cause, expected } = e.source()?.downcast_ref::<FlagValueError>()?;
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    // "--keepalive <SECS>": the flag is the first word.
    let flag = text(ContextKind::InvalidArg)?.split(' ').next()?;
    let value = text(ContextKind::InvalidValue).unwrap_or_default();
    Some(ArgError::new(flag, value, expected, cause.clone()).to_string())
}

/// A malformed flag value: names the flag, the value and the expected form.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ArgError {
    /// The flag, e.g. `--announce`.
    pub flag: String,
    /// The offending value as given.
    pub value: String,
    /// The expected form.
    pub expected: &'static str,
    /// What exactly is wrong.
    pub cause: String,
}

impl ArgError {
    fn new(flag: &str, value: &str, expected: &'static str, cause: String) -> ArgError {
        ArgError {
            flag: flag.to_string(),
            value: value.to_string(),
            expected,
            cause,
        }
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {}: {}; expected {}",
            self.value, self.flag, self.cause, self.expected
        )
    }
}

impl std::error::Error for ArgError {}

/// The validated flags.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Server addresses, HOST:PORT.
    pub servers: Vec<String>,
    /// VNIs to subscribe to.
    pub subscriptions: Vec<Vni>,
    /// Routes to announce.
    pub announcements: Vec<Route>,
    /// VNI → kernel table (empty: no kernel routes).
    pub tables: BTreeMap<Vni, KernelTable>,
    /// Tunnel device (required with tables).
    pub tun: Option<String>,
    /// Skip IPv6 destinations.
    pub ipv4_only: bool,
    /// Delete kernel routes on exit.
    pub cleanup: bool,
    /// HTTP status address.
    pub http: Option<SocketAddr>,
    /// Session timing and limits.
    pub config: ClientConfig,
    /// Per server (as given to --server), the TCP-MD5 key file signing its
    /// session (`--md5-key-file`); servers not listed are unsigned.
    pub md5_key_files: BTreeMap<String, std::path::PathBuf>,
    /// What the flags meant where a value stands for something else (table
    /// 0, keepalive 0): logged at info once logging is up.
    pub notes: Vec<String>,
}

/// Expected form of `--subscribe`.
const VNI_FORM: &str = "VNI (0-16777215)";
/// Expected form of `--keepalive`.
const KEEPALIVE_FORM: &str = "SECS, whole seconds (0 = the default, 5)";
/// Expected form of `--max-routes-per-server`.
const MAX_ROUTES_FORM: &str = "N, a whole number ≥ 1";
/// Expected form of `--stale-hold`.
const STALE_HOLD_FORM: &str = "SECS, whole seconds 0-86400";
/// Expected form of `--http`.
const HTTP_FORM: &str = "IP:PORT, e.g. [::1]:4712";

/// A value parser's error.
fn bad(expected: &'static str, cause: impl Into<String>) -> FlagValueError {
    FlagValueError {
        cause: cause.into(),
        expected,
    }
}

/// `--server HOST:PORT`.
pub(crate) fn parse_server(value: &str) -> Result<String, FlagValueError> {
    metalbond_client::check_address(value).map_err(|c| bad(SERVER_FORM, c))?;
    Ok(value.to_string())
}

/// `--subscribe VNI`.
pub(crate) fn parse_subscribe(value: &str) -> Result<Vni, FlagValueError> {
    value.parse().map_err(|c| bad(VNI_FORM, c))
}

/// `--announce VNI#PREFIX#NEXTHOP[...]`.
fn parse_announce_flag(value: &str) -> Result<Route, FlagValueError> {
    parse_announce(value).map_err(|c| bad(ANNOUNCE_FORM, c))
}

/// `--install-routes VNI#TABLE`.
fn parse_install_flag(value: &str) -> Result<TableMapping, FlagValueError> {
    let (vni, table) = parse_table_mapping(value).map_err(|c| bad(INSTALL_FORM, c))?;
    let main_alias = value
        .split_once('#')
        .is_some_and(|(_, t)| t.parse() == Ok(0u32));
    Ok(TableMapping {
        vni,
        table,
        main_alias,
    })
}

/// `--keepalive SECS` (0 stays 0 here: `settings` notes it and uses the
/// default).
fn parse_keepalive(value: &str) -> Result<u64, FlagValueError> {
    value
        .parse()
        .ok()
        .filter(|&k| k <= u64::from(u32::MAX))
        .ok_or_else(|| bad(KEEPALIVE_FORM, "not a number of seconds"))
}

/// `--http IP:PORT`.
fn parse_http(value: &str) -> Result<SocketAddr, FlagValueError> {
    value
        .parse()
        .map_err(|_| bad(HTTP_FORM, "not a socket address"))
}

/// `--reconnect-min-ms MS`.
fn parse_reconnect_min(value: &str) -> Result<u64, FlagValueError> {
    value
        .parse()
        .map_err(|_| bad("MS, milliseconds", "not a number"))
}

/// `--reconnect-max-secs SECS`.
fn parse_reconnect_max(value: &str) -> Result<u64, FlagValueError> {
    value
        .parse()
        .map_err(|_| bad("SECS, seconds", "not a number"))
}

/// `--max-routes-per-server N`, N ≥ 1.
fn parse_max_routes(value: &str) -> Result<usize, FlagValueError> {
    value
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| bad(MAX_ROUTES_FORM, "not a positive number"))
}

/// `--stale-hold SECS`, at most a day.
fn parse_stale_hold(value: &str) -> Result<u64, FlagValueError> {
    value
        .parse()
        .ok()
        .filter(|&n| n <= MAX_STALE_HOLD_SECS)
        .ok_or_else(|| bad(STALE_HOLD_FORM, "not a number of seconds up to a day"))
}

/// `VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]`.
pub fn parse_announce(value: &str) -> Result<Route, String> {
    let parts: Vec<&str> = value.split('#').collect();
    if !(3..=6).contains(&parts.len()) || parts.len() == 5 {
        return Err(format!("{} '#'-separated fields", parts.len()));
    }
    let vni: Vni = parts[0].parse()?;
    let prefix: IpNet = parts[1]
        .parse()
        .map_err(|_| format!("'{}' is not an IP prefix (ADDR/LEN)", parts[1]))?;
    let target: IpAddr = parts[2]
        .parse()
        .map_err(|_| format!("'{}' is not an IP address", parts[2]))?;
    let kind_name = parts.get(3).map(|k| k.to_ascii_uppercase());
    let range = match (parts.get(4), parts.get(5)) {
        (Some(from), Some(to)) => Some((parse_port(from)?, parse_port(to)?)),
        _ => None,
    };
    let kind = match (kind_name.as_deref(), range) {
        (None | Some("STD") | Some("STANDARD"), None) => NextHopKind::Standard,
        (Some("LB") | Some("LOADBALANCER"), None) => NextHopKind::LoadBalancerTarget,
        (Some("NAT"), Some((from, to))) if from <= to => NextHopKind::Nat { from, to },
        (Some("NAT"), Some((from, to))) => {
            return Err(format!("NAT port range {from}-{to} is reversed"))
        }
        (Some("NAT"), None) => return Err("NAT needs a port range #FROM#TO".into()),
        (Some("STD" | "STANDARD" | "LB" | "LOADBALANCER"), Some(_)) => {
            return Err("only NAT takes a port range".into())
        }
        (Some(other), _) => return Err(format!("unknown next-hop type '{other}'")),
        (None, Some(_)) => return Err("a port range needs the NAT type".into()),
    };
    Ok(Route::new(
        vni,
        prefix,
        NextHop {
            target,
            target_vni: 0,
            kind,
        },
    ))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a port number (0-65535)"))
}

/// `VNI#TABLE`, TABLE a kernel table id 0..=4294967295 where 0 means the
/// main table (254, as in the Go client); 253 ("default") and 255
/// ("local") are refused.
pub fn parse_table_mapping(value: &str) -> Result<(Vni, KernelTable), String> {
    let (vni, table) = value
        .split_once('#')
        .ok_or_else(|| "missing '#'".to_string())?;
    let vni: Vni = vni.parse()?;
    let table: u32 = table
        .parse()
        .map_err(|_| format!("table '{table}' is not a number"))?;
    match table {
        0 => Ok((vni, KernelTable::MAIN)),
        253 => Err("table 253 (\"default\") is the system's last-resort table".into()),
        255 => Err("table 255 (\"local\") holds the kernel's local addresses".into()),
        _ => Ok((vni, KernelTable(table))),
    }
}

impl ClientArgs {
    /// `--md5-key-file [SERVER=]PATH` per server, each key file read once
    /// here so a missing, empty or world-readable one stops the start with
    /// a clear line (it is read again at every connect).
    fn md5_key_files(&self) -> Result<BTreeMap<String, std::path::PathBuf>, ArgError> {
        let form = "[SERVER=]PATH, SERVER one of the --server values";
        let mut default: Option<&str> = None;
        let mut per_server = BTreeMap::new();
        for value in &self.options.md5_key_files {
            let (server, path) = match value.split_once('=') {
                Some((server, path)) if self.servers.iter().any(|s| s == server) => {
                    (Some(server), path)
                }
                _ => (None, value.as_str()),
            };
            if let Err(e) = metalbond_utils::tcp_md5::Md5Key::read(std::path::Path::new(path)) {
                return Err(ArgError::new("--md5-key-file", value, form, e.to_string()));
            }
            match server {
                Some(server) => {
                    if per_server.insert(server.to_string(), path.into()).is_some() {
                        return Err(ArgError::new(
                            "--md5-key-file",
                            value,
                            form,
                            format!("{server} has a key file already"),
                        ));
                    }
                }
                None if default.is_some() => {
                    return Err(ArgError::new(
                        "--md5-key-file",
                        value,
                        form,
                        "a key file for every server is given already".into(),
                    ))
                }
                None => default = Some(path),
            }
        }
        if let Some(path) = default {
            for server in &self.servers {
                per_server
                    .entry(server.clone())
                    .or_insert_with(|| path.into());
            }
        }
        Ok(per_server)
    }

    /// Checks what depends on several flags (each value was checked by its
    /// parser): `--install-routes` needs `--tun`, a VNI maps to one table.
    pub fn settings(&self) -> Result<ClientSettings, ArgError> {
        let mut notes = Vec::new();
        let mut tables = BTreeMap::new();
        let mut main_aliases = Vec::new();
        for m in &self.options.install_routes {
            if m.main_alias {
                main_aliases.push(m.vni.to_string());
            }
            if let Some(old) = tables.insert(m.vni, m.table) {
                if old != m.table {
                    let given = if m.main_alias { 0 } else { m.table.0 };
                    return Err(ArgError::new(
                        "--install-routes",
                        &format!("{}#{given}", m.vni),
                        INSTALL_FORM,
                        format!("VNI {} is already mapped to table {old}", m.vni),
                    ));
                }
            }
        }
        if !tables.is_empty() && self.options.tun.is_none() {
            return Err(ArgError::new(
                "--tun",
                "",
                "DEV, the tunnel device",
                "--install-routes needs --tun".into(),
            ));
        }
        if !main_aliases.is_empty() {
            notes.push(format!(
                "--install-routes table 0 means the main table ({}), as in the Go client (VNI {})",
                KernelTable::MAIN,
                main_aliases.join(", ")
            ));
        }
        let mut keepalive = self.options.keepalive;
        if keepalive == 0 {
            keepalive = defaults::KEEPALIVE.as_secs();
            notes.push(format!(
                "--keepalive 0 means the default ({} s), as in the Go client",
                keepalive
            ));
        }
        let md5_key_files = self.md5_key_files()?;
        Ok(ClientSettings {
            md5_key_files,
            servers: self.servers.clone(),
            subscriptions: self.subscribe.clone(),
            announcements: self.announce.clone(),
            tables,
            tun: self.options.tun.clone(),
            ipv4_only: self.options.ipv4_only,
            cleanup: self.options.cleanup,
            http: self.options.http,
            config: ClientConfig {
                keepalive: Duration::from_secs(keepalive),
                reconnect_min: Duration::from_millis(self.options.reconnect_min_ms.max(1)),
                reconnect_max: Duration::from_secs(self.options.reconnect_max_secs.max(1)),
                max_routes_per_server: self.options.max_routes_per_server,
                stale_hold: Duration::from_secs(self.options.stale_hold),
                ..ClientConfig::default()
            },
            notes,
        })
    }
}

/// Longest `--stale-hold`: a day (routes held longer are no longer a
/// restart's).
const MAX_STALE_HOLD_SECS: u64 = 86_400;

/// How long the exit waits for queued route changes to reach the sink.
const SINK_DRAIN: Duration = Duration::from_secs(5);

/// Runs `metalbond client` until SIGINT or SIGTERM.
///
/// A malformed flag value prints one line and exits with status 2 (like
/// every other usage error); problems found at start (no tunnel device, no
/// CAP_NET_ADMIN) are returned as errors. `--http` serves the status
/// pages (`metalbond_http`).
pub fn run(args: ClientArgs) -> Result<(), Box<dyn std::error::Error>> {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("metalbond client: {e}");
            std::process::exit(2);
        }
    };
    for note in &settings.notes {
        tracing::info!("{note}");
    }
    for vni in settings.tables.keys() {
        if !settings.subscriptions.contains(vni) {
            tracing::warn!(%vni, "--install-routes maps a VNI that is not in --subscribe: nothing will be received for it");
        }
    }
    let kernel = match (&settings.tun, settings.tables.is_empty()) {
        (Some(device), false) => Some(KernelRoutes::start(KernelRoutesConfig {
            tables: settings.tables.clone(),
            device: device.clone(),
            ipv4_only: settings.ipv4_only,
            cleanup_on_exit: settings.cleanup,
            reconcile_interval: defaults::RECONCILE_INTERVAL,
            stale_hold: Some(settings.config.stale_hold).filter(|h| !h.is_zero()),
        })?),
        _ => None,
    };
    let client = match &kernel {
        Some(kernel) => Client::new(settings.config.clone(), kernel.sink()),
        None => Client::new(settings.config.clone(), LogSink),
    };
    // Readiness: one rule (`ClientReadiness`) for systemd `READY=1` and
    // `/readyz`, decided below and shared through the latch.
    let ready = ReadyLatch::new("starting");
    let http = match settings.http {
        Some(addr) => Some(metalbond_http::serve(
            addr,
            Arc::new(
                ClientStatusSource::new(
                    &client,
                    kernel.as_ref().map(|k| {
                        Box::new(k.status()) as Box<dyn metalbond_telemetry::KernelStatsSource>
                    }),
                )
                .with_readiness(ready.clone()),
            ),
        )?),
        None => None,
    };
    for vni in &settings.subscriptions {
        warn_duplicate(client.subscribe(*vni));
    }
    for route in &settings.announcements {
        warn_duplicate(client.announce(*route));
    }
    for server in &settings.servers {
        let options = metalbond_client::ServerOptions {
            md5_key_file: settings.md5_key_files.get(server).cloned(),
            ..Default::default()
        };
        warn_duplicate(client.add_server_with(server, options));
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    // systemd Type=notify: READY=1 once every server is up or failed once.
    let mut readiness = crate::readiness::ClientReadiness::default();
    let signal = crate::readiness::serve_until_signal(&mut signals, || {
        let decided = readiness.check(&client, kernel.as_ref());
        ready.update(decided.clone());
        decided.ok()
    });
    if let Some(signal) = signal {
        tracing::info!(signal, "shutting down");
    }
    drop(http);
    // Let the changes already queued reach the netlink thread (and drop its
    // sink) before the thread stops and, with --cleanup, removes its routes.
    if !client.shutdown_timeout(SINK_DRAIN) {
        tracing::warn!(
            ?SINK_DRAIN,
            "changes still queued for the kernel routes at exit"
        );
    }
    if let Some(kernel) = kernel {
        kernel.shutdown()?;
    }
    Ok(())
}

fn warn_duplicate(result: Result<(), ClientError>) {
    if let Err(e) = result {
        tracing::warn!("ignored duplicate flag value: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags as `metalbond client ARGS` would parse them.
    fn parse(argv: &[&str]) -> Result<ClientArgs, clap::Error> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: ClientArgs,
        }
        let cmd = Cmd::try_parse_from(std::iter::once("client").chain(argv.iter().copied()))?;
        Ok(cmd.args)
    }

    fn args(servers: &[&str]) -> ClientArgs {
        ClientArgs {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            subscribe: Vec::new(),
            announce: Vec::new(),
            options: Box::default(),
            verbose: false,
        }
    }

    /// The flag a malformed value is reported for (through clap, as the
    /// binary reports it).
    fn flag_of(argv: &[&str]) -> String {
        let e = parse(argv).expect_err("a malformed value is an error");
        let line = one_line_error(&e).expect("one line for a value error");
        assert!(!line.contains('\n'), "{line}");
        line.split(" for ")
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn announce_forms() {
        let r = parse_announce("23#10.0.23.0/24#2001:db8::1").unwrap();
        assert_eq!(r.vni.get(), 23);
        assert_eq!(r.destination.to_string(), "10.0.23.0/24");
        assert_eq!(r.next_hop.kind, NextHopKind::Standard);
        assert_eq!(
            parse_announce("23#10.0.23.0/24#2001:db8::1#LB")
                .unwrap()
                .next_hop
                .kind,
            NextHopKind::LoadBalancerTarget
        );
        assert_eq!(
            parse_announce("23#10.0.23.0/24#2001:db8::1#std")
                .unwrap()
                .next_hop
                .kind,
            NextHopKind::Standard
        );
        assert_eq!(
            parse_announce("23#10.0.23.5/32#2001:db8::1#NAT#1024#2047")
                .unwrap()
                .next_hop
                .kind,
            NextHopKind::Nat {
                from: 1024,
                to: 2047
            }
        );
        assert!(parse_announce("23#2001:db8:9::/64#2001:db8::1").is_ok());
    }

    #[test]
    fn malformed_announce_values_say_what_is_wrong() {
        for (value, cause) in [
            ("23#10.0.23.0/24", "2 '#'-separated fields"),
            ("x#10.0.23.0/24#2001:db8::1", "not a number"),
            ("16777216#10.0.23.0/24#2001:db8::1", "out of range"),
            ("23#10.0.23.0#2001:db8::1", "not an IP prefix"),
            ("23#10.0.23.0/24#nowhere", "not an IP address"),
            ("23#10.0.23.0/24#2001:db8::1#NAT", "needs a port range"),
            ("23#10.0.23.0/24#2001:db8::1#NAT#9#1", "reversed"),
            (
                "23#10.0.23.0/24#2001:db8::1#NAT#1#70000",
                "not a port number",
            ),
            ("23#10.0.23.0/24#2001:db8::1#LB#1#2", "only NAT"),
            ("23#10.0.23.0/24#2001:db8::1#FOO", "unknown next-hop type"),
            ("23#10.0.23.0/24#2001:db8::1#NAT#1", "5 '#'-separated"),
        ] {
            let err = parse_announce(value).unwrap_err();
            assert!(err.contains(cause), "{value}: {err}");
        }
    }

    #[test]
    fn table_mappings() {
        assert_eq!(
            parse_table_mapping("23#1000").unwrap(),
            (Vni::new(23).unwrap(), KernelTable(1000))
        );
        // 0 is the main table, as in the Go client; main itself is fine.
        for (value, table) in [("23#0", 254), ("23#254", 254), ("23#4294967295", u32::MAX)] {
            assert_eq!(
                parse_table_mapping(value).unwrap(),
                (Vni::new(23).unwrap(), KernelTable(table)),
                "{value}"
            );
        }
        for (bad, cause) in [
            ("23", "missing '#'"),
            ("23#x", "not a number"),
            ("23#253", "\"default\""),
            ("23#255", "\"local\""),
            ("x#100", "not a number"),
            ("23#100#1", "not a number"),
            ("23#4294967296", "not a number"),
        ] {
            let err = parse_table_mapping(bad).unwrap_err();
            assert!(err.contains(cause), "{bad}: {err}");
        }
    }

    #[test]
    fn settings_error_names_flag_value_and_form_on_one_line() {
        let e = parse(&[
            "--server",
            "[::1]:4711",
            "--announce",
            "23#10.0.0.0/24#2001:db8::1,23#bad",
        ])
        .expect_err("malformed --announce");
        let line = one_line_error(&e).expect("a value error");
        assert!(!line.contains('\n'));
        assert!(
            line.contains("--announce") && line.contains("'23#bad'"),
            "{line}"
        );
        assert!(line.contains(ANNOUNCE_FORM), "{line}");

        let mut a = parse(&["--server", "[::1]:4711", "--install-routes", "23#100"]).unwrap();
        assert_eq!(a.settings().unwrap_err().flag, "--tun");
        a.options.tun = Some("overlay-tun".into());
        a.options
            .install_routes
            .push(parse_install_flag("23#101").unwrap());
        assert_eq!(a.settings().unwrap_err().flag, "--install-routes");

        assert_eq!(
            flag_of(&["--server", "[::1]:4711", "--keepalive=-1"]),
            "--keepalive"
        );
        assert_eq!(
            flag_of(&["--server", "[::1]:4711", "--max-routes-per-server", "0"]),
            "--max-routes-per-server"
        );
        assert_eq!(flag_of(&["--server", "::1:4711"]), "--server");
    }

    #[test]
    fn defaults_come_from_the_defaults_module() {
        let a = parse(&["--server", "[::1]:4711"]).unwrap();
        let s = a.settings().unwrap();
        let d = ClientConfig::default();
        assert_eq!(s.config.keepalive, d.keepalive);
        assert_eq!(s.config.reconnect_min, d.reconnect_min);
        assert_eq!(s.config.reconnect_max, d.reconnect_max);
        assert_eq!(s.config.max_routes_per_server, d.max_routes_per_server);
        assert_eq!(s.config.stale_hold, d.stale_hold);
        assert_eq!(*a.options, ClientOptions::default());
    }

    #[test]
    fn good_settings() {
        let mut a = args(&["[::1]:4711", "127.0.0.1:4711"]);
        a.subscribe = vec![Vni::new(23).unwrap(), Vni::new(24).unwrap()];
        a.options.install_routes = vec![
            parse_install_flag("23#100").unwrap(),
            parse_install_flag("24#1000").unwrap(),
        ];
        a.options.tun = Some("overlay-tun".into());
        a.options.keepalive = 3;
        let s = a.settings().unwrap();
        assert_eq!(s.servers.len(), 2);
        assert_eq!(s.subscriptions.len(), 2);
        assert_eq!(s.tables.len(), 2);
        assert_eq!(s.config.keepalive, Duration::from_secs(3));
        assert_eq!(s.config.max_routes_per_server, 2_000_000);
        assert!(s.notes.is_empty());
    }

    #[test]
    fn go_client_spellings_mean_the_defaults() {
        let mut a = parse(&[
            "--server",
            "[::1]:4711,localhost:4711",
            "--subscribe",
            "123",
            "--install-routes",
            "123#0,124#0",
            "--tun",
            "overlay-tun",
            "--keepalive",
            "0",
            "--max-routes-per-server",
            "10",
        ])
        .unwrap();
        a.options.ipv4_only = false;
        let s = a.settings().unwrap();
        assert_eq!(s.tables[&Vni::new(123).unwrap()], KernelTable(254));
        assert_eq!(s.config.keepalive, Duration::from_secs(5));
        assert_eq!(s.config.max_routes_per_server, 10);
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        assert!(s.notes[0].contains("main table (254)") && s.notes[0].contains("123, 124"));
        assert!(s.notes[1].contains("--keepalive 0"));
    }
}
