//! meterbridge benchmark: ingestion throughput through the real handler (in-process, real
//! PostgreSQL and Redis) beside two baselines on the same table in the same run:
//! (a) the older per-row design — one INSERT per event, each its own transaction — and
//! (b) the raw limit — `COPY` of the same rows.
//!
//! `scripts/bench.sh` (or `cargo run --release -p meterbridge-bench`). Needs PostgreSQL as a
//! superuser at `BENCH_DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/postgres) and
//! Redis at `REDIS_URL`; it creates and drops its own database.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark program: fail loudly

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ingest_usage::{App, IngestConfig};
use meterbridge::config::{Config, Env};
use meterbridge::domain::usage::{validate_event, EventLimits, Submitter};
use meterbridge::domain::{MetricCatalog, SourceService, Tenant, Trust};
use meterbridge::repo::metrics;
use meterbridge::testing::{create_api_key, create_tenant, database_url_as, API_ROLE};
use meterbridge::Services;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};

const METRICS: [&str; 4] = [
    "api.requests",
    "leads.processed",
    "scoring.requests",
    "voice.calls.completed",
];

struct Row {
    workload: &'static str,
    batch: usize,
    callers: usize,
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    peak_rss_kib: u64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l[i].as_secs_f64() * 1000.0
    }
}

#[tokio::main]
async fn main() {
    let admin_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let total: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let per_row_total: usize = total / 4;
    let batches: Vec<usize> = vec![100, 500, 1000];
    let caller_counts: Vec<usize> = vec![1, 4];

    let owner = fresh_database(&admin_url).await;
    meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    let tenant = create_tenant(&owner, "bench").await;
    let key = create_api_key(&owner, &tenant, "crm", Trust::Internal).await;
    let catalog = MetricCatalog::new(metrics::catalog(&owner).await.unwrap());
    let api_url = database_url_as(&owner, API_ROLE);
    let api_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&api_url)
        .await
        .unwrap();

    println!("meterbridge ingestion benchmark — {total} events per handler/COPY run, {per_row_total} per per-row run");
    println!(
        "PostgreSQL {}, Redis {}",
        server_version(&owner).await,
        meterbridge::testing::redis_url()
    );
    let mut rows = Vec::new();
    for &batch in &batches {
        for &callers in &caller_counts {
            let apps = build_apps(&api_url, callers).await;
            let work = make_batches(&format!("h{batch}x{callers}"), total, batch);
            truncate(&owner).await;
            rows.push(run_handler(&apps, &key.key, work, batch, callers).await);

            let work = make_batches(&format!("r{batch}x{callers}"), per_row_total, batch);
            let prepared = prepare(&work, &tenant, &catalog);
            truncate(&owner).await;
            rows.push(run_per_row(&api_pool, prepared, &tenant, batch, callers).await);

            let work = make_batches(&format!("c{batch}x{callers}"), total, batch);
            let prepared = prepare(&work, &tenant, &catalog);
            truncate(&owner).await;
            rows.push(run_copy(&owner, prepared, &tenant, batch, callers).await);
        }
    }
    report(&rows);
    owner.close().await;
}

async fn fresh_database(admin_url: &str) -> PgPool {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await
        .expect("PostgreSQL");
    sqlx::query("DROP DATABASE IF EXISTS meterbridge_bench WITH (FORCE)")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE meterbridge_bench")
        .execute(&admin)
        .await
        .unwrap();
    let url = match admin_url.rfind('/') {
        Some(i) => format!("{}/meterbridge_bench", &admin_url[..i]),
        None => panic!("BENCH_DATABASE_URL must name a database"),
    };
    PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap()
}

async fn server_version(pool: &PgPool) -> String {
    sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn truncate(owner: &PgPool) {
    sqlx::query("TRUNCATE usage_events")
        .execute(owner)
        .await
        .unwrap();
    sqlx::query("VACUUM ANALYZE usage_events")
        .execute(owner)
        .await
        .unwrap();
}

/// One App per caller, as separate Lambda containers would have.
async fn build_apps(api_url: &str, callers: usize) -> Vec<Arc<App>> {
    let mut apps = Vec::new();
    for _ in 0..callers {
        let vars: HashMap<String, String> = [
            ("DATABASE_URL".to_owned(), api_url.to_owned()),
            ("REDIS_URL".to_owned(), meterbridge::testing::redis_url()),
        ]
        .into_iter()
        .collect();
        let env = Env::from_lookup(move |k| vars.get(k).cloned());
        let services = Services::build_with_aws(Config::from(&env, "bench").unwrap(), None)
            .await
            .unwrap();
        apps.push(Arc::new(App::new(
            services,
            IngestConfig::from(&env).unwrap(),
        )));
    }
    apps
}

/// `total` unique events in batches of `size`.
fn make_batches(prefix: &str, total: usize, size: usize) -> Vec<Vec<Value>> {
    let now = chrono::Utc::now();
    (0..total)
        .map(|n| {
            json!({
                "eventId": format!("{prefix}-{n}"),
                "metric": METRICS[n % METRICS.len()],
                "quantity": 1 + (n % 7) as i64,
                "occurredAt": (now - chrono::Duration::seconds((n % 3600) as i64)).to_rfc3339(),
                "correlationId": format!("{prefix}-op-{n}"),
                "actorId": format!("user-{}", n % 100),
                "metadata": {"endpoint": "/v1/leads", "region": "eu-west-1"},
            })
        })
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[Value]>::to_vec)
        .collect()
}

fn peak_rss_reset() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Splits batches round-robin over callers and runs them concurrently, timing each batch.
async fn run_concurrently<T, F, Fut>(
    work: Vec<T>,
    callers: usize,
    f: F,
) -> (Duration, Vec<Duration>)
where
    T: Send + 'static,
    F: Fn(usize, T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let mut lanes: Vec<Vec<T>> = (0..callers).map(|_| Vec::new()).collect();
    for (i, item) in work.into_iter().enumerate() {
        lanes[i % callers].push(item);
    }
    let f = Arc::new(f);
    let started = Instant::now();
    let tasks = lanes.into_iter().enumerate().map(|(caller, lane)| {
        let f = Arc::clone(&f);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            for item in lane {
                let t = Instant::now();
                f(caller, item).await;
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let latencies: Vec<Duration> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    (started.elapsed(), latencies)
}

async fn run_handler(
    apps: &[Arc<App>],
    key: &str,
    work: Vec<Vec<Value>>,
    batch: usize,
    callers: usize,
) -> Row {
    let events: usize = work.iter().map(Vec::len).sum();
    // Requests are built before the clock starts: the handler's own work (parse, auth,
    // validate, one transaction, Redis) is what is measured.
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/post-events.json"
    ))
    .unwrap();
    let requests: Vec<String> = work
        .iter()
        .map(|b| {
            let mut e: Value = serde_json::from_str(&template).unwrap();
            e["headers"]["authorization"] = json!(format!("Bearer {key}"));
            e["body"] = json!(json!({"events": b}).to_string());
            e.to_string()
        })
        .collect();
    let requests: Vec<lambda_http::Request> = requests
        .iter()
        .map(|r| lambda_http::request::from_str(r).unwrap())
        .collect();
    // Warm each container (key cache, catalog, connections) outside the measurement.
    for app in apps {
        let warm =
            lambda_http::request::from_str(&template.replace("{{INTERNAL_KEY}}", key)).unwrap();
        let _ = ingest_usage::handle(app, warm).await;
    }
    let apps: Vec<Arc<App>> = apps.to_vec();
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(requests, callers, move |caller, request| {
        let app = Arc::clone(&apps[caller]);
        async move {
            let response = ingest_usage::handle(&app, request).await;
            assert_eq!(
                response.status(),
                200,
                "handler failed during the benchmark"
            );
        }
    })
    .await;
    Row {
        workload: "handler (this design)",
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}

/// The stored form of each event, computed before the clock starts for both baselines.
struct Prepared {
    event_id: String,
    metric: String,
    quantity: i64,
    occurred_at: chrono::DateTime<chrono::Utc>,
    actor_id: Option<String>,
    correlation_id: String,
    classification: &'static str,
    idempotency_key: String,
    metadata: Value,
    payload_hash: Vec<u8>,
}

fn prepare(work: &[Vec<Value>], tenant: &Tenant, catalog: &MetricCatalog) -> Vec<Vec<Prepared>> {
    let source = SourceService::parse("crm").unwrap();
    let who = Submitter {
        tenant_id: tenant.id,
        tenant_slug: &tenant.slug,
        source: &source,
        trust: Trust::Internal,
        catalog,
        now: chrono::Utc::now(),
        limits: EventLimits::default(),
    };
    work.iter()
        .map(|batch| {
            batch
                .iter()
                .map(|raw| {
                    let e = validate_event(raw, &who).unwrap();
                    Prepared {
                        event_id: e.event_id,
                        metric: e.metric,
                        quantity: e.quantity,
                        occurred_at: e.occurred_at,
                        actor_id: e.actor_id,
                        correlation_id: e.correlation_id,
                        classification: e.classification.as_str(),
                        idempotency_key: e.idempotency_key,
                        metadata: e.metadata,
                        payload_hash: e.payload_hash.to_vec(),
                    }
                })
                .collect()
        })
        .collect()
}

/// The older design on the same path as the handler: the API role, and per event its own
/// transaction — BEGIN, set the tenant, INSERT, COMMIT.
async fn run_per_row(
    api_pool: &PgPool,
    work: Vec<Vec<Prepared>>,
    tenant: &Tenant,
    batch: usize,
    callers: usize,
) -> Row {
    let events: usize = work.iter().map(Vec::len).sum();
    let db = Arc::new(meterbridge::Database::from_pool(api_pool.clone()));
    let tenant = tenant.id;
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(work, callers, move |_, rows: Vec<Prepared>| {
        let db = Arc::clone(&db);
        async move {
            for r in rows {
                let mut tx = db.tenant_tx(tenant).await.unwrap();
                sqlx::query(
                    "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
                                               correlation_id, classification, idempotency_key, metadata, payload_hash)
                     VALUES ($1, $2, $3, $4, $5, $6, 'crm', $7, $8, $9, $10, $11)",
                )
                .bind(tenant.0)
                .bind(&r.event_id)
                .bind(&r.metric)
                .bind(r.quantity)
                .bind(r.occurred_at)
                .bind(&r.actor_id)
                .bind(&r.correlation_id)
                .bind(r.classification)
                .bind(&r.idempotency_key)
                .bind(&r.metadata)
                .bind(&r.payload_hash)
                .execute(&mut *tx)
                .await
                .unwrap();
                tx.commit().await.unwrap();
            }
        }
    })
    .await;
    Row {
        workload: "(a) per-row tx per event",
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}

fn copy_text(rows: &[Prepared], tenant: &Tenant) -> Vec<u8> {
    fn esc(s: &str) -> String {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
    }
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\tcrm\t{}\t{}\t{}\t{}\t\\\\x{}\n",
            tenant.id,
            esc(&r.event_id),
            esc(&r.metric),
            r.quantity,
            r.occurred_at.to_rfc3339(),
            r.actor_id
                .as_deref()
                .map(esc)
                .unwrap_or_else(|| "\\N".into()),
            esc(&r.correlation_id),
            r.classification,
            esc(&r.idempotency_key),
            esc(&r.metadata.to_string()),
            r.payload_hash
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        ));
    }
    out.into_bytes()
}

async fn run_copy(
    owner: &PgPool,
    work: Vec<Vec<Prepared>>,
    tenant: &Tenant,
    batch: usize,
    callers: usize,
) -> Row {
    let events: usize = work.iter().map(Vec::len).sum();
    let payloads: Vec<Vec<u8>> = work.iter().map(|rows| copy_text(rows, tenant)).collect();
    let pool = owner.clone();
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(payloads, callers, move |_, payload: Vec<u8>| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut copy = conn
                .copy_in_raw(
                    "COPY usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
                                        correlation_id, classification, idempotency_key, metadata, payload_hash) FROM STDIN",
                )
                .await
                .unwrap();
            copy.send(payload).await.unwrap();
            copy.finish().await.unwrap();
        }
    })
    .await;
    Row {
        workload: "(b) COPY (raw limit)",
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}

fn report(rows: &[Row]) {
    println!();
    println!(
        "{:<27} {:>5} {:>7} {:>8} {:>11} {:>9} {:>9} {:>10}",
        "workload", "batch", "callers", "events", "events/s", "p50 ms", "p99 ms", "peak RSS"
    );
    for r in rows {
        println!(
            "{:<27} {:>5} {:>7} {:>8} {:>11.0} {:>9.2} {:>9.2} {:>7.1} MB",
            r.workload,
            r.batch,
            r.callers,
            r.events,
            r.rate(),
            r.percentile(0.50),
            r.percentile(0.99),
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    println!();
    for callers in [1, 4] {
        let find = |prefix: &str| {
            rows.iter()
                .find(|r| r.workload.starts_with(prefix) && r.batch == 500 && r.callers == callers)
        };
        if let (Some(h), Some(a), Some(b)) = (find("handler"), find("(a)"), find("(b)")) {
            let vs_copy = h.rate() / b.rate() * 100.0;
            let vs_row = h.rate() / a.rate();
            println!(
                "batch 500, {callers} caller(s): handler = {vs_copy:.0}% of COPY (target >= 70%: {}), {vs_row:.1}x per-row (target >= 20x: {})",
                if vs_copy >= 70.0 { "met" } else { "NOT met" },
                if vs_row >= 20.0 { "met" } else { "NOT met" }
            );
        }
    }
}
