//! Unit tests of parsing and matching.

use std::net::IpAddr;

use super::*;

/// The example policy of the README ("Peer policy"): a fleet's management
/// network, gateways, hypervisors and tenants (`metalbond`'s `cmd::policy`
/// tests check the README shows it unchanged).
const EXAMPLE: &str = include_str!("example.yaml");
use metalbond_wire::types::{NextHop, NextHopKind, Route, Vni};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn route(vni: u32, dest: &str, hop: &str, kind: NextHopKind) -> Route {
    Route::new(
        Vni::new(vni).unwrap(),
        dest.parse().unwrap(),
        NextHop {
            target: ip(hop),
            target_vni: 0,
            kind,
        },
    )
}

fn fleet() -> Policy {
    Policy::from_yaml("fleet.yaml", EXAMPLE).expect("the example parses")
}

#[test]
fn first_matching_rule_wins_and_no_match_denies() {
    let p = fleet();
    assert_eq!(
        p.rule_for(ip("2001:db8:ffff::1")).unwrap().name,
        "management"
    );
    assert_eq!(p.rule_for(ip("2001:db8:10::5")).unwrap().name, "gateways");
    assert_eq!(
        p.rule_for(ip("2001:db8:100:7::1")).unwrap().name,
        "hypervisors"
    );
    assert_eq!(
        p.rule_for(ip("2001:db8:42::7")).unwrap().name,
        "tenant-42-appliance"
    );
    assert!(p.rule_for(ip("2001:db8:42::8")).is_none());
    // An IPv4 peer seen on a dual-stack socket is matched as IPv4.
    assert_eq!(
        p.rule_for(ip("::ffff:192.0.2.9")).unwrap().name,
        "management"
    );
    assert!(p.rule_for(ip("198.51.100.1")).is_none());
}

#[test]
fn hypervisor_may_announce_only_its_own_vms_with_its_own_address() {
    let p = fleet();
    let me = ip("2001:db8:100:7::1");
    let r = p.rule_for(me).unwrap();
    let std = NextHopKind::Standard;
    assert_eq!(
        r.check_announce(&route(1500, "10.1.2.0/24", "2001:db8:100:7::1", std), me),
        Ok(())
    );
    assert_eq!(
        r.check_announce(&route(1500, "fd00:1::/64", "2001:db8:100:7::1", std), me),
        Ok(())
    );
    // Another hypervisor's address as next hop: a hijack.
    assert_eq!(
        r.check_announce(&route(1500, "10.1.2.0/24", "2001:db8:100:8::1", std), me),
        Err(Denial::NextHop)
    );
    // A destination outside the tenant supernets.
    assert_eq!(
        r.check_announce(&route(1500, "192.168.0.0/24", "2001:db8:100:7::1", std), me),
        Err(Denial::Prefix)
    );
    // A supernet of an allowed prefix is not within it.
    assert_eq!(
        r.check_announce(&route(1500, "0.0.0.0/0", "2001:db8:100:7::1", std), me),
        Err(Denial::Prefix)
    );
    assert_eq!(
        r.check_announce(&route(2500, "10.1.2.0/24", "2001:db8:100:7::1", std), me),
        Err(Denial::AnnounceVni)
    );
    assert_eq!(
        r.check_announce(
            &route(
                1500,
                "10.1.2.0/24",
                "2001:db8:100:7::1",
                NextHopKind::LoadBalancerTarget
            ),
            me
        ),
        Err(Denial::NextHopType)
    );
    assert!(r.may_subscribe(Vni::new(1999).unwrap()));
    assert!(!r.may_subscribe(Vni::new(2000).unwrap()));
    assert_eq!(r.limits.max_routes, Some(5000));
}

#[test]
fn self_matches_an_ipv4_source_in_its_mapped_form() {
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: v4\n    peers: [127.0.0.0/8]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [self]\n",
    )
    .unwrap();
    let me = ip("127.0.0.2");
    let r = p.rule_for(me).unwrap();
    let k = NextHopKind::Standard;
    assert_eq!(
        r.check_announce(&route(1, "10.0.0.0/24", "127.0.0.2", k), me),
        Ok(())
    );
    assert_eq!(
        r.check_announce(&route(1, "10.0.0.0/24", "::ffff:127.0.0.2", k), me),
        Ok(())
    );
    assert_eq!(
        r.check_announce(&route(1, "10.0.0.0/24", "::ffff:127.0.0.3", k), me),
        Err(Denial::NextHop)
    );
}

#[test]
fn gateway_may_announce_lb_targets_within_the_hypervisor_range() {
    let p = fleet();
    let gw = ip("2001:db8:10::5");
    let r = p.rule_for(gw).unwrap();
    let lb = NextHopKind::LoadBalancerTarget;
    assert_eq!(
        r.check_announce(&route(1001, "203.0.113.7/32", "2001:db8:100:3::1", lb), gw),
        Ok(())
    );
    assert_eq!(
        r.check_announce(&route(1001, "203.0.113.7/32", "2001:db8:999::1", lb), gw),
        Err(Denial::NextHop)
    );
    assert_eq!(
        r.check_announce(
            &route(
                1001,
                "203.0.113.7/32",
                "2001:db8:100:3::1",
                NextHopKind::Standard
            ),
            gw
        ),
        Err(Denial::NextHopType)
    );
    // Management may subscribe to anything and announce nothing.
    let m = p.rule_for(ip("2001:db8:ffff::1")).unwrap();
    assert!(m.may_subscribe(Vni::new(Vni::MAX).unwrap()));
    assert_eq!(
        m.check_announce(
            &route(1, "10.0.0.0/8", "2001:db8:ffff::1", NextHopKind::Standard),
            gw
        ),
        Err(Denial::AnnounceVni)
    );
}

#[test]
fn vni_sets_merge_ranges_and_search_them() {
    let s = VniSet::from_ranges(vec![(10, 20), (21, 30), (5, 5), (100, 200), (150, 160)]);
    assert_eq!(s.ranges(), &[(5, 5), (10, 30), (100, 200)]);
    for (v, inside) in [
        (4, false),
        (5, true),
        (6, false),
        (10, true),
        (30, true),
        (31, false),
        (99, false),
        (200, true),
        (201, false),
    ] {
        assert_eq!(s.contains(Vni::new(v).unwrap()), inside, "{v}");
    }
    assert_eq!(s.to_string(), "5, 10-30, 100-200");
    assert!(!VniSet::default().contains(Vni::new(0).unwrap()));
}

fn err(text: &str) -> String {
    Policy::from_yaml("p.yaml", text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_file_the_place_and_the_cause() {
    let e =
        err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    subscribe: [100-x]\n");
    assert!(e.starts_with("policy file p.yaml: line 5 column"), "{e}");
    assert!(e.contains("VNI 'x' is not a number"), "{e}");

    let e = err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    subscrbe: [1]\n");
    assert!(e.contains("line 5 column 5"), "{e}");
    assert!(e.contains("unknown field `subscrbe`"), "{e}");

    let e = err("version: 2\nrules: []\n");
    assert!(e.contains("line 1"), "{e}");
    assert!(e.contains("version 2 is not supported"), "{e}");

    let e = err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.1/8]\n");
    assert!(e.contains("line 4"), "{e}");
    assert!(
        e.contains("host bits set (did you mean 10.0.0.0/8?)"),
        "{e}"
    );

    let e =
        err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    subscribe: [200-100]\n");
    assert!(e.contains("is empty (first above last)"), "{e}");

    let e = err(
        "version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    subscribe: [16777216]\n",
    );
    assert!(e.contains("VNI 16777216 is out of range"), "{e}");

    let e = err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n  - name: a\n    peers: [10.0.0.0/8]\n");
    assert_eq!(
        e,
        "policy file p.yaml: rule 2 (\"a\"): the name is used by an earlier rule"
    );

    let e = err("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [someone]\n");
    assert!(e.contains("line 8"), "{e}");
    assert!(e.contains("`self`"), "{e}");

    let e = err(
        "version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    on_violation: explode\n",
    );
    assert!(e.contains("line 5"), "{e}");

    let e = err("version: 1\nrules:\n  - name: a b\n    peers: [10.0.0.0/8]\n");
    assert!(e.contains("rule 1 (\"a b\"): name must be"), "{e}");

    let e = err("version: 1\nrules:\n  - name: a\n    peers: []\n");
    assert!(e.contains("`peers` is empty"), "{e}");

    let e = err("version: 1\nrules: [\n");
    assert!(e.starts_with("policy file p.yaml: "), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
}

#[test]
fn next_hop_types_default_to_standard_and_limits_must_be_positive() {
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [self]\n",
    )
    .unwrap();
    let g = &p.rules[0].announce[0];
    assert!(g.next_hop_types.standard && !g.next_hop_types.load_balancer && !g.next_hop_types.nat);
    let e = err(
        "version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    limits: {max_routes: 0}\n",
    );
    assert!(e.contains("limits must be positive"), "{e}");
}

/// A route of `route(...)` with next hop target VNI `target_vni`.
fn with_target(mut r: Route, target_vni: u32) -> Route {
    r.next_hop.target_vni = target_vni;
    r
}

#[test]
fn target_vni_defaults_to_zero_or_the_routes_own_vni() {
    // The fleet file has no `target_vnis`: what Go clients send passes,
    // another VNI (another tenant's overlay) is refused.
    let p = fleet();
    let me = ip("2001:db8:100:7::1");
    let r = p.rule_for(me).unwrap();
    let base = route(
        1500,
        "10.1.2.0/24",
        "2001:db8:100:7::1",
        NextHopKind::Standard,
    );
    assert_eq!(r.check_announce(&with_target(base, 0), me), Ok(()));
    assert_eq!(r.check_announce(&with_target(base, 1500), me), Ok(()));
    for other in [5, 1501, 1499, Vni::MAX] {
        assert_eq!(
            r.check_announce(&with_target(base, other), me),
            Err(Denial::TargetVni),
            "{other}"
        );
    }
    // Out of the 24-bit range (never passes the codec): refused too.
    assert_eq!(
        r.check_announce(&with_target(base, 1 << 24), me),
        Err(Denial::TargetVni)
    );
    assert_eq!(Denial::TargetVni.label(), "target_vni");
}

#[test]
fn target_vnis_list_replaces_the_default() {
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: gw\n    peers: [10.0.0.0/8]\n    announce:\n      - vnis: [100-199]\n        prefixes: [0.0.0.0/0]\n        next_hops: [self]\n        target_vnis: [5000-5999]\n      - vnis: [300]\n        prefixes: [0.0.0.0/0]\n        next_hops: [self]\n        target_vnis: [same, 7]\n",
    )
    .unwrap();
    let me = ip("10.0.0.1");
    let r = p.rule_for(me).unwrap();
    let k = NextHopKind::Standard;
    let in_100 = route(100, "192.168.0.0/24", "10.0.0.1", k);
    assert_eq!(r.check_announce(&with_target(in_100, 5000), me), Ok(()));
    assert_eq!(r.check_announce(&with_target(in_100, 5999), me), Ok(()));
    assert_eq!(
        r.check_announce(&with_target(in_100, 0), me),
        Err(Denial::TargetVni),
        "an explicit list replaces the default"
    );
    assert_eq!(
        r.check_announce(&with_target(in_100, 100), me),
        Err(Denial::TargetVni)
    );
    let in_300 = route(300, "192.168.0.0/24", "10.0.0.1", k);
    assert_eq!(r.check_announce(&with_target(in_300, 300), me), Ok(()));
    assert_eq!(r.check_announce(&with_target(in_300, 7), me), Ok(()));
    assert_eq!(
        r.check_announce(&with_target(in_300, 0), me),
        Err(Denial::TargetVni)
    );
    assert_eq!(p.rules[0].announce[0].target_vnis.to_string(), "5000-5999");
    assert_eq!(
        p.rules[0].announce[1].target_vnis.to_string(),
        "7 or the route's own"
    );
    assert_eq!(TargetVnis::default().to_string(), "0 or the route's own");

    let grant = |t: &str| {
        format!("version: 1\nrules:\n  - name: a\n    peers: [10.0.0.0/8]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [self]\n        target_vnis: {t}\n")
    };
    let e = err(&grant("[]"));
    assert!(e.contains("announce[0]: `target_vnis` is empty"), "{e}");
    let e = err(&grant("[own]"));
    assert!(e.contains("line 9"), "{e}");
    assert!(e.contains("`same`"), "{e}");
    let e = err(&grant("[16777216]"));
    assert!(e.contains("VNI 16777216 is out of range"), "{e}");
}

#[test]
fn an_ipv4_mapped_prefix_is_matched_as_ipv4_with_a_warning() {
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: lo\n    peers: [\"::ffff:127.0.0.0/104\"]\n    announce:\n      - vnis: [1]\n        prefixes: [10.0.0.0/8]\n        next_hops: [\"::ffff:192.0.2.0/120\"]\n",
    )
    .unwrap();
    // Peers are matched in canonical form: an IPv4 source, also seen as
    // ::ffff:a.b.c.d on a dual-stack socket, is an IPv4 address.
    assert_eq!(p.rule_for(ip("127.0.0.2")).unwrap().name, "lo");
    assert_eq!(p.rule_for(ip("::ffff:127.0.0.2")).unwrap().name, "lo");
    assert!(p.rule_for(ip("128.0.0.1")).is_none());
    assert_eq!(p.rules[0].peers, vec!["127.0.0.0/8".parse().unwrap()]);
    let r = &p.rules[0];
    let me = ip("127.0.0.2");
    let k = NextHopKind::Standard;
    assert_eq!(
        r.check_announce(&route(1, "10.0.0.0/24", "::ffff:192.0.2.7", k), me),
        Ok(())
    );
    assert_eq!(
        r.check_announce(&route(1, "10.0.0.0/24", "192.0.2.7", k), me),
        Ok(())
    );
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(
        p.warnings[0].starts_with(
            "rule 1 (\"lo\"): peers: ::ffff:127.0.0.0/104 is the IPv4-mapped form of 127.0.0.0/8 and is matched as 127.0.0.0/8"
        ),
        "{:?}",
        p.warnings
    );
    assert!(
        p.warnings[1].starts_with(
            "rule 1 (\"lo\"): announce[0].next_hops: ::ffff:192.0.2.0/120 is the IPv4-mapped form of 192.0.2.0/24"
        ),
        "{:?}",
        p.warnings
    );
    // A prefix that merely contains the mapped range is an IPv6 prefix.
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: v6\n    peers: [\"::/0\", \"::fffe:0:0/95\"]\n",
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert!(p.rule_for(ip("127.0.0.1")).is_none());
}

#[test]
fn rules_that_earlier_rules_shadow_are_warned_about() {
    assert!(fleet().warnings.is_empty(), "{:?}", fleet().warnings);
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: all-10\n    peers: [10.0.0.0/8]\n  - name: lab\n    peers: [10.1.0.0/16]\n  - name: halves-a\n    peers: [172.16.0.0/13]\n  - name: halves-b\n    peers: [172.24.0.0/13]\n  - name: whole\n    peers: [172.16.0.0/12]\n  - name: mixed\n    peers: [10.2.0.0/16, 192.168.0.0/16]\n",
    )
    .unwrap();
    assert_eq!(
        p.warnings,
        vec![
            "rule 2 (\"lab\") can never match: earlier rules match all its peers first (10.1.0.0/16 by rule \"all-10\")".to_string(),
            "rule 5 (\"whole\") can never match: earlier rules match all its peers first (172.16.0.0/12 by rule \"halves-a\", \"halves-b\")".to_string(),
            "rule 6 (\"mixed\"): some of its peers never reach it, earlier rules match them first (10.2.0.0/16 by rule \"all-10\")".to_string(),
        ]
    );
    // Half of a prefix covered is no warning: the rest still matches.
    let p = Policy::from_yaml(
        "t",
        "version: 1\nrules:\n  - name: a\n    peers: [172.16.0.0/13]\n  - name: b\n    peers: [172.16.0.0/12]\n",
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

/// A directory with key files `a` and `b` (mode 0600) and `open` (0644).
fn key_dir(tag: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("mb-policy-keys-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, key, mode) in [
        ("a", "key a\n", 0o600),
        ("b", "key b\n", 0o600),
        ("open", "k\n", 0o644),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, key).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir
}

#[test]
fn auth_reads_the_key_relative_to_the_policy_and_lists_keyed_prefixes() {
    let dir = key_dir("ok");
    let path = dir.join("policy.yaml");
    let text = "version: 1\nrules:\n  - name: plain\n    peers: [10.1.0.0/16]\n  - name: hv\n    peers: [10.0.0.0/8, 2001:db8::/32]\n    auth: { md5_key_file: a }\n";
    let p = Policy::from_yaml(path.to_str().unwrap(), text).unwrap();
    let keys = p.md5_keys();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].0, "10.0.0.0/8".parse::<IpNet>().unwrap());
    let auth = p.rules[1].auth.as_ref().unwrap();
    assert_eq!(auth.key_file, dir.join("a"));
    assert!(p.rules[0].auth.is_none());
    let shown = format!("{p:?}");
    assert!(!shown.contains("key a"), "{shown}");
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("10.1.0.0/16") && w.contains("TCP-MD5")),
        "an unkeyed rule inside a keyed prefix: {:?}",
        p.warnings
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_world_readable_missing_or_conflicting_key_is_refused_naming_the_rule() {
    let dir = key_dir("bad");
    let path = dir.join("policy.yaml");
    let path = path.to_str().unwrap();
    let rule = |file: &str| {
        format!("version: 1\nrules:\n  - name: hv\n    peers: [10.0.0.0/8]\n    auth: {{ md5_key_file: {file} }}\n")
    };
    let e = Policy::from_yaml(path, &rule("open"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rule 1") && e.contains("readable by every user"),
        "{e}"
    );
    let e = Policy::from_yaml(path, &rule("missing"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rule 1") && e.contains("missing"), "{e}");
    let e = Policy::from_yaml(path, "version: 1\nrules:\n  - name: hv\n    peers: [10.0.0.0/8]\n    auth: { md5_key_file: a, other: 1 }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("other"), "unknown keys refused: {e}");
    let two = "version: 1\nrules:\n  - name: one\n    peers: [10.0.0.0/8]\n    auth: { md5_key_file: a }\n  - name: two\n    peers: [10.0.0.0/8]\n    auth: { md5_key_file: b }\n";
    let e = Policy::from_yaml(path, two).unwrap_err().to_string();
    assert!(
        e.contains("rule 2") && e.contains("one key per prefix"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_update_rate_is_a_positive_rate_with_a_burst_defaulting_to_one_second() {
    let with = |limits: &str| {
        Policy::from_yaml(
            "t",
            &format!(
                "version: 1\nrules:\n  - name: r\n    peers: [10.0.0.0/8]\n    limits: {limits}\n"
            ),
        )
    };
    let p = with("{ max_updates_per_second: 1000 }").unwrap();
    assert_eq!(
        p.rules[0].limits.update_rate,
        Some(UpdateRate {
            per_second: 1000,
            burst: 1000
        })
    );
    let p = with("{ max_updates_per_second: 10, burst: 50 }").unwrap();
    assert_eq!(p.rules[0].limits.update_rate.map(|r| r.burst), Some(50));
    for bad in [
        "{ burst: 5 }",
        "{ max_updates_per_second: 0 }",
        "{ max_updates_per_second: 5, burst: 0 }",
    ] {
        let e = with(bad).unwrap_err().to_string();
        assert!(e.contains("rule 1"), "{bad}: {e}");
    }
}
