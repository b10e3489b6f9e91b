//! What the tests of this workspace share: child processes of the real
//! binaries, network namespaces with a veth for kernel routes, an
//! in-process server and protocol-speaking test peers, scripted servers for
//! the client, models of deployed Go peers, HTTP scraping and a headless
//! browser, and the rule for a missing prerequisite.
//!
//! - `eventually!` / `wait_until`: wait for a condition instead of sleeping
//!   a fixed time; every bound is scaled by `METALBOND_TEST_PATIENCE`
//!   (a factor, default 1: a slow or loaded machine sets 2 or 3).
//! - `prerequisite`: a missing tool or privilege fails under `CI=true` and
//!   is reported as SKIPPED elsewhere, never a silent pass.
//! - `process`: the `metalbond` binary as a child process, killed on drop.
//! - `server`: an in-process server and `TestPeer`, a blocking peer that
//!   speaks the protocol with the wire crate's codec.
//! - `client`: `ScriptedServer`, a passive MetalBond server for the client
//!   library, and sinks that record what they saw.
//! - `netns`: a network namespace with a veth as tunnel device, removed on
//!   drop, and readers of `ip route` output.
//! - `http`: bounded GET, `/metrics` parsing, headless Chromium.
//! - `go_peer`: models of what a deployed Go peer can take.
//! - `loadgen`: running the `loadgen` binary with a second time bound.
//!
//! Must never: be a dependency of anything but tests (`publish = false`).

#![allow(missing_docs)]

pub mod client;
pub mod go_peer;
pub mod http;
pub mod loadgen;
pub mod netns;
pub mod prerequisite;
pub mod process;
pub mod server;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use metalbond_wire::Vni;

/// The factor every wait of the tests is multiplied by:
/// `METALBOND_TEST_PATIENCE` (a positive number), default 1.
pub fn patience() -> f64 {
    std::env::var("METALBOND_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p > 0.0)
        .unwrap_or(1.0)
}

/// `limit` scaled by `patience()`.
pub fn patient(limit: Duration) -> Duration {
    limit.mul_f64(patience())
}

/// Polls `check` every 20 ms until it holds (`true`) or `patient(limit)`
/// has passed (`false`).
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + patient(limit);
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` every 50 ms until it returns `Some`, for at most
/// `patient(limit)`; panics
/// naming `what` when it never does.
pub fn eventually_some<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patient(limit);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:?} waiting for {what}",
            patient(limit)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `eventually!(limit, condition)` or `eventually!(limit, condition,
/// "format", args...)`: waits until the condition holds, for at most
/// `limit` × `METALBOND_TEST_PATIENCE`; panics with the condition's text
/// (or the message) when it never does.
#[macro_export]
macro_rules! eventually {
    ($limit:expr, $cond:expr $(,)?) => {
        assert!(
            $crate::wait_until($limit, || $cond),
            "condition never held within {:?}: {}",
            $crate::patient($limit),
            stringify!($cond)
        )
    };
    ($limit:expr, $cond:expr, $($msg:tt)+) => {
        assert!(
            $crate::wait_until($limit, || $cond),
            "condition never held within {:?}: {}",
            $crate::patient($limit),
            format!($($msg)+)
        )
    };
}

/// VNI `n` (a valid one, for tests).
pub fn vni(n: u32) -> Vni {
    Vni::new(n).expect("a test VNI is below 2^24")
}

/// The `metalbond` binary under test: `METALBOND_BIN`, or the one built
/// into the same target directory as the running test
/// (`target/<profile>/deps/<test>` → `target/<profile>/metalbond`; `cargo
/// test` at the top level builds it for the root package's tests). A
/// library crate has no `CARGO_BIN_EXE_*` to find it by.
pub fn metalbond_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("METALBOND_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("metalbond");
    assert!(
        bin.is_file(),
        "{} is not built: run the tests from the top level (`cargo test --release` \
         builds it), or `cargo build --release -p metalbond` first",
        bin.display()
    );
    bin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_end_when_the_condition_holds_or_the_bound_passes() {
        let started = Instant::now();
        let mut polls = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            polls += 1;
            polls == 3
        }));
        assert!(started.elapsed() < Duration::from_secs(5));
        let started = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false));
        assert!(started.elapsed() >= patient(Duration::from_millis(100)));
        eventually!(Duration::from_secs(5), polls >= 3);
        let got = eventually_some(Duration::from_secs(5), "a value", || Some(7));
        assert_eq!(got, 7);
    }

    #[test]
    #[should_panic(expected = "condition never held")]
    fn eventually_names_what_never_held() {
        eventually!(Duration::from_millis(50), 1 + 1 == 3);
    }
}
