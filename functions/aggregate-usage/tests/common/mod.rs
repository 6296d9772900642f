//! Shared set-up for the aggregation tests: a fresh database per test (#[sqlx::test]), tenants
//! of its own, events written straight into `usage_events` (as the owner, at chosen instants)
//! or through the ingestion handler, and the job built exactly as in Lambda, as
//! `meterbridge_ops`.
#![allow(dead_code, clippy::unwrap_used, clippy::type_complexity)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use aggregate_usage::App;
use chrono::{DateTime, NaiveDate, Utc};
use meterbridge::aggregation::{AggregationConfig, RunReport};
use meterbridge::config::{Config, Env};
use meterbridge::domain::period::PeriodType;
use meterbridge::testing::{database_url_as, redis_url, require_redis, OPS_ROLE};
use meterbridge::Services;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The job as the Lambda builds it (ops role), with variable overrides.
pub async fn app(owner: &PgPool, overrides: &[(&str, &str)]) -> App {
    require_redis();
    meterbridge::testing::create_partitions_around_now(owner).await;
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url_as(owner, OPS_ROLE));
    vars.insert("REDIS_URL".into(), redis_url());
    vars.insert("DB_ACQUIRE_TIMEOUT_MS".into(), "5000".into());
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let config = Config::from(&env, "aggregate-usage").unwrap();
    let aggregation = AggregationConfig::from_env(&env).unwrap();
    let services = Services::build_with_aws(config, None)
        .await
        .unwrap()
        .with_clock(meterbridge::testing::clock());
    App::new(services, aggregation)
}

pub fn later() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

pub fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

pub fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

/// One event as the tests write it.
#[derive(Debug, Clone)]
pub struct Ev {
    pub tenant: Uuid,
    pub metric: &'static str,
    pub quantity: i64,
    pub at: DateTime<Utc>,
    pub actor: Option<String>,
}

/// Writes events straight into `usage_events` as the owner, in one transaction (after creating
/// the day partitions they need). Returns their seqs.
pub async fn insert(owner: &PgPool, events: &[Ev]) -> Vec<i64> {
    partitions_for(owner, events).await;
    let mut tx = owner.begin().await.unwrap();
    let seqs = insert_in(&mut tx, events).await;
    tx.commit().await.unwrap();
    seqs
}

/// Creates the day partitions `events` need.
pub async fn partitions_for(owner: &PgPool, events: &[Ev]) {
    let days = events.iter().map(|e| e.at.date_naive());
    if let (Some(first), Some(last)) = (days.clone().min(), days.max()) {
        meterbridge::testing::create_day_partitions(owner, first, last).await;
    }
}

/// Writes events in the caller's transaction; their day partitions must exist (a partition
/// created in a transaction held open would lock the table for everyone else).
pub async fn insert_in(conn: &mut sqlx::PgConnection, events: &[Ev]) -> Vec<i64> {
    let mut seqs = Vec::new();
    for e in events {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at,
                                       actor_id, source_service, correlation_id, classification,
                                       payload_hash, operation_key)
             SELECT $1, gen_random_uuid()::text, $2, $3, $4, $5, 'crm', gen_random_uuid()::text,
                    m.classification, sha256('x'), gen_random_uuid()
               FROM metrics m WHERE m.name = $2
             RETURNING seq",
        )
        .bind(e.tenant)
        .bind(e.metric)
        .bind(e.quantity)
        .bind(e.at)
        .bind(&e.actor)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        seqs.push(seq);
    }
    seqs
}

/// Voids events (as the owner; the API's void is tested in ingest-usage).
pub async fn void(owner: &PgPool, seqs: &[i64]) {
    sqlx::query(
        "UPDATE usage_events SET voided_at = now(), voided_by = 'test', void_reason = 'test'
          WHERE seq = ANY($1)",
    )
    .bind(seqs)
    .execute(owner)
    .await
    .unwrap();
}

/// (total, events, distinct actors) per (tenant, period, start, metric), computed here from
/// the events the test wrote.
pub type Expected = BTreeMap<(Uuid, PeriodType, NaiveDate, String), (i128, i64, i64)>;

pub fn expected(events: &[Ev]) -> Expected {
    let mut sets: BTreeMap<(Uuid, PeriodType, NaiveDate, String), (i128, i64, Vec<String>)> =
        BTreeMap::new();
    for e in events {
        for p in PeriodType::ALL {
            let start = p.start_of(e.at.date_naive());
            let cell = sets
                .entry((e.tenant, p, start, e.metric.to_owned()))
                .or_default();
            cell.0 += i128::from(e.quantity);
            cell.1 += 1;
            if let Some(a) = &e.actor {
                if !cell.2.contains(a) {
                    cell.2.push(a.clone());
                }
            }
        }
    }
    sets.into_iter()
        .map(|(k, (t, n, a))| (k, (t, n, a.len() as i64)))
        .collect()
}

/// What `usage_aggregates` holds, in the same shape (cells with no events left included).
pub async fn stored(owner: &PgPool) -> Expected {
    let rows: Vec<(Uuid, String, DateTime<Utc>, String, String, i64, i64)> = sqlx::query_as(
        "SELECT tenant_id, period_type, period_start, metric, total_quantity::text, event_count,
                distinct_actors
           FROM usage_aggregates WHERE event_count > 0",
    )
    .fetch_all(owner)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, p, s, m, total, n, a)| {
            (
                (t, PeriodType::parse(&p).unwrap(), s.date_naive(), m),
                (total.parse().unwrap(), n, a),
            )
        })
        .collect()
}

/// `computed_at` of every cell.
pub async fn computed_at(
    owner: &PgPool,
) -> BTreeMap<(Uuid, String, NaiveDate, String), DateTime<Utc>> {
    let rows: Vec<(Uuid, String, DateTime<Utc>, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT tenant_id, period_type, period_start, metric, computed_at FROM usage_aggregates",
    )
    .fetch_all(owner)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, p, s, m, c)| ((t, p, s.date_naive(), m), c))
        .collect()
}

/// Runs the aggregation until it has collected every event of this database: a transaction
/// still open anywhere on the cluster (another test's) holds the watermark back, by design, so
/// one run may leave recent events to the next. The reports of the runs are summed.
pub async fn run(app: &App, owner: &PgPool, now: DateTime<Utc>) -> RunReport {
    let mut total = RunReport::default();
    for _ in 0..600 {
        let r = app.aggregator().aggregate(now, later()).await.unwrap();
        total.outcome = r.outcome.clone();
        total.collected.chunks += r.collected.chunks;
        total.collected.changes += r.collected.changes;
        total.collected.cells_changed += r.collected.cells_changed;
        total.collected.cells_queued += r.collected.cells_queued;
        total.collected.watermark = r.collected.watermark;
        total.cells_examined += r.cells_examined;
        total.cells_written += r.cells_written;
        total.cells_unchanged += r.cells_unchanged;
        total.revisions += r.revisions;
        total.finalized += r.finalized;
        total.thresholds_crossed_late += r.thresholds_crossed_late;
        total.skipped_retired += r.skipped_retired;
        total.queued_after = r.queued_after;
        total.counters = r.counters;
        total.lag = r.lag;
        let newest: i64 = sqlx::query_scalar("SELECT coalesce(max(xact_id), 0) FROM usage_events")
            .fetch_one(owner)
            .await
            .unwrap();
        if r.outcome == "done" && r.collected.watermark > newest {
            return total;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the watermark never passed this database's events: {total:?}");
}

pub fn json_of(report: &impl serde::Serialize) -> Value {
    serde_json::to_value(report).unwrap()
}
