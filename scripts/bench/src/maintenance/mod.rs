//! The scheduled work over simulated time (`BENCH_WORKLOADS=maintenance`): `BENCH_SIM_DAYS`
//! (40) days of traffic from a fixed instant (`BENCH_SIM_START`, 2027-01-04T00:00:00Z; never
//! the wall clock), `BENCH_SIM_EVENTS_PER_DAY` (1,000,000) events a day at a steady rate,
//! ingested through the real handler, with the scheduled jobs run on the simulated clock:
//!
//! - **ingestion**: `ingest_usage::handle` as the growth workload drives it, each of
//!   `BENCH_SIM_CALLERS` (4) callers its own `App` (container), batches of `BENCH_SIM_BATCH`
//!   (500) of one of `BENCH_SIM_TENANTS` (10) tenants, ten metrics, 500 actors a tenant, random
//!   (UUIDv4) event and correlation ids, and every fourth event an idempotency key (1.25
//!   remembered dedup keys an event). The handler's clock ([`Services::with_clock`]) is the
//!   simulated one; each 10-minute step's events occur evenly over it (up to 2 s earlier than
//!   their place, a jitter), and are sent at its end, without waiting for wall-clock time;
//! - **storage maintenance** every `BENCH_SIM_MAINTENANCE_MINUTES` (60: the template's
//!   `StorageMaintenanceMinutes`) simulated minutes, as the admin function's `usage.maintain`
//!   runs it: [`usage_storage::maintain`] in one transaction, then the BRIN summaries
//!   ([`usage_storage::summarize`], timed with it), then the key compaction as the
//!   function calls it (see [`compact`]), with [`StoragePolicy::default`], as the owner
//!   with the admin function's connection settings (statement timeout 10 s, lock timeout 2 s);
//!   a failed maintenance skips that run's compaction, as the function's `?` does;
//! - **aggregation** every 10 simulated minutes, as `aggregate-usage` runs it:
//!   [`Aggregator::aggregate`] as `meterbridge_ops`, with Redis (so with the counters' repair),
//!   the function's configuration (a 20 s deadline margin) and a 300 s deadline.
//!
//! Ingestion and the jobs take turns (they never overlap), so each is timed alone, by the wall
//! clock ([`Instant`]). Before the first event the empty database's key generation is made to
//! open at the simulated start, as if deployed then. The run prints per simulated day the
//! ingestion rate (also over the steps no autovacuum overlapped, and the CPU time an event took,
//! see [`Cpu`]: the ratio to the empty database by CPU time is the one a busy machine leaves
//! readable; and the same ratio against an empty database ingested beside it in the same
//! minutes, see [`beside`], which a machine whose speed drifts within the run leaves
//! readable too), the insert statement's server
//! time and buffers a call (where the server loads `pg_stat_statements`, see [`InsertCost`]),
//! and each job's median and maximum run time, then the ratios and the
//! write amplification of the dedup keys (see [`KeyBytes`]), each with its goal. It checks the
//! free disk space of the PostgreSQL data directory first (about 1 KB an event, and 10 GB to
//! spare), runs in a database of its own (`meterbridge_sim`), and drops it at the end unless
//! `BENCH_SIM_KEEP=1`. `BENCH_MIGRATIONS=N` runs the schema as of migration N;
//! `BENCH_SIM_MAX_MINUTES` stops it at the end of the first simulated day past that much wall
//! clock. Autovacuum is on for the run, as in production (see [`set_autovacuum`]); the server's
//! `shared_buffers` is printed (production-like figures need a production-like cache).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use ingest_usage::{App, IngestConfig};
use meterbridge::aggregation::{AggregationConfig, Aggregator};
use meterbridge::clock::Clock;
use meterbridge::config::{Config, Env};
use meterbridge::domain::Trust;
use meterbridge::repo::usage_storage::{self, StorageAction, StoragePolicy};
use meterbridge::testing::{create_api_key, create_tenant, database_url_as, INGEST_ROLE, OPS_ROLE};
use meterbridge::Services;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::aggregate::{delete_counters, env_usize, METRICS};

mod beside;

const DATABASE: &str = "meterbridge_sim";
/// The projected size of the database per event, its keys and indexes included (measured: a
/// simulated day of 1 M events adds 0.95-0.98 GB).
const BYTES_PER_EVENT: u64 = 1024;
/// What must stay free on the data directory's file system beyond the projection.
const SPARE_BYTES: u64 = 10_000_000_000;
/// The aggregation's schedule; the maintenance runs every `BENCH_SIM_MAINTENANCE_MINUTES` (60).
const STEP_MINUTES: i64 = 10;
const STEPS_PER_DAY: usize = 144;
/// The aggregate-usage function's timeout (template.yaml): a run's deadline.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(300);
/// How the compaction is called, as printed.
const COMPACTION: &str = "usage_storage::compact step by step, each step its own transaction, \
     within 240 s (usage_storage::SCHEDULED_STEPS_TIME) of the summaries' start";

struct Settings {
    days: usize,
    per_day: usize,
    callers: usize,
    batch: usize,
    tenants: usize,
    empty_events: usize,
    /// `BENCH_SIM_BESIDE_EVERY`: every this many steps, a step into an empty database beside
    /// (see [`beside`]); 0: none.
    beside_every: usize,
    /// The maintenance schedule, in steps of 10 minutes (the template's
    /// `StorageMaintenanceMinutes`: 60 by default).
    maintenance_steps: usize,
    keep: bool,
    start: DateTime<Utc>,
    /// `BENCH_SIM_MAX_MINUTES`: stop at the end of the first simulated day past this much wall
    /// clock (a design whose jobs grow with the stored data would otherwise take days).
    max_wall: Option<Duration>,
}

impl Settings {
    fn from_env() -> Settings {
        let per_day = env_usize("BENCH_SIM_EVENTS_PER_DAY", 1_000_000).max(STEPS_PER_DAY);
        Settings {
            days: env_usize("BENCH_SIM_DAYS", 40).max(1),
            per_day,
            callers: env_usize("BENCH_SIM_CALLERS", 4).max(1),
            batch: env_usize("BENCH_SIM_BATCH", 500).clamp(1, 1000),
            tenants: env_usize("BENCH_SIM_TENANTS", 10).max(1),
            empty_events: env_usize("BENCH_SIM_EMPTY_EVENTS", 200_000).min(per_day),
            beside_every: env_usize("BENCH_SIM_BESIDE_EVERY", 4),
            maintenance_steps: match env_usize("BENCH_SIM_MAINTENANCE_MINUTES", 60) {
                minutes @ (10 | 20 | 30 | 60) => minutes / STEP_MINUTES as usize,
                other => panic!("BENCH_SIM_MAINTENANCE_MINUTES: 10, 20, 30 or 60, not {other}"),
            },
            keep: std::env::var("BENCH_SIM_KEEP").as_deref() == Ok("1"),
            start: std::env::var("BENCH_SIM_START")
                .ok()
                .map(|v| v.parse().expect("BENCH_SIM_START: an RFC 3339 instant"))
                .unwrap_or_else(|| "2027-01-04T00:00:00Z".parse().unwrap()),
            max_wall: std::env::var("BENCH_SIM_MAX_MINUTES")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|m| Duration::from_secs(m * 60)),
        }
    }
}

/// The simulated clock: its wall time is set by the simulation; its monotonic time stands
/// still, so the handler's caches expire by simulated time, as they would at this traffic.
struct SimClock {
    micros: AtomicI64,
    monotonic: Instant,
}

impl SimClock {
    fn at(at: DateTime<Utc>) -> Arc<SimClock> {
        Arc::new(SimClock {
            micros: AtomicI64::new(at.timestamp_micros()),
            monotonic: Instant::now(),
        })
    }

    fn set(&self, at: DateTime<Utc>) {
        self.micros.store(at.timestamp_micros(), Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn monotonic(&self) -> Instant {
        self.monotonic
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.micros.load(Ordering::SeqCst).max(0) as u64)
    }
}

/// A function's environment, as a lookup.
fn env_of(vars: &[(&str, String)]) -> Env<impl Fn(&str) -> Option<String>> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    Env::from_lookup(move |k| vars.get(k).cloned())
}

/// One wall-clock timing of a job run.
#[derive(Default)]
struct Run {
    millis: f64,
    failed: bool,
    /// A compaction that attached a merged partition (`merged`), or a full compaction
    /// (`compacted`: today's design's daily merge of every closed generation).
    merged: bool,
    full: bool,
    /// A compaction whose deadline came with work left, or an aggregation that did not finish
    /// (`stopped` by its deadline, or `skipped: locked`).
    left_work: bool,
}

#[derive(Default)]
struct Day {
    events: usize,
    ingest: Duration,
    maintenance: Vec<Run>,
    compaction: Vec<Run>,
    aggregation: Vec<Run>,
    key_bytes: i64,
    database_bytes: i64,
    /// The machine's 1-minute load average, summed over the day's steps: other work on the
    /// machine shows here (the simulation itself keeps about 2 busy).
    load: f64,
    /// The ingestion insert's server-side cost over the day (pg_stat_statements), when the
    /// server has the extension loaded.
    insert: Option<InsertCost>,
    /// The events and request time of the steps during which no autovacuum worker was seen
    /// (at the step's start and end): ingestion with the machine to itself.
    quiet_events: usize,
    quiet_ingest: Duration,
    /// The CPU time ingestion took (see [`Cpu`]).
    cpu: Cpu,
    /// The steps paired with a step into the empty database beside (see [`beside`]): the
    /// simulated database's, and the empty copy's.
    paired: Totals,
    beside: Totals,
}

/// Autovacuum workers running now, on any database. The simulation compresses a day into
/// minutes of wall clock, and autovacuum works on the wall clock: a day's vacuums share the
/// two cores with that day's ingestion, several hundred times denser than in a real day.
async fn autovacuum_workers(owner: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE backend_type = 'autovacuum worker' AND state = 'active'",
    )
    .fetch_one(owner)
    .await
    .unwrap_or(0)
}

/// What the ingestion's insert statement (`usage_events::insert`, one per request) cost the
/// server, cumulative: pg_stat_statements's calls, execution time and shared blocks of it.
#[derive(Debug, Default, Clone, Copy)]
struct InsertCost {
    calls: i64,
    millis: f64,
    blocks_hit: i64,
    blocks_read: i64,
}

impl InsertCost {
    /// The statement's totals so far in this database, `None` where pg_stat_statements is not
    /// loaded (`shared_preload_libraries`) or the extension cannot be created.
    async fn read(owner: &PgPool) -> Option<InsertCost> {
        let row: (Option<i64>, Option<f64>, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT sum(calls)::int8, sum(total_exec_time), sum(shared_blks_hit)::int8,
                    sum(shared_blks_read)::int8
               FROM pg_stat_statements
              WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND query LIKE 'WITH input AS%INSERT INTO usage_events%'",
        )
        .fetch_one(owner)
        .await
        .ok()?;
        Some(InsertCost {
            calls: row.0.unwrap_or(0),
            millis: row.1.unwrap_or(0.0),
            blocks_hit: row.2.unwrap_or(0),
            blocks_read: row.3.unwrap_or(0),
        })
    }

    /// What was spent between `before` and `self`.
    fn since(self, before: InsertCost) -> InsertCost {
        InsertCost {
            calls: self.calls - before.calls,
            millis: self.millis - before.millis,
            blocks_hit: self.blocks_hit - before.blocks_hit,
            blocks_read: self.blocks_read - before.blocks_read,
        }
    }

    /// "ms a call / shared blocks a call (of which read)", or "-".
    fn cell(cost: Option<InsertCost>) -> String {
        match cost {
            Some(c) if c.calls > 0 => {
                let per = |v: i64| v as f64 / c.calls as f64;
                format!(
                    "{:.1} / {:.0} ({:.1})",
                    c.millis / c.calls as f64,
                    per(c.blocks_hit + c.blocks_read),
                    per(c.blocks_read)
                )
            }
            _ => "-".to_owned(),
        }
    }
}

/// CPU time spent on ingestion, on-CPU nanoseconds from the kernel's scheduler statistics
/// (`/proc/<pid>/schedstat`, first field): the database backends serving the ingestion role
/// (`database`) and the process running the handler (`handler`, all its threads). Unlike the
/// wall clock, it does not count the time a process waits for a core, so another process on
/// the machine (an autovacuum worker, a kernel thread) moves it little: the work an event
/// costs, whatever else the machine is doing.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    database: Duration,
    handler: Duration,
}

impl Cpu {
    fn add(&mut self, other: Cpu) {
        self.database += other.database;
        self.handler += other.handler;
    }

    /// Microseconds an event: (database, handler).
    fn per_event(self, events: usize) -> (f64, f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / events.max(1) as f64;
        (per(self.database), per(self.handler))
    }

    /// "database + handler" microseconds an event, or "-" where the kernel keeps no
    /// scheduler statistics.
    fn cell(self, events: usize) -> String {
        if self.database.is_zero() && self.handler.is_zero() {
            return "-".to_owned();
        }
        let (database, handler) = self.per_event(events);
        format!("{database:.0} + {handler:.0}")
    }
}

/// On-CPU nanoseconds of one thread or process (`/proc/.../schedstat`).
fn on_cpu(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's on-CPU time, over all its threads (`/proc/self/task/*/schedstat`).
fn handler_cpu() -> u64 {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| on_cpu(&t.path().join("schedstat")))
                .sum()
        })
        .unwrap_or(0)
}

/// The on-CPU time of each backend connected to this database as the ingestion role.
async fn ingestion_backends_cpu(owner: &PgPool) -> HashMap<i32, u64> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
          WHERE datname = current_database() AND usename = $1",
    )
    .bind(INGEST_ROLE)
    .fetch_all(owner)
    .await
    .unwrap_or_default();
    pids.into_iter()
        .filter_map(|pid| Some((pid, on_cpu(format!("/proc/{pid}/schedstat").as_ref())?)))
        .collect()
}

/// Where ingestion's CPU time stands now; [`CpuMark::since`] gives what was spent after.
struct CpuMark {
    backends: HashMap<i32, u64>,
    handler: u64,
}

impl CpuMark {
    async fn now(owner: &PgPool) -> CpuMark {
        CpuMark {
            backends: ingestion_backends_cpu(owner).await,
            handler: handler_cpu(),
        }
    }

    /// The CPU time spent since this mark. A backend that appeared since counts whole (its
    /// connection's start included); one that ended since is lost (the pools keep a
    /// connection for up to 30 minutes of wall clock: rare, an undercount of one step).
    async fn since(&self, owner: &PgPool) -> Cpu {
        let handler = handler_cpu().saturating_sub(self.handler);
        let database = ingestion_backends_cpu(owner)
            .await
            .into_iter()
            .map(|(pid, ns)| ns.saturating_sub(self.backends.get(&pid).copied().unwrap_or(0)))
            .sum();
        Cpu {
            database: Duration::from_nanos(database),
            handler: Duration::from_nanos(handler),
        }
    }
}

/// The 1-minute load average (`/proc/loadavg`), 0 where there is none.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn summary(runs: &[Run]) -> (f64, f64) {
    let mut ms: Vec<f64> = runs.iter().map(|r| r.millis).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return (0.0, 0.0);
    }
    (ms[ms.len() / 2], ms[ms.len() - 1])
}

/// The bytes written into the dedup keys' partitions, measured as each partition is complete:
/// the size of every partition of `usage_event_keys` with its indexes
/// (`pg_total_relation_size`) and its rows (`count(*)`), taken once it takes no more writes —
/// an open generation's when the maintenance has closed it, any other (a merge, a compaction)
/// when it first appears, attached by the compaction that built it — and the Bloom filter rows
/// each maintenance or compaction wrote (rows of `usage_key_filter*` tables whose `xmin` is the
/// job's: their tuple bytes, a 4-byte line pointer and a 20-byte index entry per index).
#[derive(Default)]
struct KeyBytes {
    parts: HashMap<i64, Part>,
    filter_bytes: i64,
    filter_rows: i64,
    /// The partitions the compaction said it built (`merged`, `compacted`): one created and
    /// dropped within a single call is never seen, and is reported as unmeasured.
    built: Vec<String>,
}

struct Part {
    name: String,
    /// Written by ingestion (it was the open generation's partition).
    ingested: bool,
    complete: bool,
    bytes: i64,
    rows: i64,
}

impl KeyBytes {
    /// Looks at every partition of `usage_event_keys`, measures those complete since the last
    /// look; `end` measures the open one too. Returns the current partitions' total size.
    async fn observe(&mut self, owner: &PgPool, end: bool) -> i64 {
        let rows: Vec<(i64, String, i64, bool)> = sqlx::query_as(
            "SELECT c.oid::int8, c.relname::text, pg_total_relation_size(c.oid)::int8,
                    c.relname::text IS NOT DISTINCT FROM
                        (SELECT stored_in FROM usage_key_generations WHERE closed_at IS NULL)
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'public.usage_event_keys'::regclass",
        )
        .fetch_all(owner)
        .await
        .unwrap();
        let mut total = 0;
        for (oid, name, bytes, open) in rows {
            total += bytes;
            let part = self.parts.entry(oid).or_insert_with(|| Part {
                name: name.clone(),
                ingested: open,
                complete: false,
                bytes: 0,
                rows: 0,
            });
            part.ingested |= open;
            if part.complete || (open && !end) {
                continue;
            }
            part.rows = sqlx::query_scalar(&format!("SELECT count(*) FROM public.\"{name}\""))
                .fetch_one(owner)
                .await
                .unwrap();
            part.bytes = bytes;
            part.complete = true;
        }
        total
    }

    /// The next transaction id: rows of the filter tables written after it are a job's.
    async fn marker(owner: &PgPool) -> i64 {
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8")
            .fetch_one(owner)
            .await
            .unwrap()
    }

    /// Adds the filter rows written since `marker`.
    async fn filters_since(&mut self, owner: &PgPool, marker: i64) {
        let tables: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.relname::text,
                    (SELECT count(*) FROM pg_index x WHERE x.indrelid = c.oid)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind = 'r'
                AND c.relname LIKE 'usage\\_key\\_filter%'",
        )
        .fetch_all(owner)
        .await
        .unwrap();
        for (table, indexes) in tables {
            let (rows, bytes): (i64, i64) = sqlx::query_as(&format!(
                "SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0)::int8
                   FROM public.\"{table}\" t
                  WHERE (t.xmin::text::int8 - ($1::int8 & 4294967295)) & 4294967295 < 2147483648"
            ))
            .bind(marker)
            .fetch_one(owner)
            .await
            .unwrap();
            self.filter_rows += rows;
            self.filter_bytes += bytes + rows * (4 + 20 * indexes);
        }
    }
}

/// Everything the jobs need: the admin function's database (the owner), the aggregation's
/// services (ops role, Redis) and configuration.
struct Jobs {
    admin: meterbridge::Database,
    ops: Services,
    policy: StoragePolicy,
    aggregation: AggregationConfig,
}

impl Jobs {
    /// [`maintain`], on the simulated database.
    async fn maintain(&self, now: DateTime<Utc>) -> Result<(Vec<String>, Instant), String> {
        maintain(&self.admin, now, &self.policy).await
    }

    /// [`compact`], on the simulated database.
    async fn compact(&self, steps_started: Instant) -> Result<(Vec<StorageAction>, bool), String> {
        compact(&self.admin, steps_started, &self.policy).await
    }

    async fn aggregate(&self, now: DateTime<Utc>) -> Result<String, String> {
        let deadline = Instant::now() + FUNCTION_TIMEOUT;
        Aggregator::new(&self.ops.db, self.ops.redis.as_ref(), self.aggregation)
            .aggregate(now, deadline)
            .await
            .map(|report| report.outcome)
            .map_err(|e| e.to_string())
    }
}

/// `maintain` in a transaction of its own, then the BRIN summaries step by step, as the
/// admin function's `usage.maintain`. Returns the actions and when the steps started.
async fn maintain(
    admin: &meterbridge::Database,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Result<(Vec<String>, Instant), String> {
    let mut tx = admin.pool().begin().await.map_err(|e| e.to_string())?;
    let mut done = usage_storage::maintain(&mut tx, now, policy)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let deadline = started + usage_storage::SCHEDULED_SUMMARY_TIME;
    let summaries = usage_storage::summarize(admin.pool(), now, policy, deadline)
        .await
        .map_err(|e| e.to_string())?;
    done.extend(summaries.actions);
    Ok((done.into_iter().map(|a| a.action).collect(), started))
}

/// The key compaction, as the admin function calls it after [`maintain`]:
/// [`usage_storage::compact`] step by step, each step a transaction of its own, until its work
/// is done or the function's share of the invocation (240 s from the summaries' start) is up.
/// Returns its actions and whether it left work for the next run.
async fn compact(
    admin: &meterbridge::Database,
    steps_started: Instant,
    policy: &StoragePolicy,
) -> Result<(Vec<StorageAction>, bool), String> {
    let deadline = steps_started + usage_storage::SCHEDULED_STEPS_TIME;
    let done = usage_storage::compact(admin.pool(), policy, deadline)
        .await
        .map_err(|e| e.to_string())?;
    Ok((done.actions, done.more))
}

/// The whole scheduled `usage.maintain`: [`maintain`], then [`compact`].
async fn storage_maintenance(
    admin: &meterbridge::Database,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Result<(), String> {
    let (_, steps_started) = maintain(admin, now, policy).await?;
    compact(admin, steps_started, policy).await.map(|_| ())
}

/// `callers` containers of ingest-usage (each its own `App`) on `owner`'s database as the
/// ingestion role, on the simulated clock, each warmed with each tenant's key (the fixture's
/// events are all rejected: nothing is stored), outside any measurement.
async fn ingest_apps(
    owner: &PgPool,
    callers: usize,
    clock: &Arc<SimClock>,
    fixture: &Value,
    keys: &[String],
) -> Vec<Arc<App>> {
    let ingest_url = database_url_as(owner, INGEST_ROLE);
    let mut apps = Vec::new();
    for _ in 0..callers {
        let env = env_of(&[
            ("DATABASE_URL", ingest_url.clone()),
            ("REDIS_URL", meterbridge::testing::redis_url()),
        ]);
        let services = Services::build_with_aws(Config::from(&env, "ingest-usage").unwrap(), None)
            .await
            .unwrap()
            .with_clock(clock.clone());
        let app = Arc::new(App::new(services, IngestConfig::from(&env).unwrap()));
        for key in keys {
            let warm = fixture
                .to_string()
                .replace("{{INTERNAL_KEY}}", key.as_str());
            let _ =
                ingest_usage::handle(&app, lambda_http::request::from_str(&warm).unwrap()).await;
        }
        apps.push(app);
    }
    apps
}

/// The admin function's database settings (template.yaml), as the owner.
async fn admin_database(owner_url: String) -> meterbridge::Database {
    let env = env_of(&[
        ("DATABASE_URL", owner_url),
        ("DB_TRANSACTION_TIMEOUT_MS", "300000".into()),
        ("DB_MAX_CONNECTIONS", "2".into()),
    ]);
    Services::build_with_aws(Config::from(&env, "admin").unwrap(), None)
        .await
        .unwrap()
        .db
}

/// `count` tenants, each with an internal key: their ids, and the keys in the same order.
async fn tenants_with_keys(
    owner: &PgPool,
    count: usize,
    hint: &str,
) -> (Vec<uuid::Uuid>, Vec<String>) {
    let mut tenants = Vec::new();
    let mut keys = Vec::new();
    for _ in 0..count {
        let tenant = create_tenant(owner, hint).await;
        keys.push(
            create_api_key(owner, &tenant, "crm", Trust::Internal)
                .await
                .key,
        );
        tenants.push(tenant.id.0);
    }
    (tenants, keys)
}

/// Migrates a new database as `BENCH_MIGRATIONS` says: up to that migration, or all.
async fn migrate(owner: &PgPool) {
    match std::env::var("BENCH_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    {
        Some(version) => meterbridge::testing::migrate_up_to(owner, version).await,
        None => meterbridge::db::MIGRATOR.run(owner).await.unwrap(),
    }
}

fn timed<T>(started: Instant, outcome: &Result<T, String>, job: &str, at: DateTime<Utc>) -> Run {
    let millis = started.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = outcome {
        eprintln!("maintenance: {job} at {at} failed after {millis:.0} ms: {e}");
    }
    Run {
        millis,
        failed: outcome.is_err(),
        ..Run::default()
    }
}

/// splitmix64: the simulation's deterministic choices per event.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The requests of one 10-minute step: its events, evenly over it, in batches of one tenant.
fn step_requests(
    template: &Value,
    keys: &[String],
    settings: &Settings,
    day: usize,
    step: usize,
    next_tenant: &mut usize,
) -> (Vec<lambda_http::Request>, usize) {
    let day_start = settings.start + chrono::Duration::days(day as i64);
    let per_day = settings.per_day;
    let first = step * per_day / STEPS_PER_DAY;
    let last = (step + 1) * per_day / STEPS_PER_DAY;
    let spacing_us = 86_400_000_000.0 / per_day as f64;
    let events: Vec<Value> = (first..last)
        .map(|n| {
            let h = mix(((day as u64) << 32) | n as u64);
            let jitter = (h >> 40) % 2_000_000;
            let at = day_start
                + chrono::Duration::microseconds((n as f64 * spacing_us) as i64 - jitter as i64);
            let mut event = json!({
                "eventId": uuid::Uuid::new_v4().to_string(),
                "metric": METRICS[(h % 10) as usize],
                "quantity": 1 + (h >> 8) % 7,
                "occurredAt": at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "correlationId": uuid::Uuid::new_v4().to_string(),
                "actorId": format!("user-{}", (h >> 16) % 500),
                "metadata": {"endpoint": "/v1/leads", "region": "eu-west-1"},
            });
            if (h >> 24) % 4 == 0 {
                event["idempotencyKey"] = json!(uuid::Uuid::new_v4().to_string());
            }
            event
        })
        .collect();
    let count = events.len();
    let requests = events
        .chunks(settings.batch)
        .map(|batch| {
            let key = &keys[*next_tenant % keys.len()];
            *next_tenant += 1;
            let mut request = template.clone();
            request["headers"]["authorization"] = json!(format!("Bearer {key}"));
            request["body"] = json!(json!({ "events": batch }).to_string());
            lambda_http::request::from_str(&request.to_string()).unwrap()
        })
        .collect();
    (requests, count)
}

/// Sends the requests through the callers, each taking the next request when it is free.
/// Returns the wall-clock time and the events the handler accepted.
async fn ingest(apps: &[Arc<App>], requests: Vec<lambda_http::Request>) -> (Duration, usize) {
    let queue = Arc::new(Mutex::new(VecDeque::from(requests)));
    let started = Instant::now();
    let tasks = apps.iter().map(|app| {
        let app = Arc::clone(app);
        let queue = Arc::clone(&queue);
        tokio::spawn(async move {
            let mut bodies = Vec::new();
            loop {
                let next = queue.lock().unwrap().pop_front();
                let Some(request) = next else { break };
                let response = ingest_usage::handle(&app, request).await;
                assert_eq!(
                    response.status(),
                    200,
                    "the handler failed: {:?}",
                    response.body()
                );
                bodies.push(response.into_body());
            }
            bodies
        })
    });
    let bodies: Vec<lambda_http::Body> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let elapsed = started.elapsed();
    let accepted = bodies
        .iter()
        .map(|b| {
            let v: Value = serde_json::from_slice(b.as_ref()).unwrap();
            v["accepted"].as_u64().unwrap() as usize
        })
        .sum();
    (elapsed, accepted)
}

/// The PostgreSQL data directory's free bytes, by `df`.
async fn free_bytes(admin: &PgPool) -> (String, u64) {
    let dir: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(admin)
        .await
        .unwrap();
    let out = std::process::Command::new("df")
        .args(["-Pk", &dir])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .unwrap_or_else(|| {
            eprintln!("maintenance: cannot check the free space of {dir} (df); refusing to start");
            std::process::exit(2);
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("maintenance: cannot read df's answer for {dir}: {text}");
            std::process::exit(2);
        });
    (dir, kib * 1024)
}

/// Turns autovacuum on for the run, or back to the server's configuration files' setting.
async fn set_autovacuum(admin: &PgPool, on: bool) {
    let statement = if on {
        "ALTER SYSTEM SET autovacuum = on"
    } else {
        "ALTER SYSTEM RESET autovacuum"
    };
    sqlx::query(statement).execute(admin).await.unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(admin)
        .await
        .unwrap();
}

/// `admin_url` with its database replaced by `database`.
fn url_with_database(admin_url: &str, database: &str) -> String {
    match admin_url.rfind('/') {
        Some(i) => format!("{}/{database}", &admin_url[..i]),
        None => panic!("BENCH_DATABASE_URL must name a database"),
    }
}

pub async fn run(admin_url: &str) {
    let s = Settings::from_env();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .expect("PostgreSQL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    let total_events = (s.days * s.per_day) as u64;
    let projected = total_events * BYTES_PER_EVENT;
    let (dir, free) = free_bytes(&admin).await;
    println!(
        "maintenance: {total_events} events projected at {:.1} GB (1 KB an event, keys and indexes included); {:.1} GB free on {dir}",
        projected as f64 / 1e9,
        free as f64 / 1e9
    );
    if free < projected + SPARE_BYTES {
        eprintln!(
            "maintenance: refusing to start: {:.1} GB projected + 10 GB to spare > {:.1} GB free on {dir}; lower BENCH_SIM_DAYS or BENCH_SIM_EVENTS_PER_DAY",
            projected as f64 / 1e9,
            free as f64 / 1e9
        );
        std::process::exit(2);
    }
    // Production runs with autovacuum (RDS: on by default), and the design counts on it: it
    // summarizes the BRIN indexes the aggregation reads through and analyzes the new day
    // partitions. A machine set up for tests may have it off: it is on for the run (the
    // server's setting, ALTER SYSTEM), and put back as it was at the end.
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&admin)
        .await
        .unwrap();
    if autovacuum != "on" {
        set_autovacuum(&admin, true).await;
        println!("maintenance: autovacuum was {autovacuum} on this server: on for the run (as on RDS), restored at the end");
    }
    // The buffer cache is set at server start, so it is reported, not changed: RDS gives it a
    // quarter of the instance's memory, while a test machine's default (128 MB) holds less
    // than the first day's indexes, and every later probe reads through the OS cache (measured:
    // day 3 at 72 % of the empty rate with 128 MB, 84 % with 4 GB).
    let buffers: String = sqlx::query_scalar("SHOW shared_buffers")
        .fetch_one(&admin)
        .await
        .unwrap();
    println!("maintenance: shared_buffers {buffers} (RDS: a quarter of the instance's memory; set it with ALTER SYSTEM and a restart)");
    sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
        .execute(&admin)
        .await
        .unwrap();
    let owner_url = url_with_database(admin_url, DATABASE);
    let owner = PgPoolOptions::new()
        .max_connections(4)
        .connect(&owner_url)
        .await
        .expect("the simulation database");
    migrate(&owner).await;
    // The insert's per-day cost, where the server loads pg_stat_statements (see InsertCost).
    let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&owner)
        .await;
    let schema: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&owner)
        .await
        .unwrap();
    // Deployed at the simulated start: the migration opened its key generation at the real
    // now, which the simulated clock would otherwise never rotate (or rotate backwards).
    sqlx::query("UPDATE usage_key_generations SET opened_at = $1 WHERE closed_at IS NULL")
        .bind(s.start)
        .execute(&owner)
        .await
        .unwrap();

    let (tenants, keys) = tenants_with_keys(&owner, s.tenants, "sim").await;
    let clock = SimClock::at(s.start);
    let template: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../events/ingest-usage/post-events.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let apps = ingest_apps(&owner, s.callers, &clock, &template, &keys).await;
    let admin_db = admin_database(owner_url.clone()).await;
    // aggregate-usage's, as meterbridge_ops, with Redis.
    let ops_env = env_of(&[
        ("DATABASE_URL", database_url_as(&owner, OPS_ROLE)),
        ("REDIS_URL", meterbridge::testing::redis_url()),
        ("DB_TRANSACTION_TIMEOUT_MS", "300000".into()),
        ("DB_MAX_CONNECTIONS", "2".into()),
        ("COUNTER_TTL_DAYS", "7".into()),
        ("AGGREGATION_GRACE_SECONDS", "3600".into()),
        ("USAGE_RETENTION_DAYS", "90".into()),
        ("AGGREGATION_DEADLINE_MARGIN_MS", "20000".into()),
    ]);
    let ops = Services::build_with_aws(Config::from(&ops_env, "aggregate-usage").unwrap(), None)
        .await
        .unwrap()
        .with_clock(clock.clone());
    let jobs = Jobs {
        admin: admin_db,
        aggregation: AggregationConfig::from_env(&ops_env).unwrap(),
        ops,
        policy: StoragePolicy::default(),
    };

    println!(
        "scheduled work over simulated time — {} days × {} events/day from {}, schema up to migration {schema}",
        s.days,
        s.per_day,
        s.start.to_rfc3339()
    );
    println!(
        "  ingestion: ingest_usage::handle on the simulated clock, {} callers (each its own App), batches of {}, {} tenants, 10 metrics, 500 actors, random UUID ids, every 4th event an idempotency key (1.25 dedup keys an event)",
        s.callers, s.batch, s.tenants
    );
    println!(
        "  jobs on the simulated clock, taking turns with ingestion: usage.maintain every {} minutes (maintain in its own transaction, then usage_storage::summarize in steps of its own, then {COMPACTION}; StoragePolicy::default(); the admin function's statement timeout, 10 s); aggregation every 10 minutes (Aggregator::aggregate as meterbridge_ops, with Redis, deadline 300 s, margin 20 s); run times by the wall clock (Instant)",
        s.maintenance_steps * STEP_MINUTES as usize
    );
    println!(
        "  per day: events/s = the day's events / the wall-clock time of their requests; no vacuum = the same over the steps during which no autovacuum worker ran (seen at the step's start and end; a simulated day takes minutes, so a real day's vacuums crowd into them) and those steps' share of the events; each job's median and maximum run; merged/full = compaction runs that attached a merged partition / that compacted fully; keys GB = the key partitions at the day's end; load = the machine's mean 1-minute load average (the simulation keeps about 2 busy: more is other work); insert = the ingestion insert statement's mean server time and shared blocks a call (read: not in shared_buffers), from pg_stat_statements where the server loads it; CPU = the on-CPU time (the kernel's /proc/<pid>/schedstat, not the wall clock) an event took in the database backends of the ingestion role + in this process, which runs the handler; vs empty beside = the CPU µs an event over the steps paired with the empty database beside (every BENCH_SIM_BESIDE_EVERY-th step, the same step's events into a fresh empty copy), this database's / the copy's, and this database's rate as a percentage of the copy's"
    );
    println!();
    println!(
        "{:>4} {:>10} {:>15} {:>21} {:>21} {:>11} {:>21} {:>8} {:>7} {:>5} {:>22} {:>12} {:>15}",
        "day",
        "events/s",
        "no vacuum (%)",
        "maintenance ms p50/max",
        "compaction ms p50/max",
        "merged/full",
        "aggregation ms p50/max",
        "keys GB",
        "DB GB",
        "load",
        "insert ms / blks (read)",
        "CPU µs/event",
        "vs empty beside"
    );

    let mut bytes = KeyBytes::default();
    bytes.observe(&owner, false).await;
    let mut days: Vec<Day> = Vec::new();
    let mut empty = Totals::default();
    let mut beside = beside::Beside::prepare(&admin, admin_url, &s, clock.clone()).await;
    let mut next_tenant = 0usize;
    let started = Instant::now();
    let mut insert_before = InsertCost::read(&owner).await;
    for d in 0..s.days {
        let mut day = Day::default();
        for step in 0..STEPS_PER_DAY {
            let at = s.start
                + chrono::Duration::days(d as i64)
                + chrono::Duration::minutes(STEP_MINUTES * step as i64);
            clock.set(at);
            if step % s.maintenance_steps == 0 {
                // The scheduled usage.maintain: maintain, then compact unless it failed.
                let marker = KeyBytes::marker(&owner).await;
                let t = Instant::now();
                let maintained = jobs.maintain(at).await;
                day.maintenance.push(timed(t, &maintained, "maintain", at));
                bytes.observe(&owner, false).await;
                if let Ok((_, steps_started)) = maintained {
                    let t = Instant::now();
                    let compacted = jobs.compact(steps_started).await;
                    let mut run = timed(t, &compacted, "compact", at);
                    let (actions, more) = compacted.unwrap_or_default();
                    run.left_work = more;
                    for a in &actions {
                        run.merged |= a.action == "merged";
                        run.full |= a.action == "compacted";
                        if a.action == "merged" || a.action == "compacted" {
                            bytes.built.push(a.object.clone());
                        }
                    }
                    day.compaction.push(run);
                    if !actions.is_empty() {
                        bytes.observe(&owner, false).await;
                    }
                }
                bytes.filters_since(&owner, marker).await;
                if let Some(beside) = &beside {
                    beside.maintain(at).await;
                }
            }
            let t = Instant::now();
            let aggregated = jobs.aggregate(at).await;
            let mut run = timed(t, &aggregated, "aggregate", at);
            run.left_work = aggregated.as_deref().is_ok_and(|o| o != "done");
            day.aggregation.push(run);

            // The step's events, sent at its end.
            let (requests, count) = step_requests(&template, &keys, &s, d, step, &mut next_tenant);
            clock.set(at + chrono::Duration::minutes(STEP_MINUTES));
            let vacuums_before = autovacuum_workers(&owner).await;
            let cpu_mark = CpuMark::now(&owner).await;
            let (elapsed, accepted) = ingest(&apps, requests).await;
            let cpu = cpu_mark.since(&owner).await;
            assert_eq!(accepted, count, "every event is new and valid");
            day.events += count;
            day.ingest += elapsed;
            day.cpu.add(cpu);
            if vacuums_before == 0 && autovacuum_workers(&owner).await == 0 {
                day.quiet_events += count;
                day.quiet_ingest += elapsed;
            }
            day.load += load_average();
            let took = Totals {
                events: count,
                wall: elapsed,
                cpu,
            };
            if empty.events < s.empty_events {
                empty.add(took);
            }
            if let Some(beside) = beside.as_mut().filter(|b| b.pairs(step)) {
                let at_end = at + chrono::Duration::minutes(STEP_MINUTES);
                day.beside
                    .add(beside.step(&template, &s, d, step, at_end).await);
                day.paired.add(took);
            }
        }
        day.key_bytes = bytes.observe(&owner, false).await;
        day.database_bytes = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&owner)
            .await
            .unwrap();
        let insert_now = InsertCost::read(&owner).await;
        day.insert = insert_now
            .zip(insert_before)
            .map(|(now, then)| now.since(then));
        insert_before = insert_now;
        print_day(d + 1, &day);
        days.push(day);
        if s.max_wall.is_some_and(|limit| started.elapsed() > limit) {
            println!(
                "stopped after simulated day {} of {}: BENCH_SIM_MAX_MINUTES of wall clock reached",
                d + 1,
                s.days
            );
            break;
        }
    }
    bytes.observe(&owner, true).await;
    println!(
        "\n(simulated {} days in {:.0} s of wall clock)",
        days.len(),
        started.elapsed().as_secs_f64()
    );
    report(&s, &days, empty, &bytes);

    // Cleanup: the simulation's counters in Redis, and its database.
    let client = redis::Client::open(meterbridge::testing::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    delete_counters(&mut conn, &tenants).await;
    if let Some(beside) = beside {
        delete_counters(&mut conn, &beside.tenants).await;
        if !s.keep {
            beside.drop_databases().await;
        }
    }
    owner.close().await;
    drop(jobs);
    drop(apps);
    if autovacuum != "on" {
        set_autovacuum(&admin, false).await;
    }
    if s.keep {
        println!("BENCH_SIM_KEEP=1: the simulation database {DATABASE} is kept (and the empty copy beside it, if any)");
    } else {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
}

/// The rate of the day's steps during which no autovacuum ran, and their share of the day's
/// events.
fn quiet_cell(day: &Day) -> String {
    if day.quiet_events == 0 {
        return "- (0%)".to_owned();
    }
    format!(
        "{:.0} ({:.0}%)",
        day.quiet_events as f64 / day.quiet_ingest.as_secs_f64(),
        day.quiet_events as f64 / day.events.max(1) as f64 * 100.0
    )
}

/// "paired µs / empty µs = ratio" of the steps paired with the empty copy, or "-".
fn beside_cell(day: &Day) -> String {
    match beside_ratio(day) {
        Some(ratio) => {
            let per = |t: &Totals| {
                let (db, handler) = t.cpu.per_event(t.events);
                db + handler
            };
            format!(
                "{:.0}/{:.0} = {ratio:.0}%",
                per(&day.paired),
                per(&day.beside)
            )
        }
        None => "-".to_owned(),
    }
}

fn print_day(number: usize, day: &Day) {
    let cell = |runs: &[Run]| {
        let (p50, max) = summary(runs);
        let failed = runs.iter().filter(|r| r.failed).count();
        if failed > 0 {
            format!("{p50:.0} / {max:.0} ({failed} failed)")
        } else {
            format!("{p50:.1} / {max:.1}")
        }
    };
    let count = |runs: &[Run], f: fn(&Run) -> bool| runs.iter().filter(|r| f(r)).count();
    let merges = format!(
        "{}/{}",
        count(&day.compaction, |r| r.merged),
        count(&day.compaction, |r| r.full)
    );
    let mut notes = String::new();
    let left = count(&day.compaction, |r| r.left_work);
    if left > 0 {
        notes.push_str(&format!(
            "  ({left} compaction runs left work for the next hour)"
        ));
    }
    let unfinished = count(&day.aggregation, |r| r.left_work);
    if unfinished > 0 {
        notes.push_str(&format!("  ({unfinished} aggregation runs did not finish)"));
    }
    println!(
        "{:>4} {:>10.0} {:>15} {:>21} {:>21} {:>11} {:>21} {:>8.2} {:>7.2} {:>5.1} {:>22} {:>12} {:>15}{notes}",
        number,
        day.events as f64 / day.ingest.as_secs_f64(),
        quiet_cell(day),
        cell(&day.maintenance),
        cell(&day.compaction),
        merges,
        cell(&day.aggregation),
        day.key_bytes as f64 / 1e9,
        day.database_bytes as f64 / 1e9,
        day.load / STEPS_PER_DAY as f64,
        InsertCost::cell(day.insert),
        day.cpu.cell(day.events),
        beside_cell(day),
    );
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Events ingested, and the wall-clock and CPU time they took.
#[derive(Default, Clone, Copy)]
struct Totals {
    events: usize,
    wall: Duration,
    cpu: Cpu,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.events += other.events;
        self.wall += other.wall;
        self.cpu.add(other.cpu);
    }

    /// Events per on-CPU second, database and handler together.
    fn cpu_rate(&self) -> f64 {
        self.events as f64
            / (self.cpu.database + self.cpu.handler)
                .as_secs_f64()
                .max(f64::MIN_POSITIVE)
    }
}

/// The simulated database's CPU rate over the steps paired with the empty copy, as a
/// percentage of the copy's in those steps (see [`beside`]).
fn beside_ratio(day: &Day) -> Option<f64> {
    (day.beside.events > 0 && !day.beside.cpu.database.is_zero())
        .then(|| day.paired.cpu_rate() / day.beside.cpu_rate() * 100.0)
}

fn report(s: &Settings, days: &[Day], empty: Totals, bytes: &KeyBytes) {
    let rate = |days: &[Day]| {
        let events: usize = days.iter().map(|d| d.events).sum();
        let time: f64 = days.iter().map(|d| d.ingest.as_secs_f64()).sum();
        events as f64 / time
    };
    let last = days.len();
    let empty_rate = empty.events as f64 / empty.wall.as_secs_f64();
    let first_two = rate(&days[..days.len().min(2)]);
    let last_rate = rate(&days[last - 1..]);
    println!();
    println!(
        "ingestion (events through the handler / wall-clock time of their requests, per 10-minute step):"
    );
    println!(
        "  empty database (the first {} events): {empty_rate:.0} events/s",
        empty.events
    );
    let first_days = if last >= 2 { "days 1-2" } else { "day 1" };
    println!(
        "  {first_days}: {first_two:.0} events/s ({:.0}% of empty); day {last}: {last_rate:.0} events/s ({:.0}% of {first_days}, {:.0}% of empty)",
        first_two / empty_rate * 100.0,
        last_rate / first_two * 100.0,
        last_rate / empty_rate * 100.0
    );
    let final_day = &days[last - 1];
    if final_day.quiet_events > 0 {
        let quiet = final_day.quiet_events as f64 / final_day.quiet_ingest.as_secs_f64();
        println!(
            "  day {last} while no autovacuum ran: {quiet:.0} events/s ({:.0}% of empty), over {:.0}% of its events",
            quiet / empty_rate * 100.0,
            final_day.quiet_events as f64 / final_day.events as f64 * 100.0
        );
    }
    let per_call = |d: &Day| {
        d.insert
            .filter(|c| c.calls > 0)
            .map(|c| (c.blocks_hit + c.blocks_read) as f64 / c.calls as f64)
    };
    if let (Some(first), Some(final_blocks)) = (per_call(&days[0]), per_call(final_day)) {
        println!(
            "  the insert's server work (pg_stat_statements): {first:.0} shared blocks a call on day 1, {final_blocks:.0} on day {last} ({:+.0}%)",
            (final_blocks / first - 1.0) * 100.0
        );
    }

    // The same ratio by CPU time: events per on-CPU second, database and handler together.
    let empty_cpu = empty.cpu_rate();
    let final_cpu = Totals {
        events: final_day.events,
        wall: final_day.ingest,
        cpu: final_day.cpu,
    }
    .cpu_rate();
    let cpu_ratio = (!empty.cpu.database.is_zero()).then(|| final_cpu / empty_cpu * 100.0);
    if let Some(cpu_ratio) = cpu_ratio {
        let (e_db, e_handler) = empty.cpu.per_event(empty.events);
        let (l_db, l_handler) = final_day.cpu.per_event(final_day.events);
        println!(
            "  by CPU time (on-CPU time of the ingestion role's backends and of the handler's process, /proc/<pid>/schedstat; waits for a core not counted): empty {:.1} µs an event (database {e_db:.1} + handler {e_handler:.1}), day {last} {:.1} µs (database {l_db:.1} + handler {l_handler:.1}): {final_cpu:.0} events per CPU-second = {cpu_ratio:.0}% of empty's {empty_cpu:.0}",
            e_db + e_handler,
            l_db + l_handler,
        );
    }
    let beside_last = beside_ratio(final_day);
    if let Some(ratio) = beside_last {
        let per = |t: &Totals| {
            let (db, handler) = t.cpu.per_event(t.events);
            format!(
                "{:.1} µs (database {db:.1} + handler {handler:.1})",
                db + handler
            )
        };
        let first = beside_ratio(&days[0]).map_or("-".to_owned(), |r| format!("{r:.0}%"));
        println!(
            "  against the empty database beside (every {}th step, the same step's events into a freshly cloned empty database, at most {} events a copy; CPU time as above, over the paired steps only): day {last} {} an event against empty {} = {ratio:.0}% of empty's rate (day 1: {first})",
            s.beside_every,
            s.empty_events,
            per(&final_day.paired),
            per(&final_day.beside),
        );
    }

    let early = 5.min(last);
    println!();
    println!("maximum run time, day {early} against day {last} (wall clock, Instant):");
    let mut growth_ok = Vec::new();
    for (job, runs) in [
        (
            "maintenance (maintain)",
            days.iter().map(|d| &d.maintenance).collect::<Vec<_>>(),
        ),
        (
            "compaction (compact)",
            days.iter().map(|d| &d.compaction).collect(),
        ),
        (
            "aggregation (aggregate)",
            days.iter().map(|d| &d.aggregation).collect(),
        ),
    ] {
        let (_, a) = summary(runs[early - 1]);
        let (_, b) = summary(runs[last - 1]);
        let ratio = b / a;
        growth_ok.push(ratio <= 1.5);
        println!(
            "  {job:<24} {a:>10.1} ms -> {b:>10.1} ms = {ratio:.2}x (target: day {last} within 1.5x of day {early}: {}){}",
            met(ratio <= 1.5),
            if last < 6 {
                " [fewer than 6 days: not meaningful]"
            } else {
                ""
            }
        );
    }

    // Write amplification of the dedup keys.
    let mut kinds: BTreeMap<String, (usize, i64, i64, bool)> = BTreeMap::new();
    for part in bytes.parts.values().filter(|p| p.complete) {
        let kind = part
            .name
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '_')
            .to_owned();
        let entry = kinds.entry(kind).or_insert((0, 0, 0, part.ingested));
        entry.0 += 1;
        entry.1 += part.rows;
        entry.2 += part.bytes;
    }
    let (once_rows, once_bytes) = bytes
        .parts
        .values()
        .filter(|p| p.complete && p.ingested)
        .fold((0i64, 0i64), |(r, b), p| (r + p.rows, b + p.bytes));
    let (all_rows, all_bytes) = bytes
        .parts
        .values()
        .filter(|p| p.complete)
        .fold((0i64, 0i64), |(r, b), p| (r + p.rows, b + p.bytes));
    println!();
    println!(
        "dedup keys written (method: pg_total_relation_size and count(*) of each usage_event_keys partition once complete — an open generation's when the maintenance has closed it, a merge or compaction when it is attached — plus the Bloom filter rows each job wrote, found by xmin: tuple bytes + 4 B line pointer + 20 B per index entry):"
    );
    for (kind, (n, rows, b, ingested)) in &kinds {
        println!(
            "  {kind}*: {n} partitions, {rows} keys, {:.3} GB{}",
            *b as f64 / 1e9,
            if *ingested {
                " (written by ingestion: the keys stored once)"
            } else {
                " (rewritten by the compaction)"
            }
        );
    }
    println!(
        "  Bloom filter rows written: {}, {:.3} GB",
        bytes.filter_rows,
        bytes.filter_bytes as f64 / 1e9
    );
    let seen: std::collections::HashSet<&str> =
        bytes.parts.values().map(|p| p.name.as_str()).collect();
    let unmeasured: Vec<&String> = bytes
        .built
        .iter()
        .filter(|n| !seen.contains(n.as_str()))
        .collect();
    if !unmeasured.is_empty() {
        println!(
            "  NOT measured: {} partitions built and dropped within one compaction call (the figures below are a lower bound): {}",
            unmeasured.len(),
            unmeasured.iter().take(5).map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let amplification = (all_bytes + bytes.filter_bytes) as f64 / once_bytes as f64;
    let rewrites = all_rows as f64 / once_rows as f64;
    println!(
        "  write amplification = all bytes written / bytes of the keys stored once = {:.3} / {:.3} GB = {amplification:.1}x",
        (all_bytes + bytes.filter_bytes) as f64 / 1e9,
        once_bytes as f64 / 1e9
    );
    println!(
        "  rewrites per key = keys written into partitions, merges included / keys inserted by ingestion = {all_rows} / {once_rows} = {rewrites:.1} (after {last} days; keys live {} days)",
        StoragePolicy::default().dedup_window_days
    );

    println!();
    println!("goals ({} days × {} events/day):", s.days, s.per_day);
    for (job, ok) in ["maintenance", "compaction", "aggregation"]
        .iter()
        .zip(&growth_ok)
    {
        println!(
            "  {job}: maximum run time on day {last} within 1.5x of day {early}: {}",
            met(*ok)
        );
    }
    println!(
        "  write amplification <= 6 rewrites per key: {rewrites:.1}: {}",
        met(rewrites <= 6.0)
    );
    let ratio = last_rate / empty_rate * 100.0;
    println!(
        "  ingestion on day {last} >= 80% of its empty-table rate: {ratio:.0}% by the wall clock: {}",
        met(ratio >= 80.0)
    );
    if let Some(cpu_ratio) = cpu_ratio {
        println!(
            "  ingestion on day {last} >= 80% of its empty-table rate: {cpu_ratio:.0}% by CPU time: {}",
            met(cpu_ratio >= 80.0)
        );
    }
    if let Some(ratio) = beside_last {
        println!(
            "  ingestion on day {last} >= 80% of its empty-table rate: {ratio:.0}% by CPU time against the empty database beside: {}",
            met(ratio >= 80.0)
        );
    }
}
