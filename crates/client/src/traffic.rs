//! What the client's sessions read and wrote: frames, bytes and UPDATEs in
//! each direction, per live session and in total since the client started.
//!
//! Owns: `TrafficCounters` (atomics, bumped by the reader and writer of a
//! connection without taking the client lock), `Traffic` (a copy of them at
//! one moment) and `TrafficMeter` (one connection's view: its own counters
//! plus the client's totals, bumped together).
//!
//! Must never: decide anything. Counters are for the status pages and the
//! embedder's `Client::servers` / `Client::traffic`; nothing in the session
//! logic reads them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Frames, bytes and UPDATEs read and written, as atomics. One per
/// connection (replaced at each reconnect, so a session's figures start at
/// zero) and one for the whole client.
#[derive(Debug, Default)]
pub(super) struct TrafficCounters {
    /// Frames decoded from the server.
    frames_in: AtomicU64,
    /// Bytes read from the socket.
    bytes_in: AtomicU64,
    /// UPDATE frames among `frames_in`.
    updates_in: AtomicU64,
    /// Frames written to the server.
    frames_out: AtomicU64,
    /// Bytes written to the socket.
    bytes_out: AtomicU64,
    /// UPDATE frames among `frames_out`.
    updates_out: AtomicU64,
}

/// `TrafficCounters` copied at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames decoded from the server(s).
    pub frames_in: u64,
    /// Bytes read from the server(s).
    pub bytes_in: u64,
    /// UPDATE messages received.
    pub updates_in: u64,
    /// Frames written to the server(s).
    pub frames_out: u64,
    /// Bytes written to the server(s).
    pub bytes_out: u64,
    /// UPDATE messages sent.
    pub updates_out: u64,
}

impl TrafficCounters {
    /// The figures now.
    pub(super) fn snapshot(&self) -> Traffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Traffic {
            frames_in: get(&self.frames_in),
            bytes_in: get(&self.bytes_in),
            updates_in: get(&self.updates_in),
            frames_out: get(&self.frames_out),
            bytes_out: get(&self.bytes_out),
            updates_out: get(&self.updates_out),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One connection's meter: every count goes to the connection's own
/// counters and to the client's totals.
#[derive(Clone, Debug)]
pub(super) struct TrafficMeter {
    /// This connection's counters (shown per server).
    pub(super) session: Arc<TrafficCounters>,
    /// The client's totals (shown in `/metrics`).
    pub(super) total: Arc<TrafficCounters>,
}

impl TrafficMeter {
    fn both(&self, f: impl Fn(&TrafficCounters)) {
        f(&self.session);
        f(&self.total);
    }

    /// `n` bytes came off the socket.
    pub(super) fn read_bytes(&self, n: usize) {
        self.both(|c| TrafficCounters::add(&c.bytes_in, n as u64));
    }

    /// `frames` frames were decoded, `updates` of them UPDATEs.
    pub(super) fn read_frames(&self, frames: usize, updates: usize) {
        self.both(|c| {
            TrafficCounters::add(&c.frames_in, frames as u64);
            TrafficCounters::add(&c.updates_in, updates as u64);
        });
    }

    /// `frames` frames (`updates` of them UPDATEs), `bytes` bytes went out.
    pub(super) fn wrote(&self, frames: u64, updates: u64, bytes: u64) {
        self.both(|c| {
            TrafficCounters::add(&c.frames_out, frames);
            TrafficCounters::add(&c.updates_out, updates);
            TrafficCounters::add(&c.bytes_out, bytes);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::codec::{FrameBuffer, Message};

    #[test]
    fn a_meter_counts_into_the_session_and_the_total() {
        let total = Arc::new(TrafficCounters::default());
        let first = TrafficMeter {
            session: Arc::new(TrafficCounters::default()),
            total: total.clone(),
        };
        first.read_bytes(100);
        first.read_frames(3, 2);
        let mut out = FrameBuffer::with_capacity(16);
        out.push(&Message::Keepalive);
        first.wrote(out.frames(), out.updates(), out.as_bytes().len() as u64);
        let second = TrafficMeter {
            session: Arc::new(TrafficCounters::default()),
            total: total.clone(),
        };
        second.read_bytes(4);
        second.read_frames(1, 0);
        assert_eq!(
            first.session.snapshot(),
            Traffic {
                frames_in: 3,
                bytes_in: 100,
                updates_in: 2,
                frames_out: 1,
                bytes_out: 4,
                updates_out: 0,
            }
        );
        assert_eq!(second.session.snapshot().bytes_in, 4);
        let t = total.snapshot();
        assert_eq!((t.frames_in, t.bytes_in, t.updates_in), (4, 104, 2));
        assert_eq!((t.frames_out, t.bytes_out), (1, 4));
    }
}
