//! Final-period events: the aggregation writes `usage.period.finalized` and
//! `usage.period.revised` to the outbox in the transaction that makes a cell final or revises
//! it, for the period types its tenant switched on; the relay publishes them through moto's
//! EventBridge to SQS.
#![allow(clippy::unwrap_used)]

mod common;

use chrono::{Duration, NaiveTime};
use common::*;
use meterbridge::domain::period::PeriodType;
use meterbridge::domain::TenantId;
use meterbridge::repo::usage_settings::{self, Change};
use meterbridge::testing::{create_tenant, today, Bus};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

async fn switch_on(owner: &PgPool, tenant: Uuid, periods: &[PeriodType]) {
    let mut conn = owner.acquire().await.unwrap();
    let change = Change {
        tenant: TenantId(tenant),
        actor: "test",
        reason: "billing wants final periods",
    };
    usage_settings::set_period_events(&mut conn, &change, periods)
        .await
        .unwrap();
}

/// The usage events in the outbox: (tenant, event type, envelope), in the order written.
async fn outbox(owner: &PgPool) -> Vec<(Uuid, String, Value)> {
    sqlx::query_as(
        "SELECT tenant_id, event_type, payload FROM outbox_events
          WHERE aggregate_type = 'usage_period' ORDER BY id",
    )
    .fetch_all(owner)
    .await
    .unwrap()
}

/// Publishes what is due, and returns what reached the queue.
async fn publish(bus: &Bus, owner: &PgPool) -> Vec<Value> {
    let report = bus.relay(owner).await.run(later()).await.unwrap();
    assert_eq!(report.dead, 0, "{report:?}");
    bus.drain().await
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_final_period_is_published_once_and_a_revision_carries_the_previous_values(
    owner: PgPool,
) {
    let bus = Bus::create(true).await;
    let billed = create_tenant(&owner, "billed").await.id.0;
    let quiet = create_tenant(&owner, "quiet").await.id.0;
    switch_on(&owner, billed, &[PeriodType::Daily, PeriodType::Monthly]).await;
    // A day in the middle of last month, and a run two hours after that month ended: the day
    // and the month become final (the week is not switched on; the other tenant wants nothing).
    let month_end = PeriodType::Monthly.start_of(today());
    let day = month_end - Duration::days(15);
    let noon = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let after_month = month_end.and_time(NaiveTime::MIN).and_utc() + Duration::hours(2);
    let ev = |tenant, quantity| Ev {
        tenant,
        metric: "api.requests",
        quantity,
        at: noon,
        actor: Some("user-1".into()),
    };
    insert(&owner, &[ev(billed, 7), ev(quiet, 5)]).await;
    let app = app(&owner, &[("AGGREGATION_GRACE_SECONDS", "3600")]).await;

    // Aggregated before the day's grace is over: nothing is final, nothing is written.
    let open = day.succ_opt().unwrap().and_time(NaiveTime::MIN).and_utc();
    run(&app, &owner, open + Duration::minutes(30)).await;
    assert!(outbox(&owner).await.is_empty());

    let r = run(&app, &owner, after_month).await;
    assert!(r.finalized >= 3, "{r:?}");
    let written = outbox(&owner).await;
    let mut kinds: Vec<(Uuid, &str, &str)> = written
        .iter()
        .map(|(t, kind, p)| (*t, kind.as_str(), p["data"]["periodType"].as_str().unwrap()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            (billed, "usage.period.finalized", "daily"),
            (billed, "usage.period.finalized", "monthly")
        ],
        "one event per final cell of the switched-on period types, none of the other tenant's"
    );
    let published = publish(&bus, &owner).await;
    assert_eq!(published.len(), 2, "{published:#?}");
    for message in &published {
        assert_eq!(message["source"], "meterbridge.usage");
        assert_eq!(message["detail-type"], "usage.period.finalized");
        let data = &message["detail"]["data"];
        assert_eq!(data["metric"], "api.requests");
        assert_eq!(data["totalQuantity"], "7");
        assert_eq!(data["eventCount"], 1);
        assert_eq!(data["distinctActors"], 1);
        assert_eq!(data["revision"], 0);
        assert_eq!(message["detail"]["aggregateSequence"], 1);
        assert_eq!(message["detail"]["tenantId"], billed.to_string());
        assert_eq!(message["detail"]["schemaVersion"], 1);
        assert!(data.get("previous").is_none());
    }
    let daily = published
        .iter()
        .find(|m| m["detail"]["data"]["periodType"] == "daily")
        .unwrap();
    assert_eq!(
        daily["detail"]["data"]["periodStart"],
        format!("{day}T00:00:00Z")
    );
    assert_eq!(
        daily["detail"]["data"]["periodEnd"],
        format!("{}T00:00:00Z", day.succ_opt().unwrap())
    );

    // A re-run, and a backfill that changes nothing: nothing new.
    run(&app, &owner, after_month + Duration::minutes(10)).await;
    let backfill = meterbridge::aggregation::Backfill::of(day, day, None, None);
    app.aggregator()
        .backfill(&backfill, after_month + Duration::minutes(11), later())
        .await
        .unwrap();
    assert_eq!(outbox(&owner).await.len(), 2);
    assert!(publish(&bus, &owner).await.is_empty());

    // A late event for the final day: one revision of the day and one of the month, each with
    // the values before it, after their finalisation in their aggregate's sequence.
    insert(&owner, &[ev(billed, 3)]).await;
    let r = run(&app, &owner, after_month + Duration::minutes(20)).await;
    assert!(r.revisions >= 2, "{r:?}");
    let published = publish(&bus, &owner).await;
    assert_eq!(published.len(), 2, "{published:#?}");
    for message in &published {
        assert_eq!(message["detail-type"], "usage.period.revised");
        let detail = &message["detail"];
        let data = &detail["data"];
        assert_eq!(data["totalQuantity"], "10");
        assert_eq!(data["eventCount"], 2);
        assert_eq!(data["revision"], 1);
        assert_eq!(data["previous"]["totalQuantity"], "7");
        assert_eq!(data["previous"]["eventCount"], 1);
        assert_eq!(data["previous"]["revision"], 0);
        assert_eq!(detail["aggregateSequence"], 2);
        let finalized = written
            .iter()
            .find(|(_, _, p)| p["data"]["periodType"] == data["periodType"])
            .unwrap();
        assert_eq!(
            detail["aggregateId"], finalized.2["aggregateId"],
            "the cell is the aggregate"
        );
    }
    // Nothing more on a re-run.
    run(&app, &owner, after_month + Duration::minutes(30)).await;
    assert!(publish(&bus, &owner).await.is_empty());
    assert_eq!(outbox(&owner).await.len(), 4);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn switching_period_events_off_stops_them_and_the_change_is_audited(owner: PgPool) {
    let t = create_tenant(&owner, "toggle").await.id.0;
    switch_on(&owner, t, &[PeriodType::Daily]).await;
    switch_on(&owner, t, &[PeriodType::Daily]).await; // no change: not audited again
    switch_on(&owner, t, &[]).await;
    let day = today() - Duration::days(3);
    insert(
        &owner,
        &[Ev {
            tenant: t,
            metric: "api.requests",
            quantity: 1,
            at: day.and_hms_opt(1, 0, 0).unwrap().and_utc(),
            actor: None,
        }],
    )
    .await;
    let app = app(&owner, &[]).await;
    let end = day.succ_opt().unwrap().and_time(NaiveTime::MIN).and_utc();
    run(&app, &owner, end + Duration::hours(2)).await;
    let final_day: bool = sqlx::query_scalar(
        "SELECT final FROM usage_aggregates WHERE tenant_id = $1 AND period_type = 'daily'",
    )
    .bind(t)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert!(final_day);
    assert!(outbox(&owner).await.is_empty());
    let audit: Vec<(String, Value, Value)> = sqlx::query_as(
        "SELECT setting, before, after FROM tenant_settings_audit WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(t)
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            (
                "usage.period-events".to_owned(),
                serde_json::json!({"periods": []}),
                serde_json::json!({"periods": ["daily"]})
            ),
            (
                "usage.period-events".to_owned(),
                serde_json::json!({"periods": ["daily"]}),
                serde_json::json!({"periods": []})
            ),
        ]
    );
}

/// The aggregation's role may append usage events to the outbox, never a payment's.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_aggregation_role_cannot_write_a_payment_event(owner: PgPool) {
    let t = create_tenant(&owner, "forge").await.id.0;
    let ops = meterbridge::testing::pool_as(&owner, meterbridge::testing::OPS_ROLE).await;
    let insert = |aggregate_type: &'static str, event_type: &'static str| {
        sqlx::query(
            "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                        correlation_id, idempotency_key, aggregate_type,
                                        aggregate_id, aggregate_sequence, source_service)
             VALUES ($1, gen_random_uuid(), $2, 1, '{}', 'c', gen_random_uuid()::text, $3,
                     gen_random_uuid(), 1, 'aggregate-usage')",
        )
        .bind(t)
        .bind(event_type)
        .bind(aggregate_type)
    };
    for (aggregate, kind) in [
        ("payment", "payment.paid"),
        ("usage_period", "payment.paid"),
        ("payment", "usage.period.finalized"),
    ] {
        let err = insert(aggregate, kind).execute(&ops).await.unwrap_err();
        assert!(
            err.to_string().contains("row-level security"),
            "{aggregate} {kind}: {err}"
        );
    }
    insert("usage_period", "usage.period.finalized")
        .execute(&ops)
        .await
        .unwrap();
}
