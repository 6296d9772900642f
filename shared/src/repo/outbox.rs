//! outbox_events: the write side (an event in the transaction that made it true) and the reads
//! verify-payment needs. The relay's claim and marks live with the relay.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::outbox::Envelope;
use crate::domain::TenantId;

/// Writes one event, PENDING. Its envelope is stored whole, as the relay will publish it;
/// `trace_header` (the X-Ray trace of the request that wrote it) is passed on to EventBridge.
pub async fn insert<D: Serialize>(
    conn: &mut PgConnection,
    envelope: &Envelope<D>,
    trace_header: Option<&str>,
) -> Result<i64, DbError> {
    let payload =
        serde_json::to_value(envelope).map_err(|e| DbError::Decode(format!("envelope: {e}")))?;
    let id = sqlx::query_scalar!(
        r#"INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                      correlation_id, idempotency_key, aggregate_type,
                                      aggregate_id, aggregate_sequence, source_service,
                                      created_at, trace_header)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
           RETURNING id"#,
        envelope.tenant_id.0,
        envelope.event_id,
        envelope.event_type,
        envelope.schema_version,
        payload,
        envelope.correlation_id,
        envelope.idempotency_key,
        envelope.aggregate_type,
        envelope.aggregate_id,
        envelope.aggregate_sequence,
        envelope.source_service,
        envelope.occurred_at,
        trace_header
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// An outbox row as stored (for operators and tests).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRow {
    pub event_id: Uuid,
    pub event_type: String,
    pub aggregate_id: Uuid,
    pub aggregate_sequence: i32,
    pub idempotency_key: String,
    pub status: String,
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// The events of one aggregate, in sequence.
pub async fn for_aggregate(
    conn: &mut PgConnection,
    tenant: TenantId,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<Vec<OutboxRow>, DbError> {
    Ok(sqlx::query_as!(
        OutboxRow,
        r#"SELECT event_id, event_type, aggregate_id, aggregate_sequence, idempotency_key, status,
                  payload, created_at
             FROM outbox_events
            WHERE tenant_id = $1 AND aggregate_type = $2 AND aggregate_id = $3
            ORDER BY aggregate_sequence"#,
        tenant.0,
        aggregate_type,
        aggregate_id
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// A row claimed for publishing, with what the entry is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub id: i64,
    pub tenant_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub payload: serde_json::Value,
    pub trace_header: Option<String>,
    pub attempts: i32,
    pub aggregate_id: Uuid,
    pub aggregate_sequence: i32,
    pub created_at: DateTime<Utc>,
    /// What the row was before this claim: `PROCESSING` means a lease was taken over.
    pub previous_status: String,
}

/// Claims up to `limit` due rows, fairly across tenants: PENDING or FAILED rows whose retry
/// time has come, and PROCESSING rows whose lease has run out — but only a row whose aggregate
/// has no earlier event still unpublished, so one aggregate's events go out in order. Each
/// tenant with rows not yet final is found by one probe of `outbox_events_due_by_tenant_idx`
/// (a skip scan), its oldest due rows are taken (at most `limit`), and the tenants' rows are
/// interleaved — every tenant's first before any tenant's second — so one tenant's backlog never
/// delays another's rows by more than a claim. A row already attempted is taken only if it was
/// due by `run_started`: a run never retries what it failed itself (its backoff may be shorter
/// than the run). The claim commits at once (no row lock is held while publishing): the rows
/// become PROCESSING under `token` until `lease` from now, with one more attempt counted.
pub async fn claim_due(
    conn: &mut PgConnection,
    token: Uuid,
    lease_secs: f64,
    limit: i64,
    run_started: DateTime<Utc>,
) -> Result<Vec<Claimed>, DbError> {
    Ok(sqlx::query_as!(
        Claimed,
        r#"WITH RECURSIVE tenants AS (
               (SELECT o.tenant_id FROM outbox_events o
                 WHERE o.status IN ('PENDING', 'PROCESSING', 'FAILED')
                 ORDER BY o.tenant_id LIMIT 1)
               UNION ALL
               SELECT (SELECT o.tenant_id FROM outbox_events o
                        WHERE o.status IN ('PENDING', 'PROCESSING', 'FAILED')
                          AND o.tenant_id > t.tenant_id
                        ORDER BY o.tenant_id LIMIT 1)
                 FROM tenants t
                WHERE t.tenant_id IS NOT NULL
           ), due AS (
               SELECT d.id, d.previous_status, d.next_attempt_at,
                      row_number() OVER (PARTITION BY t.tenant_id
                                         ORDER BY d.next_attempt_at, d.id) AS turn
                 FROM tenants t
                CROSS JOIN LATERAL (
                      SELECT o.id, o.status AS previous_status, o.next_attempt_at
                        FROM outbox_events o
                       WHERE o.tenant_id = t.tenant_id
                         AND o.status IN ('PENDING', 'PROCESSING', 'FAILED')
                         AND o.next_attempt_at <= now()
                         AND (o.attempts = 0 OR o.next_attempt_at <= $4)
                         -- A probe per candidate, never an anti join over the table (which
                         -- a large backlog can make the planner choose).
                         AND (SELECT 1 FROM outbox_events e
                               WHERE e.tenant_id = o.tenant_id
                                 AND e.aggregate_type = o.aggregate_type
                                 AND e.aggregate_id = o.aggregate_id
                                 AND e.aggregate_sequence < o.aggregate_sequence
                                 AND e.status NOT IN ('PUBLISHED', 'SKIPPED')
                               LIMIT 1) IS NULL
                       ORDER BY o.next_attempt_at, o.id
                       LIMIT $3
                         FOR UPDATE OF o SKIP LOCKED) d
                WHERE t.tenant_id IS NOT NULL
           ), chosen AS (
               SELECT id, previous_status FROM due
                ORDER BY turn, next_attempt_at, id
                LIMIT $3
           )
           UPDATE outbox_events o
              SET status = 'PROCESSING', claim_token = $1,
                  lease_until = now() + make_interval(secs => $2),
                  next_attempt_at = now() + make_interval(secs => $2),
                  attempts = o.attempts + 1
             FROM chosen
            WHERE o.id = chosen.id
        RETURNING o.id, o.tenant_id, o.event_id, o.event_type, o.payload, o.trace_header,
                  o.attempts, o.aggregate_id, o.aggregate_sequence, o.created_at,
                  chosen.previous_status AS "previous_status!""#,
        token,
        lease_secs,
        limit,
        run_started
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Claims one event by id, on the same terms as [`claim_due`] (due now, its aggregate's earlier
/// events published): the fast path that publishes an event right after its transaction.
pub async fn claim_one(
    conn: &mut PgConnection,
    event_id: Uuid,
    token: Uuid,
    lease_secs: f64,
) -> Result<Option<Claimed>, DbError> {
    Ok(sqlx::query_as!(
        Claimed,
        r#"WITH due AS (
               SELECT o.id, o.status AS previous_status
                 FROM outbox_events o
                WHERE o.event_id = $1
                  AND o.status IN ('PENDING', 'FAILED')
                  AND o.next_attempt_at <= now()
                  AND NOT EXISTS (
                      SELECT 1 FROM outbox_events e
                       WHERE e.tenant_id = o.tenant_id AND e.aggregate_type = o.aggregate_type
                         AND e.aggregate_id = o.aggregate_id
                         AND e.aggregate_sequence < o.aggregate_sequence
                         AND e.status NOT IN ('PUBLISHED', 'SKIPPED'))
                  FOR UPDATE OF o SKIP LOCKED)
           UPDATE outbox_events o
              SET status = 'PROCESSING', claim_token = $2,
                  lease_until = now() + make_interval(secs => $3),
                  next_attempt_at = now() + make_interval(secs => $3),
                  attempts = o.attempts + 1
             FROM due
            WHERE o.id = due.id
        RETURNING o.id, o.tenant_id, o.event_id, o.event_type, o.payload, o.trace_header,
                  o.attempts, o.aggregate_id, o.aggregate_sequence, o.created_at,
                  due.previous_status AS "previous_status!""#,
        event_id,
        token,
        lease_secs
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// Marks claimed rows published (the server stamps `published_at`: no application role may
/// write it). Every mark names the claim token and counts the rows it changed: a relay whose
/// lease was taken over changes nothing.
pub async fn mark_published(
    conn: &mut PgConnection,
    token: Uuid,
    ids: &[i64],
) -> Result<u64, DbError> {
    Ok(sqlx::query!(
        "UPDATE outbox_events
            SET status = 'PUBLISHED', claim_token = NULL,
                lease_until = NULL, last_error = NULL
          WHERE id = ANY($2) AND claim_token = $1 AND status = 'PROCESSING'",
        token,
        ids
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Marks claimed rows FAILED (to be retried at `next_attempts`) or DEAD, with their errors.
pub async fn mark_unpublished(
    conn: &mut PgConnection,
    token: Uuid,
    dead: bool,
    ids: &[i64],
    next_attempts: &[DateTime<Utc>],
    errors: &[String],
) -> Result<u64, DbError> {
    Ok(sqlx::query!(
        "UPDATE outbox_events o
            SET status = CASE WHEN $2 THEN 'DEAD' ELSE 'FAILED' END,
                next_attempt_at = f.next_attempt_at, last_error = left(f.error, 2000),
                claim_token = NULL, lease_until = NULL
           FROM UNNEST($3::int8[], $4::timestamptz[], $5::text[]) AS f(id, next_attempt_at, error)
          WHERE o.id = f.id AND o.claim_token = $1 AND o.status = 'PROCESSING'",
        token,
        dead,
        ids,
        next_attempts,
        errors
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Gives claimed rows back, due at once (the fast path could not publish: the relay will).
pub async fn release(conn: &mut PgConnection, token: Uuid, ids: &[i64]) -> Result<u64, DbError> {
    Ok(sqlx::query!(
        "UPDATE outbox_events
            SET status = 'PENDING', next_attempt_at = now(), claim_token = NULL, lease_until = NULL
          WHERE id = ANY($2) AND claim_token = $1 AND status = 'PROCESSING'",
        token,
        ids
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Deletes at most `limit` rows published before `cutoff`, oldest first (the ops role's policy
/// refuses any published less than a day ago, whatever the cutoff).
pub async fn delete_published(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<u64, DbError> {
    Ok(sqlx::query!(
        "DELETE FROM outbox_events
          WHERE id IN (SELECT id FROM outbox_events
                        WHERE status = 'PUBLISHED' AND published_at < $1
                        ORDER BY published_at LIMIT $2)",
        cutoff,
        limit
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// The backlog: rows not yet final, and the age of the oldest, in seconds.
pub async fn backlog(conn: &mut PgConnection) -> Result<(i64, f64), DbError> {
    let row = sqlx::query!(
        r#"SELECT count(*) AS "count!",
                  coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS "oldest!"
             FROM outbox_events WHERE status IN ('PENDING', 'PROCESSING', 'FAILED')"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.count, row.oldest))
}

/// Per event type and status: how many rows, how many are due now, the oldest's age.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusLine {
    pub event_type: String,
    pub status: String,
    pub count: i64,
    pub due: i64,
    pub oldest_age_seconds: Option<f64>,
}

pub async fn status_lines(conn: &mut PgConnection) -> Result<Vec<StatusLine>, DbError> {
    Ok(sqlx::query_as!(
        StatusLine,
        r#"SELECT event_type, status, count(*) AS "count!",
                  count(*) FILTER (WHERE status IN ('PENDING', 'FAILED', 'PROCESSING')
                                     AND next_attempt_at <= now()) AS "due!",
                  extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds
             FROM outbox_events
            GROUP BY event_type, status
            ORDER BY event_type, status"#
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Puts DEAD events (these ids, or every one of `event_type`) back to PENDING with their
/// attempts reset; returns their event ids.
pub async fn redrive(
    conn: &mut PgConnection,
    event_ids: &[Uuid],
    event_type: Option<&str>,
) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE outbox_events
            SET status = 'PENDING', attempts = 0, next_attempt_at = now(), last_error = NULL,
                claim_token = NULL, lease_until = NULL
          WHERE status = 'DEAD' AND (event_id = ANY($1) OR event_type = $2)
      RETURNING event_id",
        event_ids,
        event_type
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Passes over DEAD events for good (SKIPPED), so their aggregates' later events may go.
pub async fn skip(conn: &mut PgConnection, event_ids: &[Uuid]) -> Result<Vec<Uuid>, DbError> {
    Ok(sqlx::query_scalar!(
        "UPDATE outbox_events SET status = 'SKIPPED', claim_token = NULL, lease_until = NULL
          WHERE status = 'DEAD' AND event_id = ANY($1)
      RETURNING event_id",
        event_ids
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Records an operator's action on the outbox.
pub async fn log_admin_action(
    conn: &mut PgConnection,
    action: &str,
    actor: &str,
    reason: &str,
    event_ids: &[Uuid],
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO outbox_admin_log (action, actor, reason, event_ids) VALUES ($1, $2, $3, $4)",
        action,
        actor,
        reason,
        event_ids
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
