//! The HTTP status side over real TCP on loopback, fed by an in-test
//! `StatusSource` that holds a real route table and real counters (the shape
//! a server or client handle has), read with a real HTTP client, real JSON /
//! YAML / Prometheus parsers, and a real headless browser.
//!
//! Every request has a timeout; servers shut down in `Drop` even when an
//! assertion fails.

use metalbond_test_support::vni;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metalbond_test_support::http as http_support;
use metalbond_test_support::prerequisite;

use http_support::{browser_dom, closed_within, get, metric, scrape};
use metalbond_http::{
    serve, HttpError, HttpHandle, LatencyHistogram, MetricFamily, MetricKind, MetricsView,
    NetlinkView, PeerView, QueueDepth, RouteTableView, StatusRole, StatusSource,
};
use metalbond_wire::session::SessionState;
use metalbond_wire::{IpNet, NextHop, NextHopKind, Route};

/// A tiny route owner: a table of routes and the counters a reflector keeps,
/// updated by the test the way a shard would.
#[derive(Default)]
struct Fleet {
    routes: Mutex<BTreeSet<Route>>,
    updates_in: AtomicU64,
    updates_out: AtomicU64,
    frames_written: AtomicU64,
    bytes_written: AtomicU64,
    disconnects_timeout: AtomicU64,
    fanout: LatencyHistogram,
    netlink_ops: AtomicU64,
}

impl Fleet {
    /// Applies an announced route as a reflector would: one UPDATE in, one
    /// copy out to a subscriber.
    fn announce(&self, route: Route) {
        self.routes.lock().unwrap().insert(route);
        self.updates_in.fetch_add(1, Ordering::Relaxed);
        self.updates_out.fetch_add(1, Ordering::Relaxed);
        self.frames_written.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(60, Ordering::Relaxed);
        self.fanout.record(Duration::from_micros(40));
        self.netlink_ops.fetch_add(1, Ordering::Relaxed);
    }
}

impl StatusSource for Fleet {
    fn role(&self) -> StatusRole {
        StatusRole::Server
    }
    fn routes(&self) -> RouteTableView {
        let routes = self.routes.lock().unwrap();
        RouteTableView::from_routes(routes.iter().map(|r| (r.vni, r.destination, r.next_hop)))
    }
    fn peers(&self) -> Vec<PeerView> {
        vec![PeerView {
            address: "[::1]:40000".to_string(),
            state: SessionState::Established,
            shard: Some(1),
            keepalive: Some(Duration::from_secs(5)),
            routes_announced: self.routes.lock().unwrap().len() as u64,
            routes_received: None,
            vnis_subscribed: vec![vni(23), vni(42)],
            frames_in: Some(self.updates_in.load(Ordering::Relaxed)),
            bytes_in: Some(60 * self.updates_in.load(Ordering::Relaxed)),
            frames_out: Some(self.frames_written.load(Ordering::Relaxed)),
            bytes_out: Some(self.bytes_written.load(Ordering::Relaxed)),
            queued_bytes: Some(0),
            connected_since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            grace_left: None,
            peer_id: Some("1.0".to_string()),
            routes_stale: None,
            policy_rule: None,
            tcp_md5: None,
            throttled: None,
        }]
    }
    fn metrics(&self) -> MetricsView {
        let table = self.routes();
        MetricsView {
            peers_by_state: vec![
                (SessionState::Established.name().to_string(), 1),
                (SessionState::HelloReceived.name().to_string(), 0),
            ],
            routes_per_vni: table.routes_per_vni(),
            routes_total: table.route_count() as u64,
            updates_in: Some(self.updates_in.load(Ordering::Relaxed)),
            updates_out: Some(self.updates_out.load(Ordering::Relaxed)),
            frames_written: Some(self.frames_written.load(Ordering::Relaxed)),
            bytes_written: Some(self.bytes_written.load(Ordering::Relaxed)),
            frames_read: None,
            bytes_read: None,
            disconnects_by_reason: vec![
                ("eof".into(), 0),
                (
                    "timeout".into(),
                    self.disconnects_timeout.load(Ordering::Relaxed),
                ),
            ],
            fanout_latency: Some(self.fanout.snapshot()),
            queue_depths: vec![QueueDepth {
                queue: "peer_out_bytes".into(),
                shard: Some(0),
                depth: 0,
            }],
            netlink: Some(NetlinkView {
                operations: vec![("route_add".into(), self.netlink_ops.load(Ordering::Relaxed))],
                errors: vec![("route_add".into(), 0)],
            }),
            extra: vec![MetricFamily::single(
                "metalbond_test_label\"odd",
                "A family with a name that needs cleaning.",
                MetricKind::Gauge,
                1.0,
            )],
        }
    }
}

fn route(v: u32, prefix: &str, hop: &str, kind: NextHopKind, target_vni: u32) -> Route {
    let prefix: IpNet = prefix.parse().unwrap();
    let target: IpAddr = hop.parse().unwrap();
    Route::new(
        vni(v),
        prefix,
        NextHop {
            target,
            target_vni,
            kind,
        },
    )
}

/// A status server on an ephemeral loopback port, shut down on drop.
struct Running {
    fleet: Arc<Fleet>,
    handle: Option<HttpHandle>,
}

impl Running {
    fn start() -> Running {
        let fleet = Arc::new(Fleet::default());
        let handle = serve("127.0.0.1:0".parse().unwrap(), fleet.clone()).unwrap();
        Running {
            fleet,
            handle: Some(handle),
        }
    }
    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().local_addr()
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }
    fn get(&self, path: &str) -> (u16, String, String) {
        get(&self.url(path))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

fn sample_routes() -> Vec<Route> {
    vec![
        route(23, "10.0.23.0/24", "2001:db8::1", NextHopKind::Standard, 0),
        route(23, "10.0.23.0/24", "2001:db8::2", NextHopKind::Standard, 0),
        route(
            23,
            "192.0.2.0/24",
            "2001:db8::9",
            NextHopKind::Nat {
                from: 1024,
                to: 2047,
            },
            0,
        ),
        route(
            42,
            "2001:db8:42::/48",
            "2001:db8::3",
            NextHopKind::LoadBalancerTarget,
            7,
        ),
    ]
}

/// A next-hop field of the Go document: `TargetAddress` in JSON,
/// `targetaddress` in YAML (yaml.v2 lower-cases field names).
fn field<'a>(hop: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let lower = name.to_ascii_lowercase();
    hop.get(name)
        .or_else(|| hop.get(lower.as_str()))
        .unwrap_or_else(|| panic!("next hop without {name}: {hop}"))
}

/// Flattens a parsed `/routes.json` or `/routes.yaml` document (the Go
/// shape: destination keys are `{"IPVersion":4,"Prefix":"..."}`, `Type` is
/// the protobuf enum number) into routes.
fn routes_from_document(doc: &serde_json::Value) -> BTreeSet<Route> {
    let mut out = BTreeSet::new();
    let vnet = doc["vnet"].as_object().expect("vnet is a map");
    for (v, dests) in vnet {
        let v: u32 = v.parse().unwrap();
        for (key, hops) in dests.as_object().unwrap() {
            let dest: serde_json::Value = serde_json::from_str(key).expect("key is JSON");
            let prefix = dest["Prefix"].as_str().unwrap();
            let version = if prefix.contains(':') { 6 } else { 4 };
            assert_eq!(dest["IPVersion"], version, "{key}");
            for h in hops.as_array().unwrap() {
                let kind = match field(h, "Type").as_u64().unwrap() {
                    0 => NextHopKind::Standard,
                    1 => NextHopKind::Nat {
                        from: field(h, "NATPortRangeFrom").as_u64().unwrap() as u16,
                        to: field(h, "NATPortRangeTo").as_u64().unwrap() as u16,
                    },
                    2 => NextHopKind::LoadBalancerTarget,
                    other => panic!("unknown type {other}"),
                };
                out.insert(route(
                    v,
                    prefix,
                    field(h, "TargetAddress").as_str().unwrap(),
                    kind,
                    field(h, "TargetVNI").as_u64().unwrap() as u32,
                ));
            }
        }
    }
    out
}

#[test]
fn json_and_yaml_match_the_table() {
    let srv = Running::start();
    for r in sample_routes() {
        srv.fleet.announce(r);
    }
    let want: BTreeSet<Route> = sample_routes().into_iter().collect();

    let (status, ctype, body) = srv.get("/routes.json");
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/json");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["metalbondVersion"], metalbond_http::VERSION);
    let date = doc["date"].as_str().unwrap();
    assert_eq!(date.len(), "2026-01-01 00:00:00".len(), "date {date}");
    assert_eq!(routes_from_document(&doc), want);

    let (status, ctype, body) = srv.get("/routes.yaml");
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/yaml");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&body).unwrap();
    // YAML keys of `vnet` are integers; normalise through JSON for comparison.
    let mut as_json = serde_json::to_value(&yaml).unwrap();
    if let Some(vnet) = as_json.get_mut("vnet").and_then(|v| v.as_object_mut()) {
        let entries: Vec<_> = std::mem::take(vnet).into_iter().collect();
        for (k, v) in entries {
            vnet.insert(k.to_string(), v);
        }
    }
    assert_eq!(routes_from_document(&as_json), want);
    assert_eq!(as_json["metalbondversion"], metalbond_http::VERSION);
}

#[test]
fn metrics_parse_and_counters_move() {
    let srv = Running::start();
    let scrape = |srv: &Running| scrape(&srv.url("/metrics"));
    let value = |s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>| -> f64 {
        let labels: Vec<(&str, &str)> = label.into_iter().collect();
        metric(s, name, &labels).unwrap_or_else(|| panic!("no sample {name} {label:?}"))
    };

    let before = scrape(&srv);
    assert_eq!(value(&before, "metalbond_routes", None), 0.0);
    assert_eq!(
        value(&before, "metalbond_updates_received_total", None),
        0.0
    );
    assert_eq!(
        value(&before, "metalbond_peers", Some(("state", "ESTABLISHED"))),
        1.0
    );
    assert_eq!(
        value(&before, "metalbond_build_info", Some(("role", "server"))),
        1.0
    );

    for r in sample_routes() {
        srv.fleet.announce(r);
    }
    srv.fleet
        .disconnects_timeout
        .fetch_add(2, Ordering::Relaxed);
    let after = scrape(&srv);
    assert_eq!(value(&after, "metalbond_routes", None), 4.0);
    assert_eq!(
        value(&after, "metalbond_vni_routes", Some(("vni", "23"))),
        3.0
    );
    assert_eq!(
        value(&after, "metalbond_vni_routes", Some(("vni", "42"))),
        1.0
    );
    assert_eq!(value(&after, "metalbond_updates_received_total", None), 4.0);
    assert_eq!(value(&after, "metalbond_updates_sent_total", None), 4.0);
    assert_eq!(value(&after, "metalbond_frames_written_total", None), 4.0);
    assert_eq!(value(&after, "metalbond_bytes_written_total", None), 240.0);
    assert_eq!(
        value(
            &after,
            "metalbond_disconnects_total",
            Some(("reason", "timeout"))
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "metalbond_netlink_operations_total",
            Some(("op", "route_add"))
        ),
        4.0
    );
    assert_eq!(
        value(
            &after,
            "metalbond_queue_depth",
            Some(("queue", "peer_out_bytes"))
        ),
        0.0
    );
    // The sanitised free-form family is present under a valid name.
    assert_eq!(value(&after, "metalbond_test_label_odd", None), 1.0);

    let hist = after
        .samples
        .iter()
        .find(|x| x.metric == "metalbond_fanout_latency_seconds")
        .expect("fan-out histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let le_50us = buckets
                .iter()
                .find(|b| (b.less_than - 50e-6).abs() < 1e-12)
                .unwrap();
            assert_eq!(le_50us.count, 4.0);
            let le_25us = buckets
                .iter()
                .find(|b| (b.less_than - 25e-6).abs() < 1e-12)
                .unwrap();
            assert_eq!(le_25us.count, 0.0);
        }
        other => panic!("histogram expected, got {other:?}"),
    }
    assert_eq!(
        value(&after, "metalbond_fanout_latency_seconds_count", None),
        4.0
    );
}

#[test]
fn peers_lists_every_field() {
    let srv = Running::start();
    srv.fleet.announce(sample_routes()[0]);
    let (status, ctype, body) = srv.get("/peers");
    assert_eq!(status, 200);
    assert_eq!(ctype, "application/json");
    let peers: serde_json::Value = serde_json::from_str(&body).unwrap();
    let p = &peers.as_array().unwrap()[0];
    assert_eq!(p["address"], "[::1]:40000");
    assert_eq!(p["state"], "ESTABLISHED");
    assert_eq!(p["shard"], 1);
    assert_eq!(p["keepalive_seconds"], 5);
    assert_eq!(p["routes_announced"], 1);
    assert_eq!(p["vnis_subscribed"], serde_json::json!([23, 42]));
    assert_eq!(p["frames_in"], 1);
    assert_eq!(p["bytes_in"], 60);
    assert_eq!(p["frames_out"], 1);
    assert_eq!(p["bytes_out"], 60);
    assert_eq!(p["connected_since"], "2023-11-14T22:13:20Z");
}

#[test]
fn page_shows_routes_grouped_and_paged() {
    let srv = Running::start();
    for r in sample_routes() {
        srv.fleet.announce(r);
    }
    let (status, ctype, body) = srv.get("/");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"));
    assert!(body.contains("http-equiv=\"refresh\""));
    assert!(body.contains("<b id=\"route-count\">4</b>"));
    assert!(body.contains("<h3 id=\"vni-23\">VNI 23</h3>"));
    assert!(body.contains(
        "<td>192.0.2.0/24</td><td>2001:db8::9</td><td>NAT</td><td>0</td><td>1024-2047</td>"
    ));

    let (_, _, only42) = srv.get("/?vni=42");
    assert!(only42.contains("<h3 id=\"vni-42\">"));
    assert!(!only42.contains("<h3 id=\"vni-23\">"));
    assert!(only42.contains("2001:db8:42::/48"));

    let (_, _, filtered) = srv.get("/?q=192.0.2");
    assert!(filtered.contains("1 matching routes"));

    let (_, _, bad) = srv.get("/?vni=banana");
    assert!(bad.contains("class=\"problem\""));
    assert!(bad.contains("VNI &#39;banana&#39; is not a number"));
}

#[test]
fn hundred_thousand_routes_stay_one_small_page() {
    let srv = Running::start();
    {
        let mut table = srv.fleet.routes.lock().unwrap();
        let hop = NextHop::standard("2001:db8::1".parse().unwrap());
        for i in 0..100_000u32 {
            let prefix: IpNet = format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255)
                .parse()
                .unwrap();
            table.insert(Route::new(vni(100 + (i >> 16)), prefix, hop));
        }
    }
    let (status, _, body) = srv.get("/");
    assert_eq!(status, 200);
    assert!(body.contains("<b id=\"route-count\">100000</b>"));
    assert!(body.contains("page 1 of 200"));
    assert_eq!(
        body.matches("<tr><td>10.").count(),
        metalbond_http::ROWS_PER_PAGE
    );
    assert!(body.len() < 200_000, "page is {} bytes", body.len());

    let (_, _, json) = srv.get("/routes.json");
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(routes_from_document(&doc).len(), 100_000);
}

#[test]
fn unknown_paths_and_methods_are_refused() {
    let srv = Running::start();
    let (status, _, _) = srv.get("/nope");
    assert_eq!(status, 404);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into();
    let resp = agent.post(srv.url("/metrics")).send("x").unwrap();
    assert_eq!(resp.status().as_u16(), 405);
}

#[test]
fn port_in_use_is_a_clear_error_and_shutdown_frees_the_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = match serve(addr, Arc::new(Fleet::default())) {
        Err(e) => e,
        Ok(_) => panic!("bound a port that is in use"),
    };
    assert!(matches!(err, HttpError::Bind { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(msg.contains("already in use"), "{msg}");
    drop(taken);

    // An address this host does not have.
    let err = match serve("192.0.2.1:0".parse().unwrap(), Arc::new(Fleet::default())) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("bound a foreign address"),
    };
    assert!(err.contains("not available"), "{err}");

    // After shutdown the same port can be bound again.
    let handle = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Fleet::default())).unwrap();
    let addr = handle.local_addr();
    handle.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("port {addr} still busy after shutdown: {e}"),
        }
    }
}

#[test]
fn page_loads_in_a_headless_browser() {
    let srv = Running::start();
    let announced = route(77, "10.77.0.0/16", "2001:db8::77", NextHopKind::Standard, 0);
    srv.fleet.announce(announced);
    let dom = match browser_dom(&srv.url("/?vni=77")) {
        Ok(dom) => dom,
        Err(why) => {
            prerequisite::missing(&format!("page_loads_in_a_headless_browser: {why}"));
            return;
        }
    };
    // The DOM as the browser built it: the VNI heading and the route row.
    assert!(dom.contains("VNI 77"), "DOM: {dom}");
    assert!(
        dom.contains("<td>10.77.0.0/16</td><td>2001:db8::77</td><td>STANDARD</td>"),
        "DOM: {dom}"
    );
    assert!(dom.contains("<b id=\"route-count\">1</b>"), "DOM: {dom}");
}

#[test]
fn connection_cap_head_limit_and_timeouts_with_short_limits() {
    use std::io::{Read, Write};
    let limits = metalbond_http::HttpLimits {
        max_connections: 4,
        max_head_bytes: 8192,
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let fleet = Arc::new(Fleet::default());
    let handle =
        metalbond_http::serve_with_limits("127.0.0.1:0".parse().unwrap(), fleet.clone(), limits)
            .unwrap();
    let srv = Running {
        fleet,
        handle: Some(handle),
    };
    let addr = srv.addr();

    // Four idle connections fill the cap: a fifth is closed at once.
    let mut idle: Vec<std::net::TcpStream> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = std::net::TcpStream::connect(addr).unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(3)),
        "a connection beyond the cap was kept"
    );
    // The silent ones are closed by the header read timeout (1 s), well
    // within 5 s; then the port answers again.
    let started = Instant::now();
    for s in &mut idle {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "idle connection kept"
        );
    }
    assert!(started.elapsed() >= Duration::from_millis(500));
    let (status, _, _) = srv.get("/metrics");
    assert_eq!(status, 200);

    // A kept-alive connection after a full request is closed when no next
    // request head arrives within the header read timeout (1 s), not before.
    let mut kept = std::net::TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    kept.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let answered = Instant::now();
    assert!(
        closed_within(&mut kept, Duration::from_secs(10)),
        "kept-alive connection never closed"
    );
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(700) && idle_for < Duration::from_secs(8),
        "closed after {idle_for:?}"
    );

    // A client that stops reading a large answer is cut off after the idle
    // timeout (2 s): were the connection kept, reading on would get the
    // whole document and then wait for the next one.
    for v in 0..100u32 {
        for i in 0..1000u32 {
            let prefix = format!("10.{}.{}.0/24", v, i % 250);
            let hop = format!("2001:db8::{:x}", i / 250 + 1);
            srv.fleet
                .announce(route(v + 1, &prefix, &hop, NextHopKind::Standard, 0));
        }
    }
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    stalled
        .write_all(b"GET /routes.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        closed_within(&mut stalled, Duration::from_secs(10)),
        "a connection whose client stopped reading was kept"
    );

    // A head that reaches 8 KiB without ending gets 431. (Exactly 8 KiB, so
    // that the server has read all of it when it closes: unread bytes would
    // make the kernel reset the connection and drop the answer.)
    let mut big = std::net::TcpStream::connect(addr).unwrap();
    let mut request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    request.resize(8192, b'a');
    big.write_all(&request).unwrap();
    let mut answer = Vec::new();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "answer: {answer}");
}

/// A reader that stops reading its `/api/v1/routes` page keeps the page's
/// place among `HttpLimits::max_route_pages` until it has taken the bytes:
/// meanwhile another page request is answered 503 at once, afterwards 200.
/// So the memory slow readers pin is bounded by the cap, not by how many
/// connections they hold.
#[test]
fn a_slow_reader_holds_its_route_page_place_until_it_has_read_the_page() {
    use std::io::{Read, Write};
    let fleet = Arc::new(Fleet::default());
    let hop = NextHop::standard("2001:db8::1".parse().unwrap());
    for i in 0..10_000u32 {
        let prefix: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
        fleet.announce(Route::new(vni(23), prefix, hop));
    }
    let limits = metalbond_http::HttpLimits {
        max_route_pages: 1,
        ..Default::default()
    };
    let handle =
        metalbond_http::serve_with_limits("127.0.0.1:0".parse().unwrap(), fleet.clone(), limits)
            .unwrap();
    let srv = Running {
        fleet,
        handle: Some(handle),
    };
    let addr = srv.addr();
    let url = format!("http://{addr}/api/v1/routes?vni=23&limit=10000");

    // The slow reader: asks for a page of 10,000 routes (about 1.8 MB, more
    // than the sockets buffer) and reads nothing yet.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /api/v1/routes?vni=23&limit=10000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let refused = metalbond_test_support::eventually_some(
        Duration::from_secs(10),
        "a page request refused while the slow reader holds the place",
        || {
            let (status, _, body) = get(&url);
            (status == 503).then_some(body)
        },
    );
    assert!(refused.contains("route pages are being sent"), "{refused}");

    // The slow reader takes its page: the place is free again.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !seen.ends_with(b"}\n") {
        let n = slow.read(&mut buf).expect("the page keeps coming");
        assert!(n > 0, "closed before the page ended");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.len() > 1_000_000, "{} bytes", seen.len());
    let (status, _, body) = get(&url);
    assert_eq!(status, 200, "{}", &body[..body.len().min(300)]);
}
