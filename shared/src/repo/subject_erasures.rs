//! subject_erasures (migration 0022): a data subject's erasure, step by step, each step a
//! transaction of its own under the aggregation's lock, until the request's receipt says it
//! finished (docs/decisions/0007-subject-erasure.md).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::db::DbError;
use crate::domain::TenantId;

/// An erasure request: the tenant, the caller's id for it, the subject's actor id (never
/// stored), why, and who asked.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub tenant: TenantId,
    pub request_id: &'a str,
    pub actor_id: &'a str,
    pub reason: &'a str,
    pub requested_by: &'a str,
}

/// Where an erasure stands: its receipt once finished. It names the subject by a salted hash
/// only, never by the id or the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub request_id: String,
    /// sha256(the installation's salt ‖ tenant ‖ actor id), hex.
    pub subject: String,
    pub reason: String,
    pub requested_by: String,
    /// Event rows whose actor id was replaced and metadata emptied.
    pub events_erased: i64,
    /// Distinct-actor set rows re-keyed to the token (per metric and day; per period).
    pub actor_days: i64,
    pub actor_periods: i64,
    pub steps: i32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A request id that already names another subject (SQLSTATE 23505).
pub const ANOTHER_SUBJECT: &str = "23505";

/// One step in the caller's transaction: at most `rows` event rows, or the last step.
pub async fn step(
    conn: &mut PgConnection,
    request: &Request<'_>,
    rows: i32,
) -> Result<Receipt, DbError> {
    Ok(sqlx::query_as!(
        Receipt,
        r#"SELECT request_id AS "request_id!", encode(subject_hash, 'hex') AS "subject!",
                  reason AS "reason!", requested_by AS "requested_by!",
                  events_erased AS "events_erased!", actor_days AS "actor_days!",
                  actor_periods AS "actor_periods!", steps AS "steps!",
                  started_at AS "started_at!", finished_at
             FROM usage_subject_erase_step($1, $2, $3, $4, $5, $6)"#,
        request.tenant.0,
        request.request_id,
        request.actor_id,
        request.reason,
        request.requested_by,
        rows
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// The erasure step by step, each step a transaction of its own of at most `rows` event rows,
/// until it finishes or `deadline` comes (then the receipt has no `finished_at`, and the same
/// request run again resumes where it stopped).
pub async fn erase(
    pool: &PgPool,
    request: &Request<'_>,
    rows: i32,
    deadline: Instant,
) -> Result<Receipt, DbError> {
    loop {
        let mut tx = pool.begin().await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout_ms = left.max(MIN_STEP_TIME).as_millis().to_string();
        sqlx::query!(
            "SELECT set_config('statement_timeout', $1, true)",
            timeout_ms
        )
        .fetch_one(&mut *tx)
        .await?;
        let receipt = step(&mut tx, request, rows).await?;
        tx.commit().await?;
        if receipt.finished_at.is_some() || Instant::now() + MIN_STEP_TIME > deadline {
            return Ok(receipt);
        }
    }
}

/// No step starts with less time than this left.
const MIN_STEP_TIME: Duration = Duration::from_secs(2);
