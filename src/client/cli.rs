//! `metalbond client`: flags, their `#`-separated values, and the run loop.
//!
//! Owns: `ClientArgs` (every flag of PROTOCOL.md "Command line", repeatable
//! and comma-separated), turning them into typed settings with a one-line
//! error naming the flag, the value and the expected form (exit status 2),
//! and running the client (with the netlink shard for `--install-routes`)
//! until SIGINT/SIGTERM.
//!
//! Must never: panic on user input, or start sessions before every flag is
//! known to be valid.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{Client, ClientConfig, ClientError, LogSink};
use crate::netlink::{KernelRoutes, KernelRoutesConfig, RouteTable, DEFAULT_RECONCILE_INTERVAL};
use crate::session::DEFAULT_KEEPALIVE;
use crate::types::{IpNet, NextHop, NextHopKind, Route, Vni};

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

/// `metalbond client` flags. Values are kept as text here and checked by
/// `ClientArgs::settings`, so every malformed value gets the same one-line
/// error (flag, value, expected form) and exit status 2.
#[derive(clap::Args, Debug, Default)]
#[command(after_help = AFTER_HELP)]
pub struct ClientArgs {
    /// Reflector to connect to: HOST:PORT, HOST an IPv6 address in brackets
    /// ([::1]:4711), an IPv4 address or a host name (resolved at every
    /// connect). Repeatable or comma-separated.
    #[arg(
        long = "server",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        required = true
    )]
    pub servers: Vec<String>,
    /// VNI to receive routes of, 0-16777215. Repeatable or comma-separated.
    #[arg(long = "subscribe", value_name = "VNI", value_delimiter = ',')]
    pub subscribe: Vec<String>,
    /// Route to announce: VNI#PREFIX#NEXTHOP, optionally #STD, #LB or
    /// #NAT#FROM#TO (NAT needs its port range), e.g.
    /// 23#10.0.23.0/24#2001:db8::1. Repeatable or comma-separated.
    #[arg(long = "announce", value_name = ANNOUNCE_FORM, value_delimiter = ',')]
    pub announce: Vec<String>,
    /// Kernel, HTTP and timing flags (boxed: keeps the command enum small).
    #[command(flatten)]
    pub options: Box<ClientOptions>,
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

/// The less common `metalbond client` flags.
#[derive(clap::Args, Debug, Default)]
pub struct ClientOptions {
    /// `--install-routes VNI#TABLE`, as given (checked by `settings`).
    #[arg(long = "install-routes", value_name = INSTALL_FORM, value_delimiter = ',', help = INSTALL_HELP)]
    pub install_routes: Vec<String>,
    /// Tunnel device for installed routes, a network interface name (the
    /// operator makes it: ip link add DEV type ip6tnl mode any external).
    #[arg(long = "tun", value_name = "DEV")]
    pub tun: Option<String>,
    /// Install only IPv4 destinations.
    #[arg(long = "ipv4-only")]
    pub ipv4_only: bool,
    /// Keepalive interval, whole seconds; 0 means the default (5), as in
    /// the Go client.
    #[arg(long = "keepalive", value_name = "SECS", default_value = "5")]
    pub keepalive: String,
    /// Serve status pages and metrics over HTTP on IP:PORT, e.g.
    /// [::1]:4712 (JSON at /routes.json).
    #[arg(long = "http", value_name = "IP:PORT")]
    pub http: Option<String>,
    /// Delete our kernel routes and nexthop objects on exit.
    #[arg(long = "cleanup")]
    pub cleanup: bool,
    /// First reconnect delay, whole milliseconds (doubles with each failed
    /// attempt up to the maximum; starts again only after a session stayed
    /// up 30 s without a fault of the server).
    #[arg(long = "reconnect-min-ms", value_name = "MS", default_value = "500")]
    pub reconnect_min_ms: String,
    /// Largest reconnect delay, whole seconds.
    #[arg(long = "reconnect-max-secs", value_name = "SECS", default_value = "30")]
    pub reconnect_max_secs: String,
    /// Most routes one server may send us (held at once), a whole number
    /// ≥ 1. One more closes that session with an error and withdraws its
    /// routes; the client reconnects with backoff.
    #[arg(
        long = "max-routes-per-server",
        value_name = "N",
        default_value = "2000000"
    )]
    pub max_routes_per_server: String,
    /// Hitless restarts: seconds a lost server's routes stay installed as
    /// stale (refreshed when received again from the server, removed when
    /// withdrawn, swept when this ends), and the hold of the routes an
    /// earlier run left in the kernel, which are taken over at start instead
    /// of deleted. 0: remove at once and delete at start (the Go client's
    /// behaviour).
    #[arg(long = "stale-hold", value_name = "SECS", default_value = "60")]
    pub stale_hold: String,
}

/// A malformed flag value: names the flag, the value and the expected form.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ArgError {
    /// The flag, e.g. `--announce`.
    pub flag: &'static str,
    /// The offending value as given.
    pub value: String,
    /// The expected form.
    pub expected: &'static str,
    /// What exactly is wrong.
    pub cause: String,
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
    pub tables: BTreeMap<Vni, RouteTable>,
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
    /// What the flags meant where a value stands for something else (table
    /// 0, keepalive 0): logged at info once logging is up.
    pub notes: Vec<String>,
}

/// `VNI`: a number up to 2^24-1.
pub fn parse_vni(value: &str) -> Result<Vni, String> {
    let n: u32 = value
        .trim()
        .parse()
        .map_err(|_| format!("'{value}' is not a number"))?;
    Vni::new(n).map_err(|e| e.to_string())
}

/// `VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]`.
pub fn parse_announce(value: &str) -> Result<Route, String> {
    let parts: Vec<&str> = value.split('#').collect();
    if !(3..=6).contains(&parts.len()) || parts.len() == 5 {
        return Err(format!("{} '#'-separated fields", parts.len()));
    }
    let vni = parse_vni(parts[0])?;
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
pub fn parse_table_mapping(value: &str) -> Result<(Vni, RouteTable), String> {
    let (vni, table) = value
        .split_once('#')
        .ok_or_else(|| "missing '#'".to_string())?;
    let vni = parse_vni(vni)?;
    let table: u32 = table
        .parse()
        .map_err(|_| format!("table '{table}' is not a number"))?;
    match table {
        0 => Ok((vni, RouteTable::MAIN)),
        253 => Err("table 253 (\"default\") is the system's last-resort table".into()),
        255 => Err("table 255 (\"local\") holds the kernel's local addresses".into()),
        _ => Ok((vni, RouteTable(table))),
    }
}

fn arg_err(flag: &'static str, value: &str, expected: &'static str, cause: String) -> ArgError {
    ArgError {
        flag,
        value: value.to_string(),
        expected,
        cause,
    }
}

impl ClientArgs {
    /// Validates every flag; the first malformed value is the error.
    pub fn settings(&self) -> Result<ClientSettings, ArgError> {
        let mut notes = Vec::new();
        for s in &self.servers {
            super::check_address(s).map_err(|c| arg_err("--server", s, SERVER_FORM, c))?;
        }
        let subscriptions = self
            .subscribe
            .iter()
            .map(|v| parse_vni(v).map_err(|c| arg_err("--subscribe", v, "VNI (0-16777215)", c)))
            .collect::<Result<Vec<_>, _>>()?;
        let announcements = self
            .announce
            .iter()
            .map(|v| parse_announce(v).map_err(|c| arg_err("--announce", v, ANNOUNCE_FORM, c)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tables = BTreeMap::new();
        let mut main_aliases = Vec::new();
        for v in &self.options.install_routes {
            let (vni, table) = parse_table_mapping(v)
                .map_err(|c| arg_err("--install-routes", v, INSTALL_FORM, c))?;
            if v.split_once('#')
                .is_some_and(|(_, t)| t.parse() == Ok(0u32))
            {
                main_aliases.push(vni.to_string());
            }
            if let Some(old) = tables.insert(vni, table) {
                if old != table {
                    return Err(arg_err(
                        "--install-routes",
                        v,
                        INSTALL_FORM,
                        format!("VNI {vni} is already mapped to table {old}"),
                    ));
                }
            }
        }
        if !tables.is_empty() && self.options.tun.is_none() {
            return Err(arg_err(
                "--tun",
                "",
                "DEV, the tunnel device",
                "--install-routes needs --tun".into(),
            ));
        }
        if !main_aliases.is_empty() {
            notes.push(format!(
                "--install-routes table 0 means the main table ({}), as in the Go client (VNI {})",
                RouteTable::MAIN,
                main_aliases.join(", ")
            ));
        }
        let mut keepalive: u64 = self
            .options
            .keepalive
            .parse()
            .ok()
            .filter(|&k| k <= u64::from(u32::MAX))
            .ok_or_else(|| {
                arg_err(
                    "--keepalive",
                    &self.options.keepalive,
                    "SECS, whole seconds (0 = the default, 5)",
                    "not a number of seconds".into(),
                )
            })?;
        if keepalive == 0 {
            keepalive = DEFAULT_KEEPALIVE.as_secs();
            notes.push(format!(
                "--keepalive 0 means the default ({} s), as in the Go client",
                keepalive
            ));
        }
        let max_routes_per_server: usize = self
            .options
            .max_routes_per_server
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                arg_err(
                    "--max-routes-per-server",
                    &self.options.max_routes_per_server,
                    "N, a whole number ≥ 1",
                    "not a positive number".into(),
                )
            })?;
        let reconnect_min: u64 = self.options.reconnect_min_ms.parse().map_err(|_| {
            arg_err(
                "--reconnect-min-ms",
                &self.options.reconnect_min_ms,
                "MS, milliseconds",
                "not a number".into(),
            )
        })?;
        let reconnect_max: u64 = self.options.reconnect_max_secs.parse().map_err(|_| {
            arg_err(
                "--reconnect-max-secs",
                &self.options.reconnect_max_secs,
                "SECS, seconds",
                "not a number".into(),
            )
        })?;
        let stale_hold: u64 = self
            .options
            .stale_hold
            .parse()
            .ok()
            .filter(|&n| n <= MAX_STALE_HOLD_SECS)
            .ok_or_else(|| {
                arg_err(
                    "--stale-hold",
                    &self.options.stale_hold,
                    "SECS, whole seconds 0-86400",
                    "not a number of seconds up to a day".into(),
                )
            })?;
        let http = self
            .options
            .http
            .as_deref()
            .map(|h| {
                h.parse::<SocketAddr>().map_err(|_| {
                    arg_err(
                        "--http",
                        h,
                        "IP:PORT, e.g. [::1]:4712",
                        "not a socket address".into(),
                    )
                })
            })
            .transpose()?;
        Ok(ClientSettings {
            servers: self.servers.clone(),
            subscriptions,
            announcements,
            tables,
            tun: self.options.tun.clone(),
            ipv4_only: self.options.ipv4_only,
            cleanup: self.options.cleanup,
            http,
            config: ClientConfig {
                keepalive: Duration::from_secs(keepalive),
                reconnect_min: Duration::from_millis(reconnect_min.max(1)),
                reconnect_max: Duration::from_secs(reconnect_max.max(1)),
                max_routes_per_server,
                stale_hold: Duration::from_secs(stale_hold),
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
/// CAP_NET_ADMIN) are returned as errors.
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
    let shard = match (&settings.tun, settings.tables.is_empty()) {
        (Some(device), false) => Some(KernelRoutes::start(KernelRoutesConfig {
            tables: settings.tables.clone(),
            device: device.clone(),
            ipv4_only: settings.ipv4_only,
            cleanup_on_exit: settings.cleanup,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            stale_hold: Some(settings.config.stale_hold).filter(|h| !h.is_zero()),
        })?),
        _ => None,
    };
    let client = match &shard {
        Some(shard) => Client::new(settings.config.clone(), shard.sink()),
        None => Client::new(settings.config.clone(), LogSink),
    };
    let http = match settings.http {
        Some(addr) => Some(super::http::serve(
            addr,
            &client,
            shard.as_ref().map(KernelRoutes::stats),
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
        warn_duplicate(client.add_server(server));
    }
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    // systemd Type=notify: READY=1 once every server is up or failed once.
    let mut readiness = crate::readiness::ClientReadiness::default();
    let signal = crate::readiness::serve_until_signal(&mut signals, || readiness.check(&client));
    if let Some(signal) = signal {
        tracing::info!(signal, "shutting down");
    }
    drop(http);
    // Let the changes already queued reach the kernel shard (and drop its
    // sink) before the shard stops and, with --cleanup, removes its routes.
    if !client.shutdown_timeout(SINK_DRAIN) {
        tracing::warn!(
            ?SINK_DRAIN,
            "changes still queued for the kernel routes at exit"
        );
    }
    if let Some(shard) = shard {
        shard.shutdown()?;
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

    fn args(servers: &[&str]) -> ClientArgs {
        ClientArgs {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            options: Box::new(ClientOptions {
                keepalive: "5".into(),
                reconnect_min_ms: "500".into(),
                reconnect_max_secs: "30".into(),
                max_routes_per_server: "2000000".into(),
                stale_hold: "60".into(),
                ..ClientOptions::default()
            }),
            ..ClientArgs::default()
        }
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
            (Vni::new(23).unwrap(), RouteTable(1000))
        );
        // 0 is the main table, as in the Go client; main itself is fine.
        for (value, table) in [("23#0", 254), ("23#254", 254), ("23#4294967295", u32::MAX)] {
            assert_eq!(
                parse_table_mapping(value).unwrap(),
                (Vni::new(23).unwrap(), RouteTable(table)),
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
        let mut a = args(&["[::1]:4711"]);
        a.announce = vec!["23#10.0.0.0/24#2001:db8::1".into(), "23#bad".into()];
        let e = a.settings().unwrap_err();
        let line = e.to_string();
        assert!(!line.contains('\n'));
        assert!(
            line.contains("--announce") && line.contains("'23#bad'"),
            "{line}"
        );
        assert!(line.contains(ANNOUNCE_FORM), "{line}");

        let mut a = args(&["[::1]:4711"]);
        a.options.install_routes = vec!["23#100".into()];
        assert_eq!(a.settings().unwrap_err().flag, "--tun");
        a.options.tun = Some("overlay-tun".into());
        a.options.install_routes.push("23#101".into());
        assert_eq!(a.settings().unwrap_err().flag, "--install-routes");

        let mut a = args(&["[::1]:4711"]);
        a.options.keepalive = "-1".into();
        assert_eq!(a.settings().unwrap_err().flag, "--keepalive");
        let mut a = args(&["[::1]:4711"]);
        a.options.max_routes_per_server = "0".into();
        assert_eq!(a.settings().unwrap_err().flag, "--max-routes-per-server");
        let a = args(&["::1:4711"]);
        assert_eq!(a.settings().unwrap_err().flag, "--server");
    }

    #[test]
    fn good_settings() {
        let mut a = args(&["[::1]:4711", "127.0.0.1:4711"]);
        a.subscribe = vec!["23".into(), "24".into()];
        a.options.install_routes = vec!["23#100".into(), "24#1000".into()];
        a.options.tun = Some("overlay-tun".into());
        a.options.keepalive = "3".into();
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
        let mut a = args(&["[::1]:4711", "localhost:4711"]);
        a.subscribe = vec!["123".into()];
        a.options.install_routes = vec!["123#0".into(), "124#0".into()];
        a.options.tun = Some("overlay-tun".into());
        a.options.keepalive = "0".into();
        a.options.max_routes_per_server = "10".into();
        let s = a.settings().unwrap();
        assert_eq!(s.tables[&Vni::new(123).unwrap()], RouteTable(254));
        assert_eq!(s.config.keepalive, Duration::from_secs(5));
        assert_eq!(s.config.max_routes_per_server, 10);
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        assert!(s.notes[0].contains("main table (254)") && s.notes[0].contains("123, 124"));
        assert!(s.notes[1].contains("--keepalive 0"));
    }
}
