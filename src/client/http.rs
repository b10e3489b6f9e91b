//! `--http ADDR` for the client: the present routes over plain HTTP/1.0.
//!
//! Owns: one listener thread answering `GET /` (an HTML page grouped by VNI,
//! auto-refreshing), `GET /routes.json` and `GET /routes.yaml` (date,
//! version, and per VNI the destinations with their next hops), one request
//! per connection.
//!
//! Must never: hold the client lock while writing to a socket (it copies the
//! route list first), or let a slow HTTP peer stall the client (each
//! connection has short timeouts).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Client, ClientInner};
use crate::types::{NextHopKind, Route};

/// The running HTTP listener; dropping it stops the thread.
pub struct HttpStatus {
    /// Where it listens (the real port when 0 was asked for).
    pub local_addr: SocketAddr,
    /// Tells the thread to stop.
    stop: Arc<AtomicBool>,
    /// The listener thread.
    thread: Option<JoinHandle<()>>,
}

/// Starts serving the client's present routes on `addr`.
pub fn serve(addr: SocketAddr, client: &Client) -> std::io::Result<HttpStatus> {
    let listener = TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let inner = Arc::downgrade(&client.inner);
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("mb-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    if let Err(e) = answer(conn, &inner) {
                        tracing::debug!("http: {e}");
                    }
                }
            }
        })?;
    tracing::info!(%local_addr, "http status page listening");
    Ok(HttpStatus {
        local_addr,
        stop,
        thread: Some(thread),
    })
}

impl Drop for HttpStatus {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn answer(conn: TcpStream, inner: &Weak<ClientInner>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut request_line = String::new();
    BufReader::new(&conn).take_line(&mut request_line)?;
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let Some(inner) = inner.upgrade() else {
        return Ok(());
    };
    let mut routes = inner.lock().present.present();
    drop(inner);
    routes.sort();
    let (status, content_type, body) = match path {
        "/" => ("200 OK", "text/html; charset=utf-8", html(&routes)),
        "/routes.json" => ("200 OK", "application/json", json(&routes)),
        "/routes.yaml" => ("200 OK", "application/yaml", yaml(&routes)),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one line, bounded (a request line longer than 8 KiB is cut).
trait TakeLine {
    fn take_line(&mut self, line: &mut String) -> std::io::Result<usize>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        use std::io::Read;
        self.take(8192).read_line(line)
    }
}

fn kind_name(kind: NextHopKind) -> &'static str {
    match kind {
        NextHopKind::Standard => "STANDARD",
        NextHopKind::Nat { .. } => "NAT",
        NextHopKind::LoadBalancerTarget => "LOADBALANCER_TARGET",
    }
}

type Grouped<'a> = BTreeMap<u32, BTreeMap<String, Vec<&'a Route>>>;

fn grouped(routes: &[Route]) -> Grouped<'_> {
    let mut g: Grouped = BTreeMap::new();
    for r in routes {
        g.entry(r.vni.get())
            .or_default()
            .entry(r.destination.to_string())
            .or_default()
            .push(r);
    }
    g
}

fn nat_range(kind: NextHopKind) -> (u16, u16) {
    match kind {
        NextHopKind::Nat { from, to } => (from, to),
        _ => (0, 0),
    }
}

fn json(routes: &[Route]) -> String {
    let mut vnis = serde_json::Map::new();
    for (vni, dests) in grouped(routes) {
        let mut d = serde_json::Map::new();
        for (dest, rs) in dests {
            let hops: Vec<serde_json::Value> = rs
                .iter()
                .map(|r| {
                    let (from, to) = nat_range(r.next_hop.kind);
                    serde_json::json!({
                        "targetAddress": r.next_hop.target.to_string(),
                        "targetVNI": r.next_hop.target_vni,
                        "type": kind_name(r.next_hop.kind),
                        "natPortRangeFrom": from,
                        "natPortRangeTo": to,
                    })
                })
                .collect();
            d.insert(dest, serde_json::Value::Array(hops));
        }
        vnis.insert(vni.to_string(), serde_json::Value::Object(d));
    }
    let doc = serde_json::json!({
        "date": rfc3339_now(),
        "version": env!("CARGO_PKG_VERSION"),
        "vnis": vnis,
    });
    let mut s = doc.to_string();
    s.push('\n');
    s
}

fn yaml(routes: &[Route]) -> String {
    let mut s = format!(
        "date: \"{}\"\nversion: \"{}\"\nvnis:\n",
        rfc3339_now(),
        env!("CARGO_PKG_VERSION")
    );
    for (vni, dests) in grouped(routes) {
        let _ = writeln!(s, "  \"{vni}\":");
        for (dest, rs) in dests {
            let _ = writeln!(s, "    \"{dest}\":");
            for r in rs {
                let (from, to) = nat_range(r.next_hop.kind);
                let _ = writeln!(
                    s,
                    "      - {{targetAddress: \"{}\", targetVNI: {}, type: {}, natPortRangeFrom: {from}, natPortRangeTo: {to}}}",
                    r.next_hop.target,
                    r.next_hop.target_vni,
                    kind_name(r.next_hop.kind)
                );
            }
        }
    }
    s
}

fn html(routes: &[Route]) -> String {
    let mut s = String::from(
        "<!DOCTYPE html><html><head><meta http-equiv=\"refresh\" content=\"5\"><title>MetalBond client</title></head><body><h1>MetalBond client: present routes</h1>\n",
    );
    for (vni, dests) in grouped(routes) {
        let _ = writeln!(
            s,
            "<h2>VNI {vni}</h2><table border=\"1\"><tr><th>Destination</th><th>Next hops</th></tr>"
        );
        for (dest, rs) in dests {
            let hops: Vec<String> = rs.iter().map(|r| r.next_hop.to_string()).collect();
            let _ = writeln!(s, "<tr><td>{dest}</td><td>{}</td></tr>", hops.join("<br>"));
        }
        s.push_str("</table>\n");
    }
    s.push_str("</body></html>\n");
    s
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, no time-zone database).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{NextHop, Vni};

    #[test]
    fn json_groups_by_vni_and_destination() {
        let r = |hop: &str| {
            Route::new(
                Vni::new(23).unwrap(),
                "10.0.0.0/24".parse().unwrap(),
                NextHop::standard(hop.parse().unwrap()),
            )
        };
        let doc: serde_json::Value =
            serde_json::from_str(&json(&[r("2001:db8::1"), r("2001:db8::2")])).unwrap();
        let hops = &doc["vnis"]["23"]["10.0.0.0/24"];
        assert_eq!(hops.as_array().unwrap().len(), 2);
        assert_eq!(hops[0]["targetAddress"], "2001:db8::1");
        assert_eq!(hops[0]["type"], "STANDARD");
        assert!(doc["date"].as_str().unwrap().ends_with('Z'));
        assert!(yaml(&[r("2001:db8::1")]).contains("\"10.0.0.0/24\":"));
        assert!(html(&[r("2001:db8::1")]).contains("VNI 23"));
    }

    #[test]
    fn date_is_rfc3339() {
        let d = rfc3339_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20"));
    }
}
