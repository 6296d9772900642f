//! `GET /api/v1/meters/{slug}/query`: a meter's usage in OpenMeter's shape,
//! `{from, to, windowSize, data: [{value, windowStart, windowEnd, subject, groupBy}]}` — the
//! sum of the quantities of the meter's events (its metric, stored from CloudEvents of its
//! type, not voided) per UTC window, subject and groupBy values. Parameters, of OpenMeter's
//! that map: `from`, `to` (RFC 3339; `[from, to)`), `windowSize` (HOUR, DAY, MONTH),
//! `windowTimeZone` (UTC only), `subject` (repeatable: only these subjects, one row each),
//! `groupBy` (repeatable: `subject` or the meter's groupBy keys), `filterGroupBy[key]=value`,
//! `clientId` (ignored). Each range is bounded per window size, and so are the events one
//! query reads and the rows it answers (see the repository function).

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, Utc};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::meter_query::{clip, spans, WindowSize};
use meterbridge::http::{json_response, ApiError};
use meterbridge::repo::meter_usage::{self, MeterUsage, MeterUsageQuery};
use meterbridge::DbError;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::query::{bad_param, instant};

/// Most events of the meter's metric one query reads.
pub const MAX_SCANNED_EVENTS: i64 = 1_000_000;
/// Most rows one answer carries.
pub const MAX_ROWS: i64 = 10_000;
/// Most subjects one query names.
pub const MAX_SUBJECTS: usize = 100;
/// The longest subject (an actor id).
const MAX_SUBJECT_CHARS: usize = 128;
/// The longest groupBy value a filter names.
const MAX_FILTER_CHARS: usize = 1024;

/// OpenMeter's parameters this endpoint does not offer: refused rather than ignored, so a
/// caller never reads an unfiltered answer as a filtered one.
const UNSUPPORTED: [&str; 2] = ["filterCustomerId", "advancedMeterGroupByFilters"];

/// What the query string asks, checked.
#[derive(Debug)]
struct Params {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    window: Option<WindowSize>,
    subjects: Option<Vec<String>>,
    by_subject: bool,
    group_by: Vec<String>,
    group_filter: Map<String, Value>,
}

fn params(
    request: &Request,
    group_keys: &BTreeSet<&str>,
    now: DateTime<Utc>,
) -> Result<Params, ApiError> {
    let query = request.query_string_parameters();
    let first = |name: &str| query.first(name).map(str::trim).filter(|v| !v.is_empty());
    let all = |name: &str| query.all(name).unwrap_or_default();
    for name in UNSUPPORTED {
        if query.first(name).is_some()
            || query
                .iter()
                .any(|(k, _)| k.starts_with(&format!("{name}[")))
        {
            return Err(bad_param(name, "is not supported"));
        }
    }
    let window = first("windowSize")
        .map(|w| WindowSize::parse(w).map_err(|e| bad_param("windowSize", &e.message)))
        .transpose()?;
    if let Some(zone) = first("windowTimeZone") {
        if zone != "UTC" && zone != "Etc/UTC" {
            return Err(bad_param("windowTimeZone", "must be UTC: windows are UTC"));
        }
    }
    let (max_span, default_span) = spans(window);
    let to = first("to").map(|v| instant("to", v)).transpose()?;
    let to = to.unwrap_or(now);
    let from = match first("from") {
        Some(v) => instant("from", v)?,
        None => to - default_span,
    };
    if from >= to {
        return Err(bad_param("from", "must be before to"));
    }
    if to - from > max_span {
        return Err(bad_param(
            "from",
            &format!(
                "and to may be at most {} days apart{}",
                max_span.num_days(),
                window.map_or(String::new(), |w| format!(
                    " for windowSize {}",
                    w.trunc_unit().to_uppercase()
                ))
            ),
        ));
    }

    let subjects: Vec<String> = all("subject").into_iter().map(str::to_owned).collect();
    if subjects.len() > MAX_SUBJECTS {
        return Err(bad_param(
            "subject",
            &format!("may be given at most {MAX_SUBJECTS} times"),
        ));
    }
    if subjects
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_SUBJECT_CHARS)
    {
        return Err(bad_param(
            "subject",
            &format!("must be 1-{MAX_SUBJECT_CHARS} characters"),
        ));
    }

    let mut by_subject = !subjects.is_empty();
    let mut group_by = Vec::new();
    for key in all("groupBy")
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        if key == "subject" {
            by_subject = true;
        } else if !group_keys.contains(key) {
            return Err(bad_param(
                "groupBy",
                &format!("{key:?} is not one of the meter's groupBy keys, nor subject"),
            ));
        } else if !group_by.iter().any(|k| k == key) {
            group_by.push(key.to_owned());
        }
    }

    let mut group_filter = Map::new();
    for (name, value) in query.iter() {
        let Some(key) = name
            .strip_prefix("filterGroupBy[")
            .and_then(|k| k.strip_suffix(']'))
        else {
            continue;
        };
        if !group_keys.contains(key) {
            return Err(bad_param(
                "filterGroupBy",
                &format!("{key:?} is not one of the meter's groupBy keys"),
            ));
        }
        if value.is_empty() || value.chars().count() > MAX_FILTER_CHARS {
            return Err(bad_param(
                "filterGroupBy",
                &format!("values are 1-{MAX_FILTER_CHARS} characters"),
            ));
        }
        if group_filter
            .insert(key.to_owned(), Value::String(value.to_owned()))
            .is_some()
        {
            return Err(bad_param(
                "filterGroupBy",
                &format!("names {key:?} more than once"),
            ));
        }
    }

    Ok(Params {
        from,
        to,
        window,
        subjects: (!subjects.is_empty()).then_some(subjects),
        by_subject,
        group_by,
        group_filter,
    })
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A sum as a JSON number: exact as an integer wherever it fits 64 bits.
fn number(value: i128) -> Value {
    i64::try_from(value)
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(value as f64))
}

pub async fn query(
    app: &App,
    caller: &Caller,
    slug: &str,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let meters = app.meters(caller.tenant_id).await?;
    let meter = meters
        .iter()
        .find(|m| m.slug == slug)
        .ok_or_else(|| ApiError::NotFound("no such meter".into()))?;
    let group_keys: BTreeSet<&str> = meter.group_by.keys().map(String::as_str).collect();
    let p = params(request, &group_keys, app.services.clock.now())?;

    let group_filter = Value::Object(p.group_filter.clone());
    let q = MeterUsageQuery {
        event_type: &meter.event_type,
        metric: &meter.metric,
        from: p.from,
        to: p.to,
        window: p.window,
        subjects: p.subjects.as_deref(),
        by_subject: p.by_subject,
        group_by: &p.group_by,
        group_filter: &group_filter,
        max_scanned: MAX_SCANNED_EVENTS,
        max_rows: MAX_ROWS,
    };
    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let usage = meter_usage::query(&mut tx, caller.tenant_id, &q).await?;
    tx.commit().await.map_err(DbError::from)?;
    let rows = match usage {
        MeterUsage::Rows(rows) => rows,
        MeterUsage::TooManyEvents => {
            return Err(bad_param(
                "from",
                &format!(
                    "and to cover more than {MAX_SCANNED_EVENTS} events of the metric; narrow the range"
                ),
            ))
        }
        MeterUsage::TooManyRows => {
            return Err(bad_param(
                "from",
                &format!(
                    "and to give more than {MAX_ROWS} rows; narrow the range, the subjects or the groupBy keys"
                ),
            ))
        }
    };
    let data: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let (start, end) = clip(p.window, row.window_start, p.from, p.to);
            json!({
                "value": number(row.value),
                "windowStart": rfc3339(start),
                "windowEnd": rfc3339(end),
                "subject": row.subject,
                "groupBy": row.group_by,
            })
        })
        .collect();
    let mut body = json!({"from": rfc3339(p.from), "to": rfc3339(p.to), "data": data});
    if let Some(window) = p.window {
        body["windowSize"] = json!(window);
    }
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> Request {
        let mut map = std::collections::HashMap::<String, Vec<String>>::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.entry(k.into()).or_default().push(v.into());
        }
        Request::default().with_query_string_parameters(map)
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-15T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn keys() -> BTreeSet<&'static str> {
        BTreeSet::from(["model", "region"])
    }

    fn parse(query: &str) -> Result<Params, ApiError> {
        params(&request(query), &keys(), now())
    }

    #[test]
    fn defaults_reach_back_from_now() {
        let p = parse("").unwrap();
        assert_eq!((p.to, p.to - p.from), (now(), chrono::Duration::days(30)));
        assert!(p.window.is_none() && !p.by_subject && p.group_by.is_empty());
        let p = parse("windowSize=HOUR&to=2026-03-01T00:00:00Z").unwrap();
        assert_eq!(p.to - p.from, chrono::Duration::days(1));
    }

    #[test]
    fn subjects_and_group_keys_shape_the_rows() {
        let p = parse("subject=a&subject=b&groupBy=model&groupBy=model,region").unwrap();
        assert_eq!(p.subjects.unwrap(), vec!["a", "b"]);
        assert!(p.by_subject);
        assert_eq!(p.group_by, vec!["model", "region"]);
        let p = parse("groupBy=subject&filterGroupBy[region]=eu").unwrap();
        assert!(p.by_subject && p.subjects.is_none());
        assert_eq!(p.group_filter.get("region"), Some(&json!("eu")));
    }

    #[test]
    fn every_parameter_is_bounded() {
        let too_many = (0..=MAX_SUBJECTS)
            .map(|i| format!("subject=s{i}"))
            .collect::<Vec<_>>()
            .join("&");
        for bad in [
            "windowSize=MINUTE",
            "windowSize=day",
            "windowTimeZone=Europe/Paris",
            "from=yesterday",
            "from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z",
            "from=2026-03-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "windowSize=HOUR&from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "windowSize=DAY&from=2024-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "from=2020-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "to=99999-01-01T00:00:00Z",
            "groupBy=tokens",
            "filterGroupBy[tokens]=1",
            "filterCustomerId=c1",
            "advancedMeterGroupByFilters[model][$eq]=x",
            &too_many,
            &format!("subject={}", "s".repeat(129)),
            &format!("filterGroupBy[model]={}", "m".repeat(1025)),
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.status(), 400, "{bad}");
        }
        assert!(parse("windowSize=HOUR&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z").is_ok());
        assert!(parse("windowTimeZone=UTC&clientId=abc").is_ok());
    }

    #[test]
    fn sums_stay_exact_as_integers() {
        assert_eq!(number(12), json!(12));
        assert_eq!(number(i64::MAX as i128), json!(i64::MAX));
        assert_eq!(number(i64::MAX as i128 + 1), json!(9.223372036854776e18));
    }
}
