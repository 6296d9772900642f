//! Inputs at and past the edges: totals beyond 64 bits, extreme and malformed query parameters,
//! leap seconds, repeated JSON keys. Each is a clear 4xx or an exact answer — never a 5xx, a
//! panic, or a wrong number.
#![allow(clippy::unwrap_used)]

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{send, Fixture};
use lambda_http::Body;
use meterbridge::domain::usage::MAX_QUANTITY;
use meterbridge::usage_counters::{split, LOW_BASE};
use serde_json::json;
use sqlx::PgPool;

async fn body_text(app: &ingest_usage::App, request: lambda_http::Request) -> (u16, String) {
    let response = ingest_usage::handle(app, request).await;
    let status = response.status().as_u16();
    match response.into_body() {
        Body::Text(text) => (status, text),
        other => panic!("expected a text body, got {other:?}"),
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn totals_stay_exact_beyond_64_bits(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    // Redis: today's counter already holds i64::MAX - 5 units, about 9.2 million events of
    // the largest quantity.
    let start = i128::from(i64::MAX) - 5;
    let (hi, lo) = split(start);
    let client = redis::Client::open(meterbridge::testing::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = meterbridge::redis::keys::usage_counter(
        fx.tenant.id,
        meterbridge::testing::now().date_naive(),
        "api.requests",
    );
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("hi")
        .arg(hi)
        .arg("lo")
        .arg(lo)
        .query_async(&mut conn)
        .await
        .unwrap();
    let events: Vec<_> = (0..3)
        .map(|n| fx.event(n, "api.requests", MAX_QUANTITY))
        .collect();
    let r = fx.submit(&app, json!({ "events": events })).await;
    assert_eq!(r.body["accepted"], 3, "{}", r.body);
    let expected = start + 3 * i128::from(MAX_QUANTITY);
    assert_eq!(fx.counter("api.requests").await, Some(expected));
    let (status, text) = body_text(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains(&format!("\"api.requests\":{expected}")),
        "{text}"
    );
    let (hi_part, lo_part): (i64, i64) = redis::cmd("HMGET")
        .arg(&key)
        .arg("hi")
        .arg("lo")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((0..LOW_BASE as i64).contains(&lo_part) && hi_part > 0);

    // PostgreSQL: stored quantities whose sum passes 2^64 are summed exactly (the fallback used
    // to answer 500).
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
             occurred_at, correlation_id, classification, payload_hash, operation_key)
         SELECT $1, 'crm', 'huge-' || n, 'leads.routed', 9000000000000000000, $2, 'h-' || n,
                'BILLABLE', decode(repeat('00', 32), 'hex'), gen_random_uuid()
           FROM generate_series(1, 3) AS n",
    )
    .bind(fx.tenant.id)
    .bind(meterbridge::testing::now())
    .execute(&owner)
    .await
    .unwrap();
    let no_redis = fx
        .app(&[
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("REDIS_TIMEOUT_MS", "50"),
        ])
        .await;
    let (status, text) = body_text(
        &no_redis,
        fx.get(&fx.internal.key, "/v1/usage/realtime", &[]),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"source\":\"postgres\""), "{text}");
    assert!(
        text.contains("\"leads.routed\":27000000000000000000"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"api.requests\":{}", 3 * MAX_QUANTITY)),
        "{text}"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn extreme_query_parameters_are_400_never_a_crash(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let key = &fx.internal.key;
    let old_cursor_with_nul = URL_SAFE_NO_PAD.encode("2026-11-25T10:00:00.000000Z|\u{0}");
    let json_cursor_with_nul = URL_SAFE_NO_PAD.encode(
        json!({"a": "2026-11-25T10:00:00Z", "s": "crm", "e": "\u{0}",
               "f": "2026-11-25T00:00:00Z", "t": "2026-11-25T11:00:00Z"})
        .to_string(),
    );
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/v1/usage/realtime", vec![("date", "+262142-12-31")]),
        ("/v1/usage/realtime", vec![("date", "262142-12-31")]),
        ("/v1/usage/realtime", vec![("date", "-5000-01-01")]),
        ("/v1/usage/realtime", vec![("date", "0000-01-01")]),
        ("/v1/usage/realtime", vec![("date", "2026-13-01")]),
        (
            "/v1/usage/events",
            vec![("cursor", old_cursor_with_nul.as_str())],
        ),
        (
            "/v1/usage/events",
            vec![("cursor", json_cursor_with_nul.as_str())],
        ),
        (
            "/v1/usage/events",
            vec![("limit", "99999999999999999999999")],
        ),
        ("/v1/usage/events", vec![("limit", "-1")]),
        ("/v1/usage/events", vec![("from", "-5000-01-01T00:00:00Z")]),
        ("/v1/usage/events", vec![("to", "+262142-12-31T23:59:59Z")]),
        ("/v1/usage/events", vec![("metric", "api.requests\u{0}")]),
        (
            "/v1/usage/events",
            vec![("classification", "BILLABLE\u{0}")],
        ),
    ];
    for (path, query) in cases {
        let r = send(&app, fx.get(key, path, &query)).await;
        assert_eq!(r.status, 400, "{path} {query:?}: {}", r.body);
        assert_eq!(r.body["code"], "malformed_request");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn leap_seconds_are_refused_not_split_across_days(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let yesterday = (meterbridge::testing::now() - chrono::Duration::days(1)).date_naive();
    let mut leap = fx.event(1, "api.requests", 1);
    leap["occurredAt"] = json!(format!("{yesterday}T23:59:60Z"));
    let mut fine = fx.event(2, "api.requests", 1);
    fine["occurredAt"] = json!(format!("{yesterday}T23:59:59.999999Z"));
    let r = fx.submit(&app, json!({ "events": [leap, fine] })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["results"][0]["status"], "rejected");
    assert_eq!(r.body["results"][0]["code"], "invalid_timestamp");
    assert!(r.body["results"][0]["message"]
        .as_str()
        .unwrap()
        .contains("leap second"));
    assert_eq!(r.body["results"][1]["status"], "accepted");
    assert_eq!(fx.stored_events().await, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn repeated_json_keys_are_malformed(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let e = fx.event(1, "api.requests", 1);
    let base = e.to_string();
    let inner = &base[1..base.len() - 1];
    for body in [
        format!(r#"{{"events": [{{{inner}, "quantity": 5}}]}}"#),
        format!(r#"{{"events": [{{{inner}, "metadata": {{"k": 1, "k": 2}}}}]}}"#),
        format!(r#"{{"events": [], "events": [{{{inner}}}]}}"#),
    ] {
        let r = send(&app, fx.post_raw(&fx.internal.key, &body)).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.body["code"], "malformed_request");
        assert!(
            r.body["detail"].as_str().unwrap().contains("duplicate key"),
            "{}",
            r.body
        );
    }
    assert_eq!(fx.stored_events().await, 0);
}

/// Counters written by the previous version (plain `INCRBY` strings) are read as they are and
/// converted on their next increment: an upgrade loses no count.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn counters_of_the_previous_version_keep_counting(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let client = redis::Client::open(meterbridge::testing::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let today = meterbridge::testing::now().date_naive();
    let legacy =
        |metric: &str| meterbridge::redis::keys::usage_counter(fx.tenant.id, today, metric);
    for (metric, value) in [
        ("api.requests", "9223372036854775000"),
        ("leads.routed", "5"),
    ] {
        let () = redis::cmd("SET")
            .arg(legacy(metric))
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (status, text) = body_text(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"source\":\"redis\""), "{text}");
    assert!(
        text.contains("\"api.requests\":9223372036854775000"),
        "{text}"
    );
    assert!(text.contains("\"leads.routed\":5"), "{text}");

    let r = fx
        .submit(
            &app,
            json!({ "events": [fx.event(1, "api.requests", 1000)] }),
        )
        .await;
    assert_eq!(r.body["accepted"], 1);
    assert_eq!(
        fx.counter("api.requests").await,
        Some(9_223_372_036_854_776_000)
    );
    let kind: String = redis::cmd("TYPE")
        .arg(legacy("api.requests"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    let ttl: i64 = redis::cmd("TTL")
        .arg(legacy("api.requests"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "the converted counter keeps a TTL");
}
