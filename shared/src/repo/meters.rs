//! meters (migration 0027): a tenant's meter definitions — how its CloudEvents map to usage
//! events. Set and removed by the admin function, each change audited in
//! `tenant_settings_audit` in its transaction.

use std::collections::BTreeMap;

use sqlx::PgConnection;

use crate::db::DbError;
use crate::domain::meter::MeterDefinition;
use crate::domain::TenantId;
use crate::repo::usage_settings::{self, Change};

/// The tenant's meters, by slug (run in the tenant's transaction for the API role).
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> Result<Vec<MeterDefinition>, DbError> {
    sqlx::query!(
        r#"SELECT slug, event_type, metric, value_property, group_by
             FROM meters WHERE tenant_id = $1 ORDER BY slug"#,
        tenant.0
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| {
        let group_by: BTreeMap<String, String> = serde_json::from_value(r.group_by)
            .map_err(|e| DbError::Decode(format!("meters.group_by: {e}")))?;
        Ok(MeterDefinition {
            slug: r.slug,
            event_type: r.event_type,
            metric: r.metric,
            value_property: r.value_property,
            group_by,
        })
    })
    .collect()
}

fn as_json(meter: &MeterDefinition) -> serde_json::Value {
    serde_json::to_value(meter).unwrap_or_default()
}

/// Sets (or replaces) the meter of `meter.slug`, audited as `meters`. Returns the one it
/// replaced. The caller has checked the definition, its metric against the catalog, and that
/// no other meter of the tenant counts the same event type (a unique constraint holds it too).
pub async fn set(
    conn: &mut PgConnection,
    change: &Change<'_>,
    meter: &MeterDefinition,
) -> Result<Option<MeterDefinition>, DbError> {
    let before = list(conn, change.tenant)
        .await?
        .into_iter()
        .find(|m| m.slug == meter.slug);
    let group_by = serde_json::to_value(&meter.group_by)
        .map_err(|e| DbError::Decode(format!("groupBy: {e}")))?;
    sqlx::query!(
        "INSERT INTO meters (tenant_id, slug, event_type, metric, value_property, group_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, slug) DO UPDATE
            SET event_type = EXCLUDED.event_type, metric = EXCLUDED.metric,
                value_property = EXCLUDED.value_property, group_by = EXCLUDED.group_by,
                updated_at = now()",
        change.tenant.0,
        meter.slug,
        meter.event_type,
        meter.metric,
        meter.value_property,
        group_by
    )
    .execute(&mut *conn)
    .await?;
    usage_settings::audit(
        conn,
        change,
        "meters",
        before.as_ref().map(as_json),
        Some(as_json(meter)),
    )
    .await?;
    Ok(before)
}

/// Removes a meter, audited. Returns it, or `None` when there was none.
pub async fn remove(
    conn: &mut PgConnection,
    change: &Change<'_>,
    slug: &str,
) -> Result<Option<MeterDefinition>, DbError> {
    let Some(before) = list(conn, change.tenant)
        .await?
        .into_iter()
        .find(|m| m.slug == slug)
    else {
        return Ok(None);
    };
    sqlx::query!(
        "DELETE FROM meters WHERE tenant_id = $1 AND slug = $2",
        change.tenant.0,
        slug
    )
    .execute(&mut *conn)
    .await?;
    usage_settings::audit(conn, change, "meters", Some(as_json(&before)), None).await?;
    Ok(Some(before))
}
