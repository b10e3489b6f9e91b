//! `LocalEvent`: a single-threaded wake-up for the tasks of one shard.
//!
//! Owns: the notify/wait pair the shard's tasks use to wake each other
//! (writer wake-ups, close, outbox drained, shutdown, sync work).
//!
//! Must never: be shared across threads (it is `!Sync` by design: a shard's
//! tasks all run on its one thread), or depend on any other server module.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A single-threaded wake-up: every `wait` created before a `notify`
/// completes. Waiters check their condition, then create the wait future
/// and await it with no await in between, so no wake-up is lost.
#[derive(Default)]
pub(crate) struct LocalEvent {
    /// Bumped by each notify.
    generation: Cell<u64>,
    /// Tasks to wake on the next notify.
    wakers: RefCell<Vec<Waker>>,
}

impl LocalEvent {
    /// Wakes every current waiter.
    pub(crate) fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers {
            w.wake();
        }
    }

    /// Completes at the next `notify` after this call.
    pub(crate) fn wait(&self) -> EventWait<'_> {
        EventWait {
            event: self,
            generation: self.generation.get(),
        }
    }
}

/// Future returned by `LocalEvent::wait`.
pub(crate) struct EventWait<'a> {
    /// The event waited for.
    event: &'a LocalEvent,
    /// Its generation when the wait began: any other value means notified.
    generation: u64,
}

impl Future for EventWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.event.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut wakers = self.event.wakers.borrow_mut();
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}
