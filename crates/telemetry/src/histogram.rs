//! Latency histograms the data path can record into without locks, and the
//! snapshot `/metrics` renders as a Prometheus histogram.
//!
//! Owns: `LatencyHistogram` (fixed buckets of relaxed atomics: a shard's
//! `record` is a short scan and two `fetch_add`s on its own cache lines) and
//! `HistogramView` (cumulative counts at one moment).
//!
//! Must never: allocate or lock in `record`, or be read in a way that blocks
//! the writer (readers only load atomics).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds in nanoseconds: 10 µs to 10 s in 1-2.5-5 steps, wide
/// enough for a loopback fan-out and for a reflector drowning in churn.
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram shared between the thread that records (a shard) and
/// the HTTP thread that reads it. Values above the last bound land in the
/// implicit `+Inf` bucket.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts per bound, plus one overflow slot at the end.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    /// Sum of all recorded values in nanoseconds (for `_sum`).
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram::default()
    }

    /// Records one observation. Lock-free, allocation-free.
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let slot = BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS_NS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Adds this histogram's counts into `into` (summing several shards'
    /// histograms into one view).
    pub fn add_to(&self, into: &mut HistogramView) {
        let mut cumulative = 0;
        if into.bounds_seconds.is_empty() {
            *into = HistogramView::empty();
        }
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            if i < BOUNDS_NS.len() {
                into.cumulative_counts[i] += cumulative;
            }
        }
        into.count += cumulative;
        into.sum_seconds += self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
    }

    /// A copy of the counts now.
    pub fn snapshot(&self) -> HistogramView {
        let mut view = HistogramView::empty();
        self.add_to(&mut view);
        view
    }
}

/// A histogram at one moment, in Prometheus terms: cumulative counts per
/// upper bound (`le`), the total count (`le="+Inf"`) and the sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramView {
    /// Upper bounds in seconds, ascending.
    pub bounds_seconds: Vec<f64>,
    /// Observations ≤ each bound (same length as `bounds_seconds`).
    pub cumulative_counts: Vec<u64>,
    /// All observations.
    pub count: u64,
    /// Sum of all observations in seconds.
    pub sum_seconds: f64,
}

impl HistogramView {
    /// No observations, with `LatencyHistogram`'s bounds.
    pub fn empty() -> HistogramView {
        HistogramView {
            bounds_seconds: BOUNDS_NS.iter().map(|&b| b as f64 / 1e9).collect(),
            cumulative_counts: vec![0; BOUNDS_NS.len()],
            count: 0,
            sum_seconds: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_into_cumulative_buckets() {
        let h = LatencyHistogram::new();
        h.record(Duration::from_micros(5)); // ≤ 10 µs
        h.record(Duration::from_micros(30)); // ≤ 50 µs
        h.record(Duration::from_secs(60)); // +Inf only
        let v = h.snapshot();
        assert_eq!(v.count, 3);
        assert_eq!(v.cumulative_counts[0], 1);
        assert_eq!(v.cumulative_counts[1], 1);
        assert_eq!(v.cumulative_counts[2], 2);
        assert_eq!(*v.cumulative_counts.last().unwrap(), 2);
        assert!((v.sum_seconds - 60.000035).abs() < 1e-6);
    }

    #[test]
    fn shards_sum_into_one_view() {
        let a = LatencyHistogram::new();
        let b = LatencyHistogram::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(1));
        let mut v = HistogramView::default();
        a.add_to(&mut v);
        b.add_to(&mut v);
        assert_eq!(v.count, 2);
        assert_eq!(v.cumulative_counts[6], 2); // le = 1 ms
        assert_eq!(v.cumulative_counts[5], 0);
    }
}
