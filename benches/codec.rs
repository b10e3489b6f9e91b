//! Codec throughput: encode and decode+validate of single frames (UPDATE over
//! IPv4 and IPv6, HELLO) and of a stream of 10,000 mixed frames fed in
//! 64 KiB reads, the way a peer's read loop sees them.
//!
//! Run: `cargo bench --bench codec`. Figures go to BENCHMARKS.md.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::{Action, IpNet, NextHop, NextHopKind, Route, Vni};

fn vni(v: u32) -> Vni {
    Vni::new(v).expect("bench VNI in range")
}

fn update_v4(i: u32) -> Message {
    let dest = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i << 8))), 24).expect("len");
    Message::Update {
        action: Action::Add,
        route: Route::new(
            vni(23),
            dest,
            NextHop::standard(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        ),
    }
}

fn update_v6(i: u32) -> Message {
    let dest = IpNet::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, i as u16, 0, 0, 0, 0)),
        64,
    )
    .expect("len");
    Message::Update {
        action: Action::Remove,
        route: Route::new(
            vni(100),
            dest,
            NextHop {
                target: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
                target_vni: 7,
                kind: NextHopKind::Nat {
                    from: 1000,
                    to: 2000,
                },
            },
        ),
    }
}

const HELLO: Message = Message::Hello {
    keepalive_secs: 5,
    is_server: true,
    reads_stream: false,
};

fn frames(msg: &Message, copies: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    for _ in 0..copies {
        encode_frame(msg, &mut buf);
    }
    buf
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    for (name, msg) in [
        ("update_v4", update_v4(7)),
        ("update_v6_nat", update_v6(7)),
        ("hello", HELLO),
    ] {
        let mut buf = BytesMut::with_capacity(1 << 16);
        g.bench_function(name, |b| {
            b.iter(|| {
                if buf.len() > 60_000 {
                    buf.clear();
                }
                encode_frame(black_box(&msg), &mut buf)
            })
        });
    }
    g.finish();
}

/// Decodes `frames` (all the same message) in one feed; per-element figures.
fn bench_decode(c: &mut Criterion) {
    const N: usize = 1000;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(N as u64));
    for (name, msg) in [
        ("update_v4", update_v4(7)),
        ("update_v6_nat", update_v6(7)),
        ("hello", HELLO),
    ] {
        let wire = frames(&msg, N);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut dec = FrameDecoder::new();
                dec.extend(&wire);
                let mut n = 0;
                while let Ok(Some(m)) = dec.next_message() {
                    black_box(m);
                    n += 1;
                }
                assert_eq!(n, N);
            })
        });
    }
    g.finish();
}

/// 10,000 mixed frames (mostly UPDATEs, as on a busy session), read 64 KiB at a time.
fn bench_stream(c: &mut Criterion) {
    const N: usize = 10_000;
    let mut wire = Vec::new();
    for i in 0..N as u32 {
        let msg = match i % 10 {
            0 => Message::Keepalive,
            1 => Message::Subscribe(vni(i & 0xffff)),
            2..=5 => update_v6(i),
            _ => update_v4(i),
        };
        encode_frame(&msg, &mut wire);
    }
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("decode_10k_mixed_64k_reads", |b| {
        b.iter(|| {
            let mut dec = FrameDecoder::new();
            let mut n = 0;
            for chunk in wire.chunks(64 * 1024) {
                dec.extend(chunk);
                while let Ok(Some(m)) = dec.next_message() {
                    black_box(m);
                    n += 1;
                }
            }
            assert_eq!(n, N);
        })
    });
    g.bench_function("encode_10k_mixed", |b| {
        let msgs: Vec<Message> = (0..N as u32)
            .map(|i| match i % 10 {
                0 => Message::Keepalive,
                1 => Message::Subscribe(vni(i & 0xffff)),
                2..=5 => update_v6(i),
                _ => update_v4(i),
            })
            .collect();
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            for m in &msgs {
                encode_frame(m, &mut buf);
            }
            black_box(buf.len())
        })
    });
    g.finish();
}

/// The per-VNI digest's cost per route change (`metalbond_wire::digest`): the
/// owner pays it once for each route that enters or leaves a table.
fn bench_digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest");
    g.throughput(Throughput::Elements(1));
    for (name, msg) in [("route_v4", update_v4(7)), ("route_v6_nat", update_v6(7))] {
        let Message::Update { route, .. } = msg else {
            unreachable!("an UPDATE")
        };
        let mut digest = metalbond_wire::digest::VniDigest::default();
        g.bench_function(name, |b| b.iter(|| digest.add(black_box(&route))));
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_encode,
    bench_decode,
    bench_stream,
    bench_digest
);
criterion_main!(benches);
