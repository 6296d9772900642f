//! Meters through the admin function: one per event type, malformed paths and unknown metrics
//! refused with nothing written, every change audited.
#![allow(clippy::unwrap_used)]

use admin::{handle_event, Admin};
use meterbridge::testing::create_tenant;
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

async fn rows(owner: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM meters),
                (SELECT count(*) FROM tenant_settings_audit WHERE setting = 'meters')",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

fn set(tenant: &str, extra: Value) -> Value {
    let mut payload = json!({"action": "meter.set", "tenant": tenant, "slug": "tokens",
                             "eventType": "prompt", "metric": "api.requests",
                             "valueProperty": "$.tokens.total", "reason": "test"});
    for (k, v) in extra.as_object().unwrap() {
        payload[k] = v.clone();
    }
    payload
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn meters_are_checked_one_per_event_type_and_audited(owner: PgPool) {
    let admin = Admin::new(Database::from_pool(owner.clone()));
    let t = create_tenant(&owner, "meters").await;
    let slug = t.slug.as_str();
    for (extra, expected) in [
        (json!({"slug": "Tokens"}), "slug"),
        (json!({"slug": ""}), "slug"),
        (json!({"eventType": ""}), "eventType"),
        (json!({"metric": "no.such.metric"}), "metric"),
        (json!({"valueProperty": "tokens"}), "valueProperty"),
        (json!({"valueProperty": "$..tokens"}), "valueProperty"),
        (
            json!({"valueProperty": "$.tokens[?(@>1)]"}),
            "valueProperty",
        ),
        (json!({"groupBy": {"a b": "$.x"}}), "groupBy"),
        (json!({"groupBy": {"model": "model"}}), "groupBy"),
        (json!({"groupBy": ["$.x"]}), "expected a map"),
        (json!({"reason": ""}), "reason"),
        (json!({"colour": "red"}), "colour"),
    ] {
        let e = handle_event(&admin, set(slug, extra.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.error_type(), "BadRequest", "{extra}: {e}");
        assert!(e.to_string().contains(expected), "{extra}: {e}");
    }
    assert_eq!(rows(&owner).await, (0, 0));
    let e = handle_event(&admin, set("no-such-tenant", json!({})))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "NotFound");

    let out = handle_event(&admin, set(slug, json!({"groupBy": {"model": "$.model"}})))
        .await
        .unwrap();
    assert!(out["replaced"].is_null(), "{out}");
    // Replaced under the same slug; another slug for the same event type is a conflict.
    let out = handle_event(&admin, set(slug, json!({"valueProperty": null})))
        .await
        .unwrap();
    assert_eq!(out["replaced"]["valueProperty"], "$.tokens.total");
    let e = handle_event(&admin, set(slug, json!({"slug": "tokens-2"})))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "Conflict", "{e}");
    assert_eq!(rows(&owner).await, (1, 2));
    // Another tenant may count the same event type with its own meter; neither sees the other's.
    let other = create_tenant(&owner, "meters-other").await;
    handle_event(&admin, set(other.slug.as_str(), json!({})))
        .await
        .unwrap();
    let listed = handle_event(&admin, json!({"action": "meter.list", "tenant": slug}))
        .await
        .unwrap();
    assert_eq!(listed["meters"].as_array().unwrap().len(), 1);
    assert_eq!(listed["meters"][0]["valueProperty"], Value::Null);
}
