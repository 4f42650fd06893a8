//! Time as the gateway sees it.
//!
//! Every decision that depends on time (refill boundaries, rate-limit
//! windows, expiry) asks a [`Clock`], never the system directly, so tests move
//! time forward instead of sleeping.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use parking_lot::Mutex;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The clock shared by every part of one gateway.
pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(start),
        })
    }

    pub fn set(&self, to: Timestamp) {
        *self.now.lock() = to;
    }

    /// Moves the clock forward (or back, with a negative duration).
    pub fn advance(&self, by: std::time::Duration) {
        let mut now = self.now.lock();
        let by = SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
        *now = now.checked_add(by).unwrap_or(Timestamp::MAX);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock()
    }
}

/// A clock set to another's time: `inner` plus an offset the shared store
/// measures against Redis's `TIME` (SPEC §8), so nodes whose own clocks
/// disagree still count windows and refills on one clock. The offset is
/// measured once, when the store first answers; `inner` still moves the
/// time (a test's [`ManualClock`] included).
pub struct OffsetClock {
    inner: SharedClock,
    offset_us: Arc<std::sync::atomic::AtomicI64>,
}

impl OffsetClock {
    pub fn new(inner: SharedClock, offset_us: Arc<std::sync::atomic::AtomicI64>) -> Arc<Self> {
        Arc::new(OffsetClock { inner, offset_us })
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let offset = self.offset_us.load(std::sync::atomic::Ordering::Relaxed);
        let now = self.inner.now();
        now.checked_add(SignedDuration::from_micros(offset))
            .unwrap_or(now)
    }
}
