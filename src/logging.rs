//! Process-wide tracing set-up shared by every binary.
//!
//! Owns: the log format and level policy: info by default (session events),
//! debug with `-v` (per-route detail), `RUST_LOG` overrides both.
//! Must never: be called more than once per process (later calls are no-ops).

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber writing to stderr.
pub fn init(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
