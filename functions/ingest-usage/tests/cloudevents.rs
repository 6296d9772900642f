//! OpenMeter-compatible ingestion through the real handler: CloudEvents mapped by the tenant's
//! meters, 204 for every event stored or an exact duplicate, and a request with any invalid,
//! unmapped or conflicting event refused whole with nothing stored.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Fixture};
use meterbridge::domain::Trust;
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::{json, Value};
use sqlx::PgPool;

fn post(key: &str, content_type: &str, body: &Value) -> lambda_http::Request {
    let mut event: Value = serde_json::from_str(&common::fixture_text("post-events.json")).unwrap();
    event["routeKey"] = json!("POST /api/v1/events");
    event["rawPath"] = json!("/api/v1/events");
    event["requestContext"]["http"]["path"] = json!("/api/v1/events");
    event["headers"]["authorization"] = json!(format!("Bearer {key}"));
    event["headers"]["content-type"] = json!(content_type);
    event["body"] = json!(body.to_string());
    meterbridge::testing::request_from_json(&event.to_string())
}

fn cloudevent(fx: &Fixture, id: &str, source: &str, tokens: i64) -> Value {
    json!({"specversion": "1.0", "id": format!("{}-{id}", fx.run), "source": source,
           "type": "prompt", "subject": "customer-7",
           "time": meterbridge::testing::now().to_rfc3339(),
           "data": {"tokens": tokens, "model": "small"}})
}

/// (event id, quantity, actor, metadata) of the tenant's stored events, by event id.
async fn stored(fx: &Fixture) -> Vec<(String, i64, Option<String>, Value)> {
    sqlx::query_as(
        "SELECT event_id, quantity, actor_id, metadata FROM usage_events
          WHERE tenant_id = $1 ORDER BY event_id",
    )
    .bind(fx.tenant.id)
    .fetch_all(&fx.owner)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn cloudevents_are_stored_through_meters_and_replays_change_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    fx.set_meter("prompt", "prompt", "api.requests", Some("$.tokens"))
        .await;
    let app = fx.app(&[]).await;
    let key = &fx.internal.key;

    // One event, as OpenMeter's SDKs send it.
    let one = cloudevent(&fx, "1", "gateway", 12);
    let r = send(&app, post(key, "application/cloudevents+json", &one)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(r.body, Value::Null, "204 has no body");
    // A batch, and the same id from another source: two events.
    let batch = json!([
        cloudevent(&fx, "2", "gateway", 30),
        cloudevent(&fx, "1", "worker", 5)
    ]);
    let r = send(
        &app,
        post(key, "application/cloudevents-batch+json", &batch),
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    // application/json takes either shape.
    let r = send(&app, post(key, "application/json", &json!([one.clone()]))).await;
    assert_eq!(r.status, 204, "a replay is 204: {:?}", r.body);
    let r = send(&app, post(key, "application/json", &batch)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);

    let rows = stored(&fx).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    let total: i64 = rows.iter().map(|r| r.1).sum();
    assert_eq!(total, 47);
    assert!(rows.iter().all(|r| r.2.as_deref() == Some("customer-7")));
    assert_eq!(rows[0].3["model"], "small");
    assert_eq!(rows[0].3["cloudevents"]["type"], "prompt");
    assert_eq!(fx.counter("api.requests").await, Some(47), "counted once");

    // A quantity of 0 is valid and adds nothing: 204, nothing stored, alone or in a batch; it
    // is still checked by every other rule.
    let zero = cloudevent(&fx, "z", "gateway", 0);
    let r = send(&app, post(key, "application/cloudevents+json", &zero)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let batch = json!([
        cloudevent(&fx, "z2", "gateway", 0),
        cloudevent(&fx, "3", "gateway", 3)
    ]);
    let r = send(&app, post(key, "application/json", &batch)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    let mut stale_zero = cloudevent(&fx, "z3", "gateway", 0);
    stale_zero["time"] = json!("2001-01-01T00:00:00Z");
    let r = send(&app, post(key, "application/json", &stale_zero)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(stored(&fx).await.len(), 4);
    assert_eq!(fx.counter("api.requests").await, Some(50));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_request_with_any_bad_event_is_refused_whole(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    fx.set_meter("prompt", "prompt", "api.requests", Some("$.tokens"))
        .await;
    let app = fx.app(&[]).await;
    let key = &fx.internal.key;
    let batch_type = "application/cloudevents-batch+json";

    // Unmapped, malformed and invalid events beside a good one: 400, each named, nothing stored.
    let mut unmapped = cloudevent(&fx, "u", "gateway", 1);
    unmapped["type"] = json!("no-meter");
    let mut no_id = cloudevent(&fx, "x", "gateway", 1);
    no_id.as_object_mut().unwrap().remove("id");
    let negative = cloudevent(&fx, "n", "gateway", -4);
    let mut too_old = cloudevent(&fx, "o", "gateway", 1);
    too_old["time"] = json!("2001-01-01T00:00:00Z");
    let good = cloudevent(&fx, "g", "gateway", 1);
    let body = json!([good, unmapped, no_id, negative, too_old]);
    let r = send(&app, post(key, batch_type, &body)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["code"], "invalid_events");
    let errors = r.body["errors"].as_array().unwrap();
    let named: Vec<(i64, &str)> = errors
        .iter()
        .map(|e| (e["index"].as_i64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        [
            (1, "unmapped_event_type"),
            (2, "invalid_cloudevent"),
            (3, "quantity_not_positive"),
            (4, "occurred_at_too_old")
        ],
        "{errors:?}"
    );
    assert_eq!(errors[0]["id"], format!("{}-u", fx.run));
    assert!(stored(&fx).await.is_empty());

    // A conflict with a stored event (same source and id, other data) refuses the good one too.
    let r = send(&app, post(key, batch_type, &json!([good]))).await;
    assert_eq!(r.status, 204);
    let changed = cloudevent(&fx, "g", "gateway", 99);
    let fresh = cloudevent(&fx, "f", "gateway", 3);
    let r = send(&app, post(key, batch_type, &json!([fresh, changed]))).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.body["code"], "conflicting_events");
    assert_eq!(r.body["errors"][0]["index"], 1);
    assert_eq!(r.body["errors"][0]["id"], format!("{}-g", fx.run));
    assert_eq!(stored(&fx).await.len(), 1, "nothing of the refused request");
    // So does a conflict within the request.
    let twice = json!([
        cloudevent(&fx, "t", "gateway", 1),
        cloudevent(&fx, "t", "gateway", 2)
    ]);
    let r = send(&app, post(key, batch_type, &twice)).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(stored(&fx).await.len(), 1);

    // Malformed requests.
    let r = send(
        &app,
        post(key, "application/cloudevents+json", &json!([good])),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(&app, post(key, batch_type, &json!([]))).await;
    assert_eq!(r.status, 400);
    let r = send(&app, post(key, "text/plain", &good)).await;
    assert_eq!(r.status, 415);
    let r = send(&app, post("", "application/cloudevents+json", &good)).await;
    assert_eq!(r.status, 401);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn meters_and_the_rules_of_native_ingestion_hold_per_tenant_and_key(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    fx.set_meter("prompt", "prompt", "api.requests", None).await;
    let app = fx.app(&[]).await;
    let event = cloudevent(&fx, "1", "gateway", 12);
    let one = "application/cloudevents+json";

    // A partner (external) key may not report a BILLABLE metric, as natively.
    let r = send(&app, post(&fx.external.key, one, &event)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "billable_from_external_source");
    // Another tenant's key: its own meters, none of this tenant's.
    let other = create_tenant(&owner, "other").await;
    let other_key = create_api_key(&owner, &other, "crm", Trust::Internal).await;
    let r = send(&app, post(&other_key.key, one, &event)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["errors"][0]["code"], "unmapped_event_type");
    assert!(stored(&fx).await.is_empty());
    // Without valueProperty, each event counts 1.
    let r = send(&app, post(&fx.internal.key, one, &event)).await;
    assert_eq!(r.status, 204);
    assert_eq!(stored(&fx).await[0].1, 1);
}
