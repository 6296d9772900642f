//! `usage.period-events.*`: which period types' final-period events (`usage.period.finalized`,
//! `usage.period.revised`) a tenant wants — validate → one transaction (the change and its
//! audit row) → respond. Off by default; the aggregation writes them from the next run.

use meterbridge::domain::period::PeriodType;
use meterbridge::repo::usage_settings;
use meterbridge::{Database, DbError};
use serde_json::{json, Value};

use crate::error::AdminError;
use crate::settings;

/// Makes `periods` the tenant's set (an empty list turns them all off).
pub async fn set(
    db: &Database,
    slug: &str,
    periods: &[PeriodType],
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let change = settings::change(db, slug, reason, actor).await?;
    let mut tx = db.begin().await?;
    let before = usage_settings::set_period_events(&mut tx, &change, periods).await?;
    let after = usage_settings::period_events(&mut tx, change.tenant).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(json!({"tenant": slug, "before": before, "periods": after}))
}

pub async fn show(db: &Database, slug: &str) -> Result<Value, AdminError> {
    let tenant = settings::tenant(db, slug).await?;
    let mut conn = db.acquire().await?;
    let periods = usage_settings::period_events(&mut conn, tenant).await?;
    Ok(json!({"tenant": slug, "periods": periods}))
}
