//! The crate graph is the architecture (ARCHITECTURE.md, "Crates"): these
//! tests read it from `cargo metadata` / `cargo tree` and fail when a layer
//! reaches upward or a library picks up a runtime it must not have.
//!
//! An upward `use` is already a compile error (the crate is not a
//! dependency); what the compiler does not see is a new dependency edge in a
//! `Cargo.toml`. That is what these pin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// `cargo` as the test harness was started with (`CARGO` is set by cargo).
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

/// Workspace members → the workspace crates each one depends on (normal
/// dependencies only), from `cargo metadata`.
fn member_edges() -> BTreeMap<String, BTreeSet<String>> {
    let out = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|d| names.contains(*d))
                .map(String::from)
                .collect();
            (p["name"].as_str().unwrap_or_default().to_string(), deps)
        })
        .collect()
}

/// Every crate `package` pulls in as a normal dependency, transitively.
fn normal_closure(package: &str) -> BTreeSet<String> {
    let out = cargo()
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn crates_depend_only_downward() {
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    // The graph ARCHITECTURE.md draws; a new edge must be drawn there first.
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("metalbond-wire", set(&[])),
        ("metalbond-utils", set(&["metalbond-wire"])),
        (
            "metalbond-telemetry",
            set(&["metalbond-wire", "metalbond-utils"]),
        ),
        (
            "metalbond-policy",
            set(&["metalbond-wire", "metalbond-utils", "metalbond-telemetry"]),
        ),
        (
            "metalbond-server",
            set(&[
                "metalbond-wire",
                "metalbond-utils",
                "metalbond-telemetry",
                "metalbond-policy",
            ]),
        ),
        (
            "metalbond-client",
            set(&["metalbond-wire", "metalbond-utils", "metalbond-telemetry"]),
        ),
        (
            "metalbond-netlink",
            set(&[
                "metalbond-wire",
                "metalbond-utils",
                "metalbond-telemetry",
                "metalbond-client",
            ]),
        ),
        (
            "metalbond-http",
            set(&["metalbond-wire", "metalbond-utils", "metalbond-telemetry"]),
        ),
        // `loadgen chaos` reads kernel tables with the tests' `ip route`
        // parser (both are development tools, neither is published).
        (
            "metalbond-loadgen",
            set(&["metalbond-wire", "metalbond-test-support"]),
        ),
        (
            "metalbond-test-support",
            set(&["metalbond-wire", "metalbond-server", "metalbond-client"]),
        ),
        (
            "metalbond",
            set(&[
                "metalbond-wire",
                "metalbond-utils",
                "metalbond-telemetry",
                "metalbond-policy",
                "metalbond-server",
                "metalbond-client",
                "metalbond-netlink",
                "metalbond-http",
            ]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(member_edges(), expected);
}

#[test]
fn the_client_library_has_no_async_runtime_and_the_wire_no_io() {
    let client = normal_closure("metalbond-client");
    for runtime in ["glommio", "tokio", "hyper", "hyper-util"] {
        assert!(
            !client.contains(runtime),
            "metalbond-client pulls in {runtime}: {client:?}"
        );
    }
    let wire = normal_closure("metalbond-wire");
    for io in ["libc", "socket2", "glommio", "tokio", "crossbeam-channel"] {
        assert!(!wire.contains(io), "metalbond-wire pulls in {io}: {wire:?}");
    }
}

#[test]
fn no_library_build_script_reads_git() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crates = std::fs::read_dir(root.join("crates")).expect("crates/");
    let mut checked = 0;
    for entry in crates {
        let build = entry.expect("a crate directory").path().join("build.rs");
        if let Ok(text) = std::fs::read_to_string(&build) {
            checked += 1;
            for git in ["\"git\"", ".git/", "GIT_COMMIT"] {
                assert!(
                    !text.contains(git),
                    "{} mentions {git}: an embedder's build must not read its repository",
                    build.display()
                );
            }
        }
    }
    assert!(checked >= 1, "crates/wire/build.rs compiles the schema");
}
