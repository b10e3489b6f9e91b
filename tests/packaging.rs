//! Packaging and operations (`deploy/`, `[package.metadata.deb]`): what an
//! operator installs and watches, checked against the real binary and the
//! real tools.
//!
//! - every metric name and label value the Grafana dashboard and the
//!   Prometheus rules use exists on a live server's and client's /metrics;
//! - promtool accepts the rules, their unit tests pass, and every dashboard
//!   query parses;
//! - `systemd-analyze verify` passes on every unit and `systemd-analyze
//!   security` rates server and client below 3;
//! - sd_notify readiness of server and client (a real `$NOTIFY_SOCKET`);
//! - a server whose io_uring is blocked by seccomp exits naming the fix;
//! - the seccomp profile, the Dockerfile (hadolint) and the shell scripts
//!   (shellcheck);
//! - the .deb: contents, control data, and its maintainer scripts run in a
//!   private mount namespace (install, re-run, upgrade, purge).
//!
//! A test whose tool is missing fails under `CI=true` naming it (.ci/run
//! installs them all); elsewhere it prints `SKIPPED: ...` and why. Every child process is killed and every namespace and
//! temporary directory removed on drop, also when an assertion fails.

use metalbond_test_support::http as http_support;
use metalbond_test_support::netns as netlink_support;
use metalbond_test_support::process::{stderr_of, wait_exit, ChildGuard};

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use netlink_support::Netns;

/// Upper bound for anything to start, answer or exit on a loaded machine.
const WAIT: Duration = Duration::from_secs(20);

const BIN: &str = env!("CARGO_BIN_EXE_metalbond");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// True when `tool` runs; otherwise prints why the caller skips.
fn have(tool: &str, why: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        netlink_support::prerequisite::missing(&format!(
            "{why}: `{tool}` is not installed (.ci/run installs it)"
        ));
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mb-pkg-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `cmd` (stderr piped), killed when the guard drops.
fn spawn(cmd: &mut Command) -> ChildGuard {
    ChildGuard(
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    )
}

/// Waits (bounded) for the exit; its code and stderr.
fn finish(child: &mut ChildGuard) -> (Option<i32>, String) {
    let status = wait_exit(child);
    (status.code(), stderr_of(child))
}

/// SIGTERM, then `finish`.
fn terminate(child: &mut ChildGuard) -> (Option<i32>, String) {
    child.signal(libc::SIGTERM);
    finish(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// Metric names used by deploy/ exist in /metrics.

/// One use of a metric in a PromQL expression: its name and the label
/// matchers written right after it (`name{label="value", other!="x"}`).
#[derive(Debug)]
struct MetricUse {
    name: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
    /// The expression it comes from (for the failure message).
    expr: String,
}

/// Every `metalbond_*` metric used in `expr`, with its label matchers.
fn metric_uses(expr: &str) -> Vec<MetricUse> {
    let mut uses = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("metalbond_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        i = end;
        if !boundary {
            continue;
        }
        let mut matchers = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = expr[end..].find('}').expect("unclosed matcher") + end;
            for m in expr[end + 1..close].split(',') {
                let m = m.trim();
                if m.is_empty() {
                    continue;
                }
                let op_at = m.find(['=', '!']).expect("matcher without operator");
                let op_len = m[op_at..]
                    .chars()
                    .take_while(|c| "=!~".contains(*c))
                    .count();
                let label = m[..op_at].trim().to_string();
                let op = m[op_at..op_at + op_len].to_string();
                let value = m[op_at + op_len..].trim().trim_matches('"').to_string();
                matchers.push((label, op, value));
            }
            i = close;
        }
        uses.push(MetricUse {
            name: expr[start..end].to_string(),
            matchers,
            expr: expr.to_string(),
        });
    }
    uses
}

/// Every `expr` string anywhere in a JSON document (Grafana targets).
fn json_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => json_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_exprs(x, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/metalbond.json")).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    json_exprs(&dash, &mut exprs);
    // Template variable queries name metrics too.
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(d) = var["definition"].as_str() {
            exprs.push(d.to_string());
        }
    }
    exprs
}

fn rule_exprs() -> Vec<(String, String)> {
    let rules: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&read("deploy/prometheus/metalbond-rules.yaml"))
            .expect("rules are YAML");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            out.push((
                rule["alert"].as_str().unwrap().to_string(),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// Metric name → label → values seen, from a parsed scrape. Histograms
/// count as `name_bucket` (with `le`), `name_sum` and `name_count`.
fn catalogue(
    scrapes: &[&prometheus_parse::Scrape],
) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut names: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for scrape in scrapes {
        for s in &scrape.samples {
            let mut labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut add = |name: String, labels: &[(String, String)]| {
                let entry = names.entry(name).or_default();
                for (k, v) in labels {
                    entry.entry(k.clone()).or_default().insert(v.clone());
                }
            };
            match &s.value {
                prometheus_parse::Value::Histogram(_) => {
                    add(format!("{}_sum", s.metric), &labels);
                    add(format!("{}_count", s.metric), &labels);
                    labels.push(("le".into(), "+Inf".into()));
                    add(format!("{}_bucket", s.metric), &labels);
                }
                _ => add(s.metric.clone(), &labels),
            }
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_exists_on_a_live_server_and_client() {
    // In a namespace of its own: the client installs routes (the netlink
    // families only exist then) through a veth standing in for the tunnel.
    let Some(ns) = Netns::create() else { return };
    ns.add_tunnel("mbtun0");
    let mut server = spawn(ns.command(BIN).args([
        "server",
        "--listen",
        "127.0.0.1:4711",
        "--http",
        "127.0.0.1:4712",
    ]));
    let mut announcer = spawn(ns.command(BIN).args([
        "client",
        "--server",
        "127.0.0.1:4711",
        "--announce",
        "23#10.0.23.0/24#2001:db8::1",
    ]));
    let mut client = spawn(ns.command(BIN).args([
        "client",
        "--server",
        "127.0.0.1:4711",
        "--subscribe",
        "23",
        "--install-routes",
        "23#100",
        "--tun",
        "mbtun0",
        "--http",
        "127.0.0.1:4713",
    ]));
    // Wait until the route went through the reflector into the kernel, so
    // every family (fan-out histogram, netlink operations) has samples.
    let deadline = Instant::now() + WAIT;
    // (The table does not exist until the first route is in it.)
    let installed = || {
        String::from_utf8_lossy(&ns.ip_output(&["route", "show", "table", "100"]).stdout)
            .contains("10.0.23.0/24")
    };
    while !installed() {
        assert!(
            Instant::now() < deadline,
            "route never installed; client: {:?}",
            client.0.try_wait()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (server_metrics, client_metrics) = ns.run(|| {
        (
            http_support::scrape("http://127.0.0.1:4712/metrics"),
            http_support::scrape("http://127.0.0.1:4713/metrics"),
        )
    });
    let names = catalogue(&[&server_metrics, &client_metrics]);
    assert!(
        names.contains_key("metalbond_netlink_errors_total"),
        "{:?}",
        names.keys()
    );

    let mut exprs: Vec<(String, String)> = rule_exprs();
    exprs.extend(
        dashboard_exprs()
            .into_iter()
            .map(|e| ("dashboard".to_string(), e)),
    );
    let mut problems = Vec::new();
    let mut checked = BTreeSet::new();
    for (origin, expr) in &exprs {
        for u in metric_uses(expr) {
            checked.insert(u.name.clone());
            let Some(labels) = names.get(&u.name) else {
                problems.push(format!("{origin}: {} does not exist ({})", u.name, u.expr));
                continue;
            };
            for (label, op, value) in &u.matchers {
                // Added by Prometheus at scrape time.
                if label == "job" || label == "instance" {
                    continue;
                }
                match labels.get(label) {
                    None => problems.push(format!(
                        "{origin}: {} has no label {label} ({})",
                        u.name, u.expr
                    )),
                    Some(values) if op == "=" || op == "!=" => {
                        if !values.contains(value) {
                            problems.push(format!(
                                "{origin}: {}{{{label}}} is never {value:?} (seen {values:?})",
                                u.name
                            ));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "metric names or labels that do not exist:\n{}",
        problems.join("\n")
    );
    // The kit covers what the issue lists.
    for family in [
        "metalbond_peers",
        "metalbond_routes",
        "metalbond_updates_received_total",
        "metalbond_updates_sent_total",
        "metalbond_fanout_latency_seconds_bucket",
        "metalbond_queue_depth",
        "metalbond_disconnects_total",
        "metalbond_netlink_errors_total",
    ] {
        assert!(
            checked.contains(family),
            "{family} is used by neither dashboard nor rules"
        );
    }
    assert_eq!(terminate(&mut client).0, Some(0));
    assert_eq!(terminate(&mut announcer).0, Some(0));
    assert_eq!(terminate(&mut server).0, Some(0));
}

#[test]
fn metric_uses_are_read_with_their_matchers() {
    let u = metric_uses(
        r#"sum by (instance) (rate(metalbond_disconnects_total{job="metalbond-server", reason!="shutdown"}[5m])) / metalbond_routes"#,
    );
    assert_eq!(u.len(), 2);
    assert_eq!(u[0].name, "metalbond_disconnects_total");
    assert_eq!(
        u[0].matchers,
        vec![
            ("job".into(), "=".into(), "metalbond-server".into()),
            ("reason".into(), "!=".into(), "shutdown".into())
        ]
    );
    assert_eq!(u[1].name, "metalbond_routes");
    assert!(metric_uses("xmetalbond_routes").is_empty());
}

// ---------------------------------------------------------------------------
// promtool

#[test]
fn promtool_accepts_the_rules_their_tests_and_every_dashboard_query() {
    if !have("promtool", "alert rules and dashboard queries") {
        return;
    }
    let dir = repo().join("deploy/prometheus");
    run(Command::new("promtool")
        .args(["check", "rules", "metalbond-rules.yaml"])
        .current_dir(&dir));
    run(Command::new("promtool")
        .args(["test", "rules", "metalbond-rules.test.yaml"])
        .current_dir(&dir));
    // Each dashboard query as a recording rule, with Grafana's variables
    // replaced, so promtool parses it.
    let tmp = TempDir::new("promql");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs().iter().enumerate() {
        if e.starts_with("label_values(") {
            continue;
        }
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$server", ".*")
            .replace("$client", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let file = tmp.0.join("dashboard.yaml");
    std::fs::write(&file, rules).unwrap();
    run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file));
}

// ---------------------------------------------------------------------------
// systemd units

const UNITS: [&str; 3] = ["metalbond-server", "metalbond-client", "metalbond-tun"];

#[test]
fn systemd_units_verify_and_server_and_client_rate_below_3() {
    if !have("systemd-analyze", "unit checks") {
        return;
    }
    // A root directory holding the system's units plus ours and the files
    // our ExecStart lines name, as the package installs them.
    let root = TempDir::new("units");
    let unit_dir = root.0.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    for system_dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        if Path::new(system_dir).is_dir() {
            run(Command::new("cp")
                .arg("-a")
                .arg(format!("{system_dir}/."))
                .arg(&unit_dir));
            break;
        }
    }
    for (src, dest) in [
        (PathBuf::from(BIN), "usr/sbin/metalbond"),
        (
            repo().join("deploy/metalbond-tun"),
            "usr/lib/metalbond/metalbond-tun",
        ),
        // The server's ExecReload (procps, on every Debian system).
        (PathBuf::from("/bin/kill"), "bin/kill"),
    ] {
        let dest = root.0.join(dest);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&src, &dest).unwrap();
    }
    for unit in UNITS {
        let file = unit_dir.join(format!("{unit}.service"));
        std::fs::copy(repo().join(format!("deploy/systemd/{unit}.service")), &file).unwrap();
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.0.display()))
            .arg(&file));
        // verify exits 0 on unknown keys and bad values; it only warns.
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.trim().is_empty(), "{unit}: {warnings}");
    }
    for unit in ["metalbond-server", "metalbond-client"] {
        // --threshold is the exposure × 10: below 3.0.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=29", "--no-pager"])
            .arg(unit_dir.join(format!("{unit}.service")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("")
            .to_string();
        assert!(
            out.status.success(),
            "{unit}: exposure 3 or more: {overall}"
        );
        let level: f64 = overall
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in {text}"));
        assert!(level < 3.0, "{unit}: {overall}");
    }
}

#[test]
fn units_keep_what_the_issue_requires() {
    let server = read("deploy/systemd/metalbond-server.service");
    let client = read("deploy/systemd/metalbond-client.service");
    for line in [
        "Type=notify",
        "SystemCallFilter=@system-service",
        "LimitMEMLOCK=",
        "User=metalbond",
        "CapabilityBoundingSet=\n",
        // systemctl reload re-reads --policy (README: peer policy).
        "ExecReload=/bin/kill -HUP $MAINPID\n",
    ] {
        assert!(server.contains(line), "server unit lacks {line:?}");
    }
    // Kubernetes probes: liveness on /healthz, readiness on /readyz.
    for manifest in [
        "deploy/kubernetes/server.yaml",
        "deploy/kubernetes/client-daemonset.yaml",
    ] {
        let m = read(manifest);
        for (probe, path) in [
            ("livenessProbe:", "path: /healthz"),
            ("readinessProbe:", "path: /readyz"),
        ] {
            let at = m
                .find(probe)
                .unwrap_or_else(|| panic!("{manifest} lacks {probe}"));
            let block: String = m[at..].lines().take(6).collect::<Vec<_>>().join("\n");
            assert!(block.contains(path), "{manifest}: {block}");
        }
    }
    for line in [
        "Type=notify",
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
        "AmbientCapabilities=CAP_NET_ADMIN\n",
        "RestrictAddressFamilies=AF_NETLINK AF_INET AF_INET6 AF_UNIX\n",
    ] {
        assert!(client.contains(line), "client unit lacks {line:?}");
    }
    // @resources holds sched_setaffinity (shard pinning): never taken away from the server.
    assert!(!server.contains("~@resources") && !server.contains("~@aio"));
}

// ---------------------------------------------------------------------------
// sd_notify readiness

/// A `$NOTIFY_SOCKET` like systemd's: a unix datagram socket in a temp dir.
struct NotifySocket {
    _dir: TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = TempDir::new("notify");
        let path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next datagram (bounded by `WAIT`).
    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .expect("no sd_notify message in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[test]
fn server_notifies_ready_once_listening() {
    let notify = NotifySocket::new();
    let port = free_port();
    let http = free_port();
    let mut server = spawn(
        Command::new(BIN)
            .args([
                "server",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http",
                &format!("127.0.0.1:{http}"),
            ])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let msg = notify.recv();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        msg.contains(&format!("STATUS=listening on [127.0.0.1:{port}]")),
        "{msg}"
    );
    // READY means both ports answer now, not soon.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("MetalBond port after READY=1");
    std::net::TcpStream::connect(("127.0.0.1", http)).expect("--http port after READY=1");
    assert_eq!(terminate(&mut server).0, Some(0));
}

#[test]
fn client_notifies_ready_once_every_server_is_up_or_failed_once() {
    let port = free_port();
    let mut server =
        spawn(Command::new(BIN).args(["server", "--listen", &format!("127.0.0.1:{port}")]));
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // One reachable server, one that refuses connections.
    let refused = free_port();
    let notify = NotifySocket::new();
    let mut client = spawn(
        Command::new(BIN)
            .args([
                "client",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--server",
                &format!("127.0.0.1:{refused}"),
                "--subscribe",
                "23",
            ])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let msg = notify.recv();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=1 of 2 servers established"), "{msg}");

    // With only the refusing server, READY=1 still comes (after its first
    // failure), and says so.
    let notify = NotifySocket::new();
    let mut lonely = spawn(
        Command::new(BIN)
            .args(["client", "--server", &format!("127.0.0.1:{refused}")])
            .env("NOTIFY_SOCKET", &notify.path),
    );
    let msg = notify.recv();
    assert!(
        msg.contains("READY=1") && msg.contains("STATUS=0 of 1 servers established"),
        "{msg}"
    );
    assert_eq!(terminate(&mut lonely).0, Some(0));
    assert_eq!(terminate(&mut client).0, Some(0));
    assert_eq!(terminate(&mut server).0, Some(0));
}

// ---------------------------------------------------------------------------
// io_uring blocked by seccomp

/// Installs (in the child, before exec) a seccomp filter that answers
/// io_uring_setup with EPERM, as a container's default profile does.
fn block_io_uring(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec;
    // the filter program lives on the child's stack for the call.
    unsafe {
        cmd.pre_exec(|| {
            const NR_IO_URING_SETUP: u32 = 425; // the same on x86_64 and aarch64
            #[cfg(target_arch = "x86_64")]
            const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
            #[cfg(target_arch = "aarch64")]
            const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
            let ld = |k: u32| libc::sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k,
            };
            let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                jt,
                jf,
                k,
            };
            let ret = |k: u32| libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k,
            };
            let filter = [
                ld(4), // seccomp_data.arch
                jeq(ARCH, 1, 0),
                ret(libc::SECCOMP_RET_ALLOW),
                ld(0), // seccomp_data.nr
                jeq(NR_IO_URING_SETUP, 0, 1),
                ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
                ret(libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const _ as libc::c_ulong,
                    0,
                    0,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn server_without_io_uring_exits_naming_the_seccomp_profile() {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "--listen", &format!("127.0.0.1:{}", free_port())]);
    block_io_uring(&mut cmd);
    let (code, stderr) = finish(&mut spawn(&mut cmd));
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("metalbond: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("io_uring is unavailable (io_uring_setup: Operation not permitted"),
        "{line}"
    );
    assert!(
        line.contains("deploy/seccomp/metalbond-io-uring.json"),
        "{line}"
    );
    assert!(line.contains("kernel.io_uring_disabled=0"), "{line}");
    // The README section the line points to exists.
    assert!(read("README.md").contains("### Containers and io_uring"));
}

#[test]
fn server_under_a_small_memlock_limit_exits_naming_the_limit_to_raise() {
    // The kernel's old 64 KiB default: glommio wants 512 KiB.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "server",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--shards",
        "1",
    ]);
    // SAFETY: setrlimit only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (code, stderr) = finish(&mut spawn(&mut cmd));
    assert_eq!(code, Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("metalbond: "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("MemLockLimit") && line.contains("LimitMEMLOCK="),
        "{line}"
    );
    // The shipped unit raises it well above glommio's floor.
    assert!(read("deploy/systemd/metalbond-server.service").contains("\nLimitMEMLOCK=64M\n"));
}

#[test]
fn seccomp_profile_allows_io_uring_and_keeps_namespaces_closed() {
    let profile: serde_json::Value =
        serde_json::from_str(&read("deploy/seccomp/metalbond-io-uring.json"))
            .expect("profile is JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let mut allowed = BTreeSet::new();
    for rule in profile["syscalls"].as_array().unwrap() {
        if rule["action"] == "SCMP_ACT_ALLOW" && rule.get("args").is_none() {
            for n in rule["names"].as_array().unwrap() {
                allowed.insert(n.as_str().unwrap().to_string());
            }
        }
    }
    for call in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "sched_setaffinity",
        "execve",
        "futex",
        "epoll_wait",
    ] {
        assert!(allowed.contains(call), "{call} not allowed");
    }
    for call in [
        "unshare",
        "setns",
        "clone",
        "clone3",
        "mount",
        "bpf",
        "kexec_load",
        "init_module",
    ] {
        assert!(!allowed.contains(call), "{call} allowed unconditionally");
    }
}

// ---------------------------------------------------------------------------
// Dockerfile and shell scripts

#[test]
fn dockerfile_copies_what_exists_and_passes_hadolint() {
    let dockerfile = read("deploy/container/Dockerfile");
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
    // Cargo reads every workspace member's manifest: the build stage needs
    // each member's top-level directory.
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[1..parts.len() - 1].to_vec()
        })
        .collect();
    let manifest = read("Cargo.toml");
    let members = manifest
        .split("[workspace]")
        .nth(1)
        .and_then(|w| w.split("members = [").nth(1))
        .and_then(|m| m.split(']').next())
        .expect("Cargo.toml lists the workspace members");
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        let Some(top) = member.split('/').next().filter(|t| !t.is_empty()) else {
            continue;
        };
        assert!(
            copied.contains(&top),
            "Dockerfile does not copy {top} (workspace member {member})"
        );
    }
    assert!(
        dockerfile.contains("USER 65532"),
        "runtime image runs as non-root"
    );
    if !have("hadolint", "Dockerfile lint") {
        return;
    }
    run(Command::new("hadolint").arg(repo().join("deploy/container/Dockerfile")));
}

#[test]
fn shell_scripts_pass_shellcheck() {
    if !have("shellcheck", "shell script lint") {
        return;
    }
    run(Command::new("shellcheck").args(["-s", "sh"]).args(
        [
            "deploy/debian/postinst",
            "deploy/debian/postrm",
            "deploy/metalbond-tun",
            "deploy/build-deb.sh",
        ]
        .map(|f| repo().join(f)),
    ));
}

// ---------------------------------------------------------------------------
// The .deb

/// Builds the .deb from the binary this test run built: docs from it
/// (`generate-docs`), then `cargo deb --no-build`. `None` without cargo-deb.
fn build_deb(out: &Path) -> Option<PathBuf> {
    let ok = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        netlink_support::prerequisite::missing(
            ".deb checks: cargo-deb is not installed (cargo install cargo-deb; .ci/run does)",
        );
        return None;
    }
    let bin_dir = Path::new(BIN).parent().unwrap();
    if bin_dir.file_name().unwrap() != "release" {
        netlink_support::prerequisite::missing(
            ".deb checks package the release binary: run with --release",
        );
        return None;
    }
    let generated = bin_dir.join("generated");
    let _ = std::fs::remove_dir_all(&generated);
    run(Command::new(BIN).arg("generate-docs").arg(&generated));
    for page in ["metalbond.8", "metalbond-server.8", "metalbond-client.8"] {
        run(Command::new("gzip")
            .args(["-9nf"])
            .arg(generated.join("man").join(page)));
    }
    run(Command::new("cargo")
        .args([
            "deb",
            "--no-build",
            "--fast",
            "--no-dbgsym",
            "--no-separate-debug-symbols",
            "--output",
        ])
        .arg(out)
        .current_dir(repo())
        .env("CARGO_TARGET_DIR", bin_dir.parent().unwrap()));
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
}

#[test]
fn deb_holds_binary_units_docs_and_idempotent_maintainer_scripts() {
    let tmp = TempDir::new("deb");
    let Some(deb) = build_deb(&tmp.0) else { return };
    let name = deb.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with(&format!("metalbond_{}-1_", env!("CARGO_PKG_VERSION"))),
        "{name}"
    );

    let info = String::from_utf8(run(Command::new("dpkg-deb").arg("-I").arg(&deb)).stdout).unwrap();
    for field in [
        "Package: metalbond",
        "Section: net",
        "Depends: libc6",
        "postinst",
        "postrm",
        "prerm",
        "conffiles",
    ] {
        assert!(info.contains(field), "control lacks {field}:\n{info}");
    }
    let contents =
        String::from_utf8(run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).unwrap();
    for path in [
        "./usr/sbin/metalbond",
        "./usr/lib/systemd/system/metalbond-server.service",
        "./usr/lib/systemd/system/metalbond-client.service",
        "./usr/lib/systemd/system/metalbond-tun.service",
        "./usr/lib/metalbond/metalbond-tun",
        "./etc/default/metalbond-server",
        "./etc/default/metalbond-client",
        "./etc/default/metalbond-tun",
        "./usr/share/man/man8/metalbond.8.gz",
        "./usr/share/man/man8/metalbond-server.8.gz",
        "./usr/share/man/man8/metalbond-client.8.gz",
        "./usr/share/bash-completion/completions/metalbond",
        "./usr/share/zsh/vendor-completions/_metalbond",
        "./usr/share/fish/vendor_completions.d/metalbond.fish",
        "./usr/share/doc/metalbond/copyright",
        "./usr/share/doc/metalbond/README.md",
        "./usr/share/metalbond/seccomp/metalbond-io-uring.json",
        "./usr/share/metalbond/grafana/metalbond.json",
        "./usr/share/metalbond/prometheus/metalbond-rules.yaml",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    let sbin = contents
        .lines()
        .find(|l| l.ends_with("./usr/sbin/metalbond"))
        .unwrap();
    assert!(sbin.starts_with("-rwxr-xr-x"), "{sbin}");

    // The packaged man page renders the real flags.
    let x = tmp.0.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    let page = run(Command::new("gzip")
        .arg("-dc")
        .arg(x.join("usr/share/man/man8/metalbond-server.8.gz")))
    .stdout;
    assert!(String::from_utf8_lossy(&page).contains("max\\-peers"));

    maintainer_scripts_in_a_private_etc(&deb, &tmp.0);
}

/// Runs the packaged postinst/prerm/postrm in a private mount namespace
/// where /etc and /var/lib/systemd are throw-away copies, so the user and
/// files they create never reach the machine: install, install again,
/// upgrade, remove, purge, once with iproute2's rt_protos.d and once with
/// only the old single rt_protos file.
fn maintainer_scripts_in_a_private_etc(deb: &Path, tmp: &Path) {
    if !have("unshare", "maintainer script checks") {
        return;
    }
    let control = tmp.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    for layout in ["drop-in", "single-file"] {
        let etc = tmp.join(format!("etc-{layout}"));
        let state = tmp.join(format!("systemd-{layout}"));
        std::fs::create_dir_all(&state).unwrap();
        run(Command::new("cp").arg("-a").arg("/etc/.").arg(&etc));
        let iproute = etc.join("iproute2");
        let _ = std::fs::remove_dir_all(&iproute);
        std::fs::create_dir_all(&iproute).unwrap();
        std::fs::write(iproute.join("rt_protos"), "0\tunspec\n2\tkernel\n").unwrap();
        if layout == "drop-in" {
            std::fs::create_dir_all(iproute.join("rt_protos.d")).unwrap();
        }
        let script = format!(
            r#"set -e
mount --bind {etc} /etc
mount --bind {state} /var/lib/systemd 2>/dev/null || mkdir -p /var/lib/systemd
c={control}
"$c/postinst" configure
"$c/postinst" configure
"$c/postinst" configure 0.0.9
echo "user=$(getent passwd metalbond | cut -d: -f1,6,7)"
echo "protos=$(cat /etc/iproute2/rt_protos /etc/iproute2/rt_protos.d/*.conf 2>/dev/null | grep -c '^254[[:space:]]metalbond$')"
"$c/prerm" remove
"$c/postrm" remove
echo "after-remove-user=$(getent passwd metalbond | cut -d: -f1)"
"$c/postrm" purge
echo "after-purge-user=$(getent passwd metalbond | cut -d: -f1)"
echo "after-purge-group=$(getent group metalbond | cut -d: -f1)"
echo "after-purge-protos=$(cat /etc/iproute2/rt_protos /etc/iproute2/rt_protos.d/*.conf 2>/dev/null | grep -c metalbond || true)"
"#,
            etc = etc.display(),
            state = state.display(),
            control = control.display()
        );
        let out = run(Command::new("timeout").args([
            "60",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} missing:\n{text}"))
                .to_string()
        };
        assert_eq!(
            get("user"),
            "metalbond:/nonexistent:/usr/sbin/nologin",
            "{layout}"
        );
        assert_eq!(
            get("protos"),
            "1",
            "{layout}: exactly one 254 entry after three runs"
        );
        assert_eq!(
            get("after-remove-user"),
            "metalbond",
            "{layout}: remove keeps the user"
        );
        assert_eq!(
            get("after-purge-user"),
            "",
            "{layout}: purge removes the user"
        );
        assert_eq!(
            get("after-purge-group"),
            "",
            "{layout}: purge removes the group"
        );
        assert_eq!(
            get("after-purge-protos"),
            "0",
            "{layout}: purge removes the protocol name"
        );
        // What was there before stays, byte for byte.
        assert_eq!(
            std::fs::read_to_string(iproute.join("rt_protos")).unwrap(),
            "0\tunspec\n2\tkernel\n",
            "{layout}"
        );
        assert!(!iproute.join("rt_protos.d/metalbond.conf").exists());
    }
}
