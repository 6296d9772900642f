//! Every PostgreSQL error class is mapped once (`DbError::from`, then `ApiError::from`), and
//! deadlocks and serialization failures are retried a bounded number of times. The errors here
//! are real ones, raised by the server.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

use std::sync::atomic::{AtomicU32, Ordering};

use meterbridge::db::{retry_transient, TRANSIENT_ATTEMPTS};
use meterbridge::http::ApiError;
use meterbridge::DbError;
use sqlx::PgPool;

async fn raise(pool: &PgPool, sqlstate: &str) -> DbError {
    sqlx::query(&format!(
        "DO $$ BEGIN RAISE EXCEPTION 'raised for a test' USING ERRCODE = '{sqlstate}'; END $$"
    ))
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(DbError::from)
    .unwrap_err()
}

#[sqlx::test(migrations = false)]
async fn each_error_class_maps_to_one_answer(pool: PgPool) {
    for (sqlstate, status) in [
        ("22003", 400), // numeric_value_out_of_range
        ("22021", 400), // character_not_in_repertoire (a NUL in text)
        ("22P02", 400), // invalid_text_representation
        ("40001", 503), // serialization_failure (after the retries)
        ("40P01", 503), // deadlock_detected (after the retries)
        ("55P03", 503), // lock_not_available (lock_timeout)
        ("57014", 503), // query_canceled (statement_timeout)
        ("53300", 503), // too_many_connections
        ("57P01", 503), // admin_shutdown
        ("08006", 503), // connection_failure
        ("23505", 500), // a unique violation the caller did not handle is a bug
        ("42501", 500), // insufficient_privilege: a bug, never the caller's fault
        ("XX000", 500),
    ] {
        let err = raise(&pool, sqlstate).await;
        let api: ApiError = err.into();
        assert_eq!(api.status().as_u16(), status, "SQLSTATE {sqlstate}");
        assert!(
            !api.to_string().contains("raised for a test"),
            "SQLSTATE {sqlstate}: the server's message is not shown to callers"
        );
    }
    let real = sqlx::query("SELECT $1::int")
        .bind("x")
        .execute(&pool)
        .await
        .map_err(DbError::from)
        .unwrap_err();
    assert!(matches!(real, DbError::InvalidValue(_)), "{real:?}");
}

#[sqlx::test(migrations = false)]
async fn deadlocks_are_retried_a_bounded_number_of_times(pool: PgPool) {
    let attempts = AtomicU32::new(0);
    let outcome = retry_transient(|| async {
        if attempts.fetch_add(1, Ordering::SeqCst) < 2 {
            Err(raise(&pool, "40P01").await)
        } else {
            Ok("stored")
        }
    })
    .await;
    assert_eq!(outcome.unwrap(), "stored");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    let attempts = AtomicU32::new(0);
    let outcome: Result<(), DbError> = retry_transient(|| async {
        attempts.fetch_add(1, Ordering::SeqCst);
        Err(raise(&pool, "40001").await)
    })
    .await;
    assert!(matches!(outcome, Err(DbError::Busy(_))));
    assert_eq!(attempts.load(Ordering::SeqCst), TRANSIENT_ATTEMPTS);

    // Anything else is returned at once.
    let attempts = AtomicU32::new(0);
    let outcome: Result<(), DbError> = retry_transient(|| async {
        attempts.fetch_add(1, Ordering::SeqCst);
        Err(raise(&pool, "55P03").await)
    })
    .await;
    assert!(matches!(outcome, Err(DbError::Busy(_))));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}
