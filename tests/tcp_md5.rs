//! TCP-MD5 session protection with the real kernel feature, on loopback:
//! a real `metalbond server --policy` whose rule for 127.0.0.2 carries
//! `auth: { md5_key_file }`, and library clients bound to 127.0.0.2 or
//! 127.0.0.3 signing (or not) with key files. A signed session to the
//! keyed rule is established; an unsigned or wrongly signed one never is
//! (the SYN is dropped: a connect timeout, which the client's error names);
//! the unkeyed rule keeps serving unsigned clients (Go clients). A reload
//! that changes the key closes the keyed rule's session, which comes back
//! once the client has the new key, and leaves the other sessions alone.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metalbond_client::{Client, ClientConfig, LogSink, ServerOptions};
use metalbond_test_support::process::{free_port, server, wait_listening, CollectedLines};
use metalbond_test_support::wait_until;
use metalbond_wire::session::SessionState;

const WAIT: Duration = Duration::from_secs(10);

/// Writes `key` to `dir/name` with mode 0600.
fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{key}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A client of `server` from `local`, signing with `key` if given.
fn client(server: &str, local: &str, key: Option<&Path>) -> Client {
    let config = ClientConfig {
        keepalive: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(800),
        ..ClientConfig::default()
    };
    let c = Client::new(config, LogSink);
    c.add_server_with(
        server,
        ServerOptions {
            local_address: Some(local.parse().unwrap()),
            md5_key_file: key.map(Path::to_path_buf),
        },
    )
    .unwrap();
    c
}

fn state(c: &Client) -> SessionState {
    c.servers()[0].state
}

fn established(c: &Client) -> bool {
    state(c) == SessionState::Established
}

#[test]
fn only_sessions_signed_with_their_rules_key_are_established_and_a_reload_rotates_it() {
    let dir = std::env::temp_dir().join(format!("mb-md5-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    key_file(&dir, "server-key", "fleet key one");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - name: signed\n    peers: [127.0.0.2/32]\n    subscribe: [23]\n    auth: { md5_key_file: server-key }\n  - name: open\n    peers: [127.0.0.0/8]\n    subscribe: [23]\n",
    )
    .unwrap();
    let listen = free_port("127.0.0.1");
    let http = free_port("127.0.0.1");
    let mut srv = server(&[
        "--listen",
        &listen.to_string(),
        "--http",
        &http.to_string(),
        "--keepalive",
        "1",
        "--policy",
        policy.to_str().unwrap(),
    ]);
    let log = CollectedLines::from(srv.0.stderr.take().unwrap());
    wait_listening(&mut srv, &[listen]).unwrap_or_else(|e| panic!("{e}"));
    let addr = listen.to_string();

    let client_key = key_file(&dir, "client-key", "fleet key one");
    let wrong_key = key_file(&dir, "wrong-key", "not the fleet key");
    let signed = client(&addr, "127.0.0.2", Some(&client_key));
    let unsigned = client(&addr, "127.0.0.2", None);
    let wrong = client(&addr, "127.0.0.2", Some(&wrong_key));
    let other = client(&addr, "127.0.0.3", None);
    assert!(
        wait_until(WAIT, || established(&signed) && established(&other)),
        "signed: {:?}, unsigned from an open rule: {:?}\n{}",
        state(&signed),
        state(&other),
        log.text()
    );
    // Long enough for several connect attempts (0.8 s timeout each).
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(state(&unsigned), SessionState::Established, "unsigned");
    assert_ne!(state(&wrong), SessionState::Established, "wrong key");
    assert!(signed.servers()[0].md5 && !unsigned.servers()[0].md5);
    let (_, _, metrics) = metalbond_test_support::http::get(&format!("http://{http}/metrics"));
    let dropped = |reason: &str| -> u64 {
        let series = format!("metalbond_tcp_md5_dropped_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{metrics}"))
    };
    assert!(
        dropped("missing") > 0 && dropped("wrong") > 0,
        "the kernel's drops of unsigned and wrongly signed SYNs are on /metrics"
    );
    drop((unsigned, wrong));

    // Rotation: the server's key changes by reload; the signed session is
    // closed, and comes back once the client has the new key; the open
    // rule's session is left alone.
    let other_since = other.servers()[0].connected_since;
    key_file(&dir, "server-key", "fleet key two");
    srv.signal(libc::SIGHUP);
    assert!(
        wait_until(WAIT, || !established(&signed)),
        "the session signed with the old key is closed\n{}",
        log.text()
    );
    assert!(
        log.wait_for("TCP-MD5 key of the peer's policy rule changed", 1, WAIT),
        "{}",
        log.text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!established(&signed), "the old key no longer connects");
    key_file(&dir, "client-key", "fleet key two");
    assert!(
        wait_until(WAIT, || established(&signed)),
        "the new key connects: {:?}\n{}",
        state(&signed),
        log.text()
    );
    assert!(established(&other));
    assert_eq!(
        other.servers()[0].connected_since,
        other_since,
        "the unkeyed rule's session was not touched"
    );
    assert!(
        !log.text().contains("fleet key"),
        "no key in the server's log"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_world_readable_key_stops_the_server_and_the_client_with_one_line() {
    let dir = std::env::temp_dir().join(format!("mb-md5-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = key_file(&dir, "key", "a key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nrules:\n  - name: signed\n    peers: [127.0.0.2/32]\n    auth: { md5_key_file: key }\n",
    )
    .unwrap();
    let out = std::process::Command::new(metalbond_test_support::metalbond_bin())
        .args(["server", "--listen", &free_port("127.0.0.1").to_string()])
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("readable by every user") && err.contains("rule 1") && !err.contains("a key"),
        "{err}"
    );
    let out = std::process::Command::new(metalbond_test_support::metalbond_bin())
        .args(["client", "--server", "127.0.0.1:4711", "--md5-key-file"])
        .arg(&key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--md5-key-file") && err.contains("readable by every user"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.contains("--md5-key-file")).count(),
        1,
        "one line names the cause: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Present routes of a subscriber, counted.
#[derive(Clone, Default)]
struct Counted(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl metalbond_client::RouteSink for Counted {
    fn add_route(
        &mut self,
        _: metalbond_wire::types::Vni,
        _: metalbond_wire::types::IpNet,
        _: metalbond_wire::types::NextHop,
    ) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn remove_route(
        &mut self,
        _: metalbond_wire::types::Vni,
        _: metalbond_wire::types::IpNet,
        _: metalbond_wire::types::NextHop,
    ) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Measurement (figures in BENCHMARKS.md, "Session protection"): what
/// TCP-MD5 costs. A burst of 100,000 routes from one library client to
/// two subscribers through a real server, then their withdrawal, with
/// every session unsigned or signed (a keyed rule for 127.0.0.2),
/// alternated 3 times; time to the subscribers' exact state and the
/// server's CPU. Run: `cargo test --release --test tcp_md5 -- --ignored
/// --nocapture`.
#[test]
#[ignore = "measurement, run by hand; figures in BENCHMARKS.md"]
fn what_signing_costs_a_burst_and_its_withdrawal() {
    const N: u32 = 100_000;
    let dir = std::env::temp_dir().join(format!("mb-md5-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = key_file(&dir, "key", "measurement key");
    for round in 0..6 {
        let signed = round % 2 == 1;
        let policy = dir.join("policy.yaml");
        let auth = if signed {
            "    auth: { md5_key_file: key }\n"
        } else {
            ""
        };
        std::fs::write(
            &policy,
            format!("version: 1\nrules:\n  - name: all\n    peers: [127.0.0.2/32]\n    subscribe: [23]\n    announce:\n      - vnis: [23]\n        prefixes: [10.0.0.0/8]\n        next_hops: [2001:db8::/32]\n{auth}  - name: probe\n    peers: [127.0.0.1/32]\n"),
        )
        .unwrap();
        let listen = free_port("127.0.0.1");
        let mut srv = server(&[
            "--listen",
            &listen.to_string(),
            "--policy",
            policy.to_str().unwrap(),
        ]);
        let _log = CollectedLines::from(srv.0.stderr.take().unwrap());
        // From 127.0.0.1, which no key covers.
        wait_listening(&mut srv, &[listen]).unwrap_or_else(|e| panic!("{e}"));
        let options = || ServerOptions {
            local_address: Some("127.0.0.2".parse().unwrap()),
            md5_key_file: signed.then(|| key.clone()),
        };
        let subscribers: Vec<(Client, Counted)> = (0..2)
            .map(|_| {
                let counted = Counted::default();
                let c = Client::new(ClientConfig::default(), counted.clone());
                c.subscribe(metalbond_wire::Vni::new(23).unwrap()).unwrap();
                c.add_server_with(&listen.to_string(), options()).unwrap();
                (c, counted)
            })
            .collect();
        let announcer = Client::new(ClientConfig::default(), LogSink);
        announcer
            .add_server_with(&listen.to_string(), options())
            .unwrap();
        assert!(wait_until(WAIT, || established(&announcer)
            && subscribers.iter().all(|(c, _)| established(c))));
        let count = |n: i64| {
            subscribers
                .iter()
                .all(|(_, c)| c.0.load(std::sync::atomic::Ordering::Relaxed) == n)
        };
        let cpu0 = cpu_seconds(srv.pid());
        let t0 = std::time::Instant::now();
        metalbond_test_support::netns::announce_numbered_routes(
            &announcer,
            metalbond_wire::Vni::new(23).unwrap(),
            N,
        );
        assert!(wait_until(Duration::from_secs(60), || count(i64::from(N))));
        let burst = t0.elapsed();
        let cpu1 = cpu_seconds(srv.pid());
        // Churn: one route changed 2,000 times, 1 ms apart: each change its
        // own small segment in and out, where a signature costs the most.
        const CHURN: u32 = 2000;
        let churned = metalbond_wire::Route::new(
            metalbond_wire::Vni::new(23).unwrap(),
            "10.255.0.1/32".parse().unwrap(),
            metalbond_wire::NextHop::standard("2001:db8::1".parse().unwrap()),
        );
        for i in 0..CHURN {
            if i % 2 == 0 {
                announcer.announce(churned).unwrap();
            } else {
                announcer.withdraw(churned).unwrap();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(wait_until(Duration::from_secs(60), || count(i64::from(N))));
        let cpu_churn = cpu_seconds(srv.pid()) - cpu1;
        let t1 = std::time::Instant::now();
        let cpu1 = cpu_seconds(srv.pid());
        announcer.shutdown();
        assert!(wait_until(Duration::from_secs(60), || count(0)));
        let withdrawal = t1.elapsed();
        let cpu2 = cpu_seconds(srv.pid());
        println!(
            "{}: burst of {N} to 2 subscribers {:.3} s (server CPU {:.2} s); churn {CHURN} changes, server CPU {:.0} us a change; withdrawal {:.3} s (server CPU {:.2} s)",
            if signed { "signed  " } else { "unsigned" },
            burst.as_secs_f64(),
            cpu1 - cpu0 - cpu_churn,
            cpu_churn / f64::from(CHURN) * 1e6,
            withdrawal.as_secs_f64(),
            cpu2 - cpu1
        );
        for (c, _) in subscribers {
            c.shutdown();
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
