//! payment_audit: one append-only row per attempted transition, accepted or refused.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::TenantId;

/// One attempt, as written.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub payment_id: Option<Uuid>,
    /// `create`, `verify`, `fail`, `refund` or `webhook`.
    pub action: &'a str,
    pub accepted: bool,
    pub from_status: Option<&'a str>,
    pub to_status: Option<&'a str>,
    /// `key:<prefix>/<source>`, `webhook:<provider>` or `admin`.
    pub actor: &'a str,
    pub actor_detail: Option<&'a str>,
    pub method: Option<&'a str>,
    /// A stable code: `verified`, `already_verified`, `amount_mismatch`, `bad_signature`…
    pub reason: &'a str,
    pub correlation_id: &'a str,
    pub details: Value,
}

pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    entry: &AuditEntry<'_>,
) -> Result<(), DbError> {
    sqlx::query!(
        r#"INSERT INTO payment_audit (tenant_id, payment_id, action, accepted, from_status,
                                      to_status, actor, actor_detail, method, reason,
                                      correlation_id, details)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"#,
        tenant.0,
        entry.payment_id,
        entry.action,
        entry.accepted,
        entry.from_status,
        entry.to_status,
        entry.actor,
        entry.actor_detail,
        entry.method,
        entry.reason,
        entry.correlation_id,
        entry.details
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A stored audit row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRow {
    pub payment_id: Option<Uuid>,
    pub action: String,
    pub accepted: bool,
    pub from_status: Option<String>,
    pub to_status: Option<String>,
    pub actor: String,
    pub actor_detail: Option<String>,
    pub method: Option<String>,
    pub reason: String,
    pub correlation_id: String,
    pub at: DateTime<Utc>,
}

/// A payment's history, oldest first (at most `limit` rows).
pub async fn for_payment(
    conn: &mut PgConnection,
    tenant: TenantId,
    payment_id: Uuid,
    limit: i64,
) -> Result<Vec<AuditRow>, DbError> {
    Ok(sqlx::query_as!(
        AuditRow,
        r#"SELECT payment_id, action, accepted, from_status, to_status, actor, actor_detail, method,
                  reason, correlation_id, at
             FROM payment_audit
            WHERE tenant_id = $1 AND payment_id = $2
            ORDER BY id
            LIMIT $3"#,
        tenant.0,
        payment_id,
        limit
    )
    .fetch_all(&mut *conn)
    .await?)
}
