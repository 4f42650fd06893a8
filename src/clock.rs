//! Time as the gateway sees it.
//!
//! Every decision that depends on time (refill boundaries, rate-limit
//! windows, expiry) asks a [`Clock`], never the system directly, so tests move
//! time forward instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

/// The real clocks: the system's wall clock, and window time counted on
/// the monotonic clock from the wall time at start.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    wall_at_start: Timestamp,
    started: Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        SystemClock {
            wall_at_start: Timestamp::now(),
            started: Instant::now(),
        }
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
        let elapsed =
            SignedDuration::try_from(self.started.elapsed()).unwrap_or(SignedDuration::MAX);
        self.wall_at_start
            .checked_add(elapsed)
            .unwrap_or(Timestamp::MAX)
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
