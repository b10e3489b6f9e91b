//! The HTTP status side (`--http ADDR` on `server` and `client`): the route
//! table for people (`/`), for scripts (`/routes.json`, `/routes.yaml`),
//! peers (`/peers`), the peer policy (`/policy`) and Prometheus metrics
//! (`/metrics`).
//!
//! Owns: the listening socket and its thread (`listener`: hyper on a small
//! tokio runtime, with the limits of `HttpLimits`), routing of requests to
//! renderers, and the short-lived route snapshot cache (with its JSON and
//! YAML documents, rendered once per snapshot and shared by every request).
//!
//! Must never: run on, lock, or wait for a shard, or import `server` or
//! `client`: it serves any `telemetry::StatusSource` (the binary hands it
//! the server's or the client's). Everything it shows comes through
//! `StatusSource`, whose implementations read atomics or copies that
//! the data path publishes; a slow or hostile HTTP client can only slow the
//! status port, within its limits. No hand-written HTTP parsing: `hyper`
//! speaks HTTP.
//!
//! ```text
//!  shards / sessions ──(atomics, snapshots)──► StatusSource (Arc<dyn>)
//!                                                   │ routes() peers() metrics()
//!  "http" thread: accept loop + connections ─► blocking pool (HTTP_WORKERS)
//!   (hyper, capped, timeouts, one fd each)         │ render html / json / yaml / text
//!                                                   ▼
//!                                              response to the client
//! ```

mod go_document;
mod listener;
mod metrics;
mod page;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::util::TtlCache;

// The status model and trait live in `telemetry` (below server, client and
// http); re-exported so `metalbond::http::StatusSource` etc. keep working.
pub use crate::telemetry::status::{
    count_states, DestinationView, MetricFamily, MetricKind, MetricSample, MetricsView, PeerView,
    QueueDepth, RouteTableView, StatusRole, StatusSource, VniRoutesView,
};
pub use crate::telemetry::{HistogramView, LatencyHistogram, NetlinkView};
pub use listener::HttpLimits;
pub use page::{MAX_VNI_SUMMARY_ROWS, REFRESH_SECONDS, ROWS_PER_PAGE};

/// The version shown on the page, in `/routes.json` and in `/metrics`.
pub use crate::version::VERSION;

/// Threads rendering answers (the runtime's blocking pool, started on
/// demand). Two, so that one slow render (a large `/routes.json`) does not
/// hold up a Prometheus scrape; connections themselves need no thread.
pub const HTTP_WORKERS: usize = 2;

/// How long a route snapshot is reused: bounds how often many browsers and
/// scrapers together can make the state owner copy its tables.
pub const ROUTE_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// Why the status server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listening socket could not be opened (port in use, address not
    /// on this host, permission).
    #[error("cannot listen for HTTP on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the kernel said, in words.
        reason: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
    /// The HTTP runtime could not be built or refused the socket.
    #[error("cannot start the HTTP server on {addr}: {reason}")]
    Start {
        /// The address asked for.
        addr: SocketAddr,
        /// The library's message.
        reason: String,
    },
    /// The HTTP thread could not be spawned.
    #[error("cannot start an HTTP thread: {0}")]
    Thread(io::Error),
}

/// A running status server. Dropping it shuts it down.
pub struct HttpHandle {
    /// The address actually bound (port 0 resolved).
    local_addr: SocketAddr,
    /// Wakes the accept loop to stop it.
    stop: Arc<tokio::sync::Notify>,
    /// The runtime thread, joined by `shutdown`.
    thread: Option<JoinHandle<()>>,
}

impl HttpHandle {
    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops answering, closes the listening socket and every connection,
    /// and joins the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.notify_one();
            let _ = thread.join();
            tracing::info!(addr = %self.local_addr, "HTTP status server stopped");
        }
    }
}

impl Drop for HttpHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `addr` and serves the status pages from `source` with the default
/// `HttpLimits` on their own thread until the handle is shut down or dropped.
pub fn serve(addr: SocketAddr, source: Arc<dyn StatusSource>) -> Result<HttpHandle, HttpError> {
    serve_with_limits(addr, source, HttpLimits::default())
}

/// `serve` with explicit limits (connection cap, head size, timeouts).
pub fn serve_with_limits(
    addr: SocketAddr,
    source: Arc<dyn StatusSource>,
    limits: HttpLimits,
) -> Result<HttpHandle, HttpError> {
    let listener = TcpListener::bind(addr).map_err(|e| HttpError::Bind {
        addr,
        reason: bind_reason(&e),
        source: e,
    })?;
    let local_addr = listener.local_addr().map_err(|e| HttpError::Bind {
        addr,
        reason: bind_reason(&e),
        source: e,
    })?;
    let role = source.role();
    let responder = Arc::new(Responder {
        source,
        cache: RouteCache::default(),
    });
    let (thread, stop) = listener::start(listener, addr, responder, limits.clone())?;
    tracing::info!(
        addr = %local_addr,
        role = role.name(),
        max_connections = limits.max_connections,
        "HTTP status server listening"
    );
    Ok(HttpHandle {
        local_addr,
        stop,
        thread: Some(thread),
    })
}

/// The operator-facing cause of a bind failure.
fn bind_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use (another process listens there)".into(),
        io::ErrorKind::AddrNotAvailable => "address not available on this host".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// One route snapshot, with its `/routes.json` and `/routes.yaml` documents
/// rendered at most once: scrapers fetching the same snapshot share the
/// bytes instead of serialising 100,000 routes each.
struct RouteSnapshot {
    /// When the snapshot was taken (the documents' `date`).
    wall: SystemTime,
    /// The table.
    table: RouteTableView,
    /// `/routes.json`, rendered by the first request that wants it.
    json: OnceLock<Arc<str>>,
    /// `/routes.yaml`, rendered by the first request that wants it.
    yaml: OnceLock<Arc<str>>,
}

impl RouteSnapshot {
    /// The `/routes.json` document.
    fn json(&self) -> Arc<str> {
        self.json
            .get_or_init(|| Arc::from(go_document::json(&self.table, self.wall, VERSION)))
            .clone()
    }

    /// The `/routes.yaml` document.
    fn yaml(&self) -> Arc<str> {
        self.yaml
            .get_or_init(|| Arc::from(go_document::yaml(&self.table, self.wall, VERSION)))
            .clone()
    }
}

/// The last route snapshot, reused for `ROUTE_SNAPSHOT_MAX_AGE`.
struct RouteCache(TtlCache<Arc<RouteSnapshot>>);

impl Default for RouteCache {
    fn default() -> RouteCache {
        RouteCache(TtlCache::new(ROUTE_SNAPSHOT_MAX_AGE))
    }
}

impl RouteCache {
    /// A snapshot at most `ROUTE_SNAPSHOT_MAX_AGE` old.
    fn get(&self, source: &dyn StatusSource) -> Arc<RouteSnapshot> {
        self.0.get_or_compute(|| {
            Arc::new(RouteSnapshot {
                table: source.routes(),
                wall: SystemTime::now(),
                json: OnceLock::new(),
                yaml: OnceLock::new(),
            })
        })
    }
}

/// Renders answers: the data source and the shared route snapshot. Called
/// on the runtime's blocking pool, never on the accept loop.
pub(crate) struct Responder {
    /// Where the data comes from.
    source: Arc<dyn StatusSource>,
    /// Shared route snapshot.
    cache: RouteCache,
}

impl Responder {
    /// The reply to a GET (or HEAD) of `path` with `query`.
    fn answer(&self, path: &str, query: &str) -> Reply {
        match path {
            "/" | "/index.html" => {
                let snapshot = self.cache.get(self.source.as_ref());
                let header = page::PageHeader {
                    role: self.source.role(),
                    version: VERSION,
                    now: snapshot.wall,
                    peers: self.source.peers().len(),
                    policy: self.source.policy().map(|p| page::policy_summary(&p)),
                };
                let body = page::render(&snapshot.table, &header, &page::PageQuery::parse(query));
                Reply::text(200, "text/html; charset=utf-8", body)
            }
            "/routes.json" => Reply::shared(
                200,
                "application/json",
                self.cache.get(self.source.as_ref()).json(),
            ),
            "/routes.yaml" => Reply::shared(
                200,
                "text/yaml",
                self.cache.get(self.source.as_ref()).yaml(),
            ),
            "/peers" | "/peers.json" => match serde_json::to_string_pretty(&self.source.peers()) {
                Ok(mut body) => {
                    body.push('\n');
                    Reply::text(200, "application/json", body)
                }
                Err(e) => internal_error(&e),
            },
            "/policy" | "/policy.json" => match self.source.policy() {
                None => Reply::text(
                    404,
                    "text/plain; charset=utf-8",
                    "no peer policy: the server runs without --policy\n".into(),
                ),
                Some(status) => match serde_json::to_string_pretty(&status) {
                    Ok(mut body) => {
                        body.push('\n');
                        Reply::text(200, "application/json", body)
                    }
                    Err(e) => internal_error(&e),
                },
            },
            "/metrics" => {
                let body = metrics::render(&self.source.metrics(), self.source.role(), VERSION);
                Reply::text(200, metrics::CONTENT_TYPE, body)
            }
            _ => Reply::text(
                404,
                "text/plain; charset=utf-8",
                "not found; try / /routes.json /routes.yaml /peers /metrics\n".into(),
            ),
        }
    }
}

/// A response about to be sent.
struct Reply {
    /// HTTP status code.
    status: u16,
    /// Content-Type header value.
    content_type: &'static str,
    /// The body.
    body: Body,
}

/// A response body: rendered for this request, or shared with other
/// requests for the same route snapshot (sent without a copy).
enum Body {
    /// Rendered for this request.
    Owned(String),
    /// A cached document.
    Shared(Arc<str>),
}

impl Reply {
    /// A body rendered for this request.
    fn text(status: u16, content_type: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type,
            body: Body::Owned(body),
        }
    }

    /// A cached document shared with other requests.
    fn shared(status: u16, content_type: &'static str, body: Arc<str>) -> Reply {
        Reply {
            status,
            content_type,
            body: Body::Shared(body),
        }
    }
}

/// A 500 naming what failed (logged too).
fn internal_error(e: &dyn std::fmt::Display) -> Reply {
    tracing::warn!(error = %e, "HTTP status rendering failed");
    Reply::text(
        500,
        "text/plain; charset=utf-8",
        format!("rendering failed: {e}\n"),
    )
}
