//! The `metalbond` command: `server` (route reflector) and `client`.
//!
//! Owns: argument dispatch, logging set-up and the process exit status.
//! Must never: hold protocol or table logic; each mode lives in its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// MetalBond: distributes overlay routes between hypervisors.
#[derive(Parser, Debug)]
#[command(name = "metalbond", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the route reflector.
    Server(metalbond::server::ServerArgs),
    /// Connect to reflectors, announce routes and install received ones.
    Client(metalbond::client::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = match &cli.command {
        Command::Server(a) => a.verbose,
        Command::Client(a) => a.verbose,
    };
    metalbond::logging::init(verbose);
    let result = match cli.command {
        Command::Server(args) => metalbond::server::run(args),
        Command::Client(args) => metalbond::client::run(args),
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
