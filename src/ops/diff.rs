//! `metalbond diff --http A --http B [--vni V …]`: do two daemons hold the
//! same routes? Reflectors that clients use side by side never talk to each
//! other; this is how drift between them (a bug, a policy file that
//! differs, a partition that healed badly) shows.
//!
//! Owns: reading each side's per-VNI digests (`/api/v1/summary`, or
//! computed here from `/routes.json` for a daemon without the API: the Go
//! server, an older version), comparing them, and for the VNIs whose
//! digests differ, listing exactly which routes each side has that the
//! other lacks (from both sides' `/routes.json`). Exit status 0 when they
//! agree, 1 when they differ, 3 when a side cannot be read, 2 on usage
//! errors.
//!
//! Must never: change anything on either side, or fetch a whole table when
//! the digests agree.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;

use super::fetch::{self, FetchError};
use super::route_json;
use metalbond_wire::digest::VniDigest;
use metalbond_wire::types::{IpNet, NextHop, NextHopKind, Route, Vni};

/// `metalbond diff`: compares the route sets of two daemons, VNI by VNI.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Status port (`--http` of a server or client) of each side: given
    /// exactly twice, `--http A --http B`.
    #[arg(long = "http", value_name = "HOST:PORT", required = true)]
    pub http: Vec<String>,
    /// Compare only these VNIs (repeatable or comma-separated; default:
    /// every VNI either side has).
    #[arg(long = "vni", value_name = "VNI", value_delimiter = ',')]
    pub vnis: Vec<Vni>,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Seconds allowed for each request.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
}

/// Exit status: the sides agree.
const AGREE: u8 = 0;
/// Exit status: the sides differ.
const DIFFER: u8 = 1;
/// Exit status: usage error.
const USAGE: u8 = 2;
/// Exit status: a side could not be read.
const UNREACHABLE: u8 = 3;

/// One side's VNIs: route count and digest each.
type Digests = BTreeMap<Vni, VniDigest>;
/// One side's routes, per VNI.
type Tables = BTreeMap<Vni, BTreeSet<Route>>;

/// One compared VNI.
#[derive(Debug)]
struct VniComparison {
    /// The VNI.
    vni: Vni,
    /// Side A's digest (`None`: A has no route in it).
    a: Option<VniDigest>,
    /// Side B's digest.
    b: Option<VniDigest>,
    /// Routes only A has, and only B has (filled when the digests differ).
    only: Option<(Vec<Route>, Vec<Route>)>,
}

impl VniComparison {
    fn same(&self) -> bool {
        self.a.unwrap_or_default() == self.b.unwrap_or_default()
    }
}

/// Runs the comparison and prints it; the exit status says the outcome.
pub fn run(args: DiffArgs) -> ExitCode {
    let [a, b] = args.http.as_slice() else {
        eprintln!(
            "metalbond diff: --http must be given exactly twice (--http A --http B), got {}",
            args.http.len()
        );
        return ExitCode::from(USAGE);
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    match compare(a, b, &args.vnis, timeout) {
        Ok(rows) => {
            let agree = rows.iter().all(VniComparison::same);
            if args.json {
                println!("{}", json_report(a, b, agree, &rows));
            } else {
                print!("{}", text_report(a, b, &rows));
            }
            ExitCode::from(if agree { AGREE } else { DIFFER })
        }
        Err(e) => {
            eprintln!("metalbond diff: cannot read {e}");
            ExitCode::from(UNREACHABLE)
        }
    }
}

/// Reads both sides and compares them (the route lists only where the
/// digests differ).
fn compare(
    a: &str,
    b: &str,
    only_vnis: &[Vni],
    timeout: Duration,
) -> Result<Vec<VniComparison>, FetchError> {
    let (da, ta) = digests(a, timeout)?;
    let (db, tb) = digests(b, timeout)?;
    let wanted = |v: &Vni| only_vnis.is_empty() || only_vnis.contains(v);
    // Asked-for VNIs that neither side has are listed too (both empty).
    let vnis: BTreeSet<Vni> = da
        .keys()
        .chain(db.keys())
        .chain(only_vnis)
        .copied()
        .filter(wanted)
        .collect();
    let mut rows: Vec<VniComparison> = vnis
        .into_iter()
        .map(|vni| VniComparison {
            vni,
            a: da.get(&vni).copied(),
            b: db.get(&vni).copied(),
            only: None,
        })
        .collect();
    if rows.iter().all(VniComparison::same) {
        return Ok(rows);
    }
    let ta = match ta {
        Some(t) => t,
        None => tables(a, timeout)?,
    };
    let tb = match tb {
        Some(t) => t,
        None => tables(b, timeout)?,
    };
    let empty = BTreeSet::new();
    for row in rows.iter_mut().filter(|r| !r.same()) {
        let ra = ta.get(&row.vni).unwrap_or(&empty);
        let rb = tb.get(&row.vni).unwrap_or(&empty);
        row.only = Some((
            ra.difference(rb).copied().collect(),
            rb.difference(ra).copied().collect(),
        ));
    }
    Ok(rows)
}

/// A side's digests: from `/api/v1/summary`, or (a daemon without the
/// API: any answer but 200) computed from its `/routes.json`, whose tables
/// are then returned too so they are not fetched twice.
fn digests(addr: &str, timeout: Duration) -> Result<(Digests, Option<Tables>), FetchError> {
    let fail = |cause: String| FetchError {
        addr: addr.to_string(),
        cause,
    };
    let answer = fetch::get(addr, "/api/v1/summary", timeout)?;
    if answer.status != 200 {
        // No API here (the Go server answers 500, an older version 404):
        // the digests from the Go document every version serves.
        let t = tables(addr, timeout)?;
        let d = t.iter().map(|(v, rs)| (*v, VniDigest::of(rs))).collect();
        return Ok((d, Some(t)));
    }
    let summary: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|e| fail(format!("/api/v1/summary is not JSON: {e}")))?;
    let mut out = Digests::new();
    for v in summary["vnis"].as_array().into_iter().flatten() {
        let (Some(vni), Some(routes), Some(digest)) = (
            v["vni"].as_u64(),
            v["routes"].as_u64(),
            v["digest"].as_str(),
        ) else {
            return Err(fail(format!("/api/v1/summary: malformed VNI entry {v}")));
        };
        let vni = u32::try_from(vni)
            .ok()
            .and_then(|n| Vni::new(n).ok())
            .ok_or_else(|| fail(format!("/api/v1/summary: VNI {vni} out of range")))?;
        let sum = u64::from_str_radix(digest, 16)
            .map_err(|_| fail(format!("/api/v1/summary: digest {digest:?} is not hex")))?;
        out.insert(vni, VniDigest::from_parts(routes, sum));
    }
    Ok((out, None))
}

/// A side's routes from its `/routes.json` (the Go document, which every
/// version of either implementation serves).
fn tables(addr: &str, timeout: Duration) -> Result<Tables, FetchError> {
    let fail = |cause: String| FetchError {
        addr: addr.to_string(),
        cause,
    };
    let answer = fetch::get(addr, "/routes.json", timeout)?;
    if answer.status != 200 {
        return Err(fail(format!(
            "/routes.json answered status {}",
            answer.status
        )));
    }
    let doc: serde_json::Value = serde_json::from_slice(&answer.body)
        .map_err(|e| fail(format!("/routes.json is not JSON: {e}")))?;
    parse_go_document(&doc).map_err(|e| fail(format!("/routes.json: {e}")))
}

/// The routes of a Go-format route document (`vnet` → VNI → destination
/// key → next hops).
fn parse_go_document(doc: &serde_json::Value) -> Result<Tables, String> {
    let mut out = Tables::new();
    let Some(vnet) = doc["vnet"].as_object() else {
        return Ok(out); // an empty table is written as `"vnet": {}` or null
    };
    for (vni_text, destinations) in vnet {
        let vni: Vni = vni_text
            .parse()
            .map_err(|e| format!("VNI {vni_text:?}: {e}"))?;
        let set = out.entry(vni).or_default();
        for (key, hops) in destinations.as_object().into_iter().flatten() {
            let key_doc: serde_json::Value =
                serde_json::from_str(key).map_err(|e| format!("destination {key:?}: {e}"))?;
            let prefix: IpNet = key_doc["Prefix"]
                .as_str()
                .ok_or_else(|| format!("destination {key:?} has no Prefix"))?
                .parse()
                .map_err(|e| format!("destination {key:?}: {e}"))?;
            for hop in hops.as_array().into_iter().flatten() {
                set.insert(Route::new(vni, prefix, next_hop(hop)?));
            }
        }
    }
    Ok(out)
}

/// One next hop of the Go document.
fn next_hop(hop: &serde_json::Value) -> Result<NextHop, String> {
    let target = hop["TargetAddress"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("next hop without a TargetAddress: {hop}"))?;
    let number = |field: &str| hop[field].as_u64().unwrap_or(0);
    let port = |field: &str| {
        u16::try_from(number(field)).map_err(|_| format!("{field} out of range: {hop}"))
    };
    let kind = match number("Type") {
        0 => NextHopKind::Standard,
        1 => NextHopKind::Nat {
            from: port("NATPortRangeFrom")?,
            to: port("NATPortRangeTo")?,
        },
        2 => NextHopKind::LoadBalancerTarget,
        t => return Err(format!("unknown next hop Type {t}: {hop}")),
    };
    Ok(NextHop {
        target,
        target_vni: u32::try_from(number("TargetVNI"))
            .map_err(|_| format!("TargetVNI out of range: {hop}"))?,
        kind,
    })
}

/// The table for a terminal.
fn text_report(a: &str, b: &str, rows: &[VniComparison]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "A = {a}\nB = {b}");
    let _ = writeln!(
        out,
        "{:>8}  {:>9}  {:>9}  {:<16}  {:<16}  RESULT",
        "VNI", "ROUTES A", "ROUTES B", "DIGEST A", "DIGEST B"
    );
    let show = |d: Option<VniDigest>| d.map_or("-".to_string(), |d| d.to_string());
    let count = |d: Option<VniDigest>| d.map_or(0, |d| d.routes());
    for r in rows {
        let _ = writeln!(
            out,
            "{:>8}  {:>9}  {:>9}  {:<16}  {:<16}  {}",
            r.vni,
            count(r.a),
            count(r.b),
            show(r.a),
            show(r.b),
            if r.same() { "same" } else { "DIFFERENT" }
        );
        if let Some((only_a, only_b)) = &r.only {
            for (side, list) in [("A", only_a), ("B", only_b)] {
                for route in list {
                    let _ = writeln!(
                        out,
                        "          only at {side}: {} via {}",
                        route.destination, route.next_hop
                    );
                }
            }
        }
    }
    let differ = rows.iter().filter(|r| !r.same()).count();
    let _ = writeln!(
        out,
        "{} VNIs compared: {} same, {differ} different",
        rows.len(),
        rows.len() - differ
    );
    out
}

/// The comparison as one JSON object.
fn json_report(a: &str, b: &str, agree: bool, rows: &[VniComparison]) -> String {
    let side = |d: Option<VniDigest>| {
        d.map(|d| serde_json::json!({ "routes": d.routes(), "digest": d.to_string() }))
    };
    let list = |routes: &[Route]| routes.iter().map(route_json).collect::<Vec<_>>();
    let vnis: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "vni": r.vni.get(),
                "a": side(r.a),
                "b": side(r.b),
                "same": r.same(),
            });
            if let Some((only_a, only_b)) = &r.only {
                v["only_a"] = list(only_a).into();
                v["only_b"] = list(only_b).into();
            }
            v
        })
        .collect();
    serde_json::json!({ "a": a, "b": b, "agree": agree, "vnis": vnis }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_document_reads_back_as_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/go-routes.json")).unwrap();
        let t = parse_go_document(&doc).unwrap();
        let n: usize = t.values().map(BTreeSet::len).sum();
        assert_eq!(n, 4, "{t:?}");
        let v42 = &t[&Vni::new(42).unwrap()];
        let r = v42.iter().next().unwrap();
        assert_eq!(r.destination.to_string(), "2001:db8:cafe::/64");
        assert_eq!(
            r.next_hop.kind,
            NextHopKind::Nat {
                from: 1000,
                to: 2000
            }
        );
    }
}
