//! `ShardContext`: what a shard shares with the tasks it runs for its
//! peers (and ghosts), behind methods.
//!
//! Owns: the shard's identity (index, shard count), configuration and
//! counters, its `ShardOutbox` toward the VNI owners (and `withdraw_all`,
//! the back-pressured withdrawal of a leaving peer's or ghost's routes),
//! peer id allocation, the shutdown flag and event, the `--max-peers`
//! admission and the `--peer-grace` holds.
//!
//! Dependency direction: `shard` (executor, owner, peer map) → `peer` /
//! `connection` / `accept` → `context` → `mesh`, `grace` (state only).
//! Nothing below imports what is above it. Peer code reaches
//! its shard only through this type; it never sees the owner tables or the
//! other peers.
//!
//! Must never: hold route logic, a peer's state, or await anything but
//! back-pressure.

use std::cell::Cell;
use std::sync::Arc;

use super::admission::Admission;
use super::config::ServerConfig;
use super::grace::GraceHolds;
use super::local_event::LocalEvent;
use super::mesh::{ShardMsg, ShardOutbox};
use super::owner::OwnerInput;
use super::route_set::RouteSet;
use super::session_clock::SessionClock;
use super::snapshot::ShardCounters;
use super::PeerId;
use metalbond_wire::types::Vni;

/// Owner inputs sent between two checks for a yield in `withdraw_all`.
const WITHDRAW_CHUNK: usize = 1024;

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
    /// The deadlines of the shard's sessions (see `session_clock`).
    clock: SessionClock,
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
            clock: SessionClock::new(),
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

    /// The deadlines of this shard's sessions.
    pub(crate) fn clock(&self) -> &SessionClock {
        &self.clock
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

    /// Sends a `Withdraw` of each of `routes` (all in `vni`, announced by
    /// `peer`) to the VNI's owner, all of them, in chunks: between chunks it
    /// yields when glommio asks for it, and it waits while the shard's outboxes
    /// hold more than `OUTBOX_HIGH` messages (as readers do), so a peer that
    /// announced a million routes neither stalls its shard while they are queued
    /// nor builds a million-message batch for the owner. Never stops early
    /// while the server runs (a route not withdrawn would stay in the table
    /// for good); at shutdown it stops, as the tables go with the server.
    /// Holds no borrow across its awaits.
    pub(crate) async fn withdraw_all(&self, peer: PeerId, vni: Vni, routes: RouteSet) {
        let mut routes = routes.into_iter().peekable();
        while routes.peek().is_some() {
            if self.is_shutting_down() {
                // The tables go with the server, and at shutdown the flushers
                // stop: what is not yet withdrawn would pile up in an outbox
                // nobody drains (a leaving 1 M-route peer: +250 MiB).
                return;
            }
            for route in routes.by_ref().take(WITHDRAW_CHUNK) {
                self.to_owner(vni, OwnerInput::Withdraw { peer, route });
            }
            self.outbox_room(|| self.is_shutting_down(), self.shutdown_event())
                .await;
            glommio::yield_if_needed().await;
        }
    }
}
