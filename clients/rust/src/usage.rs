//! The usage reads: real-time counters, rollups and usage limits.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::Error;

/// A period type of the rollups and the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    /// ISO weeks (Monday 00:00 UTC); rollups only.
    Weekly,
    Monthly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
        }
    }
}

/// Where a figure was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Source {
    /// The real-time counters.
    Redis,
    /// Recomputed from the stored events (Redis was unreachable, or the day is older than
    /// the counters).
    Postgres,
    /// A source this version of the client does not know.
    #[serde(other)]
    Other,
}

/// A metric's classification, from the server's catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Classification {
    Billable,
    NonBillable,
    Info,
    #[serde(other)]
    Other,
}

/// `GET /v1/usage/realtime`: units per metric on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Realtime {
    pub date: NaiveDate,
    pub source: Source,
    /// Units per metric (metrics without units that day are absent). Exact at any size.
    pub counters: BTreeMap<String, u128>,
}

/// The parameters of [`Client::summary`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct SummaryQuery {
    pub period: Period,
    /// First period start day (inclusive); default 30 days / 12 weeks / 365 days before `to`.
    pub from: Option<NaiveDate>,
    /// Last period start day (inclusive); default today (UTC).
    pub to: Option<NaiveDate>,
    /// Only this metric.
    pub metric: Option<String>,
}

impl SummaryQuery {
    pub fn new(period: Period) -> Self {
        SummaryQuery {
            period,
            from: None,
            to: None,
            metric: None,
        }
    }

    pub fn from(mut self, day: NaiveDate) -> Self {
        self.from = Some(day);
        self
    }

    pub fn to(mut self, day: NaiveDate) -> Self {
        self.to = Some(day);
        self
    }

    pub fn metric(mut self, metric: impl Into<String>) -> Self {
        self.metric = Some(metric.into());
        self
    }
}

/// `GET /v1/usage/summary`: the tenant's rollups of one period type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Summary {
    pub period: Period,
    pub from: NaiveDate,
    pub to: NaiveDate,
    #[serde(default)]
    pub metric: Option<String>,
    pub aggregates: Vec<Aggregate>,
}

/// One metric's rollup over one period.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Aggregate {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub metric: String,
    pub classification: Classification,
    /// The exact sum of the quantities.
    #[serde(with = "crate::decimal")]
    pub total_quantity: u128,
    pub event_count: u64,
    pub distinct_actors: u64,
    /// The period ended more than the grace ago and is aggregated.
    #[serde(rename = "final")]
    pub is_final: bool,
    pub computed_at: DateTime<Utc>,
    /// Changes (late events, voids) after the rollup became final.
    pub revisions_after_final: u32,
    #[serde(default)]
    pub revised_at: Option<DateTime<Utc>>,
}

/// `GET /v1/usage/limits[/{metric}]`: the tenant's usage limits and what is left of each.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct UsageLimits {
    /// The metric asked for, with [`Client::metric_limits`].
    #[serde(default)]
    pub metric: Option<String>,
    pub limits: Vec<LimitStatus>,
}

/// One limit with the usage of its current period. Limits never refuse usage: what to do at
/// 100 % is the caller's decision.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct LimitStatus {
    pub metric: String,
    /// `daily` or `monthly`.
    pub period: Period,
    #[serde(with = "crate::decimal")]
    pub limit: u128,
    /// Percentages of the limit at which the server announces a crossing.
    pub thresholds: Vec<u32>,
    #[serde(with = "crate::decimal")]
    pub usage: u128,
    /// The limit less the usage, never below 0.
    #[serde(with = "crate::decimal")]
    pub remaining: u128,
    /// Usage in percent of the limit, two decimals rounded down; may exceed 100.
    pub percent: f64,
    /// The thresholds reached this period.
    pub reached: Vec<u32>,
    pub period_start: DateTime<Utc>,
    /// When the period ends and usage starts again from 0.
    pub resets_at: DateTime<Utc>,
    pub source: Source,
}

impl Client {
    /// `GET /v1/usage/realtime`: the tenant's units per metric on `date` (UTC; today when
    /// `None`). Needs a key with `usage:read`.
    pub async fn realtime(&self, date: Option<NaiveDate>) -> Result<Realtime, Error> {
        let transport = self.transport();
        let mut url = transport.usage_url(&["v1", "usage", "realtime"]);
        if let Some(date) = date {
            url.query_pairs_mut().append_pair("date", &date.to_string());
        }
        let (realtime, _) = transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(realtime)
    }

    /// `GET /v1/usage/summary`: the tenant's rollups (computed by the server's aggregation,
    /// so recent usage appears there after its next run). Needs `usage:read`.
    pub async fn summary(&self, query: &SummaryQuery) -> Result<Summary, Error> {
        let transport = self.transport();
        let mut url = transport.usage_url(&["v1", "usage", "summary"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("period", query.period.as_str());
            if let Some(from) = query.from {
                pairs.append_pair("from", &from.to_string());
            }
            if let Some(to) = query.to {
                pairs.append_pair("to", &to.to_string());
            }
            if let Some(metric) = &query.metric {
                pairs.append_pair("metric", metric);
            }
        }
        let (summary, _) = transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(summary)
    }

    /// `GET /v1/usage/limits`: every usage limit of the tenant with its current usage.
    /// Needs `usage:read`.
    pub async fn limits(&self) -> Result<UsageLimits, Error> {
        let transport = self.transport();
        let url = transport.usage_url(&["v1", "usage", "limits"]);
        let (limits, _) = transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(limits)
    }

    /// `GET /v1/usage/limits/{metric}`: one metric's limits (a metric without any is a `404`
    /// [`Error::Api`]).
    pub async fn metric_limits(&self, metric: &str) -> Result<UsageLimits, Error> {
        let transport = self.transport();
        let url = transport.usage_url(&["v1", "usage", "limits", metric]);
        let (limits, _) = transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_answers_read_into_their_types() {
        let realtime: Realtime = serde_json::from_str(
            r#"{"date": "2026-11-25", "source": "redis",
                "counters": {"api.requests": 9, "huge": 36893488147419103232}}"#,
        )
        .unwrap();
        assert_eq!(realtime.counters["api.requests"], 9);
        assert_eq!(realtime.counters["huge"], 1u128 << 65);
        let summary: Summary = serde_json::from_str(
            r#"{"period": "daily", "from": "2026-11-25", "to": "2026-11-25", "aggregates": [
              {"periodStart": "2026-11-25T00:00:00Z", "periodEnd": "2026-11-26T00:00:00Z",
               "metric": "api.requests", "classification": "BILLABLE", "totalQuantity": "42",
               "eventCount": 2, "distinctActors": 1, "final": false,
               "computedAt": "2026-11-25T21:10:02.1Z", "revisionsAfterFinal": 0}]}"#,
        )
        .unwrap();
        assert_eq!(summary.aggregates[0].total_quantity, 42);
        assert_eq!(
            summary.aggregates[0].classification,
            Classification::Billable
        );
        let limits: UsageLimits = serde_json::from_str(
            r#"{"metric": "api.requests", "limits": [
              {"metric": "api.requests", "period": "monthly", "limit": "1000000",
               "thresholds": [50, 80, 100], "usage": "812345", "remaining": "187655",
               "percent": 81.23, "reached": [50, 80], "periodStart": "2026-12-01T00:00:00Z",
               "resetsAt": "2027-01-01T00:00:00Z", "source": "redis"}]}"#,
        )
        .unwrap();
        assert_eq!(limits.limits[0].remaining, 187_655);
        assert_eq!(limits.limits[0].period, Period::Monthly);
        assert_eq!(limits.limits[0].source, Source::Redis);
    }
}
