//! One clock per shard for its sessions' deadlines (KEEPALIVE due, hold
//! timer, handshake timeout).
//!
//! Owns: the ordered set of `(deadline, peer)` of the shard's sessions
//! that are waiting to read, on a coarse grid (`GRID`), and which of them
//! are due. The shard's clock task (`shard::session_clock_task`) sleeps on
//! one timer until the earliest, then wakes the due sessions' readers.
//!
//! Why: a read that waits on its own timer costs glommio a timer and its
//! entries in the reactor's timer tree for as long as the session is quiet
//! (~200 bytes of every idle session, issue #28); an entry here costs a
//! few dozen. Deadlines are rounded up to the grid, so a session's
//! KEEPALIVE or timeout comes at most `GRID` late, never early, and
//! sessions due within one grid step share a wake-up.
//!
//! Must never: know sessions, sockets or peers' state; it holds ids and
//! instants only.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::local_event::LocalEvent;
use super::PeerId;

/// Deadlines are rounded up to a multiple of this since the clock's start.
pub(crate) const GRID: Duration = Duration::from_millis(10);

/// The deadlines of one shard's waiting sessions.
pub(crate) struct SessionClock {
    /// The grid's origin.
    start: Instant,
    /// Waiting sessions by deadline (on the grid).
    waiting: RefCell<BTreeSet<(Instant, PeerId)>>,
    /// The earliest deadline when the clock task last looked: a deadline
    /// registered before it notifies `earlier`, so the task re-arms.
    armed: Cell<Option<Instant>>,
    /// Notified when a deadline earlier than the armed one is registered.
    earlier: LocalEvent,
}

impl SessionClock {
    /// An empty clock starting now.
    pub(crate) fn new() -> SessionClock {
        SessionClock {
            start: Instant::now(),
            waiting: RefCell::new(BTreeSet::new()),
            armed: Cell::new(None),
            earlier: LocalEvent::default(),
        }
    }

    /// `at` rounded up to the grid.
    fn on_grid(&self, at: Instant) -> Instant {
        let since = at.saturating_duration_since(self.start);
        let grid = GRID.as_nanos();
        let steps = since.as_nanos().div_ceil(grid);
        let nanos = u64::try_from(steps * grid).unwrap_or(u64::MAX);
        self.start + Duration::from_nanos(nanos)
    }

    /// `peer` waits until `at`; `was` is what it registered before (moved,
    /// not added). Returns the registration to hand back later.
    pub(crate) fn wait_until(&self, peer: PeerId, at: Instant, was: Option<Instant>) -> Instant {
        let at = self.on_grid(at);
        if was == Some(at) {
            return at;
        }
        let mut waiting = self.waiting.borrow_mut();
        if let Some(was) = was {
            waiting.remove(&(was, peer));
        }
        waiting.insert((at, peer));
        drop(waiting);
        if self.armed.get().is_none_or(|armed| at < armed) {
            self.armed.set(Some(at));
            self.earlier.notify();
        }
        at
    }

    /// `peer` no longer waits (its session ended).
    pub(crate) fn cancel(&self, peer: PeerId, was: Option<Instant>) {
        if let Some(was) = was {
            self.waiting.borrow_mut().remove(&(was, peer));
        }
    }

    /// Takes the sessions due at `now` and says when the next one is (the
    /// clock task arms its timer for it).
    pub(crate) fn take_due(&self, now: Instant, due: &mut Vec<PeerId>) -> Option<Instant> {
        let mut waiting = self.waiting.borrow_mut();
        while let Some(&(at, peer)) = waiting.first() {
            if at > now {
                break;
            }
            waiting.pop_first();
            due.push(peer);
        }
        let next = waiting.first().map(|(at, _)| *at);
        self.armed.set(next);
        next
    }

    /// Notified when an earlier deadline than the armed one is registered.
    pub(crate) fn earlier(&self) -> &LocalEvent {
        &self.earlier
    }

    /// Sessions waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_never_early_and_at_most_one_grid_step_late() {
        let clock = SessionClock::new();
        let (a, b) = (PeerId::new(0, 1), PeerId::new(0, 2));
        let want = clock.start + Duration::from_millis(1234) + Duration::from_micros(1);
        let at = clock.wait_until(a, want, None);
        assert!(at >= want && at - want <= GRID, "{:?}", at - want);
        // Moving a deadline replaces it.
        let later = clock.wait_until(a, want + Duration::from_secs(1), Some(at));
        clock.wait_until(b, want, None);
        assert_eq!(clock.len(), 2);
        let mut due = Vec::new();
        assert_eq!(clock.take_due(want, &mut due), Some(at), "b is not due yet");
        assert!(due.is_empty());
        assert_eq!(clock.take_due(at, &mut due), Some(later));
        assert_eq!(due, vec![b]);
        clock.cancel(a, Some(later));
        assert_eq!(clock.len(), 0);
    }
}
