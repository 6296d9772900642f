//! Real-time counters in Redis: `INCRBY usage:{tenant}:{day}:{metric}` for accepted events after
//! the commit, and their reads. Redis is a cache of PostgreSQL here: a failure is logged and
//! counted, never passed on to the caller (aggregate-usage repairs counters from PostgreSQL).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use meterbridge::domain::usage::UsageEvent;
use meterbridge::domain::TenantId;
use meterbridge::redis::{keys, Redis, RedisError};

/// Whether an event's day still has a live counter (days older than the TTL skip Redis).
pub fn day_is_counted(day: NaiveDate, now: DateTime<Utc>, ttl_days: i64) -> bool {
    day > now.date_naive() - Duration::days(ttl_days)
}

/// Adds accepted events to their day's counters in one atomic pipeline. Returns how many
/// counters were incremented; `Err` only to let the caller log and count the failure.
pub async fn add(
    redis: &Redis,
    tenant: TenantId,
    events: &[&UsageEvent],
    now: DateTime<Utc>,
    ttl_days: i64,
) -> Result<usize, RedisError> {
    let mut sums: BTreeMap<(NaiveDate, &str), i64> = BTreeMap::new();
    for e in events {
        let day = e.occurred_at.date_naive();
        if day_is_counted(day, now, ttl_days) {
            *sums.entry((day, e.metric.as_str())).or_default() += e.quantity;
        }
    }
    if sums.is_empty() {
        return Ok(0);
    }
    let ttl_secs = ttl_days * 86_400;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for ((day, metric), quantity) in &sums {
        let key = keys::usage_counter(tenant, *day, metric);
        pipe.cmd("INCRBY").arg(&key).arg(*quantity).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(ttl_secs).ignore();
    }
    let mut conn = redis.connection().await?;
    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
        redis.forget_connection_on(&e).await;
        return Err(e.into());
    }
    Ok(sums.len())
}

/// The counters of one tenant and day for the given metrics (absent counters are omitted).
pub async fn read_day<'m>(
    redis: &Redis,
    tenant: TenantId,
    day: NaiveDate,
    metrics: impl Iterator<Item = &'m str>,
) -> Result<BTreeMap<String, i64>, RedisError> {
    let metrics: Vec<&str> = metrics.collect();
    if metrics.is_empty() {
        return Ok(BTreeMap::new());
    }
    let keys: Vec<String> = metrics
        .iter()
        .map(|m| keys::usage_counter(tenant, day, m))
        .collect();
    let mut conn = redis.connection().await?;
    let values: Vec<Option<i64>> = match redis::cmd("MGET").arg(&keys).query_async(&mut conn).await
    {
        Ok(values) => values,
        Err(e) => {
            redis.forget_connection_on(&e).await;
            return Err(e.into());
        }
    };
    Ok(metrics
        .into_iter()
        .zip(values)
        .filter_map(|(m, v)| v.filter(|n| *n != 0).map(|n| (m.to_owned(), n)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_days_within_the_ttl_are_counted() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T00:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        assert!(day_is_counted(day(25), now, 7));
        assert!(day_is_counted(day(19), now, 7));
        assert!(!day_is_counted(day(18), now, 7));
    }
}
