use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::{Scopes, SourceService, TenantId, TenantStatus, Trust};

/// A key as listings show it: never the key, never its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub prefix: String,
    pub source_service: String,
    pub trust: Trust,
    pub scopes: Scopes,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

struct ApiKeyRow {
    id: Uuid,
    tenant_id: Uuid,
    prefix: String,
    source_service: String,
    trust: String,
    scopes: Vec<String>,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

impl TryFrom<ApiKeyRow> for ApiKeyRecord {
    type Error = DbError;
    fn try_from(row: ApiKeyRow) -> Result<Self, DbError> {
        Ok(ApiKeyRecord {
            id: row.id,
            tenant_id: TenantId(row.tenant_id),
            prefix: row.prefix,
            source_service: row.source_service,
            trust: row.trust.parse()?,
            scopes: Scopes::from_stored(&row.scopes)?,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            last_used_at: row.last_used_at,
        })
    }
}

pub async fn insert(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    prefix: &str,
    key_hash: &[u8; 32],
    source: &SourceService,
    trust: Trust,
    scopes: Scopes,
) -> Result<ApiKeyRecord, DbError> {
    let scope_names = scopes.names();
    sqlx::query_as!(
        ApiKeyRow,
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust, scopes)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, tenant_id, prefix, source_service, trust, scopes, created_at, revoked_at,
                   last_used_at",
        tenant.0,
        prefix,
        key_hash.as_slice(),
        source.as_str(),
        trust.as_str(),
        &scope_names as &[&str]
    )
    .fetch_one(db)
    .await?
    .try_into()
}

/// Revokes the key with this prefix (idempotent: the first revocation time is kept).
pub async fn revoke(
    db: impl PgExecutor<'_>,
    prefix: &str,
) -> Result<Option<ApiKeyRecord>, DbError> {
    sqlx::query_as!(
        ApiKeyRow,
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE prefix = $1
         RETURNING id, tenant_id, prefix, source_service, trust, scopes, created_at, revoked_at,
                   last_used_at",
        prefix
    )
    .fetch_optional(db)
    .await?
    .map(ApiKeyRecord::try_from)
    .transpose()
}

pub async fn list_for_tenant(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
) -> Result<Vec<ApiKeyRecord>, DbError> {
    sqlx::query_as!(
        ApiKeyRow,
        "SELECT id, tenant_id, prefix, source_service, trust, scopes, created_at, revoked_at,
                last_used_at
           FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC",
        tenant.0
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .map(ApiKeyRecord::try_from)
    .collect()
}

/// The stored key behind a prefix, with what authorization needs to know about it.
#[derive(Debug, Clone)]
pub struct KeyCandidate {
    pub key_id: Uuid,
    pub tenant_id: TenantId,
    pub tenant_slug: String,
    pub tenant_status: TenantStatus,
    pub key_hash: Vec<u8>,
    pub source_service: SourceService,
    pub trust: Trust,
    pub scopes: Scopes,
    pub revoked: bool,
}

/// Looks a key up by prefix through `authenticate_api_key` (SECURITY DEFINER), which the
/// RLS-bound API role may call before it knows its tenant.
pub async fn find_candidate(
    db: impl PgExecutor<'_>,
    prefix: &str,
) -> Result<Option<KeyCandidate>, DbError> {
    let row = sqlx::query!(
        r#"SELECT key_id AS "key_id!", tenant_id AS "tenant_id!", tenant_slug AS "tenant_slug!",
                  tenant_status AS "tenant_status!",
                  key_hash AS "key_hash!", source_service AS "source_service!", trust AS "trust!",
                  scopes AS "scopes!", revoked AS "revoked!"
             FROM authenticate_api_key($1)"#,
        prefix
    )
    .fetch_optional(db)
    .await?;
    row.map(|r| {
        Ok(KeyCandidate {
            key_id: r.key_id,
            tenant_id: TenantId(r.tenant_id),
            tenant_slug: r.tenant_slug,
            tenant_status: r.tenant_status.parse()?,
            key_hash: r.key_hash,
            source_service: SourceService::parse(&r.source_service)?,
            trust: r.trust.parse()?,
            scopes: Scopes::from_stored(&r.scopes)?,
            revoked: r.revoked,
        })
    })
    .transpose()
}

/// Records that a key was used (at most once a minute per key; see `touch_api_key`).
pub async fn touch(db: impl PgExecutor<'_>, key_id: Uuid) -> Result<(), DbError> {
    sqlx::query!("SELECT touch_api_key($1)", key_id)
        .execute(db)
        .await?;
    Ok(())
}
