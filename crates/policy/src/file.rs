//! The policy file: its YAML format (version 1), parsing with the exact
//! place of an error, and compilation into `Policy`.
//!
//! Owns: the serde structures mirroring the file (unknown keys refused),
//! the value parsers (VNI ranges, prefixes, `self`, `same`), the checks
//! that need the whole file (unique names, non-empty lists), the warnings
//! about a valid file that does not do what it says (an IPv4-mapped prefix,
//! matched as IPv4; a rule earlier rules shadow, found by `shadow`) and
//! `PolicyError`.
//!
//! Must never: guess. A value that is not exactly what the format says is
//! an error naming its line and column (or its rule), never a default; a
//! file that fails leaves whatever policy was running in place (`store`).

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::rule::{
    AnnounceGrant, NextHopAddrs, NextHopTypes, OnViolation, Rule, RuleAuth, RuleCounters,
    RuleLimits, TargetVnis, UpdateRate, VniSet,
};
use super::Policy;
use ipnet::Ipv4Net;
use metalbond_utils::tcp_md5::Md5Key;
use metalbond_wire::types::{IpNet, Vni};

/// The only format version this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// Longest rule name (it is a metric label and a log field).
const MAX_NAME_LEN: usize = 64;

/// Why a policy file was not accepted: one line naming the file and the
/// place (line and column, or the rule) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The YAML or a value in it is invalid; `at` is "line L column C".
    #[error("policy file {path}: {at}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// "line L column C", or "end of file".
        at: String,
        /// What is wrong there.
        message: String,
    },
    /// Well-formed, but a rule contradicts the format's rules.
    #[error("policy file {path}: rule {position} ({name:?}): {message}")]
    Rule {
        /// The file.
        path: String,
        /// 1-based position of the rule.
        position: usize,
        /// Its name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole file.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Format version; must be `FORMAT_VERSION`.
    version: FormatVersion,
    /// Free text the operator sets (a commit id, a date), shown on the
    /// status page so one can tell which policy is active.
    #[serde(default)]
    revision: Option<String>,
    /// The rules, first match wins.
    rules: Vec<RuleFile>,
}

/// `version: 1`, checked while parsing so the error has a line.
#[derive(Debug)]
struct FormatVersion;

impl<'de> Deserialize<'de> for FormatVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if v == u64::from(FORMAT_VERSION) {
            Ok(FormatVersion)
        } else {
            Err(de::Error::custom(format!(
                "policy format version {v} is not supported (this build reads version {FORMAT_VERSION})"
            )))
        }
    }
}

/// One rule as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    /// Unique name.
    name: String,
    /// Source prefixes (or addresses) of the peers it covers.
    peers: Vec<Prefix>,
    /// VNIs the peers may subscribe to.
    #[serde(default)]
    subscribe: Vec<VniRange>,
    /// What they may announce.
    #[serde(default)]
    announce: Vec<GrantFile>,
    /// Limits replacing the global ones.
    #[serde(default)]
    limits: LimitsFile,
    /// `refuse` (default) or `close`.
    #[serde(default)]
    on_violation: ViolationFile,
    /// Session protection: a TCP-MD5 key for the rule's peer prefixes.
    #[serde(default)]
    auth: Option<AuthFile>,
}

/// `auth:` as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    /// The file holding the key (relative paths from the policy file's
    /// directory).
    md5_key_file: String,
}

/// One `announce` entry as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct GrantFile {
    /// VNIs.
    vnis: Vec<VniRange>,
    /// Supernets of the destinations.
    prefixes: Vec<Prefix>,
    /// Next-hop kinds; default `[standard]`.
    #[serde(default)]
    next_hop_types: Option<Vec<NextHopTypeFile>>,
    /// `self` and/or prefixes.
    next_hops: Vec<NextHopFile>,
    /// `NextHop.targetVNI` values: VNIs, ranges and/or `same` (the
    /// route's own VNI); default `[0, same]`, what Go clients send.
    #[serde(default)]
    target_vnis: Option<Vec<TargetVniFile>>,
}

/// `limits:` as written.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    /// Routes at once.
    max_routes: Option<usize>,
    /// Subscriptions at once.
    max_subscriptions: Option<usize>,
    /// UPDATEs a peer may send per second (beyond `burst`, its socket is
    /// read more slowly; nothing is dropped).
    max_updates_per_second: Option<u32>,
    /// UPDATEs a peer may send at once before the rate applies.
    burst: Option<u32>,
}

/// `on_violation:` as written.
#[derive(Deserialize, Debug, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ViolationFile {
    /// Drop and count.
    #[default]
    Refuse,
    /// Close the session.
    Close,
}

/// A next-hop type name.
#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum NextHopTypeFile {
    /// `standard`.
    Standard,
    /// `loadbalancer` (or `lb`).
    #[serde(alias = "lb", alias = "load_balancer")]
    Loadbalancer,
    /// `nat`.
    Nat,
}

/// A prefix; a bare address means /32 or /128. Host bits must be clear
/// (`10.0.0.1/8` is refused as a likely typo).
#[derive(Debug, Clone, Copy)]
struct Prefix(IpNet);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_prefix(&s).map(Prefix).map_err(de::Error::custom)
    }
}

/// Parses a prefix or a bare address (see `Prefix`).
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP prefix (e.g. 10.0.0.0/8, 2001:db8::/32)"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A VNI or an inclusive range `first-last`.
#[derive(Debug, Clone, Copy)]
struct VniRange(u32, u32);

impl<'de> Deserialize<'de> for VniRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = VniRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VNI (0-16777215) or a range such as 100-199")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<VniRange, E> {
                let v = vni(&v.to_string()).map_err(E::custom)?;
                Ok(VniRange(v, v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<VniRange, E> {
                Err(E::custom(format!("VNI {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<VniRange, E> {
                parse_vni_range(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn vni(s: &str) -> Result<u32, String> {
    s.parse::<Vni>().map(Vni::get)
}

fn parse_vni_range(s: &str) -> Result<VniRange, String> {
    let s = s.trim();
    match s.split_once('-') {
        None => vni(s).map(|v| VniRange(v, v)),
        Some((a, b)) => {
            let (a, b) = (vni(a)?, vni(b)?);
            if a > b {
                return Err(format!("VNI range {s:?} is empty (first above last)"));
            }
            Ok(VniRange(a, b))
        }
    }
}

/// One `target_vnis` item: `same` or a VNI or range.
#[derive(Debug, Clone, Copy)]
enum TargetVniFile {
    /// The route's own VNI.
    Same,
    /// These VNIs.
    Vnis(VniRange),
}

impl<'de> Deserialize<'de> for TargetVniFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TargetVniFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a VNI, a range such as 100-199, or `same` (the route's own VNI)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TargetVniFile, E> {
                let v = vni(&v.to_string()).map_err(E::custom)?;
                Ok(TargetVniFile::Vnis(VniRange(v, v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TargetVniFile, E> {
                Err(E::custom(format!("VNI {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TargetVniFile, E> {
                if s.trim() == "same" {
                    return Ok(TargetVniFile::Same);
                }
                parse_vni_range(s)
                    .map(TargetVniFile::Vnis)
                    .map_err(|e| E::custom(format!("{e}; or `same` for the route's own VNI")))
            }
        }
        d.deserialize_any(V)
    }
}

/// `self` or a prefix.
#[derive(Debug, Clone, Copy)]
enum NextHopFile {
    /// The peer's own source address.
    OwnAddress,
    /// Addresses within this prefix.
    Prefix(IpNet),
}

impl<'de> Deserialize<'de> for NextHopFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "self" {
            return Ok(NextHopFile::OwnAddress);
        }
        parse_prefix(&s)
            .map(NextHopFile::Prefix)
            .map_err(|e| de::Error::custom(format!("{e}; or `self` for the peer's own address")))
    }
}

/// Reads and compiles `path`. `counters` gives each rule name its counters
/// (kept across reloads).
pub fn load(
    path: &Path,
    counters: &mut dyn FnMut(&str) -> Arc<RuleCounters>,
) -> Result<Policy, PolicyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text, counters)
}

/// Parses and compiles `text` (from the file `path`, for error messages).
pub fn parse(
    path: &str,
    text: &str,
    counters: &mut dyn FnMut(&str) -> Arc<RuleCounters>,
) -> Result<Policy, PolicyError> {
    let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| syntax(path, &e))?;
    let _ = file.version;
    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(file.rules.len());
    let mut warnings = Vec::new();
    let base = Path::new(path).parent().unwrap_or(Path::new("."));
    for (i, r) in file.rules.into_iter().enumerate() {
        let position = i + 1;
        let name = r.name.clone();
        let note = |w: String| format!("rule {position} ({name:?}): {w}");
        let rule = compile_rule(
            position,
            r,
            base,
            &mut names,
            &mut |w| warnings.push(note(w)),
            counters,
        )
        .map_err(|message| PolicyError::Rule {
            path: path.to_string(),
            position,
            name: name.clone(),
            message,
        })?;
        rules.push(Arc::new(rule));
    }
    warnings.extend(super::shadow::shadowed(&rules));
    warnings.extend(keyed_prefix_warnings(&rules));
    conflicting_keys(&rules).map_err(|message| PolicyError::Rule {
        path: path.to_string(),
        position: message.0,
        name: message.1,
        message: message.2,
    })?;
    Ok(Policy {
        revision: file.revision,
        rules,
        warnings,
    })
}

/// One rule of the file (`position`, from 1) as the server applies it, or
/// what is wrong with it. `names` holds the names of the rules before it;
/// `warn` gets what is allowed but probably not meant.
fn compile_rule(
    position: usize,
    r: RuleFile,
    base: &Path,
    names: &mut HashSet<String>,
    warn: &mut dyn FnMut(String),
    counters: &mut dyn FnMut(&str) -> Arc<RuleCounters>,
) -> Result<Rule, String> {
    if r.name.is_empty()
        || r.name.len() > MAX_NAME_LEN
        || !r
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "name must be 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 - _ ."
        ));
    }
    if !names.insert(r.name.clone()) {
        return Err("the name is used by an earlier rule".into());
    }
    if r.peers.is_empty() {
        return Err(
            "`peers` is empty: the rule would match nobody (use 0.0.0.0/0 and ::/0 for everyone)"
                .into(),
        );
    }
    let peers: Vec<IpNet> = r
        .peers
        .iter()
        .map(|p| {
            matched_as_ipv4(
                p.0,
                "peers",
                "a peer's IPv4 address is matched as IPv4, also on a dual-stack socket",
                warn,
            )
        })
        .collect();
    let announce = r
        .announce
        .into_iter()
        .enumerate()
        .map(|(j, g)| compile_grant(&format!("announce[{j}]"), g, warn))
        .collect::<Result<Vec<_>, _>>()?;
    if r.limits.burst.is_some() && r.limits.max_updates_per_second.is_none() {
        return Err("limits: `burst` needs `max_updates_per_second`".into());
    }
    if r.limits.max_routes == Some(0)
        || r.limits.max_subscriptions == Some(0)
        || r.limits.max_updates_per_second == Some(0)
        || r.limits.burst == Some(0)
    {
        return Err(
            "limits must be positive (to forbid, leave `announce` / `subscribe` out)".into(),
        );
    }
    let auth = match &r.auth {
        None => None,
        Some(a) => {
            let key_file = base.join(&a.md5_key_file);
            let key = Md5Key::read(&key_file).map_err(|e| format!("auth: {e}"))?;
            Some(RuleAuth { key_file, key })
        }
    };
    Ok(Rule {
        auth,
        counters: counters(&r.name),
        name: r.name,
        position,
        peers,
        subscribe: vni_set(&r.subscribe),
        announce,
        limits: RuleLimits {
            max_routes: r.limits.max_routes,
            max_subscriptions: r.limits.max_subscriptions,
            update_rate: r
                .limits
                .max_updates_per_second
                .map(|per_second| UpdateRate {
                    per_second,
                    burst: r.limits.burst.unwrap_or(per_second),
                }),
        },
        on_violation: match r.on_violation {
            ViolationFile::Refuse => OnViolation::Refuse,
            ViolationFile::Close => OnViolation::Close,
        },
    })
}

/// Two rules that key the same peer prefix with different keys cannot
/// both be installed (the kernel holds one key per prefix): the later
/// rule's position, name and the message.
fn conflicting_keys(rules: &[Arc<Rule>]) -> Result<(), (usize, String, String)> {
    let mut seen: Vec<(IpNet, &Rule)> = Vec::new();
    for rule in rules {
        let Some(auth) = &rule.auth else { continue };
        for p in &rule.peers {
            if let Some((_, other)) = seen
                .iter()
                .find(|(q, other)| q == p && other.auth.as_ref().is_some_and(|o| o.key != auth.key))
            {
                return Err((
                    rule.position,
                    rule.name.clone(),
                    format!(
                        "auth: peers {p} are keyed by rule {:?} with another key (one key per prefix)",
                        other.name
                    ),
                ));
            }
            seen.push((*p, rule));
        }
    }
    Ok(())
}

/// A rule without `auth` whose peers lie inside another rule's keyed
/// prefix: the kernel asks those peers for that key whatever the rule
/// order says (keys go by the most specific keyed prefix).
fn keyed_prefix_warnings(rules: &[Arc<Rule>]) -> Vec<String> {
    let mut out = Vec::new();
    for plain in rules.iter().filter(|r| r.auth.is_none()) {
        for p in &plain.peers {
            for keyed in rules.iter().filter(|r| r.auth.is_some()) {
                if let Some(q) = keyed
                    .peers
                    .iter()
                    .find(|q| q.prefix_len() <= p.prefix_len() && q.contains(&p.network()))
                {
                    out.push(format!(
                        "rule {} ({:?}): peers {p} lie inside {q}, which rule {:?} keys with TCP-MD5: the kernel asks them for that key",
                        plain.position, plain.name, keyed.name
                    ));
                }
            }
        }
    }
    out
}

/// One `announce` entry (`which`: `announce[j]`, for messages) as the
/// server applies it, or what is wrong with it.
fn compile_grant(
    which: &str,
    g: GrantFile,
    warn: &mut dyn FnMut(String),
) -> Result<AnnounceGrant, String> {
    if g.vnis.is_empty() {
        return Err(format!("{which}: `vnis` is empty"));
    }
    if g.prefixes.is_empty() {
        return Err(format!(
            "{which}: `prefixes` is empty (use 0.0.0.0/0 and ::/0 for any destination)"
        ));
    }
    if g.next_hops.is_empty() {
        return Err(format!(
            "{which}: `next_hops` is empty (use `self` for the peer's own address)"
        ));
    }
    let mut next_hops = NextHopAddrs::default();
    for n in g.next_hops {
        match n {
            NextHopFile::OwnAddress => next_hops.own_address = true,
            NextHopFile::Prefix(p) => next_hops.prefixes.push(matched_as_ipv4(
                p,
                &format!("{which}.next_hops"),
                "next hops are compared in their IPv4 form",
                warn,
            )),
        }
    }
    Ok(AnnounceGrant {
        vnis: vni_set(&g.vnis),
        prefixes: g.prefixes.iter().map(|p| p.0).collect(),
        next_hop_types: next_hop_types(which, g.next_hop_types)?,
        next_hops,
        target_vnis: target_vnis(which, g.target_vnis)?,
    })
}

/// `next_hop_types` of a grant: `standard` when left out.
fn next_hop_types(which: &str, list: Option<Vec<NextHopTypeFile>>) -> Result<NextHopTypes, String> {
    match list {
        None => Ok(NextHopTypes {
            standard: true,
            ..NextHopTypes::default()
        }),
        Some(list) if list.is_empty() => Err(format!("{which}: `next_hop_types` is empty")),
        Some(list) => {
            let mut t = NextHopTypes::default();
            for k in list {
                match k {
                    NextHopTypeFile::Standard => t.standard = true,
                    NextHopTypeFile::Loadbalancer => t.load_balancer = true,
                    NextHopTypeFile::Nat => t.nat = true,
                }
            }
            Ok(t)
        }
    }
}

/// `target_vnis` of a grant: 0 or the route's own VNI when left out.
fn target_vnis(which: &str, list: Option<Vec<TargetVniFile>>) -> Result<TargetVnis, String> {
    match list {
        None => Ok(TargetVnis::default()),
        Some(list) if list.is_empty() => Err(format!(
            "{which}: `target_vnis` is empty (leave it out for the default, [0, same])"
        )),
        Some(list) => {
            let mut ranges = Vec::new();
            let mut same = false;
            for t in list {
                match t {
                    TargetVniFile::Same => same = true,
                    TargetVniFile::Vnis(r) => ranges.push((r.0, r.1)),
                }
            }
            Ok(TargetVnis {
                same,
                vnis: VniSet::from_ranges(ranges),
            })
        }
    }
}

/// `net` as it is matched: an IPv4-mapped IPv6 prefix (`::ffff:a.b.c.d/96+n`)
/// becomes the IPv4 prefix it stands for, since addresses are compared in
/// their canonical form (`IpAddr::to_canonical`) and the mapped form would
/// never match; `warn` gets a line saying so. Any other prefix is
/// returned as it is.
fn matched_as_ipv4(net: IpNet, key: &str, why: &str, warn: &mut dyn FnMut(String)) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    let (Some(addr), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
    else {
        return net;
    };
    match Ipv4Net::new(addr, len) {
        Ok(v4) => {
            let v4 = IpNet::V4(v4);
            warn(format!(
                "{key}: {net} is the IPv4-mapped form of {v4} and is matched as {v4} ({why}; write {v4})"
            ));
            v4
        }
        Err(_) => net,
    }
}

fn vni_set(list: &[VniRange]) -> VniSet {
    VniSet::from_ranges(list.iter().map(|r| (r.0, r.1)).collect())
}

/// A YAML or value error with its place.
fn syntax(path: &str, e: &serde_yaml_ng::Error) -> PolicyError {
    let at = match e.location() {
        Some(l) => format!("line {} column {}", l.line(), l.column()),
        None => "end of file".into(),
    };
    // serde_yaml_ng appends " at line L column C" to some messages: the
    // place is already in front.
    let mut message = e.to_string();
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    PolicyError::Syntax {
        path: path.to_string(),
        at,
        message,
    }
}
