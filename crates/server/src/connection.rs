//! One connection's transport: its bytes in and out, and how it closes.
//!
//! Owns: the accepted socket split for its two tasks (`Transport`), the
//! `Connection` (the peer's `OutQueue`, the writer's wake-up, the
//! close latch: the first `CloseReason` wins and wakes reader and writer,
//! traffic counters), the writer task (the `OutQueue` → vectored
//! non-blocking `sendmsg` of shared buffers via socket2, falling back to
//! glommio's readiness wait when the socket is full, bounded by
//! `--write-stall-timeout`), the reader's adaptive `ReadBuf` and the race
//! the read loop waits on (`next_read_event`).
//!
//! ```text
//!   socket ──read──▶ next_read_event ──▶ peer::read_loop (messages)
//!      ▲
//!   write_loop ◀── OutQueue ◀── replies (HELLO, KEEPALIVE), Deliveries
//! ```
//!
//! Idle sessions: every peer holds a `Connection` for its life, 10,000s at
//! once on a loaded server, and a writer task only while it has output:
//! the drained writer parks its state (`WriterState`, boxed) here and ends;
//! the session task starts a new one when output is queued (`writer_event`
//! tells it). The paths a connection that keeps up never takes (the wait
//! for room in a full socket) are boxed futures, built when needed, not
//! room in every writer task.
//!
//! Must never: interpret a message or touch the peer's routes (that is
//! `peer`), block the shard (all socket I/O is non-blocking), or import
//! `peer` or `shard`.

use std::cell::{Cell, OnceCell, RefCell};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::config::PeerLimits;
use super::context::ShardContext;
use super::local_event::{EventWait, LocalEvent};
use super::out_queue::{OutQueue, WriteBatch};
use super::owner::{OwnerInput, SyncTag};
use super::PeerId;
use metalbond_utils::pacing::{self, Budget, ReaderPacer, TcpWindow};
use metalbond_wire::codec::Message;
use metalbond_wire::session::CloseReason;

/// Heap read buffer of a peer whose read filled the quiet buffer
/// (`READ_BUF_QUIET`): the first step of its growth. 1 KiB, not 4: a
/// fleet peer's start (HELLO, SUBSCRIBE, a few UPDATEs, ~250 bytes) fits,
/// and the buffer is held from that read to the next; when 19,000 peers
/// started at once, 4 KiB each was 17 MiB of the server's peak (issue #28).
const READ_BUF_FIRST: usize = 1024;
/// A read shorter than this (or than a smaller buffer) ends a burst: the
/// grown buffer goes back to the heap.
const READ_BUF_MIN: usize = 4 * 1024;
/// Read buffer of a peer streaming UPDATEs: the buffer grows ×4 up to this
/// size while reads fill it, and goes back to the inline quiet buffer as
/// soon as a read comes back short of `READ_BUF_MIN` or of the buffer (the
/// burst is over) or the peer goes quiet (a session deadline fires).
const READ_BUF_MAX: usize = 64 * 1024;
/// Bytes handed to one write at most.
const WRITE_BYTES: usize = 256 * 1024;
/// Buffers per vectored write at most.
const WRITE_PARTS: usize = 64;

/// A connection's transport state, shared by its reader, its writer and the
/// shard (deliveries, snapshots, shutdown).
pub(crate) struct Connection {
    /// Identity (shard + sequence), for the owner's `SyncWritten`.
    id: PeerId,
    /// Pending output: session replies and deliveries.
    out: RefCell<OutQueue>,
    /// Notified when a writer parks and when the connection is closed: the
    /// ending session task waits for the writer to be parked.
    writer_event: LocalEvent,
    /// The writer's state while no writer task runs (`None` while one does).
    parked_writer: RefCell<Option<Box<WriterState>>>,
    /// Wakes the reader (and a writer waiting for room) when the connection
    /// is closed from elsewhere.
    close_event: LocalEvent,
    /// The first reason the connection was closed for; set = closing.
    close_reason: OnceCell<CloseReason>,
    /// Frames received.
    frames_in: Cell<u64>,
    /// Bytes received.
    bytes_in: Cell<u64>,
    /// Frames written.
    frames_out: Cell<u64>,
    /// Bytes written.
    bytes_out: Cell<u64>,
    /// How far behind the peer is: at this instant, output up to this
    /// byte count (`bytes_out` + queued) was queued; while `bytes_out` is
    /// below it, that output still waits. Moved on by the writer whenever
    /// the peer caught up with it; `None` while nothing is queued. See
    /// `push_control`.
    behind_mark: Cell<Option<(Instant, u64)>>,
}

/// What a connection has moved so far, for snapshots.
pub(crate) struct Traffic {
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// Bytes written.
    pub bytes_out: u64,
}

impl Connection {
    /// A fresh connection of peer `id`, its queue bounded by `limits`.
    pub(crate) fn new(id: PeerId, limits: &PeerLimits) -> Connection {
        Connection {
            id,
            out: RefCell::new(OutQueue::new(id, limits.max_queued_bytes)),
            writer_event: LocalEvent::default(),
            parked_writer: RefCell::new(None),
            close_event: LocalEvent::default(),
            close_reason: OnceCell::new(),
            frames_in: Cell::new(0),
            bytes_in: Cell::new(0),
            frames_out: Cell::new(0),
            bytes_out: Cell::new(0),
            behind_mark: Cell::new(None),
        }
    }

    /// The peer declared in its HELLO that it reads as a stream: its output
    /// goes out unpaced from now on.
    pub(crate) fn peer_reads_stream(&self) {
        self.out.borrow_mut().mark_peer_reads_stream();
    }

    /// Closes the connection for `reason` unless already closing (the first
    /// reason wins and is the one logged and counted).
    pub(crate) fn close(&self, reason: CloseReason) {
        if self.close_reason.set(reason).is_err() {
            return;
        }
        self.close_event.notify();
        self.writer_event.notify();
    }

    /// Is the connection closing?
    pub(crate) fn is_closed(&self) -> bool {
        self.close_reason.get().is_some()
    }

    /// Why it is closing, if it is.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.get().cloned()
    }

    /// Notified when the connection is closed.
    pub(crate) fn close_event(&self) -> &LocalEvent {
        &self.close_event
    }

    /// The pending output (deliveries are queued here, then the writer is
    /// started if it is parked: `peer::start_writer`).
    pub(crate) fn out(&self) -> &RefCell<OutQueue> {
        &self.out
    }

    /// See `writer_event`.
    pub(crate) fn writer_event(&self) -> &LocalEvent {
        &self.writer_event
    }

    /// Is the writer parked (no writer task runs)?
    pub(crate) fn writer_parked(&self) -> bool {
        self.parked_writer.borrow().is_some()
    }

    /// Parks the writer's state (at the session's start, and by a writer
    /// task that ends) and tells the session task.
    pub(crate) fn park_writer(&self, state: Box<WriterState>) {
        *self.parked_writer.borrow_mut() = Some(state);
        self.writer_event.notify();
    }

    /// Takes the parked writer's state to start a writer task with it.
    pub(crate) fn unpark_writer(&self) -> Option<Box<WriterState>> {
        self.parked_writer.borrow_mut().take()
    }

    /// Queues a session reply (a KEEPALIVE only if none is waiting already,
    /// see `OutQueue::push_control`). A peer that does not read at all is
    /// cut off by the writer's stall timeout; meanwhile it costs one reply.
    /// A KEEPALIVE goes ahead of routes queued `interval` (the session's
    /// keepalive interval) ago or earlier and still unwritten: a Go peer
    /// working through a paced backlog would otherwise miss our replies
    /// for its hold time (2.5 intervals; its timer runs on KEEPALIVEs
    /// only) and reset. A peer that keeps up, even under a flood, is never
    /// that far behind, so its replies keep their place: a barrier.
    pub(crate) fn push_control(&self, msg: &Message, interval: Duration) {
        let ahead = self
            .behind_mark
            .get()
            .is_some_and(|(at, mark)| self.bytes_out.get() < mark && at.elapsed() >= interval);
        // Queued or not, the caller starts a parked writer next.
        self.out.borrow_mut().push_control(msg, ahead);
    }

    /// Moves the behind mark on once the peer has taken everything that was
    /// queued when it was set (see `behind_mark`).
    fn mark_behind(&self, now: Instant) {
        let out = self.bytes_out.get();
        if self.behind_mark.get().is_none_or(|(_, mark)| out >= mark) {
            let queued = self.out.borrow().queued_bytes() as u64;
            self.behind_mark.set(Some((now, out + queued)));
        }
    }

    /// Counts one read: `bytes` received, `frames` decoded from them.
    pub(crate) fn count_read(&self, frames: u64, bytes: usize) {
        self.bytes_in.set(self.bytes_in.get() + bytes as u64);
        self.frames_in.set(self.frames_in.get() + frames);
    }

    /// What the connection has moved so far.
    pub(crate) fn traffic(&self) -> Traffic {
        Traffic {
            frames_in: self.frames_in.get(),
            bytes_in: self.bytes_in.get(),
            frames_out: self.frames_out.get(),
            bytes_out: self.bytes_out.get(),
        }
    }
}

/// A freshly accepted connection, split for its two tasks. Built before
/// the session task, so that task holds the two halves (two pointers) and
/// not the 120-byte stream it would keep a copy of for the session's life.
pub(crate) struct Transport {
    /// The reading half, for the session task.
    pub(crate) reader: ReadHalf<TcpStream>,
    /// The writing half with its descriptor, for the writer task.
    pub(crate) writer: SocketWriter,
    /// The peer's address, read once at accept (see `remote_addr`).
    pub(crate) remote: SocketAddr,
}

impl Transport {
    /// Sets `TCP_NODELAY` on `stream` (replies and deliveries are written
    /// whole; Nagle would only delay them) and splits it.
    pub(crate) fn new(stream: TcpStream) -> Transport {
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let remote = remote_addr(&stream);
        let (reader, half) = futures_lite::io::split(stream);
        Transport {
            reader,
            writer: SocketWriter { half, fd },
            remote,
        }
    }
}

/// The writing half of a connection together with its socket's
/// descriptor, for socket2's calls (vectored `sendmsg`, `TCP_INFO`) while
/// futures-lite's split halves hold the stream. The half keeps the stream,
/// and so the descriptor, open as long as this value lives; `fd` lends it
/// for no longer than that.
pub(crate) struct SocketWriter {
    /// futures-lite's writing half (glommio's readiness-aware writes).
    half: WriteHalf<TcpStream>,
    /// The stream's descriptor, owned by the stream `half` holds.
    fd: RawFd,
}

impl SocketWriter {
    /// The socket, borrowed for as long as the writer lives.
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `half` holds the stream that owns `fd`, so the descriptor
        // stays open for the lifetime of `&self`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// A listening socket with its descriptor (a glommio listener does not
/// expose its own), for the shutdown that takes it out of LISTEN.
pub(crate) struct Listener {
    /// glommio's listener, which accepts.
    pub(crate) accept: TcpListener,
    /// Its descriptor, owned by `accept`.
    fd: RawFd,
}

impl Listener {
    /// Hands a bound, listening std socket to glommio.
    pub(crate) fn from_std(listener: std::net::TcpListener) -> Listener {
        let fd = listener.into_raw_fd();
        // SAFETY: the fd comes from a std listener we own and give up here;
        // the glommio listener owns it from now on.
        let accept = unsafe { TcpListener::from_raw_fd(fd) };
        Listener { accept, fd }
    }

    /// A connection waiting in the backlog, accepted without blocking and
    /// without io_uring (`None` when the backlog is empty). Only the
    /// listener's one accept loop accepts on it, and not while its io_uring
    /// accept is pending, so a connection `poll` reports is still there for
    /// `accept4`, which therefore does not block on the blocking socket.
    pub(crate) fn accept_ready(&self) -> io::Result<Option<OwnedFd>> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 || pfd.revents & libc::POLLIN == 0 {
            return Ok(None);
        }
        // SAFETY: `self.fd` is our listening socket; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                self.fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Stops listening at once (see `stop_listening`) and closes the socket.
    pub(crate) fn close(self) {
        // SAFETY: `self.accept` owns `fd` and is still alive here.
        stop_listening(&unsafe { BorrowedFd::borrow_raw(self.fd) });
        drop(self.accept);
    }
}

/// What woke the reader.
pub(crate) enum ReadEvent {
    /// The socket read returned (bytes, EOF or error).
    Data(io::Result<usize>),
    /// One of the events waited for (closed, policy reloaded, the session's
    /// deadline due): the caller checks which.
    Woken,
}

/// Waits for the first of: data (or EOF, or an error) on the socket, one
/// of `events`. The event waits are created by the caller before it checks
/// their conditions, so no wake-up is lost. No timer: the session's
/// deadline comes as an event from the shard's clock (`session_clock`).
pub(crate) async fn next_read_event(
    reader: &mut ReadHalf<TcpStream>,
    buf: &mut ReadBuf,
    events: [EventWait<'_>; 2],
) -> ReadEvent {
    let [a, b] = events;
    future::or(
        async { ReadEvent::Data(reader.read(buf.as_mut()).await) },
        async {
            future::or(a, b).await;
            ReadEvent::Woken
        },
    )
    .await
}

/// The writer's state, kept between its runs (boxed in the `Connection`
/// while no writer task runs).
pub(crate) struct WriterState {
    /// The socket's writing half.
    socket: SocketWriter,
    /// Pacing of a peer that has not shown it reads as a stream.
    pacing: Pacing,
}

/// The writer's pacing: the pacer while the peer may still be paced,
/// nothing once it streams (declared in its HELLO, proven by how it reads,
/// or its window unknown to the kernel). Our clients declare it, so their
/// sessions drop the pacer's ~200 bytes at their first write: 4 MiB of a
/// 19,000-peer fleet (issue #28). A Go peer keeps it until it has proven
/// itself.
type Pacing = Option<Box<ReaderPacer>>;

impl WriterState {
    /// The state of a new session's writer (reads the peer's TCP window).
    pub(crate) fn new(socket: SocketWriter) -> Box<WriterState> {
        let pacer = ReaderPacer::new(read_window(socket.fd()), Instant::now());
        let pacing = (!pacer.is_streaming()).then(|| Box::new(pacer));
        Box::new(WriterState { socket, pacing })
    }
}

impl Connection {
    /// Writes queued output at once, from the caller (the shard's write
    /// task, a reader with its replies), while the writer is parked: one
    /// vectored `sendmsg` of up to `WRITE_BYTES`, no task of its own. A
    /// writer task started for every delivery to an idle peer cost churn a
    /// task per delivery (issue #28); the deliveries queued for a peer
    /// since the shard's write task last ran go out in one call.
    ///
    /// True when nothing is left for a writer task: the queue is drained,
    /// a writer task runs already, or the connection is closing.
    /// False when the socket did not take everything (the rest went back
    /// to the queue's front), more than one write waits, or the peer is
    /// paced (`pacing`: the writer task times its writes).
    pub(crate) fn write_while_parked(&self, shard: &ShardContext) -> bool {
        if self.is_closed() {
            return true;
        }
        let mut parked = self.parked_writer.borrow_mut();
        let Some(state) = parked.as_deref_mut() else {
            return true;
        };
        let WriterState { socket, pacing } = state;
        let wb = {
            let mut out = self.out.borrow_mut();
            if paced(pacing, &out).is_some() {
                return !out.has_output();
            }
            out.take_for_write(WRITE_BYTES, WRITE_PARTS)
        };
        if wb.parts.is_empty() && wb.sync_written.is_empty() {
            self.behind_mark.set(None);
            return true;
        }
        let mut written = 0;
        let mut calls = 0;
        let mut at = (0, 0);
        while at.0 < wb.parts.len() {
            match send_vectored(socket.fd(), &wb.parts[at.0..], at.1) {
                Ok(n) => {
                    calls += 1;
                    written += n;
                    at = advance(&wb.parts, at, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    drop(parked);
                    self.close(CloseReason::Io(e.into()));
                    return true;
                }
            }
            if at.0 < wb.parts.len() && calls >= 2 {
                break;
            }
        }
        self.count_written(shard, pacing, &wb, written, calls);
        if at.0 < wb.parts.len() {
            self.out
                .borrow_mut()
                .put_back(&wb.parts[at.0..], at.1, &wb.sync_written);
            return false;
        }
        self.report_sync_written(shard, &wb.sync_written);
        let mut out = self.out.borrow_mut();
        if out.has_output() {
            return false;
        }
        // Drained: the queue keeps no slots either (a fleet of 19,000
        // peers kept a few each from its convergence).
        out.release_if_drained();
        self.behind_mark.set(None);
        true
    }

    /// Counts a write of `bytes` of `wb` (all of it, or the part the
    /// socket took: the batch's frames are counted whole either way) in
    /// `calls` calls.
    fn count_written(
        &self,
        shard: &ShardContext,
        pacing: &mut Pacing,
        wb: &WriteBatch,
        bytes: usize,
        calls: usize,
    ) {
        let now = Instant::now();
        if pacing.as_deref_mut().is_some_and(|p| p.wrote(bytes, now)) {
            tracing::debug!("peer reads as a stream: output no longer paced");
            *pacing = None;
        }
        self.out.borrow_mut().written(bytes);
        self.frames_out
            .set(self.frames_out.get() + wb.frames as u64);
        self.bytes_out.set(self.bytes_out.get() + bytes as u64);
        self.mark_behind(now);
        shard
            .counters()
            .written(wb.frames, wb.updates, bytes, calls);
        for born in &wb.fanout_born {
            shard
                .counters()
                .fanout_written(now.saturating_duration_since(*born));
        }
    }

    /// The sync chunks `tags` are on the socket: their owners may send the
    /// next ones.
    fn report_sync_written(&self, shard: &ShardContext, tags: &[SyncTag]) {
        for &tag in tags {
            shard.to_owner(tag.vni, OwnerInput::SyncWritten { peer: self.id, tag });
        }
    }
}

/// Where a write of `n` more bytes leaves a position (buffer index, offset
/// into it) in `parts`.
fn advance(parts: &[Bytes], (mut idx, mut off): (usize, usize), n: usize) -> (usize, usize) {
    let mut left = n;
    while left > 0 && idx < parts.len() {
        let avail = parts[idx].len() - off;
        if left >= avail {
            left -= avail;
            idx += 1;
            off = 0;
        } else {
            off += left;
            left = 0;
        }
    }
    (idx, off)
}

/// The writer task: moves the connection's `OutQueue` to the socket until
/// the connection closes (or a write fails, which closes it). Paced (see
/// `pacing`) until the peer has shown it reads as a stream.
pub(crate) async fn write_loop(shard: &ShardContext, conn: &Connection, state: Box<WriterState>) {
    let mut state = state;
    write_until_drained(shard, conn, &mut state).await;
    conn.park_writer(state);
}

/// The writer task's work: until the connection closes or nothing is
/// queued.
async fn write_until_drained(shard: &ShardContext, conn: &Connection, state: &mut WriterState) {
    let WriterState {
        socket: writer,
        pacing,
    } = state;
    let mut drain = DrainWatch::new();
    loop {
        if conn.is_closed() {
            return;
        }
        let pending = conn.out.borrow().queued_bytes() as u64;
        let stall = shard.config().limits.write_stall_timeout;
        if let Some(reason) = drain.check(stall, conn.bytes_out.get(), pending, Instant::now()) {
            conn.close(reason);
            return;
        }
        let wb = match next_write(conn, pacing, writer.fd()) {
            NextWrite::Batch(wb) => wb,
            NextWrite::Wait(d) => {
                // A peer that takes nothing meanwhile is cut off by
                // `drain` above, paced or not.
                conn.mark_behind(Instant::now());
                let closed = conn.close_event.wait();
                if !conn.is_closed() {
                    future::or(closed, glommio::timer::sleep(d)).await;
                }
                continue;
            }
        };
        if wb.parts.is_empty() && wb.sync_written.is_empty() {
            // Drained: the task ends and the writer parks until output is
            // queued again.
            conn.behind_mark.set(None);
            return;
        }
        if !wb.parts.is_empty() {
            match write_parts(conn, writer, &wb.parts, shard, &mut drain).await {
                Ok(calls) => conn.count_written(shard, pacing, &wb, wb.bytes, calls),
                Err(WriteFailed::AlreadyClosed) => return,
                Err(WriteFailed::Close(reason)) => {
                    conn.close(reason);
                    return;
                }
            }
        }
        conn.report_sync_written(shard, &wb.sync_written);
        // A subscriber that reads as fast as we write never fills its
        // socket, so nothing above waits: without this, draining a large
        // backlog (a burst to a peer that keeps up) would hold the
        // shard.
        glommio::yield_if_needed().await;
    }
}

/// Least a peer with output waiting must take per write-stall timeout to
/// count as draining: 64 KiB, about 550 bytes a second at the default
/// 120 s, far below the slowest real reader (a Go peer at a few thousand
/// routes a second takes 100 KiB a second and more).
const DRAIN_MIN_BYTES: u64 = 64 * 1024;

/// Is a peer taking its output at a useful rate? A socket that accepts a
/// trickle (a peer that never reads, whose kernel still collapses its
/// receive queue to make room and reopens its window a little) keeps
/// single writes from stalling; this looks at what was written over each
/// `--write-stall-timeout` instead.
struct DrainWatch {
    /// Start of the current window, `None` while nothing waits: output has
    /// been waiting since then.
    since: Option<Instant>,
    /// Bytes written before the window started.
    written_then: u64,
    /// Most bytes seen waiting in the window (at most `DRAIN_MIN_BYTES`):
    /// a peer that took that many kept up, however little it was.
    pending_then: u64,
}

impl DrainWatch {
    fn new() -> DrainWatch {
        DrainWatch {
            since: None,
            written_then: 0,
            pending_then: 0,
        }
    }

    /// `written`: the connection's bytes written so far; `pending`: bytes
    /// waiting to be written. A stall reason when, over a whole window with
    /// output waiting all along, the peer took less than `DRAIN_MIN_BYTES`
    /// and less than what waited in it.
    fn check(
        &mut self,
        stall: Option<Duration>,
        written: u64,
        pending: u64,
        now: Instant,
    ) -> Option<CloseReason> {
        let stall = stall?;
        if pending == 0 {
            self.since = None;
            return None;
        }
        let Some(since) = self.since else {
            self.start(now, written, pending);
            return None;
        };
        self.pending_then = self.pending_then.max(pending.min(DRAIN_MIN_BYTES));
        if now.saturating_duration_since(since) < stall {
            return None;
        }
        if written - self.written_then < self.pending_then {
            return Some(CloseReason::WriteStall(stall));
        }
        self.start(now, written, pending);
        None
    }

    /// A new window: `pending` bytes wait now.
    fn start(&mut self, now: Instant, written: u64, pending: u64) {
        self.since = Some(now);
        self.written_then = written;
        self.pending_then = pending.min(DRAIN_MIN_BYTES);
    }
}

/// The pacer of a peer whose output is still paced; `None` once the peer
/// has shown it reads as a stream, or declared so in its HELLO (learnt
/// here), and then the pacer is dropped.
fn paced<'a>(pacing: &'a mut Pacing, out: &OutQueue) -> Option<&'a mut ReaderPacer> {
    let declared = out.peer_reads_stream();
    if declared || pacing.as_deref()?.is_streaming() {
        if declared {
            tracing::debug!("peer declared it reads as a stream: output not paced");
        }
        *pacing = None;
        return None;
    }
    pacing.as_deref_mut()
}

/// What the writer does next.
enum NextWrite {
    /// Write this (empty: nothing is queued).
    Batch(WriteBatch),
    /// Paced and the peer has not read enough: look again after this long.
    Wait(Duration),
}

/// The next write: everything the socket takes for a peer that streams,
/// whole frames within the pacing budget for one that is paced.
fn next_write(conn: &Connection, pacing: &mut Pacing, sock: BorrowedFd<'_>) -> NextWrite {
    let mut out = conn.out.borrow_mut();
    let Some(pacer) = paced(pacing, &out) else {
        return NextWrite::Batch(out.take_for_write(WRITE_BYTES, WRITE_PARTS));
    };
    let Some(next) = out.next_frame_len() else {
        return NextWrite::Batch(out.take_frames(0, WRITE_PARTS));
    };
    loop {
        match pacer.budget(next, Instant::now()) {
            Budget::Unlimited => {
                return NextWrite::Batch(out.take_for_write(WRITE_BYTES, WRITE_PARTS))
            }
            Budget::Frames { bytes, segment } => {
                return NextWrite::Batch(out.take_frames(bytes.min(segment), WRITE_PARTS))
            }
            Budget::Probe => return NextWrite::Batch(out.take_frames(next, 1)),
            Budget::Wait(d) => return NextWrite::Wait(d),
            Budget::Measure => match read_window(sock) {
                Some(w) => {
                    tracing::trace!(?w, ?pacer, "peer's TCP window");
                    pacer.observe(w, Instant::now())
                }
                None => pacer.stream(),
            },
        }
    }
}

/// `TCP_INFO` of the peer's socket; `None` when the kernel cannot tell the
/// window (said once per process: output is then not paced).
fn read_window(sock: BorrowedFd<'_>) -> Option<TcpWindow> {
    match pacing::tcp_window(sock) {
        Ok(Some(w)) => Some(w),
        Ok(None) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "this kernel does not report the peer's TCP window (tcpi_snd_wnd, \
                     Linux >= 5.4): output is not paced, and Go peers may reset on \
                     syncs of thousands of routes"
                )
            });
            None
        }
        // The connection is going away; the next write says why.
        Err(_) => None,
    }
}

/// Why `write_parts` stopped.
enum WriteFailed {
    /// The connection was closed from elsewhere meanwhile (its reason is
    /// already recorded).
    AlreadyClosed,
    /// The write failed or stalled: close for this reason.
    Close(CloseReason),
}

/// Writes all of `parts`: vectored non-blocking `sendmsg` while the socket
/// takes data, glommio's readiness-aware write when it is full. Returns the
/// number of write calls made.
async fn write_parts(
    conn: &Connection,
    writer: &mut SocketWriter,
    parts: &[Bytes],
    shard: &ShardContext,
    drain: &mut DrainWatch,
) -> Result<usize, WriteFailed> {
    let stall = shard.config().limits.write_stall_timeout;
    let mut idx = 0;
    let mut off = 0;
    let mut calls = 0;
    let mut sent = 0u64;
    while idx < parts.len() {
        let n = match send_vectored(writer.fd(), &parts[idx..], off) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A socket that takes a trickle never stalls one write.
                let written = conn.bytes_out.get() + sent;
                let pending = conn.out.borrow().queued_bytes() as u64;
                if let Some(reason) = drain.check(stall, written, pending, Instant::now()) {
                    return Err(WriteFailed::Close(reason));
                }
                // Boxed: only a peer that does not keep up gets here, and
                // the wait's state (write, timer, close) would otherwise
                // take room in every connection's writer task.
                Box::pin(write_when_room(
                    conn,
                    &mut writer.half,
                    &parts[idx][off..],
                    stall,
                ))
                .await?
            }
            Err(e) => return Err(WriteFailed::Close(CloseReason::Io(e.into()))),
        };
        calls += 1;
        sent += n as u64;
        (idx, off) = advance(parts, (idx, off), n);
    }
    Ok(calls)
}

/// The socket is full: waits for room and writes (part of) `bytes` with
/// glommio's readiness-aware write, bounded by the stall timeout, or stops
/// when the connection is closed from elsewhere. Returns the bytes written.
async fn write_when_room(
    conn: &Connection,
    writer: &mut WriteHalf<TcpStream>,
    bytes: &[u8],
    stall: Option<Duration>,
) -> Result<usize, WriteFailed> {
    let closed = conn.close_event.wait();
    if conn.is_closed() {
        return Err(WriteFailed::AlreadyClosed);
    }
    let write = async { Some(writer.write(bytes).await) };
    let stop = async {
        match stall {
            Some(d) => {
                future::or(closed, glommio::timer::sleep(d)).await;
            }
            None => closed.await,
        }
        None
    };
    match future::or(write, stop).await {
        Some(Ok(n)) => Ok(n),
        Some(Err(e)) => Err(WriteFailed::Close(CloseReason::Io(e.into()))),
        None if conn.is_closed() => Err(WriteFailed::AlreadyClosed),
        None => Err(WriteFailed::Close(CloseReason::WriteStall(
            stall.unwrap_or_default(),
        ))),
    }
}

/// One non-blocking `sendmsg` of `parts` (the first starting at `offset`).
/// MSG_DONTWAIT keeps the shard from blocking, MSG_NOSIGNAL turns a closed
/// peer into EPIPE, not SIGPIPE.
fn send_vectored(sock: BorrowedFd<'_>, parts: &[Bytes], offset: usize) -> io::Result<usize> {
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len().min(WRITE_PARTS));
    for (i, p) in parts.iter().take(WRITE_PARTS).enumerate() {
        let slice = if i == 0 { &p[offset..] } else { &p[..] };
        iov.push(IoSlice::new(slice));
    }
    socket2::SockRef::from(&sock)
        .send_vectored_with_flags(&iov, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
}

/// Takes a listening socket out of LISTEN at once (`shutdown(2)`), before
/// it is dropped: an accept still queued in io_uring holds the socket open
/// until the kernel tears the ring down, after the process may have exited,
/// and a restarted server then found the port "in use" (seen in 4 of 30
/// quick restarts). A new SO_REUSEADDR bind then succeeds.
fn stop_listening(listener: &BorrowedFd<'_>) {
    if let Err(e) = socket2::SockRef::from(listener).shutdown(std::net::Shutdown::Both) {
        tracing::debug!(error = %e, "shutdown of a listening socket failed");
    }
}

/// The remote address of `stream`, or `[::]:0` if the socket already lost
/// it (the peer reset the connection before we asked).
pub(crate) fn remote_addr(stream: &TcpStream) -> SocketAddr {
    stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))
}

/// Bytes a quiet peer is read with: enough for its KEEPALIVEs, a HELLO, a
/// SUBSCRIBE or an UPDATE; a read that fills it grows the buffer (`adapt`).
/// Held inline in the session task, so a quiet peer holds no read buffer
/// on the heap (10,000 idle peers × `READ_BUF_MIN` was 40 MiB of the
/// server's memory). 64, not 256: the session task then fits mimalloc's
/// 1,024-byte class instead of the 1,280-byte one (issue #28).
pub(crate) const READ_BUF_QUIET: usize = 64;

/// The reader's socket buffer: inline and small while the peer is quiet,
/// on the heap and grown while its reads fill it (a burst of UPDATEs),
/// shrunk again after.
pub(crate) struct ReadBuf {
    /// Where a quiet peer is read into (used while `grown` is empty).
    quiet: [u8; READ_BUF_QUIET],
    /// The buffer of a busy peer, `READ_BUF_MIN` to `READ_BUF_MAX` bytes;
    /// empty (no allocation) while the peer is quiet.
    grown: Vec<u8>,
}

impl ReadBuf {
    /// A quiet buffer: nothing on the heap.
    pub(crate) fn new() -> ReadBuf {
        ReadBuf {
            quiet: [0u8; READ_BUF_QUIET],
            grown: Vec::new(),
        }
    }

    /// The slice to read into.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        if self.grown.is_empty() {
            &mut self.quiet
        } else {
            &mut self.grown
        }
    }

    /// Current size.
    fn len(&self) -> usize {
        if self.grown.is_empty() {
            READ_BUF_QUIET
        } else {
            self.grown.len()
        }
    }

    /// After a read of `n` bytes: grow when it filled the buffer; give a
    /// grown buffer back when the read was shorter than the buffer or than
    /// `READ_BUF_MIN` (the burst is over). A peer that announces a few
    /// dozen routes at start-up used to keep 4 KiB until its next read, a
    /// keepalive interval later: 8 MiB of a 2,000-peer fleet's start.
    pub(crate) fn adapt(&mut self, n: usize) {
        let len = self.len();
        if n == len && len < READ_BUF_MAX {
            let next = if self.grown.is_empty() {
                READ_BUF_FIRST
            } else {
                (len * 4).min(READ_BUF_MAX)
            };
            self.grown = vec![0u8; next];
        } else if n < len.min(READ_BUF_MIN) && !self.grown.is_empty() {
            self.grown = Vec::new();
        }
    }

    /// The peer went quiet: back to the inline buffer, releasing the heap one.
    pub(crate) fn shrink(&mut self) {
        self.grown = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_utils::pacing::TcpWindow;

    fn go_peer_pacing() -> Pacing {
        let window = TcpWindow {
            acked: 0,
            window: 65_535,
            mss: 1_448,
            unit: 1,
        };
        Some(Box::new(ReaderPacer::new(Some(window), Instant::now())))
    }

    #[test]
    fn a_session_keeps_its_pacer_only_while_the_peer_may_be_paced() {
        let mut out = OutQueue::new(PeerId::new(0, 1), 1 << 20);
        let mut pacing = go_peer_pacing();
        assert!(paced(&mut pacing, &out).is_some(), "a Go peer is paced");
        assert!(pacing.is_some(), "and keeps its pacer");
        out.mark_peer_reads_stream();
        assert!(
            paced(&mut pacing, &out).is_none(),
            "a declared stream is not paced"
        );
        assert!(pacing.is_none(), "and keeps no pacing state");
        assert!(paced(&mut pacing, &out).is_none());

        // One proven by its reads drops it as well.
        let out = OutQueue::new(PeerId::new(0, 2), 1 << 20);
        let mut pacing = go_peer_pacing();
        if let Some(p) = pacing.as_deref_mut() {
            p.stream();
        }
        assert!(paced(&mut pacing, &out).is_none());
        assert!(pacing.is_none());
    }

    #[test]
    fn a_peer_taking_a_trickle_is_stalled_one_taking_a_stream_is_not() {
        let t = Instant::now();
        let s = |secs| t + Duration::from_secs(secs);
        let stall = Some(Duration::from_secs(10));
        let mut d = DrainWatch::new();
        // Output waiting, 100 bytes a second: stalled after one window.
        for sec in 0..10 {
            assert!(d.check(stall, sec * 100, 1 << 20, s(sec)).is_none());
        }
        assert!(matches!(
            d.check(stall, 1_000, 1 << 20, s(10)),
            Some(CloseReason::WriteStall(_))
        ));
        // 100 KiB a second (a slow Go peer) goes on for ever.
        let mut d = DrainWatch::new();
        for sec in 0..100 {
            assert!(d.check(stall, sec * 100 * 1024, 1 << 20, s(sec)).is_none());
        }
        // Nothing waiting now and then: no stall, however little was written.
        let mut d = DrainWatch::new();
        for sec in 0..100 {
            let pending = if sec % 5 == 0 { 0 } else { 1 << 20 };
            assert!(d.check(stall, 0, pending, s(sec)).is_none());
        }
        // A few bytes waiting all the time (KEEPALIVE replies to a busy
        // announcer), each taken: no stall.
        let mut d = DrainWatch::new();
        for sec in 0..100 {
            assert!(d.check(stall, sec * 4, 4, s(sec)).is_none());
        }
        // Output after a long idle spell starts a new window.
        let mut d = DrainWatch::new();
        assert!(d.check(stall, 0, 0, s(0)).is_none());
        assert!(d.check(stall, 0, 4, s(100)).is_none());
        assert!(d.check(stall, 4, 4, s(105)).is_none());
        assert!(d.check(stall, 8, 4, s(110)).is_none());
        // No timeout configured: never.
        let mut d = DrainWatch::new();
        assert!(d.check(None, 0, 1 << 20, s(1_000)).is_none());
    }

    #[test]
    fn read_buffer_grows_while_reads_fill_it_and_shrinks_after() {
        let mut b = ReadBuf::new();
        assert_eq!(b.len(), READ_BUF_QUIET);
        assert_eq!(b.grown.capacity(), 0, "a new peer holds no heap buffer");
        b.adapt(10);
        assert_eq!(
            b.len(),
            READ_BUF_QUIET,
            "a short read keeps the quiet buffer"
        );
        b.adapt(READ_BUF_QUIET);
        assert_eq!(
            b.len(),
            READ_BUF_FIRST,
            "a full quiet read moves to the heap"
        );
        b.adapt(100);
        assert_eq!(b.len(), READ_BUF_QUIET, "a short read ends the burst");
        assert_eq!(b.grown.capacity(), 0);
        b.adapt(READ_BUF_QUIET);
        b.adapt(READ_BUF_FIRST);
        assert_eq!(b.len(), READ_BUF_MIN, "a full first step grows ×4");
        b.adapt(READ_BUF_MIN);
        assert_eq!(b.len(), READ_BUF_MIN * 4);
        b.adapt(READ_BUF_MIN * 4);
        assert_eq!(b.len(), READ_BUF_MAX);
        b.adapt(READ_BUF_MAX);
        assert_eq!(b.len(), READ_BUF_MAX, "never beyond the maximum");
        b.adapt(READ_BUF_MIN * 2);
        assert_eq!(b.len(), READ_BUF_MAX, "a medium read keeps the size");
        b.adapt(10);
        assert_eq!(
            b.len(),
            READ_BUF_QUIET,
            "a short read gives a grown buffer back"
        );
        b.adapt(READ_BUF_QUIET);
        assert_eq!(b.len(), READ_BUF_FIRST);
        b.shrink();
        assert_eq!(
            b.len(),
            READ_BUF_QUIET,
            "an idle peer gives the heap buffer back"
        );
        assert_eq!(b.grown.capacity(), 0);
        assert_eq!(b.as_mut().len(), READ_BUF_QUIET);
    }
}
