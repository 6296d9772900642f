//! The relay against real PostgreSQL and EventBridge on moto (with a rule to SQS, read back with
//! the SDK), through a fault-injecting proxy: nothing lost, nothing stuck, order kept.
//!
//! The relay keeps no calendar: its leases, retry times and retention are compared with the
//! database's `now()`, so these tests read the real clock (`Utc::now()`) where they name a
//! run's start, never the tests' shifted one (`meterbridge::testing::clock`).
#![allow(clippy::unwrap_used)]
#![recursion_limit = "256"]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{later, relay_app, seed_events, statuses, Bus, Faults, Proxy};
use meterbridge::repo::outbox;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_row_arrives_once_with_its_envelope(owner: PgPool) {
    let bus = Bus::create(true).await;
    let proxy = Proxy::start().await;
    let app = relay_app(&owner, &proxy.url, &bus.name, &[]).await;
    seed_events(&owner, 23, 1).await;
    let stored: HashMap<String, Value> =
        sqlx::query_as::<_, (Uuid, Value)>("SELECT event_id, payload FROM outbox_events")
            .fetch_all(&owner)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, payload)| (id.to_string(), payload))
            .collect();

    let report = outbox_relay::handle(&app, serde_json::json!({"job": "relay"}), later())
        .await
        .unwrap();
    assert_eq!((report.claimed, report.published, report.dead), (23, 23, 0));
    assert_eq!(report.pending, 0);
    assert!(
        proxy.calls().iter().all(|n| *n <= 10),
        "{:?}",
        proxy.calls()
    );

    let delivered = bus.drain().await;
    assert_eq!(delivered.len(), 23);
    for envelope in delivered {
        assert_eq!(envelope["source"], "meterbridge.payments");
        assert_eq!(envelope["detail-type"], "payment.paid");
        let id = envelope["detail"]["eventId"].as_str().unwrap();
        assert_eq!(
            &envelope["detail"], &stored[id],
            "the envelope arrives intact"
        );
    }
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 23)])
    );
    // Nothing is due: a second run claims nothing.
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.claimed, 0);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn failed_entries_are_retried_and_bad_ones_dead(owner: PgPool) {
    let bus = Bus::create(true).await;
    let proxy = Proxy::start().await;
    let app = relay_app(
        &owner,
        &proxy.url,
        &bus.name,
        // One worker: the whole-call failure below must meet all five retried entries in
        // one call, not a share of them split across concurrent claims.
        &[("RELAY_MAX_ATTEMPTS", "4"), ("RELAY_WORKERS", "1")],
    )
    .await;
    seed_events(&owner, 30, 1).await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id::text FROM outbox_events ORDER BY id")
            .fetch_all(&owner)
            .await
            .unwrap();
    let throttled: Arc<Vec<String>> = Arc::new(ids[0..5].to_vec());
    let invalid: Arc<Vec<String>> = Arc::new(ids[5..7].to_vec());
    let is = |set: Arc<Vec<String>>| {
        Arc::new(move |detail: &Value| set.iter().any(|id| detail["eventId"] == id.as_str()))
            as common::Matcher
    };
    // Five entries are throttled, two refused for good.
    proxy.set_faults(Faults {
        entry_faults: vec![
            (is(Arc::clone(&throttled)), "ThrottlingException".into()),
            (is(Arc::clone(&invalid)), "MalformedDetail".into()),
        ],
        ..Faults::default()
    });
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(
        report.retried.get("ThrottlingException"),
        Some(&5),
        "{report:?}"
    );
    assert_eq!((report.published, report.dead), (23, 2));
    let dead: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id::text, last_error FROM outbox_events WHERE status = 'DEAD' ORDER BY id",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(
        dead.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
        *invalid
    );
    assert!(dead[0].1.starts_with("MalformedDetail"), "{}", dead[0].1);
    assert_eq!(statuses(&owner).await.get("FAILED"), Some(&5));

    // The throttling ends, but the next call fails whole: all its entries wait again.
    proxy.set_faults(Faults {
        fail_calls: 1,
        call_failure: Some((500, "InternalException".into())),
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_millis(1100)).await; // the backoff (capped at 1 s here)
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(
        report.retried.get("InternalException"),
        Some(&5),
        "{report:?}"
    );
    assert_eq!(report.published, 0);

    // Then EventBridge is back: only the failed entries are sent again, once each.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = proxy.accepted().len();
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.published, 5);
    assert_eq!(proxy.accepted().len() - before, 5);
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for detail in proxy.accepted() {
        *accepted
            .entry(detail["eventId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(accepted.len(), 28, "all but the two dead ones");
    assert!(accepted.values().all(|n| *n == 1), "none accepted twice");
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 28), ("DEAD".into(), 2)])
    );
    assert_eq!(bus.drain().await.len(), 28);

    // Throttled every time: DEAD once the attempts run out, with the last error.
    seed_events(&owner, 1, 1).await;
    proxy.set_faults(Faults {
        entry_faults: vec![(Arc::new(|_: &Value| true), "ThrottlingException".into())],
        ..Faults::default()
    });
    for _ in 0..4 {
        outbox_relay::handle(&app, Value::Null, later())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let last: (String, i32, String) = sqlx::query_as(
        "SELECT status, attempts, last_error FROM outbox_events ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!((last.0.as_str(), last.1), ("DEAD", 4));
    assert!(last.2.contains("gave up after 4 attempts"), "{}", last.2);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn four_relays_publish_five_thousand_rows_exactly_once(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    seed_events(&owner, 5000, 1).await;
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(Arc::new(
            relay_app(&owner, &proxy.url, &bus.name, &[("RELAY_BATCH_SIZE", "50")]).await,
        ));
    }
    let runs = apps.iter().map(|app| {
        let app = Arc::clone(app);
        tokio::spawn(async move {
            outbox_relay::handle(&app, Value::Null, later())
                .await
                .unwrap()
        })
    });
    let reports: Vec<_> = futures::future::join_all(runs).await;
    let published: u64 = reports.into_iter().map(|r| r.unwrap().published).sum();
    assert_eq!(published, 5000);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for detail in proxy.accepted() {
        *seen
            .entry(detail["eventId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 5000);
    assert!(seen.values().all(|n| *n == 1), "a row was published twice");
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 5000)])
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn each_aggregates_events_go_out_in_sequence(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    seed_events(&owner, 150, 4).await;
    // Every 7th event is throttled on its first attempt, every 13th on two.
    let attempts: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let tally = Arc::clone(&attempts);
    let flaky = Arc::new(move |detail: &Value| {
        let id = detail["eventId"].as_str().unwrap().to_owned();
        let n = detail["data"]["n"].as_i64().unwrap() as usize + id.len();
        let mut tally = tally.lock().unwrap();
        let seen = tally.entry(id.clone()).or_default();
        *seen += 1;
        let limit = if id.as_bytes()[0] % 13 == 0 {
            2
        } else if n % 7 == 0 {
            1
        } else {
            0
        };
        *seen <= limit
    }) as common::Matcher;
    proxy.set_faults(Faults {
        entry_faults: vec![(flaky, "ThrottlingException".into())],
        ..Faults::default()
    });
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(Arc::new(
            relay_app(&owner, &proxy.url, &bus.name, &[("RELAY_BATCH_SIZE", "40")]).await,
        ));
    }
    let started = Instant::now();
    while statuses(&owner)
        .await
        .get("PUBLISHED")
        .copied()
        .unwrap_or(0)
        < 600
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            statuses(&owner).await
        );
        let runs = apps.iter().map(|app| {
            let app = Arc::clone(app);
            tokio::spawn(async move {
                outbox_relay::handle(&app, Value::Null, later())
                    .await
                    .unwrap()
            })
        });
        futures::future::join_all(runs).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for detail in proxy.accepted() {
        let aggregate = detail["aggregateId"].as_str().unwrap().to_owned();
        let sequence = detail["aggregateSequence"].as_i64().unwrap();
        let previous = last.insert(aggregate.clone(), sequence).unwrap_or(0);
        assert_eq!(sequence, previous + 1, "aggregate {aggregate} out of order");
    }
    assert_eq!(last.len(), 150);
    assert!(
        attempts.lock().unwrap().values().any(|n| *n > 1),
        "faults were injected"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_relay_that_dies_loses_nothing(owner: PgPool) {
    let bus = Bus::create(true).await;
    let proxy = Proxy::start().await;
    let app = relay_app(&owner, &proxy.url, &bus.name, &[]).await;
    seed_events(&owner, 6, 1).await;
    let mut conn = owner.acquire().await.unwrap();

    // A relay claims three rows and dies before publishing: its lease (1 s) runs out.
    let dead_token = Uuid::new_v4();
    let claimed = outbox::claim_due(&mut conn, dead_token, 1.0, 3, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.published, 3, "the claimed rows wait for their lease");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!((report.published, report.leases_reclaimed), (3, 3));
    // The dead relay comes back: its marks change nothing.
    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(
        outbox::mark_published(&mut conn, dead_token, &ids)
            .await
            .unwrap(),
        0
    );

    // A relay that dies after PutEvents and before marking: published again after the lease —
    // at least once, never lost.
    seed_events(&owner, 2, 1).await;
    let token = Uuid::new_v4();
    let claimed = outbox::claim_due(&mut conn, token, 1.0, 10, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let events = aws_sdk_eventbridge::Client::new(&meterbridge::testing::moto_sdk_config().await);
    for row in &claimed {
        events
            .put_events()
            .entries(
                aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .event_bus_name(&bus.name)
                    .source("meterbridge.payments")
                    .detail_type(&row.event_type)
                    .detail(row.payload.to_string())
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.published, 2);
    let delivered = bus.drain().await;
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for envelope in &delivered {
        *per_event
            .entry(envelope["detail"]["eventId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_event.len(), 8, "every event delivered");
    for row in &claimed {
        assert_eq!(
            per_event[&row.event_id.to_string()],
            2,
            "delivered twice: at least once"
        );
    }
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 8)])
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_relay_near_its_deadline_stops_claiming(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(
        &owner,
        &proxy.url,
        &bus.name,
        &[
            ("RELAY_DEADLINE_MARGIN_MS", "5000"),
            ("RELAY_BATCH_SIZE", "10"),
        ],
    )
    .await;
    seed_events(&owner, 40, 1).await;
    let report = outbox_relay::handle(&app, Value::Null, Instant::now() + Duration::from_secs(4))
        .await
        .unwrap();
    assert!(report.stopped_for_deadline);
    assert_eq!(report.claimed, 0);
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PENDING".into(), 40)])
    );
    // With time for some claims: whatever it claimed it finished; nothing is left PROCESSING.
    let report = outbox_relay::handle(
        &app,
        Value::Null,
        Instant::now() + Duration::from_millis(5150),
    )
    .await
    .unwrap();
    let after = statuses(&owner).await;
    assert_eq!(after.get("PROCESSING"), None, "{after:?}");
    assert_eq!(
        after.get("PUBLISHED").copied().unwrap_or(0) as u64,
        report.published
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn dead_events_hold_their_aggregate_until_redriven_or_skipped(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(&owner, &proxy.url, &bus.name, &[]).await;
    seed_events(&owner, 2, 2).await;
    let first: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM outbox_events WHERE aggregate_sequence = 1 ORDER BY id",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    let refused = first[0].to_string();
    proxy.set_faults(Faults {
        entry_faults: vec![(
            Arc::new(move |d: &Value| d["eventId"] == refused.as_str()),
            "InvalidArgument".into(),
        )],
        ..Faults::default()
    });
    for _ in 0..2 {
        outbox_relay::handle(&app, Value::Null, later())
            .await
            .unwrap();
    }
    // The other aggregate went out whole; this one stopped at its dead first event.
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([
            ("PUBLISHED".into(), 2),
            ("DEAD".into(), 1),
            ("PENDING".into(), 1)
        ])
    );
    // Redriven (attempts reset), it and the event it held go out, in order.
    proxy.set_faults(Faults::default());
    let mut conn = owner.acquire().await.unwrap();
    assert_eq!(
        outbox::redrive(&mut conn, &[first[0]], None).await.unwrap(),
        [first[0]]
    );
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM outbox_events WHERE event_id = $1")
            .bind(first[0])
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(attempts, 0);
    for _ in 0..2 {
        outbox_relay::handle(&app, Value::Null, later())
            .await
            .unwrap();
    }
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 4)])
    );

    // Skipped instead: the event stays unpublished, the next one goes.
    let tenant = seed_events(&owner, 1, 2).await;
    let held: Uuid = sqlx::query_scalar(
        "SELECT event_id FROM outbox_events WHERE tenant_id = $1 AND aggregate_sequence = 1",
    )
    .bind(tenant.id)
    .fetch_one(&owner)
    .await
    .unwrap();
    let refused = held.to_string();
    proxy.set_faults(Faults {
        entry_faults: vec![(
            Arc::new(move |d: &Value| d["eventId"] == refused.as_str()),
            "InvalidArgument".into(),
        )],
        ..Faults::default()
    });
    outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(outbox::skip(&mut conn, &[held]).await.unwrap(), [held]);
    outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 5), ("SKIPPED".into(), 1)])
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn unsendable_rows_are_dead_before_sending(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(
        &owner,
        &proxy.url,
        &bus.name,
        &[("RELAY_MAX_REQUEST_BYTES", "4096")],
    )
    .await;
    seed_events(&owner, 3, 1).await;
    sqlx::query(
        "UPDATE outbox_events SET payload = jsonb_build_object('blob', repeat('x', 5000))
          WHERE id = (SELECT min(id) FROM outbox_events)",
    )
    .execute(&owner)
    .await
    .unwrap();
    // (A DetailType over 128 characters cannot be stored: the schema refuses it, and the relay's
    // own check is unit-tested in meterbridge::relay.)
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!((report.published, report.dead), (2, 1));
    assert_eq!(proxy.accepted().len(), 2, "the dead row was never sent");
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT last_error FROM outbox_events WHERE status = 'DEAD' ORDER BY id",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(errors[0].contains("at most 4096"), "{}", errors[0]);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn published_rows_past_retention_are_deleted(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(
        &owner,
        &proxy.url,
        &bus.name,
        &[("OUTBOX_RETENTION_DAYS", "7")],
    )
    .await;
    seed_events(&owner, 5, 1).await;
    outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE outbox_events SET published_at = now() - interval '8 days'
          WHERE id IN (SELECT id FROM outbox_events ORDER BY id LIMIT 3)",
    )
    .execute(&owner)
    .await
    .unwrap();
    seed_events(&owner, 1, 1).await; // not yet published: never deleted
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.deleted, 3);
    assert_eq!(
        statuses(&owner).await,
        HashMap::from([("PUBLISHED".into(), 3)])
    );
}

/// A stored response to an Idempotency-Key, `age_days` old, for a tenant of its own.
async fn idempotency_record(owner: &PgPool, key: &str, age_days: i32) {
    let tenant = meterbridge::testing::create_tenant(owner, "idem").await;
    sqlx::query(
        "INSERT INTO idempotency_records (tenant_id, source_service, idempotency_key, operation,
                                          request_hash, response_status, response_body,
                                          created_at)
         VALUES ($1, 'billing', $2, 'payment.create', sha256('r'), 201,
                 '{\"description\": \"a payer''s order\"}', now() - make_interval(days => $3))",
    )
    .bind(tenant.id.0)
    .bind(key)
    .bind(age_days)
    .execute(owner)
    .await
    .unwrap();
}

async fn idempotency_keys(owner: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT idempotency_key FROM idempotency_records ORDER BY 1")
        .fetch_all(owner)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn idempotency_records_past_retention_are_deleted_and_no_younger_one(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(
        &owner,
        &proxy.url,
        &bus.name,
        &[("IDEMPOTENCY_RETENTION_DAYS", "30")],
    )
    .await;
    idempotency_record(&owner, "k-old", 31).await;
    idempotency_record(&owner, "k-older", 400).await;
    idempotency_record(&owner, "k-young", 29).await;
    idempotency_record(&owner, "k-today", 0).await;
    let report = outbox_relay::handle(&app, Value::Null, later())
        .await
        .unwrap();
    assert_eq!(report.idempotency_expired, 2);
    assert_eq!(idempotency_keys(&owner).await, ["k-today", "k-young"]);

    // The relay's role finds old records, never reads what they hold, and cannot delete one
    // younger than a day whatever it asks.
    let ops = meterbridge::testing::pool_as(&owner, meterbridge::testing::OPS_ROLE).await;
    let err = sqlx::query("SELECT response_body FROM idempotency_records")
        .execute(&ops)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    let deleted =
        sqlx::query("DELETE FROM idempotency_records WHERE created_at > now() - interval '2 days'")
            .execute(&ops)
            .await
            .unwrap()
            .rows_affected();
    assert_eq!(deleted, 0);
    assert_eq!(idempotency_keys(&owner).await, ["k-today", "k-young"]);
}

/// (sequential scans, rows fetched through indexes) of outbox_events by this session so far.
async fn reads(c: &mut sqlx::PgConnection) -> (i64, i64) {
    sqlx::query_as::<_, (i64, i64)>(
        "SELECT coalesce(sum(seq_scan), 0)::int8, coalesce(sum(idx_tup_fetch), 0)::int8
           FROM pg_stat_xact_user_tables WHERE relname = 'outbox_events'",
    )
    .fetch_one(c)
    .await
    .unwrap()
}

/// The claim reads the due index and the aggregate-order index, never the table's history.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_claim_reads_only_its_indexes(owner: PgPool) {
    seed_events(&owner, 20_000, 1).await;
    sqlx::query("UPDATE outbox_events SET status = 'PUBLISHED', published_at = now()")
        .execute(&owner)
        .await
        .unwrap();
    seed_events(&owner, 10, 1).await;
    sqlx::query("VACUUM ANALYZE outbox_events")
        .execute(&owner)
        .await
        .unwrap();
    let ops = meterbridge::testing::pool_as(&owner, meterbridge::testing::OPS_ROLE).await;
    let mut conn = ops.acquire().await.unwrap();
    let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
    let before = reads(&mut tx).await;
    let claimed = outbox::claim_due(&mut tx, Uuid::new_v4(), 60.0, 100, chrono::Utc::now())
        .await
        .unwrap();
    let after = reads(&mut tx).await;
    tx.commit().await.unwrap();
    assert_eq!(claimed.len(), 10);
    assert_eq!(after.0 - before.0, 0, "no sequential scan");
    assert!(after.1 - before.1 <= 40, "read {} rows", after.1 - before.1);
}

/// Every payload in events/outbox-relay/ through the handler.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_fixture_runs_through_the_handler(owner: PgPool) {
    let bus = Bus::create(false).await;
    let proxy = Proxy::start_local().await;
    let app = relay_app(&owner, &proxy.url, &bus.name, &[]).await;
    seed_events(&owner, 3, 1).await;
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/outbox-relay");
    let load = |name: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let report = outbox_relay::handle(&app, load("scheduled.json"), later())
        .await
        .unwrap();
    assert_eq!(report.published, 3);
    let err = outbox_relay::handle(&app, load("unknown-job.json"), later())
        .await
        .unwrap_err();
    let diagnostic: lambda_runtime::Diagnostic = err.into();
    assert_eq!(diagnostic.error_type, "BadPayload");
    assert!(diagnostic.error_message.contains("aggregate"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["scheduled.json", "unknown-job.json"]);
}

/// A tenant's backlog of 100,000 due rows does not hold back another tenant's one row: the
/// claim interleaves tenants, so the other row goes out in the first claim cycle.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_tenants_backlog_never_delays_another_tenants_event(owner: PgPool) {
    let flooding = seed_events(&owner, 100_000, 1).await;
    // Its rows have waited an hour: before, the claim took the oldest due rows of any tenant.
    sqlx::query(
        "UPDATE outbox_events SET next_attempt_at = now() - interval '1 hour' WHERE tenant_id = $1",
    )
    .bind(flooding.id)
    .execute(&owner)
    .await
    .unwrap();
    let paying = seed_events(&owner, 1, 1).await;
    sqlx::query("VACUUM ANALYZE outbox_events")
        .execute(&owner)
        .await
        .unwrap();
    let ops = meterbridge::testing::pool_as(&owner, meterbridge::testing::OPS_ROLE).await;
    let mut conn = ops.acquire().await.unwrap();
    let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
    let before = reads(&mut tx).await;
    let claimed = outbox::claim_due(&mut tx, Uuid::new_v4(), 60.0, 100, chrono::Utc::now())
        .await
        .unwrap();
    let after = reads(&mut tx).await;
    tx.commit().await.unwrap();
    assert_eq!(claimed.len(), 100);
    let of = |tenant: meterbridge::domain::TenantId| {
        claimed.iter().filter(|c| c.tenant_id == tenant.0).count()
    };
    assert_eq!(
        of(paying.id),
        1,
        "the other tenant's event is in the first claim"
    );
    assert_eq!(of(flooding.id), 99);
    // The claim walks its indexes for what it takes, never the backlog.
    assert_eq!(after.0 - before.0, 0, "no sequential scan");
    assert!(
        after.1 - before.1 <= 1_000,
        "read {} rows",
        after.1 - before.1
    );
}
