//! Calendar-aligned refill boundaries, in UTC.
//!
//! Credits and calendar pools refill lazily: nothing runs at midnight. When a
//! key is touched, its stored period start is compared with the latest
//! boundary at or before `now`; if a boundary has passed, the period restarts.
//! Month arithmetic (a `day: 31` in February, leap years) is jiff's.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// How often a balance refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    /// At 00:00 UTC every day.
    Daily,
    /// At 00:00 UTC on `day` of every month, clamped to the month's last day.
    Monthly { day: u8 },
}

impl Interval {
    pub fn name(&self) -> &'static str {
        match self {
            Interval::Daily => "daily",
            Interval::Monthly { .. } => "monthly",
        }
    }

    /// The same interval aligned to another day of the month (a customer's
    /// billing date); daily intervals are unaffected.
    pub fn with_day(self, day: Option<u8>) -> Interval {
        match (self, day) {
            (Interval::Monthly { .. }, Some(day)) => Interval::Monthly { day },
            (interval, _) => interval,
        }
    }

    /// The latest boundary at or before `now`.
    ///
    /// `None` only at the far edges of jiff's supported range.
    pub fn period_start(&self, now: Timestamp) -> Option<Timestamp> {
        let today = now.to_zoned(TimeZone::UTC).date();
        let start = match *self {
            Interval::Daily => today,
            Interval::Monthly { day } => {
                let this_month = month_boundary(today, day)?;
                if this_month <= today {
                    this_month
                } else {
                    month_boundary(today.first_of_month().checked_sub(1.month()).ok()?, day)?
                }
            }
        };
        midnight(start)
    }

    /// The first boundary strictly after `now`: when the balance next refills.
    pub fn next_start(&self, now: Timestamp) -> Option<Timestamp> {
        let today = now.to_zoned(TimeZone::UTC).date();
        let next = match *self {
            Interval::Daily => today.tomorrow().ok()?,
            Interval::Monthly { day } => {
                let this_month = month_boundary(today, day)?;
                if this_month > today {
                    this_month
                } else {
                    month_boundary(today.first_of_month().checked_add(1.month()).ok()?, day)?
                }
            }
        };
        midnight(next)
    }
}

/// `day` of the month `date` lies in, clamped to that month's length.
fn month_boundary(date: Date, day: u8) -> Option<Date> {
    let day = i8::try_from(day).ok()?.clamp(1, date.days_in_month());
    Date::new(date.year(), date.month(), day).ok()
}

fn midnight(date: Date) -> Option<Timestamp> {
    date.to_zoned(TimeZone::UTC).ok().map(|z| z.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    #[test]
    fn daily_starts_at_utc_midnight() {
        let d = Interval::Daily;
        assert_eq!(
            d.period_start(ts("2026-03-04T23:59:59Z")),
            Some(ts("2026-03-04T00:00:00Z"))
        );
        assert_eq!(
            d.period_start(ts("2026-03-05T00:00:00Z")),
            Some(ts("2026-03-05T00:00:00Z"))
        );
        assert_eq!(
            d.next_start(ts("2026-12-31T12:00:00Z")),
            Some(ts("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn monthly_day_31_clamps_in_february() {
        let m = Interval::Monthly { day: 31 };
        // Non-leap February: the boundary is the 28th.
        assert_eq!(
            m.period_start(ts("2027-02-28T00:00:01Z")),
            Some(ts("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            m.period_start(ts("2027-02-27T10:00:00Z")),
            Some(ts("2027-01-31T00:00:00Z"))
        );
        assert_eq!(
            m.next_start(ts("2027-02-01T00:00:00Z")),
            Some(ts("2027-02-28T00:00:00Z"))
        );
        // Leap February: the 29th.
        assert_eq!(
            m.next_start(ts("2028-02-10T00:00:00Z")),
            Some(ts("2028-02-29T00:00:00Z"))
        );
        assert_eq!(
            m.next_start(ts("2028-02-29T00:00:00Z")),
            Some(ts("2028-03-31T00:00:00Z"))
        );
    }

    #[test]
    fn monthly_default_day_crosses_year_end() {
        let m = Interval::Monthly { day: 1 };
        assert_eq!(
            m.period_start(ts("2026-12-31T23:59:59Z")),
            Some(ts("2026-12-01T00:00:00Z"))
        );
        assert_eq!(
            m.next_start(ts("2026-12-31T23:59:59Z")),
            Some(ts("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn monthly_mid_month_day() {
        let m = Interval::Monthly { day: 15 };
        assert_eq!(
            m.period_start(ts("2026-01-10T00:00:00Z")),
            Some(ts("2025-12-15T00:00:00Z"))
        );
        assert_eq!(
            m.period_start(ts("2026-01-15T00:00:00Z")),
            Some(ts("2026-01-15T00:00:00Z"))
        );
    }
}
