//! The `metalbond` command's own modules: what a process needs around the
//! libraries under `crates/` (which own the protocol, the reflector, the
//! client, kernel routes and the status port).
//!
//! - `cmd`: `metalbond server`, `client` and `policy check`: flags,
//!   signals, `--http` wiring, systemd readiness, exit status.
//! - `ops`: operator commands that look at a running fleet (`metalbond
//!   show`, `diff`, `watch`).
//! - `logging`: tracing set-up.
//! - `readiness`: sd_notify `READY=1` for systemd `Type=notify` units, and
//!   the client's rule for when it is ready.
//! - `cli_docs`: man pages and shell completions from the clap definition.
//! - `version`: the build's version and git commit (`build.rs`).
//!
//! Not for embedders: they depend on `metalbond-client` (or the other
//! member crates) directly. See ARCHITECTURE.md for the crate graph.

#![warn(missing_docs)]

pub mod cli_docs;
pub mod cmd;
pub mod logging;
pub mod ops;
pub mod readiness;
pub mod version;
