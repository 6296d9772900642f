//! `POST /api/v1/events`: OpenMeter-compatible ingestion of CloudEvents — parse → map each
//! event through the tenant's meter for its `type` → validate as a usage event → one
//! transaction, all or nothing → 204 → count. Unlike the native endpoint's per-event results, a
//! request with any invalid, unmapped or conflicting event is refused whole (400 or 409 naming
//! each failing event by index and `id`) and nothing of it is stored, so an OpenMeter client's
//! retry never half-applies a batch; every event stored or an exact duplicate is 204, no body.

use std::sync::Arc;

use lambda_http::http::{header, StatusCode};
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::meter::{CloudEvent, Meter};
use meterbridge::domain::usage::{validate_event, UsageEvent};
use meterbridge::http::{parse_json_body, ApiError, FieldError};
use serde_json::Value;

use crate::app::App;
use crate::batch::{settle_skipped, Batch, Status};
use crate::ingest::{check_batch_size, count, store, submitter, Stored};

/// The events of a request body, counted without reading them: what the request weighs
/// against the rate limiter's event budgets (a single event is 1, an array its length).
pub fn count_events(body: &[u8]) -> u32 {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            crate::ingest::count_events(&[&b"{\"events\":"[..], body, &b"}"[..]].concat())
        }
        Some(b'{') => 1,
        _ => 0,
    }
}

/// The events of the body, as its content type says: one (`cloudevents+json`), an array
/// (`cloudevents-batch+json`), or either (`json`).
fn events_of(request: &Request, body: Value, max: usize) -> Result<Vec<Value>, ApiError> {
    let essence = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_else(|| "application/json".into());
    let events = match (essence.as_str(), body) {
        ("application/cloudevents+json" | "application/json", event @ Value::Object(_)) => {
            vec![event]
        }
        ("application/cloudevents-batch+json" | "application/json", Value::Array(events)) => events,
        ("application/cloudevents+json", _) => {
            return Err(ApiError::Malformed(
                "application/cloudevents+json is one event: a JSON object".into(),
            ))
        }
        ("application/cloudevents-batch+json", _) => {
            return Err(ApiError::Malformed(
                "application/cloudevents-batch+json is an array of events".into(),
            ))
        }
        ("application/json", _) => {
            return Err(ApiError::Malformed(
                "send one event (an object) or a batch (an array of events)".into(),
            ))
        }
        (other, _) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "send application/cloudevents+json, application/cloudevents-batch+json or \
                 application/json, not {other:?}"
            )))
        }
    };
    check_batch_size(&events, max, "the batch is empty; send 1 or more events")?;
    Ok(events)
}

pub async fn post_events(
    app: &App,
    caller: &Caller,
    request: &Request,
) -> Result<Response<Body>, ApiError> {
    let body = parse_json_body(
        request.headers(),
        request.body().as_ref(),
        app.config.max_body_bytes,
    )?;
    let raw = events_of(request, body, app.config.max_batch_events)?;
    let total = raw.len();
    let meters = app.meters(caller.tenant_id).await?;
    let events = map_and_validate(app, caller, &meters, raw).await?;
    if events.is_empty() {
        // Every event had a quantity of 0: valid, and nothing to store.
        return no_content();
    }

    // Within the request: the same event twice is fine, the same id with another payload is not.
    let ids: Vec<Option<String>> = events.iter().map(|(_, id, _)| id.clone()).collect();
    let mut batch = Batch::new(total);
    batch.add_valid(events.into_iter().map(|(i, _, e)| (i, e)).collect());
    let within = batch.conflicts_within();
    if !within.is_empty() {
        let errors = within
            .iter()
            .map(|&(index, earlier)| {
                FieldError::new(
                    "batch_conflict",
                    format!("/{index}"),
                    format!("shares its id and source with event {earlier} but not its payload"),
                )
                .of_item(index, ids[index].as_deref())
            })
            .collect();
        return Err(conflicting(within.len(), total, errors));
    }

    let source = caller.source.as_str();
    let leaders = batch.leaders();
    let veto = |collided: &[&UsageEvent], holders: &[_]| {
        collided
            .iter()
            .any(|e| settle_skipped(0, e, source, holders).status == Status::Conflict)
    };
    match store(app, caller, &leaders, Some(&veto)).await? {
        Stored::Refused(holders) => {
            let conflicts = batch.conflicts_with(source, &holders);
            let errors = conflicts
                .iter()
                .map(|r| {
                    FieldError::new(
                        r.code.unwrap_or("conflict"),
                        format!("/{}", r.index),
                        r.message.clone().unwrap_or_default(),
                    )
                    .of_item(r.index, ids[r.index].as_deref())
                })
                .collect();
            Err(conflicting(conflicts.len(), total, errors))
        }
        Stored::Done(inserted, existing) => {
            batch.settle(source, &inserted, &existing);
            let now = app.services.clock.now();
            count(app, caller, &batch.accepted(), now).await;
            let (counts, _) = batch.finish();
            metrics::counter!("UsageEventsAccepted").increment(counts.accepted as u64);
            metrics::counter!("UsageEventsDuplicate").increment(counts.duplicates as u64);
            tracing::info!(
                accepted = counts.accepted,
                duplicates = counts.duplicates,
                "cloudevents ingested"
            );
            no_content()
        }
    }
}

fn no_content() -> Result<Response<Body>, ApiError> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::Empty)
        .map_err(|_| ApiError::Internal)
}

fn conflicting(n: usize, total: usize, errors: Vec<FieldError>) -> ApiError {
    metrics::counter!("UsageEventsConflict").increment(n as u64);
    ApiError::ConflictingEvents {
        detail: format!(
            "{n} of {total} events conflict with events already stored or sent in this request; \
             nothing was stored"
        ),
        errors,
    }
}

/// Each event read, mapped through its meter and validated as a usage event: (index, its
/// CloudEvents id, the usage event). Any failure refuses the request, every failure named.
async fn map_and_validate(
    app: &App,
    caller: &Caller,
    meters: &[Meter],
    raw: Vec<Value>,
) -> Result<Vec<(usize, Option<String>, UsageEvent)>, ApiError> {
    let catalog = app.catalog().await?;
    let now = app.services.clock.now();
    let submitter = submitter(app, caller, &catalog, now);
    let total = raw.len();
    let mut errors = Vec::new();
    let mut valid = Vec::with_capacity(total);
    for (index, raw) in raw.into_iter().enumerate() {
        let id = raw.get("id").and_then(Value::as_str).map(str::to_owned);
        let fail = |code: &str, field: &str, message: String| {
            FieldError::new(code, format!("/{index}/{field}"), message)
                .of_item(index, id.as_deref())
        };
        let event = match CloudEvent::parse(&raw) {
            Ok(event) => event,
            Err(e) => {
                errors.push(fail("invalid_cloudevent", e.field, e.message));
                continue;
            }
        };
        let Some(meter) = meters.iter().find(|m| m.event_type == event.event_type) else {
            let shown: String = event.event_type.chars().take(64).collect();
            errors.push(fail(
                "unmapped_event_type",
                "type",
                format!("no meter of this tenant counts events of type {shown:?}"),
            ));
            continue;
        };
        let mut usage = match meter.usage_event(&event, now) {
            Ok(usage) => usage,
            Err(e) => {
                errors.push(fail("invalid_value", e.field, e.message));
                continue;
            }
        };
        // A quantity of 0 (a call that used no tokens) is valid and adds nothing: checked by
        // every other rule, then not stored. A usage event's quantity is positive.
        let zero = usage.get("quantity").and_then(Value::as_i64) == Some(0);
        if zero {
            usage["quantity"] = Value::from(1);
        }
        match validate_event(usage, &submitter) {
            Ok(_) if zero => {}
            Ok(usage) => valid.push((index, id, usage)),
            Err(rejection) => {
                let field = match rejection.field.as_str() {
                    "occurredAt" => "time",
                    "actorId" => "subject",
                    "quantity" | "metadata" => "data",
                    "eventId" | "correlationId" => "id",
                    _ => "type",
                };
                errors.push(fail(rejection.code, field, rejection.message));
            }
        }
    }
    if errors.is_empty() {
        return Ok(valid);
    }
    metrics::counter!("UsageEventsRejected").increment(errors.len() as u64);
    Err(ApiError::InvalidEvents {
        detail: format!(
            "{} of {total} events are invalid or have no meter; nothing was stored",
            errors.len()
        ),
        errors,
    })
}

/// The tenant's meters, parsed (their definitions were checked when set).
pub fn parse_meters(
    definitions: &[meterbridge::domain::meter::MeterDefinition],
) -> Arc<Vec<Meter>> {
    Arc::new(
        definitions
            .iter()
            .filter_map(|d| match d.parse() {
                Ok(meter) => Some(meter),
                Err(e) => {
                    tracing::error!(meter = %d.slug, error = %e.message, "a stored meter does not parse; its events are refused");
                    None
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_weighs_its_events() {
        assert_eq!(count_events(br#"{"id": "1"}"#), 1);
        assert_eq!(count_events(br#"  [{"id": "1"}, {"id": "2"}, 3]"#), 3);
        assert_eq!(count_events(b"[]"), 0);
        assert_eq!(count_events(b"7"), 0);
        assert_eq!(count_events(b""), 0);
    }
}
