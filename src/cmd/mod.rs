//! The `metalbond` subcommands that run a role: each turns its flags into
//! the library's configuration and owns the process around it (signals,
//! `--http`, readiness, exit status). The libraries under `crates/` take
//! no signal and never exit the process.

pub mod client;
pub mod policy;
pub mod server;
