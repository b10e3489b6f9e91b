//! The bytes of SUBSCRIBE sync chunks an owner shard has encoded and not yet
//! seen written, over all its subscriptions.
//!
//! Owns: the count of those bytes against `SYNC_BYTES_IN_FLIGHT`, and the
//! rule that a chunk stops counting once it has been out for
//! `SYNC_CHUNK_STALL`. Each subscription's own window (two chunks) bounds
//! what one subscriber holds; this bounds many subscribers syncing at once
//! (a fleet starting: 2,000 subscriptions each had two ~40 KiB chunks
//! queued, 40 MiB of frames at the peak). The stall rule keeps peers that
//! subscribe and then stop reading from holding the budget, and with it
//! every other subscriber's sync on the shard: their chunks still count in
//! their own windows, and they are cut off by the usual slow-subscriber
//! rules.
//!
//! Must never: decide which subscription syncs next or touch tables; the
//! owner asks `has_room` and reports what it sent and what was written.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bytes of sync chunks an owner may have out at once. 2 MiB keeps ~50
/// chunks of 1,024 routes moving, more than the shards' writers take in
/// one turn.
pub const SYNC_BYTES_IN_FLIGHT: usize = 2 * 1024 * 1024;

/// A chunk out for this long stops counting against the budget: its
/// subscriber is not reading (a healthy one takes a chunk within
/// milliseconds), and waiting for it would stall the syncs of everyone else.
pub const SYNC_CHUNK_STALL: Duration = Duration::from_secs(1);

/// One chunk sent: what its subscription keeps until the chunk is reported
/// written (or the subscription ends), to give its bytes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkTicket(u64);

/// A chunk still counting against the budget.
#[derive(Debug)]
struct CountedChunk {
    /// Its ticket; tickets are issued in increasing order, so `counted` is
    /// sorted by it.
    ticket: u64,
    /// Its bytes; 0 once written (the entry leaves when it reaches the front).
    bytes: usize,
    /// When it was sent.
    sent: Instant,
}

/// The sync chunks of one owner that count against `SYNC_BYTES_IN_FLIGHT`.
#[derive(Debug, Default)]
pub struct SyncBudget {
    /// Chunks sent less than `SYNC_CHUNK_STALL` ago and not yet written, in
    /// the order sent (plus written ones not yet at the front).
    counted: VecDeque<CountedChunk>,
    /// The sum of `counted`'s bytes.
    bytes: usize,
    /// The next ticket.
    next_ticket: u64,
}

impl SyncBudget {
    /// May another chunk go out? (One may always cross the bound, so a
    /// chunk larger than the whole budget still goes out alone.)
    pub fn has_room(&self) -> bool {
        self.bytes < SYNC_BYTES_IN_FLIGHT
    }

    /// Bytes counting against the budget now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A chunk of `bytes` went out at `now`.
    pub fn sent(&mut self, bytes: usize, now: Instant) -> ChunkTicket {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.counted.push_back(CountedChunk {
            ticket,
            bytes,
            sent: now,
        });
        self.bytes += bytes;
        ChunkTicket(ticket)
    }

    /// The chunk was written to its subscriber's socket, or will never be
    /// (its subscription ended): its bytes no longer count.
    pub fn release(&mut self, ticket: ChunkTicket) {
        if let Ok(i) = self.counted.binary_search_by_key(&ticket.0, |c| c.ticket) {
            self.bytes -= std::mem::take(&mut self.counted[i].bytes);
        }
        while self.counted.front().is_some_and(|c| c.bytes == 0) {
            self.counted.pop_front();
        }
    }

    /// Chunks out for `SYNC_CHUNK_STALL` by `now` stop counting.
    pub fn age(&mut self, now: Instant) {
        let bytes = &mut self.bytes;
        while let Some(front) = self.counted.front() {
            if front.bytes != 0 && now.saturating_duration_since(front.sent) < SYNC_CHUNK_STALL {
                break;
            }
            *bytes -= front.bytes;
            self.counted.pop_front();
        }
    }

    /// When the oldest counted chunk stops counting, if any counts.
    pub fn next_stall(&self) -> Option<Instant> {
        self.counted.front().map(|c| c.sent + SYNC_CHUNK_STALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_chunks_give_their_bytes_back_in_any_order() {
        let mut b = SyncBudget::default();
        let now = Instant::now();
        let t1 = b.sent(SYNC_BYTES_IN_FLIGHT / 2, now);
        let t2 = b.sent(SYNC_BYTES_IN_FLIGHT / 2, now);
        assert!(!b.has_room());
        b.release(t2);
        assert!(b.has_room());
        assert_eq!(b.bytes(), SYNC_BYTES_IN_FLIGHT / 2);
        b.release(t2); // a second report changes nothing
        assert_eq!(b.bytes(), SYNC_BYTES_IN_FLIGHT / 2);
        b.release(t1);
        assert_eq!(b.bytes(), 0);
        assert_eq!(b.next_stall(), None);
    }

    #[test]
    fn a_chunk_nobody_reads_stops_counting_after_the_stall_time() {
        let mut b = SyncBudget::default();
        let start = Instant::now();
        let stuck = b.sent(SYNC_BYTES_IN_FLIGHT, start);
        assert!(!b.has_room());
        assert_eq!(b.next_stall(), Some(start + SYNC_CHUNK_STALL));
        b.age(start + SYNC_CHUNK_STALL / 2);
        assert!(!b.has_room(), "not yet");
        b.age(start + SYNC_CHUNK_STALL);
        assert!(b.has_room());
        assert_eq!(b.bytes(), 0);
        // Its late report does not count twice.
        let fresh = b.sent(100, start + SYNC_CHUNK_STALL);
        b.release(stuck);
        assert_eq!(b.bytes(), 100);
        b.release(fresh);
        assert_eq!(b.bytes(), 0);
    }
}
