//! The status port's network side: one thread running a small tokio
//! current-thread runtime that accepts connections and speaks HTTP/1.1 with
//! `hyper`, under limits that keep a hostile or broken client from using the
//! status port against the process.
//!
//! Owns: the accept loop (connection cap, back-off and rate-limited logging
//! when `accept` fails, e.g. out of file descriptors), each connection's task
//! (bounded request head, header read timeout, idle timeout), the hand-off
//! of rendering to the runtime's small blocking pool so that no answer's
//! preparation holds up the accept loop, the response bodies (`ReplyBody`:
//! the route documents go out one chunk at a time, the next written only
//! when hyper has room for it), and letting go of expired route snapshots.
//!
//! Must never: buffer more than `HttpLimits::max_head_bytes` of a request
//! head, hold more than `HttpLimits::max_connections` connections, start a
//! thread per connection, stop accepting for good because `accept` failed,
//! hold a whole route document for a reader, or parse HTTP itself (hyper
//! does).
//!
//! ```text
//!  "http" thread: current-thread runtime
//!    accept loop ──(slot free?)──► connection task (hyper http1, one fd)
//!        │  no: accept + close                │ GET/HEAD
//!        │  accept error: back off, retry     ▼
//!        ▼                             spawn_blocking ─► Responder::answer
//!  stop (Notify) ends the loop          ("http-render", at most HTTP_WORKERS)
//!  release_snapshots: drops the               │ ReplyBody
//!  cache's expired snapshot                   ▼
//!                                      hyper writes; a document's next chunk
//!                                      is made when the last one has gone
//! ```

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{Body, DocumentStream, Reply, Responder, HTTP_WORKERS, ROUTE_SNAPSHOT_MAX_AGE};

/// The limits the status port enforces. `Default` is what `serve` uses; tests
/// and embedders may shorten the timeouts with `serve_with_limits`.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections held open at once. One more is accepted and closed at
    /// once (counted in a rate-limited log line), so descriptors and memory
    /// spent on the status port stay bounded whatever clients do.
    pub max_connections: usize,
    /// Largest request head (request line and headers) read into memory;
    /// past it the client gets `431 Request Header Fields Too Large` and the
    /// connection is closed. hyper's floor is 8 KiB.
    pub max_head_bytes: usize,
    /// Time a client has to send a whole request head, counted from when the
    /// server starts waiting for it: closes a head trickled byte by byte, a
    /// silent connection, and a kept-alive one idle between requests.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moved either way for this long, and
    /// with no request being rendered, is closed: a client that stopped
    /// reading its answer (the header timeout does not run then).
    pub idle_timeout: Duration,
    /// `/api/v1/routes` pages being rendered or written at once. A page
    /// holds up to 10,000 destinations (about 1.8 MB of JSON) until its
    /// reader has taken it; one more request is answered `503` at once, so
    /// the memory slow readers can pin is bounded (32 × 1.8 MB) whatever
    /// `max_connections` allows.
    pub max_route_pages: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            max_head_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            max_route_pages: 32,
        }
    }
}

/// Shortest pause after a failed `accept` that is about resources (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM): the pending connection keeps the listener
/// readable, so retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Longest pause between accept retries while resources stay exhausted.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Minimum interval between two log lines of the same rate-limited kind.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the runtime thread serving `listener`. Returns the thread and the
/// `Notify` that stops it.
pub(super) fn start(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    responder: Arc<Responder>,
    limits: HttpLimits,
) -> Result<(std::thread::JoinHandle<()>, Arc<Notify>), super::HttpError> {
    let start_error = |e: io::Error| super::HttpError::Start {
        addr,
        reason: e.to_string(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(HTTP_WORKERS)
        .thread_keep_alive(RENDER_THREAD_KEEP_ALIVE)
        .thread_name("http-render")
        .build()
        .map_err(start_error)?;
    listener.set_nonblocking(true).map_err(start_error)?;
    let listener = {
        let _in_runtime = runtime.enter();
        TcpListener::from_std(listener).map_err(start_error)?
    };
    let stop = Arc::new(Notify::new());
    let stop_in_loop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(accept_loop(listener, responder, limits, stop_in_loop));
            // Connection tasks are dropped (their sockets closed); a render
            // still running gets a moment to finish.
            runtime.shutdown_timeout(Duration::from_secs(2));
        })
        .map_err(super::HttpError::Thread)?;
    Ok((thread, stop))
}

/// Counts events and says when a log line is due (at most one per
/// `LOG_INTERVAL`, carrying the number of events since the last line).
#[derive(Default)]
struct RateLimited {
    /// When the last line was written.
    last_line: Option<Instant>,
    /// Events since the last line.
    pending: u64,
}

impl RateLimited {
    /// Records one event; `Some(n)` when a line for `n` events is due now.
    fn note(&mut self) -> Option<u64> {
        self.pending += 1;
        let due = self.last_line.is_none_or(|t| t.elapsed() >= LOG_INTERVAL);
        if due {
            self.last_line = Some(Instant::now());
            Some(std::mem::take(&mut self.pending))
        } else {
            None
        }
    }
}

/// Whether a failed `accept` is about the process or system running out of
/// something (retrying at once would spin) rather than about one connection
/// that went away before it was accepted.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts until `stop`: hands each connection a slot or closes it, and
/// survives every accept error.
async fn accept_loop(
    listener: TcpListener,
    responder: Arc<Responder>,
    limits: HttpLimits,
    stop: Arc<Notify>,
) {
    let _releaser = AbortOnDrop(tokio::spawn(release_snapshots(responder.clone())));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = RateLimited::default();
    let mut failed_since_success = 0u64;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut recoveries = RateLimited::default();
    let mut refused = RateLimited::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failed_since_success > 0 {
                    // Rate limited too: near the descriptor limit, accepts
                    // can alternate between failing and succeeding.
                    if recoveries.note().is_some() {
                        tracing::info!(
                            failures = failed_since_success,
                            "HTTP status server accepting connections again"
                        );
                    }
                    failed_since_success = 0;
                }
                backoff = ACCEPT_BACKOFF_MIN;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    if let Some(n) = refused.note() {
                        tracing::warn!(
                            refused = n,
                            max_connections = limits.max_connections,
                            "HTTP connection refused: connection cap reached"
                        );
                    }
                    drop(stream);
                    continue;
                };
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    responder.clone(),
                    limits.clone(),
                    slot,
                ));
            }
            Err(e) => {
                failed_since_success += 1;
                if let Some(n) = failures.note() {
                    tracing::warn!(
                        failures = n,
                        error = %e,
                        "HTTP status server cannot accept a connection; retrying"
                    );
                }
                if is_resource_exhaustion(&e) {
                    tokio::select! {
                        _ = stop.notified() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// How long an idle render thread is kept: one that exits hands its
/// mimalloc heap (where the route snapshots it copied live) over for
/// `return_freed_memory` to collect. Starting one again costs far less than
/// a render.
const RENDER_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Rounds of `return_freed_memory`, one a second, after the last route
/// snapshot was freed: enough for the render threads to have exited.
const MEMORY_RETURN_ROUNDS: u32 = 5;

/// Lets go of each route snapshot once it has expired, so that a table
/// copy does not stay in memory until the next request after its readers
/// are gone, and gives the memory back to the system once no snapshot is
/// left. Sleeps while none is held.
async fn release_snapshots(responder: Arc<Responder>) {
    loop {
        responder.snapshot_taken().await;
        while responder.live_snapshots() > 0 {
            tokio::time::sleep(ROUTE_SNAPSHOT_MAX_AGE).await;
            responder.release_expired_snapshot();
        }
        for _ in 0..MEMORY_RETURN_ROUNDS {
            return_freed_memory();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Gives freed memory back to the system: mimalloc keeps freed pages for
/// reuse and purges them only when their thread allocates again, so the
/// snapshots' 20 MB each (200,000 routes) stayed resident after their
/// readers left while the render threads were idle. A forced collection
/// here frees this thread's pages (the documents' chunks), those of exited
/// render threads, and purges the arenas.
fn return_freed_memory() {
    // SAFETY: mi_collect takes no pointer and only walks mimalloc's own
    // structures; it is a no-op for memory of any other allocator (an
    // embedder with its own global allocator).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Aborts a task when dropped (the accept loop's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When a connection last moved a byte, and whether a request on it is
/// being rendered (the idle timer does not run while one is).
struct Activity {
    /// Reference point for `last_ms`.
    opened: Instant,
    /// Milliseconds after `opened` of the last successful read or write.
    last_ms: AtomicU64,
    /// Requests being rendered now.
    busy: AtomicU32,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last byte moved.
    fn last(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Marks a request as being rendered until dropped (also when the
/// connection task is dropped mid-request).
struct BusyGuard(Arc<Activity>);

impl BusyGuard {
    fn new(activity: Arc<Activity>) -> BusyGuard {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        BusyGuard(activity)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that records in `Activity` every read or write that moved
/// bytes; the connection's only descriptor.
struct WatchedStream {
    /// The accepted connection.
    inner: TcpStream,
    /// Shared with the connection task's idle timer.
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one connection until the client closes it, hyper gives up on it
/// (bad or oversized head, header timeout) or it stays idle too long. The
/// slot is released when this returns.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    responder: Arc<Responder>,
    limits: HttpLimits,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let responder = responder.clone();
        let activity = service_activity.clone();
        async move { Ok::<_, Infallible>(respond(responder, activity, request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    loop {
        // While a response is being rendered the connection is not idle:
        // look again one idle timeout from now (a deadline in the past
        // would spin this loop until the render finished).
        let idle_deadline = if activity.busy.load(Ordering::Relaxed) > 0 {
            std::time::Instant::now() + limits.idle_timeout
        } else {
            activity.last() + limits.idle_timeout
        };
        tokio::select! {
            finished = connection.as_mut() => {
                if let Err(e) = finished {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(idle_deadline.into()) => {
                let idle = activity.last().elapsed();
                if activity.busy.load(Ordering::Relaxed) == 0 && idle >= limits.idle_timeout {
                    tracing::debug!(%peer, ?idle, "HTTP connection closed: idle");
                    return;
                }
            }
        }
    }
}

/// Answers one request: GET and HEAD are rendered on the blocking pool,
/// anything else is refused here.
async fn respond(
    responder: Arc<Responder>,
    activity: Arc<Activity>,
    request: Request<Incoming>,
) -> Response<ReplyBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    drop(request);
    if method != Method::GET && method != Method::HEAD {
        let mut response = into_response(Reply::text(
            405,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".into(),
        ));
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let started = Instant::now();
    let busy = BusyGuard::new(activity);
    let rendered = tokio::task::spawn_blocking(move || responder.answer(&path, &query)).await;
    drop(busy);
    let reply = match rendered {
        Ok(reply) => reply,
        Err(e) => super::internal_error(&e),
    };
    tracing::debug!(status = reply.status, elapsed = ?started.elapsed(), "HTTP request");
    into_response(reply)
}

/// A response body: one piece, or a route document handed to hyper a chunk
/// at a time (hyper asks for the next chunk only when it has room to
/// buffer it, i.e. when the reader has taken the previous ones).
pub(super) enum ReplyBody {
    /// Rendered for this request; `None` once sent.
    Full(Option<Bytes>),
    /// `/routes.json` or `/routes.yaml` from the shared snapshot, and the
    /// chunks handed out since this connection last let others run.
    Document(DocumentStream, u32),
}

/// Chunks a document connection hands to hyper before it lets the other
/// connections run. Without it a fast reader on loopback took up to 128
/// writes (4 MB of document) per turn, and a `/metrics` scrape waited behind
/// every such turn (0.5–1 s with 40 readers; 25–40 ms with this).
const CHUNKS_PER_TURN: u32 = 4;

impl hyper::body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let chunk = match self.get_mut() {
            ReplyBody::Full(body) => body.take(),
            ReplyBody::Document(_, handed) if *handed >= CHUNKS_PER_TURN => {
                // hyper writes what it holds; this task runs again after
                // the others that are ready.
                *handed = 0;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // A chunk is written here, on the HTTP thread: about
            // DOCUMENT_CHUNK_BYTES, a fraction of a millisecond.
            ReplyBody::Document(doc, handed) => {
                *handed += 1;
                doc.next_chunk()
            }
        };
        Poll::Ready(chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplyBody::Full(body) => body.is_none(),
            ReplyBody::Document(doc, _) => doc.is_done(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let len = match self {
            ReplyBody::Full(body) => body.as_ref().map_or(0, Bytes::len),
            ReplyBody::Document(doc, _) => doc.remaining(),
        };
        hyper::body::SizeHint::with_exact(len as u64)
    }
}

/// The hyper response for a rendered reply.
fn into_response(reply: Reply) -> Response<ReplyBody> {
    let body = match reply.body {
        Body::Owned(text) if text.is_empty() => ReplyBody::Full(None),
        Body::Owned(text) => ReplyBody::Full(Some(Bytes::from(text.into_bytes()))),
        Body::Document(doc) => ReplyBody::Document(doc, 0),
        Body::Page(page) => ReplyBody::Full(Some(page)),
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
