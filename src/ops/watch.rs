//! `metalbond watch`: a read-only session that prints a VNI's routes as
//! they change, like `ip monitor route` or `gobgp monitor global rib`.
//!
//! Owns: the command line of `watch`, the line formats (text for a
//! terminal, one JSON object per line for scripts) and the loop that prints
//! the present set's changes. It subscribes and announces nothing, so it
//! changes nothing on the reflector but one subscriber more; it works
//! against the Go server too (it is an ordinary client session).
//!
//! What it prints is the *received table* of the client library: first
//! every route the server holds in the VNIs (as `add` lines), then each ADD
//! and REMOVE as it arrives. A duplicate ADD, or a REMOVE of a route never
//! sent, changes nothing and prints nothing. A lost session is reconnected
//! with the client's backoff and logged on stderr; its routes stay (stale,
//! `--stale-hold`) so the resync after a reconnect prints only what really
//! changed meanwhile.
//!
//! Must never: announce, install kernel routes, or write anything but route
//! lines to stdout (session events and errors go to stderr).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::cmd::client::{parse_server, parse_subscribe};
use metalbond_client::{Client, ClientConfig, PresentChange, DEFAULT_STREAM_CAPACITY};
use metalbond_wire::types::{Route, Vni};

/// How long the end of a watch waits for the session to close cleanly.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// `metalbond watch`: prints the routes of VNIs as a reflector sends them.
#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// Reflector to watch: HOST:PORT as for `client --server`. Repeatable
    /// or comma-separated (the lines are then the merged table).
    #[arg(
        long = "server",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        required = true,
        value_parser = parse_server
    )]
    pub servers: Vec<String>,
    /// VNI to watch, 0-16777215. Repeatable or comma-separated.
    #[arg(long = "vni", value_name = "VNI", value_delimiter = ',', required = true, value_parser = parse_subscribe)]
    pub vnis: Vec<Vni>,
    /// One JSON object per line: `time`, `action` (`add` | `remove`),
    /// `vni`, `prefix`, `next_hop` (`address`, `type`, `target_vni`,
    /// `nat_port_from`, `nat_port_to`).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Debug logging on stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

/// Runs the watch until interrupted (or `--duration`); exit status 0, or 2
/// when a server address is not usable, 1 when stdout is gone.
pub fn run(args: WatchArgs) -> ExitCode {
    let (client, changes) = Client::with_stream(ClientConfig::default(), DEFAULT_STREAM_CAPACITY);
    for vni in &args.vnis {
        if let Err(e) = client.subscribe(*vni) {
            eprintln!("metalbond watch: cannot subscribe to VNI {vni}: {e}");
            return ExitCode::from(2);
        }
    }
    for server in &args.servers {
        if let Err(e) = client.add_server(server) {
            eprintln!("metalbond watch: --server {server}: {e}");
            return ExitCode::from(2);
        }
    }
    tracing::info!(
        servers = ?args.servers,
        vnis = ?args.vnis.iter().map(|v| v.get()).collect::<Vec<_>>(),
        "watching (read-only: subscribes, announces nothing)"
    );
    if let Some(secs) = args.duration {
        let stopper = client.downgrade();
        let spawned = std::thread::Builder::new()
            .name("mb-watch-timer".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(secs));
                if let Some(c) = stopper.upgrade() {
                    c.shutdown_timeout(STOP_WAIT);
                }
            });
        if let Err(e) = spawned {
            eprintln!("metalbond watch: cannot start the --duration timer: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut out = std::io::stdout().lock();
    while let Some(change) = changes.recv_blocking() {
        let line = if args.json {
            json_line(SystemTime::now(), change)
        } else {
            text_line(SystemTime::now(), change)
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // A closed pipe (`| head`): nothing left to print to.
            client.shutdown_timeout(STOP_WAIT);
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `add`/`remove` and the route of a change.
fn parts(change: PresentChange) -> (&'static str, Route) {
    match change {
        PresentChange::Add(r) => ("add", r),
        PresentChange::Remove(r) => ("remove", r),
    }
}

/// `2026-12-07T04:55:01.123Z add    vni 23 10.0.0.1/32 via 2001:db8::1`
/// (the next hop as `NextHop` shows it: ` vni T`, ` nat A-B`, ` lb`).
fn text_line(at: SystemTime, change: PresentChange) -> String {
    let (action, r) = parts(change);
    format!(
        "{} {action:<6} vni {} {} via {}",
        humantime::format_rfc3339_millis(at),
        r.vni,
        r.destination,
        r.next_hop
    )
}

/// One JSON object (no newline): `time`, `action`, `vni`, `prefix`,
/// `next_hop` as the routes API writes next hops.
fn json_line(at: SystemTime, change: PresentChange) -> String {
    let (action, r) = parts(change);
    let mut line = super::route_json(&r);
    line["time"] = humantime::format_rfc3339_millis(at).to_string().into();
    line["action"] = action.into();
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::{NextHop, NextHopKind};
    use std::time::UNIX_EPOCH;

    fn route(kind: NextHopKind) -> Route {
        Route {
            vni: Vni::new(23).unwrap(),
            destination: "10.0.23.0/24".parse().unwrap(),
            next_hop: NextHop {
                target: "2001:db8::1".parse().unwrap(),
                target_vni: 0,
                kind,
            },
        }
    }

    #[test]
    fn lines_say_when_what_and_which_route() {
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        assert_eq!(
            text_line(at, PresentChange::Add(route(NextHopKind::Standard))),
            "2027-01-15T08:00:00.123Z add    vni 23 10.0.23.0/24 via 2001:db8::1"
        );
        let json = json_line(
            at,
            PresentChange::Remove(route(NextHopKind::Nat { from: 1, to: 2 })),
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["time"], "2027-01-15T08:00:00.123Z");
        assert_eq!(v["action"], "remove");
        assert_eq!(v["vni"], 23);
        assert_eq!(v["prefix"], "10.0.23.0/24");
        assert_eq!(v["next_hop"]["address"], "2001:db8::1");
        assert_eq!(v["next_hop"]["type"], "nat");
        assert_eq!(v["next_hop"]["nat_port_from"], 1);
        assert_eq!(v["next_hop"]["nat_port_to"], 2);
    }
}
