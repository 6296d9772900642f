//! rate_limit_overrides and rate_limit_audit: a key's limits as its lookup reads them (through
//! the SECURITY DEFINER `api_key_rate_limits`), and the admin function's changes, each with its
//! audit row in the same transaction.

use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::rate_limit::{Overrides, Rate};
use crate::domain::TenantId;

fn rate(per_second: Option<i32>, burst: Option<i32>) -> Option<Rate> {
    match (per_second, burst) {
        (Some(r), Some(b)) if r > 0 && b > 0 => Some(Rate::new(r as u32, b as u32)),
        _ => None,
    }
}

/// The overrides that apply to a key — its tenant's and its own, each empty when none — given
/// its id and the hash of the key as presented.
pub async fn of_key(
    db: impl PgExecutor<'_>,
    key_id: Uuid,
    key_hash: &[u8; 32],
) -> Result<(Overrides, Overrides), DbError> {
    let rows = sqlx::query!(
        r#"SELECT scope AS "scope!", requests_per_second, request_burst, events_per_second,
                  event_burst, max_in_flight
             FROM api_key_rate_limits($1, $2)"#,
        key_id,
        key_hash.as_slice()
    )
    .fetch_all(db)
    .await?;
    let (mut tenant, mut key) = (Overrides::default(), Overrides::default());
    for r in rows {
        let o = Overrides {
            requests: rate(r.requests_per_second, r.request_burst),
            events: rate(r.events_per_second, r.event_burst),
            max_in_flight: r.max_in_flight.filter(|m| *m > 0).map(|m| m as u32),
        };
        if r.scope == "tenant" {
            tenant = o;
        } else {
            key = o;
        }
    }
    Ok((tenant, key))
}

/// One override row, as `tenant limits show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OverrideRow {
    /// `None`: the tenant's own budgets.
    pub api_key_prefix: Option<String>,
    pub requests_per_second: Option<i32>,
    pub request_burst: Option<i32>,
    pub events_per_second: Option<i32>,
    pub event_burst: Option<i32>,
    pub max_in_flight: Option<i32>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl OverrideRow {
    fn as_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A tenant's override rows: its own first, then its keys' by prefix.
pub async fn list(db: impl PgExecutor<'_>, tenant: TenantId) -> Result<Vec<OverrideRow>, DbError> {
    Ok(sqlx::query_as!(
        OverrideRow,
        r#"SELECT k.prefix AS "api_key_prefix?", o.requests_per_second, o.request_burst,
                  o.events_per_second, o.event_burst, o.max_in_flight, o.updated_at
             FROM rate_limit_overrides o
             LEFT JOIN api_keys k ON k.id = o.api_key_id
            WHERE o.tenant_id = $1
            ORDER BY k.prefix NULLS FIRST"#,
        tenant.0
    )
    .fetch_all(db)
    .await?)
}

async fn current(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: Option<Uuid>,
) -> Result<Option<OverrideRow>, DbError> {
    Ok(sqlx::query_as!(
        OverrideRow,
        r#"SELECT k.prefix AS "api_key_prefix?", o.requests_per_second, o.request_burst,
                  o.events_per_second, o.event_burst, o.max_in_flight, o.updated_at
             FROM rate_limit_overrides o
             LEFT JOIN api_keys k ON k.id = o.api_key_id
            WHERE o.tenant_id = $1 AND o.api_key_id IS NOT DISTINCT FROM $2
            FOR UPDATE OF o"#,
        tenant.0,
        key
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// Who changes limits, and why (both kept in the audit row).
pub struct Change<'a> {
    pub tenant: TenantId,
    /// `None`: the tenant's own budgets.
    pub key: Option<Uuid>,
    pub actor: &'a str,
    pub reason: &'a str,
}

/// Sets the given overrides (fields left `None` keep their current override), and audits the
/// change. Returns the row as it now is.
pub async fn set(
    conn: &mut PgConnection,
    change: &Change<'_>,
    overrides: &Overrides,
) -> Result<OverrideRow, DbError> {
    let before = current(conn, change.tenant, change.key).await?;
    let split = |r: Option<Rate>| (r.map(|r| r.per_second as i32), r.map(|r| r.burst as i32));
    let (rps, rburst) = split(overrides.requests);
    let (eps, eburst) = split(overrides.events);
    let in_flight = overrides.max_in_flight.map(|m| m as i32);
    sqlx::query!(
        "INSERT INTO rate_limit_overrides AS o (tenant_id, api_key_id, requests_per_second,
                                                request_burst, events_per_second, event_burst,
                                                max_in_flight)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id, api_key_id) DO UPDATE
            SET requests_per_second = COALESCE($3, o.requests_per_second),
                request_burst = COALESCE($4, o.request_burst),
                events_per_second = COALESCE($5, o.events_per_second),
                event_burst = COALESCE($6, o.event_burst),
                max_in_flight = COALESCE($7, o.max_in_flight),
                updated_at = now()",
        change.tenant.0,
        change.key,
        rps,
        rburst,
        eps,
        eburst,
        in_flight
    )
    .execute(&mut *conn)
    .await?;
    let after = current(conn, change.tenant, change.key)
        .await?
        .ok_or_else(|| DbError::Config("the override just written is gone".into()))?;
    audit(conn, change, before.as_ref(), Some(&after)).await?;
    Ok(after)
}

/// Removes the overrides (the defaults apply again), and audits it. Returns whether there were
/// any.
pub async fn clear(conn: &mut PgConnection, change: &Change<'_>) -> Result<bool, DbError> {
    let Some(before) = current(conn, change.tenant, change.key).await? else {
        return Ok(false);
    };
    sqlx::query!(
        "DELETE FROM rate_limit_overrides WHERE tenant_id = $1 AND api_key_id IS NOT DISTINCT FROM $2",
        change.tenant.0,
        change.key
    )
    .execute(&mut *conn)
    .await?;
    audit(conn, change, Some(&before), None).await?;
    Ok(true)
}

async fn audit(
    conn: &mut PgConnection,
    change: &Change<'_>,
    before: Option<&OverrideRow>,
    after: Option<&OverrideRow>,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO rate_limit_audit (tenant_id, api_key_id, actor, reason, before, after)
         VALUES ($1, $2, $3, $4, $5, $6)",
        change.tenant.0,
        change.key,
        change.actor,
        change.reason,
        before.map(OverrideRow::as_json),
        after.map(OverrideRow::as_json)
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
