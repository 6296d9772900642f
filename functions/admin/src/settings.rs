//! What the actions on a tenant's usage settings share (period events, usage limits, meters):
//! the tenant a slug names, and the audited change a request names.

use meterbridge::domain::TenantId;
use meterbridge::repo::tenants;
use meterbridge::repo::usage_settings::Change;
use meterbridge::Database;

use crate::error::AdminError;
use crate::limits::checked_text;

/// The tenant of `slug`; `NotFound` when there is none.
pub async fn tenant(db: &Database, slug: &str) -> Result<TenantId, AdminError> {
    Ok(tenants::find_by_slug(db.pool(), slug)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no tenant with slug {slug:?}")))?
        .id)
}

/// The audited change a request names: its reason and actor (`admin` when absent) checked, its
/// tenant found.
pub async fn change<'a>(
    db: &Database,
    slug: &str,
    reason: &'a str,
    actor: Option<&'a str>,
) -> Result<Change<'a>, AdminError> {
    let reason = checked_text(reason, "reason", 500)?;
    let actor = checked_text(actor.unwrap_or("admin"), "actor", 128)?;
    Ok(Change {
        tenant: tenant(db, slug).await?,
        actor,
        reason,
    })
}
