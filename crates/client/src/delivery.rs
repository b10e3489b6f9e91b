//! The one delivery thread: hands present-set changes to the sink, in order.
//!
//! Owns: the queue of changes between the client's core and the sink
//! (`DeliveryQueue`), the thread that drains it (`spawn`), the sink itself
//! (moved into that thread and dropped there when the client shuts down),
//! and the per-VNI map of what the sink has been told (`DeliveredRoutes`),
//! which `Client::routes` reads without taking the client's lock.
//!
//! Must never: call the sink while any client lock is held, call it from a
//! caller's thread, or make a caller wait. Changes are pushed under the
//! core lock (so their order is the order of the present set's changes) and
//! that push never blocks; only server threads wait, outside every lock,
//! while more than `HIGH_WATER` changes are queued.
//!
//! ```text
//!  Core (under its lock) ──push (never blocks)──> DeliveryQueue ──> delivery thread
//!  server thread, after unlocking ──wait_room (≤ HIGH_WATER)──┘      │ DeliveredRoutes
//!                                                                   v   then sink call
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::present::PresentChange;
use super::RouteSink;
use metalbond_utils::{wait_or_recover, wait_timeout_or_recover, LockOrRecover};
use metalbond_wire::types::{Route, Vni};

/// Queued changes above which server threads stop reading their sockets
/// until the sink catches up (a slow sink then slows the servers' TCP
/// windows instead of growing memory). Caller-initiated changes
/// (`unsubscribe`, an `announce` that shadows received routes,
/// `remove_server`) are queued regardless and never wait.
pub(super) const HIGH_WATER: usize = 65_536;

/// Most changes the delivery thread takes off the queue in one go.
const BATCH: usize = 1024;

/// How often a waiting server thread looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// One item for the delivery thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Delivery {
    /// A change of the present set.
    Change(PresentChange),
    /// `Client::resend`: tell the sink every delivered route of this VNI
    /// again (as adds), at this point of the order.
    Replay(Vni),
}

/// What the sink has been told, per VNI: the routes added and not removed
/// since. Updated by the delivery thread just before each sink call, read by
/// anyone (`Client::routes`) without the client's lock.
pub(super) type DeliveredRoutes = DashMap<Vni, BTreeSet<Route>>;

/// The queue behind its own small lock.
#[derive(Default)]
struct QueueState {
    /// Items not yet taken by the delivery thread, in order.
    items: VecDeque<Delivery>,
    /// Items ever pushed (the sequence number of the last one).
    pushed: u64,
    /// No more items will be pushed: the delivery thread drains what is
    /// left, drops the sink and ends.
    closed: bool,
}

/// The queue between the core and the delivery thread, with what waiters
/// need to know about its progress.
#[derive(Default)]
pub(super) struct DeliveryQueue {
    /// The items.
    state: Mutex<QueueState>,
    /// Wakes the delivery thread (items or close).
    ready: Condvar,
    /// Wakes server threads waiting for room, and `wait_finished`.
    room: Condvar,
    /// Items the sink has finished with (sequence number of the last one).
    delivered: AtomicU64,
    /// The delivery thread ended and dropped the sink.
    finished: AtomicBool,
    /// The delivery thread's id, so calls from inside the sink can tell
    /// (a wait for delivery from there would wait for itself).
    thread: std::sync::OnceLock<ThreadId>,
    /// What the sink has been told, per VNI.
    pub(super) routes: DeliveredRoutes,
}

impl DeliveryQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock_or_recover()
    }

    /// Queues `changes` (emptying the vector). Never blocks beyond the
    /// queue's own short lock. Returns the sequence number of the last item
    /// queued so far.
    pub(super) fn push_changes(&self, changes: &mut Vec<PresentChange>) -> u64 {
        let mut state = self.lock();
        if !state.closed && !changes.is_empty() {
            state.pushed += changes.len() as u64;
            state.items.extend(changes.drain(..).map(Delivery::Change));
            self.ready.notify_one();
        }
        changes.clear();
        state.pushed
    }

    /// Queues one item (a replay).
    pub(super) fn push(&self, item: Delivery) {
        let mut state = self.lock();
        if !state.closed {
            state.pushed += 1;
            state.items.push_back(item);
            self.ready.notify_one();
        }
    }

    /// Sequence number of the last item queued.
    pub(super) fn pushed(&self) -> u64 {
        self.lock().pushed
    }

    /// Sequence number of the last item the sink has finished with.
    pub(super) fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }

    /// No more items: the delivery thread drains the rest and ends.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }

    /// Has the delivery thread ended (and dropped the sink)?
    pub(super) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Is the caller the delivery thread (i.e. inside the sink)?
    pub(super) fn on_delivery_thread(&self) -> bool {
        self.thread.get() == Some(&std::thread::current().id())
    }

    /// Back-pressure for server threads: waits (outside every client lock)
    /// while more than `HIGH_WATER` items are queued, until there is room,
    /// the queue is closed or `stop` is set.
    pub(super) fn wait_room(&self, stop: &AtomicBool) {
        if self.on_delivery_thread() {
            return;
        }
        let mut state = self.lock();
        while state.items.len() > HIGH_WATER
            && !state.closed
            && !self.is_finished()
            && !stop.load(Ordering::SeqCst)
        {
            state = wait_timeout_or_recover(&self.room, state, STOP_POLL).0;
        }
    }

    /// Waits until the delivery thread has ended, at most until `deadline`.
    pub(super) fn wait_finished(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while !self.is_finished() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = wait_timeout_or_recover(&self.room, state, (deadline - now).min(STOP_POLL)).0;
        }
        true
    }
}

/// Starts the delivery thread, which owns `sink` from now on. `progress`
/// is called after every batch (the client wakes its waiters there).
pub(super) fn spawn(
    queue: Arc<DeliveryQueue>,
    mut sink: Box<dyn RouteSink>,
    progress: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let q = queue.clone();
    let spawned = std::thread::Builder::new()
        .name("mb-deliver".into())
        .spawn(move || {
            let _ = q.thread.set(std::thread::current().id());
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run(&q, &mut *sink, &*progress);
            }));
            if outcome.is_err() {
                tracing::error!("the route sink panicked; no further changes are delivered");
            }
            // The sink goes first, so `finished` means it has been dropped.
            drop(sink);
            {
                let mut state = q.lock();
                state.closed = true;
                state.items.clear();
            }
            q.finished.store(true, Ordering::SeqCst);
            q.room.notify_all();
            progress();
        });
    spawned.map(|_| ())
}

fn run(queue: &DeliveryQueue, sink: &mut dyn RouteSink, progress: &dyn Fn()) {
    let mut batch: Vec<Delivery> = Vec::with_capacity(BATCH);
    loop {
        {
            let mut state = queue.lock();
            while state.items.is_empty() && !state.closed {
                state = wait_or_recover(&queue.ready, state);
            }
            if state.items.is_empty() {
                return;
            }
            let n = state.items.len().min(BATCH);
            batch.extend(state.items.drain(..n));
            if state.items.len() <= HIGH_WATER {
                queue.room.notify_all();
            }
        }
        let n = batch.len() as u64;
        for item in batch.drain(..) {
            deliver(&queue.routes, sink, item);
        }
        queue.delivered.fetch_add(n, Ordering::SeqCst);
        progress();
    }
}

/// Records one item in `routes`, then tells the sink (so a sink that looks
/// at `Client::routes` sees the change it is being told about).
fn deliver(routes: &DeliveredRoutes, sink: &mut dyn RouteSink, item: Delivery) {
    match item {
        Delivery::Change(PresentChange::Add(r)) => {
            routes.entry(r.vni).or_default().insert(r);
            sink.add_route(r.vni, r.destination, r.next_hop);
        }
        Delivery::Change(PresentChange::Remove(r)) => {
            let emptied = routes.get_mut(&r.vni).is_some_and(|mut set| {
                set.remove(&r);
                set.is_empty()
            });
            if emptied {
                routes.remove_if(&r.vni, |_, set| set.is_empty());
            }
            sink.remove_route(r.vni, r.destination, r.next_hop);
        }
        Delivery::Replay(vni) => {
            let present: Vec<Route> = routes
                .get(&vni)
                .map(|set| set.iter().copied().collect())
                .unwrap_or_default();
            tracing::debug!(%vni, routes = present.len(), "replaying present routes to the sink");
            for r in present {
                sink.add_route(r.vni, r.destination, r.next_hop);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalbond_wire::types::NextHop;

    fn route(i: u32) -> Route {
        Route::new(
            Vni::new(23).unwrap(),
            metalbond_wire::types::IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 32)
                .unwrap(),
            NextHop::standard("2001:db8::1".parse().unwrap()),
        )
    }

    /// Blocks in its first call until released; then counts, checking order.
    struct Gate {
        release: crossbeam_channel::Receiver<()>,
        next: u32,
        ok: Arc<AtomicBool>,
    }

    impl RouteSink for Gate {
        fn add_route(
            &mut self,
            vni: Vni,
            destination: metalbond_wire::types::IpNet,
            next_hop: NextHop,
        ) {
            if self.next == 0 {
                let _ = self.release.recv_timeout(Duration::from_secs(10));
            }
            if Route::new(vni, destination, next_hop) != route(self.next) {
                self.ok.store(false, Ordering::SeqCst);
            }
            self.next += 1;
        }
        fn remove_route(&mut self, _: Vni, _: metalbond_wire::types::IpNet, _: NextHop) {}
    }

    #[test]
    fn server_threads_wait_above_the_high_water_mark_in_order_and_stop_ends_the_wait() {
        let queue = Arc::new(DeliveryQueue::default());
        let (release_tx, release) = crossbeam_channel::bounded(1);
        let ok = Arc::new(AtomicBool::new(true));
        let sink = Gate {
            release,
            next: 0,
            ok: ok.clone(),
        };
        spawn(queue.clone(), Box::new(sink), Arc::new(|| {})).unwrap();
        let total = (HIGH_WATER + 2 * BATCH) as u32;
        let mut changes: Vec<PresentChange> =
            (0..total).map(|i| PresentChange::Add(route(i))).collect();
        // Pushing never blocks, whatever the queue holds.
        let pushed = queue.push_changes(&mut changes);
        assert_eq!(pushed, u64::from(total));
        // The sink is stuck: a server thread would wait; its stop ends that.
        let stop = AtomicBool::new(false);
        let waiter = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let stop = AtomicBool::new(false);
                queue.wait_room(&stop);
                Instant::now()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !waiter.is_finished(),
            "waited although the queue is above the mark"
        );
        stop.store(true, Ordering::SeqCst);
        let started = Instant::now();
        queue.wait_room(&stop);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "stop ends the wait"
        );
        // Released, the sink drains the queue in order and the waiter goes on.
        let released = Instant::now();
        release_tx.send(()).unwrap();
        let went_on = waiter.join().unwrap();
        // It went on only after the release (measured from one clock: the
        // waiter's own start came after this thread's 200 ms had begun, so
        // its elapsed time could be just under 200 ms).
        assert!(went_on >= released, "the waiter went on before the release");
        let deadline = Instant::now() + Duration::from_secs(10);
        while queue.delivered() < pushed {
            assert!(Instant::now() < deadline, "not delivered");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ok.load(Ordering::SeqCst), "out of order");
        assert_eq!(
            queue.routes.get(&Vni::new(23).unwrap()).unwrap().len(),
            total as usize
        );
        queue.close();
        assert!(queue.wait_finished(Instant::now() + Duration::from_secs(10)));
    }
}
