//! Catching a lagging subscriber up from the owner's table, not from a
//! private backlog.
//!
//! Owns: the bookkeeping that lets one table serve every subscriber that
//! fell behind, whatever their number (issue #28): the revision a route's
//! visible state last changed at (`Rev`, stamped in the table's entry), the
//! few past states still needed by somebody (`RouteHistory`, only while a
//! catch-up runs and only for routes that changed under it), and per
//! lagging subscriber the revision its view of each key range was taken at
//! (`CatchUp`: a short list of `Segment`s, one per scan chunk at most).
//!
//! How a catch-up works. A subscriber whose output queue passed its limit
//! stops getting live batches of the VNI; its view is the table as of one
//! revision `L`. A scan in key order (the sync's, paced by the same credit)
//! sends it, per route changed after `L`, the difference between what it
//! saw (`state_at(L)`) and what is there now: ADD, REMOVE or nothing (a
//! route added and removed meanwhile costs nothing). Each chunk scanned
//! records the revision it was taken at for its key range. Changes behind
//! the cursor during a pass mark the pass dirty; another pass then picks up
//! exactly those. A clean pass ends the catch-up: the subscriber's view is
//! the table, and it is live again.
//!
//! Memory: 4 bytes per route in the table (the stamp), about 40 bytes per
//! catch-up, ~40 bytes per scan chunk of a pass, and a history record only
//! for a route whose state changed while some catch-up still needs its
//! earlier state: nothing grows with the number of slow subscribers or with
//! how far behind they are.
//!
//! Must never: know sockets, frames or owners. The table calls in here; the
//! answers are states and revisions.

use super::route_set::TableKey;
use super::PeerId;

/// A table revision. A VNI's revision moves on only when a change follows
/// a moment somebody's view was taken at (see `VniTable`'s `stamp`), so a
/// lag point `L` splits changes into "seen" (`rev <= L`) and "not seen".
pub(crate) type Rev = u32;

/// The lag point of a key range a subscriber holds nothing of (a sync that
/// fell behind before its scan reached the range). Stamps start at 1.
pub(crate) const NOTHING: Rev = 0;

/// The first revision a table stamps.
pub(crate) const FIRST_REV: Rev = 1;

/// What a subscriber can see of one route: the announcer set reduced to what
/// decides visibility (PROTOCOL.md: a peer sees a route while another peer
/// announces it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VisState {
    /// Not in the table.
    Absent,
    /// Announced by this one peer only (invisible to it, visible to others).
    Sole(PeerId),
    /// Announced by several peers: visible to every subscriber.
    Multi,
}

impl VisState {
    /// Does `peer` see the route in this state?
    pub(crate) fn visible_to(self, peer: PeerId) -> bool {
        match self {
            VisState::Absent => false,
            VisState::Sole(p) => p != peer,
            VisState::Multi => true,
        }
    }
}

/// Earlier states of one route, oldest first: `(from, state)` holds from
/// revision `from` until the next record (or the route's current stamp).
/// For a route no longer in the table the last record is its current state
/// (`Absent` since its removal). Before the first record the route was
/// absent, as it is for a route with no history before its stamp.
pub(crate) type RouteHistory = Vec<(Rev, VisState)>;

/// The state of a route at revision `at`, from its history and its current
/// `(stamp, state)` if it is in the table.
pub(crate) fn state_at(
    history: Option<&RouteHistory>,
    current: Option<(Rev, VisState)>,
    at: Rev,
) -> VisState {
    let mut state = VisState::Absent;
    for (from, s) in history.into_iter().flatten().copied().chain(current) {
        if from > at {
            break;
        }
        state = s;
    }
    state
}

/// Drops the records of `history` no lag point in `lag_points` falls into.
/// `current` is the route's stamp if it is in the table (`None`: the last
/// record is the current, absent state). Returns false when nothing is
/// left worth keeping: the caller drops the route's history (a removed
/// route with no needed past is absent for every lag point).
pub(crate) fn prune(history: &mut RouteHistory, current: Option<Rev>, lag_points: &[Rev]) -> bool {
    let past = match current {
        Some(_) => history.len(),
        None => history.len().saturating_sub(1),
    };
    let mut ends: Vec<Rev> = history.iter().skip(1).map(|r| r.0).collect();
    if let Some(stamp) = current {
        ends.push(stamp);
    }
    let mut i = 0usize;
    let mut kept_past = 0usize;
    history.retain(|(from, _)| {
        let idx = i;
        i += 1;
        if idx >= past {
            return true; // the current absent state
        }
        let until = ends[idx];
        let needed = lag_points.iter().any(|lp| *from <= *lp && *lp < until);
        kept_past += usize::from(needed);
        needed
    });
    kept_past > 0
}

/// A key range and the revision a subscriber's view of it was taken at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// Last key of the range, inclusive (`None`: the end of the table). The
    /// range starts after the previous segment's `upto`.
    upto: Option<TableKey>,
    /// The view's revision.
    rev: Rev,
}

/// One lagging subscriber's catch-up on one VNI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CatchUp {
    /// Covers the whole key space, ordered by `upto`, the last one `None`.
    segments: Vec<Segment>,
    /// The last key this pass has passed (`None`: the pass starts).
    cursor: Option<TableKey>,
    /// A key at or before `cursor` changed during this pass: another pass
    /// follows.
    dirty: bool,
}

impl CatchUp {
    /// A live subscriber fell behind: it has seen everything up to `at`.
    pub(crate) fn from_live(at: Rev) -> CatchUp {
        CatchUp {
            segments: vec![Segment {
                upto: None,
                rev: at,
            }],
            cursor: None,
            dirty: false,
        }
    }

    /// A syncing subscriber fell behind: it has seen keys up to `synced`
    /// as of `at` (changes behind its cursor were sent to it) and nothing
    /// after them.
    pub(crate) fn from_sync(synced: Option<TableKey>, at: Rev) -> CatchUp {
        let mut segments = Vec::with_capacity(2);
        if let Some(k) = synced {
            segments.push(Segment {
                upto: Some(k),
                rev: at,
            });
        }
        segments.push(Segment {
            upto: None,
            rev: NOTHING,
        });
        CatchUp {
            segments,
            cursor: None,
            dirty: false,
        }
    }

    /// The revision this subscriber's view of `key` was taken at.
    pub(crate) fn lag_point(&self, key: &TableKey) -> Rev {
        let i = self
            .segments
            .partition_point(|s| s.upto.is_some_and(|u| u < *key));
        self.segments.get(i).map_or(NOTHING, |s| s.rev)
    }

    /// The lag points of every segment (for renumbering).
    pub(crate) fn lag_points(&self) -> impl Iterator<Item = Rev> + '_ {
        self.segments.iter().map(|s| s.rev)
    }

    /// Maps every lag point through `f` (renumbering keeps the order).
    pub(crate) fn remap(&mut self, f: impl Fn(Rev) -> Rev) {
        for s in &mut self.segments {
            s.rev = f(s.rev);
        }
    }

    /// Where this pass stands.
    pub(crate) fn cursor(&self) -> Option<TableKey> {
        self.cursor
    }

    /// `key` changed: if this pass has passed it, another pass must follow.
    pub(crate) fn changed(&mut self, key: &TableKey) {
        if self.cursor.is_some_and(|c| *key <= c) {
            self.dirty = true;
        }
    }

    /// The scan passed the keys after the cursor up to `to` (inclusive;
    /// `None`: to the end) at revision `at`: the view of that range is the
    /// table as of `at`. Returns true when the catch-up is over (the end
    /// was reached on a clean pass); a dirty pass starts again from the
    /// first key.
    pub(crate) fn scanned(&mut self, to: Option<TableKey>, at: Rev) -> bool {
        let from = self.cursor;
        let mut out = Vec::with_capacity(self.segments.len() + 2);
        let mut rest = self.segments.iter().copied().peekable();
        // Whole segments before the range.
        while let Some(s) = rest.peek() {
            match (s.upto, from) {
                (Some(u), Some(f)) if u <= f => {
                    out.push(*s);
                    rest.next();
                }
                _ => break,
            }
        }
        // The part of the straddling segment before the range.
        if let (Some(f), Some(s)) = (from, rest.peek()) {
            if out.last().map(|l| l.upto) != Some(Some(f)) {
                out.push(Segment {
                    upto: Some(f),
                    rev: s.rev,
                });
            }
        }
        out.push(Segment { upto: to, rev: at });
        // Segments ending after the range keep their rest.
        if let Some(t) = to {
            out.extend(rest.filter(|s| s.upto.is_none_or(|u| u > t)));
        }
        // Neighbours with one revision are one range.
        out.dedup_by(|later, earlier| {
            if later.rev == earlier.rev {
                earlier.upto = later.upto;
                true
            } else {
                false
            }
        });
        self.segments = out;
        match to {
            Some(t) => {
                self.cursor = Some(t);
                false
            }
            None if self.dirty => {
                self.cursor = None;
                self.dirty = false;
                false
            }
            None => true,
        }
    }

    /// Segments held (for tests and the memory bound).
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route_set::NextHopId;
    use metalbond_wire::types::IpNet;

    fn key(i: u8) -> TableKey {
        let net: IpNet = format!("10.0.{i}.0/24").parse().unwrap();
        TableKey::new(&net, NextHopId::FIRST)
    }

    fn a() -> PeerId {
        PeerId::new(0, 1)
    }

    #[test]
    fn a_route_is_seen_as_it_was_at_the_lag_point() {
        let h: RouteHistory = vec![(3, VisState::Sole(a())), (7, VisState::Absent)];
        let cur = Some((9, VisState::Multi));
        assert_eq!(state_at(Some(&h), cur, 2), VisState::Absent);
        assert_eq!(state_at(Some(&h), cur, 3), VisState::Sole(a()));
        assert_eq!(state_at(Some(&h), cur, 8), VisState::Absent);
        assert_eq!(state_at(Some(&h), cur, 9), VisState::Multi);
        assert_eq!(state_at(None, cur, 8), VisState::Absent, "born at 9");
        assert!(!VisState::Sole(a()).visible_to(a()));
        assert!(VisState::Sole(a()).visible_to(PeerId::new(1, 2)));
    }

    #[test]
    fn pruning_keeps_exactly_the_records_a_lag_point_falls_into() {
        let mut h: RouteHistory = vec![(3, VisState::Sole(a())), (7, VisState::Absent)];
        assert!(prune(&mut h, Some(9), &[8]));
        assert_eq!(h, vec![(7, VisState::Absent)]);
        assert!(!prune(&mut h, Some(9), &[9, 12]), "nobody needs the past");
        // A removed route: the last record is its current state.
        let mut gone: RouteHistory = vec![(3, VisState::Multi), (7, VisState::Absent)];
        assert!(prune(&mut gone, None, &[5]));
        assert_eq!(gone.len(), 2);
        assert!(!prune(&mut gone, None, &[7]), "absent for every lag point");
    }

    #[test]
    fn a_pass_records_its_chunks_and_starts_again_when_dirty() {
        let mut c = CatchUp::from_live(5);
        assert_eq!(c.lag_point(&key(9)), 5);
        assert!(!c.scanned(Some(key(3)), 6));
        assert_eq!(c.lag_point(&key(2)), 6);
        assert_eq!(c.lag_point(&key(3)), 6);
        assert_eq!(c.lag_point(&key(4)), 5);
        c.changed(&key(9)); // ahead of the cursor: the pass will see it
        assert!(!c.dirty);
        c.changed(&key(1));
        assert!(!c.scanned(Some(key(6)), 8));
        assert_eq!(c.lag_point(&key(5)), 8);
        assert!(!c.scanned(None, 9), "dirty: a second pass");
        assert_eq!(c.cursor(), None);
        assert_eq!(c.segment_count(), 3);
        assert!(!c.scanned(Some(key(4)), 10));
        assert_eq!(c.lag_point(&key(4)), 10);
        assert_eq!(c.lag_point(&key(5)), 8);
        assert!(c.scanned(None, 10), "a clean pass ends it");
        assert_eq!(c.segment_count(), 1, "{c:?}");
    }

    #[test]
    fn a_sync_that_fell_behind_holds_nothing_past_its_cursor() {
        let c = CatchUp::from_sync(Some(key(4)), 12);
        assert_eq!(c.lag_point(&key(4)), 12);
        assert_eq!(c.lag_point(&key(5)), NOTHING);
        let c = CatchUp::from_sync(None, 12);
        assert_eq!(c.lag_point(&key(0)), NOTHING);
    }
}
