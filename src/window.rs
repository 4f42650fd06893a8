//! A trailing-window counter for rate limits and rolling pools.
//!
//! The window is cut into buckets of `window / 60` (at least 1 ms); each
//! bucket remembers when its newest unit came and counts all of its units
//! until one window after that. So the count is never below the true number
//! of units in any window of that length (**a limit is never exceeded**),
//! and a wait computed from it is never longer than the window: a client
//! told to retry after `n` seconds gets in then. The price is that a unit may
//! keep counting up to one bucket (1/60 of the window) longer than an exact
//! log would hold it. Memory is at most 61 buckets, and no more buckets than
//! charges, per key and limit.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many buckets a window is cut into.
const BUCKETS: i64 = 60;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Bucket width the buckets were counted with; a changed window resets.
    width_ms: i64,
    /// `(newest unit's time in ms, units)`, oldest first, no empty buckets;
    /// a bucket is the time divided by the width. Written before 2026-12
    /// as `(bucket index, units)`: see [`Window::upgrade`].
    buckets: VecDeque<(i64, u64)>,
    /// 1 once `buckets` holds times; absent (0) in older records.
    #[serde(default)]
    v: u8,
}

fn width_of(window_ms: i64) -> i64 {
    (window_ms / BUCKETS).max(1)
}

impl Window {
    /// Reads a window written as `(bucket index, units)` as if each bucket's
    /// newest unit came at the bucket's last millisecond: as long as it was
    /// held before, never shorter.
    fn upgrade(&mut self) {
        if self.v == 0 {
            let width = self.width_ms.max(1);
            for (at, _) in &mut self.buckets {
                *at = at.saturating_add(1).saturating_mul(width).saturating_sub(1);
            }
            self.v = 1;
        }
    }

    /// Drops buckets that have left the window ending at `now_ms`.
    fn prune(&mut self, window_ms: i64, now_ms: i64) {
        self.upgrade();
        let width = width_of(window_ms);
        if self.width_ms != width {
            self.width_ms = width;
            self.buckets.clear();
        }
        // A clock stepped back: units counted "in the future" count as if
        // they came now, so they leave one window from here, not one window
        // plus the step (a step back never locks a key out for longer).
        for (at, _) in self.buckets.iter_mut().rev() {
            if *at <= now_ms {
                break;
            }
            *at = now_ms;
        }
        while let Some(&(at, _)) = self.buckets.front() {
            if at.saturating_add(window_ms) <= now_ms {
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
        let width = self.width_ms;
        let idx = now_ms.div_euclid(width);
        match self.buckets.back_mut() {
            Some((at, n)) if at.div_euclid(width) == idx => {
                *n = n.saturating_add(units);
                *at = (*at).max(now_ms);
            }
            // A clock that stepped back lands in the newest bucket.
            Some((at, n)) if *at > now_ms => {
                *n = n.saturating_add(units);
                return at.div_euclid(width);
            }
            _ => {
                if units > 0 {
                    self.buckets.push_back((now_ms, units));
                }
            }
        }
        idx
    }

    /// Takes back up to `units` from bucket `idx`, if it is still counted.
    pub fn refund(&mut self, units: u64, idx: i64) {
        self.upgrade();
        let width = self.width_ms.max(1);
        if let Some(pos) = self
            .buckets
            .iter()
            .position(|(at, _)| at.div_euclid(width) == idx)
        {
            let n = &mut self.buckets[pos].1;
            *n = n.saturating_sub(units);
            if *n == 0 {
                self.buckets.remove(pos);
            }
        }
    }

    /// Milliseconds from `now_ms` until `units` more fit under `limit`, or
    /// `None` if they never will (more than the limit itself); never more
    /// than the window. Call after [`Window::used`] (which prunes).
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
        for &(at, n) in &self.buckets {
            used = used.saturating_sub(n);
            if used.saturating_add(units) <= limit {
                let free_at = at.saturating_add(window_ms);
                return Some(free_at.saturating_sub(now_ms).clamp(0, window_ms));
            }
        }
        Some(0)
    }

    /// When the oldest counted unit leaves the window (for `resets_at`),
    /// in ms; `None` when nothing is counted. Never more than one window
    /// after `now_ms`.
    pub fn oldest_expiry_ms(&self, window_ms: i64, now_ms: i64) -> Option<i64> {
        self.buckets.front().map(|(at, _)| {
            at.saturating_add(window_ms)
                .min(now_ms.saturating_add(window_ms))
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
        assert_eq!(w.wait_ms(1, 10, MIN, 10_000), Some(50_000));
        // Exactly one window after the first unit, it is gone.
        assert_eq!(w.used(MIN, 60_000), 9);
        assert_eq!(w.used(MIN, 68_999), 1);
        assert_eq!(w.used(MIN, 69_000), 0);
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

    #[test]
    fn a_full_window_waits_exactly_one_window_and_no_more() {
        // 60 s window, limit 1: one unit at t=0 at the start of its bucket.
        let mut w = Window::default();
        w.add(1, MIN, 0);
        assert_eq!(w.wait_ms(1, 1, MIN, 0), Some(MIN));
        // The same at the end of a bucket: the wait is still one window.
        let mut w = Window::default();
        w.add(1, MIN, 999);
        w.used(MIN, 999);
        assert_eq!(w.wait_ms(1, 1, MIN, 999), Some(MIN));
        assert_eq!(w.oldest_expiry_ms(MIN, 999), Some(999 + MIN));
        // A clock stepped back never stretches the wait past the window.
        assert_eq!(w.wait_ms(1, 1, MIN, -5_000), Some(MIN));
        assert_eq!(w.oldest_expiry_ms(MIN, -5_000), Some(-5_000 + MIN));
    }

    #[test]
    fn windows_written_as_bucket_indexes_are_held_as_long_as_before() {
        // Before 2026-12: width 1000 ms, bucket 5 holds 3 units; it counted
        // until (5 + 1) * 1000 + 60_000.
        let old = r#"{"width_ms":1000,"buckets":[[5,3]]}"#;
        let mut w: Window = serde_json::from_str(old).unwrap();
        assert_eq!(w.used(MIN, 65_998), 3);
        assert_eq!(w.used(MIN, 65_999), 0);
        let mut w: Window = serde_json::from_str(old).unwrap();
        w.refund(1, 5);
        assert_eq!(w.used(MIN, 0), 2);
        let again: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(again, w);
    }

    #[test]
    fn a_clock_stepped_back_holds_units_one_window_from_the_step() {
        let mut w = Window::default();
        w.add(1, MIN, 3_600_000);
        // The clock steps back an hour.
        assert_eq!(w.used(MIN, 0), 1);
        assert_eq!(w.wait_ms(1, 1, MIN, 0), Some(MIN));
        assert_eq!(w.used(MIN, MIN - 1), 1);
        assert_eq!(w.used(MIN, MIN), 0);
        // Forward again past where it was: nothing comes back.
        assert_eq!(w.used(MIN, 3_600_000), 0);
    }

    proptest! {
        /// A client that waits what `wait_ms` says gets in then, and is
        /// never told to wait longer than the window.
        #[test]
        fn waiting_what_it_says_gets_in(
            steps in proptest::collection::vec(0i64..5_000, 1..100),
            limit in 1u64..10,
            window_ms in 1i64..20_000,
        ) {
            let mut w = Window::default();
            let mut now = 0i64;
            for dt in steps {
                now += dt;
                w.used(window_ms, now);
                let wait = w.wait_ms(1, limit, window_ms, now).unwrap();
                prop_assert!(wait <= window_ms);
                if wait > 0 {
                    let mut later = w.clone();
                    later.used(window_ms, now + wait);
                    prop_assert_eq!(later.wait_ms(1, limit, window_ms, now + wait), Some(0));
                } else {
                    w.add(1, window_ms, now);
                }
            }
        }


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
