//! idempotency_records: the first response to an `Idempotency-Key`, replayed for the same
//! request and refused for another.

use serde_json::Value;
use sqlx::PgConnection;

use crate::db::DbError;
use crate::domain::TenantId;

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub operation: String,
    pub request_hash: Vec<u8>,
    pub response_status: i16,
    pub response_body: Value,
}

/// Who used the key, and for what.
#[derive(Debug, Clone, Copy)]
pub struct KeyOwner<'a> {
    pub tenant: TenantId,
    pub source_service: &'a str,
    pub key: &'a str,
}

pub async fn find(
    conn: &mut PgConnection,
    owner: KeyOwner<'_>,
) -> Result<Option<Recorded>, DbError> {
    Ok(sqlx::query_as!(
        Recorded,
        r#"SELECT operation, request_hash, response_status, response_body
             FROM idempotency_records
            WHERE tenant_id = $1 AND source_service = $2 AND idempotency_key = $3"#,
        owner.tenant.0,
        owner.source_service,
        owner.key
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// Stores the response in the transaction that produced it; `false` when another transaction
/// stored one for the key first (the caller then rolls back and replays that one). A concurrent
/// holder of the key is waited for.
pub async fn record(
    conn: &mut PgConnection,
    owner: KeyOwner<'_>,
    operation: &str,
    request_hash: &[u8; 32],
    response_status: i16,
    response_body: &Value,
) -> Result<bool, DbError> {
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO idempotency_records (tenant_id, source_service, idempotency_key, operation,
                                            request_hash, response_status, response_body)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT DO NOTHING
           RETURNING 1 AS "inserted!""#,
        owner.tenant.0,
        owner.source_service,
        owner.key,
        operation,
        request_hash.as_slice(),
        response_status,
        response_body
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(inserted.is_some())
}

/// Deletes at most `limit` records stored before `cutoff`, oldest first (the relay's retention
/// step, as meterbridge_ops); returns how many.
pub async fn expire(
    conn: &mut PgConnection,
    cutoff: chrono::DateTime<chrono::Utc>,
    limit: i64,
) -> Result<u64, DbError> {
    Ok(sqlx::query!(
        "DELETE FROM idempotency_records
          WHERE (tenant_id, source_service, idempotency_key) IN (
                SELECT tenant_id, source_service, idempotency_key FROM idempotency_records
                 WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
        cutoff,
        limit
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}
