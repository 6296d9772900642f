//! The aggregation workload (issue 9), on `BENCH_AGG_EVENTS` (1,000,000) generated events over
//! `BENCH_AGG_TENANTS` (100) tenants, ten metrics and the last 30 days:
//! - a full aggregation (every cell queued, as after the migration or a backfill of everything)
//!   through the real [`Aggregator`], beside the raw limit: the same grouped SQL run directly
//!   over the whole table, once per period type, with nothing written;
//! - an incremental run after 10,000 new events spread over the tenants (target < 1 s), beside
//!   the same cells recomputed from their periods' events (the design before it);
//! - the Redis counters' repair: every daily counter of the window written wrong, then one
//!   repair (target ≥ 100,000 counters per minute).

use std::time::{Duration, Instant};

use chrono::Utc;
use meterbridge::aggregation::{AggregationConfig, Aggregator};
use meterbridge::config::RedisSource;
use meterbridge::redis::Redis;
use meterbridge::testing::{database_url_as, OPS_ROLE};
use meterbridge::Database;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Deletes every Redis counter of `tenants` (`usage:{tenant}:*`).
pub(crate) async fn delete_counters<T: std::fmt::Display>(
    conn: &mut redis::aio::MultiplexedConnection,
    tenants: &[T],
) {
    for tenant in tenants {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("usage:{{{tenant}}}:*"))
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(conn)
                .await
                .unwrap();
        }
    }
}

/// The ten metrics of the aggregation and maintenance workloads (all in the catalog).
pub(crate) const METRICS: [&str; 10] = [
    "api.requests",
    "api.requests.successful",
    "api.requests.failed",
    "leads.processed",
    "leads.qualified",
    "leads.routed",
    "scoring.requests",
    "voice.minutes.authorized",
    "voice.calls.completed",
    "integrations.api.calls",
];

pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes `events` events over `tenants` tenants in one statement (as the owner; the load is
/// not measured). `recent` puts them within the last hour, otherwise over the last 30 days.
async fn load(owner: &PgPool, tenants: &[uuid::Uuid], events: usize, recent: bool) {
    let span_seconds: i64 = if recent { 3600 } else { 30 * 86_400 };
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id,
                                   source_service, correlation_id, classification, payload_hash,
                                   operation_key)
         SELECT t.ids[1 + (i % array_length(t.ids, 1))], 'agg-' || gen_random_uuid(),
                ($2::text[])[1 + (i / 7) % 10], 1 + (i % 97),
                now() - make_interval(secs => (hashint4(i) & 2147483647) % $3),
                'user-' || (hashint4(i + 1) & 2147483647) % 50, 'crm', 'c-' || i,
                m.classification, sha256(int4send(i)), gen_random_uuid()
           FROM generate_series(1, $4) AS i
          CROSS JOIN (SELECT $1::uuid[] AS ids) t
           JOIN metrics m ON m.name = ($2::text[])[1 + (i / 7) % 10]",
    )
    .bind(tenants)
    .bind(&METRICS[..])
    .bind(span_seconds)
    .bind(events as i32)
    .execute(owner)
    .await
    .unwrap();
    for statement in ["VACUUM ANALYZE usage_events", "CHECKPOINT"] {
        sqlx::query(statement).execute(owner).await.unwrap();
    }
}

/// The raw limit: the grouped statement of a recompute, over the whole table, per period type,
/// with the job's settings (`work_mem`, no JIT).
async fn raw(owner: &PgPool, work_mem_mb: u32) -> Duration {
    let mut tx = owner.begin().await.unwrap();
    for setting in [
        format!("SET LOCAL work_mem = '{work_mem_mb}MB'"),
        "SET LOCAL jit = off".into(),
    ] {
        sqlx::query(&setting).execute(&mut *tx).await.unwrap();
    }
    let started = Instant::now();
    for unit in ["day", "week", "month"] {
        let cells: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                 SELECT tenant_id, metric, start, sum(total), sum(events), count(actor_id),
                        bit_xor(seq_xor), max(latest) % 4
                   FROM (SELECT e.tenant_id, e.metric, date_trunc($1, e.occurred_at, 'UTC') AS start,
                                e.actor_id, sum(e.quantity) AS total, count(*) AS events,
                                bit_xor(hashint8extended(e.seq, 0)) AS seq_xor,
                                max(e.seq * 4 + CASE e.classification WHEN 'BILLABLE' THEN 0
                                                    WHEN 'NON_BILLABLE' THEN 1 ELSE 2 END) AS latest
                           FROM usage_events e WHERE e.voided_at IS NULL
                          GROUP BY 1, 2, 3, 4) by_actor
                  GROUP BY 1, 2, 3) s",
        )
        .bind(unit)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert!(cells > 0);
    }
    let elapsed = started.elapsed();
    tx.commit().await.unwrap();
    elapsed
}

async fn queue_everything(owner: &PgPool) -> i64 {
    sqlx::query("TRUNCATE usage_aggregates, usage_aggregation_queue")
        .execute(owner)
        .await
        .unwrap();
    sqlx::query_scalar(
        "WITH q AS (
             INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
             SELECT DISTINCT p.period_type, date_trunc(p.unit, e.occurred_at, 'UTC'), e.tenant_id,
                    e.metric, 'backfill'
               FROM usage_events e
              CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
                    AS p(period_type, unit)
             RETURNING 1)
         SELECT count(*) FROM q",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

/// Queues the day, week and month cells of the events of the last hour (the incremental
/// load's), as a run before incremental aggregation collected them.
async fn queue_recent(owner: &PgPool) -> i64 {
    sqlx::query_scalar(
        "WITH q AS (
             INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
             SELECT DISTINCT p.period_type, date_trunc(p.unit, e.occurred_at, 'UTC'), e.tenant_id,
                    e.metric, 'backfill'
               FROM usage_events e
              CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
                    AS p(period_type, unit)
              WHERE e.occurred_at >= now() - interval '1 hour'
             ON CONFLICT DO NOTHING
             RETURNING 1)
         SELECT count(*) FROM q",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

pub async fn run(owner: &PgPool, repeat: usize) {
    let events = env_usize("BENCH_AGG_EVENTS", 1_000_000);
    let tenant_count = env_usize("BENCH_AGG_TENANTS", 100);
    let mut tenants = Vec::new();
    for _ in 0..tenant_count {
        tenants.push(meterbridge::testing::create_tenant(owner, "agg").await.id.0);
    }
    let started = Instant::now();
    load(owner, &tenants, events, false).await;
    println!(
        "\naggregation: {events} events over {tenant_count} tenants, 10 metrics, 30 days (loaded in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let ops_pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url_as(owner, OPS_ROLE))
        .await
        .unwrap();
    let ops = Database::from_pool(ops_pool);
    let redis = Redis::new(
        RedisSource::Url(meterbridge::testing::redis_url()),
        None,
        Duration::from_secs(5),
    );
    let config = AggregationConfig::default();
    let far = || Instant::now() + Duration::from_secs(3600);

    // The load's transaction is collected once, unmeasured: a full aggregation is measured
    // from a queue holding every cell (as after a backfill of everything).
    Aggregator::new(&ops, None, config)
        .aggregate(Utc::now(), far())
        .await
        .unwrap();
    // Full aggregation beside the raw limit, each the median of `repeat` runs.
    let mut raws = Vec::new();
    let mut fulls = Vec::new();
    let mut cells = 0;
    for _ in 0..repeat {
        raws.push(raw(owner, config.work_mem_mb).await);
        cells = queue_everything(owner).await;
        let aggregator = Aggregator::new(&ops, None, config);
        let started = Instant::now();
        let report = aggregator.aggregate(Utc::now(), far()).await.unwrap();
        fulls.push(started.elapsed());
        assert_eq!(report.outcome, "done");
        assert_eq!(report.cells_written as i64, cells, "{report:?}");
    }
    raws.sort();
    fulls.sort();
    let (raw_t, full_t) = (raws[raws.len() / 2], fulls[fulls.len() / 2]);
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!(
        "{:<44} {:>10} {:>12} {:>14}",
        "workload", "seconds", "events/s", "cells"
    );
    println!(
        "{:<44} {:>10.2} {:>12.0} {:>14}",
        "full aggregation (Aggregator, 3 periods)",
        full_t.as_secs_f64(),
        rate(full_t),
        cells
    );
    println!(
        "{:<44} {:>10.2} {:>12.0} {:>14}",
        "raw limit (the grouped SQL, 3 periods)",
        raw_t.as_secs_f64(),
        rate(raw_t),
        cells
    );
    let ratio = raw_t.as_secs_f64() / full_t.as_secs_f64();
    println!(
        "full aggregation = {:.0}% of the raw rate (target >= 50%: {})",
        ratio * 100.0,
        if ratio >= 0.5 { "met" } else { "NOT met" }
    );

    // Incremental: 10,000 new events over the tenants, then one run (applies their changes);
    // beside it the same cells recomputed from their periods' events (the design before
    // incremental aggregation: every touched day, week and month read again).
    let mut incrementals = Vec::new();
    let mut recomputes = Vec::new();
    for _ in 0..repeat {
        load(owner, &tenants, 10_000, true).await;
        let aggregator = Aggregator::new(&ops, None, config);
        let started = Instant::now();
        let report = aggregator.aggregate(Utc::now(), far()).await.unwrap();
        incrementals.push((started.elapsed(), report));
        let touched = queue_recent(owner).await;
        let started = Instant::now();
        let report = aggregator.aggregate(Utc::now(), far()).await.unwrap();
        assert_eq!(report.cells_examined as i64, touched, "{report:?}");
        recomputes.push((started.elapsed(), report));
    }
    incrementals.sort_by_key(|(d, _)| *d);
    recomputes.sort_by_key(|(d, _)| *d);
    let (inc_t, report) = &incrementals[incrementals.len() / 2];
    let (rec_t, recomputed) = &recomputes[recomputes.len() / 2];
    println!(
        "incremental run after 10,000 new events: {:.3} s ({} changes, {} cells written) (target < 1 s: {})",
        inc_t.as_secs_f64(),
        report.collected.changes,
        report.collected.cells_changed,
        if inc_t.as_secs_f64() < 1.0 { "met" } else { "NOT met" }
    );
    println!(
        "  baseline, the same cells recomputed from their periods: {:.3} s ({} cells) = {:.1}x the incremental run",
        rec_t.as_secs_f64(),
        recomputed.cells_examined,
        rec_t.as_secs_f64() / inc_t.as_secs_f64()
    );

    // The counters' repair: every daily counter of the window deleted, then one repair. A cell
    // whose total is 0 (its events were voided) has no counter to restore: it is checked, not
    // repaired.
    let counters: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_aggregates
          WHERE period_type = 'daily' AND total_quantity <> 0
            AND period_start >= date_trunc('day', now(), 'UTC') - interval '6 days'",
    )
    .fetch_one(owner)
    .await
    .unwrap();
    let client = redis::Client::open(meterbridge::testing::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut repairs = Vec::new();
    for _ in 0..repeat {
        delete_counters(&mut conn, &tenants).await;
        let aggregator = Aggregator::new(&ops, Some(&redis), config);
        let started = Instant::now();
        let repair = aggregator.repair_counters(Utc::now()).await;
        repairs.push((started.elapsed(), repair));
    }
    repairs.sort_by_key(|(d, _)| *d);
    let (repair_t, repair) = &repairs[repairs.len() / 2];
    assert_eq!(repair.repaired as i64, counters, "{repair:?}");
    let per_minute = repair.repaired as f64 / repair_t.as_secs_f64() * 60.0;
    println!(
        "counter repair: {} counters restored in {:.3} s = {:.0} per minute (target >= 100,000: {})",
        repair.repaired,
        repair_t.as_secs_f64(),
        per_minute,
        if per_minute >= 100_000.0 { "met" } else { "NOT met" }
    );
}
