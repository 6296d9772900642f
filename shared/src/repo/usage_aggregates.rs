//! `usage_aggregates`, its work queue and watermark (migration 0007): the SQL of an aggregation
//! run ([`crate::aggregation`]) and of the summary the API reads.
//!
//! A run works in transactions of bounded size, each under [`try_lock`]: the changes since the
//! watermark, chunk by chunk ([`bounds`], [`crate::repo::usage_changes`], [`set_watermark`]);
//! then the recompute queue ([`next_cells`] / [`compute`] / [`rebuild_actor_sets`] /
//! [`dequeue`]), which holds backfills and cells whose actor sets are not complete yet;
//! [`finalize`] closes the periods past their grace.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::period::PeriodType;
use crate::domain::TenantId;

/// One (tenant, metric, period) of the rollups.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub period_type: PeriodType,
    pub period_start: DateTime<Utc>,
    pub tenant_id: Uuid,
    pub metric: String,
}

/// Takes the run's transaction-scoped advisory lock; `false` when another run holds it. The
/// transaction plans every statement for its actual parameters (a chunk of 3 cells and one of
/// 2,000 need different plans; a cached generic plan would guess), with `work_mem_mb` for the
/// hash tables of its grouped statements, without JIT compilation (which costs a large
/// statement more to compile, 0.1 s and up, than its simple expressions gain), and with a
/// statement timeout of the run's time (the connection's default suits API requests, not a
/// month of a large tenant's events).
pub async fn try_lock(
    conn: &mut PgConnection,
    work_mem_mb: u32,
    statement_timeout_ms: u64,
) -> Result<bool, DbError> {
    let locked = sqlx::query_scalar!(
        r#"SELECT pg_try_advisory_xact_lock(usage_aggregation_lock_id())
                  AND set_config('plan_cache_mode', 'force_custom_plan', true) IS NOT NULL
                  AND set_config('work_mem', $1 || 'MB', true) IS NOT NULL
                  AND set_config('jit', 'off', true) IS NOT NULL
                  AND set_config('statement_timeout', $2, true) IS NOT NULL
                  AS "locked!""#,
        work_mem_mb.to_string(),
        statement_timeout_ms.to_string()
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(locked)
}

/// What a run's change chunks did (see [`crate::repo::usage_changes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Collected {
    /// Chunk transactions committed (each moved the watermark).
    pub chunks: u64,
    /// Groups of changed events applied: (tenant, metric, day, actor).
    pub changes: u64,
    /// Cells the changes wrote.
    pub cells_changed: u64,
    /// Cells the changes queued for a recompute from their events instead (their actor set
    /// was not complete yet, or did not add up).
    pub cells_queued: i64,
    /// Every transaction below this id has been applied.
    pub watermark: i64,
}

/// The range a chunk may take, locking the watermark's row: from the watermark to the oldest
/// transaction still running (everything below it has finished, so a transaction that commits
/// late is applied by a later chunk, never skipped).
pub async fn bounds(conn: &mut PgConnection) -> Result<(i64, i64), DbError> {
    let bounds = sqlx::query!(
        r#"SELECT watermark,
                  (pg_snapshot_xmin(pg_current_snapshot())::text)::bigint AS "upper!"
             FROM usage_aggregation_state FOR UPDATE"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((bounds.watermark, bounds.upper.max(bounds.watermark)))
}

/// Moves the watermark (in the chunk's transaction, with the changes it applied).
pub async fn set_watermark(conn: &mut PgConnection, watermark: i64) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE usage_aggregation_state SET watermark = $1",
        watermark
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The watermark as stored.
pub async fn watermark(conn: &mut PgConnection) -> Result<i64, DbError> {
    Ok(
        sqlx::query_scalar!("SELECT watermark FROM usage_aggregation_state")
            .fetch_one(&mut *conn)
            .await?,
    )
}

/// How far the watermark trails what has been written: events committed but not collected yet,
/// and the oldest transaction on the server, which is what holds the watermark back (any
/// write transaction of the instance, in any database, or an open snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// Committed events the watermark has not passed (counted up to [`LAG_COUNT_CAP`]).
    pub uncollected_events: i64,
    /// How long the oldest of them has waited, by the database's clock (0 when none).
    pub lag_seconds: f64,
    /// The oldest transaction on the server but this one: what to look at when the lag grows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_transaction: Option<OldestTransaction>,
}

/// A session whose transaction (or snapshot) is the oldest on the server (`pg_stat_activity`).
/// Its pid, database, user and transaction-id age are visible to every role; its state and
/// start only to the session's own role and to `pg_read_all_stats` (the owner, as the admin
/// function reads them, sees everything).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OldestTransaction {
    pub pid: i32,
    pub database: Option<String>,
    pub user_name: Option<String>,
    /// How many transactions the server has begun since this one's snapshot or id.
    pub xid_age: Option<i32>,
    pub application_name: Option<String>,
    pub state: Option<String>,
    pub xact_start: Option<DateTime<Utc>>,
    /// Seconds since its transaction started, by the database's clock.
    pub age_seconds: Option<f64>,
}

/// The uncollected events counted at most (the count stays cheap however long the stall).
pub const LAG_COUNT_CAP: i64 = 1_000_000;

/// Measures the [`Lag`] right after a collection moved the watermark to `watermark`: the events
/// with a transaction id at or past it that this statement sees have committed (through the
/// BRIN index on `xact_id`, stopping at the cap), and the oldest other transaction on the
/// instance is read from `pg_stat_activity` (its pid, database and start are visible to every
/// role).
pub async fn lag(conn: &mut PgConnection, watermark: i64) -> Result<Lag, DbError> {
    let waiting = sqlx::query!(
        r#"SELECT count(*) AS "count!",
                  coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS "seconds!"
             FROM (SELECT created_at FROM usage_events
                    WHERE xact_id >= $1 OR inserted_xact >= $1 LIMIT $2) uncollected"#,
        watermark,
        LAG_COUNT_CAP
    )
    .fetch_one(&mut *conn)
    .await?;
    let oldest = sqlx::query_as!(
        OldestTransaction,
        r#"SELECT pid AS "pid!", datname::text AS database, usename::text AS user_name,
                  greatest(age(backend_xid), age(backend_xmin)) AS xid_age,
                  application_name, state, xact_start,
                  extract(epoch FROM now() - xact_start)::float8 AS age_seconds
             FROM pg_stat_activity
            WHERE pid <> pg_backend_pid()
              AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
            ORDER BY greatest(age(backend_xid), age(backend_xmin)) DESC NULLS LAST
            LIMIT 1"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(Lag {
        uncollected_events: waiting.count,
        lag_seconds: waiting.seconds,
        oldest_transaction: oldest,
    })
}

/// Queues every cell of `periods` that has events (or an aggregate) on the days `[from, to)`,
/// optionally of one tenant. Returns how many were added.
pub async fn enqueue_range(
    conn: &mut PgConnection,
    from: NaiveDate,
    to: NaiveDate,
    tenant: Option<TenantId>,
    periods: &[PeriodType],
) -> Result<i64, DbError> {
    let periods: Vec<&str> = periods.iter().map(|p| p.as_str()).collect();
    let from = crate::domain::period::midnight(from);
    let to = crate::domain::period::midnight(to);
    let queued = sqlx::query_scalar!(
        r#"WITH p AS (
               SELECT * FROM (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
                   AS p(period_type, unit)
                WHERE period_type = ANY($4::text[])
           ), cells AS (
               SELECT DISTINCT p.period_type, date_trunc(p.unit, e.occurred_at, 'UTC') AS start,
                      e.tenant_id, e.metric
                 FROM usage_events e CROSS JOIN p
                WHERE e.occurred_at >= $1 AND e.occurred_at < $2
                  AND ($3::uuid IS NULL OR e.tenant_id = $3)
               UNION
               SELECT a.period_type, a.period_start, a.tenant_id, a.metric
                 FROM usage_aggregates a
                WHERE a.period_type = ANY($4::text[])
                  AND a.period_start < $2 AND a.period_end > $1
                  AND ($3::uuid IS NULL OR a.tenant_id = $3)
                  -- An offboarded tenant's kept billing records have no events left to be
                  -- recomputed from: they stay as they are.
                  AND NOT EXISTS (SELECT 1 FROM tenants t
                                   WHERE t.id = a.tenant_id AND t.status = 'erased')
           ), queued AS (
               INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric,
                                                    reason)
               SELECT period_type, start, tenant_id, metric, 'backfill' FROM cells
               ON CONFLICT DO NOTHING
               RETURNING 1
           )
           SELECT count(*) AS "queued!" FROM queued"#,
        from,
        to,
        tenant.map(|t| t.0),
        &periods as &[&str]
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(queued)
}

/// The next cells of the queue, fairly across tenants: each queued tenant's next cells (by
/// period type and time, so its events lie in a short range of partitions), interleaved —
/// every tenant's first cell before any tenant's second — so one tenant's backfill never holds
/// another's cells back past the first chunk. The tenants are found by a skip scan of
/// `usage_aggregation_queue_by_tenant`, one probe each.
pub async fn next_cells(conn: &mut PgConnection, limit: i64) -> Result<Vec<Cell>, DbError> {
    let rows = sqlx::query!(
        r#"WITH RECURSIVE tenants AS (
               (SELECT tenant_id FROM usage_aggregation_queue ORDER BY tenant_id LIMIT 1)
               UNION ALL
               SELECT (SELECT q.tenant_id FROM usage_aggregation_queue q
                        WHERE q.tenant_id > t.tenant_id ORDER BY q.tenant_id LIMIT 1)
                 FROM tenants t
                WHERE t.tenant_id IS NOT NULL
           )
           SELECT c.period_type AS "period_type!", c.period_start AS "period_start!",
                  t.tenant_id AS "tenant_id!", c.metric AS "metric!"
             FROM tenants t
            CROSS JOIN LATERAL (
                  SELECT q.period_type, q.period_start, q.metric,
                         row_number() OVER (ORDER BY q.period_type, q.period_start, q.metric)
                             AS turn
                    FROM usage_aggregation_queue q
                   WHERE q.tenant_id = t.tenant_id
                   ORDER BY q.period_type, q.period_start, q.metric
                   LIMIT $1) c
            WHERE t.tenant_id IS NOT NULL
            ORDER BY c.turn, c.period_type, c.period_start, t.tenant_id, c.metric
            LIMIT $1"#,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Cell {
                period_type: PeriodType::parse(&r.period_type)?,
                period_start: r.period_start,
                tenant_id: r.tenant_id,
                metric: r.metric,
            })
        })
        .collect()
}

/// Removes cells from the queue.
pub async fn dequeue(conn: &mut PgConnection, cells: &[Cell]) -> Result<u64, DbError> {
    let types: Vec<&str> = cells.iter().map(|c| c.period_type.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = cells.iter().map(|c| c.period_start).collect();
    let tenants: Vec<Uuid> = cells.iter().map(|c| c.tenant_id).collect();
    let metrics: Vec<&str> = cells.iter().map(|c| c.metric.as_str()).collect();
    let done = sqlx::query!(
        r#"DELETE FROM usage_aggregation_queue q
            USING UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[])
                  AS c(period_type, period_start, tenant_id, metric)
            WHERE q.period_type = c.period_type AND q.period_start = c.period_start
              AND q.tenant_id = c.tenant_id AND q.metric = c.metric"#,
        &types as &[&str],
        &starts,
        &tenants,
        &metrics as &[&str]
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Those of `cells` that have an aggregate.
pub async fn aggregated(
    conn: &mut PgConnection,
    cells: &[Cell],
) -> Result<std::collections::HashSet<Cell>, DbError> {
    let types: Vec<&str> = cells.iter().map(|c| c.period_type.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = cells.iter().map(|c| c.period_start).collect();
    let tenants: Vec<Uuid> = cells.iter().map(|c| c.tenant_id).collect();
    let metrics: Vec<&str> = cells.iter().map(|c| c.metric.as_str()).collect();
    let rows = sqlx::query!(
        r#"SELECT a.period_type, a.period_start, a.tenant_id, a.metric
             FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[])
                  AS c(period_type, period_start, tenant_id, metric)
             JOIN usage_aggregates a
               ON a.tenant_id = c.tenant_id AND a.period_type = c.period_type
              AND a.period_start = c.period_start AND a.metric = c.metric"#,
        &types as &[&str],
        &starts,
        &tenants,
        &metrics as &[&str]
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Cell {
                period_type: PeriodType::parse(&r.period_type)?,
                period_start: r.period_start,
                tenant_id: r.tenant_id,
                metric: r.metric,
            })
        })
        .collect()
}

/// A cell [`compute`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub tenant_id: Uuid,
    pub metric: String,
    pub period_start: DateTime<Utc>,
    /// The cell was final before this change: a revision.
    pub revised: bool,
}

/// Up to this many cells, a recompute probes the index per cell; beyond, it scans the period.
pub const PROBE_CELLS: usize = 64;

/// Recomputes the cells of one period (`[start, end)`, one type) from their events, in one
/// grouped statement over exactly that range, and upserts those whose source changed (a cell
/// without events is written only to bring an existing aggregate down to zero). A cell's
/// classification is the one stored on its events, as each was classified when it was
/// ingested, never today's catalog; a cell whose events disagree (a metric reclassified by a
/// migration within the period) takes that of its event stored last. `now` and
/// `grace` decide `final`; a change to a final cell counts a revision. Returns the cells
/// written.
///
/// The cells are computed as of `watermark`: from the events inserted before it and not voided
/// before it, exactly what the changes below the watermark have counted, so the changes above
/// it apply to the result as deltas. Each cell records its seq XOR and becomes tracked; call
/// [`rebuild_actor_sets`] with the same arguments in the same transaction. Run with custom plans (see [`try_lock`]'s transaction): PostgreSQL then sees how
/// many cells there are and picks index probes for a few, one scan of the range for many.
#[allow(clippy::too_many_arguments)]
pub async fn compute(
    conn: &mut PgConnection,
    period: PeriodType,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    cells: &[(Uuid, String)],
    now: DateTime<Utc>,
    grace_seconds: f64,
    watermark: i64,
) -> Result<Vec<Written>, DbError> {
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let tenants: Vec<Uuid> = cells.iter().map(|c| c.0).collect();
    let metrics: Vec<&str> = cells.iter().map(|c| c.1.as_str()).collect();
    // A few cells: probe each through the (tenant, metric, occurred_at) index. Many: one scan
    // of the period's partitions, keeping the cells' rows by a hashed lookup of their keys.
    // The two statements differ only in that filter, and are two on purpose: a semi-join under
    // an `OR` that custom plans could fold away is not pulled up, so one statement for both
    // would lose the index probes.
    let written: Vec<(Uuid, String, DateTime<Utc>, bool)> = if cells.len() <= PROBE_CELLS {
        sqlx::query!(
            r#"WITH cells AS (
               SELECT * FROM UNNEST($2::uuid[], $3::text[]) AS c(tenant_id, metric)
           ), sums AS (
               SELECT tenant_id, metric, sum(total) AS total, sum(events) AS events,
                      count(actor_id) AS actors, bit_xor(seq_xor) AS seq_xor,
                      (ARRAY['BILLABLE', 'NON_BILLABLE', 'INFO'])[max(latest) % 4 + 1]
                          AS classification
                 FROM (SELECT e.tenant_id, e.metric, e.actor_id, sum(e.quantity) AS total,
                              count(*) AS events, bit_xor(hashint8extended(e.seq, 0)) AS seq_xor,
                              -- The classification of the event stored last, packed with
                              -- its seq so that a plain max() finds it (no sort, integers).
                              max(e.seq * 4 + CASE e.classification WHEN 'BILLABLE' THEN 0
                                                                    WHEN 'NON_BILLABLE' THEN 1
                                                                    ELSE 2 END) AS latest
                         FROM usage_events e
                        WHERE e.occurred_at >= $4 AND e.occurred_at < $5
                          AND coalesce(e.inserted_xact, 0) < $8
                          AND (e.voided_at IS NULL OR e.xact_id >= $8)
                          AND (e.tenant_id, e.metric) IN (SELECT tenant_id, metric FROM cells)
                        GROUP BY 1, 2, 3) by_actor
                GROUP BY 1, 2
           ), computed AS (
               SELECT c.tenant_id, c.metric, s.classification,
                      coalesce(s.total, 0) AS total, coalesce(s.events, 0) AS events,
                      coalesce(s.actors, 0) AS actors, s.seq_xor,
                      sha256(convert_to(concat_ws(':', coalesce(s.events, 0), s.seq_xor),
                                        'UTF8')) AS source_hash
                 FROM cells c LEFT JOIN sums s USING (tenant_id, metric)
           )
           INSERT INTO usage_aggregates AS a
                  (tenant_id, period_type, period_start, period_end, metric, classification,
                   total_quantity, event_count, distinct_actors, seq_xor, source_hash,
                   computed_at, final, finalized_at, actors_tracked)
           SELECT c.tenant_id, $1, $4, $5, c.metric, coalesce(c.classification, m.classification),
                  c.total, c.events, c.actors, c.seq_xor, c.source_hash, $6,
                  $5::timestamptz + make_interval(secs => $7) <= $6,
                  CASE WHEN $5::timestamptz + make_interval(secs => $7) <= $6 THEN $6 END, true
             FROM computed c
             JOIN metrics m ON m.name = c.metric
            WHERE c.events > 0
               OR EXISTS (SELECT 1 FROM usage_aggregates x
                           WHERE x.tenant_id = c.tenant_id AND x.period_type = $1
                             AND x.period_start = $4 AND x.metric = c.metric)
           ON CONFLICT (tenant_id, period_type, period_start, metric) DO UPDATE
              SET classification = CASE WHEN EXCLUDED.event_count > 0
                                        THEN EXCLUDED.classification ELSE a.classification END,
                  total_quantity = EXCLUDED.total_quantity,
                  event_count = EXCLUDED.event_count,
                  distinct_actors = EXCLUDED.distinct_actors,
                  seq_xor = EXCLUDED.seq_xor,
                  source_hash = EXCLUDED.source_hash,
                  computed_at = EXCLUDED.computed_at,
                  final = a.final OR EXCLUDED.final,
                  finalized_at = coalesce(a.finalized_at, EXCLUDED.finalized_at),
                  revisions_after_final = a.revisions_after_final + a.final::int,
                  revised_at = CASE WHEN a.final THEN EXCLUDED.computed_at ELSE a.revised_at END,
                  actors_tracked = true
            WHERE a.source_hash IS DISTINCT FROM EXCLUDED.source_hash
               OR NOT a.actors_tracked
               OR (a.total_quantity, a.event_count, a.distinct_actors)
                  IS DISTINCT FROM (EXCLUDED.total_quantity, EXCLUDED.event_count,
                                    EXCLUDED.distinct_actors)
               OR (EXCLUDED.event_count > 0 AND a.classification <> EXCLUDED.classification)
           RETURNING a.tenant_id, a.metric, a.period_start,
                     (a.revised_at IS NOT DISTINCT FROM $6 AND a.revisions_after_final > 0)
                         AS "revised!""#,
            period.as_str(),
            &tenants,
            &metrics as &[&str],
            start,
            end,
            now,
            grace_seconds,
            watermark
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.tenant_id, r.metric, r.period_start, r.revised))
        .collect()
    } else {
        // When the cells are most of the period's (as when new events reach every tenant), the
        // filter costs more than the groups it saves: every group is computed and the cells'
        // are kept (the upsert reads the sums through the cells).
        let known: i64 = sqlx::query_scalar!(
            r#"SELECT count(*) AS "known!" FROM usage_aggregates
                WHERE period_type = $1 AND period_start = $2"#,
            period.as_str(),
            start
        )
        .fetch_one(&mut *conn)
        .await?;
        let keys: Option<Vec<String>> = (cells.len() as i64 * 2 < known)
            .then(|| cells.iter().map(|(t, m)| format!("{t}/{m}")).collect());
        sqlx::query!(
            r#"WITH cells AS (
               SELECT * FROM UNNEST($2::uuid[], $3::text[]) AS c(tenant_id, metric)
           ), sums AS (
               SELECT tenant_id, metric, sum(total) AS total, sum(events) AS events,
                      count(actor_id) AS actors, bit_xor(seq_xor) AS seq_xor,
                      (ARRAY['BILLABLE', 'NON_BILLABLE', 'INFO'])[max(latest) % 4 + 1]
                          AS classification
                 FROM (SELECT e.tenant_id, e.metric, e.actor_id, sum(e.quantity) AS total,
                              count(*) AS events, bit_xor(hashint8extended(e.seq, 0)) AS seq_xor,
                              -- The classification of the event stored last, packed with
                              -- its seq so that a plain max() finds it (no sort, integers).
                              max(e.seq * 4 + CASE e.classification WHEN 'BILLABLE' THEN 0
                                                                    WHEN 'NON_BILLABLE' THEN 1
                                                                    ELSE 2 END) AS latest
                         FROM usage_events e
                        WHERE e.occurred_at >= $4 AND e.occurred_at < $5
                          AND coalesce(e.inserted_xact, 0) < $9
                          AND (e.voided_at IS NULL OR e.xact_id >= $9)
                          AND ($8::text[] IS NULL
                               OR e.tenant_id::text || '/' || e.metric = ANY($8::text[]))
                        GROUP BY 1, 2, 3) by_actor
                GROUP BY 1, 2
           ), computed AS (
               SELECT c.tenant_id, c.metric, s.classification,
                      coalesce(s.total, 0) AS total, coalesce(s.events, 0) AS events,
                      coalesce(s.actors, 0) AS actors, s.seq_xor,
                      sha256(convert_to(concat_ws(':', coalesce(s.events, 0), s.seq_xor),
                                        'UTF8')) AS source_hash
                 FROM cells c LEFT JOIN sums s USING (tenant_id, metric)
           )
           INSERT INTO usage_aggregates AS a
                  (tenant_id, period_type, period_start, period_end, metric, classification,
                   total_quantity, event_count, distinct_actors, seq_xor, source_hash,
                   computed_at, final, finalized_at, actors_tracked)
           SELECT c.tenant_id, $1, $4, $5, c.metric, coalesce(c.classification, m.classification),
                  c.total, c.events, c.actors, c.seq_xor, c.source_hash, $6,
                  $5::timestamptz + make_interval(secs => $7) <= $6,
                  CASE WHEN $5::timestamptz + make_interval(secs => $7) <= $6 THEN $6 END, true
             FROM computed c
             JOIN metrics m ON m.name = c.metric
            WHERE c.events > 0
               OR EXISTS (SELECT 1 FROM usage_aggregates x
                           WHERE x.tenant_id = c.tenant_id AND x.period_type = $1
                             AND x.period_start = $4 AND x.metric = c.metric)
           ON CONFLICT (tenant_id, period_type, period_start, metric) DO UPDATE
              SET classification = CASE WHEN EXCLUDED.event_count > 0
                                        THEN EXCLUDED.classification ELSE a.classification END,
                  total_quantity = EXCLUDED.total_quantity,
                  event_count = EXCLUDED.event_count,
                  distinct_actors = EXCLUDED.distinct_actors,
                  seq_xor = EXCLUDED.seq_xor,
                  source_hash = EXCLUDED.source_hash,
                  computed_at = EXCLUDED.computed_at,
                  final = a.final OR EXCLUDED.final,
                  finalized_at = coalesce(a.finalized_at, EXCLUDED.finalized_at),
                  revisions_after_final = a.revisions_after_final + a.final::int,
                  revised_at = CASE WHEN a.final THEN EXCLUDED.computed_at ELSE a.revised_at END,
                  actors_tracked = true
            WHERE a.source_hash IS DISTINCT FROM EXCLUDED.source_hash
               OR NOT a.actors_tracked
               OR (a.total_quantity, a.event_count, a.distinct_actors)
                  IS DISTINCT FROM (EXCLUDED.total_quantity, EXCLUDED.event_count,
                                    EXCLUDED.distinct_actors)
               OR (EXCLUDED.event_count > 0 AND a.classification <> EXCLUDED.classification)
           RETURNING a.tenant_id, a.metric, a.period_start,
                     (a.revised_at IS NOT DISTINCT FROM $6 AND a.revisions_after_final > 0)
                         AS "revised!""#,
            period.as_str(),
            &tenants,
            &metrics as &[&str],
            start,
            end,
            now,
            grace_seconds,
            keys.as_deref() as Option<&[String]>,
            watermark
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.tenant_id, r.metric, r.period_start, r.revised))
        .collect()
    };
    Ok(written
        .into_iter()
        .map(|(tenant_id, metric, period_start, revised)| Written {
            tenant_id,
            metric,
            period_start,
            revised,
        })
        .collect())
}

/// Rebuilds the actor sets of the cells of one period (`[start, end)`, one type) from their
/// events as of `watermark` (see [`compute`]): per day each actor's live events, per week or
/// month on how many days each actor has events. One statement per call, which writes only
/// what differs (a recompute of sets that were right, as in most backfills, reads and writes
/// nothing more): rows whose count changed, new rows, and rows no longer there.
pub async fn rebuild_actor_sets(
    conn: &mut PgConnection,
    period: PeriodType,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    cells: &[(Uuid, String)],
    watermark: i64,
) -> Result<(), DbError> {
    if cells.is_empty() {
        return Ok(());
    }
    let tenants: Vec<Uuid> = cells.iter().map(|c| c.0).collect();
    let metrics: Vec<&str> = cells.iter().map(|c| c.1.as_str()).collect();
    let first_day = start.date_naive();
    if period == PeriodType::Daily {
        sqlx::query!(
            "WITH fresh AS MATERIALIZED (
                 SELECT e.tenant_id, e.metric, md5(e.actor_id)::uuid AS actor,
                        count(*)::int4 AS events
                   FROM usage_events e
                  WHERE e.occurred_at >= $4 AND e.occurred_at < $5 AND e.actor_id IS NOT NULL
                    AND (e.tenant_id, e.metric) IN (SELECT * FROM UNNEST($1::uuid[], $2::text[]))
                    AND coalesce(e.inserted_xact, 0) < $6
                    AND (e.voided_at IS NULL OR e.xact_id >= $6)
                  GROUP BY 1, 2, 3
             ), written AS (
                 INSERT INTO usage_actor_days AS a (tenant_id, metric, day, actor, events)
                 SELECT tenant_id, metric, $3, actor, events FROM fresh
                 ON CONFLICT (tenant_id, metric, day, actor) DO UPDATE
                    SET events = EXCLUDED.events WHERE a.events <> EXCLUDED.events
                 RETURNING 1
             )
             DELETE FROM usage_actor_days a
              USING UNNEST($1::uuid[], $2::text[]) AS c(tenant_id, metric)
              WHERE a.tenant_id = c.tenant_id AND a.metric = c.metric AND a.day = $3
                AND NOT EXISTS (SELECT 1 FROM fresh f
                                 WHERE f.tenant_id = a.tenant_id AND f.metric = a.metric
                                   AND f.actor = a.actor)",
            &tenants,
            &metrics as &[&str],
            first_day,
            start,
            end,
            watermark
        )
        .execute(&mut *conn)
        .await?;
    } else {
        sqlx::query!(
            "WITH fresh AS MATERIALIZED (
                 SELECT tenant_id, metric, actor, count(*)::int4 AS days
                   FROM (SELECT e.tenant_id, e.metric, md5(e.actor_id)::uuid AS actor,
                                date_trunc('day', e.occurred_at, 'UTC') AS day
                           FROM usage_events e
                          WHERE e.occurred_at >= $5 AND e.occurred_at < $6
                            AND e.actor_id IS NOT NULL
                            AND (e.tenant_id, e.metric)
                                IN (SELECT * FROM UNNEST($1::uuid[], $2::text[]))
                            AND coalesce(e.inserted_xact, 0) < $7
                            AND (e.voided_at IS NULL OR e.xact_id >= $7)
                          GROUP BY 1, 2, 3, 4) actor_days
                  GROUP BY 1, 2, 3
             ), written AS (
                 INSERT INTO usage_actor_periods AS a (tenant_id, metric, period_type,
                                                       period_start, actor, days)
                 SELECT tenant_id, metric, $3, $4, actor, days FROM fresh
                 ON CONFLICT (tenant_id, metric, period_type, period_start, actor) DO UPDATE
                    SET days = EXCLUDED.days WHERE a.days <> EXCLUDED.days
                 RETURNING 1
             )
             DELETE FROM usage_actor_periods a
              USING UNNEST($1::uuid[], $2::text[]) AS c(tenant_id, metric)
              WHERE a.tenant_id = c.tenant_id AND a.metric = c.metric
                AND a.period_type = $3 AND a.period_start = $4
                AND NOT EXISTS (SELECT 1 FROM fresh f
                                 WHERE f.tenant_id = a.tenant_id AND f.metric = a.metric
                                   AND f.actor = a.actor)",
            &tenants,
            &metrics as &[&str],
            period.as_str(),
            first_day,
            start,
            end,
            watermark
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Marks final every cell whose period ended more than `grace_seconds` before `now` and that
/// is not waiting in the queue. Returns how many.
pub async fn finalize(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    grace_seconds: f64,
) -> Result<u64, DbError> {
    let done = sqlx::query!(
        r#"UPDATE usage_aggregates a SET final = true, finalized_at = $1
            WHERE NOT a.final AND a.period_end <= $1::timestamptz - make_interval(secs => $2)
              AND NOT EXISTS (SELECT 1 FROM usage_aggregation_queue q
                               WHERE q.period_type = a.period_type
                                 AND q.period_start = a.period_start
                                 AND q.tenant_id = a.tenant_id AND q.metric = a.metric)"#,
        now,
        grace_seconds
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Records a finished run.
pub async fn save_run(
    conn: &mut PgConnection,
    at: DateTime<Utc>,
    report: &serde_json::Value,
) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE usage_aggregation_state SET last_run_at = $1, last_run = $2",
        at,
        report
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The aggregation's own state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub watermark: i64,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_run: Option<serde_json::Value>,
    pub queued_cells: i64,
}

pub async fn state(conn: &mut PgConnection) -> Result<State, DbError> {
    let row = sqlx::query!(
        r#"SELECT watermark, last_run_at, last_run,
                  (SELECT count(*) FROM usage_aggregation_queue) AS "queued!"
             FROM usage_aggregation_state"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(State {
        watermark: row.watermark,
        last_run_at: row.last_run_at,
        last_run: row.last_run,
        queued_cells: row.queued,
    })
}

/// One tenant's aggregation backlog.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantBacklog {
    pub tenant: String,
    /// The last time one of the tenant's aggregates changed.
    pub last_aggregated_at: Option<DateTime<Utc>>,
    /// Cells queued for the next run.
    pub queued_cells: i64,
    /// Events written since the watermark (not yet collected).
    pub pending_events: i64,
    /// The oldest work not yet aggregated: the earliest of the pending events' arrival and
    /// the queued cells' enqueueing.
    pub oldest_unaggregated_at: Option<DateTime<Utc>>,
}

/// Per tenant (by slug, at most `limit`): last aggregation, backlog, oldest unaggregated work.
pub async fn backlog(
    conn: &mut PgConnection,
    watermark: i64,
    limit: i64,
) -> Result<Vec<TenantBacklog>, DbError> {
    let rows = sqlx::query_as!(
        TenantBacklog,
        r#"WITH pending AS (
               SELECT tenant_id, count(*) AS events, min(created_at) AS oldest
                 FROM usage_events WHERE xact_id >= $1 OR inserted_xact >= $1
                GROUP BY tenant_id
           ), queued AS (
               SELECT tenant_id, count(*) AS cells, min(enqueued_at) AS oldest
                 FROM usage_aggregation_queue GROUP BY tenant_id
           )
           SELECT t.slug AS tenant,
                  (SELECT max(a.computed_at) FROM usage_aggregates a WHERE a.tenant_id = t.id)
                      AS last_aggregated_at,
                  coalesce(q.cells, 0) AS "queued_cells!",
                  coalesce(p.events, 0) AS "pending_events!",
                  least(p.oldest, q.oldest) AS oldest_unaggregated_at
             FROM tenants t
             LEFT JOIN pending p ON p.tenant_id = t.id
             LEFT JOIN queued q ON q.tenant_id = t.id
            ORDER BY t.slug
            LIMIT $2"#,
        watermark,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// A daily or monthly cell and its total, for the counters' repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellTotal {
    pub tenant_id: Uuid,
    pub period_type: PeriodType,
    /// The period's first day.
    pub start: NaiveDate,
    pub metric: String,
    pub total: i128,
}

fn parse_total(text: &str) -> Result<i128, DbError> {
    text.parse::<i128>()
        .map_err(|_| DbError::Decode(format!("total {text:?} is not an integer")))
}

/// Every aggregate of `period` that starts on `since` or later (an index range), as the
/// counters should hold it, by tenant.
pub async fn totals_since(
    conn: &mut PgConnection,
    period: PeriodType,
    since: NaiveDate,
) -> Result<Vec<CellTotal>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT tenant_id, period_start, metric, total_quantity::text AS "total!"
             FROM usage_aggregates
            WHERE period_type = $1 AND period_start >= $2
            ORDER BY tenant_id, period_start, metric"#,
        period.as_str(),
        crate::domain::period::midnight(since)
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(CellTotal {
                tenant_id: r.tenant_id,
                period_type: period,
                start: r.period_start.date_naive(),
                metric: r.metric,
                total: parse_total(&r.total)?,
            })
        })
        .collect()
}

/// A tenant's current total of each cell asked (metric, period type, first and last instant):
/// the cell's rollup as of the aggregation's watermark, plus the events inserted and voided
/// since (found through the transaction-id BRIN indexes, so the cost follows what the
/// aggregation has not applied yet, not the period's volume). Exact unless a recompute of the
/// cell is pending (the repair checks the queue; the API roles cannot). One statement, one
/// snapshot; run it in the tenant's transaction for the API role.
pub async fn current_totals(
    conn: &mut PgConnection,
    tenant: crate::domain::TenantId,
    cells: &[(&str, PeriodType, DateTime<Utc>, DateTime<Utc>)],
) -> Result<Vec<i128>, DbError> {
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let metrics: Vec<&str> = cells.iter().map(|c| c.0).collect();
    let types: Vec<&str> = cells.iter().map(|c| c.1.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = cells.iter().map(|c| c.2).collect();
    let ends: Vec<DateTime<Utc>> = cells.iter().map(|c| c.3).collect();
    let rows = sqlx::query!(
        r#"WITH w AS (SELECT watermark FROM usage_aggregation_state),
           cells AS (
               SELECT * FROM UNNEST($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[])
                   WITH ORDINALITY AS c(metric, period_type, period_start, period_end, n)
           ), changed AS (
               SELECT metric, occurred_at, quantity FROM usage_events
                WHERE tenant_id = $1 AND inserted_xact >= (SELECT watermark FROM w)
               UNION ALL
               SELECT metric, occurred_at, -quantity FROM usage_events
                WHERE tenant_id = $1 AND xact_id >= (SELECT watermark FROM w)
                  AND voided_at IS NOT NULL
           )
           SELECT (coalesce((SELECT a.total_quantity FROM usage_aggregates a
                              WHERE a.tenant_id = $1 AND a.period_type = c.period_type
                                AND a.period_start = c.period_start AND a.metric = c.metric), 0)
                   + coalesce((SELECT sum(d.quantity) FROM changed d
                                WHERE d.metric = c.metric AND d.occurred_at >= c.period_start
                                  AND d.occurred_at < c.period_end), 0))::text AS "total!"
             FROM cells c ORDER BY c.n"#,
        tenant.0,
        &metrics as &[&str],
        &types as &[&str],
        &starts,
        &ends
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| parse_total(&r.total)).collect()
}

/// The current totals of daily cells, straight from the events (voided ones excluded), by
/// (tenant, day, metric); a cell without events is absent (its total is 0). A few cells are
/// probed through the index; many are read with one scan of their days.
pub async fn fresh_day_totals(
    conn: &mut PgConnection,
    cells: &[(Uuid, NaiveDate, &str)],
) -> Result<std::collections::HashMap<(Uuid, NaiveDate, String), i128>, DbError> {
    let (Some(first), Some(last)) = (
        cells.iter().map(|c| c.1).min(),
        cells.iter().map(|c| c.1).max(),
    ) else {
        return Ok(Default::default());
    };
    let rows: Vec<(Uuid, DateTime<Utc>, String, String)> = if cells.len() <= PROBE_CELLS {
        let tenants: Vec<Uuid> = cells.iter().map(|c| c.0).collect();
        let days: Vec<DateTime<Utc>> = cells
            .iter()
            .map(|c| crate::domain::period::midnight(c.1))
            .collect();
        let metrics: Vec<&str> = cells.iter().map(|c| c.2).collect();
        sqlx::query!(
            r#"SELECT c.tenant_id AS "tenant_id!", c.day AS "day!", c.metric AS "metric!",
                      t.total::text AS "total!"
                 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[])
                      AS c(tenant_id, day, metric)
                 CROSS JOIN LATERAL (
                     SELECT sum(e.quantity) AS total FROM usage_events e
                      WHERE e.tenant_id = c.tenant_id AND e.metric = c.metric
                        AND e.occurred_at >= c.day
                        AND e.occurred_at < c.day + interval '24 hours'
                        AND e.voided_at IS NULL
                 ) t
                WHERE t.total IS NOT NULL"#,
            &tenants,
            &days,
            &metrics as &[&str]
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.tenant_id, r.day, r.metric, r.total))
        .collect()
    } else {
        let keys: Vec<String> = cells
            .iter()
            .map(|(t, d, m)| format!("{t}/{m}/{d}"))
            .collect();
        let end = last.succ_opt().unwrap_or(last);
        sqlx::query!(
            r#"SELECT e.tenant_id, date_trunc('day', e.occurred_at, 'UTC') AS "day!", e.metric,
                      sum(e.quantity)::text AS "total!"
                 FROM usage_events e
                WHERE e.occurred_at >= $1 AND e.occurred_at < $2 AND e.voided_at IS NULL
                  AND e.tenant_id::text || '/' || e.metric || '/'
                      || to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') = ANY($3::text[])
                GROUP BY 1, 2, 3"#,
            crate::domain::period::midnight(first),
            crate::domain::period::midnight(end),
            &keys as &[String]
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| (r.tenant_id, r.day, r.metric, r.total))
        .collect()
    };
    rows.into_iter()
        .map(|(tenant, day, metric, total)| {
            Ok(((tenant, day.date_naive(), metric), parse_total(&total)?))
        })
        .collect()
}

/// One row of the summary the API returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Aggregate {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub metric: String,
    pub classification: String,
    /// Exact (a sum of 64-bit quantities), as a decimal string.
    pub total_quantity: String,
    pub event_count: i64,
    pub distinct_actors: i64,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub computed_at: DateTime<Utc>,
    pub revisions_after_final: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_at: Option<DateTime<Utc>>,
}

/// A tenant's aggregates of one period type whose periods start in `[from, to)`, optionally of
/// one metric: one range of the primary key. Run it in the tenant's read transaction.
pub async fn summary(
    conn: &mut PgConnection,
    tenant: TenantId,
    period: PeriodType,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    metric: Option<&str>,
    limit: i64,
) -> Result<Vec<Aggregate>, DbError> {
    let rows = sqlx::query_as!(
        Aggregate,
        r#"SELECT period_start, period_end, metric, classification,
                  total_quantity::text AS "total_quantity!", event_count, distinct_actors,
                  final AS is_final,
                  computed_at, revisions_after_final, revised_at
             FROM usage_aggregates
            WHERE tenant_id = $1 AND period_type = $2 AND period_start >= $3 AND period_start < $4
              AND ($5::text IS NULL OR metric = $5)
            ORDER BY period_start, metric
            LIMIT $6"#,
        tenant.0,
        period.as_str(),
        from,
        to,
        metric,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}
