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

use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use base64::Engine;
use integer_encoding::VarInt;
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::store::codec::{In, Out};

/// How many buckets a window is cut into.
const BUCKETS: i64 = 60;

/// A window: as JSON, `[time, units]` pairs in `buckets` (and older
/// forms, see `Stored`); in the embedded store, its binary form (see
/// [`Window::encode`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Stored")]
pub struct Window {
    /// Bucket width the buckets were counted with; a changed window resets.
    width_ms: i64,
    /// `(newest unit's time in ms, units)`, oldest first, no empty buckets;
    /// a bucket is the time divided by the width. Written before 2026-12
    /// as `(bucket index, units)`: see [`Window::upgrade`].
    buckets: VecDeque<(i64, u64)>,
    /// 1 once `buckets` holds times; 0 for older records.
    v: u8,
    /// The units in `buckets`, kept with them (not stored): a count reads
    /// it rather than the buckets, which with many keys in use are seldom
    /// in the CPU's cache. Wide enough that 61 buckets never overflow it.
    total: u128,
    /// The oldest bucket's time and the newest bucket, kept with them (not
    /// stored): see [`Ends`].
    ends: Ends,
}

/// Copies of a window's two ends, beside its other fields: a request on a
/// key reads only these to prune and count (the oldest bucket has not left
/// the window, the newest takes the unit), and only writes the newest
/// bucket, so the buckets themselves, two cache lines apart in a minute's
/// window and with many keys in use seldom in the CPU's cache, are read
/// only when a bucket leaves or a clock steps back. Meaningless while the
/// window is empty (then the default, so that equal windows are equal).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ends {
    oldest_at: i64,
    newest: (i64, u64),
}

impl Ends {
    fn of(buckets: &VecDeque<(i64, u64)>) -> Ends {
        match (buckets.front(), buckets.back()) {
            (Some(&(oldest_at, _)), Some(&newest)) => Ends { oldest_at, newest },
            _ => Ends::default(),
        }
    }
}

/// Windows in JSON (the shared store's, the admin API's) are `[time,
/// units]` pairs; the embedded store writes them in its binary form
/// ([`Window::encode`]), and before that wrote one of the compact JSON
/// forms, which still read (see `Stored`).
impl Serialize for Window {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Window", 3)?;
        out.serialize_field("width_ms", &self.width_ms)?;
        out.serialize_field("buckets", &self.buckets)?;
        out.serialize_field("v", &self.v)?;
        out.end()
    }
}

thread_local! {
    /// Where [`Window::encode`] writes the varints, kept at its longest
    /// from one window to the next. Written in place in the row's buffer
    /// instead, room for the longest (1.2 KB for a minute window) was
    /// zeroed there for every window: each pass of the write-behind
    /// wrote that much into rows not in the cache (about one of the last
    /// level's write misses a row in callgrind's model of a 512 KB
    /// cache), and the rows kept their room (BENCHMARKS.md).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Window {
    /// The window in the embedded store's binary form (see
    /// [`crate::store::codec`]): its width, its format (`v`) and its
    /// packed buckets: their number, each one's time as the difference
    /// from the one before (the first from 0, zigzagged) and each one's
    /// units, as LEB128 varints. A minute window's 60 buckets take about
    /// 190 bytes.
    pub fn encode(&self, out: &mut Out) {
        out.var(self.width_ms);
        out.byte(self.v);
        SCRATCH.with_borrow_mut(|bytes| {
            // Room for every varint at its longest, written in place (a
            // copy of each from a smaller buffer cost more than the
            // encoding), then copied out at the length they took.
            let most = 10 * (1 + 2 * self.buckets.len());
            if bytes.len() < most {
                bytes.resize(most, 0);
            }
            let mut len = (self.buckets.len() as u64).encode_var(bytes);
            let mut last = 0i64;
            for &(at, _) in &self.buckets {
                len += at.wrapping_sub(last).encode_var(&mut bytes[len..]);
                last = at;
            }
            for &(_, units) in &self.buckets {
                len += units.encode_var(&mut bytes[len..]);
            }
            out.0.extend_from_slice(&bytes[..len]);
        });
    }

    /// Reads what [`Window::encode`] wrote.
    pub fn decode(input: &mut In) -> Result<Window, String> {
        let width_ms = input.var()?;
        let v = input.byte()?;
        let (t, n) = unpack(&mut input.0)?;
        match v {
            0 | 1 => Window::from_deltas(width_ms, t, n, v),
            v => Err(format!(
                "a window in format {v}, written by a newer tollgate"
            )),
        }
    }
}

/// Reads packed buckets (see [`Window::encode`]) into their times, each
/// but the first as the difference from the one before, and units.
fn unpack(rest: &mut &[u8]) -> Result<(Vec<i64>, Vec<u64>), String> {
    fn next<T: VarInt>(rest: &mut &[u8]) -> Result<T, String> {
        let (n, len) = T::decode_var(rest).ok_or("a window whose packed buckets end early")?;
        *rest = &rest[len..];
        Ok(n)
    }
    let count: u64 = next(rest)?;
    // Each bucket takes at least two bytes: a count past that is damage,
    // and must not size an allocation.
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= rest.len() / 2)
        .ok_or("a window whose packed buckets count more than they hold")?;
    let t = (0..count)
        .map(|_| next(rest))
        .collect::<Result<Vec<i64>, String>>()?;
    let n = (0..count)
        .map(|_| next(rest))
        .collect::<Result<Vec<u64>, String>>()?;
    Ok((t, n))
}

/// A window's JSON as the embedded store wrote it before its binary form:
/// pairs in `buckets` (`v` 1, or absent for bucket indexes, before
/// 2026-12); the times, each but the first as the difference from the one
/// before, and the units as numbers in `t` and `n` (`v` 2); or packed (see
/// [`Window::encode`]) in base64 without padding in `b` (`v` 3).
#[derive(Deserialize)]
struct Stored {
    width_ms: i64,
    buckets: Option<VecDeque<(i64, u64)>>,
    #[serde(default)]
    v: u8,
    #[serde(default)]
    t: Vec<i64>,
    #[serde(default)]
    n: Vec<u64>,
    b: Option<String>,
}

impl TryFrom<Stored> for Window {
    type Error = String;

    fn try_from(stored: Stored) -> Result<Window, String> {
        let Stored {
            width_ms,
            buckets,
            v,
            t,
            n,
            b,
        } = stored;
        match (v, buckets) {
            (0 | 1, Some(buckets)) => Ok(Window::with(width_ms, buckets, v)),
            (0 | 1, None) => Err("a window without its buckets".into()),
            (2, _) => Window::from_deltas(width_ms, t, n, 1),
            (3, _) => {
                let b = b.ok_or("a window without its packed buckets")?;
                let bytes = BASE64
                    .decode(b)
                    .map_err(|e| format!("a window whose packed buckets are not base64: {e}"))?;
                let mut rest = &bytes[..];
                let (t, n) = unpack(&mut rest)?;
                if !rest.is_empty() {
                    return Err("a window with bytes after its packed buckets".into());
                }
                Window::from_deltas(width_ms, t, n, 1)
            }
            (v, _) => Err(format!(
                "a window in format {v}, written by a newer tollgate"
            )),
        }
    }
}

fn width_of(window_ms: i64) -> i64 {
    (window_ms / BUCKETS).max(1)
}

impl Window {
    /// A window from packed times (each but the first as the difference
    /// from the one before) and units, in format `v`.
    fn from_deltas(width_ms: i64, t: Vec<i64>, n: Vec<u64>, v: u8) -> Result<Window, String> {
        if t.len() != n.len() {
            return Err("a window with different numbers of times and units".into());
        }
        let mut at = 0i64;
        let buckets = t
            .into_iter()
            .zip(n)
            .map(|(delta, units)| {
                at = at.wrapping_add(delta);
                (at, units)
            })
            .collect();
        Ok(Window::with(width_ms, buckets, v))
    }

    fn with(width_ms: i64, buckets: VecDeque<(i64, u64)>, v: u8) -> Window {
        let total = buckets.iter().map(|&(_, n)| u128::from(n)).sum();
        let ends = Ends::of(&buckets);
        Window {
            width_ms,
            buckets,
            v,
            total,
            ends,
        }
    }

    /// The units counted, as a saturating sum of the buckets would give:
    /// after [`Window::add`] or [`Window::used`] at `now_ms`, what
    /// `used(.., now_ms)` would give, without pruning again.
    pub fn units(&self) -> u64 {
        u64::try_from(self.total).unwrap_or(u64::MAX)
    }

    /// Sets bucket `pos`'s units, keeping the total (not the ends).
    fn set_units(&mut self, pos: usize, n: u64) {
        let old = std::mem::replace(&mut self.buckets[pos].1, n);
        self.total = self.total - u128::from(old) + u128::from(n);
    }

    /// Makes the newest bucket `newest`, in the buckets and their copy,
    /// keeping the total: written without reading the bucket it replaces.
    fn set_newest(&mut self, newest: (i64, u64)) {
        let old = std::mem::replace(&mut self.ends.newest, newest);
        self.total = self.total - u128::from(old.1) + u128::from(newest.1);
        if let Some(bucket) = self.buckets.back_mut() {
            *bucket = newest;
        }
        if self.buckets.len() == 1 {
            self.ends.oldest_at = newest.0;
        }
    }

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
            self.ends = Ends::of(&self.buckets);
        }
    }

    /// Drops buckets that have left the window ending at `now_ms`.
    fn prune(&mut self, window_ms: i64, now_ms: i64) {
        self.upgrade();
        let width = width_of(window_ms);
        if self.width_ms != width {
            self.width_ms = width;
            self.buckets.clear();
            self.total = 0;
            self.ends = Ends::default();
        }
        if self.buckets.is_empty() {
            return;
        }
        // A clock stepped back: units counted "in the future" count as if
        // they came now, so they leave one window from here, not one window
        // plus the step (a step back never locks a key out for longer).
        if self.ends.newest.0 > now_ms {
            for (at, _) in self.buckets.iter_mut().rev() {
                if *at <= now_ms {
                    break;
                }
                *at = now_ms;
            }
            self.ends = Ends::of(&self.buckets);
        }
        if self.ends.oldest_at.saturating_add(window_ms) <= now_ms {
            while let Some(&(at, n)) = self.buckets.front() {
                if at.saturating_add(window_ms) <= now_ms {
                    self.buckets.pop_front();
                    self.total -= u128::from(n);
                } else {
                    break;
                }
            }
            self.ends = Ends::of(&self.buckets);
        }
    }

    /// Units counted in the window ending at `now_ms`.
    pub fn used(&mut self, window_ms: i64, now_ms: i64) -> u64 {
        self.prune(window_ms, now_ms);
        self.units()
    }

    /// Counts `units` at `now_ms`. Returns the bucket it went into, for a
    /// later [`Window::refund`].
    pub fn add(&mut self, units: u64, window_ms: i64, now_ms: i64) -> i64 {
        self.prune(window_ms, now_ms);
        let width = self.width_ms;
        let idx = now_ms.div_euclid(width);
        let newest = (!self.buckets.is_empty()).then_some(self.ends.newest);
        match newest {
            Some((at, n)) if at.div_euclid(width) == idx => {
                self.set_newest((at.max(now_ms), n.saturating_add(units)));
            }
            // A clock that stepped back lands in the newest bucket (pruning
            // moved any such bucket to now, so this is for safety's sake).
            Some((at, n)) if at > now_ms => {
                self.set_newest((at, n.saturating_add(units)));
                return at.div_euclid(width);
            }
            _ if units > 0 => {
                if self.buckets.len() == self.buckets.capacity() {
                    // The buckets live as long as their key: grown in the
                    // keys' heap (see `alloc::lasting`), not among the
                    // blocks of the request that happens to grow them.
                    crate::alloc::lasting(|| self.buckets.reserve(1));
                }
                if newest.is_none() {
                    self.ends.oldest_at = now_ms;
                }
                self.buckets.push_back((now_ms, units));
                self.ends.newest = (now_ms, units);
                self.total += u128::from(units);
            }
            _ => {}
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
            let left = self.buckets[pos].1.saturating_sub(units);
            self.set_units(pos, left);
            if left == 0 {
                self.buckets.remove(pos);
            }
            self.ends = Ends::of(&self.buckets);
        }
    }

    /// Milliseconds from `now_ms` until `units` more fit under `limit`, or
    /// `None` if they never will (more than the limit itself); never more
    /// than the window. Call after [`Window::used`] (which prunes).
    pub fn wait_ms(&self, units: u64, limit: u64, window_ms: i64, now_ms: i64) -> Option<i64> {
        if units > limit {
            return None;
        }
        let mut used = self.units();
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
        (!self.buckets.is_empty()).then(|| {
            let at = self.ends.oldest_at;
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

    /// A window's buckets last as long as its key: each time they grow,
    /// the new buffer comes from the keys' heap, whichever request grew it.
    #[test]
    fn buckets_grow_in_the_keys_heap() {
        let mut w = Window::default();
        let mut grown = 0;
        for t in 0..61 {
            let capacity = w.buckets.capacity();
            w.add(1, MIN, t * 1000);
            if w.buckets.capacity() != capacity {
                grown += 1;
                let buffer = w.buckets.as_slices().0.as_ptr();
                assert!(crate::alloc::in_lasting_heap(buffer), "growth {grown}");
            }
        }
        assert!(grown >= 2, "grew {grown} times");
        assert_eq!(w.used(MIN, 60_000), 60);
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

    /// A minute window with a unit every second, 60 buckets.
    fn full_minute() -> Window {
        let mut w = Window::default();
        for t in 0..60 {
            w.add(1 + t as u64 % 3, MIN, 1_773_144_000_000 + t * 1000 + t % 7);
        }
        w
    }

    /// `w` in the embedded store's binary form, and read back.
    fn binary(w: &Window) -> (Vec<u8>, Window) {
        let mut bytes = Vec::new();
        w.encode(&mut Out(&mut bytes));
        let mut input = In(&bytes);
        let back = Window::decode(&mut input).unwrap();
        assert!(input.0.is_empty());
        (bytes, back)
    }

    #[test]
    fn the_binary_form_reads_back_the_same_window_and_older_forms_still_read() {
        let w = full_minute();
        let pairs = serde_json::to_string(&w).unwrap();
        assert!(
            pairs.contains(r#""buckets":[[1773144000000,1],"#),
            "{pairs}"
        );
        let (bytes, back) = binary(&w);
        assert_eq!(back, w);
        assert!(bytes.len() < 200, "{}", bytes.len());
        // The packed JSON of 2026-12-05's stores: the binary form after
        // its width and format, in base64.
        let mut input = In(&bytes);
        let _: i64 = input.var().unwrap();
        assert_eq!(input.byte().unwrap(), 1);
        let packed = format!(
            r#"{{"width_ms":1000,"v":3,"b":"{}"}}"#,
            BASE64.encode(input.0)
        );
        // And the numbers of 2026-12-04's.
        let mut last = 0;
        let (mut t, mut n) = (Vec::new(), Vec::new());
        for &(at, units) in &w.buckets {
            t.push((at - last).to_string());
            n.push(units.to_string());
            last = at;
        }
        let numbers = format!(
            r#"{{"width_ms":1000,"v":2,"t":[{}],"n":[{}]}}"#,
            t.join(","),
            n.join(",")
        );
        assert!(numbers.starts_with(r#"{"width_ms":1000,"v":2,"t":[1773144000000,1001,1001,"#));
        for text in [&pairs, &packed, &numbers] {
            let back: Window = serde_json::from_str(text).unwrap();
            assert_eq!(back, w);
        }
        // Windows of bucket indexes are written as they were read.
        let old: Window = serde_json::from_str(r#"{"width_ms":1000,"buckets":[[5,3]]}"#).unwrap();
        assert_eq!(binary(&old).1, old);
    }

    #[test]
    fn binary_windows_that_do_not_add_up_are_refused() {
        for (bad, says) in [
            (&[0x0a, 1, 2, 2, 4, 1, 0x81][..], "end early"),
            (&[0x0a, 1, 0x7f][..], "count more than they hold"),
            (&[0x0a, 2, 0][..], "format 2"),
            (&[0x0a][..], "ends early"),
        ] {
            let err = Window::decode(&mut In(bad)).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn compact_windows_that_do_not_add_up_are_refused() {
        for bad in [
            r#"{"width_ms":1000,"v":2,"t":[1,2],"n":[1]}"#,
            r#"{"width_ms":1000,"v":3}"#,
            r#"{"width_ms":1000,"v":3,"b":"!!"}"#,
            // Two buckets, cut short; one, with a byte after it; 127 in
            // one byte.
            r#"{"width_ms":1000,"v":3,"b":"AgIEAQ"}"#,
            r#"{"width_ms":1000,"v":3,"b":"AQIBAA"}"#,
            r#"{"width_ms":1000,"v":3,"b":"fw"}"#,
            r#"{"width_ms":1000,"v":4,"t":[],"n":[]}"#,
            r#"{"width_ms":1000,"v":1}"#,
        ] {
            let err = serde_json::from_str::<Window>(bad).unwrap_err().to_string();
            assert!(err.contains("window"), "{bad}: {err}");
        }
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

    fn summed(w: &Window) -> u64 {
        w.buckets
            .iter()
            .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
    }

    proptest! {
        /// The kept total is what summing the buckets gives, after any mix
        /// of charges (some near `u64::MAX`), refunds, counts, a window
        /// that changes width, a clock that steps back, and a round trip
        /// through either stored form.
        #[test]
        fn the_kept_total_is_the_sum_of_the_buckets(
            steps in proptest::collection::vec(
                (0u8..4, -5_000i64..120_000, prop_oneof![0u64..5, Just(u64::MAX - 1)], any::<bool>()),
                0..150,
            ),
        ) {
            let mut w = Window::default();
            let mut charged = Vec::new();
            for (op, at, units, wide) in steps {
                let window_ms = if wide { 2 * MIN } else { MIN };
                match op {
                    0 | 1 => {
                        charged.push(w.add(units, window_ms, at));
                        // What was just pruned needs no pruning again.
                        prop_assert_eq!(w.units(), w.clone().used(window_ms, at));
                    }
                    2 => {
                        let idx = charged.pop().unwrap_or(0);
                        w.refund(units, idx);
                    }
                    _ => {
                        let used = w.used(window_ms, at);
                        prop_assert_eq!(used, summed(&w));
                    }
                }
                prop_assert_eq!(w.units(), summed(&w));
                prop_assert_eq!(w.ends, Ends::of(&w.buckets));
                prop_assert_eq!(w.wait_ms(0, u64::MAX, window_ms, at), Some(0));
            }
            let back: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
            prop_assert_eq!(back.units(), summed(&w));
            prop_assert_eq!(&back, &w);
            let back = binary(&w).1;
            prop_assert_eq!(back.units(), summed(&w));
            prop_assert_eq!(&back, &w);
        }

        /// Packed buckets that are not what tollgate wrote are an error,
        /// never a panic or an allocation their count asks for.
        #[test]
        fn any_packed_bytes_read_or_fail_cleanly(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let text = format!(r#"{{"width_ms":1000,"v":3,"b":"{}"}}"#, BASE64.encode(&bytes));
            if let Ok(w) = serde_json::from_str::<Window>(&text) {
                prop_assert!(w.buckets.len() <= bytes.len() / 2);
                prop_assert_eq!(w.units(), summed(&w));
            }
        }

        #[test]
        fn json_and_binary_read_back_every_window(
            steps in proptest::collection::vec((-5_000i64..120_000, 0u64..5), 0..150),
        ) {
            let mut w = Window::default();
            for (at, units) in steps {
                w.add(units, MIN, at);
            }
            let back: Window = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
            prop_assert_eq!(&back, &w);
            prop_assert_eq!(&binary(&w).1, &w);
        }

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
