//! `metalbond show summary | peers | routes | route ADDR`: a running
//! daemon's state from its status port (`/api/v1/...`), as a table for a
//! terminal or, with `--json`, the API's objects for scripts; like `gobgp
//! neighbor`, `birdc show route for`, `vtysh show bgp summary`.
//!
//! Owns: the command line of `show`, the requests it makes (following
//! `next` through every page of `/api/v1/routes`), the tables it prints and
//! its exit status: 0 when something was found, 1 when nothing matched, 2
//! on usage errors, 3 when the daemon cannot be read.
//!
//! Must never: change anything on the daemon.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use super::fetch::{self, FetchError};
use metalbond_wire::types::{IpNet, Vni};

/// `metalbond show`: a running daemon's summary, peers or routes.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The daemon's status port (its `--http`).
    #[arg(
        long = "http",
        value_name = "HOST:PORT",
        default_value = "[::1]:4712",
        global = true
    )]
    pub http: String,
    /// The API's JSON objects instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds allowed for each request.
    #[arg(long, value_name = "SECS", default_value_t = 30, global = true)]
    pub timeout: u64,
    /// What to show.
    #[command(subcommand)]
    pub what: ShowWhat,
}

/// What `metalbond show` shows.
#[derive(clap::Subcommand, Debug)]
pub enum ShowWhat {
    /// Version, sessions, and per VNI routes, subscribers and digest.
    Summary,
    /// Every session: address, state, since, routes, VNIs.
    Peers,
    /// Routes of one VNI or all, optionally of one prefix or peer.
    Routes {
        /// Only this VNI (default: every VNI the daemon has).
        #[arg(long, value_name = "VNI")]
        vni: Option<Vni>,
        /// Only routes to exactly this prefix.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<IpNet>,
        /// Only next hops announced by this peer (server) or received from
        /// this server (client), by IP address.
        #[arg(long, value_name = "ADDR")]
        peer: Option<std::net::IpAddr>,
    },
    /// The routes to the most specific prefix covering ADDR in a VNI
    /// (longest-prefix match).
    Route {
        /// The overlay address to look up.
        addr: std::net::IpAddr,
        /// The VNI to look in.
        #[arg(long, value_name = "VNI")]
        vni: Vni,
    },
}

/// Exit status: nothing matched.
const NOTHING: u8 = 1;
/// Exit status: the daemon could not be read.
const UNREACHABLE: u8 = 3;

/// Runs `show`; the exit status says what was found.
pub fn run(args: ShowArgs) -> ExitCode {
    let api = Api {
        addr: &args.http,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let result = match &args.what {
        ShowWhat::Summary => api.get("/api/v1/summary").map(|s| {
            let text = summary_text(&s);
            (s, text, true)
        }),
        ShowWhat::Peers => api.get("/api/v1/peers").map(|p| {
            let found = p["peers"].as_array().is_some_and(|a| !a.is_empty());
            let text = peers_text(&p);
            (p, text, found)
        }),
        ShowWhat::Routes { vni, prefix, peer } => {
            let mut query = String::new();
            if let Some(p) = prefix {
                let _ = write!(query, "&prefix={}", encode(&p.to_string()));
            }
            if let Some(a) = peer {
                let _ = write!(query, "&peer={}", encode(&a.to_string()));
            }
            api.all_routes(*vni, &query)
        }
        ShowWhat::Route { addr, vni } => api
            .routes(*vni, &format!("&lookup={}", encode(&addr.to_string())))
            .map(routes_result),
    };
    match result {
        Ok((json, text, found)) => {
            if args.json {
                println!("{json}");
            } else {
                print!("{text}");
            }
            if found {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(NOTHING)
            }
        }
        Err(e) => {
            eprintln!("metalbond show: cannot read {e}");
            ExitCode::from(UNREACHABLE)
        }
    }
}

/// Percent-encodes a query value (prefixes carry `/`, IPv6 `:`).
fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// One daemon's API.
struct Api<'a> {
    /// Its status port.
    addr: &'a str,
    /// Per request.
    timeout: Duration,
}

impl Api<'_> {
    /// GET `path`, as JSON. A 404 of `/api/v1/routes` (an unknown VNI) is
    /// an empty answer, not an error.
    fn get(&self, path: &str) -> Result<serde_json::Value, FetchError> {
        let fail = |cause: String| FetchError {
            addr: self.addr.to_string(),
            cause,
        };
        let answer = fetch::get(self.addr, path, self.timeout)?;
        let v: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|_| {
            fail(format!(
                "{path} answered status {} with no JSON (a daemon without /api/v1?)",
                answer.status
            ))
        })?;
        match answer.status {
            200 => Ok(v),
            404 if path.starts_with("/api/v1/routes") => Ok(serde_json::json!({ "routes": [] })),
            s => Err(fail(format!(
                "{path} answered status {s}: {}",
                v["error"].as_str().unwrap_or("no reason given")
            ))),
        }
    }

    /// Every page of `/api/v1/routes?vni=V…`.
    fn routes(&self, vni: Vni, query: &str) -> Result<Vec<serde_json::Value>, FetchError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/routes?vni={vni}&limit=10000{query}");
            if let Some(a) = &after {
                let _ = write!(path, "&after={}", encode(a));
            }
            let page = self.get(&path)?;
            out.extend(page["routes"].as_array().into_iter().flatten().cloned());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return Ok(out),
            }
        }
    }

    /// The routes of `vni`, or of every VNI the summary lists.
    fn all_routes(
        &self,
        vni: Option<Vni>,
        query: &str,
    ) -> Result<(serde_json::Value, String, bool), FetchError> {
        let vnis: Vec<Vni> = match vni {
            Some(v) => vec![v],
            None => self.get("/api/v1/summary")?["vnis"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| Vni::new(u32::try_from(v["vni"].as_u64()?).ok()?).ok())
                .collect(),
        };
        let mut routes = Vec::new();
        for v in vnis {
            routes.extend(self.routes(v, query)?);
        }
        Ok(routes_result(routes))
    }
}

/// JSON, table and "found" of a list of route entries.
fn routes_result(routes: Vec<serde_json::Value>) -> (serde_json::Value, String, bool) {
    let found = !routes.is_empty();
    let text = routes_text(&routes);
    (serde_json::json!({ "routes": routes }), text, found)
}

/// A JSON value as table text (strings bare, absent as `-`).
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(cell).collect();
            if parts.is_empty() {
                "-".into()
            } else {
                parts.join(",")
            }
        }
        other => other.to_string(),
    }
}

fn summary_text(s: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} (commit {}), up {} s, {} routes, policy revision {}",
        cell(&s["role"]),
        cell(&s["version"]),
        cell(&s["commit"]),
        cell(&s["uptime_seconds"]),
        cell(&s["routes"]),
        cell(&s["policy_revision"]),
    );
    let sessions: Vec<String> = s["sessions"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "sessions: {}",
        if sessions.is_empty() {
            "none".into()
        } else {
            sessions.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "{:>8}  {:>9}  {:>11}  DIGEST",
        "VNI", "ROUTES", "SUBSCRIBERS"
    );
    for v in s["vnis"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:>8}  {:>9}  {:>11}  {}",
            cell(&v["vni"]),
            cell(&v["routes"]),
            cell(&v["subscribers"]),
            cell(&v["digest"])
        );
    }
    out
}

fn peers_text(p: &serde_json::Value) -> String {
    let peers: Vec<&serde_json::Value> = p["peers"].as_array().into_iter().flatten().collect();
    // A server with --policy names each peer's rule.
    let rules = peers.iter().any(|peer| peer.get("policy_rule").is_some());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<42}  {:<14}  {:<20}  {:>9}  {:>9}  ",
        "ADDRESS", "STATE", "SINCE", "ANNOUNCED", "RECEIVED"
    );
    if rules {
        let _ = write!(out, "{:<16}  ", "RULE");
    }
    out.push_str("VNIS\n");
    for peer in peers {
        let _ = write!(
            out,
            "{:<42}  {:<14}  {:<20}  {:>9}  {:>9}  ",
            cell(&peer["address"]),
            cell(&peer["state"]),
            cell(&peer["connected_since"]),
            cell(&peer["routes_announced"]),
            cell(&peer["routes_received"]),
        );
        if rules {
            let _ = write!(out, "{:<16}  ", cell(&peer["policy_rule"]));
        }
        let _ = writeln!(out, "{}", cell(&peer["vnis_subscribed"]));
    }
    out
}

/// The routes table: one line per next hop, with a KERNEL column when the
/// daemon is a client (its next hops carry `kernel`).
fn routes_text(routes: &[serde_json::Value]) -> String {
    let hops = || {
        routes
            .iter()
            .flat_map(|r| r["next_hops"].as_array().into_iter().flatten())
    };
    let kernel = hops().any(|h| h.get("kernel").is_some());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>8}  {:<24}  {:<28}  {:<12}  {:<20}  ",
        "VNI", "PREFIX", "NEXT HOP", "TYPE", "SINCE"
    );
    if kernel {
        let _ = write!(out, "{:<13}  ", "KERNEL");
    }
    let _ = writeln!(out, "ANNOUNCED BY");
    for r in routes {
        for h in r["next_hops"].as_array().into_iter().flatten() {
            let mut kind = cell(&h["type"]);
            if h["type"] == "nat" {
                let _ = write!(
                    kind,
                    " {}-{}",
                    cell(&h["nat_port_from"]),
                    cell(&h["nat_port_to"])
                );
            }
            if h["target_vni"].as_u64().is_some_and(|t| t != 0) {
                let _ = write!(kind, " vni {}", cell(&h["target_vni"]));
            }
            if h["stale"] == true {
                kind.push_str(" stale");
            }
            let _ = write!(
                out,
                "{:>8}  {:<24}  {:<28}  {:<12}  {:<20}  ",
                cell(&r["vni"]),
                cell(&r["prefix"]),
                cell(&h["address"]),
                kind,
                cell(&h["since"]),
            );
            if kernel {
                let _ = write!(out, "{:<13}  ", cell(&h["kernel"]));
            }
            let _ = writeln!(out, "{}", cell(&h["announced_by"]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_table_shows_since_and_a_kernel_column_only_for_a_client() {
        let route = |kernel: Option<&str>| {
            let mut hop = serde_json::json!({
                "address": "2001:db8::1",
                "type": "standard",
                "target_vni": 0,
                "announced_by": ["[::1]:4711"],
                "since": "2026-12-07T10:00:00Z",
            });
            if let Some(k) = kernel {
                hop["kernel"] = k.into();
            }
            serde_json::json!({"vni": 23, "prefix": "10.0.23.0/24", "next_hops": [hop]})
        };
        let server = routes_text(&[route(None)]);
        assert!(server.contains("SINCE") && server.contains("2026-12-07T10:00:00Z"));
        assert!(!server.contains("KERNEL"), "{server}");
        let client = routes_text(&[route(Some("failed"))]);
        let lines: Vec<&str> = client.lines().collect();
        let column = lines[0].find("KERNEL").expect(&client);
        assert_eq!(lines[1].find("failed"), Some(column), "{client}");
    }

    #[test]
    fn the_peer_table_shows_a_rule_column_only_under_a_policy() {
        let peer = |rule: Option<&str>| {
            let mut p = serde_json::json!({
                "address": "127.0.0.2:40000",
                "state": "ESTABLISHED",
                "routes_announced": 3,
                "vnis_subscribed": [100],
            });
            if let Some(rule) = rule {
                p["policy_rule"] = rule.into();
            }
            p
        };
        let plain = peers_text(&serde_json::json!({ "peers": [peer(None)] }));
        assert!(!plain.contains("RULE"), "{plain}");
        assert!(plain.lines().nth(1).unwrap().ends_with("  100"), "{plain}");
        let ruled = peers_text(&serde_json::json!({ "peers": [peer(Some("tenant-a"))] }));
        assert!(ruled.lines().next().unwrap().contains("RULE"), "{ruled}");
        assert!(ruled.contains("tenant-a"), "{ruled}");
    }
}
