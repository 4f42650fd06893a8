//! Time as the gateway sees it.
//!
//! Every decision that depends on time (refill boundaries, rate-limit
//! windows, expiry) asks a [`Clock`], never the system directly, so tests move
//! time forward instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use parking_lot::Mutex;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Calendar time: refills at UTC boundaries, expiry, event times, every
    /// date shown. Follows the system clock, steps included.
    fn now(&self) -> Timestamp;

    /// Window time, for rate limits and rolling pools: it moves only as
    /// time passes, so a step of the system clock (NTP, an operator) neither
    /// ends a window early nor stretches it. On the same timeline as
    /// [`Clock::now`] when the process starts.
    fn steady(&self) -> Timestamp;

    /// Both, read together.
    fn read(&self) -> Now {
        Now {
            wall: self.now(),
            steady_ms: self.steady().as_millisecond(),
        }
    }
}

/// The clock shared by every part of one gateway.
pub type SharedClock = Arc<dyn Clock>;

/// One reading of a [`Clock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Calendar time ([`Clock::now`]).
    pub wall: Timestamp,
    /// Window time in Unix milliseconds ([`Clock::steady`]).
    pub steady_ms: i64,
}

impl Now {
    /// The calendar time at which window time reads `steady_ms`.
    pub fn wall_at(&self, steady_ms: i64) -> Option<Timestamp> {
        let delta = steady_ms.saturating_sub(self.steady_ms);
        Timestamp::from_millisecond(self.wall.as_millisecond().saturating_add(delta)).ok()
    }
}

/// A reading where both clocks agree (no step since start).
impl From<Timestamp> for Now {
    fn from(wall: Timestamp) -> Now {
        Now {
            wall,
            steady_ms: wall.as_millisecond(),
        }
    }
}

/// A reading of the monotonic clock (the one `Instant` reads), in
/// nanoseconds from an arbitrary start, for how long something took within
/// this process. Plain integers: `Instant`'s checked `timespec` arithmetic
/// cost more than the reading, and the proxy times three spans a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(u64);

impl Tick {
    pub fn now() -> Tick {
        use nix::time::{clock_gettime, ClockId};
        // Never fails on Linux for this clock; if it did, spans read 0.
        Tick(clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        }))
    }

    /// Nanoseconds from the clock's (arbitrary) start.
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// The reading `nanos` from the clock's start; for tests.
    #[cfg(test)]
    pub fn from_nanos(nanos: u64) -> Tick {
        Tick(nanos)
    }

    /// Nanoseconds from `self` to `later` (0 if `later` is not later).
    pub fn nanos_until(self, later: Tick) -> u64 {
        later.0.saturating_sub(self.0)
    }

    /// Nanoseconds since `self`.
    pub fn elapsed_nanos(self) -> u64 {
        self.nanos_until(Tick::now())
    }

    /// Whole microseconds since `self`.
    pub fn elapsed_micros(self) -> u64 {
        self.elapsed_nanos() / 1000
    }
}

/// The real clocks: the system's wall clock, and window time counted on
/// the monotonic clock from the wall time at start.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    started: Tick,
    /// The wall time at `started`, in whole milliseconds and the
    /// nanoseconds past them: [`Clock::read`] then divides a `u64`.
    start_ms: i64,
    past_ns: u64,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock::starting(Timestamp::now(), Tick::now())
    }

    fn starting(wall_at_start: Timestamp, started: Tick) -> SystemClock {
        let ns = wall_at_start.as_nanosecond();
        SystemClock {
            started,
            start_ms: i64::try_from(ns.div_euclid(1_000_000)).unwrap_or(i64::MAX),
            past_ns: u64::try_from(ns.rem_euclid(1_000_000)).unwrap_or(0),
        }
    }

    /// Window time in Unix nanoseconds.
    fn steady_nanos(&self) -> i128 {
        i128::from(self.start_ms) * 1_000_000
            + i128::from(self.past_ns)
            + i128::from(self.started.elapsed_nanos())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn steady(&self) -> Timestamp {
        Timestamp::from_nanosecond(self.steady_nanos()).unwrap_or(Timestamp::MAX)
    }

    /// As the default, in integers: every keyed request reads it, and
    /// `Timestamp`'s checked arithmetic was half the cost.
    fn read(&self) -> Now {
        // Divided as a `u64` (after 1970, flooring is the truncation of
        // `Timestamp::as_millisecond`).
        let ms = self.past_ns.saturating_add(self.started.elapsed_nanos()) / 1_000_000;
        Now {
            wall: Timestamp::now(),
            steady_ms: self.start_ms.saturating_add_unsigned(ms),
        }
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    /// (wall, steady)
    now: Mutex<(Timestamp, Timestamp)>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new((start, start)),
        })
    }

    /// Sets the wall clock to `to`; window time moves by as much (time
    /// passed, or went back as far).
    pub fn set(&self, to: Timestamp) {
        let mut now = self.now.lock();
        let by = to.duration_since(now.0);
        *now = (to, now.1.checked_add(by).unwrap_or(Timestamp::MAX));
    }

    /// Lets time pass (or go back, with a negative duration): both clocks
    /// move.
    pub fn advance(&self, by: std::time::Duration) {
        let by = SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
        let mut now = self.now.lock();
        *now = (shift(now.0, by), shift(now.1, by));
    }

    /// Steps the wall clock alone, as NTP or an operator would: window time
    /// does not move.
    pub fn step(&self, by: SignedDuration) {
        let mut now = self.now.lock();
        now.0 = shift(now.0, by);
    }
}

fn shift(t: Timestamp, by: SignedDuration) -> Timestamp {
    t.checked_add(by).unwrap_or(if by.is_negative() {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.now.lock().0
    }

    fn steady(&self) -> Timestamp {
        self.now.lock().1
    }

    fn read(&self) -> Now {
        let (wall, steady) = *self.now.lock();
        Now {
            wall,
            steady_ms: steady.as_millisecond(),
        }
    }
}

/// A clock set to another's time: `inner` plus offsets the shared store
/// measures against Redis's `TIME` (SPEC §8), so nodes whose own clocks
/// disagree still count windows and refills on one clock. The offsets are
/// measured once, when the store first answers; `inner` still moves the
/// time (a test's [`ManualClock`] included).
pub struct OffsetClock {
    inner: SharedClock,
    offsets: Arc<Offsets>,
}

/// Microseconds to add to each of a node's clocks to read another's.
#[derive(Debug, Default)]
pub struct Offsets {
    pub wall_us: AtomicI64,
    pub steady_us: AtomicI64,
}

impl OffsetClock {
    pub fn new(inner: SharedClock, offsets: Arc<Offsets>) -> Arc<Self> {
        Arc::new(OffsetClock { inner, offsets })
    }
}

fn offset(t: Timestamp, by: &AtomicI64) -> Timestamp {
    let by = SignedDuration::from_micros(by.load(Ordering::Relaxed));
    t.checked_add(by).unwrap_or(t)
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        offset(self.inner.now(), &self.offsets.wall_us)
    }

    fn steady(&self) -> Timestamp {
        offset(self.inner.steady(), &self.offsets.steady_us)
    }

    fn read(&self) -> Now {
        let now = self.inner.read();
        let steady = Timestamp::from_millisecond(now.steady_ms).unwrap_or(now.wall);
        Now {
            wall: offset(now.wall, &self.offsets.wall_us),
            steady_ms: offset(steady, &self.offsets.steady_us).as_millisecond(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_read_the_clock_instant_reads() {
        // A span of ticks taken around a span of `Instant`s covers it: on
        // another clock (a coarse one, the wall clock) it need not.
        let t0 = Tick::now();
        let i0 = std::time::Instant::now();
        let i1 = std::time::Instant::now();
        let t1 = Tick::now();
        let inner = u64::try_from((i1 - i0).as_nanos()).unwrap_or(u64::MAX);
        assert!(t0.nanos_until(t1) >= inner);
        assert!(t0 <= t1);
        assert_eq!(t1.nanos_until(t0), 0, "a span never runs backwards");
        assert_eq!(Tick(5_999).nanos_until(Tick(1_000_000)), 994_001);
    }

    #[test]
    fn window_time_starts_at_the_wall_time_and_moves_with_the_monotonic_clock() {
        let clock = SystemClock::starting(Timestamp::UNIX_EPOCH, Tick::now());
        let before = clock.started.elapsed_nanos();
        let steady = clock.steady().as_nanosecond();
        let after = clock.started.elapsed_nanos();
        assert!((i128::from(before)..=i128::from(after)).contains(&steady));
        // `read` gives what `steady` does, in milliseconds, from a start
        // that is not on a whole one.
        let start = "2026-12-05T10:00:00.000999Z".parse().expect("time");
        let clock = SystemClock::starting(start, Tick::now());
        let before = clock.steady().as_millisecond();
        let read = clock.read();
        let after = clock.steady().as_millisecond();
        assert!(
            (before..=after).contains(&read.steady_ms),
            "{before} {read:?} {after}"
        );
    }
}
