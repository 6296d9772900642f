//! Stripe webhooks: the signature scheme end to end (moto holds the signing secrets), replays,
//! rotation, and what a caller without the secret learns: nothing.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use common::{now, send, Fixture};
use meterbridge::testing::create_tenant;
use serde_json::Value;
use sqlx::PgPool;

async fn status_of(fx: &Fixture, reference: &str) -> String {
    sqlx::query_scalar("SELECT status FROM payments WHERE provider_reference = $1")
        .bind(reference)
        .fetch_one(&fx.owner)
        .await
        .unwrap()
}

async fn refusals(fx: &Fixture) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT reason FROM payment_audit WHERE tenant_id = $1 AND action = 'webhook' ORDER BY id",
    )
    .bind(fx.tenant.id)
    .fetch_all(&fx.owner)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn only_a_valid_fresh_signature_is_accepted(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.create_payment(&app, 2000, "pi_sig").await;
    let body = fx.stripe_event("evt_sig", "payment_intent.succeeded", "pi_sig", 2000);
    let t = now();
    let tampered = body.replace("2000", "2001");
    let cases: Vec<(&str, lambda_http::Request, &str)> = vec![
        (
            "wrong secret",
            fx.webhook_signed(&body, "whsec_not_the_tenants", t),
            "bad_signature",
        ),
        (
            "stale timestamp",
            fx.webhook_signed(&body, &fx.signing_secret, t - 301),
            "stale_signature",
        ),
        (
            "future timestamp",
            // A minute past the tolerance: the handler's clock runs on while the cases before
            // it are sent (one second of margin flaked on a loaded machine).
            fx.webhook_signed(&body, &fx.signing_secret, t + 360),
            "future_signature",
        ),
        (
            "tampered body",
            fx.webhook_with_header(
                &tampered,
                Some(&verify_payment::signature::sign(
                    &fx.signing_secret,
                    t,
                    body.as_bytes(),
                )),
            ),
            "bad_signature",
        ),
        (
            "missing header",
            fx.webhook_with_header(&body, None),
            "missing_signature",
        ),
        (
            "garbled header",
            fx.webhook_with_header(&body, Some("t=now,v1=xyz")),
            "malformed_signature",
        ),
    ];
    let mut expected_reasons = Vec::new();
    let mut details = Vec::new();
    for (name, request, reason) in cases {
        let r = send(&app, request).await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert!(r.headers.contains_key("www-authenticate"), "{name}");
        details.push(r.body["detail"].clone());
        expected_reasons.push(reason.to_owned());
    }
    assert!(
        details.iter().all(|d| *d == details[0]),
        "one answer for all"
    );
    assert_eq!(status_of(&fx, "pi_sig").await, "PENDING", "nothing changed");
    assert_eq!(
        refusals(&fx).await,
        expected_reasons,
        "each refusal audited"
    );
    assert_eq!(fx.count("outbox_events").await, 0);
    assert_eq!(fx.count("webhook_events").await, 0);

    let r = send(&app, fx.webhook(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["outcome"], "applied");
    assert_eq!(r.body["payment"]["verificationMethod"], "provider_webhook");
    assert_eq!(status_of(&fx, "pi_sig").await, "PAID_VERIFIED");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_replayed_event_changes_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.create_payment(&app, 900, "pi_replay").await;
    let paid = fx.stripe_event("evt_replay", "payment_intent.succeeded", "pi_replay", 900);
    let r = send(&app, fx.webhook(&paid)).await;
    assert_eq!(r.body["outcome"], "applied", "{}", r.body);
    let audit_before = fx.count("payment_audit").await;
    for _ in 0..3 {
        let r = send(&app, fx.webhook(&paid)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["outcome"], "duplicate");
        assert_eq!(r.body["firstOutcome"], "applied");
    }
    assert_eq!(
        fx.count("payment_audit").await,
        audit_before,
        "a replay writes nothing"
    );
    assert_eq!(fx.count("outbox_events").await, 1);
    assert_eq!(fx.count("webhook_events").await, 1);

    // Events that ask nothing of a payment are acknowledged once, and ignored.
    let other =
        r#"{"id":"evt_other","object":"event","type":"customer.created","data":{"object":{}}}"#;
    let r = send(&app, fx.webhook(other)).await;
    assert_eq!(
        (r.status.as_u16(), r.body["outcome"].clone()),
        (200, "ignored".into())
    );
    let r = send(&app, fx.webhook(other)).await;
    assert_eq!(r.body["outcome"], "duplicate");
    // A partial refund leaves the payment as it is.
    let partial = fx
        .stripe_event("evt_partial", "charge.refunded", "pi_replay", 900)
        .replace("\"refunded\":true", "\"refunded\":false");
    let r = send(&app, fx.webhook(&partial)).await;
    assert_eq!(r.body["outcome"], "ignored", "{}", r.body);
    assert_eq!(status_of(&fx, "pi_replay").await, "PAID_VERIFIED");
    // A payment we do not know (yet): 404, so the provider retries; nothing recorded.
    let unknown = fx.stripe_event("evt_unknown", "payment_intent.succeeded", "pi_nope", 1);
    let r = send(&app, fx.webhook(&unknown)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    // Signed but not an event: 400.
    for garbage in [
        "not json",
        r#"{"id":"e","type":"payment_intent.succeeded"}"#,
        r#"{"id":"e","type":"payment_intent.succeeded","data":{"object":{"id":"pi_replay"}}}"#,
    ] {
        let r = send(&app, fx.webhook(garbage)).await;
        assert_eq!(r.status, 400, "{garbage}: {}", r.body);
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_rotated_secret_works_while_both_are_active(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[("SECRETS_TTL_SECONDS", "1")]).await;
    fx.create_payment(&app, 100, "pi_rot_a").await;
    fx.create_payment(&app, 100, "pi_rot_b").await;
    let new_secret = "whsec_rotated_new";
    fx.put_signing_secrets(&[new_secret, &fx.signing_secret])
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let old = fx.stripe_event("evt_rot_a", "payment_intent.succeeded", "pi_rot_a", 100);
    let r = send(&app, fx.webhook_signed(&old, &fx.signing_secret, now())).await;
    assert_eq!(r.status, 200, "the old secret still works: {}", r.body);
    let new = fx.stripe_event("evt_rot_b", "payment_intent.succeeded", "pi_rot_b", 100);
    let r = send(&app, fx.webhook_signed(&new, new_secret, now())).await;
    assert_eq!(r.status, 200, "the new one too: {}", r.body);
    // The rotation ends: the old secret stops working.
    fx.put_signing_secrets(&[new_secret]).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let late = fx.stripe_event(
        "evt_rot_c",
        "payment_intent.payment_failed",
        "pi_rot_a",
        100,
    );
    let r = send(&app, fx.webhook_signed(&late, &fx.signing_secret, now())).await;
    assert_eq!(r.status, 401, "{}", r.body);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn unknown_disabled_and_unconfigured_tenants_look_alike(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let body = fx.stripe_event("evt_who", "payment_intent.succeeded", "pi_who", 1);
    let signature = verify_payment::signature::sign(&fx.signing_secret, now(), body.as_bytes());
    let to = |slug: &str| {
        fx.request(
            "POST",
            &format!("/v1/webhooks/stripe/{slug}"),
            None,
            Some(&body),
            &[("stripe-signature", &signature)],
        )
    };
    let bad_signature = send(&app, fx.webhook_signed(&body, "whsec_wrong", now())).await;
    assert_eq!(bad_signature.status, 401);

    let no_secret = create_tenant(&owner, "nosecret").await;
    let disabled = create_tenant(&owner, "gone").await;
    meterbridge::repo::tenants::disable(&owner, &disabled.slug)
        .await
        .unwrap();
    for slug in [
        "no-such-tenant".to_owned(),
        no_secret.slug.clone(),
        disabled.slug.clone(),
        "x".repeat(300),
        "%00".to_owned(),
    ] {
        let r = send(&app, to(&slug)).await;
        assert_eq!(r.status, 401, "{slug}: {}", r.body);
        let strip = |v: &Value| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("instance");
            v
        };
        assert_eq!(strip(&r.body), strip(&bad_signature.body), "{slug}");
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(stored, 0);
}
