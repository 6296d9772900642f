//! `usage.limits.*`: a tenant's usage limits per metric and period, with their thresholds —
//! validate → one transaction (the change and its audit row) → respond. A limit never refuses
//! usage; the API functions apply a change within their cache's 60 s.

use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::domain::MetricCatalog;
use meterbridge::repo::{metrics, usage_limits};
use meterbridge::{Database, DbError};
use serde_json::{json, Value};

use crate::error::AdminError;
use crate::settings;

/// What `usage.limits.set` asks for.
pub struct Requested<'a> {
    pub metric: &'a str,
    pub period: &'a str,
    pub limit: u64,
    pub thresholds: Option<Vec<u16>>,
}

/// The metric, when the catalog has it.
async fn known_metric<'m>(db: &Database, metric: &'m str) -> Result<&'m str, AdminError> {
    let catalog = MetricCatalog::new(metrics::catalog(db.pool()).await?);
    if catalog.get(metric).is_none() {
        let shown: String = metric.chars().take(64).collect();
        return Err(AdminError::BadRequest(format!(
            "metric: {shown:?} is not in the metric catalog"
        )));
    }
    Ok(metric)
}

fn period(value: &str) -> Result<LimitPeriod, AdminError> {
    LimitPeriod::parse(value).map_err(|e| AdminError::BadRequest(format!("period: {}", e.message)))
}

fn as_json(limit: &UsageLimit) -> Value {
    json!({
        "metric": limit.metric,
        "period": limit.period,
        "limit": limit.limit.to_string(),
        "thresholds": limit.thresholds,
    })
}

pub async fn set(
    db: &Database,
    slug: &str,
    requested: Requested<'_>,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let limit = UsageLimit::new(
        requested.metric,
        period(requested.period)?,
        requested.limit,
        requested.thresholds,
    )
    .map_err(|e| AdminError::BadRequest(format!("{}: {}", e.field, e.message)))?;
    let change = settings::change(db, slug, reason, actor).await?;
    known_metric(db, requested.metric).await?;
    let mut tx = db.begin().await?;
    let before = usage_limits::set(&mut tx, &change, &limit).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(json!({
        "tenant": slug,
        "limit": as_json(&limit),
        "replaced": before.as_ref().map(as_json),
        "appliesWithin": "60 s (the API functions' cache)",
    }))
}

pub async fn remove(
    db: &Database,
    slug: &str,
    metric: &str,
    period_name: &str,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let period = period(period_name)?;
    let change = settings::change(db, slug, reason, actor).await?;
    let mut tx = db.begin().await?;
    let removed = usage_limits::remove(&mut tx, &change, metric, period).await?;
    tx.commit().await.map_err(DbError::from)?;
    let Some(removed) = removed else {
        return Err(AdminError::NotFound(format!(
            "tenant {slug:?} has no {period_name} limit on {:?}",
            metric.chars().take(64).collect::<String>()
        )));
    };
    Ok(json!({"tenant": slug, "removed": as_json(&removed)}))
}

pub async fn list(db: &Database, slug: &str) -> Result<Value, AdminError> {
    let tenant = settings::tenant(db, slug).await?;
    let mut conn = db.acquire().await?;
    let limits = usage_limits::list(&mut conn, tenant).await?;
    Ok(json!({"tenant": slug, "limits": limits.iter().map(as_json).collect::<Vec<_>>()}))
}
