//! Instants and days as the API accepts them: RFC 3339 instants (no leap seconds, microsecond
//! precision, as PostgreSQL stores them) and `YYYY-MM-DD` days, each inside a bounded range so
//! that no later date arithmetic can overflow and PostgreSQL never sees an out-of-range value.

use chrono::{DateTime, NaiveDate, SubsecRound, Timelike, Utc};

/// Earliest instant or day any request may name.
pub fn earliest() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + chrono::Duration::days(10_957) // 2000-01-01T00:00:00Z
}

/// Latest instant or day any request may name (exclusive): 2100-01-01T00:00:00Z.
pub fn latest() -> DateTime<Utc> {
    DateTime::UNIX_EPOCH + chrono::Duration::days(47_482)
}

/// Why a timestamp or day was refused; safe to show to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeError {
    Unparsable,
    LeapSecond,
    OutOfRange,
}

impl TimeError {
    pub fn message(self) -> &'static str {
        match self {
            TimeError::Unparsable => "must be an RFC 3339 timestamp, e.g. 2026-11-25T10:00:00Z",
            TimeError::LeapSecond => {
                "must not be a leap second (:60); send :59.999999 or the next second"
            }
            TimeError::OutOfRange => "must be between 2000-01-01 and 2100-01-01",
        }
    }
}

/// An RFC 3339 instant, normalised once: UTC, truncated to microseconds. A leap second is
/// refused rather than stored as a different day in each system.
pub fn parse_instant(raw: &str) -> Result<DateTime<Utc>, TimeError> {
    let parsed = DateTime::parse_from_rfc3339(raw).map_err(|_| TimeError::Unparsable)?;
    let at = parsed.with_timezone(&Utc);
    if at.nanosecond() >= 1_000_000_000 {
        return Err(TimeError::LeapSecond);
    }
    if at < earliest() || at >= latest() {
        return Err(TimeError::OutOfRange);
    }
    Ok(at.trunc_subsecs(6))
}

/// A `YYYY-MM-DD` day inside the same range.
pub fn parse_day(raw: &str) -> Result<NaiveDate, TimeError> {
    if raw.len() != 10 {
        return Err(TimeError::Unparsable);
    }
    let day = NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| TimeError::Unparsable)?;
    if day < earliest().date_naive() || day >= latest().date_naive() {
        return Err(TimeError::OutOfRange);
    }
    Ok(day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_the_documented_ones() {
        assert_eq!(earliest().to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(latest().to_rfc3339(), "2100-01-01T00:00:00+00:00");
    }

    #[test]
    fn instants_are_normalised_and_bounded() {
        let at = parse_instant("2026-11-25T11:00:00.1234567+01:00").unwrap();
        assert_eq!(at.to_rfc3339(), "2026-11-25T10:00:00.123456+00:00");
        assert_eq!(
            parse_instant("2016-12-31T23:59:60Z"),
            Err(TimeError::LeapSecond)
        );
        assert_eq!(
            parse_instant("2016-12-31T23:59:60.5+00:00"),
            Err(TimeError::LeapSecond)
        );
        assert_eq!(
            parse_instant("1999-12-31T23:59:59Z"),
            Err(TimeError::OutOfRange)
        );
        assert_eq!(
            parse_instant("2100-01-01T00:00:00Z"),
            Err(TimeError::OutOfRange)
        );
        assert_eq!(
            parse_instant("+262142-01-01T00:00:00Z"),
            Err(TimeError::Unparsable)
        );
        assert_eq!(parse_instant("yesterday"), Err(TimeError::Unparsable));
        assert_eq!(parse_instant(""), Err(TimeError::Unparsable));
    }

    #[test]
    fn days_are_bounded() {
        assert_eq!(
            parse_day("2026-11-25").unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 25).unwrap()
        );
        for (raw, err) in [
            ("+262142-01-01", TimeError::Unparsable),
            ("262142-01-01", TimeError::Unparsable),
            ("-5000-01-01", TimeError::Unparsable),
            ("1970-01-01", TimeError::OutOfRange),
            ("2100-01-01", TimeError::OutOfRange),
            ("2026-02-30", TimeError::Unparsable),
            ("25/11/2026", TimeError::Unparsable),
            ("2026-1-5", TimeError::Unparsable),
        ] {
            assert_eq!(parse_day(raw), Err(err), "{raw}");
        }
    }
}
