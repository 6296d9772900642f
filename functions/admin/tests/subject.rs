//! `subject.erase` through the admin handler, for what an operator can get wrong or an attacker
//! can send: a tenant that does not exist, hostile actor ids, request ids and reasons, a request
//! id reused for another subject, unknown fields. Each is refused with its kind (never a
//! database error) and nothing is written; a good request finishes and replays its receipt.
#![allow(clippy::unwrap_used)]

use admin::{handle_event, Admin};
use meterbridge::testing::create_tenant;
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

async fn erase(admin: &Admin, payload: Value) -> Result<Value, String> {
    handle_event(admin, payload)
        .await
        .map_err(|e| format!("{}: {e}", e.error_type()))
}

async fn receipts(owner: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM subject_erasures")
        .fetch_one(owner)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_erasure_request_is_checked_before_anything_is_written(owner: PgPool) {
    let admin = Admin::new(Database::from_pool(owner.clone()));
    let tenant = create_tenant(&owner, "acme").await;
    let ok = json!({"action": "subject.erase", "tenant": tenant.slug.as_str(), "actorId": "u-1",
                    "requestId": "R-1", "reason": "asked by the subject"});
    let with = |field: &str, value: Value| {
        let mut p = ok.clone();
        p[field] = value;
        p
    };
    let cases = [
        (with("tenant", json!("no-such-tenant")), "NotFound"),
        (with("actorId", json!("")), "BadRequest"),
        (with("actorId", json!("x".repeat(129))), "BadRequest"),
        (with("actorId", json!("u-1\u{0}")), "BadRequest"),
        (with("actorId", json!(42)), "BadRequest"),
        (with("requestId", json!("   ")), "BadRequest"),
        (with("requestId", json!("r".repeat(129))), "BadRequest"),
        (with("reason", json!("")), "BadRequest"),
        (with("reason", json!("why\nnot")), "BadRequest"),
        (with("requestedBy", json!("b".repeat(200))), "BadRequest"),
        (with("unexpected", json!(true)), "BadRequest"),
    ];
    for (payload, kind) in cases {
        let err = erase(&admin, payload.clone()).await.unwrap_err();
        assert!(err.starts_with(kind), "{payload}: {err}");
        assert!(!err.contains("u-1\u{0}"), "{err}");
    }
    assert_eq!(receipts(&owner).await, 0, "nothing written");

    let done = erase(&admin, ok.clone()).await.unwrap();
    assert_eq!(done["finished"], true, "{done}");
    assert_eq!(erase(&admin, ok.clone()).await.unwrap(), done);
    // The same request id for another subject: a conflict, the receipt untouched.
    let err = erase(&admin, with("actorId", json!("u-2")))
        .await
        .unwrap_err();
    assert!(err.starts_with("Conflict"), "{err}");
    assert!(!err.contains("u-2"), "the subject is not echoed: {err}");
    assert_eq!(receipts(&owner).await, 1);
}
