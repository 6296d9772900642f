//! `POST /v1/usage/events/{eventId}/void`: an internal key marks a stored event voided (who,
//! when, why). The event is never deleted; aggregation excludes it from the next run on (the
//! void rewrites the row's transaction id), and the day's real-time counter is decremented
//! after the commit (the aggregation's repair fixes a decrement that did not happen). Voiding
//! twice is idempotent: the second call returns the first void. An event is found by its id
//! and source (the caller's, or `source` in the body) for as long as its key is remembered:
//! the deduplication window.

use std::collections::BTreeMap;

use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::dedup::DedupKeys;
use meterbridge::domain::usage::is_valid_id;
use meterbridge::domain::{Scope, SourceService, Trust};
use meterbridge::http::{json_response, parse_json_body, ApiError, FieldError};
use meterbridge::repo::usage_events::{self, StoredUsageEvent};
use meterbridge::usage_counters as counters;
use meterbridge::DbError;
use serde::Serialize;
use serde_json::Value;

use crate::app::App;

/// The longest reason kept.
pub const MAX_REASON_CHARS: usize = 500;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VoidResponse {
    event: StoredUsageEvent,
    /// `false` when the event had been voided before (this call changed nothing).
    voided_now: bool,
}

/// What a void request says.
#[derive(Debug, PartialEq, Eq)]
pub struct VoidRequest {
    pub reason: String,
    pub source: Option<SourceService>,
}

/// `{"reason": "...", "source": "..."}`: a reason of 1-500 characters without control
/// characters; optionally the source service that sent the event. Every problem is reported.
pub fn parse_void(body: Value) -> Result<VoidRequest, ApiError> {
    let Value::Object(mut object) = body else {
        return Err(ApiError::Malformed("the body must be a JSON object".into()));
    };
    let mut errors = Vec::new();
    let reason = match object.remove("reason") {
        Some(Value::String(r)) if is_valid_id(&r, MAX_REASON_CHARS) && !r.trim().is_empty() => {
            Some(r)
        }
        None | Some(Value::Null) => {
            errors.push(FieldError::new(
                "missing_field",
                "/reason",
                "reason is required",
            ));
            None
        }
        Some(_) => {
            errors.push(FieldError::new(
                "invalid_value",
                "/reason",
                format!(
                    "reason must be 1-{MAX_REASON_CHARS} characters without control characters"
                ),
            ));
            None
        }
    };
    let source = match object.remove("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match SourceService::parse(&s) {
            Ok(source) => Some(source),
            Err(e) => {
                errors.push(FieldError::new("invalid_value", "/source", e.message));
                None
            }
        },
        Some(_) => {
            errors.push(FieldError::new(
                "invalid_value",
                "/source",
                "source must be a string",
            ));
            None
        }
    };
    for unknown in object.keys() {
        let shown: String = unknown.chars().take(64).collect();
        errors.push(FieldError::new(
            "unknown_field",
            format!("/{shown}"),
            format!("unknown field {shown:?}"),
        ));
    }
    match reason {
        Some(reason) if errors.is_empty() => Ok(VoidRequest { reason, source }),
        _ => Err(ApiError::Unprocessable {
            detail: "the void request is invalid; nothing was changed".into(),
            errors,
        }),
    }
}

pub async fn void_event(
    app: &App,
    caller: &Caller,
    event_id: &str,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    if caller.trust != Trust::Internal {
        return Err(ApiError::Forbidden(
            "only an internal key may void usage events".into(),
        ));
    }
    let body = parse_json_body(request.headers(), request.body().as_ref(), 16 * 1024)?;
    let void = parse_void(body)?;
    let not_found = || {
        ApiError::NotFound(format!(
            "no usage event {event_id:?} of this tenant and source within the correction window"
        ))
    };
    if !is_valid_id(event_id, 128) {
        return Err(not_found());
    }
    let source = void.source.as_ref().unwrap_or(&caller.source);
    if *source != caller.source && !caller.scopes.contains(Scope::UsageVoid) {
        return Err(ApiError::Forbidden(format!(
            "voiding another source's events needs the {} scope",
            Scope::UsageVoid
        )));
    }
    let key = DedupKeys::event_key(caller.tenant_id, source, event_id);
    let voided_by = format!("api-key:{}", caller.key_id);

    let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
    let Some(at) = usage_events::locate(&mut tx, caller.tenant_id, key).await? else {
        return Err(not_found());
    };
    let (event, voided_now) =
        usage_events::void(&mut tx, caller.tenant_id, at, &voided_by, &void.reason)
            .await?
            .ok_or_else(not_found)?;
    tx.commit().await.map_err(DbError::from)?;

    if voided_now {
        metrics::counter!("UsageEventsVoided").increment(1);
        tracing::info!(event_id, metric = %event.metric, "usage event voided");
        if let Some(redis) = &app.services.redis {
            let mut delta = BTreeMap::new();
            delta.insert(
                (event.occurred_at.date_naive(), event.metric.as_str()),
                -i128::from(event.quantity),
            );
            let now = app.services.clock.now();
            if let Err(e) = counters::add_totals(
                redis,
                caller.tenant_id,
                &delta,
                now,
                app.config.counter_ttl_days,
            )
            .await
            {
                metrics::counter!("RedisCounterFailures").increment(1);
                tracing::warn!(error = %e, "real-time counter not decremented; the aggregation's repair will");
            }
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &VoidResponse { event, voided_now },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn void_bodies() {
        assert_eq!(
            parse_void(json!({"reason": "duplicate upstream"})).unwrap(),
            VoidRequest {
                reason: "duplicate upstream".into(),
                source: None
            }
        );
        assert_eq!(
            parse_void(json!({"reason": "x", "source": "crm"}))
                .unwrap()
                .source,
            Some(SourceService::parse("crm").unwrap())
        );
        for bad in [
            json!({}),
            json!({"reason": ""}),
            json!({"reason": "   "}),
            json!({"reason": "a\u{0}b"}),
            json!({"reason": "x".repeat(501)}),
            json!({"reason": 5}),
            json!({"reason": "x", "source": "Not A Source!"}),
            json!({"reason": "x", "extra": true}),
            json!(["reason"]),
        ] {
            assert!(parse_void(bad.clone()).is_err(), "{bad}");
        }
    }
}
