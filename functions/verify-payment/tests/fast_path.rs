//! The fast path: a verification publishes its own `payment.paid` right after the commit (the
//! scheduled relay is the safety net), and a failing EventBridge never fails the request.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use common::{send, Fixture};
use meterbridge::testing::Bus;
use serde_json::json;
use sqlx::PgPool;

async fn outbox_status(fx: &Fixture, payment: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM outbox_events WHERE aggregate_id = $1::uuid")
        .bind(payment)
        .fetch_one(&fx.owner)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_verification_is_published_at_once(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let bus = Bus::create(true).await;
    let app = fx.app(&[("EVENT_BUS_NAME", &bus.name)]).await;
    let payment = fx.create_payment(&app, 1234, "pi_fast").await;
    let id = payment["id"].as_str().unwrap();
    let r = send(
        &app,
        fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "ops", "verificationMethod": "manual"}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(outbox_status(&fx, id).await, ("PUBLISHED".to_owned(), 1));
    let delivered = bus.drain().await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["detail-type"], "payment.paid");
    assert_eq!(delivered[0]["detail"]["data"]["paymentId"], id);

    // By webhook too.
    fx.create_payment(&app, 99, "pi_fast_hook").await;
    let r = send(
        &app,
        fx.webhook(&fx.stripe_event(
            "evt_fast",
            "payment_intent.payment_failed",
            "pi_fast_hook",
            99,
        )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let delivered = bus.drain().await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["detail-type"], "payment.failed");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_failing_eventbridge_leaves_the_event_to_the_relay(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    // A bus that does not exist: every PutEvents call fails.
    let app = fx.app(&[("EVENT_BUS_NAME", "no-such-bus")]).await;
    let payment = fx.create_payment(&app, 500, "pi_slow").await;
    let id = payment["id"].as_str().unwrap();
    let r = send(
        &app,
        fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "ops", "verificationMethod": "manual"}),
        ),
    )
    .await;
    assert_eq!(
        r.status, 200,
        "the request never fails for the fast path: {}",
        r.body
    );
    assert_eq!(r.body["payment"]["status"], "PAID_VERIFIED");
    let (status, _) = outbox_status(&fx, id).await;
    assert_eq!(status, "PENDING", "given back, due at once, for the relay");
    let due: bool = sqlx::query_scalar(
        "SELECT next_attempt_at <= now() AND claim_token IS NULL FROM outbox_events
          WHERE aggregate_id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert!(due);
}
