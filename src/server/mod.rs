//! The route reflector (placeholder until the server lands).

/// `metalbond server` flags.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs the server until shut down.
pub fn run(_args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("server mode is not built yet".into())
}
