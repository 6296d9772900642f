//! A meter query's windows (OpenMeter's `windowSize`, in UTC): which window an instant falls in,
//! where it ends, and how far one query may reach for each size.

use chrono::{DateTime, Duration, Months, Utc};
use serde::Serialize;

use super::InvalidValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum WindowSize {
    Hour,
    Day,
    Month,
}

impl WindowSize {
    pub fn parse(raw: &str) -> Result<WindowSize, InvalidValue> {
        match raw {
            "HOUR" => Ok(WindowSize::Hour),
            "DAY" => Ok(WindowSize::Day),
            "MONTH" => Ok(WindowSize::Month),
            _ => Err(InvalidValue::new(
                "windowSize",
                "must be HOUR, DAY or MONTH (MINUTE is not offered)",
            )),
        }
    }

    /// The unit PostgreSQL's `date_trunc` takes for this size.
    pub fn trunc_unit(self) -> &'static str {
        match self {
            WindowSize::Hour => "hour",
            WindowSize::Day => "day",
            WindowSize::Month => "month",
        }
    }

    /// The end of the window that starts at `start` (`None` past the representable range).
    pub fn end(self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            WindowSize::Hour => start.checked_add_signed(Duration::hours(1)),
            WindowSize::Day => start.checked_add_signed(Duration::days(1)),
            WindowSize::Month => start.checked_add_months(Months::new(1)),
        }
    }
}

/// How far one query may reach, and how far it reaches when `from` is absent: a bounded
/// number of windows, and a range whose events one query can read.
pub fn spans(window: Option<WindowSize>) -> (Duration, Duration) {
    match window {
        Some(WindowSize::Hour) => (Duration::days(31), Duration::days(1)),
        Some(WindowSize::Day) => (Duration::days(366), Duration::days(30)),
        Some(WindowSize::Month) => (Duration::days(732), Duration::days(365)),
        None => (Duration::days(732), Duration::days(30)),
    }
}

/// The part of the window starting at `start` that lies within `[from, to)`: a row never
/// claims time the query did not cover. Without a window size, the whole range is one window.
pub fn clip(
    window: Option<WindowSize>,
    start: Option<DateTime<Utc>>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    match (window, start) {
        (Some(size), Some(start)) => {
            let end = size.end(start).unwrap_or(to);
            (start.max(from), end.min(to))
        }
        _ => (from, to),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn window_sizes_parse_as_openmeter_names_them() {
        assert_eq!(WindowSize::parse("HOUR").unwrap(), WindowSize::Hour);
        assert_eq!(WindowSize::parse("DAY").unwrap(), WindowSize::Day);
        assert_eq!(WindowSize::parse("MONTH").unwrap(), WindowSize::Month);
        for bad in ["", "day", "MINUTE", "WEEK", "HOUR "] {
            assert!(WindowSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_end_a_calendar_unit_later() {
        let jan31 = at("2026-01-31T00:00:00Z");
        assert_eq!(
            WindowSize::Month.end(at("2026-01-01T00:00:00Z")),
            Some(at("2026-02-01T00:00:00Z"))
        );
        assert_eq!(
            WindowSize::Month.end(at("2028-02-01T00:00:00Z")),
            Some(at("2028-03-01T00:00:00Z"))
        );
        assert_eq!(WindowSize::Day.end(jan31), Some(at("2026-02-01T00:00:00Z")));
        assert_eq!(
            WindowSize::Hour.end(at("2026-03-29T23:00:00Z")),
            Some(at("2026-03-30T00:00:00Z"))
        );
    }

    #[test]
    fn rows_cover_only_the_queried_range() {
        let from = at("2026-01-01T10:30:00Z");
        let to = at("2026-01-03T06:00:00Z");
        let day = Some(WindowSize::Day);
        assert_eq!(
            clip(day, Some(at("2026-01-01T00:00:00Z")), from, to),
            (from, at("2026-01-02T00:00:00Z"))
        );
        assert_eq!(
            clip(day, Some(at("2026-01-02T00:00:00Z")), from, to),
            (at("2026-01-02T00:00:00Z"), at("2026-01-03T00:00:00Z"))
        );
        assert_eq!(
            clip(day, Some(at("2026-01-03T00:00:00Z")), from, to),
            (at("2026-01-03T00:00:00Z"), to)
        );
        assert_eq!(clip(None, None, from, to), (from, to));
    }

    #[test]
    fn every_window_size_has_a_bounded_reach() {
        for window in [
            None,
            Some(WindowSize::Hour),
            Some(WindowSize::Day),
            Some(WindowSize::Month),
        ] {
            let (max, default) = spans(window);
            assert!(default <= max && max <= Duration::days(732), "{window:?}");
        }
        // At most 744 hourly windows, 366 daily ones.
        assert_eq!(spans(Some(WindowSize::Hour)).0.num_hours(), 744);
    }
}
