//! `Since`: when something appeared (a route entered a table, a next hop was
//! first received), in whole seconds of the wall clock, 4 bytes so a table of
//! a million routes can afford one per route.
//!
//! Owns: the representation (seconds since the UNIX epoch as `u32`, good
//! until 2106) and the clock it is read from (`CLOCK_REALTIME_COARSE`: a
//! few nanoseconds, no time-stamp counter read, tick-grained, which is far
//! finer than the second kept).
//!
//! Must never: be used to measure a duration (the wall clock jumps; use
//! `Instant`), or be rendered here (the status side formats it).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall-clock time in whole seconds since the UNIX epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Since(u32);

impl Since {
    /// Now, from the coarse real-time clock.
    pub fn now() -> Since {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        if rc == 0 {
            Since(u32::try_from(ts.tv_sec.max(0)).unwrap_or(u32::MAX))
        } else {
            Since::from_system_time(SystemTime::now())
        }
    }

    /// `t` truncated to the second (before 1970: the epoch; after 2106: the
    /// last second representable).
    pub fn from_system_time(t: SystemTime) -> Since {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Since(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// The time as a `SystemTime`, for rendering.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::from(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_the_wall_clock_to_the_second() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let since = Since::now().to_system_time();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let s = since.duration_since(UNIX_EPOCH).unwrap().as_secs();
        // The coarse clock may lag the fine one by a tick (a few ms).
        assert!(s + 1 >= before && s <= after, "{before} <= {s} <= {after}");
        assert_eq!(std::mem::size_of::<Since>(), 4);
    }

    #[test]
    fn out_of_range_times_are_clamped_not_wrapped() {
        let early = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(Since::from_system_time(early), Since(0));
        let late = UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) + 10);
        assert_eq!(Since::from_system_time(late), Since(u32::MAX));
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(Since::from_system_time(t).to_system_time(), t);
    }
}
