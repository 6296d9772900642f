use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::{Tenant, TenantId, TenantSlug};

struct TenantRow {
    id: Uuid,
    slug: String,
    name: String,
    status: String,
    created_at: DateTime<Utc>,
    disabled_at: Option<DateTime<Utc>>,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = DbError;
    fn try_from(row: TenantRow) -> Result<Self, DbError> {
        Ok(Tenant {
            id: TenantId(row.id),
            slug: row.slug,
            name: row.name,
            status: row.status.parse()?,
            created_at: row.created_at,
            disabled_at: row.disabled_at,
        })
    }
}

/// Creates an active tenant. A taken slug fails with a unique violation on `tenants_slug_key`.
pub async fn insert(
    db: impl PgExecutor<'_>,
    slug: &TenantSlug,
    name: &str,
) -> Result<Tenant, DbError> {
    sqlx::query_as!(
        TenantRow,
        "INSERT INTO tenants (slug, name) VALUES ($1, $2)
         RETURNING id, slug, name, status, created_at, disabled_at",
        slug.as_str(),
        name
    )
    .fetch_one(db)
    .await?
    .try_into()
}

pub async fn find_by_slug(db: impl PgExecutor<'_>, slug: &str) -> Result<Option<Tenant>, DbError> {
    sqlx::query_as!(
        TenantRow,
        "SELECT id, slug, name, status, created_at, disabled_at FROM tenants WHERE slug = $1",
        slug
    )
    .fetch_optional(db)
    .await?
    .map(Tenant::try_from)
    .transpose()
}

pub async fn find(db: impl PgExecutor<'_>, id: TenantId) -> Result<Option<Tenant>, DbError> {
    sqlx::query_as!(
        TenantRow,
        "SELECT id, slug, name, status, created_at, disabled_at FROM tenants WHERE id = $1",
        id.0
    )
    .fetch_optional(db)
    .await?
    .map(Tenant::try_from)
    .transpose()
}

/// Disables a tenant (idempotent: a disabled tenant keeps its first `disabled_at`; an erased
/// one stays erased).
pub async fn disable(db: impl PgExecutor<'_>, slug: &str) -> Result<Option<Tenant>, DbError> {
    sqlx::query_as!(
        TenantRow,
        "UPDATE tenants
            SET status = CASE status WHEN 'erased' THEN status ELSE 'disabled' END,
                disabled_at = COALESCE(disabled_at, now())
          WHERE slug = $1
         RETURNING id, slug, name, status, created_at, disabled_at",
        slug
    )
    .fetch_optional(db)
    .await?
    .map(Tenant::try_from)
    .transpose()
}

pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<Tenant>, DbError> {
    sqlx::query_as!(
        TenantRow,
        "SELECT id, slug, name, status, created_at, disabled_at FROM tenants ORDER BY slug"
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(Tenant::try_from)
    .collect()
}
