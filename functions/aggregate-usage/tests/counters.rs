//! The Redis real-time counters' repair, against real Redis and PostgreSQL: a flush restored in
//! one run, drift corrected, and increments that race the repair never lost.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{Duration, NaiveDate};
use common::*;
use meterbridge::config::RedisSource;
use meterbridge::domain::TenantId;
use meterbridge::redis::{keys, Redis};
use meterbridge::testing::{create_tenant, now, redis_url, today};
use meterbridge::usage_counters;
use sqlx::PgPool;

/// A Redis database of this file's own (tests of other files share database 0): flushing it
/// is what a failover to an empty replica or a FLUSHALL does to the counters.
fn own_redis_url() -> String {
    format!("{}/9", redis_url().trim_end_matches('/'))
}

async fn counter(url: &str, tenant: uuid::Uuid, day: NaiveDate, metric: &str) -> Option<i128> {
    meterbridge::testing::read_counter(url, &keys::usage_counter(TenantId(tenant), day, metric))
        .await
}

async fn pg_total(owner: &PgPool, tenant: uuid::Uuid, day: NaiveDate, metric: &str) -> i128 {
    let total: Option<String> = sqlx::query_scalar(
        "SELECT sum(quantity)::text FROM usage_events
          WHERE tenant_id = $1 AND metric = $3 AND voided_at IS NULL
            AND occurred_at >= $2::date AND occurred_at < $2::date + 1",
    )
    .bind(tenant)
    .bind(day)
    .bind(metric)
    .fetch_one(owner)
    .await
    .unwrap();
    total.map_or(0, |t| t.parse().unwrap())
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn one_run_restores_every_counter_after_a_flush_and_fixes_drift(owner: PgPool) {
    let url = own_redis_url();
    let a = create_tenant(&owner, "flush").await.id.0;
    let b = create_tenant(&owner, "flush").await.id.0;
    let today = today();
    let days = [today, today - Duration::days(3), today - Duration::days(6)];
    let mut events = Vec::new();
    for (i, tenant) in [a, b].into_iter().enumerate() {
        for (j, day) in days.iter().enumerate() {
            for metric in ["api.requests", "leads.processed"] {
                events.push(Ev {
                    tenant,
                    metric,
                    quantity: (100 * i + 10 * j + 1) as i64,
                    at: day.and_hms_opt(12, 0, 0).unwrap().and_utc(),
                    actor: None,
                });
            }
        }
    }
    // Outside the counters' TTL (7 days): aggregated, never written to Redis.
    events.push(Ev {
        tenant: a,
        metric: "api.requests",
        quantity: 5,
        at: (today - Duration::days(9))
            .and_hms_opt(1, 0, 0)
            .unwrap()
            .and_utc(),
        actor: None,
    });
    // The 12 day counters in the TTL, and a month counter per tenant, month and metric (the
    // day outside the TTL included: a month's counter lives 70 days).
    let month_cells: std::collections::BTreeSet<_> = events
        .iter()
        .map(|e| (e.tenant, e.at.format("%Y-%m").to_string(), e.metric))
        .collect();
    let counters = 12 + month_cells.len() as u64;
    insert(&owner, &events).await;
    let app = app(&owner, &[("REDIS_URL", &url)]).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();

    // The first run computes the cells and writes every counter in the window.
    let first = run(&app, &owner, now()).await;
    let repair = first.counters.clone().unwrap();
    assert_eq!(
        (repair.checked, repair.drift_found, repair.repaired),
        (counters, counters, counters),
        "{first:?}"
    );
    for tenant in [a, b] {
        for day in days {
            for metric in ["api.requests", "leads.processed"] {
                assert_eq!(
                    counter(&url, tenant, day, metric).await,
                    Some(pg_total(&owner, tenant, day, metric).await)
                );
            }
        }
    }
    assert_eq!(
        counter(&url, a, today - Duration::days(9), "api.requests").await,
        None
    );
    // In step: nothing to repair.
    let again = run(&app, &owner, now()).await.counters.unwrap();
    assert_eq!(
        (again.checked, again.drift_found, again.repaired),
        (counters, 0, 0)
    );

    // A flush: one run restores all of them.
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    let healed = run(&app, &owner, now()).await.counters.unwrap();
    assert_eq!((healed.drift_found, healed.repaired), (counters, counters));
    assert_eq!(
        counter(&url, b, days[1], "leads.processed").await,
        Some(pg_total(&owner, b, days[1], "leads.processed").await)
    );

    // Drift (a lost increment, a stray write): found and corrected, nothing else touched.
    let key = keys::usage_counter(TenantId(a), today, "api.requests");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("lo")
        .arg(999_999)
        .query_async(&mut conn)
        .await
        .unwrap();
    let fixed = run(&app, &owner, now()).await.counters.unwrap();
    assert_eq!((fixed.drift_found, fixed.repaired, fixed.raced), (1, 1, 0));
    assert_eq!(
        counter(&url, a, today, "api.requests").await,
        Some(pg_total(&owner, a, today, "api.requests").await)
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 6 * 86_400,
        "a repaired counter lives as long as a written one: {ttl}"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_counter_that_changed_after_it_was_read_is_left_alone(owner: PgPool) {
    let _ = owner;
    let url = redis_url();
    let redis = Redis::new(
        RedisSource::Url(url.clone()),
        None,
        std::time::Duration::from_secs(2),
    );
    let tenant = TenantId(uuid::Uuid::new_v4());
    let today = today();
    let cells = vec![usage_counters::Cell::day(today, "api.requests")];
    let add = |n: i128| {
        let mut totals = BTreeMap::new();
        totals.insert((today, "api.requests"), n);
        totals
    };
    usage_counters::add_totals(&redis, tenant, &add(5), now(), 7)
        .await
        .unwrap();
    let seen = usage_counters::observe(&redis, tenant, &cells)
        .await
        .unwrap();
    assert_eq!(seen[0].value, Some(5));
    // An ingestion commits and increments between the repair's read and its write ...
    usage_counters::add_totals(&redis, tenant, &add(7), now(), 7)
        .await
        .unwrap();
    // ... so the repair (which read 5 and would set 40) leaves the counter as it is.
    let fix = usage_counters::Fix {
        cell: usage_counters::Cell::day(today, "api.requests"),
        observed: seen[0].clone(),
        value: 40,
    };
    let set = usage_counters::repair(&redis, tenant, std::slice::from_ref(&fix), 7)
        .await
        .unwrap();
    assert_eq!(set, vec![false]);
    assert_eq!(
        counter(&url, tenant.0, today, "api.requests").await,
        Some(12)
    );
    // Read again, the repair applies.
    let seen = usage_counters::observe(&redis, tenant, &cells)
        .await
        .unwrap();
    let fix = usage_counters::Fix {
        observed: seen[0].clone(),
        ..fix
    };
    let set = usage_counters::repair(&redis, tenant, &[fix], 7)
        .await
        .unwrap();
    assert_eq!(set, vec![true]);
    assert_eq!(
        counter(&url, tenant.0, today, "api.requests").await,
        Some(40)
    );
    // An absent counter is observed as absent and created by the repair; a zero deletes it.
    let absent = vec![usage_counters::Cell::day(today, "leads.processed")];
    let seen = usage_counters::observe(&redis, tenant, &absent)
        .await
        .unwrap();
    assert_eq!(seen[0].value, None);
    let fix = usage_counters::Fix {
        cell: usage_counters::Cell::day(today, "leads.processed"),
        observed: seen[0].clone(),
        value: 3,
    };
    assert_eq!(
        usage_counters::repair(&redis, tenant, &[fix], 7)
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(
        counter(&url, tenant.0, today, "leads.processed").await,
        Some(3)
    );
    let seen = usage_counters::observe(&redis, tenant, &absent)
        .await
        .unwrap();
    let fix = usage_counters::Fix {
        cell: usage_counters::Cell::day(today, "leads.processed"),
        observed: seen[0].clone(),
        value: 0,
    };
    assert_eq!(
        usage_counters::repair(&redis, tenant, &[fix], 7)
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(
        counter(&url, tenant.0, today, "leads.processed").await,
        None
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn increments_racing_repeated_repairs_are_never_lost(owner: PgPool) {
    let url = redis_url();
    let tenant = create_tenant(&owner, "racing").await.id.0;
    let today = today();
    let app = Arc::new(app(&owner, &[]).await);
    // Start from a counter that is wrong (drift to repair while increments arrive).
    let redis = Arc::new(Redis::new(
        RedisSource::Url(url.clone()),
        None,
        std::time::Duration::from_secs(2),
    ));
    let mut totals = BTreeMap::new();
    totals.insert((today, "api.requests"), 1_000_000i128);
    usage_counters::add_totals(&redis, TenantId(tenant), &totals, now(), 7)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // Ingestion, as the handler does it: commit to PostgreSQL, then increment the counter.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (owner, redis) = (owner.clone(), redis.clone());
            tokio::spawn(async move {
                for i in 0..60 {
                    let q = (w * 1000 + i + 1) as i64;
                    insert(
                        &owner,
                        &[Ev {
                            tenant,
                            metric: "api.requests",
                            quantity: q,
                            at: now(),
                            actor: None,
                        }],
                    )
                    .await;
                    let mut totals = BTreeMap::new();
                    totals.insert((today, "api.requests"), i128::from(q));
                    usage_counters::add_totals(&redis, TenantId(tenant), &totals, now(), 7)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let repairer = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(Ordering::Relaxed) {
                app.aggregator().aggregate(now(), later()).await.unwrap();
                runs += 1;
            }
            runs
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(repairer.await.unwrap() > 1);

    // Every increment is still there: the counter is never below what PostgreSQL holds (it can
    // be above only by an increment whose commit the repair read before the increment landed).
    let truth = pg_total(&owner, tenant, today, "api.requests").await;
    let seen = counter(&url, tenant, today, "api.requests").await.unwrap();
    assert!(
        seen >= truth,
        "counter {seen} lost increments: PostgreSQL has {truth}"
    );
    // Quiet, one more run leaves it exact.
    let last = run(&app, &owner, now()).await;
    assert_eq!(
        counter(&url, tenant, today, "api.requests").await,
        Some(truth),
        "{last:?}"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_repair_of_many_counters_reads_their_days_in_one_scan(owner: PgPool) {
    // Its own Redis database (see own_redis_url), flushed: 80 tenants × 2 metrics × 2 days
    // = 320 day counters to restore, beyond the index-probe size, and their month counters
    // (one month, or two when the days straddle a month's end).
    let url = format!("{}/10", redis_url().trim_end_matches('/'));
    let today = today();
    let mut events = Vec::new();
    let mut tenants = Vec::new();
    for i in 0..80 {
        let tenant = create_tenant(&owner, "many").await.id.0;
        tenants.push(tenant);
        for day in [today, today - Duration::days(2)] {
            for metric in ["api.requests", "leads.processed"] {
                events.push(Ev {
                    tenant,
                    metric,
                    quantity: i + 1,
                    at: day.and_hms_opt(0, 0, 0).unwrap().and_utc(),
                    actor: None,
                });
            }
        }
    }
    insert(&owner, &events).await;
    let app = app(&owner, &[("REDIS_URL", &url)]).await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    let report = run(&app, &owner, now()).await.counters.unwrap();
    let months = if (today - Duration::days(2)).format("%Y-%m").to_string()
        == today.format("%Y-%m").to_string()
    {
        1
    } else {
        2
    };
    let counters = 320 + 160 * months;
    assert_eq!(
        (report.checked, report.repaired),
        (counters, counters),
        "{report:?}"
    );
    for tenant in [tenants[0], tenants[79]] {
        for day in [today, today - Duration::days(2)] {
            assert_eq!(
                counter(&url, tenant, day, "leads.processed").await,
                Some(pg_total(&owner, tenant, day, "leads.processed").await)
            );
        }
    }
}
