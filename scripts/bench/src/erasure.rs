//! Subject erasure (`BENCH_WORKLOADS=erasure`): `BENCH_ERASURE_EVENTS` (10,000,000) events of one
//! tenant spread evenly over the last 30 days, one of every `BENCH_ERASURE_EVERY` (100) of them one actor's
//! (with metadata), loaded as the owner and taken by the aggregation (run as its function runs
//! it: the rollups and the distinct-actor sets the erasure re-keys); then that actor erased as `admin subject erase` runs it
//! ([`subject_erasures::erase`] with [`Pace::ADMIN`]: 20,000 rows a step, each a transaction of
//! its own, steps a fifth of the time) while
//! another tenant ingests through the real handler from one caller as fast as it can (batches
//! of 100). The same ingestion runs alone first, for `BENCH_ERASURE_BASELINE_SECONDS` (20).
//! Printed: the erasure's wall-clock time, steps and rows; the other tenant's rate beside it
//! against alone. Goals: under 5 minutes; the other tenant keeps at least 90 % of its rate.
//!
//! Before it, the subject's export (`admin::export::to_writer`, as `admin subject export`
//! writes to standard output, here into a sink): its time, size and the growth of the process's
//! resident memory while it runs (sampled every 5 ms), beside the same export of an ordinary
//! end user of the tenant (a fiftieth of the records): the memory an export holds does not grow
//! with what it writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin::export::{self, Asked};
use meterbridge::domain::Trust;
use meterbridge::repo::subject_erasures::{self, Pace, Request};
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::aggregate::env_usize;
use crate::ingest::build_apps;

const SUBJECT: &str = "bench-erasure-subject";
const BATCH: usize = 100;
const LOAD_CHUNK: usize = 1_000_000;

/// Loads `events` events of `tenant` over the last 30 days, every `every`-th the subject's.
async fn load(owner: &PgPool, tenant: uuid::Uuid, events: usize, every: usize) {
    let today = chrono::Utc::now().date_naive();
    meterbridge::testing::create_day_partitions(owner, today - chrono::Days::new(31), today).await;
    let mut done = 0;
    while done < events {
        let n = LOAD_CHUNK.min(events - done);
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at,
                                       actor_id, source_service, correlation_id, classification,
                                       payload_hash, operation_key, metadata)
             SELECT $1, 'erasure-' || i, 'api.requests', 1 + i % 7,
                    now() - make_interval(secs => i::int8 * (30 * 86400) / $6),
                    CASE WHEN i % $4 = 0 THEN $5 ELSE 'user-' || i % 5000 END, 'crm',
                    'c-' || i, 'BILLABLE', sha256(int4send(i)), gen_random_uuid(),
                    CASE WHEN i % $4 = 0 THEN jsonb_build_object('email', 'subject@example.com')
                         ELSE '{}' END
               FROM generate_series($2::int, $3::int) AS i",
        )
        .bind(tenant)
        .bind((done + 1) as i32)
        .bind((done + n) as i32)
        .bind(every as i32)
        .bind(SUBJECT)
        .bind(events as i64)
        .execute(owner)
        .await
        .unwrap();
        done += n;
    }
    sqlx::query("VACUUM ANALYZE usage_events")
        .execute(owner)
        .await
        .unwrap();
}

/// The aggregation as its function runs it (as meterbridge_ops), until it has taken every
/// stored event: the rollups and the distinct-actor sets the erasure re-keys. Its time.
async fn aggregate(owner: &PgPool) -> Duration {
    use meterbridge::aggregation::{AggregationConfig, Aggregator};
    use meterbridge::testing::{database_url_as, OPS_ROLE};
    let ops_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url_as(owner, OPS_ROLE))
        .await
        .unwrap();
    let ops = meterbridge::Database::from_pool(ops_pool);
    let started = Instant::now();
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        let report = Aggregator::new(&ops, None, AggregationConfig::default())
            .aggregate(chrono::Utc::now(), far)
            .await
            .unwrap();
        let newest: i64 = sqlx::query_scalar("SELECT coalesce(max(xact_id), 0) FROM usage_events")
            .fetch_one(owner)
            .await
            .unwrap();
        if report.outcome == "done" && report.collected.watermark > newest {
            return started.elapsed();
        }
    }
}

/// The rows that still carry the subject's id.
async fn rows_of_subject(owner: &PgPool, tenant: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1 AND actor_id = $2")
        .bind(tenant)
        .bind(SUBJECT)
        .fetch_one(owner)
        .await
        .unwrap()
}

/// Another tenant's ingestion, one caller as fast as it can until `stop`: events a second.
async fn ingest_until(app: Arc<ingest_usage::App>, key: String, stop: Arc<AtomicBool>) -> f64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/post-events.json"
    ))
    .unwrap();
    let started = Instant::now();
    let mut accepted = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = chrono::Utc::now().to_rfc3339();
        let events: Vec<Value> = (0..BATCH)
            .map(|_| {
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                json!({"eventId": format!("other-{n}"), "metric": "api.requests", "quantity": 1,
                       "occurredAt": now, "correlationId": format!("other-c{n}"),
                       "actorId": format!("user-{}", n % 100)})
            })
            .collect();
        let mut e: Value = serde_json::from_str(&template).unwrap();
        e["headers"]["authorization"] = json!(format!("Bearer {key}"));
        e["body"] = json!(json!({ "events": events }).to_string());
        let request = lambda_http::request::from_str(&e.to_string()).unwrap();
        let response = ingest_usage::handle(&app, request).await;
        assert_eq!(response.status(), 200, "the other tenant was refused");
        accepted += BATCH;
    }
    accepted as f64 / started.elapsed().as_secs_f64()
}

/// This process's resident memory, in kB (Linux).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One export of `actor` into a sink: (seconds, records, bytes, peak resident growth in kB).
async fn export_of(owner: &PgPool, slug: &str, actor: &str) -> (f64, u64, u64, u64) {
    let db = meterbridge::Database::from_pool(owner.clone());
    let before = rss_kb();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_kb());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            peak.max(rss_kb())
        })
    };
    let started = Instant::now();
    let asked = Asked {
        tenant: slug,
        actor_id: actor,
    };
    let manifest = export::to_writer(&db, &asked, tokio::io::sink())
        .await
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    (
        took,
        manifest.records,
        manifest.bytes,
        peak.saturating_sub(before),
    )
}

pub async fn run(owner: &PgPool, api_url: &str) {
    let events = env_usize("BENCH_ERASURE_EVENTS", 10_000_000);
    let every = env_usize("BENCH_ERASURE_EVERY", 100).max(1);
    let baseline = Duration::from_secs(env_usize("BENCH_ERASURE_BASELINE_SECONDS", 20) as u64);
    let tenant = create_tenant(owner, "erasure").await;
    let other = create_tenant(owner, "erasure-other").await;
    let other_key = create_api_key(owner, &other, "crm", Trust::Internal).await;
    meterbridge::testing::set_limits(
        owner,
        &other,
        None,
        &meterbridge::domain::rate_limit::Overrides {
            events: Some(meterbridge::domain::rate_limit::Rate::new(
                1_000_000, 2_000_000,
            )),
            requests: Some(meterbridge::domain::rate_limit::Rate::new(100_000, 200_000)),
            ..Default::default()
        },
    )
    .await;
    let loading = Instant::now();
    load(owner, tenant.id.0, events, every).await;
    let loaded_in = loading.elapsed();
    let aggregated_in = aggregate(owner).await;
    let subject_rows = rows_of_subject(owner, tenant.id.0).await;
    // The export: an ordinary end user first (the baseline), then the subject.
    let ordinary = export_of(owner, tenant.slug.as_str(), "user-1").await;
    let subject_export = export_of(owner, tenant.slug.as_str(), SUBJECT).await;
    let app = build_apps(api_url, 1).await.remove(0);

    // The other tenant alone.
    let stop = Arc::new(AtomicBool::new(false));
    let alone = tokio::spawn(ingest_until(
        Arc::clone(&app),
        other_key.key.clone(),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(baseline).await;
    stop.store(true, Ordering::Relaxed);
    let alone = alone.await.unwrap();

    // The erasure, with the other tenant ingesting beside it.
    let stop = Arc::new(AtomicBool::new(false));
    let beside = tokio::spawn(ingest_until(
        Arc::clone(&app),
        other_key.key.clone(),
        Arc::clone(&stop),
    ));
    let request = Request {
        tenant: tenant.id,
        request_id: "BENCH-1",
        actor_id: SUBJECT,
        reason: "benchmark",
        requested_by: "bench",
    };
    let started = Instant::now();
    let mut receipt = None;
    // As the admin function: 240 s an invocation, run again until finished.
    for _ in 0..20 {
        let deadline = Instant::now() + Duration::from_secs(240);
        let r = subject_erasures::erase(owner, &request, Pace::ADMIN, deadline)
            .await
            .unwrap();
        let finished = r.finished_at.is_some();
        receipt = Some(r);
        if finished {
            break;
        }
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let beside = beside.await.unwrap();
    let receipt = receipt.unwrap();
    let left = rows_of_subject(owner, tenant.id.0).await;

    println!();
    println!(
        "subject erasure — {events} events of one tenant over 30 days (loaded in {:.0} s), one in {every} the subject's ({subject_rows} rows, with metadata), taken by the aggregation (Aggregator as meterbridge_ops, {:.0} s: rollups and distinct-actor sets); subject_erasures::erase as admin subject erase runs it (Pace::ADMIN: 20,000 rows a step, steps a fifth of the time); another tenant ingesting through ingest_usage::handle, one caller, batches of {BATCH}, alone for {} s and then beside the erasure",
        loaded_in.as_secs_f64(),
        aggregated_in.as_secs_f64(),
        baseline.as_secs()
    );
    println!(
        "  erasure: {:.1} s, {} steps, {} events erased, {} actor-day and {} actor-period rows re-keyed; {} rows of the subject left",
        took.as_secs_f64(),
        receipt.steps,
        receipt.events_erased,
        receipt.actor_days,
        receipt.actor_periods,
        left
    );
    println!(
        "  other tenant: {alone:.0} events/s alone, {beside:.0} beside the erasure ({:.1} %)",
        beside / alone * 100.0
    );
    for (who, (took, records, bytes, grew)) in [
        ("an ordinary end user", ordinary),
        ("the subject", subject_export),
    ] {
        println!(
            "  export of {who}: {took:.1} s, {records} records, {:.1} MB ({:.1} MB/s), resident memory +{:.1} MB at its peak",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / took.max(1e-9),
            grew as f64 / 1e3
        );
    }
    let goal = |met: bool| if met { "met" } else { "NOT met" };
    println!("goals:");
    println!(
        "  erasure under 5 minutes: {:.1} s: {}",
        took.as_secs_f64(),
        goal(took < Duration::from_secs(300) && left == 0)
    );
    println!(
        "  the other tenant keeps >= 90 % of its rate: {:.1} %: {}",
        beside / alone * 100.0,
        goal(beside >= 0.9 * alone)
    );
    println!(
        "  an export's memory does not grow with its size: +{:.1} MB for {:.1} MB written, +{:.1} MB for {:.1} MB: {}",
        subject_export.3 as f64 / 1e3,
        subject_export.2 as f64 / 1e6,
        ordinary.3 as f64 / 1e3,
        ordinary.2 as f64 / 1e6,
        goal(subject_export.3 < 16_000 && subject_export.2 > 10 * ordinary.2)
    );
    // The bench's database only: the next workload starts from empty events.
    sqlx::query("TRUNCATE usage_events")
        .execute(owner)
        .await
        .unwrap();
}
