//! The chaos harness as CI runs it: `loadgen chaos` with a fixed seed, a
//! fleet of real `metalbond` processes in network namespaces (3
//! reflectors, 24 hypervisors installing routes into their own kernels,
//! flapping announcers) under a minute of faults, every kernel checked
//! during and after. And the checker checked: a route deleted by hand
//! behind its back must be reported.
//!
//! Needs root, iproute2 and nftables (fails under `CI=true` without them).
//! Each run is bounded (the harness's own bounds, and a kill guard beyond
//! them that also removes the run's namespaces and processes); the two
//! tests take turns, so the fleets never compete for the two cores.

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metalbond_test_support::prerequisite;

/// One fleet at a time.
static FLEET: Mutex<()> = Mutex::new(());

/// Can this machine build the fleet?
fn prerequisites() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let nft = Command::new("nft").arg("-V").output().is_ok();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && nft && ip {
        return true;
    }
    prerequisite::missing(&format!(
        "the chaos fleet needs root (have: {root}), iproute2 (have: {ip}) and nftables (have: {nft})"
    ));
    false
}

/// Runs `loadgen chaos ARGS --json`; kills it after `limit` and removes
/// whatever it left (namespaces `mbchaos-<pid>-*` and their processes).
fn chaos(args: &[&str], limit: Duration) -> (Output, serde_json::Value) {
    let bin = metalbond_test_support::metalbond_bin();
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg("chaos")
        .args(args)
        .args(["--json", "--metalbond"])
        .arg(&bin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let pid = child.id();
    let started = Instant::now();
    let guard = std::thread::spawn(move || {
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("loadgen output");
    let _ = guard.join();
    remove_leftovers(pid);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

/// Kills the processes of and deletes every `mbchaos-<pid>-*` namespace
/// (nothing is left after a run that ended by itself).
fn remove_leftovers(pid: u32) {
    let list = Command::new("ip").args(["netns", "list"]).output();
    let Ok(list) = list else { return };
    let prefix = format!("mbchaos-{pid}-");
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if !ns.starts_with(&prefix) {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstderr:\n{}\nstdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[test]
fn a_fleet_under_a_minute_of_seeded_faults_keeps_and_converges_every_kernel() {
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    if !prerequisites() {
        return;
    }
    let (out, report) = chaos(
        &["--seed", "20261207", "--duration", "50"],
        Duration::from_secs(300),
    );
    let text = describe(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(report["passed"], true, "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("seed 20261207"),
        "the seed is printed: {text}"
    );
    assert_eq!(report["hypervisors"], 24);
    let faults = report["faults"].as_array().map_or(0, Vec::len);
    assert!(faults >= 12, "a fault every 1–4 s: {faults}\n{text}");
    let kinds = report["faults_by_kind"].as_object().map_or(0, |k| k.len());
    assert!(
        kinds >= 5,
        "several kinds of fault: {}",
        report["faults_by_kind"]
    );
    let checks = report["checks"]["route_checks"].as_u64().unwrap_or(0);
    assert!(checks > 10_000, "route checks made: {checks}\n{text}");
    assert!(
        report["settle_seconds"].as_f64().is_some(),
        "settled exactly: {text}"
    );
}

#[test]
fn a_route_deleted_behind_the_checkers_back_is_reported_with_the_seed() {
    let _one = FLEET.lock().unwrap_or_else(|e| e.into_inner());
    if !prerequisites() {
        return;
    }
    let (out, report) = chaos(
        &[
            "--seed",
            "11",
            "--duration",
            "16",
            "--hypervisors",
            "8",
            "--self-test-delete",
        ],
        Duration::from_secs(240),
    );
    let text = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(report["passed"], false, "{text}");
    assert_eq!(report["seed"], 11);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let deleted = stderr
        .lines()
        .find_map(|l| l.strip_prefix("chaos: self-test: deleting "))
        .and_then(|l| l.strip_suffix(" by hand on h1"))
        .unwrap_or_else(|| panic!("the self-test names its route: {text}"))
        .to_string();
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("chaos: VIOLATION seed 11 at ") && l.contains(" on h1: ")),
        "each violation is printed with the seed: {text}"
    );
    let violations = report["violations"].as_array().cloned().unwrap_or_default();
    assert!(
        violations.iter().any(|v| v["client"] == "h1"
            && v["route"].as_str().is_some_and(|r| r.starts_with(&deleted))
            && v["faults"].is_array()),
        "the deletion of {deleted} on h1 is reported: {violations:#?}"
    );
}
