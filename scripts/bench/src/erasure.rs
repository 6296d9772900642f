//! Subject erasure (`BENCH_WORKLOADS=erasure`): `BENCH_ERASURE_EVENTS` (10,000,000) events of one
//! tenant spread evenly over the last 30 days, one of every `BENCH_ERASURE_EVERY` (100) of them one actor's
//! (with metadata), loaded as the owner and taken by the aggregation (its watermark moved past
//! them, as days after their arrival); then that actor erased as `admin subject erase` runs it
//! ([`subject_erasures::erase`] with [`Pace::ADMIN`]: 20,000 rows a step, each a transaction of
//! its own, steps a fifth of the time) while
//! another tenant ingests through the real handler from one caller as fast as it can (batches
//! of 100). The same ingestion runs alone first, for `BENCH_ERASURE_BASELINE_SECONDS` (20).
//! Printed: the erasure's wall-clock time, steps and rows; the other tenant's rate beside it
//! against alone. Goals: under 5 minutes; the other tenant keeps at least 90 % of its rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    meterbridge::testing::mark_aggregated(owner).await;
    sqlx::query("VACUUM ANALYZE usage_events")
        .execute(owner)
        .await
        .unwrap();
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
    let subject_rows = rows_of_subject(owner, tenant.id.0).await;
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
        "subject erasure — {events} events of one tenant over 30 days (loaded in {:.0} s), one in {every} the subject's ({subject_rows} rows, with metadata), taken by the aggregation; subject_erasures::erase as admin subject erase runs it (Pace::ADMIN: 20,000 rows a step, steps a fifth of the time); another tenant ingesting through ingest_usage::handle, one caller, batches of {BATCH}, alone for {} s and then beside the erasure",
        loaded_in.as_secs_f64(),
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
    // The bench's database only: the next workload starts from empty events.
    sqlx::query("TRUNCATE usage_events")
        .execute(owner)
        .await
        .unwrap();
}
