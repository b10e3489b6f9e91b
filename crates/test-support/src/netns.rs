//! Test support: a network namespace the test creates and removes, with a
//! veth pair standing in for the ip6tnl tunnel device (the kernel here has
//! no ip6tnl), a way to run code inside it, and readers of `ip route` output.
//!
//! Must never: touch the host's own namespace beyond creating and deleting
//! `mbtest-*` namespaces; every namespace is deleted by `Drop`, also when the
//! test fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub use crate::prerequisite;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by one test.
pub struct Netns {
    /// `mbtest-<pid>-<n>`.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up. `None` where namespaces cannot
    /// be created: the caller skips (`prerequisite::missing` said so, and
    /// failed the test under `CI=true`).
    pub fn create() -> Option<Netns> {
        let name = format!(
            "mbtest-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                prerequisite::missing(&format!(
                    "cannot create a network namespace ({}); this test needs root and `ip netns`",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return None;
            }
            Err(e) => {
                prerequisite::missing(&format!("cannot run `ip` ({e}); this test needs iproute2"));
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
    /// spawns (the netlink thread) inherit the namespace.
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

/// Waiting for a condition (scaled by `METALBOND_TEST_PATIENCE`).
pub use crate::wait_until;

/// What the Go client's start-up cleanup (`NetlinkClient.Cleanup` of
/// ironcore-dev/metalbond with vishvananda/netlink v1.3.1) did in `table`.
#[derive(Debug, Default)]
pub struct GoCleanup {
    /// Routes it deleted.
    pub deleted: Vec<String>,
    /// Deletes the kernel refused ("PREFIX table T: errno N"); any entry
    /// makes the Go client exit with "unable to clean up stale routes".
    pub errors: Vec<String>,
}

/// Performs the Go client's start-up cleanup in this namespace, for each of
/// `tables`: dump the routes of both families (`RouteListFiltered`,
/// FAMILY_ALL, filtered on table and protocol 254), then delete each with
/// the attributes the Go library keeps from the dump (`deserializeRoute`)
/// and sends back (`RouteDel` → `prepareRouteReq`): header family, dst
/// length, tos, table, protocol, scope, type and flags as dumped; RTA_DST;
/// RTA_PREFSRC / RTA_GATEWAY / RTA_VIA when dumped; RTA_MULTIPATH with each
/// next hop's ifindex, hops and flags (its ip6 encap is not decoded by the
/// Go library, so not sent; gateways and vias are); RTA_TABLE for tables
/// above 255; RTA_PRIORITY, RTA_FLOW and RTA_METRICS when dumped; RTA_OIF
/// always (0 when the dump had none). A top-level ip6 encap is likewise not
/// decoded and not sent, and RTA_NH_ID is unknown to v1.3.1 (not sent).
pub fn go_client_cleanup(ns: &Netns, tables: &[u32]) -> GoCleanup {
    let tables = tables.to_vec();
    ns.run(move || go_cleanup_here(&tables))
}

fn go_cleanup_here(tables: &[u32]) -> GoCleanup {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteNextHop};
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    let mut socket = Socket::new(NETLINK_ROUTE).expect("netlink socket");
    socket.bind_auto().expect("bind");
    socket.connect(&SocketAddr::new(0, 0)).expect("connect");
    let mut seq = 0u32;
    let mut send = |socket: &mut Socket, msg: RouteNetlinkMessage, flags: u16| -> u32 {
        seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0).expect("send");
        seq
    };
    // Reads replies to `seq` until DONE / an ack; returns routes and errno.
    let receive = |socket: &mut Socket, seq: u32| -> (Vec<RouteMessage>, i32) {
        let mut routes = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(1 << 20);
            socket.recv(&mut buf, 0).expect("recv");
            let mut at = 0;
            while at + 16 <= buf.len() {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
                if len < 16 || at + len > buf.len() {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..at + len])
                    .expect("parse netlink reply");
                at += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                        routes.push(r)
                    }
                    NetlinkPayload::Done(_) => return (routes, 0),
                    NetlinkPayload::Error(e) => {
                        return (routes, e.code.map(|c| -c.get()).unwrap_or(0))
                    }
                    _ => {}
                }
            }
        }
    };

    let mut outcome = GoCleanup::default();
    let dump_seq = send(
        &mut socket,
        RouteNetlinkMessage::GetRoute(RouteMessage::default()),
        NLM_F_REQUEST | NLM_F_DUMP,
    );
    let (dumped, errno) = receive(&mut socket, dump_seq);
    assert_eq!(errno, 0, "route dump failed");
    for table in tables {
        for route in &dumped {
            let route_table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            if route_table != *table || u8::from(route.header.protocol) != 254 {
                continue;
            }
            let mut del = RouteMessage::default();
            del.header = route.header.clone();
            del.header.table = u8::try_from(route_table).unwrap_or(0);
            let zero = match route.header.address_family {
                AddressFamily::Inet => RouteAddress::Inet(std::net::Ipv4Addr::UNSPECIFIED),
                _ => RouteAddress::Inet6(std::net::Ipv6Addr::UNSPECIFIED),
            };
            let mut dst = RouteAttribute::Destination(zero);
            let mut rest = Vec::new();
            let mut oif = 0;
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Destination(_) => dst = attr.clone(),
                    RouteAttribute::PrefSource(_)
                    | RouteAttribute::Gateway(_)
                    | RouteAttribute::Via(_)
                    | RouteAttribute::Priority(_)
                    | RouteAttribute::Realm(_)
                    | RouteAttribute::Metrics(_) => rest.push(attr.clone()),
                    RouteAttribute::Table(t) if *t >= 256 => rest.push(attr.clone()),
                    RouteAttribute::Oif(i) => oif = *i,
                    RouteAttribute::MultiPath(hops) => {
                        let hops = hops
                            .iter()
                            .map(|h| {
                                let mut hop = RouteNextHop::default();
                                hop.flags = h.flags;
                                hop.hops = h.hops;
                                hop.interface_index = h.interface_index;
                                hop.attributes = h
                                    .attributes
                                    .iter()
                                    .filter(|a| {
                                        matches!(
                                            a,
                                            RouteAttribute::Gateway(_) | RouteAttribute::Via(_)
                                        )
                                    })
                                    .cloned()
                                    .collect();
                                hop
                            })
                            .collect();
                        rest.push(RouteAttribute::MultiPath(hops));
                    }
                    _ => {}
                }
            }
            let name = format!("{:?} table {route_table}", dst);
            del.attributes = vec![dst];
            del.attributes.extend(rest);
            del.attributes.push(RouteAttribute::Oif(oif));
            let seq = send(
                &mut socket,
                RouteNetlinkMessage::DelRoute(del),
                NLM_F_REQUEST | NLM_F_ACK,
            );
            match receive(&mut socket, seq).1 {
                0 => outcome.deleted.push(name),
                errno => outcome.errors.push(format!(
                    "{name}: {}",
                    std::io::Error::from_raw_os_error(errno)
                )),
            }
        }
    }
    outcome
}

/// Samples the kernel's routes of `table` (both families) every 10 ms on a
/// thread until stopped; `stop` returns, per watched prefix, the number of
/// samples in which it was missing, and the number of samples taken.
pub struct KernelSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(BTreeMap<String, usize>, usize)>,
}

impl KernelSampler {
    pub fn start(ns: &Netns, table: u32, watched: &[&str]) -> KernelSampler {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = ns.name.clone();
        let watched: Vec<String> = watched.iter().map(|s| s.to_string()).collect();
        let thread = std::thread::spawn(move || {
            let mut missing: BTreeMap<String, usize> =
                watched.iter().map(|p| (p.clone(), 0)).collect();
            let mut samples = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut shown = String::new();
                for family in ["-4", "-6"] {
                    let out = std::process::Command::new("ip")
                        .args(["-n", &name, family, "route", "show", "table"])
                        .arg(table.to_string())
                        .output()
                        .expect("ip runs");
                    shown.push_str(&String::from_utf8_lossy(&out.stdout));
                }
                let present: Vec<String> =
                    parse_routes(&shown).into_iter().map(|r| r.prefix).collect();
                for (prefix, n) in missing.iter_mut() {
                    if !present.contains(prefix) {
                        *n += 1;
                    }
                }
                samples += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            (missing, samples)
        });
        KernelSampler { stop, thread }
    }

    pub fn stop(self) -> (BTreeMap<String, usize>, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}

/// Announces `n` IPv4 /32 routes in `vni` through `client`: 10.0.0.0,
/// 10.0.0.1, ... spread over 16 next hops 2001:db8::1-16 (the load of the
/// 100,000-route measurements).
pub fn announce_numbered_routes(
    client: &metalbond_client::Client,
    vni: metalbond_wire::Vni,
    n: u32,
) {
    use metalbond_wire::{IpNet, NextHop, Route};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    for i in 0..n {
        let dst = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 32).expect("a /32");
        let hv = IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            (i % 16) as u16 + 1,
        ));
        client
            .announce(Route::new(vni, dst, NextHop::standard(hv)))
            .expect("announce");
    }
}
