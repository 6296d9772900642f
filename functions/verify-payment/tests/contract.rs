//! `openapi.yaml` is the published contract of this function: it lists exactly the routes the
//! router serves, as does `template.yaml`, and its request examples are the fixtures in
//! `events/verify-payment/`. Schemathesis checks the rest against the running stack
//! (scripts/schemathesis.sh).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{send, Fixture};

use meterbridge::testing::contract;
use serde_json::json;
use verify_payment::routes::{route, Route};

#[test]
fn the_spec_and_the_template_list_exactly_the_routes_of_the_router() {
    contract::check_router(
        &["payments", "webhooks"],
        "VerifyPaymentFunction",
        &Route::KEYS,
        |m, p| route(m, p).map(|r| r.key()),
    );
}

/// Nothing is in the spec or behind the HTTP API but the two API functions' routes (the usage
/// routes are checked by ingest-usage's tests/contract.rs).
#[test]
fn the_spec_and_the_template_hold_nothing_else() {
    let spec = contract::openapi();
    let tagged = contract::spec_routes(&spec, &["usage", "payments", "webhooks"]);
    let all: BTreeSet<String> = contract::operations(&spec).into_keys().collect();
    assert_eq!(tagged, all, "an operation outside the two functions' tags");
    let functions: BTreeSet<String> = contract::template_routes().into_keys().collect();
    assert_eq!(
        functions,
        BTreeSet::from(["IngestUsageFunction".into(), "VerifyPaymentFunction".into()])
    );
}

#[test]
fn request_examples_are_the_fixtures() {
    let spec = contract::openapi();
    let checked = contract::check_fixture_examples(&spec, "events/verify-payment", &Route::KEYS);
    assert!(checked >= 2, "{checked} examples");
}

/// Schemathesis (seed 20261125, webhooks signed by scripts/schemathesis_hooks.py) sent a signed
/// event whose `type` is 129 characters long: the event log's CHECK refused it and the route
/// answered 500. An empty or over-long type is now a 400, and nothing is written.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_signed_event_with_an_empty_or_overlong_type_is_a_400(owner: sqlx::PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.create_payment(&app, 4999, "pi_example").await;
    for kind in [String::new(), "0".repeat(129), "é".repeat(129)] {
        let body = fx.stripe_event("evt_example", &kind, "pi_example", 4999);
        let r = send(&app, fx.webhook(&body)).await;
        assert_eq!(r.status, 400, "{}: {}", kind.len(), r.body);
        assert_eq!(r.body["code"], "malformed_request");
    }
    assert_eq!(fx.count("webhook_events").await, 0);
    // 128 characters (of two bytes each) is a type, just not one we act on.
    let body = fx.stripe_event("evt_example", &"é".repeat(128), "pi_example", 4999);
    let r = send(&app, fx.webhook(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["outcome"], "ignored");
    assert_eq!(fx.count("outbox_events").await, 0);
}

/// Found reading the code for the spec, where Schemathesis' stateful runs could reach it:
/// verifying a payment that has no provider reference with one another payment already holds
/// broke the unique index and answered 500. It is a 409 (audited), and nothing changes.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn recording_a_reference_another_payment_holds_is_a_409(owner: sqlx::PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.create_payment(&app, 1000, "pi_taken").await;
    let r = send(
        &app,
        fx.post(
            "/v1/payments",
            &json!({"amountMinor": 2000, "currency": "USD", "provider": "stripe"}),
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["payment"]["id"].as_str().unwrap().to_owned();

    let verify = json!({"verifiedBy": "ops", "verificationMethod": "manual",
                        "providerReference": "pi_taken"});
    let r = send(&app, fx.post(&format!("/v1/payments/{id}/verify"), &verify)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("reference_in_use"));
    let r = send(
        &app,
        fx.get(&fx.internal.key, &format!("/v1/payments/{id}")),
    )
    .await;
    assert_eq!(r.body["payment"]["status"], "PENDING");
    assert_eq!(
        r.body["payment"]["providerReference"],
        serde_json::Value::Null
    );
    assert_eq!(fx.count("outbox_events").await, 0);

    // Its own new reference is recorded with the verification.
    let verify = json!({"verifiedBy": "ops", "verificationMethod": "manual",
                        "providerReference": "pi_own"});
    let r = send(&app, fx.post(&format!("/v1/payments/{id}/verify"), &verify)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"]["providerReference"], "pi_own");
}

/// The reference check is the tenant's own: another tenant's payment with the same reference
/// neither blocks the verification nor shows through it.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn another_tenants_reference_does_not_block_a_verification(owner: sqlx::PgPool) {
    use meterbridge::domain::Trust;
    use meterbridge::testing::{create_api_key, create_tenant};
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let globex = create_tenant(&owner, "globex").await;
    let globex_key = create_api_key(&owner, &globex, "billing", Trust::Internal).await;
    let body = json!({"amountMinor": 700, "currency": "USD", "provider": "stripe",
                      "providerReference": "pi_shared"})
    .to_string();
    let r = send(
        &app,
        fx.request(
            "POST",
            "/v1/payments",
            Some(&globex_key.key),
            Some(&body),
            &[],
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);

    let r = send(
        &app,
        fx.post(
            "/v1/payments",
            &json!({"amountMinor": 700, "currency": "USD", "provider": "stripe"}),
        ),
    )
    .await;
    let id = r.body["payment"]["id"].as_str().unwrap().to_owned();
    let verify = json!({"verifiedBy": "ops", "verificationMethod": "manual",
                        "providerReference": "pi_shared"});
    let r = send(&app, fx.post(&format!("/v1/payments/{id}/verify"), &verify)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"]["providerReference"], "pi_shared");
}
