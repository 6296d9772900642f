//! webhook_events: each provider event id is acted on once per tenant.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::TenantId;

/// Records a provider event; `false` when it was already recorded (a replay). Concurrent
/// deliveries of one event wait for each other here, so only one acts on it.
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider: &str,
    event_id: &str,
    event_type: &str,
    payment_id: Option<Uuid>,
    outcome: &str,
) -> Result<bool, DbError> {
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO webhook_events (tenant_id, provider, event_id, event_type, payment_id, outcome)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT DO NOTHING
           RETURNING 1 AS "inserted!""#,
        tenant.0,
        provider,
        event_id,
        event_type,
        payment_id,
        outcome
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(inserted.is_some())
}

/// What was decided for an event recorded earlier.
pub async fn outcome(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider: &str,
    event_id: &str,
) -> Result<Option<String>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT outcome FROM webhook_events WHERE tenant_id = $1 AND provider = $2 AND event_id = $3",
        tenant.0,
        provider,
        event_id
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// The tenant a webhook path names, if it is active (through the `webhook_tenant` SECURITY
/// DEFINER function: the API role cannot read tenants across tenants).
pub async fn tenant_by_slug(
    conn: &mut PgConnection,
    slug: &str,
) -> Result<Option<TenantId>, DbError> {
    let id = sqlx::query_scalar!("SELECT webhook_tenant($1)", slug)
        .fetch_one(&mut *conn)
        .await?;
    Ok(id.map(TenantId))
}
