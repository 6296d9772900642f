//! No payer's or end user's data in the logs: a payment with a marker provider reference,
//! description and metadata — created, replayed, read, listed, verified, refused, and settled by
//! a signed webhook — through the real handler with every level on (`RUST_LOG=trace`), and the
//! captured log lines searched for the markers.
#![allow(clippy::unwrap_used)]

mod common;

use common::{send, Fixture};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn no_payment_reference_description_or_metadata_reaches_the_logs_at_trace(owner: PgPool) {
    let logs = meterbridge::testing::capture_logs("trace");
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let reference = "pi_reference_4c1d7e_marker";
    let description = "description-9b2f0a-marker";
    let metadata = "metadata-value-e83d51-marker";
    let body = json!({"amountMinor": 1250, "currency": "USD", "provider": "stripe",
                      "providerReference": reference, "description": description,
                      "metadata": {"customer": metadata}});

    // Created with an Idempotency-Key.
    let create = |body: &serde_json::Value| {
        fx.request(
            "POST",
            "/v1/payments",
            Some(&fx.internal.key),
            Some(&body.to_string()),
            &[("idempotency-key", "logs-test-create")],
        )
    };
    let created = send(&app, create(&body)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["payment"]["id"].as_str().unwrap().to_owned();
    // Replayed (the stored response), and a conflicting reuse of the key.
    let replay = send(&app, create(&body)).await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    let mut other = body.clone();
    other["amountMinor"] = json!(99);
    let conflict = send(&app, create(&other)).await;
    assert!(conflict.status.is_client_error(), "{}", conflict.body);
    // An invalid one that echoes the reference in no log either.
    let mut invalid = body.clone();
    invalid["currency"] = json!("NOT-A-CURRENCY");
    let refused = send(&app, fx.post("/v1/payments", &invalid)).await;
    assert_eq!(refused.status, 422, "{}", refused.body);

    for path in [format!("/v1/payments/{id}"), "/v1/payments".to_owned()] {
        let read = send(&app, fx.get(&fx.reader.key, &path)).await;
        assert_eq!(read.status, 200, "{}", read.body);
    }
    // Verified with a wrong amount (refused), then settled by the provider's signed webhook.
    let wrong = send(
        &app,
        fx.post(
            &format!("/v1/payments/{id}/verify"),
            &json!({"verifiedBy": "ops", "verificationMethod": "manual", "amountMinor": 1,
                    "currency": "usd"}),
        ),
    )
    .await;
    assert!(wrong.status.is_client_error(), "{}", wrong.body);
    let event = fx.stripe_event(
        "evt_logs_marker_test",
        "payment_intent.succeeded",
        reference,
        1250,
    );
    let settled = send(&app, fx.webhook(&event)).await;
    assert_eq!(settled.status, 200, "{}", settled.body);
    let read = send(&app, fx.get(&fx.reader.key, &format!("/v1/payments/{id}"))).await;
    assert_eq!(
        read.body["payment"]["status"], "PAID_VERIFIED",
        "{}",
        read.body
    );

    let text = logs.text();
    assert!(text.contains(&fx.tenant.id.0.to_string()), "{text}");
    assert!(text.lines().count() > 10, "{text}");
    assert!(
        text.contains(r#""level":"TRACE""#) && text.contains(r#""level":"DEBUG""#),
        "every level is captured: {text}"
    );
    for marker in [reference, description, metadata] {
        let leaked: Vec<&str> = text.lines().filter(|l| l.contains(marker)).collect();
        assert!(leaked.is_empty(), "{marker} logged: {leaked:#?}");
    }
}
