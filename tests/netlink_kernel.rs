//! The netlink thread against the real kernel, in a network namespace each
//! test creates (veth as the tunnel device). Skipped, with a message, where
//! namespaces cannot be created.

use metalbond_test_support::netns as support;
use metalbond_test_support::vni;

use std::collections::BTreeMap;
use std::time::Duration;

use metalbond_netlink::{KernelRoutes, KernelRoutesConfig, KernelTable, NetlinkError};
use metalbond_wire::{IpNet, NextHop, NextHopKind};
use support::Netns;

const DEV: &str = "mbtun0";
const FLUSH: Duration = Duration::from_secs(10);

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn hop(s: &str) -> NextHop {
    NextHop::standard(s.parse().unwrap())
}

fn config(tables: &[(u32, u32)], cleanup: bool) -> KernelRoutesConfig {
    KernelRoutesConfig {
        tables: tables
            .iter()
            .map(|&(v, t)| (vni(v), KernelTable(t)))
            .collect(),
        device: DEV.into(),
        ipv4_only: false,
        cleanup_on_exit: cleanup,
        // Soon, so the reconciliation test does not wait half a minute.
        reconcile_interval: Duration::from_secs(1),
        stale_hold: None,
    }
}

fn start(ns: &Netns, config: KernelRoutesConfig) -> Result<KernelRoutes, NetlinkError> {
    ns.run(move || KernelRoutes::start(config))
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(p, hops)| (p.to_string(), hops.iter().map(|h| h.to_string()).collect()))
        .collect()
}

#[test]
fn routes_with_ecmp_in_both_families_replace_and_delete() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100), (24, 1000)], false)).unwrap();
    let sink = shard.sink();

    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::2"));
    sink.add(vni(23), net("10.0.24.0/24"), &hop("2001:db8::2"));
    sink.add(vni(24), net("2001:db8:9::/64"), &hop("2001:db8::2"));
    sink.add(vni(24), net("2001:db8:9::/64"), &hop("2001:db8::1"));
    sink.add(vni(24), net("2001:db8:8::/64"), &hop("2001:db8::1"));
    // A second present route to the same underlay address (NAT range) is
    // the same kernel next hop.
    let nat = NextHop {
        kind: NextHopKind::Nat {
            from: 1024,
            to: 2047,
        },
        ..hop("2001:db8::1")
    };
    sink.add(vni(24), net("2001:db8:8::/64"), &nat);
    // Unmapped VNI: not installed.
    sink.add(vni(99), net("10.99.0.0/24"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));

    assert_eq!(
        ns.routes("-4", 100, DEV),
        expect(&[
            ("10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]),
            ("10.0.24.0/24", &["2001:db8::2"]),
        ])
    );
    assert_eq!(
        ns.routes("-6", 1000, DEV),
        expect(&[
            ("2001:db8:8::/64", &["2001:db8::1"]),
            ("2001:db8:9::/64", &["2001:db8::1", "2001:db8::2"]),
        ])
    );
    // Objects only for IPv6 ({1, 2, group}); IPv4 routes carry their next
    // hops (the Go client's form).
    assert_eq!(ns.our_nexthop_objects(), 3);
    let v4 = ns.ip(&["-4", "route", "show", "table", "100"]);
    assert!(!v4.contains("nhid"), "{v4}");
    assert!(ns
        .ip(&["-6", "route", "show", "table", "1000"])
        .contains("nhid"));
    assert_eq!(shard.installed().len(), 4);

    // Removing one of two next hops replaces the route; the NAT duplicate
    // keeps 2001:db8::1 on 2001:db8:8::/64.
    sink.remove(vni(23), net("10.0.23.0/24"), &hop("2001:db8::1"));
    sink.remove(vni(24), net("2001:db8:8::/64"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    assert_eq!(
        ns.routes("-4", 100, DEV),
        expect(&[
            ("10.0.23.0/24", &["2001:db8::2"]),
            ("10.0.24.0/24", &["2001:db8::2"]),
        ])
    );
    assert_eq!(
        ns.routes("-6", 1000, DEV)["2001:db8:8::/64"],
        vec!["2001:db8::1".to_string()]
    );
    // The IPv6 next-hop sets did not change: the same three objects.
    assert_eq!(ns.our_nexthop_objects(), 3);

    // The last next hop removed deletes the route.
    sink.remove(vni(23), net("10.0.23.0/24"), &hop("2001:db8::2"));
    sink.remove(vni(23), net("10.0.24.0/24"), &hop("2001:db8::2"));
    sink.remove(vni(24), net("2001:db8:8::/64"), &nat);
    sink.remove(vni(24), net("2001:db8:9::/64"), &hop("2001:db8::1"));
    sink.remove(vni(24), net("2001:db8:9::/64"), &hop("2001:db8::2"));
    assert!(shard.flush(FLUSH));
    assert!(ns.routes("-4", 100, DEV).is_empty());
    assert!(ns.routes("-6", 1000, DEV).is_empty());
    assert_eq!(ns.our_nexthop_objects(), 0);
    shard.shutdown().unwrap();
}

#[test]
fn churn_on_one_prefix_ends_in_the_last_state() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = shard.sink();
    for i in 1..=50u16 {
        let h = NextHop::standard(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i).into());
        sink.add(vni(23), net("10.1.0.0/16"), &h);
        if i < 50 {
            sink.remove(vni(23), net("10.1.0.0/16"), &h);
        }
    }
    assert!(shard.flush(FLUSH));
    assert_eq!(
        ns.routes("-4", 100, DEV),
        expect(&[("10.1.0.0/16", &["2001:db8::32"])])
    );
    assert_eq!(ns.our_nexthop_objects(), 0, "IPv4 routes use no objects");
}

#[test]
fn ipv4_only_skips_ipv6_destinations() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let mut cfg = config(&[(23, 100)], false);
    cfg.ipv4_only = true;
    let shard = start(&ns, cfg).unwrap();
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.0.0/8"), &hop("2001:db8::1"));
    sink.add(vni(23), net("2001:db8:1::/48"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    assert_eq!(ns.routes("-4", 100, DEV).len(), 1);
    assert!(ns.routes("-6", 100, DEV).is_empty());
}

#[test]
fn stale_routes_and_objects_are_deleted_at_start_foreign_ones_kept() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    // Left by an "earlier run": a proto-254 route with a nexthop object, a
    // plain proto-254 route, in a mapped table; plus things not ours.
    ns.ip(&[
        "nexthop",
        "add",
        "id",
        "7",
        "encap",
        "ip6",
        "dst",
        "2001:db8::7",
        "dev",
        DEV,
        "proto",
        "254",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.7.0.0/16",
        "table",
        "300",
        "proto",
        "254",
        "nhid",
        "7",
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.8.0.0/16",
        "table",
        "300",
        "proto",
        "254",
        "dev",
        DEV,
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.9.0.0/16",
        "table",
        "300",
        "proto",
        "static",
        "dev",
        DEV,
    ]);
    ns.ip(&[
        "route",
        "add",
        "10.10.0.0/16",
        "table",
        "301",
        "proto",
        "254",
        "dev",
        DEV,
    ]);
    ns.ip(&[
        "nexthop",
        "add",
        "id",
        "1",
        "encap",
        "ip6",
        "dst",
        "2001:db8::9",
        "dev",
        DEV,
    ]);

    let shard = start(&ns, config(&[(23, 300)], false)).unwrap();
    let t300 = ns.ip(&["route", "show", "table", "300"]);
    assert!(
        !t300.contains("10.7.0.0/16") && !t300.contains("10.8.0.0/16"),
        "{t300}"
    );
    assert!(
        t300.contains("10.9.0.0/16"),
        "foreign protocol kept: {t300}"
    );
    assert!(
        ns.ip(&["route", "show", "table", "301"])
            .contains("10.10.0.0/16"),
        "unmapped table untouched"
    );
    assert_eq!(ns.our_nexthop_objects(), 0);
    // The foreign nexthop object 1 survives and its id is not reused.
    let sink = shard.sink();
    sink.add(vni(23), net("10.11.0.0/16"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    let objects = ns.ip(&["nexthop", "show"]);
    assert!(
        objects.contains("id 1 ") && objects.contains("2001:db8::9"),
        "{objects}"
    );
    let shown = support::parse_routes(&ns.ip(&["route", "show", "table", "300"]));
    let ours = shown.iter().find(|r| r.prefix == "10.11.0.0/16").unwrap();
    assert!(ours.protocol_254, "{}", ours.text);
    assert_eq!(ours.encap_dsts, vec!["2001:db8::1".to_string()]);
}

#[test]
fn cleanup_on_exit_deletes_ours_and_only_when_asked() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    for cleanup in [false, true] {
        let shard = start(&ns, config(&[(23, 100)], cleanup)).unwrap();
        let sink = shard.sink();
        sink.add(vni(23), net("10.0.0.0/24"), &hop("2001:db8::1"));
        sink.add(vni(23), net("10.0.0.0/24"), &hop("2001:db8::2"));
        sink.add(vni(23), net("2001:db8:5::/64"), &hop("2001:db8::2"));
        assert!(shard.flush(FLUSH));
        shard.shutdown().unwrap();
        let left = ns.routes("-4", 100, DEV).len() + ns.routes("-6", 100, DEV).len();
        if cleanup {
            assert_eq!(left, 0);
            assert_eq!(ns.our_nexthop_objects(), 0);
        } else {
            assert_eq!(left, 2, "without --cleanup routes stay for a restart");
            assert!(ns.our_nexthop_objects() > 0);
        }
    }
}

/// Clients in one namespace starting at the same moment: each probes the
/// device with a nexthop object of the first id free in its dump, so they
/// pick the same id; the one the kernel answers EEXIST takes another
/// instead of giving up (seen: a unit's client and a second client started
/// together, one exited with "File exists").
#[test]
fn clients_starting_together_in_one_namespace_all_start() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    const CLIENTS: u32 = 8;
    for round in 0..5 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS as usize));
        let started: Vec<Result<KernelRoutes, NetlinkError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|i| {
                    let barrier = barrier.clone();
                    let ns = &ns;
                    s.spawn(move || {
                        ns.run(move || {
                            barrier.wait();
                            KernelRoutes::start(config(&[(30 + i, 100 + i)], false))
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        for (i, r) in started.into_iter().enumerate() {
            match r {
                Ok(routes) => routes.shutdown().expect("shutdown"),
                Err(e) => panic!("round {round}, client {i}: {e}"),
            }
        }
    }
}

#[test]
fn missing_tunnel_device_is_an_error_at_start() {
    let Some(ns) = Netns::create() else { return };
    let err = start(&ns, config(&[(23, 100)], false)).err().unwrap();
    assert!(
        matches!(err, NetlinkError::NoSuchDevice(ref d) if d == DEV),
        "{err}"
    );
    assert!(err.to_string().contains(DEV));
}

#[test]
fn a_refused_route_is_never_claimed_and_is_retried() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = shard.sink();
    // Without carrier the kernel refuses new multipath groups ("Carrier
    // for nexthop device is down"): an IPv6 ECMP route cannot go in.
    ns.ip(&["link", "set", &format!("{DEV}-p"), "down"]);
    sink.add(vni(23), net("2001:db8:2::/64"), &hop("2001:db8::1"));
    sink.add(vni(23), net("2001:db8:2::/64"), &hop("2001:db8::2"));
    assert!(shard.flush(FLUSH));
    assert!(shard.installed().is_empty(), "state must match the kernel");
    assert!(ns.routes("-6", 100, DEV).is_empty());
    // Carrier back: the periodic retry installs it without any new change.
    ns.ip(&["link", "set", &format!("{DEV}-p"), "up"]);
    let want = expect(&[("2001:db8:2::/64", &["2001:db8::1", "2001:db8::2"])]);
    assert!(support::wait_until(Duration::from_secs(15), || ns
        .routes("-6", 100, DEV)
        == want));
    assert_eq!(shard.installed().len(), 1);
    // An IPv4 route through a device that is down is refused (ENETDOWN),
    // not claimed, and installed once the device is up.
    ns.ip(&["link", "set", DEV, "down"]);
    assert!(support::wait_until(Duration::from_secs(5), || ns
        .routes("-6", 100, DEV)
        .is_empty()));
    sink.add(vni(23), net("10.0.2.0/24"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    assert!(
        !shard
            .installed()
            .iter()
            .any(|r| r.key.prefix == net("10.0.2.0/24")),
        "state must match the kernel"
    );
    ns.ip(&["link", "set", DEV, "up"]);
    let want = expect(&[("10.0.2.0/24", &["2001:db8::1"])]);
    assert!(support::wait_until(Duration::from_secs(15), || ns
        .routes("-4", 100, DEV)
        == want));
}

#[test]
fn routes_come_back_after_the_device_bounces() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::2"));
    sink.add(vni(23), net("2001:db8:1::/64"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    let want = expect(&[
        ("10.0.1.0/24", &["2001:db8::1", "2001:db8::2"]),
        ("2001:db8:1::/64", &["2001:db8::1"]),
    ]);
    let both = || {
        let mut t = ns.routes("-4", 100, DEV);
        t.extend(ns.routes("-6", 100, DEV));
        t
    };
    assert_eq!(both(), want);
    // The kernel flushes nexthop objects (and their routes) when the device
    // goes down; the shard notices and re-installs once it is back.
    ns.ip(&["link", "set", DEV, "down"]);
    assert!(support::wait_until(Duration::from_secs(5), || both().is_empty()));
    ns.ip(&["link", "set", DEV, "up"]);
    assert!(
        support::wait_until(Duration::from_secs(15), || both() == want),
        "{:?}",
        both()
    );
}

#[test]
fn routes_deleted_by_hand_are_put_back() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::2"));
    sink.add(vni(23), net("10.0.2.0/24"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    let want = expect(&[
        ("10.0.1.0/24", &["2001:db8::1", "2001:db8::2"]),
        ("10.0.2.0/24", &["2001:db8::1"]),
    ]);
    assert_eq!(ns.routes("-4", 100, DEV), want);
    let put_back = |what: &str| {
        assert!(
            support::wait_until(Duration::from_secs(15), || ns.routes("-4", 100, DEV)
                == want),
            "{what}: {:?}",
            ns.routes("-4", 100, DEV)
        );
    };

    // An operator deletes one route, later every route of the table.
    ns.ip(&["route", "del", "10.0.2.0/24", "table", "100"]);
    assert!(!ns.routes("-4", 100, DEV).contains_key("10.0.2.0/24"));
    put_back("one route deleted");
    ns.ip(&["route", "del", "10.0.1.0/24", "table", "100"]);
    ns.ip(&["route", "del", "10.0.2.0/24", "table", "100"]);
    put_back("every route deleted");
    // Replaced by hand with other next hops (as a Go client on the same
    // host would): recognised as changed and put back.
    ns.ip(&[
        "route",
        "replace",
        "10.0.1.0/24",
        "table",
        "100",
        "proto",
        "254",
        "nexthop",
        "encap",
        "ip6",
        "dst",
        "2001:db8::99",
        "dev",
        DEV,
    ]);
    assert_ne!(ns.routes("-4", 100, DEV), want);
    put_back("one route replaced with another next hop");
    // Nothing leaked: IPv4 routes use no nexthop objects.
    assert_eq!(ns.our_nexthop_objects(), 0);
    assert_eq!(shard.installed().len(), 2);
}

/// `ip route replace PREFIX table TABLE proto 254 nexthop encap ip6 dst A
/// dev DEV [nexthop ...]`: the Go client's IPv4 form, written with iproute2.
fn add_go_form(ns: &Netns, table: u32, prefix: &str, hops: &[&str]) {
    let table = table.to_string();
    let mut args = vec!["route", "replace", prefix, "table", &table, "proto", "254"];
    for hop in hops {
        args.extend(["nexthop", "encap", "ip6", "dst", hop, "dev", DEV]);
    }
    ns.ip(&args);
}

/// What an earlier version of ours left: IPv4 and IPv6 routes referencing
/// protocol-254 nexthop objects (encap objects and a group per family).
fn add_earlier_version_state(ns: &Netns, table: u32) {
    let table = table.to_string();
    for (id, family, dst) in [
        ("31", "-4", "2001:db8::1"),
        ("32", "-4", "2001:db8::2"),
        ("41", "-6", "2001:db8::1"),
        ("42", "-6", "2001:db8::2"),
    ] {
        ns.ip(&[
            family, "nexthop", "add", "id", id, "encap", "ip6", "dst", dst, "dev", DEV, "proto",
            "254",
        ]);
    }
    ns.ip(&[
        "nexthop", "add", "id", "33", "group", "31/32", "proto", "254",
    ]);
    ns.ip(&[
        "nexthop", "add", "id", "43", "group", "41/42", "proto", "254",
    ]);
    for (prefix, nhid) in [
        ("10.31.0.0/16", "33"),
        ("10.32.0.0/16", "31"),
        ("2001:db8:31::/64", "43"),
        ("2001:db8:32::/64", "41"),
    ] {
        ns.ip(&[
            "route", "add", prefix, "table", &table, "proto", "254", "nhid", nhid,
        ]);
    }
}

#[test]
fn ipv4_routes_have_the_go_clients_form() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::2"));
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.24.0/24"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    // The same routes written the Go client's way into another table.
    add_go_form(&ns, 200, "10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]);
    add_go_form(&ns, 200, "10.0.24.0/24", &["2001:db8::1"]);

    let ours = ns.ip(&["-d", "route", "show", "table", "100"]);
    let go = ns.ip(&["-d", "route", "show", "table", "200"]);
    assert_eq!(ours, go, "same `ip -d route show` output as the Go form");
    assert!(!ours.contains("nhid"), "{ours}");
    let multipath = support::parse_routes(&ns.ip(&["route", "show", "table", "100"]));
    let ecmp = multipath
        .iter()
        .find(|r| r.prefix == "10.0.23.0/24")
        .unwrap();
    assert!(
        ecmp.text.contains("nexthop  encap ip6") || ecmp.text.contains("nexthop encap ip6"),
        "{}",
        ecmp.text
    );
    // One next hop: the kernel shows the single-hop form (no `nexthop`).
    let single = multipath
        .iter()
        .find(|r| r.prefix == "10.0.24.0/24")
        .unwrap();
    assert!(!single.text.contains("nexthop"), "{}", single.text);
    assert!(
        single.text.contains("encap ip6") && single.text.contains(&format!("dev {DEV}")),
        "{}",
        single.text
    );
    assert_eq!(ns.our_nexthop_objects(), 0);
}

#[test]
fn go_cleanup_emulation_fails_where_the_go_client_fails() {
    // The emulation must reproduce the measured failures, or the rollback
    // test below proves nothing: an IPv4 route on a nexthop object (ESRCH),
    // and an IPv6 route on a nexthop group (dumped with one RTA_MULTIPATH
    // entry per member: the second entry's delete finds nothing, ESRCH).
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    add_earlier_version_state(&ns, 100);
    let outcome = support::go_client_cleanup(&ns, &[100]);
    assert_eq!(outcome.errors.len(), 3, "{outcome:#?}");
    assert!(
        outcome.errors.iter().all(|e| e.contains("No such process")),
        "{outcome:#?}"
    );
    // The IPv6 single-object route is deleted cleanly.
    assert!(
        outcome.deleted.iter().any(|d| d.contains("2001:db8:32::")),
        "{outcome:#?}"
    );
    // And the Go client's own form deletes cleanly, one hop or several.
    add_go_form(&ns, 101, "10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]);
    add_go_form(&ns, 101, "10.0.24.0/24", &["2001:db8::1"]);
    let outcome = support::go_client_cleanup(&ns, &[101]);
    assert!(outcome.errors.is_empty(), "{outcome:#?}");
    assert_eq!(outcome.deleted.len(), 2);
}

/// Routes in the main table that are not ours (a connected route and a
/// static one): they must survive whatever we do there.
fn add_foreign_main_routes(ns: &Netns) {
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", DEV]);
    ns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "dev",
        DEV,
        "proto",
        "static",
    ]);
}

#[test]
fn go_client_cleanup_succeeds_after_we_stop_without_cleanup() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    // Main table (VNI mapped to table 0) with routes that are not ours.
    add_foreign_main_routes(&ns);
    let main_before = ns.ip(&["route", "show", "table", "main"]);
    let shard = start(&ns, config(&[(23, 100), (24, 0)], false)).unwrap();
    let sink = shard.sink();
    for (v, prefix, hops) in [
        (23, "10.0.23.0/24", &["2001:db8::1", "2001:db8::2"][..]),
        (23, "10.0.24.0/24", &["2001:db8::1"][..]),
        (23, "2001:db8:23::/64", &["2001:db8::1", "2001:db8::2"][..]),
        (23, "2001:db8:24::/64", &["2001:db8::2"][..]),
        (24, "10.24.0.0/16", &["2001:db8::1", "2001:db8::2"][..]),
        (
            24,
            "2001:db8:2424::/64",
            &["2001:db8::1", "2001:db8::2"][..],
        ),
    ] {
        for h in hops {
            sink.add(vni(v), net(prefix), &hop(h));
        }
    }
    assert!(shard.flush(FLUSH));
    let main_ours = ns.ip(&["route", "show", "table", "main", "proto", "254"]);
    assert!(main_ours.contains("10.24.0.0/16"), "{main_ours}");
    shard.shutdown().unwrap();

    // Routes stay (IPv6 ECMP routes with their first next hop).
    assert_eq!(
        ns.routes("-4", 100, DEV),
        expect(&[
            ("10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]),
            ("10.0.24.0/24", &["2001:db8::1"]),
        ])
    );
    assert_eq!(
        ns.routes("-6", 100, DEV),
        expect(&[
            ("2001:db8:23::/64", &["2001:db8::1"]),
            ("2001:db8:24::/64", &["2001:db8::2"]),
        ])
    );
    let outcome = support::go_client_cleanup(&ns, &[100, 254]);
    assert!(outcome.errors.is_empty(), "{outcome:#?}");
    assert_eq!(outcome.deleted.len(), 6, "{outcome:#?}");
    assert!(ns.ip(&["route", "show", "table", "100"]).is_empty());
    assert!(ns.ip(&["-6", "route", "show", "table", "100"]).is_empty());
    assert_eq!(
        ns.ip(&["route", "show", "table", "main"]),
        main_before,
        "only protocol-254 routes of main were ours"
    );
}

#[test]
fn start_over_an_earlier_versions_and_the_go_clients_routes() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    add_earlier_version_state(&ns, 100);
    add_go_form(&ns, 100, "10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]);
    add_go_form(&ns, 100, "10.0.24.0/24", &["2001:db8::1"]);
    // Not ours: another protocol in the same table.
    ns.ip(&[
        "route",
        "add",
        "10.9.0.0/16",
        "table",
        "100",
        "proto",
        "static",
        "dev",
        DEV,
    ]);
    let shard = start(&ns, config(&[(23, 100)], false)).unwrap();
    let left = ns.ip(&["route", "show", "table", "100"]);
    assert_eq!(left.lines().count(), 1, "{left}");
    assert!(left.contains("10.9.0.0/16"), "{left}");
    assert!(ns.ip(&["-6", "route", "show", "table", "100"]).is_empty());
    assert_eq!(ns.our_nexthop_objects(), 0);

    // Our routes go in in the new form, and the Go client could clean up.
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::3"));
    sink.add(vni(23), net("2001:db8:31::/64"), &hop("2001:db8::3"));
    assert!(shard.flush(FLUSH));
    let shown = ns.ip(&["route", "show", "table", "100"]);
    assert!(
        !shown.contains("nhid") && shown.contains("nexthop"),
        "{shown}"
    );
    shard.shutdown().unwrap();
    let outcome = support::go_client_cleanup(&ns, &[100]);
    assert!(outcome.errors.is_empty(), "{outcome:#?}");
    assert_eq!(outcome.deleted.len(), 2, "{outcome:#?}");
}

#[test]
fn main_table_cleanup_on_exit_touches_only_protocol_254() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    add_foreign_main_routes(&ns);
    // A stale protocol-254 route in main is ours (an earlier run's).
    add_go_form(&ns, 254, "10.66.0.0/16", &["2001:db8::66"]);
    ns.ip(&[
        "route",
        "add",
        "10.67.0.0/16",
        "table",
        "300",
        "proto",
        "254",
        "dev",
        DEV,
    ]);
    let main_foreign = || {
        ns.ip(&["route", "show", "table", "main"])
            .lines()
            .filter(|l| !l.contains("proto 254"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = main_foreign();
    assert_eq!(before.len(), 2, "{before:?}");
    let shard = start(&ns, config(&[(24, 0)], true)).unwrap();
    assert!(!ns.ip(&["route", "show"]).contains("10.66.0.0/16"));
    let sink = shard.sink();
    sink.add(vni(24), net("10.24.0.0/16"), &hop("2001:db8::1"));
    assert!(shard.flush(FLUSH));
    let main = ns.ip(&["route", "show", "table", "main"]);
    assert!(main.contains("10.24.0.0/16"), "{main}");
    assert_eq!(main_foreign(), before);
    shard.shutdown().unwrap();
    assert_eq!(
        main_foreign(),
        before,
        "--cleanup left foreign routes alone"
    );
    assert!(!ns.ip(&["route", "show"]).contains("10.24.0.0/16"));
    assert!(
        ns.ip(&["route", "show", "table", "300"])
            .contains("10.67.0.0/16"),
        "unmapped table untouched"
    );
}

#[test]
fn ipv4_only_routes_come_back_after_the_device_bounces() {
    // No IPv6 route, so no nexthop object whose loss would tell; and a
    // read-back too slow to matter: the health check must see the device
    // go down and come back.
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let mut cfg = config(&[(23, 100)], false);
    cfg.reconcile_interval = Duration::from_secs(600);
    let shard = start(&ns, cfg).unwrap();
    let sink = shard.sink();
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.1.0/24"), &hop("2001:db8::2"));
    assert!(shard.flush(FLUSH));
    let want = expect(&[("10.0.1.0/24", &["2001:db8::1", "2001:db8::2"])]);
    assert_eq!(ns.routes("-4", 100, DEV), want);
    ns.ip(&["link", "set", DEV, "down"]);
    assert!(support::wait_until(Duration::from_secs(5), || ns
        .routes("-4", 100, DEV)
        .is_empty()));
    // Longer than one health-check interval (3 s), so a check sees it down.
    std::thread::sleep(Duration::from_secs(4));
    ns.ip(&["link", "set", DEV, "up"]);
    assert!(
        support::wait_until(Duration::from_secs(15), || ns.routes("-4", 100, DEV)
            == want),
        "{:?}",
        ns.routes("-4", 100, DEV)
    );
}

fn with_hold(mut config: KernelRoutesConfig, hold: Duration) -> KernelRoutesConfig {
    config.stale_hold = Some(hold);
    config
}

#[test]
fn a_restart_takes_over_our_routes_refreshes_them_in_place_and_sweeps_the_rest() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let first = start(&ns, config(&[(23, 100)], false)).unwrap();
    let sink = first.sink();
    for (prefix, hops) in [
        ("10.0.23.0/24", &["2001:db8::1", "2001:db8::2"][..]),
        ("10.0.24.0/24", &["2001:db8::2"][..]),
        ("2001:db8:9::/64", &["2001:db8::1", "2001:db8::2"][..]),
        ("2001:db8:8::/64", &["2001:db8::1"][..]),
    ] {
        for h in hops {
            sink.add(vni(23), net(prefix), &hop(h));
        }
    }
    assert!(first.flush(FLUSH));
    // Stopping without --cleanup leaves the routes (IPv6 ECMP with its
    // first next hop, for the Go client's cleanup).
    first.shutdown().unwrap();
    let refreshed = ["10.0.23.0/24", "2001:db8:9::/64"];
    let unrefreshed = ["10.0.24.0/24", "2001:db8:8::/64"];
    let all: Vec<&str> = refreshed.iter().chain(&unrefreshed).copied().collect();
    let sampler = support::KernelSampler::start(&ns, 100, &all);

    let hold = Duration::from_secs(2);
    let started = std::time::Instant::now();
    let second = start(&ns, with_hold(config(&[(23, 100)], false), hold)).unwrap();
    // Taken over, not deleted.
    let installed: Vec<String> = second
        .installed()
        .iter()
        .map(|r| r.key.prefix.to_string())
        .collect();
    for p in &all {
        assert!(installed.contains(&p.to_string()), "{p} in {installed:?}");
    }
    // The sync refreshes two of them (one back to its two next hops).
    let sink = second.sink();
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::2"));
    sink.add(vni(23), net("10.0.23.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("2001:db8:9::/64"), &hop("2001:db8::1"));
    sink.add(vni(23), net("2001:db8:9::/64"), &hop("2001:db8::2"));
    assert!(second.flush(FLUSH));
    assert_eq!(
        ns.routes("-6", 100, DEV)["2001:db8:9::/64"].len(),
        2,
        "refreshed to both next hops"
    );
    // The others go at the end of the hold, not before.
    assert!(support::wait_until(hold + Duration::from_secs(10), || {
        let v4 = ns.routes("-4", 100, DEV);
        let v6 = ns.routes("-6", 100, DEV);
        !v4.contains_key(unrefreshed[0]) && !v6.contains_key(unrefreshed[1])
    }));
    assert!(
        started.elapsed() >= hold,
        "swept after {:?}, before the hold of {hold:?}",
        started.elapsed()
    );
    let (missing, samples) = sampler.stop();
    assert!(samples > 20, "too few samples: {samples}");
    for p in refreshed {
        assert_eq!(
            missing[p], 0,
            "{p} was missing from the kernel in {} of {samples} samples",
            missing[p]
        );
    }
    assert_eq!(
        ns.routes("-4", 100, DEV),
        expect(&[("10.0.23.0/24", &["2001:db8::1", "2001:db8::2"])])
    );
    // Encap objects for ::1 and ::2 and their group; nothing left over.
    assert!(support::wait_until(FLUSH, || ns.our_nexthop_objects() == 3));
    second.shutdown().unwrap();
}

#[test]
fn the_go_clients_and_an_earlier_versions_routes_are_taken_over_too() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    add_earlier_version_state(&ns, 100);
    add_go_form(&ns, 100, "10.0.23.0/24", &["2001:db8::1", "2001:db8::2"]);
    // The Go client's IPv6 form: one next hop, RTA_OIF + RTA_ENCAP.
    ns.ip(&[
        "-6",
        "route",
        "replace",
        "2001:db8:23::/64",
        "table",
        "100",
        "proto",
        "254",
        "encap",
        "ip6",
        "dst",
        "2001:db8::1",
        "dev",
        DEV,
    ]);
    let watched = [
        "10.0.23.0/24",
        "2001:db8:23::/64",
        "10.31.0.0/16",
        "2001:db8:31::/64",
    ];
    let sampler = support::KernelSampler::start(&ns, 100, &watched);
    let hold = Duration::from_secs(2);
    let shard = start(&ns, with_hold(config(&[(23, 100)], false), hold)).unwrap();
    assert_eq!(shard.installed().len(), 6, "{:?}", shard.installed());
    let sink = shard.sink();
    for (prefix, hops) in [
        ("10.0.23.0/24", &["2001:db8::1", "2001:db8::2"][..]),
        ("2001:db8:23::/64", &["2001:db8::1"][..]),
        ("10.31.0.0/16", &["2001:db8::1", "2001:db8::2"][..]),
        ("2001:db8:31::/64", &["2001:db8::1", "2001:db8::2"][..]),
    ] {
        for h in hops {
            sink.add(vni(23), net(prefix), &hop(h));
        }
    }
    assert!(shard.flush(FLUSH));
    // Swept: the two earlier-version routes nobody refreshed.
    assert!(support::wait_until(hold + Duration::from_secs(10), || {
        shard.installed().len() == 4
    }));
    let (missing, samples) = sampler.stop();
    assert!(samples > 20, "too few samples: {samples}");
    for p in watched {
        assert_eq!(
            missing[p], 0,
            "{p} was missing in {} of {samples} samples",
            missing[p]
        );
    }
    // Every route is in our current form now: IPv4 inline, IPv6 by object.
    let v4 = ns.ip(&["route", "show", "table", "100"]);
    assert!(!v4.contains("nhid") && !v4.contains("10.32.0.0"), "{v4}");
    let v6 = ns.ip(&["-6", "route", "show", "table", "100"]);
    assert_eq!(v6.matches("nhid").count(), 2, "{v6}");
    assert!(!v6.contains("2001:db8:32::"), "{v6}");
    shard.shutdown().unwrap();
}
