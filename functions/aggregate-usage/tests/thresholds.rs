//! Usage-limit thresholds that ingestion could not announce (Redis down, or a crash between the
//! commit and the count) are found in the rollups by the next aggregation run and announced
//! once; the month counters the limits are read from are repaired like the day counters.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::domain::TenantId;
use meterbridge::repo::usage_limits;
use meterbridge::repo::usage_settings::Change;
use meterbridge::testing::{
    create_api_key, create_tenant, database_url_as, now, redis_url, Bus, INGEST_ROLE,
};
use serde_json::{json, Value};
use sqlx::PgPool;

async fn set_limit(owner: &PgPool, tenant: uuid::Uuid, period: LimitPeriod, limit: u64) {
    let mut conn = owner.acquire().await.unwrap();
    let change = Change {
        tenant: TenantId(tenant),
        actor: "test",
        reason: "test",
    };
    let limit = UsageLimit::new("api.requests", period, limit, Some(vec![50, 80, 100])).unwrap();
    usage_limits::set(&mut conn, &change, &limit).await.unwrap();
}

async fn threshold_events(owner: &PgPool) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM outbox_events WHERE event_type = 'usage.threshold.crossed'
          ORDER BY aggregate_id, aggregate_sequence",
    )
    .fetch_all(owner)
    .await
    .unwrap()
}

async fn month_counter(tenant: uuid::Uuid) -> Option<i128> {
    let key = meterbridge::redis::keys::usage_month_counter(
        TenantId(tenant),
        now().date_naive(),
        "api.requests",
    );
    meterbridge::testing::read_counter(&redis_url(), &key).await
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_crossing_ingestion_missed_is_announced_by_the_next_run(owner: PgPool) {
    let t = create_tenant(&owner, "missed").await.id.0;
    let quiet = create_tenant(&owner, "quiet").await.id.0;
    set_limit(&owner, t, LimitPeriod::Monthly, 1000).await;
    set_limit(&owner, t, LimitPeriod::Daily, 100_000).await;
    // Stored, never counted in Redis (as when Redis was down): 850 of the month's 1,000.
    let ev = |tenant, quantity| Ev {
        tenant,
        metric: "api.requests",
        quantity,
        at: now(),
        actor: None,
    };
    insert(&owner, &[ev(t, 500), ev(t, 350), ev(quiet, 5000)]).await;
    let app = app(&owner, &[]).await;

    let r = run(&app, &owner, now()).await;
    assert_eq!(r.thresholds_crossed_late, 2, "{r:?}");
    let events = threshold_events(&owner).await;
    let seen: Vec<(i64, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            let d = &e["data"];
            (
                d["threshold"].as_i64().unwrap(),
                d["detectedBy"].as_str().unwrap(),
                d["usage"].as_str().unwrap(),
                e["sourceService"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (50, "aggregation", "850", "aggregate-usage"),
            (80, "aggregation", "850", "aggregate-usage")
        ]
    );
    assert!(events.iter().all(|e| e["tenantId"] == t.to_string()));
    // The month counter the limits are read from is repaired from PostgreSQL.
    assert_eq!(month_counter(t).await, Some(850));
    assert!(r.counters.as_ref().unwrap().repaired >= 2, "{r:?}");

    // A re-run announces nothing again; the relay publishes the two once.
    let r = run(&app, &owner, now()).await;
    assert_eq!(r.thresholds_crossed_late, 0, "{r:?}");
    let bus = Bus::create(true).await;
    bus.relay(&owner).await.run(later()).await.unwrap();
    let published = bus.drain().await;
    assert_eq!(published.len(), 2, "{published:#?}");
    assert!(published
        .iter()
        .all(|m| m["detail-type"] == "usage.threshold.crossed"));
    assert_eq!(threshold_events(&owner).await.len(), 2);
}

/// ingest-usage as the Lambda builds it, with its Redis out of reach (nothing listens on port 1).
async fn ingestion_without_redis(owner: &PgPool) -> ingest_usage::App {
    let vars: std::collections::HashMap<&str, String> = [
        ("DATABASE_URL", database_url_as(owner, INGEST_ROLE)),
        ("REDIS_URL", "redis://127.0.0.1:1".to_owned()),
    ]
    .into_iter()
    .collect();
    let env = meterbridge::config::Env::from_lookup(move |k| vars.get(k).cloned());
    let config = meterbridge::Config::from(&env, "ingest-usage").unwrap();
    let services = meterbridge::Services::build_with_aws(config, None)
        .await
        .unwrap()
        .with_clock(meterbridge::testing::clock());
    ingest_usage::App::new(services, ingest_usage::IngestConfig::from(&env).unwrap())
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_crossing_while_redis_is_down_is_sent_by_the_next_run(owner: PgPool) {
    let tenant = create_tenant(&owner, "redis-down").await;
    let key = create_api_key(&owner, &tenant, "crm", meterbridge::domain::Trust::Internal).await;
    set_limit(&owner, tenant.id.0, LimitPeriod::Daily, 100).await;
    meterbridge::testing::create_partitions_around_now(&owner).await;
    let ingest = ingestion_without_redis(&owner).await;
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/post-events.json"
    ))
    .unwrap();
    let mut request: Value = serde_json::from_str(&template).unwrap();
    request["headers"]["authorization"] = json!(format!("Bearer {}", key.key));
    request["body"] = json!(json!({"events": [{
        "eventId": "down-1", "metric": "api.requests", "quantity": 90,
        "occurredAt": now().to_rfc3339(), "correlationId": "down-1"}]})
    .to_string());
    let reply = meterbridge::testing::Reply::of(
        ingest_usage::handle(
            &ingest,
            meterbridge::testing::request_from_json(&request.to_string()),
        )
        .await,
    );
    assert_eq!(reply.status, 200, "stored without Redis: {:?}", reply.body);
    assert_eq!(reply.body["accepted"], 1);
    assert!(
        threshold_events(&owner).await.is_empty(),
        "no counters, no crossing seen"
    );

    let app = app(&owner, &[]).await;
    let r = run(&app, &owner, now()).await;
    assert_eq!(r.thresholds_crossed_late, 2, "{r:?}");
    let bus = Bus::create(true).await;
    bus.relay(&owner).await.run(later()).await.unwrap();
    let published = bus.drain().await;
    let mut seen: Vec<(i64, String)> = published
        .iter()
        .map(|m| {
            let d = &m["detail"]["data"];
            (
                d["threshold"].as_i64().unwrap(),
                d["detectedBy"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (50, "aggregation".to_owned()),
            (80, "aggregation".to_owned())
        ]
    );
}
