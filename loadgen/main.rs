//! `loadgen`: the MetalBond load generator and end-to-end verifier.
//!
//! Drives any MetalBond server over real TCP with thousands of simulated
//! peers (full handshake and keepalives, on glommio shards), runs one of the
//! scenarios `fleet`, `burst`, `churn`, `reconnect` or `idle`, and checks at
//! the end that every peer holds exactly the routes the reflector rules of
//! PROTOCOL.md say it must: no more, no fewer, no duplicates. Any difference
//! is listed and makes the exit status 1. It reports time to converge,
//! delivered updates per second, announce-to-receipt latency percentiles,
//! sessions held and the server's peak RSS (`--server-pid`).
//!
//! ```text
//!  main: CLI -> Plan -> shards (glommio threads) <-> Controller -> Report
//! ```
//!
//! Must never: target anything but loopback without `--allow-remote`, run
//! past its time limit, or change the wire format (latency is measured with
//! a send-time table on our side, nothing travels in the messages).

mod chaos;
mod checker;
mod connect;
mod floor;
mod plan;
mod report;
mod scenario;
mod shard;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use connect::SourceAddrs;
use metalbond_wire::Action;

use plan::{peer_id, Plan, RouteId};
use report::{proc_status_bytes, PhaseReport, Report, MAX_LISTED};
use scenario::Controller;
use shard::{Counters, Shared};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Upper bounds on sizes, so a typo cannot ask for terabytes.
const MAX_PEERS: usize = 100_000;
const MAX_ROUTES: usize = 5_000_000;
const MAX_VNIS: usize = 1_000_000;

/// MetalBond load generator: simulated peers against a server, verified.
#[derive(Parser, Debug)]
#[command(name = "loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: ScenarioCmd,
}

#[derive(Subcommand, Debug)]
enum ScenarioCmd {
    /// A fleet of real processes in network namespaces (3 reflectors,
    /// hypervisors installing routes, flapping announcers) under faults
    /// drawn from a seed; checks every kernel during and after (needs root,
    /// iproute2, nftables).
    Chaos(chaos::ChaosArgs),
    /// The bare-send floor, no server: N loopback connections to a reader
    /// process, one small frame per write() at --rate; reports CPU per
    /// delivery of writer and reader.
    Floor(floor::FloorArgs),
    /// The floor's reader process (started by `floor`).
    #[command(hide = true)]
    FloorReader(floor::ReaderArgs),
    /// P peers over V VNIs; each subscribes S VNIs and announces R routes in
    /// each; measures convergence.
    Fleet {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// One peer announces R routes at once to S subscribers of one VNI; then
    /// a late subscriber syncs the whole table.
    Burst {
        #[command(flatten)]
        common: CommonArgs,
        /// Routes announced in one go.
        #[arg(long, default_value_t = 10_000)]
        routes: usize,
        /// Subscribers receiving the burst.
        #[arg(long, default_value_t = 5)]
        subscribers: usize,
    },
    /// A fleet, then withdraw and re-announce routes at --rate for --duration.
    Churn {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Updates per second (withdrawals and re-announcements), all peers.
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        /// Routes withdrawn at any one time; each is re-announced after
        /// this many further withdrawals.
        #[arg(long, default_value_t = 1000)]
        window: usize,
    },
    /// A fleet, then every peer drops its session and reconnects at once.
    Reconnect {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// P idle peers held with keepalives for --duration.
    Idle {
        #[command(flatten)]
        common: CommonArgs,
        /// Simulated peers.
        #[arg(long, default_value_t = 100)]
        peers: usize,
        /// Seconds to hold the sessions.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
    },
}

/// Options every scenario has.
#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// Server address (host:port). Loopback only unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:4711")]
    server: String,
    /// Allow a non-loopback server (e.g. in a network namespace).
    #[arg(long)]
    allow_remote: bool,
    /// Seconds after which the run stops whatever its state.
    #[arg(long, default_value_t = 30.0)]
    time_limit: f64,
    /// Print the report as one JSON record instead of the summary.
    #[arg(long)]
    json: bool,
    /// The server's pid, to report its peak RSS from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Loadgen shards (threads running peers).
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Keepalive interval offered to the server, seconds.
    #[arg(long, default_value_t = 5)]
    keepalive: u64,
    /// Send HELLO as a Go peer does (no `readsStream`), so the server paces
    /// every simulated peer until it proves it streams, as it paces Go
    /// clients. Default: peers say they read as a stream, as our client does.
    #[arg(long)]
    go_hello: bool,
    /// Milliseconds a converged state must hold before it counts.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// Connection attempts in flight per shard.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Every peer connects from the kernel's one source address. Without
    /// it, a server on IPv4 loopback is reached from a 127.x.y.z of each
    /// peer's own, as hypervisors each have theirs (one shared source makes
    /// the kernel's ephemeral-port search the cost of a large connect).
    #[arg(long)]
    single_source: bool,
    /// Receive buffer per peer in KiB (default: 64 up to 64 peers, 16 up to
    /// 2,000, else 4).
    #[arg(long)]
    read_buf_kib: Option<usize>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Verbose (debug) logging.
    #[arg(short, long)]
    verbose: bool,
}

/// The fleet layout, shared by fleet, churn and reconnect.
#[derive(Args, Debug, Clone, serde::Serialize)]
struct FleetArgs {
    /// Simulated peers.
    #[arg(long, default_value_t = 100)]
    peers: usize,
    /// VNIs.
    #[arg(long, default_value_t = 10)]
    vnis: usize,
    /// VNIs each peer subscribes to.
    #[arg(long, default_value_t = 1)]
    subscriptions: usize,
    /// Routes each peer announces in each VNI it subscribes to.
    #[arg(long, default_value_t = 10)]
    routes: usize,
    /// Of those, how many are also announced by the next subscriber of the
    /// same VNI (routes with two announcers).
    #[arg(long, default_value_t = 1)]
    shared: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.scenario {
        ScenarioCmd::Chaos(args) => {
            init_logging(false);
            return chaos::main(args.clone());
        }
        ScenarioCmd::Floor(args) => return floor::main(args.clone()),
        ScenarioCmd::FloorReader(args) => return floor::reader_main(args.clone()),
        ScenarioCmd::Fleet { common, .. }
        | ScenarioCmd::Burst { common, .. }
        | ScenarioCmd::Churn { common, .. }
        | ScenarioCmd::Reconnect { common, .. }
        | ScenarioCmd::Idle { common, .. } => common.clone(),
    };
    init_logging(common.verbose);
    match run(cli.scenario, &common) {
        Ok(report) => {
            if common.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("loadgen: cannot encode the report: {e}"),
                }
            } else {
                print!("{}", report.human());
            }
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

/// Resolves `--server` and refuses non-loopback targets unless allowed.
fn server_addr(common: &CommonArgs) -> Result<SocketAddr, String> {
    let addr = common
        .server
        .to_socket_addrs()
        .map_err(|e| format!("--server {}: {e}", common.server))?
        .next()
        .ok_or_else(|| format!("--server {}: no address", common.server))?;
    let loopback = match addr.ip() {
        std::net::IpAddr::V4(a) => a.is_loopback(),
        std::net::IpAddr::V6(a) => {
            a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    if !loopback && !common.allow_remote {
        return Err(format!(
            "--server {addr} is not a loopback address; pass --allow-remote to target it"
        ));
    }
    Ok(addr)
}

/// One plain connection before anything else, so a wrong address fails at
/// once with a clear error instead of after the time limit of retries.
fn preflight(server: SocketAddr) -> Result<(), String> {
    std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))
        .map(drop)
        .map_err(|e| format!("cannot connect to the server at {server}: {e}"))
}

/// Raises the open-file limit to the hard limit: every peer is a socket.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn check_fleet(f: &FleetArgs) -> Result<(), String> {
    if f.peers == 0 || f.peers > MAX_PEERS {
        return Err(format!("--peers must be 1..={MAX_PEERS}"));
    }
    if f.vnis == 0 || f.vnis > MAX_VNIS {
        return Err(format!("--vnis must be 1..={MAX_VNIS}"));
    }
    if f.subscriptions == 0 || f.subscriptions > f.vnis {
        return Err("--subscriptions must be 1..=--vnis".into());
    }
    let routes = f
        .peers
        .saturating_mul(f.subscriptions)
        .saturating_mul(f.routes);
    if routes > MAX_ROUTES {
        return Err(format!("{routes} routes in all is more than {MAX_ROUTES}"));
    }
    if f.shared > f.routes {
        return Err("--shared must not exceed --routes".into());
    }
    Ok(())
}

/// Runs one scenario against the server and reports what every simulated
/// peer ended with.
fn run(cmd: ScenarioCmd, common: &CommonArgs) -> Result<Report, String> {
    let server = server_addr(common)?;
    check_common(common)?;
    let (name, plan, parameters) = plan_for(&cmd)?;
    raise_nofile_limit();
    preflight(server)?;

    let started = Instant::now();
    let routes = plan.route_count();
    let peers = plan.peer_count();
    let shared = Arc::new(Shared {
        sent_at: (0..routes).map(|_| AtomicU64::new(0)).collect(),
        read_buf: read_buffer_kib(common, peers) * 1024,
        plan,
        server,
        keepalive: Duration::from_secs(common.keepalive),
        declare_stream: !common.go_hello,
        connect_concurrency: common.connect_concurrency,
        sources: SourceAddrs::for_server(server, common.single_source).usable(),
        deadline: started + Duration::from_secs_f64(common.time_limit),
        epoch: started,
        counters: Counters::default(),
    });

    let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for i in 0..common.shards {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        handles.push(shard::spawn(i, shared.clone(), rx, reply_tx.clone())?);
    }
    drop(reply_tx);
    let mut ctl = Controller::new(
        shared.clone(),
        senders,
        reply_rx,
        Duration::from_millis(common.settle_ms),
        common.server_pid,
        !common.quiet,
    );

    let outcome = run_phases(&mut ctl, &cmd);
    let verified = ctl.verify();
    // The run's peak, before the peers close: their closing at once is a
    // burst of its own (a 19,000-peer fleet's withdrawals added up to
    // 10 MiB), reported apart.
    let server_hwm = ctl.server_hwm();
    ctl.shutdown();
    for h in handles {
        let _ = h.join();
    }
    let server_hwm_after_close = ctl.server_hwm_after_close();
    let phases = outcome?;
    let (diffs, established) = verified?;

    // Lost sessions first: they explain most of what follows them.
    let (lost, rest): (Vec<_>, Vec<_>) = diffs
        .iter()
        .partition(|d| matches!(d, checker::Difference::SessionLost { .. }));
    let mut differences: Vec<String> = ctl.findings.clone();
    differences.extend(lost.iter().chain(rest.iter()).map(ToString::to_string));
    let difference_count = differences.len();
    differences.truncate(MAX_LISTED);
    let passed = difference_count == 0 && phases.iter().all(|p| p.converged);
    Ok(Report {
        scenario: name.to_string(),
        server: server.to_string(),
        parameters,
        peers,
        shards: common.shards,
        routes,
        phases,
        sessions_held: established,
        connect_retries: shared.counters.connect_retries.load(Ordering::Relaxed),
        server_rss_peak_bytes: ctl.rss_peak,
        server_rss_hwm_bytes: server_hwm,
        server_rss_hwm_after_close_bytes: server_hwm_after_close,
        server_rss_start_bytes: ctl.rss_start,
        loadgen_rss_hwm_bytes: proc_status_bytes("self", "VmHWM"),
        total_seconds: started.elapsed().as_secs_f64(),
        time_limit_hit: ctl.time_limit_hit,
        difference_count,
        differences,
        passed,
    })
}

/// The flags every scenario shares, in range.
fn check_common(common: &CommonArgs) -> Result<(), String> {
    if common.shards == 0 || common.shards > 64 {
        return Err("--shards must be 1..=64".into());
    }
    if !(common.time_limit > 0.0 && common.time_limit <= 3600.0) {
        return Err("--time-limit must be in (0, 3600] seconds".into());
    }
    if common.keepalive == 0 || common.keepalive > 3600 {
        return Err("--keepalive must be 1..=3600 seconds".into());
    }
    Ok(())
}

/// Each simulated peer's read buffer: `--read-buf-kib`, or less the more
/// peers there are (memory of loadgen, not of the server, is what grows).
fn read_buffer_kib(common: &CommonArgs, peers: usize) -> usize {
    common
        .read_buf_kib
        .unwrap_or(match peers {
            0..=64 => 64,
            65..=2000 => 16,
            _ => 4,
        })
        .clamp(1, 4096)
}

/// The scenario's name, its plan (peers, routes, who subscribes to what)
/// and its parameters for the report; or which flag is out of range.
fn plan_for(cmd: &ScenarioCmd) -> Result<(&'static str, Plan, serde_json::Value), String> {
    let (name, plan, parameters) = match cmd {
        ScenarioCmd::Fleet { fleet, .. } | ScenarioCmd::Reconnect { fleet, .. } => {
            check_fleet(fleet)?;
            let name = if matches!(cmd, ScenarioCmd::Fleet { .. }) {
                "fleet"
            } else {
                "reconnect"
            };
            (name, fleet_plan(fleet), serde_json::to_value(fleet))
        }
        ScenarioCmd::Churn {
            fleet,
            rate,
            duration,
            window,
            ..
        } => {
            check_fleet(fleet)?;
            if !(*rate >= 0.0 && *rate <= 1e9 && *duration >= 0.0 && *duration <= 3600.0) {
                return Err("--rate must be 0..=1e9 and --duration 0..=3600".into());
            }
            let mut p = serde_json::to_value(fleet).unwrap_or_default();
            p["rate"] = serde_json::json!(rate);
            p["duration"] = serde_json::json!(duration);
            p["window"] = serde_json::json!(window);
            ("churn", fleet_plan(fleet), Ok(p))
        }
        ScenarioCmd::Burst {
            routes,
            subscribers,
            ..
        } => {
            if *routes == 0 || *routes > MAX_ROUTES || *subscribers == 0 || *subscribers > MAX_PEERS
            {
                return Err(format!(
                    "--routes must be 1..={MAX_ROUTES} and --subscribers 1..={MAX_PEERS}"
                ));
            }
            (
                "burst",
                Plan::burst(*subscribers, *routes),
                Ok(serde_json::json!({"routes": routes, "subscribers": subscribers})),
            )
        }
        ScenarioCmd::Idle {
            peers, duration, ..
        } => {
            if *peers == 0 || *peers > MAX_PEERS || !(*duration >= 0.0 && *duration <= 3600.0) {
                return Err(format!(
                    "--peers must be 1..={MAX_PEERS}, --duration 0..=3600"
                ));
            }
            (
                "idle",
                Plan::new(*peers),
                Ok(serde_json::json!({"peers": peers, "duration": duration})),
            )
        }
        ScenarioCmd::Chaos(_) | ScenarioCmd::Floor(_) | ScenarioCmd::FloorReader(_) => {
            return Err("chaos and floor have no simulated peers".into())
        }
    };
    Ok((name, plan, parameters.unwrap_or_default()))
}

fn fleet_plan(f: &FleetArgs) -> Plan {
    Plan::fleet(f.peers, f.vnis, f.subscriptions, f.routes, f.shared)
}

/// The phases of each scenario, in order.
fn run_phases(ctl: &mut Controller, cmd: &ScenarioCmd) -> Result<Vec<PhaseReport>, String> {
    let all = ctl.all_peers();
    let n = all.len();
    let mut phases = Vec::new();
    match cmd {
        ScenarioCmd::Fleet { .. } | ScenarioCmd::Churn { .. } | ScenarioCmd::Reconnect { .. } => {
            let phase = ctl.begin("connect");
            let live = ctl.connect(&all, false)?;
            phases.push(ctl.connected(&phase, live == n)?);
            let must: u64 = ctl.must_total();
            let phase = ctl.begin("fleet");
            ctl.start(&all, true, true)?;
            let fleet = ctl.converge(&phase, live, must, 0, true)?;
            let ok = fleet.converged;
            phases.push(fleet);
            if !ok {
                return Ok(phases);
            }
            if let ScenarioCmd::Churn {
                rate,
                duration,
                window,
                ..
            } = cmd
            {
                let phase = ctl.begin("churn");
                let (sent, adds, removes) =
                    ctl.churn(*rate, Duration::from_secs_f64(*duration), *window)?;
                let mut churn = ctl.converge(&phase, live, adds, removes, true)?;
                churn.notes.push(("offered-rate".into(), *rate));
                churn.notes.push(("churn-updates".into(), sent as f64));
                phases.push(churn);
            }
            if let ScenarioCmd::Reconnect { .. } = cmd {
                let phase = ctl.begin("reconnect");
                ctl.drop_sessions(&all)?;
                let live = ctl.connect(&all, true)?;
                phases.push(ctl.converge(&phase, live, must, 0, true)?);
            }
        }
        ScenarioCmd::Burst {
            routes,
            subscribers,
            ..
        } => {
            let publisher = peer_id(0);
            let late = peer_id(n - 1);
            let subs: Vec<_> = (1..n - 1).map(peer_id).collect();
            let phase = ctl.begin("connect");
            let live = ctl.connect(&all, false)?;
            phases.push(ctl.connected(&phase, live == n)?);
            ctl.start(&subs, true, false)?;
            // The probe route proves the subscriptions are in place before
            // the burst is timed.
            let probe = ctl.begin("probe");
            ctl.announce(publisher, vec![RouteId(0)], Action::Add)?;
            let p = ctl.converge(&probe, live, *subscribers as u64, 0, false)?;
            if !p.converged {
                phases.push(p);
                return Ok(phases);
            }
            let burst_routes: Vec<RouteId> = (1..=*routes as u32).map(RouteId).collect();
            let phase = ctl.begin("burst");
            ctl.announce(publisher, burst_routes, Action::Add)?;
            let burst = ctl.converge(&phase, live, (*routes * *subscribers) as u64, 0, true)?;
            let ok = burst.converged;
            phases.push(burst);
            if !ok {
                return Ok(phases);
            }
            // Latency of the sync is timed from the SUBSCRIBE.
            ctl.restamp_all();
            let phase = ctl.begin("late-sync");
            ctl.start(&[late], true, false)?;
            phases.push(ctl.converge(&phase, live, (*routes + 1) as u64, 0, true)?);
        }
        ScenarioCmd::Idle { duration, .. } => {
            let phase = ctl.begin("connect");
            let live = ctl.connect(&all, false)?;
            phases.push(ctl.connected(&phase, live == n)?);
            let phase = ctl.begin("hold");
            phases.push(ctl.hold(&phase, Duration::from_secs_f64(*duration))?);
        }
        ScenarioCmd::Chaos(_) | ScenarioCmd::Floor(_) | ScenarioCmd::FloorReader(_) => {
            return Err("chaos and floor have no simulated peers".into())
        }
    }
    Ok(phases)
}

/// Log lines to stderr (`RUST_LOG` or `--verbose` pick the level), plain
/// text; colours only on a terminal.
fn init_logging(verbose: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
