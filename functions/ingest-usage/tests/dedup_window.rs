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
use meterbridge::domain::{SourceService, Tenant, Trust};
use meterbridge::repo::usage_events;
use meterbridge::repo::usage_storage::{self, StorageAction, StoragePolicy};
use meterbridge::testing::{
    create_tenant, maintain_storage as maintain, migrate_up_to, pool_as, INGEST_ROLE,
};
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::{Acquire, PgPool};

/// The key maintenance run to the end, as the admin function runs it after each maintenance.
async fn compact(owner: &PgPool) -> Vec<StorageAction> {
    let far = std::time::Instant::now() + Duration::from_secs(600);
    let done = usage_storage::compact(owner, &StoragePolicy::default(), far)
        .await
        .unwrap();
    assert!(!done.more, "{done:?}");
    done.actions
}

/// Levels 1 and 2 merge after `hours` hours and `days` days (24 and 7 by default): a test
/// sees every level without waiting for a week of rotations.
async fn merge_levels_at(owner: &PgPool, hours: i16, days: i16) {
    sqlx::query(
        "UPDATE usage_key_levels SET merge_at = CASE level WHEN 1 THEN $1 WHEN 2 THEN $2 END
          WHERE level IN (1, 2)",
    )
    .bind(hours)
    .bind(days)
    .execute(owner)
    .await
    .unwrap();
}

/// The filtered partitions an ingestion transaction holds: (level, first, last).
fn filtered(g: &usage_events::KeyGenerations) -> Vec<(i16, i32, i32)> {
    g.filtered
        .iter()
        .map(|f| (f.filter.level, f.first, f.last))
        .collect()
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

/// A closed generation joins level 1 with its filter, and its keys still count; an expired
/// generation stops counting at once, and its partition goes whole once every generation in it
/// has expired.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn closed_generations_join_a_level_and_are_still_remembered(owner: PgPool) {
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
    let done = compact(&owner).await;
    assert_eq!(did(&done, "registered"), ["usage_event_keys_g1"]);
    assert_eq!(did(&done, "filtered"), ["usage_event_keys_g1"]);
    let r = fx.submit(&app, json!({ "events": [second.clone()] })).await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    let t2 = t1 + day;
    assert_eq!(
        did(&maintain(&owner, t2, &policy).await, "rotated"),
        ["usage_event_keys_g3"]
    );
    let done = compact(&owner).await;
    assert_eq!(did(&done, "filtered"), ["usage_event_keys_g2"]);
    assert_eq!(
        key_partitions(&owner).await,
        [
            "usage_event_keys_g1",
            "usage_event_keys_g2",
            "usage_event_keys_g3"
        ]
    );
    assert_eq!(compact(&owner).await, [], "nothing left to do");
    let g = held_generations(&fx, &app).await;
    assert_eq!(
        (g.open, g.unfiltered, filtered(&g)),
        (3, None, vec![(1, 1, 1), (1, 2, 2)])
    );

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
    // ...and the next maintenance drops its partition.
    let done = compact(&owner).await;
    assert_eq!(did(&done, "dropped"), ["usage_event_keys_g1"]);
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

    // Once the rest has expired too, only the live generations' keys are left.
    let all_gone = gone + Days::days(policy.dedup_window_days.into()) + day;
    let done = maintain(&owner, all_gone, &policy).await;
    assert!(
        did(&done, "expired").contains(&"usage_event_keys_g3".to_owned()),
        "{done:?}"
    );
    let done = compact(&owner).await;
    assert_eq!(
        did(&done, "dropped"),
        ["usage_event_keys_g2", "usage_event_keys_g3"],
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

/// Closed hours merge into a day, days into a week (here after 2 of each), each merge written
/// once with its level's filter: every key counts all along, and a key is rewritten twice in
/// its life.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn hours_merge_into_days_and_days_into_weeks(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    merge_levels_at(&owner, 2, 2).await;
    let hour = Days::hours(1) + Days::minutes(1);
    let events: Vec<Value> = (0..4).map(|n| fx.event(n, "api.requests", 1)).collect();
    // An hour for each event: generations 1 to 4.
    let mut now = meterbridge::testing::now();
    let mut done = Vec::new();
    for (n, event) in events.iter().enumerate() {
        let r = fx.submit(&app, json!({ "events": [event] })).await;
        assert_eq!(r.body["accepted"], 1, "{}", r.body);
        now += hour;
        let rotated = maintain(&owner, now, &policy).await;
        assert_eq!(
            did(&rotated, "rotated"),
            [format!("usage_event_keys_g{}", n + 2)]
        );
        done.push(compact(&owner).await);
        if n == 1 {
            // Two hours: merged into a day.
            assert_eq!(did(&done[1], "merged"), ["usage_event_keys_l2_1_2"]);
            assert_eq!(
                did(&done[1], "dropped"),
                ["usage_event_keys_g1", "usage_event_keys_g2"]
            );
            let g = held_generations(&fx, &app).await;
            assert_eq!((g.open, filtered(&g)), (3, vec![(2, 1, 2)]));
        }
    }
    assert_eq!(did(&done[0], "merged"), Vec::<String>::new());
    // Two more hours: a second day, and the two days merged into a week.
    assert_eq!(
        did(&done[3], "merged"),
        ["usage_event_keys_l2_3_4", "usage_event_keys_l3_1_4"]
    );
    assert_eq!(
        key_partitions(&owner).await,
        ["usage_event_keys_g5", "usage_event_keys_l3_1_4"]
    );
    let g = held_generations(&fx, &app).await;
    assert_eq!(
        (g.open, g.unfiltered, filtered(&g)),
        (5, None, vec![(3, 1, 4)])
    );
    assert_eq!(compact(&owner).await, [], "merged already");

    // The merged keys count: duplicates, and a conflict for another payload.
    let r = fx.submit(&app, json!({ "events": events })).await;
    assert_eq!(
        statuses(&r.body),
        ["duplicate", "duplicate", "duplicate", "duplicate"],
        "{}",
        r.body
    );
    let moved = with(&events[1], "quantity", json!(7));
    let r = fx.submit(&app, json!({ "events": [moved] })).await;
    assert_eq!(statuses(&r.body), ["conflict"], "{}", r.body);
    assert_eq!(fx.stored_events().await, 4);
    // Each level's filter holds its members' keys, sized for them (about 10 bits a key).
    let levels: Vec<(i16, i64, i64)> = sqlx::query_as(
        "SELECT level, count(name), coalesce(sum(keys), 0)::int8 FROM usage_key_parts
          GROUP BY level ORDER BY level",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert_eq!(levels, [(3, 1, 4)], "4 events, a key each");
}

/// Members are checked through their level's Bloom filter: no stored key is ever missed (a
/// filter has no false negatives), and a false positive costs a probe, never a wrong answer.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_bloom_filters_never_hide_a_stored_key(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let hour = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    let stored: Vec<Value> = (0..600).map(|n| fx.event(n, "api.requests", 1)).collect();
    for (i, batch) in stored.chunks(200).enumerate() {
        let r = fx.submit(&app, json!({ "events": batch })).await;
        assert_eq!(r.body["accepted"], 200, "{}", r.body);
        // Spread over two generations.
        if i == 1 {
            maintain(&owner, meterbridge::testing::now() + hour, &policy).await;
        }
    }
    maintain(&owner, meterbridge::testing::now() + hour + hour, &policy).await;
    let check = |expected: Vec<(i16, i32, i32)>| {
        let (fx, app, stored) = (&fx, &app, &stored);
        async move {
            let held = held_generations(fx, app).await;
            assert_eq!((filtered(&held), held.unfiltered), (expected, None));
            for batch in stored.chunks(300) {
                let r = fx.submit(app, json!({ "events": batch })).await;
                assert_eq!(r.body["duplicates"], 300, "{}", r.body);
            }
        }
    };
    // Two hours, each checked through level 1's filter.
    compact(&owner).await;
    check(vec![(1, 1, 1), (1, 2, 2)]).await;
    // Merged into a day: through level 2's.
    merge_levels_at(&owner, 2, 7).await;
    assert_eq!(
        did(&compact(&owner).await, "merged"),
        ["usage_event_keys_l2_1_2"]
    );
    check(vec![(2, 1, 2)]).await;

    let fresh: Vec<Value> = (600..1200)
        .map(|n| fx.event(n, "api.requests", 1))
        .collect();
    for batch in fresh.chunks(300) {
        let r = fx.submit(&app, json!({ "events": batch })).await;
        assert_eq!(r.body["accepted"], 300, "{}", r.body);
    }
    assert_eq!(fx.stored_events().await, 1200);
}

/// A merge builds without holding ingestion back; only its swap waits for the ingestion in
/// flight, like a rotation (and gives up at its lock timeout, to be retried by the next step).
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_merge_swaps_in_behind_the_ingestion_in_flight(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let hour = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    let r = fx
        .submit(&app, json!({ "events": [fx.event(1, "api.requests", 1)] }))
        .await;
    assert_eq!(r.body["accepted"], 1, "{}", r.body);
    maintain(&owner, meterbridge::testing::now() + hour, &policy).await;
    maintain(&owner, meterbridge::testing::now() + hour + hour, &policy).await;
    merge_levels_at(&owner, 2, 7).await;

    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let held = usage_events::hold_key_generation(&mut tx).await.unwrap();
    assert_eq!(held.unfiltered, Some((1, 2)));
    // Step after step, each with a short lock timeout: registering, filters, the merge's copy
    // all go through; the swap waits.
    let mut before_swap = Vec::new();
    let err = loop {
        let mut step = owner.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '300ms'")
            .execute(&mut *step)
            .await
            .unwrap();
        match sqlx::query_scalar::<_, String>("SELECT action FROM usage_event_keys_step(1000000)")
            .fetch_all(&mut *step)
            .await
        {
            Ok(actions) => {
                step.commit().await.unwrap();
                assert!(
                    !actions.is_empty(),
                    "the swap never waited: {before_swap:?}"
                );
                before_swap.extend(actions);
            }
            Err(e) => break e,
        }
    };
    let err = meterbridge::DbError::from(err);
    assert_eq!(err.sqlstate().as_deref(), Some("55P03"), "{err}");
    assert!(
        before_swap.contains(&"merging".to_owned()),
        "{before_swap:?}"
    );
    assert_eq!(
        key_partitions(&owner).await,
        [
            "usage_event_keys_g1",
            "usage_event_keys_g2",
            "usage_event_keys_g3"
        ],
        "the sources stay until the swap"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        did(&compact(&owner).await, "merged"),
        ["usage_event_keys_l2_1_2"]
    );
}

/// Key maintenance cut anywhere (a step killed mid-copy, mid-filter, mid-swap, over and over)
/// leaves a consistent state: every key of a live generation is where ingestion looks for it
/// and found by its filter, and nothing is lost or doubled; the next run resumes and finishes.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn key_maintenance_cut_at_any_point_resumes_consistently(owner: PgPool) {
    let tenant = create_tenant(&owner, "cut").await;
    merge_levels_at(&owner, 3, 2).await;
    let policy = StoragePolicy {
        step_keys: 10_000,
        ..StoragePolicy::default()
    };
    // 6 hours of 8,000 keys each.
    hours_of_keys(&owner, &tenant, 6, &policy).await;
    let fingerprint = || key_fingerprint(&owner);
    let before = fingerprint().await;
    assert_eq!(before.0, 48_000);
    let hidden = || hidden_keys(&owner);
    let mut cut = 0;
    for ms in (5..3000u64).step_by(11) {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let run = usage_storage::compact(&owner, &policy, deadline);
        match tokio::time::timeout(Duration::from_millis(ms), run).await {
            Err(_) => cut += 1,
            Ok(done) => {
                if done.unwrap().steps == 0 {
                    break;
                }
            }
        }
        // A connection dropped mid-step rolls back when the server notices.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(hidden().await, 0, "after a run cut at {ms} ms");
        assert_eq!(fingerprint().await, before, "after a run cut at {ms} ms");
    }
    assert!(cut > 5, "only {cut} runs were cut");
    assert_eq!(compact(&owner).await, []);
    // 6 hours: two days of 3, merged into a week.
    assert_eq!(
        key_partitions(&owner).await,
        ["usage_event_keys_g7", "usage_event_keys_l3_1_6"]
    );
    assert_eq!(fingerprint().await, before);
    assert_eq!(hidden().await, 0);
}

/// `hours` hours of 8,000 keys each, straight into the key table (as ingestion writes them),
/// each hour closed by the storage maintenance on a clock an hour and a minute further on.
async fn hours_of_keys(owner: &PgPool, tenant: &Tenant, hours: usize, policy: &StoragePolicy) {
    let mut now = meterbridge::testing::now();
    for _ in 0..hours {
        sqlx::query(
            "INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
             SELECT g.generation, gen_random_uuid(), $1, now(), i
               FROM usage_key_generations g, generate_series(1, 8000) AS i
              WHERE g.closed_at IS NULL",
        )
        .bind(tenant.id.0)
        .execute(owner)
        .await
        .unwrap();
        now += Days::hours(1) + Days::minutes(1);
        maintain(owner, now, policy).await;
    }
}

/// The keys (count, and a checksum of keys and generations).
async fn key_fingerprint(owner: &PgPool) -> (i64, i64) {
    sqlx::query_as::<_, (i64, i64)>(
        "SELECT count(*), coalesce(sum(hashtext(key_hash::text || generation)), 0)::int8
           FROM usage_event_keys",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

/// The keys ingestion would miss: of a live generation but outside the partition the
/// generation names, or in a partition whose filter is complete but does not find them.
async fn hidden_keys(owner: &PgPool) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM usage_event_keys k
           JOIN usage_key_generations g ON g.generation = k.generation
           LEFT JOIN usage_key_parts p ON p.name = g.stored_in
           LEFT JOIN usage_key_levels l ON l.level = p.level
           LEFT JOIN usage_key_filter_slices r
                  ON r.level = p.level AND r.block = usage_key_level_block(k.key_hash, l.blocks)
          WHERE k.tableoid::regclass::text <> g.stored_in
             OR (p.filter_next IS NULL AND p.name IS NOT NULL
                 AND (r.bits IS NULL OR NOT usage_key_level_maybe(r.bits, p.slot, k.key_hash)))",
    )
    .fetch_one(owner)
    .await
    .unwrap()
}

/// Filters built before the bit-sliced layout (migration 0028) are not read in the new one:
/// the migration leaves every partition probed by its index until the steps have rebuilt its
/// filter, and starts a merge in progress again (its target's filter was half written in the
/// old layout); once rebuilt, every key is found by its filter and the merge completes.
#[sqlx::test(migrations = false)]
async fn filters_of_the_layout_before_are_rebuilt_and_hide_no_key(owner: PgPool) {
    migrate_up_to(&owner, 27).await;
    let tenant = create_tenant(&owner, "sliced").await;
    merge_levels_at(&owner, 3, 2).await;
    let policy = StoragePolicy {
        step_keys: 10_000,
        ..StoragePolicy::default()
    };
    // 4 hours of 8,000 keys each.
    hours_of_keys(&owner, &tenant, 4, &policy).await;
    let before = key_fingerprint(&owner).await;
    assert_eq!(before.0, 32_000);
    // The old layout's steps: the hours' filters built, the merge of the first 3 started and
    // one chunk of its copy done.
    let mut actions = Vec::new();
    while !actions.contains(&"merging".to_owned()) {
        let done: Vec<String> =
            sqlx::query_scalar("SELECT action FROM usage_event_keys_step(10000)")
                .fetch_all(&owner)
                .await
                .unwrap();
        assert!(!done.is_empty(), "{actions:?}");
        actions.extend(done);
    }
    assert!(actions.contains(&"filtered".to_owned()), "{actions:?}");
    let old_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_key_filter_rows")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert!(old_rows > 0);

    meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    let state: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_key_parts),
                (SELECT count(*) FROM usage_key_parts WHERE filter_next = 0),
                (SELECT copied + next_block FROM usage_key_merges),
                (SELECT count(*) FROM usage_key_filter_slices)",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!(
        state,
        (4, 4, 0, 0),
        "every filter to build again, the merge from its start"
    );
    assert_eq!(hidden_keys(&owner).await, 0);
    // A slot outside its level's row (or a level that is not there) writes nothing.
    for call in [
        "SELECT usage_key_filter_write(1::int2, 2, 40::int2, 'usage_event_keys_g4', NULL, 0, 2)",
        "SELECT usage_key_filter_write(1::int2, 2, (-1)::int2, 'usage_event_keys_g4', NULL, 0, 2)",
        "SELECT usage_key_filter_write(9::int2, 2, 0::int2, 'usage_event_keys_g4', NULL, 0, 2)",
    ] {
        let err = sqlx::query(call).execute(&owner).await.unwrap_err();
        let err = meterbridge::DbError::from(err);
        assert_eq!(err.sqlstate().as_deref(), Some("22023"), "{call}: {err}");
    }

    let done = compact(&owner).await;
    assert_eq!(did(&done, "merged"), ["usage_event_keys_l2_1_3"]);
    assert_eq!(
        key_partitions(&owner).await,
        [
            "usage_event_keys_g4",
            "usage_event_keys_g5",
            "usage_event_keys_l2_1_3"
        ]
    );
    assert_eq!(hidden_keys(&owner).await, 0);
    assert_eq!(key_fingerprint(&owner).await, before);
}

/// Batches of the same events race rotations, filter builds and merges that a test clock forces
/// one after another: each event is stored once, whichever generation or partition took its keys.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn no_duplicate_slips_between_generations(owner: PgPool) {
    let fx = Arc::new(Fixture::new(&owner).await);
    let policy = StoragePolicy {
        generation_hours: 1,
        ..StoragePolicy::default()
    };
    // Days of 3 hours and weeks of 2 days: every level is reached within the test's hours.
    merge_levels_at(&owner, 3, 2).await;
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
            let (mut rotated, mut merged, mut filtered) = (0, 0, 0);
            for hour in 1..=40 {
                let now = meterbridge::testing::now() + Days::hours(hour);
                let done = maintain(&owner, now, &policy).await;
                rotated += did(&done, "rotated").len();
                // As the admin function runs it after each maintenance.
                let done = compact(&owner).await;
                merged += did(&done, "merged").len();
                filtered += did(&done, "filtered").len();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (rotated, merged, filtered)
        })
    };
    let mut accepted = 0;
    for sender in senders {
        accepted += sender.await.unwrap();
    }
    let (rotated, merged, filtered) = rotations.await.unwrap();
    assert!(
        rotated >= 10 && merged >= 3 && filtered >= 3,
        "{rotated} rotations, {merged} merges, {filtered} filters built"
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
    // Every day's BRIN indexes (what the aggregation reads changes through) are summarized as
    // they fill, the days created by the migration and by each run alike.
    let unsummarized: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent IN ('usage_events_xact'::regclass, 'usage_events_inserted_xact'::regclass)
            AND NOT coalesce('autosummarize=on' = ANY (c.reloptions), false)",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(unsummarized.is_empty(), "{unsummarized:?}");
    assert_eq!(
        did(&done, "autosummarized").len(),
        2 * did(&done, "created").len(),
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
        "SELECT * FROM usage_event_keys_step(1000000)",
        "SELECT usage_key_level_grow(1::int2, 1024::int8)",
        "SELECT usage_key_filter_write(1::int2, 1, 0::int2, 'usage_event_keys_g1', NULL, 0, 1)",
        "UPDATE usage_key_generations SET expired_at = now()",
        "UPDATE usage_key_parts SET filter_next = NULL",
        "UPDATE usage_key_levels SET blocks = 1",
        "DELETE FROM usage_key_filter_slices",
        "INSERT INTO usage_key_filter_slices (level, block, bits) VALUES (1, 0, repeat('1', 512)::varbit)",
        "INSERT INTO usage_key_merges (target, level, slot, sources, gens, keys) VALUES ('x', 2, 0, '{}', '{}', 0)",
    ] {
        let mut sp = (&mut tx).begin().await.unwrap();
        let err = sqlx::query(statement).execute(&mut *sp).await.unwrap_err();
        assert!(err.to_string().contains("permission denied"), "{statement}: {err}");
    }
}

/// A new key is checked with one filter row per level it has members in — an index probe —
/// whatever the filter table holds: the check once hashed the whole table for every batch,
/// so ingestion slowed as the levels filled.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_key_check_reads_one_filter_row_per_level(owner: PgPool) {
    let fx = Fixture::new(&owner).await;
    let app = fx.app(&[]).await;
    let policy = StoragePolicy::default();
    let hour = Days::hours(policy.generation_hours.into()) + Days::minutes(1);
    let first: Vec<Value> = (0..50).map(|n| fx.event(n, "api.requests", 1)).collect();
    let r = fx.submit(&app, json!({ "events": first })).await;
    assert_eq!(r.body["accepted"], 50, "{}", r.body);
    maintain(&owner, meterbridge::testing::now() + hour, &policy).await;
    compact(&owner).await;
    // A large filter table: 50,000 rows of the (memberless) week level besides level 1's.
    sqlx::query(
        "INSERT INTO usage_key_filter_slices (level, block, bits)
         SELECT 3, b, repeat('0', 12 * 512)::varbit FROM generate_series(1, 50000) AS b",
    )
    .execute(&owner)
    .await
    .unwrap();
    sqlx::query("ANALYZE usage_key_filter_slices")
        .execute(&owner)
        .await
        .unwrap();

    let catalog = app.catalog().await.unwrap();
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
    let events: Vec<_> = (100..1100)
        .map(|n| validate_event(fx.event(n, "api.requests", 1), &submitter).unwrap())
        .collect();
    let keys: Vec<_> = events
        .iter()
        .map(|e| meterbridge::domain::dedup::DedupKeys::of(fx.tenant.id, &source, e))
        .collect();
    let mut tx = app.services.db.tenant_tx(fx.tenant.id).await.unwrap();
    let held = usage_events::hold_key_generation(&mut tx).await.unwrap();
    assert_eq!(filtered(&held), [(1, 1, 1)]);
    let refs: Vec<_> = events.iter().collect();
    let outcome = usage_events::insert(&mut tx, &held, fx.tenant.id, &source, &refs, &keys)
        .await
        .unwrap();
    assert_eq!(outcome, usage_events::Insert::Stored);
    let (scanned, fetched): (i64, i64) = sqlx::query_as(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0), coalesce(idx_tup_fetch, 0)
           FROM pg_stat_xact_user_tables WHERE relname = 'usage_key_filter_slices'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    // The member (the closed hour) is read only for the keys its filter lets through.
    let member: (i64, i64) = sqlx::query_as(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables
          WHERE relname = 'usage_event_keys_g1'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // 1,000 event keys, one level with members: at most a row each (and no sequential read).
    assert_eq!(scanned, fetched, "no sequential scan of the filter table");
    assert!(fetched <= 1000, "{fetched} filter rows read for 1,000 keys");
    assert_eq!(member.0, 0, "no sequential scan of a member");
    assert!(
        member.1 <= 50,
        "{} probes of the member for 1,000 new keys",
        member.1
    );
}
