//! `meter.*`: a tenant's meters — how its CloudEvents (`POST /api/v1/events`) map to usage
//! events: validate → one transaction (the change and its audit row) → respond. The ingest
//! function applies a change within its cache's 60 s.

use meterbridge::domain::meter::MeterDefinition;
use meterbridge::domain::MetricCatalog;
use meterbridge::repo::{meters, metrics};
use meterbridge::{Database, DbError};
use serde_json::{json, Value};

use crate::error::AdminError;
use crate::settings::{change, tenant as tenant_id};

pub async fn set(
    db: &Database,
    tenant: &str,
    meter: &MeterDefinition,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    meter
        .parse()
        .map_err(|e| AdminError::BadRequest(format!("{}: {}", e.field, e.message)))?;
    let catalog = MetricCatalog::new(metrics::catalog(db.pool()).await?);
    if catalog.get(&meter.metric).is_none() {
        let shown: String = meter.metric.chars().take(64).collect();
        return Err(AdminError::BadRequest(format!(
            "metric: {shown:?} is not in the metric catalog"
        )));
    }
    let change = change(db, tenant, reason, actor).await?;
    let mut tx = db.begin().await?;
    let existing = meters::list(&mut tx, change.tenant).await?;
    if let Some(other) = existing
        .iter()
        .find(|m| m.event_type == meter.event_type && m.slug != meter.slug)
    {
        return Err(AdminError::Conflict(format!(
            "meter {:?} already counts events of type {:?}: one meter per event type",
            other.slug, meter.event_type
        )));
    }
    let before = meters::set(&mut tx, &change, meter).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(json!({
        "tenant": tenant,
        "meter": meter,
        "replaced": before,
        "appliesWithin": "60 s (the ingest function's cache)",
    }))
}

pub async fn remove(
    db: &Database,
    tenant: &str,
    slug: &str,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let change = change(db, tenant, reason, actor).await?;
    let mut tx = db.begin().await?;
    let removed = meters::remove(&mut tx, &change, slug).await?;
    tx.commit().await.map_err(DbError::from)?;
    let removed = removed.ok_or_else(|| {
        AdminError::NotFound(format!(
            "tenant {tenant:?} has no meter {:?}",
            slug.chars().take(64).collect::<String>()
        ))
    })?;
    Ok(json!({"tenant": tenant, "removed": removed}))
}

pub async fn list(db: &Database, tenant: &str) -> Result<Value, AdminError> {
    let id = tenant_id(db, tenant).await?;
    let mut conn = db.acquire().await?;
    Ok(json!({"tenant": tenant, "meters": meters::list(&mut conn, id).await?}))
}
