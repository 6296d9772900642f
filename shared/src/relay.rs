//! The outbox relay: claims due outbox rows, publishes them to EventBridge with `PutEvents`, and
//! marks each by what EventBridge said of it.
//!
//! - A claim is a short committed transaction (`repo::outbox::claim_due`): no row lock is held
//!   while EventBridge is called; the rows are PROCESSING under a fresh token until a lease
//!   longer than the Lambda timeout runs out, and every later mark names that token, so a relay
//!   whose lease was taken over changes nothing.
//! - Entries go out ≤ 10 per call and under the request size limit; an entry that can never fit,
//!   or whose DetailType is too long, is DEAD before it is sent.
//! - `PutEvents` answers 200 even when entries failed: results are read entry by entry. Success →
//!   PUBLISHED; throttling or an internal failure (or a whole call that failed or timed out) →
//!   FAILED, retried after a capped exponential backoff with full jitter; any other code → DEAD
//!   at once; the last allowed attempt failing → DEAD.
//! - One aggregate's events go out in sequence: the claim takes an event only when every earlier
//!   event of its aggregate is published, so a DEAD event holds the ones after it until it is
//!   redriven or skipped.
//! - Delivery is at least once: a relay that dies after `PutEvents` and before marking leaves
//!   its rows to be published again after the lease. Consumers deduplicate on `eventId`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_eventbridge::types::{PutEventsRequestEntry, PutEventsResultEntry};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use uuid::Uuid;

use crate::db::{Database, DbError};
use crate::repo::idempotency;
use crate::repo::outbox::{self, Claimed};

/// PutEvents takes at most this many entries per call.
pub const MAX_ENTRIES_PER_CALL: usize = 10;
/// EventBridge refuses a DetailType longer than this.
pub const MAX_DETAIL_TYPE_CHARS: usize = 128;

/// Per-entry codes worth retrying; every other code is final.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "InternalFailure",
    "InternalException",
    "ServiceUnavailable",
];

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub event_bus_name: String,
    /// The `Source` of payment events.
    pub source: String,
    /// The `Source` of usage events (`usage.*`: final periods, revisions, threshold crossings).
    pub usage_source: String,
    /// The PutEvents request size limit (256 KiB unless the bus allows more).
    pub max_request_bytes: usize,
    /// Rows per claim.
    pub batch_size: i64,
    /// Claims in flight at once.
    pub workers: usize,
    /// How long a claim holds its rows; longer than the Lambda timeout.
    pub lease: Duration,
    /// The attempt that fails at this count makes the row DEAD.
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// No new claim is taken when the deadline is closer than this.
    pub deadline_margin: Duration,
    /// PUBLISHED rows older than this are deleted.
    pub retention: chrono::Duration,
    /// Stored responses to an `Idempotency-Key` older than this are deleted.
    pub idempotency_retention: chrono::Duration,
    /// Rows deleted per statement, and statements per run (each for outbox rows and for
    /// idempotency records).
    pub retention_batch: i64,
    pub retention_batches_per_run: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            event_bus_name: "default".into(),
            source: "meterbridge.payments".into(),
            usage_source: "meterbridge.usage".into(),
            max_request_bytes: 256 * 1024,
            batch_size: 100,
            workers: 4,
            lease: Duration::from_secs(120),
            max_attempts: 10,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(900),
            deadline_margin: Duration::from_secs(10),
            retention: chrono::Duration::days(7),
            idempotency_retention: chrono::Duration::days(30),
            retention_batch: 1000,
            retention_batches_per_run: 10,
        }
    }
}

impl RelayConfig {
    /// The relay's settings from the environment: `EVENT_BUS_NAME` (required), `EVENT_SOURCE`,
    /// `USAGE_EVENT_SOURCE`,
    /// `RELAY_BATCH_SIZE`, `RELAY_WORKERS`, `RELAY_LEASE_SECONDS`, `RELAY_MAX_ATTEMPTS`,
    /// `RELAY_BACKOFF_BASE_MS`, `RELAY_BACKOFF_CAP_SECONDS`, `RELAY_DEADLINE_MARGIN_MS`,
    /// `RELAY_MAX_REQUEST_BYTES`, `OUTBOX_RETENTION_DAYS`, `IDEMPOTENCY_RETENTION_DAYS`.
    pub fn from<F: Fn(&str) -> Option<String>>(
        env: &crate::config::Env<F>,
    ) -> Result<Self, crate::config::ConfigError> {
        let d = RelayConfig::default();
        let source = |name: &'static str, default: String| {
            let source = env.optional(name).unwrap_or(default);
            if source.is_empty() || source.len() > 256 || source.starts_with("aws.") {
                return Err(crate::config::ConfigError::Invalid {
                    name,
                    reason: "1-256 characters, not starting with aws.".into(),
                });
            }
            Ok(source)
        };
        Ok(RelayConfig {
            event_bus_name: env.required("EVENT_BUS_NAME")?,
            source: source("EVENT_SOURCE", d.source)?,
            usage_source: source("USAGE_EVENT_SOURCE", d.usage_source)?,
            max_request_bytes: env.bounded_or(
                "RELAY_MAX_REQUEST_BYTES",
                d.max_request_bytes as u64,
                1024..=1_048_576,
            )? as usize,
            batch_size: env.bounded_or("RELAY_BATCH_SIZE", d.batch_size as u64, 1..=1000)? as i64,
            workers: env.bounded_or("RELAY_WORKERS", d.workers as u64, 1..=32)? as usize,
            lease: Duration::from_secs(env.bounded_or(
                "RELAY_LEASE_SECONDS",
                d.lease.as_secs(),
                1..=3600,
            )?),
            max_attempts: env.bounded_or("RELAY_MAX_ATTEMPTS", d.max_attempts as u64, 1..=100)?
                as i32,
            backoff_base: env.millis_or(
                "RELAY_BACKOFF_BASE_MS",
                d.backoff_base.as_millis() as u64,
                1..=600_000,
            )?,
            backoff_cap: Duration::from_secs(env.bounded_or(
                "RELAY_BACKOFF_CAP_SECONDS",
                d.backoff_cap.as_secs(),
                1..=86_400,
            )?),
            deadline_margin: env.millis_or(
                "RELAY_DEADLINE_MARGIN_MS",
                d.deadline_margin.as_millis() as u64,
                0..=600_000,
            )?,
            retention: chrono::Duration::days(env.bounded_or(
                "OUTBOX_RETENTION_DAYS",
                d.retention.num_days() as u64,
                1..=3650,
            )? as i64),
            idempotency_retention: chrono::Duration::days(env.bounded_or(
                "IDEMPOTENCY_RETENTION_DAYS",
                d.idempotency_retention.num_days() as u64,
                1..=3650,
            )? as i64),
            retention_batch: d.retention_batch,
            retention_batches_per_run: d.retention_batches_per_run,
        })
    }
}

/// What a run's retention step deletes, in batches: published outbox rows, then stored
/// idempotent responses.
#[derive(Debug, Clone, Copy)]
enum Retired {
    Outbox,
    Idempotency,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Database(#[from] DbError),
}

/// What a run did (also emitted as EMF metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    pub claimed: u64,
    pub published: u64,
    /// Retried rows by error code.
    pub retried: BTreeMap<String, u64>,
    pub dead: u64,
    /// Rows taken over from a relay whose lease ran out.
    pub leases_reclaimed: u64,
    /// Marks that found their claim taken over (the row is another relay's now).
    pub lost_claims: u64,
    pub deleted: u64,
    /// Stored idempotent responses deleted past their retention.
    pub idempotency_expired: u64,
    /// Rows not yet final after the run, and the age of the oldest.
    pub pending: i64,
    pub oldest_pending_age_seconds: f64,
    /// The run stopped claiming because the deadline was near.
    pub stopped_for_deadline: bool,
}

impl RunReport {
    fn add(&mut self, other: RunReport) {
        self.claimed += other.claimed;
        self.published += other.published;
        for (code, n) in other.retried {
            *self.retried.entry(code).or_default() += n;
        }
        self.dead += other.dead;
        self.leases_reclaimed += other.leases_reclaimed;
        self.lost_claims += other.lost_claims;
        self.stopped_for_deadline |= other.stopped_for_deadline;
    }

    /// Emits the report as CloudWatch EMF metrics.
    pub fn emit_metrics(&self) {
        metrics::counter!("OutboxPublished").increment(self.published);
        metrics::counter!("OutboxDead").increment(self.dead);
        metrics::counter!("OutboxLeasesReclaimed").increment(self.leases_reclaimed);
        metrics::counter!("OutboxDeleted").increment(self.deleted);
        metrics::counter!("IdempotencyRecordsExpired").increment(self.idempotency_expired);
        for (code, n) in &self.retried {
            metrics::counter!("OutboxRetried", "ErrorCode" => code.clone()).increment(*n);
        }
        metrics::gauge!("OutboxPending").set(self.pending as f64);
        metrics::gauge!("OutboxOldestPendingAgeSeconds").set(self.oldest_pending_age_seconds);
    }
}

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    Published,
    Retry { code: String, message: String },
    Dead(String),
}

pub struct Relay {
    db: Database,
    events: aws_sdk_eventbridge::Client,
    config: RelayConfig,
}

impl Relay {
    pub fn new(db: Database, events: aws_sdk_eventbridge::Client, config: RelayConfig) -> Self {
        Relay { db, events, config }
    }

    /// An EventBridge client for the relay: no SDK retries (the relay's backoff decides, and a
    /// call never outlives the lease) and a bounded time per call.
    pub fn eventbridge_client(
        sdk: &aws_config::SdkConfig,
        call_timeout: Duration,
    ) -> aws_sdk_eventbridge::Client {
        let config = aws_sdk_eventbridge::config::Builder::from(sdk)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_timeout(call_timeout)
                    .build(),
            )
            .build();
        aws_sdk_eventbridge::Client::from_conf(config)
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// One run: claims and publishes until nothing is due or `deadline` is near, with
    /// `workers` claims in flight; then deletes published rows past their retention and
    /// measures the backlog.
    pub async fn run(&self, deadline: Instant) -> Result<RunReport, RelayError> {
        let started = Utc::now();
        let workers = (0..self.config.workers.max(1)).map(|_| self.work(deadline, started));
        let mut report = RunReport::default();
        for outcome in futures::future::join_all(workers).await {
            report.add(outcome?);
        }
        let mut conn = self.db.acquire().await?;
        let now = Utc::now();
        let batch = self.config.retention_batch;
        for retired in [Retired::Outbox, Retired::Idempotency] {
            for _ in 0..self.config.retention_batches_per_run {
                if self.near(deadline) {
                    break;
                }
                let deleted = match retired {
                    Retired::Outbox => {
                        let cutoff = now - self.config.retention;
                        let n = outbox::delete_published(&mut conn, cutoff, batch).await?;
                        report.deleted += n;
                        n
                    }
                    Retired::Idempotency => {
                        let cutoff = now - self.config.idempotency_retention;
                        let n = idempotency::expire(&mut conn, cutoff, batch).await?;
                        report.idempotency_expired += n;
                        n
                    }
                };
                if deleted < batch as u64 {
                    break;
                }
            }
        }
        let (pending, oldest) = outbox::backlog(&mut conn).await?;
        report.pending = pending;
        report.oldest_pending_age_seconds = oldest;
        Ok(report)
    }

    fn near(&self, deadline: Instant) -> bool {
        Instant::now() + self.config.deadline_margin >= deadline
    }

    async fn work(
        &self,
        deadline: Instant,
        started: DateTime<Utc>,
    ) -> Result<RunReport, RelayError> {
        let mut report = RunReport::default();
        loop {
            if self.near(deadline) {
                report.stopped_for_deadline = true;
                return Ok(report);
            }
            let token = Uuid::new_v4();
            let claimed = {
                let mut conn = self.db.acquire().await?;
                outbox::claim_due(
                    &mut conn,
                    token,
                    self.config.lease.as_secs_f64(),
                    self.config.batch_size,
                    started,
                )
                .await?
            };
            if claimed.is_empty() {
                return Ok(report);
            }
            report.claimed += claimed.len() as u64;
            report.leases_reclaimed += claimed
                .iter()
                .filter(|c| c.previous_status == "PROCESSING")
                .count() as u64;
            let fates = self.publish(&claimed).await;
            let mut conn = self.db.acquire().await?;
            report.add(self.mark(&mut conn, token, &claimed, &fates).await?);
        }
    }

    /// Publishes claimed rows; one fate per row, by index.
    async fn publish(&self, rows: &[Claimed]) -> Vec<Fate> {
        let mut fates: Vec<Option<Fate>> = vec![None; rows.len()];
        let mut sendable = Vec::new();
        for (index, row) in rows.iter().enumerate() {
            match self.entry(row) {
                Ok((entry, size)) => sendable.push((index, entry, size)),
                Err(reason) => fates[index] = Some(Fate::Dead(reason)),
            }
        }
        let calls: Vec<Vec<(usize, PutEventsRequestEntry)>> =
            chunk(sendable, self.config.max_request_bytes);
        let results = futures::future::join_all(calls.into_iter().map(|call| async move {
            let indexes: Vec<usize> = call.iter().map(|(i, _)| *i).collect();
            let entries: Vec<PutEventsRequestEntry> = call.into_iter().map(|(_, e)| e).collect();
            (indexes, self.put_events(entries).await)
        }))
        .await;
        for (indexes, outcome) in results {
            for (index, fate) in indexes.into_iter().zip(outcome) {
                fates[index] = Some(fate);
            }
        }
        fates
            .into_iter()
            .map(|f| f.unwrap_or_else(|| Fate::Dead("no result for this entry".into())))
            .collect()
    }

    /// The entry for a row, and its size as EventBridge counts it; `Err` when it can never be
    /// sent.
    fn entry(&self, row: &Claimed) -> Result<(PutEventsRequestEntry, usize), String> {
        let detail = row.payload.to_string();
        let source = if row.event_type.starts_with("usage.") {
            &self.config.usage_source
        } else {
            &self.config.source
        };
        let size = sendable(
            source,
            &row.event_type,
            &detail,
            self.config.max_request_bytes,
        )?;
        let entry = PutEventsRequestEntry::builder()
            .event_bus_name(&self.config.event_bus_name)
            .source(source)
            .detail_type(&row.event_type)
            .detail(detail)
            .time(aws_sdk_eventbridge::primitives::DateTime::from_millis(
                row.created_at.timestamp_millis(),
            ))
            .set_trace_header(row.trace_header.clone())
            .build();
        Ok((entry, size))
    }

    /// One PutEvents call; one fate per entry, in order.
    async fn put_events(&self, entries: Vec<PutEventsRequestEntry>) -> Vec<Fate> {
        let count = entries.len();
        match self
            .events
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => {
                let results = output.entries();
                (0..count)
                    .map(|i| match results.get(i) {
                        Some(result) => fate_of(result),
                        None => Fate::Retry {
                            code: "MissingResult".into(),
                            message: "PutEvents returned fewer results than entries".into(),
                        },
                    })
                    .collect()
            }
            Err(error) => {
                // The whole call failed (an outage, a timeout, throttling, or a permission or
                // configuration error that an operator must fix): every entry is retried
                // later, and goes DEAD only when its attempts run out.
                let code = error
                    .as_service_error()
                    .and_then(|e| aws_sdk_eventbridge::error::ProvideErrorMetadata::code(e))
                    .map(str::to_owned)
                    .unwrap_or_else(|| call_failure_code(&error).to_owned());
                let message = aws_sdk_eventbridge::error::DisplayErrorContext(&error).to_string();
                tracing::warn!(code, error = %message, entries = count, "PutEvents failed");
                vec![
                    Fate::Retry {
                        code,
                        message: message.chars().take(500).collect(),
                    };
                    count
                ]
            }
        }
    }

    /// Marks every claimed row by its fate, each mark guarded by the claim token.
    async fn mark(
        &self,
        conn: &mut sqlx::PgConnection,
        token: Uuid,
        rows: &[Claimed],
        fates: &[Fate],
    ) -> Result<RunReport, DbError> {
        let mut report = RunReport::default();
        let mut published = Vec::new();
        let (mut failed, mut failed_at, mut failed_errors) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dead, mut dead_errors) = (Vec::new(), Vec::new());
        let now = Utc::now();
        for (row, fate) in rows.iter().zip(fates) {
            match fate {
                Fate::Published => published.push(row.id),
                Fate::Retry { code, message } if row.attempts < self.config.max_attempts => {
                    *report.retried.entry(code.clone()).or_default() += 1;
                    failed.push(row.id);
                    failed_at.push(now + self.backoff(row.attempts));
                    failed_errors.push(format!("{code}: {message}"));
                }
                Fate::Retry { code, message } => {
                    dead.push(row.id);
                    dead_errors.push(format!(
                        "gave up after {} attempts; last: {code}: {message}",
                        row.attempts
                    ));
                }
                Fate::Dead(reason) => {
                    dead.push(row.id);
                    dead_errors.push(reason.clone());
                }
            }
        }
        let mut marked = 0;
        if !published.is_empty() {
            marked += outbox::mark_published(conn, token, &published).await?;
        }
        if !failed.is_empty() {
            marked +=
                outbox::mark_unpublished(conn, token, false, &failed, &failed_at, &failed_errors)
                    .await?;
        }
        if !dead.is_empty() {
            let never = vec![now; dead.len()];
            marked +=
                outbox::mark_unpublished(conn, token, true, &dead, &never, &dead_errors).await?;
            tracing::error!(count = dead.len(), errors = ?dead_errors, "outbox events are DEAD");
        }
        report.published = published.len() as u64;
        report.dead = dead.len() as u64;
        report.lost_claims = rows.len() as u64 - marked;
        if report.lost_claims > 0 {
            tracing::warn!(
                lost = report.lost_claims,
                "claims were taken over after their lease ran out; their marks were dropped"
            );
        }
        Ok(report)
    }

    /// Capped exponential backoff with full jitter: anywhere in [0, min(cap, base·2^(n-1))].
    fn backoff(&self, attempts: i32) -> chrono::Duration {
        let exponent = attempts.clamp(1, 30) as u32 - 1;
        let ceiling = self
            .config
            .backoff_base
            .saturating_mul(1u32 << exponent.min(20))
            .min(self.config.backoff_cap);
        let millis = rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64);
        chrono::Duration::milliseconds(millis as i64)
    }

    /// The fast path: publishes one event right after the transaction that wrote it (claimed by
    /// id on the same terms as the relay, in `tenant`'s transaction). Any failure gives the row
    /// back, due at once, for the relay; the caller's request never fails for it.
    pub async fn publish_now(
        &self,
        tenant: crate::domain::TenantId,
        event_id: Uuid,
    ) -> Result<bool, DbError> {
        let token = Uuid::new_v4();
        let claimed = {
            let mut tx = self.db.tenant_tx(tenant).await?;
            let claimed =
                outbox::claim_one(&mut tx, event_id, token, self.config.lease.as_secs_f64())
                    .await?;
            tx.commit().await?;
            claimed
        };
        let Some(row) = claimed else {
            return Ok(false);
        };
        let fates = self.publish(std::slice::from_ref(&row)).await;
        let mut tx = self.db.tenant_tx(tenant).await?;
        let published = if fates.first() == Some(&Fate::Published) {
            outbox::mark_published(&mut tx, token, &[row.id]).await? == 1
        } else {
            outbox::release(&mut tx, token, &[row.id]).await?;
            false
        };
        tx.commit().await?;
        Ok(published)
    }
}

fn fate_of(result: &PutEventsResultEntry) -> Fate {
    match result.error_code() {
        None if result.event_id().is_some() => Fate::Published,
        None => Fate::Retry {
            code: "MissingEventId".into(),
            message: "PutEvents returned neither an event id nor an error".into(),
        },
        Some(code) => {
            let message = result.error_message().unwrap_or_default().to_owned();
            if RETRYABLE_CODES.contains(&code) {
                Fate::Retry {
                    code: code.to_owned(),
                    message,
                }
            } else {
                Fate::Dead(format!("{code}: {message}"))
            }
        }
    }
}

fn call_failure_code<E>(error: &aws_sdk_eventbridge::error::SdkError<E>) -> &'static str {
    use aws_sdk_eventbridge::error::SdkError;
    match error {
        SdkError::TimeoutError(_) => "Timeout",
        SdkError::DispatchFailure(_) => "DispatchFailure",
        SdkError::ResponseError(_) => "ResponseError",
        SdkError::ServiceError(_) => "ServiceError",
        _ => "CallFailed",
    }
}

/// An entry's size, or why it can never be sent: a DetailType over 128 characters, or an entry
/// larger than a whole request may be.
pub fn sendable(
    source: &str,
    detail_type: &str,
    detail: &str,
    max_request_bytes: usize,
) -> Result<usize, String> {
    if detail_type.chars().count() > MAX_DETAIL_TYPE_CHARS {
        return Err(format!(
            "DetailType {:?}… is longer than {MAX_DETAIL_TYPE_CHARS} characters",
            detail_type.chars().take(40).collect::<String>()
        ));
    }
    let size = entry_size(source, detail_type, detail);
    if size > max_request_bytes {
        return Err(format!(
            "the entry is {size} bytes; a PutEvents request may carry at most {max_request_bytes}"
        ));
    }
    Ok(size)
}

/// An entry's size as EventBridge counts it against the request limit: the UTF-8 bytes of
/// Source, DetailType and Detail, and 14 for the Time.
pub fn entry_size(source: &str, detail_type: &str, detail: &str) -> usize {
    source.len() + detail_type.len() + detail.len() + 14
}

/// Groups entries into calls of at most [`MAX_ENTRIES_PER_CALL`] entries and `max_bytes`.
fn chunk<T>(entries: Vec<(usize, T, usize)>, max_bytes: usize) -> Vec<Vec<(usize, T)>> {
    let mut calls: Vec<Vec<(usize, T)>> = Vec::new();
    let mut current: Vec<(usize, T)> = Vec::new();
    let mut bytes = 0;
    for (index, entry, size) in entries {
        if !current.is_empty()
            && (current.len() == MAX_ENTRIES_PER_CALL || bytes + size > max_bytes)
        {
            calls.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push((index, entry));
    }
    if !current.is_empty() {
        calls.push(current);
    }
    calls
}

/// When a relay run must stop, from a Lambda invocation's deadline (milliseconds since the
/// epoch). The local emulator (`cargo lambda watch`) sends the function's timeout instead of a
/// point in time; a value too small to be a date after 2001 is read that way.
pub fn deadline_from_epoch_millis(deadline_ms: u64) -> Instant {
    const EPOCH_2001_MS: u64 = 1_000_000_000_000;
    if deadline_ms < EPOCH_2001_MS {
        return Instant::now() + Duration::from_millis(deadline_ms.min(900_000));
    }
    let now_ms = Utc::now().timestamp_millis().max(0) as u64;
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// The age of an instant, for reports.
pub fn age_seconds(at: DateTime<Utc>) -> f64 {
    (Utc::now() - at).num_milliseconds() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_hold_at_most_ten_entries_and_the_size_limit() {
        let entries: Vec<(usize, char, usize)> = (0..25).map(|i| (i, 'e', 100)).collect();
        let calls = chunk(entries, 10_000);
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
        let entries: Vec<(usize, char, usize)> = (0..5).map(|i| (i, 'e', 400)).collect();
        let calls = chunk(entries, 1000);
        assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        let order: Vec<usize> = calls.into_iter().flatten().map(|(i, _)| i).collect();
        assert_eq!(order, [0, 1, 2, 3, 4], "entries keep their order");
        assert_eq!(entry_size("src", "type", "{}"), 3 + 4 + 2 + 14);
    }

    #[test]
    fn entries_that_can_never_be_sent_are_named() {
        assert_eq!(sendable("s", "t", "{}", 100), Ok(1 + 1 + 2 + 14));
        let long = "x".repeat(129);
        assert!(sendable("s", &long, "{}", 100)
            .unwrap_err()
            .contains("longer than 128"));
        assert!(sendable("s", &"x".repeat(128), "{}", 1000).is_ok());
        let big = "y".repeat(300);
        assert!(sendable("s", "t", &big, 256)
            .unwrap_err()
            .contains("at most 256"));
    }

    #[test]
    fn entry_results_decide_the_fate() {
        let ok = PutEventsResultEntry::builder().event_id("e-1").build();
        assert_eq!(fate_of(&ok), Fate::Published);
        for code in RETRYABLE_CODES {
            let r = PutEventsResultEntry::builder().error_code(*code).build();
            assert!(matches!(fate_of(&r), Fate::Retry { .. }), "{code}");
        }
        for code in [
            "InvalidArgument",
            "MalformedDetail",
            "AccessDeniedException",
            "NotAuthorized",
        ] {
            let r = PutEventsResultEntry::builder()
                .error_code(code)
                .error_message("no")
                .build();
            assert!(matches!(fate_of(&r), Fate::Dead(_)), "{code}");
        }
    }

    const EPOCH_MS_2020: u64 = 1_577_836_800_000;

    #[test]
    fn deadlines_come_from_the_invocation() {
        let soon = Utc::now().timestamp_millis() as u64 + 30_000;
        let d = deadline_from_epoch_millis(soon);
        let left = d.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
        let past = deadline_from_epoch_millis(EPOCH_MS_2020);
        assert!(past <= Instant::now());
        // The local emulator's "deadline" is the timeout itself.
        let emulated = deadline_from_epoch_millis(600_000);
        let left = emulated.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(599) && left <= Duration::from_secs(600));
    }
}
