//! The deduplication window and the storage policy (migration 0006): duplicates and conflicts
//! are caught across day partitions and key generations, nothing slips between two
//! generations while a rotation runs, keys are forgotten only after the window, and old days
//! leave the table whole.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Duration as Days, Utc};
use common::{statuses, Fixture};
use meterbridge::domain::usage::{validate_event, EventLimits, Submitter};
use meterbridge::domain::{SourceService, Trust};
use meterbridge::repo::usage_events;
use meterbridge::repo::usage_storage::{self, StorageAction, StoragePolicy};
use meterbridge::testing::{create_tenant, migrate_up_to, pool_as, INGEST_ROLE};
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::{Acquire, PgPool};

async fn maintain(
    owner: &PgPool,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Vec<StorageAction> {
    let mut tx = owner.begin().await.unwrap();
    let done = usage_storage::maintain(&mut tx, now, policy).await.unwrap();
    tx.commit().await.unwrap();
    done
}

/// A full compaction, now (as with `full_compaction_hours` 0).
async fn compact(owner: &PgPool) -> Vec<StorageAction> {
    compact_at(owner, meterbridge::testing::now(), &always_full()).await
}

async fn compact_at(
    owner: &PgPool,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Vec<StorageAction> {
    let mut tx = owner.begin().await.unwrap();
    let done = usage_storage::compact(&mut tx, now, policy).await.unwrap();
    tx.commit().await.unwrap();
    done
}

fn always_full() -> StoragePolicy {
    StoragePolicy {
        full_compaction_hours: 0,
        ..StoragePolicy::default()
    }
}

/// The partitions of usage_event_keys, by name.
async fn key_partitions(owner: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'usage_event_keys'::regclass ORDER BY 1",
    )
    .fetch_all(owner)
    .await
    .unwrap()
}

/// A moment at which the open key generation (opened now) is due for rotation.
fn rotation_due() -> DateTime<Utc> {
    meterbridge::testing::now()
        + Days::hours(StoragePolicy::default().generation_hours.into())
        + Days::hours(1)
}

fn did(done: &[StorageAction], action: &str) -> Vec<String> {
    done.iter()
        .filter(|a| a.action == action)
        .map(|a| a.object.clone())
        .collect()
}

fn with(event: &Value, field: &str, value: Value) -> Value {
    let mut e = event.clone();
    e[field] = value;
    e
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn resends_are_caught_across_day_partitions(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    // Just before today's midnight, so that a resend "a moment later" is in another partition.
    let midnight = meterbridge::testing::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let before = midnight - Days::microseconds(1);
    let event = with(
        &fx.event(1, "api.requests", 2),
        "occurredAt",
        json!(before.to_rfc3339()),
    );
    assert_eq!(
        fx.submit(&app, json!({ "events": [event.clone()] }))
            .await
            .body["accepted"],
        1
    );

    // The same event again: a duplicate, nothing stored twice.
    let r = fx.submit(&app, json!({ "events": [event.clone()] })).await;
    assert_eq!(statuses(&r.body), ["duplicate"], "{}", r.body);
    // Its id with another instant, across the partition boundary: a conflict.
    let moved = with(&event, "occurredAt", json!(midnight.to_rfc3339()));
    let r = fx.submit(&app, json!({ "events": [moved] })).await;
    assert_eq!(
        r.body["results"][0]["code"], "event_id_conflict",
        "{}",
        r.body
    );
    // Its operation (correlation, metric, instant) under another id: a conflict.
    let other_id = with(&event, "eventId", json!(format!("{}-other", fx.run)));
    let r = fx.submit(&app, json!({ "events": [other_id] })).await;
    assert_eq!(
        r.body["results"][0]["code"], "correlation_conflict",
        "{}",
        r.body
    );
    assert_eq!(fx.stored_events().await, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn keys_are_remembered_for_the_window_then_forgotten(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let keyed = with(
        &fx.event(1, "api.requests", 2),
        "idempotencyKey",
        json!("order-1"),
    );
    let event = fx.event(2, "api.requests", 3);
    let r = fx
        .submit(&app, json!({ "events": [keyed.clone(), event.clone()] }))
        .await;
    assert_eq!(r.body["accepted"], 2, "{}", r.body);

    // A generation later the one that holds their keys is closed, but still probed.
    let week = rotation_due();
    assert_eq!(
        did(&maintain(&owner, week, &policy).await, "rotated").len(),
        1
    );
    let r = fx
        .submit(&app, json!({ "events": [event.clone(), keyed.clone()] }))
        .await;
    assert_eq!(statuses(&r.body), ["duplicate", "duplicate"], "{}", r.body);
    let later = meterbridge::testing::now() - Days::minutes(1);
    let moved = with(&event, "occurredAt", json!(later.to_rfc3339()));
    let rekeyed = with(
        &with(&keyed, "eventId", json!(format!("{}-new", fx.run))),
        "quantity",
        json!(9),
    );
    let r = fx
        .submit(&app, json!({ "events": [moved.clone(), rekeyed.clone()] }))
        .await;
    assert_eq!(statuses(&r.body), ["conflict", "conflict"], "{}", r.body);
    assert_eq!(
        r.body["results"][1]["code"], "idempotency_key_conflict",
        "{}",
        r.body
    );
    assert_eq!(fx.stored_events().await, 2);

    // The window after that generation closed, its keys are gone: the same ids are new again
    // (in real time an identical resend would by then be refused as too old).
    let gone = week + Days::days(policy.dedup_window_days.into()) + Days::hours(1);
    let done = maintain(&owner, gone, &policy).await;
    assert_eq!(did(&done, "expired"), ["usage_event_keys_g1"]);
    let r = fx.submit(&app, json!({ "events": [moved] })).await;
    assert_eq!(statuses(&r.body), ["accepted"], "{}", r.body);
    let stale = with(
        &event,
        "occurredAt",
        json!((meterbridge::testing::now() - Days::days(36)).to_rfc3339()),
    );
    let r = fx.submit(&app, json!({ "events": [stale] })).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(
        r.body["errors"][0]["code"], "occurred_at_too_old",
        "{}",
        r.body
    );
}

/// Closed generations merge into one partition whose keys still count; an expired generation
/// stops counting at once, though its keys wait in the compacted partition for the next
/// compaction, which leaves them out.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn closed_generations_are_compacted_and_still_remembered(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let day = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    let keyed = with(
        &fx.event(1, "api.requests", 2),
        "idempotencyKey",
        json!("order-1"),
    );
    let first = fx.event(2, "api.requests", 3);
    let second = fx.event(3, "api.requests", 4);
    let r = fx
        .submit(&app, json!({ "events": [keyed.clone(), first.clone()] }))
        .await;
    assert_eq!(r.body["accepted"], 2, "{}", r.body);
    assert_eq!(compact(&owner).await, [], "nothing is closed yet");

    // Two rotations: generation 1 holds the first two events' keys, generation 2 the third's.
    let t1 = meterbridge::testing::now() + day;
    assert_eq!(
        did(&maintain(&owner, t1, &policy).await, "rotated"),
        ["usage_event_keys_g2"]
    );
    // A full compaction gives even a lone closed generation its filter.
    let done = compact(&owner).await;
    assert_eq!(did(&done, "compacted"), ["usage_event_keys_c1_1"]);
    assert_eq!(did(&done, "dropped"), ["usage_event_keys_g1"]);
    let r = fx.submit(&app, json!({ "events": [second.clone()] })).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let t2 = t1 + day;
    assert_eq!(
        did(&maintain(&owner, t2, &policy).await, "rotated"),
        ["usage_event_keys_g3"]
    );
    let done = compact(&owner).await;
    assert_eq!(did(&done, "compacted"), ["usage_event_keys_c1_2"]);
    assert_eq!(
        did(&done, "dropped"),
        ["usage_event_keys_c1_1", "usage_event_keys_g2"]
    );
    assert_eq!(
        key_partitions(&owner).await,
        ["usage_event_keys_c1_2", "usage_event_keys_g3"]
    );
    assert_eq!(compact(&owner).await, [], "compacted already");

    // Every key still counts: duplicates, and conflicts for another payload.
    let r = fx
        .submit(
            &app,
            json!({ "events": [keyed.clone(), first.clone(), second.clone()] }),
        )
        .await;
    assert_eq!(
        statuses(&r.body),
        ["duplicate", "duplicate", "duplicate"],
        "{}",
        r.body
    );
    let later = meterbridge::testing::now() - Days::minutes(1);
    let moved_first = with(&first, "occurredAt", json!(later.to_rfc3339()));
    let moved_second = with(&second, "occurredAt", json!(later.to_rfc3339()));
    let rekeyed = with(
        &with(&keyed, "eventId", json!(format!("{}-new", fx.run))),
        "quantity",
        json!(9),
    );
    let r = fx
        .submit(
            &app,
            json!({ "events": [moved_first.clone(), moved_second.clone(), rekeyed.clone()] }),
        )
        .await;
    assert_eq!(
        statuses(&r.body),
        ["conflict", "conflict", "conflict"],
        "{}",
        r.body
    );
    assert_eq!(fx.stored_events().await, 3);

    // The window after generation 1 closed it expires: its keys stop counting at once...
    let gone = t1 + Days::days(policy.dedup_window_days.into()) + Days::minutes(1);
    let done = maintain(&owner, gone, &policy).await;
    assert_eq!(did(&done, "expired"), ["usage_event_keys_g1"]);
    let r = fx
        .submit(
            &app,
            json!({ "events": [moved_first.clone(), moved_second.clone()] }),
        )
        .await;
    assert_eq!(statuses(&r.body), ["accepted", "conflict"], "{}", r.body);
    // ...and the next compaction leaves them out.
    let done = compact(&owner).await;
    assert_eq!(did(&done, "compacted"), ["usage_event_keys_c2_3"]);
    let forgotten: i64 =
        sqlx::query_scalar("SELECT count(*) FROM usage_event_keys WHERE generation = 1")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert_eq!(forgotten, 0);
    let r = fx.submit(&app, json!({ "events": [moved_second] })).await;
    assert_eq!(statuses(&r.body), ["conflict"], "{}", r.body);
    let r = fx.submit(&app, json!({ "events": [second] })).await;
    assert_eq!(statuses(&r.body), ["duplicate"], "{}", r.body);

    // Once every generation in it has expired, the compacted partition goes whole.
    let all_gone = gone + Days::days(policy.dedup_window_days.into()) + day;
    let done = maintain(&owner, all_gone, &policy).await;
    assert!(
        did(&done, "expired").contains(&"usage_event_keys_g3".to_owned()),
        "{done:?}"
    );
    let done = compact(&owner).await;
    assert!(
        did(&done, "dropped").contains(&"usage_event_keys_c2_3".to_owned()),
        "{done:?}"
    );
    assert_eq!(
        did(&done, "compacted"),
        ["usage_event_keys_c4_4"],
        "{done:?}"
    );
    let left: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT generation FROM usage_event_keys ORDER BY 1")
            .fetch_all(&owner)
            .await
            .unwrap();
    assert_eq!(left, [4], "only the live generations' keys are left");
}

/// An hour-long generation rotates at a run that comes up to a minute early (a schedule's
/// jitter), not earlier.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_rotation_is_due_a_minute_early(owner: PgPool) {
    meterbridge::testing::storage_as_of_now(&owner).await;
    let policy = StoragePolicy::default();
    let opened = meterbridge::testing::now() + Days::hours(2);
    assert_eq!(
        did(&maintain(&owner, opened, &policy).await, "rotated"),
        ["usage_event_keys_g2"]
    );
    let early = opened + Days::minutes(58);
    assert_eq!(
        did(&maintain(&owner, early, &policy).await, "rotated"),
        Vec::<String>::new()
    );
    let jittered = opened + Days::minutes(59) + Days::seconds(30);
    assert_eq!(
        did(&maintain(&owner, jittered, &policy).await, "rotated"),
        ["usage_event_keys_g3"]
    );
}

/// The key generations an ingestion transaction of the fixture's tenant would hold.
async fn held_generations(fx: &Fixture, app: &ingest_usage::App) -> usage_events::KeyGenerations {
    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let held = usage_events::hold_key_generation(&mut tx).await.unwrap();
    tx.rollback().await.unwrap();
    held
}

/// Hour-long generations are compacted in two levels: each hour the generations closed since
/// the last full compaction are merged into one partition of their own (probed by its index),
/// and once the oldest of them has waited a day they all join the filtered partition. Every
/// key counts all along.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn recent_generations_are_merged_hourly_and_compacted_daily(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    assert_eq!(
        (policy.generation_hours, policy.full_compaction_hours),
        (1, 24)
    );
    let hour = Days::hours(1) + Days::minutes(1);
    let events: Vec<Value> = (0..4).map(|n| fx.event(n, "api.requests", 1)).collect();
    // An hour for each of the first three events: generations 1, 2 and 3.
    let mut now = meterbridge::testing::now();
    let mut merged = Vec::new();
    for (n, event) in events.iter().take(3).enumerate() {
        let r = fx.submit(&app, json!({ "events": [event] })).await;
        assert_eq!(r.body["accepted"], 1, "{}", r.body);
        now += hour;
        let done = maintain(&owner, now, &policy).await;
        assert_eq!(
            did(&done, "rotated"),
            [format!("usage_event_keys_g{}", n + 2)]
        );
        merged.push(compact_at(&owner, now, &policy).await);
    }
    assert_eq!(merged[0], [], "one closed partition needs no merge");
    assert_eq!(did(&merged[1], "merged"), ["usage_event_keys_r1_2"]);
    assert_eq!(
        did(&merged[1], "dropped"),
        ["usage_event_keys_g1", "usage_event_keys_g2"]
    );
    assert_eq!(did(&merged[2], "merged"), ["usage_event_keys_r1_3"]);
    assert_eq!(
        key_partitions(&owner).await,
        ["usage_event_keys_g4", "usage_event_keys_r1_3"]
    );
    let g = held_generations(&fx, &app).await;
    assert_eq!((g.open, g.unfiltered, g.filtered), (4, Some((1, 3)), None));
    assert_eq!(compact_at(&owner, now, &policy).await, [], "merged already");

    // The merged keys count: duplicates, and a conflict for another payload.
    let r = fx
        .submit(&app, json!({ "events": [events[0], events[1], events[2]] }))
        .await;
    assert_eq!(
        statuses(&r.body),
        ["duplicate", "duplicate", "duplicate"],
        "{}",
        r.body
    );
    let moved = with(&events[1], "quantity", json!(7));
    let r = fx.submit(&app, json!({ "events": [moved] })).await;
    assert_eq!(statuses(&r.body), ["conflict"], "{}", r.body);

    // A day after generation 1 closed, every closed generation goes to the filtered partition.
    let r = fx.submit(&app, json!({ "events": [events[3]] })).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let day_later = now - hour * 2 + Days::hours(24);
    let done = maintain(&owner, day_later, &policy).await;
    assert_eq!(did(&done, "rotated"), ["usage_event_keys_g5"]);
    let done = compact_at(&owner, day_later, &policy).await;
    assert_eq!(
        did(&done, "compacted"),
        ["usage_event_keys_c1_4"],
        "{done:?}"
    );
    assert_eq!(
        did(&done, "dropped"),
        ["usage_event_keys_g4", "usage_event_keys_r1_3"]
    );
    let g = held_generations(&fx, &app).await;
    let filtered = g.filtered.expect("a filter");
    assert_eq!(
        (g.open, g.unfiltered, filtered.first, filtered.last),
        (5, None, 1, 4)
    );
    let r = fx.submit(&app, json!({ "events": events })).await;
    assert_eq!(
        statuses(&r.body),
        ["duplicate", "duplicate", "duplicate", "duplicate"],
        "{}",
        r.body
    );
    assert_eq!(fx.stored_events().await, 4);

    // The next hour's generation waits in a partition of its own for the next day's full
    // compaction; a full compaction is never due more than a week on.
    let next = day_later + hour;
    maintain(&owner, next, &policy).await;
    assert_eq!(compact_at(&owner, next, &policy).await, []);
    let done = compact_at(&owner, next + Days::hours(24), &policy).await;
    assert_eq!(
        did(&done, "compacted"),
        ["usage_event_keys_c1_5"],
        "{done:?}"
    );
    let mut tx = owner.begin().await.unwrap();
    let err = sqlx::query("SELECT * FROM usage_event_keys_compact(now(), interval '8 days')")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("within 0 to 7 days"), "{err}");
}

/// The compacted partition is probed through its Bloom filter: no stored key is ever missed
/// (a filter has no false negatives), and a false positive costs a probe, never a wrong answer.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_bloom_filter_never_hides_a_stored_key(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let day = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    let stored: Vec<Value> = (0..600).map(|n| fx.event(n, "api.requests", 1)).collect();
    for (i, batch) in stored.chunks(200).enumerate() {
        let r = fx.submit(&app, json!({ "events": batch })).await;
        assert_eq!(r.body["accepted"], 200, "{}", r.body);
        // Spread over two generations, both compacted.
        if i == 1 {
            maintain(&owner, meterbridge::testing::now() + day, &policy).await;
        }
    }
    maintain(&owner, meterbridge::testing::now() + day + day, &policy).await;
    assert_eq!(
        did(&compact(&owner).await, "compacted"),
        ["usage_event_keys_c1_2"]
    );
    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let held = usage_events::hold_key_generation(&mut tx).await.unwrap();
    tx.rollback().await.unwrap();
    let filtered = held.filtered.expect("the compacted partition has a filter");
    assert_eq!(
        (filtered.first, filtered.last, held.unfiltered),
        (1, 2, None)
    );

    for batch in stored.chunks(300) {
        let r = fx.submit(&app, json!({ "events": batch })).await;
        assert_eq!(r.body["duplicates"], 300, "{}", r.body);
    }
    let fresh: Vec<Value> = (600..1200)
        .map(|n| fx.event(n, "api.requests", 1))
        .collect();
    for batch in fresh.chunks(300) {
        let r = fx.submit(&app, json!({ "events": batch })).await;
        assert_eq!(r.body["accepted"], 300, "{}", r.body);
    }
    assert_eq!(fx.stored_events().await, 1200);
}

/// A compaction builds without holding ingestion back, and its swap waits for the ingestion in
/// flight like a rotation (and gives up at its lock timeout).
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_compaction_waits_for_ingestion_in_flight(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let day = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    maintain(&owner, meterbridge::testing::now() + day, &policy).await;
    maintain(&owner, meterbridge::testing::now() + day + day, &policy).await;

    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let held = usage_events::hold_key_generation(&mut tx).await.unwrap();
    assert_eq!(held.unfiltered, Some((1, 2)));
    let mut compaction = owner.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '300ms'")
        .execute(&mut *compaction)
        .await
        .unwrap();
    let err = usage_storage::compact(&mut compaction, meterbridge::testing::now(), &always_full())
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("55P03"), "{err}");
    drop(compaction);
    tx.commit().await.unwrap();
    assert_eq!(
        did(&compact(&owner).await, "compacted"),
        ["usage_event_keys_c1_2"]
    );
}

/// Batches of the same events race rotations, merges and compactions that a test clock forces
/// one after another: each event is stored once, whichever generation or partition took its keys.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn no_duplicate_slips_between_generations(owner: PgPool) {
    let fx = Arc::new(Fixture::new(&owner).await);
    let policy = StoragePolicy {
        generation_hours: 1,
        ..StoragePolicy::default()
    };
    let pool: Vec<Value> = (0..200).map(|n| fx.event(n, "api.requests", 1)).collect();
    let mut senders = Vec::new();
    for s in 0..6 {
        let fx = Arc::clone(&fx);
        let app = fx.app(&[]).await;
        let pool = pool.clone();
        senders.push(tokio::spawn(async move {
            let mut accepted = 0;
            for round in 0..10 {
                let batch: Vec<Value> = pool
                    .iter()
                    .skip((s * 7 + round * 13) % 150)
                    .take(50)
                    .cloned()
                    .collect();
                let r = fx.submit(&app, json!({ "events": batch })).await;
                assert_eq!(r.status, 200, "{}", r.body);
                assert_eq!(r.body["conflicts"], 0, "{}", r.body);
                accepted += r.body["accepted"].as_u64().unwrap();
            }
            accepted
        }));
    }
    let rotations = {
        let owner = owner.clone();
        tokio::spawn(async move {
            let (mut rotated, mut merged, mut compacted) = (0, 0, 0);
            for hour in 1..=40 {
                let now = meterbridge::testing::now() + Days::hours(hour);
                let done = maintain(&owner, now, &policy).await;
                rotated += did(&done, "rotated").len();
                // As the admin function runs it (recent merges, a full compaction a day
                // later), and a full one every third hour besides.
                let done = compact_at(&owner, now, &policy).await;
                merged += did(&done, "merged").len();
                compacted += did(&done, "compacted").len();
                if hour % 3 == 0 {
                    compacted += did(&compact(&owner).await, "compacted").len();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (rotated, merged, compacted)
        })
    };
    let mut accepted = 0;
    for sender in senders {
        accepted += sender.await.unwrap();
    }
    let (rotated, merged, compacted) = rotations.await.unwrap();
    assert!(
        rotated >= 10 && merged >= 3 && compacted >= 3,
        "{rotated} rotations, {merged} merges, {compacted} compactions"
    );
    let stored = fx.stored_events().await;
    assert_eq!(
        accepted as i64, stored,
        "every acceptance is one stored event"
    );
    let distinct: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT event_id) FROM usage_events WHERE tenant_id = $1",
    )
    .bind(fx.tenant.id)
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(distinct, stored, "no event id stored twice");
    let generations: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT generation) FROM usage_event_keys")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(generations > 1, "the keys span several generations");
}

/// A rotation waits for the ingestion transactions in flight (and so cannot split one); one
/// that is stuck makes the rotation give up at its lock timeout, to try again next run.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_rotation_waits_for_ingestion_in_flight(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    usage_events::hold_key_generation(&mut tx).await.unwrap();

    let mut maint = owner.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '300ms'")
        .execute(&mut *maint)
        .await
        .unwrap();
    let err = usage_storage::maintain(&mut maint, rotation_due(), &StoragePolicy::default())
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("55P03"), "{err}");
    drop(maint);

    tx.commit().await.unwrap();
    let done = maintain(&owner, rotation_due(), &StoragePolicy::default()).await;
    assert_eq!(did(&done, "rotated"), ["usage_event_keys_g2"]);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn old_days_are_archived_whole_then_dropped(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let yesterday = meterbridge::testing::now() - Days::days(1);
    let event = with(
        &fx.event(1, "api.requests", 2),
        "occurredAt",
        json!(yesterday.to_rfc3339()),
    );
    assert_eq!(
        fx.submit(&app, json!({ "events": [event] })).await.body["accepted"],
        1
    );
    let day = yesterday.format("%Y%m%d").to_string();

    let policy = StoragePolicy {
        retention_days: 80,
        archive_days: 3,
        ..StoragePolicy::default()
    };
    // Nothing is due yet: the run only makes sure the days ahead exist.
    let done = maintain(&owner, meterbridge::testing::now(), &policy).await;
    assert!(
        did(&done, "archived").is_empty() && did(&done, "dropped").is_empty(),
        "{done:?}"
    );

    // Past the retention, yesterday's partition leaves the table whole, into usage_archive.
    let past = meterbridge::testing::now() + Days::days(80);
    let done = maintain(&owner, past, &policy).await;
    assert!(
        did(&done, "archived").contains(&format!("usage_events_p{day}")),
        "{done:?}"
    );
    assert_eq!(fx.stored_events().await, 0);
    let archived: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM usage_archive.usage_events_p{day}"
    ))
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(archived, 1);
    // The days ahead of that date were created.
    let ahead = (past + Days::days(14)).format("%Y%m%d").to_string();
    assert!(
        did(&done, "created").contains(&format!("usage_events_p{ahead}")),
        "{done:?}"
    );

    // The archive days later, it is dropped; a run again does nothing.
    let done = maintain(&owner, past + Days::days(3), &policy).await;
    assert!(
        did(&done, "dropped").contains(&format!("usage_events_p{day}")),
        "{done:?}"
    );
    let again = maintain(&owner, past + Days::days(3), &policy).await;
    assert!(again.is_empty(), "{again:?}");
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_missing_partition_is_503_and_stores_nothing(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let today = meterbridge::testing::now().format("%Y%m%d").to_string();
    sqlx::query(&format!("DROP TABLE usage_events_p{today}"))
        .execute(&owner)
        .await
        .unwrap();
    let r = fx
        .submit(&app, json!({ "events": [fx.event(1, "api.requests", 2)] }))
        .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.headers["retry-after"], "30");
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_event_keys")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(keys, 0);

    let done = maintain(
        &owner,
        meterbridge::testing::now(),
        &StoragePolicy::default(),
    )
    .await;
    assert!(
        did(&done, "created").contains(&format!("usage_events_p{today}")),
        "{done:?}"
    );
    let r = fx
        .submit(&app, json!({ "events": [fx.event(1, "api.requests", 2)] }))
        .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
}

#[test]
fn the_policy_keeps_events_longer_than_keys() {
    assert!(StoragePolicy::default().check().is_ok());
    let short = StoragePolicy {
        retention_days: 72,
        generation_hours: 36 * 24,
        ..StoragePolicy::default()
    };
    assert!(
        short.check().is_err(),
        "36 + 36 + 1 days of keys outlive 72 days of events"
    );
}

/// Events stored before migration 0006 get their keys from the migration (hashed in SQL):
/// resends of them are recognised by the keys ingestion now hashes in Rust.
#[sqlx::test(migrations = false)]
async fn events_stored_before_partitioning_keep_their_keys(owner: PgPool) {
    migrate_up_to(&owner, 5).await;
    let fx = Fixture::new(&owner).await;
    // The catalog as the owner reads it: ingestion's role comes with a later migration.
    let catalog = meterbridge::domain::MetricCatalog::new(
        meterbridge::repo::metrics::catalog(&owner).await.unwrap(),
    );
    let source = SourceService::parse("crm").unwrap();
    let submitter = Submitter {
        tenant_id: fx.tenant.id,
        tenant_slug: &fx.tenant.slug,
        source: &source,
        trust: Trust::Internal,
        catalog: &catalog,
        now: meterbridge::testing::now(),
        limits: EventLimits::default(),
    };
    let db_now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&owner)
        .await
        .unwrap();
    let at_db_now = |e: Value| with(&e, "occurredAt", json!(db_now.to_rfc3339()));
    let keyed = at_db_now(with(
        &fx.event(1, "api.requests", 2),
        "idempotencyKey",
        json!("order-1"),
    ));
    let plain = at_db_now(fx.event(2, "api.requests", 3));
    let submitter = Submitter {
        now: db_now,
        ..submitter
    };
    for raw in [&keyed, &plain] {
        // As the code of migration 0005 stored them.
        let e = validate_event(raw.clone(), &submitter).unwrap();
        sqlx::query(
            "INSERT INTO usage_events (tenant_id, source_service, event_id, metric, quantity,
                 occurred_at, correlation_id, classification, idempotency_key, payload_hash)
             VALUES ($1, 'crm', $2, $3, $4, $5, $6, 'BILLABLE', $7, $8)",
        )
        .bind(fx.tenant.id)
        .bind(&e.event_id)
        .bind(&e.metric)
        .bind(e.quantity)
        .bind(e.occurred_at)
        .bind(&e.correlation_id)
        .bind(&e.idempotency_key)
        .bind(e.payload_hash.as_slice())
        .execute(&owner)
        .await
        .unwrap();
    }
    meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    // Migration 0006 made the day partitions around the database's clock, whatever day the
    // tests run as of: the rest of this test runs by that clock.
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_event_keys")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(
        keys, 3,
        "the event keys of both, the idempotency key of one"
    );

    let app = fx.app_by(meterbridge::clock::system()).await;
    let r = fx
        .submit(&app, json!({ "events": [keyed.clone(), plain.clone()] }))
        .await;
    assert_eq!(statuses(&r.body), ["duplicate", "duplicate"], "{}", r.body);
    let rekeyed = with(
        &with(&keyed, "eventId", json!("fresh")),
        "quantity",
        json!(5),
    );
    let same_op = with(
        &with(&plain, "eventId", json!("fresh-2")),
        "quantity",
        json!(5),
    );
    let r = fx
        .submit(&app, json!({ "events": [rekeyed, same_op] }))
        .await;
    let codes: Vec<&str> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["idempotency_key_conflict", "correlation_conflict"],
        "{}",
        r.body
    );
    assert_eq!(fx.stored_events().await, 2);
}

/// The keys table under the API role: another tenant's keys are invisible and cannot be
/// written, no key can be updated or deleted, and the storage maintenance is the owner's alone.
/// Keys of long, multibyte identifiers still deduplicate exactly.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_key_table_is_tenant_bound_and_append_only(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let long_id: String = "é".repeat(128);
    let event = with(&fx.event(1, "api.requests", 2), "eventId", json!(long_id));
    let r = fx.submit(&app, json!({ "events": [event.clone()] })).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let r = fx.submit(&app, json!({ "events": [event] })).await;
    assert_eq!(statuses(&r.body), ["duplicate"], "{}", r.body);

    let globex = create_tenant(&owner, "globex").await;
    let api = Database::from_pool(pool_as(&owner, INGEST_ROLE).await);
    let mut tx = api.tenant_tx(globex.id).await.unwrap();
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_event_keys")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 0, "acme's keys are invisible to globex");
    let forged = sqlx::query(
        "INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
         VALUES (1, gen_random_uuid(), $1, now(), 1)",
    )
    .bind(fx.tenant.id)
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(
        forged.to_string().contains("row-level security"),
        "{forged}"
    );
    drop(tx);

    let mut tx = api.tenant_tx(fx.tenant.id).await.unwrap();
    for statement in [
        "DELETE FROM usage_event_keys",
        "UPDATE usage_event_keys SET generation = 2",
        "UPDATE usage_key_generations SET closed_at = now()",
        "SELECT * FROM usage_storage_maintain(now(), 14, 90, 7, interval '36 days', interval '36 days')",
        "SELECT * FROM usage_event_keys_compact()",
        "UPDATE usage_key_generations SET expired_at = now()",
        "UPDATE usage_key_generations SET filter_id = NULL, filter_blocks = NULL",
        "DELETE FROM usage_key_filter_blocks",
        "INSERT INTO usage_key_filter_blocks (filter, block, bits) VALUES (1, 0, repeat('1', 4096)::bit(4096))",
    ] {
        let mut sp = (&mut tx).begin().await.unwrap();
        let err = sqlx::query(statement).execute(&mut *sp).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{statement}: {err}");
    }
}
