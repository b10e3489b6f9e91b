//! One VNI's state on its owner shard: which peers announce each route, and
//! who is subscribed (still being synced, or live).
//!
//! Owns: the reflector rules of PROTOCOL.md on a single VNI: a route is in
//! the table while at least one peer announces it (ADD is fanned out when the
//! announcer set becomes non-empty, REMOVE when it becomes empty), duplicate
//! subscriptions are no-ops, and the SUBSCRIBE sync is a resumable scan in
//! key order (`sync_chunk`), so changes behind the cursor can be told from
//! changes the scan will still pick up.
//!
//! Memory: a table holds each route once, as a compact key (`TableKey`:
//! destination bytes and an interned next-hop id, 9 bytes for IPv4; the VNI
//! is the table's) mapped to its first announcer, the second it entered
//! the table and the revision its visible state last changed at
//! (`RouteEntry`, 16 bytes) in an ordered map per address family
//! (`ChunkMap`: sorted chunks that ascending inserts fill completely, ~26
//! bytes per IPv4 route); the rare further announcers of a route live in a
//! side map.
//!
//! Lagging subscribers are caught up from this table (`catch_up`): a
//! subscriber in `CatchingUp` gets no live batches; `catch_up_chunk` sends
//! it the difference between what it saw and what is here now.
//!
//! Must never: touch sockets, channels or encoding. It answers "did the table
//! change?" and "who must hear about it?"; the owner turns that into frames.
//! It never compares a `Route` with a key by any other means than turning
//! the route into its key here (the key order is the only order).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use super::catch_up::{self, CatchUp, Rev, RouteHistory, VisState, FIRST_REV};
use super::chunk_map::ChunkMap;
use super::route_set::{FastHash, NextHopId, NextHopTable, TableKey, V4Key, V6Key};
use super::PeerId;
use metalbond_utils::Since;
use metalbond_wire::digest::VniDigest;
use metalbond_wire::types::{Action, IpNet, Route, Vni};

/// What the table keeps per route: its first announcer, when the route
/// entered the table (the routes API's `since`) and the revision its
/// visible state last changed at (`catch_up::Rev`). 16 bytes, 4-aligned:
/// the announcer's id is held as two halves so that, next to the 4-byte
/// fields, the u64 adds no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouteEntry {
    /// `PeerId` bits, high half first.
    first: [u32; 2],
    /// When the route entered the table (kept while announcers change).
    since: Since,
    /// When its `VisState` last changed (a catch-up compares it with the
    /// subscriber's lag point).
    rev: Rev,
}

impl RouteEntry {
    fn new(first: PeerId, since: Since, rev: Rev) -> RouteEntry {
        let mut entry = RouteEntry {
            first: [0; 2],
            since,
            rev,
        };
        entry.set_first(first);
        entry
    }

    /// The first announcer.
    fn first(&self) -> PeerId {
        PeerId::from_bits((u64::from(self.first[0]) << 32) | u64::from(self.first[1]))
    }

    fn set_first(&mut self, peer: PeerId) {
        let bits = peer.to_bits();
        self.first = [(bits >> 32) as u32, bits as u32];
    }
}

/// What an announce or withdraw changed for the subscribers of a VNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing any subscriber must hear.
    None,
    /// The route entered or left the table: every subscriber but the
    /// origin hears it.
    Table,
    /// The route became visible (announce) or invisible (withdraw) to this
    /// one peer only: it was, or is now, the route's sole announcer.
    ForOne(PeerId),
}

/// Revisions are renumbered when the current one reaches this.
const RENUMBER_AT: Rev = 1 << 31;

/// Live subscribers grouped by shard: (shard index, its peers).
pub type LiveGroups = Arc<Vec<(usize, Arc<[PeerId]>)>>;

/// A position in a table's key order: the last key a sync scan passed.
/// Opaque outside the table (keys mean something only with its next-hop ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SyncCursor(TableKey);

/// Where a subscriber stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscriber {
    /// Being sent the table in key order. Changes to routes at or before
    /// `cursor` must be sent to it individually; routes after it will be
    /// picked up by the scan with their state at that time.
    Syncing {
        /// Last key the scan has passed (`None`: nothing scanned yet).
        cursor: Option<SyncCursor>,
    },
    /// Has the whole table; receives the shared fan-out.
    Live,
    /// Fell behind: gets no fan-out, is sent differences from the table
    /// (its `CatchUp` says what it saw) until it holds the table again.
    CatchingUp,
}

/// What a catch-up step produced.
#[derive(Debug, PartialEq, Eq)]
pub struct CatchUpChunk {
    /// Changes to send, in key order.
    pub changes: Vec<(Action, Route)>,
    /// The subscriber holds the table now and is live again.
    pub done: bool,
}

/// What a scan step produced.
#[derive(Debug, PartialEq, Eq)]
pub struct SyncChunk {
    /// Routes to send as ADD, in order.
    pub routes: Vec<Route>,
    /// The scan reached the end of the table.
    pub done: bool,
}

/// One VNI's routes and subscribers.
#[derive(Debug)]
pub struct VniTable {
    /// The VNI (keys do not carry it).
    vni: Vni,
    /// IPv4 route key → first announcer and since, ordered so a sync scan
    /// can resume.
    v4: ChunkMap<V4Key, RouteEntry>,
    /// IPv6 route key → first announcer and since (scanned after all IPv4
    /// keys).
    v6: ChunkMap<V6Key, RouteEntry>,
    /// Further announcers of the routes that have more than one, in the
    /// order they came (never empty, never holding the first announcer).
    more: HashMap<TableKey, Vec<PeerId>, FastHash>,
    /// The next hops the keys refer to.
    hops: NextHopTable,
    /// Subscribed peers and their sync state.
    subscribers: HashMap<PeerId, Subscriber>,
    /// Live subscribers grouped by shard, rebuilt lazily after a change so
    /// each fan-out sends one shared list per shard.
    live_by_shard: Option<LiveGroups>,
    /// The digest of the route set (`metalbond_wire::digest`), updated where a
    /// route enters or leaves: compared across reflectors.
    digest: VniDigest,
    /// The revision changes are stamped with now.
    rev: Rev,
    /// Somebody's view was taken at `rev`: the next change moves it on.
    rev_taken: bool,
    /// Lagging subscribers being caught up, and what each has seen.
    catch_ups: HashMap<PeerId, CatchUp>,
    /// Earlier states some catch-up still needs, per route that changed
    /// under one (empty while nobody catches up). Each key holds one
    /// reference on its next hop's id, so a removed route's key stays valid.
    history: BTreeMap<TableKey, RouteHistory>,
}

impl VniTable {
    /// An empty table for `vni`.
    pub fn new(vni: Vni) -> VniTable {
        VniTable {
            vni,
            v4: ChunkMap::default(),
            v6: ChunkMap::default(),
            more: HashMap::default(),
            hops: NextHopTable::default(),
            subscribers: HashMap::new(),
            live_by_shard: None,
            digest: VniDigest::default(),
            rev: FIRST_REV,
            rev_taken: false,
            catch_ups: HashMap::new(),
            history: BTreeMap::new(),
        }
    }

    /// The digest of the route set now (O(1)).
    pub fn digest(&self) -> VniDigest {
        self.digest
    }

    /// Number of routes (each counted once however many announce it).
    pub fn route_count(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when nothing remains (no routes, no subscribers): the owner may
    /// drop the table.
    pub fn is_empty(&self) -> bool {
        self.route_count() == 0 && self.subscribers.is_empty()
    }

    /// The key of `route` if its next hop has an id here (a route in the
    /// table, or one just withdrawn, always has one).
    fn key_of(&self, route: &Route) -> Option<TableKey> {
        debug_assert_eq!(route.vni, self.vni, "route of another VNI");
        let id = self.hops.id_of(&route.next_hop)?;
        Some(TableKey::new(&route.destination, id))
    }

    /// The entry of the route with `key`, to change its first announcer.
    fn entry_mut(&mut self, key: &TableKey) -> Option<&mut RouteEntry> {
        match key {
            TableKey::V4(k) => self.v4.get_mut(k),
            TableKey::V6(k) => self.v6.get_mut(k),
        }
    }

    /// The first announcer of the route with `key`.
    fn first(&self, key: &TableKey) -> Option<PeerId> {
        match key {
            TableKey::V4(k) => self.v4.get(k).map(RouteEntry::first),
            TableKey::V6(k) => self.v6.get(k).map(RouteEntry::first),
        }
    }

    /// The route a key stands for.
    fn route_of(&self, key: &TableKey) -> Route {
        Route {
            vni: self.vni,
            destination: key.destination(),
            next_hop: self.hops.hop(key.hop()),
        }
    }

    /// `peer` announces `route`. True if the route is new to the table (fan
    /// out ADD); false if it was already there (announced by `peer` or another).
    pub fn announce(&mut self, route: Route, peer: PeerId) -> bool {
        self.announce_change(route, peer) == Change::Table
    }

    /// `peer` announces `route`: what changed for the subscribers. A
    /// subscriber sees a route while some peer *other than itself* announces
    /// it, so a second announcer makes the route visible to the first one
    /// (`Change::ForOne`).
    pub fn announce_change(&mut self, route: Route, peer: PeerId) -> Change {
        self.announce_change_at(route, peer, Since::now())
    }

    /// `announce_change` at time `now` (the route's `since` if it is new).
    fn announce_change_at(&mut self, route: Route, peer: PeerId, now: Since) -> Change {
        // One tree descent: take the next hop's id first, give the extra
        // reference back if the route was there already.
        let id = self.hops.acquire(route.next_hop);
        let key = TableKey::new(&route.destination, id);
        let rev = self.stamp();
        let entry = RouteEntry::new(peer, now, rev);
        let existing = match key {
            TableKey::V4(k) => self.v4.insert_new(k, entry),
            TableKey::V6(k) => self.v6.insert_new(k, entry),
        };
        let existing = match existing {
            Ok(()) => {
                self.digest.add(&route);
                self.changed(key, None);
                return Change::Table;
            }
            Err(existing) => existing,
        };
        let first = existing.first();
        self.hops.release(id);
        if first == peer {
            return Change::None;
        }
        let more = self.more.entry(key).or_default();
        if more.contains(&peer) {
            return Change::None;
        }
        more.push(peer);
        // The first announcer was the sole one: it sees the route now.
        if more.len() == 1 {
            self.changed(key, Some((existing.rev, VisState::Sole(first))));
            self.restamp(&key, rev);
            Change::ForOne(first)
        } else {
            Change::None
        }
    }

    /// `peer` withdraws `route`. True if the route left the table (fan out
    /// REMOVE); false if others still announce it or `peer` never did.
    pub fn withdraw(&mut self, route: &Route, peer: PeerId) -> bool {
        self.withdraw_change(route, peer) == Change::Table
    }

    /// `peer` withdraws `route`: what changed for the subscribers. When one
    /// announcer is left, the route stops being visible to that one
    /// (`Change::ForOne`): only it announces the route now.
    pub fn withdraw_change(&mut self, route: &Route, peer: PeerId) -> Change {
        let Some(key) = self.key_of(route) else {
            return Change::None;
        };
        let Some(entry) = self.entry(&key) else {
            return Change::None;
        };
        let first = entry.first();
        if first == peer {
            let Some(more) = self.more.get_mut(&key) else {
                // The sole announcer leaves: so does the route.
                match key {
                    TableKey::V4(k) => self.v4.remove(&k),
                    TableKey::V6(k) => self.v6.remove(&k),
                };
                self.changed(key, Some((entry.rev, VisState::Sole(first))));
                let rev = self.stamp();
                if let Some(history) = self.history.get_mut(&key) {
                    // Somebody catching up saw it: it stays as a removal.
                    history.push((rev, VisState::Absent));
                }
                self.hops.release(key.hop());
                self.digest.remove(route);
                return Change::Table;
            };
            // The next announcer in line becomes the first.
            let next = more.remove(0);
            let sole = more.is_empty();
            if sole {
                self.more.remove(&key);
            }
            if let Some(e) = self.entry_mut(&key) {
                e.set_first(next);
            }
            return if sole {
                self.changed(key, Some((entry.rev, VisState::Multi)));
                let rev = self.stamp();
                self.restamp(&key, rev);
                Change::ForOne(next)
            } else {
                Change::None
            };
        }
        let Some(more) = self.more.get_mut(&key) else {
            return Change::None; // never announced by `peer`
        };
        let before = more.len();
        more.retain(|p| *p != peer);
        if more.len() == before {
            return Change::None;
        }
        if more.is_empty() {
            self.more.remove(&key);
            self.changed(key, Some((entry.rev, VisState::Multi)));
            let rev = self.stamp();
            self.restamp(&key, rev);
            Change::ForOne(first)
        } else {
            Change::None
        }
    }

    /// The entry of the route with `key`.
    fn entry(&self, key: &TableKey) -> Option<RouteEntry> {
        match key {
            TableKey::V4(k) => self.v4.get(k).copied(),
            TableKey::V6(k) => self.v6.get(k).copied(),
        }
    }

    /// Sets the revision of the route with `key`.
    fn restamp(&mut self, key: &TableKey, rev: Rev) {
        if let Some(e) = self.entry_mut(key) {
            e.rev = rev;
        }
    }

    /// The revision a change made now is stamped with: the current one,
    /// moved on first if somebody's view was taken at it.
    fn stamp(&mut self) -> Rev {
        if self.rev_taken {
            self.rev_taken = false;
            self.rev = self.rev.saturating_add(1);
        }
        self.rev
    }

    /// Takes a view at the current revision (a catch-up starts, or one of
    /// its chunks is scanned): changes after this get a later one.
    fn take_view(&mut self) -> Rev {
        if self.rev >= RENUMBER_AT {
            self.renumber();
        }
        self.rev_taken = true;
        self.rev
    }

    /// The visible state of the route with `key` changed from `old` (its
    /// stamp and state; `None`: it was not in the table). Catch-ups that
    /// have passed the key need another pass; the old state is kept if a
    /// catch-up's view of the key is at or after the old stamp (it saw it).
    fn changed(&mut self, key: TableKey, old: Option<(Rev, VisState)>) {
        if self.catch_ups.is_empty() {
            return;
        }
        for c in self.catch_ups.values_mut() {
            c.changed(&key);
        }
        let Some((stamp, state)) = old else {
            return;
        };
        if !self.catch_ups.values().any(|c| c.lag_point(&key) >= stamp) {
            return;
        }
        let hops = &mut self.hops;
        self.history
            .entry(key)
            .or_insert_with(|| {
                hops.acquire(hops.hop(key.hop()));
                Vec::new()
            })
            .push((stamp, state));
    }

    /// The visible state of the route with `key` now, and its stamp (`None`
    /// while it is not in the table).
    fn current(&self, key: &TableKey) -> Option<(Rev, VisState)> {
        let entry = self.entry(key)?;
        let state = if self.more.contains_key(key) {
            VisState::Multi
        } else {
            VisState::Sole(entry.first())
        };
        Some((entry.rev, state))
    }

    /// Drops the history of `key` that no catch-up needs any more.
    fn prune_history(&mut self, key: &TableKey) {
        let Some(history) = self.history.get_mut(key) else {
            return;
        };
        let lag_points: Vec<Rev> = self.catch_ups.values().map(|c| c.lag_point(key)).collect();
        let stamp = match key {
            TableKey::V4(k) => self.v4.get(k).map(|e| e.rev),
            TableKey::V6(k) => self.v6.get(k).map(|e| e.rev),
        };
        if !catch_up::prune(history, stamp, &lag_points) {
            self.history.remove(key);
            self.hops.release(key.hop());
        }
    }

    /// Nobody catches up any more: no history is needed.
    fn forget_history(&mut self) {
        for key in std::mem::take(&mut self.history).into_keys() {
            self.hops.release(key.hop());
        }
    }

    /// Renumbers revisions from `FIRST_REV` keeping every comparison a
    /// catch-up makes (a stamp against a lag point), so revisions never
    /// run out however long the server runs. Once per 2^31 views taken.
    fn renumber(&mut self) {
        let mut points: Vec<Rev> = self
            .catch_ups
            .values()
            .flat_map(|c| c.lag_points().collect::<Vec<_>>())
            .collect();
        points.sort_unstable();
        points.dedup();
        // A lag point p_i becomes 2i + 2; any other revision x becomes
        // 2 * #(points < x) + 1: `x > p` and `x <= p` hold as before.
        let map = |x: Rev| -> Rev {
            let below = points.partition_point(|p| *p < x) as Rev;
            if points.binary_search(&x).is_ok() {
                2 * below + 2
            } else {
                2 * below + 1
            }
        };
        self.v4.for_each_value_mut(|e| e.rev = map(e.rev));
        self.v6.for_each_value_mut(|e| e.rev = map(e.rev));
        for h in self.history.values_mut() {
            for r in h.iter_mut() {
                r.0 = map(r.0);
            }
        }
        for c in self.catch_ups.values_mut() {
            c.remap(map);
        }
        self.rev = map(self.rev).max(FIRST_REV);
        self.rev_taken = true;
    }

    /// Has `peer` been sent the current state of `route` (live, or syncing
    /// with its scan past the route)? A subscriber whose scan has not reached
    /// the route yet will see it as it is then.
    pub fn has_seen(&self, peer: PeerId, route: &Route) -> bool {
        match self.subscribers.get(&peer) {
            Some(Subscriber::Live) => true,
            Some(Subscriber::Syncing { cursor: Some(c) }) => {
                self.key_of(route).is_some_and(|k| SyncCursor(k) <= *c)
            }
            _ => false,
        }
    }

    /// Does `peer` announce `route`?
    pub fn is_announced_by(&self, route: &Route, peer: PeerId) -> bool {
        let Some(key) = self.key_of(route) else {
            return false;
        };
        self.first(&key) == Some(peer) || self.more.get(&key).is_some_and(|m| m.contains(&peer))
    }

    /// Adds a subscriber in `Syncing` state; false if already subscribed.
    pub fn subscribe(&mut self, peer: PeerId) -> bool {
        if self.subscribers.contains_key(&peer) {
            return false;
        }
        self.subscribers
            .insert(peer, Subscriber::Syncing { cursor: None });
        true
    }

    /// Removes a subscriber; false if it was not subscribed.
    pub fn unsubscribe(&mut self, peer: PeerId) -> bool {
        let was = self.subscribers.remove(&peer);
        if matches!(was, Some(Subscriber::Live)) {
            self.live_by_shard = None;
        }
        if self.catch_ups.remove(&peer).is_some() && self.catch_ups.is_empty() {
            self.forget_history();
        }
        was.is_some()
    }

    /// The subscriber's state, if subscribed.
    pub fn subscriber(&self, peer: PeerId) -> Option<Subscriber> {
        self.subscribers.get(&peer).copied()
    }

    /// Number of subscribers (syncing and live).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Entries after `cursor` (all when `None`), IPv4 then IPv6.
    fn entries_after(
        &self,
        cursor: Option<TableKey>,
    ) -> impl Iterator<Item = (TableKey, RouteEntry)> + '_ {
        self.entries(cursor.map_or(Bound::Unbounded, Bound::Excluded))
    }

    /// Entries from `from` on, IPv4 then IPv6: the one ordered scan of
    /// the table (sync chunks, snapshots, route pages and look-ups).
    fn entries(&self, from: Bound<TableKey>) -> impl Iterator<Item = (TableKey, RouteEntry)> + '_ {
        // A bound on an IPv6 key starts past every IPv4 key.
        let (v4_from, v6_from) = match from {
            Bound::Unbounded => (Some(Bound::Unbounded), Bound::Unbounded),
            Bound::Included(TableKey::V4(k)) => (Some(Bound::Included(k)), Bound::Unbounded),
            Bound::Excluded(TableKey::V4(k)) => (Some(Bound::Excluded(k)), Bound::Unbounded),
            Bound::Included(TableKey::V6(k)) => (None, Bound::Included(k)),
            Bound::Excluded(TableKey::V6(k)) => (None, Bound::Excluded(k)),
        };
        let v4 = v4_from
            .into_iter()
            .flat_map(|from| self.v4.range_from(from))
            .map(|(k, p)| (TableKey::V4(k), p));
        let v6 = self
            .v6
            .range_from(v6_from)
            .map(|(k, p)| (TableKey::V6(k), p));
        v4.chain(v6)
    }

    /// Next step of `peer`'s sync: up to `max` routes after its cursor that
    /// some other peer announces. Advances the cursor; when the scan is done
    /// the subscriber becomes `Live`. Scans at most `4 * max` entries so a
    /// VNI full of the subscriber's own routes cannot stall the shard either.
    pub fn sync_chunk(&mut self, peer: PeerId, max: usize) -> Option<SyncChunk> {
        let Some(Subscriber::Syncing { cursor }) = self.subscribers.get(&peer).copied() else {
            return None;
        };
        let mut routes = Vec::with_capacity(max.min(self.route_count()));
        let mut last = cursor;
        let mut done = true;
        for (scanned, (key, entry)) in self.entries_after(cursor.map(|c| c.0)).enumerate() {
            if routes.len() >= max || scanned >= max.saturating_mul(4) {
                done = false;
                break;
            }
            last = Some(SyncCursor(key));
            // Another peer announces it: the first one, or one of the others.
            if entry.first() != peer || self.more.contains_key(&key) {
                routes.push(self.route_of(&key));
            }
        }
        let state = if done {
            self.live_by_shard = None;
            Subscriber::Live
        } else {
            Subscriber::Syncing { cursor: last }
        };
        self.subscribers.insert(peer, state);
        Some(SyncChunk { routes, done })
    }

    /// `peer` fell behind (its output queue passed its limit): it gets no
    /// more fan-out and is caught up from the table instead. Everything
    /// recorded so far must have been flushed to it (a live subscriber has
    /// seen the table as of now; a syncing one, the keys its scan passed).
    /// False if it is not subscribed or already catching up.
    pub fn start_catch_up(&mut self, peer: PeerId) -> bool {
        let catch_up = match self.subscribers.get(&peer) {
            Some(Subscriber::Live) => {
                self.live_by_shard = None;
                CatchUp::from_live(self.take_view())
            }
            Some(Subscriber::Syncing { cursor }) => {
                let synced = cursor.map(|c| c.0);
                CatchUp::from_sync(synced, self.take_view())
            }
            Some(Subscriber::CatchingUp) | None => return false,
        };
        self.subscribers.insert(peer, Subscriber::CatchingUp);
        self.catch_ups.insert(peer, catch_up);
        true
    }

    /// Is `peer` being caught up?
    pub fn is_catching_up(&self, peer: PeerId) -> bool {
        self.catch_ups.contains_key(&peer)
    }

    /// Routes with a remembered past state (catch-up bookkeeping).
    #[cfg(test)]
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// Next-hop ids in use (the history holds references too).
    #[cfg(test)]
    pub fn next_hops_in_use(&self) -> usize {
        self.hops.live()
    }

    /// Next step of `peer`'s catch-up: up to `max` changes (a route whose
    /// visibility to `peer` differs from what it saw), scanning at most
    /// `8 * max` keys. When a clean pass ends, the subscriber is live again.
    pub fn catch_up_chunk(&mut self, peer: PeerId, max: usize) -> Option<CatchUpChunk> {
        let catch_up = self.catch_ups.get(&peer)?;
        let from = catch_up.cursor();
        let mut changes = Vec::new();
        let mut with_history = Vec::new();
        let mut last = None;
        let mut end = true;
        // The table's keys and those of removed routes still remembered,
        // merged in key order.
        let mut table = self.entries_after(from).map(|(k, _)| k).peekable();
        let after = from.map_or(Bound::Unbounded, Bound::Excluded);
        let mut gone = self
            .history
            .range((after, Bound::Unbounded))
            .map(|(k, _)| *k)
            .filter(|k| self.entry(k).is_none())
            .peekable();
        let mut scanned = 0usize;
        loop {
            let key = match (table.peek(), gone.peek()) {
                (None, None) => break,
                (Some(t), Some(g)) if g < t => gone.next(),
                (Some(_), _) => table.next(),
                (None, Some(_)) => gone.next(),
            };
            let Some(key) = key else { break };
            if changes.len() >= max || scanned >= max.saturating_mul(8) {
                end = false;
                break;
            }
            scanned += 1;
            last = Some(key);
            let current = self.current(&key);
            let history = self.history.get(&key);
            if history.is_some() {
                with_history.push(key);
            }
            let stamp = current
                .map(|c| c.0)
                .or_else(|| history.and_then(|h| h.last()).map(|r| r.0));
            let seen_at = catch_up.lag_point(&key);
            if stamp.is_none_or(|s| s <= seen_at) {
                continue;
            }
            let was = catch_up::state_at(history, current, seen_at).visible_to(peer);
            let now = current.is_some_and(|(_, s)| s.visible_to(peer));
            if was != now {
                let action = if now { Action::Add } else { Action::Remove };
                changes.push((action, self.route_of(&key)));
            }
        }
        drop(table);
        drop(gone);
        let at = self.take_view();
        let done = self
            .catch_ups
            .get_mut(&peer)
            .is_some_and(|c| c.scanned(if end { None } else { last }, at));
        for key in with_history {
            self.prune_history(&key);
        }
        if done {
            self.catch_ups.remove(&peer);
            if self.catch_ups.is_empty() {
                self.forget_history();
            }
            self.subscribers.insert(peer, Subscriber::Live);
            self.live_by_shard = None;
        }
        Some(CatchUpChunk { changes, done })
    }

    /// Subscribers still syncing whose cursor is at or past `route`: they
    /// must be sent a change to `route` individually. (Those before it will
    /// see the route's state when their scan reaches it.)
    pub fn syncing_past(&self, route: &Route) -> impl Iterator<Item = PeerId> + '_ {
        let key = self.key_of(route).map(SyncCursor);
        self.subscribers
            .iter()
            .filter_map(move |(peer, s)| match (s, key) {
                (Subscriber::Syncing { cursor: Some(c) }, Some(k)) if k <= *c => Some(*peer),
                _ => None,
            })
    }

    /// True if any subscriber is still syncing.
    pub fn has_syncing(&self) -> bool {
        self.subscribers
            .values()
            .any(|s| matches!(s, Subscriber::Syncing { .. }))
    }

    /// Live subscribers grouped by shard index (`PeerId::shard`), shared so a
    /// fan-out clones only a reference count.
    pub fn live_by_shard(&mut self) -> LiveGroups {
        if let Some(cached) = &self.live_by_shard {
            return cached.clone();
        }
        let mut groups: BTreeMap<usize, Vec<PeerId>> = BTreeMap::new();
        for (peer, s) in &self.subscribers {
            if *s == Subscriber::Live {
                groups.entry(peer.shard()).or_default().push(*peer);
            }
        }
        let built: LiveGroups = Arc::new(
            groups
                .into_iter()
                .map(|(shard, peers)| (shard, Arc::from(peers)))
                .collect(),
        );
        self.live_by_shard = Some(built.clone());
        built
    }

    /// Every route to `destination` exactly, with its announcers (first
    /// announcer first), in next-hop id order.
    pub fn announced_routes_to(&self, destination: &IpNet) -> Vec<AnnouncedRoute> {
        let from = TableKey::new(destination, NextHopId::FIRST);
        self.entries(Bound::Included(from))
            .take_while(|(k, _)| k.destination() == *destination)
            .map(|(k, entry)| self.announced(&k, entry))
            .collect()
    }

    /// The most specific destination in the table that covers `addr`
    /// (longest-prefix match), if any: one exact look-up per prefix length.
    pub fn most_specific_covering(&self, addr: IpAddr) -> Option<IpNet> {
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max).rev().find_map(|len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            let from = TableKey::new(&net, NextHopId::FIRST);
            self.entries(Bound::Included(from))
                .next()
                .filter(|(k, _)| k.destination() == net)
                .map(|_| net)
        })
    }

    /// Up to `destinations` whole destinations (every route to each) after
    /// destination `after` (from the start when `None`), in key order (IPv4
    /// before IPv6), with their announcers; and whether more follow.
    pub fn announced_page(
        &self,
        after: Option<&IpNet>,
        destinations: usize,
    ) -> (Vec<AnnouncedRoute>, bool) {
        let cursor = after.map(|d| TableKey::new(d, NextHopId::LAST));
        let mut out: Vec<AnnouncedRoute> = Vec::new();
        let mut seen = 0usize;
        for (k, entry) in self.entries_after(cursor) {
            let d = k.destination();
            if out.last().is_none_or(|r| r.route.destination != d) {
                if seen == destinations {
                    return (out, true);
                }
                seen += 1;
            }
            out.push(self.announced(&k, entry));
        }
        (out, false)
    }

    /// The route of `key`, its announcers (the first one first) and when
    /// it entered the table.
    fn announced(&self, key: &TableKey, entry: RouteEntry) -> AnnouncedRoute {
        let mut announcers = vec![entry.first()];
        if let Some(more) = self.more.get(key) {
            announcers.extend_from_slice(more);
        }
        AnnouncedRoute {
            route: self.route_of(key),
            announcers,
            since: entry.since,
        }
    }

    /// The routes after `after` (all when `None`), in key order: a snapshot
    /// copied in steps resumes where the previous step stopped. If `after`
    /// left the table and its next hop's id went to another next hop since
    /// (rare: a status page racing a change), the copy resumes after the
    /// last route to `after`'s destination, which may leave out a route to
    /// that same destination through another next hop.
    pub fn routes_after(&self, after: Option<&Route>) -> impl Iterator<Item = Route> + '_ {
        let cursor = after.map(|r| {
            self.key_of(r)
                .unwrap_or_else(|| TableKey::new(&r.destination, NextHopId::LAST))
        });
        self.entries_after(cursor).map(|(k, _)| self.route_of(&k))
    }
}

/// A route and the peers announcing it (the first announcer first): what
/// the routes API shows as `announced_by`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnouncedRoute {
    /// The route.
    pub route: Route,
    /// Its announcers, in the order they announced it.
    pub announcers: Vec<PeerId>,
    /// When it entered the table (the first announcement; kept while
    /// further announcers come and go).
    pub since: Since,
}

/// Heap bytes per route, measured per thread in unit tests (see
/// `compact_tables_cost_tens_of_bytes_per_route`).
#[cfg(test)]
mod measure {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        /// Bytes allocated and not freed by this thread.
        static THREAD_BYTES: Cell<isize> = const { Cell::new(0) };
    }

    fn bump(delta: isize) {
        // Fails only while the thread is being torn down.
        let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + delta));
    }

    /// The system allocator, counting per thread, so a test can weigh
    /// what it built while other tests run on other threads.
    pub(super) struct PerThreadCount;

    // SAFETY: every call is forwarded unchanged to `System`; the counter is
    // a const-initialised thread-local `Cell` (no allocation, no destructor).
    unsafe impl GlobalAlloc for PerThreadCount {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            bump(layout.size() as isize);
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            bump(-(layout.size() as isize));
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            bump(new_size as isize - layout.size() as isize);
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static COUNT: PerThreadCount = PerThreadCount;

    /// Bytes this thread holds now.
    pub(super) fn held() -> isize {
        THREAD_BYTES.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::{NextHop, Vni};

    fn route(i: u32) -> Route {
        let net = format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255);
        Route::new(
            Vni::new(7).unwrap(),
            net.parse().unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    fn p(shard: usize, n: u64) -> PeerId {
        PeerId::new(shard, n)
    }

    fn via(prefix: &str, hop: &str) -> Route {
        Route::new(
            Vni::new(7).unwrap(),
            prefix.parse().unwrap(),
            NextHop::standard(hop.parse().unwrap()),
        )
    }

    #[test]
    fn look_ups_find_exact_prefixes_the_longest_match_and_pages_of_destinations() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        let (wide, narrow, ecmp, v6) = (
            via("10.0.0.0/8", "2001:db8::1"),
            via("10.0.23.0/24", "2001:db8::2"),
            via("10.0.23.0/24", "2001:db8::3"),
            via("2001:db8:7::/48", "2001:db8::4"),
        );
        t.announce(v6, p(1, 9));
        t.announce(ecmp, p(0, 1));
        t.announce(narrow, p(0, 1));
        t.announce(narrow, p(1, 2));
        t.announce(wide, p(0, 1));
        let narrow_routes = t.announced_routes_to(&narrow.destination);
        assert_eq!(narrow_routes.len(), 2, "both next hops of the /24");
        let n = narrow_routes.iter().find(|r| r.route == narrow).unwrap();
        assert_eq!(n.announcers, vec![p(0, 1), p(1, 2)]);
        assert!(t
            .announced_routes_to(&"10.0.23.0/25".parse().unwrap())
            .is_empty());
        let at = |a: &str| t.most_specific_covering(a.parse().unwrap());
        assert_eq!(at("10.0.23.5"), Some(narrow.destination));
        assert_eq!(at("10.9.9.9"), Some(wide.destination));
        assert_eq!(at("11.0.0.1"), None);
        assert_eq!(at("2001:db8:7::1"), Some(v6.destination));
        // Pages of one destination: /8, then the /24 (two routes), then v6.
        let (page, more) = t.announced_page(None, 1);
        assert_eq!((page.len(), more), (1, true));
        assert_eq!(page[0].route, wide);
        let (page, more) = t.announced_page(Some(&wide.destination), 1);
        assert_eq!(
            (page.len(), more),
            (2, true),
            "a destination is never split"
        );
        let (page, more) = t.announced_page(Some(&narrow.destination), 5);
        assert_eq!((page.len(), more), (1, false));
        assert_eq!(page[0].route, v6);
    }

    #[test]
    fn the_digest_follows_the_route_set_not_the_announcers_or_the_order() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        let mut u = VniTable::new(Vni::new(7).unwrap());
        for i in 0..100 {
            t.announce(route(i), p(0, 1));
            u.announce(route(99 - i), p(1, 5));
        }
        assert_eq!(t.digest(), u.digest(), "same set, other order and peers");
        let all: Vec<Route> = (0..100).map(route).collect();
        assert_eq!(t.digest(), VniDigest::of(&all));
        t.announce(route(3), p(1, 2));
        assert_eq!(
            t.digest(),
            u.digest(),
            "a second announcer changes no route"
        );
        t.withdraw(&route(3), p(0, 1));
        assert_eq!(t.digest(), u.digest(), "one announcer is left");
        t.withdraw(&route(3), p(1, 2));
        assert_ne!(t.digest(), u.digest(), "route 3 left one table");
        assert_eq!(
            t.digest(),
            VniDigest::of(all.iter().filter(|r| **r != route(3)))
        );
        assert_eq!(t.digest().routes(), 99);
    }

    #[test]
    fn a_route_keeps_its_since_while_announcers_come_and_go() {
        let at = |secs: u64| {
            Since::from_system_time(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        };
        let since = |t: &VniTable| t.announced_routes_to(&route(1).destination)[0].since;
        let mut t = VniTable::new(route(1).vni);
        t.announce_change_at(route(1), p(0, 1), at(100));
        t.announce_change_at(route(1), p(1, 2), at(200));
        assert_eq!(since(&t), at(100), "a second announcer changes nothing");
        t.withdraw(&route(1), p(0, 1));
        assert_eq!(
            t.announced_routes_to(&route(1).destination)[0].announcers,
            [p(1, 2)]
        );
        assert_eq!(since(&t), at(100), "nor does the first one leaving");
        t.withdraw(&route(1), p(1, 2));
        t.announce_change_at(route(1), p(0, 1), at(300));
        assert_eq!(since(&t), at(300), "gone and back: a new since");
    }

    #[test]
    fn first_announcer_adds_last_withdrawer_removes() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        assert!(t.announce(route(1), p(0, 1)));
        assert!(!t.announce(route(1), p(0, 1)), "same peer again: nothing");
        assert!(!t.announce(route(1), p(1, 2)), "second announcer: not new");
        assert_eq!(t.route_count(), 1);
        assert!(!t.withdraw(&route(1), p(0, 1)), "one announcer left");
        assert!(!t.withdraw(&route(1), p(0, 3)), "never announced");
        assert!(t.withdraw(&route(1), p(1, 2)), "last one: REMOVE");
        assert_eq!(t.route_count(), 0);
        assert!(!t.withdraw(&route(1), p(1, 2)), "already gone");
        assert!(t.is_empty());
    }

    #[test]
    fn a_sole_announcer_sees_the_route_exactly_while_another_peer_announces_it() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        let (a, b, c) = (p(0, 1), p(1, 2), p(0, 3));
        assert_eq!(t.announce_change(route(1), a), Change::Table);
        assert_eq!(t.announce_change(route(1), a), Change::None);
        // b joins: a now sees the route (someone else announces it).
        assert_eq!(t.announce_change(route(1), b), Change::ForOne(a));
        // A third announcer changes nothing for anyone.
        assert_eq!(t.announce_change(route(1), c), Change::None);
        assert_eq!(t.withdraw_change(&route(1), c), Change::None);
        assert_eq!(t.withdraw_change(&route(1), c), Change::None, "not its");
        // b leaves: a is the sole announcer again and stops seeing it.
        assert_eq!(t.withdraw_change(&route(1), b), Change::ForOne(a));
        assert_eq!(t.withdraw_change(&route(1), a), Change::Table);
    }

    #[test]
    fn three_announcers_shrink_back_to_one() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        t.announce(route(1), p(0, 1));
        t.announce(route(1), p(0, 2));
        t.announce(route(1), p(0, 3));
        assert!(!t.withdraw(&route(1), p(0, 2)));
        assert!(t.is_announced_by(&route(1), p(0, 1)));
        assert!(!t.is_announced_by(&route(1), p(0, 2)));
        assert!(!t.withdraw(&route(1), p(0, 1)));
        assert!(t.withdraw(&route(1), p(0, 3)));
    }

    #[test]
    fn subscribe_twice_is_a_no_op() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        assert!(t.subscribe(p(0, 1)));
        assert!(!t.subscribe(p(0, 1)));
        assert_eq!(t.subscriber_count(), 1);
        assert!(t.unsubscribe(p(0, 1)));
        assert!(!t.unsubscribe(p(0, 1)));
    }

    #[test]
    fn sync_scans_in_chunks_skips_own_routes_then_goes_live() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        let me = p(1, 9);
        for i in 0..10 {
            t.announce(route(i), if i == 3 { me } else { p(0, 1) });
        }
        // Shared with another peer: still sent (another peer announces it).
        t.announce(route(5), me);
        t.subscribe(me);
        let mut got = Vec::new();
        let mut steps = 0;
        loop {
            let c = t.sync_chunk(me, 4).unwrap();
            steps += 1;
            got.extend(c.routes);
            if c.done {
                break;
            }
            assert!(matches!(t.subscriber(me), Some(Subscriber::Syncing { .. })));
        }
        assert!(steps >= 3);
        let want: Vec<Route> = (0..10).filter(|i| *i != 3).map(route).collect();
        assert_eq!(got, want);
        assert_eq!(t.subscriber(me), Some(Subscriber::Live));
        assert_eq!(t.sync_chunk(me, 4), None, "live: nothing to scan");
        let groups = t.live_by_shard();
        assert_eq!(groups.as_slice().len(), 1);
        assert_eq!(groups[0].0, 1);
        assert_eq!(&*groups[0].1, &[me]);
    }

    #[test]
    fn syncing_past_reports_only_subscribers_behind_the_route() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        for i in 0..10 {
            t.announce(route(i), p(0, 1));
        }
        let a = p(1, 1);
        let b = p(1, 2);
        t.subscribe(a);
        t.subscribe(b);
        t.sync_chunk(a, 5); // a's cursor at route(4)
        let behind: Vec<PeerId> = t.syncing_past(&route(2)).collect();
        assert_eq!(behind, vec![a]);
        assert_eq!(t.syncing_past(&route(7)).count(), 0);
        assert!(t.has_syncing());
        // Live subscribers are not in the per-route list.
        while !t.sync_chunk(a, 5).unwrap().done {}
        assert_eq!(t.syncing_past(&route(2)).count(), 0);
    }

    #[test]
    fn live_groups_follow_subscription_changes() {
        let mut t = VniTable::new(Vni::new(7).unwrap());
        for (s, n) in [(0, 1), (1, 2), (1, 3)] {
            t.subscribe(p(s, n));
            t.sync_chunk(p(s, n), 10);
        }
        let g = t.live_by_shard();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].1.len(), 2);
        t.unsubscribe(p(1, 2));
        let g = t.live_by_shard();
        assert_eq!(&*g[1].1, &[p(1, 3)]);
    }

    /// Applies a catch-up's changes to what `peer` holds, strictly.
    fn catch_up_fully(
        t: &mut VniTable,
        peer: PeerId,
        held: &mut std::collections::BTreeSet<Route>,
    ) {
        for _ in 0..1000 {
            let chunk = t.catch_up_chunk(peer, 3).expect("catching up");
            for (a, r) in chunk.changes {
                match a {
                    Action::Add => assert!(held.insert(r), "dup ADD {r}"),
                    Action::Remove => assert!(held.remove(&r), "REMOVE of unknown {r}"),
                }
            }
            if chunk.done {
                return;
            }
        }
        panic!("catch-up did not end");
    }

    #[test]
    fn revisions_are_renumbered_without_changing_what_a_catch_up_sends() {
        let (a, s) = (p(0, 1), p(1, 2));
        let mut t = VniTable::new(Vni::new(7).unwrap());
        for i in 0..20 {
            t.announce(route(i), a);
        }
        t.subscribe(s);
        let mut held: std::collections::BTreeSet<Route> = (0..20).map(route).collect();
        assert!(t.sync_chunk(s, 100).is_some_and(|c| c.done));
        // Fallen behind just before revisions run out.
        t.rev = RENUMBER_AT - 1;
        assert!(t.start_catch_up(s));
        for i in 0..10 {
            t.withdraw(&route(i), a);
        }
        t.announce(route(3), a); // gone and back: nothing to send for it
        t.announce(route(50), a);
        // The next view taken renumbers; the catch-up must not notice.
        let first = t.catch_up_chunk(s, 2).expect("catching up");
        assert!(t.rev < 100, "renumbered: {}", t.rev);
        for (act, r) in first.changes {
            match act {
                Action::Add => assert!(held.insert(r)),
                Action::Remove => assert!(held.remove(&r)),
            }
        }
        t.withdraw(&route(15), a);
        catch_up_fully(&mut t, s, &mut held);
        let want: std::collections::BTreeSet<Route> = t.routes_after(None).collect();
        assert_eq!(held, want);
        assert_eq!(t.subscriber(s), Some(Subscriber::Live));
        assert_eq!(t.history_len(), 0);
    }

    #[test]
    fn compact_tables_cost_tens_of_bytes_per_route() {
        use crate::route_set::RouteSet;
        const N: u32 = 200_000;
        let vni = Vni::new(7).unwrap();
        let hop = NextHop::standard("2001:db8::1".parse().unwrap());
        let routes: Vec<Route> = (0..N)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                Route::new(vni, format!("{ip}/32").parse().unwrap(), hop)
            })
            .collect();
        let before = measure::held();
        let mut table = VniTable::new(vni);
        for r in &routes {
            table.announce(*r, p(0, 1));
        }
        let table_bytes = measure::held() - before;
        let set_of = |order: &mut dyn Iterator<Item = u32>| {
            let before = measure::held();
            let mut set = RouteSet::default();
            for i in order {
                set.insert(routes[i as usize]);
            }
            (measure::held() - before, set.len())
        };
        let (set_bytes, set_len) = set_of(&mut (0..N));
        // A scattered order: a multiplicative permutation of 0..N.
        let (scattered_bytes, scattered_len) =
            set_of(&mut (0..N).map(|i| ((u64::from(i) * 40_503) % u64::from(N)) as u32));
        let per_route = |b: isize| b as f64 / f64::from(N);
        println!(
            "bytes per route at {N} IPv4 routes: owner table {:.1} (ascending), \
             peer route set {:.1} (ascending) / {:.1} (scattered)",
            per_route(table_bytes),
            per_route(set_bytes),
            per_route(scattered_bytes)
        );
        assert_eq!(
            (table.route_count(), set_len, scattered_len),
            (N as usize, N as usize, N as usize)
        );
        // Full `Route`s cost ~140 (table) and ~110 (set) bytes per route; a
        // `BTreeMap` of compact keys ~36 (half-full leaves); `ChunkMap` ~19,
        // ~23 since each route keeps its 4-byte `since`, ~27 with the 4-byte
        // revision catch-ups compare (issue #28).
        assert!(per_route(table_bytes) < 29.0, "owner table grew");
        // The set's 9-byte keys: 18 bytes a route in hash tables with the
        // VNI in the key, 9 + the tables' slack without; in sorted chunks
        // 10.7 in order, 15 scattered (chunks split in halves; issue #28).
        assert!(per_route(set_bytes) < 12.0, "route set grew");
        assert!(
            per_route(scattered_bytes) < 18.0,
            "scattered route set grew"
        );
    }
}
