//! The client (placeholder until the client lands).

/// `metalbond client` flags.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Verbose (debug) logging.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs the client until shut down.
pub fn run(_args: ClientArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("client mode is not built yet".into())
}
