//! Per-key and per-tenant limits through the real handler, with Redis, on a frozen clock: a
//! burst over a key's budget gets exactly its burst through and 429 problem+json with
//! `Retry-After` and the `RateLimit` headers for the rest, nothing stored; other keys and
//! tenants are untouched; a batch costs its events; a change made through the admin path bites
//! once the key cache expires; an external key starts far lower than an internal one.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{send, Fixture};
use meterbridge::clock::FrozenClock;
use meterbridge::domain::rate_limit::{Overrides, Rate, EXTERNAL_KEY_REQUESTS};
use meterbridge::domain::Trust;
use meterbridge::testing::{api_key_id, create_api_key, create_tenant, set_limits};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

async fn override_limits(fx: &Fixture, key: Option<Uuid>, overrides: Overrides) {
    set_limits(&fx.owner, &fx.tenant, key, &overrides).await;
}

async fn key_id(fx: &Fixture, prefix: &str) -> Uuid {
    api_key_id(&fx.owner, prefix).await
}

fn batch(fx: &Fixture, from: usize, n: usize) -> Value {
    json!({"events": (from..from + n).map(|i| fx.event(i, "api.requests", 1)).collect::<Vec<_>>()})
}

/// A batch an external key may send (a non-billable metric).
fn partner_batch(fx: &Fixture, from: usize, n: usize) -> Value {
    json!({"events": (from..from + n)
        .map(|i| fx.event(i, "integrations.webhooks.received", 1))
        .collect::<Vec<_>>()})
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_burst_over_a_keys_limit_gets_exactly_its_burst_through(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let internal = key_id(&fx, &fx.internal.prefix).await;
    override_limits(
        &fx,
        Some(internal),
        Overrides {
            requests: Some(Rate::new(5, 10)),
            ..Overrides::default()
        },
    )
    .await;
    override_limits(
        &fx,
        None,
        Overrides {
            max_in_flight: Some(100),
            ..Overrides::default()
        },
    )
    .await;
    let clock = FrozenClock::at(meterbridge::testing::now());
    let app = Arc::new(fx.app_by(clock.clone()).await);
    let mut requests = Vec::new();
    for n in 0..50 {
        let request = fx.post(&fx.internal.key, &batch(&fx, n, 1));
        let app = Arc::clone(&app);
        requests.push(tokio::spawn(async move { send(&app, request).await }));
    }
    let mut passed = 0;
    for reply in futures::future::join_all(requests).await {
        let reply = reply.unwrap();
        assert!(
            reply.headers.contains_key("ratelimit-policy"),
            "{} {}",
            reply.status,
            reply.body
        );
        assert!(
            reply.headers.contains_key("ratelimit"),
            "{} {}",
            reply.status,
            reply.body
        );
        match reply.status.as_u16() {
            200 => passed += 1,
            429 => {
                assert_eq!(reply.headers["content-type"], "application/problem+json");
                assert_eq!(reply.headers["retry-after"], "1");
                assert_eq!(reply.body["code"], "rate_limited");
                assert_eq!(reply.body["status"], 429);
                assert_eq!(
                    reply.body["type"],
                    "https://meterbridge.dev/problems/rate_limited"
                );
                let detail = reply.body["detail"].as_str().unwrap();
                assert!(
                    detail.contains("this API key's request budget (5/s (burst 10))"),
                    "{detail}"
                );
                assert!(reply.headers["ratelimit"]
                    .to_str()
                    .unwrap()
                    .contains("\"key-requests\";r=0;"));
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    assert_eq!(passed, 10, "the burst, and nothing more");
    assert_eq!(
        fx.stored_events().await,
        10,
        "a refused batch stores nothing"
    );
    assert_eq!(
        fx.counter("api.requests").await,
        Some(10),
        "nor counts anything"
    );
    // The tenant's external key has budgets of its own.
    let other = send(&app, fx.post(&fx.external.key, &partner_batch(&fx, 100, 1))).await;
    assert_eq!(other.status, 200, "{}", other.body);
    // Honouring Retry-After passes.
    clock.advance_wall(Duration::from_secs(1));
    let after = send(&app, fx.post(&fx.internal.key, &batch(&fx, 200, 1))).await;
    assert_eq!(after.status, 200, "{}", after.body);
    // Another tenant is untouched, whatever this one does.
    let stranger = create_tenant(&owner, "stranger").await;
    let stranger_key = create_api_key(&owner, &stranger, "crm", Trust::Internal).await;
    for n in 0..3 {
        let reply = send(&app, fx.post(&stranger_key.key, &batch(&fx, 300 + n, 1))).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_batch_over_the_event_budget_is_refused_whole(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let internal = key_id(&fx, &fx.internal.prefix).await;
    override_limits(
        &fx,
        Some(internal),
        Overrides {
            events: Some(Rate::new(100, 1_000)),
            ..Overrides::default()
        },
    )
    .await;
    let clock = FrozenClock::at(meterbridge::testing::now());
    let app = fx.app_by(clock.clone()).await;
    let within = send(&app, fx.post(&fx.internal.key, &batch(&fx, 0, 600))).await;
    assert_eq!(within.status, 200, "{}", within.body);
    let over = send(&app, fx.post(&fx.internal.key, &batch(&fx, 1_000, 600))).await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert!(over.body["detail"]
        .as_str()
        .unwrap()
        .contains("event budget"));
    // 200 events of budget are missing: 2 s at 100 a second.
    assert_eq!(over.headers["retry-after"], "2");
    assert_eq!(fx.stored_events().await, 600, "none of the refused batch");
    let small = send(&app, fx.post(&fx.internal.key, &batch(&fx, 2_000, 400))).await;
    assert_eq!(small.status, 200, "what is left of the budget passes");
    clock.advance_wall(Duration::from_secs(6));
    let later = send(&app, fx.post(&fx.internal.key, &batch(&fx, 1_000, 600))).await;
    assert_eq!(later.status, 200, "{}", later.body);
    assert_eq!(fx.stored_events().await, 1_600);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_change_bites_once_the_key_cache_expires_and_a_revoked_key_stays_out(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let clock = FrozenClock::at(meterbridge::testing::now());
    let app = fx.app_by(clock.clone()).await;
    let first = send(&app, fx.post(&fx.internal.key, &batch(&fx, 0, 1))).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.headers["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains("\"key-requests\";q=200;w=2"));
    let internal = key_id(&fx, &fx.internal.prefix).await;
    override_limits(
        &fx,
        Some(internal),
        Overrides {
            requests: Some(Rate::new(1, 1)),
            ..Overrides::default()
        },
    )
    .await;
    // The cached verdict still carries the old limits…
    let cached = send(&app, fx.post(&fx.internal.key, &batch(&fx, 1, 1))).await;
    assert_eq!(cached.status, 200);
    // …until the key cache (30 s by default, 60 s at most) expires.
    clock.advance_wall(Duration::from_secs(61));
    let fresh = send(&app, fx.post(&fx.internal.key, &batch(&fx, 2, 1))).await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert!(fresh.headers["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains("\"key-requests\";q=1;w=1"));
    let limited = send(&app, fx.post(&fx.internal.key, &batch(&fx, 3, 1))).await;
    assert_eq!(limited.status, 429, "{}", limited.body);
    // A revoked key is refused before any budget is looked at.
    let revoked = send(&app, fx.post(&fx.revoked.key, &batch(&fx, 4, 1))).await;
    assert_eq!(revoked.status, 401);
    assert!(!revoked.headers.contains_key("ratelimit"));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_external_key_gets_a_tenth_of_an_internal_keys_budget(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let clock = FrozenClock::at(meterbridge::testing::now());
    let app = fx.app_by(clock).await;
    let burst = EXTERNAL_KEY_REQUESTS.burst as usize;
    for n in 0..burst {
        let reply = send(&app, fx.post(&fx.external.key, &partner_batch(&fx, n, 1))).await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.body);
    }
    let over = send(
        &app,
        fx.post(&fx.external.key, &partner_batch(&fx, burst, 1)),
    )
    .await;
    assert_eq!(over.status, 429, "{}", over.body);
    let internal = send(&app, fx.post(&fx.internal.key, &batch(&fx, 0, 1))).await;
    assert_eq!(internal.status, 200, "{}", internal.body);
}
