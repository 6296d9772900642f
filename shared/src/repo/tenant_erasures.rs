//! tenant_erasures (migration 0023): a tenant's offboarding, one step at a time, each a
//! transaction of its own, recorded in its receipt: first every row of the tenant in every table
//! that has a `tenant_id` (day partitions live and archived, found anew at each step so none is
//! missed), then every dedup-key partition, then (by the caller) its Redis keys and secrets,
//! and last its tenant row.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::types::Oid;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::TenantId;

/// An offboarding request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub tenant: TenantId,
    pub slug: &'a str,
    pub reason: &'a str,
    pub requested_by: &'a str,
    /// Keep the billing records (aggregates, payments, their audit) and the tenant's row.
    pub keep_billing: bool,
}

/// Where an offboarding stands; its receipt once finished.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub tenant_id: Uuid,
    pub slug: String,
    pub reason: String,
    pub requested_by: String,
    pub keep_billing: bool,
    /// `rows`, `keys`, `redis`, `secrets`, `tenant`, then `done`.
    pub phase: String,
    /// Rows deleted per table (day and key partitions under their parent's name).
    pub rows_deleted: serde_json::Value,
    pub redis_keys: i64,
    pub secrets_deleted: i32,
    pub steps: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The Redis SCAN cursor (redis phase).
    #[serde(skip)]
    pub redis_cursor: Option<String>,
}

/// The billing records `keep_billing` keeps.
pub const BILLING_TABLES: [&str; 3] = ["usage_aggregates", "payments", "payment_audit"];

/// Starts the offboarding, or finds the one already started for the tenant.
pub async fn start(pool: &PgPool, request: &Request<'_>) -> Result<Receipt, DbError> {
    sqlx::query!(
        "INSERT INTO tenant_erasures (tenant_id, slug, reason, requested_by, keep_billing)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id) DO NOTHING",
        request.tenant.0,
        request.slug,
        request.reason,
        request.requested_by,
        request.keep_billing
    )
    .execute(pool)
    .await?;
    find(pool, request.tenant)
        .await?
        .ok_or_else(|| DbError::from(sqlx::Error::RowNotFound))
}

pub async fn find(pool: &PgPool, tenant: TenantId) -> Result<Option<Receipt>, DbError> {
    Ok(sqlx::query_as!(
        Receipt,
        "SELECT tenant_id, slug, reason, requested_by, keep_billing, phase, rows_deleted,
                redis_keys, secrets_deleted, steps, started_at, finished_at, redis_cursor
           FROM tenant_erasures WHERE tenant_id = $1",
        tenant.0
    )
    .fetch_optional(pool)
    .await?)
}

/// The latest offboarding of a tenant with this slug (the tenant's row may be gone).
pub async fn find_by_slug(pool: &PgPool, slug: &str) -> Result<Option<Receipt>, DbError> {
    Ok(sqlx::query_as!(
        Receipt,
        "SELECT tenant_id, slug, reason, requested_by, keep_billing, phase, rows_deleted,
                redis_keys, secrets_deleted, steps, started_at, finished_at, redis_cursor
           FROM tenant_erasures WHERE slug = $1 ORDER BY started_at DESC LIMIT 1",
        slug
    )
    .fetch_optional(pool)
    .await?)
}

/// A table still holding rows of the tenant, as a step sees it.
struct Table {
    oid: Oid,
    /// Schema-qualified and quoted.
    name: String,
    /// Under which name its rows are counted (a day or key partition: its parent's).
    counted_as: String,
    /// An index leads with tenant_id: the tenant's rows are found through it; otherwise the
    /// table is read by block ranges, each once.
    indexed: bool,
}

/// Rows a step deletes through an index at most; blocks it reads at most otherwise.
pub const STEP_ROWS: i64 = 10_000;
pub const STEP_BLOCKS: i64 = 8_192;

/// One step of the `rows` or `keys` phase: the next table's next chunk, or the phase's end
/// when no table is left. Returns whether the phase still has work.
pub async fn table_step(
    pool: &PgPool,
    receipt: &Receipt,
    rows: i64,
    blocks: i64,
) -> Result<bool, DbError> {
    let mut tx = pool.begin().await?;
    let progress = sqlx::query!(
        r#"SELECT phase AS "phase!", tables_done AS "tables_done!", next_block
             FROM tenant_erasures WHERE tenant_id = $1 FOR UPDATE"#,
        receipt.tenant_id
    )
    .fetch_one(&mut *tx)
    .await?;
    let keys = match progress.phase.as_str() {
        "rows" => false,
        "keys" => true,
        _ => return Ok(false),
    };
    let Some(table) = next_table(&mut tx, receipt, keys, &progress.tables_done).await? else {
        // The phase's tables are all done: the next phase starts with none done.
        sqlx::query!(
            "UPDATE tenant_erasures
                SET phase = CASE phase WHEN 'rows' THEN 'keys' ELSE 'redis' END,
                    tables_done = '{}', next_block = NULL, steps = steps + 1
              WHERE tenant_id = $1",
            receipt.tenant_id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(true);
    };
    let (deleted, finished, next_block) = if table.indexed {
        let deleted = sqlx::query(&format!(
            "DELETE FROM {t} WHERE ctid = ANY (ARRAY (
                 SELECT ctid FROM {t} WHERE tenant_id = $1 LIMIT $2))",
            t = table.name
        ))
        .bind(receipt.tenant_id)
        .bind(rows.max(1))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        (deleted, deleted < rows.max(1) as u64, None)
    } else {
        let from = progress.next_block.unwrap_or(0);
        let to = from + blocks.max(1);
        let deleted = sqlx::query(&format!(
            "DELETE FROM {t}
              WHERE ctid >= pg_catalog.format('(%s,0)', $2::bigint)::tid
                AND ctid < pg_catalog.format('(%s,0)', $3::bigint)::tid
                AND tenant_id = $1",
            t = table.name
        ))
        .bind(receipt.tenant_id)
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let pages: i64 = sqlx::query_scalar(
            "SELECT pg_catalog.pg_relation_size($1::oid::regclass)
                    / pg_catalog.current_setting('block_size')::bigint",
        )
        .bind(table.oid)
        .fetch_one(&mut *tx)
        .await?;
        (deleted, to >= pages, Some(to))
    };
    let deleted = i64::try_from(deleted).unwrap_or(i64::MAX);
    sqlx::query!(
        "UPDATE tenant_erasures
            SET tables_done = CASE WHEN $2 THEN tables_done || $3::oid ELSE tables_done END,
                next_block = CASE WHEN $2 THEN NULL ELSE $4::bigint END,
                rows_deleted = jsonb_set(rows_deleted, ARRAY[$5::text],
                    to_jsonb(coalesce((rows_deleted ->> $5)::bigint, 0) + $6)),
                steps = steps + 1
          WHERE tenant_id = $1",
        receipt.tenant_id,
        finished,
        table.oid,
        next_block,
        table.counted_as,
        deleted
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The first table of the phase not yet done: every table with a `tenant_id` column (day
/// partitions live and archived included; dedup-key partitions in the `keys` phase, a merge's
/// target after its sources, so that a key it copies is deleted from where it lands), the
/// receipts and the billing records it keeps excepted. Children go before the rows they
/// reference (payment audit before payments, everything before API keys).
async fn next_table(
    tx: &mut sqlx::PgConnection,
    receipt: &Receipt,
    keys: bool,
    done: &[Oid],
) -> Result<Option<Table>, DbError> {
    let kept: Vec<String> = if receipt.keep_billing {
        BILLING_TABLES.iter().map(|t| (*t).to_owned()).collect()
    } else {
        Vec::new()
    };
    Ok(sqlx::query!(
        r#"SELECT c.oid AS "oid!", c.oid::regclass::text AS "name!",
                  CASE WHEN c.relname ~ '^usage_events_p[0-9]{8}$' THEN 'usage_events'
                       WHEN c.relname ~ '^usage_event_keys_' THEN 'usage_event_keys'
                       ELSE c.relname::text END AS "counted_as!",
                  EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                           WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum) AS "indexed!"
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
                                            AND NOT a.attisdropped
            WHERE n.nspname IN ('public', 'usage_archive') AND c.relkind = 'r'
              AND c.relname NOT IN ('tenant_erasures')
              AND c.relname <> ALL ($1::text[])
              AND (c.relname ~ '^usage_event_keys_') = $2
              AND c.oid <> ALL ($3::oid[])
            ORDER BY EXISTS (SELECT 1 FROM public.usage_key_merges m WHERE m.target = c.relname),
                     CASE c.relname WHEN 'payments' THEN 1 WHEN 'api_keys' THEN 2 ELSE 0 END,
                     c.relname
            LIMIT 1"#,
        &kept,
        keys,
        done
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| Table {
        oid: r.oid,
        name: r.name,
        counted_as: r.counted_as,
        indexed: r.indexed,
    }))
}

/// The redis phase's progress: keys deleted, and the next cursor (`None`: the phase is done).
pub async fn record_redis(
    pool: &PgPool,
    tenant: Uuid,
    deleted: i64,
    next_cursor: Option<&str>,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE tenant_erasures
            SET redis_keys = redis_keys + $2, redis_cursor = $3,
                phase = CASE WHEN $3::text IS NULL THEN 'secrets' ELSE phase END,
                steps = steps + 1
          WHERE tenant_id = $1 AND phase = 'redis'",
        tenant,
        deleted,
        next_cursor
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The secrets phase done: how many were deleted.
pub async fn record_secrets(pool: &PgPool, tenant: Uuid, deleted: i32) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE tenant_erasures
            SET secrets_deleted = secrets_deleted + $2, phase = 'tenant', steps = steps + 1
          WHERE tenant_id = $1 AND phase = 'secrets'",
        tenant,
        deleted
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The last step: the tenant's row deleted (or, billing kept, marked erased), the receipt
/// finished, in one transaction.
pub async fn finish(pool: &PgPool, receipt: &Receipt) -> Result<(), DbError> {
    let mut tx = pool.begin().await?;
    if receipt.keep_billing {
        sqlx::query!(
            "UPDATE tenants SET status = 'erased' WHERE id = $1",
            receipt.tenant_id
        )
        .execute(&mut *tx)
        .await?;
    } else {
        sqlx::query!("DELETE FROM tenants WHERE id = $1", receipt.tenant_id)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query!(
        "UPDATE tenant_erasures
            SET phase = 'done', finished_at = now(), steps = steps + 1,
                rows_deleted = jsonb_set(rows_deleted, '{tenants}',
                    to_jsonb(CASE WHEN keep_billing THEN 0 ELSE 1 END))
          WHERE tenant_id = $1 AND phase = 'tenant'",
        receipt.tenant_id
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
