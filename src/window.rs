//! A trailing-window counter for rate limits and rolling pools.
//!
//! The window is cut into buckets of `window / 60` (at least 1 ms). A bucket
//! counts for as long as any part of it lies inside the trailing window, so
//! the count is never below the true number of units in any window of that
//! length: **a limit is never exceeded**. The price is that a unit may keep
//! counting up to one bucket (1/60 of the window) longer than an exact log
//! would hold it. Memory is at most 61 buckets, and no more buckets than
//! charges, per key and limit.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many buckets a window is cut into.
const BUCKETS: i64 = 60;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Bucket width the buckets were counted with; a changed window resets.
    width_ms: i64,
    /// `(bucket index, units)`, oldest first, no empty buckets.
    buckets: VecDeque<(i64, u64)>,
}

fn width_of(window_ms: i64) -> i64 {
    (window_ms / BUCKETS).max(1)
}

impl Window {
    /// Drops buckets that have left the window ending at `now_ms`.
    fn prune(&mut self, window_ms: i64, now_ms: i64) {
        let width = width_of(window_ms);
        if self.width_ms != width {
            self.width_ms = width;
            self.buckets.clear();
        }
        let start = now_ms.saturating_sub(window_ms);
        while let Some(&(idx, _)) = self.buckets.front() {
            if (idx + 1).saturating_mul(width) <= start {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// Units counted in the window ending at `now_ms`.
    pub fn used(&mut self, window_ms: i64, now_ms: i64) -> u64 {
        self.prune(window_ms, now_ms);
        self.buckets
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }

    /// Counts `units` at `now_ms`. Returns the bucket it went into, for a
    /// later [`Window::refund`].
    pub fn add(&mut self, units: u64, window_ms: i64, now_ms: i64) -> i64 {
        self.prune(window_ms, now_ms);
        let idx = now_ms.div_euclid(self.width_ms);
        match self.buckets.back_mut() {
            Some((last, n)) if *last == idx => *n = n.saturating_add(units),
            // A clock that stepped back lands in the newest bucket.
            Some((last, n)) if *last > idx => {
                *n = n.saturating_add(units);
                return *last;
            }
            _ => {
                if units > 0 {
                    self.buckets.push_back((idx, units));
                }
            }
        }
        idx
    }

    /// Takes back up to `units` from bucket `idx`, if it is still counted.
    pub fn refund(&mut self, units: u64, idx: i64) {
        if let Some(pos) = self.buckets.iter().position(|(i, _)| *i == idx) {
            let n = &mut self.buckets[pos].1;
            *n = n.saturating_sub(units);
            if *n == 0 {
                self.buckets.remove(pos);
            }
        }
    }

    /// Milliseconds from `now_ms` until `units` more fit under `limit`, or
    /// `None` if they never will (more than the limit itself).
    /// Call after [`Window::used`] (which prunes).
    pub fn wait_ms(&self, units: u64, limit: u64, window_ms: i64, now_ms: i64) -> Option<i64> {
        if units > limit {
            return None;
        }
        let mut used = self
            .buckets
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
        if used.saturating_add(units) <= limit {
            return Some(0);
        }
        for &(idx, n) in &self.buckets {
            used = used.saturating_sub(n);
            if used.saturating_add(units) <= limit {
                let free_at = (idx + 1)
                    .saturating_mul(self.width_ms)
                    .saturating_add(window_ms);
                return Some((free_at - now_ms).max(0));
            }
        }
        Some(0)
    }

    /// When the oldest counted unit leaves the window (for `resets_at`),
    /// in ms; `None` when nothing is counted.
    pub fn oldest_expiry_ms(&self, window_ms: i64) -> Option<i64> {
        self.buckets.front().map(|(idx, _)| {
            (idx + 1)
                .saturating_mul(self.width_ms)
                .saturating_add(window_ms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: i64 = 60_000;

    #[test]
    fn counts_within_window_and_forgets_after() {
        let mut w = Window::default();
        for t in 0..10 {
            w.add(1, MIN, t * 1000);
        }
        assert_eq!(w.used(MIN, 10_000), 10);
        assert_eq!(w.wait_ms(1, 10, MIN, 10_000), Some(51_000));
        // Exactly one window after the first unit's bucket ends, it is gone.
        assert_eq!(w.used(MIN, 61_000), 9);
        assert_eq!(w.used(MIN, 70_000), 0);
    }

    #[test]
    fn refund_takes_units_back() {
        let mut w = Window::default();
        let b = w.add(5, MIN, 0);
        w.refund(3, b);
        assert_eq!(w.used(MIN, 0), 2);
        w.refund(9, b);
        assert_eq!(w.used(MIN, 0), 0);
    }

    #[test]
    fn oversized_charges_never_fit() {
        let w = Window::default();
        assert_eq!(w.wait_ms(11, 10, MIN, 0), None);
    }

    proptest! {
        /// Admitting only what `wait_ms` allows never puts more than `limit`
        /// units in any trailing window, checked against an exact log.
        #[test]
        fn never_exceeds_limit(
            steps in proptest::collection::vec((0i64..5_000, 1u64..4), 1..200),
            limit in 1u64..20,
            window_ms in 1i64..20_000,
        ) {
            let mut w = Window::default();
            let mut log: Vec<(i64, u64)> = Vec::new();
            let mut now = 0i64;
            for (dt, units) in steps {
                now += dt;
                w.used(window_ms, now);
                if w.wait_ms(units, limit, window_ms, now) == Some(0) {
                    w.add(units, window_ms, now);
                    log.push((now, units));
                }
                let exact: u64 = log.iter().filter(|(t, _)| *t > now - window_ms).map(|(_, u)| u).sum();
                prop_assert!(exact <= limit, "exact {} > limit {}", exact, limit);
                prop_assert!(w.used(window_ms, now) >= exact);
            }
        }
    }
}
