//! Who gets a place under `--max-peers`, and who gives one up.
//!
//! Owns: `Admission` (the count of places across every shard and the queue
//! of connections that have not completed their handshake, oldest first),
//! `PeerSlot` (a connection's place, given back when dropped) and
//! `HandshakeTicket` (a connection's entry in the queue). When every place is taken,
//! the accept loop closes the oldest connection still in its handshake to
//! make room for the new one: a source that keeps `--max-peers` silent
//! connections open can then no longer lock real peers out, since each of
//! its connections is the oldest in the queue long before a real peer's
//! one-round-trip handshake is.
//!
//! Must never: touch sockets or sessions (the shard closes an evicted
//! connection), or be held across an await (the queue's lock is taken for a
//! map insert or removal, once per connection, never per frame).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::PeerId;
use metalbond_utils::LockOrRecover;

/// The connection limit and the handshake queue, shared by every shard.
pub(crate) struct Admission {
    /// `--max-peers`.
    max: usize,
    /// Connections holding a `PeerSlot`.
    live: AtomicUsize,
    /// Connections that have not completed their handshake: entry number →
    /// connection; the first entry is the oldest.
    handshaking: Mutex<BTreeMap<u64, PeerId>>,
    /// Next entry number.
    next_entry: AtomicU64,
    /// Established sessions that have ended so far (shards return freed
    /// memory to the system after departures, see `shard`; connections
    /// that never completed a handshake, such as probes, free nothing worth
    /// a collection).
    departures: AtomicU64,
}

/// What the accept loop does with a new connection.
pub(crate) enum Admit {
    /// Serve it: a place was free.
    Slot(PeerSlot),
    /// Serve it, and close `evict` (the oldest connection still in its
    /// handshake) to give its place back.
    InPlaceOf {
        /// The new connection's place.
        slot: PeerSlot,
        /// The connection to close.
        evict: PeerId,
    },
    /// Every place is held by an established session: close it at once.
    Refused,
}

impl Admission {
    /// No connection yet; at most `max` at once.
    pub(crate) fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            live: AtomicUsize::new(0),
            handshaking: Mutex::new(BTreeMap::new()),
            next_entry: AtomicU64::new(0),
            departures: AtomicU64::new(0),
        })
    }

    /// `--max-peers`.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Established sessions that have ended so far.
    pub(crate) fn departures(&self) -> u64 {
        self.departures.load(Ordering::Relaxed)
    }

    /// An established session ended.
    pub(crate) fn note_departure(&self) {
        self.departures.fetch_add(1, Ordering::Relaxed);
    }

    /// Decides about a new connection. When every place is taken, the oldest
    /// connection still in its handshake is named for eviction and the new
    /// one gets a place at once; the count then exceeds the limit by the
    /// evictions under way until their tasks end.
    pub(crate) fn admit(self: &Arc<Self>) -> Admit {
        let mut n = self.live.load(Ordering::Relaxed);
        while n < self.max {
            match self
                .live
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Admit::Slot(self.slot()),
                Err(now) => n = now,
            }
        }
        match self.lock().pop_first() {
            Some((_, evict)) => {
                self.live.fetch_add(1, Ordering::AcqRel);
                Admit::InPlaceOf {
                    slot: self.slot(),
                    evict,
                }
            }
            None => Admit::Refused,
        }
    }

    /// Puts `peer` at the end of the handshake queue. It leaves when the
    /// returned ticket is dropped (handshake completed, or connection gone),
    /// or when it is evicted.
    pub(crate) fn enter_handshake(self: &Arc<Self>, peer: PeerId) -> HandshakeTicket {
        let entry = self.next_entry.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(entry, peer);
        HandshakeTicket {
            admission: self.clone(),
            entry,
        }
    }

    fn slot(self: &Arc<Self>) -> PeerSlot {
        PeerSlot {
            admission: self.clone(),
        }
    }

    /// The queue, also after a thread panicked while holding it (it is never
    /// left half-updated: every change is one insert or removal).
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, PeerId>> {
        self.handshaking.lock_or_recover()
    }
}

/// One connection's place under `--max-peers`, given back when dropped (when
/// the peer's task ends, or with an undelivered hand-over at shutdown), so
/// the count cannot leak.
pub(crate) struct PeerSlot {
    /// Where the place is counted.
    admission: Arc<Admission>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        self.admission.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's entry in the handshake queue; leaving is dropping it.
pub(crate) struct HandshakeTicket {
    /// The queue entered.
    admission: Arc<Admission>,
    /// This entry's number.
    entry: u64,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.admission.lock().remove(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(a: &Admission) -> usize {
        a.live.load(Ordering::Relaxed)
    }

    #[test]
    fn places_are_counted_and_given_back() {
        let a = Admission::new(2);
        let s1 = a.admit();
        let _s2 = a.admit();
        assert!(
            matches!(a.admit(), Admit::Refused),
            "full, nobody handshaking"
        );
        assert_eq!(live(&a), 2);
        drop(s1);
        assert_eq!(live(&a), 1);
        assert!(matches!(a.admit(), Admit::Slot(_)));
    }

    #[test]
    fn when_full_the_oldest_handshake_makes_room_and_finished_ones_never() {
        let a = Admission::new(3);
        let p = |n| PeerId::new(0, n);
        let (s1, s2, s3) = (a.admit(), a.admit(), a.admit());
        let t1 = a.enter_handshake(p(1));
        let _t2 = a.enter_handshake(p(2));
        let _t3 = a.enter_handshake(p(3));
        drop(t1); // p(1) completed its handshake
        match a.admit() {
            Admit::InPlaceOf { evict, .. } => assert_eq!(evict, p(2)),
            _ => panic!("the oldest handshaking connection makes room"),
        }
        assert_eq!(live(&a), 3, "the new slot was dropped with the match");
        let s4 = a.admit();
        assert!(matches!(s4, Admit::InPlaceOf { evict, .. } if evict == p(3)));
        assert_eq!(live(&a), 4, "over by the eviction under way");
        assert!(
            matches!(a.admit(), Admit::Refused),
            "only p(1) left: established"
        );
        drop((s1, s2, s3, s4));
        assert_eq!(live(&a), 0);
    }
}
