//! Embedding the MetalBond client library in an ordinary (non-async) program.
//!
//! Connects to the servers given as arguments (default `[::1]:4711`),
//! subscribes to VNI 23, announces one route, prints every change of the
//! present route set and the session states, and stops after `SECONDS`
//! (default 30):
//!
//! ```text
//! cargo run --example embed_client -- [::1]:4711 [::1]:4712
//! SECONDS=5 cargo run --example embed_client
//! ```

use std::time::Duration;

use metalbond_client::{Client, ClientConfig, ClientError, RouteSink};
use metalbond_wire::{IpNet, NextHop, Route, Vni};

/// The embedder's side: here it prints; a fleet agent would program its
/// dataplane. Calls arrive one at a time, only on real changes.
struct PrintingSink;

impl RouteSink for PrintingSink {
    fn add_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        println!("+ vni {vni} {destination} via {next_hop}");
    }

    fn remove_route(&mut self, vni: Vni, destination: IpNet, next_hop: NextHop) {
        println!("- vni {vni} {destination} via {next_hop}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut servers: Vec<String> = std::env::args().skip(1).collect();
    if servers.is_empty() {
        servers.push("[::1]:4711".into());
    }
    let seconds: u64 = std::env::var("SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    let client = Client::new(ClientConfig::default(), PrintingSink);
    let vni = Vni::new(23)?;
    client.subscribe(vni)?;
    let own = Route::new(
        vni,
        "10.0.23.0/24".parse()?,
        NextHop::standard("2001:db8::1".parse()?),
    );
    client.announce(own)?;
    // Errors are typed: an embedder can tell "already done" from a real problem.
    match client.announce(own) {
        Err(ClientError::RouteAlreadyAnnounced(_)) => {}
        other => return Err(format!("unexpected: {other:?}").into()),
    }
    for server in &servers {
        client.add_server(server)?;
    }

    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        for s in client.servers() {
            println!(
                "  {} {} ({} routes)",
                s.address,
                s.state.name(),
                s.routes_received
            );
        }
    }
    println!(
        "subscriptions {:?}, announcements {}, present routes {}",
        client.subscriptions(),
        client.announcements().len(),
        client.present_routes().len()
    );
    client.shutdown();
    Ok(())
}
