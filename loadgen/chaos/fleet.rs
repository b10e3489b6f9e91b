//! The fleet under test: network namespaces joined by an underlay router,
//! the `metalbond` processes in them, and the faults applied to both.
//!
//! Owns: one namespace per reflector, hypervisor and flapping announcer,
//! each linked by a veth pair to the underlay namespace, which routes
//! between them (IPv6 forwarding; this kernel has no bridge module); a veth
//! as each hypervisor's tunnel device; every process's command line, log
//! file and lifetime (a process the harness did not stop and that exited is
//! reported by `reap`); and each fault's start and end (`nft` rules for
//! partitions and loss, `tc netem` for delay, signals, link state).
//!
//! Must never: touch the host's namespace beyond creating and deleting its
//! own `mbchaos-<pid>-*` namespaces (deleted on drop, also after a panic),
//! or decide whether a route is right (`model` and `checker` do).
//!
//! ```text
//!   r0  r1  r2        reflectors: metalbond server --policy (fd00:0:0:k::2)
//!    \   |   /
//!     underlay         router namespace, one veth per node (fd00:0:0:k::1)
//!    /  |  |  \
//!  h0  h1 ... h23  f0 f1   hypervisors: metalbond client --install-routes
//!                          --tun mbtun0 (a veth); flappers: announcers only
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::model::{Announcement, Announcer, Layout};

/// The tunnel device of every hypervisor.
pub const TUNNEL: &str = "mbtun0";
/// The port every reflector listens on.
const PORT: u16 = 4711;

/// Timing of the fleet's sessions and holds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Keepalive interval, seconds (hold time 2.5 ×).
    pub keepalive: u64,
    /// The clients' `--stale-hold`, seconds.
    pub stale_hold: u64,
    /// The reflectors' `--peer-grace`, seconds.
    pub peer_grace: u64,
}

/// A running `metalbond` process.
struct Proc {
    child: Child,
    /// The harness stopped it (or is stopping it): its exit is no finding.
    stopping: bool,
}

/// One process slot of the fleet: a namespace, an address, a command line.
pub struct Node {
    /// `r0`, `h3`, `f1`.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its underlay address (sessions and, for announcers, the next hop).
    pub addr: Ipv6Addr,
    /// `metalbond` arguments.
    args: Vec<String>,
    /// Where its stdout and stderr go (appended across restarts).
    pub log: PathBuf,
    /// The process, while one runs.
    proc: Option<Proc>,
    /// Highest VmRSS seen, bytes.
    pub peak_rss: u64,
}

/// The whole fleet. Dropping it stops every process and deletes every
/// namespace.
pub struct Fleet {
    /// The `metalbond` binary.
    bin: PathBuf,
    /// Logs and the policy file.
    pub dir: PathBuf,
    /// Namespaces created, deleted on drop.
    namespaces: Vec<String>,
    /// Reflectors, then hypervisors, then flappers.
    pub reflectors: Vec<Arc<Mutex<Node>>>,
    pub hypervisors: Vec<Arc<Mutex<Node>>>,
    pub flappers: Vec<Arc<Mutex<Node>>>,
    /// The policy file every reflector reads.
    policy: PathBuf,
    /// Policy revisions written so far.
    revision: Mutex<u64>,
}

/// Locks a node (a panicked holder leaves the node as it was).
pub fn lock(node: &Mutex<Node>) -> MutexGuard<'_, Node> {
    node.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a command, `Err` with its stderr unless it succeeds.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip -n NS ARGS`.
fn ip(ns: &str, args: &[&str]) -> Result<(), String> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// `ip netns exec NS PROGRAM ARGS`, feeding `stdin`.
fn exec_in(ns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    let Some(input) = stdin else {
        return run(&mut cmd);
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: cannot run: {e}"))?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Does `tc netem` work in a namespace here? (This kernel has no sch_netem.)
pub fn netem_available(ns: &str) -> bool {
    exec_in(
        ns,
        "tc",
        &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        None,
    )
    .and_then(|()| exec_in(ns, "tc", &["qdisc", "del", "dev", "lo", "root"], None))
    .is_ok()
}

impl Node {
    /// Starts the process (its log is appended to).
    fn start(&mut self, bin: &Path) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        // `ip netns exec` execs the program: the child's pid is metalbond's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(bin)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", self.name))?;
        self.proc = Some(Proc {
            child,
            stopping: false,
        });
        Ok(())
    }

    /// Sends `signal` and waits (at most 10 s) for the exit.
    fn stop(&mut self, signal: i32) {
        let Some(p) = self.proc.as_mut() else {
            return;
        };
        p.stopping = true;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(p.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                self.proc = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
        self.proc = None;
    }

    /// The process's exit, if it exited without the harness stopping it
    /// (the slot is then empty).
    pub fn reap(&mut self) -> Option<ExitStatus> {
        let p = self.proc.as_mut()?;
        match p.child.try_wait() {
            Ok(Some(status)) if !p.stopping => {
                self.proc = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// Reads VmRSS and keeps the peak; the value now, bytes.
    pub fn sample_rss(&mut self) -> Option<u64> {
        let pid = self.proc.as_ref()?.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        let bytes = kib * 1024;
        self.peak_rss = self.peak_rss.max(bytes);
        Some(bytes)
    }

    /// Is a process running in the slot?
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }
}

impl Fleet {
    /// Builds the namespaces and links for `layout` (nothing runs yet).
    pub fn build(bin: &Path, layout: &Layout, timing: Timing) -> Result<Fleet, String> {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("metalbond-chaos-{pid}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let policy = dir.join("policy.yaml");
        let mut fleet = Fleet {
            bin: bin.to_path_buf(),
            dir,
            namespaces: Vec::new(),
            reflectors: Vec::new(),
            hypervisors: Vec::new(),
            flappers: Vec::new(),
            policy,
            revision: Mutex::new(0),
        };
        fleet.write_policy(layout)?;
        let underlay = fleet.namespace("u")?;
        exec_in(
            &underlay,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.forwarding=1"],
            None,
        )?;
        let mut link = 0usize;
        let mut node = |fleet: &mut Fleet, name: String| -> Result<(String, Ipv6Addr), String> {
            link += 1;
            let ns = fleet.namespace(&name)?;
            let (router, addr) = (
                Ipv6Addr::new(0xfd00, 0, 0, link as u16, 0, 0, 0, 1),
                Ipv6Addr::new(0xfd00, 0, 0, link as u16, 0, 0, 0, 2),
            );
            let port = format!("u{link}");
            ip(
                &underlay,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            ip(
                &underlay,
                &[
                    "addr",
                    "add",
                    &format!("{router}/64"),
                    "dev",
                    &port,
                    "nodad",
                ],
            )?;
            ip(&underlay, &["link", "set", &port, "up"])?;
            ip(
                &ns,
                &["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"],
            )?;
            ip(&ns, &["link", "set", "eth0", "up"])?;
            ip(
                &ns,
                &["-6", "route", "add", "default", "via", &router.to_string()],
            )?;
            Ok((ns, addr))
        };
        for r in 0..layout.reflectors {
            let name = format!("r{r}");
            let (ns, addr) = node(&mut fleet, name.clone())?;
            let args = vec![
                "server".to_string(),
                "--listen".into(),
                format!("[{addr}]:{PORT}"),
                "--keepalive".into(),
                timing.keepalive.to_string(),
                "--peer-grace".into(),
                timing.peer_grace.to_string(),
                "--policy".into(),
                fleet.policy.display().to_string(),
            ];
            fleet.reflectors.push(fleet.slot(name, ns, addr, args));
        }
        let servers: Vec<String> = fleet
            .reflectors
            .iter()
            .flat_map(|r| ["--server".to_string(), format!("[{}]:{PORT}", lock(r).addr)])
            .collect();
        let client_args = |announcements: &[Announcement], subscribe: &[u32]| {
            let mut args = vec!["client".to_string()];
            args.extend(servers.iter().cloned());
            for (flag, value) in [
                ("--keepalive", timing.keepalive.to_string()),
                ("--reconnect-min-ms", "100".into()),
                ("--reconnect-max-secs", "1".into()),
                ("--stale-hold", timing.stale_hold.to_string()),
            ] {
                args.push(flag.into());
                args.push(value);
            }
            for vni in subscribe {
                args.extend([
                    "--subscribe".into(),
                    vni.to_string(),
                    "--install-routes".into(),
                    format!("{vni}#{vni}"),
                ]);
            }
            if !subscribe.is_empty() {
                args.extend(["--tun".into(), TUNNEL.into()]);
            }
            for a in announcements {
                args.extend([
                    "--announce".into(),
                    format!("{}#{}#{}", a.vni, a.prefix, a.next_hop),
                ]);
            }
            args
        };
        for h in 0..layout.hypervisors {
            let name = format!("h{h}");
            let (ns, addr) = node(&mut fleet, name.clone())?;
            ip(
                &ns,
                &[
                    "link", "add", TUNNEL, "type", "veth", "peer", "name", "mbtun0-p",
                ],
            )?;
            ip(&ns, &["link", "set", TUNNEL, "up"])?;
            ip(&ns, &["link", "set", "mbtun0-p", "up"])?;
            let own = layout.announcements_of(Announcer::Hypervisor(h), addr);
            let args = client_args(&own, &layout.subscriptions(h));
            fleet.hypervisors.push(fleet.slot(name, ns, addr, args));
        }
        for f in 0..layout.flappers {
            let name = format!("f{f}");
            let (ns, addr) = node(&mut fleet, name.clone())?;
            let own = layout.announcements_of(Announcer::Flapper(f), addr);
            let args = client_args(&own, &[]);
            fleet.flappers.push(fleet.slot(name, ns, addr, args));
        }
        Ok(fleet)
    }

    fn slot(
        &self,
        name: String,
        ns: String,
        addr: Ipv6Addr,
        args: Vec<String>,
    ) -> Arc<Mutex<Node>> {
        let log = self.dir.join(format!("{name}.log"));
        Arc::new(Mutex::new(Node {
            name,
            ns,
            addr,
            args,
            log,
            proc: None,
            peak_rss: 0,
        }))
    }

    /// Creates namespace `mbchaos-<pid>-<name>` with loopback up.
    fn namespace(&mut self, name: &str) -> Result<String, String> {
        let ns = format!("mbchaos-{}-{name}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &ns])).map_err(|e| {
            format!(
                "cannot create a network namespace (the chaos run needs root and iproute2): {e}"
            )
        })?;
        self.namespaces.push(ns.clone());
        ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// (Re)writes the policy: every node of the fleet may subscribe to the
    /// fleet's VNIs and announce its own next hop there; a new revision.
    fn write_policy(&self, layout: &Layout) -> Result<(), String> {
        let mut revision = self.revision.lock().unwrap_or_else(|e| e.into_inner());
        *revision += 1;
        let (lo, hi) = layout.vni_range();
        let text = format!(
            "version: 1\nrevision: \"chaos {rev}\"\nrules:\n  - name: fleet\n    peers: [fd00::/16]\n    subscribe: [{lo}-{hi}]\n    announce:\n      - vnis: [{lo}-{hi}]\n        prefixes: [10.0.0.0/8, 192.168.0.0/16, 2001:db8::/32]\n        next_hops: [self]\n",
            rev = *revision
        );
        let mut file =
            File::create(&self.policy).map_err(|e| format!("{}: {e}", self.policy.display()))?;
        file.write_all(text.as_bytes())
            .map_err(|e| format!("{}: {e}", self.policy.display()))
    }

    /// Every node, reflectors first.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Mutex<Node>>> {
        self.reflectors
            .iter()
            .chain(&self.hypervisors)
            .chain(&self.flappers)
    }

    /// Starts every process: reflectors first.
    pub fn start_all(&self) -> Result<(), String> {
        for node in self.nodes() {
            lock(node).start(&self.bin)?;
            if std::ptr::eq(node, self.reflectors.last().unwrap_or(node)) {
                // Listening before the first client tries.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        Ok(())
    }

    /// SIGKILL (`hard`) or SIGTERM, waiting for the exit.
    pub fn stop(&self, node: &Mutex<Node>, hard: bool) {
        lock(node).stop(if hard { libc::SIGKILL } else { libc::SIGTERM });
    }

    /// Starts the slot's process again.
    pub fn restart(&self, node: &Mutex<Node>) -> Result<(), String> {
        let mut n = lock(node);
        if n.running() {
            return Ok(());
        }
        n.start(&self.bin)
    }

    /// A new policy revision and SIGHUP to `node`.
    pub fn reload(&self, node: &Mutex<Node>, layout: &Layout) -> Result<(), String> {
        self.write_policy(layout)?;
        let n = lock(node);
        if let Some(p) = &n.proc {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) };
        }
        Ok(())
    }

    /// Drops packets between `node` and `peers` both ways.
    pub fn partition(&self, node: &Mutex<Node>, peers: &[Ipv6Addr]) -> Result<(), String> {
        let set = peers
            .iter()
            .map(Ipv6Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet chaos_partition {{\n chain input {{ type filter hook input priority 0; ip6 saddr {{ {set} }} drop; }}\n chain output {{ type filter hook output priority 0; ip6 daddr {{ {set} }} drop; }}\n}}\n"
        );
        exec_in(&lock(node).ns, "nft", &["-f", "-"], Some(&rules))
    }

    /// Drops `percent` % of `node`'s underlay packets, each way.
    pub fn loss(&self, node: &Mutex<Node>, percent: u8) -> Result<(), String> {
        let rules = format!(
            "table inet chaos_loss {{\n chain input {{ type filter hook input priority 0; iifname \"eth0\" numgen random mod 100 < {percent} drop; }}\n chain output {{ type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < {percent} drop; }}\n}}\n"
        );
        exec_in(&lock(node).ns, "nft", &["-f", "-"], Some(&rules))
    }

    /// Removes the `nft` table `table` (a partition or loss ends).
    pub fn heal(&self, node: &Mutex<Node>, table: &str) -> Result<(), String> {
        exec_in(
            &lock(node).ns,
            "nft",
            &["delete", "table", "inet", table],
            None,
        )
    }

    /// Delays `node`'s underlay packets (netem) or, with `None`, stops.
    pub fn delay(&self, node: &Mutex<Node>, millis: Option<u32>) -> Result<(), String> {
        let ns = lock(node).ns.clone();
        match millis {
            Some(ms) => exec_in(
                &ns,
                "tc",
                &[
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    "netem",
                    "delay",
                    &format!("{ms}ms"),
                ],
                None,
            ),
            None => exec_in(&ns, "tc", &["qdisc", "del", "dev", "eth0", "root"], None),
        }
    }

    /// Sets the hypervisor's tunnel device down or up.
    pub fn tunnel(&self, node: &Mutex<Node>, up: bool) -> Result<(), String> {
        ip(
            &lock(node).ns,
            &["link", "set", TUNNEL, if up { "up" } else { "down" }],
        )
    }

    /// The underlay namespace's name (for the netem probe).
    pub fn underlay(&self) -> &str {
        &self.namespaces[0]
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in self.nodes() {
            lock(node).stop(libc::SIGKILL);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
