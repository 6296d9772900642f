//! Aggregation periods: a UTC day, an ISO week (Monday to Monday) or a calendar month in UTC.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use super::InvalidValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodType {
    Daily,
    Weekly,
    Monthly,
}

impl PeriodType {
    pub const ALL: [PeriodType; 3] = [PeriodType::Daily, PeriodType::Weekly, PeriodType::Monthly];

    /// As stored in `usage_aggregates.period_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            PeriodType::Daily => "daily",
            PeriodType::Weekly => "weekly",
            PeriodType::Monthly => "monthly",
        }
    }

    /// The `date_trunc` unit of the period.
    pub fn unit(self) -> &'static str {
        match self {
            PeriodType::Daily => "day",
            PeriodType::Weekly => "week",
            PeriodType::Monthly => "month",
        }
    }

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        match value {
            "daily" => Ok(PeriodType::Daily),
            "weekly" => Ok(PeriodType::Weekly),
            "monthly" => Ok(PeriodType::Monthly),
            _ => Err(InvalidValue::new(
                "period",
                "must be one of daily, weekly, monthly",
            )),
        }
    }

    /// The first day of the period that contains `day`.
    pub fn start_of(self, day: NaiveDate) -> NaiveDate {
        match self {
            PeriodType::Daily => day,
            PeriodType::Weekly => {
                day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            PeriodType::Monthly => day.with_day(1).unwrap_or(day),
        }
    }

    /// The first day after the period that starts on `start`.
    pub fn end_of(self, start: NaiveDate) -> Option<NaiveDate> {
        match self {
            PeriodType::Daily => start.succ_opt(),
            PeriodType::Weekly => start.checked_add_signed(Duration::days(7)),
            PeriodType::Monthly => start.checked_add_months(Months::new(1)),
        }
    }
}

impl fmt::Display for PeriodType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Midnight UTC of `day`.
pub fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn periods_start_on_utc_days_iso_mondays_and_firsts() {
        // 2026-11-25 is a Wednesday.
        assert_eq!(PeriodType::Daily.start_of(d(2026, 11, 25)), d(2026, 11, 25));
        assert_eq!(
            PeriodType::Weekly.start_of(d(2026, 11, 25)),
            d(2026, 11, 23)
        );
        assert_eq!(
            PeriodType::Weekly.start_of(d(2026, 11, 23)),
            d(2026, 11, 23)
        );
        assert_eq!(
            PeriodType::Weekly.start_of(d(2026, 11, 22)),
            d(2026, 11, 16)
        );
        // An ISO week across a year.
        assert_eq!(PeriodType::Weekly.start_of(d(2027, 1, 1)), d(2026, 12, 28));
        assert_eq!(
            PeriodType::Monthly.start_of(d(2026, 11, 30)),
            d(2026, 11, 1)
        );
        assert_eq!(
            PeriodType::Monthly.end_of(d(2026, 12, 1)),
            Some(d(2027, 1, 1))
        );
        assert_eq!(
            PeriodType::Monthly.end_of(d(2027, 2, 1)),
            Some(d(2027, 3, 1))
        );
        assert_eq!(
            PeriodType::Weekly.end_of(d(2026, 12, 28)),
            Some(d(2027, 1, 4))
        );
    }

    #[test]
    fn period_names_round_trip() {
        for p in PeriodType::ALL {
            assert_eq!(PeriodType::parse(p.as_str()).unwrap(), p);
        }
        assert!(PeriodType::parse("hourly").is_err());
        assert!(PeriodType::parse("Daily").is_err());
    }
}
