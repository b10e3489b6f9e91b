//! Pacing a session's output by what the peer's reader has consumed.
//!
//! Why: the deployed Go MetalBond peer reads into one 65,535-byte buffer,
//! parses all of it, and only then reads again; a read that fills the buffer
//! resets the session, and a frame split across two reads is misparsed
//! (PROTOCOL.md, "What a deployed Go peer can take"). It processes a few
//! thousand routes a second, so a sender that writes a large sync in a few
//! large writes leaves 64 KiB waiting at it before its second read. Such a
//! peer cannot say what it is; our own peers can: their HELLO carries
//! `readsStream` (field 100, ours; a Go peer ignores it and never sends it),
//! and the writer of a session whose peer declared it calls `stream` before
//! the first route goes out. Every other session starts *paced*: at most
//! `PACED_UNREAD` bytes may be out that the peer's application has not read
//! yet, estimated from the kernel's view of the connection (`TCP_INFO`):
//!
//! ```text
//!   right edge E  = bytes the peer acknowledged + the window it advertises
//!   its buffer F  ≈ the largest window it ever advertised
//!   its reader has consumed C ≈ E − F      (a read reopens the window)
//!   unread or in flight       = written − C   ≤ PACED_UNREAD
//! ```
//!
//! A reader that keeps up but does not declare it (another implementation,
//! an older version of ours) keeps its window open, so the bound costs it
//! one round of ACKs per `PACED_UNREAD`. Once it has taken `PROOF_BYTES`
//! within `PROOF_WINDOW`, a rate no Go peer reaches (it writes a log line
//! per route), the session *streams*: no bound for the rest of its life,
//! writes as large as the socket takes, exactly as before pacing existed.
//!
//! While paced, each write holds whole frames and at most one segment, so a
//! read never ends inside a frame. A reader that has read everything need not
//! tell us: Linux sends a window update after a read only when the window
//! doubles, and a receiver that also sends may hold the ACK of a lone small
//! segment for 40 ms. So when the bound is reached and no reading shows
//! progress, one frame is written now and then as a *probe*: the peer's ACK
//! of it carries its window.
//!
//! The estimate of F is the weak spot: a receiver's window grows during the
//! first round trips, so early on C is overestimated by that growth. The
//! bound leaves room for it (24 KiB of 64; measured against a model of the Go
//! reader, `tests/go_peer_interop.rs`, and the Go client itself, BENCHMARKS).
//!
//! Must never: block, sleep, write, or know what a frame means. The writers
//! (`server/connection.rs`, `client/connection.rs`) read `TCP_INFO` with
//! `tcp_window`, ask `budget`, write, and report with `wrote`.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Most bytes a paced session may have written that the peer's reader has
/// not consumed (in flight or waiting in its socket). Well under the Go
/// reader's 65,535-byte buffer: what is left covers the growth of the
/// peer's window that the estimate does not see yet (module doc).
pub const PACED_UNREAD: u64 = 20 * 1024;
/// Bytes a paced session must take within `PROOF_WINDOW` to be trusted to
/// read as a stream (12.5 MiB/s, about 290,000 routes a second: more than
/// ten times what a Go client processes, logging each route, and several
/// times what its reader could parse with no logging at all). Short, so a
/// fast reader streams after its first few milliseconds: a sync or burst
/// to our own subscribers keeps its speed.
pub const PROOF_BYTES: u64 = 256 << 10;
/// See `PROOF_BYTES`.
pub const PROOF_WINDOW: Duration = Duration::from_millis(20);
/// First wait for an ACK of what is in flight; doubles up to `ACK_WAIT_MAX`
/// while no ACK comes.
const ACK_WAIT_MIN: Duration = Duration::from_micros(100);
/// See `ACK_WAIT_MIN`.
const ACK_WAIT_MAX: Duration = Duration::from_millis(2);
/// First wait before a probe while the peer's reader holds everything we
/// sent unread; doubles up to `PROBE_WAIT_MAX` while it stays that way.
const PROBE_WAIT_MIN: Duration = Duration::from_millis(2);
/// See `PROBE_WAIT_MIN`.
const PROBE_WAIT_MAX: Duration = Duration::from_millis(32);
/// The bound of a session's first write: it doubles with every reading
/// that shows the peer consuming, up to `PACED_UNREAD`. A receiver's window
/// grows as the first data arrives (Linux: to its buffer's size at the
/// first segment on loopback, a few KiB per segment elsewhere) and the
/// estimate of its buffer lags that growth by about what is unread at the
/// time: a small first write keeps that error small.
const PACED_START: u64 = 4 * 1024;
/// Readings showing consumption with a window that did not grow before the
/// bound may double (see `PACED_START`).
const SETTLED_READINGS: u32 = 3;
/// A probe acknowledged this soon was read at once: the peer's reader was
/// waiting in `read` with nothing left unread, so the window in that ACK is
/// its whole buffer (Linux acknowledges a small segment when a read empties
/// the queue; a segment that waits for a busy reader is acknowledged by the
/// delayed-ACK timer, tens of milliseconds later). That reading sets the
/// estimate of the buffer, up or down: a receiver's window grows during the
/// first round trips and shrinks under memory pressure.
const PROMPT_ACK: Duration = Duration::from_millis(5);
/// Linux acknowledges up to 16 segments at once, whether read or not, at the
/// start of a connection and after it received nothing for its RTO (200 ms
/// at least): prompt ACKs of that many writes after either prove nothing.
const QUICK_ACK_WRITES: u32 = 32;
/// See `QUICK_ACK_WRITES`.
const QUICK_ACK_PAUSE: Duration = Duration::from_millis(200);
/// Fallback when no probe is acknowledged promptly (a receiver that also
/// sends delays its ACKs): after this long with the window closed and
/// everything acknowledged, the estimate of the buffer comes down by one
/// bound, once until the peer's edge moves again. Linux lowers a window with
/// nothing unread (it scales the window by the payload-to-overhead ratio of
/// what arrived, and small segments lower it), which the estimate reads as
/// unread data: this bounds how long that holds a reader up (it was 5 s,
/// and our client's announcements to our server stalled that long now and
/// then). A Go peer takes well under a second for a bound (20 KiB, about
/// 570 routes, at the 4,000–8,000 routes a second it processes); a slower
/// one finds two bounds waiting at most, well inside its 64 KiB, and no
/// third until it has read.
const REANCHOR_AFTER: Duration = Duration::from_secs(1);
/// A reading older than this is taken again before a burst starts.
const STALE_READING: Duration = Duration::from_millis(1);

/// What `TCP_INFO` says about the peer's side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpWindow {
    /// Bytes the peer acknowledged since the connection started (the
    /// kernel's count; only differences are used).
    pub acked: u64,
    /// The receive window the peer advertised last, in bytes.
    pub window: u32,
    /// Our maximum segment size toward the peer.
    pub mss: u32,
    /// The unit of the peer's window (`1 << its window scale`): the window
    /// moves in these steps, so smaller moves of its edge mean nothing.
    pub unit: u32,
}

/// Reads `TCP_INFO` of a connected TCP socket. `Ok(None)`: the kernel does
/// not report the peer's window (`tcpi_snd_wnd`, Linux < 5.4).
pub fn tcp_window(fd: BorrowedFd<'_>) -> io::Result<Option<TcpWindow>> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the borrow's duration; the
    // kernel writes at most `len` bytes into `info` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let needed = mem::offset_of!(libc::tcp_info, tcpi_snd_wnd) + mem::size_of::<u32>();
    if (len as usize) < needed {
        return Ok(None);
    }
    Ok(Some(TcpWindow {
        acked: info.tcpi_bytes_acked,
        window: info.tcpi_snd_wnd,
        mss: info.tcpi_snd_mss,
        // The low nibble is tcpi_snd_wscale (a C bitfield, little end first).
        unit: 1 << (info.tcpi_snd_rcv_wscale & 0x0f),
    }))
}

/// What the writer may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// Write anything, as large as the socket takes (the peer streams).
    Unlimited,
    /// Write whole frames, at most `bytes` in all, in writes of at most
    /// `segment` bytes each.
    Frames {
        /// Bytes that may go out before the next reading.
        bytes: usize,
        /// Largest single write.
        segment: usize,
    },
    /// Read `TCP_INFO` (`tcp_window`) and report it with `observe` first.
    Measure,
    /// Write the next frame alone: its ACK tells whether the peer has read.
    Probe,
    /// Write nothing; ask again after this long.
    Wait(Duration),
}

/// Whether the session is still paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bounded by `PACED_UNREAD` (every session starts here).
    Paced,
    /// Proven to read as a stream, or the kernel cannot tell us the window.
    Streaming,
}

/// One session's pacing state: what was written, what the peer's kernel
/// says it took, and what may go out next. See the module doc.
#[derive(Debug)]
pub struct ReaderPacer {
    /// Paced or streaming.
    mode: Mode,
    /// The kernel's acknowledged-bytes count at the first reading, taken
    /// before anything was written: the origin of `written`.
    acked_base: u64,
    /// Bytes written since that reading.
    written: u64,
    /// Bytes the peer acknowledged since then (as of the last reading).
    acked: u64,
    /// `written` may grow to this before a new reading is needed.
    limit: u64,
    /// Largest window the peer advertised: the estimate of its buffer
    /// (lowered by `REANCHOR_AFTER`).
    largest_window: u64,
    /// The window at the last reading.
    window: u64,
    /// When the edge last moved, or the buffer estimate was last lowered.
    anchored: Instant,
    /// The estimate was lowered by `REANCHOR_AFTER` since the edge last
    /// moved: it is lowered once per stall.
    reanchored: bool,
    /// The probe out: when it was written and `written` after it.
    probe: Option<(Instant, u64)>,
    /// Writes left during which the peer may be in quick-ACK mode (see
    /// `QUICK_ACK_WRITES`).
    quick_ack_writes: u32,
    /// When the last write went out.
    last_write: Instant,
    /// Right edge of the peer's window at the last reading (acked + window).
    edge: u64,
    /// Largest single paced write.
    segment: usize,
    /// The bound now: `PACED_START` doubling to `PACED_UNREAD`.
    bound: u64,
    /// Readings in a row that showed the peer consuming without its window
    /// growing: the bound grows only after `SETTLED_READINGS`.
    settled: u32,
    /// A reading was taken since `written` last reached `limit`.
    fresh: bool,
    /// When the last reading was taken: one older than `STALE_READING` is
    /// taken again before writing (the peer's window grows during the
    /// handshake and the first round trips; an old reading underestimates
    /// its buffer, the one error the bound cannot absorb).
    last_reading: Instant,
    /// Current wait for an ACK (backs off while none comes).
    ack_wait: Duration,
    /// Current wait before a probe (backs off while the peer reads nothing).
    probe_wait: Duration,
    /// When the peer last showed progress (its edge or its ACKs moved), or
    /// the last probe went out.
    last_progress: Instant,
    /// Start of the current proof window and `written` at that time.
    proof_from: (Instant, u64),
}

impl ReaderPacer {
    /// A paced session whose socket read `first` before anything was
    /// written to it; `None` (the kernel does not report the window) means
    /// the session is never paced.
    pub fn new(first: Option<TcpWindow>, now: Instant) -> ReaderPacer {
        let mut pacer = ReaderPacer {
            mode: Mode::Paced,
            acked_base: 0,
            written: 0,
            acked: 0,
            limit: 0,
            largest_window: 0,
            window: 0,
            anchored: now,
            reanchored: false,
            probe: None,
            quick_ack_writes: QUICK_ACK_WRITES,
            last_write: now,
            edge: 0,
            segment: metalbond_wire::codec::MAX_FRAME,
            bound: PACED_START,
            settled: 0,
            fresh: false,
            last_reading: now,
            ack_wait: ACK_WAIT_MIN,
            probe_wait: PROBE_WAIT_MIN,
            last_progress: now,
            proof_from: (now, 0),
        };
        match first {
            Some(w) => {
                pacer.acked_base = w.acked;
                pacer.observe(w, now);
            }
            None => pacer.mode = Mode::Streaming,
        }
        pacer
    }

    /// Is the session past pacing (proven to stream, or not pacable)?
    pub fn is_streaming(&self) -> bool {
        self.mode == Mode::Streaming
    }

    /// Stops pacing for good (the kernel stopped answering `TCP_INFO`, or
    /// does not report the window).
    pub fn stream(&mut self) {
        self.mode = Mode::Streaming;
    }

    /// What the writer may do now, with `next_frame` the length of the next
    /// frame it has to write.
    pub fn budget(&mut self, next_frame: usize, now: Instant) -> Budget {
        if self.mode == Mode::Streaming {
            return Budget::Unlimited;
        }
        if now.saturating_duration_since(self.last_reading) > STALE_READING {
            return Budget::Measure;
        }
        let room = self.limit.saturating_sub(self.written);
        if room >= next_frame as u64 {
            return Budget::Frames {
                bytes: room.min(usize::MAX as u64) as usize,
                segment: self.segment,
            };
        }
        if !self.fresh {
            return Budget::Measure;
        }
        // A reading showed no room: measure again after a wait.
        self.fresh = false;
        if self.written > self.acked && now < self.last_progress + PROBE_WAIT_MIN {
            // Data in flight: its ACK will move the edge.
            let wait = self.ack_wait;
            self.ack_wait = (self.ack_wait * 2).min(ACK_WAIT_MAX);
            return Budget::Wait(wait);
        }
        // Everything acknowledged and the window still closed by what the
        // reader holds: it may have read meanwhile without saying so. Or
        // what is in flight waits for a delayed ACK (a receiver that also
        // sends holds the ACK of a lone small segment for up to 40 ms even
        // after reading it): a probe is a second segment, acknowledged as
        // soon as a read takes both (Linux, `tcp_cleanup_rbuf`). Only the
        // first case lowers the estimate of the buffer: data never
        // acknowledged is not data read.
        let in_flight = self.written > self.acked;
        if !in_flight
            && !self.reanchored
            && now.saturating_duration_since(self.anchored) >= REANCHOR_AFTER
        {
            let lower = self
                .largest_window
                .saturating_sub(self.bound)
                .max(self.window);
            if lower < self.largest_window {
                self.largest_window = lower;
                self.anchored = now;
                self.reanchored = true;
                self.set_limit();
                self.fresh = true;
                return self.budget(next_frame, now);
            }
        }
        let due = self.last_progress + self.probe_wait;
        if now >= due {
            self.probe_wait = (self.probe_wait * 2).min(PROBE_WAIT_MAX);
            self.last_progress = now;
            // `wrote` records where it ends. Only a probe sent alone can
            // tell a read by a prompt ACK: one behind unacknowledged data
            // may be acknowledged on arrival with it (more than a segment
            // arrived, and a grown buffer kept the window), read or not.
            self.probe = (self.written == self.acked).then_some((now, u64::MAX));
            return Budget::Probe;
        }
        Budget::Wait(due - now)
    }

    /// Takes in a reading of `TCP_INFO`.
    pub fn observe(&mut self, w: TcpWindow, now: Instant) {
        self.fresh = true;
        self.last_reading = now;
        let acked = w.acked.saturating_sub(self.acked_base).min(self.written);
        let window = u64::from(w.window);
        let edge = acked + window;
        let grew = window > self.largest_window + u64::from(w.unit);
        self.largest_window = self.largest_window.max(window);
        self.window = window;
        if let Some((sent, end)) = self.probe {
            if acked >= end {
                self.probe = None;
                let prompt = now.saturating_duration_since(sent) <= PROMPT_ACK;
                // In quick-ACK mode (the first segments of a connection, or
                // after a pause in what it receives) a receiver acknowledges
                // every segment at once, read or not: such an ACK may raise
                // the estimate, never lower it.
                let quick_ack = self.quick_ack_writes > 0;
                if prompt && acked == self.written && (!quick_ack || window >= self.largest_window)
                {
                    // Read at once: nothing is unread, the window is all.
                    self.largest_window = window;
                    self.anchored = now;
                }
            }
        }
        if edge > self.edge + u64::from(w.unit) || acked > self.acked {
            self.last_progress = now;
            self.ack_wait = ACK_WAIT_MIN;
        }
        if edge > self.edge + u64::from(w.unit) {
            self.anchored = now;
            self.reanchored = false;
            self.probe_wait = PROBE_WAIT_MIN;
            if grew {
                // The window grew: part of this edge's move may be that
                // growth, not reading. Small steps until it settles.
                self.settled = 0;
                self.bound = PACED_START;
            } else if self.written > 0 {
                self.settled += 1;
                if self.settled >= SETTLED_READINGS {
                    self.bound = (self.bound * 2).min(PACED_UNREAD);
                }
            }
        }
        self.edge = self.edge.max(edge);
        self.acked = acked;
        self.set_limit();
        // Large segments: splitting rounds into small writes (tried, to get
        // ACKs sooner) lowers the receiver's window, which Linux scales by
        // the payload-to-overhead ratio of what arrives, and the lower
        // window reads as unread data: a late sync of 100,000 routes
        // stalled for seconds.
        let half = (PACED_UNREAD / 2) as usize;
        self.segment = (w.mss as usize).clamp(metalbond_wire::codec::MAX_FRAME, half);
    }

    /// written − (edge − largest_window) ≤ bound
    fn set_limit(&mut self) {
        self.limit = (self.edge + self.bound).saturating_sub(self.largest_window);
    }

    /// `bytes` went to the socket. Returns true when this write completed
    /// the proof and the session streams from now on.
    pub fn wrote(&mut self, bytes: usize, now: Instant) -> bool {
        let before = self.written;
        self.written += bytes as u64;
        if now.saturating_duration_since(self.last_write) >= QUICK_ACK_PAUSE {
            self.quick_ack_writes = QUICK_ACK_WRITES;
        }
        self.quick_ack_writes = self.quick_ack_writes.saturating_sub(1);
        self.last_write = now;
        if let Some((_, end)) = &mut self.probe {
            if *end == u64::MAX {
                *end = self.written;
            }
        }
        if self.mode == Mode::Streaming {
            return false;
        }
        let (from, base) = self.proof_from;
        if now.saturating_duration_since(from) > PROOF_WINDOW {
            self.proof_from = (now, before);
            return false;
        }
        if self.written - base >= PROOF_BYTES {
            self.mode = Mode::Streaming;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    fn win(acked: u64, window: u32) -> TcpWindow {
        TcpWindow {
            acked,
            window,
            mss: 65_483,
            unit: 128,
        }
    }

    /// Writes everything the pacer allows now; returns the bytes written.
    fn write_all_allowed(p: &mut ReaderPacer, now: Instant) -> u64 {
        let mut total = 0;
        while let Budget::Frames { bytes, segment } = p.budget(50, now) {
            let n = bytes.min(segment);
            p.wrote(n, now);
            total += n as u64;
        }
        total
    }

    /// A pacer whose peer (window `window`) has read everything through
    /// the start-up ramp: the bound is `PACED_UNREAD` now. Returns the
    /// pacer, the time and the peer's acknowledged count.
    fn ramped(window: u32) -> (ReaderPacer, Instant, u64) {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, window)), t);
        let mut acked = 1;
        let mut bounds = Vec::new();
        while p.bound < PACED_UNREAD {
            let w = write_all_allowed(&mut p, t);
            bounds.push(w);
            acked += w;
            p.observe(win(acked, window), t);
        }
        assert_eq!(
            bounds,
            [4096, 4096, 4096, 8192, 16384],
            "the first writes ramp up once the window settled"
        );
        (p, t, acked)
    }

    #[test]
    fn a_reader_that_never_reads_gets_at_most_the_bound() {
        let (mut p, t, acked) = ramped(65_000);
        let w = write_all_allowed(&mut p, t);
        assert_eq!(w, PACED_UNREAD);
        // The kernel takes it all in: acknowledged, window closed by as much.
        let closed = 65_000 - w as u32;
        p.observe(win(acked + w, closed), at(t, 1));
        assert_eq!(
            write_all_allowed(&mut p, at(t, 1)),
            0,
            "nothing more without a read"
        );
        // It measures again, waits, then probes one frame at a time.
        assert_eq!(p.budget(50, at(t, 2)), Budget::Measure);
        p.observe(win(acked + w, closed), at(t, 2));
        assert_eq!(p.budget(50, at(t, 2)), Budget::Wait(PROBE_WAIT_MIN / 2));
        assert_eq!(p.budget(50, at(t, 3)), Budget::Measure);
        p.observe(win(acked + w, closed), at(t, 3));
        assert_eq!(p.budget(50, at(t, 3)), Budget::Probe);
    }

    #[test]
    fn a_read_reopens_the_window_and_the_budget() {
        let (mut p, t, acked) = ramped(65_000);
        let w = write_all_allowed(&mut p, t);
        p.observe(win(acked + w, 65_000 - w as u32), t);
        assert_eq!(write_all_allowed(&mut p, t), 0);
        // Read: the window is back to full, everything acknowledged.
        p.observe(win(acked + w, 65_000), at(t, 1));
        assert_eq!(write_all_allowed(&mut p, at(t, 1)), PACED_UNREAD);
    }

    #[test]
    fn a_window_that_grows_is_taken_as_the_buffer() {
        let (mut p, t, acked) = ramped(65_000);
        let w = write_all_allowed(&mut p, t);
        // The reader read it and its kernel grew the window meanwhile: the
        // bound starts small again while the window grows.
        p.observe(win(acked + w, 130_000), at(t, 1));
        let w2 = write_all_allowed(&mut p, at(t, 1));
        assert_eq!(w2, PACED_START);
        // Acknowledged but unread: the window closes by that much.
        p.observe(win(acked + w + w2, 130_000 - w2 as u32), at(t, 1));
        assert_eq!(write_all_allowed(&mut p, at(t, 1)), 0);
    }

    #[test]
    fn probes_wait_for_the_ack_of_what_is_in_flight_and_back_off() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, 65_000)), t);
        let w = write_all_allowed(&mut p, t);
        assert_eq!(w, PACED_START);
        // In flight, not acknowledged: wait for the ACK (backing off since
        // the first wait when the writes ran out).
        p.observe(win(1, 65_000), at(t, 0));
        assert_eq!(p.budget(50, at(t, 0)), Budget::Wait(2 * ACK_WAIT_MIN));
        assert_eq!(p.budget(50, at(t, 0)), Budget::Measure);
        // Acknowledged, unread: a probe after PROBE_WAIT_MIN of no progress.
        p.observe(win(1 + w, 65_000 - w as u32), at(t, 1));
        assert_eq!(p.budget(50, at(t, 1)), Budget::Wait(PROBE_WAIT_MIN));
        assert_eq!(p.budget(50, at(t, 3)), Budget::Measure);
        p.observe(win(1 + w, 65_000 - w as u32), at(t, 3));
        assert_eq!(p.budget(50, at(t, 3)), Budget::Probe);
        p.wrote(50, at(t, 3));
        // The probe is acknowledged by the delayed-ACK timer, the window
        // still closed: the next one later.
        p.observe(win(1 + w + 50, 65_000 - w as u32 - 50), at(t, 33));
        assert_eq!(p.budget(50, at(t, 33)), Budget::Wait(2 * PROBE_WAIT_MIN));
    }

    #[test]
    fn a_round_left_unacknowledged_is_followed_by_a_probe() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, 65_000)), t);
        let w = write_all_allowed(&mut p, t);
        // No ACK for PROBE_WAIT_MIN (a delayed ACK of a lone segment): a
        // probe, whose read makes the receiver acknowledge both at once.
        p.observe(win(1, 65_000), at(t, 2));
        assert_eq!(p.budget(50, at(t, 2)), Budget::Probe);
        p.wrote(50, at(t, 2));
        assert_eq!(
            p.probe, None,
            "a probe behind data in flight proves nothing"
        );
        p.observe(win(1 + w + 50, 65_000), at(t, 3));
        assert!(matches!(p.budget(50, at(t, 3)), Budget::Frames { .. }));
    }

    #[test]
    fn data_never_acknowledged_does_not_lower_the_buffer_estimate() {
        let (mut p, t, acked) = ramped(65_000);
        let w = write_all_allowed(&mut p, t);
        let largest = p.largest_window;
        // The bound is acknowledged, unread; then nothing more is
        // acknowledged for longer than REANCHOR_AFTER, not even the probes
        // (a peer gone quiet): the estimate stays.
        let closed = 65_000 - w as u32;
        let mut ms = 1;
        while ms < 2 * REANCHOR_AFTER.as_millis() as u64 {
            p.observe(win(acked + w, closed), at(t, ms));
            if p.budget(50, at(t, ms)) == Budget::Probe {
                p.wrote(50, at(t, ms));
            }
            ms += 1;
        }
        assert_eq!(p.largest_window, largest);
    }

    #[test]
    fn a_fast_reader_proves_itself_and_streams() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, 65_000)), t);
        let mut acked = 1;
        let mut ms = 0;
        while !p.is_streaming() {
            let now = at(t, ms / 10);
            let w = write_all_allowed(&mut p, now);
            assert!(w <= PACED_UNREAD);
            acked += w;
            p.observe(win(acked, 65_000), now);
            ms += 1;
            assert!(ms < 10_000, "never proven");
        }
        assert!(acked > PROOF_BYTES - PACED_UNREAD);
        assert_eq!(p.budget(50, at(t, 100)), Budget::Unlimited);
    }

    #[test]
    fn a_reader_slower_than_the_proof_rate_stays_paced() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, 65_000)), t);
        let mut acked = 1;
        // 24 KiB every 5 ms: 4.8 MiB/s, under the proof's 10 MiB/s.
        for step in 0..400 {
            let now = at(t, step * 5);
            p.observe(win(acked, 65_000), now);
            acked += write_all_allowed(&mut p, now);
        }
        assert!(!p.is_streaming());
        assert!(acked > 5 * PROOF_BYTES, "it was fed all along");
    }

    #[test]
    fn a_burst_after_a_quiet_spell_measures_first() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(Some(win(1, 65_000)), t);
        assert!(matches!(p.budget(50, t), Budget::Frames { .. }));
        // The handshake grew the window; the reading from before it is old.
        assert_eq!(p.budget(50, at(t, 10)), Budget::Measure);
        p.observe(win(1, 130_000), at(t, 10));
        let w = write_all_allowed(&mut p, at(t, 10));
        assert_eq!(
            w, PACED_START,
            "the bound is taken against the grown window"
        );
        // Unread: the window closes by what was written, nothing more goes.
        p.observe(win(1 + w, 130_000 - w as u32), at(t, 11));
        assert_eq!(write_all_allowed(&mut p, at(t, 11)), 0);
    }

    #[test]
    fn no_window_in_tcp_info_means_no_pacing() {
        let mut p = ReaderPacer::new(None, Instant::now());
        assert!(p.is_streaming());
        assert_eq!(p.budget(50, Instant::now()), Budget::Unlimited);
    }

    #[test]
    fn paced_writes_fit_one_segment() {
        let t = Instant::now();
        let mut p = ReaderPacer::new(
            Some(TcpWindow {
                acked: 1,
                window: 65_000,
                mss: 1_448,
                unit: 128,
            }),
            t,
        );
        assert_eq!(
            p.budget(50, t),
            Budget::Frames {
                bytes: PACED_START as usize,
                segment: 1_448
            }
        );
    }

    #[test]
    fn tcp_window_reads_a_real_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        use std::os::fd::AsFd;
        let w = tcp_window(client.as_fd()).unwrap().expect("kernel >= 5.4");
        assert!(w.window > 0 && w.mss > 0);
    }

    #[test]
    fn a_buffer_that_shrank_is_found_out_a_bound_at_a_time() {
        let (mut p, t, acked) = ramped(107_520);
        let w = write_all_allowed(&mut p, t);
        // The reader read everything, but its kernel lowered its window.
        let shrunk = 107_520 - PACED_UNREAD as u32;
        p.observe(win(acked + w, shrunk), at(t, 1));
        assert_eq!(write_all_allowed(&mut p, at(t, 1)), 0, "looks unread");
        let mut now = 1;
        while write_all_allowed(&mut p, at(t, now)) == 0 {
            p.observe(win(acked + w, shrunk), at(t, now));
            now += 1;
            assert!(now < 10_000, "starved");
        }
        assert!(
            now >= REANCHOR_AFTER.as_millis() as u64,
            "not before the wait"
        );
        assert_eq!(p.largest_window, shrunk as u64);
    }

    #[test]
    fn a_peer_that_reads_nothing_gets_one_more_bound_at_most() {
        let (mut p, t, acked) = ramped(65_000);
        let w = write_all_allowed(&mut p, t);
        let largest = p.largest_window;
        // Its kernel takes everything (ACKs delayed 30 ms, or at once for a
        // second segment) and closes the window by as much; it never reads.
        let mut total = w;
        let mut closed = 65_000 - w;
        let mut unacked: Option<(u64, u64)> = None; // (sent at, bytes)
        p.observe(win(acked + total, closed as u32), at(t, 1));
        for ms in 1..10_000 {
            let now = at(t, ms);
            if unacked.is_some_and(|(sent, _)| ms >= sent + 30) {
                unacked = None;
            }
            let in_flight = unacked.map_or(0, |(_, b)| b);
            match p.budget(50, now) {
                Budget::Measure => p.observe(
                    win(acked + total - in_flight, (closed + in_flight) as u32),
                    now,
                ),
                Budget::Frames { bytes, segment } => {
                    let n = bytes.min(segment) as u64;
                    p.wrote(n as usize, now);
                    total += n;
                    closed -= n;
                    unacked = Some((ms, in_flight + n));
                }
                Budget::Probe => {
                    p.wrote(50, now);
                    total += 50;
                    closed -= 50;
                    unacked = match unacked {
                        // A second segment: both acknowledged at once.
                        Some(_) => None,
                        None => Some((ms, 50)),
                    };
                }
                Budget::Wait(_) => {}
                Budget::Unlimited => panic!("streaming"),
            }
        }
        let beyond = total - w;
        assert!(
            beyond <= PACED_UNREAD + 50 * 400,
            "{beyond} bytes beyond the first bound"
        );
        assert!(beyond >= PACED_UNREAD / 2, "lowered once: {beyond}");
        assert_eq!(
            p.largest_window,
            largest - PACED_UNREAD,
            "lowered by one bound, once"
        );
    }
}
