//! Usage limits: a tenant's limit on one metric per UTC day or month, with thresholds in
//! percent of it. A limit never refuses usage (usage already happened; refusing it would lose
//! billing data): it answers how much is left, and a threshold crossed is announced once per
//! period by a `usage.threshold.crossed` event.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::period::{midnight, PeriodType};
use super::InvalidValue;

/// The largest limit: a threshold's quantity (at most [`MAX_THRESHOLD`] % of it) stays far below
/// 2^63.
pub const MAX_LIMIT: i64 = 100_000_000_000_000_000;
/// The largest threshold, in percent of the limit.
pub const MAX_THRESHOLD: u16 = 1000;
/// Thresholds per limit, at most.
pub const MAX_THRESHOLDS: usize = 10;
/// The thresholds of a limit set without any.
pub const DEFAULT_THRESHOLDS: [u16; 2] = [80, 100];

/// The period a limit counts over: a UTC day or a UTC calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitPeriod {
    Daily,
    Monthly,
}

impl LimitPeriod {
    pub const ALL: [LimitPeriod; 2] = [LimitPeriod::Daily, LimitPeriod::Monthly];

    pub fn as_str(self) -> &'static str {
        self.period_type().as_str()
    }

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        match value {
            "daily" => Ok(LimitPeriod::Daily),
            "monthly" => Ok(LimitPeriod::Monthly),
            _ => Err(InvalidValue::new("period", "must be daily or monthly")),
        }
    }

    /// The rollup period of the same span.
    pub fn period_type(self) -> PeriodType {
        match self {
            LimitPeriod::Daily => PeriodType::Daily,
            LimitPeriod::Monthly => PeriodType::Monthly,
        }
    }

    /// The first day of the period that holds `day`.
    pub fn start_of(self, day: NaiveDate) -> NaiveDate {
        self.period_type().start_of(day)
    }

    /// The period that holds `at`: its first instant, and the first instant after it (when the
    /// limit resets).
    pub fn window(self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let start = self.start_of(at.date_naive());
        let end = self.period_type().end_of(start).unwrap_or(NaiveDate::MAX);
        (midnight(start), midnight(end))
    }

    /// The period before the one that holds `at`.
    pub fn previous_window(self, at: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let (start, _) = self.window(at);
        self.window(start - chrono::Duration::days(1))
    }
}

/// A tenant's limit on one metric and period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLimit {
    pub metric: String,
    pub period: LimitPeriod,
    /// 1..=[`MAX_LIMIT`] units of the metric per period.
    pub limit: i64,
    /// Percent of the limit, ascending and distinct, each 1..=[`MAX_THRESHOLD`].
    pub thresholds: Vec<u16>,
}

impl UsageLimit {
    /// A limit as an operator asks for it: thresholds sorted and deduplicated, the defaults
    /// ([`DEFAULT_THRESHOLDS`]) when none are named.
    pub fn new(
        metric: &str,
        period: LimitPeriod,
        limit: u64,
        thresholds: Option<Vec<u16>>,
    ) -> Result<Self, InvalidValue> {
        let limit = i64::try_from(limit)
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                InvalidValue::new("limit", format!("must be 1 to {MAX_LIMIT} (10^17)"))
            })?;
        let mut thresholds = thresholds.unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec());
        thresholds.sort_unstable();
        thresholds.dedup();
        if thresholds.is_empty() || thresholds.len() > MAX_THRESHOLDS {
            return Err(InvalidValue::new(
                "thresholds",
                format!("name 1 to {MAX_THRESHOLDS} thresholds"),
            ));
        }
        if thresholds.iter().any(|t| !(1..=MAX_THRESHOLD).contains(t)) {
            return Err(InvalidValue::new(
                "thresholds",
                format!("each is a percent of the limit, 1 to {MAX_THRESHOLD}"),
            ));
        }
        Ok(UsageLimit {
            metric: metric.to_owned(),
            period,
            limit,
            thresholds,
        })
    }

    /// The usage at which `percent` is reached: `ceil(limit * percent / 100)`.
    pub fn threshold_quantity(&self, percent: u16) -> i128 {
        let scaled = i128::from(self.limit) * i128::from(percent);
        (scaled + 99).div_euclid(100)
    }

    /// The thresholds a change of usage from `before` to `after` crosses upwards.
    pub fn crossed_between(&self, before: i128, after: i128) -> Vec<u16> {
        self.thresholds
            .iter()
            .copied()
            .filter(|t| {
                let q = self.threshold_quantity(*t);
                before < q && q <= after
            })
            .collect()
    }

    /// The thresholds `usage` has reached.
    pub fn reached_at(&self, usage: i128) -> Vec<u16> {
        self.thresholds
            .iter()
            .copied()
            .filter(|t| self.threshold_quantity(*t) <= usage)
            .collect()
    }

    /// What the read API answers for `usage` in the period that holds `now`.
    pub fn status(&self, usage: i128, now: DateTime<Utc>, source: UsageSource) -> LimitStatus {
        let (start, resets_at) = self.period.window(now);
        let limit = i128::from(self.limit);
        let usage = usage.max(0);
        // Two decimals, rounded down: 99.999 % is not shown as 100 %.
        let hundredths = usage.saturating_mul(10_000) / limit;
        LimitStatus {
            metric: self.metric.clone(),
            period: self.period,
            limit: self.limit.to_string(),
            thresholds: self.thresholds.clone(),
            usage: usage.to_string(),
            remaining: (limit - usage).max(0).to_string(),
            percent: hundredths as f64 / 100.0,
            reached: self.reached_at(usage),
            period_start: start,
            resets_at,
            source,
        }
    }
}

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The real-time counters.
    Redis,
    /// The rollups and the events committed since (Redis was unreachable).
    Postgres,
}

/// A limit with the usage of its current period, as the read API answers it. Quantities are
/// decimal strings (exact at any size).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitStatus {
    pub metric: String,
    pub period: LimitPeriod,
    pub limit: String,
    pub thresholds: Vec<u16>,
    pub usage: String,
    /// The limit less the usage, never below 0.
    pub remaining: String,
    /// Usage in percent of the limit (two decimals, rounded down; may exceed 100).
    pub percent: f64,
    /// The thresholds the usage has reached.
    pub reached: Vec<u16>,
    pub period_start: DateTime<Utc>,
    pub resets_at: DateTime<Utc>,
    pub source: UsageSource,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(value: u64, thresholds: &[u16]) -> UsageLimit {
        UsageLimit::new(
            "api.requests",
            LimitPeriod::Monthly,
            value,
            Some(thresholds.to_vec()),
        )
        .unwrap()
    }

    #[test]
    fn limits_and_thresholds_are_bounded() {
        let ok = |v, t: Option<Vec<u16>>| UsageLimit::new("m.x", LimitPeriod::Daily, v, t);
        assert!(ok(0, None).is_err());
        assert!(ok(i64::MAX as u64, None).is_err());
        assert!(ok(u64::MAX, None).is_err());
        assert!(ok(MAX_LIMIT as u64 + 1, None).is_err());
        assert_eq!(ok(MAX_LIMIT as u64, None).unwrap().thresholds, [80, 100]);
        assert!(ok(10, Some(vec![])).is_err());
        assert!(ok(10, Some(vec![0])).is_err());
        assert!(ok(10, Some(vec![1001])).is_err());
        assert!(ok(10, Some((1..=11).collect())).is_err());
        assert_eq!(
            ok(10, Some(vec![100, 50, 80, 50])).unwrap().thresholds,
            [50, 80, 100]
        );
    }

    #[test]
    fn a_threshold_is_crossed_once_on_the_way_up() {
        let l = limit(1000, &[50, 80, 100]);
        assert_eq!(l.threshold_quantity(80), 800);
        assert_eq!(l.crossed_between(0, 499), Vec::<u16>::new());
        assert_eq!(l.crossed_between(499, 500), [50]);
        assert_eq!(l.crossed_between(500, 900), [80]);
        assert_eq!(l.crossed_between(0, 5000), [50, 80, 100]);
        // Down (a void) never crosses.
        assert_eq!(l.crossed_between(900, 100), Vec::<u16>::new());
        // A quantity that is not a whole unit rounds up: 80 % of 7 is 5.6, reached at 6.
        let l = limit(7, &[80]);
        assert_eq!(l.threshold_quantity(80), 6);
        assert_eq!(l.crossed_between(5, 6), [80]);
        // The largest limit and threshold stay exact.
        let l = limit(MAX_LIMIT as u64, &[1000]);
        assert_eq!(l.threshold_quantity(1000), i128::from(MAX_LIMIT) * 10);
    }

    #[test]
    fn the_status_says_what_is_left_and_when_it_resets() {
        let at = DateTime::parse_from_rfc3339("2026-12-31T23:59:59Z")
            .unwrap()
            .with_timezone(&Utc);
        let s = limit(1000, &[50, 80, 100]).status(812, at, UsageSource::Redis);
        assert_eq!((s.usage.as_str(), s.remaining.as_str()), ("812", "188"));
        assert_eq!(s.percent, 81.2);
        assert_eq!(s.reached, [50, 80]);
        assert_eq!(s.period_start.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(s.resets_at.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        let over = limit(1000, &[100]).status(2500, at, UsageSource::Postgres);
        assert_eq!((over.remaining.as_str(), over.percent), ("0", 250.0));
        let almost = limit(3, &[100]).status(2, at, UsageSource::Redis);
        assert_eq!(almost.percent, 66.66);
        let (start, end) = LimitPeriod::Daily.previous_window(at);
        assert_eq!(
            (start.to_rfc3339(), end.to_rfc3339()),
            (
                "2026-12-30T00:00:00+00:00".into(),
                "2026-12-31T00:00:00+00:00".into()
            )
        );
        let (start, _) = LimitPeriod::Monthly.previous_window(at);
        assert_eq!(start.to_rfc3339(), "2026-11-01T00:00:00+00:00");
    }
}
