//! Usage limits through the real handler, PostgreSQL and Redis: thresholds crossed by
//! concurrent batches are announced once each (and published through moto's EventBridge to
//! SQS), a void never re-fires one, limits are read per tenant — from Redis, or from PostgreSQL
//! when Redis is out of reach — and never refuse usage.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{app_with, send, Fixture};
use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::domain::{Scope, Scopes, Trust};
use meterbridge::repo::usage_limits;
use meterbridge::repo::usage_settings::Change;
use meterbridge::testing::{create_api_key, create_scoped_api_key, create_tenant, Bus};
use serde_json::{json, Value};
use sqlx::PgPool;

async fn set_limit(fx: &Fixture, period: LimitPeriod, limit: u64, thresholds: &[u16]) {
    let mut conn = fx.owner.acquire().await.unwrap();
    let change = Change {
        tenant: fx.tenant.id,
        actor: "test",
        reason: "test",
    };
    let limit = UsageLimit::new("api.requests", period, limit, Some(thresholds.to_vec())).unwrap();
    usage_limits::set(&mut conn, &change, &limit).await.unwrap();
}

/// The threshold events in the outbox: (threshold, detected by, usage), by threshold.
async fn crossings(owner: &PgPool) -> Vec<(i64, String, String)> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT payload FROM outbox_events WHERE event_type = 'usage.threshold.crossed'
          ORDER BY aggregate_sequence",
    )
    .fetch_all(owner)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(p,)| {
            let d = &p["data"];
            (
                d["threshold"].as_i64().unwrap(),
                d["detectedBy"].as_str().unwrap().to_owned(),
                d["usage"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn concurrent_batches_crossing_thresholds_announce_each_once(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    fx.allow_in_flight(40).await;
    set_limit(&fx, LimitPeriod::Monthly, 1000, &[50, 80, 100]).await;
    let app = Arc::new(fx.app(&[]).await);

    // 790 of 1,000: the 50 % threshold.
    let r = fx
        .submit(&app, json!({"events": [fx.event(0, "api.requests", 790)]}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = crossings(&owner).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].0, seen[0].1.as_str()), (50, "ingestion"));

    // Twenty batches of 11 at once: 1,010 in all, crossing 80 % and 100 % in the same instant.
    let mut sends = Vec::new();
    for n in 1..=20 {
        let request = fx.post(
            &fx.internal.key,
            &json!({"events": [fx.event(n, "api.requests", 11)]}),
        );
        let app = Arc::clone(&app);
        sends.push(tokio::spawn(async move { send(&app, request).await }));
    }
    for reply in futures::future::join_all(sends).await {
        let reply = reply.unwrap();
        assert_eq!(
            reply.status, 200,
            "limits never refuse usage: {:?}",
            reply.body
        );
    }
    let seen = crossings(&owner).await;
    let thresholds: Vec<i64> = seen.iter().map(|c| c.0).collect();
    assert_eq!(
        thresholds,
        [50, 80, 100],
        "one event per threshold: {seen:?}"
    );
    assert!(seen.iter().all(|c| c.1 == "ingestion"));

    // Published through EventBridge: exactly those three, in threshold order.
    let bus = Bus::create(true).await;
    bus.relay(&owner).await.run(common_later()).await.unwrap();
    let published = bus.drain().await;
    assert_eq!(published.len(), 3, "{published:#?}");
    for message in &published {
        assert_eq!(message["source"], "meterbridge.usage");
        assert_eq!(message["detail-type"], "usage.threshold.crossed");
        let data = &message["detail"]["data"];
        assert_eq!(data["limit"], "1000");
        assert_eq!(data["periodType"], "monthly");
        assert_eq!(data["metric"], "api.requests");
        let q = data["threshold"].as_i64().unwrap() * 10;
        assert_eq!(data["thresholdQuantity"], q.to_string());
    }

    // The read API: over the limit, nothing refused, from Redis.
    let r = send(
        &app,
        fx.get(&fx.internal.key, "/v1/usage/limits/api.requests", &[]),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let status = &r.body["limits"][0];
    assert_eq!(status["usage"], "1010");
    assert_eq!(status["remaining"], "0");
    assert_eq!(status["percent"], 101.0);
    assert_eq!(status["reached"], json!([50, 80, 100]));
    assert_eq!(status["source"], "redis");

    // A void back under 100 %, then usage over it again: no threshold fires a second time
    // within the period.
    let voider = create_scoped_api_key(
        &owner,
        &fx.tenant,
        "crm",
        Trust::Internal,
        Scopes::of(&[Scope::UsageWrite, Scope::UsageVoid]),
    )
    .await;
    let first_small = format!("{}-e1", fx.run);
    let r = send(
        &app,
        fx.void(&voider.key, &first_small, &json!({"reason": "sent twice"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = fx
        .submit(&app, json!({"events": [fx.event(99, "api.requests", 20)]}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(crossings(&owner).await.len(), 3);
}

fn common_later() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(60)
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn limits_are_read_per_tenant_and_never_by_a_partner_key(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let get = |key: &str, path: &str| fx.get(key, path, &[]);

    // No limits yet: an empty list.
    let r = send(&app, get(&fx.internal.key, "/v1/usage/limits")).await;
    assert_eq!((r.status.as_u16(), &r.body), (200, &json!({"limits": []})));

    set_limit(&fx, LimitPeriod::Daily, 500, &[100]).await;
    set_limit(&fx, LimitPeriod::Monthly, 10_000, &[80, 100]).await;
    let app = fx.app(&[]).await; // a fresh container: the limits are read again
    let r = fx
        .submit(&app, json!({"events": [fx.event(0, "api.requests", 120)]}))
        .await;
    assert_eq!(r.status, 200);
    let r = send(&app, get(&fx.internal.key, "/v1/usage/limits")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let limits = r.body["limits"].as_array().unwrap();
    assert_eq!(limits.len(), 2, "{limits:?}");
    let daily = &limits[0];
    assert_eq!(
        (
            &daily["period"],
            &daily["limit"],
            &daily["usage"],
            &daily["remaining"]
        ),
        (&json!("daily"), &json!("500"), &json!("120"), &json!("380"))
    );
    assert_eq!(daily["percent"], 24.0);
    let tomorrow = fx.now.date_naive().succ_opt().unwrap();
    assert_eq!(daily["resetsAt"], format!("{tomorrow}T00:00:00Z"));
    assert_eq!(limits[1]["usage"], "120");

    // Another tenant sees none of them: its list is empty, the metric's limits are 404.
    let other = create_tenant(&owner, "other").await;
    let other_key = create_api_key(&owner, &other, "crm", Trust::Internal).await;
    let r = send(&app, get(&other_key.key, "/v1/usage/limits")).await;
    assert_eq!((r.status.as_u16(), &r.body), (200, &json!({"limits": []})));
    let r = send(&app, get(&other_key.key, "/v1/usage/limits/api.requests")).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");

    // A partner's (external) key may not read usage at all; no key, no answer.
    let r = send(&app, get(&fx.external.key, "/v1/usage/limits")).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = send(&app, get("", "/v1/usage/limits")).await;
    assert_eq!(r.status, 401, "{:?}", r.body);

    // Malformed and extreme metrics: 400, never a 5xx.
    let long = "x".repeat(5000);
    for path in [
        "/v1/usage/limits/no.such.metric".to_owned(),
        format!("/v1/usage/limits/{long}"),
        "/v1/usage/limits/%ff%fe".to_owned(),
        "/v1/usage/limits/api.requests%00".to_owned(),
        "/v1/usage/limits/%27%3B%20DROP%20TABLE%20usage_limits%3B--".to_owned(),
    ] {
        let r = send(&app, get(&fx.internal.key, &path)).await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert_eq!(r.body["status"], 400);
    }
    let r = send(
        &app,
        get(&fx.internal.key, "/v1/usage/limits/leads.processed"),
    )
    .await;
    assert_eq!(
        r.status, 404,
        "a metric of the catalog without a limit: {:?}",
        r.body
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn with_redis_out_of_reach_limits_are_read_from_postgresql(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    set_limit(&fx, LimitPeriod::Monthly, 1000, &[50, 100]).await;
    // Nothing listens on port 1: every Redis call fails at once.
    let app = app_with(&owner, &[("REDIS_URL", "redis://127.0.0.1:1")]).await;
    let r = fx
        .submit(&app, json!({"events": [fx.event(0, "api.requests", 600)]}))
        .await;
    assert_eq!(r.status, 200, "usage is stored without Redis: {:?}", r.body);
    // Not aggregated yet: the usage is the events committed since the watermark.
    let r = send(
        &app,
        fx.get(&fx.internal.key, "/v1/usage/limits/api.requests", &[]),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let status = &r.body["limits"][0];
    assert_eq!(status["source"], "postgres");
    assert_eq!(status["usage"], "600");
    assert_eq!(status["reached"], json!([50]));
    // Ingestion could not see the crossing without its counters: the aggregation will.
    assert!(crossings(&owner).await.is_empty());
}
