//! The versioned JSON API under `/api/v1/`: what `metalbond diff` (and an
//! operator with `curl | jq`) reads. The Go-compatible documents
//! (`/routes.json`, `/routes.yaml`) stay exactly as they are; this is the
//! place for fields the Go binary never had.
//!
//! Owns: the JSON shapes of `/api/v1/...` and their errors (a JSON object
//! `{"error": "..."}` with a 4xx status).
//!
//! Must never: copy the route table. `/api/v1/summary` is built from the
//! per-VNI counts and digests the roles keep as routes change
//! (`StatusSource::vni_summaries`) and the peer list; `/api/v1/routes`
//! asks for one page (at most `MAX_ROUTES_LIMIT` destinations, or one
//! prefix) of one VNI (`StatusSource::route_page`; on the server the VNI's
//! owner shard answers it from its table, a page's work).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::{build_commit, VERSION};
use metalbond_telemetry::{
    format_rfc3339, KernelRouteState, RouteSelect, RoutesPageView, RoutesRequest, StatusSource,
    VniSummaryView,
};
use metalbond_wire::types::{IpNet, NextHop, NextHopKind, Vni};

/// `limit` of `/api/v1/routes` when not given.
pub const DEFAULT_ROUTES_LIMIT: usize = 1000;
/// Largest `limit` of `/api/v1/routes`.
pub const MAX_ROUTES_LIMIT: usize = 10_000;

/// `GET /api/v1/summary`.
#[derive(Serialize, Debug)]
pub(crate) struct Summary {
    /// Crate version.
    version: &'static str,
    /// Git commit of the build.
    commit: &'static str,
    /// `server` or `client`.
    role: &'static str,
    /// Seconds since the status port opened (at process start).
    uptime_seconds: u64,
    /// Sessions by state (server: its peers, live and departed ones held
    /// by `--peer-grace`; client: its servers).
    sessions: BTreeMap<&'static str, u64>,
    /// Routes in all VNIs (server: its table; client: received).
    routes: u64,
    /// The peer policy's `revision` (server with `--policy` and a revision
    /// in the file), else null.
    policy_revision: Option<String>,
    /// Every VNI with routes (or, on the server, subscribers).
    vnis: Vec<VniEntry>,
}

/// One VNI of the summary.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub(crate) struct VniEntry {
    /// The VNI.
    vni: u32,
    /// Routes in it.
    routes: u64,
    /// Peers subscribed (server only).
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribers: Option<u64>,
    /// The route-set digest, 16 hex digits (`metalbond_wire::digest`): equal on two
    /// replicas exactly when they hold the same routes (but for a 2⁻⁶⁴
    /// chance).
    digest: String,
}

impl From<VniSummaryView> for VniEntry {
    fn from(v: VniSummaryView) -> VniEntry {
        VniEntry {
            vni: v.vni.get(),
            routes: v.digest.routes(),
            subscribers: v.subscribers,
            digest: v.digest.to_string(),
        }
    }
}

/// The summary of `source` now.
pub(crate) fn summary(source: &dyn StatusSource, uptime: Duration) -> Summary {
    let mut sessions = BTreeMap::new();
    for p in source.peers() {
        *sessions.entry(p.state.name()).or_insert(0u64) += 1;
    }
    let vnis: Vec<VniEntry> = source
        .vni_summaries()
        .into_iter()
        .map(VniEntry::from)
        .collect();
    Summary {
        version: VERSION,
        commit: build_commit(),
        role: source.role().name(),
        uptime_seconds: uptime.as_secs(),
        sessions,
        routes: vnis.iter().map(|v| v.routes).sum(),
        policy_revision: source.policy().and_then(|p| p.revision),
        vnis,
    }
}

/// The body of an API error: `{"error": "..."}` and a newline.
pub(crate) fn error_body(message: &str) -> String {
    let mut body = serde_json::json!({ "error": message }).to_string();
    body.push('\n');
    body
}

/// A next hop as a JSON object: `address`, `type` (`standard` | `nat` |
/// `loadbalancer`), `target_vni`, `nat_port_from`, `nat_port_to`: the shape
/// of every next hop under `/api/v1` and in the operator commands' output.
pub fn next_hop_json(nh: &NextHop) -> serde_json::Value {
    serde_json::to_value(ApiNextHop::new(nh)).unwrap_or_default()
}

/// An API answer that is not a 200: status and message.
pub(crate) type ApiError = (u16, String);

/// `GET /api/v1/routes?vni=V[&prefix=P | &lookup=ADDR][&peer=ADDR][&limit=N][&after=CURSOR]`.
pub(crate) fn routes(source: &dyn StatusSource, query: &str) -> Result<String, ApiError> {
    let bad = |m: String| (400, m);
    let mut vni = None;
    let (mut prefix, mut lookup, mut peer, mut limit, mut after) = (None, None, None, None, None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.trim().to_string();
        match key.as_ref() {
            "vni" => vni = Some(value),
            "prefix" => prefix = Some(value),
            "lookup" => lookup = Some(value),
            "peer" => peer = Some(value),
            "limit" => limit = Some(value),
            "after" => after = Some(value),
            other => {
                return Err(bad(format!(
                    "unknown parameter {other:?}; known: vni, prefix, lookup, peer, limit, after"
                )))
            }
        }
    }
    let vni: Vni = vni
        .ok_or_else(|| bad("vni is required (vni=23)".into()))?
        .parse()
        .map_err(|e| bad(format!("vni: {e}")))?;
    let net = |what: &str, text: &str| -> Result<IpNet, ApiError> {
        let n: IpNet = text.parse().map_err(|e| {
            bad(format!(
                "{what} {text:?} is not a prefix (10.0.23.0/24): {e}"
            ))
        })?;
        if n.trunc() != n {
            return Err(bad(format!(
                "{what} {text:?} has host bits set; the prefix is {}",
                n.trunc()
            )));
        }
        Ok(n)
    };
    let limit = match limit {
        None => DEFAULT_ROUTES_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_ROUTES_LIMIT).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "limit {l:?}: a number from 1 to {MAX_ROUTES_LIMIT}"
                )))
            }
        },
    };
    let select = match (prefix, lookup) {
        (Some(_), Some(_)) => return Err(bad("give prefix or lookup, not both".into())),
        (Some(p), None) => RouteSelect::Prefix(net("prefix", &p)?),
        (None, Some(a)) => RouteSelect::Lookup(
            a.parse()
                .map_err(|e| bad(format!("lookup {a:?} is not an IP address: {e}")))?,
        ),
        (None, None) => RouteSelect::Page {
            after: after.map(|c| net("cursor (after)", &c)).transpose()?,
            limit,
        },
    };
    let peer: Option<std::net::IpAddr> = peer
        .map(|p| {
            p.parse()
                .map_err(|e| bad(format!("peer {p:?} is not an IP address: {e}")))
        })
        .transpose()?;
    let page = source
        .route_page(&RoutesRequest { vni, select })
        .map_err(|m| (404, m))?;
    Ok(page_json(&page, peer))
}

/// Does an `announced_by` entry (`ip:port`, an address, or a configured
/// server name) name `peer`?
fn names(entry: &str, peer: std::net::IpAddr) -> bool {
    entry.parse::<std::net::SocketAddr>().map(|s| s.ip()).ok() == Some(peer)
        || entry.parse::<std::net::IpAddr>().ok() == Some(peer)
}

/// A next hop as every `/api/v1` document and operator command writes it;
/// on `/api/v1/routes` also who announced it since when and, on a client,
/// whether it is stale and where it stands in the kernel.
#[derive(Serialize)]
struct ApiNextHop<'a> {
    /// Underlay address.
    address: String,
    /// `standard` | `nat` | `loadbalancer`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// The next hop's target VNI.
    target_vni: u32,
    /// NAT port range start (0 unless NAT).
    nat_port_from: u16,
    /// NAT port range end (0 unless NAT).
    nat_port_to: u16,
    /// Server: announcing peers; client: servers it came from (routes
    /// API only).
    #[serde(skip_serializing_if = "Option::is_none")]
    announced_by: Option<&'a [String]>,
    /// Client only: held from a lost session only.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<bool>,
    /// When the next hop appeared, RFC 3339 UTC to the second (routes API
    /// only).
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// Client only: `installed` | `pending` | `failed` | `not_installed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<&'static str>,
}

impl ApiNextHop<'_> {
    /// The next hop's own fields, nothing about who sent it.
    fn new(nh: &NextHop) -> ApiNextHop<'static> {
        let (kind, nat_port_from, nat_port_to) = match nh.kind {
            NextHopKind::Standard => ("standard", 0, 0),
            NextHopKind::Nat { from, to } => ("nat", from, to),
            NextHopKind::LoadBalancerTarget => ("loadbalancer", 0, 0),
        };
        ApiNextHop {
            address: nh.target.to_string(),
            kind,
            target_vni: nh.target_vni,
            nat_port_from,
            nat_port_to,
            announced_by: None,
            stale: None,
            since: None,
            kernel: None,
        }
    }
}

/// One destination on `/api/v1/routes`.
#[derive(Serialize)]
struct ApiRoute<'a> {
    /// The VNI.
    vni: u32,
    /// The destination prefix.
    prefix: String,
    /// Its next hops.
    next_hops: Vec<ApiNextHop<'a>>,
}

/// A page of `/api/v1/routes`.
#[derive(Serialize)]
pub(crate) struct ApiRoutesPage<'a> {
    /// The routes.
    routes: Vec<ApiRoute<'a>>,
    /// The next page's cursor; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The page as compact JSON, next hops not announced by `peer` left out
/// (and routes left with none). Typed, not `serde_json::Value`: a page of
/// 10,000 routes is a few MB and is built on every request.
fn page_json(page: &RoutesPageView, peer: Option<std::net::IpAddr>) -> String {
    let routes = page
        .routes
        .iter()
        .filter_map(|e| {
            let next_hops: Vec<ApiNextHop<'_>> = e
                .next_hops
                .iter()
                .filter(|h| peer.is_none_or(|p| h.announced_by.iter().any(|a| names(a, p))))
                .map(|h| ApiNextHop {
                    announced_by: Some(&h.announced_by),
                    stale: h.stale,
                    since: h.since.map(format_rfc3339),
                    kernel: h.kernel.map(KernelRouteState::as_str),
                    ..ApiNextHop::new(&h.next_hop)
                })
                .collect();
            (!next_hops.is_empty()).then(|| ApiRoute {
                vni: e.vni.get(),
                prefix: e.prefix.to_string(),
                next_hops,
            })
        })
        .collect();
    let page = ApiRoutesPage {
        routes,
        next: page.next.map(|n| n.to_string()),
    };
    let mut body = serde_json::to_string(&page).unwrap_or_else(|e| error_body(&e.to_string()));
    body.push('\n');
    body
}

/// `GET /api/v1/peers`: `{"peers": [...]}`, each as `/peers` shows it.
pub(crate) fn peers(source: &dyn StatusSource) -> serde_json::Value {
    serde_json::json!({ "peers": source.peers() })
}
