//! Reflector benchmarks (criterion).
//!
//! - `fanout_one_update/N`: one UPDATE from an announcer until each of N
//!   subscribers (spread over 2 shards, real TCP on loopback; the server runs
//!   in process) has read it. The subscribers live in a child process (the
//!   bench binary re-executed), because 10,000 connections with both ends in
//!   one process exceed the fd limit here; it reads one socket after the
//!   other and reports back over a pipe, so its reads are in the figure.
//! - `fanout_burst_10k/100`: 10,000 UPDATEs in one write, until each of 100
//!   subscribers has read all of them (elements = updates delivered).
//! - `table_apply/*`: `VniOwner` alone (no sockets) applying 1 M ADDs then
//!   1 M REMOVEs, with no subscriber and with one live subscriber (which adds
//!   the encoding of every change).
//! - `table_memory` (printed, not timed): heap bytes per route of a
//!   `VniOwner` holding 1 M routes in one VNI (IPv4 /32, one next hop), as
//!   counted by this binary's global allocator (requested bytes; the
//!   allocator's own slack is not included). Printed as
//!   `table_memory: ... bytes per route`.
//!
//! Run: `cargo bench --bench fanout`; figures are recorded in BENCHMARKS.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use metalbond_server::owner_logic::{OwnerInput, VniOwner};
use metalbond_server::{PeerId, Server, ServerConfig, ServerHandle};
use metalbond_wire::codec::{encode_frame, Message};
use metalbond_wire::{Action, NextHop, Route, Vni};

/// The system allocator, counting the bytes currently allocated, so the
/// bench can print what a table costs per route.
struct CountingAlloc;

/// Bytes currently allocated through `CountingAlloc`.
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counter is
// only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn route(i: u32) -> Route {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + i);
    Route::new(
        Vni::new(1).unwrap(),
        ipnet::IpNet::new(ip.into(), 32).unwrap(),
        NextHop::standard("2001:db8::1".parse().unwrap()),
    )
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_frame(msg, &mut b);
    b.to_vec()
}

/// A blocking client that completed the handshake.
fn client(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&frame(&Message::Hello {
        keepalive_secs: 3600,
        is_server: false,
        reads_stream: true,
    }))
    .unwrap();
    read_frame(&mut s);
    s.write_all(&frame(&Message::Keepalive)).unwrap();
    read_frame(&mut s);
    s
}

/// Reads one frame and returns its type byte.
fn read_frame(s: &mut TcpStream) -> u8 {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let len = u16::from_be_bytes([h[1], h[2]]) as usize;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    h[3]
}

/// Reads frames until `n` UPDATEs have arrived, with one buffered reader
/// pass per socket read.
fn read_updates(s: &mut TcpStream, n: usize, buf: &mut [u8]) {
    let mut got = 0;
    let mut pending: Vec<u8> = Vec::new();
    while got < n {
        let k = s.read(buf).unwrap();
        assert!(k > 0, "server closed");
        pending.extend_from_slice(&buf[..k]);
        let mut off = 0;
        while pending.len() - off >= 4 {
            let len = u16::from_be_bytes([pending[off + 1], pending[off + 2]]) as usize;
            if pending.len() - off < 4 + len {
                break;
            }
            if pending[off + 3] == 5 {
                got += 1;
            }
            off += 4 + len;
        }
        pending.drain(..off);
    }
}

/// The subscribers' process: N connections, driven over stdin/stdout.
struct Subscribers {
    child: Child,
    to_child: ChildStdin,
    from_child: BufReader<ChildStdout>,
}

impl Subscribers {
    fn spawn(addr: SocketAddr, n: usize) -> Subscribers {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .env(CHILD_ENV, format!("{addr},{n}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let to_child = child.stdin.take().unwrap();
        let from_child = BufReader::new(child.stdout.take().unwrap());
        let mut s = Subscribers {
            child,
            to_child,
            from_child,
        };
        s.wait_line(); // connected and subscribed
        s
    }

    fn wait_line(&mut self) {
        let mut line = String::new();
        self.from_child.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "subscriber process died");
    }

    /// Returns once every subscriber has read `n` UPDATEs.
    fn read_all(&mut self, n: usize) {
        writeln!(self.to_child, "{n}").unwrap();
        self.to_child.flush().unwrap();
        self.wait_line();
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CHILD_ENV: &str = "METALBOND_FANOUT_SUBSCRIBERS";

/// Body of the subscribers' process.
fn subscriber_child(spec: &str) {
    let (addr, n) = spec.split_once(',').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let n: usize = n.parse().unwrap();
    let sub = frame(&Message::Subscribe(Vni::new(1).unwrap()));
    let ka = frame(&Message::Keepalive);
    let mut subs = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = client(addr);
        s.write_all(&sub).unwrap();
        subs.push(s);
    }
    // A keepalive round trip each: every subscription has been processed.
    for s in &mut subs {
        s.write_all(&ka).unwrap();
        read_frame(s);
    }
    let mut out = std::io::stdout();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { return };
        let Ok(k) = line.trim().parse::<usize>() else {
            return;
        };
        for s in &mut subs {
            read_updates(s, k, &mut buf);
        }
        writeln!(out, "done").unwrap();
        out.flush().unwrap();
    }
}

struct Setup {
    handle: ServerHandle,
    announcer: TcpStream,
    subscribers: Subscribers,
}

fn setup(subs: usize) -> Setup {
    let mut c = ServerConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
    c.shards = 2;
    c.keepalive = Duration::from_secs(3600);
    let handle = Server::start(c).unwrap();
    let addr = handle.local_addrs()[0];
    let announcer = client(addr);
    let subscribers = Subscribers::spawn(addr, subs);
    // Sync of an empty table done; let the subscriptions go live.
    std::thread::sleep(Duration::from_millis(200));
    Setup {
        handle,
        announcer,
        subscribers,
    }
}

fn fanout_one_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_one_update");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    for subs in [1usize, 100, 10_000] {
        let mut s = setup(subs);
        let add = frame(&Message::Update {
            action: Action::Add,
            route: route(1),
        });
        let remove = frame(&Message::Update {
            action: Action::Remove,
            route: route(1),
        });
        let mut n = 0u64;
        g.throughput(Throughput::Elements(subs as u64));
        g.bench_function(BenchmarkId::from_parameter(subs), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let f = if n % 2 == 0 { &add } else { &remove };
                    n += 1;
                    s.announcer.write_all(f).unwrap();
                    s.subscribers.read_all(1);
                }
                start.elapsed()
            })
        });
        // Leave the table empty for the next size.
        if n % 2 == 1 {
            s.announcer.write_all(&remove).unwrap();
            s.subscribers.read_all(1);
        }
        let stats = s.handle.stats();
        eprintln!(
            "fanout_one_update/{subs}: frames written {}, write calls {}",
            stats.sum(|s| s.frames_written),
            stats.sum(|s| s.write_calls)
        );
        s.handle.shutdown();
    }
    g.finish();
}

fn fanout_burst(c: &mut Criterion) {
    const BURST: u32 = 10_000;
    const SUBS: usize = 100;
    let mut g = c.benchmark_group("fanout_burst_10k");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    let mut s = setup(SUBS);
    let mut adds = BytesMut::new();
    let mut removes = BytesMut::new();
    for i in 0..BURST {
        encode_frame(
            &Message::Update {
                action: Action::Add,
                route: route(i),
            },
            &mut adds,
        );
        encode_frame(
            &Message::Update {
                action: Action::Remove,
                route: route(i),
            },
            &mut removes,
        );
    }
    let mut n = 0u64;
    g.throughput(Throughput::Elements(u64::from(BURST) * SUBS as u64));
    g.bench_function(BenchmarkId::from_parameter(SUBS), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let f = if n % 2 == 0 { &adds } else { &removes };
                n += 1;
                s.announcer.write_all(f).unwrap();
                s.subscribers.read_all(BURST as usize);
            }
            start.elapsed()
        })
    });
    s.handle.shutdown();
    g.finish();
}

fn table_apply(c: &mut Criterion) {
    const N: u32 = 1_000_000;
    let routes: Vec<Route> = (0..N).map(route).collect();
    let announcer = PeerId::new(0, 1);
    let subscriber = PeerId::new(1, 2);
    let mut g = c.benchmark_group("table_apply");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(2 * u64::from(N)));
    for with_subscriber in [false, true] {
        let name = if with_subscriber {
            "add_remove_1M_one_subscriber"
        } else {
            "add_remove_1M_no_subscriber"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut owner = VniOwner::new(1024);
                let mut out = Vec::new();
                if with_subscriber {
                    let vni = Vni::new(1).unwrap();
                    owner.apply(
                        OwnerInput::Subscribe {
                            peer: subscriber,
                            vni,
                            epoch: 1,
                        },
                        &mut out,
                    );
                    while owner.sync_step(&mut out) {}
                }
                for (action, chunk) in [(Action::Add, &routes), (Action::Remove, &routes)] {
                    for batch in chunk.chunks(4096) {
                        for r in batch {
                            let input = match action {
                                Action::Add => OwnerInput::Announce {
                                    peer: announcer,
                                    route: *r,
                                },
                                Action::Remove => OwnerInput::Withdraw {
                                    peer: announcer,
                                    route: *r,
                                },
                            };
                            owner.apply(input, &mut out);
                        }
                        owner.flush(&mut out);
                        out.clear();
                    }
                }
                assert_eq!(owner.route_count(), 0);
            })
        });
    }
    g.finish();
}

/// Heap bytes per route of an owner table of 1 M routes, printed. Not a
/// criterion measurement (there is nothing to time), but run with the bench
/// so the figure is tracked with the others.
fn table_memory(_: &mut Criterion) {
    const N: u32 = 1_000_000;
    let announcer = PeerId::new(0, 1);
    for (order, ids) in [
        ("ascending", (0..N).collect::<Vec<u32>>()),
        // A fixed permutation (7,919 is prime to N, so multiplying by it
        // modulo N visits every index once): routes in no particular order.
        (
            "scattered",
            (0..N)
                .map(|i| (u64::from(i) * 7919 % u64::from(N)) as u32)
                .collect(),
        ),
    ] {
        let routes: Vec<Route> = ids.iter().map(|i| route(*i)).collect();
        let before = ALLOCATED.load(Ordering::Relaxed);
        let mut owner = VniOwner::new(1024);
        let mut out = Vec::new();
        for r in &routes {
            owner.apply(
                OwnerInput::Announce {
                    peer: announcer,
                    route: *r,
                },
                &mut out,
            );
        }
        owner.flush(&mut out);
        drop(out);
        let used = ALLOCATED.load(Ordering::Relaxed).saturating_sub(before);
        println!(
            "table_memory: owner table, {} routes ({order}) in one VNI: {:.1} MiB, {:.1} bytes per route",
            owner.route_count(),
            used as f64 / (1 << 20) as f64,
            used as f64 / owner.route_count().max(1) as f64
        );
    }
}

criterion_group!(
    benches,
    table_memory,
    table_apply,
    fanout_one_update,
    fanout_burst
);

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        subscriber_child(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
