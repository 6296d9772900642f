//! `GET /v1/usage/limits` and `GET /v1/usage/limits/{metric}`: the tenant's usage limits with
//! the usage of their current period — how much is left, the percentage, the thresholds reached,
//! when the period resets — from the real-time counters in one Redis round trip, or, when Redis
//! is out of reach, from the rollups and the events committed since. Limits never refuse
//! usage: what to do at 100 % is the caller's decision, made from this answer.

use lambda_http::http::StatusCode;
use lambda_http::{Body, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::usage_limit::{LimitPeriod, LimitStatus, UsageLimit, UsageSource};
use meterbridge::http::{json_response, ApiError};
use meterbridge::repo::usage_aggregates;
use meterbridge::usage_counters::{self as counters, Cell};
use meterbridge::DbError;
use serde::Serialize;

use crate::app::App;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    metric: Option<String>,
    limits: Vec<LimitStatus>,
}

/// The tenant's limits (of one metric when named), each with its current usage.
pub async fn limits(
    app: &App,
    caller: &Caller,
    metric: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    if let Some(name) = metric {
        if app.catalog().await?.get(name).is_none() {
            return Err(ApiError::Malformed(format!(
                "metric {:?} is not in the metric catalog",
                truncated(name)
            )));
        }
    }
    let all = app.usage_limits(caller.tenant_id).await?;
    let chosen: Vec<&UsageLimit> = all
        .iter()
        .filter(|l| metric.is_none_or(|m| l.metric == m))
        .collect();
    if let (Some(name), true) = (metric, chosen.is_empty()) {
        return Err(ApiError::NotFound(format!("no usage limit on {name:?}")));
    }
    let now = app.services.clock.now();
    let (usage, source) = usage_of(app, caller, &chosen, now).await?;
    let limits = chosen
        .iter()
        .zip(usage)
        .map(|(limit, used)| limit.status(used, now, source))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &Limits {
            metric: metric.map(str::to_owned),
            limits,
        },
    ))
}

/// The usage of each limit's current period: the counters, or PostgreSQL when Redis fails.
async fn usage_of(
    app: &App,
    caller: &Caller,
    limits: &[&UsageLimit],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Vec<i128>, UsageSource), ApiError> {
    if limits.is_empty() {
        return Ok((Vec::new(), UsageSource::Redis));
    }
    if let Some(redis) = &app.services.redis {
        let today = now.date_naive();
        let cells: Vec<Cell> = limits
            .iter()
            .map(|l| match l.period {
                LimitPeriod::Daily => Cell::day(today, &l.metric),
                LimitPeriod::Monthly => Cell::month(today, &l.metric),
            })
            .collect();
        match counters::read(redis, caller.tenant_id, &cells).await {
            Ok(values) => {
                return Ok((
                    values.into_iter().map(|v| v.unwrap_or(0)).collect(),
                    UsageSource::Redis,
                ))
            }
            Err(e) => {
                metrics::counter!("RedisCounterFailures").increment(1);
                tracing::warn!(error = %e, "usage limits read from PostgreSQL: Redis failed");
            }
        }
    }
    let cells: Vec<_> = limits
        .iter()
        .map(|l| {
            let (start, end) = l.period.window(now);
            (l.metric.as_str(), l.period.period_type(), start, end)
        })
        .collect();
    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let usage = usage_aggregates::current_totals(&mut tx, caller.tenant_id, &cells).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok((usage, UsageSource::Postgres))
}

/// A name as an error message may quote it: at most 64 characters.
fn truncated(name: &str) -> String {
    name.chars().take(64).collect()
}
