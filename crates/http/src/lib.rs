//! The HTTP status side (`--http ADDR` on `server` and `client`): the route
//! table for people (`/`), for scripts (`/routes.json`, `/routes.yaml`),
//! peers (`/peers`), the peer policy (`/policy`) and Prometheus metrics
//! (`/metrics`).
//!
//! Owns: the listening socket and its thread (`listener`: hyper on a small
//! tokio runtime, with the limits of `HttpLimits`), routing of requests to
//! renderers, and the short-lived route snapshot cache: one table copy
//! shared by every request within `ROUTE_SNAPSHOT_MAX_AGE`, at most
//! `MAX_LIVE_ROUTE_SNAPSHOTS` alive however many readers hold them, each
//! reader's `/routes.json` or `/routes.yaml` written from it a chunk
//! (`DOCUMENT_CHUNK_BYTES`) at a time, never held whole.
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
//!   (hyper, capped, timeouts, one fd each)         │ snapshot, html, text; the
//!        ▲                                          │ documents' key order, length
//!        └─ /routes.json, .yaml: next 32 KiB ◄──────┘
//!           chunk when the reader took the last    (RouteSnapshot, shared)
//! ```

#![deny(missing_docs)]

mod api;
pub use api::next_hop_json;
mod go_document;
mod listener;
mod metrics;
mod page;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use go_document::Format;
use metalbond_utils::LockOrRecover;

// The status model and trait live in `telemetry` (below server, client and
// http); re-exported so `metalbond::http::StatusSource` etc. keep working.
pub use listener::HttpLimits;
pub use metalbond_telemetry::status::{
    count_states, DestinationView, MetricFamily, MetricKind, MetricSample, MetricsView, PeerView,
    QueueDepth, RouteTableView, StatusRole, StatusSource, VniRoutesView,
};
pub use metalbond_telemetry::{HistogramView, LatencyHistogram, NetlinkView};
pub use page::{MAX_VNI_SUMMARY_ROWS, REFRESH_SECONDS, ROWS_PER_PAGE};

/// The version shown on the page, in `/routes.json` and in `/metrics` (the
/// workspace shares one version, so this is the binary's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit `/api/v1/summary` reports; set once by the binary, which
/// alone knows it (no library crate reads git).
static BUILD_COMMIT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the commit the process was built from, for `/api/v1/summary`.
/// The binary calls it once at start; later calls change nothing.
pub fn set_build_commit(commit: &'static str) {
    let _ = BUILD_COMMIT.set(commit);
}

/// The commit named by `set_build_commit`, or `unknown` (an embedder that
/// named none).
pub fn build_commit() -> &'static str {
    BUILD_COMMIT.get().copied().unwrap_or("unknown")
}

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
        started: Instant::now(),
        pages: PagesInFlight::default(),
        max_pages: limits.max_route_pages,
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

/// Route snapshots that may exist at once (the newest, and one still being
/// read). A snapshot of 200,000 routes is about 20 MB; while readers hold
/// this many, new requests share the newest one, older than
/// `ROUTE_SNAPSHOT_MAX_AGE` but with its own `date`, so however many slow
/// readers come, the documents cost at most this many tables.
pub const MAX_LIVE_ROUTE_SNAPSHOTS: usize = 2;

/// Bytes of `/routes.json` or `/routes.yaml` written for a reader at a time:
/// the next chunk is written only when hyper has sent the previous one, so
/// a connection holds about this much of the document, however slowly it
/// reads.
pub const DOCUMENT_CHUNK_BYTES: usize = 32 * 1024;

/// One route table copy, shared by every request that comes within
/// `ROUTE_SNAPSHOT_MAX_AGE` (and by all of them while
/// `MAX_LIVE_ROUTE_SNAPSHOTS` are held). Its documents are never held whole:
/// each reader writes them from the table a chunk at a time.
struct RouteSnapshot {
    /// When the snapshot was taken (the documents' `date`).
    wall: SystemTime,
    /// When the snapshot was taken, for its age.
    taken: Instant,
    /// The table.
    table: RouteTableView,
    /// The Go encoders' key order, sorted by the first document request.
    order: OnceLock<go_document::GoOrder>,
    /// `/routes.json`'s length (`Content-Length`), by the first request.
    json_len: OnceLock<usize>,
    /// `/routes.yaml`'s length, by the first request.
    yaml_len: OnceLock<usize>,
    /// Counts this snapshot among the live ones until it is dropped.
    _live: LiveSnapshot,
}

impl RouteSnapshot {
    /// The Go encoders' key order, sorted by the first caller.
    fn order(&self) -> &go_document::GoOrder {
        self.order
            .get_or_init(|| go_document::GoOrder::new(&self.table))
    }

    /// What the documents are written from.
    fn document(&self) -> go_document::GoDocument<'_> {
        go_document::GoDocument {
            table: &self.table,
            order: self.order(),
            date: self.wall,
            version: VERSION,
        }
    }

    /// Sorts the keys and measures the document of `format` if no request
    /// did yet (on the blocking pool: both walk the whole table); returns
    /// its length.
    fn prepare(&self, format: Format) -> usize {
        let len = match format {
            Format::Json => &self.json_len,
            Format::Yaml => &self.yaml_len,
        };
        *len.get_or_init(|| go_document::DocumentCursor::document_len(format, &self.document()))
    }
}

/// Counts live snapshots: one per `RouteSnapshot`, released on drop (by
/// the last reader or the cache, whichever lets go last).
struct LiveSnapshot(Arc<AtomicUsize>);

impl LiveSnapshot {
    fn new(live: &Arc<AtomicUsize>) -> LiveSnapshot {
        live.fetch_add(1, Ordering::AcqRel);
        LiveSnapshot(live.clone())
    }
}

impl Drop for LiveSnapshot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The newest route snapshot, reused for `ROUTE_SNAPSHOT_MAX_AGE`, and
/// beyond that while `MAX_LIVE_ROUTE_SNAPSHOTS` are alive.
struct RouteCache {
    /// The newest snapshot, and whether the cache still holds it.
    slot: Mutex<CacheSlot>,
    /// Snapshots alive now (held by the cache or by readers).
    live: Arc<AtomicUsize>,
    /// `MAX_LIVE_ROUTE_SNAPSHOTS`.
    max_live: usize,
    /// `ROUTE_SNAPSHOT_MAX_AGE` (shorter in unit tests).
    max_age: Duration,
    /// Woken when a snapshot is taken: the HTTP thread then lets it go once
    /// it has expired (`release_expired`).
    taken: tokio::sync::Notify,
}

/// The cache's hold on the newest snapshot.
#[derive(Default)]
struct CacheSlot {
    /// Held by the cache until it expires (then `release_expired` or the
    /// next request lets go).
    held: Option<Arc<RouteSnapshot>>,
    /// The newest snapshot, also after the cache let go: shared while
    /// readers still hold `max_live` snapshots.
    newest: Weak<RouteSnapshot>,
}

/// What `RouteCache::release_expired` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Release {
    /// The cache holds no snapshot.
    Empty,
    /// The newest snapshot is still young enough to be shared: look again
    /// later.
    Young,
    /// The cache let go of an expired snapshot (freed now, or when its last
    /// reader finishes).
    Released,
}

impl Default for RouteCache {
    fn default() -> RouteCache {
        RouteCache::new(MAX_LIVE_ROUTE_SNAPSHOTS, ROUTE_SNAPSHOT_MAX_AGE)
    }
}

impl RouteCache {
    /// A cache that shares a snapshot for `max_age` and lets at most
    /// `max_live` exist.
    fn new(max_live: usize, max_age: Duration) -> RouteCache {
        RouteCache {
            slot: Mutex::new(CacheSlot::default()),
            live: Arc::new(AtomicUsize::new(0)),
            max_live: max_live.max(1),
            max_age,
            taken: tokio::sync::Notify::new(),
        }
    }

    /// A snapshot at most `ROUTE_SNAPSHOT_MAX_AGE` old, or the newest one
    /// if readers hold `max_live` snapshots. Taken under the lock, so
    /// concurrent requests wait for one copy instead of making several.
    fn get(&self, source: &dyn StatusSource) -> Arc<RouteSnapshot> {
        let mut slot = self.slot.lock_or_recover();
        if let Some(held) = &slot.held {
            if held.taken.elapsed() < self.max_age {
                return held.clone();
            }
        }
        // Expired: the cache lets go of it (freed here if nobody reads it,
        // and then no longer counted).
        slot.held = None;
        if self.live.load(Ordering::Acquire) >= self.max_live {
            if let Some(newest) = slot.newest.upgrade() {
                return newest;
            }
        }
        let snapshot = Arc::new(RouteSnapshot {
            table: source.routes(),
            wall: SystemTime::now(),
            taken: Instant::now(),
            order: OnceLock::new(),
            json_len: OnceLock::new(),
            yaml_len: OnceLock::new(),
            _live: LiveSnapshot::new(&self.live),
        });
        slot.held = Some(snapshot.clone());
        slot.newest = Arc::downgrade(&snapshot);
        self.taken.notify_one();
        snapshot
    }

    /// Drops the cache's reference to an expired snapshot, so that its
    /// memory goes when its last reader finishes rather than at the next
    /// request.
    fn release_expired(&self) -> Release {
        let mut slot = self.slot.lock_or_recover();
        match &slot.held {
            None => Release::Empty,
            Some(s) if s.taken.elapsed() < self.max_age => Release::Young,
            Some(_) => {
                // Freed after the lock (a 200,000-route table takes a few
                // milliseconds to free).
                let expired = slot.held.take();
                drop(slot);
                drop(expired);
                Release::Released
            }
        }
    }

    /// Snapshots alive now.
    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }
}

/// `/routes.json` or `/routes.yaml` being sent to one reader: the shared
/// snapshot and the reader's own position in the document.
pub(crate) struct DocumentStream {
    /// The table the document is written from (consistent for the whole
    /// document, however long the reader takes).
    snapshot: Arc<RouteSnapshot>,
    /// Where this reader is.
    cursor: go_document::DocumentCursor,
    /// The document's length in bytes.
    len: usize,
    /// Bytes handed out so far.
    sent: usize,
}

impl DocumentStream {
    /// Bytes not handed out yet (at the start: `Content-Length`).
    pub(crate) fn remaining(&self) -> usize {
        self.len.saturating_sub(self.sent)
    }

    /// Whether everything has been handed out.
    pub(crate) fn is_done(&self) -> bool {
        self.cursor.is_done()
    }

    /// A reader at the start of `format`'s document of `snapshot`.
    fn new(snapshot: Arc<RouteSnapshot>, format: Format, len: usize) -> DocumentStream {
        DocumentStream {
            snapshot,
            cursor: go_document::DocumentCursor::new(format),
            len,
            sent: 0,
        }
    }

    /// The next chunk of about `DOCUMENT_CHUNK_BYTES`; `None` at the end.
    pub(crate) fn next_chunk(&mut self) -> Option<Bytes> {
        if self.cursor.is_done() {
            return None;
        }
        let mut chunk = String::with_capacity(DOCUMENT_CHUNK_BYTES + 512);
        self.cursor
            .fill(&self.snapshot.document(), &mut chunk, DOCUMENT_CHUNK_BYTES);
        self.sent += chunk.len();
        Some(Bytes::from(chunk.into_bytes()))
    }
}

/// Renders answers: the data source and the shared route snapshot. Called
/// on the runtime's blocking pool, never on the accept loop.
pub(crate) struct Responder {
    /// Where the data comes from.
    source: Arc<dyn StatusSource>,
    /// Shared route snapshot.
    cache: RouteCache,
    /// When the status port opened: `uptime_seconds` counts from here.
    started: Instant,
    /// `/api/v1/routes` pages not yet written to their readers.
    pages: PagesInFlight,
    /// At most this many of them (`HttpLimits::max_route_pages`).
    max_pages: usize,
}

impl Responder {
    /// `/routes.json` or `/routes.yaml` from the shared snapshot, to be
    /// written chunk by chunk as the reader takes it.
    fn document(&self, format: Format, content_type: &'static str) -> Reply {
        let snapshot = self.cache.get(self.source.as_ref());
        let len = snapshot.prepare(format);
        Reply {
            status: 200,
            content_type,
            body: Body::Document(DocumentStream::new(snapshot, format, len)),
        }
    }

    /// Lets go of the cache's route snapshot once it has expired (its
    /// memory is freed then, or when its last reader finishes).
    pub(crate) fn release_expired_snapshot(&self) -> Release {
        self.cache.release_expired()
    }

    /// Route snapshots alive now (held by the cache or by readers).
    pub(crate) fn live_snapshots(&self) -> usize {
        self.cache.live()
    }

    /// Resolves after a route snapshot was taken (at once if one was taken
    /// since the last wait).
    pub(crate) async fn snapshot_taken(&self) {
        self.cache.taken.notified().await
    }

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
            "/routes.json" => self.document(Format::Json, "application/json"),
            "/routes.yaml" => self.document(Format::Yaml, "text/yaml"),
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
            "/api/v1/summary" => {
                let summary = api::summary(self.source.as_ref(), self.started.elapsed());
                match serde_json::to_string_pretty(&summary) {
                    Ok(mut body) => {
                        body.push('\n');
                        Reply::text(200, "application/json", body)
                    }
                    Err(e) => internal_error(&e),
                }
            }
            "/api/v1/routes" => {
                let Some(ticket) = self.pages.acquire(self.max_pages) else {
                    return Reply::text(
                        503,
                        "application/json",
                        api::error_body(&format!(
                            "{} route pages are being sent already; retry in a moment",
                            self.max_pages
                        )),
                    );
                };
                match api::routes(self.source.as_ref(), query) {
                    Ok(body) => Reply {
                        status: 200,
                        content_type: "application/json",
                        body: Body::Page(Bytes::from_owner(TicketedPage {
                            json: body.into_bytes(),
                            _ticket: ticket,
                        })),
                    },
                    Err((status, message)) => {
                        Reply::text(status, "application/json", api::error_body(&message))
                    }
                }
            }
            "/api/v1/peers" => json_reply(&api::peers(self.source.as_ref())),
            api_path if api_path.starts_with("/api/") => Reply::text(
                404,
                "application/json",
                api::error_body(&format!(
                    "no such API path {api_path:?}; this version serves /api/v1/summary, /api/v1/peers, /api/v1/routes"
                )),
            ),
            "/metrics" => {
                let body = metrics::render(&self.source.metrics(), self.source.role(), VERSION);
                Reply::text(200, metrics::CONTENT_TYPE, body)
            }
            // Liveness: the process serves HTTP (a panic anywhere ends the
            // process, `panic_policy`, so a live process is a whole one).
            "/healthz" => Reply::text(200, "text/plain; charset=utf-8", "ok\n".into()),
            "/readyz" => match self.source.readiness() {
                Ok(line) => {
                    Reply::text(200, "text/plain; charset=utf-8", format!("ready: {line}\n"))
                }
                Err(why) => Reply::text(
                    503,
                    "text/plain; charset=utf-8",
                    format!("not ready: {why}\n"),
                ),
            },
            _ => Reply::text(
                404,
                "text/plain; charset=utf-8",
                "not found; try / /routes.json /routes.yaml /peers /metrics /healthz /readyz /api/v1/summary\n"
                    .into(),
            ),
        }
    }
}

/// A JSON value as a pretty 200 answer.
fn json_reply(v: &serde_json::Value) -> Reply {
    match serde_json::to_string_pretty(v) {
        Ok(mut body) => {
            body.push('\n');
            Reply::text(200, "application/json", body)
        }
        Err(e) => internal_error(&e),
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

/// A response body: rendered for this request, or a route document written
/// from the shared snapshot as the reader takes it.
enum Body {
    /// Rendered for this request.
    Owned(String),
    /// `/routes.json` or `/routes.yaml`.
    Document(DocumentStream),
    /// An `/api/v1/routes` page; its bytes own a `PageTicket`, so the page
    /// counts as in flight until hyper has written (and dropped) them.
    Page(Bytes),
}

/// Counts `/api/v1/routes` pages in flight (`HttpLimits::max_route_pages`).
#[derive(Default)]
struct PagesInFlight(Arc<AtomicUsize>);

impl PagesInFlight {
    /// A ticket for one more page, unless `max` are in flight.
    fn acquire(&self, max: usize) -> Option<PageTicket> {
        let mut now = self.0.load(Ordering::Relaxed);
        loop {
            if now >= max {
                return None;
            }
            match self
                .0
                .compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(PageTicket(self.0.clone())),
                Err(seen) => now = seen,
            }
        }
    }
}

/// One page in flight; returned when dropped.
struct PageTicket(Arc<AtomicUsize>);

impl Drop for PageTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A page's JSON holding its ticket: `Bytes::from_owner` drops both when
/// the last reference to the bytes goes, after they were written (or the
/// connection closed).
struct TicketedPage {
    /// The rendered page.
    json: Vec<u8>,
    /// Its place among the pages in flight.
    _ticket: PageTicket,
}

impl AsRef<[u8]> for TicketedPage {
    fn as_ref(&self) -> &[u8] {
        &self.json
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    use metalbond_wire::types::{NextHop, Vni};

    /// A source whose table is `routes` routes and that counts the copies
    /// asked of it.
    struct CountingSource {
        routes: u32,
        copies: AtomicU64,
    }

    impl CountingSource {
        fn new(routes: u32) -> CountingSource {
            CountingSource {
                routes,
                copies: AtomicU64::new(0),
            }
        }
    }

    impl StatusSource for CountingSource {
        fn role(&self) -> StatusRole {
            StatusRole::Server
        }
        fn routes(&self) -> RouteTableView {
            self.copies.fetch_add(1, Ordering::Relaxed);
            let hop = NextHop::standard("2001:db8::1".parse().unwrap());
            RouteTableView::from_routes((0..self.routes).map(|i| {
                let prefix = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
                (Vni::new(23).unwrap(), prefix, hop)
            }))
        }
        fn peers(&self) -> Vec<PeerView> {
            Vec::new()
        }
        fn metrics(&self) -> MetricsView {
            MetricsView::default()
        }
    }

    const AGE: Duration = Duration::from_millis(30);

    /// A responder for `source` that sends at most `max_pages` route
    /// pages at once.
    fn responder(source: CountingSource, max_pages: usize) -> Responder {
        Responder {
            source: Arc::new(source),
            cache: RouteCache::default(),
            started: Instant::now(),
            pages: PagesInFlight::default(),
            max_pages,
        }
    }

    #[test]
    fn route_pages_in_flight_are_capped_until_their_bytes_are_written() {
        let r = responder(CountingSource::new(3000), 2);
        let page = |after: &str| r.answer("/api/v1/routes", &format!("vni=23&limit=1000{after}"));
        let bytes = |reply: Reply| match reply.body {
            Body::Page(b) => b,
            _ => panic!("status {}: not a page", reply.status),
        };
        let first = bytes(page(""));
        // hyper holds a clone of the bytes while it writes them.
        let writing = first.clone();
        let second = bytes(page(""));
        let third = page("");
        assert_eq!(third.status, 503);
        let Body::Owned(text) = &third.body else {
            panic!("a 503 carries its reason")
        };
        assert!(text.contains("2 route pages are being sent"), "{text}");
        // The first page is dropped by the handler but still being written.
        drop(first);
        assert_eq!(page("").status, 503);
        // Written: its place is free.
        drop(writing);
        let fourth = bytes(page(""));
        assert!(fourth.len() > 1000, "a page of 1,000 routes");
        drop((second, fourth));
        assert_eq!(r.pages.0.load(Ordering::Relaxed), 0);
        // Errors take no place.
        assert_eq!(r.answer("/api/v1/routes", "vni=99").status, 404);
        assert_eq!(r.pages.0.load(Ordering::Relaxed), 0);
    }

    fn expire() {
        std::thread::sleep(AGE + Duration::from_millis(10));
    }

    #[test]
    fn readers_holding_snapshots_cap_the_copies_and_share_the_newest() {
        let source = CountingSource::new(1000);
        let cache = RouteCache::new(2, AGE);
        // Within the age, every request shares one copy.
        let first = cache.get(&source);
        assert!(Arc::ptr_eq(&first, &cache.get(&source)));
        assert_eq!(source.copies.load(Ordering::Relaxed), 1);
        // A slow reader keeps `first`; once it expired, a new copy is made.
        expire();
        let second = cache.get(&source);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(cache.live(), 2);
        // Two alive (both read): later requests share the newest even after
        // it expired, however many come.
        expire();
        for _ in 0..10 {
            assert!(Arc::ptr_eq(&second, &cache.get(&source)));
        }
        assert_eq!(source.copies.load(Ordering::Relaxed), 2);
        assert_eq!(cache.live(), 2);
        // The first reader finished: room for a fresh copy again.
        drop(first);
        let third = cache.get(&source);
        assert!(!Arc::ptr_eq(&second, &third));
        assert_eq!(cache.live(), 2);
        assert_eq!(source.copies.load(Ordering::Relaxed), 3);
        // Once the readers are gone and the newest expired, the cache lets
        // go and nothing is held.
        drop(second);
        drop(third);
        assert_eq!(cache.release_expired(), Release::Young);
        assert_eq!(cache.live(), 1);
        expire();
        assert_eq!(cache.release_expired(), Release::Released);
        assert_eq!(cache.live(), 0);
        assert_eq!(cache.release_expired(), Release::Empty);
    }

    #[test]
    fn a_document_is_streamed_in_bounded_chunks_of_the_shared_snapshot() {
        let source = CountingSource::new(1000);
        let cache = RouteCache::new(2, AGE);
        let snapshot = cache.get(&source);
        let whole = go_document::render(Format::Json, &snapshot.table, snapshot.wall, VERSION);
        let len = snapshot.prepare(Format::Json);
        assert_eq!(len, whole.len());
        let mut stream = DocumentStream::new(snapshot.clone(), Format::Json, len);
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.next_chunk() {
            assert!(chunk.len() <= DOCUMENT_CHUNK_BYTES + 512, "{}", chunk.len());
            chunks.push(chunk);
        }
        assert!(stream.is_done());
        assert_eq!(stream.remaining(), 0);
        assert!(chunks.len() > 3, "{} chunks for {len} bytes", chunks.len());
        assert_eq!(chunks.concat(), whole.as_bytes());
        // A second reader of the same snapshot gets the same document.
        let mut behind = DocumentStream::new(snapshot.clone(), Format::Json, len);
        let again: Vec<Bytes> = std::iter::from_fn(|| behind.next_chunk()).collect();
        assert_eq!(again.concat(), whole.as_bytes());
        // One table copy served both.
        assert_eq!(source.copies.load(Ordering::Relaxed), 1);
    }
}
