//! `ShardContext`: what a shard shares with the tasks it runs for its
//! peers (and ghosts), behind methods.
//!
//! Owns: the shard's identity (index, shard count), configuration and
//! counters, its `ShardOutbox` toward the VNI owners, peer id allocation,
//! the shutdown flag and event, the `--max-peers` admission and the
//! `--peer-grace` holds.
//!
//! Dependency direction: `shard` (executor, owner, peer map) → `peer` /
//! `connection` / `accept` / `grace` → `context` → `mesh`. Peer code reaches
//! its shard only through this type; it never sees the owner tables or the
//! other peers.
//!
//! Must never: hold route logic, a peer's state, or await anything but
//! back-pressure.

use std::cell::Cell;
use std::sync::Arc;

use super::admission::Admission;
use super::config::ServerConfig;
use super::event::LocalEvent;
use super::grace::GraceHolds;
use super::mesh::{ShardMsg, ShardOutbox};
use super::owner::OwnerInput;
use super::stats::ShardCounters;
use super::PeerId;
use crate::types::Vni;

/// A shard's state that its peer tasks may use (single thread, `Rc`).
pub(crate) struct ShardContext {
    /// This shard's index.
    index: usize,
    /// Number of shards (VNI `v` is owned by shard `v % shards`).
    shards: usize,
    /// The server's configuration.
    config: Arc<ServerConfig>,
    /// Counters, shared with the handle.
    counters: Arc<ShardCounters>,
    /// Pending messages toward every shard.
    outbox: ShardOutbox,
    /// Next peer sequence number.
    next_peer: Cell<u64>,
    /// Set once shutdown begins.
    shutting_down: Cell<bool>,
    /// Wakes accept loops, peers and ghosts on shutdown.
    shutdown_event: LocalEvent,
    /// Places under `--max-peers` and the handshake queue, shared by all
    /// shards (peers enter the queue on start, see `peer`).
    admission: Arc<Admission>,
    /// Routes of departed peers held for `--peer-grace` (see `grace`).
    grace: GraceHolds,
}

impl ShardContext {
    /// The context of shard `index` of `shards`.
    pub(crate) fn new(
        index: usize,
        shards: usize,
        config: Arc<ServerConfig>,
        counters: Arc<ShardCounters>,
        admission: Arc<Admission>,
        grace: GraceHolds,
    ) -> ShardContext {
        ShardContext {
            index,
            shards,
            config,
            counters,
            outbox: ShardOutbox::new(shards),
            next_peer: Cell::new(0),
            shutting_down: Cell::new(false),
            shutdown_event: LocalEvent::default(),
            admission,
            grace,
        }
    }

    /// This shard's index.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Number of shards.
    pub(crate) fn shards(&self) -> usize {
        self.shards
    }

    /// The server's configuration.
    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// This shard's counters.
    pub(crate) fn counters(&self) -> &ShardCounters {
        &self.counters
    }

    /// `--max-peers` places and the handshake queue.
    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// `--peer-grace` holds of this shard.
    pub(crate) fn grace(&self) -> &GraceHolds {
        &self.grace
    }

    /// The shard-to-shard outboxes (for the shard's flushers).
    pub(crate) fn outbox(&self) -> &ShardOutbox {
        &self.outbox
    }

    /// A fresh id for a peer accepted on this shard.
    pub(crate) fn new_peer_id(&self) -> PeerId {
        let n = self.next_peer.get();
        self.next_peer.set(n + 1);
        PeerId::new(self.index, n)
    }

    /// The shard owning `vni`.
    pub(crate) fn owner_of(&self, vni: Vni) -> usize {
        (vni.get() as usize) % self.shards
    }

    /// Sends `input` to the owner of `vni` (batched).
    pub(crate) fn to_owner(&self, vni: Vni, input: OwnerInput) {
        self.outbox.push(self.owner_of(vni), ShardMsg::Owner(input));
    }

    /// Sends `msg` to shard `dest` (batched).
    pub(crate) fn send(&self, dest: usize, msg: ShardMsg) {
        self.outbox.push(dest, msg);
    }

    /// Back-pressure: waits while this shard's outboxes hold more than
    /// `OUTBOX_HIGH` messages, or until `stop()` holds (`stop_event` is
    /// notified when it may have changed).
    pub(crate) async fn outbox_room(&self, stop: impl Fn() -> bool, stop_event: &LocalEvent) {
        self.outbox.room(stop, stop_event).await
    }

    /// Has shutdown begun?
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// Notified once when shutdown begins.
    pub(crate) fn shutdown_event(&self) -> &LocalEvent {
        &self.shutdown_event
    }

    /// Begins shutdown: sets the flag, wakes everyone waiting for it.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        self.shutdown_event.notify();
    }
}
