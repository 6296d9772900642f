//! `GET /v1/usage/summary?period=daily|weekly|monthly&from=&to=&metric=`: the tenant's rollups
//! from `usage_aggregates` (one primary-key range), each with `final` and `computedAt` so the
//! caller knows how settled and how fresh it is. `from` and `to` are UTC days (inclusive): the
//! periods that start between them. The range is bounded per period type, and so is the answer.

use chrono::{Duration, NaiveDate};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::period::{midnight, PeriodType};
use meterbridge::domain::time::parse_day;
use meterbridge::http::{json_response, ApiError};
use meterbridge::repo::usage_aggregates::{self, Aggregate};
use meterbridge::DbError;
use serde::Serialize;

use crate::app::App;
use crate::query::bad_param;

/// Most rows one answer carries (a range of every metric in the catalog stays far below).
pub const MAX_ROWS: i64 = 10_000;

/// The longest range per period type, and the default when `from` is absent.
fn span(period: PeriodType) -> (Duration, Duration) {
    match period {
        PeriodType::Daily => (Duration::days(92), Duration::days(30)),
        PeriodType::Weekly => (Duration::weeks(53), Duration::weeks(12)),
        PeriodType::Monthly => (Duration::days(731), Duration::days(365)),
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary {
    period: PeriodType,
    from: NaiveDate,
    to: NaiveDate,
    #[serde(skip_serializing_if = "Option::is_none")]
    metric: Option<String>,
    aggregates: Vec<Aggregate>,
}

pub async fn summary(
    app: &App,
    caller: &Caller,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let params = request.query_string_parameters();
    let param = |name: &str| params.first(name).map(str::trim).filter(|v| !v.is_empty());
    let period = PeriodType::parse(
        param("period")
            .ok_or_else(|| bad_param("period", "is required: daily, weekly or monthly"))?,
    )
    .map_err(|_| bad_param("period", "must be daily, weekly or monthly"))?;
    let day = |name: &str| {
        param(name)
            .map(|v| {
                parse_day(v).map_err(|e| {
                    bad_param(name, &format!("must be a day, YYYY-MM-DD: {}", e.message()))
                })
            })
            .transpose()
    };
    let (max_span, default_span) = span(period);
    let to = day("to")?.unwrap_or_else(|| app.services.clock.now().date_naive());
    let from = day("from")?.unwrap_or(to - default_span);
    if from > to {
        return Err(bad_param("from", "must not be after to"));
    }
    if to - from > max_span {
        return Err(bad_param(
            "from",
            &format!(
                "and to may be at most {} days apart for {period} periods",
                max_span.num_days()
            ),
        ));
    }
    let metric = match param("metric") {
        Some(name) => {
            if app.catalog().await?.get(name).is_none() {
                return Err(bad_param("metric", "is not in the metric catalog"));
            }
            Some(name.to_owned())
        }
        None => None,
    };
    let end = to
        .succ_opt()
        .ok_or_else(|| bad_param("to", "is out of range"))?;

    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let aggregates = usage_aggregates::summary(
        &mut tx,
        caller.tenant_id,
        period,
        midnight(from),
        midnight(end),
        metric.as_deref(),
        MAX_ROWS + 1,
    )
    .await?;
    tx.commit().await.map_err(DbError::from)?;
    if aggregates.len() as i64 > MAX_ROWS {
        return Err(bad_param(
            "from",
            &format!(
                "and to cover more than {MAX_ROWS} aggregates; narrow the range or name a metric"
            ),
        ));
    }
    Ok(json_response(
        StatusCode::OK,
        &Summary {
            period,
            from,
            to,
            metric,
            aggregates,
        },
    ))
}
