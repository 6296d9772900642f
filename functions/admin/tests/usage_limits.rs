//! Usage limits through the admin function: extreme and malformed values are refused with
//! nothing written; another tenant's limits are untouched; every change is audited.
#![allow(clippy::unwrap_used)]

use admin::{handle_event, Admin};
use meterbridge::testing::create_tenant;
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

async fn rows(owner: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_limits),
                (SELECT count(*) FROM tenant_settings_audit WHERE setting = 'usage.limits')",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

fn set(tenant: &str, extra: Value) -> Value {
    let mut payload = json!({"action": "usage.limits.set", "tenant": tenant,
                             "metric": "api.requests", "period": "monthly", "limit": 1000,
                             "reason": "test"});
    for (k, v) in extra.as_object().unwrap() {
        payload[k] = v.clone();
    }
    payload
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn extreme_and_malformed_limits_are_refused_with_nothing_written(owner: PgPool) {
    let admin = Admin::new(Database::from_pool(owner.clone()));
    let t = create_tenant(&owner, "lim").await;
    let slug = t.slug.as_str();
    for (extra, field) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": i64::MAX}), "limit"),
        (json!({"limit": u64::MAX}), "limit"),
        // Refused by the payload's parse (the message names the expected type).
        (json!({"limit": -1}), "u64"),
        (json!({"limit": 1.5}), "u64"),
        (json!({"limit": "1000"}), "u64"),
        (json!({"metric": "no.such.metric"}), "metric"),
        (json!({"metric": "x".repeat(10_000)}), "metric"),
        (json!({"period": "weekly"}), "period"),
        (json!({"period": ""}), "period"),
        (json!({"thresholds": []}), "thresholds"),
        (json!({"thresholds": [0]}), "thresholds"),
        (json!({"thresholds": [1001]}), "thresholds"),
        (json!({"thresholds": [70000]}), "u16"),
        (
            json!({"thresholds": (1..=11).collect::<Vec<u16>>()}),
            "thresholds",
        ),
        (json!({"reason": " "}), "reason"),
    ] {
        let e = handle_event(&admin, set(slug, extra.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.error_type(), "BadRequest", "{extra}: {e}");
        assert!(e.to_string().contains(field), "{extra}: {e}");
    }
    assert_eq!(rows(&owner).await, (0, 0));
    // Another tenant's limit cannot be reached by naming the wrong tenant.
    let e = handle_event(&admin, set("no-such-tenant", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "NotFound");
    assert_eq!(rows(&owner).await, (0, 0));

    // The largest limit is accepted; setting it again replaces it, each change audited.
    let out = handle_event(
        &admin,
        set(slug, json!({"limit": 100_000_000_000_000_000u64})),
    )
    .await
    .unwrap();
    assert_eq!(out["limit"]["limit"], "100000000000000000");
    assert_eq!(out["limit"]["thresholds"], json!([80, 100]));
    let out = handle_event(&admin, set(slug, json!({"thresholds": [100, 50, 50]})))
        .await
        .unwrap();
    assert_eq!(out["replaced"]["limit"], "100000000000000000");
    assert_eq!(out["limit"]["thresholds"], json!([50, 100]));
    assert_eq!(rows(&owner).await, (1, 2));
    let other = create_tenant(&owner, "lim-other").await;
    let listed = handle_event(
        &admin,
        json!({"action": "usage.limits.list", "tenant": other.slug.as_str()}),
    )
    .await
    .unwrap();
    assert_eq!(listed["limits"], json!([]));
}
