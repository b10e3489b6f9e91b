//! End to end: the real `metalbond server` process on 127.0.0.1 with a free
//! port, driven by the real `loadgen` process through its small `fleet`,
//! `burst`, `churn`, `reconnect` and `idle` scenarios. Each must exit 0:
//! every simulated peer ends with exactly the routes the reflector rules
//! give it. This is the project's whole-system correctness test.
//!
//! `METALBOND_BIN` may name another server binary to test (another build or
//! implementation speaking the same command line); by default the workspace's
//! `metalbond`, built next to `loadgen` (`cargo test` at the top level builds
//! both).
//!
//! Every run is bounded (loadgen's own time limit plus a kill guard) and the
//! server is killed by a Drop guard whatever happens.

use metalbond_test_support::loadgen as loadgen_support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use loadgen_support::{run_bounded, text};
use metalbond_test_support::process::ChildGuard;

/// A running server process, killed when dropped.
struct Server {
    child: ChildGuard,
    addr: SocketAddr,
}

impl Server {
    fn start() -> Server {
        let bin = metalbond_test_support::metalbond_bin();
        // A free port: bind, read it, release it; retried if the server then
        // cannot bind it.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let child = ChildGuard(
                Command::new(&bin)
                    .args(["server", "--listen", &addr.to_string()])
                    // Not piped: an unread pipe would fill with the server's
                    // session log and stall it.
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let mut server = Server { child, addr };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if TcpStream::connect(addr).is_ok() {
                    return server;
                }
                if let Ok(Some(_)) = server.child.0.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            drop(server);
            eprintln!("server on {addr} did not come up");
        }
        panic!("could not start {}", bin.display());
    }

    fn pid(&self) -> String {
        self.child.pid().to_string()
    }
}

/// Runs loadgen against `server`, with a kill guard beyond its time limit.
fn loadgen(server: &Server, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args).args([
        "--server",
        &server.addr.to_string(),
        "--server-pid",
        &server.pid(),
        "--time-limit",
        "20",
        "--quiet",
    ]);
    run_bounded(cmd)
}

/// Runs a scenario with --json and checks it passed; returns the record.
fn pass(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = loadgen(server, &all);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], true, "{}", text(&out));
    assert_eq!(v["difference_count"], 0, "{}", text(&out));
    assert!(
        v["server_rss_peak_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        text(&out)
    );
    v
}

/// The phase called `name` in a report.
fn phase<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["phases"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no phase {name} in {v}"))
}

const FLEET: &[&str] = &[
    "--peers",
    "200",
    "--vnis",
    "20",
    "--subscriptions",
    "2",
    "--routes",
    "10",
    "--shared",
    "2",
];

#[test]
fn fleet_converges_exactly() {
    let server = Server::start();
    let mut args = vec!["fleet"];
    args.extend_from_slice(FLEET);
    let v = pass(&server, &args);
    assert_eq!(v["sessions_held"], 200);
    assert_eq!(phase(&v, "connect")["converged"], true);
    assert_eq!(phase(&v, "fleet")["converged"], true);
}

#[test]
fn burst_and_late_sync_deliver_everything() {
    let server = Server::start();
    let v = pass(
        &server,
        &["burst", "--routes", "20000", "--subscribers", "5"],
    );
    assert_eq!(phase(&v, "burst")["delivered_updates"], 100_000);
    assert_eq!(phase(&v, "late-sync")["delivered_updates"], 20_001);
}

#[test]
fn churn_ends_in_the_planned_state() {
    let server = Server::start();
    let mut args = vec!["churn", "--rate", "5000", "--duration", "2"];
    args.extend_from_slice(FLEET);
    let v = pass(&server, &args);
    assert!(phase(&v, "churn")["delivered_updates"].as_u64().unwrap() > 0);
}

#[test]
fn reconnect_of_every_peer_resyncs() {
    let server = Server::start();
    let mut args = vec!["reconnect"];
    args.extend_from_slice(FLEET);
    let v = pass(&server, &args);
    assert_eq!(phase(&v, "reconnect")["converged"], true);
    assert_eq!(v["sessions_held"], 200);
}

#[test]
fn idle_sessions_survive_keepalive_rounds() {
    let server = Server::start();
    let v = pass(
        &server,
        &[
            "idle",
            "--peers",
            "300",
            "--duration",
            "3",
            "--keepalive",
            "1",
        ],
    );
    assert_eq!(v["sessions_held"], 300);
}

/// `loadgen floor` (no server): 50 sockets to its own reader process for a
/// second; every frame asked for is written and received, and the CPU
/// figures are there. Speed is not asserted.
#[test]
fn floor_sends_what_it_was_asked() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args([
        "floor",
        "--sockets",
        "50",
        "--rate",
        "2000",
        "--duration",
        "1",
        "--time-limit",
        "20",
        "--json",
    ]);
    let out = run_bounded(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["passed"], true, "{}", text(&out));
    assert_eq!(v["deliveries"], 2000, "{}", text(&out));
    assert_eq!(v["received_deliveries"], 2000, "{}", text(&out));
    assert_eq!(v["writes"], 2000, "{}", text(&out));
    assert!(
        v["writer_cpu"]["total_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        text(&out)
    );
    assert!(
        v["writer_us_per_delivery"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        text(&out)
    );
    assert!(
        v["reader_cpu_lifetime"]["total_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        text(&out)
    );
}
