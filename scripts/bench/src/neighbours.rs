//! Noisy neighbours (`BENCH_WORKLOADS=neighbours`): tenant B sends steady traffic (batches of
//! 100 at `BENCH_NEIGHBOURS_B_BATCHES` a second, 20 by default) for `BENCH_NEIGHBOURS_SECONDS`
//! (15), alone and then while tenant A floods from 4 callers with no pause, far over its event
//! budget (its key overridden to 5,000 events a second, burst 10,000). Printed: B's throughput
//! and p50/p99 latency alone, beside A sending at exactly its limit (A's legitimate load) and
//! while A floods, A's accepted rate against its limit, and the limiter's own cost — one caller
//! ingesting as fast as it can with limits on against limits off, alternating, in the same run. Every request goes through `ingest_usage::handle` with Redis, each caller its own
//! App (container).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_usage::App;
use meterbridge::domain::rate_limit::{Overrides, Rate};
use meterbridge::domain::{Tenant, Trust};
use meterbridge::repo::rate_limits::{self, Change};
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::{json, Value};
use sqlx::postgres::PgPool;

use crate::aggregate::env_usize;
use crate::ingest::build_apps_with;

const A_LIMIT: u32 = 5_000;
const BATCH: usize = 100;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A request of `BATCH` fresh events for `key`.
fn request(template: &str, key: &str) -> lambda_http::Request {
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = (0..BATCH)
        .map(|_| {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            json!({"eventId": format!("nb-{n}"), "metric": "api.requests", "quantity": 1,
                   "occurredAt": now, "correlationId": format!("nb-op-{n}"),
                   "actorId": format!("user-{}", n % 100)})
        })
        .collect();
    let mut e: Value = serde_json::from_str(template).unwrap();
    e["headers"]["authorization"] = json!(format!("Bearer {key}"));
    e["body"] = json!(json!({ "events": events }).to_string());
    lambda_http::request::from_str(&e.to_string()).unwrap()
}

fn template() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/post-events.json"
    ))
    .unwrap()
}

struct Steady {
    events_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Steady traffic for `seconds`: one request every 1/`per_sec` s, each awaited; every one must
/// pass (tenant B).
async fn steady(app: &App, key: &str, per_sec: usize, seconds: u64) -> Steady {
    paced(app, key, per_sec as f64, seconds, true).await
}

async fn paced(app: &App, key: &str, per_sec: f64, seconds: u64, must_pass: bool) -> Steady {
    let template = template();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut accepted = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let request = request(&template, key);
        let sent = Instant::now();
        let response = ingest_usage::handle(app, request).await;
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        if response.status() == 200 {
            accepted += BATCH;
        } else {
            assert!(!must_pass, "tenant B was refused: {}", response.status());
        }
    }
    latencies.sort_by(f64::total_cmp);
    Steady {
        events_per_sec: accepted as f64 / started.elapsed().as_secs_f64(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

/// As fast as one caller can, for `seconds`: events a second.
async fn flat_out(app: &App, key: &str, seconds: u64) -> f64 {
    let template = template();
    let started = Instant::now();
    let mut accepted = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        let response = ingest_usage::handle(app, request(&template, key)).await;
        assert_eq!(response.status(), 200);
        accepted += BATCH;
    }
    accepted as f64 / started.elapsed().as_secs_f64()
}

async fn limit_key(owner: &PgPool, tenant: &Tenant, prefix: &str, events: Rate) {
    let key_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_one(owner)
        .await
        .unwrap();
    let mut tx = owner.begin().await.unwrap();
    let change = Change {
        tenant: tenant.id,
        key: Some(key_id),
        actor: "bench",
        reason: "neighbours workload",
    };
    let overrides = Overrides {
        events: Some(events),
        requests: Some(Rate::new(100_000, 200_000)),
        ..Overrides::default()
    };
    rate_limits::set(&mut tx, &change, &overrides)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

pub async fn run(owner: &PgPool, api_url: &str) {
    let seconds = env_usize("BENCH_NEIGHBOURS_SECONDS", 15) as u64;
    let b_rate = env_usize("BENCH_NEIGHBOURS_B_BATCHES", 20).max(1);
    let a = create_tenant(owner, "flood").await;
    let a_key = create_api_key(owner, &a, "crm", Trust::Internal).await;
    limit_key(owner, &a, &a_key.prefix, Rate::new(A_LIMIT, 2 * A_LIMIT)).await;
    let b = create_tenant(owner, "steady").await;
    let b_key = create_api_key(owner, &b, "crm", Trust::Internal).await;
    let c = create_tenant(owner, "solo").await;
    let c_key = create_api_key(owner, &c, "crm", Trust::Internal).await;
    limit_key(owner, &c, &c_key.prefix, Rate::new(1_000_000, 10_000_000)).await;
    let b_app = build_apps_with(api_url, 1, true).await.remove(0);
    let a_apps = build_apps_with(api_url, 4, true).await;
    let template = template();
    // Warm every container (key cache, catalog, connections).
    for (app, key) in a_apps
        .iter()
        .map(|a| (a, &a_key.key))
        .chain(std::iter::once((&b_app, &b_key.key)))
    {
        let _ = ingest_usage::handle(app, request(&template, key)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // A's warm-up batches refill

    let alone = steady(&b_app, &b_key.key, b_rate, seconds).await;

    // A at its limit, paced (its legitimate load): what B sees from a neighbour within budget.
    let mut pacers = Vec::new();
    for app in &a_apps {
        let (app, key) = (Arc::clone(app), a_key.key.clone());
        let per_caller = f64::from(A_LIMIT) / BATCH as f64 / a_apps.len() as f64;
        pacers.push(tokio::spawn(async move {
            paced(&app, &key, per_caller, seconds, false).await
        }));
    }
    let beside = steady(&b_app, &b_key.key, b_rate, seconds).await;
    for p in pacers {
        p.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // A's budget refills

    let stop = Arc::new(AtomicBool::new(false));
    let a_accepted = Arc::new(AtomicU64::new(0));
    let a_refused = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    for app in &a_apps {
        let (app, key, template) = (Arc::clone(app), a_key.key.clone(), template.clone());
        let (stop, accepted, refused) = (
            Arc::clone(&stop),
            Arc::clone(&a_accepted),
            Arc::clone(&a_refused),
        );
        flooders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = ingest_usage::handle(&app, request(&template, &key)).await;
                match response.status().as_u16() {
                    200 => accepted.fetch_add(BATCH as u64, Ordering::Relaxed),
                    429 => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("tenant A got {other}"),
                };
            }
        }));
    }
    let flood_started = Instant::now();
    let flooded = steady(&b_app, &b_key.key, b_rate, seconds).await;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    // A's burst (2 s of its rate) passes at once; the rest is its rate.
    let a_rate = (a_accepted.load(Ordering::Relaxed) as f64 - f64::from(2 * A_LIMIT)) / flood_secs;

    let on = flat_out(
        &build_apps_with(api_url, 1, true).await[0],
        &c_key.key,
        seconds,
    )
    .await;
    let off = flat_out(
        &build_apps_with(api_url, 1, false).await[0],
        &c_key.key,
        seconds,
    )
    .await;

    println!();
    println!("noisy neighbours — {seconds} s a phase; tenant B: batches of {BATCH} at {b_rate}/s, one caller; tenant A: 4 callers, no pause, key limit {A_LIMIT} events/s (burst {}); ingest_usage::handle with Redis, each caller its own App", 2 * A_LIMIT);
    println!(
        "  {:<34} {:>12} {:>10} {:>10}",
        "tenant B", "events/s", "p50 ms", "p99 ms"
    );
    println!(
        "  {:<34} {:>12.0} {:>10.2} {:>10.2}",
        "alone", alone.events_per_sec, alone.p50_ms, alone.p99_ms
    );
    println!(
        "  {:<34} {:>12.0} {:>10.2} {:>10.2}",
        "beside A at its limit (paced)", beside.events_per_sec, beside.p50_ms, beside.p99_ms
    );
    println!(
        "  {:<34} {:>12.0} {:>10.2} {:>10.2}",
        "while A floods", flooded.events_per_sec, flooded.p50_ms, flooded.p99_ms
    );
    println!(
        "  tenant A: {:.0} events/s accepted past its burst (limit {A_LIMIT}: {:+.1} %), {} requests refused (429)",
        a_rate,
        (a_rate / f64::from(A_LIMIT) - 1.0) * 100.0,
        a_refused.load(Ordering::Relaxed)
    );
    println!("  limiter's cost, one caller flat out: {on:.0} events/s with limits, {off:.0} without ({:.1} %)", on / off * 100.0);
    let goal = |met: bool| if met { "met" } else { "NOT met" };
    println!("goals:");
    println!(
        "  B's p99 while A floods <= 1.5x alone: {:.2}x: {}",
        flooded.p99_ms / alone.p99_ms,
        goal(flooded.p99_ms <= 1.5 * alone.p99_ms)
    );
    println!(
        "  (B's p99 while A floods against beside A at its limit: {:.2}x: the cost of A's excess alone)",
        flooded.p99_ms / beside.p99_ms
    );
    println!(
        "  B's throughput >= 95 % of alone: {:.1} %: {}",
        flooded.events_per_sec / alone.events_per_sec * 100.0,
        goal(flooded.events_per_sec >= 0.95 * alone.events_per_sec)
    );
    println!(
        "  A within 5 % of its limit: {:+.1} %: {}",
        (a_rate / f64::from(A_LIMIT) - 1.0) * 100.0,
        goal((a_rate / f64::from(A_LIMIT) - 1.0).abs() <= 0.05)
    );
    println!(
        "  limits on >= 95 % of limits off: {:.1} %: {}",
        on / off * 100.0,
        goal(on >= 0.95 * off)
    );
}
