//! The incremental side of the rollups (migration 0014): the events a transaction range
//! inserted or voided, the cells and actor counts they change, and the writes. Run in the
//! aggregation's chunk transactions (see `crate::aggregation`), as `meterbridge_ops`; the
//! arithmetic is [`crate::domain::rollup`]'s.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::period::{midnight, PeriodType};
use crate::domain::rollup::{ActorDay, ActorPeriod, CellKey, Change, CountChange};
use crate::repo::usage_aggregates::Written;

fn parse_i128(text: &str) -> Result<i128, DbError> {
    text.parse::<i128>()
        .map_err(|_| DbError::Decode(format!("{text:?} is not an integer")))
}

/// The events whose insert or void belongs to the transactions `[from, to)`, grouped by
/// (tenant, metric, UTC day, actor): an insert counts +1, a void -1 (a row without
/// `inserted_xact` was stored and counted before migration 0014; its void still counts). Read through
/// the BRIN indexes on `inserted_xact` and `xact_id`: the cost follows the change. `None` when
/// there are more than `limit` groups (the caller takes a narrower range).
pub async fn changes(
    conn: &mut PgConnection,
    from: i64,
    to: i64,
    limit: i64,
) -> Result<Option<Vec<Change>>, DbError> {
    let rows = sqlx::query!(
        r#"WITH changed AS (
               SELECT tenant_id, metric, occurred_at, actor_id, quantity, seq, classification,
                      1 AS sign
                 FROM usage_events
                WHERE inserted_xact >= $1 AND inserted_xact < $2
               UNION ALL
               SELECT tenant_id, metric, occurred_at, actor_id, quantity, seq, classification,
                      -1
                 FROM usage_events
                WHERE xact_id >= $1 AND xact_id < $2 AND voided_at IS NOT NULL
           )
           SELECT tenant_id AS "tenant_id!", metric AS "metric!",
                  (occurred_at AT TIME ZONE 'UTC')::date AS "day!",
                  md5(actor_id)::uuid AS actor,
                  sum(sign * quantity)::text AS "quantity!", sum(sign) AS "events!",
                  bit_xor(hashint8extended(seq, 0)) AS "seq_xor!",
                  max(seq * 4 + CASE classification WHEN 'BILLABLE' THEN 0
                                                    WHEN 'NON_BILLABLE' THEN 1 ELSE 2 END)
                      FILTER (WHERE sign > 0) AS latest
             FROM changed
            GROUP BY 1, 2, 3, 4
            LIMIT $3::int8 + 1"#,
        from,
        to,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    if rows.len() as i64 > limit {
        return Ok(None);
    }
    rows.into_iter()
        .map(|r| {
            Ok(Change {
                tenant_id: r.tenant_id,
                metric: r.metric,
                day: r.day,
                actor: r.actor,
                quantity: parse_i128(&r.quantity)?,
                events: r.events,
                seq_xor: r.seq_xor,
                latest: r.latest,
            })
        })
        .collect::<Result<Vec<Change>, DbError>>()
        .map(Some)
}

/// Queues for a recompute the day, week and month cells of every event inserted or voided in
/// `[from, to)` (a range too big to apply as changes: one bulk-loading transaction). Returns
/// how many cells were added.
pub async fn enqueue_range(conn: &mut PgConnection, from: i64, to: i64) -> Result<i64, DbError> {
    let queued = sqlx::query_scalar!(
        r#"WITH changed AS (
               SELECT DISTINCT tenant_id, metric, date_trunc('day', occurred_at, 'UTC') AS day
                 FROM usage_events
                WHERE (inserted_xact >= $1 AND inserted_xact < $2)
                   OR (xact_id >= $1 AND xact_id < $2)
           ), added AS (
               INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric,
                                                    reason)
               SELECT DISTINCT p.period_type, date_trunc(p.unit, c.day, 'UTC'), c.tenant_id,
                      c.metric, 'change'
                 FROM changed c
                CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
                      AS p(period_type, unit)
               ON CONFLICT DO NOTHING
               RETURNING 1
           )
           SELECT count(*) AS "added!" FROM added"#,
        from,
        to
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(queued)
}

/// A stored cell as the deltas need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellState {
    pub classification: String,
    pub total: i128,
    pub events: i64,
    pub distinct: i64,
    pub seq_xor: i64,
    /// Its actor set is complete: changes apply to it as deltas.
    pub tracked: bool,
}

/// Column arrays of cell keys, for `UNNEST`.
struct KeyColumns {
    types: Vec<&'static str>,
    starts: Vec<DateTime<Utc>>,
    tenants: Vec<Uuid>,
    metrics: Vec<String>,
}

impl KeyColumns {
    fn of<'k>(keys: impl IntoIterator<Item = &'k CellKey>) -> Self {
        let mut c = KeyColumns {
            types: Vec::new(),
            starts: Vec::new(),
            tenants: Vec::new(),
            metrics: Vec::new(),
        };
        for k in keys {
            c.types.push(k.period_type.as_str());
            c.starts.push(midnight(k.period_start));
            c.tenants.push(k.tenant_id);
            c.metrics.push(k.metric.clone());
        }
        c
    }
}

fn key_of(
    period_type: &str,
    start: DateTime<Utc>,
    tenant: Uuid,
    metric: String,
) -> Result<CellKey, DbError> {
    Ok(CellKey {
        period_type: PeriodType::parse(period_type)?,
        period_start: start.date_naive(),
        tenant_id: tenant,
        metric,
    })
}

/// The stored state of those of `keys` that exist.
pub async fn cell_states(
    conn: &mut PgConnection,
    keys: &[&CellKey],
) -> Result<HashMap<CellKey, CellState>, DbError> {
    let c = KeyColumns::of(keys.iter().copied());
    let rows = sqlx::query!(
        r#"SELECT a.period_type, a.period_start, a.tenant_id, a.metric, a.classification,
                  a.total_quantity::text AS "total!", a.event_count, a.distinct_actors,
                  coalesce(a.seq_xor, 0) AS "seq_xor!", a.actors_tracked
             FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[])
                  AS k(period_type, period_start, tenant_id, metric)
             JOIN usage_aggregates a
               ON a.tenant_id = k.tenant_id AND a.period_type = k.period_type
              AND a.period_start = k.period_start AND a.metric = k.metric"#,
        &c.types as &[&str],
        &c.starts,
        &c.tenants,
        &c.metrics
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                key_of(&r.period_type, r.period_start, r.tenant_id, r.metric)?,
                CellState {
                    classification: r.classification,
                    total: parse_i128(&r.total)?,
                    events: r.event_count,
                    distinct: r.distinct_actors,
                    seq_xor: r.seq_xor,
                    tracked: r.actors_tracked,
                },
            ))
        })
        .collect()
}

/// Those of `keys` waiting in the recompute queue.
pub async fn queued(
    conn: &mut PgConnection,
    keys: &[&CellKey],
) -> Result<HashSet<CellKey>, DbError> {
    let c = KeyColumns::of(keys.iter().copied());
    let rows = sqlx::query!(
        r#"SELECT q.period_type, q.period_start, q.tenant_id, q.metric
             FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[])
                  AS k(period_type, period_start, tenant_id, metric)
             JOIN usage_aggregation_queue q
               ON q.period_type = k.period_type AND q.period_start = k.period_start
              AND q.tenant_id = k.tenant_id AND q.metric = k.metric"#,
        &c.types as &[&str],
        &c.starts,
        &c.tenants,
        &c.metrics
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| key_of(&r.period_type, r.period_start, r.tenant_id, r.metric))
        .collect()
}

/// Queues cells for a recompute from their events; returns how many were added.
pub async fn enqueue(conn: &mut PgConnection, keys: &[&CellKey]) -> Result<i64, DbError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let c = KeyColumns::of(keys.iter().copied());
    let queued = sqlx::query_scalar!(
        r#"WITH added AS (
               INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric,
                                                    reason)
               SELECT period_type, period_start, tenant_id, metric, 'change'
                 FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[])
                      AS k(period_type, period_start, tenant_id, metric)
               ON CONFLICT DO NOTHING
               RETURNING 1
           )
           SELECT count(*) AS "added!" FROM added"#,
        &c.types as &[&str],
        &c.starts,
        &c.tenants,
        &c.metrics
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(queued)
}

/// The stored live-event counts of these actor-days: one primary-key probe per key (the
/// `LIMIT 1` keeps the lateral subquery a parameterized index scan; joined, the planner hashes
/// the whole table once it outgrows the keys, and the run's cost grows with the days stored).
pub async fn actor_day_counts(
    conn: &mut PgConnection,
    keys: &[&ActorDay],
) -> Result<HashMap<ActorDay, i64>, DbError> {
    let tenants: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let metrics: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let days: Vec<NaiveDate> = keys.iter().map(|k| k.2).collect();
    let actors: Vec<Uuid> = keys.iter().map(|k| k.3).collect();
    let rows = sqlx::query!(
        r#"SELECT k.tenant_id AS "tenant_id!", k.metric AS "metric!", k.day AS "day!",
                  k.actor AS "actor!", a.events
             FROM UNNEST($1::uuid[], $2::text[], $3::date[], $4::uuid[])
                  AS k(tenant_id, metric, day, actor)
            CROSS JOIN LATERAL (
                  SELECT a.events FROM usage_actor_days a
                   WHERE a.tenant_id = k.tenant_id AND a.metric = k.metric AND a.day = k.day
                     AND a.actor = k.actor LIMIT 1) a"#,
        &tenants,
        &metrics as &[&str],
        &days,
        &actors
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.tenant_id, r.metric, r.day, r.actor), i64::from(r.events)))
        .collect())
}

fn count_i32(value: i64) -> Result<i32, DbError> {
    i32::try_from(value).map_err(|_| DbError::Decode(format!("actor count {value} overflows")))
}

/// Stores the new counts: a count above zero is upserted, a count that fell to zero deleted.
pub async fn write_actor_days(
    conn: &mut PgConnection,
    changes: &[CountChange<ActorDay>],
) -> Result<(), DbError> {
    let (kept, gone): (Vec<&CountChange<ActorDay>>, Vec<&CountChange<ActorDay>>) =
        changes.iter().partition(|c| c.after > 0);
    if !kept.is_empty() {
        let tenants: Vec<Uuid> = kept.iter().map(|c| c.key.0).collect();
        let metrics: Vec<&str> = kept.iter().map(|c| c.key.1.as_str()).collect();
        let days: Vec<NaiveDate> = kept.iter().map(|c| c.key.2).collect();
        let actors: Vec<Uuid> = kept.iter().map(|c| c.key.3).collect();
        let events = kept
            .iter()
            .map(|c| count_i32(c.after))
            .collect::<Result<Vec<i32>, _>>()?;
        sqlx::query!(
            "INSERT INTO usage_actor_days (tenant_id, metric, day, actor, events)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::date[], $4::uuid[], $5::int4[])
             ON CONFLICT (tenant_id, metric, day, actor) DO UPDATE SET events = EXCLUDED.events",
            &tenants,
            &metrics as &[&str],
            &days,
            &actors,
            &events
        )
        .execute(&mut *conn)
        .await?;
    }
    if !gone.is_empty() {
        let tenants: Vec<Uuid> = gone.iter().map(|c| c.key.0).collect();
        let metrics: Vec<&str> = gone.iter().map(|c| c.key.1.as_str()).collect();
        let days: Vec<NaiveDate> = gone.iter().map(|c| c.key.2).collect();
        let actors: Vec<Uuid> = gone.iter().map(|c| c.key.3).collect();
        sqlx::query!(
            "DELETE FROM usage_actor_days a
              USING UNNEST($1::uuid[], $2::text[], $3::date[], $4::uuid[])
                    AS k(tenant_id, metric, day, actor)
              WHERE a.tenant_id = k.tenant_id AND a.metric = k.metric AND a.day = k.day
                AND a.actor = k.actor",
            &tenants,
            &metrics as &[&str],
            &days,
            &actors
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The stored day counts of these actors in their weeks and months: one primary-key probe per
/// key, as [`actor_day_counts`].
pub async fn actor_period_counts(
    conn: &mut PgConnection,
    keys: &[&ActorPeriod],
) -> Result<HashMap<ActorPeriod, i64>, DbError> {
    let tenants: Vec<Uuid> = keys.iter().map(|k| k.0).collect();
    let metrics: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let types: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
    let starts: Vec<NaiveDate> = keys.iter().map(|k| k.3).collect();
    let actors: Vec<Uuid> = keys.iter().map(|k| k.4).collect();
    let rows = sqlx::query!(
        r#"SELECT k.tenant_id AS "tenant_id!", k.metric AS "metric!",
                  k.period_type AS "period_type!", k.period_start AS "period_start!",
                  k.actor AS "actor!", a.days
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::date[], $5::uuid[])
                  AS k(tenant_id, metric, period_type, period_start, actor)
            CROSS JOIN LATERAL (
                  SELECT a.days FROM usage_actor_periods a
                   WHERE a.tenant_id = k.tenant_id AND a.metric = k.metric
                     AND a.period_type = k.period_type AND a.period_start = k.period_start
                     AND a.actor = k.actor LIMIT 1) a"#,
        &tenants,
        &metrics as &[&str],
        &types as &[&str],
        &starts,
        &actors
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                (
                    r.tenant_id,
                    r.metric,
                    PeriodType::parse(&r.period_type)?,
                    r.period_start,
                    r.actor,
                ),
                i64::from(r.days),
            ))
        })
        .collect()
}

/// Stores the new day counts of actors in their weeks and months (zero: deleted).
pub async fn write_actor_periods(
    conn: &mut PgConnection,
    changes: &[CountChange<ActorPeriod>],
) -> Result<(), DbError> {
    let (kept, gone): (
        Vec<&CountChange<ActorPeriod>>,
        Vec<&CountChange<ActorPeriod>>,
    ) = changes.iter().partition(|c| c.after > 0);
    let columns = |set: &[&CountChange<ActorPeriod>]| {
        (
            set.iter().map(|c| c.key.0).collect::<Vec<Uuid>>(),
            set.iter().map(|c| c.key.1.clone()).collect::<Vec<String>>(),
            set.iter().map(|c| c.key.2.as_str()).collect::<Vec<&str>>(),
            set.iter().map(|c| c.key.3).collect::<Vec<NaiveDate>>(),
            set.iter().map(|c| c.key.4).collect::<Vec<Uuid>>(),
        )
    };
    if !kept.is_empty() {
        let (tenants, metrics, types, starts, actors) = columns(&kept);
        let days = kept
            .iter()
            .map(|c| count_i32(c.after))
            .collect::<Result<Vec<i32>, _>>()?;
        sqlx::query!(
            "INSERT INTO usage_actor_periods (tenant_id, metric, period_type, period_start, actor,
                                              days)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::date[], $5::uuid[],
                                  $6::int4[])
             ON CONFLICT (tenant_id, metric, period_type, period_start, actor)
             DO UPDATE SET days = EXCLUDED.days",
            &tenants,
            &metrics,
            &types as &[&str],
            &starts,
            &actors,
            &days
        )
        .execute(&mut *conn)
        .await?;
    }
    if !gone.is_empty() {
        let (tenants, metrics, types, starts, actors) = columns(&gone);
        sqlx::query!(
            "DELETE FROM usage_actor_periods a
              USING UNNEST($1::uuid[], $2::text[], $3::text[], $4::date[], $5::uuid[])
                    AS k(tenant_id, metric, period_type, period_start, actor)
              WHERE a.tenant_id = k.tenant_id AND a.metric = k.metric
                AND a.period_type = k.period_type AND a.period_start = k.period_start
                AND a.actor = k.actor",
            &tenants,
            &metrics,
            &types as &[&str],
            &starts,
            &actors
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// A cell's new absolute values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellWrite {
    pub key: CellKey,
    /// `None`: the catalog's (a new cell whose changes name none).
    pub classification: Option<String>,
    pub total: i128,
    pub events: i64,
    pub distinct: i64,
    pub seq_xor: i64,
}

/// Writes cells (new or changed) with their actor sets complete. `now` and `grace` decide
/// `final` for a new cell; a change to a final cell counts a revision. A cell whose values did
/// not move is not written. Returns the cells written.
pub async fn write_cells(
    conn: &mut PgConnection,
    cells: &[CellWrite],
    now: DateTime<Utc>,
    grace_seconds: f64,
) -> Result<Vec<Written>, DbError> {
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let c = KeyColumns::of(cells.iter().map(|w| &w.key));
    let ends = cells
        .iter()
        .map(|w| {
            w.key
                .period_type
                .end_of(w.key.period_start)
                .map(midnight)
                .ok_or_else(|| DbError::Decode(format!("no period after {:?}", w.key)))
        })
        .collect::<Result<Vec<DateTime<Utc>>, _>>()?;
    let classes: Vec<Option<&str>> = cells.iter().map(|w| w.classification.as_deref()).collect();
    let totals: Vec<String> = cells.iter().map(|w| w.total.to_string()).collect();
    let events: Vec<i64> = cells.iter().map(|w| w.events).collect();
    let distinct: Vec<i64> = cells.iter().map(|w| w.distinct).collect();
    let xors: Vec<i64> = cells.iter().map(|w| w.seq_xor).collect();
    let rows = sqlx::query!(
        r#"WITH c AS (
               SELECT k.*, CASE WHEN k.events = 0 THEN NULL ELSE k.seq_xor END AS xor_or_null
                 FROM UNNEST($1::text[], $2::timestamptz[], $3::uuid[], $4::text[],
                             $5::timestamptz[], $6::text[], $7::text[], $8::int8[], $9::int8[],
                             $10::int8[])
                      AS k(period_type, period_start, tenant_id, metric, period_end,
                           classification, total, events, distinct_actors, seq_xor)
           )
           INSERT INTO usage_aggregates AS a
                  (tenant_id, period_type, period_start, period_end, metric, classification,
                   total_quantity, event_count, distinct_actors, seq_xor, source_hash,
                   computed_at, final, finalized_at, actors_tracked)
           SELECT c.tenant_id, c.period_type, c.period_start, c.period_end, c.metric,
                  coalesce(c.classification, m.classification), c.total::numeric, c.events,
                  c.distinct_actors, c.xor_or_null,
                  sha256(convert_to(concat_ws(':', c.events, c.xor_or_null), 'UTF8')), $11,
                  c.period_end + make_interval(secs => $12) <= $11,
                  CASE WHEN c.period_end + make_interval(secs => $12) <= $11 THEN $11 END, true
             FROM c JOIN metrics m ON m.name = c.metric
           ON CONFLICT (tenant_id, period_type, period_start, metric) DO UPDATE
              SET classification = EXCLUDED.classification,
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
            WHERE (a.total_quantity, a.event_count, a.distinct_actors, a.classification)
                  IS DISTINCT FROM (EXCLUDED.total_quantity, EXCLUDED.event_count,
                                    EXCLUDED.distinct_actors, EXCLUDED.classification)
               OR a.seq_xor IS DISTINCT FROM EXCLUDED.seq_xor
               OR NOT a.actors_tracked
           RETURNING a.tenant_id, a.metric, a.period_start,
                     (a.revised_at IS NOT DISTINCT FROM $11 AND a.revisions_after_final > 0)
                         AS "revised!""#,
        &c.types as &[&str],
        &c.starts,
        &c.tenants,
        &c.metrics,
        &ends,
        &classes as &[Option<&str>],
        &totals,
        &events,
        &distinct,
        &xors,
        now,
        grace_seconds
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Written {
            tenant_id: r.tenant_id,
            metric: r.metric,
            period_start: r.period_start,
            revised: r.revised,
        })
        .collect())
}

/// Drops at most `limit` actor rows of days before `before`, and of weeks and months that
/// ended by then (past ingestion's window, no change can reach them), and marks their cells no
/// longer tracked (a change would queue a recompute). Returns the rows dropped.
pub async fn prune_actor_sets(
    conn: &mut PgConnection,
    before: NaiveDate,
    limit: i64,
) -> Result<u64, DbError> {
    let days = sqlx::query!(
        r#"WITH gone AS (
               DELETE FROM usage_actor_days
                WHERE ctid IN (SELECT ctid FROM usage_actor_days WHERE day < $1 LIMIT $2)
               RETURNING tenant_id, metric, day
           ), cells AS (
               UPDATE usage_aggregates a SET actors_tracked = false
                 FROM (SELECT DISTINCT tenant_id, metric, day FROM gone) g
                WHERE a.tenant_id = g.tenant_id AND a.period_type = 'daily'
                  AND a.period_start = g.day::timestamp AT TIME ZONE 'UTC'
                  AND a.metric = g.metric AND a.actors_tracked
               RETURNING 1
           )
           SELECT (SELECT count(*) FROM gone) AS "rows!""#,
        before,
        limit
    )
    .fetch_one(&mut *conn)
    .await?;
    let periods = sqlx::query!(
        r#"WITH gone AS (
               DELETE FROM usage_actor_periods
                WHERE ctid IN (
                    SELECT ctid FROM usage_actor_periods
                     WHERE period_start <= $1::date - 7
                       AND (period_type = 'weekly' AND period_start + 7 <= $1
                            OR period_type = 'monthly'
                               AND period_start + interval '1 month' <= $1)
                     LIMIT $2)
               RETURNING tenant_id, metric, period_type, period_start
           ), cells AS (
               UPDATE usage_aggregates a SET actors_tracked = false
                 FROM (SELECT DISTINCT tenant_id, metric, period_type, period_start FROM gone) g
                WHERE a.tenant_id = g.tenant_id AND a.period_type = g.period_type
                  AND a.period_start = g.period_start::timestamp AT TIME ZONE 'UTC'
                  AND a.metric = g.metric AND a.actors_tracked
               RETURNING 1
           )
           SELECT (SELECT count(*) FROM gone) AS "rows!""#,
        before,
        limit
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((days.rows + periods.rows) as u64)
}
