//! Who may do what: key scopes enforced at the request edge, and caller-chosen keys namespaced
//! by source so that no key can pre-claim another source's events.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, statuses, Fixture};
use meterbridge::domain::{Scope, Scopes, Trust};
use meterbridge::testing::{create_scoped_api_key, create_tenant, migrate_up_to};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn each_route_needs_its_scope(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let reader = create_scoped_api_key(
        &owner,
        &fx.tenant,
        "bi",
        Trust::Internal,
        Scopes::of(&[Scope::UsageRead]),
    )
    .await;
    let writer = create_scoped_api_key(
        &owner,
        &fx.tenant,
        "crm",
        Trust::Internal,
        Scopes::of(&[Scope::UsageWrite]),
    )
    .await;
    let r = fx
        .submit(&app, json!({"events": [fx.event(1, "api.requests", 3)]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // External (partner) keys write usage and read nothing of the tenant's.
    for path in ["/v1/usage/events", "/v1/usage/realtime"] {
        let r = send(&app, fx.get(&fx.external.key, path, &[])).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(
            r.body["detail"].as_str().unwrap().contains("usage:read"),
            "{}",
            r.body
        );
        assert!(
            r.body.get("events").is_none() && r.body.get("counters").is_none(),
            "nothing of the tenant's leaks: {}",
            r.body
        );
    }
    let r = send(
        &app,
        fx.post(
            &fx.external.key,
            &json!({"events": [fx.event(2, "sla.timers.started", 1)]}),
        ),
    )
    .await;
    assert_eq!(statuses(&r.body), ["accepted"]);

    // A read-only key reads and writes nothing; a write-only key writes and reads nothing.
    let r = send(&app, fx.get(&reader.key, "/v1/usage/events", &[])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2);
    let r = send(
        &app,
        fx.post(
            &reader.key,
            &json!({"events": [fx.event(3, "api.requests", 1)]}),
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("usage:write"));
    let r = send(&app, fx.get(&writer.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = send(
        &app,
        fx.post(
            &writer.key,
            &json!({"events": [fx.event(4, "api.requests", 1)]}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // The scope check comes after authentication: a bad key is still 401, not 403.
    let r = send(&app, fx.get("mbk_nope", "/v1/usage/events", &[])).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        fx.stored_events().await,
        3,
        "the refused POST wrote nothing"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_database_refuses_wider_scopes_for_external_keys(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let err = sqlx::query(
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust, scopes)
         VALUES ($1, 'abcdefabcdef', decode(repeat('00', 32), 'hex'), 'web', 'external',
                 '{usage:write,usage:read}')",
    )
    .bind(acme.id)
    .execute(&owner)
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("api_keys_external_scopes"),
        "{err}"
    );
    let err = sqlx::query(
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust, scopes)
         VALUES ($1, 'abcdefabcdef', decode(repeat('00', 32), 'hex'), 'web', 'internal',
                 '{usage:admin}')",
    )
    .bind(acme.id)
    .execute(&owner)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("api_keys_scopes_known"), "{err}");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_partner_cannot_pre_claim_an_internal_event_id(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let at = meterbridge::testing::now().to_rfc3339();
    // The partner guesses the id the billing service will use, and sends it first.
    let partner = json!({"eventId": "order-1001", "metric": "integrations.webhooks.received",
                         "quantity": 1, "occurredAt": at, "correlationId": "partner-op"});
    let r = send(
        &app,
        fx.post(&fx.external.key, &json!({"events": [partner]})),
    )
    .await;
    assert_eq!(statuses(&r.body), ["accepted"]);
    let billing = json!({"eventId": "order-1001", "metric": "api.requests", "quantity": 7,
                         "occurredAt": at, "correlationId": "order-1001"});
    let r = fx.submit(&app, json!({"events": [billing.clone()]})).await;
    assert_eq!(statuses(&r.body), ["accepted"], "{}", r.body);
    // Its own resend is still a duplicate, and a changed resend a conflict.
    let r = fx.submit(&app, json!({"events": [billing.clone()]})).await;
    assert_eq!(statuses(&r.body), ["duplicate"]);
    let mut changed = billing.clone();
    changed["quantity"] = json!(8);
    let r = fx.submit(&app, json!({"events": [changed]})).await;
    assert_eq!(r.body["results"][0]["code"], "event_id_conflict");
    // The same idempotency key from another source is another event, too.
    let keyed = |id: &str, corr: &str| {
        json!({"eventId": id, "idempotencyKey": "charge-77", "metric": "sla.timers.started",
               "quantity": 1, "occurredAt": at, "correlationId": corr})
    };
    let r = send(
        &app,
        fx.post(&fx.external.key, &json!({"events": [keyed("p-1", "p-op")]})),
    )
    .await;
    assert_eq!(statuses(&r.body), ["accepted"]);
    let r = fx
        .submit(&app, json!({"events": [keyed("i-1", "i-op")]}))
        .await;
    assert_eq!(statuses(&r.body), ["accepted"], "{}", r.body);

    let r = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/events",
            &[("metric", "api.requests")],
        ),
    )
    .await;
    assert_eq!(r.body["events"][0]["quantity"], 7, "billing was stored");
    assert_eq!(fx.counter("api.requests").await, Some(7));
    assert_eq!(fx.stored_events().await, 4);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn event_ids_and_idempotency_keys_are_separate_key_spaces(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let mut a = fx.event(1, "api.requests", 1);
    a["eventId"] = json!("b");
    let mut b = fx.event(2, "api.requests", 2);
    b["eventId"] = json!("c");
    b["idempotencyKey"] = json!("b");
    // In one batch, and across batches, neither claims the other's key.
    let r = fx
        .submit(&app, json!({"events": [a.clone(), b.clone()]}))
        .await;
    assert_eq!(statuses(&r.body), ["accepted", "accepted"], "{}", r.body);
    let mut d = fx.event(3, "api.requests", 4);
    d["eventId"] = json!("d");
    d["idempotencyKey"] = json!("c");
    let r = fx.submit(&app, json!({"events": [d]})).await;
    assert_eq!(statuses(&r.body), ["accepted"], "{}", r.body);
    // A key equal to the event id is no key at all: the resend is a duplicate.
    let mut same = a.clone();
    same["idempotencyKey"] = json!("b");
    let r = fx.submit(&app, json!({"events": [same]})).await;
    assert_eq!(statuses(&r.body), ["duplicate"]);
    // An explicit key still deduplicates under another event id.
    let mut retried = b.clone();
    retried["eventId"] = json!("c-retry");
    let r = fx.submit(&app, json!({"events": [retried]})).await;
    assert_eq!(r.body["results"][0]["code"], "idempotency_key_conflict");
    assert_eq!(fx.counter("api.requests").await, Some(7));
}

/// The constraint change keeps every stored row valid, and a resend of an event stored before
/// it is still recognised as a duplicate.
#[sqlx::test(migrations = false)]
async fn rows_stored_before_the_key_change_stay_valid(owner: PgPool) {
    migrate_up_to(&owner, 2).await;
    let acme = create_tenant(&owner, "acme").await;
    // A key as the old schema stored it (no scopes column yet).
    sqlx::query(
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust)
         VALUES ($1, 'abcdefabcdef', decode(repeat('00', 32), 'hex'), 'crm', 'internal')",
    )
    .bind(acme.id)
    .execute(&owner)
    .await
    .unwrap();
    // Rows as the old code wrote them: the default key stored as the event id.
    for (event_id, key) in [("old-1", "old-1"), ("old-2", "explicit-2")] {
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at,
                 source_service, correlation_id, classification, idempotency_key, payload_hash)
             VALUES ($1, $2, 'api.requests', 1, now(), 'crm', $2, 'BILLABLE', $3,
                     decode(repeat('00', 32), 'hex'))",
        )
        .bind(acme.id)
        .bind(event_id)
        .bind(key)
        .execute(&owner)
        .await
        .unwrap();
    }
    meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT event_id, idempotency_key FROM usage_events ORDER BY event_id")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("old-1".to_owned(), None),
            ("old-2".to_owned(), Some("explicit-2".to_owned()))
        ]
    );
    let scopes: Vec<String> = sqlx::query_scalar("SELECT unnest(scopes) FROM api_keys")
        .fetch_all(&owner)
        .await
        .unwrap();
    assert_eq!(
        scopes.len(),
        meterbridge::domain::Scopes::default_for(Trust::Internal)
            .names()
            .len(),
        "an existing internal key keeps every right it had (usage:void came later)"
    );
}
