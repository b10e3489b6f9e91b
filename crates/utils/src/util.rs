//! Small std-only helpers several modules need and none owns: locking that
//! survives a panicked holder, and a value recomputed at most once per
//! maximum age.
//!
//! Owns: `LockOrRecover` and `TtlCache`.
//!
//! Must never: import anything of the workspace (every crate above may use
//! it) or hold a lock longer than the caller's closure.

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Lock, and if a thread panicked while holding the lock, take the data as
/// it was left. Every lock in this workspace guards data that stays
/// consistent between statements (counters, maps, slots), so a panic
/// elsewhere must not turn into a second panic here (the status pages and
/// the client's API would otherwise die with the first failure).
pub trait LockOrRecover<T: ?Sized> {
    /// The guard, poisoned or not.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockOrRecover<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `LockOrRecover` for readers-writer locks.
pub trait RwLockOrRecover<T: ?Sized> {
    /// A read guard, poisoned or not.
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, poisoned or not.
    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockOrRecover<T> for RwLock<T> {
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T> {
        self.write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `Condvar::wait` that, like `LockOrRecover`, takes the guard back even
/// when the lock was poisoned meanwhile.
pub fn wait_or_recover<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Condvar::wait_timeout` with the same recovery; true if it timed out.
pub fn wait_timeout_or_recover<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    let (guard, result) = cv
        .wait_timeout(guard, timeout)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    (guard, result.timed_out())
}

/// A value computed on demand and reused until it is `max_age` old: bounds
/// how often many readers (browsers, scrapers) together make the owner of
/// the data copy it. Thread-safe; the first reader after expiry recomputes
/// while the others wait for it (one copy, not one per reader).
#[derive(Debug)]
pub struct TtlCache<T> {
    /// How long a value is reused.
    max_age: Duration,
    /// When the value was computed, and the value.
    slot: Mutex<Option<(Instant, T)>>,
}

impl<T: Clone> TtlCache<T> {
    /// An empty cache whose values live `max_age`.
    pub fn new(max_age: Duration) -> TtlCache<T> {
        TtlCache {
            max_age,
            slot: Mutex::new(None),
        }
    }

    /// The cached value if younger than `max_age`, else `compute()`'s
    /// (stored for the next readers).
    pub fn get_or_compute(&self, compute: impl FnOnce() -> T) -> T {
        let mut slot = self.slot.lock_or_recover();
        if let Some((at, value)) = slot.as_ref() {
            if at.elapsed() < self.max_age {
                return value.clone();
            }
        }
        let value = compute();
        *slot = Some((Instant::now(), value.clone()));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_still_yields_its_data() {
        let m = Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*m.lock_or_recover(), 7);
    }

    #[test]
    fn the_cache_reuses_then_recomputes() {
        let cache = TtlCache::new(Duration::from_millis(50));
        assert_eq!(cache.get_or_compute(|| 1), 1);
        assert_eq!(cache.get_or_compute(|| 2), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get_or_compute(|| 3), 3);
    }
}
