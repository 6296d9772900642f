//! A tenant's usage settings that the admin function changes, each change audited in
//! `tenant_settings_audit` in its own transaction: which period types' final-period events it
//! wants (`usage_period_event_settings`). The events themselves are written by triggers on
//! `usage_aggregates` (migration 0025).

use sqlx::PgConnection;

use crate::db::DbError;
use crate::domain::period::PeriodType;
use crate::domain::TenantId;

/// Who changes a setting, and why.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub tenant: TenantId,
    pub actor: &'a str,
    pub reason: &'a str,
}

/// The period types whose final-period events the tenant wants, in order.
pub async fn period_events(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<Vec<PeriodType>, DbError> {
    let stored = sqlx::query_scalar!(
        "SELECT period_type FROM usage_period_event_settings WHERE tenant_id = $1",
        tenant.0
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut periods = stored
        .iter()
        .map(|p| PeriodType::parse(p).map_err(|e| DbError::Decode(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    periods.sort();
    Ok(periods)
}

/// Makes `periods` the tenant's set (others off), audited as `usage.period-events`. Returns
/// the set before the change; a set that does not change is not audited.
pub async fn set_period_events(
    conn: &mut PgConnection,
    change: &Change<'_>,
    periods: &[PeriodType],
) -> Result<Vec<PeriodType>, DbError> {
    let before = period_events(conn, change.tenant).await?;
    let mut after = periods.to_vec();
    after.sort();
    after.dedup();
    if before == after {
        return Ok(before);
    }
    let names: Vec<&str> = after.iter().map(|p| p.as_str()).collect();
    sqlx::query!(
        "DELETE FROM usage_period_event_settings
          WHERE tenant_id = $1 AND NOT period_type = ANY($2::text[])",
        change.tenant.0,
        &names as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "INSERT INTO usage_period_event_settings (tenant_id, period_type)
         SELECT $1, p FROM UNNEST($2::text[]) AS p
         ON CONFLICT DO NOTHING",
        change.tenant.0,
        &names as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    let json = |p: &[PeriodType]| serde_json::json!({ "periods": p });
    audit(
        conn,
        change,
        "usage.period-events",
        Some(json(&before)),
        Some(json(&after)),
    )
    .await?;
    Ok(before)
}

/// One audit row of a tenant's settings.
pub async fn audit(
    conn: &mut PgConnection,
    change: &Change<'_>,
    setting: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO tenant_settings_audit (tenant_id, setting, actor, reason, before, after)
         VALUES ($1, $2, $3, $4, $5, $6)",
        change.tenant.0,
        setting,
        change.actor,
        change.reason,
        before,
        after
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
