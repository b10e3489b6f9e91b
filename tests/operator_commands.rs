//! The operator commands as processes against `metalbond server` (and
//! `client`) processes on loopback.
//!
//! `watch`: prints the VNI's table, then each ADD and REMOVE, one line each
//! (JSON objects with `--json`); it reconnects after the reflector restarts
//! and then prints only what changed; bad flags exit 2 with one line;
//! `--duration` ends it with status 0.
//!
//! `diff` and `/api/v1/summary`: two reflectors fed the same routes in
//! different orders have the same digests (and a subscribed client's
//! received table the same again); one injected difference is found and
//! listed; an unreachable side is exit status 3.

use metalbond_test_support::http as http_support;
use metalbond_test_support::server as server_support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metalbond_wire::Route;
use server_support::process::{
    free_port, server, stderr_of, wait_exit, wait_listening, ChildGuard, CollectedLines,
};
use server_support::{add, remove, route, TestPeer, WAIT};

const BIN: &str = env!("CARGO_BIN_EXE_metalbond");

/// A running `metalbond watch`: its stdout lines as they come, its stderr
/// collected.
struct Watch {
    child: ChildGuard,
    lines: Receiver<String>,
    stderr: CollectedLines,
}

impl Watch {
    fn start(args: &[&str]) -> Watch {
        let mut child = ChildGuard(
            Command::new(BIN)
                .arg("watch")
                .args(args)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn metalbond watch"),
        );
        let (tx, lines) = mpsc::channel();
        let stdout = child.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = CollectedLines::from(child.0.stderr.take().unwrap());
        Watch {
            child,
            lines,
            stderr,
        }
    }

    /// The next `n` lines, parsed as JSON.
    fn next_json(&self, n: usize) -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                let line = self.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
                    panic!(
                        "line {} of {n} did not come; stderr:\n{}",
                        i + 1,
                        self.stderr()
                    )
                });
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// Asserts that no line comes within `quiet`.
    fn expect_silence(&self, quiet: Duration) {
        if let Ok(line) = self.lines.recv_timeout(quiet) {
            panic!("unexpected line: {line}");
        }
    }

    fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Waits until `times` stderr lines hold `text`.
    fn wait_stderr(&self, text: &str, times: usize) {
        assert!(
            self.stderr.wait_for(text, times, WAIT),
            "stderr never said {text:?} {times} times:\n{}",
            self.stderr()
        );
    }
}

/// `(action, prefix, next hop address)` of JSON lines, as a set.
fn changes(lines: &[serde_json::Value]) -> BTreeSet<(String, String, String)> {
    lines
        .iter()
        .map(|v| {
            assert_eq!(v["vni"], 23, "only the watched VNI: {v}");
            assert_eq!(v["next_hop"]["type"], "standard", "{v}");
            assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
            (
                v["action"].as_str().unwrap().to_string(),
                v["prefix"].as_str().unwrap().to_string(),
                v["next_hop"]["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn change(action: &str, r: Route) -> (String, String, String) {
    (
        action.to_string(),
        r.destination.to_string(),
        r.next_hop.target.to_string(),
    )
}

/// A server process listening on `addr`.
fn server_on(addr: SocketAddr) -> ChildGuard {
    let mut srv = server(&["--listen", &addr.to_string()]);
    wait_listening(&mut srv, &[addr]).expect("server listening");
    srv
}

/// An announcer of `routes`, its session kept alive.
fn announcer(addr: SocketAddr, routes: &[Route]) -> TestPeer {
    let (p, _) = TestPeer::established(addr, 60);
    p.keep_alive(Duration::from_secs(1));
    p.send_all(&routes.iter().map(|r| add(*r)).collect::<Vec<_>>());
    p
}

#[test]
fn watch_prints_the_table_then_each_change_and_only_real_changes_after_a_restart() {
    let addr = free_port("127.0.0.1");
    let srv = server_on(addr);
    let (a, b, other) = (route(23, 1, 1), route(23, 2, 1), route(24, 3, 1));
    let first = announcer(addr, &[a, b, other]);

    let w = Watch::start(&["--server", &addr.to_string(), "--vni", "23", "--json"]);
    assert_eq!(
        changes(&w.next_json(2)),
        BTreeSet::from([change("add", a), change("add", b)]),
        "the table of VNI 23 (and nothing of VNI 24)"
    );
    first.send(&remove(a));
    let c = route(23, 5, 2);
    first.send(&add(c));
    assert_eq!(
        changes(&w.next_json(1)),
        BTreeSet::from([change("remove", a)])
    );
    assert_eq!(changes(&w.next_json(1)), BTreeSet::from([change("add", c)]));
    w.wait_stderr("session established", 1);

    // The reflector restarts; its announcer comes back with b and a new d.
    drop(first);
    drop(srv);
    w.wait_stderr("session closed", 1);
    let srv = server_on(addr);
    let d = route(23, 7, 3);
    let _second = announcer(addr, &[b, d]);
    w.wait_stderr("session established", 2);
    assert_eq!(
        changes(&w.next_json(1)),
        BTreeSet::from([change("add", d)]),
        "after the reconnect only the new route is printed (b is the same, c is stale)"
    );
    w.expect_silence(Duration::from_millis(500));
    drop(srv);
}

#[test]
fn watch_text_lines_and_duration_end_with_status_0() {
    let addr = free_port("127.0.0.1");
    let _srv = server_on(addr);
    let r = route(23, 9, 4);
    let _a = announcer(addr, &[r]);
    let mut w = Watch::start(&[
        "--server",
        &addr.to_string(),
        "--vni",
        "23",
        "--duration",
        "2",
    ]);
    let line = w.lines.recv_timeout(WAIT).expect("the route's line");
    let (time, rest) = line.split_once(' ').unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "{line}");
    assert_eq!(rest, "add    vni 23 10.0.0.9/32 via 2001:db8::4");
    let status = wait_exit(&mut w.child);
    assert!(status.success(), "--duration ends with 0: {status:?}");
}

#[test]
fn watch_bad_flags_exit_2_with_one_line() {
    for (args, want) in [
        (
            &["--server", "nonsense", "--vni", "23"][..],
            &["metalbond watch:", "--server", "'nonsense'"][..],
        ),
        (
            &["--server", "127.0.0.1:4711", "--vni", "x"][..],
            &["metalbond watch:", "--vni", "'x'"][..],
        ),
        (&["--server", "127.0.0.1:4711"][..], &["--vni"][..]),
    ] {
        let out = Command::new(BIN)
            .arg("watch")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run metalbond watch");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{args:?}: no {w:?} in {err}");
        }
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// A server process with `--listen` and `--http` on free loopback ports.
fn server_with_http() -> (ChildGuard, SocketAddr, SocketAddr) {
    let (listen, http) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let mut srv = server(&["--listen", &listen.to_string(), "--http", &http.to_string()]);
    wait_listening(&mut srv, &[listen, http]).expect("server listening");
    (srv, listen, http)
}

/// A `metalbond client` process subscribed to VNI 23 at `listen`, with its
/// status port up (the address returned).
fn subscribed_client(listen: SocketAddr) -> (ChildGuard, SocketAddr) {
    let http = free_port("127.0.0.1");
    let mut client = ChildGuard(
        Command::new(BIN)
            .args([
                "client",
                "--server",
                &listen.to_string(),
                "--subscribe",
                "23",
            ])
            .args(["--http", &http.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn metalbond client"),
    );
    wait_listening(&mut client, &[http]).expect("client status port");
    (client, http)
}

/// `metalbond diff ARGS`: exit code and stdout (bounded by `WAIT`).
fn diff(args: &[&str]) -> (i32, String, String) {
    run("diff", args)
}

/// `metalbond SUBCOMMAND ARGS` to its end: exit code, stdout and stderr
/// (bounded by `WAIT`).
fn run(subcommand: &str, args: &[&str]) -> (i32, String, String) {
    let mut child = ChildGuard(
        Command::new(BIN)
            .arg(subcommand)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn metalbond {subcommand}: {e}")),
    );
    let status = wait_exit(&mut child);
    let mut out = String::new();
    if let Some(mut stdout) = child.0.stdout.take() {
        stdout.read_to_string(&mut out).unwrap();
    }
    (status.code().unwrap_or(-1), out, stderr_of(&mut child))
}

/// `GET /api/v1/summary` of a status port, parsed.
fn summary(http: SocketAddr) -> serde_json::Value {
    let (status, ctype, body) = http_support::get(&format!("http://{http}/api/v1/summary"));
    assert_eq!(
        (status, ctype.as_str()),
        (200, "application/json"),
        "{body}"
    );
    serde_json::from_str(&body).expect("summary is JSON")
}

/// The summary's entry for `vni` once it shows `routes` routes.
fn vni_entry(http: SocketAddr, vni: u32, routes: u64) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = summary(http);
        if let Some(v) = s["vnis"]
            .as_array()
            .and_then(|a| a.iter().find(|v| v["vni"] == vni))
        {
            if v["routes"] == routes {
                return v.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{http}: VNI {vni} never had {routes} routes: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_reflectors_fed_in_different_orders_agree_and_diff_finds_one_difference() {
    let (_a, a_listen, a_http) = server_with_http();
    let (_b, b_listen, b_http) = server_with_http();
    let routes: Vec<Route> = (0..500).map(|i| route(23, i, (i % 7) as u16 + 1)).collect();
    let mut reversed = routes.clone();
    reversed.reverse();
    let _on_a = announcer(a_listen, &routes);
    // B gets them from two announcers, in the other order, with overlap.
    let _on_b1 = announcer(b_listen, &reversed[..300]);
    let _on_b2 = announcer(b_listen, &reversed[200..]);
    let (va, vb) = (vni_entry(a_http, 23, 500), vni_entry(b_http, 23, 500));
    assert_eq!(
        va["digest"], vb["digest"],
        "same routes, same digest: {va} {vb}"
    );
    assert_eq!(va["digest"].as_str().map(str::len), Some(16));
    let s = summary(a_http);
    assert_eq!(s["role"], "server");
    assert_eq!(s["routes"], 500);
    assert_eq!(s["sessions"]["ESTABLISHED"], 1, "{s}");

    let (a, b) = (a_http.to_string(), b_http.to_string());
    let (code, out, err) = diff(&["--http", &a, "--http", &b]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 VNIs compared: 1 same, 0 different"),
        "{out}"
    );

    // One more route on B only, and one route of B's VNI 24.
    let extra = route(23, 9_999, 9);
    let _more = announcer(b_listen, &[extra, route(24, 1, 1)]);
    vni_entry(b_http, 23, 501);
    let (code, out, err) = diff(&["--http", &a, "--http", &b, "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("--json is JSON");
    assert_eq!(report["agree"], false);
    let v23 = report["vnis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vni"] == 23)
        .expect("VNI 23 compared")
        .clone();
    assert_eq!(v23["same"], false);
    assert_eq!(v23["only_a"], serde_json::json!([]));
    assert_eq!(v23["only_b"].as_array().map(Vec::len), Some(1), "{v23}");
    assert_eq!(v23["only_b"][0]["prefix"], extra.destination.to_string());
    assert_eq!(v23["only_b"][0]["next_hop"]["address"], "2001:db8::9");
    // Restricted to VNI 24: only B has it.
    let (code, out, _) = diff(&["--http", &a, "--http", &b, "--vni", "24"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("only at B: 10.0.0.1/32 via 2001:db8::1"),
        "{out}"
    );
}

#[test]
fn a_subscribed_clients_received_table_has_the_reflectors_digest() {
    let (_srv, listen, http) = server_with_http();
    let routes: Vec<Route> = (0..200).map(|i| route(23, i, 1)).collect();
    let _announcer = announcer(listen, &routes);
    let (_client, client_http) = subscribed_client(listen);
    let (at_server, at_client) = (vni_entry(http, 23, 200), vni_entry(client_http, 23, 200));
    assert_eq!(at_server["digest"], at_client["digest"]);
    assert_eq!(summary(client_http)["role"], "client");
    let (code, out, err) = diff(&[
        "--http",
        &http.to_string(),
        "--http",
        &client_http.to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn diff_usage_and_unreachable_sides_have_their_exit_statuses() {
    let (_srv, _listen, http) = server_with_http();
    let (code, _, err) = diff(&["--http", &http.to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exactly twice"), "{err}");
    let nobody = free_port("127.0.0.1").to_string();
    let (code, _, err) = diff(&[
        "--http",
        &http.to_string(),
        "--http",
        &nobody,
        "--timeout",
        "2",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&nobody) && err.contains("cannot connect"),
        "{err}"
    );
    // An unknown API path is a JSON error with 404.
    let (status, _, body) = http_support::get(&format!("http://{http}/api/v1/nothing"));
    assert_eq!(status, 404, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(
        e["error"]
            .as_str()
            .is_some_and(|m| m.contains("/api/v1/summary")),
        "{e}"
    );
}

/// A route in VNI 23 to `prefix` via 2001:db8::`hop`.
fn to(prefix: &str, hop: u16) -> Route {
    Route::new(
        metalbond_wire::Vni::new(23).unwrap(),
        prefix.parse().unwrap(),
        metalbond_wire::NextHop::standard(std::net::IpAddr::V6(std::net::Ipv6Addr::new(
            0x2001, 0xdb8, 0, 0, 0, 0, 0, hop,
        ))),
    )
}

/// `metalbond show ARGS` against `http`: exit code and stdout.
fn show(http: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let http = http.to_string();
    let all: Vec<&str> = ["--http", http.as_str()]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    run("show", &all)
}

/// `GET /api/v1/routes?QUERY`: status and parsed body.
fn api_routes(http: SocketAddr, query: &str) -> (u16, serde_json::Value) {
    let (status, _, body) = http_support::get(&format!("http://{http}/api/v1/routes?{query}"));
    let v =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{query}: not JSON ({e}): {body}"));
    (status, v)
}

/// A next hop's address and who announced it.
type HopBy = (String, Vec<String>);

/// `(prefix, [(next hop address, announced_by)])` of a routes answer.
fn entries(v: &serde_json::Value) -> Vec<(String, Vec<HopBy>)> {
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let hops = r["next_hops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    let by = h["announced_by"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| a.as_str().unwrap().to_string())
                        .collect();
                    (h["address"].as_str().unwrap().to_string(), by)
                })
                .collect();
            (r["prefix"].as_str().unwrap().to_string(), hops)
        })
        .collect()
}

/// A next hop's `since`, checked to be RFC 3339 UTC and between `from`
/// (truncated to the second) and now.
fn since_between(hop: &serde_json::Value, from: SystemTime) -> SystemTime {
    let text = hop["since"]
        .as_str()
        .unwrap_or_else(|| panic!("no since: {hop}"));
    assert!(text.ends_with('Z'), "UTC: {text}");
    let at: SystemTime = text
        .parse::<humantime::Timestamp>()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .into();
    let floor = from
        - Duration::from_nanos(u64::from(
            from.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(),
        ));
    assert!(
        at >= floor && at <= SystemTime::now(),
        "{text} is not between {} and now",
        humantime::format_rfc3339(from)
    );
    at
}

#[test]
fn routes_api_and_show_answer_who_announces_what_covers_an_address() {
    let started = SystemTime::now();
    let (_srv, listen, http) = server_with_http();
    let (wide, narrow, both, third) = (
        to("10.0.0.0/8", 1),
        to("10.0.23.0/24", 2),
        to("10.0.23.0/24", 2),
        to("10.0.23.0/24", 3),
    );
    let a = announcer(listen, &[wide, narrow]);
    // b announces only once a's routes are in: the announcers of a route
    // are listed in the order they announced it, and a and b may sit on
    // different shards.
    vni_entry(http, 23, 2);
    let mut b = TestPeer::connect_from(listen, "127.0.0.2".parse().unwrap());
    b.handshake(60);
    b.keep_alive(Duration::from_secs(1));
    b.send_all(&[add(both), add(third)]);
    vni_entry(http, 23, 3);
    let a_addr = a.stream.local_addr().unwrap().to_string();
    let b_addr = b.stream.local_addr().unwrap().to_string();

    let (status, v) = api_routes(http, "vni=23&lookup=10.0.23.5");
    assert_eq!(status, 200, "{v}");
    let mut got = entries(&v);
    got[0].1.sort();
    assert_eq!(
        got,
        vec![(
            "10.0.23.0/24".to_string(),
            vec![
                (
                    "2001:db8::2".to_string(),
                    vec![a_addr.clone(), b_addr.clone()]
                ),
                ("2001:db8::3".to_string(), vec![b_addr.clone()]),
            ]
        )],
        "the most specific prefix, every next hop, who announces each"
    );
    assert_eq!(v["routes"][0]["next_hops"][0]["type"], "standard");
    let first_seen = since_between(&v["routes"][0]["next_hops"][0], started);
    assert!(
        v["routes"][0]["next_hops"][0].get("kernel").is_none(),
        "{v}"
    );
    assert!(v.get("next").is_none(), "{v}");
    let (_, wide_hit) = api_routes(http, "vni=23&lookup=10.9.9.9");
    assert_eq!(entries(&wide_hit)[0].0, "10.0.0.0/8");
    let (_, exact) = api_routes(http, "vni=23&prefix=10.0.23.0%2F24");
    assert_eq!(entries(&exact).len(), 1);
    let (_, by_b) = api_routes(http, "vni=23&peer=127.0.0.2");
    let by_b = entries(&by_b);
    assert_eq!(by_b.len(), 1, "{by_b:?}");
    assert_eq!(by_b[0].1.len(), 2, "both of B's next hops: {by_b:?}");

    // Pages of one destination each.
    let (_, first) = api_routes(http, "vni=23&limit=1");
    assert_eq!(entries(&first)[0].0, "10.0.0.0/8");
    assert_eq!(first["next"], "10.0.0.0/8");
    let (_, second) = api_routes(http, "vni=23&limit=1&after=10.0.0.0%2F8");
    assert_eq!(entries(&second)[0].0, "10.0.23.0/24");
    assert!(second.get("next").is_none(), "{second}");

    for (query, status) in [
        ("lookup=10.0.23.5", 400),
        ("vni=x", 400),
        ("vni=23&prefix=10.0.23.5%2F24", 400),
        ("vni=23&limit=0", 400),
        ("vni=23&limit=10001", 400),
        ("vni=23&after=nonsense", 400),
        ("vni=23&lookup=1.2.3.4&prefix=1.2.3.0%2F24", 400),
        ("vni=99", 404),
    ] {
        let (got, body) = api_routes(http, query);
        assert_eq!(got, status, "{query}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{query}: {body}"
        );
    }

    let (code, out, err) = show(http, &["route", "10.0.23.5", "--vni", "23"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("10.0.23.0/24")
            && out.contains("2001:db8::3")
            && out.contains(&humantime::format_rfc3339_seconds(first_seen).to_string())
            && out.contains("SINCE")
            && !out.contains("KERNEL"),
        "{out}"
    );
    let (code, out, _) = show(http, &["route", "11.0.0.1", "--vni", "23"]);
    assert_eq!(code, 1, "nothing covers it: {out}");
    let (code, out, _) = show(http, &["routes", "--json"]);
    assert_eq!(code, 0);
    let all: serde_json::Value = serde_json::from_str(&out).expect("--json");
    assert_eq!(all["routes"].as_array().map(Vec::len), Some(2), "{all}");
    let (code, out, _) = show(http, &["peers", "--json"]);
    assert_eq!(code, 0);
    let peers: serde_json::Value = serde_json::from_str(&out).expect("--json");
    assert_eq!(peers["peers"].as_array().map(Vec::len), Some(2), "{peers}");
    let ids: Vec<&str> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["peer_id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "every server peer has its session id: {peers}"
    );
    let (code, out, _) = show(http, &["summary"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("server") && out.contains("ESTABLISHED 2"),
        "{out}"
    );
    let (code, _, err) = show(free_port("127.0.0.1"), &["summary", "--timeout", "2"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn a_clients_routes_api_says_which_server_sent_each_route() {
    let started = SystemTime::now();
    let (_srv, listen, _http) = server_with_http();
    let _a = announcer(listen, &[to("10.0.23.0/24", 2)]);
    let server = listen.to_string();
    let (_client, client_http) = subscribed_client(listen);
    vni_entry(client_http, 23, 1);
    let (status, v) = api_routes(client_http, "vni=23&lookup=10.0.23.1");
    assert_eq!(status, 200, "{v}");
    let hop = &v["routes"][0]["next_hops"][0];
    assert_eq!(hop["address"], "2001:db8::2", "{v}");
    assert_eq!(hop["announced_by"], serde_json::json!([server]), "{v}");
    assert_eq!(hop["stale"], false, "{v}");
    since_between(hop, started);
    assert_eq!(hop["kernel"], "not_installed", "no --install-routes: {v}");
    let (status, _, body) = http_support::get(&format!("http://{client_http}/api/v1/peers"));
    assert_eq!(status, 200, "{body}");
    let peers: serde_json::Value = serde_json::from_str(&body).unwrap();
    let p = &peers["peers"][0];
    assert_eq!(
        (&p["address"], &p["routes_received"], &p["routes_stale"]),
        (
            &serde_json::json!(server),
            &serde_json::json!(1),
            &serde_json::json!(0)
        ),
        "{peers}"
    );
    assert!(p.get("peer_id").is_none(), "{peers}");
    let (code, out, err) = show(
        client_http,
        &["routes", "--vni", "23", "--peer", "127.0.0.1"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("10.0.23.0/24") && out.contains("KERNEL") && out.contains("not_installed"),
        "{out}"
    );
}

/// `/readyz` of a client (and systemd's READY=1, the same rule) waits for
/// the first sync: once it answers 200, the whole table is there.
#[test]
fn a_client_is_ready_only_once_its_first_sync_is_in() {
    const N: u32 = 50_000;
    let (_srv, listen, http) = server_with_http();
    let routes: Vec<Route> = (0..N).map(|i| route(23, i, (i % 5) as u16 + 1)).collect();
    let (announcer, _) = TestPeer::established(listen, 60);
    announcer.keep_alive(Duration::from_secs(1));
    for chunk in routes.chunks(10_000) {
        announcer.send_all(&chunk.iter().map(|r| add(*r)).collect::<Vec<_>>());
    }
    vni_entry(http, 23, u64::from(N));
    let (_client, client_http) = subscribed_client(listen);
    let deadline = Instant::now() + WAIT;
    let ready = loop {
        let (status, _, body) = http_support::get(&format!("http://{client_http}/readyz"));
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let s = summary(client_http);
    let held = s["vnis"][0]["routes"].as_u64();
    assert_eq!(held, Some(u64::from(N)), "ready ({ready}) with {s}");
    assert_eq!(
        ready,
        "ready: 1 of 1 servers established; first sync of 1 VNIs received\n"
    );
}
