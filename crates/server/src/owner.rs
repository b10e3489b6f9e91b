//! The VNIs a shard owns: their tables, fan-out and SUBSCRIBE syncs.
//!
//! Owns: applying route and subscription changes to the owned `VniTable`s
//! (one owner per VNI gives every subscriber one order of changes per
//! route), encoding each resulting UPDATE once per batch (`FanoutBuilder`),
//! addressing the batch to every shard holding live subscribers, and driving
//! the chunked, flow-controlled sync of new subscribers (at most
//! `SYNC_WINDOW` chunks in flight per subscriber, whatever it subscribes
//! to, and
//! `SYNC_BYTES_IN_FLIGHT` bytes over all of this owner's subscriptions, see
//! `sync_budget`; the
//! next chunk goes out when the subscriber's shard reports one written).
//!
//! Must never: touch sockets or channels. It returns `ShardDelivery`s addressed to
//! shards; `shard` moves them. That keeps it unit-testable and lets the
//! shard batch deliveries per destination.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::fanout::{FanoutBatch, FanoutBuilder};
use super::sync_budget::{ChunkTicket, SyncBudget};
use super::vni_table::{Change, Subscriber, VniTable};
use super::PeerId;
use metalbond_wire::types::{Action, Route, Vni};

/// Sync chunks a subscriber may have queued but not yet written, over all
/// its subscriptions to this owner's VNIs: whatever it subscribes to, a
/// peer that does not read holds at most this many chunks per owner shard
/// (issue #24: 10,000 subscriptions with two chunks each were a gigabyte).
pub const SYNC_WINDOW: u32 = 2;
/// A fan-out buffer is sent once it passes this size, so batches stay small
/// enough to share and to coalesce.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// A change request for an owned VNI, from the shard holding the peer. The
/// peer's shard has already filtered duplicates (ADD of a route the peer
/// announces, REMOVE of one it does not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerInput {
    /// The peer now announces the route.
    Announce {
        /// The peer concerned.
        peer: PeerId,
        /// The route.
        route: Route,
    },
    /// The peer no longer announces the route.
    Withdraw {
        /// The peer concerned.
        peer: PeerId,
        /// The route.
        route: Route,
    },
    /// The peer subscribes to the VNI.
    Subscribe {
        /// The peer concerned.
        peer: PeerId,
        /// The VNI.
        vni: Vni,
        /// Which of the peer's SUBSCRIBEs this is; its sync chunks carry
        /// it (see `SyncTag`).
        epoch: u32,
    },
    /// The peer leaves the VNI (or disconnected).
    Unsubscribe {
        /// The peer concerned.
        peer: PeerId,
        /// The VNI.
        vni: Vni,
    },
    /// The peer's output queue passed its limit with deliveries of this
    /// VNI: stop sending it the fan-out and catch it up from the table
    /// (`catch_up`), so what it is behind costs no memory per route.
    Lagging {
        /// The peer concerned.
        peer: PeerId,
        /// The VNI.
        vni: Vni,
        /// Its subscription (catch-up chunks carry it, as sync chunks).
        epoch: u32,
    },
    /// One sync chunk for (peer, subscription) reached the peer's socket.
    SyncWritten {
        /// The peer concerned.
        peer: PeerId,
        /// The subscription the chunk belongs to.
        tag: SyncTag,
    },
}

/// Which subscription a sync chunk belongs to. A peer may unsubscribe and
/// subscribe again before the owner hears of either: chunks of the earlier
/// subscription still on their way must not pass for the new one's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncTag {
    /// The VNI synced.
    pub vni: Vni,
    /// The peer's count of SUBSCRIBEs when it sent this one (wrapping).
    pub epoch: u32,
}

/// Frames for some peers of one shard.
#[derive(Clone, Debug)]
pub struct ShardDelivery {
    /// The VNI the frames belong to: a recipient that has unsubscribed from
    /// it since (the UNSUBSCRIBE is read on its shard, before the owner knows)
    /// does not get them.
    pub vni: Vni,
    /// Peers (all on the destination shard) that get the batch.
    pub recipients: Arc<[PeerId]>,
    /// The shared frames.
    pub batch: FanoutBatch,
    /// Set for a sync chunk: report `SyncWritten` once it is written.
    pub sync: Option<SyncTag>,
}

/// A subscription being synced.
#[derive(Debug)]
struct SyncJob {
    /// The subscription synced (its peer's SUBSCRIBE count).
    epoch: u32,
    /// No chunk sent yet. The first step always sends one, even empty: it
    /// tells the subscriber's shard that deliveries from an earlier
    /// subscription to the same VNI are over.
    first: bool,
    /// The scan is complete (the subscriber is live): no further chunks.
    /// The job stays until its chunks in flight are reported written, so
    /// their bytes leave the owner's `SyncBudget` on time.
    scanned: bool,
    /// The chunks sent and not yet reported written, oldest first (a
    /// subscriber's shard reports them in the order they were sent).
    in_flight: VecDeque<ChunkTicket>,
}

/// One subscriber's sync credit on this owner.
#[derive(Debug)]
struct SyncCredit {
    /// Chunks it may be sent before one is reported written.
    chunks: u32,
    /// Its sync jobs here (the entry goes with the last).
    jobs: u32,
}

/// Changes collected for one VNI during the current batch.
#[derive(Debug, Default)]
struct PendingFanout {
    /// Frames for the live subscribers.
    live: FanoutBuilder,
    /// Frames for individual subscribers: syncing ones (changes behind
    /// their cursor), and a route's sole announcer (see `record_for_one`).
    personal: HashMap<PeerId, FanoutBuilder>,
    /// Some personal frames are for a live subscriber, which also gets
    /// `live`: the next live change flushes first, so that subscriber gets
    /// its changes in the order they were made (`flush_vni` sends `live`
    /// before the personal batches).
    live_personal: bool,
}

/// All VNIs owned by one shard.
#[derive(Debug)]
pub struct VniOwner {
    /// Owned tables; a table is dropped when it has no routes nor subscribers.
    tables: HashMap<Vni, VniTable>,
    /// Fan-out accumulated since the last `flush`.
    pending: HashMap<Vni, PendingFanout>,
    /// Syncs in progress.
    jobs: HashMap<(PeerId, Vni), SyncJob>,
    /// Per syncing subscriber: chunks it may still be sent before one is
    /// reported written (`SYNC_WINDOW` at most), and its jobs here.
    credit: HashMap<PeerId, SyncCredit>,
    /// Round-robin order of sync jobs.
    job_order: VecDeque<(PeerId, Vni)>,
    /// Routes per sync chunk.
    chunk_routes: usize,
    /// Routes in all owned tables.
    route_count: usize,
    /// Sync chunks sent and not yet reported written, against one bound for
    /// all subscriptions.
    sync_budget: SyncBudget,
    /// Catch-ups started (subscribers that fell behind), for the stats.
    catch_ups_started: u64,
    /// Catch-ups in progress.
    catch_ups_active: usize,
}

impl VniOwner {
    /// An owner with no VNIs; syncs send `chunk_routes` routes per chunk.
    pub fn new(chunk_routes: usize) -> VniOwner {
        VniOwner {
            tables: HashMap::new(),
            pending: HashMap::new(),
            jobs: HashMap::new(),
            credit: HashMap::new(),
            job_order: VecDeque::new(),
            chunk_routes: chunk_routes.max(1),
            route_count: 0,
            sync_budget: SyncBudget::default(),
            catch_ups_started: 0,
            catch_ups_active: 0,
        }
    }

    /// Catch-ups this owner started (subscribers that fell behind).
    pub fn catch_ups_started(&self) -> u64 {
        self.catch_ups_started
    }

    /// Catch-ups in progress on the owned VNIs.
    pub fn catch_ups_active(&self) -> usize {
        self.catch_ups_active
    }

    /// Routes in all owned tables.
    pub fn route_count(&self) -> usize {
        self.route_count
    }

    /// Owned VNIs with their routes (for snapshots).
    pub fn tables(&self) -> impl Iterator<Item = (&Vni, &VniTable)> {
        self.tables.iter()
    }

    /// One owned VNI's table, if it has one.
    pub fn table(&self, vni: Vni) -> Option<&VniTable> {
        self.tables.get(&vni)
    }

    /// Is a sync step possible now (a job with credit, and room in the
    /// sync budget)?
    pub fn has_sync_work(&self) -> bool {
        self.sync_budget.has_room() && self.has_sync_jobs()
    }

    /// Is a sync waiting only for room in the budget? Then it can go on
    /// when a chunk is reported written or at `sync_budget_frees_at`.
    pub fn sync_waits_for_budget(&self) -> bool {
        !self.sync_budget.has_room() && self.has_sync_jobs()
    }

    /// When the oldest sync chunk out stops counting against the budget.
    pub fn sync_budget_frees_at(&self) -> Option<Instant> {
        self.sync_budget.next_stall()
    }

    fn has_sync_jobs(&self) -> bool {
        self.jobs
            .iter()
            .any(|((peer, _), j)| !j.scanned && self.credit_of(*peer) > 0)
    }

    /// Bytes of sync chunks counting against the budget.
    #[cfg(test)]
    fn sync_bytes_in_flight(&self) -> usize {
        self.sync_budget.bytes()
    }

    /// Applies one input; deliveries that must go out at once (a full
    /// batch buffer) are appended to `out`, the rest wait for `flush`.
    pub fn apply(&mut self, input: OwnerInput, out: &mut Vec<(usize, ShardDelivery)>) {
        match input {
            OwnerInput::Announce { peer, route } => {
                let table = self
                    .tables
                    .entry(route.vni)
                    .or_insert_with(|| VniTable::new(route.vni));
                match table.announce_change(route, peer) {
                    Change::Table => {
                        self.route_count += 1;
                        self.record(route.vni, peer, Action::Add, route, out);
                    }
                    Change::ForOne(first) => {
                        self.record_for_one(first, Action::Add, route, out);
                    }
                    Change::None => {}
                }
            }
            OwnerInput::Withdraw { peer, route } => {
                let Some(table) = self.tables.get_mut(&route.vni) else {
                    return;
                };
                match table.withdraw_change(&route, peer) {
                    Change::Table => {
                        self.route_count -= 1;
                        self.record(route.vni, peer, Action::Remove, route, out);
                    }
                    Change::ForOne(left) => {
                        self.record_for_one(left, Action::Remove, route, out);
                    }
                    Change::None => {}
                }
                self.drop_if_empty(route.vni);
            }
            OwnerInput::Subscribe { peer, vni, epoch } => {
                let table = self.tables.entry(vni).or_insert_with(|| VniTable::new(vni));
                if table.subscribe(peer) {
                    self.start_job(peer, vni, epoch);
                }
            }
            OwnerInput::Unsubscribe { peer, vni } => {
                if let Some(table) = self.tables.get_mut(&vni) {
                    if table.is_catching_up(peer) {
                        self.catch_ups_active -= 1;
                    }
                    table.unsubscribe(peer);
                }
                // Its chunks still queued are dropped by its shard at the
                // UNSUBSCRIBE (or with its queue): no report comes for them.
                if let Some(job) = self.jobs.remove(&(peer, vni)) {
                    self.end_job(peer, job);
                }
                self.drop_if_empty(vni);
            }
            OwnerInput::Lagging { peer, vni, epoch } => {
                // What was recorded so far goes out as it was addressed: the
                // subscriber's view is the table as of now.
                self.flush_vni(vni, out);
                let Some(table) = self.tables.get_mut(&vni) else {
                    return;
                };
                if !table.start_catch_up(peer) {
                    return;
                }
                self.catch_ups_started += 1;
                self.catch_ups_active += 1;
                let key = (peer, vni);
                match self.jobs.get_mut(&key) {
                    // A sync fell behind: its job goes on as the catch-up.
                    Some(job) => {
                        job.first = true;
                        if job.scanned {
                            job.scanned = false;
                            self.job_order.push_back(key);
                        }
                    }
                    None => self.start_job(peer, vni, epoch),
                }
            }
            OwnerInput::SyncWritten { peer, tag } => {
                let key = (peer, tag.vni);
                // A report of an earlier subscription's chunk: that job
                // ended at its UNSUBSCRIBE, credit and budget went back then.
                if let Some(job) = self.jobs.get_mut(&key).filter(|j| j.epoch == tag.epoch) {
                    if let Some(ticket) = job.in_flight.pop_front() {
                        self.sync_budget.release(ticket);
                        if let Some(c) = self.credit.get_mut(&peer) {
                            c.chunks += 1;
                        }
                    }
                    if job.scanned && job.in_flight.is_empty() {
                        if let Some(job) = self.jobs.remove(&key) {
                            self.end_job(peer, job);
                        }
                    }
                }
            }
        }
    }

    /// Sends everything accumulated: one shared batch per VNI and shard with
    /// live subscribers, one personal batch per syncing subscriber.
    pub fn flush(&mut self, out: &mut Vec<(usize, ShardDelivery)>) {
        let vnis: Vec<Vni> = self.pending.keys().copied().collect();
        for vni in vnis {
            self.flush_vni(vni, out);
        }
        self.pending.clear();
    }

    /// One sync step: the next subscription with credit gets its next chunk.
    /// Returns false when no job could make progress.
    pub fn sync_step(&mut self, out: &mut Vec<(usize, ShardDelivery)>) -> bool {
        // Changes recorded so far must reach subscribers before the cursor moves.
        self.flush(out);
        let now = Instant::now();
        self.sync_budget.age(now);
        if !self.sync_budget.has_room() {
            return false;
        }
        for _ in 0..self.job_order.len() {
            let Some(key) = self.job_order.pop_front() else {
                return false;
            };
            let (peer, vni) = key;
            let Some(job) = self.jobs.get_mut(&key).filter(|j| !j.scanned) else {
                continue; // unsubscribed (or resubscribed after a scan): forget it
            };
            let Some(credit) = self.credit.get_mut(&peer).filter(|c| c.chunks > 0) else {
                self.job_order.push_back(key);
                continue;
            };
            let mut caught_up = false;
            let step = self.tables.get_mut(&vni).and_then(|t| {
                if t.is_catching_up(peer) {
                    let c = t.catch_up_chunk(peer, self.chunk_routes)?;
                    let empty = c.changes.is_empty();
                    if c.done {
                        caught_up = true;
                    }
                    Some((FanoutBuilder::changes(&c.changes), empty, c.done))
                } else {
                    let c = t.sync_chunk(peer, self.chunk_routes)?;
                    let empty = c.routes.is_empty();
                    Some((FanoutBuilder::additions(&c.routes), empty, c.done))
                }
            });
            if caught_up {
                self.catch_ups_active -= 1;
            }
            let Some((batch, empty, done)) = step else {
                if let Some(job) = self.jobs.remove(&key) {
                    self.end_job(peer, job);
                }
                continue;
            };
            if !empty || job.first {
                job.first = false;
                credit.chunks -= 1;
                job.in_flight
                    .push_back(self.sync_budget.sent(batch.frames.len(), now));
                out.push((
                    peer.shard(),
                    ShardDelivery {
                        vni,
                        recipients: Arc::from(vec![peer]),
                        batch,
                        sync: Some(SyncTag {
                            vni,
                            epoch: job.epoch,
                        }),
                    },
                ));
            }
            if done {
                job.scanned = true;
                if job.in_flight.is_empty() {
                    if let Some(job) = self.jobs.remove(&key) {
                        self.end_job(peer, job);
                    }
                }
            } else {
                self.job_order.push_back(key);
            }
            return true;
        }
        false
    }

    fn record(
        &mut self,
        vni: Vni,
        origin: PeerId,
        action: Action,
        route: Route,
        out: &mut Vec<(usize, ShardDelivery)>,
    ) {
        if self
            .tables
            .get(&vni)
            .is_none_or(|t| t.subscriber_count() == 0)
        {
            return;
        }
        if self.pending.get(&vni).is_some_and(|p| p.live_personal) {
            self.flush_vni(vni, out);
        }
        let Some(table) = self.tables.get(&vni) else {
            return;
        };
        let pending = self.pending.entry(vni).or_default();
        pending.live.push(Some(origin), action, route);
        if table.has_syncing() {
            for peer in table.syncing_past(&route) {
                if peer != origin {
                    pending
                        .personal
                        .entry(peer)
                        .or_default()
                        .push(Some(origin), action, route);
                }
            }
        }
        if pending.live.len() >= MAX_BATCH_BYTES {
            self.flush_vni(vni, out);
        }
    }

    /// The route became visible (Add) or invisible (Remove) to `peer` alone
    /// because it is, or was, the route's sole announcer: tell `peer` if it
    /// subscribes and has been sent the route's state (see
    /// `VniTable::has_seen`), in its personal batch, after the changes
    /// recorded before this one.
    fn record_for_one(
        &mut self,
        peer: PeerId,
        action: Action,
        route: Route,
        out: &mut Vec<(usize, ShardDelivery)>,
    ) {
        let Some(table) = self.tables.get(&route.vni) else {
            return;
        };
        if !table.has_seen(peer, &route) {
            return;
        }
        let live = table.subscriber(peer) == Some(Subscriber::Live);
        let pending = self.pending.entry(route.vni).or_default();
        pending.live_personal |= live;
        let personal = pending.personal.entry(peer).or_default();
        personal.push(None, action, route);
        if personal.len() >= MAX_BATCH_BYTES {
            self.flush_vni(route.vni, out);
        }
    }

    fn flush_vni(&mut self, vni: Vni, out: &mut Vec<(usize, ShardDelivery)>) {
        let Some(pending) = self.pending.get_mut(&vni) else {
            return;
        };
        let Some(table) = self.tables.get_mut(&vni) else {
            self.pending.remove(&vni);
            return;
        };
        if !pending.live.is_empty() {
            let batch = pending.live.finish();
            for (shard, recipients) in table.live_by_shard().iter() {
                out.push((
                    *shard,
                    ShardDelivery {
                        vni,
                        recipients: recipients.clone(),
                        batch: batch.clone(),
                        sync: None,
                    },
                ));
            }
        }
        pending.live_personal = false;
        for (peer, mut b) in pending.personal.drain() {
            out.push((
                peer.shard(),
                ShardDelivery {
                    vni,
                    recipients: Arc::from(vec![peer]),
                    batch: b.finish(),
                    sync: None,
                },
            ));
        }
    }

    /// Starts the sync (or catch-up) job of `peer`'s subscription `epoch`
    /// to `vni`, with its share of the peer's chunk credit.
    fn start_job(&mut self, peer: PeerId, vni: Vni, epoch: u32) {
        self.credit
            .entry(peer)
            .or_insert(SyncCredit {
                chunks: SYNC_WINDOW,
                jobs: 0,
            })
            .jobs += 1;
        self.jobs.insert(
            (peer, vni),
            SyncJob {
                epoch,
                first: true,
                scanned: false,
                in_flight: VecDeque::new(),
            },
        );
        self.job_order.push_back((peer, vni));
    }

    /// A sync job is over (scanned and written, or unsubscribed): its
    /// chunks not reported written leave the budget and give their credit
    /// back (their reports, if any come, find no job and are ignored).
    fn end_job(&mut self, peer: PeerId, job: SyncJob) {
        let returned = job.in_flight.len() as u32;
        for ticket in job.in_flight {
            self.sync_budget.release(ticket);
        }
        if let Some(c) = self.credit.get_mut(&peer) {
            c.chunks += returned;
            c.jobs -= 1;
            if c.jobs == 0 {
                self.credit.remove(&peer);
            }
        }
    }

    /// Chunks `peer` may be sent now.
    fn credit_of(&self, peer: PeerId) -> u32 {
        self.credit.get(&peer).map_or(0, |c| c.chunks)
    }

    fn drop_if_empty(&mut self, vni: Vni) {
        if self.tables.get(&vni).is_some_and(VniTable::is_empty) && !self.pending.contains_key(&vni)
        {
            self.tables.remove(&vni);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync_budget::SYNC_BYTES_IN_FLIGHT;
    use metalbond_wire::types::NextHop;

    fn vni() -> Vni {
        Vni::new(5).unwrap()
    }

    fn route(i: u32) -> Route {
        Route::new(
            vni(),
            format!("10.{}.{}.0/24", i >> 8, i & 255).parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    /// (shard, recipients, decoded changes per recipient view, sync)
    /// The sync tag of a peer's first subscription to `vni`.
    fn tag(vni: Vni) -> SyncTag {
        SyncTag { vni, epoch: 1 }
    }

    fn decode(out: &[(usize, ShardDelivery)], who: PeerId) -> Vec<(Action, Route)> {
        out.iter()
            .filter(|(_, d)| d.recipients.contains(&who))
            .flat_map(|(_, d)| d.batch.changes_for(who))
            .collect()
    }

    fn subscribe_live(o: &mut VniOwner, peer: PeerId) -> Vec<(usize, ShardDelivery)> {
        let mut out = Vec::new();
        o.apply(
            OwnerInput::Subscribe {
                peer,
                vni: vni(),
                epoch: 1,
            },
            &mut out,
        );
        while o.sync_step(&mut out) {
            o.apply(
                OwnerInput::SyncWritten {
                    peer,
                    tag: tag(vni()),
                },
                &mut out,
            );
        }
        out
    }

    #[test]
    fn sole_announcer_changes_keep_their_order_with_the_shared_fanout() {
        let mut o = VniOwner::new(100);
        let a = PeerId::new(0, 1);
        let b = PeerId::new(1, 2);
        for p in [a, b] {
            subscribe_live(&mut o, p);
        }
        let mut out = Vec::new();
        let r = route(1);
        for input in [
            OwnerInput::Announce { peer: a, route: r },
            OwnerInput::Announce { peer: b, route: r },
            OwnerInput::Withdraw { peer: b, route: r },
            OwnerInput::Announce { peer: b, route: r },
            OwnerInput::Withdraw { peer: a, route: r },
            OwnerInput::Withdraw { peer: b, route: r },
        ] {
            o.apply(input, &mut out);
        }
        o.flush(&mut out);
        // a: visible while b announces it, then removed with the route.
        assert_eq!(
            decode(&out, a),
            vec![
                (Action::Add, r),
                (Action::Remove, r),
                (Action::Add, r),
                (Action::Remove, r)
            ]
        );
        // b: saw a's route when it first came, lost sight of it while it
        // was the sole announcer after a left.
        assert_eq!(decode(&out, b), vec![(Action::Add, r), (Action::Remove, r)]);
    }

    #[test]
    fn fanout_reaches_subscribers_on_each_shard_once_but_not_origin() {
        let mut o = VniOwner::new(100);
        let a = PeerId::new(0, 1);
        let b = PeerId::new(1, 2);
        let c = PeerId::new(1, 3);
        for p in [a, b, c] {
            subscribe_live(&mut o, p);
        }
        let mut out = Vec::new();
        o.apply(
            OwnerInput::Announce {
                peer: a,
                route: route(1),
            },
            &mut out,
        );
        o.apply(
            OwnerInput::Announce {
                peer: b,
                route: route(1),
            },
            &mut out,
        );
        o.flush(&mut out);
        // One shared delivery per shard, plus a's own: b's announce makes
        // a's route visible to a (another peer announces it now).
        assert_eq!(out.len(), 3);
        assert_eq!(decode(&out, a), vec![(Action::Add, route(1))]);
        assert_eq!(decode(&out, b), vec![(Action::Add, route(1))]);
        assert_eq!(decode(&out, c), vec![(Action::Add, route(1))]);
        out.clear();
        o.apply(
            OwnerInput::Withdraw {
                peer: a,
                route: route(1),
            },
            &mut out,
        );
        o.flush(&mut out);
        // b still announces it, and only b now: b stops seeing it.
        assert_eq!(decode(&out, b), vec![(Action::Remove, route(1))]);
        assert_eq!(decode(&out, c), vec![]);
        out.clear();
        o.apply(
            OwnerInput::Withdraw {
                peer: b,
                route: route(1),
            },
            &mut out,
        );
        o.flush(&mut out);
        assert_eq!(decode(&out, a), vec![(Action::Remove, route(1))]);
        assert_eq!(decode(&out, b), vec![]);
        assert_eq!(o.route_count(), 0);
    }

    #[test]
    fn sync_is_chunked_flow_controlled_and_consistent_with_concurrent_changes() {
        let mut o = VniOwner::new(10);
        let src = PeerId::new(0, 1);
        let sub = PeerId::new(1, 2);
        let mut out = Vec::new();
        for i in 0..100 {
            o.apply(
                OwnerInput::Announce {
                    peer: src,
                    route: route(i),
                },
                &mut out,
            );
        }
        o.apply(
            OwnerInput::Subscribe {
                peer: sub,
                vni: vni(),
                epoch: 1,
            },
            &mut out,
        );
        let mut seen = Vec::new();
        // Window of 2: the third step must wait for a SyncWritten.
        assert!(o.sync_step(&mut out));
        assert!(o.sync_step(&mut out));
        assert!(!o.sync_step(&mut out));
        // Changes behind the cursor (route 3) and ahead of it (route 50).
        o.apply(
            OwnerInput::Withdraw {
                peer: src,
                route: route(3),
            },
            &mut out,
        );
        o.apply(
            OwnerInput::Withdraw {
                peer: src,
                route: route(50),
            },
            &mut out,
        );
        o.apply(
            OwnerInput::Announce {
                peer: src,
                route: route(500),
            },
            &mut out,
        );
        o.flush(&mut out);
        seen.extend(decode(&out, sub));
        out.clear();
        loop {
            o.apply(
                OwnerInput::SyncWritten {
                    peer: sub,
                    tag: tag(vni()),
                },
                &mut out,
            );
            if !o.sync_step(&mut out) {
                break;
            }
            assert!(out.iter().all(|(_, d)| d.sync == Some(tag(vni()))));
            seen.extend(decode(&out, sub));
            out.clear();
        }
        let mut state = std::collections::BTreeSet::new();
        for (a, r) in &seen {
            match a {
                Action::Add => assert!(state.insert(*r), "duplicate ADD {r}"),
                Action::Remove => assert!(state.remove(r), "REMOVE of unseen {r}"),
            }
        }
        let want: std::collections::BTreeSet<Route> = (0..100)
            .chain([500])
            .filter(|i| *i != 3 && *i != 50)
            .map(route)
            .collect();
        assert_eq!(state, want);
        // Now live: a new change arrives through the shared path.
        o.apply(
            OwnerInput::Announce {
                peer: src,
                route: route(600),
            },
            &mut out,
        );
        o.flush(&mut out);
        assert_eq!(decode(&out, sub), vec![(Action::Add, route(600))]);
    }

    #[test]
    fn unsubscribe_stops_sync_and_fanout_and_empty_table_is_dropped() {
        let mut o = VniOwner::new(10);
        let a = PeerId::new(0, 1);
        let b = PeerId::new(0, 2);
        subscribe_live(&mut o, b);
        let mut out = Vec::new();
        o.apply(
            OwnerInput::Unsubscribe {
                peer: b,
                vni: vni(),
            },
            &mut out,
        );
        o.apply(
            OwnerInput::Announce {
                peer: a,
                route: route(1),
            },
            &mut out,
        );
        o.flush(&mut out);
        assert!(out.is_empty());
        o.apply(
            OwnerInput::Withdraw {
                peer: a,
                route: route(1),
            },
            &mut out,
        );
        assert_eq!(o.tables().count(), 0);
    }

    /// Many subscribers syncing at once: the chunks encoded and not yet
    /// written stay within `SYNC_BYTES_IN_FLIGHT` (plus the one chunk that
    /// crossed it), each chunk is exactly as large as its frames, reports of
    /// written chunks make room again, and a subscriber that leaves with
    /// chunks in flight gives their bytes back.
    #[test]
    fn syncs_of_many_subscribers_share_one_byte_bound() {
        let routes = 4_000u32;
        let mut o = VniOwner::new(1024);
        let publisher = PeerId::new(0, 1);
        let mut out = Vec::new();
        for i in 0..routes {
            o.apply(
                OwnerInput::Announce {
                    peer: publisher,
                    route: route(i),
                },
                &mut out,
            );
        }
        let subscribers: Vec<PeerId> = (0..400).map(|i| PeerId::new(1, 10 + i)).collect();
        for &peer in &subscribers {
            o.apply(
                OwnerInput::Subscribe {
                    peer,
                    vni: vni(),
                    epoch: 1,
                },
                &mut out,
            );
        }
        out.clear();
        while o.sync_step(&mut out) {}
        let largest = out
            .iter()
            .map(|(_, d)| d.batch.frames.len())
            .max()
            .unwrap_or(0);
        assert!(largest > 0);
        assert!(
            o.sync_bytes_in_flight() < SYNC_BYTES_IN_FLIGHT + largest,
            "{} bytes in flight",
            o.sync_bytes_in_flight()
        );
        assert_eq!(
            o.sync_bytes_in_flight(),
            out.iter().map(|(_, d)| d.batch.frames.len()).sum::<usize>()
        );
        assert!(
            !o.has_sync_work(),
            "the bound holds the remaining jobs back"
        );
        // A full chunk carries `chunk_routes` routes.
        let (_, first) = &out[0];
        assert_eq!(first.batch.frame_count(), 1024);

        // One subscriber leaves with chunks in flight, the others report
        // theirs written: every byte is given back and the syncs go on.
        let leaving = out[0].1.recipients[0];
        o.apply(
            OwnerInput::Unsubscribe {
                peer: leaving,
                vni: vni(),
            },
            &mut Vec::new(),
        );
        for (_, d) in std::mem::take(&mut out) {
            let peer = d.recipients[0];
            if peer != leaving {
                o.apply(
                    OwnerInput::SyncWritten {
                        peer,
                        tag: tag(vni()),
                    },
                    &mut out,
                );
            }
        }
        assert_eq!(o.sync_bytes_in_flight(), 0);
        assert!(o.has_sync_work());

        // Run every sync to its end: each remaining subscriber gets every route.
        let mut received: HashMap<PeerId, usize> = HashMap::new();
        loop {
            let mut step = Vec::new();
            let progressed = o.sync_step(&mut step);
            for (_, d) in &step {
                let peer = d.recipients[0];
                *received.entry(peer).or_default() += d.batch.frame_count();
                o.apply(
                    OwnerInput::SyncWritten {
                        peer,
                        tag: tag(vni()),
                    },
                    &mut Vec::new(),
                );
            }
            if !progressed && !o.has_sync_work() {
                break;
            }
        }
        assert_eq!(o.sync_bytes_in_flight(), 0);
        assert!(o.jobs.is_empty(), "finished jobs are gone");
        assert_eq!(received.len(), subscribers.len() - 1);
    }

    #[test]
    fn a_subscriber_gets_at_most_the_window_over_all_its_subscriptions() {
        let mut o = VniOwner::new(4);
        let peer = PeerId::new(1, 7);
        let other = PeerId::new(1, 8);
        let vnis: Vec<Vni> = (10..60).map(|v| Vni::new(v).unwrap()).collect();
        let mut out = Vec::new();
        for v in &vnis {
            for i in 0..40u32 {
                let route = Route::new(
                    *v,
                    format!("10.0.{i}.0/24").parse().unwrap(),
                    NextHop::standard("2001:db8::1".parse().unwrap()),
                );
                o.apply(OwnerInput::Announce { peer: other, route }, &mut out);
            }
        }
        for v in &vnis {
            o.apply(
                OwnerInput::Subscribe {
                    peer,
                    vni: *v,
                    epoch: 1,
                },
                &mut out,
            );
        }
        out.clear();
        while o.sync_step(&mut out) {}
        let sent: Vec<SyncTag> = out.iter().filter_map(|(_, d)| d.sync).collect();
        assert_eq!(sent.len(), SYNC_WINDOW as usize, "not two per subscription");
        // A chunk written: one more may go.
        o.apply(OwnerInput::SyncWritten { peer, tag: sent[0] }, &mut out);
        out.clear();
        while o.sync_step(&mut out) {}
        assert_eq!(out.iter().filter(|(_, d)| d.sync.is_some()).count(), 1);
        // Unsubscribing a VNI whose chunk was never written gives its credit
        // back (its shard drops the chunk): the sync of the others goes on.
        let unwritten = out.iter().find_map(|(_, d)| d.sync).unwrap();
        o.apply(
            OwnerInput::Unsubscribe {
                peer,
                vni: unwritten.vni,
            },
            &mut out,
        );
        out.clear();
        while o.sync_step(&mut out) {}
        assert_eq!(out.iter().filter(|(_, d)| d.sync.is_some()).count(), 1);
        // Leaving everything forgets the subscriber's credit.
        for v in &vnis {
            o.apply(OwnerInput::Unsubscribe { peer, vni: *v }, &mut out);
        }
        assert!(o.credit.is_empty());
        assert!(o.jobs.is_empty());
    }

    #[test]
    fn a_report_for_an_earlier_subscription_leaves_the_new_sync_alone() {
        let mut o = VniOwner::new(10);
        let src = PeerId::new(0, 1);
        let peer = PeerId::new(1, 2);
        let mut out = Vec::new();
        for i in 0..100 {
            o.apply(
                OwnerInput::Announce {
                    peer: src,
                    route: route(i),
                },
                &mut out,
            );
        }
        let subscribe = |o: &mut VniOwner, epoch, out: &mut Vec<_>| {
            o.apply(
                OwnerInput::Subscribe {
                    peer,
                    vni: vni(),
                    epoch,
                },
                out,
            )
        };
        subscribe(&mut o, 1, &mut out);
        while o.sync_step(&mut out) {}
        // UNSUBSCRIBE and SUBSCRIBE again before the first chunk's report.
        o.apply(OwnerInput::Unsubscribe { peer, vni: vni() }, &mut out);
        subscribe(&mut o, 2, &mut out);
        out.clear();
        while o.sync_step(&mut out) {}
        let tags: Vec<SyncTag> = out.iter().filter_map(|(_, d)| d.sync).collect();
        assert_eq!(tags.len(), SYNC_WINDOW as usize);
        assert!(
            tags.iter().all(|t| t.epoch == 2),
            "chunks name their subscription"
        );
        let in_flight = o.sync_bytes_in_flight();
        o.apply(
            OwnerInput::SyncWritten {
                peer,
                tag: tag(vni()),
            },
            &mut out,
        );
        assert_eq!(
            o.sync_bytes_in_flight(),
            in_flight,
            "the old report is ignored"
        );
        assert_eq!(o.credit_of(peer), 0);
        o.apply(OwnerInput::SyncWritten { peer, tag: tags[0] }, &mut out);
        assert!(o.sync_bytes_in_flight() < in_flight);
        assert_eq!(o.credit_of(peer), 1);
    }

    /// A seeded model run: announcers churn a small VNI while subscribers
    /// fall behind at random moments (live, or in the middle of their first
    /// sync), with sync chunks reported written late. Every subscriber must
    /// see a consistent stream (no duplicate ADD, no REMOVE of a route it
    /// does not hold) and end with exactly the routes other peers announce;
    /// afterwards no catch-up is left and no history is kept.
    #[test]
    fn lagging_subscribers_are_caught_up_exactly_from_the_table() {
        use std::collections::{BTreeMap, BTreeSet};
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut o = VniOwner::new(1 + next(6) as usize);
            let announcers = [PeerId::new(0, 1), PeerId::new(1, 2)];
            let subs = [
                PeerId::new(0, 10),
                PeerId::new(1, 11),
                PeerId::new(1, 12),
                announcers[0],
            ];
            // Who announces what (the truth), and what each subscriber holds.
            let mut claims: BTreeMap<Route, BTreeSet<PeerId>> = BTreeMap::new();
            let mut held: BTreeMap<PeerId, BTreeSet<Route>> = BTreeMap::new();
            let mut acks: Vec<(PeerId, SyncTag)> = Vec::new();
            let mut out = Vec::new();
            let deliver = |out: &mut Vec<(usize, ShardDelivery)>,
                           held: &mut BTreeMap<PeerId, BTreeSet<Route>>,
                           acks: &mut Vec<(PeerId, SyncTag)>| {
                for (_, d) in out.drain(..) {
                    for who in d.recipients.iter() {
                        let mine = held.entry(*who).or_default();
                        for (a, r) in d.batch.changes_for(*who) {
                            match a {
                                Action::Add => {
                                    assert!(mine.insert(r), "seed {seed}: dup ADD {r} to {who:?}")
                                }
                                Action::Remove => assert!(
                                    mine.remove(&r),
                                    "seed {seed}: REMOVE of unknown {r} to {who:?}"
                                ),
                            }
                        }
                        if let Some(tag) = d.sync {
                            acks.push((*who, tag));
                        }
                    }
                }
            };
            for s in subs {
                o.apply(
                    OwnerInput::Subscribe {
                        peer: s,
                        vni: vni(),
                        epoch: 1,
                    },
                    &mut out,
                );
            }
            for step in 0..3_000u32 {
                match next(20) {
                    0..=9 => {
                        let route = route(next(40) as u32);
                        let peer = if next(4) == 0 {
                            subs[0]
                        } else {
                            announcers[next(2) as usize]
                        };
                        let claim = claims.entry(route).or_default();
                        if claim.insert(peer) {
                            o.apply(OwnerInput::Announce { peer, route }, &mut out);
                        } else {
                            claim.remove(&peer);
                            o.apply(OwnerInput::Withdraw { peer, route }, &mut out);
                        }
                    }
                    10..=11 => {
                        let peer = subs[next(subs.len() as u64) as usize];
                        o.apply(
                            OwnerInput::Lagging {
                                peer,
                                vni: vni(),
                                epoch: 1,
                            },
                            &mut out,
                        );
                    }
                    12..=15 => {
                        o.sync_step(&mut out);
                    }
                    16..=17 if !acks.is_empty() => {
                        let i = next(acks.len() as u64) as usize;
                        let (peer, tag) = acks.remove(i);
                        // Reports come in order per subscription: take the
                        // oldest one of that peer and VNI.
                        let j = acks.iter().position(|(p, _)| *p == peer).filter(|j| *j < i);
                        let (peer, tag) = match j {
                            Some(j) => {
                                let first = acks.remove(j);
                                acks.insert(j, (peer, tag));
                                first
                            }
                            None => (peer, tag),
                        };
                        o.apply(OwnerInput::SyncWritten { peer, tag }, &mut out);
                    }
                    _ => o.flush(&mut out),
                }
                if step % 7 == 0 {
                    deliver(&mut out, &mut held, &mut acks);
                }
            }
            // Quiet: let every sync and catch-up finish.
            for _ in 0..100_000 {
                o.flush(&mut out);
                let worked = o.sync_step(&mut out);
                deliver(&mut out, &mut held, &mut acks);
                let acked = !acks.is_empty();
                for (peer, tag) in std::mem::take(&mut acks) {
                    o.apply(OwnerInput::SyncWritten { peer, tag }, &mut out);
                }
                if !worked && !acked && out.is_empty() {
                    break;
                }
            }
            for s in subs {
                let want: BTreeSet<Route> = claims
                    .iter()
                    .filter(|(_, c)| c.iter().any(|p| *p != s))
                    .map(|(r, _)| *r)
                    .collect();
                assert_eq!(
                    held.get(&s).cloned().unwrap_or_default(),
                    want,
                    "seed {seed}: {s:?}"
                );
            }
            assert!(o.catch_ups_started() > 0, "seed {seed}: nobody fell behind");
            assert_eq!(o.catch_ups_active(), 0, "seed {seed}");
            let t = o.table(vni()).expect("table");
            assert_eq!(t.history_len(), 0, "seed {seed}: history kept");
            // Every id in use belongs to a route in the table.
            assert!(t.next_hops_in_use() <= 1, "seed {seed}");
            // Live again: a change reaches every subscriber in the fan-out.
            let r = route(1000);
            o.apply(
                OwnerInput::Announce {
                    peer: announcers[1],
                    route: r,
                },
                &mut out,
            );
            o.flush(&mut out);
            deliver(&mut out, &mut held, &mut acks);
            for s in subs {
                assert!(held[&s].contains(&r), "seed {seed}: {s:?} not live");
            }
        }
    }
}
