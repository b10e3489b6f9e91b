//! A session's output toward one server: session messages ahead of routes,
//! paced by what the server's reader has consumed.
//!
//! Owns: two buffers of encoded frames (session messages: HELLO and
//! KEEPALIVEs; and everything else: SUBSCRIBEs, UNSUBSCRIBEs, UPDATEs),
//! how much of the second has been written, and the session's
//! `ReaderPacer` (see `metalbond_utils::pacing`). A deployed Go server reads one
//! 64 KiB buffer at a time and resets the session when a read fills it, so
//! until the server has shown that it reads as a stream, writes hold whole
//! frames within the pacing budget; session messages go first, so that a
//! long paced resync (100,000 announcements take many seconds at a Go
//! server) never starves the server's hold timer.
//!
//! Must never: decide what to send (that is the session loop in
//! `connection.rs`), block beyond one write (the socket's write timeout
//! bounds that), or write part of a frame while paced.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::traffic::TrafficMeter;
use metalbond_utils::pacing::{tcp_window, Budget, ReaderPacer};
use metalbond_wire::codec::{
    first_frame_len, whole_frames_prefix, FrameBuffer, FrameSpan, Message,
};

/// Pending output of one session and its pacing.
pub(super) struct SessionWriter {
    /// HELLO and KEEPALIVEs: written before anything in `routes`.
    session: FrameBuffer,
    /// SUBSCRIBE, UNSUBSCRIBE and UPDATE frames, in order.
    routes: FrameBuffer,
    /// Bytes of `routes` already written.
    written: usize,
    /// What may go out now.
    pacer: ReaderPacer,
}

impl SessionWriter {
    /// A writer for `stream`, read before anything was written to it.
    pub(super) fn new(stream: &TcpStream) -> SessionWriter {
        let first = tcp_window(stream.as_fd()).ok().flatten();
        SessionWriter {
            session: FrameBuffer::with_capacity(64),
            routes: FrameBuffer::with_capacity(4096),
            written: 0,
            pacer: ReaderPacer::new(first, Instant::now()),
        }
    }

    /// Queues a session message (HELLO, KEEPALIVE) ahead of the routes.
    pub(super) fn push_session(&mut self, msg: &Message) {
        self.session.push(msg);
    }

    /// The server declared in its HELLO that it reads as a stream: no
    /// pacing from now on.
    pub(super) fn peer_reads_stream(&mut self) {
        if !self.pacer.is_streaming() {
            tracing::debug!("server declared it reads as a stream: output not paced");
            self.pacer.stream();
        }
    }

    /// The buffer SUBSCRIBEs and UPDATEs are appended to.
    pub(super) fn routes(&mut self) -> &mut FrameBuffer {
        &mut self.routes
    }

    /// Writes what may go out now. `Ok(None)`: everything was written;
    /// `Ok(Some(d))`: output is left, to be tried again within `d` (paced,
    /// the server has not read enough yet).
    pub(super) fn flush(
        &mut self,
        stream: &mut &TcpStream,
        meter: &TrafficMeter,
    ) -> io::Result<Option<Duration>> {
        if !self.session.is_empty() {
            // A few bytes, whole frames, never held back by the budget.
            stream.write_all(self.session.as_bytes())?;
            let bytes = self.session.as_bytes().len();
            meter.wrote(self.session.frames(), self.session.updates(), bytes as u64);
            self.pacer.wrote(bytes, Instant::now());
            self.session.clear();
        }
        loop {
            let pending = &self.routes.as_bytes()[self.written..];
            if pending.is_empty() {
                self.routes.clear();
                self.written = 0;
                return Ok(None);
            }
            let now = Instant::now();
            let limit = match self.pacer.budget(first_frame_len(pending), now) {
                Budget::Unlimited => usize::MAX,
                Budget::Frames { bytes, segment } => bytes.min(segment),
                Budget::Probe => first_frame_len(pending),
                Budget::Wait(d) => return Ok(Some(d)),
                Budget::Measure => {
                    match tcp_window(stream.as_fd()) {
                        Ok(Some(w)) => self.pacer.observe(w, now),
                        // No window from the kernel, or the socket is
                        // failing (the write below says why): unpaced.
                        Ok(None) | Err(_) => self.pacer.stream(),
                    }
                    continue;
                }
            };
            let span = if self.written == 0 && limit >= pending.len() {
                // All of it: the buffer kept the counts as frames went in.
                FrameSpan {
                    bytes: pending.len(),
                    frames: self.routes.frames() as usize,
                    updates: self.routes.updates() as usize,
                }
            } else {
                whole_frames_prefix(pending, limit)
            };
            stream.write_all(&pending[..span.bytes])?;
            self.written += span.bytes;
            meter.wrote(span.frames as u64, span.updates as u64, span.bytes as u64);
            if self.pacer.wrote(span.bytes, Instant::now()) {
                tracing::debug!("server reads as a stream: output no longer paced");
            }
        }
    }
}
