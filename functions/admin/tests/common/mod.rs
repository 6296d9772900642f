//! Helpers the admin function's integration tests share.
#![allow(clippy::unwrap_used, dead_code)]

use std::time::Duration;

use admin::{execute, Admin, Command};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;

pub fn day(d: &str) -> NaiveDate {
    d.parse().unwrap()
}

pub fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().into()
}

/// Aggregation runs until the watermark is past every stored event (a transaction open
/// elsewhere on the server, a parallel test's, holds a run's watermark back).
pub async fn aggregate_all(admin: &Admin, owner: &PgPool) {
    for _ in 0..600 {
        let run = execute(admin, Command::UsageAggregate).await.unwrap();
        let watermark = run["aggregation"]["collected"]["watermark"]
            .as_i64()
            .unwrap();
        let newest: i64 = sqlx::query_scalar("SELECT coalesce(max(xact_id), 0) FROM usage_events")
            .fetch_one(owner)
            .await
            .unwrap();
        if run["aggregation"]["outcome"] == "done" && watermark > newest {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the aggregation never caught up");
}
