//! Every advisory lock has an id of its own: the schema's `*_lock_id()` functions and the code's
//! list (`meterbridge::domain::advisory_locks`) agree and never repeat an id, and the storage
//! maintenance and the aggregation no longer wait for (or skip because of) each other.
#![allow(clippy::unwrap_used)]

use meterbridge::domain::advisory_locks::{self, SINGLE};
use meterbridge::repo::usage_aggregates;
use sqlx::PgPool;

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_lock_id_in_the_schema_and_the_code_is_distinct(owner: PgPool) {
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = 'public' AND p.proname LIKE '%\\_lock\\_id' AND p.pronargs = 0
          ORDER BY 1",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    let mut listed: Vec<&str> = SINGLE.iter().map(|l| l.sql_function).collect();
    listed.sort_unstable();
    assert_eq!(
        functions, listed,
        "the schema's lock functions and the code's list"
    );
    let mut seen = Vec::new();
    for lock in SINGLE {
        let id: i64 = sqlx::query_scalar(&format!("SELECT public.{}()", lock.sql_function))
            .fetch_one(&owner)
            .await
            .unwrap();
        assert_eq!(id, lock.id, "{}", lock.sql_function);
        assert!(
            !seen.contains(&id),
            "{} repeats the id {id}",
            lock.sql_function
        );
        seen.push(id);
    }
    for space in advisory_locks::space::ALL {
        assert_eq!(
            advisory_locks::space::ALL
                .iter()
                .filter(|s| **s == space)
                .count(),
            1
        );
    }
}

/// While a storage maintenance holds its lock (a compaction holds it for minutes), an
/// aggregation run takes its own; and the other way round.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn maintenance_and_aggregation_do_not_wait_for_each_other(owner: PgPool) {
    let mut maintenance = owner.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(public.usage_storage_lock_id())")
        .execute(&mut *maintenance)
        .await
        .unwrap();
    let mut run = owner.begin().await.unwrap();
    assert!(
        usage_aggregates::try_lock(&mut run, 64, 10_000)
            .await
            .unwrap(),
        "the aggregation skipped while a maintenance held its lock"
    );
    maintenance.rollback().await.unwrap();

    // The aggregation holds its lock; a maintenance takes its own without waiting.
    let mut maintenance = owner.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '1s'")
        .execute(&mut *maintenance)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(public.usage_storage_lock_id())")
        .execute(&mut *maintenance)
        .await
        .expect("the maintenance waited for the aggregation's lock");
    run.rollback().await.unwrap();
    maintenance.rollback().await.unwrap();
}
