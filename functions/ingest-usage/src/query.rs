//! The reads: `GET /v1/usage/events` (filtered, keyset-paginated) and `GET /v1/usage/realtime`
//! (today's counters from Redis, or recomputed from PostgreSQL when Redis cannot answer).

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::Classification;
use meterbridge::http::{json_response, ApiError};
use meterbridge::repo::usage_events::{self, EventFilter, StoredUsageEvent};
use serde::Serialize;

use crate::app::App;
use crate::counters;

const DEFAULT_PAGE_SIZE: i64 = 100;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub events: Vec<StoredUsageEvent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

pub async fn list_events(
    app: &App,
    caller: &Caller,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let params = request.query_string_parameters();
    let param = |name: &str| params.first(name).map(str::trim).filter(|v| !v.is_empty());

    let metric = match param("metric") {
        Some(name) => {
            let catalog = app.catalog().await?;
            if catalog.get(name).is_none() {
                return Err(bad_param("metric", "is not in the metric catalog"));
            }
            Some(name.to_owned())
        }
        None => None,
    };
    let classification = param("classification")
        .map(|c| {
            c.parse::<Classification>()
                .map_err(|e| bad_param("classification", &e.message))
        })
        .transpose()?;
    let from = param("from").map(|v| timestamp("from", v)).transpose()?;
    let to = param("to").map(|v| timestamp("to", v)).transpose()?;
    let limit = match param("limit") {
        None => DEFAULT_PAGE_SIZE,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=app.config.max_page_size).contains(n))
            .ok_or_else(|| {
                bad_param(
                    "limit",
                    &format!(
                        "must be a whole number from 1 to {}",
                        app.config.max_page_size
                    ),
                )
            })?,
    };
    let after = param("cursor").map(decode_cursor).transpose()?;

    let filter = EventFilter {
        metric,
        classification,
        from,
        to,
        after,
        limit: limit + 1,
    };
    let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
    let mut events = usage_events::list(&mut tx, caller.tenant_id, &filter).await?;
    tx.commit().await.map_err(meterbridge::DbError::from)?;

    let next_cursor = if events.len() as i64 > limit {
        events.truncate(limit as usize);
        events
            .last()
            .map(|e| encode_cursor(e.occurred_at, &e.event_id))
    } else {
        None
    };
    Ok(json_response(
        StatusCode::OK,
        &EventPage {
            events,
            next_cursor,
        },
    ))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Realtime {
    pub date: NaiveDate,
    /// `redis`, or `postgres` when Redis could not answer or the day is older than the counters.
    pub source: &'static str,
    /// Units per metric on that UTC day; metrics with none are omitted.
    pub counters: BTreeMap<String, i64>,
}

pub async fn realtime(
    app: &App,
    caller: &Caller,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let params = request.query_string_parameters();
    let now = Utc::now();
    let date = match params
        .first("date")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => now.date_naive(),
        Some(v) => NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map_err(|_| bad_param("date", "must be a date: YYYY-MM-DD"))?,
    };

    if let Some(redis) = &app.services.redis {
        if counters::day_is_counted(date, now, app.config.counter_ttl_days) {
            let catalog = app.catalog().await?;
            match counters::read_day(redis, caller.tenant_id, date, catalog.names()).await {
                Ok(counters) => {
                    return Ok(json_response(
                        StatusCode::OK,
                        &Realtime {
                            date,
                            source: "redis",
                            counters,
                        },
                    ));
                }
                Err(e) => {
                    metrics::counter!("RedisReadFailures").increment(1);
                    tracing::warn!(error = %e, "redis unavailable; computing real-time counters from PostgreSQL");
                }
            }
        }
    }

    let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
    let totals = usage_events::day_totals(&mut tx, caller.tenant_id, date).await?;
    tx.commit().await.map_err(meterbridge::DbError::from)?;
    Ok(json_response(
        StatusCode::OK,
        &Realtime {
            date,
            source: "postgres",
            counters: totals.into_iter().collect(),
        },
    ))
}

fn bad_param(name: &str, problem: &str) -> ApiError {
    ApiError::Malformed(format!("query parameter {name} {problem}"))
}

fn timestamp(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| bad_param(name, "must be an RFC 3339 timestamp"))
}

/// Cursors are opaque to clients: base64url of `<occurredAt>|<eventId>`.
fn encode_cursor(at: DateTime<Utc>, event_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}|{event_id}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    ))
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, String), ApiError> {
    let invalid = || bad_param("cursor", "is not a cursor this API returned");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (at, id) = text.split_once('|').ok_or_else(invalid)?;
    let at = DateTime::parse_from_rfc3339(at)
        .map_err(|_| invalid())?
        .with_timezone(&Utc);
    Ok((at, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let at = DateTime::parse_from_rfc3339("2026-11-25T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let cursor = encode_cursor(at, "evt|1");
        assert_eq!(decode_cursor(&cursor).unwrap(), (at, "evt|1".to_owned()));
        assert!(decode_cursor("not a cursor").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("x|y")).is_err());
    }
}
