//! The growth run: ingestion at batch 500 with 1 and 4 callers on an empty table, then again
//! after loading the table to each of `BENCH_GROWTH_SIZES` stored rows (10 M and 30 M by
//! default), with the ratio to the empty-table rate. `BENCH_SCHEMA=after` (this design: the
//! handler, on the latest migration) or `before` (migration 0005's schema and its batch INSERT,
//! the statement the handler ran then, in the same tenant transaction).
//!
//! The measured events carry random (UUIDv4) ids, as the stored ones do, and fall in the last
//! hour of the UTC day before the run (the anchor: midnight): the day partition they land in
//! is full, as at the end of every day, whatever the hour of the run. Each measurement's
//! events follow each other in time, after the previous measurement's, as live traffic does.
//! The stored rows are a month of history before that hour: each row's occurred_at (and
//! arrival, a second later) its own instant, evenly over 30 days (a hash of the row's number),
//! ten tenants, random text ids as clients send them. They are loaded outside the measured
//! time with the table's indexes dropped and built again afterwards, then the tables are
//! analysed and checkpointed. For `after`, the dedup keys of the loaded rows are where the
//! schema keeps them midway between two rotations and two full compactions: those that arrived
//! in the last half generation (30 minutes before the anchor) in the open generation, those of
//! the 12 hours before in one recent generation without a filter, the rest in a closed one,
//! which the real full compaction then merges into the compacted partition with its Bloom
//! filter.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use meterbridge::domain::{MetricCatalog, Tenant};
use meterbridge::Database;
use sqlx::postgres::PgPool;

use crate::ingest::{build_apps, make_batches, prepare, run_handler, Prepared};

/// `total` new events in batches of `size`, with random (UUIDv4) event and correlation ids, as
/// many clients send them: every unique key lands at a random place in its index. They occur
/// one after the other across `slot` (from its start, for its length), as live traffic does:
/// each measurement writes after the ones before it, at the right edge of the time-ordered
/// indexes, never into a range that earlier measurements filled.
fn random_id_batches(
    total: usize,
    size: usize,
    slot: (DateTime<Utc>, chrono::Duration),
) -> Vec<Vec<serde_json::Value>> {
    let mut batches = make_batches("r", total, size);
    let step = slot.1 / (total.max(1) as i32);
    for (n, event) in batches.iter_mut().flatten().enumerate() {
        event["eventId"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
        event["correlationId"] = serde_json::json!(uuid::Uuid::new_v4().to_string());
        event["occurredAt"] = serde_json::json!((slot.0 + step * (n as i32)).to_rfc3339());
    }
    batches
}
use crate::measure::{run_concurrently, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    Before,
    After,
}

impl Schema {
    pub fn from_env() -> Schema {
        match std::env::var("BENCH_SCHEMA").as_deref() {
            Ok("before") => Schema::Before,
            _ => Schema::After,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Schema::Before => "before (0005)",
            Schema::After => "after (0010)",
        }
    }
}

/// One point of the run: the rows stored when it was measured, the size of the tables with
/// their indexes, and the measurement per caller count.
pub struct Point {
    pub stored: i64,
    pub bytes: i64,
    pub rows: Vec<Row>,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    owner: &PgPool,
    api_url: &str,
    schema: Schema,
    tenant: &Tenant,
    key: &str,
    catalog: &MetricCatalog,
    sizes: &[usize],
    events: usize,
    repeat: usize,
) -> Vec<Point> {
    let callers = [1usize, 4];
    let batch = 500;
    if reuse() {
        return vec![measure_again(owner, api_url, key, &callers, events, repeat).await];
    }
    let mut tenants = vec![tenant.id.0];
    for n in 1..10 {
        tenants.push(
            meterbridge::testing::create_tenant(owner, &format!("history-{n}"))
                .await
                .id
                .0,
        );
    }
    // The measured events fall in the last hour of a day that the history fills: the day
    // partition they land in is as full as it gets, whatever the hour of the run.
    let anchor = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|midnight| midnight.and_utc())
        .unwrap_or_else(Utc::now);
    if schema == Schema::After {
        half_full_generations(owner, anchor).await;
    }
    let api = Database::from_pool(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(api_url)
            .await
            .unwrap(),
    );
    let mut points = Vec::new();
    let mut stored = 0usize;
    let mut apps = Vec::new();
    for &c in &callers {
        apps.push(build_apps(api_url, c).await);
    }
    for (step, &size) in std::iter::once(&0).chain(sizes).enumerate() {
        if size > stored {
            let started = Instant::now();
            let history = match schema {
                Schema::After => Some(history_generation(owner, step).await),
                Schema::Before => None,
            };
            load(owner, schema, &tenants, size - stored, history, anchor).await;
            stored = size;
            eprintln!(
                "growth {}: loaded to {size} rows in {:.0} s",
                schema.name(),
                started.elapsed().as_secs_f64()
            );
        }
        if schema == Schema::After && step > 0 {
            remember_load(owner, tenant, anchor).await;
        }
        let mut rows = Vec::new();
        for (i, &c) in callers.iter().enumerate() {
            let mut runs = Vec::new();
            for r in 0..repeat {
                let at = slot(anchor, (step, sizes.len()), &callers, repeat, i, r);
                let work = random_id_batches(events, batch, at);
                settle(owner, step == 0).await;
                let io = IoSnapshot::wanted(owner).await;
                runs.push(match schema {
                    Schema::After => run_handler(&apps[i], key, work, batch, c).await,
                    Schema::Before => {
                        let prepared = prepare(&work, tenant, catalog);
                        run_old_insert(&api, tenant, prepared, batch, c).await
                    }
                });
                if let Some(io) = io {
                    io.report_since(owner, size, c).await;
                }
            }
            rows.push(crate::measure::median(runs));
        }
        let (count, bytes) = size_of(owner).await;
        points.push(Point {
            stored: count,
            bytes,
            rows,
        });
    }
    points
}

/// The measurements share the hour before the anchor, in turn: measurement `r` of caller
/// count number `i` at point `point.0` of `point.1` loaded points gets its own part of it,
/// after the ones before (the empty table's, truncated after each, share the first point's).
fn slot(
    anchor: DateTime<Utc>,
    point: (usize, usize),
    callers: &[usize],
    repeat: usize,
    i: usize,
    r: usize,
) -> (DateTime<Utc>, chrono::Duration) {
    let per_point = callers.len() * repeat;
    let slots = (point.1.max(1) * per_point) as i32;
    let width = chrono::Duration::hours(1) / slots;
    let n = point.0.saturating_sub(1) * per_point + i * repeat + r;
    let start = anchor - chrono::Duration::hours(1) + width * (n as i32);
    (start, width)
}

/// `BENCH_GROWTH_REUSE=1`: measure again, at the last size, on the database that the last
/// growth run (schema `after`) left, without loading it again: to compare a change to the
/// ingestion path (its new migrations are applied) on the same data, in minutes. No empty
/// point is measured; `BENCH_GROWTH_BASE=<1 caller>,<4 callers>` gives the rates to divide by.
pub fn reuse() -> bool {
    std::env::var("BENCH_GROWTH_REUSE").as_deref() == Ok("1")
}

/// What a reuse needs from the load: the measured tenant, the anchor, the last loaded row.
async fn remember_load(owner: &PgPool, tenant: &Tenant, anchor: DateTime<Utc>) {
    for statement in [
        "CREATE TABLE IF NOT EXISTS bench_growth_load
             (tenant_id uuid NOT NULL, anchor timestamptz NOT NULL, last_seq int8 NOT NULL)",
        "DELETE FROM bench_growth_load",
        "INSERT INTO bench_growth_load SELECT $1, $2, max(seq) FROM usage_events",
    ] {
        sqlx::query(statement)
            .bind(tenant.id.0)
            .bind(anchor)
            .execute(owner)
            .await
            .unwrap();
    }
}

/// The tenant whose events the last growth run measured.
pub async fn loaded_tenant(owner: &PgPool) -> Tenant {
    let id: uuid::Uuid = sqlx::query_scalar("SELECT tenant_id FROM bench_growth_load")
        .fetch_one(owner)
        .await
        .expect("a growth run's database (BENCH_GROWTH_REUSE)");
    meterbridge::repo::tenants::find(owner, meterbridge::domain::TenantId(id))
        .await
        .unwrap()
        .unwrap()
}

/// The reuse: the loaded state back (every measured event and its key removed, their pages
/// vacuumed), then the measurements of the last point again.
async fn measure_again(
    owner: &PgPool,
    api_url: &str,
    key: &str,
    callers: &[usize],
    events: usize,
    repeat: usize,
) -> Point {
    let (anchor, last_seq): (DateTime<Utc>, i64) =
        sqlx::query_as("SELECT anchor, last_seq FROM bench_growth_load")
            .fetch_one(owner)
            .await
            .unwrap();
    let day = (anchor - chrono::Duration::hours(1)).format("%Y%m%d");
    for statement in [
        "DELETE FROM usage_event_keys WHERE generation = 1000 AND seq > $1".to_owned(),
        "DELETE FROM usage_events WHERE seq > $1".to_owned(),
        format!("VACUUM (INDEX_CLEANUP ON) usage_events_p{day}"),
        "VACUUM (INDEX_CLEANUP ON) usage_event_keys_g1000".to_owned(),
    ] {
        sqlx::query(&statement)
            .bind(last_seq)
            .execute(owner)
            .await
            .unwrap();
    }
    let batch = 500;
    let size = size_of(owner).await.0 as usize;
    let mut rows = Vec::new();
    for (i, &c) in callers.iter().enumerate() {
        let apps = build_apps(api_url, c).await;
        let mut runs = Vec::new();
        for r in 0..repeat {
            let work =
                random_id_batches(events, batch, slot(anchor, (1, 1), callers, repeat, i, r));
            settle(owner, false).await;
            let io = IoSnapshot::wanted(owner).await;
            runs.push(run_handler(&apps, key, work, batch, c).await);
            if let Some(io) = io {
                io.report_since(owner, size, c).await;
            }
        }
        rows.push(crate::measure::median(runs));
    }
    let (stored, bytes) = size_of(owner).await;
    Point {
        stored,
        bytes,
        rows,
    }
}

/// Before a measurement: an empty table at the first point (each repeat from zero), and a
/// fresh checkpoint always, so no measurement pays for the load or the one before it.
async fn settle(owner: &PgPool, empty: bool) {
    if empty {
        sqlx::query("TRUNCATE usage_events")
            .execute(owner)
            .await
            .unwrap();
        if has_keys(owner).await {
            sqlx::query("TRUNCATE usage_event_keys")
                .execute(owner)
                .await
                .unwrap();
        }
        for table in ["usage_events", "usage_event_keys"] {
            if table == "usage_events" || has_keys(owner).await {
                sqlx::query(&format!("VACUUM ANALYZE {table}"))
                    .execute(owner)
                    .await
                    .unwrap();
            }
        }
    }
    sqlx::query("CHECKPOINT").execute(owner).await.unwrap();
}

async fn has_keys(owner: &PgPool) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass('public.usage_event_keys') IS NOT NULL")
        .fetch_one(owner)
        .await
        .unwrap()
}

/// Stored rows, and the bytes of usage_events (all partitions, with indexes) plus the keys.
async fn size_of(owner: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events),
                (SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c
                  WHERE c.relkind = 'r' AND (c.relname = 'usage_events'
                        OR c.relname LIKE 'usage\\_events\\_p%' OR c.relname LIKE 'usage\\_event\\_keys%'))",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

/// The key generations as the schema keeps them midway between two rotations and between two
/// full compactions: the open one (`usage_event_keys_g1000`) opened half a generation ago, the
/// generations closed in the half day before it merged into one partition without a filter
/// (see [`recent_generation`]), every older one compacted into one partition with its Bloom
/// filter. Each load adds its history older than that as one more closed generation, and the
/// real full compaction then merges it into the compacted partition, outside the measured time.
async fn half_full_generations(owner: &PgPool, anchor: DateTime<Utc>) {
    let half = meterbridge::repo::usage_storage::StoragePolicy::default().generation_hours * 30;
    for statement in [
        "SELECT count(usage_event_keys_create_partition(0))
              + count(usage_event_keys_create_partition(1000))"
            .to_owned(),
        "UPDATE usage_key_generations SET opened_at = now() - interval '60 days',
                closed_at = now() - interval '59 days' WHERE generation = 1"
            .to_owned(),
        "INSERT INTO usage_key_generations (generation, opened_at, closed_at, stored_in)
         VALUES (0, now() - interval '61 days', now() - interval '60 days', 'usage_event_keys_g0')"
            .to_owned(),
        format!(
            "INSERT INTO usage_key_generations (generation, opened_at, stored_in)
             VALUES (1000, $1::timestamptz - interval '{half} minutes', 'usage_event_keys_g1000')"
        ),
    ] {
        sqlx::query(&statement)
            .bind(anchor)
            .execute(owner)
            .await
            .unwrap();
    }
}

/// The closed generation that holds the history of load number `step` (1, 2, ...): the
/// migration's generation 1 for the first, a new one after.
async fn history_generation(owner: &PgPool, step: usize) -> i32 {
    let generation = step as i32;
    if step > 1 {
        for statement in [
            format!("SELECT count(usage_event_keys_create_partition({generation}))"),
            format!(
                "INSERT INTO usage_key_generations (generation, opened_at, closed_at, stored_in)
                 VALUES ({generation}, now() - interval '59 days', now() - interval '58 days',
                         'usage_event_keys_g{generation}')"
            ),
        ] {
            sqlx::query(&statement).execute(owner).await.unwrap();
        }
    }
    generation
}

/// Adds `rows` rows of history with the indexes dropped, then builds them again.
async fn load(
    owner: &PgPool,
    schema: Schema,
    tenants: &[uuid::Uuid],
    rows: usize,
    history: Option<i32>,
    anchor: DateTime<Utc>,
) {
    let mut conn = owner.acquire().await.unwrap();
    let (drop, build): (&[&str], &[&str]) = match schema {
        Schema::After => (
            &[
                "ALTER TABLE usage_events DROP CONSTRAINT usage_events_key",
                "DROP INDEX usage_events_tenant_metric_time_idx, usage_events_tenant_class_time_idx",
                "ALTER TABLE usage_events DROP CONSTRAINT usage_events_operation",
                "ALTER TABLE usage_event_keys DROP CONSTRAINT usage_event_keys_unique",
            ],
            &[
                "ALTER TABLE usage_events ADD CONSTRAINT usage_events_key
                     UNIQUE (tenant_id, occurred_at, seq)",
                "CREATE INDEX usage_events_tenant_metric_time_idx
                     ON usage_events (tenant_id, metric, occurred_at, seq)",
                "CREATE INDEX usage_events_tenant_class_time_idx
                     ON usage_events (tenant_id, classification, occurred_at, seq)",
                "ALTER TABLE usage_events ADD CONSTRAINT usage_events_operation
                     UNIQUE (tenant_id, occurred_at, operation_key)",
                "ALTER TABLE usage_event_keys ADD CONSTRAINT usage_event_keys_unique
                     UNIQUE (key_hash, generation)",
                "VACUUM ANALYZE usage_event_keys",
            ],
        ),
        Schema::Before => (
            &[
                "ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey,
                     DROP CONSTRAINT usage_events_idempotency_key,
                     DROP CONSTRAINT usage_events_correlation",
                "DROP INDEX usage_events_tenant_time_idx, usage_events_tenant_metric_time_idx,
                     usage_events_tenant_class_time_idx",
            ],
            &[
                "ALTER TABLE usage_events
                     ADD CONSTRAINT usage_events_pkey PRIMARY KEY (tenant_id, source_service, event_id),
                     ADD CONSTRAINT usage_events_idempotency_key
                         UNIQUE (tenant_id, source_service, idempotency_key),
                     ADD CONSTRAINT usage_events_correlation
                         UNIQUE (tenant_id, correlation_id, metric, occurred_at)",
                "CREATE INDEX usage_events_tenant_time_idx ON usage_events (tenant_id, occurred_at, seq)",
                "CREATE INDEX usage_events_tenant_metric_time_idx
                     ON usage_events (tenant_id, metric, occurred_at, seq)",
                "CREATE INDEX usage_events_tenant_class_time_idx
                     ON usage_events (tenant_id, classification, occurred_at, seq)",
            ],
        ),
    };
    // Loading only: no foreign-key triggers (the rows reference tenants and metrics that
    // exist), no waiting for WAL flushes, memory for the index builds.
    for setting in [
        "SET maintenance_work_mem = '1GB'",
        "SET session_replication_role = replica",
        "SET synchronous_commit = off",
    ] {
        sqlx::query(setting).execute(&mut *conn).await.unwrap();
    }
    for statement in drop {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    let first_seq: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM usage_events")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    // In slices of a million rows: each its own transaction, with progress.
    let slice = 1_000_000;
    let mut done = 0;
    while done < rows {
        let n = slice.min(rows - done);
        // The operation key (migration 0006) is one more random 16-byte value per row. Each
        // row's instant is its own (a hash of its number), evenly over the 30 days before the
        // measured hour: a volatile random() in a subquery of its own would be drawn once.
        let (op_column, op_value) = match schema {
            Schema::After => (", operation_key", ", gen_random_uuid()"),
            Schema::Before => ("", ""),
        };
        sqlx::query(&format!(
            "INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
                 occurred_at, actor_id, correlation_id, classification, metadata, payload_hash,
                 created_at{op_column})
             SELECT ($1::uuid[])[1 + i % 10], 'crm', gen_random_uuid()::text, m.name,
                    1 + i % 7, t.at, 'user-' || i % 100, gen_random_uuid()::text,
                    m.classification, '{{\"endpoint\": \"/v1/leads\", \"region\": \"eu-west-1\"}}',
                    sha256(int8send(i)), t.at + interval '1 second'{op_value}
               FROM generate_series($3::int8 + 1, $3::int8 + $2::int8) AS i
              CROSS JOIN LATERAL (SELECT $4::timestamptz - interval '1 hour'
                                         - make_interval(secs => ((hashint8extended(i, 0) & 9223372036854775807)
                                                                  % 2592000000000)::float8 / 1e6)
                                         AS at) AS t
              JOIN (SELECT name, classification,
                           row_number() OVER (ORDER BY name) - 1 AS k
                      FROM metrics WHERE name IN ('api.requests', 'leads.processed',
                                                  'scoring.requests', 'voice.calls.completed')) m
                ON m.k = i % 4"
        ))
        .bind(tenants)
        .bind(n as i64)
        .bind((first_seq as usize + done) as i64)
        .bind(anchor)
        .execute(&mut *conn)
        .await
        .unwrap();
        done += n;
    }
    if let Some(history) = history {
        // Its event id's key per event: in the open generation when it arrived since that
        // opened, in this load's closed generation when it arrived before the recent
        // generations (added after the compaction, by recent_generation).
        sqlx::query(&format!(
            "INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
             SELECT CASE WHEN e.created_at >= g.opened_at THEN g.generation ELSE $2 END,
                    gen_random_uuid(), e.tenant_id, e.occurred_at, e.seq
               FROM usage_events e
              CROSS JOIN (SELECT generation, opened_at FROM usage_key_generations
                           WHERE closed_at IS NULL) AS g
              WHERE e.seq > $1
                AND NOT (e.created_at >= g.opened_at - interval '{RECENT_HOURS} hours'
                         AND e.created_at < g.opened_at)"
        ))
        .bind(first_seq)
        .bind(history)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    for statement in build {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    sqlx::query("VACUUM ANALYZE usage_events")
        .execute(&mut *conn)
        .await
        .unwrap();
    if let Some(history) = history {
        // The key maintenance the admin function runs after each rotation (migration 0015):
        // this load's closed generation joins a level and gets its filter, step by step.
        drop_recent_generation(&mut conn).await;
        let started = Instant::now();
        loop {
            let did: i64 =
                sqlx::query_scalar("SELECT count(*) FROM usage_event_keys_step(5000000)")
                    .fetch_one(&mut *conn)
                    .await
                    .unwrap();
            if did == 0 {
                break;
            }
        }
        eprintln!(
            "growth: compacted the closed key generations in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        recent_generation(&mut conn, history, first_seq).await;
        for statement in [
            "VACUUM ANALYZE usage_event_keys",
            "VACUUM ANALYZE usage_key_filter_slices",
        ] {
            sqlx::query(statement).execute(&mut *conn).await.unwrap();
        }
    }
    sqlx::query("RESET session_replication_role")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Hours of generations closed since the last full compaction, at the measured moment: half
/// of `full_compaction_hours` (a day), the average.
const RECENT_HOURS: i32 = 12;

/// The generations closed in the `RECENT_HOURS` before the open one, as the hourly merges keep
/// them: one partition in key order without a filter, probed by its index (generation 900 +
/// the load's number, between the compacted ones and the open one). It holds the keys of
/// every stored row that arrived then: the previous load's recent generation is dropped
/// before the full compaction (see [`drop_recent_generation`]) and its keys drawn again. The
/// keys of the previous point's measured events (stored up to `first_seq`, after the previous
/// load) leave the open generation for it too, as the hourly rotation and merge would take
/// them: the open generation holds half an hour of the history's traffic at every point.
async fn recent_generation(conn: &mut sqlx::PgConnection, history: i32, first_seq: i64) {
    let generation = 900 + history;
    let loaded_before: bool =
        sqlx::query_scalar("SELECT to_regclass('public.bench_growth_load') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let measured_after: Option<i64> = if loaded_before {
        sqlx::query_scalar("SELECT last_seq FROM bench_growth_load")
            .fetch_optional(&mut *conn)
            .await
            .unwrap()
    } else {
        None
    };
    for statement in [
        format!("SELECT count(usage_event_keys_create_partition({generation}))"),
        format!(
            "INSERT INTO usage_key_generations (generation, opened_at, closed_at, stored_in)
             SELECT {generation}, opened_at - interval '{RECENT_HOURS} hours', opened_at,
                    'usage_event_keys_g{generation}'
               FROM usage_key_generations WHERE closed_at IS NULL"
        ),
        format!(
            "INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
             SELECT {generation}, k.key_hash, k.tenant_id, k.occurred_at, k.seq
               FROM (SELECT gen_random_uuid() AS key_hash, e.tenant_id, e.occurred_at, e.seq
                       FROM usage_events e
                      CROSS JOIN (SELECT opened_at FROM usage_key_generations
                                   WHERE closed_at IS NULL) AS g
                      WHERE e.created_at >= g.opened_at - interval '{RECENT_HOURS} hours'
                        AND e.created_at < g.opened_at) AS k
              ORDER BY k.key_hash"
        ),
    ] {
        sqlx::query(&statement).execute(&mut *conn).await.unwrap();
    }
    if let Some(after) = measured_after {
        sqlx::query(&format!(
            "WITH moved AS (
                 DELETE FROM usage_event_keys WHERE generation = 1000 AND seq > $1 AND seq <= $2
                 RETURNING key_hash, tenant_id, occurred_at, seq)
             INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
             SELECT {generation}, key_hash, tenant_id, occurred_at, seq FROM moved
              ORDER BY key_hash"
        ))
        .bind(after)
        .bind(first_seq)
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("REINDEX TABLE usage_event_keys_g1000")
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

/// The previous load's recent generation, dropped before this load's full compaction would
/// merge it: [`recent_generation`] draws its keys again.
async fn drop_recent_generation(conn: &mut sqlx::PgConnection) {
    let recent: Vec<i32> = sqlx::query_scalar(
        "SELECT generation FROM usage_key_generations WHERE generation BETWEEN 900 AND 999",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    for generation in recent {
        for statement in [
            format!("DROP TABLE usage_event_keys_g{generation}"),
            format!("DELETE FROM usage_key_generations WHERE generation = {generation}"),
        ] {
            sqlx::query(&statement).execute(&mut *conn).await.unwrap();
        }
    }
}

/// Migration 0005's store: its batch INSERT (the handler's fast path then), in a tenant
/// transaction as the API role.
async fn run_old_insert(
    db: &Database,
    tenant: &Tenant,
    work: Vec<Vec<Prepared>>,
    batch: usize,
    callers: usize,
) -> Row {
    let events: usize = work.iter().map(Vec::len).sum();
    let db = Arc::new(db.clone());
    let tenant_id = tenant.id;
    let (elapsed, latencies) =
        run_concurrently(work, callers, move |_, rows: Vec<Prepared>| {
            let db = Arc::clone(&db);
            async move {
                let mut tx = db.tenant_tx(tenant_id).await.unwrap();
                sqlx::query(
                "INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
                     occurred_at, actor_id, correlation_id, classification, idempotency_key,
                     metadata, payload_hash)
                 SELECT $1, 'crm', e.* FROM UNNEST($2::text[], $3::text[], $4::int8[],
                     $5::timestamptz[], $6::text[], $7::text[], $8::text[], $9::text[],
                     $10::jsonb[], $11::bytea[]) AS e",
            )
            .bind(tenant_id.0)
            .bind(rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.metric.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.quantity).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.actor_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.correlation_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.classification).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.idempotency_key.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.metadata.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.payload_hash.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .unwrap();
                tx.commit().await.unwrap();
            }
        })
        .await;
    Row {
        workload: "0005 batch INSERT",
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: 0,
    }
}

/// The growth table: rate per stored size and caller count, and its ratio to the empty table.
pub fn report(schema: Schema, points: &[Point]) {
    println!();
    println!(
        "growth run, {} — batch 500, events/s (ratio to the empty table)",
        schema.name()
    );
    println!(
        "{:>12} {:>12} {:>22} {:>22}",
        "stored rows", "size GB", "1 caller", "4 callers"
    );
    let given: Option<Vec<f64>> = std::env::var("BENCH_GROWTH_BASE")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect());
    let base: Vec<f64> = given.unwrap_or_else(|| {
        points
            .first()
            .map(|p| p.rows.iter().map(Row::rate).collect())
            .unwrap_or_default()
    });
    for p in points {
        let cells: Vec<String> = p
            .rows
            .iter()
            .zip(&base)
            .map(|(r, b)| format!("{:.0} ({:.0}%)", r.rate(), r.rate() / b * 100.0))
            .collect();
        println!(
            "{:>12} {:>12.2} {:>22} {:>22}",
            p.stored,
            p.bytes as f64 / 1e9,
            cells.first().cloned().unwrap_or_default(),
            cells.get(1).cloned().unwrap_or_default()
        );
    }
    if let Some(last) = points.last() {
        for (r, b) in last.rows.iter().zip(&base) {
            let ratio = r.rate() / b * 100.0;
            println!(
                "at {} rows, {} caller(s): {ratio:.0}% of the empty-table rate (target >= 80%: {})",
                last.stored,
                r.callers,
                if ratio >= 80.0 { "met" } else { "NOT met" }
            );
        }
    }
}

/// `BENCH_GROWTH_IO=1`: buffer and WAL counters, to show where a measurement's time went: the pages each relation
/// read from outside `shared_buffers` (and found inside), and the WAL written.
struct IoSnapshot {
    relations: std::collections::HashMap<String, (i64, i64)>,
    wal: (i64, i64, i64),
}

impl IoSnapshot {
    /// A snapshot when `BENCH_GROWTH_IO=1`.
    async fn wanted(owner: &PgPool) -> Option<IoSnapshot> {
        match std::env::var("BENCH_GROWTH_IO").as_deref() {
            Ok("1") => Some(IoSnapshot::take(owner).await),
            _ => None,
        }
    }

    async fn take(owner: &PgPool) -> IoSnapshot {
        // Statistics reach the shared counters within a second of a transaction's end.
        sqlx::query("SELECT pg_stat_force_next_flush()")
            .execute(owner)
            .await
            .unwrap();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT indexrelname::text, idx_blks_read, idx_blks_hit FROM pg_statio_user_indexes
              WHERE relname LIKE 'usage\\_%'
             UNION ALL
             SELECT relname::text, coalesce(heap_blks_read, 0), coalesce(heap_blks_hit, 0)
               FROM pg_statio_user_tables WHERE relname LIKE 'usage\\_%'",
        )
        .fetch_all(owner)
        .await
        .unwrap();
        let wal: (i64, i64, i64) =
            sqlx::query_as("SELECT wal_records, wal_fpi, wal_bytes::int8 FROM pg_stat_wal")
                .fetch_one(owner)
                .await
                .unwrap();
        IoSnapshot {
            relations: rows.into_iter().map(|(n, r, h)| (n, (r, h))).collect(),
            wal,
        }
    }

    /// Prints (to stderr) what changed since this snapshot: WAL, and the relations that read
    /// the most pages from outside shared_buffers.
    async fn report_since(&self, owner: &PgPool, stored: usize, callers: usize) {
        // An idle backend reports its counters within 10 s (PGSTAT_IDLE_INTERVAL).
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        let now = IoSnapshot::take(owner).await;
        let mut deltas: Vec<(String, i64, i64)> = now
            .relations
            .iter()
            .map(|(name, (r, h))| {
                let (r0, h0) = self.relations.get(name).copied().unwrap_or_default();
                (name.clone(), r - r0, h - h0)
            })
            .filter(|(_, r, h)| r + h > 0)
            .collect();
        deltas.sort_by_key(|(_, r, h)| std::cmp::Reverse((*r, *h)));
        let top: Vec<String> = deltas
            .iter()
            .take(8)
            .map(|(n, r, h)| format!("{n} {r}/{h}"))
            .collect();
        eprintln!(
            "io at {stored} rows, {callers} caller(s): WAL {} records, {} full pages, {:.0} MB; \
             pages read/hit: {}",
            now.wal.0 - self.wal.0,
            now.wal.1 - self.wal.1,
            (now.wal.2 - self.wal.2) as f64 / 1e6,
            top.join(", ")
        );
    }
}
