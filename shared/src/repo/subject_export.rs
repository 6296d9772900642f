//! What is held about one data subject (an actor id of a tenant), read for an export: their
//! events in every day partition, attached and archived, each exactly once; the days and periods
//! the distinct-actor sets hold them in; and the receipts of earlier erasures of them. Each
//! record is one JSON object, built by PostgreSQL and handed to a [`LineSink`] as it is read, so
//! memory stays bounded whatever the subject holds.

use std::future::Future;
use std::io;

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::postgres::types::Oid;
use sqlx::PgPool;

use crate::db::DbError;
use crate::domain::TenantId;

/// Where an export's records go, one JSON object a call, in order.
pub trait LineSink: Send {
    fn line(&mut self, json: &str) -> impl Future<Output = io::Result<()>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("writing the export: {0}")]
    Write(#[from] io::Error),
}

impl From<sqlx::Error> for ExportError {
    fn from(e: sqlx::Error) -> Self {
        ExportError::Database(e.into())
    }
}

/// The records of one export, per table: the manifest's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Events in attached day partitions.
    pub usage_events_live: u64,
    /// Events in archived day partitions (`usage_archive`).
    pub usage_events_archived: u64,
    pub usage_actor_days: u64,
    pub usage_actor_periods: u64,
    pub subject_erasures: u64,
    /// Day partitions read.
    pub partitions_read: u64,
    /// Archived days the retention dropped while the export ran (listed, gone when read).
    pub partitions_gone: u64,
}

/// An export's records were stored before `as_of` (the database's clock when it started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub as_of: DateTime<Utc>,
    pub counts: Counts,
}

/// A day partition of `usage_events`, attached or archived, named by its oid: the oid stays
/// when the retention detaches it and moves it to `usage_archive`, so each is read once.
#[derive(Debug, Clone)]
struct Partition {
    oid: Oid,
    day: NaiveDate,
}

/// Every record held about `actor` of `tenant`, stored before the export started, written to
/// `sink`: events (oldest day first), then the actor-set rows, then erasure receipts.
///
/// Each partition is read in a short transaction of its own (never one long snapshot over all
/// of them, which would hold back vacuum and the retention's locks for the whole export); a row
/// never moves between partitions (its day is its partition key), so each is written once.
pub async fn export(
    pool: &PgPool,
    tenant: TenantId,
    actor: &str,
    sink: &mut impl LineSink,
) -> Result<Export, ExportError> {
    let as_of = sqlx::query_scalar!(r#"SELECT statement_timestamp() AS "now!""#)
        .fetch_one(pool)
        .await?;
    let mut counts = Counts::default();
    for partition in partitions(pool).await? {
        let mut tx = pool.begin().await?;
        // The partition's name and schema now (it may have moved since the listing); none when
        // the retention dropped it meanwhile.
        let found: Option<(String, bool)> = sqlx::query_as(
            "SELECT c.oid::regclass::text, n.nspname = 'usage_archive'
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1",
        )
        .bind(partition.oid)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((table, archived)) = found else {
            counts.partitions_gone += 1;
            continue;
        };
        // The lock (held until this transaction ends) keeps the retention from moving or
        // dropping it while it is read; a drop that won the race leaves nothing to read.
        let locked = sqlx::query(&format!("LOCK TABLE {table} IN ACCESS SHARE MODE"))
            .execute(&mut *tx)
            .await;
        if let Err(e) = locked.map_err(DbError::from) {
            if e.sqlstate().as_deref() == Some(UNDEFINED_TABLE) {
                counts.partitions_gone += 1;
                continue;
            }
            return Err(e.into());
        }
        let query = format!(
            r#"SELECT row_to_json(r)::text FROM (
                 SELECT 'usage_event' AS record, $4::date AS day, $5::boolean AS archived,
                        event_id AS "eventId", metric, quantity,
                        {occurred} AS "occurredAt", {received} AS "receivedAt",
                        actor_id AS "actorId", source_service AS "sourceService",
                        correlation_id AS "correlationId", classification,
                        idempotency_key AS "idempotencyKey", metadata,
                        encode(payload_hash, 'hex') AS "payloadSha256",
                        {voided} AS "voidedAt", voided_by AS "voidedBy",
                        void_reason AS "voidReason"
                   FROM {table}
                  WHERE tenant_id = $1 AND actor_id = $2 AND created_at < $3
                  ORDER BY occurred_at, event_id) r"#,
            occurred = utc_text("occurred_at"),
            received = utc_text("created_at"),
            voided = utc_text("voided_at"),
        );
        let mut rows = sqlx::query_scalar::<_, String>(&query)
            .bind(tenant.0)
            .bind(actor)
            .bind(as_of)
            .bind(partition.day)
            .bind(archived)
            .fetch(&mut *tx);
        let mut n = 0;
        while let Some(line) = rows.try_next().await? {
            sink.line(&line).await?;
            n += 1;
        }
        drop(rows);
        tx.commit().await?;
        counts.partitions_read += 1;
        if archived {
            counts.usage_events_archived += n;
        } else {
            counts.usage_events_live += n;
        }
    }
    counts.usage_actor_days = write_all(pool, ACTOR_DAYS, tenant, actor, sink).await?;
    counts.usage_actor_periods = write_all(pool, ACTOR_PERIODS, tenant, actor, sink).await?;
    counts.subject_erasures = write_all(pool, ERASURES, tenant, actor, sink).await?;
    Ok(Export { as_of, counts })
}

/// Lock lost to a concurrent `DROP TABLE` (SQLSTATE 42P01).
const UNDEFINED_TABLE: &str = "42P01";

/// An instant as RFC 3339 in UTC with microseconds, whatever the session's time zone.
fn utc_text(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', {UTC_FORMAT})")
}

const UTC_FORMAT: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"#;

/// The day partitions, attached and archived, oldest day first.
async fn partitions(pool: &PgPool) -> Result<Vec<Partition>, DbError> {
    Ok(sqlx::query_as!(
        Partition,
        r#"SELECT c.oid AS "oid!",
                  pg_catalog.to_date(pg_catalog.substr(c.relname, 15), 'YYYYMMDD') AS "day!"
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('public', 'usage_archive') AND c.relkind = 'r'
              AND c.relname ~ '^usage_events_p[0-9]{8}$'
            ORDER BY 2"#
    )
    .fetch_all(pool)
    .await?)
}

/// The subject as erasure receipts name it: sha256(the installation's salt ‖ tenant ‖ actor
/// id), hex. An export's manifest names it so, never by the id.
pub async fn subject_hash(pool: &PgPool, tenant: TenantId, actor: &str) -> Result<String, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT encode(pg_catalog.sha256(s.salt || pg_catalog.uuid_send($1)
                                           || pg_catalog.convert_to($2, 'UTF8')), 'hex') AS "hash!"
             FROM public.subject_erasure_salt s"#,
        tenant.0,
        actor
    )
    .fetch_one(pool)
    .await?)
}

/// The days (per metric) the distinct-actor sets count the subject on.
const ACTOR_DAYS: &str = "
    SELECT row_to_json(r)::text FROM (
        SELECT 'usage_actor_day' AS record, d.metric, d.day, d.events
          FROM public.usage_actor_days d
         WHERE d.tenant_id = $1 AND d.actor = pg_catalog.md5($2)::uuid
         ORDER BY d.day, d.metric) r";

/// The periods (per metric) the distinct-actor sets count the subject in.
const ACTOR_PERIODS: &str = r#"
    SELECT row_to_json(r)::text FROM (
        SELECT 'usage_actor_period' AS record, p.metric, p.period_type AS "periodType",
               p.period_start AS "periodStart", p.days
          FROM public.usage_actor_periods p
         WHERE p.tenant_id = $1 AND p.actor = pg_catalog.md5($2)::uuid
         ORDER BY p.period_start, p.period_type, p.metric) r"#;

/// Earlier erasures of the subject (an id erased and then sent again): their receipts.
const ERASURES: &str = r#"
    SELECT row_to_json(r)::text FROM (
        SELECT 'subject_erasure' AS record, e.request_id AS "requestId", e.reason,
               e.requested_by AS "requestedBy", e.events_erased AS "eventsErased",
               to_char(e.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                   AS "startedAt",
               to_char(e.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                   AS "finishedAt"
          FROM public.subject_erasures e, public.subject_erasure_salt s
         WHERE e.tenant_id = $1
           AND e.subject_hash = pg_catalog.sha256(s.salt || pg_catalog.uuid_send($1)
                                                  || pg_catalog.convert_to($2, 'UTF8'))
         ORDER BY e.started_at, e.request_id) r"#;

/// Writes what `query` (one JSON text column; `$1` tenant, `$2` actor) returns to `sink`.
async fn write_all(
    pool: &PgPool,
    query: &'static str,
    tenant: TenantId,
    actor: &str,
    sink: &mut impl LineSink,
) -> Result<u64, ExportError> {
    let mut rows = sqlx::query_scalar::<_, String>(query)
        .bind(tenant.0)
        .bind(actor)
        .fetch(pool);
    let mut n = 0;
    while let Some(line) = rows.try_next().await? {
        sink.line(&line).await?;
        n += 1;
    }
    Ok(n)
}
