//! One peer's pending output, bounded whatever the churn.
//!
//! Owns: the slow-subscriber policy. While a peer keeps up, its output is a
//! FIFO of shared frame buffers (`FanoutBatch` slices, no copies). When the
//! queued bytes would pass `max_queued_bytes`, the peer switches to per-route
//! coalescing: further changes are folded into a map holding only the net
//! pending change per route (ADD then REMOVE of a route the peer never saw
//! cancels out), so memory is bounded by the number of distinct routes, not by
//! the churn. Once the socket drains below half the limit, the map is encoded
//! for this peer alone, a chunk at a time, behind what is already queued, so
//! per-route order is kept; when the map is empty the peer is back to shared
//! buffers. If the map itself passes `max_coalesced_routes`, `Overflow` tells
//! the caller to cut the peer off (it reconnects and resyncs). Nothing is ever
//! dropped while the session stays up.
//!
//! Must never: touch the socket (the writer task drains it) or know tables.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::fanout::FanoutBatch;
use super::owner::SyncTag;
use super::route_set::RouteMap;
use super::PeerId;
use metalbond_wire::codec::{encode_frame, first_frame_len, whole_frames_prefix, Message};
use metalbond_wire::types::{Action, Route, Vni};

/// Routes encoded per refill step from the coalescing map.
const REFILL_ROUTES: usize = 1024;
/// Queue slots a drained queue may keep; above this its buffer is released.
const KEEP_ITEMS: usize = 64;

/// One entry of the FIFO.
#[derive(Debug)]
enum OutItem {
    /// Encoded frames to write.
    Frames {
        /// The frames (often a slice of a shared fan-out buffer).
        bytes: Bytes,
        /// How many frames `bytes` holds (for the counters).
        frames: u32,
        /// HELLO/KEEPALIVE rather than UPDATEs (for the counters).
        control: bool,
        /// This is a KEEPALIVE reply (at most one is queued, see
        /// `OutQueue::push_control`).
        keepalive: bool,
        /// Where the frames come from (the fan-out latency histogram times
        /// live batches; an UNSUBSCRIBE drops the VNI's unwritten sync).
        origin: Origin,
    },
    /// A SUBSCRIBE sync chunk for this VNI has been fully handed to the
    /// socket; the owner may send the next one.
    SyncChunkWritten(SyncTag),
}

/// Where queued frames come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A live fan-out batch born at this instant.
    Live(Instant),
    /// A SUBSCRIBE sync chunk of this VNI.
    Sync(Vni),
    /// Session replies and coalesced output.
    Other,
}

impl Origin {
    /// The birth of a live batch.
    fn born(self) -> Option<Instant> {
        match self {
            Origin::Live(born) => Some(born),
            Origin::Sync(_) | Origin::Other => None,
        }
    }
}

/// The net change a slow peer has not been sent yet for one route.
#[derive(Clone, Copy, Debug)]
struct PendingChange {
    /// Did the peer hold the route before the first coalesced change?
    was_present: bool,
    /// Should it hold the route after the last one?
    now_present: bool,
}

/// The coalescing map outgrew its limit: the peer must be disconnected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slow subscriber: {pending} route changes pending (limit {limit})")]
pub struct Overflow {
    /// Distinct routes with a pending change.
    pub pending: usize,
    /// `max_coalesced_routes`.
    pub limit: usize,
}

/// What the writer should put on the socket next.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Buffers to write, in order (one vectored write if the socket takes it).
    pub parts: Vec<Bytes>,
    /// Frames in `parts`.
    pub frames: usize,
    /// Of which UPDATE frames.
    pub updates: usize,
    /// Bytes in `parts`.
    pub bytes: usize,
    /// Sync chunks completed once `parts` are written.
    pub sync_written: Vec<SyncTag>,
    /// Births of the live fan-out batches in `parts` (one per batch), for
    /// the fan-out latency histogram once they are written.
    pub fanout_born: Vec<Instant>,
}

/// A peer's pending output.
#[derive(Debug)]
pub struct OutQueue {
    /// The peer this queue writes to (its own changes are never queued).
    me: PeerId,
    /// Shared buffers and markers in send order.
    items: VecDeque<OutItem>,
    /// Bytes queued in `items` plus bytes handed to the writer and not yet
    /// confirmed written.
    queued_bytes: usize,
    /// See `PeerLimits::max_queued_bytes`.
    max_queued_bytes: usize,
    /// See `PeerLimits::max_coalesced_routes`.
    max_coalesced: usize,
    /// Net pending change per route while coalescing. A `RouteMap`: it can
    /// hold millions of routes, and one `HashMap` that big doubles in one
    /// step (~0.35 s at a million routes, with the shard held). Boxed and
    /// created at the first coalesced change: a peer that keeps up (nearly
    /// all of them) holds a null pointer instead of an empty map (~200 B
    /// inline plus its first tables on the heap).
    coalesced: Option<Box<RouteMap<PendingChange>>>,
    /// True from the first overflow until the map has been fully drained.
    coalescing: bool,
    /// Changes folded into the map over the queue's life (for stats).
    pub coalesced_total: u64,
    /// Times the queue switched into coalescing mode.
    pub coalesce_episodes: u64,
    /// A KEEPALIVE reply is queued and not yet taken by the writer.
    keepalive_queued: bool,
    /// The peer's HELLO said it reads as a stream: the writer does not pace
    /// it (`metalbond_utils::pacing`). Set by the reader before any UPDATE is queued.
    /// Here, not in `Connection`, because it fits this struct's padding.
    peer_reads_stream: bool,
}

/// The KEEPALIVE frame (version 1, empty payload, type 2): static, so a
/// reply costs a queue slot and no allocation.
static KEEPALIVE_FRAME: [u8; 4] = [1, 0, 0, 2];

impl OutQueue {
    /// The peer declared in its HELLO that it reads as a stream.
    pub fn mark_peer_reads_stream(&mut self) {
        self.peer_reads_stream = true;
    }

    /// Did the peer declare that it reads as a stream?
    pub fn peer_reads_stream(&self) -> bool {
        self.peer_reads_stream
    }

    /// An empty queue for `me` with the given limits.
    pub fn new(me: PeerId, max_queued_bytes: usize, max_coalesced: usize) -> OutQueue {
        OutQueue {
            me,
            items: VecDeque::new(),
            queued_bytes: 0,
            max_queued_bytes,
            max_coalesced,
            coalesced: None,
            coalescing: false,
            coalesced_total: 0,
            coalesce_episodes: 0,
            keepalive_queued: false,
            peer_reads_stream: false,
        }
    }

    /// Bytes queued or in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Routes with a coalesced pending change.
    pub fn coalesced_len(&self) -> usize {
        self.coalesced.as_ref().map_or(0, |map| map.len())
    }

    /// Is the peer currently being coalesced (fell behind)?
    #[cfg(test)]
    pub fn is_coalescing(&self) -> bool {
        self.coalescing
    }

    /// Anything left to write (queued frames or coalesced changes)?
    #[cfg(test)]
    pub fn has_output(&self) -> bool {
        !self.items.is_empty() || self.coalesced_len() > 0
    }

    /// Queues a session message (HELLO, KEEPALIVE) and says whether it was
    /// queued. A KEEPALIVE is not queued while another one is still waiting
    /// for the writer: replies carry no data, one pending copy says all a
    /// second would, and a peer that floods KEEPALIVEs without reading then
    /// costs one queue slot instead of one per KEEPALIVE (it was gigabytes).
    /// Anything else is always queued: one HELLO per session.
    ///
    /// `ahead_of_routes`: a KEEPALIVE goes ahead of the queued routes (the
    /// peer has been reading a backlog for a while: a slow reader that
    /// takes many seconds for it would see its hold timer, which runs on
    /// our KEEPALIVEs, expire). A KEEPALIVE carries no data, so its place
    /// among UPDATEs changes nothing a peer holds; otherwise replies keep
    /// their place, so a peer can use one as a barrier.
    pub fn push_control(&mut self, msg: &Message, ahead_of_routes: bool) -> bool {
        let keepalive = matches!(msg, Message::Keepalive);
        let bytes = if keepalive {
            if self.keepalive_queued {
                // The one waiting may have been queued behind routes before
                // the peer fell that far behind: it goes ahead now.
                return ahead_of_routes && self.move_keepalive_ahead();
            }
            self.keepalive_queued = true;
            Bytes::from_static(&KEEPALIVE_FRAME)
        } else {
            let mut buf = BytesMut::with_capacity(16);
            encode_frame(msg, &mut buf);
            buf.freeze()
        };
        self.queued_bytes += bytes.len();
        if self.items.capacity() == 0 {
            // An idle peer's queue only ever holds its one reply: one slot
            // (64 B) instead of the four (224 B) a first push allocates,
            // kept for the connection's life. Fan-out grows it as usual.
            self.items.reserve_exact(1);
        }
        let item = OutItem::Frames {
            bytes,
            frames: 1,
            control: true,
            keepalive,
            origin: Origin::Other,
        };
        if keepalive && ahead_of_routes {
            let at = self.ahead_of_routes();
            self.items.insert(at, item);
        } else {
            self.items.push_back(item);
        }
        true
    }

    /// Where a KEEPALIVE goes ahead of routes: behind a HELLO still queued,
    /// ahead of everything else.
    fn ahead_of_routes(&self) -> usize {
        self.items
            .iter()
            .position(|i| !matches!(i, OutItem::Frames { control: true, .. }))
            .unwrap_or(self.items.len())
    }

    /// Moves the waiting KEEPALIVE ahead of the queued routes; true if it
    /// moved (it was behind some).
    fn move_keepalive_ahead(&mut self) -> bool {
        let waiting = self.items.iter().position(|i| {
            matches!(
                i,
                OutItem::Frames {
                    keepalive: true,
                    ..
                }
            )
        });
        let Some(from) = waiting else {
            return false;
        };
        if from <= self.ahead_of_routes() {
            return false;
        }
        if let Some(item) = self.items.remove(from) {
            let at = self.ahead_of_routes();
            self.items.insert(at, item);
        }
        true
    }

    /// Queues a fan-out batch (minus this peer's own runs), or folds it into
    /// the coalescing map when the peer is behind.
    pub fn push_fanout(&mut self, batch: &FanoutBatch) -> Result<(), Overflow> {
        if !self.coalescing {
            let (parts, frames) = batch.parts_for(self.me);
            let len: usize = parts.iter().map(Bytes::len).sum();
            // An empty queue always takes one batch (batches are small), so
            // a limit below the batch size cannot wedge a peer.
            if self.queued_bytes == 0 || self.queued_bytes + len <= self.max_queued_bytes {
                let n = parts.len();
                for (i, p) in parts.into_iter().enumerate() {
                    // Frame count is attributed to the last part.
                    let f = if i + 1 == n { frames as u32 } else { 0 };
                    self.push_bytes(p, f, Origin::Live(batch.born));
                }
                return Ok(());
            }
            self.coalescing = true;
            self.coalesce_episodes += 1;
        }
        for (action, route) in batch.changes_for(self.me) {
            self.coalesce(action, route);
        }
        let pending = self.coalesced_len();
        if pending > self.max_coalesced {
            return Err(Overflow {
                pending,
                limit: self.max_coalesced,
            });
        }
        Ok(())
    }

    /// Queues one SUBSCRIBE sync chunk and its completion marker. Always
    /// accepted: the owner sends a subscriber at most `SYNC_WINDOW` chunks
    /// before markers come back, whatever it subscribes to, so this is
    /// bounded by construction; a chunk not yet written when the peer
    /// unsubscribes is dropped (`forget_vni`), so subscribing and
    /// unsubscribing in a loop cannot pile chunks up either.
    pub fn push_sync(&mut self, batch: &FanoutBatch, tag: SyncTag) {
        let (parts, frames) = batch.parts_for(self.me);
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            let f = if i + 1 == n { frames as u32 } else { 0 };
            self.push_bytes(p, f, Origin::Sync(tag.vni));
        }
        self.items.push_back(OutItem::SyncChunkWritten(tag));
    }

    /// Takes up to about `max_bytes` (and at most `max_parts` buffers) for
    /// one write. Refills from the coalescing map first when the backlog has
    /// drained below half the limit.
    pub fn take_for_write(&mut self, max_bytes: usize, max_parts: usize) -> WriteBatch {
        self.refill();
        let mut wb = WriteBatch::default();
        while let Some(item) = self.items.front() {
            match item {
                OutItem::Frames { bytes, .. } => {
                    if !wb.parts.is_empty()
                        && (wb.bytes + bytes.len() > max_bytes || wb.parts.len() >= max_parts)
                    {
                        break;
                    }
                }
                OutItem::SyncChunkWritten(_) => {}
            }
            match self.items.pop_front() {
                Some(OutItem::Frames {
                    bytes,
                    frames,
                    control,
                    keepalive,
                    origin,
                }) => {
                    if keepalive {
                        self.keepalive_queued = false;
                    }
                    if let Some(b) = origin.born() {
                        if wb.fanout_born.last() != Some(&b) {
                            wb.fanout_born.push(b);
                        }
                    }
                    wb.bytes += bytes.len();
                    wb.frames += frames as usize;
                    if !control {
                        wb.updates += frames as usize;
                    }
                    wb.parts.push(bytes);
                }
                Some(OutItem::SyncChunkWritten(tag)) => wb.sync_written.push(tag),
                None => break,
            }
        }
        // A drained queue keeps the capacity of its largest burst for the
        // connection's life unless released (thousands of peers × a burst).
        if self.items.is_empty() && self.items.capacity() > KEEP_ITEMS {
            self.items = VecDeque::new();
        }
        wb
    }

    /// Length of the next frame to write, `None` when no frame is queued
    /// (refilling from the coalescing map first, as `take_for_write`).
    pub fn next_frame_len(&mut self) -> Option<usize> {
        self.refill();
        self.items.iter().find_map(|item| match item {
            OutItem::Frames { bytes, .. } => Some(first_frame_len(bytes)),
            OutItem::SyncChunkWritten(_) => None,
        })
    }

    /// Takes whole frames only, at most `max_bytes` of them in at most
    /// `max_parts` buffers, cutting a buffer at a frame boundary where it
    /// does not fit: the write of a paced session (see `pacing`), which
    /// must never end inside a frame. Frames are counted from their
    /// headers, so the counts are exact.
    pub fn take_frames(&mut self, max_bytes: usize, max_parts: usize) -> WriteBatch {
        self.refill();
        let mut wb = WriteBatch::default();
        while wb.parts.len() < max_parts {
            let Some(front) = self.items.front_mut() else {
                break;
            };
            let OutItem::Frames {
                bytes,
                frames: item_frames,
                keepalive,
                origin,
                ..
            } = front
            else {
                if let Some(OutItem::SyncChunkWritten(tag)) = self.items.pop_front() {
                    wb.sync_written.push(tag);
                }
                continue;
            };
            let span = whole_frames_prefix(bytes, max_bytes - wb.bytes);
            let (len, frames) = (span.bytes, span.frames);
            if len == 0 {
                break;
            }
            let born = origin.born();
            let part = if len == bytes.len() {
                if *keepalive {
                    self.keepalive_queued = false;
                }
                let part = std::mem::take(bytes);
                self.items.pop_front();
                part
            } else {
                *item_frames = item_frames.saturating_sub(frames as u32);
                bytes.split_to(len)
            };
            if let Some(b) = born {
                if wb.fanout_born.last() != Some(&b) {
                    wb.fanout_born.push(b);
                }
            }
            wb.bytes += len;
            wb.frames += frames;
            wb.updates += span.updates;
            wb.parts.push(part);
        }
        // Markers right behind the last frame taken are done with it.
        while let Some(OutItem::SyncChunkWritten(tag)) = self.items.front() {
            wb.sync_written.push(*tag);
            self.items.pop_front();
        }
        if self.items.is_empty() && self.items.capacity() > KEEP_ITEMS {
            self.items = VecDeque::new();
        }
        wb
    }

    /// The peer unsubscribed from `vni`: drops its coalesced changes and
    /// the sync chunks not yet written (with their markers; the owner
    /// forgets the sync job at the UNSUBSCRIBE). Live frames queued before
    /// the UNSUBSCRIBE stay: they were due before it.
    pub fn forget_vni(&mut self, vni: Vni) {
        if let Some(map) = &mut self.coalesced {
            map.retain(|route, _| route.vni != vni);
        }
        let mut dropped = 0;
        self.items.retain(|item| match item {
            OutItem::Frames {
                bytes,
                origin: Origin::Sync(v),
                ..
            } if *v == vni => {
                dropped += bytes.len();
                false
            }
            OutItem::SyncChunkWritten(tag) => tag.vni != vni,
            _ => true,
        });
        self.queued_bytes -= dropped;
    }

    /// The writer put `bytes` (from a `WriteBatch`) on the socket.
    pub fn written(&mut self, bytes: usize) {
        self.queued_bytes = self.queued_bytes.saturating_sub(bytes);
    }

    fn push_bytes(&mut self, bytes: Bytes, frames: u32, origin: Origin) {
        if bytes.is_empty() {
            return;
        }
        self.queued_bytes += bytes.len();
        self.items.push_back(OutItem::Frames {
            bytes,
            frames,
            control: false,
            keepalive: false,
            origin,
        });
    }

    fn coalesce(&mut self, action: Action, route: Route) {
        self.coalesced_total += 1;
        let present = action == Action::Add;
        let map = self.coalesced.get_or_insert_with(Box::default);
        let cancelled = match map.get_mut(&route) {
            Some(change) => {
                change.now_present = present;
                change.now_present == change.was_present
            }
            None => {
                map.insert(
                    route,
                    PendingChange {
                        was_present: !present,
                        now_present: present,
                    },
                );
                false
            }
        };
        if cancelled {
            map.remove(&route);
        }
    }

    /// Encodes a chunk of coalesced changes behind the queued frames once
    /// the backlog is below half the limit; leaves coalescing mode when the
    /// map is empty.
    fn refill(&mut self) {
        if !self.coalescing || self.queued_bytes > self.max_queued_bytes / 2 {
            return;
        }
        if let Some(map) = self.coalesced.as_mut().filter(|map| !map.is_empty()) {
            let chunk = map.take_some(REFILL_ROUTES);
            let mut buf = BytesMut::with_capacity(chunk.len() * 64);
            let mut frames = 0u32;
            for (route, change) in chunk {
                let action = if change.now_present {
                    Action::Add
                } else {
                    Action::Remove
                };
                encode_frame(&Message::Update { action, route }, &mut buf);
                frames += 1;
            }
            self.push_bytes(buf.freeze(), frames, Origin::Other);
        }
        if self.coalesced_len() == 0 {
            self.coalescing = false;
            // Release the map and its table (sized for the whole backlog).
            self.coalesced = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::FanoutBuilder;
    use metalbond_wire::codec::FrameDecoder;
    use metalbond_wire::types::NextHop;

    fn tag(vni: Vni) -> SyncTag {
        SyncTag { vni, epoch: 1 }
    }

    fn route(i: u32) -> Route {
        Route::new(
            Vni::new(1).unwrap(),
            format!("10.{}.{}.0/24", i >> 8, i & 255).parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    fn batch(changes: &[(Action, u32)]) -> FanoutBatch {
        let mut b = FanoutBuilder::default();
        for (a, i) in changes {
            b.push(Some(PeerId::new(0, 99)), *a, route(*i));
        }
        b.finish()
    }

    /// Drains the queue as a writer would and decodes what the peer gets.
    fn drain(q: &mut OutQueue) -> Vec<(Action, Route)> {
        let mut out = Vec::new();
        loop {
            let wb = q.take_for_write(1 << 20, 64);
            if wb.parts.is_empty() {
                break;
            }
            let mut dec = FrameDecoder::new();
            for p in &wb.parts {
                dec.extend(p);
            }
            while let Some(m) = dec.next_message().unwrap() {
                if let Message::Update { action, route } = m {
                    out.push((action, route));
                }
            }
            q.written(wb.bytes);
        }
        out
    }

    /// What a peer that applies `changes` in order ends up holding.
    fn apply(changes: &[(Action, Route)]) -> std::collections::BTreeSet<Route> {
        let mut s = std::collections::BTreeSet::new();
        for (a, r) in changes {
            match a {
                Action::Add => s.insert(*r),
                Action::Remove => s.remove(r),
            };
        }
        s
    }

    #[test]
    fn live_batches_carry_their_birth_to_the_writer() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        let live = batch(&[(Action::Add, 1)]);
        q.push_fanout(&live).unwrap();
        q.push_control(&Message::Keepalive, false);
        q.push_sync(&batch(&[(Action::Add, 2)]), tag(Vni::new(1).unwrap()));
        let wb = q.take_for_write(1 << 20, 64);
        // Only the live batch is timed; control frames and sync chunks are not.
        assert_eq!(wb.fanout_born, vec![live.born]);
    }

    #[test]
    fn at_most_one_keepalive_reply_waits_for_the_writer() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        assert!(q.push_control(&Message::Keepalive, false));
        for _ in 0..10_000 {
            assert!(
                !q.push_control(&Message::Keepalive, false),
                "a flood adds nothing"
            );
        }
        assert_eq!(q.queued_bytes(), 4);
        let wb = q.take_for_write(1 << 20, 64);
        assert_eq!((wb.frames, wb.bytes, wb.updates), (1, 4, 0));
        assert_eq!(&wb.parts[0][..], &[1, 0, 0, 2], "the KEEPALIVE frame");
        // Taken by the writer (in flight): the next reply queues again.
        assert!(q.push_control(&Message::Keepalive, false));
        assert!(!q.push_control(&Message::Keepalive, false));
        assert_eq!(q.queued_bytes(), 8, "one in flight, one queued");
        let hello = Message::Hello {
            keepalive_secs: 5,
            is_server: true,
            reads_stream: false,
        };
        assert!(
            q.push_control(&hello, false),
            "other control messages always queue"
        );
    }

    #[test]
    fn keeps_up_shares_buffers_in_order() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        let b = batch(&[(Action::Add, 1), (Action::Add, 2)]);
        q.push_fanout(&b).unwrap();
        assert!(!q.is_coalescing());
        let wb = q.take_for_write(1 << 20, 64);
        assert_eq!(wb.frames, 2);
        assert_eq!(wb.parts[0], b.frames);
        q.written(wb.bytes);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn slow_peer_coalesces_and_converges_to_the_same_state() {
        // Limit of ~3 frames: churn far beyond it.
        let mut q = OutQueue::new(PeerId::new(1, 1), 100, 10_000);
        let mut truth = Vec::new();
        for round in 0..50u32 {
            let mut changes = Vec::new();
            for i in 0..20u32 {
                let a = if (round + i) % 3 == 0 {
                    Action::Remove
                } else {
                    Action::Add
                };
                changes.push((a, i));
            }
            // A consistent stream: only ADD absent routes, REMOVE present ones.
            let mut state = apply(&truth);
            let mut consistent = Vec::new();
            for (a, i) in changes {
                let r = route(i);
                let ok = match a {
                    Action::Add => state.insert(r),
                    Action::Remove => state.remove(&r),
                };
                if ok {
                    consistent.push((a, i));
                    truth.push((a, r));
                }
            }
            q.push_fanout(&batch(&consistent)).unwrap();
            assert!(q.queued_bytes() <= 100 + 64 * 20);
        }
        assert!(q.is_coalescing());
        assert!(q.coalesced_len() <= 20, "bounded by distinct routes");
        let got = drain(&mut q);
        assert_eq!(apply(&got), apply(&truth));
        assert!(!q.is_coalescing());
        assert!(!q.has_output());
    }

    #[test]
    fn add_then_remove_of_unseen_route_cancels_out() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1, 100);
        q.push_fanout(&batch(&[(Action::Add, 1)])).unwrap(); // queued (empty queue)
        q.push_fanout(&batch(&[(Action::Add, 2)])).unwrap(); // coalesced
        q.push_fanout(&batch(&[(Action::Remove, 2)])).unwrap();
        assert_eq!(q.coalesced_len(), 0);
        let got = drain(&mut q);
        assert_eq!(got, vec![(Action::Add, route(1))]);
    }

    #[test]
    fn overflow_of_coalescing_map_is_reported() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1, 5);
        q.push_fanout(&batch(&[(Action::Add, 0)])).unwrap();
        let many: Vec<(Action, u32)> = (1..10).map(|i| (Action::Add, i)).collect();
        let err = q.push_fanout(&batch(&many)).unwrap_err();
        assert_eq!(err.limit, 5);
        assert!(err.pending > 5);
    }

    #[test]
    fn own_changes_are_never_queued_and_sync_marker_follows_chunk() {
        let me = PeerId::new(0, 99);
        let mut q = OutQueue::new(me, 1 << 20, 10);
        q.push_fanout(&batch(&[(Action::Add, 1)])).unwrap();
        assert!(!q.has_output(), "origin excluded");
        let vni = Vni::new(1).unwrap();
        let mut b = FanoutBuilder::default();
        b.push(None, Action::Add, route(3));
        q.push_sync(&b.finish(), tag(vni));
        let wb = q.take_for_write(1 << 20, 64);
        assert_eq!(wb.frames, 1);
        assert_eq!(wb.sync_written, vec![tag(vni)]);
    }

    #[test]
    fn forget_vni_drops_only_that_vnis_coalesced_changes() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1, 100);
        q.push_fanout(&batch(&[(Action::Add, 0)])).unwrap(); // queued
        q.push_fanout(&batch(&[(Action::Add, 1), (Action::Add, 2)]))
            .unwrap(); // coalesced
        let other = Route::new(
            Vni::new(2).unwrap(),
            "10.9.9.0/24".parse().unwrap(),
            NextHop::standard("2001:db8::2".parse().unwrap()),
        );
        let mut b = FanoutBuilder::default();
        b.push(None, Action::Add, other);
        q.push_fanout(&b.finish()).unwrap();
        assert_eq!(q.coalesced_len(), 3);
        q.forget_vni(Vni::new(1).unwrap());
        assert_eq!(q.coalesced_len(), 1);
        let got = drain(&mut q);
        assert_eq!(got, vec![(Action::Add, route(0)), (Action::Add, other)]);
    }

    #[test]
    fn unwritten_sync_chunks_of_an_unsubscribed_vni_are_dropped() {
        let me = PeerId::new(1, 1);
        let vni = Vni::new(1).unwrap();
        let mut q = OutQueue::new(me, 1 << 20, 100);
        q.push_fanout(&batch(&[(Action::Add, 0)])).unwrap();
        for i in 0..10 {
            let mut b = FanoutBuilder::default();
            b.push(None, Action::Add, route(100 + i));
            q.push_sync(&b.finish(), tag(vni));
        }
        q.push_control(&Message::Keepalive, false);
        let before = q.queued_bytes();
        q.forget_vni(vni);
        assert!(q.queued_bytes() < before);
        let wb = q.take_for_write(1 << 20, 64);
        assert!(wb.sync_written.is_empty(), "their markers went with them");
        assert_eq!(wb.frames, 2, "the KEEPALIVE and the live frame stay");
        q.written(wb.bytes);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn a_keepalive_for_a_backlogged_peer_goes_ahead_of_routes_not_of_hello() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        let hello = Message::Hello {
            keepalive_secs: 5,
            is_server: true,
            reads_stream: false,
        };
        q.push_control(&hello, false);
        q.push_fanout(&batch(&[(Action::Add, 1), (Action::Add, 2)]))
            .unwrap();
        q.push_control(&Message::Keepalive, true);
        let wb = q.take_frames(8, 64);
        assert_eq!((wb.frames, wb.bytes), (1, 8), "the HELLO first");
        let wb = q.take_frames(4, 64);
        assert_eq!(&wb.parts[0][..], &KEEPALIVE_FRAME, "then the KEEPALIVE");
        // A reply queued behind routes before the peer fell that far behind
        // moves ahead when the next KEEPALIVE finds it still waiting.
        let mut late = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        late.push_fanout(&batch(&[(Action::Add, 1), (Action::Add, 2)]))
            .unwrap();
        assert!(late.push_control(&Message::Keepalive, false));
        late.push_fanout(&batch(&[(Action::Add, 3)])).unwrap();
        assert!(!late.push_control(&Message::Keepalive, false), "one waits");
        assert!(late.push_control(&Message::Keepalive, true), "moved");
        let wb = late.take_frames(1 << 20, 64);
        assert_eq!(&wb.parts[0][..], &KEEPALIVE_FRAME, "now first");
        assert_eq!((wb.frames, wb.updates), (4, 3), "and only once");
        let mut fifo = OutQueue::new(PeerId::new(1, 1), 1 << 20, 100);
        fifo.push_fanout(&batch(&[(Action::Add, 1)])).unwrap();
        fifo.push_control(&Message::Keepalive, false);
        let wb = fifo.take_frames(1 << 20, 64);
        assert_eq!(wb.updates, 1);
        assert_eq!(&wb.parts[1][..], &KEEPALIVE_FRAME, "a barrier otherwise");
    }
}
