//! A peer's update rate (`--max-updates-per-second`, a policy rule's
//! `limits.max_updates_per_second` / `burst`): a token bucket the read
//! loop draws one token from per UPDATE. Without a token the read loop
//! waits before handling the UPDATE (and reads nothing meanwhile), so a
//! peer over its rate is slowed by TCP back-pressure: nothing it sent is
//! dropped, its subscribers get every change, later. Each UPDATE handled
//! proves the peer alive (any frame refreshes the hold timer), so the
//! session of a slowed peer stays up.
//!
//! Owns: the bucket and the counts of what it admitted and how long it
//! made the peer wait, flushed to the rule's counters (or the shard's,
//! without a policy) at every wait and after every read, so the shared
//! counters are not touched per UPDATE.
//!
//! Must never: drop or reorder a message, or sleep itself (it says how
//! long; the read loop waits, also watching the connection close).

use std::sync::Arc;
use std::time::{Duration, Instant};

use metalbond_policy::{RuleCounters, UpdateRate};

/// Shortest wait for tokens: a few of them per timer wake-up (2 at
/// 1,000/s), short against any rate.
const MIN_WAIT: Duration = Duration::from_millis(2);

/// One peer's bucket.
pub(crate) struct UpdateBudget {
    /// The rate it enforces.
    rate: UpdateRate,
    /// Tokens left (fractions accrue between UPDATEs).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
    /// The rule's counters; `None`: the shard's (no policy).
    counters: Option<Arc<RuleCounters>>,
    /// Admitted and not yet flushed.
    admitted: u64,
    /// Waited and not yet flushed.
    waited: Duration,
}

impl UpdateBudget {
    /// A full bucket for `rate`.
    pub(crate) fn new(
        rate: UpdateRate,
        counters: Option<Arc<RuleCounters>>,
        now: Instant,
    ) -> UpdateBudget {
        UpdateBudget {
            rate,
            tokens: f64::from(rate.burst),
            refilled: now,
            counters,
            admitted: 0,
            waited: Duration::ZERO,
        }
    }

    /// The rate it enforces.
    pub(crate) fn rate(&self) -> UpdateRate {
        self.rate
    }

    /// Takes a token for one UPDATE: `Ok` when there is one, else how long
    /// until there is (the caller waits, then asks again).
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.rate.per_second))
            .min(f64::from(self.rate.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.admitted += 1;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        let until_one = Duration::from_secs_f64(missing / f64::from(self.rate.per_second));
        // Tokens come in batches of MIN_WAIT's worth: one timer wake-up
        // per token would cost the shard 1,000 wake-ups a second per slowed
        // peer at 1,000/s. At most the time to refill the whole burst (a
        // bucket of one at 1,000/s would otherwise be held to 500/s).
        let refill =
            Duration::from_secs_f64(f64::from(self.rate.burst) / f64::from(self.rate.per_second));
        Err(until_one.max(MIN_WAIT.min(refill)))
    }

    /// The peer waited `d` for a token.
    pub(crate) fn waited(&mut self, d: Duration) {
        self.waited += d;
    }

    /// Hands the counts over: to the rule's counters, or (`None` kept) back
    /// to the caller for the shard's.
    pub(crate) fn flush(&mut self) -> Option<(u64, Duration)> {
        if self.admitted == 0 && self.waited.is_zero() {
            return None;
        }
        let taken = (
            std::mem::take(&mut self.admitted),
            std::mem::take(&mut self.waited),
        );
        match &self.counters {
            Some(c) => {
                c.rate_limited(taken.0, taken.1);
                None
            }
            None => Some(taken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_a_refill() {
        let t0 = Instant::now();
        let rate = UpdateRate {
            per_second: 1000,
            burst: 3,
        };
        let counters = Arc::new(RuleCounters::default());
        let mut b = UpdateBudget::new(rate, Some(counters.clone()), t0);
        assert!(b.take(t0).is_ok() && b.take(t0).is_ok() && b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert_eq!(
            wait, MIN_WAIT,
            "at least MIN_WAIT, not the 1 ms to one token"
        );
        assert!(
            b.take(t0 + Duration::from_millis(1)).is_ok(),
            "one token a millisecond"
        );
        assert!(b.take(t0 + Duration::from_millis(1)).is_err());
        // A bucket of one refills in less than MIN_WAIT: waits that long.
        let mut one = UpdateBudget::new(
            UpdateRate {
                per_second: 1000,
                burst: 1,
            },
            None,
            t0,
        );
        one.take(t0).unwrap();
        assert_eq!(one.take(t0).unwrap_err(), Duration::from_millis(1));
        // A long pause refills the burst, not more.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
        b.waited(Duration::from_millis(5));
        assert_eq!(b.flush(), None, "counted on the rule");
        assert_eq!(counters.admitted_count(), 7);
        assert!((counters.throttled_seconds() - 0.005).abs() < 1e-9);
        let mut shard_counted = UpdateBudget::new(rate, None, t0);
        shard_counted.take(t0).unwrap();
        assert_eq!(shard_counted.flush(), Some((1, Duration::ZERO)));
    }
}
