//! Usage aggregation: `usage_events` rolled up into `usage_aggregates`, incrementally, and the
//! Redis real-time counters kept honest. Run by `aggregate-usage` (connected as
//! `meterbridge_ops`) and by the admin function.
//!
//! - **What changed** is found by transaction id, never by time or sequence: every event row
//!   records the transaction that inserted it and the one that last wrote it (a void), and a
//!   run takes the transactions between the watermark and the oldest one still running —
//!   every transaction below that bound has finished, so one that commits late is applied by
//!   the next run instead of being missed.
//! - **A run reads only what changed**: the range is applied in chunks, each one transaction
//!   under the aggregation's advisory lock that folds its inserts (+1) and voids (-1) into
//!   deltas of their day, week and month cells ([`crate::domain::rollup`]) and moves the
//!   watermark with them. Week and month cells take their days' deltas; distinct actors stay
//!   exact through per-day and per-period actor sets. A run stops taking chunks before its
//!   deadline; a run cut anywhere keeps every chunk it committed and nothing else.
//! - **Recomputes** (from the events, as of the watermark) remain for what deltas cannot do:
//!   backfills, cells from before the actor sets (built on their first change), a range whose
//!   one transaction is too big for a chunk (a bulk load), and rollups that do not add up.
//! - **Final**: a period is final once its end plus the grace has passed and it is aggregated;
//!   a later change (a late event, a void) still counts, and the cell records the revision.
//! - **Counters** (after the commit): every daily cell inside the counters' TTL is compared
//!   with Redis; a counter that differs is checked against a fresh total from the events and
//!   set by compare-and-set, so an increment that raced the repair is never lost.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::config::{ConfigError, Env};
use crate::db::{Database, DbError};
use crate::domain::period::PeriodType;
use crate::domain::rollup::{self, ActorDay, ActorPeriod, CellKey, Change};
use crate::domain::TenantId;
use crate::redis::{Redis, RedisError};
use crate::repo::usage_aggregates::{self as repo, Cell, Collected};
use crate::repo::{usage_changes, usage_limits};
use crate::usage_counters;

#[derive(Debug, thiserror::Error)]
pub enum AggregationError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("{0}")]
    BadRequest(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AggregationConfig {
    /// Cells recomputed per statement.
    pub chunk_cells: i64,
    /// A period becomes final this long after its end.
    pub grace_seconds: u64,
    /// The real-time counters' lifetime (ingestion's `COUNTER_TTL_DAYS`).
    pub counter_ttl_days: i64,
    /// No new chunk is started closer than this to the deadline.
    pub deadline_margin_ms: u64,
    /// The longest range a backfill takes.
    pub backfill_max_days: i64,
    /// Counters per Redis script call in a repair (one tenant's at a time).
    pub repair_batch: usize,
    /// `work_mem` of a run's transaction: the sorts of its grouped statements stay in memory.
    pub work_mem_mb: u32,
    /// The storage policy's retention (`USAGE_RETENTION_DAYS`): a cell that starts before it
    /// is never recomputed once it has an aggregate.
    pub retention_days: i32,
    /// A run whose watermark trails the oldest committed event by more than this logs the
    /// transaction holding it back (the alarm watches the same figure).
    pub lag_warn_seconds: u64,
    /// The most groups of changes one chunk transaction applies; a wider range is split.
    pub chunk_changes: i64,
    /// How long actor sets are kept: past ingestion's window (35 days) and the voids' (the
    /// 36-day deduplication window), no change can reach a period.
    pub actor_days: i64,
    /// Actor rows pruned per run at most.
    pub prune_batch: i64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            chunk_cells: 2000,
            grace_seconds: 3600,
            counter_ttl_days: 7,
            deadline_margin_ms: 10_000,
            backfill_max_days: 400,
            repair_batch: 500,
            work_mem_mb: 64,
            retention_days: crate::repo::usage_storage::StoragePolicy::default().retention_days,
            lag_warn_seconds: 1800,
            chunk_changes: 100_000,
            actor_days: 40,
            prune_batch: 100_000,
        }
    }
}

impl AggregationConfig {
    /// `AGGREGATION_CHUNK_CELLS`, `AGGREGATION_CHUNK_CHANGES`, `AGGREGATION_GRACE_SECONDS`,
    /// `COUNTER_TTL_DAYS`,
    /// `AGGREGATION_DEADLINE_MARGIN_MS`, `AGGREGATION_WORK_MEM_MB`, `AGGREGATION_LAG_WARN_SECONDS`,
    /// `USAGE_RETENTION_DAYS` (the storage policy's).
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let d = AggregationConfig::default();
        Ok(AggregationConfig {
            chunk_cells: env.bounded_or(
                "AGGREGATION_CHUNK_CELLS",
                d.chunk_cells as u64,
                1..=50_000,
            )? as i64,
            grace_seconds: env.bounded_or(
                "AGGREGATION_GRACE_SECONDS",
                d.grace_seconds,
                0..=7 * 86_400,
            )?,
            counter_ttl_days: env.bounded_or(
                "COUNTER_TTL_DAYS",
                d.counter_ttl_days as u64,
                1..=90,
            )? as i64,
            deadline_margin_ms: env.bounded_or(
                "AGGREGATION_DEADLINE_MARGIN_MS",
                d.deadline_margin_ms,
                0..=600_000,
            )?,
            work_mem_mb: env.bounded_or(
                "AGGREGATION_WORK_MEM_MB",
                u64::from(d.work_mem_mb),
                4..=1024,
            )? as u32,
            retention_days: crate::repo::usage_storage::StoragePolicy::from_env(env)?
                .retention_days,
            lag_warn_seconds: env.bounded_or(
                "AGGREGATION_LAG_WARN_SECONDS",
                d.lag_warn_seconds,
                60..=86_400,
            )?,
            chunk_changes: env.bounded_or(
                "AGGREGATION_CHUNK_CHANGES",
                d.chunk_changes as u64,
                100..=10_000_000,
            )? as i64,
            ..d
        })
    }
}

/// A backfill request: recompute the cells of `periods` that touch the days `from..=to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backfill {
    pub from: NaiveDate,
    pub to: NaiveDate,
    /// A tenant slug; all tenants when absent.
    pub tenant: Option<String>,
    pub periods: Vec<PeriodType>,
}

impl Backfill {
    /// A backfill as a payload names it: every period type when `periods` is absent.
    pub fn of(
        from: NaiveDate,
        to: NaiveDate,
        tenant: Option<String>,
        periods: Option<Vec<PeriodType>>,
    ) -> Self {
        Backfill {
            from,
            to,
            tenant,
            periods: periods.unwrap_or_else(|| PeriodType::ALL.to_vec()),
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// `"done"`, `"stopped"` (the deadline came, or another run took over; the watermark and
    /// the queue keep the rest) or `"skipped: locked"` (another run holds the lock; this one
    /// did nothing).
    pub outcome: String,
    /// The changes since the last run, applied chunk by chunk.
    pub collected: Collected,
    /// Cells queued by a backfill.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill_queued: Option<i64>,
    pub cells_examined: u64,
    pub cells_written: u64,
    pub cells_unchanged: u64,
    /// Writes to cells that were already final.
    pub revisions: u64,
    pub finalized: u64,
    /// Usage-limit thresholds found crossed in the rollups that ingestion had not announced:
    /// their `usage.threshold.crossed` events, written now.
    pub thresholds_crossed_late: u64,
    /// Cells not recomputed because their period reaches back past the retention (some of their
    /// events may be retired by the storage policy); their aggregates are kept as they are.
    pub skipped_retired: u64,
    /// Actor-set rows of periods past ingestion's window, dropped.
    pub actor_rows_pruned: u64,
    /// Cells left in the queue for the next run.
    pub queued_after: i64,
    pub duration_ms: u64,
    /// How far the watermark trails the committed events (and what holds it back).
    pub lag: repo::Lag,
    pub counters: Option<RepairReport>,
}

/// What the counters' repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RepairReport {
    pub checked: u64,
    /// Counters that differed from PostgreSQL (absent ones included).
    pub drift_found: u64,
    pub repaired: u64,
    /// Counters that changed between reading and repairing (an increment raced): left for the
    /// next run.
    pub raced: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The status job's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub now: DateTime<Utc>,
    pub state: repo::State,
    /// How far the watermark trails the committed events now, and the oldest transaction.
    pub lag: repo::Lag,
    pub tenants: Vec<repo::TenantBacklog>,
}

/// The aggregation over the container's clients (cheap to make per invocation).
pub struct Aggregator<'a> {
    db: &'a Database,
    redis: Option<&'a Redis>,
    pub config: AggregationConfig,
}

impl<'a> Aggregator<'a> {
    pub fn new(db: &'a Database, redis: Option<&'a Redis>, config: AggregationConfig) -> Self {
        Aggregator { db, redis, config }
    }

    /// The scheduled run: collect what changed, recompute it, finalize, repair the counters.
    pub async fn aggregate(
        &self,
        now: DateTime<Utc>,
        deadline: Instant,
    ) -> Result<RunReport, AggregationError> {
        self.run(now, deadline, None).await
    }

    /// Recomputes a range from the events (then continues like a scheduled run). The range's
    /// cells are queued day by day, so a run stopped by its deadline leaves them to the next.
    pub async fn backfill(
        &self,
        request: &Backfill,
        now: DateTime<Utc>,
        deadline: Instant,
    ) -> Result<RunReport, AggregationError> {
        if request.to < request.from {
            return Err(AggregationError::BadRequest(
                "\"to\" is before \"from\"".into(),
            ));
        }
        let days = (request.to - request.from).num_days() + 1;
        if days > self.config.backfill_max_days {
            return Err(AggregationError::BadRequest(format!(
                "a backfill covers at most {} days; this one covers {days}",
                self.config.backfill_max_days
            )));
        }
        if request.periods.is_empty() {
            return Err(AggregationError::BadRequest(
                "\"periods\" names no period".into(),
            ));
        }
        self.run(now, deadline, Some(request)).await
    }

    async fn run(
        &self,
        now: DateTime<Utc>,
        deadline: Instant,
        backfill: Option<&Backfill>,
    ) -> Result<RunReport, AggregationError> {
        let started = Instant::now();
        let stop_at = deadline
            .checked_sub(Duration::from_millis(self.config.deadline_margin_ms))
            .unwrap_or(started);
        // A statement may take the run's whole time, and no longer: one cancelled at the
        // deadline rolls its transaction back cleanly instead of the Lambda dying in it.
        let statement_timeout_ms = deadline
            .saturating_duration_since(started)
            .as_millis()
            .clamp(1_000, 900_000) as u64;
        let mut report = RunReport::default();

        // 1. The changes since the watermark, a chunk per transaction.
        match self
            .apply_changes(now, stop_at, statement_timeout_ms, &mut report)
            .await?
        {
            Step::Locked if report.collected.chunks == 0 => {
                return Ok(RunReport {
                    outcome: "skipped: locked".into(),
                    ..RunReport::default()
                })
            }
            Step::Locked | Step::Stopped => {
                return self.finish(now, started, report, true).await;
            }
            Step::Done => {}
        }

        // 2. A backfill queues its cells (recomputed below, as of the watermark).
        if let Some(request) = backfill {
            let mut tx = self.db.begin().await?;
            if !repo::try_lock(&mut tx, self.config.work_mem_mb, statement_timeout_ms).await? {
                return self.finish(now, started, report, true).await;
            }
            report.backfill_queued = Some(self.enqueue_backfill(&mut tx, request).await?);
            tx.commit().await.map_err(DbError::from)?;
        }

        // 3. The recompute queue (backfills, cells whose actor sets are not complete yet).
        let stopped = self
            .recompute_queued(now, stop_at, statement_timeout_ms, &mut report)
            .await?;
        self.finish(now, started, report, stopped).await
    }

    /// Applies the changes since the watermark, one transaction per chunk of the transaction
    /// range, each moving the watermark with what it applied (a run cut short keeps every
    /// chunk it committed; the next one takes over from there). A chunk spans as many
    /// transactions as keep it within `chunk_changes` groups of changes.
    async fn apply_changes(
        &self,
        now: DateTime<Utc>,
        stop_at: Instant,
        statement_timeout_ms: u64,
        report: &mut RunReport,
    ) -> Result<Step, AggregationError> {
        let mut span: i64 = 1 << 20;
        // The bound as the run found it: what commits later is the next run's (each chunk's own
        // commit takes a transaction id, so the bound would otherwise move on forever).
        let mut target: Option<i64> = None;
        loop {
            if Instant::now() >= stop_at {
                return Ok(Step::Stopped);
            }
            let mut tx = self.db.begin().await?;
            if !repo::try_lock(&mut tx, self.config.work_mem_mb, statement_timeout_ms).await? {
                return Ok(Step::Locked);
            }
            let (from, upper) = repo::bounds(&mut tx).await?;
            let upper = *target.get_or_insert(upper);
            if from >= upper {
                report.collected.watermark = from;
                tx.commit().await.map_err(DbError::from)?;
                return Ok(Step::Done);
            }
            let to = upper.min(from.saturating_add(span));
            let limit = self.config.chunk_changes;
            let changes = usage_changes::changes(&mut tx, from, to, limit).await?;
            match changes {
                Some(changes) => {
                    report.collected.changes += changes.len() as u64;
                    let applied =
                        apply(&mut tx, &changes, now, self.config.grace_seconds as f64).await?;
                    report.collected.cells_changed += applied.written.len() as u64;
                    report.collected.cells_queued += applied.queued;
                    report.revisions += applied.written.iter().filter(|w| w.revised).count() as u64;
                    if (changes.len() as i64) < limit / 4 {
                        span = span.saturating_mul(2);
                    }
                }
                // Too many changes for one chunk: a narrower range, or (one transaction alone
                // is too big: a bulk load) its cells recomputed from their events.
                None if to - from > 1 => {
                    span = ((to - from) / 4).max(1);
                    tx.rollback().await.map_err(DbError::from)?;
                    continue;
                }
                None => {
                    report.collected.cells_queued +=
                        usage_changes::enqueue_range(&mut tx, from, to).await?;
                }
            }
            repo::set_watermark(&mut tx, to).await?;
            tx.commit().await.map_err(DbError::from)?;
            report.collected.chunks += 1;
            report.collected.watermark = to;
        }
    }

    /// Works the recompute queue in chunks, each a transaction of its own, as of the watermark.
    /// Returns whether it stopped for the deadline (or another run's lock) with work left.
    async fn recompute_queued(
        &self,
        now: DateTime<Utc>,
        stop_at: Instant,
        statement_timeout_ms: u64,
        report: &mut RunReport,
    ) -> Result<bool, AggregationError> {
        // Days before this may have been retired by the storage policy.
        let retired_before = crate::domain::period::midnight(
            now.date_naive() - chrono::Duration::days(i64::from(self.config.retention_days)),
        );
        loop {
            if Instant::now() >= stop_at {
                return Ok(true);
            }
            let mut tx = self.db.begin().await?;
            if !repo::try_lock(&mut tx, self.config.work_mem_mb, statement_timeout_ms).await? {
                return Ok(true);
            }
            let watermark = repo::watermark(&mut tx).await?;
            let cells = repo::next_cells(&mut tx, self.config.chunk_cells).await?;
            if cells.is_empty() {
                tx.commit().await.map_err(DbError::from)?;
                return Ok(false);
            }
            repo::dequeue(&mut tx, &cells).await?;
            report.cells_examined += cells.len() as u64;
            // A cell that reaches back past the retention, and was aggregated while its events
            // were all there, keeps its aggregate: some of its events may be retired.
            let (early, cells): (Vec<Cell>, Vec<Cell>) = cells
                .into_iter()
                .partition(|c| c.period_start < retired_before);
            let kept = if early.is_empty() {
                Default::default()
            } else {
                repo::aggregated(&mut tx, &early).await?
            };
            let mut periods: BTreeMap<(PeriodType, DateTime<Utc>), CellKeys> = BTreeMap::new();
            for cell in early.into_iter().chain(cells) {
                if kept.contains(&cell) {
                    report.skipped_retired += 1;
                } else {
                    periods
                        .entry((cell.period_type, cell.period_start))
                        .or_default()
                        .push((cell.tenant_id, cell.metric));
                }
            }
            for ((period, start), cells) in periods {
                let end = period
                    .end_of(start.date_naive())
                    .map(crate::domain::period::midnight)
                    .ok_or_else(|| DbError::Decode(format!("no period after {start}")))?;
                let grace = self.config.grace_seconds as f64;
                let written =
                    repo::compute(&mut tx, period, start, end, &cells, now, grace, watermark)
                        .await?;
                repo::rebuild_actor_sets(&mut tx, period, start, end, &cells, watermark).await?;
                report.cells_written += written.len() as u64;
                report.revisions += written.iter().filter(|w| w.revised).count() as u64;
            }
            tx.commit().await.map_err(DbError::from)?;
        }
    }

    /// Finalizes the periods past their grace, prunes actor sets past ingestion's window,
    /// records the run, then repairs the counters.
    async fn finish(
        &self,
        now: DateTime<Utc>,
        started: Instant,
        mut report: RunReport,
        stopped: bool,
    ) -> Result<RunReport, AggregationError> {
        let mut tx = self.db.begin().await?;
        let watermark = repo::watermark(&mut tx).await?;
        report.collected.watermark = watermark;
        report.lag = repo::lag(&mut tx, watermark).await?;
        report.cells_unchanged = report
            .cells_examined
            .saturating_sub(report.cells_written + report.skipped_retired);
        report.finalized = repo::finalize(&mut tx, now, self.config.grace_seconds as f64).await?;
        // Thresholds of usage limits the rollups show reached but ingestion did not record
        // (Redis was down, or it crashed between its commit and its count).
        let missed = usage_limits::missed_crossings(&mut tx, now).await?;
        report.thresholds_crossed_late = usage_limits::record_crossings(
            &mut tx,
            &missed,
            usage_limits::Detector::Aggregation,
            now,
        )
        .await?;
        let horizon = now.date_naive() - chrono::Duration::days(self.config.actor_days);
        report.actor_rows_pruned =
            usage_changes::prune_actor_sets(&mut tx, horizon, self.config.prune_batch).await?;
        report.queued_after = repo::state(&mut tx).await?.queued_cells;
        report.outcome = if stopped { "stopped" } else { "done" }.into();
        report.duration_ms = started.elapsed().as_millis() as u64;
        let saved = serde_json::to_value(&report).unwrap_or_default();
        repo::save_run(&mut tx, now, &saved).await?;
        tx.commit().await.map_err(DbError::from)?;

        report.counters = Some(self.repair_counters(now).await);
        report.duration_ms = started.elapsed().as_millis() as u64;
        report.emit_metrics();
        report.warn_of_lag(self.config.lag_warn_seconds);
        Ok(report)
    }

    async fn enqueue_backfill(
        &self,
        tx: &mut sqlx::PgConnection,
        request: &Backfill,
    ) -> Result<i64, AggregationError> {
        let tenant = match &request.tenant {
            None => None,
            Some(slug) => Some(
                crate::repo::tenants::find_by_slug(&mut *tx, slug)
                    .await?
                    .ok_or_else(|| AggregationError::BadRequest(format!("no tenant {slug:?}")))?
                    .id,
            ),
        };
        let mut queued = 0;
        let mut day = request.from;
        while day <= request.to {
            let next = day.succ_opt().unwrap_or(day);
            queued += repo::enqueue_range(tx, day, next, tenant, &request.periods).await?;
            if next == day {
                break;
            }
            day = next;
        }
        Ok(queued)
    }

    /// Compares every day counter inside the TTL, and every month counter still counted, with
    /// PostgreSQL and repairs drift (a
    /// compare-and-set per counter). Never fails the run: Redis trouble is reported.
    pub async fn repair_counters(&self, now: DateTime<Utc>) -> RepairReport {
        let Some(redis) = self.redis else {
            return RepairReport {
                error: Some("no Redis configured".into()),
                ..RepairReport::default()
            };
        };
        match self.try_repair(redis, now).await {
            Ok(report) => report,
            Err(e) => {
                metrics::counter!("CounterRepairFailures").increment(1);
                tracing::warn!(error = %e, "counter repair failed; the next run tries again");
                RepairReport {
                    error: Some(e.to_string()),
                    ..RepairReport::default()
                }
            }
        }
    }

    async fn try_repair(
        &self,
        redis: &Redis,
        now: DateTime<Utc>,
    ) -> Result<RepairReport, RepairError> {
        let ttl = self.config.counter_ttl_days;
        let today = now.date_naive();
        let mut conn = self.db.acquire().await?;
        // The day counters inside their TTL, and the month counters still counted.
        let mut expected = repo::totals_since(
            &mut conn,
            PeriodType::Daily,
            today - chrono::Duration::days(ttl - 1),
        )
        .await?;
        expected.extend(
            repo::totals_since(
                &mut conn,
                PeriodType::Monthly,
                today - chrono::Duration::days(usage_counters::MONTH_COUNTER_TTL_DAYS - 1),
            )
            .await?,
        );
        expected.sort_by_key(|t| t.tenant_id);
        let mut report = RepairReport {
            checked: expected.len() as u64,
            ..RepairReport::default()
        };

        // 1. Read every counter: one script per tenant (a hash slot) and batch, many in flight.
        let mut batches: Vec<Vec<(repo::CellTotal, usage_counters::Cell)>> = Vec::new();
        for total in expected {
            let cell = counter_cell(&total);
            match batches.last_mut() {
                Some(batch)
                    if batch[0].0.tenant_id == total.tenant_id
                        && batch.len() < self.config.repair_batch =>
                {
                    batch.push((total, cell))
                }
                _ => batches.push(vec![(total, cell)]),
            }
        }
        let mut reads: Vec<ObserveFuture<'_>> = Vec::with_capacity(batches.len());
        for batch in &batches {
            let tenant = TenantId(batch[0].0.tenant_id);
            let cells: Vec<usage_counters::Cell> = batch.iter().map(|(_, c)| c.clone()).collect();
            reads.push(Box::pin(async move {
                usage_counters::observe(redis, tenant, &cells).await
            }));
        }
        let observed: Vec<_> = futures::stream::iter(reads).buffered(16).collect().await;

        // 2. Counters that differ from the aggregate are checked against a fresh total, read
        //    now: after the counter, so an increment of a later commit is never taken away.
        let mut suspects: Vec<(
            repo::CellTotal,
            usage_counters::Cell,
            usage_counters::Observed,
        )> = Vec::new();
        for (batch, seen) in batches.into_iter().zip(observed) {
            for ((total, cell), counter) in batch.into_iter().zip(seen?) {
                // An absent counter of a zero total is not drift.
                let drift = match counter.value {
                    Some(v) => v != total.total,
                    None => total.total != 0,
                };
                if drift {
                    suspects.push((total, cell, counter));
                }
            }
        }
        if suspects.is_empty() {
            return Ok(report);
        }
        let fresh = self.fresh_totals(&mut conn, &suspects).await?;
        drop(conn);

        // 3. Set those that drifted, each only if it is still as it was read.
        let mut fixes: BTreeMap<Uuid, Vec<usage_counters::Fix>> = BTreeMap::new();
        for ((total, cell, counter), truth) in suspects.into_iter().zip(fresh) {
            let Some(truth) = truth else {
                continue; // a recompute of the cell is pending: the next run checks it
            };
            let drifted = match counter.value {
                Some(v) => v != truth,
                None => truth != 0,
            };
            if drifted {
                report.drift_found += 1;
                fixes
                    .entry(total.tenant_id)
                    .or_default()
                    .push(usage_counters::Fix {
                        cell,
                        observed: counter,
                        value: truth,
                    });
            }
        }
        let mut writes: Vec<RepairFuture<'_>> = Vec::new();
        for (tenant, fixes) in fixes {
            for chunk in fixes.chunks(self.config.repair_batch) {
                let chunk = chunk.to_vec();
                writes.push(Box::pin(async move {
                    usage_counters::repair(redis, TenantId(tenant), &chunk, ttl).await
                }));
            }
        }
        let results: Vec<_> = futures::stream::iter(writes).buffered(16).collect().await;
        for result in results {
            for set in result? {
                if set {
                    report.repaired += 1;
                } else {
                    report.raced += 1;
                }
            }
        }
        Ok(report)
    }

    /// The true totals of the suspect counters: a day's from its events (one day of one
    /// metric: an index range); a month's from its rollup plus what committed since the
    /// watermark (the cost follows the change, not the month), `None` while a recompute of the
    /// month is queued.
    async fn fresh_totals(
        &self,
        conn: &mut sqlx::PgConnection,
        suspects: &[(
            repo::CellTotal,
            usage_counters::Cell,
            usage_counters::Observed,
        )],
    ) -> Result<Vec<Option<i128>>, DbError> {
        let days: Vec<(Uuid, NaiveDate, &str)> = suspects
            .iter()
            .filter(|(t, _, _)| t.period_type == PeriodType::Daily)
            .map(|(t, _, _)| (t.tenant_id, t.start, t.metric.as_str()))
            .collect();
        let day_truth = repo::fresh_day_totals(conn, &days).await?;
        let month_keys: Vec<CellKey> = suspects
            .iter()
            .filter(|(t, _, _)| t.period_type == PeriodType::Monthly)
            .map(|(t, _, _)| CellKey {
                period_type: PeriodType::Monthly,
                period_start: t.start,
                tenant_id: t.tenant_id,
                metric: t.metric.clone(),
            })
            .collect();
        let queued = usage_changes::queued(conn, &month_keys.iter().collect::<Vec<_>>()).await?;
        let mut month_truth: std::collections::HashMap<CellKey, i128> = Default::default();
        let mut by_tenant: BTreeMap<Uuid, Vec<&CellKey>> = BTreeMap::new();
        for key in month_keys.iter().filter(|k| !queued.contains(*k)) {
            by_tenant.entry(key.tenant_id).or_default().push(key);
        }
        for (tenant, keys) in by_tenant {
            let mut cells = Vec::with_capacity(keys.len());
            for k in &keys {
                let end = PeriodType::Monthly
                    .end_of(k.period_start)
                    .map(crate::domain::period::midnight)
                    .ok_or_else(|| DbError::Decode(format!("no month after {k:?}")))?;
                cells.push((
                    k.metric.as_str(),
                    PeriodType::Monthly,
                    crate::domain::period::midnight(k.period_start),
                    end,
                ));
            }
            let totals = repo::current_totals(conn, TenantId(tenant), &cells).await?;
            month_truth.extend(keys.into_iter().cloned().zip(totals));
        }
        Ok(suspects
            .iter()
            .map(|(t, _, _)| match t.period_type {
                PeriodType::Monthly => month_truth
                    .get(&CellKey {
                        period_type: PeriodType::Monthly,
                        period_start: t.start,
                        tenant_id: t.tenant_id,
                        metric: t.metric.clone(),
                    })
                    .copied(),
                _ => Some(
                    day_truth
                        .get(&(t.tenant_id, t.start, t.metric.clone()))
                        .copied()
                        .unwrap_or(0),
                ),
            })
            .collect())
    }

    /// Per tenant: last aggregation, backlog and the oldest work not yet aggregated.
    pub async fn status(&self, now: DateTime<Utc>) -> Result<StatusReport, AggregationError> {
        let mut conn = self.db.acquire().await?;
        let state = repo::state(&mut conn).await?;
        let tenants = repo::backlog(&mut conn, state.watermark, 1000).await?;
        let lag = repo::lag(&mut conn, state.watermark).await?;
        Ok(StatusReport {
            now,
            state,
            lag,
            tenants,
        })
    }
}

/// Where a run's phase left off.
enum Step {
    /// Nothing left.
    Done,
    /// The deadline came.
    Stopped,
    /// Another run holds the lock.
    Locked,
}

/// The Redis counter that holds a cell's total.
fn counter_cell(total: &repo::CellTotal) -> usage_counters::Cell {
    match total.period_type {
        PeriodType::Monthly => usage_counters::Cell::month(total.start, &total.metric),
        _ => usage_counters::Cell::day(total.start, &total.metric),
    }
}

/// What one chunk's changes did.
struct Applied {
    written: Vec<repo::Written>,
    queued: i64,
}

/// Applies one chunk's changes in its transaction: the actor counts of each day, week and
/// month they touch, then the cells' new values (totals, counts, seq XOR, distinct actors,
/// classification of the latest insert). A cell whose actor set is not complete yet (from
/// before incremental aggregation, or pruned) is queued for a recompute instead, as are all
/// the touched cells of a (tenant, metric) whose stored counts would not add up.
async fn apply(
    tx: &mut sqlx::PgConnection,
    changes: &[Change],
    now: DateTime<Utc>,
    grace_seconds: f64,
) -> Result<Applied, DbError> {
    let mut folded = rollup::fold(changes);
    let keys: Vec<&CellKey> = folded.cells.keys().collect();
    let states = usage_changes::cell_states(tx, &keys).await?;
    let missing: Vec<&CellKey> = keys
        .iter()
        .copied()
        .filter(|k| !states.contains_key(*k))
        .collect();
    let queued_missing = usage_changes::queued(tx, &missing).await?;
    // Cells left to a recompute: untracked, or missing while queued (a recompute will build
    // them from every event, these included).
    let mut skipped: BTreeSet<CellKey> = folded
        .cells
        .keys()
        .filter(|k| match states.get(*k) {
            Some(state) => !state.tracked,
            None => queued_missing.contains(*k),
        })
        .cloned()
        .collect();
    let group = |k: &CellKey| (k.tenant_id, k.metric.clone());

    // The actor counts, and the groups whose stored counts do not add up (then every touched
    // cell of the group is recomputed).
    let mut broken: HashSet<(Uuid, String)> = HashSet::new();
    let (day_changes, period_changes) = loop {
        let live = |k: &CellKey| !skipped.contains(k) && !broken.contains(&group(k));
        let day_deltas: BTreeMap<ActorDay, i64> = folded
            .actor_days
            .iter()
            .filter(|(k, _)| live(&rollup::day_cell(k)))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let day_keys: Vec<&ActorDay> = day_deltas.keys().collect();
        let stored = usage_changes::actor_day_counts(tx, &day_keys).await?;
        let (day_changes, bad_days) = rollup::apply_counts(&day_deltas, &stored);
        let period_deltas: BTreeMap<ActorPeriod, i64> = rollup::period_deltas(&day_changes)
            .into_iter()
            .filter(|(k, _)| live(&rollup::period_cell(k)))
            .collect();
        let period_keys: Vec<&ActorPeriod> = period_deltas.keys().collect();
        let stored = usage_changes::actor_period_counts(tx, &period_keys).await?;
        let (period_changes, bad_periods) = rollup::apply_counts(&period_deltas, &stored);
        let before = broken.len();
        broken.extend(bad_days.iter().map(|k| (k.0, k.1.clone())));
        broken.extend(bad_periods.iter().map(|k| (k.0, k.1.clone())));
        if broken.len() == before {
            break (day_changes, period_changes);
        }
    };
    for change in &day_changes {
        if let Some(cell) = folded.cells.get_mut(&rollup::day_cell(&change.key)) {
            cell.distinct += change.presence();
        }
    }
    for change in &period_changes {
        if let Some(cell) = folded.cells.get_mut(&rollup::period_cell(&change.key)) {
            cell.distinct += change.presence();
        }
    }

    // The cells' new values; a value below zero breaks its group too.
    let mut writes = Vec::new();
    for (key, delta) in &folded.cells {
        if skipped.contains(key) || broken.contains(&group(key)) || delta.is_empty() {
            continue;
        }
        let state = states.get(key);
        let write = usage_changes::CellWrite {
            key: key.clone(),
            classification: delta
                .latest
                .map(|packed| class_name(packed).to_owned())
                .or_else(|| state.map(|s| s.classification.clone())),
            total: state.map_or(0, |s| s.total) + delta.quantity,
            events: state.map_or(0, |s| s.events) + delta.events,
            distinct: state.map_or(0, |s| s.distinct) + delta.distinct,
            seq_xor: state.map_or(0, |s| s.seq_xor) ^ delta.seq_xor,
        };
        if write.total < 0 || write.events < 0 || write.distinct < 0 {
            broken.insert(group(key));
            continue;
        }
        if state.is_none() && write.events == 0 {
            continue; // a new cell whose changes cancel out: nothing to create
        }
        writes.push(write);
    }
    if !broken.is_empty() {
        metrics::counter!("AggregationCellsInconsistent").increment(broken.len() as u64);
        tracing::error!(
            groups = broken.len(),
            "stored rollups do not add up; recomputing them"
        );
    }
    let live = |k: &CellKey| !broken.contains(&group(k));
    writes.retain(|w| live(&w.key));
    let day_changes: Vec<_> = day_changes
        .into_iter()
        .filter(|c| live(&rollup::day_cell(&c.key)))
        .collect();
    let period_changes: Vec<_> = period_changes
        .into_iter()
        .filter(|c| live(&rollup::period_cell(&c.key)))
        .collect();
    skipped.extend(
        folded
            .cells
            .keys()
            .filter(|k| broken.contains(&group(k)))
            .cloned(),
    );

    usage_changes::write_actor_days(tx, &day_changes).await?;
    usage_changes::write_actor_periods(tx, &period_changes).await?;
    let written = usage_changes::write_cells(tx, &writes, now, grace_seconds).await?;
    let to_queue: Vec<&CellKey> = skipped.iter().collect();
    let queued = usage_changes::enqueue(tx, &to_queue).await?;
    Ok(Applied { written, queued })
}

/// The classification packed in a change's `latest` (`seq * 4 + code`).
fn class_name(packed: i64) -> &'static str {
    match packed.rem_euclid(4) {
        0 => "BILLABLE",
        1 => "NON_BILLABLE",
        _ => "INFO",
    }
}

/// (tenant, metric) of the cells of one period.
type CellKeys = Vec<(Uuid, String)>;

type ObserveFuture<'r> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Vec<usage_counters::Observed>, RedisError>>
            + Send
            + 'r,
    >,
>;
type RepairFuture<'r> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<bool>, RedisError>> + Send + 'r>>;

impl RunReport {
    /// A run can finish "done" with an empty queue while the watermark stands still: committed
    /// events wait behind the oldest transaction on the server. Past `warn_seconds`, the log
    /// names that transaction's session (the runbook's first step).
    fn warn_of_lag(&self, warn_seconds: u64) {
        if self.lag.lag_seconds < warn_seconds as f64 {
            return;
        }
        let holder = self.lag.oldest_transaction.as_ref();
        tracing::warn!(
            lag_seconds = self.lag.lag_seconds,
            uncollected_events = self.lag.uncollected_events,
            holder_pid = holder.map(|h| h.pid),
            holder_database = holder.and_then(|h| h.database.as_deref()),
            holder_application = holder.and_then(|h| h.application_name.as_deref()),
            holder_state = holder.and_then(|h| h.state.as_deref()),
            holder_age_seconds = holder.and_then(|h| h.age_seconds),
            "the aggregation watermark is held back by the oldest transaction on the server"
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum RepairError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl RunReport {
    /// The metrics of a committed run (the staleness alarm watches `AggregationRunsCommitted`,
    /// the lag alarms `AggregationWatermarkLagSeconds` and `AggregationUncollectedEvents`).
    pub fn emit_metrics(&self) {
        metrics::counter!("AggregationRunsCommitted").increment(1);
        metrics::gauge!("AggregationWatermarkLagSeconds").set(self.lag.lag_seconds);
        metrics::gauge!("AggregationUncollectedEvents").set(self.lag.uncollected_events as f64);
        metrics::counter!("AggregationChangesApplied").increment(self.collected.changes);
        metrics::counter!("AggregationCellsChanged").increment(self.collected.cells_changed);
        metrics::counter!("AggregationCellsExamined").increment(self.cells_examined);
        metrics::counter!("AggregationCellsWritten").increment(self.cells_written);
        metrics::counter!("AggregationRevisions").increment(self.revisions);
        metrics::counter!("UsageThresholdsCrossedLate").increment(self.thresholds_crossed_late);
        metrics::gauge!("AggregationQueuedCells").set(self.queued_after as f64);
        if let Some(c) = &self.counters {
            metrics::counter!("CounterDriftFound").increment(c.drift_found);
            metrics::counter!("CounterDriftRepaired").increment(c.repaired);
            metrics::counter!("CounterRepairRaced").increment(c.raced);
        }
    }
}
