//! Stripe webhooks: the signature scheme end to end (moto holds the signing secrets), replays,
//! rotation, and what a caller without the secret learns and costs: nothing, and no row.
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

/// Rows of every table an unsigned request could once write.
async fn rows_written(owner: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM payment_audit WHERE action = 'webhook')
              + (SELECT count(*) FROM webhook_events) + (SELECT count(*) FROM outbox_events)",
    )
    .fetch_one(owner)
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
    let cases: Vec<(&str, lambda_http::Request)> = vec![
        (
            "wrong secret",
            fx.webhook_signed(&body, "whsec_not_the_tenants", t),
        ),
        (
            "stale timestamp",
            fx.webhook_signed(&body, &fx.signing_secret, t - 301),
        ),
        (
            "future timestamp",
            // A minute past the tolerance: the handler's clock runs on while the cases before
            // it are sent (one second of margin flaked on a loaded machine).
            fx.webhook_signed(&body, &fx.signing_secret, t + 360),
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
        ),
        ("missing header", fx.webhook_with_header(&body, None)),
        (
            "garbled header",
            fx.webhook_with_header(&body, Some("t=now,v1=xyz")),
        ),
    ];
    let mut details = Vec::new();
    for (name, request) in cases {
        let r = send(&app, request).await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
        assert!(r.headers.contains_key("www-authenticate"), "{name}");
        details.push(r.body["detail"].clone());
    }
    assert!(
        details.iter().all(|d| *d == details[0]),
        "one answer for all"
    );
    assert_eq!(status_of(&fx, "pi_sig").await, "PENDING", "nothing changed");
    assert_eq!(
        rows_written(&owner).await,
        0,
        "a refusal is counted and logged, never a row"
    );

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
    let new_secret = "whsec_rotated_new_0123456789abcdef0123456789";
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

/// Nothing unsigned reaches the database: with PostgreSQL unreachable, every unsigned or
/// unknown-endpoint request still gets its 401 (not a 503), and only a correctly signed one
/// finds the database down.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn unsigned_requests_never_reach_the_database(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let no_secret = create_tenant(&owner, "nosecret").await;
    let app = fx
        .app(&[
            (
                "DATABASE_URL",
                "postgres://meterbridge_payments@127.0.0.1:1/nowhere",
            ),
            ("DB_ACQUIRE_TIMEOUT_MS", "300"),
        ])
        .await;
    let body = fx.stripe_event("evt_db", "payment_intent.succeeded", "pi_db", 1);
    let signature = verify_payment::signature::sign(&fx.signing_secret, now(), body.as_bytes());
    let to = |slug: &str, signature: &str| {
        fx.request(
            "POST",
            &format!("/v1/webhooks/stripe/{slug}"),
            None,
            Some(&body),
            &[("stripe-signature", signature)],
        )
    };
    let forged = verify_payment::signature::sign(
        "whsec_forged_0123456789abcdef012345",
        now(),
        body.as_bytes(),
    );
    for (name, request) in [
        ("bad signature", to(fx.tenant.slug.as_str(), &forged)),
        ("no signature", fx.webhook_with_header(&body, None)),
        ("unknown tenant", to("no-such-tenant", &signature)),
        (
            "tenant without a secret",
            to(no_secret.slug.as_str(), &signature),
        ),
    ] {
        let r = send(&app, request).await;
        assert_eq!(r.status, 401, "{name}: {}", r.body);
    }
    let r = send(&app, fx.webhook(&body)).await;
    assert_eq!(
        r.status, 503,
        "signed: the database is asked now: {}",
        r.body
    );
}

/// An endpoint's secrets, and their absence, are remembered for the secrets' TTL: a made-up slug
/// costs one Secrets Manager read per TTL, exactly like a real tenant without a secret.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_endpoint_without_a_secret_is_remembered_for_the_ttl(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[("SECRETS_TTL_SECONDS", "1")]).await;
    let late = create_tenant(&owner, "late").await;
    let body = fx.stripe_event("evt_late", "payment_intent.succeeded", "pi_late", 1);
    let request = || {
        fx.request(
            "POST",
            &format!("/v1/webhooks/stripe/{}", late.slug),
            None,
            Some(&body),
            &[(
                "stripe-signature",
                &verify_payment::signature::sign(&fx.signing_secret, now(), body.as_bytes()),
            )],
        )
    };
    assert_eq!(send(&app, request()).await.status, 401);
    // The tenant's secret is stored now; the container still remembers there was none ...
    let client = aws_sdk_secretsmanager::Client::new(&fx.sdk);
    client
        .create_secret()
        .name(format!("{}/stripe/{}", fx.secret_prefix, late.slug))
        .secret_string(serde_json::json!({ "signingSecrets": [&fx.signing_secret] }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(send(&app, request()).await.status, 401, "cached absence");
    // ... until the TTL has passed: then the signature holds (and the payment is unknown: 404).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = send(&app, request()).await;
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A signing secret shorter than 32 characters is refused when it is loaded: a delivery signed
/// with it is 401, and a rotation list keeps its usable secrets.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn short_signing_secrets_are_refused(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[("SECRETS_TTL_SECONDS", "1")]).await;
    fx.create_payment(&app, 100, "pi_short").await;
    let body = fx.stripe_event("evt_short", "payment_intent.succeeded", "pi_short", 100);
    for short in ["", "whsec_short", &"x".repeat(31)] {
        fx.put_signing_secrets(&[short]).await;
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        let r = send(&app, fx.webhook_signed(&body, short, now())).await;
        assert_eq!(r.status, 401, "{short:?}: {}", r.body);
    }
    fx.put_signing_secrets(&["whsec_short", &fx.signing_secret])
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = send(&app, fx.webhook_signed(&body, "whsec_short", now())).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = send(&app, fx.webhook(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status_of(&fx, "pi_short").await, "PAID_VERIFIED");
}
