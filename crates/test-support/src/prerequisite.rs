//! What a test does when something it needs is missing here (root and
//! `ip netns`, a tool, a browser): under `CI=true` it fails and names what
//! is missing (`.ci/run` installs every prerequisite, so a missing one is a
//! CI fault to fix, never a pass); elsewhere it prints `SKIPPED: why` on
//! stderr and the caller returns without asserting anything.
//!
//! Must never: let a test that did not run report a silent pass.

/// `why` names the missing prerequisite and what would provide it. Panics
/// under `CI=true` (or `CI=1`); otherwise says SKIPPED, and the caller
/// returns.
pub fn missing(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("cannot run under CI=true: {why}");
    }
    eprintln!("SKIPPED: {why}");
}
