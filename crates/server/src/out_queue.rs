//! One peer's pending output, bounded whatever the churn.
//!
//! Owns: the peer's FIFO of shared frame buffers (`FanoutBatch` slices, no
//! copies), session replies and sync-chunk markers, and the one fact the
//! slow-subscriber policy needs from it: is the queue past
//! `max_queued_bytes`? `push_fanout` says so; the peer's shard then asks
//! the VNI's owner to stop the fan-out to this peer and catch it up from
//! the table (`catch_up`). Nothing is dropped here: what was delivered is
//! queued, and what the peer is behind costs the owner a scan, not this
//! queue a copy per route (issue #28: per-subscriber coalescing maps made
//! the memory of a burst grow with the number of slow subscribers).
//!
//! Must never: touch the socket (the writer task drains it) or know tables.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::fanout::FanoutBatch;
use super::owner::SyncTag;
use super::PeerId;
use metalbond_wire::codec::{encode_frame, first_frame_len, whole_frames_prefix, Message};
use metalbond_wire::types::Vni;
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
    pub fn new(me: PeerId, max_queued_bytes: usize) -> OutQueue {
        OutQueue {
            me,
            items: VecDeque::new(),
            queued_bytes: 0,
            max_queued_bytes,
            keepalive_queued: false,
            peer_reads_stream: false,
        }
    }

    /// Bytes queued or in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Frees the queue's slots if nothing is queued: a quiet peer (the
    /// reader calls this at its session deadlines) holds no storage, where
    /// a sync or a burst left it several slots for the session's life.
    pub fn release_if_drained(&mut self) {
        if self.items.is_empty() && self.items.capacity() > 0 {
            self.items = VecDeque::new();
        }
    }

    /// Is the queue past `max_queued_bytes` (the peer is behind)?
    pub fn is_behind(&self) -> bool {
        self.queued_bytes > self.max_queued_bytes
    }

    /// Anything left to write (or a sync marker to report)?
    pub fn has_output(&self) -> bool {
        !self.items.is_empty()
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

    /// Queues a fan-out batch (minus this peer's own runs) and says whether
    /// the queue is now past its limit: the caller then has the owner stop
    /// the fan-out and catch the peer up from the table. Always queued: a
    /// batch was addressed to the peer while it was live, and only the
    /// batches already on their way when the owner hears of it follow.
    pub fn push_fanout(&mut self, batch: &FanoutBatch) -> bool {
        let (parts, frames) = batch.parts_for(self.me);
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            // Frame count is attributed to the last part.
            let f = if i + 1 == n { frames as u32 } else { 0 };
            self.push_bytes(p, f, Origin::Live(batch.born));
        }
        self.is_behind()
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
    /// one write.
    pub fn take_for_write(&mut self, max_bytes: usize, max_parts: usize) -> WriteBatch {
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
        // After a write of session replies only (an idle peer's KEEPALIVE)
        // nothing stays either: idle peers hold no slot between replies.
        if self.items.is_empty() && (self.items.capacity() > KEEP_ITEMS || wb.updates == 0) {
            self.items = VecDeque::new();
        }
        wb
    }

    /// Length of the next frame to write, `None` when no frame is queued.
    pub fn next_frame_len(&mut self) -> Option<usize> {
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
        // After a write of session replies only (an idle peer's KEEPALIVE)
        // nothing stays either: idle peers hold no slot between replies.
        if self.items.is_empty() && (self.items.capacity() > KEEP_ITEMS || wb.updates == 0) {
            self.items = VecDeque::new();
        }
        wb
    }

    /// The peer unsubscribed from `vni`: drops the sync and catch-up chunks
    /// not yet written (with their markers; the owner forgets the job at
    /// the UNSUBSCRIBE). Live frames queued before the UNSUBSCRIBE stay:
    /// they were due before it.
    pub fn forget_vni(&mut self, vni: Vni) {
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

    /// A write from the delivery pass (`Connection::write_while_parked`)
    /// ended short: what the socket did not take of a `WriteBatch` goes
    /// back to the front, ahead of everything queued since, for the writer
    /// task. `rest` starts `offset` bytes into its first buffer, mid-frame
    /// possibly: these are written whatever happens (an UNSUBSCRIBE does
    /// not drop them, `forget_vni`), only to a peer that reads as a stream
    /// (a paced write must start at a frame boundary). The batch's frames
    /// were counted when it was taken; its sync markers follow the rest
    /// (and go at an UNSUBSCRIBE like any, the owner forgets the job then).
    pub fn put_back(&mut self, rest: &[Bytes], offset: usize, sync_written: &[SyncTag]) {
        for tag in sync_written.iter().rev() {
            self.items.push_front(OutItem::SyncChunkWritten(*tag));
        }
        for (i, part) in rest.iter().enumerate().rev() {
            let bytes = if i == 0 {
                part.slice(offset..)
            } else {
                part.clone()
            };
            if bytes.is_empty() {
                continue;
            }
            self.items.push_front(OutItem::Frames {
                bytes,
                frames: 0,
                control: true,
                keepalive: false,
                origin: Origin::Other,
            });
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::FanoutBuilder;
    use metalbond_wire::codec::FrameDecoder;
    use metalbond_wire::types::{Action, NextHop, Route};

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
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20);
        let live = batch(&[(Action::Add, 1)]);
        q.push_fanout(&live);
        q.push_control(&Message::Keepalive, false);
        q.push_sync(&batch(&[(Action::Add, 2)]), tag(Vni::new(1).unwrap()));
        let wb = q.take_for_write(1 << 20, 64);
        // Only the live batch is timed; control frames and sync chunks are not.
        assert_eq!(wb.fanout_born, vec![live.born]);
    }

    #[test]
    fn at_most_one_keepalive_reply_waits_for_the_writer() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20);
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
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20);
        let b = batch(&[(Action::Add, 1), (Action::Add, 2)]);
        assert!(!q.push_fanout(&b), "not behind");
        let wb = q.take_for_write(1 << 20, 64);
        assert_eq!(wb.frames, 2);
        assert_eq!(wb.parts[0], b.frames);
        q.written(wb.bytes);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[test]
    fn a_queue_past_its_limit_says_so_and_drops_nothing() {
        // Limit of ~3 frames: the peer is told it is behind, yet every
        // frame delivered is still written, in order.
        let mut q = OutQueue::new(PeerId::new(1, 1), 100);
        let mut sent = Vec::new();
        let mut behind = false;
        for i in 0..20u32 {
            behind |= q.push_fanout(&batch(&[(Action::Add, i)]));
            sent.push((Action::Add, route(i)));
        }
        assert!(behind && q.is_behind());
        assert_eq!(drain(&mut q), sent);
        assert!(!q.is_behind());
        assert!(!q.has_output());
        assert_eq!(apply(&sent).len(), 20);
    }

    #[test]
    fn own_changes_are_never_queued_and_sync_marker_follows_chunk() {
        let me = PeerId::new(0, 99);
        let mut q = OutQueue::new(me, 1 << 20);
        q.push_fanout(&batch(&[(Action::Add, 1)]));
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
    fn unwritten_sync_chunks_of_an_unsubscribed_vni_are_dropped() {
        let me = PeerId::new(1, 1);
        let vni = Vni::new(1).unwrap();
        let mut q = OutQueue::new(me, 1 << 20);
        q.push_fanout(&batch(&[(Action::Add, 0)]));
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
    fn what_a_short_write_left_goes_first_whole_and_keeps_its_marker() {
        let vni = Vni::new(1).unwrap();
        for unsubscribed in [false, true] {
            let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20);
            q.push_sync(&batch(&[(Action::Add, 1), (Action::Add, 2)]), tag(vni));
            let wb = q.take_for_write(1 << 20, 64);
            assert_eq!(wb.sync_written, vec![tag(vni)]);
            // The socket took 5 bytes: the rest goes back, mid-frame.
            q.written(5);
            q.put_back(&wb.parts, 5, &wb.sync_written);
            q.push_fanout(&batch(&[(Action::Add, 3)]));
            if unsubscribed {
                // Unwritten sync chunks go, half a frame never does (the
                // marker goes: the owner forgets the job at the UNSUBSCRIBE).
                q.forget_vni(vni);
            }
            let rest = q.take_for_write(1 << 20, 64);
            assert_eq!(&rest.parts[0][..], &wb.parts[0][5..], "the rest first");
            let marker = if unsubscribed { vec![] } else { vec![tag(vni)] };
            assert_eq!(rest.sync_written, marker, "its marker follows it");
            let mut bytes = wb.parts[0][..5].to_vec();
            for p in &rest.parts {
                bytes.extend_from_slice(p);
            }
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            let mut got = Vec::new();
            while let Some(Message::Update { route, .. }) = dec.next_message().unwrap() {
                got.push(route);
            }
            assert_eq!(
                got,
                vec![route(1), route(2), route(3)],
                "whole frames, in order"
            );
            assert_eq!(q.queued_bytes(), rest.bytes, "counted once");
            q.written(rest.bytes);
            assert!(!q.has_output());
        }
    }

    #[test]
    fn a_keepalive_for_a_backlogged_peer_goes_ahead_of_routes_not_of_hello() {
        let mut q = OutQueue::new(PeerId::new(1, 1), 1 << 20);
        let hello = Message::Hello {
            keepalive_secs: 5,
            is_server: true,
            reads_stream: false,
        };
        q.push_control(&hello, false);
        q.push_fanout(&batch(&[(Action::Add, 1), (Action::Add, 2)]));
        q.push_control(&Message::Keepalive, true);
        let wb = q.take_frames(8, 64);
        assert_eq!((wb.frames, wb.bytes), (1, 8), "the HELLO first");
        let wb = q.take_frames(4, 64);
        assert_eq!(&wb.parts[0][..], &KEEPALIVE_FRAME, "then the KEEPALIVE");
        // A reply queued behind routes before the peer fell that far behind
        // moves ahead when the next KEEPALIVE finds it still waiting.
        let mut late = OutQueue::new(PeerId::new(1, 1), 1 << 20);
        late.push_fanout(&batch(&[(Action::Add, 1), (Action::Add, 2)]));
        assert!(late.push_control(&Message::Keepalive, false));
        late.push_fanout(&batch(&[(Action::Add, 3)]));
        assert!(!late.push_control(&Message::Keepalive, false), "one waits");
        assert!(late.push_control(&Message::Keepalive, true), "moved");
        let wb = late.take_frames(1 << 20, 64);
        assert_eq!(&wb.parts[0][..], &KEEPALIVE_FRAME, "now first");
        assert_eq!((wb.frames, wb.updates), (4, 3), "and only once");
        let mut fifo = OutQueue::new(PeerId::new(1, 1), 1 << 20);
        fifo.push_fanout(&batch(&[(Action::Add, 1)]));
        fifo.push_control(&Message::Keepalive, false);
        let wb = fifo.take_frames(1 << 20, 64);
        assert_eq!(wb.updates, 1);
        assert_eq!(&wb.parts[1][..], &KEEPALIVE_FRAME, "a barrier otherwise");
    }
}
