//! The HTTP status side of the client: a real reflector on loopback, one
//! client announcing, one subscribed client with `--http`-style status pages;
//! what the subscribed client received must show in its `/routes.json`,
//! `/peers` and `/metrics`.
//!
//! Every wait has a deadline; servers, clients and HTTP handles are stopped
//! in `Drop` even when an assertion fails.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use metalbond::client::{Client, ClientConfig, LogSink};
use metalbond::server::{Server, ServerConfig, ServerHandle};
use metalbond::session::SessionState;
use metalbond::{IpNet, NextHop, Route, Vni};

/// Bound for anything a test waits for (never reached when correct).
const WAIT: Duration = Duration::from_secs(20);

/// Stops what it holds in the right order on drop: HTTP, clients, server.
struct Setup {
    http: Option<metalbond::http::HttpHandle>,
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
    }
}

fn get(url: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into();
    agent
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
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
    setup.http =
        Some(metalbond::client::http::serve("127.0.0.1:0".parse().unwrap(), &receiver).unwrap());
    let base = format!("http://{}", setup.http.as_ref().unwrap().local_addr());
    setup.clients.push(receiver);
    setup.clients.push(announcer);

    let doc = eventually("route in the client's /routes.json", || {
        let doc: serde_json::Value =
            serde_json::from_str(&get(&format!("{base}/routes.json"))).ok()?;
        doc["vnet"]["23"]["10.23.1.0/24"].is_array().then_some(doc)
    });
    assert_eq!(
        doc["vnet"]["23"]["10.23.1.0/24"][0]["TargetAddress"],
        "2001:db8::5"
    );
    assert_eq!(doc["vnet"]["23"]["10.23.1.0/24"][0]["Type"], "STANDARD");

    let peers: serde_json::Value = serde_json::from_str(&get(&format!("{base}/peers"))).unwrap();
    let p = &peers.as_array().unwrap()[0];
    assert_eq!(p["address"], address);
    assert_eq!(p["state"], SessionState::Established.name());
    assert_eq!(p["vnis_subscribed"], serde_json::json!([23]));
    assert_eq!(p["routes_received"], 1);
    assert_eq!(p["routes_announced"], 0);

    let text = get(&format!("{base}/metrics"));
    let s = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let find = |name: &str, label: Option<(&str, &str)>| {
        s.samples
            .iter()
            .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        find("metalbond_build_info", Some(("role", "client"))),
        Some(1.0)
    );
    assert_eq!(find("metalbond_routes", None), Some(1.0));
    assert_eq!(find("metalbond_vni_routes", Some(("vni", "23"))), Some(1.0));
    assert_eq!(
        find("metalbond_peers", Some(("state", "ESTABLISHED"))),
        Some(1.0)
    );
    let page = get(&format!("{base}/"));
    assert!(page.contains("MetalBond client route table"));
    assert!(page.contains("<td>10.23.1.0/24</td><td>2001:db8::5</td>"));
}
