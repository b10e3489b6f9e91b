//! Test support: a network namespace the test creates and removes, with a
//! veth pair standing in for the ip6tnl tunnel device (the kernel here has
//! no ip6tnl), a way to run code inside it, and readers of `ip route` output.
//!
//! Must never: touch the host's own namespace beyond creating and deleting
//! `mbtest-*` namespaces; every namespace is deleted by `Drop`, also when the
//! test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by one test.
pub struct Netns {
    /// `mbtest-<pid>-<n>`.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up. `None` (after saying so on
    /// stderr) where namespaces cannot be created: the caller skips.
    pub fn create() -> Option<Netns> {
        let name = format!(
            "mbtest-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot create a network namespace ({}); this test needs root and `ip netns`",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None;
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run `ip` ({e}); this test needs iproute2");
                return None;
            }
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// Creates `dev` (a veth whose peer is `dev`-p), both ends up.
    pub fn add_tunnel(&self, dev: &str) {
        let peer = format!("{dev}-p");
        self.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        self.ip(&["link", "set", dev, "up"]);
        self.ip(&["link", "set", &peer, "up"]);
    }

    /// Runs `ip -n NAME args`, panicking with stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = self.ip_output(args);
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n NAME args` and returns whatever happened.
    pub fn ip_output(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip")
    }

    /// A command to run inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `f` on a thread that has entered the namespace; threads it
    /// spawns (the netlink shard) inherit the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns file");
            // SAFETY: setns on a valid namespace fd, affecting only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// Routes of `table` in the given family ("-4" or "-6"): prefix → the
    /// encap destinations of its next hops, in kernel order. Panics unless
    /// every listed route is protocol 254 with every next hop encapsulated
    /// and leaving through `dev`.
    pub fn routes(&self, family: &str, table: u32, dev: &str) -> BTreeMap<String, Vec<String>> {
        self.try_routes(family, table, dev)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `routes`, but a route of another form is an `Err` naming it.
    pub fn try_routes(
        &self,
        family: &str,
        table: u32,
        dev: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, String> {
        let out = self.ip_output(&[family, "route", "show", "table", &table.to_string()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        parse_routes(&text)
            .into_iter()
            .map(|r| {
                if !r.protocol_254 {
                    return Err(format!("route without proto 254: {}", r.text));
                }
                if !r.devices.iter().all(|d| d == dev) {
                    return Err(format!("next hop not out of {dev}: {}", r.text));
                }
                if r.devices.len() != r.encap_dsts.len() || r.devices.is_empty() {
                    return Err(format!("every next hop must be encapsulated: {}", r.text));
                }
                Ok((r.prefix, r.encap_dsts))
            })
            .collect()
    }

    /// Number of nexthop objects with protocol 254.
    pub fn our_nexthop_objects(&self) -> usize {
        self.ip(&["nexthop", "show"])
            .lines()
            .filter(|l| l.contains("proto 254"))
            .count()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One route of `ip route show` text output.
#[derive(Debug)]
pub struct ShownRoute {
    /// Destination as `ip` prints it.
    pub prefix: String,
    /// `proto 254` was shown.
    pub protocol_254: bool,
    /// `encap ip6 ... dst X` addresses, one per next hop.
    pub encap_dsts: Vec<String>,
    /// `dev D` of each next hop.
    pub devices: Vec<String>,
    /// The whole route, joined on one line, for messages.
    pub text: String,
}

/// Parses `ip route show` output: a route starts at column 0, its
/// multipath `nexthop` lines are indented.
pub fn parse_routes(text: &str) -> Vec<ShownRoute> {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = blocks.last_mut() {
                last.push(' ');
                last.push_str(line.trim());
            }
        } else if !line.trim().is_empty() {
            blocks.push(line.trim().to_string());
        }
    }
    blocks
        .into_iter()
        .map(|text| {
            let tokens: Vec<&str> = text.split_whitespace().collect();
            let mut encap_dsts = Vec::new();
            let mut devices = Vec::new();
            let mut protocol_254 = false;
            let mut in_encap = false;
            for pair in tokens.windows(2) {
                match pair[0] {
                    "encap" => in_encap = pair[1] == "ip6",
                    "dst" if in_encap => {
                        encap_dsts.push(pair[1].to_string());
                        in_encap = false;
                    }
                    "dev" => devices.push(pair[1].to_string()),
                    "proto" => protocol_254 = pair[1] == "254",
                    _ => {}
                }
            }
            ShownRoute {
                prefix: tokens.first().copied().unwrap_or_default().to_string(),
                protocol_254,
                encap_dsts,
                devices,
                text,
            }
        })
        .collect()
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
