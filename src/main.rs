//! The `metalbond` command: `server` (route reflector), `client` and
//! `policy check` (peer-policy files).
//!
//! Owns: argument dispatch, logging set-up, the panic policy, SIGHUP
//! (ignored, except by a server with `--policy`, which reloads it) and the
//! process exit status. Each subcommand lives in `metalbond::cmd` or
//! `metalbond::ops`.
//! Must never: hold protocol or table logic.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use metalbond::logging::{self, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the heap out of transparent huge pages (THP).
///
/// mimalloc used to ask for huge pages on its arena (`MADV_HUGEPAGE`); with
/// the kernel's THP setting at `madvise` (the Debian and Ubuntu default)
/// every 2 MiB of arena the process touched became a whole resident huge
/// page: an idle server held 14 MiB of them (21 MiB resident instead of
/// 7.5), and the 100,000-route burst peaked at 48–53 MiB instead of 22–26,
/// with bursts and syncs as fast either way (BENCHMARKS "Transparent huge
/// pages"). mimalloc is built with `no_thp`, so it no longer asks; this
/// covers hosts whose THP setting is `always` (`prctl PR_SET_THP_DISABLE`:
/// no huge pages for this process's later faults). Setting
/// `MIMALLOC_ALLOW_THP` (mimalloc's own switch) skips it, for whoever
/// measures otherwise on such a host.
fn keep_heap_in_small_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes
    // no memory of this process; a failure (an old kernel) leaves THP as it
    // was, which costs memory, not correctness.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// mimalloc's `mi_option_purge_delay` (`include/mimalloc.h`, the same
/// place in its v2 and v3 option lists; `tests::purge_delay_is_that_option`
/// checks it still is).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns heap memory freed in bulk to the kernel at once instead of a
/// second later (mimalloc v3's default delay, 1,000 ms).
///
/// Buffers encoded on a VNI's owner shard are freed on the subscribers'
/// shards; while the delay runs, the owner's heap takes fresh pages for
/// the next batch, so a 1,000,000-route burst to 4 subscribers peaked at
/// 57–83 MiB (median 74) and with no delay at 55–68 MiB (median 59), as
/// fast (BENCHMARKS "Issue #28, third sitting"). `MIMALLOC_PURGE_DELAY` in the environment
/// (mimalloc's own switch) is left to win.
fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer option of the allocator; mimalloc reads it
    // each time it schedules a purge, so setting it while threads run is
    // allowed (none run yet).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// MetalBond: distributes overlay routes between hypervisors.
#[derive(Parser, Debug)]
#[command(name = "metalbond", version = logging::LONG_VERSION, about)]
struct Cli {
    /// Log line format: text (coloured on a terminal), logfmt
    /// (`time=... level=... msg=...`, as the Go binary writes off a
    /// terminal) or json. Default: text on a terminal, logfmt otherwise.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the route reflector.
    Server(metalbond::cmd::server::ServerArgs),
    /// Connect to reflectors, announce routes and install received ones.
    Client(metalbond::cmd::client::ClientArgs),
    /// Check a peer policy file (`server --policy`).
    Policy(metalbond::cmd::policy::PolicyArgs),
    /// Print the routes of VNIs as a reflector sends them (read-only
    /// session: subscribes, announces nothing).
    Watch(metalbond::ops::watch::WatchArgs),
    /// Compare the routes of two daemons (`--http A --http B`) VNI by VNI:
    /// exit 0 when they agree, 1 when they differ, 3 when one is unreachable.
    Diff(metalbond::ops::diff::DiffArgs),
    /// Show a running daemon's summary, peers or routes (from its --http).
    Show(metalbond::ops::show::ShowArgs),
}

fn main() -> ExitCode {
    keep_heap_in_small_pages();
    return_freed_memory_at_once();
    // `metalbond generate-docs DIR` (packaging): outside the clap definition
    // so that it appears in none of the pages and completions it writes.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "generate-docs") {
        return match argv.get(2..) {
            Some([dir]) => generate_docs(std::path::Path::new(dir)),
            _ => {
                eprintln!("usage: metalbond generate-docs DIR");
                ExitCode::from(2)
            }
        };
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            // A malformed `client` flag value: one line naming the flag, the
            // value and the expected form (the value parsers' errors).
            if let Some(line) = metalbond::cmd::client::one_line_error(&e) {
                let command = if argv_command(&argv) == Some("watch") {
                    "watch"
                } else {
                    "client"
                };
                eprintln!("metalbond {command}: {line}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    let (verbose, role) = match cli.command {
        Command::Server(ref a) => (a.verbose, "server"),
        Command::Client(ref a) => (a.verbose, "client"),
        Command::Watch(ref a) => (a.verbose, "watch"),
        Command::Diff(args) => return metalbond::ops::diff::run(args),
        Command::Show(args) => return metalbond::ops::show::run(args),
        Command::Policy(args) => return metalbond::cmd::policy::run(args),
    };
    logging::init(
        verbose,
        cli.log_format.unwrap_or_else(LogFormat::for_stderr),
    );
    logging::log_start(role);
    // A panic on any thread ends the process (no half-alive reflector or
    // client; systemd restarts it): see `panic_policy`.
    metalbond_utils::panic_policy::exit_on_panic();
    // `/api/v1/summary` names the commit this binary was built from.
    metalbond_http::set_build_commit(metalbond::version::GIT_COMMIT);
    // A server with --policy reloads it on SIGHUP (server::run watches it).
    if !matches!(&cli.command, Command::Server(a) if a.policy.is_some()) {
        ignore_sighup();
    }
    let result = match cli.command {
        Command::Server(args) => metalbond::cmd::server::run(args),
        Command::Client(args) => metalbond::cmd::client::run(args),
        Command::Watch(args) => return metalbond::ops::watch::run(args),
        // Returned above already; kept total without a panic path.
        Command::Policy(args) => return metalbond::cmd::policy::run(args),
        Command::Diff(args) => return metalbond::ops::diff::run(args),
        Command::Show(args) => return metalbond::ops::show::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the cause; the log subscriber also writes to
            // stderr, so logging it too would print it twice.
            eprintln!("metalbond: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The subcommand word of a command line (`metalbond --log-format json
/// watch …` → `watch`), for error messages made before clap says it.
fn argv_command(argv: &[std::ffi::OsString]) -> Option<&'static str> {
    argv.iter().skip(1).find_map(|a| {
        ["server", "client", "policy", "watch", "diff", "show"]
            .into_iter()
            .find(|c| a == c)
    })
}

/// `metalbond generate-docs DIR`: the packaging step's man pages and
/// completions, from this very command definition.
fn generate_docs(dir: &std::path::Path) -> ExitCode {
    match metalbond::cli_docs::generate(Cli::command(), dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "metalbond: cannot write documentation into {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// A daemon must not die on SIGHUP (its default action): a terminal closing
/// or an operator's `systemctl reload` sends it. It is logged and ignored;
/// there is nothing to reload yet.
fn ignore_sighup() {
    match signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]) {
        Ok(mut signals) => {
            let spawned = std::thread::Builder::new()
                .name("mb-sighup".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        tracing::info!("SIGHUP received: ignored (nothing to reload)");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot watch SIGHUP; it will end the process");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot watch SIGHUP; it will end the process"),
    }
}

#[cfg(test)]
mod tests {
    /// Option 15 holds 1,000 before anyone sets it: mimalloc v3's default
    /// for `purge_delay` (`src/options.c`: 1,000 ms), and no neighbour's
    /// (14 and 16 hold 1 and 0). Fails if a mimalloc upgrade moves the
    /// option or its default.
    #[test]
    fn purge_delay_is_that_option() {
        // SAFETY: reads one integer option of the allocator.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            value,
            1000,
            "option {} is not mimalloc's purge_delay (or MIMALLOC_PURGE_DELAY is set)",
            super::MI_OPTION_PURGE_DELAY
        );
    }
}
