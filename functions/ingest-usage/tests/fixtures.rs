//! Every request in events/ingest-usage/ run through the handler.

mod common;

use common::{events_dir, send, Fixture};
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_fixture_runs_through_the_handler(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let mut seen = Vec::new();
    let mut run = |name: &'static str| {
        seen.push(name.to_owned());
        fx.fixture(name)
    };

    let r = send(&app, run("post-events.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["accepted"], 3);
    assert_eq!(r.headers["x-correlation-id"], "fixture-v1-usage-events");
    // The same file again: every event is a duplicate, nothing is counted twice.
    let r = send(&app, fx.fixture("post-events.json")).await;
    assert_eq!(
        (r.body["accepted"].as_u64(), r.body["duplicates"].as_u64()),
        (Some(0), Some(3)),
        "{}",
        r.body
    );
    assert_eq!(fx.counter("api.requests").await, Some(3));

    let r = send(&app, run("post-events-mixed.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["accepted"].as_u64(), r.body["rejected"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(r.body["results"][1]["code"], "unknown_metric");
    assert_eq!(r.body["results"][2]["code"], "quantity_not_positive");
    assert_eq!(r.body["results"][2]["field"], "quantity");

    let r = send(&app, run("post-events-all-rejected.json")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let codes: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "quantity_not_positive",
            "occurred_at_too_old",
            "missing_field"
        ]
    );
    assert_eq!(r.body["errors"][0]["pointer"], "/events/0/quantity");

    let r = send(&app, run("post-events-external-billable.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["results"][0]["code"],
        "billable_from_external_source"
    );
    assert_eq!(r.body["results"][1]["status"], "accepted");

    let r = send(&app, run("post-events-other-tenant.json")).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "tenant_mismatch");

    let r = send(&app, run("post-events-malformed.json")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["code"], "malformed_request");

    let r = send(&app, run("post-events-no-key.json")).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.headers.contains_key("www-authenticate"));

    let r = send(&app, run("post-events-revoked-key.json")).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("revoked"));

    let r = send(&app, run("post-events-disabled-tenant.json")).await;
    assert_eq!(r.status, 403, "{}", r.body);

    let r = send(&app, run("list-events.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["events"].as_array().unwrap().len(),
        1,
        "only one api.requests event: {}",
        r.body
    );
    assert_eq!(r.body["events"][0]["metadata"]["region"], "eu-west-1");
    assert_eq!(r.body["events"][0]["sourceService"], "crm");

    // A partner's key writes usage; it reads none of the tenant's.
    let r = send(&app, run("list-events-external-key.json")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("usage:read"));
    assert!(r.body.get("events").is_none());

    let r = send(&app, run("realtime.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["source"], "redis");
    assert_eq!(r.body["counters"]["api.requests"], 3);
    assert_eq!(r.body["counters"]["voice.minutes.authorized"], 15);
    assert_eq!(r.body["counters"]["integrations.webhooks.received"], 4);

    let r = send(&app, run("delete-events.json")).await;
    assert_eq!(r.status, 405, "{}", r.body);

    // The void of post-events.json's first event (3 api.requests): kept, marked, uncounted.
    let r = send(&app, run("void-event.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["voidedNow"], true);
    assert_eq!(r.body["event"]["quantity"], 3);
    assert_eq!(fx.counter("api.requests").await, Some(0));

    // The summary (no aggregation has run in this test: an empty, well-formed answer).
    let r = send(&app, run("summary.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["period"], "daily");
    assert_eq!(r.body["metric"], "api.requests");
    assert!(r.body["aggregates"].is_array());

    // Usage limits: none on the metric yet (404), then a monthly one, read by a fresh
    // container (a container caches a tenant's limits for 60 s).
    let r = send(&app, run("metric-usage-limits.json")).await;
    assert_eq!(r.status, 404, "{}", r.body);
    {
        let mut conn = owner.acquire().await.unwrap();
        let change = meterbridge::repo::usage_settings::Change {
            tenant: fx.tenant.id,
            actor: "test",
            reason: "test",
        };
        let limit = meterbridge::domain::usage_limit::UsageLimit::new(
            "api.requests",
            meterbridge::domain::usage_limit::LimitPeriod::Monthly,
            1000,
            None,
        )
        .unwrap();
        meterbridge::repo::usage_limits::set(&mut conn, &change, &limit)
            .await
            .unwrap();
    }
    let fresh = fx.app(&[]).await;
    let r = send(&fresh, fx.fixture("metric-usage-limits.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["limits"][0]["limit"], "1000");
    assert_eq!(r.body["limits"][0]["source"], "redis");
    let r = send(&fresh, run("usage-limits.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["limits"].as_array().unwrap().len(), 1);

    // 3 + 2 + 1 accepted events are in PostgreSQL.
    assert_eq!(fx.stored_events().await, 6);

    // CloudEvents through the meter of events/admin/meter-set.json: 204, twice (a replay).
    {
        let mut conn = owner.acquire().await.unwrap();
        let change = meterbridge::repo::usage_settings::Change {
            tenant: fx.tenant.id,
            actor: "test",
            reason: "test",
        };
        let admin: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(events_dir().join("../admin/meter-set.json")).unwrap(),
        )
        .unwrap();
        let meter: meterbridge::domain::meter::MeterDefinition =
            serde_json::from_value(serde_json::json!({
                "slug": admin["slug"], "eventType": admin["eventType"], "metric": admin["metric"],
                "valueProperty": admin["valueProperty"], "groupBy": admin["groupBy"]}))
            .unwrap();
        meterbridge::repo::meters::set(&mut conn, &change, &meter)
            .await
            .unwrap();
    }
    let fresh = fx.app(&[]).await;
    let r = send(&fresh, run("post-cloudevents.json")).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = send(&fresh, fx.fixture("post-cloudevents.json")).await;
    assert_eq!(r.status, 204, "a replay: {}", r.body);
    assert_eq!(fx.stored_events().await, 8);
    // Read back through the meter: per day and method, 3 GET and 2 POST.
    let r = send(&fresh, run("query-meter.json")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["windowSize"], "DAY");
    let mut by_method: Vec<(String, i64)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["groupBy"]["method"].as_str().unwrap().to_owned(),
                row["value"].as_i64().unwrap(),
            )
        })
        .collect();
    by_method.sort();
    assert_eq!(by_method, [("GET".to_owned(), 3), ("POST".to_owned(), 2)]);

    let mut files: Vec<String> = std::fs::read_dir(events_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    seen.sort();
    assert_eq!(
        files, seen,
        "each fixture in events/ingest-usage needs a case here"
    );
}
