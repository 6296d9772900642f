//! `POST /v1/usage/events`: parse → validate → one transaction → respond → count.

use chrono::Utc;
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Caller;
use meterbridge::db::retry_transient;
use meterbridge::domain::usage::{raw_event_id, validate_event, Submitter, UsageEvent};
use meterbridge::http::{json_response, parse_json_body, ApiError};
use meterbridge::repo::usage_events;
use meterbridge::{Database, DbError};
use serde::Serialize;
use serde_json::Value;

use crate::app::App;
use crate::batch::{field_errors, Batch, Counts, EventResult};
use crate::counters;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestResponse {
    #[serde(flatten)]
    pub counts: Counts,
    pub results: Vec<EventResult>,
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
    let raw_events = take_events(body, app.config.max_batch_events)?;
    let (counts, results) = ingest_batch(app, caller, raw_events).await?;
    if counts.rejected == results.len() {
        return Err(ApiError::Unprocessable {
            detail: format!(
                "all {} events were rejected; nothing was stored",
                results.len()
            ),
            errors: field_errors(&results),
        });
    }
    Ok(json_response(
        StatusCode::OK,
        &IngestResponse { counts, results },
    ))
}

/// The `events` array of `{"events": [...]}`, within the batch limit.
pub fn take_events(body: Value, max_events: usize) -> Result<Vec<Value>, ApiError> {
    let Value::Object(mut top) = body else {
        return Err(ApiError::Malformed(
            "the body must be an object: {\"events\": [...]}".into(),
        ));
    };
    if let Some(unknown) = top.keys().find(|k| k.as_str() != "events") {
        return Err(ApiError::Malformed(format!(
            "unknown top-level field {unknown:?}; send {{\"events\": [...]}}"
        )));
    }
    let Some(Value::Array(events)) = top.remove("events") else {
        return Err(ApiError::Malformed(
            "\"events\" must be an array of events".into(),
        ));
    };
    if events.is_empty() {
        return Err(ApiError::Malformed(
            "\"events\" is empty; send 1 or more events".into(),
        ));
    }
    if events.len() > max_events {
        return Err(ApiError::PayloadTooLarge(format!(
            "{} events in one request; the limit is {max_events}",
            events.len()
        )));
    }
    Ok(events)
}

const UNIQUE_VIOLATION: &str = "23505";

/// Stores the leaders in one transaction, retried as a whole on a deadlock or serialization
/// failure (see [`store_once`]). The events go in a canonical order (by event id), so two
/// batches holding the same events take their index locks in the same order and wait for each
/// other rather than deadlock; the retry covers collisions canonical order cannot rule out (the
/// same idempotency key or operation under different event ids).
async fn store(
    app: &App,
    caller: &Caller,
    leaders: &[&UsageEvent],
) -> Result<(Vec<String>, Vec<usage_events::ExistingKeys>), ApiError> {
    let mut ordered = leaders.to_vec();
    ordered.sort_unstable_by(|a, b| a.event_id.cmp(&b.event_id));
    let db = &app.services.db;
    Ok(retry_transient(|| store_once(db, caller, &ordered)).await?)
}

/// One attempt: first optimistically (every event new: a plain INSERT), and when any is already
/// stored, again in a fresh transaction with `ON CONFLICT DO NOTHING` plus a lookup of the
/// stored events that hold the skipped keys. Returns the inserted event ids and those events.
async fn store_once(
    db: &Database,
    caller: &Caller,
    leaders: &[&UsageEvent],
) -> Result<(Vec<String>, Vec<usage_events::ExistingKeys>), DbError> {
    let mut tx = db.tenant_tx(caller.tenant_id).await?;
    match usage_events::insert_all(&mut tx, caller.tenant_id, &caller.source, leaders).await {
        Ok(()) => {
            tx.commit().await?;
            return Ok((
                leaders.iter().map(|e| e.event_id.clone()).collect(),
                Vec::new(),
            ));
        }
        Err(e) if e.sqlstate().as_deref() == Some(UNIQUE_VIOLATION) => {
            tx.rollback().await?;
        }
        Err(e) => return Err(e),
    }
    let mut tx = db.tenant_tx(caller.tenant_id).await?;
    let inserted =
        usage_events::insert_new(&mut tx, caller.tenant_id, &caller.source, leaders).await?;
    let existing = if inserted.len() < leaders.len() {
        usage_events::find_colliding(&mut tx, caller.tenant_id, &caller.source, leaders).await?
    } else {
        Vec::new()
    };
    tx.commit().await?;
    Ok((inserted, existing))
}

/// Validates, stores and counts one batch; the core of the endpoint, callable in-process.
pub async fn ingest_batch(
    app: &App,
    caller: &Caller,
    raw_events: Vec<Value>,
) -> Result<(Counts, Vec<EventResult>), ApiError> {
    let catalog = app.catalog().await?;
    let now = Utc::now();
    let submitter = Submitter {
        tenant_id: caller.tenant_id,
        tenant_slug: &caller.tenant_slug,
        source: &caller.source,
        trust: caller.trust,
        catalog: &catalog,
        now,
        limits: app.config.event_limits,
    };
    let mut batch = Batch::new(raw_events.len());
    let mut valid = Vec::with_capacity(raw_events.len());
    for (index, raw) in raw_events.into_iter().enumerate() {
        let event_id = raw_event_id(&raw).map(str::to_owned);
        match validate_event(raw, &submitter) {
            Ok(event) => valid.push((index, event)),
            Err(rejection) => batch.reject(index, event_id.as_deref(), rejection),
        }
    }
    batch.add_valid(valid);

    let leaders = batch.leaders();
    if !leaders.is_empty() {
        let (inserted, existing) = store(app, caller, &leaders).await?;
        batch.settle(caller.source.as_str(), &inserted, &existing);
    }

    let accepted = batch.accepted();
    if let Some(redis) = &app.services.redis {
        if !accepted.is_empty() {
            match counters::add(
                redis,
                caller.tenant_id,
                &accepted,
                now,
                app.config.counter_ttl_days,
            )
            .await
            {
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!("RedisCounterFailures").increment(1);
                    tracing::warn!(error = %e, events = accepted.len(), "real-time counters not updated; PostgreSQL has the events");
                }
            }
        }
    }

    let (counts, results) = batch.finish();
    metrics::counter!("UsageEventsAccepted").increment(counts.accepted as u64);
    metrics::counter!("UsageEventsDuplicate").increment(counts.duplicates as u64);
    metrics::counter!("UsageEventsConflict").increment(counts.conflicts as u64);
    metrics::counter!("UsageEventsRejected").increment(counts.rejected as u64);
    tracing::info!(
        accepted = counts.accepted,
        duplicates = counts.duplicates,
        conflicts = counts.conflicts,
        rejected = counts.rejected,
        "batch ingested"
    );
    Ok((counts, results))
}
