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

/// How `admin subject erase` paces an erasure: steps of at most [`Pace::ROWS`] event rows, each
/// followed by a pause so that steps take at most [`Pace::DUTY`] of the time (an erasure is
/// background work: the tenants ingesting beside it keep their rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Event rows a step erases at most (one transaction).
    pub rows: i32,
    /// The share of the wall-clock time spent in steps, in (0, 1]: 1 runs them back to back.
    pub duty: f64,
}

impl Pace {
    pub const ROWS: i32 = 20_000;
    pub const DUTY: f64 = 0.2;
    pub const ADMIN: Pace = Pace {
        rows: Pace::ROWS,
        duty: Pace::DUTY,
    };

    /// Steps of `rows` back to back (tests).
    pub fn unpaced(rows: i32) -> Pace {
        Pace { rows, duty: 1.0 }
    }

    fn pause_after(&self, step: Duration) -> Duration {
        let duty = self.duty.clamp(0.01, 1.0);
        step.mul_f64(1.0 / duty - 1.0)
    }
}

/// The erasure step by step, each step a transaction of its own, paced by `pace`, until it
/// finishes or `deadline` comes (then the receipt has no `finished_at`, and the same request
/// run again resumes where it stopped).
pub async fn erase(
    pool: &PgPool,
    request: &Request<'_>,
    pace: Pace,
    deadline: Instant,
) -> Result<Receipt, DbError> {
    loop {
        let started = Instant::now();
        let mut tx = pool.begin().await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout_ms = left.max(MIN_STEP_TIME).as_millis().to_string();
        sqlx::query!(
            "SELECT set_config('statement_timeout', $1, true)",
            timeout_ms
        )
        .fetch_one(&mut *tx)
        .await?;
        let receipt = step(&mut tx, request, pace.rows).await?;
        tx.commit().await?;
        let resume_at = Instant::now() + pace.pause_after(started.elapsed());
        if receipt.finished_at.is_some() || resume_at + MIN_STEP_TIME > deadline {
            return Ok(receipt);
        }
        tokio::time::sleep_until(resume_at.into()).await;
    }
}

/// No step starts with less time than this left.
const MIN_STEP_TIME: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_erasure_pauses_so_its_steps_take_their_share_of_the_time() {
        let step = Duration::from_millis(500);
        assert_eq!(Pace::ADMIN.pause_after(step), Duration::from_secs(2));
        assert_eq!(Pace::unpaced(10).pause_after(step), Duration::ZERO);
        // A nonsense duty is held to [1 %, 100 %].
        let zero = Pace { rows: 1, duty: 0.0 };
        assert_eq!(zero.pause_after(step), step.mul_f64(99.0));
        let over = Pace { rows: 1, duty: 7.0 };
        assert_eq!(over.pause_after(step), Duration::ZERO);
    }
}
