//! `POST /v1/usage/events`: parse → validate → one transaction → respond → count.

use chrono::{DateTime, Utc};
use lambda_http::http::StatusCode;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Caller;
use meterbridge::db::retry_transient;
use meterbridge::domain::dedup::DedupKeys;
use meterbridge::domain::usage::{raw_event_id, validate_event, Submitter, UsageEvent};
use meterbridge::domain::MetricCatalog;
use meterbridge::http::{json_response, parse_json_body, ApiError};
use meterbridge::repo::usage_events::{self, Insert};
use meterbridge::{Database, DbError};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::app::App;
use crate::batch::{field_errors, Batch, Counts, EventResult};
use meterbridge::usage_counters as counters;

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

/// The number of events in a batch body, counted without building them: what the batch weighs
/// against the rate limiter's event budgets. 0 when the body is not a batch, which the parse
/// proper then refuses with its reason (it reads the same JSON, stricter: duplicate keys too).
pub fn count_events(body: &[u8]) -> u32 {
    struct Count(u32);
    impl<'de> serde::Deserialize<'de> for Count {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Items;
            impl<'de> serde::de::Visitor<'de> for Items {
                type Value = Count;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an array of events")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Count, A::Error> {
                    let mut n = 0u32;
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                        n = n.saturating_add(1);
                    }
                    Ok(Count(n))
                }
            }
            d.deserialize_seq(Items)
        }
    }
    #[derive(serde::Deserialize)]
    struct Batch {
        events: Count,
    }
    serde_json::from_slice::<Batch>(body).map_or(0, |b| b.events.0)
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
    check_batch_size(
        &events,
        max_events,
        "\"events\" is empty; send 1 or more events",
    )?;
    Ok(events)
}

/// A batch holds 1 to `max` events: empty is 400 (saying `empty`), more is 413.
pub(crate) fn check_batch_size(events: &[Value], max: usize, empty: &str) -> Result<(), ApiError> {
    if events.is_empty() {
        return Err(ApiError::Malformed(empty.to_owned()));
    }
    if events.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "{} events in one request; the limit is {max}",
            events.len()
        )));
    }
    Ok(())
}

/// Who submits a batch, as its key establishes it, with the catalog and the instant the
/// validation reads.
pub(crate) fn submitter<'a>(
    app: &App,
    caller: &'a Caller,
    catalog: &'a MetricCatalog,
    now: DateTime<Utc>,
) -> Submitter<'a> {
    Submitter {
        tenant_id: caller.tenant_id,
        tenant_slug: &caller.tenant_slug,
        source: &caller.source,
        trust: caller.trust,
        catalog,
        now,
        limits: app.config.event_limits,
    }
}

/// How many times a batch is tried again after a concurrent writer took one of its keys
/// between the probe and the insert. Colliding batches of a tenant take turns, so only a
/// concurrent batch of new events can take a key in between, and each round follows its
/// commit: a batch that loses every round is rare enough to answer 503 (retry), never to loop.
const COLLISION_ROUNDS: usize = 8;

/// What storing a batch came to.
pub(crate) enum Stored {
    /// The ids of the events inserted, and the stored events the others collided with.
    Done(Vec<String>, Vec<usage_events::ExistingKeys>),
    /// The veto refused the batch and nothing was stored: the stored events it collided with.
    Refused(Vec<usage_events::ExistingKeys>),
}

/// For a batch stored whole or not at all: given the events whose keys are taken and the stored
/// events holding them, `true` refuses the whole batch.
pub(crate) type Veto<'a> =
    &'a (dyn Fn(&[&UsageEvent], &[usage_events::ExistingKeys]) -> bool + Sync);

/// Stores the leaders in one transaction, retried as a whole on a deadlock or serialization
/// failure (see [`store_once`]). Events go in in the order of their operation keys, and
/// remembered keys in key order, so two batches that share keys take their index locks in the
/// same order and wait for each other rather than deadlock; the retry covers what ordering
/// cannot rule out.
pub(crate) async fn store(
    app: &App,
    caller: &Caller,
    leaders: &[&UsageEvent],
    veto: Option<Veto<'_>>,
) -> Result<Stored, ApiError> {
    let keys: Vec<DedupKeys> = leaders
        .iter()
        .map(|e| DedupKeys::of(caller.tenant_id, &caller.source, e))
        .collect();
    let db = &app.services.db;
    Ok(retry_transient(|| store_once(db, caller, leaders, &keys, veto)).await?)
}

/// First optimistically: every event is new, one INSERT of events and keys. When some key is
/// taken, again, in turn with the tenant's other colliding batches: find the taken keys and
/// their holders, and insert only the events none of whose keys is taken — unless `veto`
/// refuses the batch for what it collided with, in which case nothing is inserted. Returns the
/// inserted event ids and the holders.
async fn store_once(
    db: &Database,
    caller: &Caller,
    leaders: &[&UsageEvent],
    keys: &[DedupKeys],
    veto: Option<Veto<'_>>,
) -> Result<Stored, DbError> {
    let (tenant, source) = (caller.tenant_id, &caller.source);
    let mut tx = db.tenant_tx(tenant).await?;
    let generations = usage_events::hold_key_generation(&mut tx).await?;
    if usage_events::insert(&mut tx, &generations, tenant, source, leaders, keys).await?
        == Insert::Stored
    {
        tx.commit().await?;
        return Ok(Stored::Done(
            leaders.iter().map(|e| e.event_id.clone()).collect(),
            Vec::new(),
        ));
    }
    tx.rollback().await?;

    let remembered: Vec<Uuid> = keys.iter().flat_map(DedupKeys::remembered).collect();
    let operations: Vec<(Uuid, DateTime<Utc>)> = leaders
        .iter()
        .zip(keys)
        .map(|(e, k)| (k.operation, e.occurred_at))
        .collect();
    for _ in 0..COLLISION_ROUNDS {
        let mut tx = db.tenant_tx(tenant).await?;
        let generations = usage_events::hold_key_generation(&mut tx).await?;
        usage_events::serialize_collisions(&mut tx, tenant).await?;
        let taken =
            usage_events::find_taken(&mut tx, &generations, tenant, &remembered, &operations)
                .await?;
        let is_taken = |k: &DedupKeys| {
            k.remembered()
                .chain([k.operation])
                .any(|key| taken.keys.contains(&key))
        };
        if let Some(veto) = veto {
            let collided: Vec<&UsageEvent> = leaders
                .iter()
                .zip(keys)
                .filter(|(_, k)| is_taken(k))
                .map(|(e, _)| *e)
                .collect();
            if veto(&collided, &taken.holders) {
                tx.rollback().await?;
                return Ok(Stored::Refused(taken.holders));
            }
        }
        let (fresh, fresh_keys): (Vec<&UsageEvent>, Vec<DedupKeys>) = leaders
            .iter()
            .zip(keys)
            .filter(|(_, k)| !is_taken(k))
            .map(|(e, k)| (*e, *k))
            .unzip();
        if fresh.is_empty()
            || usage_events::insert(&mut tx, &generations, tenant, source, &fresh, &fresh_keys)
                .await?
                == Insert::Stored
        {
            tx.commit().await?;
            return Ok(Stored::Done(
                fresh.iter().map(|e| e.event_id.clone()).collect(),
                taken.holders,
            ));
        }
        tx.rollback().await?;
    }
    Err(DbError::Contended(
        "concurrent writers kept taking this batch's keys".into(),
    ))
}

/// Validates, stores and counts one batch; the core of the endpoint, callable in-process.
pub async fn ingest_batch(
    app: &App,
    caller: &Caller,
    raw_events: Vec<Value>,
) -> Result<(Counts, Vec<EventResult>), ApiError> {
    let catalog = app.catalog().await?;
    let now = app.services.clock.now();
    let submitter = submitter(app, caller, &catalog, now);
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
        if let Stored::Done(inserted, existing) = store(app, caller, &leaders, None).await? {
            batch.settle(caller.source.as_str(), &inserted, &existing);
        }
    }
    count(app, caller, &batch.accepted(), now).await;

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

/// Adds events just stored to the real-time counters, then records the usage-limit
/// thresholds they crossed. Redis trouble is logged and counted, never the caller's.
pub(crate) async fn count(
    app: &App,
    caller: &Caller,
    accepted: &[&UsageEvent],
    now: DateTime<Utc>,
) {
    let Some(redis) = &app.services.redis else {
        return;
    };
    if accepted.is_empty() {
        return;
    }
    match counters::add(
        redis,
        caller.tenant_id,
        accepted,
        now,
        app.config.counter_ttl_days,
    )
    .await
    {
        Ok(counted) => crate::thresholds::record(app, caller, &counted, now).await,
        Err(e) => {
            metrics::counter!("RedisCounterFailures").increment(1);
            tracing::warn!(error = %e, events = accepted.len(), "real-time counters not updated; PostgreSQL has the events");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_weighs_its_events() {
        assert_eq!(
            count_events(br#"{"events": [{"a": 1}, {}, [1, {"x": [2]}]]}"#),
            3
        );
        assert_eq!(count_events(br#"{"other": 1, "events": []}"#), 0);
        for not_a_batch in [
            &b"{}"[..],
            b"[]",
            br#"{"events": 5}"#,
            br#"{"events": ["#,
            b"",
        ] {
            assert_eq!(count_events(not_a_batch), 0);
        }
    }
}
