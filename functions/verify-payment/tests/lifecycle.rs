//! Payments follow the provider's lifecycle (Stripe's PaymentIntent): a failed attempt is
//! recorded, not final; a signed success after failures verifies the payment; deliveries in any
//! order end in the right state; and an aggregate's event sequence keeps counting after the
//! relay's retention has deleted its earlier events.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Fixture};
use serde_json::{json, Value};
use sqlx::PgPool;
use verify_payment::App;

/// A Stripe event of `kind` for `reference`, with `object` fields merged in, signed and sent.
async fn deliver(
    fx: &Fixture,
    app: &App,
    event_id: &str,
    kind: &str,
    reference: &str,
    extra: Value,
) -> common::Reply {
    let mut event: Value =
        serde_json::from_str(&fx.stripe_event(event_id, kind, reference, 2500)).unwrap();
    if let (Some(object), Value::Object(extra)) = (event["data"]["object"].as_object_mut(), extra) {
        object.extend(extra);
    }
    send(app, fx.webhook(&event.to_string())).await
}

async fn payment(fx: &Fixture, app: &App, id: &str) -> Value {
    let r = send(app, fx.get(&fx.internal.key, &format!("/v1/payments/{id}"))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["payment"].clone()
}

async fn events_of(fx: &Fixture, id: &str) -> Vec<(String, i32, Value)> {
    sqlx::query_as(
        "SELECT event_type, aggregate_sequence, payload FROM outbox_events
          WHERE aggregate_id = $1::uuid ORDER BY aggregate_sequence",
    )
    .bind(id)
    .fetch_all(&fx.owner)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_failed_attempt_is_recorded_and_a_later_success_verifies(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let reference = format!("pi_{}", fx.run);
    let created = fx.create_payment(&app, 2500, &reference).await;
    let id = created["id"].as_str().unwrap().to_owned();

    let declined = json!({"last_payment_error": {"code": "card_declined",
                                                 "decline_code": "insufficient_funds"}});
    let r = deliver(
        &fx,
        &app,
        "evt_f1",
        "payment_intent.payment_failed",
        &reference,
        declined,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"]["status"], "FAILED");
    assert_eq!(r.body["payment"]["failedAttempts"], 1);
    assert_eq!(r.body["payment"]["lastFailure"], "insufficient_funds");
    // The customer tries another card, which fails too: counted again.
    let expired = json!({"last_payment_error": {"code": "expired_card"}});
    let r = deliver(
        &fx,
        &app,
        "evt_f2",
        "payment_intent.payment_failed",
        &reference,
        expired,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"]["failedAttempts"], 2);
    assert_eq!(r.body["payment"]["lastFailure"], "expired_card");
    // Then a third card works: the signed success verifies the payment, on every retry too.
    for attempt in 0..3 {
        let r = deliver(
            &fx,
            &app,
            "evt_ok",
            "payment_intent.succeeded",
            &reference,
            json!({}),
        )
        .await;
        assert_eq!(r.status, 200, "attempt {attempt}: {}", r.body);
    }
    let paid = payment(&fx, &app, &id).await;
    assert_eq!(paid["status"], "PAID_VERIFIED");
    assert_eq!(paid["verificationMethod"], "provider_webhook");
    assert_eq!(paid["failedAttempts"], 2);
    let events = events_of(&fx, &id).await;
    let kinds: Vec<(&str, i32)> = events.iter().map(|(k, s, _)| (k.as_str(), *s)).collect();
    assert_eq!(
        kinds,
        [
            ("payment.failed", 1),
            ("payment.failed", 2),
            ("payment.paid", 3)
        ]
    );
    assert_eq!(events[1].2["data"]["failedAttempts"], 2);
    assert_eq!(events[1].2["data"]["lastFailure"], "expired_card");
    assert_ne!(
        events[0].2["idempotencyKey"], events[1].2["idempotencyKey"],
        "each failed attempt is its own fact"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn deliveries_out_of_order_end_in_the_right_state(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let audit = |id: String| {
        let owner = owner.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM payment_audit WHERE payment_id = $1::uuid",
            )
            .bind(id)
            .fetch_one(&owner)
            .await
            .unwrap()
        }
    };

    // `succeeded` before `processing`, then an earlier attempt's `payment_failed`, delivered
    // last: the payment stays paid, and the late failure is acknowledged once.
    let reference = format!("pi_{}_a", fx.run);
    let id = fx.create_payment(&app, 2500, &reference).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = deliver(
        &fx,
        &app,
        "evt_a1",
        "payment_intent.succeeded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    let r = deliver(
        &fx,
        &app,
        "evt_a2",
        "payment_intent.processing",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), &r.body["outcome"]),
        (200, &json!("ignored"))
    );
    let before = audit(id.clone()).await;
    for _ in 0..3 {
        let r = deliver(
            &fx,
            &app,
            "evt_a3",
            "payment_intent.payment_failed",
            &reference,
            json!({}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(
        audit(id.clone()).await,
        before + 1,
        "audited once, not per retry"
    );
    let r = deliver(
        &fx,
        &app,
        "evt_a4",
        "payment_intent.payment_failed",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["outcome"], "stale", "{}", r.body);
    assert_eq!(r.body["reason"], "payment_already_verified");
    assert_eq!(payment(&fx, &app, &id).await["status"], "PAID_VERIFIED");
    assert_eq!(events_of(&fx, &id).await.len(), 1, "only payment.paid");

    // A full refund delivered before the success it refunds: refused (the provider retries),
    // then the success, then the retried refund.
    let reference = format!("pi_{}_b", fx.run);
    let id = fx.create_payment(&app, 2500, &reference).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = deliver(
        &fx,
        &app,
        "evt_b1",
        "charge.refunded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = deliver(
        &fx,
        &app,
        "evt_b2",
        "payment_intent.succeeded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    let r = deliver(
        &fx,
        &app,
        "evt_b1",
        "charge.refunded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    assert_eq!(payment(&fx, &app, &id).await["status"], "REFUNDED");

    // Canceled, then a signed success (the money arrived after all): paid.
    let reference = format!("pi_{}_c", fx.run);
    let id = fx.create_payment(&app, 2500, &reference).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = deliver(
        &fx,
        &app,
        "evt_c1",
        "payment_intent.canceled",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["payment"]["status"], "CANCELED", "{}", r.body);
    let r = deliver(
        &fx,
        &app,
        "evt_c2",
        "payment_intent.succeeded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["payment"]["status"], "PAID_VERIFIED", "{}", r.body);
    let kinds: Vec<String> = events_of(&fx, &id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["payment.canceled", "payment.paid"]);
}

/// The relay deletes published events after its retention; the next event of the payment
/// still takes the next number.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_event_sequence_survives_outbox_retention(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let reference = format!("pi_{}", fx.run);
    let id = fx.create_payment(&app, 2500, &reference).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = deliver(
        &fx,
        &app,
        "evt_1",
        "payment_intent.succeeded",
        &reference,
        json!({}),
    )
    .await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    assert_eq!(events_of(&fx, &id).await[0].1, 1);
    // Published, then past the retention: deleted, as the relay's retention does.
    sqlx::query(
        "UPDATE outbox_events SET status = 'PUBLISHED', published_at = now() - interval '8 days'
          WHERE aggregate_id = $1::uuid",
    )
    .bind(&id)
    .execute(&owner)
    .await
    .unwrap();
    sqlx::query("DELETE FROM outbox_events WHERE aggregate_id = $1::uuid")
        .bind(&id)
        .execute(&owner)
        .await
        .unwrap();

    let r = deliver(&fx, &app, "evt_2", "charge.refunded", &reference, json!({})).await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    let events = events_of(&fx, &id).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0.as_str(), events[0].1), ("payment.refunded", 2));
    assert_eq!(events[0].2["aggregateSequence"], 2);
}
