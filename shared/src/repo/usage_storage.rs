//! The storage policy of usage events (migration 0006): day partitions created ahead and
//! retired past the retention, and dedup-key generations rotated and expired past the
//! deduplication window. Run by the owner (the admin function, on a schedule); every run is
//! idempotent, and a run that never comes only keeps data longer — a key is never forgotten
//! early, and ingestion has two weeks of partitions ahead.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

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
    /// generations are merged in levels (see [`compact`]), so a key costs one small insert and
    /// read-only checks.
    pub generation_hours: i32,
    /// The most keys one step of the key maintenance reads or writes (a transaction of its
    /// own; see [`compact`]).
    pub step_keys: i64,
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
            step_keys: 1_000_000,
            dedup_window_days: 36,
        }
    }
}

impl StoragePolicy {
    /// `USAGE_PARTITION_DAYS_AHEAD`, `USAGE_RETENTION_DAYS`, `USAGE_ARCHIVE_DAYS`,
    /// `DEDUP_GENERATION_HOURS`, `DEDUP_STEP_KEYS`, `DEDUP_WINDOW_DAYS`. The window
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
            step_keys: env.bounded_or("DEDUP_STEP_KEYS", d.step_keys as u64, 10_000..=50_000_000)?
                as i64,
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
/// `expired` a key generation; of the key levels (see [`compact`]): `registered` a closed
/// hour, `counted` a partition from before the levels, `filtering`/`filtered` a partition's
/// filter, `merge started`, `merging`, `merged` (then `dropped` each source), `dropped` a
/// partition whose generations all expired; of the BRIN indexes the aggregation reads (see
/// [`summarize`]): `summarized` new page ranges, `summary left work` (its time budget ran
/// out: the next run resumes), `summary skipped (locked)` (a VACUUM held the partition).
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
    let mut done = sqlx::query_as!(
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
    .await?;
    // The days just created: their BRIN indexes summarized as they fill (migration 0016).
    done.extend(
        sqlx::query_as!(
            StorageAction,
            r#"SELECT action AS "action!", object AS "object!"
                 FROM usage_events_brin_autosummarize()"#
        )
        .fetch_all(&mut *conn)
        .await?,
    );
    Ok(done)
}

/// The BRIN summaries of the days ingestion still writes to (migration 0020, 0021), after
/// [`maintain`]: the page ranges filled since the last run, whatever autovacuum kept up with,
/// in steps of at most [`SUMMARY_STEP`], each a transaction of its own (a step holds each
/// partition it summarizes against VACUUM until it commits), until nothing is left or
/// `deadline` comes. A partition a VACUUM holds is skipped without waiting; what is left, the
/// next run resumes. Its cost follows what was written since the last run, not what is stored.
pub async fn summarize(
    pool: &PgPool,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
    deadline: Instant,
) -> Result<Summaries, DbError> {
    let window_from =
        (now - chrono::Duration::days(i64::from(policy.dedup_window_days) + 1)).date_naive();
    let mut done = Summaries::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < MIN_SUMMARY_TIME {
            done.more = true;
            return Ok(done);
        }
        let budget_ms = i64::try_from(left.min(SUMMARY_STEP).as_millis()).unwrap_or(i64::MAX);
        let mut tx = pool.begin().await?;
        let step = sqlx::query_as!(
            StorageAction,
            r#"SELECT action AS "action!", object AS "object!"
                 FROM usage_events_brin_summarize($1, make_interval(secs => $2::int8 / 1000.0))"#,
            window_from,
            budget_ms
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        done.steps += 1;
        let more = step.iter().any(|a| a.action == "summary left work");
        done.actions.extend(step);
        if !more {
            return Ok(done);
        }
    }
}

/// What [`summarize`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summaries {
    pub actions: Vec<StorageAction>,
    /// Steps committed.
    pub steps: u64,
    /// The deadline came with ranges left (the next run resumes them).
    pub more: bool,
}

/// The share of a scheduled `usage.maintain` (the admin function has 300 s) of its steps after
/// [`maintain`], the [`summarize`] steps then the [`compact`] steps: what is left waits for the
/// next run, which has the same time again.
pub const SCHEDULED_STEPS_TIME: Duration = Duration::from_secs(240);
/// The summaries' part of it, at most (at 10 k events/s an hour's new ranges take about 36 s).
pub const SCHEDULED_SUMMARY_TIME: Duration = Duration::from_secs(40);
/// A summary step's time budget: well inside the admin function's 10 s statement timeout.
pub const SUMMARY_STEP: Duration = Duration::from_secs(5);
/// No summary step starts with less time than this left.
const MIN_SUMMARY_TIME: Duration = Duration::from_millis(500);

/// The key maintenance (migration 0015), step by step, each step a transaction of its own that
/// reads or writes at most `policy.step_keys` keys, until nothing is left or `deadline` comes:
/// closed hours join level 1 and get their filter; 24 hours are merged into a day, 7 days into
/// a week, each merge copied a range of keys per step and swapped in once complete; partitions
/// whose generations have all expired are dropped. A step cut short (the deadline, a crash)
/// rolls back alone; the next run resumes from the last committed one. Run it after
/// [`maintain`]. Returns what it did (consecutive repeats folded) and whether work is left.
pub async fn compact(
    pool: &PgPool,
    policy: &StoragePolicy,
    deadline: Instant,
) -> Result<Compaction, DbError> {
    let mut done = Compaction::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < MIN_STEP_TIME {
            done.more = true;
            return Ok(done);
        }
        let mut tx = pool.begin().await?;
        // A step may take the time left, and never longer than the admin function allows.
        let timeout_ms = left.min(STEP_TIMEOUT).as_millis().to_string();
        sqlx::query!(
            "SELECT set_config('statement_timeout', $1, true)",
            timeout_ms
        )
        .fetch_one(&mut *tx)
        .await?;
        let step = sqlx::query_as!(
            StorageAction,
            r#"SELECT action AS "action!", object AS "object!"
                 FROM usage_event_keys_step($1)"#,
            policy.step_keys
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        if step.is_empty() {
            return Ok(done);
        }
        done.steps += 1;
        for action in step {
            if done.actions.last() != Some(&action) {
                done.actions.push(action);
            }
        }
    }
}

/// What [`compact`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Compaction {
    pub actions: Vec<StorageAction>,
    /// Steps committed.
    pub steps: u64,
    /// The deadline came with work left (the next run resumes it).
    pub more: bool,
}

/// No step starts with less time than this left.
const MIN_STEP_TIME: Duration = Duration::from_secs(5);
/// A step's statement timeout at most, inside the admin function's 300 s.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// Partitions of `usage_event_keys`: the open generation's and those of the levels.
    pub key_partitions: i64,
    /// The levels' members: (level, partitions, keys, partitions whose filter is not complete).
    pub key_levels: Vec<KeyLevel>,
    /// The merge in progress, if any.
    pub key_merge: Option<String>,
    pub open_generation: Option<i32>,
    pub open_since: Option<DateTime<Utc>>,
}

/// One level of the dedup keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyLevel {
    /// 1: closed hours, 2: days, 3: weeks.
    pub level: i16,
    /// Blocks of its filter.
    pub blocks: i32,
    pub partitions: i64,
    pub keys: i64,
    /// Partitions whose filter is still being built (probed by their index meanwhile).
    pub filtering: i64,
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
    let key_levels = sqlx::query_as!(
        KeyLevel,
        r#"SELECT l.level AS "level!", l.blocks AS "blocks!", count(p.name) AS "partitions!",
                  coalesce(sum(p.keys), 0)::int8 AS "keys!",
                  count(p.name) FILTER (WHERE p.filter_next IS NOT NULL) AS "filtering!"
             FROM usage_key_levels l LEFT JOIN usage_key_parts p ON p.level = l.level
            GROUP BY l.level, l.blocks ORDER BY l.level"#
    )
    .fetch_all(&mut *conn)
    .await?;
    let key_merge = sqlx::query_scalar!("SELECT target FROM usage_key_merges")
        .fetch_optional(&mut *conn)
        .await?;
    Ok(StorageStatus {
        key_levels,
        key_merge,
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
    fn a_step_takes_between_ten_thousand_and_fifty_million_keys() {
        let small = env(&[("DEDUP_STEP_KEYS", "250000")]);
        assert_eq!(StoragePolicy::from_env(&small).unwrap().step_keys, 250_000);
        assert!(StoragePolicy::from_env(&env(&[("DEDUP_STEP_KEYS", "9999")])).is_err());
        assert!(StoragePolicy::from_env(&env(&[("DEDUP_STEP_KEYS", "50000001")])).is_err());
    }
}
