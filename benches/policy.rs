//! Peer-policy cost (`--policy`): the per-session first-match lookup over a
//! 1,000-rule policy (the peer's rule is the last one), and the per-UPDATE
//! check of routes laid out as loadgen's burst sends them (mostly IPv4 /32,
//! some IPv6, NAT and LB next hops; the rule's second grant allows them),
//! next to decoding the same UPDATE frames, the least work an UPDATE costs
//! the server anyway.
//!
//! Run: `cargo bench --bench policy`. Figures go to BENCHMARKS.md ("Peer
//! policy"), with the loadgen burst run with and without the same policy.

use std::fmt::Write;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metalbond_policy::Policy;
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

/// 999 hypervisor rules, then the rule loadgen's peers (127.0.0.0/8) match.
fn policy_1000() -> String {
    let mut s = String::from("version: 1\nrules:\n");
    for i in 0..999u32 {
        let (a, b) = (i / 256, i % 256);
        let _ = write!(
            s,
            "  - name: hv-{i}\n    peers: [10.{a}.{b}.0/24, 2001:db8:{i:x}::/48]\n    subscribe: [{v}, 20000-20999]\n    announce:\n      - vnis: [{v}]\n        prefixes: [10.{p}.{b}.0/24, fd00:{i:x}::/32]\n        next_hops: [self]\n",
            v = 1000 + i,
            p = 100 + a
        );
    }
    s.push_str(
        "  - name: loadgen\n    peers: [127.0.0.0/8, \"::1\"]\n    subscribe: [100-10099]\n    announce:\n      - vnis: [5000-5999]\n        prefixes: [192.168.0.0/16]\n        next_hops: [self]\n      - vnis: [100-10099]\n        prefixes: [172.16.0.0/12, 192.168.0.0/16, 10.0.0.0/8, fd00::/8]\n        next_hop_types: [standard, nat, loadbalancer]\n        next_hops: [self, 2001:db8::/32]\n",
    );
    s
}

/// Route `id` as loadgen's plan builds it (peer 0 announcing in VNI 100).
fn loadgen_route(id: u32) -> Route {
    let destination = IpNet::from(if id % 8 == 3 {
        IpAddr::V6(Ipv6Addr::from((0xfdaa_u128 << 112) | u128::from(id)))
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000_u32.wrapping_add(id)))
    });
    let kind = match id % 16 {
        7 => NextHopKind::Nat {
            from: 1024,
            to: 2047,
        },
        11 => NextHopKind::LoadBalancerTarget,
        _ => NextHopKind::Standard,
    };
    Route::new(
        Vni::new(100).expect("VNI"),
        destination,
        NextHop {
            target: IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96)),
            target_vni: 0,
            kind,
        },
    )
}

fn bench(c: &mut Criterion) {
    let policy = Policy::from_yaml("bench", &policy_1000()).expect("bench policy parses");
    let source: IpAddr = "127.0.0.1".parse().expect("addr");
    let mut g = c.benchmark_group("policy");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    g.bench_function("rule_for (session start, 1,000 rules, last matches)", |b| {
        b.iter(|| black_box(policy.rule_for(black_box(source))).is_some())
    });

    let rule = policy.rule_for(source).expect("loadgen rule").clone();
    let routes: Vec<Route> = (0..1024).map(loadgen_route).collect();
    g.throughput(Throughput::Elements(routes.len() as u64));
    g.bench_function("check_announce x1024 (per UPDATE)", |b| {
        b.iter(|| {
            for r in &routes {
                assert!(rule.check_announce(black_box(r), source).is_ok());
            }
        })
    });

    let mut wire = BytesMut::new();
    for r in &routes {
        encode_frame(
            &Message::Update {
                action: Action::Add,
                route: *r,
            },
            &mut wire,
        );
    }
    let wire = wire.freeze();
    g.bench_function("decode x1024 UPDATE frames (for scale)", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            d.extend(&wire);
            let mut n = 0;
            while let Ok(Some(m)) = d.next_message() {
                black_box(m);
                n += 1;
            }
            assert_eq!(n, 1024);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
