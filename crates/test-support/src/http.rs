//! Client side of the HTTP status tests, shared by the `http_*.rs` files and
//! the kernel-route end-to-end test: a bounded GET, `/metrics` parsed with a
//! Prometheus text-format parser, and headless Chromium that loads a URL and
//! returns the DOM the browser built.
//!
//! Owns: the GET's 10 s bound; reading samples out of a scrape; finding the
//! browser, a fresh profile per run, the 90 s bound, and cleanup (the process is killed and the profile removed on drop, also when
//! an assertion fails). Never silently passes: a missing browser is an `Err`
//! the caller hands to `prerequisite::missing` (a failure under `CI=true`).

// Each test file uses a part of this module.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Reads from `s` until EOF or error; true when the server closed the
/// connection (EOF or reset) within `within`, false when it stayed open.
pub fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// GET with a 10 s bound: (status, content type, body).
pub fn get(url: &str) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into();
    let mut resp = agent.get(url).call().unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .unwrap();
    (status, ctype, body)
}

/// GETs `url` (a `/metrics` page), checks the status and content type, and
/// parses the body with a Prometheus text-format parser.
pub fn scrape(url: &str) -> prometheus_parse::Scrape {
    let (status, ctype, body) = get(url);
    assert_eq!(status, 200, "GET {url}: {body}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{url} does not parse: {e}"))
}

/// The value of the first sample `name` whose labels include `labels`.
pub fn metric(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))?;
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(*v),
        _ => None,
    }
}

/// The sum over every sample of `name` (all label values).
pub fn metric_sum(s: &prometheus_parse::Scrape, name: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => f64::NAN,
        })
        .sum()
}

/// A headless Chromium run, killed and its profile removed on drop.
struct Browser {
    child: Option<Child>,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Finds Chromium, or says why a browser test cannot run.
fn chromium() -> Result<&'static str, String> {
    for name in ["chromium", "chromium-browser"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return Ok(name);
        }
    }
    Err("chromium is not installed (.ci/run installs Debian's package)".into())
}

/// The DOM of `url` as headless Chromium builds it, or why it cannot run.
pub fn browser_dom(url: &str) -> Result<String, String> {
    let bin = chromium()?;
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let profile =
        std::env::temp_dir().join(format!("metalbond-chromium-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&profile).unwrap();
    let mut browser = Browser {
        child: None,
        profile: profile.clone(),
    };
    let child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    browser.child = Some(child);
    let mut stdout = browser.child.as_mut().unwrap().stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = browser.child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "chromium did not finish in 90 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    browser.child = None;
    let dom = reader.join().unwrap();
    assert!(status.success(), "chromium exited with {status}");
    Ok(dom)
}
