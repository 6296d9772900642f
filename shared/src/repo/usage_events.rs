//! usage_events: the batch insert that dedups in one statement, the lookup that explains each
//! event the insert skipped, and the reads. Every function here runs inside a tenant transaction;
//! the explicit tenant filters below are belt and braces on top of row-level security.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;

use crate::db::DbError;
use crate::domain::usage::UsageEvent;
use crate::domain::{Classification, SourceService, TenantId};

/// The batch as column arrays for `UNNEST`, borrowed from the events (no copies).
struct Columns<'e> {
    event_ids: Vec<&'e str>,
    metrics: Vec<&'e str>,
    quantities: Vec<i64>,
    occurred: Vec<DateTime<Utc>>,
    actors: Vec<Option<&'e str>>,
    correlations: Vec<&'e str>,
    classifications: Vec<&'static str>,
    keys: Vec<Option<&'e str>>,
    metadata: Vec<&'e Value>,
    hashes: Vec<&'e [u8]>,
}

impl<'e> Columns<'e> {
    fn of(events: &[&'e UsageEvent]) -> Self {
        Columns {
            event_ids: events.iter().map(|e| e.event_id.as_str()).collect(),
            metrics: events.iter().map(|e| e.metric.as_str()).collect(),
            quantities: events.iter().map(|e| e.quantity).collect(),
            occurred: events.iter().map(|e| e.occurred_at).collect(),
            actors: events.iter().map(|e| e.actor_id.as_deref()).collect(),
            correlations: events.iter().map(|e| e.correlation_id.as_str()).collect(),
            classifications: events.iter().map(|e| e.classification.as_str()).collect(),
            keys: events
                .iter()
                .map(|e| e.idempotency_key.as_deref())
                .collect(),
            metadata: events.iter().map(|e| &e.metadata).collect(),
            hashes: events.iter().map(|e| e.payload_hash.as_slice()).collect(),
        }
    }
}

/// The fast path: inserts the whole batch, or fails with a unique violation (SQLSTATE 23505)
/// when any event is already stored — the transaction is then aborted and the caller retries
/// with [`insert_new`]. A batch of new events (the common case) pays no conflict checks beyond
/// the unique indexes themselves.
pub async fn insert_all(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: &SourceService,
    events: &[&UsageEvent],
) -> Result<(), DbError> {
    let c = Columns::of(events);
    sqlx::query!(
        r#"INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity, occurred_at,
                                     actor_id, correlation_id, classification, idempotency_key,
                                     metadata, payload_hash)
           SELECT $1, $2, e.* FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::timestamptz[],
                                          $7::text[], $8::text[], $9::text[], $10::text[],
                                          $11::jsonb[], $12::bytea[]) AS e"#,
        tenant.0,
        source.as_str(),
        &c.event_ids as &[&str],
        &c.metrics as &[&str],
        &c.quantities,
        &c.occurred,
        &c.actors as &[Option<&str>],
        &c.correlations as &[&str],
        &c.classifications as &[&str],
        &c.keys as &[Option<&str>],
        &c.metadata as &[&Value],
        &c.hashes as &[&[u8]]
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts the batch with `ON CONFLICT DO NOTHING` against all three unique keys; returns the
/// event ids that were new. The input must be free of in-batch duplicates.
pub async fn insert_new(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: &SourceService,
    events: &[&UsageEvent],
) -> Result<Vec<String>, DbError> {
    let c = Columns::of(events);
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity, occurred_at,
                                     actor_id, correlation_id, classification, idempotency_key,
                                     metadata, payload_hash)
           SELECT $1, $2, e.* FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::timestamptz[],
                                          $7::text[], $8::text[], $9::text[], $10::text[],
                                          $11::jsonb[], $12::bytea[]) AS e
           ON CONFLICT DO NOTHING
           RETURNING event_id"#,
        tenant.0,
        source.as_str(),
        &c.event_ids as &[&str],
        &c.metrics as &[&str],
        &c.quantities,
        &c.occurred,
        &c.actors as &[Option<&str>],
        &c.correlations as &[&str],
        &c.classifications as &[&str],
        &c.keys as &[Option<&str>],
        &c.metadata as &[&Value],
        &c.hashes as &[&[u8]]
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(inserted)
}

/// A stored event that holds one of the unique keys a skipped event wanted.
#[derive(Debug, Clone)]
pub struct ExistingKeys {
    pub source_service: String,
    pub event_id: String,
    pub idempotency_key: Option<String>,
    pub correlation_id: String,
    pub metric: String,
    pub occurred_at: DateTime<Utc>,
    pub payload_hash: Vec<u8>,
}

/// The stored events that collide with `events` (all from `source`) on any unique key: the same
/// event id or idempotency key from the same source, or the same operation (correlation, metric,
/// instant) from any source of the tenant.
pub async fn find_colliding(
    conn: &mut PgConnection,
    tenant: TenantId,
    source: &SourceService,
    events: &[&UsageEvent],
) -> Result<Vec<ExistingKeys>, DbError> {
    let event_ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let keys: Vec<&str> = events
        .iter()
        .filter_map(|e| e.idempotency_key.as_deref())
        .collect();
    let correlations: Vec<&str> = events.iter().map(|e| e.correlation_id.as_str()).collect();
    let metrics: Vec<&str> = events.iter().map(|e| e.metric.as_str()).collect();
    let occurred: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
    let rows = sqlx::query_as!(
        ExistingKeys,
        r#"SELECT source_service AS "source_service!", event_id AS "event_id!",
                  idempotency_key, correlation_id AS "correlation_id!", metric AS "metric!",
                  occurred_at AS "occurred_at!", payload_hash AS "payload_hash!"
             FROM usage_events
            WHERE tenant_id = $1 AND source_service = $2 AND event_id = ANY($3::text[])
           UNION
           SELECT source_service, event_id, idempotency_key, correlation_id, metric, occurred_at,
                  payload_hash
             FROM usage_events
            WHERE tenant_id = $1 AND source_service = $2 AND idempotency_key = ANY($4::text[])
           UNION
           SELECT u.source_service, u.event_id, u.idempotency_key, u.correlation_id, u.metric,
                  u.occurred_at, u.payload_hash
             FROM usage_events u
             JOIN UNNEST($5::text[], $6::text[], $7::timestamptz[]) AS k(correlation_id, metric, occurred_at)
               ON u.correlation_id = k.correlation_id AND u.metric = k.metric AND u.occurred_at = k.occurred_at
            WHERE u.tenant_id = $1"#,
        tenant.0,
        source.as_str(),
        &event_ids as &[&str],
        &keys as &[&str],
        &correlations as &[&str],
        &metrics as &[&str],
        &occurred
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// A stored event as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredUsageEvent {
    /// Arrival order, the listing's tiebreaker; internal (cursors carry it opaquely).
    #[serde(skip)]
    pub seq: i64,
    pub event_id: String,
    pub metric: String,
    pub quantity: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_id: Option<String>,
    pub source_service: String,
    pub correlation_id: String,
    pub classification: String,
    /// Present when the caller chose an idempotency key other than the event id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

/// A position in the listing order (occurred_at, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListPosition {
    pub occurred_at: DateTime<Utc>,
    pub seq: i64,
}

impl ListPosition {
    /// Just before every event at `at`.
    pub fn before(at: DateTime<Utc>) -> Self {
        ListPosition {
            occurred_at: at,
            seq: i64::MIN,
        }
    }

    pub fn of(event: &StoredUsageEvent) -> Self {
        ListPosition {
            occurred_at: event.occurred_at,
            seq: event.seq,
        }
    }
}

/// One page of the listing: the tenant's events in `(after, to)`, in listing order, optionally
/// of one metric and/or one classification.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub metric: Option<String>,
    pub classification: Option<Classification>,
    /// Start strictly after this position (`ListPosition::before(from)` for a first page).
    pub after: ListPosition,
    /// End of the window (exclusive).
    pub to: DateTime<Utc>,
    pub limit: i64,
}

/// The listing. Every shape is one index range: `(tenant, occurred_at, seq)`, or the same
/// behind `metric` or `classification`; the row comparison is the range's start, so a deep page
/// costs what the first one does. Run it in a read transaction
/// ([`crate::Database::tenant_read_tx`]), whose custom plans let PostgreSQL drop the absent
/// filters and pick the index that serves the present one.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &EventFilter,
) -> Result<Vec<StoredUsageEvent>, DbError> {
    let rows = sqlx::query_as!(
        StoredUsageEvent,
        r#"SELECT seq, event_id, metric, quantity, occurred_at, actor_id, source_service,
                  correlation_id, classification, idempotency_key, metadata, created_at
             FROM usage_events
            WHERE tenant_id = $1
              AND (occurred_at, seq) > ($2::timestamptz, $3::int8)
              AND occurred_at < $4
              AND ($5::text IS NULL OR metric = $5)
              AND ($6::text IS NULL OR classification = $6)
            ORDER BY occurred_at, seq
            LIMIT $7"#,
        tenant.0,
        filter.after.occurred_at,
        filter.after.seq,
        filter.to,
        filter.metric.as_deref(),
        filter.classification.map(Classification::as_str),
        filter.limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Units per metric for one UTC day: what the real-time counters hold, recomputed. Sums are
/// exact (`numeric`, read as `i128`): no number of stored events can overflow them.
pub async fn day_totals(
    conn: &mut PgConnection,
    tenant: TenantId,
    day: NaiveDate,
) -> Result<Vec<(String, i128)>, DbError> {
    let start = day.and_time(NaiveTime::MIN).and_utc();
    let end = start
        .checked_add_signed(chrono::Duration::days(1))
        .ok_or_else(|| DbError::Decode(format!("no day after {day}")))?;
    let rows = sqlx::query!(
        r#"SELECT metric, sum(quantity)::text AS "total!"
             FROM usage_events
            WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3
            GROUP BY metric ORDER BY metric"#,
        tenant.0,
        start,
        end
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let total = r
                .total
                .parse::<i128>()
                .map_err(|_| DbError::Decode(format!("sum {:?} is not an integer", r.total)))?;
            Ok((r.metric, total))
        })
        .collect()
}
