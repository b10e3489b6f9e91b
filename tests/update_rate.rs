//! The per-peer update rate (`--max-updates-per-second`) with a real
//! server process: a peer flapping one route far faster than its rate is
//! slowed (its socket read more slowly), never cut off and never loses a
//! message; its subscriber ends with the exact final state; a bystander
//! on the same shard is not queued behind it; `/api/v1/peers` shows it
//! throttled and `/metrics` counts what was admitted and how long it
//! waited.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use metalbond_test_support::http as http_support;
use metalbond_test_support::process::{free_port, server, wait_listening, CollectedLines};
use metalbond_test_support::server::{add, apply, remove, route, TestPeer};
use metalbond_wire::codec::Message;
use metalbond_wire::types::{Route, Vni};

/// Updates the flapper sends: ADD, REMOVE, ..., ending with ADD.
const FLAPS: usize = 4001;
/// The server's rate: FLAPS take at least (FLAPS - burst) / rate seconds.
const RATE: u32 = 1000;

fn subscriber(addr: std::net::SocketAddr, vni: u32) -> TestPeer {
    let (p, _) = TestPeer::established(addr, 1);
    p.keep_alive(Duration::from_millis(500));
    p.send(&Message::Subscribe(Vni::new(vni).unwrap()));
    p
}

/// Applies the updates that arrive until none came for `quiet`.
fn drain(p: &mut TestPeer, state: &mut BTreeSet<Route>, quiet: Duration) {
    while let Some((a, r)) = p.recv_update(quiet) {
        apply(state, a, r);
    }
}

/// A `metalbond server` under test: its listen and status addresses, its
/// log, and the directory of its policy file (removed on drop).
struct RateServer {
    /// Killed when the server is dropped.
    _process: metalbond_test_support::process::ChildGuard,
    log: CollectedLines,
    addr: std::net::SocketAddr,
    http: std::net::SocketAddr,
    dir: Option<std::path::PathBuf>,
}

impl RateServer {
    /// `metalbond server --listen --http --keepalive 1 FLAGS`, with
    /// `--policy` holding `policy` if given.
    fn start(tag: &str, policy: Option<&str>, flags: &[&str]) -> RateServer {
        let addr = free_port("127.0.0.1");
        let http = free_port("127.0.0.1");
        let (addr_s, http_s) = (addr.to_string(), http.to_string());
        let mut args = vec!["--listen", &addr_s, "--http", &http_s, "--keepalive", "1"];
        args.extend_from_slice(flags);
        let dir = policy.map(|text| {
            let dir = std::env::temp_dir().join(format!("mb-rate-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("policy.yaml"), text).unwrap();
            dir
        });
        let file = dir
            .as_ref()
            .map(|d| d.join("policy.yaml").display().to_string());
        if let Some(file) = &file {
            args.extend(["--policy", file.as_str()]);
        }
        let mut srv = server(&args);
        let log = CollectedLines::from(srv.0.stderr.take().unwrap());
        wait_listening(&mut srv, &[addr]).unwrap_or_else(|e| panic!("{e}"));
        RateServer {
            _process: srv,
            log,
            addr,
            http,
            dir,
        }
    }
}

impl Drop for RateServer {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_peer_over_its_update_rate_is_slowed_not_cut_and_nothing_is_lost() {
    let rate = RATE.to_string();
    let server = RateServer::start(
        "flag",
        None,
        &["--shards", "1", "--max-updates-per-second", &rate],
    );
    let (addr, http, log) = (server.addr, server.http, &server.log);
    let mut sub = subscriber(addr, 23);
    let mut watcher = subscriber(addr, 24);
    let (bystander, _) = TestPeer::established(addr, 1);
    bystander.keep_alive(Duration::from_millis(500));
    let (mut flapper, _) = TestPeer::established(addr, 1);
    flapper.keep_alive(Duration::from_millis(500));

    let r = route(23, 1, 1);
    let flaps: Vec<Message> = (0..FLAPS)
        .map(|i| if i % 2 == 0 { add(r) } else { remove(r) })
        .collect();
    let started = Instant::now();
    flapper.send_all(&flaps);

    // While it is slowed: /api/v1/peers says so, and a bystander's route
    // on the same shard goes straight through.
    let mut throttled_seen = false;
    let mut body = String::new();
    for _ in 0..100 {
        body = http_support::get(&format!("http://{http}/api/v1/peers")).2;
        let peers: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let any = peers["peers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["throttled"] == true));
        if any {
            throttled_seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        throttled_seen,
        "the flapper shows as throttled: {body}\n{}",
        log.text()
    );
    let b = route(24, 2, 2);
    let sent = Instant::now();
    bystander.send(&add(b));
    assert_eq!(
        watcher.recv_update(Duration::from_secs(10)),
        Some((metalbond_wire::Action::Add, b))
    );
    let bystander_latency = sent.elapsed();

    // Every flap is handled (the KEEPALIVE behind them is answered), at
    // the rate: the first `burst` (one second's worth) at once, the rest
    // at RATE per second.
    flapper.sync_point();
    let took = started.elapsed();
    let least = Duration::from_secs_f64((FLAPS as f64 - f64::from(RATE)) / f64::from(RATE));
    assert!(
        took >= least.mul_f64(0.95),
        "{FLAPS} updates at {RATE}/s took {took:?}: not slowed"
    );
    assert!(
        bystander_latency < least / 2,
        "the bystander waited {bystander_latency:?} (the flapper's backlog: {least:?})"
    );
    let mut state = BTreeSet::new();
    drain(&mut sub, &mut state, Duration::from_millis(700));
    assert_eq!(state, BTreeSet::from([r]), "the final state, once each");
    assert!(!flapper.closed_within(Duration::from_millis(10)));
    assert!(
        !log.text().contains("no keepalive from peer"),
        "the slowed session was not timed out\n{}",
        log.text()
    );
    let (_, _, metrics) = http_support::get(&format!("http://{http}/metrics"));
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(
        value("metalbond_update_rate_admitted_total{rule=\"(no policy)\"}") >= FLAPS as f64,
        "{metrics}"
    );
    assert!(
        value("metalbond_update_rate_throttled_seconds_total{rule=\"(no policy)\"}")
            >= least.as_secs_f64() * 0.5,
        "{metrics}"
    );
    println!(
        "{FLAPS} flaps at {RATE}/s handled in {took:?}; bystander latency meanwhile {bystander_latency:?}"
    );
}

/// A policy rule's `limits.max_updates_per_second` / `burst` replace the
/// server's flag for its peers, and are counted under the rule's name.
#[test]
fn a_rules_update_rate_applies_to_its_peers_and_is_counted_under_its_name() {
    let server = RateServer::start(
        "rule",
        Some("version: 1\nrules:\n  - name: flappy\n    peers: [127.0.0.0/8]\n    subscribe: [23]\n    announce:\n      - vnis: [23]\n        prefixes: [10.0.0.0/8]\n        next_hops: [2001:db8::/32]\n    limits: { max_updates_per_second: 500, burst: 100 }\n"),
        &["--max-updates-per-second", "100000"],
    );
    let (addr, http, log) = (server.addr, server.http, &server.log);
    let mut sub = subscriber(addr, 23);
    let (mut flapper, _) = TestPeer::established(addr, 1);
    flapper.keep_alive(Duration::from_millis(500));
    let r = route(23, 1, 1);
    let flaps: Vec<Message> = (0..1101)
        .map(|i| if i % 2 == 0 { add(r) } else { remove(r) })
        .collect();
    let started = Instant::now();
    flapper.send_all(&flaps);
    flapper.sync_point();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "1,000 updates beyond the burst at the rule's 500/s took {took:?}\n{}",
        log.text()
    );
    let mut state = BTreeSet::new();
    drain(&mut sub, &mut state, Duration::from_millis(700));
    assert_eq!(state, BTreeSet::from([r]));
    let (_, _, metrics) = http_support::get(&format!("http://{http}/metrics"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("metalbond_update_rate_admitted_total{rule=\"flappy\"} ")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("metalbond_update_rate_throttled_seconds_total{rule=\"flappy\"} ")),
        "{metrics}"
    );
}

/// Latency percentiles (p50, p99, max) of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), at(1.0))
}

/// A bystander's route changes, one every 20 ms for `length`, each timed
/// from the send to its arrival at the watcher.
fn bystander_latencies(
    bystander: &TestPeer,
    watcher: &mut TestPeer,
    length: Duration,
) -> Vec<Duration> {
    let b = route(24, 2, 2);
    let mut out = Vec::new();
    let end = Instant::now() + length;
    let mut present = false;
    while Instant::now() < end {
        let sent = Instant::now();
        bystander.send(&if present { remove(b) } else { add(b) });
        present = !present;
        match watcher.recv_update(Duration::from_secs(5)) {
            Some((_, r)) if r == b => out.push(sent.elapsed()),
            other => panic!(
                "bystander's change {} lost after {:?}: {other:?}",
                out.len(),
                sent.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if present {
        // Leave the route withdrawn, as found.
        bystander.send(&remove(b));
        assert_eq!(
            watcher.recv_update(Duration::from_secs(5)),
            Some((metalbond_wire::Action::Remove, b))
        );
    }
    out
}

/// Measurement (figures in BENCHMARKS.md, "Session protection"): a peer
/// offering 100,000 updates/s of one route for 10 s against a policy
/// rule of 1,000/s, on the same shard as a bystander whose route changes
/// every 20 ms; the bystander's latency before and during the flood, and
/// the subscriber's exact final state. Run: `cargo test --release --test
/// update_rate -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, run by hand; figures in BENCHMARKS.md"]
fn bystander_latency_next_to_a_peer_flapping_at_100k_per_second() {
    let server = RateServer::start("bystander", Some("version: 1\nrules:\n  - name: flapper\n    peers: [127.0.0.2/32]\n    announce:\n      - vnis: [23]\n        prefixes: [10.0.0.0/8]\n        next_hops: [2001:db8::/32]\n    limits: { max_updates_per_second: 1000 }\n  - name: fleet\n    peers: [127.0.0.0/8]\n    subscribe: [23, 24]\n    announce:\n      - vnis: [24]\n        prefixes: [10.0.0.0/8]\n        next_hops: [2001:db8::/32]\n"), &["--shards", "1"]);
    let (addr, http, log) = (server.addr, server.http, &server.log);
    let mut sub = subscriber(addr, 23);
    let mut watcher = subscriber(addr, 24);
    let (bystander, _) = TestPeer::established(addr, 1);
    bystander.keep_alive(Duration::from_millis(500));
    let baseline = bystander_latencies(&bystander, &mut watcher, Duration::from_secs(3));

    let mut flapper = TestPeer::connect_from(addr, "127.0.0.2".parse().unwrap());
    // A small send buffer, so the backlog left when the flood stops is
    // seconds, not minutes, at 1,000/s.
    socket2::SockRef::from(&*flapper.writer_clone().lock().unwrap())
        .set_send_buffer_size(64 << 10)
        .unwrap();
    flapper.handshake(1);
    flapper.keep_alive(Duration::from_millis(500));
    let r = route(23, 1, 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let flapper = flapper.writer_clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            // 1,000 updates every 10 ms: 100,000/s offered; the writes
            // block once the server stops reading (TCP back-pressure).
            let batch: Vec<Message> = (0..1000)
                .map(|i| if i % 2 == 0 { add(r) } else { remove(r) })
                .collect();
            let mut bytes = Vec::new();
            for m in &batch {
                bytes.extend_from_slice(&metalbond_test_support::server::frame(m));
            }
            let mut offered = 0u64;
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = started + Duration::from_millis(10) * (offered / 1000) as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if std::io::Write::write_all(&mut *flapper.lock().unwrap(), &bytes).is_err() {
                    break;
                }
                offered += 1000;
            }
            // End on an ADD: the final state has the route.
            let _ = std::io::Write::write_all(
                &mut *flapper.lock().unwrap(),
                &metalbond_test_support::server::frame(&add(r)),
            );
            (offered + 1, started.elapsed())
        })
    };
    let during = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bystander_latencies(&bystander, &mut watcher, Duration::from_secs(10))
    }))
    .unwrap_or_else(|_| {
        let peers = http_support::get(&format!("http://{http}/api/v1/peers")).2;
        let metrics = http_support::get(&format!("http://{http}/metrics")).2;
        let queues: Vec<&str> = metrics.lines().filter(|l| l.contains("queue")).collect();
        panic!(
            "server log:\n{}\npeers: {peers}\nqueues: {queues:#?}",
            log.text()
        )
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (written, writing) = flooding.join().unwrap();
    // The flapper's backlog (what TCP buffered) is admitted at 1,000/s:
    // the subscriber is quiet once it is through.
    let drained = Instant::now();
    let mut state = BTreeSet::new();
    drain(&mut sub, &mut state, Duration::from_millis(1500));
    let backlog = drained.elapsed();
    assert!(
        !flapper.closed_within(Duration::from_millis(1)),
        "the flapper was cut off"
    );
    assert_eq!(state, BTreeSet::from([r]), "the exact final state");
    let (b50, b99, bmax) = percentiles(baseline);
    let (d50, d99, dmax) = percentiles(during);
    println!(
        "flapper wrote {written} updates in {writing:?} ({:.0}/s accepted by TCP) against 1,000/s",
        written as f64 / writing.as_secs_f64()
    );
    println!("bystander latency alone:        p50 {b50:?} p99 {b99:?} max {bmax:?}");
    println!("bystander latency next to it:   p50 {d50:?} p99 {d99:?} max {dmax:?}");
    println!(
        "backlog admitted after the flood stopped: {backlog:?}; subscriber final state: {state:?}"
    );
}
