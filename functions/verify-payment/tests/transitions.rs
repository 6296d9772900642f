//! The state machine through every route that drives it, under concurrency and faults: one
//! transition per fact, one event per transition, and never one without the other.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use std::sync::Arc;

use common::{send, Fixture};
use serde_json::{json, Value};
use sqlx::PgPool;
use verify_payment::App;

/// How a test drives a payment.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// POST /v1/payments/{id}/verify with an internal key.
    VerifyRoute,
    /// Stripe `payment_intent.succeeded`.
    WebhookSucceeded,
    /// Stripe `payment_intent.payment_failed` (one attempt failed).
    WebhookFailed,
    /// Stripe `payment_intent.canceled`.
    WebhookCanceled,
    /// Stripe `charge.refunded`, in full.
    WebhookRefunded,
}

async fn act(fx: &Fixture, app: &App, payment: &Value, act: Act, n: usize) -> common::Reply {
    let id = payment["id"].as_str().unwrap();
    let reference = payment["providerReference"].as_str().unwrap();
    let amount = payment["amountMinor"].as_i64().unwrap();
    let event_id = format!("evt_{}_{n}", fx.run);
    let request = match act {
        Act::VerifyRoute => fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "finance-bot", "verificationMethod": "provider_api"}),
        ),
        Act::WebhookSucceeded => {
            fx.webhook(&fx.stripe_event(&event_id, "payment_intent.succeeded", reference, amount))
        }
        Act::WebhookFailed => fx.webhook(&fx.stripe_event(
            &event_id,
            "payment_intent.payment_failed",
            reference,
            amount,
        )),
        Act::WebhookCanceled => {
            fx.webhook(&fx.stripe_event(&event_id, "payment_intent.canceled", reference, amount))
        }
        Act::WebhookRefunded => {
            fx.webhook(&fx.stripe_event(&event_id, "charge.refunded", reference, amount))
        }
    };
    send(app, request).await
}

fn from_static(status: &str) -> &'static str {
    ["PENDING", "PAID_VERIFIED", "FAILED", "CANCELED", "REFUNDED"]
        .into_iter()
        .find(|s| *s == status)
        .unwrap()
}

async fn state(fx: &Fixture, id: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, version FROM payments WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&fx.owner)
        .await
        .unwrap()
}

async fn events_of(fx: &Fixture, id: &str) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT event_type, aggregate_sequence FROM outbox_events
          WHERE aggregate_id = $1::uuid ORDER BY aggregate_sequence",
    )
    .bind(id)
    .fetch_all(&fx.owner)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_state_and_action_through_the_routes(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    // (from, the acts that lead there)
    let setups: [(&str, &[Act]); 5] = [
        ("PENDING", &[]),
        ("PAID_VERIFIED", &[Act::VerifyRoute]),
        ("FAILED", &[Act::WebhookFailed]),
        ("CANCELED", &[Act::WebhookCanceled]),
        ("REFUNDED", &[Act::WebhookSucceeded, Act::WebhookRefunded]),
    ];
    // (from, act) → (HTTP status, status after, event published). A provider's report that
    // comes too late (the payment moved past it) is acknowledged with 200 and changes nothing;
    // one that comes too early (a refund before the payment) is refused, so it is retried.
    let expected = |from: &str, act: Act| -> (u16, &'static str, Option<&'static str>) {
        use Act::*;
        match (from, act) {
            ("PENDING" | "FAILED" | "CANCELED", VerifyRoute | WebhookSucceeded) => {
                (200, "PAID_VERIFIED", Some("payment.paid"))
            }
            ("PENDING" | "FAILED", WebhookFailed) => (200, "FAILED", Some("payment.failed")),
            ("PENDING" | "FAILED", WebhookCanceled) => (200, "CANCELED", Some("payment.canceled")),
            (_, WebhookRefunded) if from != "PAID_VERIFIED" && from != "REFUNDED" => {
                (409, from_static(from), None)
            }
            ("PAID_VERIFIED", VerifyRoute | WebhookSucceeded | WebhookFailed | WebhookCanceled) => {
                (200, "PAID_VERIFIED", None)
            }
            ("PAID_VERIFIED", WebhookRefunded) => (200, "REFUNDED", Some("payment.refunded")),
            ("CANCELED", WebhookFailed | WebhookCanceled) => (200, "CANCELED", None),
            // An internal caller is told it is too late; the provider is acknowledged.
            ("REFUNDED", VerifyRoute) => (409, "REFUNDED", None),
            ("REFUNDED", _) => (200, "REFUNDED", None),
            _ => unreachable!("{from} {act:?}"),
        }
    };
    let mut n = 0;
    for (from, path) in setups {
        for action in [
            Act::VerifyRoute,
            Act::WebhookSucceeded,
            Act::WebhookFailed,
            Act::WebhookCanceled,
            Act::WebhookRefunded,
        ] {
            n += 1;
            let payment = fx
                .create_payment(&app, 1000 + n as i64, &format!("pi_{}_{n}", fx.run))
                .await;
            let id = payment["id"].as_str().unwrap().to_owned();
            for (step, setup) in path.iter().enumerate() {
                let r = act(&fx, &app, &payment, *setup, 100 * n + step).await;
                assert_eq!(r.status, 200, "set-up {setup:?}: {}", r.body);
            }
            assert_eq!(state(&fx, &id).await.0, from);
            let events_before = events_of(&fx, &id).await;
            let audit_before: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM payment_audit WHERE payment_id = $1::uuid",
            )
            .bind(&id)
            .fetch_one(&owner)
            .await
            .unwrap();

            let r = act(&fx, &app, &payment, action, 100 * n + 50).await;
            let (status, after, event) = expected(from, action);
            assert_eq!(r.status, status, "{from} × {action:?}: {}", r.body);
            assert_eq!(state(&fx, &id).await.0, after, "{from} × {action:?}");
            let events = events_of(&fx, &id).await;
            match event {
                Some(kind) => {
                    assert_eq!(events.len(), events_before.len() + 1, "{from} × {action:?}");
                    assert_eq!(
                        events.last().unwrap(),
                        &(kind.to_owned(), events.len() as i32),
                        "the event and its sequence"
                    );
                }
                None => assert_eq!(events, events_before, "{from} × {action:?}: no event"),
            }
            let audit_after: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM payment_audit WHERE payment_id = $1::uuid",
            )
            .bind(&id)
            .fetch_one(&owner)
            .await
            .unwrap();
            assert_eq!(
                audit_after,
                audit_before + 1,
                "{from} × {action:?}: audited"
            );
        }
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn twenty_concurrent_verifications_make_one_transition(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let mut apps = Vec::new();
    for _ in 0..5 {
        apps.push(Arc::new(fx.app(&[("DB_MAX_CONNECTIONS", "2")]).await));
    }
    let reference = format!("pi_{}_race", fx.run);
    let payment = fx.create_payment(&apps[0], 8800, &reference).await;
    let id = payment["id"].as_str().unwrap().to_owned();
    let requests = (0..20).map(|n| {
        let app = Arc::clone(&apps[n % apps.len()]);
        let request = if n % 2 == 0 {
            fx.post(
                &format!("/v1/payments/{id}/verify"),
                &json!({"verifiedBy": format!("clerk-{n}"), "verificationMethod": "manual",
                        "amountMinor": 8800}),
            )
        } else {
            fx.webhook(&fx.stripe_event(
                &format!("evt_{}_{n}", fx.run),
                "payment_intent.succeeded",
                &reference,
                8800,
            ))
        };
        tokio::spawn(async move { send(&app, request).await })
    });
    let replies: Vec<Value> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
        })
        .collect();
    let applied = replies.iter().filter(|r| r["outcome"] == "applied").count();
    assert_eq!(applied, 1, "exactly one transition");
    let verification = |r: &Value| {
        (
            r["payment"]["verifiedAt"].clone(),
            r["payment"]["verifiedBy"].clone(),
            r["payment"]["verificationMethod"].clone(),
        )
    };
    assert!(
        replies
            .iter()
            .all(|r| verification(r) == verification(&replies[0])),
        "every caller sees the same verification"
    );
    assert_eq!(state(&fx, &id).await, ("PAID_VERIFIED".to_owned(), 2));
    assert_eq!(events_of(&fx, &id).await, [("payment.paid".to_owned(), 1)]);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payment_audit WHERE payment_id = $1::uuid AND action = 'verify'",
    )
    .bind(&id)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(audited, 20, "every attempt audited, one accepted");
}

/// The outbox insert fails after the payment update: neither is kept.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_failed_outbox_insert_rolls_the_payment_back(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let payment = fx.create_payment(&app, 300, "pi_atomic").await;
    let id = payment["id"].as_str().unwrap().to_owned();
    // Test-only: the outbox refuses every row.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'outbox unavailable (test)'; END $$;
         CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox_events
           FOR EACH ROW EXECUTE FUNCTION refuse_outbox();",
    )
    .execute(&owner)
    .await
    .unwrap();
    let verify = || {
        fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "ops", "verificationMethod": "manual"}),
        )
    };
    let r = send(&app, verify()).await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.body["code"], "internal_error");
    assert_eq!(state(&fx, &id).await, ("PENDING".to_owned(), 1));
    assert_eq!(fx.count("outbox_events").await, 0);
    assert_eq!(fx.count("payment_audit").await, 1, "only the creation");

    sqlx::query("DROP TRIGGER refuse_outbox ON outbox_events")
        .execute(&owner)
        .await
        .unwrap();
    let r = send(&app, verify()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(state(&fx, &id).await, ("PAID_VERIFIED".to_owned(), 2));
    assert_eq!(events_of(&fx, &id).await.len(), 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn amount_and_currency_must_match(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let payment = fx.create_payment(&app, 5000, "pi_mismatch").await;
    let id = payment["id"].as_str().unwrap().to_owned();
    for body in [
        json!({"verifiedBy": "ops", "verificationMethod": "manual", "amountMinor": 4999}),
        json!({"verifiedBy": "ops", "verificationMethod": "manual", "currency": "EUR"}),
        json!({"verifiedBy": "ops", "verificationMethod": "manual", "providerReference": "pi_other"}),
    ] {
        let r = send(&app, fx.post(&format!("/v1/payments/{id}/verify"), &body)).await;
        assert_eq!(r.status, 409, "{body}: {}", r.body);
    }
    let r = send(
        &app,
        fx.webhook(&fx.stripe_event("evt_low", "payment_intent.succeeded", "pi_mismatch", 4000)),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(state(&fx, &id).await, ("PENDING".to_owned(), 1));
    assert_eq!(fx.count("outbox_events").await, 0);
    let refused: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM payment_audit WHERE payment_id = $1::uuid AND NOT accepted ORDER BY id",
    )
    .bind(&id)
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(
        refused,
        [
            "amount_mismatch",
            "currency_mismatch",
            "reference_mismatch",
            "amount_mismatch"
        ]
    );
}
