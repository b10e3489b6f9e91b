//! The HTTP status side of the real route reflector: peers speak the
//! protocol over loopback TCP, and what they did must show up in
//! `/routes.json`, `/routes.yaml`, `/peers`, `/metrics` and in the page as a
//! headless browser renders it. One test runs the `metalbond` binary itself
//! with `--http` and stops it with SIGTERM.
//!
//! Every wait has a deadline; servers, peers, browsers and processes are
//! stopped in `Drop` even when an assertion fails.

use metalbond_test_support::eventually_some;
use metalbond_test_support::process::{stderr_of, wait_exit, ChildGuard};
use metalbond_test_support::vni;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metalbond_test_support::http as http_support;
use metalbond_test_support::prerequisite;

use bytes::BytesMut;
use http_support::{browser_dom, closed_within, get, metric, metric_sum, scrape};
use metalbond_http::{serve, HttpHandle};
use metalbond_server::ServerStatusSource;
use metalbond_server::{Server, ServerConfig, ServerHandle};
use metalbond_wire::codec::{encode_frame, FrameDecoder, Message};
use metalbond_wire::{Action, IpNet, NextHop, NextHopKind, Route};

/// Bound for anything a test waits for (never reached when correct).
const WAIT: Duration = Duration::from_secs(20);

/// A blocking protocol peer (the active side) on a real TCP connection,
/// sending keepalives from a thread until dropped.
struct Peer {
    stream: TcpStream,
    decoder: FrameDecoder,
    stop: Arc<AtomicBool>,
}

impl Peer {
    fn established(addr: SocketAddr) -> Peer {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut p = Peer {
            stream,
            decoder: FrameDecoder::new(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        p.send(&Message::Hello {
            keepalive_secs: 5,
            is_server: false,
            reads_stream: false,
        });
        assert!(matches!(
            p.recv(),
            Message::Hello {
                is_server: true,
                ..
            }
        ));
        p.send(&Message::Keepalive);
        assert_eq!(p.recv(), Message::Keepalive);
        let mut w = p.stream.try_clone().unwrap();
        let stop = p.stop.clone();
        std::thread::spawn(move || {
            let mut ka = BytesMut::new();
            encode_frame(&Message::Keepalive, &mut ka);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                if w.write_all(&ka).is_err() {
                    return;
                }
            }
        });
        p
    }

    fn send(&mut self, msg: &Message) {
        let mut b = BytesMut::new();
        encode_frame(msg, &mut b);
        self.stream.write_all(&b).unwrap();
    }

    /// The next non-keepalive message after the handshake (or the HELLO /
    /// first KEEPALIVE during it), within `WAIT`.
    fn recv(&mut self) -> Message {
        self.stream.set_read_timeout(Some(WAIT)).unwrap();
        loop {
            if let Some(m) = self.decoder.next_message().unwrap() {
                return m;
            }
            let mut buf = [0u8; 4096];
            let n = self.stream.read(&mut buf).expect("read within WAIT");
            assert!(n > 0, "server closed the connection");
            self.decoder.extend(&buf[..n]);
        }
    }

    fn recv_update(&mut self) -> (Action, Route) {
        loop {
            match self.recv() {
                Message::Update { action, route } => return (action, route),
                Message::Keepalive => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// An in-process reflector with the status side on it; both stopped on drop.
struct Running {
    server: Option<Arc<ServerHandle>>,
    http: Option<HttpHandle>,
    addr: SocketAddr,
}

impl Running {
    fn start() -> Running {
        let mut c = ServerConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
        c.shards = 2;
        c.pin_cpus = false;
        let server = Arc::new(Server::start(c).unwrap());
        let addr = server.local_addrs()[0];
        let http = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(ServerStatusSource::new(server.clone())),
        )
        .unwrap();
        Running {
            server: Some(server),
            http: Some(http),
            addr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://{}{}",
            self.http.as_ref().unwrap().local_addr(),
            path
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(h) = self.http.take() {
            h.shutdown();
        }
        if let Some(s) = self.server.take() {
            if let Ok(s) = Arc::try_unwrap(s) {
                s.shutdown();
            }
        }
    }
}

fn announced_route() -> Route {
    let prefix: IpNet = "10.23.0.0/16".parse().unwrap();
    let target: IpAddr = "2001:db8::23".parse().unwrap();
    Route::new(
        vni(23),
        prefix,
        NextHop {
            target,
            target_vni: 0,
            kind: NextHopKind::Nat {
                from: 2000,
                to: 2999,
            },
        },
    )
}

#[test]
fn what_peers_do_shows_in_json_yaml_peers_and_metrics() {
    let srv = Running::start();
    let before = scrape(&srv.url("/metrics"));
    let updates_in_before = metric(&before, "metalbond_updates_received_total", &[]).unwrap();
    let updates_out_before = metric(&before, "metalbond_updates_sent_total", &[]).unwrap();
    let eof_before = metric(&before, "metalbond_disconnects_total", &[("reason", "eof")]).unwrap();
    let frames_read_before = metric(&before, "metalbond_frames_read_total", &[]).unwrap();
    let bytes_read_before = metric(&before, "metalbond_bytes_read_total", &[]).unwrap();
    assert_eq!(
        metric(&before, "metalbond_build_info", &[("role", "server")]),
        Some(1.0)
    );

    let mut subscriber = Peer::established(srv.addr);
    subscriber.send(&Message::Subscribe(vni(23)));
    let mut announcer = Peer::established(srv.addr);
    let route = announced_route();
    announcer.send(&Message::Update {
        action: Action::Add,
        route,
    });
    assert_eq!(subscriber.recv_update(), (Action::Add, route));

    // /routes.json and /routes.yaml hold the route (snapshots are cached
    // for up to a second, hence the polling), in the Go document's shape.
    let key = r#"{"IPVersion":4,"Prefix":"10.23.0.0/16"}"#;
    let doc = eventually_some(WAIT, "route in /routes.json", || {
        let (_, _, body) = get(&srv.url("/routes.json"));
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        doc["vnet"]["23"][key].is_array().then_some(doc)
    });
    let hop = &doc["vnet"]["23"][key][0];
    assert_eq!(hop["TargetAddress"], "2001:db8::23");
    assert_eq!(hop["Type"], 1);
    assert_eq!(hop["NATPortRangeFrom"], 2000);
    assert_eq!(hop["NATPortRangeTo"], 2999);
    assert_eq!(doc["vnet"].as_object().unwrap().len(), 1);
    let (_, _, yaml) = get(&srv.url("/routes.yaml"));
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let hops = &yaml["vnet"][23][key];
    assert_eq!(hops[0]["targetaddress"].as_str(), Some("2001:db8::23"));
    assert_eq!(hops[0]["type"].as_u64(), Some(1));

    // /peers: one subscriber of VNI 23, one announcer of one route.
    let (_, _, peers) = get(&srv.url("/peers"));
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    let peers = peers.as_array().unwrap();
    assert_eq!(peers.len(), 2);
    assert!(peers.iter().all(|p| p["state"] == "ESTABLISHED"));
    assert!(peers.iter().all(|p| p["keepalive_seconds"] == 5));
    let sub = peers
        .iter()
        .find(|p| p["vnis_subscribed"] == serde_json::json!([23]))
        .expect("subscriber listed");
    assert!(sub["frames_out"].as_u64().unwrap() >= 3); // HELLO, KEEPALIVE, UPDATE
    let ann = peers
        .iter()
        .find(|p| p["routes_announced"] == 1)
        .expect("announcer listed");
    assert!(ann["bytes_in"].as_u64().unwrap() > 0);
    assert!(ann["connected_since"].as_str().unwrap().ends_with('Z'));

    // /metrics: the counters moved by exactly what the peers did.
    let after = eventually_some(WAIT, "per-VNI count in /metrics", || {
        let s = scrape(&srv.url("/metrics"));
        (metric(&s, "metalbond_vni_routes", &[("vni", "23")]) == Some(1.0)).then_some(s)
    });
    assert_eq!(metric(&after, "metalbond_routes", &[]), Some(1.0));
    assert_eq!(
        metric(&after, "metalbond_updates_received_total", &[]),
        Some(updates_in_before + 1.0)
    );
    assert_eq!(
        metric(&after, "metalbond_updates_sent_total", &[]),
        Some(updates_out_before + 1.0)
    );
    assert_eq!(
        metric(&after, "metalbond_peers", &[("state", "ESTABLISHED")]),
        Some(2.0)
    );
    assert!(metric(&after, "metalbond_frames_written_total", &[]).unwrap() >= 5.0);
    // Two HELLOs, a SUBSCRIBE and an UPDATE at least.
    assert!(
        metric(&after, "metalbond_frames_read_total", &[]).unwrap() >= frames_read_before + 4.0
    );
    assert!(metric(&after, "metalbond_bytes_read_total", &[]).unwrap() > bytes_read_before);
    assert!(metric(&after, "metalbond_bytes_written_total", &[]).unwrap() > 0.0);
    assert!(metric(
        &after,
        "metalbond_queue_depth",
        &[("queue", "peer_out_bytes")]
    )
    .is_some());
    // The UPDATE copy to the subscriber was timed.
    assert!(metric(&after, "metalbond_fanout_latency_seconds_count", &[]).unwrap() >= 1.0);

    // The announcer leaves: its route is withdrawn and the disconnect counted.
    drop(announcer);
    assert_eq!(subscriber.recv_update(), (Action::Remove, route));
    let gone = eventually_some(WAIT, "disconnect counted", || {
        let s = scrape(&srv.url("/metrics"));
        (metric(&s, "metalbond_disconnects_total", &[("reason", "eof")]) == Some(eof_before + 1.0))
            .then_some(s)
    });
    assert_eq!(metric(&gone, "metalbond_routes", &[]), Some(0.0));
    assert_eq!(
        metric(&gone, "metalbond_peers", &[("state", "ESTABLISHED")]),
        Some(1.0)
    );

    // A connection that never says HELLO is a peer in the handshake, shown
    // under its own state and not as ESTABLISHED.
    let silent = std::net::TcpStream::connect(srv.addr).unwrap();
    let waiting = eventually_some(WAIT, "silent peer in the handshake", || {
        let s = scrape(&srv.url("/metrics"));
        let not_established = metric_sum(&s, "metalbond_peers")
            - metric(&s, "metalbond_peers", &[("state", "ESTABLISHED")]).unwrap_or(f64::NAN);
        (not_established == 1.0).then_some(s)
    });
    assert_eq!(
        metric(&waiting, "metalbond_peers", &[("state", "ESTABLISHED")]),
        Some(1.0)
    );
    drop(silent);
}

#[test]
fn browser_shows_a_route_announced_to_the_reflector() {
    let srv = Running::start();
    let mut announcer = Peer::established(srv.addr);
    let route = announced_route();
    announcer.send(&Message::Update {
        action: Action::Add,
        route,
    });
    eventually_some(WAIT, "route in the table", || {
        let (_, _, body) = get(&srv.url("/routes.json"));
        body.contains("10.23.0.0/16").then_some(())
    });
    let dom = match browser_dom(&srv.url("/")) {
        Ok(dom) => dom,
        Err(why) => {
            prerequisite::missing(&format!(
                "browser_shows_a_route_announced_to_the_reflector: {why}"
            ));
            return;
        }
    };
    assert!(dom.contains("<h3 id=\"vni-23\">VNI 23</h3>"), "DOM: {dom}");
    assert!(
        dom.contains(
            "<td>10.23.0.0/16</td><td>2001:db8::23</td><td>NAT</td><td>0</td><td>2000-2999</td>"
        ),
        "DOM: {dom}"
    );
    assert!(dom.contains("<b id=\"route-count\">1</b>"), "DOM: {dom}");
    drop(announcer);
}

/// A loopback port that was free a moment ago.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn server_binary_serves_http_flag_and_stops_on_sigterm() {
    let listen = free_port();
    let http = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_metalbond"))
        .args(["server", "--listen", &listen.to_string()])
        .args(["--http", &http.to_string(), "--shards", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = ChildGuard(child);
    let metrics = eventually_some(WAIT, "the binary's /metrics", || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .proxy(None)
            .build()
            .into();
        let mut resp = agent.get(format!("http://{http}/metrics")).call().ok()?;
        resp.body_mut().read_to_string().ok()
    });
    let s = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string())))
        .expect("the binary's /metrics parses");
    assert_eq!(
        metric(&s, "metalbond_build_info", &[("role", "server")]),
        Some(1.0)
    );
    // Probes: alive, and ready with the line systemd gets as STATUS=.
    assert_eq!(
        get(&format!("http://{http}/healthz")),
        (200, "text/plain; charset=utf-8".into(), "ok\n".into())
    );
    let (status, _, ready) = get(&format!("http://{http}/readyz"));
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready, format!("ready: listening on [{listen}]\n"));
    let _peer = Peer::established(listen);
    let (_, _, peers) = get(&format!("http://{http}/peers"));
    assert!(peers.contains("ESTABLISHED"), "{peers}");

    assert_eq!(proc.terminate(), Some(0), "exit status after SIGTERM");
}

#[test]
fn http_port_in_use_stops_the_binary_with_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let http = taken.local_addr().unwrap();
    let listen = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_metalbond"))
        .args(["server", "--listen", &listen.to_string()])
        .args(["--http", &http.to_string(), "--shards", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = ChildGuard(child);
    let status = wait_exit(&mut proc);
    let err = stderr_of(&mut proc);
    assert!(!status.success());
    assert!(err.contains(&http.to_string()), "stderr: {err}");
    assert!(err.contains("already in use"), "stderr: {err}");
    drop(taken);
}

/// The Go server's answers for the four announcements of PROTOCOL.md
/// "HTTP": `../shared/go-routes.{json,yaml}` beside the clone when present
/// (checked against the copy under `tests/fixtures/`), else the copy.
fn go_reference(name: &str) -> String {
    let fixture = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("fixture tests/fixtures/{name}: {e}"));
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(name);
    if let Ok(reference) = std::fs::read_to_string(&shared) {
        assert_eq!(
            reference,
            fixture,
            "{} and tests/fixtures/{name} differ: refresh the fixture",
            shared.display()
        );
    }
    fixture
}

/// The date and version the Go reference documents were stamped with.
const GO_DATE: &str = "2026-11-30 10:38:16";
const GO_VERSION: &str = "11ad382";

/// One route of PROTOCOL.md's example announcements (target VNI 0).
fn go_example_route(v: u32, prefix: &str, hop: &str, kind: NextHopKind) -> Route {
    Route::new(
        vni(v),
        prefix.parse().unwrap(),
        NextHop {
            target: hop.parse().unwrap(),
            target_vni: 0,
            kind,
        },
    )
}

#[test]
fn routes_json_and_yaml_are_the_go_documents() {
    let srv = Running::start();
    let mut announcer = Peer::established(srv.addr);
    // The four announcements the Go reference was taken after.
    for route in [
        go_example_route(23, "10.0.23.0/24", "2001:db8::1", NextHopKind::Standard),
        go_example_route(
            23,
            "10.0.24.0/24",
            "2001:db8::2",
            NextHopKind::LoadBalancerTarget,
        ),
        go_example_route(
            42,
            "2001:db8:cafe::/64",
            "2001:db8::3",
            NextHopKind::Nat {
                from: 1000,
                to: 2000,
            },
        ),
        go_example_route(23, "10.0.23.0/24", "2001:db8::9", NextHopKind::Standard),
    ] {
        announcer.send(&Message::Update {
            action: Action::Add,
            route,
        });
    }
    let (json, json_type) = eventually_some(WAIT, "four routes in /routes.json", || {
        let (status, ctype, body) = get(&srv.url("/routes.json"));
        assert_eq!(status, 200);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        let routes: usize = doc["vnet"]
            .as_object()?
            .values()
            .flat_map(|d| d.as_object().into_iter().flat_map(|d| d.values()))
            .map(|hops| hops.as_array().map_or(0, Vec::len))
            .sum();
        (routes == 4).then_some((body, ctype))
    });
    assert_eq!(json_type, "application/json");
    let (status, yaml_type, yaml) = get(&srv.url("/routes.yaml"));
    assert_eq!(status, 200);
    assert_eq!(yaml_type, "text/yaml");

    // Field by field: the same values and value types as the Go document.
    let ours: serde_json::Value = serde_json::from_str(&json).unwrap();
    let date = ours["date"].as_str().expect("date is a string").to_string();
    assert_eq!(date.len(), GO_DATE.len(), "date {date}");
    assert_eq!(ours["metalbondVersion"], metalbond_http::VERSION);
    let mut expected: serde_json::Value =
        serde_json::from_str(&go_reference("go-routes.json")).unwrap();
    expected["date"] = date.clone().into();
    expected["metalbondVersion"] = metalbond_http::VERSION.into();
    assert_eq!(ours, expected);

    // Byte for byte apart from date and version: key order, indentation,
    // number formatting. (The reference file ends with a newline; the Go
    // handler writes `json.MarshalIndent`'s output, which has none.)
    let expected_json = go_reference("go-routes.json")
        .replace(GO_DATE, &date)
        .replace(
            &format!("\"{GO_VERSION}\""),
            &format!("\"{}\"", metalbond_http::VERSION),
        );
    assert_eq!(json, expected_json.trim_end_matches('\n'));

    // YAML: lower-case keys, integer VNI keys, quoting and layout as
    // yaml.v2 writes them.
    let yaml_doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    let yaml_date = yaml_doc["date"].as_str().expect("date is a string");
    let expected_yaml = go_reference("go-routes.yaml")
        .replace(GO_DATE, yaml_date)
        .replace(
            &format!("metalbondversion: {GO_VERSION}"),
            &format!("metalbondversion: {}", metalbond_http::VERSION),
        );
    assert_eq!(yaml, expected_yaml);
    let expected_yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&expected_yaml).unwrap();
    assert_eq!(yaml_doc, expected_yaml);
    drop(announcer);
}

/// A `metalbond server --http` process with its stderr in a file (removed on
/// drop), optionally under a low RLIMIT_NOFILE.
struct StatusProcess {
    proc: ChildGuard,
    listen: SocketAddr,
    http: SocketAddr,
    log: std::path::PathBuf,
}

impl StatusProcess {
    fn start(nofile: Option<u64>) -> StatusProcess {
        use std::os::unix::process::CommandExt;
        let listen = free_port();
        let http = free_port();
        let log = std::env::temp_dir().join(format!(
            "metalbond-http-test-{}-{}.log",
            std::process::id(),
            http.port()
        ));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalbond"));
        cmd.args(["server", "--listen", &listen.to_string()])
            .args(["--http", &http.to_string(), "--shards", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(n) = nofile {
            // SAFETY: only an async-signal-safe setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let p = StatusProcess {
            proc: ChildGuard(cmd.spawn().unwrap()),
            listen,
            http,
            log,
        };
        eventually_some(WAIT, "the binary's /metrics", || {
            p.metrics_answers().then_some(())
        });
        p
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// One field of /proc/<pid>/status (`VmRSS` in KiB, `Threads`).
    fn status(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in /proc/<pid>/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Open file descriptors of the process.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// GET /metrics answered 200 within 2 s.
    fn metrics_answers(&self) -> bool {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .proxy(None)
            .build()
            .into();
        agent
            .get(format!("http://{}/metrics", self.http))
            .call()
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false)
    }

    fn still_running(&mut self) -> bool {
        self.proc.0.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StatusProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Raises this test process's soft descriptor limit to the hard one (the
/// tests below hold a few hundred sockets).
fn raise_own_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[test]
fn binary_answers_an_endless_request_head_with_431_and_memory_stays_low() {
    let srv = StatusProcess::start(None);
    let rss_before = srv.status("VmRSS");
    let limit = metalbond_http::HttpLimits::default().max_head_bytes;

    // A head that reaches the limit without ending: 431. (Exactly the
    // limit, so the server has read every byte when it closes and the
    // kernel does not turn the close into a reset that drops the answer.)
    let mut s = TcpStream::connect(srv.http).unwrap();
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Never-Ends: ".to_vec();
    head.resize(limit, b'a');
    s.write_all(&head).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "answer: {answer}");

    // 20 connections each trying to send a 50 MB head at full speed: the
    // server stops taking data after the limit and closes, so none gets
    // far, and the process's memory stays where it was.
    const SENDERS: usize = 20;
    const ATTEMPT: usize = 50 << 20;
    let http = srv.http;
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(http).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let chunk = vec![b'a'; 64 << 10];
                let mut sent = 0usize;
                if s.write_all(b"GET / HTTP/1.1\r\nX-Big: ").is_err() {
                    return sent;
                }
                while sent < ATTEMPT {
                    match s.write(&chunk) {
                        Ok(n) => sent += n,
                        Err(_) => break,
                    }
                }
                sent
            })
        })
        .collect();
    let mut rss_peak = rss_before;
    while senders.iter().any(|t| !t.is_finished()) {
        rss_peak = rss_peak.max(srv.status("VmRSS"));
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in senders {
        let sent = t.join().unwrap();
        assert!(
            sent < ATTEMPT / 2,
            "one connection sent {sent} bytes of head before the server stopped it"
        );
    }
    let rss_after = srv.status("VmRSS");
    // Generous bounds (KiB): the Rust server used to grow by the whole
    // 1 GB attempted here.
    assert!(
        rss_peak < rss_before + 64 * 1024,
        "RSS peaked at {rss_peak} KiB (from {rss_before} KiB)"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS {rss_after} KiB after (from {rss_before} KiB)"
    );
    assert!(srv.metrics_answers());
}

#[test]
fn binary_caps_idle_http_connections_without_a_thread_each_and_closes_idle_ones() {
    raise_own_nofile();
    let srv = StatusProcess::start(None);
    let limits = metalbond_http::HttpLimits::default();
    assert!(srv.metrics_answers());
    // Let the server close the scrape's connection before counting.
    std::thread::sleep(Duration::from_millis(300));
    let threads_before = srv.status("Threads");
    let fds_before = srv.fds();

    // The cap's worth of idle connections are held; more are closed at once.
    let mut held: Vec<TcpStream> = (0..limits.max_connections)
        .map(|_| TcpStream::connect(srv.http).unwrap())
        .collect();
    let accepted = eventually_some(WAIT, "idle connections accepted", || {
        let fds = srv.fds();
        (fds + 2 >= fds_before + limits.max_connections).then_some(fds)
    });
    eprintln!("descriptors: {fds_before} before, {accepted} with the connections");
    let mut extra: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(srv.http).unwrap())
        .collect();
    for s in &mut extra {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "a connection beyond the cap of {} was kept",
            limits.max_connections
        );
    }
    for s in held.iter_mut().take(3) {
        assert!(!closed_within(s, Duration::from_millis(200)));
    }
    let threads_held = srv.status("Threads");
    let fds_held = srv.fds();
    // No thread per connection (at most the two render threads may have
    // started), one descriptor per connection.
    assert!(
        threads_held <= threads_before + 2,
        "threads: {threads_before} before, {threads_held} with {} idle connections",
        limits.max_connections
    );
    assert!(
        fds_held <= fds_before + limits.max_connections + 4,
        "descriptors: {fds_before} before, {fds_held} with {} idle connections",
        limits.max_connections
    );

    // Once they are closed, /metrics answers.
    drop(held);
    drop(extra);
    eventually_some(WAIT, "/metrics after the idle connections closed", || {
        srv.metrics_answers().then_some(())
    });

    // Idle connections are closed by the server after the header read
    // timeout: a silent one, and a kept-alive one after its answer.
    let mut silent = TcpStream::connect(srv.http).unwrap();
    let mut kept = TcpStream::connect(srv.http).unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut status_line = [0u8; 12];
    kept.set_read_timeout(Some(WAIT)).unwrap();
    kept.read_exact(&mut status_line).unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 200");
    let opened = Instant::now();
    let bound = limits.header_read_timeout + Duration::from_secs(10);
    let silent_thread = std::thread::spawn(move || {
        let closed = closed_within(&mut silent, bound);
        (closed, opened.elapsed())
    });
    let kept_closed = closed_within(&mut kept, bound);
    let kept_after = opened.elapsed();
    let (silent_closed, silent_after) = silent_thread.join().unwrap();
    assert!(silent_closed, "a silent connection was never closed");
    assert!(
        kept_closed,
        "an idle kept-alive connection was never closed"
    );
    for after in [kept_after, silent_after] {
        assert!(
            after + Duration::from_secs(1) >= limits.header_read_timeout,
            "an idle connection was closed after {after:?}, before the timeout"
        );
    }
}

#[test]
fn binary_status_port_recovers_after_descriptors_run_out() {
    raise_own_nofile();
    const NOFILE: u64 = 128;
    let mut srv = StatusProcess::start(Some(NOFILE));
    let fds_before = srv.fds();
    assert!(
        (fds_before as u64) < NOFILE - 40,
        "the server alone uses {fds_before} descriptors"
    );
    // Use up every descriptor: silent connections to the MetalBond port,
    // then to the HTTP port (more than the limit in all).
    let mut conns = Vec::new();
    for target in [srv.listen, srv.http] {
        for _ in 0..NOFILE {
            if let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                conns.push(s);
            }
        }
    }
    eventually_some(WAIT, "the server out of descriptors", || {
        (srv.fds() as u64 >= NOFILE - 1).then_some(())
    });
    let exhausted_at = Instant::now();
    // While it is out of descriptors, it keeps trying (and logging, rate
    // limited) rather than giving up.
    std::thread::sleep(Duration::from_secs(3));
    assert!(srv.still_running(), "the server died out of descriptors");
    drop(conns);
    eventually_some(WAIT, "/metrics after the descriptors were released", || {
        srv.metrics_answers().then_some(())
    });
    assert!(srv.still_running());
    let log = srv.log();
    let accept_lines = log
        .lines()
        .filter(|l| l.contains("HTTP status server cannot accept a connection"))
        .count();
    assert!(accept_lines >= 1, "no accept failure logged: {log}");
    let seconds = exhausted_at.elapsed().as_secs() as usize + 3;
    assert!(
        accept_lines <= seconds + 2,
        "{accept_lines} accept-failure lines in about {seconds} s: not rate limited"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// Slow readers of the route documents (issue #24, item 4): each reader of
/// `/routes.json` used to pin a table copy and the whole rendered document
/// until it finished (about 45 MB per reader at 200,000 routes, 1.76 GB for
/// 40 readers), and the last copy stayed after they left. Here 8 readers,
/// started 1.2 s apart so that each would get a fresh snapshot, take 16 KiB
/// each and then stop reading. The server must hold at most
/// `MAX_LIVE_ROUTE_SNAPSHOTS` table copies and a chunk per reader, and give
/// the memory back once they are gone.
#[test]
fn binary_slow_readers_of_the_route_documents_share_snapshots_and_memory_returns() {
    const ROUTES: u32 = 50_000;
    const READERS: usize = 8;
    let srv = StatusProcess::start(None);
    let mut peer = Peer::established(srv.listen);
    let hop = NextHop {
        target: "2001:db8::77".parse().unwrap(),
        target_vni: 0,
        kind: NextHopKind::Standard,
    };
    let mut frames = BytesMut::new();
    for i in 0..ROUTES {
        let prefix: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        encode_frame(
            &Message::Update {
                action: Action::Add,
                route: Route::new(vni(23), prefix, hop),
            },
            &mut frames,
        );
    }
    peer.stream.write_all(&frames).unwrap();
    let metrics_url = format!("http://{}/metrics", srv.http);
    eventually_some(WAIT, "the routes in the table", || {
        let m = scrape(&metrics_url);
        (metric(&m, "metalbond_routes", &[]) == Some(f64::from(ROUTES))).then_some(())
    });
    let rss_table = srv.status("VmRSS");

    // One whole read: the document is complete.
    let (status, _, json) = get(&format!("http://{}/routes.json", srv.http));
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        doc["vnet"]["23"].as_object().unwrap().len(),
        ROUTES as usize
    );
    let doc_kib = json.len() / 1024;
    drop((json, doc));

    let mut readers = Vec::new();
    let mut rss_peak = rss_table;
    for i in 0..READERS {
        // A second apart and more, so each reader comes after the snapshot
        // of the one before expired.
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1200) {
            rss_peak = rss_peak.max(srv.status("VmRSS"));
            std::thread::sleep(Duration::from_millis(50));
        }
        let path = if i % 2 == 0 {
            "/routes.json"
        } else {
            "/routes.yaml"
        };
        let mut s = TcpStream::connect(srv.http).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut got = 0;
        let mut buf = [0u8; 4096];
        while got < 16 * 1024 {
            let n = s.read(&mut buf).expect("the document's first bytes");
            assert!(n > 0, "the server closed a reader after {got} bytes");
            got += n;
        }
        readers.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss_held = srv.status("VmRSS");
    rss_peak = rss_peak.max(rss_held);
    eprintln!(
        "RSS {rss_table} KiB with the table, {rss_held} KiB with {READERS} slow readers \
         (peak {rss_peak} KiB); JSON document {doc_kib} KiB"
    );
    // Bound (KiB): two table copies of 50,000 routes, their sort orders and
    // what taking them leaves for a moment: about 25 MiB measured; a copy
    // and a whole document per reader: over 100 MiB.
    let bound = 60 * 1024;
    assert!(
        rss_peak < rss_table + bound,
        "RSS grew from {rss_table} KiB to {rss_peak} KiB with {READERS} slow readers"
    );
    // The readers were not cut off: each still gets more of its document.
    for s in &mut readers {
        let mut buf = [0u8; 4096];
        assert!(s.read(&mut buf).expect("more of the document") > 0);
    }

    // Once they are gone, the copies are freed and the memory returned.
    drop(readers);
    let rss_after = eventually_some(WAIT, "the memory back after the readers left", || {
        let rss = srv.status("VmRSS");
        (rss < rss_table + 8 * 1024).then_some(rss)
    });
    eprintln!("RSS {rss_after} KiB after the readers left");
    assert!(srv.metrics_answers());
}
