//! The channels between shards: what shards tell each other (`ShardMsg`)
//! and a shard's outgoing side, the `ShardOutbox`.
//!
//! Owns: the message types crossing shards, and the per-destination
//! pending batches a shard's tasks append to (one channel message and one
//! wake-up per batch), with the back-pressure level readers wait on.
//!
//! Deadlock freedom: a task that *handles* messages never awaits a channel
//! send. Handlers only append to an outbox; a dedicated flusher task per
//! destination (in `shard`) awaits the bounded channel. Two shards sending
//! to each other therefore never wait on each other's handlers. Outboxes are
//! bounded in practice by back-pressure (`ShardOutbox::room`): peer readers
//! whose last read produced owner inputs stop reading from their sockets
//! while the outboxes hold more than `OUTBOX_HIGH` messages, and a leaving
//! peer's withdrawals wait the same way.
//!
//! "Outbox" here always means this shard-to-shard queue; a peer's own
//! pending output is its `OutQueue` (see `out_queue`).
//!
//! Must never: await a channel (that is the flusher's job), handle a
//! message, or know about peers' sockets.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use futures_lite::future;

use super::accept::Accepted;
use super::admission::PeerSlot;
use super::local_event::LocalEvent;
use super::owner::{OwnerInput, ShardDelivery};
use super::PeerId;

/// Messages pending in a shard's outboxes above which peer readers pause.
/// With `CHANNEL_BATCHES` this bounds what a shard holds in flight towards
/// the others (≈ 48 K messages of 64 bytes, ~3 MiB); at 64 K and 16 batches
/// a leaving million-route peer's withdrawals held 13 MiB of the peak
/// (BENCHMARKS "Shard-to-shard messages in flight"), with bursts no faster.
pub(crate) const OUTBOX_HIGH: usize = 16 * 1024;
/// Batches a shard-to-shard channel holds before the flusher waits.
pub(crate) const CHANNEL_BATCHES: usize = 8;
/// Messages in one batch at most. Bounds what sits in a channel to
/// `CHANNEL_BATCHES × BATCH_MAX` messages: with whole outboxes as batches,
/// a million-route burst could park ~16 × `OUTBOX_HIGH` messages (about
/// 100 MiB) in a channel while the readers refilled the outbox behind it.
pub(crate) const BATCH_MAX: usize = 4096;

/// What shards tell each other.
pub(crate) enum ShardMsg {
    /// For the owner of the input's VNI.
    Owner(OwnerInput),
    /// Frames for peers on the receiving shard. Boxed: one per batch and
    /// destination, while route inputs come by the million, and a
    /// `ShardDelivery` inline made every message half as large again (96 bytes
    /// instead of 64).
    Deliver(Box<ShardDelivery>),
    /// A new connection handed over by an accept loop, with its place
    /// under `--max-peers`.
    Connection(Accepted, PeerSlot),
    /// Close this peer of the receiving shard if it is still in its
    /// handshake: an accept loop gave its place to a new connection
    /// (`Shard::evict`).
    Evict(PeerId),
}

/// One channel message: many shard messages, one wake-up.
pub(crate) type Batch = Vec<ShardMsg>;

/// A shard's pending messages for every shard (itself included), each
/// destination drained by its own flusher task.
pub(crate) struct ShardOutbox {
    /// Pending messages per destination shard, in batches of at most
    /// `BATCH_MAX` (appended to the last one until it is full), so taking
    /// one batch never moves the messages behind it.
    batches: Vec<RefCell<VecDeque<Batch>>>,
    /// Wakes the flusher of each destination.
    wake: Vec<LocalEvent>,
    /// Messages in all destinations' batches.
    pending: Cell<usize>,
    /// Notified when a batch is taken (paused readers resume).
    drained: LocalEvent,
}

impl ShardOutbox {
    /// Empty outboxes for `shards` destinations.
    pub(crate) fn new(shards: usize) -> ShardOutbox {
        ShardOutbox {
            batches: (0..shards).map(|_| RefCell::new(VecDeque::new())).collect(),
            wake: (0..shards).map(|_| LocalEvent::default()).collect(),
            pending: Cell::new(0),
            drained: LocalEvent::default(),
        }
    }

    /// Appends `msg` for shard `dest` and wakes its flusher.
    pub(crate) fn push(&self, dest: usize, msg: ShardMsg) {
        let mut batches = self.batches[dest].borrow_mut();
        match batches.back_mut() {
            Some(last) if last.len() < BATCH_MAX => last.push(msg),
            _ => {
                // Small at first: most batches are a few messages (churn).
                let mut batch = Vec::with_capacity(16);
                batch.push(msg);
                batches.push_back(batch);
            }
        }
        drop(batches);
        self.pending.set(self.pending.get() + 1);
        self.wake[dest].notify();
    }

    /// Messages waiting in all outboxes (readers pause above `OUTBOX_HIGH`).
    pub(crate) fn pending(&self) -> usize {
        self.pending.get()
    }

    /// Back-pressure: waits while the outboxes hold more than `OUTBOX_HIGH`
    /// messages, or until `stop()` holds (`stop_event` is notified when it
    /// may have changed).
    pub(crate) async fn room(&self, stop: impl Fn() -> bool, stop_event: &LocalEvent) {
        while self.pending() > OUTBOX_HIGH && !stop() {
            future::or(self.drained.wait(), stop_event.wait()).await;
        }
    }

    /// Waits until shard `dest`'s outbox holds messages and takes the
    /// oldest batch (at most `BATCH_MAX` messages), for its flusher.
    pub(crate) async fn next_batch(&self, dest: usize) -> Batch {
        loop {
            let wait = self.wake[dest].wait();
            let Some(batch) = self.batches[dest].borrow_mut().pop_front() else {
                wait.await;
                continue;
            };
            self.pending
                .set(self.pending.get().saturating_sub(batch.len()));
            self.drained.notify();
            return batch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Route inputs cross shards by the million in a burst and up to
    /// `OUTBOX_HIGH` + `CHANNEL_BATCHES` × `BATCH_MAX` of them wait at once:
    /// their size is the memory of that queue.
    #[test]
    fn a_shard_message_is_no_larger_than_a_route_input() {
        assert!(
            std::mem::size_of::<ShardMsg>() <= std::mem::size_of::<OwnerInput>() + 8,
            "ShardMsg is {} bytes, OwnerInput {}",
            std::mem::size_of::<ShardMsg>(),
            std::mem::size_of::<OwnerInput>()
        );
    }
}
