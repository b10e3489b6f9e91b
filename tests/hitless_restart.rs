//! Hitless restarts end to end: real `metalbond server` and `metalbond
//! client` processes inside a network namespace the test creates (servers on
//! its loopback, a veth as the installing client's tunnel device). A thread
//! samples the installing client's kernel table every 10 ms and the tests
//! assert that a route announced throughout is never missing from it:
//! (1) the only reflector restarts and the announcers come back seconds
//! later; (2) the installing client restarts without `--cleanup`; (3) an
//! announcing client restarts while the server has `--peer-grace`; (4) what
//! no one refreshes is swept after the hold, and what is withdrawn goes at
//! once. Skipped, with a message, where namespaces cannot be created.

use metalbond_test_support::http as http_support;
use metalbond_test_support::netns as support;
use metalbond_test_support::process::ChildGuard;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{wait_until, KernelSampler, Netns};

const BIN: &str = env!("CARGO_BIN_EXE_metalbond");
const DEV: &str = "mbtun0";
const WAIT: Duration = Duration::from_secs(20);
const SERVER: &str = "[::1]:4711";

/// A process in the namespace, killed when dropped (also when a test fails).
type Proc = ChildGuard;

/// Starts `metalbond ARGS` in `ns`.
fn spawn(ns: &Netns, args: &[&str]) -> Proc {
    let child = ns
        .command(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn metalbond");
    ChildGuard(child)
}

fn server(ns: &Netns, extra: &[&str]) -> Proc {
    let mut args = vec!["server", "--listen", SERVER, "--keepalive", "1"];
    args.extend_from_slice(extra);
    spawn(ns, &args)
}

/// A client of the one server; `reconnect_ms` is its first reconnect delay.
fn client(ns: &Netns, reconnect_ms: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "client",
        "--server",
        SERVER,
        "--keepalive",
        "1",
        "--reconnect-min-ms",
        reconnect_ms,
        "--reconnect-max-secs",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn(ns, &args)
}

fn installer(ns: &Netns, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--subscribe",
        "23",
        "--install-routes",
        "23#100",
        "--tun",
        DEV,
    ];
    args.extend_from_slice(extra);
    client(ns, "50", &args)
}

fn announcer(ns: &Netns, reconnect_ms: &str, routes: &str) -> Proc {
    client(ns, reconnect_ms, &["--announce", routes])
}

/// The prefixes in table 100 (both families).
fn prefixes(ns: &Netns) -> Vec<String> {
    let mut all: Vec<String> = ns.routes("-4", 100, DEV).into_keys().collect();
    all.extend(ns.routes("-6", 100, DEV).into_keys());
    all.sort();
    all
}

fn wait_prefixes(ns: &Netns, want: &[&str], what: &str) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut last = Vec::new();
    let ok = wait_until(WAIT, || {
        last = prefixes(ns);
        last == want
    });
    assert!(ok, "{what}: table 100 has {last:?}, want {want:?}");
}

/// Every watched prefix was in the kernel in every sample.
fn never_missing(sampler: KernelSampler) {
    let (missing, samples) = sampler.stop();
    assert!(samples >= 50, "too few samples: {samples}");
    for (prefix, n) in missing {
        assert_eq!(n, 0, "{prefix} was missing in {n} of {samples} samples");
    }
}

const A_ROUTES: &str = "23#10.0.1.0/24#2001:db8::a,23#2001:db8:1::/64#2001:db8::a";
const A_PREFIXES: [&str; 2] = ["10.0.1.0/24", "2001:db8:1::/64"];

#[test]
fn restart_of_the_only_reflector_loses_no_route() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let s = server(&ns, &[]);
    let _i = installer(&ns, &["--stale-hold", "30"]);
    // The announcer comes back 3 s after it lost the server.
    let _a = announcer(&ns, "3000", A_ROUTES);
    wait_prefixes(&ns, &A_PREFIXES, "announced");
    let sampler = KernelSampler::start(&ns, 100, &A_PREFIXES);
    s.terminate();
    let _s = server(&ns, &[]);
    std::thread::sleep(Duration::from_secs(5));
    never_missing(sampler);
    wait_prefixes(&ns, &A_PREFIXES, "after the restart");
}

#[test]
fn restart_of_the_installing_client_loses_no_route() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let _s = server(&ns, &[]);
    let i = installer(&ns, &[]);
    let _a = announcer(&ns, "50", A_ROUTES);
    wait_prefixes(&ns, &A_PREFIXES, "announced");
    let sampler = KernelSampler::start(&ns, 100, &A_PREFIXES);
    i.terminate();
    std::thread::sleep(Duration::from_millis(500));
    let _i = installer(&ns, &[]);
    std::thread::sleep(Duration::from_secs(3));
    never_missing(sampler);
    // Refreshed by the new process's sync (IPv6 back on a nexthop object).
    wait_prefixes(&ns, &A_PREFIXES, "after the restart");
}

#[test]
fn restart_of_an_announcing_client_with_peer_grace_loses_no_route() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let _s = server(&ns, &["--peer-grace", "4"]);
    let _i = installer(&ns, &[]);
    // The first run also announces a route the second one drops.
    let a = announcer(&ns, "50", &format!("{A_ROUTES},23#10.0.9.0/24#2001:db8::a"));
    wait_prefixes(
        &ns,
        &["10.0.1.0/24", "10.0.9.0/24", "2001:db8:1::/64"],
        "announced",
    );
    let sampler = KernelSampler::start(&ns, 100, &A_PREFIXES);
    let lost = Instant::now();
    a.terminate();
    std::thread::sleep(Duration::from_secs(1));
    let _a = announcer(&ns, "50", A_ROUTES);
    // The dropped route goes when the grace is over, the others stay.
    wait_prefixes(&ns, &A_PREFIXES, "after the grace");
    assert!(
        lost.elapsed() >= Duration::from_secs(3),
        "{:?}",
        lost.elapsed()
    );
    never_missing(sampler);
}

#[test]
fn what_nobody_refreshes_is_swept_after_the_hold_and_withdrawals_go_at_once() {
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let s = server(&ns, &[]);
    let _i = installer(&ns, &["--stale-hold", "8"]);
    let _a = announcer(&ns, "50", A_ROUTES);
    let b = announcer(&ns, "50", "23#10.0.2.0/24#2001:db8::b");
    let c = announcer(&ns, "50", "23#10.0.3.0/24#2001:db8::c");
    let all = [
        "10.0.1.0/24",
        "10.0.2.0/24",
        "10.0.3.0/24",
        "2001:db8:1::/64",
    ];
    wait_prefixes(&ns, &all, "announced");
    let sampler = KernelSampler::start(&ns, 100, &A_PREFIXES);
    // The reflector goes; b vanishes while it is down. The clock starts
    // before the kill: the installer sees the session drop (and starts its
    // hold) before `terminate` has reaped the server, so a clock started
    // after it ran up to a few ms short of the hold (7.9999 s seen).
    let lost = Instant::now();
    s.terminate();
    drop(b);
    let _s = server(&ns, &[]);
    // c comes back with the others (within its 1 s reconnect delay), then
    // withdraws (its process ends, so the server withdraws its route): gone
    // at once, long before the hold.
    std::thread::sleep(Duration::from_millis(1500));
    c.terminate();
    let withdrawn = Instant::now();
    wait_prefixes(
        &ns,
        &["10.0.1.0/24", "10.0.2.0/24", "2001:db8:1::/64"],
        "c withdrawn",
    );
    assert!(withdrawn.elapsed() < Duration::from_secs(3));
    assert!(
        lost.elapsed() < Duration::from_secs(8),
        "too slow to check before the hold"
    );
    // b's route was not refreshed: swept after the hold.
    wait_prefixes(&ns, &A_PREFIXES, "b's route swept");
    assert!(
        lost.elapsed() >= Duration::from_secs(8),
        "{:?}",
        lost.elapsed()
    );
    never_missing(sampler);
}

/// Measurement (ignored by default; figures in BENCHMARKS.md): what a
/// restart of the only reflector costs an installing client holding 100,000
/// routes. Run with `cargo test --release --test hitless_restart --
/// --ignored --nocapture`. Reports the smallest route count seen in
/// back-to-back full dumps of the table from the restart until 6 s after it
/// (target: never below 100,000; a dump of 100,000 routes takes a few
/// hundred ms, so the 10 ms sampling of the other tests is not possible
/// here), and the time from the restart until the client held no stale
/// route any more (every route refreshed by the new reflector).
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn reflector_restart_cost_with_100k_routes() {
    use metalbond_client::{Client, ClientConfig, LogSink};
    use metalbond_wire::Vni;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    const N: u32 = 100_000;
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel(DEV);
    let s = server(&ns, &[]);
    let _i = installer(&ns, &["--http", "127.0.0.1:9751"]);
    let announcer = ns.run(|| {
        let config = ClientConfig {
            reconnect_min: Duration::from_millis(500),
            ..ClientConfig::default()
        };
        let c = Client::new(config, LogSink);
        c.add_server(SERVER).unwrap();
        c
    });
    let vni = Vni::new(23).unwrap();
    support::announce_numbered_routes(&announcer, vni, N);
    let count = |ns: &Netns| {
        let out = ns.ip_output(&["route", "show", "table", "100"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with(char::is_whitespace))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(300), || count(&ns) == N as usize),
        "only {} routes installed",
        count(&ns)
    );
    let stale = || {
        let m = ns.run(|| http_support::scrape("http://127.0.0.1:9751/metrics"));
        http_support::metric(&m, "metalbond_stale_routes", &[]).unwrap_or(-1.0)
    };
    assert_eq!(stale(), 0.0);

    // The whole table, as often as a dump of 100,000 routes allows.
    let stop = Arc::new(AtomicBool::new(false));
    let min_count = Arc::new(AtomicUsize::new(usize::MAX));
    let full_samples = Arc::new(AtomicUsize::new(0));
    let counter = {
        let (stop, min_count, full) = (stop.clone(), min_count.clone(), full_samples.clone());
        let name = ns.name.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = std::process::Command::new("ip")
                    .args(["-n", &name, "route", "show", "table", "100"])
                    .output()
                    .expect("ip runs");
                let n = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with(char::is_whitespace))
                    .count();
                min_count.fetch_min(n, Ordering::Relaxed);
                full.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let restarted = Instant::now();
    s.terminate();
    let _s = server(&ns, &[]);
    let mut saw_stale = false;
    let refreshed = loop {
        let n = stale();
        saw_stale |= n > 0.0;
        if saw_stale && n == 0.0 {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(55),
            "stale routes left: {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_secs(6).saturating_sub(restarted.elapsed()));
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    println!(
        "reflector restart with {N} routes: {} full dumps of the table over {:.1} s, smallest count {}; \
         every stale route refreshed {:.2} s after the restart",
        full_samples.load(Ordering::Relaxed),
        restarted.elapsed().as_secs_f64(),
        min_count.load(Ordering::Relaxed),
        refreshed.as_secs_f64()
    );
    assert_eq!(min_count.load(Ordering::Relaxed), N as usize);
    assert!(saw_stale, "the restart was never seen as a lost session");
}
