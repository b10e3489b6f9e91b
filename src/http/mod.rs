//! The HTTP status side (`--http ADDR` on `server` and `client`): the route
//! table for people (`/`), for scripts (`/routes.json`, `/routes.yaml`),
//! peers (`/peers`) and Prometheus metrics (`/metrics`).
//!
//! Owns: the listening socket, the HTTP threads, routing of requests to
//! renderers, and the short-lived route snapshot cache (with its JSON and
//! YAML documents, rendered once per snapshot and shared by every request).
//!
//! Must never: run on, lock, or wait for a shard. Everything it shows comes
//! through `StatusSource`, whose implementations read atomics or copies that
//! the data path publishes; a slow or hostile HTTP client can only slow the
//! HTTP threads. No hand-written HTTP parsing: `tiny_http` speaks HTTP.
//!
//! ```text
//!  shards / sessions ──(atomics, snapshots)──► StatusSource (Arc<dyn>)
//!                                                   │ routes() peers() metrics()
//!  tiny_http accept thread ─► request queue ─► HTTP_WORKERS worker threads
//!   (one thread per open connection)              │ render html / json / yaml / text
//!                                                   ▼
//!                                              response to the client
//! ```

pub mod go_document;
mod histogram;
mod metrics;
pub mod model;
mod page;
mod server_source;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

pub use histogram::{HistogramView, LatencyHistogram};
pub use model::{
    count_states, DestinationView, MetricFamily, MetricKind, MetricSample, MetricsView,
    NetlinkView, PeerView, QueueDepth, RouteTableView, StatusRole, VniRoutesView,
};
pub use page::{MAX_VNI_SUMMARY_ROWS, REFRESH_SECONDS, ROWS_PER_PAGE};
pub use server_source::{ServerStatusSource, VNI_COUNTS_MAX_AGE};

/// The version shown on the page, in `/routes.json` and in `/metrics`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Threads answering requests. Two, so that one client downloading a large
/// `/routes.json` does not hold up a Prometheus scrape.
pub const HTTP_WORKERS: usize = 2;

/// How long a route snapshot is reused: bounds how often many browsers and
/// scrapers together can make the state owner copy its tables.
pub const ROUTE_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// Where the status pages get their data. Implemented by the server's and the
/// client's handles; every method is called on an HTTP thread and must
/// return a copy without blocking the data path for long.
pub trait StatusSource: Send + Sync + 'static {
    /// Server or client (page title, `metalbond_build_info`).
    fn role(&self) -> StatusRole;
    /// The route table now: the server's reflected table, or the client's
    /// received routes.
    fn routes(&self) -> RouteTableView;
    /// Every peer session now.
    fn peers(&self) -> Vec<PeerView>;
    /// Counters and gauges now.
    fn metrics(&self) -> MetricsView;
}

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
    /// The HTTP library refused the socket.
    #[error("cannot start the HTTP server on {addr}: {reason}")]
    Start {
        /// The address asked for.
        addr: SocketAddr,
        /// The library's message.
        reason: String,
    },
    /// A worker thread could not be spawned.
    #[error("cannot start an HTTP thread: {0}")]
    Thread(io::Error),
}

/// A running status server. Dropping it shuts it down.
pub struct HttpHandle {
    /// The address actually bound (port 0 resolved).
    local_addr: SocketAddr,
    /// The tiny_http server, shared with the workers.
    server: Arc<Server>,
    /// Set once to ask the workers to stop.
    stopping: Arc<AtomicBool>,
    /// The worker threads, joined by `shutdown`.
    workers: Vec<JoinHandle<()>>,
}

impl HttpHandle {
    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops answering, joins the workers and closes the socket.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        tracing::info!(addr = %self.local_addr, "HTTP status server stopped");
    }
}

impl Drop for HttpHandle {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.stop();
        }
    }
}

/// Binds `addr` and serves the status pages from `source` on their own
/// threads until the handle is shut down or dropped.
pub fn serve(addr: SocketAddr, source: Arc<dyn StatusSource>) -> Result<HttpHandle, HttpError> {
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
    let server = Server::from_listener(listener, None).map_err(|e| HttpError::Start {
        addr,
        reason: e.to_string(),
    })?;
    let server = Arc::new(server);
    let stopping = Arc::new(AtomicBool::new(false));
    let cache = Arc::new(RouteCache::default());
    let mut handle = HttpHandle {
        local_addr,
        server: server.clone(),
        stopping: stopping.clone(),
        workers: Vec::new(),
    };
    for i in 0..HTTP_WORKERS {
        let worker = Worker {
            server: server.clone(),
            source: source.clone(),
            cache: cache.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker.run())
            .map_err(HttpError::Thread)?;
        handle.workers.push(thread);
    }
    tracing::info!(addr = %local_addr, role = source.role().name(), "HTTP status server listening");
    Ok(handle)
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

/// The last route snapshot and when it was taken.
#[derive(Default)]
struct RouteCache {
    /// Taken at, and the snapshot. Only HTTP threads touch this lock.
    slot: Mutex<Option<(Instant, Arc<RouteSnapshot>)>>,
}

impl RouteCache {
    /// A snapshot at most `ROUTE_SNAPSHOT_MAX_AGE` old.
    fn get(&self, source: &dyn StatusSource) -> Arc<RouteSnapshot> {
        let mut slot = match self.slot.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((at, snapshot)) = slot.as_ref() {
            if at.elapsed() < ROUTE_SNAPSHOT_MAX_AGE {
                return snapshot.clone();
            }
        }
        let snapshot = Arc::new(RouteSnapshot {
            table: source.routes(),
            wall: SystemTime::now(),
            json: OnceLock::new(),
            yaml: OnceLock::new(),
        });
        *slot = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// One HTTP thread: takes requests off tiny_http's queue and answers them.
struct Worker {
    /// Shared request queue.
    server: Arc<Server>,
    /// Where the data comes from.
    source: Arc<dyn StatusSource>,
    /// Shared route snapshot.
    cache: Arc<RouteCache>,
    /// Set when the handle shuts down.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        while !self.stopping.load(Ordering::Relaxed) {
            match self.server.recv_timeout(Duration::from_millis(500)) {
                Ok(Some(request)) => self.answer(request),
                Ok(None) => {}
                Err(e) => {
                    // tiny_http reports a failed accept() this way, once,
                    // and its accept thread stops: no new connection will be
                    // answered. Say so, with the cause (e.g. out of file
                    // descriptors), rather than going quiet.
                    tracing::error!(error = %e, "HTTP status server stopped accepting connections");
                }
            }
        }
    }

    fn answer(&self, request: Request) {
        let url = request.url().to_string();
        let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let method = request.method().clone();
        if method != Method::Get && method != Method::Head {
            let reply = text(
                405,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".into(),
            );
            respond(request, reply);
            return;
        }
        let started = Instant::now();
        let reply = match path {
            "/" | "/index.html" => {
                let snapshot = self.cache.get(self.source.as_ref());
                let header = page::PageHeader {
                    role: self.source.role(),
                    version: VERSION,
                    now: snapshot.wall,
                    peers: self.source.peers().len(),
                };
                let body = page::render(&snapshot.table, &header, &page::PageQuery::parse(query));
                text(200, "text/html; charset=utf-8", body)
            }
            "/routes.json" => shared(
                200,
                "application/json",
                self.cache.get(self.source.as_ref()).json(),
            ),
            "/routes.yaml" => shared(200, "text/yaml", self.cache.get(self.source.as_ref()).yaml()),
            "/peers" | "/peers.json" => match serde_json::to_string_pretty(&self.source.peers()) {
                Ok(mut body) => {
                    body.push('\n');
                    text(200, "application/json", body)
                }
                Err(e) => internal_error(&e),
            },
            "/metrics" => {
                let body = metrics::render(&self.source.metrics(), self.source.role(), VERSION);
                text(200, metrics::CONTENT_TYPE, body)
            }
            _ => text(
                404,
                "text/plain; charset=utf-8",
                "not found; try / /routes.json /routes.yaml /peers /metrics\n".into(),
            ),
        };
        tracing::debug!(path, status = reply.status, elapsed = ?started.elapsed(), "HTTP request");
        respond(request, reply);
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

/// Lets `io::Cursor` read a shared document.
struct SharedBytes(Arc<str>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn text(status: u16, content_type: &'static str, body: String) -> Reply {
    Reply {
        status,
        content_type,
        body: Body::Owned(body),
    }
}

fn shared(status: u16, content_type: &'static str, body: Arc<str>) -> Reply {
    Reply {
        status,
        content_type,
        body: Body::Shared(body),
    }
}

fn internal_error(e: &dyn std::fmt::Display) -> Reply {
    tracing::warn!(error = %e, "HTTP status rendering failed");
    text(
        500,
        "text/plain; charset=utf-8",
        format!("rendering failed: {e}\n"),
    )
}

fn respond(request: Request, reply: Reply) {
    let mut headers = Vec::with_capacity(2);
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes()) {
        headers.push(h);
    }
    if let Ok(h) = Header::from_bytes(&b"Cache-Control"[..], &b"no-store"[..]) {
        headers.push(h);
    }
    let status = StatusCode(reply.status);
    let sent = match reply.body {
        Body::Owned(body) => {
            let mut response = Response::from_string(body).with_status_code(status);
            for h in headers {
                response = response.with_header(h);
            }
            request.respond(response)
        }
        Body::Shared(body) => {
            let len = body.len();
            let reader = io::Cursor::new(SharedBytes(body));
            request.respond(Response::new(status, headers, reader, Some(len), None))
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "HTTP client went away before the reply was written");
    }
}
