//! The netlink shard against the real kernel, in a network namespace each
//! test creates (veth as the tunnel device). Skipped, with a message, where
//! namespaces cannot be created.

#[path = "netlink_support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use metalbond::netlink::{KernelRoutes, KernelRoutesConfig, NetlinkError, RouteTable};
use metalbond::{IpNet, NextHop, NextHopKind, Vni};
use support::Netns;

const DEV: &str = "mbtun0";
const FLUSH: Duration = Duration::from_secs(10);

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap()
}

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
            .map(|&(v, t)| (vni(v), RouteTable(t)))
            .collect(),
        device: DEV.into(),
        ipv4_only: false,
        cleanup_on_exit: cleanup,
        // Soon, so the reconciliation test does not wait half a minute.
        reconcile_interval: Duration::from_secs(1),
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
    // Objects: v4 {1, 2, group}, v6 {1, 2, group}.
    assert_eq!(ns.our_nexthop_objects(), 6);
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
    // The v4 group and the v4 object of ::1 are unused now and gone.
    assert_eq!(ns.our_nexthop_objects(), 4);

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
    assert_eq!(ns.our_nexthop_objects(), 1);
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
    // Without carrier the kernel refuses new multipath groups
    // ("Carrier for nexthop device is down").
    ns.ip(&["link", "set", &format!("{DEV}-p"), "down"]);
    sink.add(vni(23), net("10.0.2.0/24"), &hop("2001:db8::1"));
    sink.add(vni(23), net("10.0.2.0/24"), &hop("2001:db8::2"));
    assert!(shard.flush(FLUSH));
    assert!(shard.installed().is_empty(), "state must match the kernel");
    assert!(ns.routes("-4", 100, DEV).is_empty());
    // Carrier back: the periodic retry installs it without any new change.
    ns.ip(&["link", "set", &format!("{DEV}-p"), "up"]);
    let want = expect(&[("10.0.2.0/24", &["2001:db8::1", "2001:db8::2"])]);
    assert!(support::wait_until(Duration::from_secs(15), || ns
        .routes("-4", 100, DEV)
        == want));
    assert_eq!(shard.installed().len(), 1);
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
    // Nothing leaked: the same objects serve the restored routes (v4: two
    // encap objects and one group).
    assert_eq!(ns.our_nexthop_objects(), 3);
    assert_eq!(shard.installed().len(), 2);
}
