//! The HTTP status side of the client: a real reflector on loopback, one
//! client announcing, one subscribed client with `--http`-style status pages;
//! what the subscribed client received must show in its `/routes.json`,
//! `/peers` and `/metrics`.
//!
//! Every wait has a deadline; servers, clients and HTTP handles are stopped
//! in `Drop` even when an assertion fails.

use metalbond_test_support::eventually_some;
use metalbond_test_support::process::ChildGuard;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use metalbond_client::ClientStatusSource;
use metalbond_client::{Client, ClientConfig, LogSink};
use metalbond_server::{Server, ServerConfig, ServerHandle};
use metalbond_wire::session::SessionState;
use metalbond_wire::{IpNet, NextHop, Route, Vni};

use http_support::{metric, metric_sum, scrape};
use metalbond_test_support::http as http_support;

/// Bound for anything a test waits for (never reached when correct).
const WAIT: Duration = Duration::from_secs(20);

/// Stops what it holds in the right order on drop: HTTP, clients, server.
struct Setup {
    http: Option<metalbond_http::HttpHandle>,
    clients: Vec<Client>,
    server: Option<ServerHandle>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(h) = self.http.take() {
            h.shutdown();
        }
        for c in self.clients.drain(..) {
            c.shutdown();
        }
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn config() -> ClientConfig {
    ClientConfig {
        keepalive: Duration::from_secs(1),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

fn get(url: &str) -> String {
    let (status, _, body) = http_support::get(url);
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// `/metrics` parsed, with the lookups this test makes.
struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    fn scrape(base: &str) -> Metrics {
        Metrics(scrape(&format!("{base}/metrics")))
    }

    /// The first sample of `name` (with `label`, if given).
    fn find(&self, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let labels: Vec<(&str, &str)> = label.into_iter().collect();
        metric(&self.0, name, &labels)
    }

    /// A family every client serves; panics naming it when it is missing.
    fn value(&self, name: &str) -> f64 {
        self.find(name, None)
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }

    /// Sum over every sample of a labelled family.
    fn sum(&self, name: &str) -> f64 {
        metric_sum(&self.0, name)
    }
}

#[test]
fn client_status_shows_received_routes_servers_and_metrics() {
    let mut c = ServerConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
    c.shards = 1;
    c.pin_cpus = false;
    let server = Server::start(c).unwrap();
    let address = server.local_addrs()[0].to_string();
    let mut setup = Setup {
        http: None,
        clients: Vec::new(),
        server: Some(server),
    };

    let vni = Vni::new(23).unwrap();
    let prefix: IpNet = "10.23.1.0/24".parse().unwrap();
    let target: IpAddr = "2001:db8::5".parse().unwrap();
    let route = Route::new(vni, prefix, NextHop::standard(target));

    let receiver = Client::new(config(), LogSink);
    receiver.subscribe(vni).unwrap();
    receiver.add_server(&address).unwrap();
    let announcer = Client::new(config(), LogSink);
    announcer.announce(route).unwrap();
    announcer.add_server(&address).unwrap();
    setup.http = Some(
        metalbond_http::serve(
            "127.0.0.1:0".parse().unwrap(),
            std::sync::Arc::new(ClientStatusSource::new(&receiver, None)),
        )
        .unwrap(),
    );
    let base = format!("http://{}", setup.http.as_ref().unwrap().local_addr());
    setup.clients.push(receiver);
    setup.clients.push(announcer);

    // The Go document: destination keys are `{IPVersion, Prefix}` as JSON,
    // `Type` is the protobuf number (0: standard).
    let key = r#"{"IPVersion":4,"Prefix":"10.23.1.0/24"}"#;
    let doc = eventually_some(WAIT, "route in the client's /routes.json", || {
        let doc: serde_json::Value =
            serde_json::from_str(&get(&format!("{base}/routes.json"))).ok()?;
        doc["vnet"]["23"][key].is_array().then_some(doc)
    });
    assert_eq!(doc["vnet"]["23"][key][0]["TargetAddress"], "2001:db8::5");
    assert_eq!(doc["vnet"]["23"][key][0]["Type"], 0);

    let peers: serde_json::Value = serde_json::from_str(&get(&format!("{base}/peers"))).unwrap();
    let p = &peers.as_array().unwrap()[0];
    assert_eq!(p["address"], address);
    assert_eq!(p["state"], SessionState::Established.name());
    assert_eq!(p["vnis_subscribed"], serde_json::json!([23]));
    assert_eq!(p["routes_received"], 1);
    assert_eq!(p["routes_announced"], 0);

    assert_eq!(p["keepalive_seconds"], 1);
    assert!(p["connected_since"].is_string(), "{p}");
    // HELLO + UPDATE in, HELLO + SUBSCRIBE out at least.
    assert!(p["frames_in"].as_u64().unwrap() >= 2, "{p}");
    assert!(p["frames_out"].as_u64().unwrap() >= 2, "{p}");
    assert!(p["bytes_in"].as_u64().unwrap() > 0, "{p}");
    assert!(p["bytes_out"].as_u64().unwrap() > 0, "{p}");

    let m = Metrics::scrape(&base);
    assert_eq!(
        m.find("metalbond_build_info", Some(("role", "client"))),
        Some(1.0)
    );
    assert_eq!(m.find("metalbond_routes", None), Some(1.0));
    assert_eq!(
        m.find("metalbond_vni_routes", Some(("vni", "23"))),
        Some(1.0)
    );
    assert_eq!(
        m.find("metalbond_peers", Some(("state", "ESTABLISHED"))),
        Some(1.0)
    );
    assert_eq!(m.value("metalbond_updates_received_total"), 1.0);
    assert_eq!(m.value("metalbond_updates_sent_total"), 0.0);
    assert_eq!(m.value("metalbond_sessions_established_total"), 1.0);
    assert_eq!(m.sum("metalbond_disconnects_total"), 0.0);
    assert!(m.value("metalbond_frames_written_total") >= 2.0);
    assert!(m.value("metalbond_bytes_written_total") > 0.0);

    // One more route: exactly one more UPDATE in, and the read counters
    // grow by at least that frame.
    let second = Route::new(
        vni,
        "10.23.2.0/24".parse().unwrap(),
        NextHop::standard(target),
    );
    setup.clients[1].announce(second).unwrap();
    let after = eventually_some(WAIT, "second route counted", || {
        let m = Metrics::scrape(&base);
        (m.find("metalbond_routes", None) == Some(2.0)).then_some(m)
    });
    assert_eq!(after.value("metalbond_updates_received_total"), 2.0);
    assert!(
        after.value("metalbond_frames_read_total") >= m.value("metalbond_frames_read_total") + 1.0
    );
    assert!(after.value("metalbond_bytes_read_total") > m.value("metalbond_bytes_read_total"));
    // The announcer counts what it sent.
    assert_eq!(setup.clients[1].traffic().updates_out, 2);

    let page = get(&format!("{base}/"));
    assert!(page.contains("MetalBond client route table"));
    assert!(page.contains("<td>10.23.1.0/24</td><td>2001:db8::5</td>"));

    // The server goes away: the session ends, is counted by reason, and the
    // peer shows as no longer connected.
    if let Some(server) = setup.server.take() {
        server.shutdown();
    }
    let gone = eventually_some(WAIT, "disconnect counted", || {
        let m = Metrics::scrape(&base);
        (m.sum("metalbond_disconnects_total") >= 1.0).then_some(m)
    });
    assert_eq!(
        gone.find("metalbond_peers", Some(("state", "ESTABLISHED"))),
        Some(0.0)
    );
    let peers: serde_json::Value = serde_json::from_str(&get(&format!("{base}/peers"))).unwrap();
    assert_ne!(peers[0]["state"], SessionState::Established.name());
    assert!(peers[0]["keepalive_seconds"].is_null(), "{peers}");
}

/// `metalbond client --http`: `/readyz` follows the rule that sends systemd
/// `READY=1` (every server had a session or a failed attempt): 503 while
/// its only server accepts TCP and never answers the handshake, 200 once
/// that attempt failed; `/healthz` is 200 throughout.
#[test]
fn client_binary_readyz_waits_for_every_server_to_settle() {
    use std::process::{Command, Stdio};
    // Accepts connections (the kernel completes them) but never reads or
    // answers: the client's session stays in its handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = silent.local_addr().unwrap();
    let http = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_metalbond"))
            .args([
                "client",
                "--server",
                &server.to_string(),
                "--subscribe",
                "23",
            ])
            .args(["--http", &http.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn metalbond client"),
    );
    let url = |path: &str| format!("http://{http}{path}");
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(http).is_err() {
        assert!(
            Instant::now() < deadline,
            "the client's status port never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _, body) = http_support::get(&url("/readyz"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        "not ready: 0 of 1 servers have had a session or a failed attempt since start\n"
    );
    assert_eq!(get(&url("/healthz")), "ok\n");
    // The listener goes away: the pending handshake fails, the server has
    // settled (a failed attempt), the client is ready.
    drop(silent);
    loop {
        let (status, _, body) = http_support::get(&url("/readyz"));
        if status == 200 {
            assert_eq!(body, "ready: 0 of 1 servers established\n");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
