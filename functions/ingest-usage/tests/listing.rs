//! GET /v1/usage/events at scale: every listing reads one bounded index range (a filter that
//! matches nothing costs nothing), and every page fits a Lambda response whatever the events
//! carry.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{send, Fixture};
use lambda_http::Body;
use meterbridge::domain::Classification;
use meterbridge::repo::usage_events::{self, EventFilter, ListPosition};
use meterbridge::testing::{pool_as, INGEST_ROLE};
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

/// (rows read by sequential scans, rows fetched through indexes) of usage_events' day
/// partitions by this session so far; the difference across a statement is what the statement
/// read. (The planner may sequentially "scan" a day partition that is empty: that reads
/// nothing, and counts nothing here.)
async fn reads(tx: &mut sqlx::PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(sum(seq_tup_read), 0)::int8, coalesce(sum(idx_tup_fetch), 0)::int8
           FROM pg_stat_xact_user_tables WHERE relname LIKE 'usage\\_events\\_p%'",
    )
    .fetch_one(tx)
    .await
    .unwrap()
}

/// (name, metric, classification, start after, rows on the page)
type Case = (
    &'static str,
    Option<&'static str>,
    Option<Classification>,
    ListPosition,
    usize,
);

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_listing_reads_one_bounded_index_range(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    // A large tenant: an event a minute for the 28 whole days before today, BILLABLE and
    // NON_BILLABLE, none INFO (whole days: no day partition so small that the planner would
    // rather read it through than use its index).
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
             occurred_at, correlation_id, classification, payload_hash, operation_key)
         SELECT $1, 'crm', 'bulk-' || n,
                CASE WHEN n % 2 = 0 THEN 'api.requests' ELSE 'sla.timers.started' END, 1,
                (date_trunc('day', $2::timestamptz AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
                    - n * interval '1 minute', 'c-' || n,
                CASE WHEN n % 2 = 0 THEN 'BILLABLE' ELSE 'NON_BILLABLE' END,
                decode(repeat('00', 32), 'hex'), gen_random_uuid()
           FROM generate_series(1, 28 * 1440 - 1) AS n",
    )
    .bind(fx.tenant.id)
    .bind(meterbridge::testing::now())
    .execute(&owner)
    .await
    .unwrap();
    sqlx::query("ANALYZE usage_events")
        .execute(&owner)
        .await
        .unwrap();
    let db = Database::from_pool(pool_as(&owner, INGEST_ROLE).await);
    let now = meterbridge::testing::now();
    let from = now - chrono::Duration::days(31);
    let deep: (chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as("SELECT occurred_at, seq FROM usage_events WHERE event_id = 'bulk-14400'")
            .fetch_one(&owner)
            .await
            .unwrap();
    let deep = ListPosition {
        occurred_at: deep.0,
        seq: deep.1,
    };
    let cases: Vec<Case> = vec![
        ("first page", None, None, ListPosition::before(from), 101),
        ("deep page", None, None, deep, 101),
        ("metric", Some("api.requests"), None, deep, 101),
        (
            "metric that matches nothing",
            Some("leads.routed"),
            None,
            ListPosition::before(from),
            0,
        ),
        (
            "classification",
            None,
            Some(Classification::NonBillable),
            deep,
            101,
        ),
        (
            "classification that matches nothing",
            None,
            Some(Classification::Info),
            ListPosition::before(from),
            0,
        ),
        (
            "both",
            Some("api.requests"),
            Some(Classification::Billable),
            deep,
            101,
        ),
    ];
    for (name, metric, classification, after, rows) in cases {
        let filter = EventFilter {
            metric: metric.map(str::to_owned),
            classification,
            after,
            to: now,
            limit: 101,
        };
        let mut tx = db.tenant_read_tx(fx.tenant.id).await.unwrap();
        let before = reads(&mut tx).await;
        let page = usage_events::list(&mut tx, fx.tenant.id, &filter)
            .await
            .unwrap();
        let after = reads(&mut tx).await;
        let (seq_read, fetched) = (after.0 - before.0, after.1 - before.1);
        tx.rollback().await.unwrap();
        assert_eq!(page.len(), rows, "{name}");
        assert_eq!(seq_read, 0, "{name}: rows read by a sequential scan");
        assert!(
            rows == 0 || fetched > 0,
            "{name}: the statistics saw no read at all"
        );
        assert!(
            fetched as usize <= rows,
            "{name}: fetched {fetched} rows for a page of {rows}"
        );
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_window_is_bounded_and_carried_by_the_cursor(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let key = &fx.internal.key;
    let now = meterbridge::testing::now();
    let stamp =
        |d: chrono::DateTime<chrono::Utc>| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let events: Vec<Value> = [30, 2, 1]
        .iter()
        .enumerate()
        .map(|(n, hours_ago)| {
            let mut e = fx.event(n, "api.requests", 1);
            e["occurredAt"] = json!(stamp(now - chrono::Duration::hours(*hours_ago)));
            e
        })
        .collect();
    let r = fx.submit(&app, json!({ "events": events })).await;
    assert_eq!(r.body["accepted"], 3);

    // No window given: the last day.
    let r = send(&app, fx.get(key, "/v1/usage/events", &[])).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2, "{}", r.body);
    // Too wide, inverted, or out of range: 400, naming the parameter.
    let old = stamp(now - chrono::Duration::days(32));
    let soon = stamp(now);
    for query in [
        vec![("from", old.as_str())],
        vec![("from", soon.as_str()), ("to", soon.as_str())],
        vec![("from", "1969-12-31T23:59:59Z")],
        vec![("to", "+262142-01-01T00:00:00Z")],
        vec![("to", "2026-11-24T23:59:60Z")],
    ] {
        let r = send(&app, fx.get(key, "/v1/usage/events", &query)).await;
        assert_eq!(r.status, 400, "{query:?}: {}", r.body);
        assert!(
            query
                .iter()
                .any(|(name, _)| r.body["detail"].as_str().unwrap().contains(name)),
            "{query:?}: {}",
            r.body
        );
    }
    // A cursor continues its own window; pairing it with another window is refused.
    let from = stamp(now - chrono::Duration::days(2));
    let r = send(
        &app,
        fx.get(key, "/v1/usage/events", &[("from", &from), ("limit", "1")]),
    )
    .await;
    let cursor = r.body["nextCursor"].as_str().unwrap().to_owned();
    let mut seen = vec![r.body["events"][0]["eventId"].clone()];
    let mut next = Some(cursor.clone());
    while let Some(c) = next {
        let r = send(
            &app,
            fx.get(key, "/v1/usage/events", &[("cursor", &c), ("limit", "1")]),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        seen.extend(
            r.body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["eventId"].clone()),
        );
        next = r.body["nextCursor"].as_str().map(str::to_owned);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let other = stamp(now - chrono::Duration::days(3));
    let r = send(
        &app,
        fx.get(
            key,
            "/v1/usage/events",
            &[("cursor", &cursor), ("from", &other)],
        ),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("cursor"));
}

/// 1,000 events with 12 KiB of metadata each are 12 MB of JSON: more than a Lambda response
/// may carry, twice over. Pages stop at the byte budget and the cursor continues.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn pages_fit_a_lambda_response_whatever_the_events_carry(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx
        .app(&[
            ("METADATA_MAX_BYTES", "16384"),
            ("MAX_BODY_BYTES", "6000000"),
        ])
        .await;
    let quoted = "\"q\\".repeat(1500); // escapes grow it inside the response envelope
    for batch in 0..5 {
        let events: Vec<Value> = (0..200)
            .map(|n| {
                let mut e = fx.event(batch * 200 + n, "api.requests", 1);
                e["metadata"] = json!({ "blob": quoted });
                e
            })
            .collect();
        let r = fx.submit(&app, json!({ "events": events })).await;
        assert_eq!(r.body["accepted"], 200, "{}", r.body);
    }
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("limit", "1000".to_owned())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let pairs: Vec<(&str, &str)> = query.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response =
            ingest_usage::handle(&app, fx.get(&fx.internal.key, "/v1/usage/events", &pairs)).await;
        assert_eq!(response.status(), 200);
        let Body::Text(text) = response.into_body() else {
            panic!("JSON must go out as text, not base64-encoded binary");
        };
        // What the body costs inside the Lambda response envelope.
        let in_envelope = Value::String(text.clone()).to_string().len();
        assert!(
            in_envelope < 5_000_000,
            "page {pages} is {in_envelope} bytes in the response"
        );
        let page: Value = serde_json::from_str(&text).unwrap();
        for e in page["events"].as_array().unwrap() {
            assert!(seen.insert(e["eventId"].as_str().unwrap().to_owned()));
        }
        pages += 1;
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 1000, "every event once");
    assert!(pages >= 3, "{pages} pages");
}

/// PostgreSQL prints a jsonb number in full (f64::MIN as 309 digits): a listing reads each back
/// as the very number that was sent, never as a 500.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn extreme_numbers_in_metadata_list_back_exactly(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let metadata = json!({
        "numbers": [f64::MIN, f64::MAX, f64::MIN_POSITIVE, 5e-324, -2.569587061155835e-63,
                    i64::MIN, u64::MAX],
        "nested": {"min": f64::MIN},
    });
    let mut event = fx.event(1, "api.requests", 1);
    event["metadata"] = metadata.clone();
    let r = fx.submit(&app, json!({ "events": [event] })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let listed = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &[])).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(listed.body["events"][0]["metadata"], metadata);
}
