//! The payment routes against real PostgreSQL and moto: create (idempotent), read, list,
//! verify; tenants, scopes and hostile bodies.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use std::sync::Arc;

use common::{send, Fixture};
use meterbridge::domain::Trust;
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::{json, Value};
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn create_read_list_and_verify(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let created = fx.create_payment(&app, 4999, "pi_read").await;
    assert_eq!(created["status"], "PENDING");
    assert_eq!(created["amountMinor"], 4999);
    assert_eq!(created["currency"], "USD");
    assert_eq!(created["sourceService"], "billing");
    assert_eq!(created["version"], 1);
    let id = created["id"].as_str().unwrap();

    let r = send(&app, fx.get(&fx.reader.key, &format!("/v1/payments/{id}"))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"], created);

    let r = send(
        &app,
        fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "ops@shop", "verificationMethod": "bank_reconciliation",
                    "amountMinor": 4999, "currency": "usd"}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["outcome"], "applied");
    let verified = &r.body["payment"];
    assert_eq!(verified["status"], "PAID_VERIFIED");
    assert_eq!(verified["verifiedBy"], "ops@shop");
    assert_eq!(verified["verificationMethod"], "bank_reconciliation");
    assert_eq!(verified["version"], 2);

    // The event, in the same transaction: one outbox row with the documented envelope.
    let rows: Vec<(String, String, i32, Value)> = sqlx::query_as(
        "SELECT event_type, idempotency_key, aggregate_sequence, payload FROM outbox_events WHERE tenant_id = $1",
    )
    .bind(fx.tenant.id)
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let (event_type, key, sequence, envelope) = &rows[0];
    assert_eq!(event_type, "payment.paid");
    assert_eq!(key, &format!("payment-paid-{id}"));
    assert_eq!(*sequence, 1);
    for field in [
        "eventId",
        "eventType",
        "schemaVersion",
        "tenantId",
        "occurredAt",
        "correlationId",
        "idempotencyKey",
        "aggregateType",
        "aggregateId",
        "aggregateSequence",
        "data",
    ] {
        assert!(
            envelope.get(field).is_some(),
            "envelope lacks {field}: {envelope}"
        );
    }
    assert_eq!(envelope["tenantId"], fx.tenant.id.to_string());
    assert_eq!(envelope["data"]["paymentId"], id);
    assert_eq!(envelope["data"]["amountMinor"], 4999);
    assert_eq!(envelope["data"]["verifiedBy"], "ops@shop");
    assert_eq!(envelope["data"]["providerReference"], "pi_read");

    // Lists: newest first, by status, in keyset pages.
    for n in 0..4 {
        fx.create_payment(&app, 100 + n, &format!("pi_list_{n}"))
            .await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/payments?limit=2".to_owned();
    loop {
        let r = send(&app, fx.get(&fx.reader.key, &path)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        seen.extend(
            r.body["payments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["amountMinor"].as_i64().unwrap()),
        );
        match r.body["nextCursor"].as_str() {
            Some(cursor) => path = format!("/v1/payments?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, [103, 102, 101, 100, 4999]);
    let r = send(
        &app,
        fx.get(&fx.reader.key, "/v1/payments?status=PAID_VERIFIED"),
    )
    .await;
    assert_eq!(r.body["payments"].as_array().unwrap().len(), 1);
    for bad in [
        "/v1/payments?status=paid",
        "/v1/payments?limit=0",
        "/v1/payments?limit=101",
        "/v1/payments?cursor=garbage",
    ] {
        let r = send(&app, fx.get(&fx.reader.key, bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn tenants_keys_and_scopes(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let payment = fx.create_payment(&app, 2500, "pi_scope").await;
    let id = payment["id"].as_str().unwrap();
    let verify_body = json!({"verifiedBy": "x", "verificationMethod": "manual"}).to_string();
    let verify_path = format!("/v1/payments/{id}/verify");

    // Another tenant: its own key sees a 404 for this payment, indistinguishable from none.
    let globex = create_tenant(&owner, "globex").await;
    let globex_key = create_api_key(&owner, &globex, "billing", Trust::Internal).await;
    let r = send(&app, fx.get(&globex_key.key, &format!("/v1/payments/{id}"))).await;
    assert_eq!(r.status, 404);
    let missing = send(
        &app,
        fx.get(
            &globex_key.key,
            &format!("/v1/payments/{}", uuid::Uuid::now_v7()),
        ),
    )
    .await;
    assert_eq!(r.body["detail"], missing.body["detail"]);
    let r = send(
        &app,
        fx.request(
            "POST",
            &verify_path,
            Some(&globex_key.key),
            Some(&verify_body),
            &[],
        ),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = send(&app, fx.get(&globex_key.key, "/v1/payments")).await;
    assert_eq!(r.body["payments"], json!([]));

    // An external (partner) key: none of the payment routes.
    for (method, path, body) in [
        ("POST", verify_path.as_str(), Some(verify_body.as_str())),
        ("GET", "/v1/payments", None),
        ("POST", "/v1/payments", Some("{}")),
    ] {
        let r = send(
            &app,
            fx.request(method, path, Some(&fx.external.key), body, &[]),
        )
        .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
    }
    // A read-only key reads and changes nothing.
    let r = send(
        &app,
        fx.request(
            "POST",
            &verify_path,
            Some(&fx.reader.key),
            Some(&verify_body),
            &[],
        ),
    )
    .await;
    assert_eq!(r.status, 403);
    // No key, a bad key.
    let r = send(&app, fx.request("GET", "/v1/payments", None, None, &[])).await;
    assert_eq!(r.status, 401);
    let r = send(&app, fx.get("mbk_x", "/v1/payments")).await;
    assert_eq!(r.status, 401);

    let (status, version): (String, i32) =
        sqlx::query_as("SELECT status, version FROM payments WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!((status.as_str(), version), ("PENDING", 1));
    assert_eq!(fx.count("outbox_events").await, 0);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_idempotency_key_replays_or_refuses(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let body = json!({"amountMinor": 1200, "currency": "EUR", "provider": "stripe",
                      "providerReference": "pi_idem"})
    .to_string();
    let mut apps = Vec::new();
    for _ in 0..10 {
        apps.push(Arc::new(fx.app(&[("DB_MAX_CONNECTIONS", "1")]).await));
    }
    let requests = apps.iter().map(|app| {
        let app = Arc::clone(app);
        let request = fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&body),
            &[("idempotency-key", "order-77")],
        );
        tokio::spawn(async move { send(&app, request).await })
    });
    let replies: Vec<_> = futures::future::join_all(requests).await;
    let first = replies[0].as_ref().unwrap();
    for reply in &replies {
        let reply = reply.as_ref().unwrap();
        assert_eq!(reply.status, 201, "{}", reply.body);
        assert_eq!(
            reply.body, first.body,
            "every caller gets the same response"
        );
    }
    let replayed = replies
        .iter()
        .filter(|r| {
            r.as_ref()
                .unwrap()
                .headers
                .contains_key("idempotent-replayed")
        })
        .count();
    assert_eq!(replayed, 9);
    assert_eq!(fx.count("payments").await, 1);

    // The same key with another body: 409, nothing written.
    let app = &apps[0];
    let other = json!({"amountMinor": 1300, "currency": "EUR", "provider": "stripe"}).to_string();
    let r = send(
        app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&other),
            &[("idempotency-key", "order-77")],
        ),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    // The same key from another source service is another key.
    let other_source = create_api_key(&owner, &fx.tenant, "checkout", Trust::Internal).await;
    let r = send(
        app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&other_source.key),
            Some(&other),
            &[("idempotency-key", "order-77")],
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // A reused provider reference without a key: 409.
    let r = send(
        app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&body),
            &[],
        ),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(fx.count("payments").await, 2);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn hostile_bodies_are_4xx_and_write_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let payment = fx.create_payment(&app, 700, "pi_hostile").await;
    let verify = format!("/v1/payments/{}/verify", payment["id"].as_str().unwrap());
    let cases: Vec<(&str, String, u16)> = vec![
        ("/v1/payments", "not json".into(), 400),
        ("/v1/payments", "[]".into(), 400),
        ("/v1/payments", r#"{"amountMinor": 1, "amountMinor": 2}"#.into(), 400),
        ("/v1/payments", json!({}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 0, "currency": "USD", "provider": "stripe"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": -5, "currency": "USD", "provider": "stripe"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1.5, "currency": "USD", "provider": "stripe"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": u64::MAX, "currency": "USD", "provider": "stripe"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "XXX", "provider": "stripe"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "USD", "provider": "Stripe!"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "USD", "provider": "stripe", "status": "PAID_VERIFIED"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "USD", "provider": "stripe", "providerReference": "a\u{0}b"}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "USD", "provider": "stripe", "metadata": {"k": "\u{0}"}}).to_string(), 422),
        ("/v1/payments", json!({"amountMinor": 1, "currency": "USD", "provider": "stripe", "metadata": {"k": "x".repeat(5000)}}).to_string(), 422),
        ("/v1/payments", format!("{{\"x\":\"{}\"}}", "x".repeat(70_000)), 413),
        (&verify, json!({}).to_string(), 422),
        (&verify, json!({"verifiedBy": "a", "verificationMethod": "provider_webhook"}).to_string(), 422),
        (&verify, json!({"verifiedBy": "", "verificationMethod": "manual"}).to_string(), 422),
        (&verify, json!({"verifiedBy": "a", "verificationMethod": "manual", "amountMinor": "5"}).to_string(), 422),
        (&verify, json!({"verifiedBy": "a", "verificationMethod": "manual", "currency": "dollars"}).to_string(), 422),
    ];
    for (path, body, status) in &cases {
        let r = send(
            &app,
            fx.request("POST", path, Some(&fx.internal.key), Some(body), &[]),
        )
        .await;
        assert_eq!(r.status.as_u16(), *status, "{path} {body:.80}: {}", r.body);
        assert!(r.body["type"].as_str().unwrap().starts_with("https://"));
    }
    let r = send(
        &app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(r#"{"amountMinor": 1}"#),
            &[("idempotency-key", "bad key with spaces")],
        ),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(fx.count("payments").await, 1);
    assert_eq!(fx.count("outbox_events").await, 0);
    assert_eq!(fx.count("payment_audit").await, 1, "only the creation");
}

/// PostgreSQL prints a jsonb number in full (f64::MIN as 309 digits): each reads back as the very
/// number that was sent, never as a 500.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn extreme_numbers_in_metadata_read_back_exactly(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let numbers = json!([
        f64::MIN,
        f64::MAX,
        f64::MIN_POSITIVE,
        -1.1125369292536007e-308,
        5e-324,
        -2.569587061155835e-63,
        2.635626519948063e30,
        -87178291200i64,
        i64::MIN,
        u64::MAX
    ]);
    let body = json!({
        "amountMinor": 100_000_000_000_000i64, "currency": "CLP", "provider": "zj",
        "metadata": {"numbers": numbers, "nested": {"min": f64::MIN}},
    });
    let r = send(
        &app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&body.to_string()),
            &[("idempotency-key", "extreme-1")],
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["payment"]["metadata"], body["metadata"]);
    let id = r.body["payment"]["id"].as_str().unwrap().to_owned();
    let read = send(
        &app,
        fx.request(
            "GET",
            &format!("/v1/payments/{id}"),
            Some(&fx.internal.key),
            None,
            &[],
        ),
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body["payment"]["metadata"], body["metadata"]);
    let replay = send(
        &app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&body.to_string()),
            &[("idempotency-key", "extreme-1")],
        ),
    )
    .await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.body["payment"]["metadata"], body["metadata"]);
    assert_eq!(fx.count("payments").await, 1);
}
