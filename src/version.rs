//! The build's identity: crate version and git commit, shown by `--version`,
//! the start line, the status page and `/metrics`.
//!
//! Owns: the three constants (the commit from the binary's `build.rs`; no
//! library crate knows it). Must never: depend on anything.

/// The crate version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from (`git rev-parse --short`, or
/// `METALBOND_GIT_COMMIT` when building outside a git checkout, else
/// `unknown`; see `build.rs`).
pub const GIT_COMMIT: &str = env!("METALBOND_GIT_COMMIT");

/// `0.1.0 (commit 1a2b3c4)`: what `--version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("METALBOND_GIT_COMMIT"),
    ")"
);
