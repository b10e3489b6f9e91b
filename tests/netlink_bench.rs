//! Measures how long the netlink thread takes to install (and delete)
//! 100,000 routes into one table, in a namespace it creates. Ignored by
//! default (it is a measurement, not a check of speed); run with
//!
//! ```text
//! cargo test --release --test netlink_bench -- --ignored --nocapture
//! ```
//!
//! It still asserts the outcome (every route in the kernel, then none).

use metalbond_test_support::netns as support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use metalbond_netlink::{KernelRoutes, KernelRoutesConfig, KernelTable};
use metalbond_wire::{IpNet, NextHop, Vni};

const ROUTES: u32 = 100_000;
const DEV: &str = "mbtun0";

fn count_routes(ns: &support::Netns, family: &str, table: u32) -> usize {
    let out = Command::new("ip")
        .args([
            "-n",
            &ns.name,
            family,
            "route",
            "show",
            "table",
            &table.to_string(),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .count()
}

fn hypervisor(i: u32) -> NextHop {
    NextHop::standard(IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        0,
        i as u16 + 1,
    )))
}

/// Installs ROUTES prefixes with `hops` next hops each (chosen among 16
/// hypervisors), then removes them; prints both times.
fn measure(ns: &support::Netns, v6: bool, hops: u32) {
    let vni = Vni::new(23).unwrap();
    let table = 1000;
    let config = KernelRoutesConfig {
        tables: [(vni, KernelTable(table))].into_iter().collect(),
        device: DEV.into(),
        ipv4_only: false,
        cleanup_on_exit: false,
        reconcile_interval: metalbond_netlink::DEFAULT_RECONCILE_INTERVAL,
        stale_hold: None,
    };
    let shard = ns.run(move || KernelRoutes::start(config)).unwrap();
    let sink = shard.sink();
    let prefix = |i: u32| -> IpNet {
        if v6 {
            IpNet::new(
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0x100,
                    (i >> 16) as u16,
                    i as u16,
                    0,
                    0,
                    0,
                )),
                80,
            )
            .unwrap()
        } else {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32).unwrap()
        }
    };
    let family = if v6 { "-6" } else { "-4" };

    let started = Instant::now();
    for i in 0..ROUTES {
        for h in 0..hops {
            sink.add(vni, prefix(i), &hypervisor((i + h) % 16));
        }
    }
    let queued = started.elapsed();
    assert!(shard.flush(Duration::from_secs(600)));
    let installed = started.elapsed();
    assert_eq!(count_routes(ns, family, table), ROUTES as usize);

    let started = Instant::now();
    for i in 0..ROUTES {
        for h in 0..hops {
            sink.remove(vni, prefix(i), &hypervisor((i + h) % 16));
        }
    }
    assert!(shard.flush(Duration::from_secs(600)));
    let removed = started.elapsed();
    assert_eq!(count_routes(ns, family, table), 0);
    assert_eq!(ns.our_nexthop_objects(), 0);
    println!(
        "{} {ROUTES} routes x {hops} next hop(s): install {:.2} s ({:.0} routes/s; queueing {:.2} s), delete {:.2} s",
        if v6 { "IPv6" } else { "IPv4" },
        installed.as_secs_f64(),
        f64::from(ROUTES) / installed.as_secs_f64(),
        queued.as_secs_f64(),
        removed.as_secs_f64(),
    );
    shard.shutdown().unwrap();
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn install_100k_routes() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    ns.add_tunnel(DEV);
    measure(&ns, false, 1);
    measure(&ns, false, 2);
    measure(&ns, true, 1);
    measure(&ns, true, 2);
}
