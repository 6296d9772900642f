//! Every request in events/verify-payment/ run through the handler, in the order the demo runs
//! them.
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use common::{events_dir, send, Fixture};
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_fixture_runs_through_the_handler(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let mut seen = Vec::new();

    let r = send(&app, fx.fixture("create-payment.json", &[])).await;
    seen.push("create-payment.json");
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.headers["x-correlation-id"], "fixture-create-payment");
    let id = r.body["payment"]["id"].as_str().unwrap().to_owned();
    let again = send(&app, fx.fixture("create-payment.json", &[])).await;
    assert_eq!(again.body, r.body, "the same Idempotency-Key replays");
    assert_eq!(again.headers["idempotent-replayed"], "true");

    let with_id = [("PAYMENT_ID", id.as_str())];
    let r = send(&app, fx.fixture("get-payment.json", &with_id)).await;
    seen.push("get-payment.json");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payment"]["status"], "PENDING");

    let r = send(
        &app,
        fx.fixture("verify-payment-external-key.json", &with_id),
    )
    .await;
    seen.push("verify-payment-external-key.json");
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("payments:verify"));

    let r = send(&app, fx.fixture("webhook-bad-signature.json", &[])).await;
    seen.push("webhook-bad-signature.json");
    assert_eq!(r.status, 401, "{}", r.body);

    let r = send(&app, fx.fixture("webhook-payment-succeeded.json", &[])).await;
    seen.push("webhook-payment-succeeded.json");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["outcome"], "applied");
    let r = send(&app, fx.fixture("webhook-payment-succeeded.json", &[])).await;
    assert_eq!(r.body["outcome"], "duplicate", "a replayed delivery");

    let r = send(&app, fx.fixture("verify-payment.json", &with_id)).await;
    seen.push("verify-payment.json");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["outcome"], "unchanged",
        "the webhook verified it first"
    );
    assert_eq!(r.body["payment"]["verificationMethod"], "provider_webhook");

    let r = send(&app, fx.fixture("list-payments.json", &[])).await;
    seen.push("list-payments.json");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["payments"][0]["id"], id.as_str());
    assert_eq!(fx.count("outbox_events").await, 1);

    let mut files: Vec<String> = std::fs::read_dir(events_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    seen.sort();
    assert_eq!(
        files, seen,
        "each fixture in events/verify-payment needs a case here"
    );
}
