//! The reads: `GET /v1/usage/events` (a bounded window, filtered, keyset-paginated, pages capped
//! by count and by bytes) and `GET /v1/usage/realtime` (a day's counters from Redis, or
//! recomputed from PostgreSQL when Redis cannot answer). Every query parameter is checked against
//! a bounded range before anything runs.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::time::{parse_day, parse_instant};
use meterbridge::domain::Classification;
use meterbridge::http::{json_response, json_text_response, ApiError};
use meterbridge::repo::usage_events::{self, EventFilter, ListPosition};
use serde::Serialize;

use crate::app::App;
use crate::cursor::{self, Cursor};
use meterbridge::usage_counters as counters;

const DEFAULT_PAGE_SIZE: i64 = 100;

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
    let window = window(
        app,
        param("from").map(|v| instant("from", v)).transpose()?,
        param("to").map(|v| instant("to", v)).transpose()?,
        param("cursor").map(cursor::decode).transpose()?,
    )?;

    let filter = EventFilter {
        metric,
        classification,
        after: window.after,
        to: window.to,
        limit: limit + 1,
    };
    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let events = usage_events::list(&mut tx, caller.tenant_id, &filter).await?;
    tx.commit().await.map_err(meterbridge::DbError::from)?;

    // The page: at most `limit` events and at most `max_page_bytes` of response, so no page
    // can outgrow Lambda's 6 MB response limit, whatever the events carry.
    let mut body = String::from("{\"events\":[");
    let mut used = 0;
    let mut last = None;
    let mut more = false;
    for (n, event) in events.iter().enumerate() {
        if n as i64 == limit {
            more = true;
            break;
        }
        let json = serde_json::to_string(event).map_err(|_| ApiError::Internal)?;
        let cost = escaped_len(&json) + 1;
        if last.is_some() && used + cost > app.config.max_page_bytes {
            more = true;
            break;
        }
        if last.is_some() {
            body.push(',');
        }
        body.push_str(&json);
        used += cost;
        last = Some(event);
    }
    body.push(']');
    if let (true, Some(event)) = (more, last) {
        let next = Cursor {
            position: ListPosition::of(event),
            from: window.from,
            to: window.to,
        };
        body.push_str(",\"nextCursor\":");
        body.push_str(&serde_json::Value::String(cursor::encode(&next)).to_string());
    }
    body.push('}');
    Ok(json_text_response(StatusCode::OK, body))
}

/// The window a listing reads, and where in it this page starts.
struct Window {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: ListPosition,
}

/// `to` defaults to now (plus the accepted clock skew), `from` to one `default_list_span`
/// before `to`; a cursor carries the window of the listing it continues. The window may span at
/// most `max_list_span`.
fn window(
    app: &App,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    cursor: Option<Cursor>,
) -> Result<Window, ApiError> {
    let window = match cursor {
        Some(c) => {
            if from.is_some_and(|f| f != c.from) || to.is_some_and(|t| t != c.to) {
                return Err(bad_param(
                    "cursor",
                    "belongs to a listing with another from/to window",
                ));
            }
            Window {
                from: c.from,
                to: c.to,
                after: c.position,
            }
        }
        None => {
            let to = to.unwrap_or_else(|| {
                app.services.clock.now() + app.config.event_limits.max_future_skew
            });
            let from = from.unwrap_or(to - app.config.default_list_span);
            Window {
                from,
                to,
                after: ListPosition::before(from),
            }
        }
    };
    if window.from >= window.to {
        return Err(bad_param("from", "must be before to"));
    }
    if window.to - window.from > app.config.max_list_span {
        return Err(bad_param(
            "from",
            &format!(
                "and to may be at most {} days apart; page through shorter windows",
                app.config.max_list_span.num_days()
            ),
        ));
    }
    Ok(window)
}

/// What `s` costs inside a JSON string (as the Lambda response envelope carries the body).
fn escaped_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
                0..=0x1f => 5,
                _ => 0,
            })
            .sum::<usize>()
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Realtime {
    pub date: NaiveDate,
    /// `redis`, or `postgres` when Redis could not answer or the day is older than the counters.
    pub source: &'static str,
    /// Units per metric on that UTC day; metrics with none are omitted. Exact at any size.
    pub counters: BTreeMap<String, i128>,
}

pub async fn realtime(
    app: &App,
    caller: &Caller,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let params = request.query_string_parameters();
    let now = app.services.clock.now();
    let date = match params
        .first("date")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => now.date_naive(),
        Some(v) => parse_day(v).map_err(|e| {
            bad_param(
                "date",
                &format!("must be a day, YYYY-MM-DD: {}", e.message()),
            )
        })?,
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

    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
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

pub(crate) fn bad_param(name: &str, problem: &str) -> ApiError {
    ApiError::Malformed(format!("query parameter {name} {problem}"))
}

pub(crate) fn instant(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    parse_instant(value).map_err(|e| bad_param(name, e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_lengths_count_what_json_adds() {
        assert_eq!(escaped_len("abc"), 3);
        assert_eq!(escaped_len(r#"{"a":"\\"}"#), 10 + 6);
        assert_eq!(escaped_len("\u{1}"), 6);
        assert_eq!(
            escaped_len("é"),
            2,
            "non-ASCII is sent as UTF-8, not escaped"
        );
        for s in ["{\"k\":\"v\\n\"}", "plain", "\"\"\"", "a\u{7}b\tc"] {
            assert_eq!(
                escaped_len(s),
                serde_json::Value::String(s.into()).to_string().len() - 2,
                "{s:?}"
            );
        }
    }
}
