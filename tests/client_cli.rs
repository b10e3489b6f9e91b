//! `metalbond client` as a process: malformed flag values give one line
//! naming the flag, the value and the expected form, with exit status 2;
//! start-up problems of kernel installation are reported before any route.

#[path = "netlink_support/mod.rs"]
mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_metalbond");

/// Runs the binary with a time bound (kills it after 10 s).
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn metalbond");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("metalbond client did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn client(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.arg("client").args(args).env("RUST_LOG", "off");
    run_bounded(c)
}

#[test]
fn malformed_values_are_one_line_with_exit_status_2() {
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (
            &["--server", "[::1]:4711", "--announce", "23#10.0.0.0/24"],
            "--announce",
            "23#10.0.0.0/24",
            "VNI#PREFIX#NEXTHOP[#STD|LB|NAT][#FROM#TO]",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--announce",
                "23#10.0.0.0/24#2001:db8::1,23#x#y",
            ],
            "--announce",
            "23#x#y",
            "VNI#PREFIX#NEXTHOP",
        ),
        (
            &["--server", "[::1]:4711", "--subscribe", "23,abc"],
            "--subscribe",
            "abc",
            "VNI",
        ),
        (
            &["--server", "[::1]:4711", "--subscribe", "16777216"],
            "--subscribe",
            "16777216",
            "VNI",
        ),
        (
            &[
                "--server",
                "[::1]:4711",
                "--install-routes",
                "23-100",
                "--tun",
                "t",
            ],
            "--install-routes",
            "23-100",
            "VNI#TABLE",
        ),
        (&["--server", "::1"], "--server", "::1", "HOST:PORT"),
        (
            &["--server", "[::1]:4711", "--keepalive", "0"],
            "--keepalive",
            "0",
            "SECS",
        ),
        (
            &["--server", "[::1]:4711", "--http", "nowhere"],
            "--http",
            "nowhere",
            "IP:PORT",
        ),
    ];
    for (args, flag, value, form) in cases {
        let out = client(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("'{value}'")), "{args:?}: {stderr}");
        assert!(stderr.contains(form), "{args:?}: {stderr}");
    }
}

#[test]
fn install_routes_without_tun_is_a_usage_error() {
    let out = client(&["--server", "[::1]:4711", "--install-routes", "23#100"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tun"));
}

#[test]
fn missing_tunnel_device_fails_at_start() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    let mut cmd = ns.command(BIN);
    cmd.args([
        "client",
        "--server",
        "[::1]:4711",
        "--install-routes",
        "23#100",
        "--tun",
        "no-such-tun",
    ]);
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tunnel device 'no-such-tun' does not exist"),
        "{stderr}"
    );
}

#[test]
fn missing_cap_net_admin_fails_at_start() {
    let Some(ns) = support::Netns::create() else {
        return;
    };
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: setpriv (util-linux) is not installed; cannot drop CAP_NET_ADMIN");
        return;
    }
    ns.add_tunnel("mbtun0");
    // Drop CAP_NET_ADMIN from every set before exec'ing the client.
    let mut cmd = ns.command("setpriv");
    cmd.args([
        "--inh-caps=-net_admin",
        "--ambient-caps=-net_admin",
        "--bounding-set=-net_admin",
        BIN,
        "client",
        "--server",
        "[::1]:4711",
        "--install-routes",
        "23#100",
        "--tun",
        "mbtun0",
    ]);
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("setpriv:") {
        eprintln!("SKIPPED: setpriv cannot drop capabilities here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}
