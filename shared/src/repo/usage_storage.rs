//! The storage policy of usage events (migration 0006): day partitions created ahead and
//! retired past the retention, and dedup-key generations rotated and expired past the
//! deduplication window. Run by the owner (the admin function, on a schedule); every run is
//! idempotent, and a run that never comes only keeps data longer — a key is never forgotten
//! early, and ingestion has two weeks of partitions ahead.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

use crate::config::{ConfigError, Env};
use crate::db::DbError;

/// How long what is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoragePolicy {
    /// Day partitions created ahead of today.
    pub days_ahead: i32,
    /// Days of events kept in `usage_events`; older days are detached into `usage_archive`.
    pub retention_days: i32,
    /// Days an archived (detached) day waits for export before it is dropped.
    pub archive_days: i32,
    /// How long a key generation stays open: an hour by default, so that the B-tree every key
    /// is inserted into holds an hour of keys (a few hundred pages, hot); the closed
    /// generations are compacted (see [`compact`]), so a key costs one small insert and
    /// read-only probes.
    pub generation_hours: i32,
    /// How long a closed generation waits before a full compaction merges it into the
    /// partition with the Bloom filter (rewriting the window's keys); until then the recent
    /// closed generations are merged into one partition of their own, at most this long.
    pub full_compaction_hours: i32,
    /// The deduplication window: a key is remembered at least this long after its event was
    /// stored (at most one generation longer).
    pub dedup_window_days: i32,
}

impl Default for StoragePolicy {
    fn default() -> Self {
        StoragePolicy {
            days_ahead: 14,
            retention_days: 90,
            archive_days: 7,
            generation_hours: 1,
            full_compaction_hours: 24,
            dedup_window_days: 36,
        }
    }
}

impl StoragePolicy {
    /// `USAGE_PARTITION_DAYS_AHEAD`, `USAGE_RETENTION_DAYS`, `USAGE_ARCHIVE_DAYS`,
    /// `DEDUP_GENERATION_HOURS`, `DEDUP_FULL_COMPACTION_HOURS`, `DEDUP_WINDOW_DAYS`. The window
    /// covers ingestion's 35-day age limit (so an identical resend is always caught), and the
    /// retention covers the window plus a generation (so a remembered key always finds its
    /// event).
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let d = StoragePolicy::default();
        let policy = StoragePolicy {
            days_ahead: env.bounded_or("USAGE_PARTITION_DAYS_AHEAD", d.days_ahead as u64, 1..=60)?
                as i32,
            retention_days: env.bounded_or(
                "USAGE_RETENTION_DAYS",
                d.retention_days as u64,
                40..=3650,
            )? as i32,
            archive_days: env.bounded_or("USAGE_ARCHIVE_DAYS", d.archive_days as u64, 0..=365)?
                as i32,
            generation_hours: env.bounded_or(
                "DEDUP_GENERATION_HOURS",
                d.generation_hours as u64,
                1..=400 * 24,
            )? as i32,
            full_compaction_hours: env.bounded_or(
                "DEDUP_FULL_COMPACTION_HOURS",
                d.full_compaction_hours as u64,
                1..=7 * 24,
            )? as i32,
            dedup_window_days: env.bounded_or(
                "DEDUP_WINDOW_DAYS",
                d.dedup_window_days as u64,
                36..=400,
            )? as i32,
        };
        policy.check().map_err(|reason| ConfigError::Invalid {
            name: "USAGE_RETENTION_DAYS",
            reason,
        })?;
        Ok(policy)
    }

    /// The retention must outlast every remembered key.
    pub fn check(&self) -> Result<(), String> {
        let key_life_hours = self.dedup_window_days * 24 + self.generation_hours;
        if self.retention_days * 24 < key_life_hours + 24 {
            return Err(format!(
                "{} days of retention do not outlast a dedup key ({} days of window plus a \
                 {}-hour generation, plus a day)",
                self.retention_days, self.dedup_window_days, self.generation_hours
            ));
        }
        Ok(())
    }
}

/// One thing a run did: `created`, `archived` or `dropped` a day partition; `rotated` to or
/// `expired` a key generation; `compacted` closed generations into the filtered partition or
/// `merged` the recent ones into one, `dropped` a merged partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StorageAction {
    pub action: String,
    pub object: String,
}

/// One maintenance run as of `now`, in the caller's transaction.
pub async fn maintain(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Result<Vec<StorageAction>, DbError> {
    policy.check().map_err(DbError::Config)?;
    Ok(sqlx::query_as!(
        StorageAction,
        r#"SELECT action AS "action!", object AS "object!"
             FROM usage_storage_maintain($1, $2, $3, $4, make_interval(hours => $5),
                                         make_interval(days => $6))"#,
        now,
        policy.days_ahead,
        policy.retention_days,
        policy.archive_days,
        policy.generation_hours,
        policy.dedup_window_days
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Compacts the closed key generations as of `now` (migration 0010), in one of two ways:
///
/// - **full**, once a generation closed since the last full compaction has waited
///   `policy.full_compaction_hours` (0: always): every closed generation merged into one
///   partition built in key order, with its Bloom filter, leaving out the expired ones
///   (`compacted`, then `dropped` for each merged partition);
/// - otherwise **recent**: the generations closed since the last full compaction merged into
///   one partition of their own, without a filter, when they sit in two or more (`merged`).
///
/// Nothing when there is nothing to merge. Run it after [`maintain`], in a transaction of its
/// own: it builds without holding ingestion back, and only its swap does (briefly).
pub async fn compact(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Result<Vec<StorageAction>, DbError> {
    // It rewrites the window's keys: minutes, not the request-sized statement timeout. Bounded
    // by the admin function's own timeout (300 s).
    sqlx::query!(
        "SELECT set_config('statement_timeout', $1, true)",
        COMPACTION_TIMEOUT
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(sqlx::query_as!(
        StorageAction,
        r#"SELECT action AS "action!", object AS "object!"
             FROM usage_event_keys_compact($1, make_interval(hours => $2))"#,
        now,
        policy.full_compaction_hours
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// The compaction's statement timeout, inside the admin function's 300 s.
const COMPACTION_TIMEOUT: &str = "270s";

/// What is stored: day partitions (attached and archived), key generations, and the first and
/// last day covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageStatus {
    pub day_partitions: i64,
    pub first_day: Option<String>,
    pub last_day: Option<String>,
    pub archived_days: i64,
    pub key_generations: i64,
    /// Partitions of `usage_event_keys`: the open generation's, the compacted one (with its
    /// filter), the recent merge, and those of generations closed since the last merge.
    pub key_partitions: i64,
    pub open_generation: Option<i32>,
    pub open_since: Option<DateTime<Utc>>,
}

pub async fn status(conn: &mut PgConnection) -> Result<StorageStatus, DbError> {
    let row = sqlx::query!(
        r#"WITH days AS (
               SELECT substr(c.relname, 15) AS day FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'public.usage_events'::regclass)
           SELECT (SELECT count(*) FROM days) AS "day_partitions!",
                  (SELECT min(day) FROM days) AS first_day,
                  (SELECT max(day) FROM days) AS last_day,
                  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'usage_archive' AND c.relkind = 'r') AS "archived_days!",
                  (SELECT count(*) FROM usage_key_generations WHERE expired_at IS NULL)
                      AS "key_generations!",
                  (SELECT count(*) FROM pg_inherits
                    WHERE inhparent = 'public.usage_event_keys'::regclass) AS "key_partitions!",
                  (SELECT generation FROM usage_key_generations WHERE closed_at IS NULL)
                      AS open_generation,
                  (SELECT opened_at FROM usage_key_generations WHERE closed_at IS NULL)
                      AS open_since"#
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(StorageStatus {
        day_partitions: row.day_partitions,
        first_day: row.first_day,
        last_day: row.last_day,
        archived_days: row.archived_days,
        key_generations: row.key_generations,
        key_partitions: row.key_partitions,
        open_generation: row.open_generation,
        open_since: row.open_since,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> Env<impl Fn(&str) -> Option<String>> {
        Env::from_lookup(move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn an_empty_environment_gives_the_defaults() {
        assert_eq!(
            StoragePolicy::from_env(&env(&[])).unwrap(),
            StoragePolicy::default()
        );
    }

    #[test]
    fn the_retention_must_outlast_every_key() {
        // 36 days of window + 36 days of generation + a day > 72 days.
        assert!(StoragePolicy::from_env(&env(&[
            ("USAGE_RETENTION_DAYS", "72"),
            ("DEDUP_GENERATION_HOURS", "864")
        ]))
        .is_err());
        // 36 days + a day's generation + a day = 38 days <= 40.
        let daily = env(&[
            ("USAGE_RETENTION_DAYS", "40"),
            ("DEDUP_GENERATION_HOURS", "24"),
        ]);
        assert_eq!(StoragePolicy::from_env(&daily).unwrap().retention_days, 40);
        // The window covers ingestion's 35-day age limit, or it is refused.
        assert!(StoragePolicy::from_env(&env(&[("DEDUP_WINDOW_DAYS", "35")])).is_err());
    }

    #[test]
    fn a_full_compaction_comes_within_a_week() {
        let hourly = StoragePolicy::from_env(&env(&[("DEDUP_FULL_COMPACTION_HOURS", "6")]));
        assert_eq!(hourly.unwrap().full_compaction_hours, 6);
        assert!(StoragePolicy::from_env(&env(&[("DEDUP_FULL_COMPACTION_HOURS", "0")])).is_err());
        assert!(StoragePolicy::from_env(&env(&[("DEDUP_FULL_COMPACTION_HOURS", "169")])).is_err());
    }
}
