//! POST /v1/usage/events against real PostgreSQL and Redis: outcomes, dedup under concurrency,
//! tenant isolation, faults and hostile input.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use std::sync::Arc;

use common::{app_with, send, statuses, Fixture};
use meterbridge::repo::api_keys;
use meterbridge::testing::{create_api_key, create_tenant, pool_as, INGEST_ROLE};
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn duplicates_and_conflicts_are_told_apart(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let key = &fx.internal.key;
    let first = fx.event(1, "api.requests", 2);

    let r = send(&app, fx.post(key, &json!({"events": [first.clone()]}))).await;
    assert_eq!(statuses(&r.body), ["accepted"]);

    // Same key, same payload (even with keys reordered and an explicit default key) → duplicate.
    let mut resend = first.clone();
    resend["idempotencyKey"] = first["eventId"].clone();
    let r = send(&app, fx.post(key, &json!({"events": [resend]}))).await;
    assert_eq!(statuses(&r.body), ["duplicate"]);

    // Same event id, different payload → conflict, never silently accepted.
    let mut changed = first.clone();
    changed["quantity"] = json!(5);
    let r = send(&app, fx.post(key, &json!({"events": [changed]}))).await;
    assert_eq!(statuses(&r.body), ["conflict"]);
    assert_eq!(r.body["results"][0]["code"], "event_id_conflict");

    // A new event id reusing a stored idempotency key → conflict.
    let mut keyed = fx.event(2, "api.requests", 2);
    keyed["idempotencyKey"] = json!(format!("{}-key", fx.run));
    let r = send(&app, fx.post(key, &json!({"events": [keyed.clone()]}))).await;
    assert_eq!(statuses(&r.body), ["accepted"]);
    let mut reused = fx.event(5, "api.requests", 2);
    reused["idempotencyKey"] = keyed["idempotencyKey"].clone();
    let r = send(&app, fx.post(key, &json!({"events": [reused]}))).await;
    assert_eq!(r.body["results"][0]["code"], "idempotency_key_conflict");

    // Same correlation, metric and instant as a stored event → conflict.
    let mut same_operation = fx.event(3, "api.requests", 2);
    same_operation["correlationId"] = first["correlationId"].clone();
    same_operation["occurredAt"] = first["occurredAt"].clone();
    let r = send(&app, fx.post(key, &json!({"events": [same_operation]}))).await;
    assert_eq!(r.body["results"][0]["code"], "correlation_conflict");

    // Inside one batch: a repeat is a duplicate, a clash a conflict; neither is stored twice.
    let a = fx.event(4, "leads.routed", 1);
    let mut clash = a.clone();
    clash["quantity"] = json!(9);
    let r = send(
        &app,
        fx.post(key, &json!({"events": [a.clone(), a, clash]})),
    )
    .await;
    assert_eq!(statuses(&r.body), ["accepted", "duplicate", "conflict"]);
    assert_eq!(r.body["results"][2]["code"], "batch_conflict");

    assert_eq!(fx.stored_events().await, 3);
    assert_eq!(fx.counter("api.requests").await, Some(4));
    assert_eq!(fx.counter("leads.routed").await, Some(1));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn twenty_concurrent_submissions_store_and_count_each_event_once(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let batch: Vec<Value> = (0..50)
        .map(|n| fx.event(n, "scoring.requests", 3))
        .collect();
    let body = json!({"events": batch});
    fx.allow_in_flight(20).await;
    // Twenty containers, each with its own pool, submitting the same batch at once.
    let mut apps = Vec::new();
    for _ in 0..20 {
        apps.push(Arc::new(fx.app(&[("DB_MAX_CONNECTIONS", "1")]).await));
    }
    let requests = apps.iter().map(|app| {
        let app = Arc::clone(app);
        let request = fx.post(&fx.internal.key, &body);
        tokio::spawn(async move { send(&app, request).await })
    });
    let replies = futures::future::join_all(requests).await;
    let mut accepted = 0;
    for reply in replies {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["conflicts"], 0);
        accepted += reply.body["accepted"].as_u64().unwrap();
    }
    assert_eq!(
        accepted, 50,
        "each event accepted by exactly one submission"
    );
    assert_eq!(fx.stored_events().await, 50);
    assert_eq!(fx.counter("scoring.requests").await, Some(150));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn tenants_never_see_or_touch_each_other(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let globex = create_tenant(&owner, "globex").await;
    let globex_key =
        create_api_key(&owner, &globex, "crm", meterbridge::domain::Trust::Internal).await;

    let event = fx.event(1, "api.requests", 7);
    let r = fx.submit(&app, json!({"events": [event.clone()]})).await;
    assert_eq!(statuses(&r.body), ["accepted"]);
    // The same event id is a different event in another tenant.
    let r = send(&app, fx.post(&globex_key.key, &json!({"events": [event]}))).await;
    assert_eq!(statuses(&r.body), ["accepted"]);
    let r = send(
        &app,
        fx.post(
            &globex_key.key,
            &json!({"events": [fx.event(2, "api.requests", 1)]}),
        ),
    )
    .await;
    assert_eq!(statuses(&r.body), ["accepted"]);

    // By API: each tenant lists and counts only its own.
    let r = send(&app, fx.get(&globex_key.key, "/v1/usage/events", &[])).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
    let r = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &[])).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    let r = send(&app, fx.get(&globex_key.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.body["counters"]["api.requests"], 8);
    let r = send(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.body["counters"]["api.requests"], 7);

    // Under RLS: the API role acting for globex reads none of acme's rows and cannot write them.
    let db = Database::from_pool(pool_as(&owner, INGEST_ROLE).await);
    let mut tx = db.tenant_tx(globex.id).await.unwrap();
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
        .bind(fx.tenant.id)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 0);
    let forged = sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, source_service,
                                   correlation_id, classification, idempotency_key, payload_hash)
         VALUES ($1, 'forged', 'api.requests', 1, $2, 'crm', 'c', 'BILLABLE', 'forged', decode(repeat('00', 32), 'hex'))",
    )
    .bind(fx.tenant.id)
    .bind(meterbridge::testing::now())
    .execute(&mut *tx)
    .await;
    assert!(forged.is_err(), "RLS must refuse a row for another tenant");
    drop(tx);
    let mut tx = db.begin().await.unwrap();
    let unscoped: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(unscoped, 0, "no tenant set: nothing visible");
    let unscoped_insert = sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, source_service,
                                   correlation_id, classification, idempotency_key, payload_hash)
         VALUES ($1, 'forged', 'api.requests', 1, $2, 'crm', 'c', 'BILLABLE', 'forged', decode(repeat('00', 32), 'hex'))",
    )
    .bind(fx.tenant.id)
    .bind(meterbridge::testing::now())
    .execute(&mut *tx)
    .await;
    assert!(
        unscoped_insert.is_err(),
        "no tenant set: nothing can be written"
    );
    drop(tx);
    let mut tx = db.tenant_tx(fx.tenant.id).await.unwrap();
    let updated = sqlx::query("UPDATE usage_events SET quantity = 999")
        .execute(&mut *tx)
        .await;
    assert!(
        updated.is_err(),
        "events are immutable for the API role, even its own"
    );
    drop(tx);
    assert_eq!(fx.stored_events().await, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_revocation_bites_within_the_cache_ttl(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let cached = fx.app(&[]).await;
    let uncached = fx.app(&[("AUTH_CACHE_TTL_SECONDS", "0")]).await;
    let key = create_api_key(
        &owner,
        &fx.tenant,
        "billing",
        meterbridge::domain::Trust::Internal,
    )
    .await;
    for app in [&cached, &uncached] {
        let r = send(app, fx.get(&key.key, "/v1/usage/realtime", &[])).await;
        assert_eq!(r.status, 200);
    }
    api_keys::revoke(&owner, &key.prefix).await.unwrap();
    let r = send(&uncached, fx.get(&key.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.status, 401, "with no cache the revocation is immediate");
    let r = send(&cached, fx.get(&key.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(
        r.status, 200,
        "a cached verdict lives at most AUTH_CACHE_TTL_SECONDS (≤ 60)"
    );
    // A key that was never issued, and garbage, are 401 without a lookup.
    for bad in [
        "mbk_0123456789ab_".to_owned() + &"0".repeat(64),
        "garbage".into(),
        "".into(),
    ] {
        let r = send(&cached, fx.get(&bad, "/v1/usage/realtime", &[])).await;
        assert_eq!(r.status, 401, "{bad}");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn redis_down_still_stores_and_answers_from_postgres(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx
        .app(&[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("REDIS_TIMEOUT_MS", "100"),
        ])
        .await;
    let r = fx
        .submit(&app, json!({"events": [fx.event(1, "api.requests", 4)]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 1);
    assert_eq!(fx.stored_events().await, 1);
    let r = send(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["source"], "postgres");
    assert_eq!(r.body["counters"]["api.requests"], 4);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn postgres_down_is_503_and_stores_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx
        .app(&[
            ("DB_MAX_CONNECTIONS", "1"),
            ("DB_ACQUIRE_TIMEOUT_MS", "500"),
        ])
        .await;
    // Warm the key and catalog caches, as a container would be.
    let r = send(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.status, 200);
    let _ = fx
        .submit(&app, json!({"events": [{"eventId": "warm"}]}))
        .await;

    // The database goes away: new connections are refused and open ones are cut.
    let dead = (*app.services.db.pool().connect_options()).clone().port(1);
    app.services.db.pool().set_connect_options(dead);
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'meterbridge_ingest' AND datname = current_database()")
        .execute(&owner)
        .await
        .unwrap();

    let r = fx
        .submit(&app, json!({"events": [fx.event(1, "api.requests", 1)]}))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(r.body["code"], "service_unavailable");
    assert_eq!(fx.stored_events().await, 0);
    assert_eq!(fx.counter("api.requests").await, None);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn hostile_bodies_get_a_clear_4xx_and_store_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let event = fx.event(1, "api.requests", 1);
    let with = |field: &str, value: Value| {
        let mut e = event.clone();
        e[field] = value;
        json!({"events": [e]}).to_string()
    };
    let deep = format!(
        "{{\"events\":[{{\"eventId\":\"d\",\"metadata\":{}1{}}}]}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let many: Vec<Value> = (0..10_000)
        .map(|n| json!({"eventId": n.to_string()}))
        .collect();
    let cases: Vec<(&str, String, u16)> = vec![
        ("not an object", "[1,2]".into(), 400),
        ("events not an array", r#"{"events": {"a": 1}}"#.into(), 400),
        ("no events", r#"{"events": []}"#.into(), 400),
        (
            "unknown top-level field",
            r#"{"events": [], "tenantId": "x"}"#.into(),
            400,
        ),
        ("truncated JSON", r#"{"events": [{"eventId": "#.into(), 400),
        ("deep nesting", deep, 400),
        ("10,000 events", json!({"events": many}).to_string(), 413),
        (
            "over 1 MiB",
            format!(
                "{{\"events\":[{{\"eventId\":\"{}\"}}]}}",
                "x".repeat(1_100_000)
            ),
            413,
        ),
        ("quantity as string", with("quantity", json!("1")), 422),
        ("huge quantity", with("quantity", json!(1e30)), 422),
        ("u64 quantity", with("quantity", json!(u64::MAX)), 422),
        ("fractional quantity", with("quantity", json!(0.5)), 422),
        ("metric as number", with("metric", json!(42)), 422),
        (
            "SQL in metric",
            with(
                "metric",
                json!("api.requests'; DROP TABLE usage_events; --"),
            ),
            422,
        ),
        ("metadata as string", with("metadata", json!("{}")), 422),
        ("null event", r#"{"events": [null]}"#.into(), 422),
        (
            "control characters",
            with("eventId", json!("a\u{0007}b")),
            422,
        ),
    ];
    for (name, body, status) in cases {
        let r = send(&app, fx.post_raw(&fx.internal.key, &body)).await;
        assert_eq!(r.status.as_u16(), status, "{name}: {}", r.body);
        assert!(
            r.body["type"].as_str().unwrap().starts_with("https://"),
            "{name}: problem+json"
        );
        assert!(!r.body["detail"].as_str().unwrap().is_empty(), "{name}");
    }
    // Invalid UTF-8 arrives base64-encoded from API Gateway.
    let mut raw: Value = serde_json::from_str(&common::fixture_text("post-events.json")).unwrap();
    raw["headers"]["authorization"] = json!(format!("Bearer {}", fx.internal.key));
    use base64::Engine;
    raw["body"] = json!(base64::engine::general_purpose::STANDARD
        .encode(b"{\"events\":[{\"eventId\":\"\xff\xfe\"}]}"));
    raw["isBase64Encoded"] = json!(true);
    let r = send(&app, common::request_from_json(&raw.to_string())).await;
    assert_eq!(r.status, 400, "{}", r.body);
    // A form post is refused as such.
    let mut form: Value = serde_json::from_str(&common::fixture_text("post-events.json")).unwrap();
    form["headers"]["authorization"] = json!(format!("Bearer {}", fx.internal.key));
    form["headers"]["content-type"] = json!("application/x-www-form-urlencoded");
    let r = send(&app, common::request_from_json(&form.to_string())).await;
    assert_eq!(r.status, 415, "{}", r.body);

    assert_eq!(fx.stored_events().await, 0);

    // SQL-looking text where free text is allowed is stored verbatim, harmlessly.
    let sneaky = with("eventId", json!("x'); DELETE FROM usage_events; --"));
    let r = send(&app, fx.post_raw(&fx.internal.key, &sneaky)).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    assert_eq!(fx.stored_events().await, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn listing_filters_and_pages_with_a_cursor(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let base = meterbridge::testing::now() - chrono::Duration::hours(5);
    let events: Vec<Value> = (0..5)
        .map(|n| {
            let mut e = fx.event(
                n,
                if n % 2 == 0 {
                    "api.requests"
                } else {
                    "sla.timers.started"
                },
                1,
            );
            e["occurredAt"] = json!((base + chrono::Duration::minutes(n as i64)).to_rfc3339());
            e
        })
        .collect();
    let r = fx.submit(&app, json!({"events": events})).await;
    assert_eq!(r.body["accepted"], 5);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "2".to_owned())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &pairs)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for e in r.body["events"].as_array().unwrap() {
            seen.push(e["eventId"].as_str().unwrap().to_owned());
        }
        match r.body["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..5).map(|n| format!("{}-e{n}", fx.run)).collect();
    assert_eq!(seen, expected, "every event once, oldest first");

    let r = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/events",
            &[("classification", "NON_BILLABLE")],
        ),
    )
    .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
    let from =
        (base + chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to =
        (base + chrono::Duration::minutes(3)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let r = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/events",
            &[("from", from.as_str()), ("to", to.as_str())],
        ),
    )
    .await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2, "{}", r.body);

    for (name, value) in [
        ("limit", "0"),
        ("limit", "1001"),
        ("from", "yesterday"),
        ("metric", "nope"),
        ("classification", "FREE"),
        ("cursor", "abc"),
    ] {
        let r = send(
            &app,
            fx.get(&fx.internal.key, "/v1/usage/events", &[(name, value)]),
        )
        .await;
        assert_eq!(r.status, 400, "{name}={value}: {}", r.body);
        assert!(r.body["detail"].as_str().unwrap().contains(name));
    }
    let r = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/realtime",
            &[("date", "25/11/2026")],
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    let old_day = (meterbridge::testing::now() - chrono::Duration::days(20))
        .date_naive()
        .to_string();
    let r = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/realtime",
            &[("date", old_day.as_str())],
        ),
    )
    .await;
    assert_eq!(
        r.body["source"], "postgres",
        "days past the counter TTL are computed"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn events_older_than_the_counter_ttl_skip_redis(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = app_with(&owner, &[]).await;
    let mut old = fx.event(1, "leads.qualified", 2);
    let old_at = meterbridge::testing::now() - chrono::Duration::days(10);
    old["occurredAt"] = json!(old_at.to_rfc3339());
    let r = fx.submit(&app, json!({"events": [old]})).await;
    assert_eq!(r.body["accepted"], 1);
    let client = redis::Client::open(meterbridge::testing::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = meterbridge::redis::keys::usage_counter(
        fx.tenant.id,
        old_at.date_naive(),
        "leads.qualified",
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists);
    // Counted ones carry the TTL.
    fx.submit(&app, json!({"events": [fx.event(2, "leads.qualified", 1)]}))
        .await;
    let key = meterbridge::redis::keys::usage_counter(
        fx.tenant.id,
        meterbridge::testing::now().date_naive(),
        "leads.qualified",
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 6 * 86_400 && ttl <= 7 * 86_400, "{ttl}");
}
