//! `metalbond policy check FILE [--peer ADDR]`: validates a policy file and
//! prints what it grants; with `--peer`, which rule a peer at that address
//! gets and why.
//!
//! Owns: the subcommand's arguments, its text output and its exit codes
//! (`EXIT_*`).
//!
//! Must never: start a server or touch the network; it reads one file.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use metalbond_policy::rule::{OnViolation, Rule};
use metalbond_policy::{file, Policy, RuleCounters};

/// The file is valid (and, with `--peer`, a rule matches).
pub const EXIT_OK: u8 = 0;
/// The file cannot be read or is invalid (the error names the place).
pub const EXIT_INVALID: u8 = 1;
/// The file is valid but no rule matches `--peer`: that peer would be
/// refused. (2 is clap's usage error.)
pub const EXIT_NO_RULE: u8 = 3;

/// `metalbond policy ...`.
#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    /// What to do with a policy file.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// Subcommands of `metalbond policy`.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate a policy file and print what it grants, after a `warning:`
    /// line for each part of a valid file that does not do what it reads
    /// as (an IPv4-mapped prefix, matched as IPv4; a rule earlier rules
    /// shadow). Exit status 0: valid (and, with --peer, a rule matches);
    /// 1: invalid (the error names line and column, or the rule); 3: valid,
    /// but no rule matches --peer.
    Check {
        /// The policy file (YAML, `version: 1`).
        file: PathBuf,
        /// Explain which rule a peer connecting from this address gets.
        #[arg(long, value_name = "ADDR")]
        peer: Option<IpAddr>,
    },
}

/// Runs `metalbond policy ...`: prints to stdout (errors to stderr).
pub fn run(args: PolicyArgs) -> ExitCode {
    match args.command {
        PolicyCommand::Check { file, peer } => {
            let policy =
                match file::load(&file, &mut |_| std::sync::Arc::new(RuleCounters::default())) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("metalbond: {e}");
                        return ExitCode::from(EXIT_INVALID);
                    }
                };
            let (text, code) = report(&file.display().to_string(), &policy, peer);
            // `policy check FILE | head` closes the pipe early: not an
            // error worth a panic (print! would panic on EPIPE).
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            ExitCode::from(code)
        }
    }
}

/// The text `policy check` prints and its exit code.
pub fn report(path: &str, policy: &Policy, peer: Option<IpAddr>) -> (String, u8) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{path}: valid, format version {}{}, {} rule(s); first match on the peer's source address wins, no match is refused",
        metalbond_policy::FORMAT_VERSION,
        policy
            .revision
            .as_deref()
            .map(|r| format!(", revision {r:?}"))
            .unwrap_or_default(),
        policy.rules.len()
    );
    for w in &policy.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let Some(addr) = peer else {
        for r in &policy.rules {
            describe(&mut out, r);
        }
        return (out, EXIT_OK);
    };
    let source = addr.to_canonical();
    for r in &policy.rules {
        match r.matching_prefix(source) {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "peer {source}: rule {} {:?} matches (its peers include {p})",
                    r.position, r.name
                );
                describe(&mut out, r);
                return (out, EXIT_OK);
            }
            None => {
                let peers: Vec<String> = r.peers.iter().map(|p| p.to_string()).collect();
                let _ = writeln!(
                    out,
                    "peer {source}: rule {} {:?} does not match (peers {})",
                    r.position,
                    r.name,
                    peers.join(", ")
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "peer {source}: no rule matches: its connections are closed (counted as reason=\"no_rule\")"
    );
    (out, EXIT_NO_RULE)
}

/// What one rule grants, indented.
fn describe(out: &mut String, r: &Rule) {
    let peers: Vec<String> = r.peers.iter().map(|p| p.to_string()).collect();
    let _ = writeln!(
        out,
        "rule {} {:?}: peers {}",
        r.position,
        r.name,
        peers.join(", ")
    );
    let _ = writeln!(out, "  subscribe: VNIs {}", r.subscribe);
    if r.announce.is_empty() {
        let _ = writeln!(out, "  announce: nothing");
    }
    for g in &r.announce {
        let prefixes: Vec<String> = g.prefixes.iter().map(|p| p.to_string()).collect();
        let mut hops: Vec<String> = Vec::new();
        if g.next_hops.own_address {
            hops.push("the peer's own address".into());
        }
        hops.extend(g.next_hops.prefixes.iter().map(|p| p.to_string()));
        let _ = writeln!(
            out,
            "  announce: VNIs {}; destinations within {}; next hop types {}; next hops {}; target VNIs {}",
            g.vnis,
            prefixes.join(", "),
            g.next_hop_types,
            hops.join(", "),
            g.target_vnis
        );
    }
    let limit = |v: Option<usize>, flag: &str| match v {
        Some(n) => n.to_string(),
        None => format!("global {flag}"),
    };
    let _ = writeln!(
        out,
        "  limits: routes {}, subscriptions {}, updates {}",
        limit(r.limits.max_routes, "--max-routes-per-peer"),
        limit(r.limits.max_subscriptions, "--max-subscriptions-per-peer"),
        match r.limits.update_rate {
            Some(rate) => format!("{}/s (burst {})", rate.per_second, rate.burst),
            None => "global --max-updates-per-second".into(),
        }
    );
    let _ = writeln!(
        out,
        "  on violation: {}",
        match r.on_violation {
            OnViolation::Refuse => "refuse the message (counted, session stays up)",
            OnViolation::Close => "close the session",
        }
    );
    if let Some(auth) = &r.auth {
        // The file, never the key.
        let _ = writeln!(out, "  auth: TCP-MD5, key from {}", auth.key_file.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's example policy (the policy crate's tests parse it too).
    const EXAMPLE: &str = include_str!("../../crates/policy/src/example.yaml");

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fleet() -> Policy {
        Policy::from_yaml("fleet.yaml", EXAMPLE).expect("the example parses")
    }

    #[test]
    fn check_report_explains_the_match_and_the_misses() {
        let p = fleet();
        let (text, code) = report("fleet.yaml", &p, Some(ip("2001:db8:100:7::1")));
        assert_eq!(code, EXIT_OK);
        assert!(
            text.contains(
                "rule 1 \"management\" does not match (peers 2001:db8:ffff::/48, 192.0.2.0/24)"
            ),
            "{text}"
        );
        assert!(
            text.contains("rule 3 \"hypervisors\" matches (its peers include 2001:db8:100::/48)"),
            "{text}"
        );
        assert!(text.contains("next hops the peer's own address"), "{text}");
        assert!(
            text.contains("limits: routes 5000, subscriptions 200"),
            "{text}"
        );
        let (text, code) = report("fleet.yaml", &p, Some(ip("198.51.100.1")));
        assert_eq!(code, EXIT_NO_RULE);
        assert!(text.contains("no rule matches"), "{text}");
        let (text, code) = report("fleet.yaml", &p, None);
        assert_eq!(code, EXIT_OK);
        assert!(text.contains("4 rule(s)"), "{text}");
        assert!(text.contains("revision \"fleet-a 2026-11-30\""), "{text}");
    }

    #[test]
    fn readme_example_is_this_one() {
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(EXAMPLE),
            "README's example policy differs from crates/policy/src/example.yaml"
        );
    }

    #[test]
    fn check_report_prints_warnings_and_target_vnis() {
        let p = Policy::from_yaml(
            "t",
            "version: 1\nrules:\n  - name: lo\n    peers: [\"::ffff:127.0.0.0/104\"]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [self]\n",
        )
        .unwrap();
        let (text, code) = report("t.yaml", &p, Some(ip("127.0.0.1")));
        assert_eq!(code, EXIT_OK, "{text}");
        assert!(
            text.contains(
                "\nwarning: rule 1 (\"lo\"): peers: ::ffff:127.0.0.0/104 is the IPv4-mapped form"
            ),
            "{text}"
        );
        assert!(
            text.contains("next hops the peer's own address; target VNIs 0 or the route's own"),
            "{text}"
        );
    }

    #[test]
    fn a_keyed_rule_names_its_key_file_and_never_the_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mb-check-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("hv.key");
        std::fs::write(&key, "very secret\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = dir.join("p.yaml");
        let text = "version: 1\nrules:\n  - name: hv\n    peers: [10.0.0.0/8]\n    auth: { md5_key_file: hv.key }\n";
        let policy = Policy::from_yaml(path.to_str().unwrap(), text).unwrap();
        let (out, code) = report(path.to_str().unwrap(), &policy, None);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("auth: TCP-MD5, key from") && out.contains("hv.key"),
            "{out}"
        );
        assert!(!out.contains("very secret"), "{out}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
