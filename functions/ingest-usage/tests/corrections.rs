//! Voids (`POST /v1/usage/events/{eventId}/void`) and the summary (`GET /v1/usage/summary`)
//! against real PostgreSQL and Redis: what an internal key, an external key, another tenant, a
//! replay and malformed input get, and what the aggregation then shows.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use lambda_http::Request;
use meterbridge::domain::{Scope, Scopes, Trust};
use meterbridge::testing::{
    aggregate_until_caught_up, create_api_key, create_scoped_api_key, create_tenant, pool_as,
};
use serde_json::{json, Value};
use sqlx::PgPool;

fn void_request(fx: &Fixture, key: &str, event_id: &str, body: &Value) -> Request {
    fx.void(key, event_id, body)
}

fn daily_total(summary: &Value, metric: &str) -> Option<String> {
    summary["aggregates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["metric"] == metric)
        .map(|a| a["totalQuantity"].as_str().unwrap().to_owned())
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_internal_key_voids_once_and_everything_follows(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let r = fx
        .submit(
            &app,
            json!({"events": [fx.event(1, "api.requests", 30), fx.event(2, "api.requests", 12)]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(fx.counter("api.requests").await, Some(42));
    aggregate_until_caught_up(&owner).await;
    let today = meterbridge::testing::now().date_naive().to_string();
    let summary = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/summary",
            &[("period", "daily"), ("from", &today), ("to", &today)],
        ),
    )
    .await;
    assert_eq!(summary.status, 200, "{:?}", summary.body);
    assert_eq!(
        daily_total(&summary.body, "api.requests").as_deref(),
        Some("42")
    );
    let row = &summary.body["aggregates"][0];
    assert_eq!(row["final"], false);
    assert!(row["computedAt"].is_string());
    assert_eq!(row["eventCount"], 2);

    let event_id = format!("{}-e1", fx.run);
    let reason = json!({"reason": "sent twice by the upstream billing bridge"});
    let first = send(
        &app,
        void_request(&fx, &fx.internal.key, &event_id, &reason),
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["voidedNow"], true);
    assert_eq!(first.body["event"]["eventId"], event_id);
    assert_eq!(first.body["event"]["voidReason"], reason["reason"]);
    assert!(first.body["event"]["voidedBy"]
        .as_str()
        .unwrap()
        .starts_with("api-key:"));
    // The real-time counter is decremented after the commit.
    assert_eq!(fx.counter("api.requests").await, Some(12));

    // A replay (even with another reason) changes nothing and returns the first void.
    let again = send(
        &app,
        void_request(
            &fx,
            &fx.internal.key,
            &event_id,
            &json!({"reason": "again"}),
        ),
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["voidedNow"], false);
    assert_eq!(
        again.body["event"]["voidedAt"],
        first.body["event"]["voidedAt"]
    );
    assert_eq!(again.body["event"]["voidReason"], reason["reason"]);
    assert_eq!(fx.counter("api.requests").await, Some(12));

    // The listing shows the void; the event is still there.
    let listed = send(&app, fx.get(&fx.internal.key, "/v1/usage/events", &[])).await;
    let events = listed.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    let voided: Vec<&Value> = events
        .iter()
        .filter(|e| e["voidedAt"].is_string())
        .collect();
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0]["eventId"], event_id);
    // The PostgreSQL side of the real-time read excludes it too.
    let realtime = send(&app, fx.get(&fx.internal.key, "/v1/usage/realtime", &[])).await;
    assert_eq!(realtime.body["counters"]["api.requests"], 12);

    // Aggregates exclude it after the next run.
    aggregate_until_caught_up(&owner).await;
    let summary = send(
        &app,
        fx.get(
            &fx.internal.key,
            "/v1/usage/summary",
            &[("period", "monthly"), ("metric", "api.requests")],
        ),
    )
    .await;
    assert_eq!(summary.status, 200, "{:?}", summary.body);
    assert_eq!(
        daily_total(&summary.body, "api.requests").as_deref(),
        Some("12")
    );
    assert_eq!(summary.body["aggregates"][0]["eventCount"], 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn voids_refuse_external_keys_other_tenants_and_bad_input(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let r = fx
        .submit(&app, json!({"events": [fx.event(1, "api.requests", 5)]}))
        .await;
    assert_eq!(r.status, 200);
    let event_id = format!("{}-e1", fx.run);
    let reason = json!({"reason": "test"});
    let unchanged = |owner: PgPool| async move {
        let voided: i64 =
            sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE voided_at IS NOT NULL")
                .fetch_one(&owner)
                .await
                .unwrap();
        assert_eq!(voided, 0);
    };

    // An external (partner) key: 403.
    let r = send(
        &app,
        void_request(&fx, &fx.external.key, &event_id, &reason),
    )
    .await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    // An internal key without usage:write: 403.
    let reader = create_scoped_api_key(
        &owner,
        &fx.tenant,
        "crm",
        Trust::Internal,
        Scopes::of(&[Scope::UsageRead]),
    )
    .await;
    let r = send(&app, void_request(&fx, &reader.key, &event_id, &reason)).await;
    assert_eq!(r.status, 403);
    // No key, a revoked key: 401.
    let mut anonymous = void_request(&fx, &fx.internal.key, &event_id, &reason);
    anonymous.headers_mut().remove("authorization");
    assert_eq!(send(&app, anonymous).await.status, 401);
    let r = send(&app, void_request(&fx, &fx.revoked.key, &event_id, &reason)).await;
    assert_eq!(r.status, 401);
    // Another tenant's internal key, same source, same id: 404.
    let other = create_tenant(&owner, "other").await;
    let other_key = create_api_key(&owner, &other, "crm", Trust::Internal).await;
    let r = send(&app, void_request(&fx, &other_key.key, &event_id, &reason)).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    // Another source's events need usage:void, which internal keys do not hold by default:
    // 403, whether or not that source has such an event.
    for source in ["billing", "crm-2"] {
        let r = send(
            &app,
            void_request(
                &fx,
                &fx.internal.key,
                &event_id,
                &json!({"reason": "x", "source": source}),
            ),
        )
        .await;
        assert_eq!(r.status, 403, "{:?}", r.body);
        assert!(r.body["detail"].as_str().unwrap().contains("usage:void"));
    }
    // With usage:void, another source names another event: 404.
    let corrector = create_scoped_api_key(
        &owner,
        &fx.tenant,
        "corrections",
        Trust::Internal,
        Scopes::of(&[Scope::UsageWrite, Scope::UsageVoid]),
    )
    .await;
    let r = send(
        &app,
        void_request(
            &fx,
            &corrector.key,
            &event_id,
            &json!({"reason": "x", "source": "billing"}),
        ),
    )
    .await;
    assert_eq!(r.status, 404);
    // Unknown ids, extreme ids: 404.
    for id in ["no-such-event", &"x".repeat(129), "a\u{1}b", "é/ü"] {
        let r = send(&app, void_request(&fx, &fx.internal.key, id, &reason)).await;
        assert_eq!(r.status, 404, "{id:?}: {:?}", r.body);
    }
    // Bad bodies: 422 with per-field errors, 400 for what is not JSON.
    for body in [
        json!({}),
        json!({"reason": ""}),
        json!({"reason": "x".repeat(501)}),
        json!({"reason": "x", "why": 1}),
    ] {
        let r = send(&app, void_request(&fx, &fx.internal.key, &event_id, &body)).await;
        assert_eq!(r.status, 422, "{body}");
        assert!(r.body["errors"].as_array().is_some_and(|e| !e.is_empty()));
    }
    let mut raw = void_request(&fx, &fx.internal.key, &event_id, &reason);
    *raw.body_mut() = "{\"reason\": ".into();
    assert_eq!(send(&app, raw).await.status, 400);
    unchanged(owner.clone()).await;
    assert_eq!(fx.counter("api.requests").await, Some(5));

    // The corrections service, with usage:void, voids crm's event by naming its source.
    let r = send(
        &app,
        void_request(
            &fx,
            &corrector.key,
            &event_id,
            &json!({"reason": "corrected upstream", "source": "crm"}),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["voidedNow"], true);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_api_role_can_void_but_not_rewrite_or_unvoid(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.submit(&app, json!({"events": [fx.event(1, "api.requests", 5)]}))
        .await;
    let api = pool_as(&owner, meterbridge::testing::INGEST_ROLE).await;
    let as_tenant = |sql: &'static str| {
        let api = api.clone();
        let tenant = fx.tenant.id.0;
        async move {
            let mut tx = api.begin().await.unwrap();
            sqlx::query("SELECT set_config('meterbridge.tenant_id', $1, true)")
                .bind(tenant.to_string())
                .execute(&mut *tx)
                .await
                .unwrap();
            let r = sqlx::query(sql).execute(&mut *tx).await;
            if r.is_ok() {
                tx.commit().await.unwrap();
            }
            r.map(|d| d.rows_affected())
        }
    };
    // Quantities, ids, times and the change marker are not the API's to write.
    for sql in [
        "UPDATE usage_events SET quantity = 1",
        "UPDATE usage_events SET xact_id = 0",
        "UPDATE usage_events SET occurred_at = now()",
        "DELETE FROM usage_events",
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, source_service,
                                   correlation_id, classification, payload_hash, operation_key, xact_id)
         SELECT tenant_id, 'forged', metric, 1, occurred_at, source_service, 'c', classification,
                payload_hash, gen_random_uuid(), 0 FROM usage_events LIMIT 1",
        "UPDATE usage_aggregates SET total_quantity = 0",
    ] {
        let e = as_tenant(sql).await.unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{sql}: {e}");
    }
    // A void is allowed; undoing or rewriting one is refused by the trigger.
    assert_eq!(
        as_tenant("UPDATE usage_events SET voided_at = now(), voided_by = 'k', void_reason = 'r'")
            .await
            .unwrap(),
        1
    );
    let e =
        as_tenant("UPDATE usage_events SET voided_at = NULL, voided_by = NULL, void_reason = NULL")
            .await
            .unwrap_err();
    assert!(e.to_string().contains("already voided"), "{e}");
    // The void stamped its own transaction, so aggregation sees it.
    let (xact, created): (i64, i64) =
        sqlx::query_as("SELECT xact_id, (SELECT min(xact_id) FROM usage_events) FROM usage_events")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(xact >= created);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_summary_is_tenant_scoped_and_its_parameters_bounded(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    fx.submit(&app, json!({"events": [fx.event(1, "api.requests", 9)]}))
        .await;
    aggregate_until_caught_up(&owner).await;
    let get =
        |key: &str, query: &[(&str, &str)]| send(&app, fx.get(key, "/v1/usage/summary", query));
    let mine = get(&fx.internal.key, &[("period", "weekly")]).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["aggregates"].as_array().unwrap().len(), 1);
    // Another tenant sees none of it.
    let other = create_tenant(&owner, "other").await;
    let other_key = create_api_key(&owner, &other, "crm", Trust::Internal).await;
    let theirs = get(&other_key.key, &[("period", "weekly")]).await;
    assert_eq!(theirs.status, 200);
    assert_eq!(theirs.body["aggregates"], json!([]));
    // An external key holds usage:write only: 403.
    assert_eq!(
        get(&fx.external.key, &[("period", "daily")]).await.status,
        403
    );
    // Bounded, checked parameters: 400, never a 5xx.
    for query in [
        vec![],
        vec![("period", "hourly")],
        vec![("period", "daily"), ("from", "2026-02-30")],
        vec![
            ("period", "daily"),
            ("from", "2026-11-10"),
            ("to", "2026-11-01"),
        ],
        vec![
            ("period", "daily"),
            ("from", "2025-01-01"),
            ("to", "2026-01-01"),
        ],
        vec![
            ("period", "monthly"),
            ("from", "2020-01-01"),
            ("to", "2026-01-01"),
        ],
        vec![("period", "daily"), ("metric", "no.such.metric")],
        vec![("period", "daily"), ("to", "+275760-09-13")],
        vec![
            ("period", "daily"),
            ("from", "0000-01-01"),
            ("to", "0000-01-02"),
        ],
    ] {
        let r = get(&fx.internal.key, &query).await;
        assert_eq!(r.status, 400, "{query:?}: {:?}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
}
