//! An erased subject through the API: the listing shows the token where the actor id was, with
//! empty metadata; a replay of an erased event is still a duplicate (its dedup key and payload
//! hash stay), and the same event changed is still a conflict, not a new event; a new event of
//! the subject after the erasure is stored as any other.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{send, statuses, Fixture};
use meterbridge::repo::subject_erasures::{self, Pace, Request};
use serde_json::{json, Value};
use sqlx::PgPool;

fn void(fx: &Fixture, event_id: &str) -> lambda_http::Request {
    fx.void(&fx.internal.key, event_id, &json!({"reason": "sent twice"}))
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_void_through_the_api_waits_while_its_subject_is_erased(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let actor = "subject-void-during-erasure";
    let events: Vec<Value> = (1..=2)
        .map(|n| {
            let mut e = fx.event(n, "api.requests", 1);
            e["actorId"] = json!(actor);
            e
        })
        .collect();
    let stored = fx.submit(&app, json!({ "events": events })).await;
    assert_eq!(statuses(&stored.body), ["accepted", "accepted"]);
    // As if aggregated, so a step erases them; one step of one row.
    meterbridge::testing::mark_aggregated(&owner).await;
    let request = Request {
        tenant: fx.tenant.id,
        request_id: "DSAR-API-2",
        actor_id: actor,
        reason: "the subject asked",
        requested_by: "test",
    };
    let mut tx = owner.begin().await.unwrap();
    let first = subject_erasures::step(&mut tx, &request, 1).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(first.events_erased, 1);
    let erased: String = sqlx::query_scalar(
        "SELECT event_id FROM usage_events WHERE tenant_id = $1 AND actor_id LIKE 'erased:%'",
    )
    .bind(fx.tenant.id.0)
    .fetch_one(&owner)
    .await
    .unwrap();
    // Busy: retry shortly, nothing changed.
    let busy = send(&app, void(&fx, &erased)).await;
    assert_eq!(busy.status, 503, "{}", busy.body);
    assert!(busy.headers.contains_key("retry-after"));
    let voided: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE voided_at IS NOT NULL")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(voided, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    subject_erasures::erase(&owner, &request, Pace::unpaced(1), deadline)
        .await
        .unwrap();
    let done = send(&app, void(&fx, &erased)).await;
    assert_eq!(done.status, 200, "{}", done.body);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_erased_event_lists_its_token_and_a_replay_is_still_a_duplicate(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let actor = "subject-erased-in-api";
    let mut event = fx.event(1, "api.requests", 3);
    event["actorId"] = json!(actor);
    event["metadata"] = json!({"email": "someone@example.com"});
    let stored = fx.submit(&app, json!({"events": [event.clone()]})).await;
    assert_eq!(statuses(&stored.body), ["accepted"], "{}", stored.body);

    let request = Request {
        tenant: fx.tenant.id,
        request_id: "DSAR-API-1",
        actor_id: actor,
        reason: "the subject asked",
        requested_by: "test",
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let receipt = subject_erasures::erase(&owner, &request, Pace::unpaced(100), deadline)
        .await
        .unwrap();
    assert_eq!(receipt.events_erased, 1);

    let listed = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &[])).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let item = &listed.body["events"][0];
    assert!(
        item["actorId"].as_str().unwrap().starts_with("erased:"),
        "{item}"
    );
    assert_eq!(item["metadata"], json!({}), "{item}");
    assert!(!listed.body.to_string().contains(actor), "{}", listed.body);

    // The same event again: a duplicate, as before the erasure; changed: a conflict.
    let replay = fx.submit(&app, json!({"events": [event.clone()]})).await;
    assert_eq!(statuses(&replay.body), ["duplicate"], "{}", replay.body);
    let mut changed = event.clone();
    changed["quantity"] = json!(4);
    let conflict = fx.submit(&app, json!({"events": [changed]})).await;
    assert_eq!(statuses(&conflict.body), ["conflict"], "{}", conflict.body);
    assert_eq!(fx.stored_events().await, 1);

    // A new event of the subject afterwards is stored as any other: the tenant decides.
    let mut later = fx.event(2, "api.requests", 1);
    later["actorId"] = json!(actor);
    let after = fx.submit(&app, json!({"events": [later]})).await;
    assert_eq!(statuses(&after.body), ["accepted"], "{}", after.body);
}
