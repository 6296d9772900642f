//! outbox_events: the write side (an event in the transaction that made it true) and the reads
//! verify-payment needs. The relay's claim and marks live with the relay.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::outbox::Envelope;
use crate::domain::TenantId;

/// The next sequence number of an aggregate's events. Call it with the aggregate locked (the
/// payment row `FOR UPDATE`), so that no other transaction takes the same number.
pub async fn next_sequence(
    conn: &mut PgConnection,
    tenant: TenantId,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<i32, DbError> {
    let next = sqlx::query_scalar!(
        r#"SELECT coalesce(max(aggregate_sequence), 0) + 1 AS "next!"
             FROM outbox_events
            WHERE tenant_id = $1 AND aggregate_type = $2 AND aggregate_id = $3"#,
        tenant.0,
        aggregate_type,
        aggregate_id
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(next)
}

/// Writes one event, PENDING. Its envelope is stored whole, as the relay will publish it.
pub async fn insert<D: Serialize>(
    conn: &mut PgConnection,
    envelope: &Envelope<D>,
) -> Result<i64, DbError> {
    let payload =
        serde_json::to_value(envelope).map_err(|e| DbError::Decode(format!("envelope: {e}")))?;
    let id = sqlx::query_scalar!(
        r#"INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                      correlation_id, idempotency_key, aggregate_type,
                                      aggregate_id, aggregate_sequence, source_service,
                                      created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
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
        envelope.occurred_at
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
