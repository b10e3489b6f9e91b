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

use smallvec::SmallVec;

/// A single-threaded wake-up: every `wait` created before a `notify`
/// completes. Waiters check their condition, then create the wait future
/// and await it with no await in between, so no wake-up is lost.
#[derive(Default)]
pub(crate) struct LocalEvent {
    /// Bumped by each notify.
    generation: Cell<u64>,
    /// Tasks to wake on the next notify. Nearly every event has one waiter
    /// (a peer's close latch its reader, at times its writer too; its writer
    /// wake-up only the writer), so the first is held inline: a `Vec`
    /// allocated 4 slots (64 B) at the first wait after each notify, with
    /// three events per peer about 190 B of every idle session.
    wakers: RefCell<SmallVec<[Waker; 1]>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// A waker that counts its wake-ups.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn notify_wakes_every_waiter_once_inline_and_beyond() {
        let event = LocalEvent::default();
        let counters: Vec<Arc<Counter>> = (0..3)
            .map(|_| Arc::new(Counter(AtomicUsize::new(0))))
            .collect();
        let wakers: Vec<Waker> = counters.iter().map(|c| Waker::from(c.clone())).collect();
        let mut waits: Vec<EventWait<'_>> = (0..3).map(|_| event.wait()).collect();
        for (wait, waker) in waits.iter_mut().zip(&wakers) {
            let mut cx = Context::from_waker(waker);
            assert!(Pin::new(&mut *wait).poll(&mut cx).is_pending());
            // Polled again by the same task: registered once.
            assert!(Pin::new(&mut *wait).poll(&mut cx).is_pending());
        }
        event.notify();
        for (i, c) in counters.iter().enumerate() {
            assert_eq!(c.0.load(Ordering::SeqCst), 1, "waiter {i} woken once");
        }
        for (wait, waker) in waits.iter_mut().zip(&wakers) {
            let mut cx = Context::from_waker(waker);
            assert!(Pin::new(&mut *wait).poll(&mut cx).is_ready());
        }
        // A notify with no waiters left wakes nobody again.
        event.notify();
        assert!(counters.iter().all(|c| c.0.load(Ordering::SeqCst) == 1));
    }
}
