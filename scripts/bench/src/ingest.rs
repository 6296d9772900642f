//! The ingestion workloads: the handler, (a) per-row transactions, (b) COPY.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use ingest_usage::{App, IngestConfig};
use meterbridge::config::{Config, Env};
use meterbridge::domain::dedup::DedupKeys;
use meterbridge::domain::usage::{validate_event, EventLimits, Submitter};
use meterbridge::domain::{MetricCatalog, SourceService, Tenant, Trust};
use meterbridge::Services;
use serde_json::{json, Value};
use sqlx::postgres::PgPool;

/// The columns both baselines write, in the order they bind or copy them (the event rows
/// only: the baselines keep no remembered dedup keys).
const COLUMNS: &str =
    "tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service, \
                       correlation_id, classification, idempotency_key, metadata, payload_hash, \
                       operation_key";
static INSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("INSERT INTO usage_events ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, 'crm', $7, $8, $9, $10, $11, $12)")
});
static COPY_SQL: LazyLock<String> =
    LazyLock::new(|| format!("COPY usage_events ({COLUMNS}) FROM STDIN"));

use crate::measure::{peak_rss_kib, peak_rss_reset, run_concurrently, Row};

const METRICS: [&str; 4] = [
    "api.requests",
    "leads.processed",
    "scoring.requests",
    "voice.calls.completed",
];

/// One App per caller, as separate Lambda containers would have, without rate limits: these
/// workloads measure the handler's own work (the neighbours workload measures the limits).
pub async fn build_apps(api_url: &str, callers: usize) -> Vec<Arc<App>> {
    build_apps_with(api_url, callers, false).await
}

/// One App per caller, with the per-key and per-tenant rate limits on or off.
pub async fn build_apps_with(api_url: &str, callers: usize, limits: bool) -> Vec<Arc<App>> {
    let mut apps = Vec::new();
    for _ in 0..callers {
        let vars: HashMap<String, String> = [
            ("DATABASE_URL".to_owned(), api_url.to_owned()),
            ("REDIS_URL".to_owned(), meterbridge::testing::redis_url()),
            ("RATE_LIMITS_ENABLED".to_owned(), limits.to_string()),
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
pub fn make_batches(prefix: &str, total: usize, size: usize) -> Vec<Vec<Value>> {
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

pub async fn run_handler(
    apps: &[Arc<App>],
    key: &str,
    work: Vec<Vec<Value>>,
    batch: usize,
    callers: usize,
) -> Row {
    run_handler_as("handler (this design)", apps, key, work, batch, callers).await
}

/// [`run_handler`], reported under `workload`.
pub async fn run_handler_as(
    workload: &'static str,
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
        workload,
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}

/// The stored form of each event, computed before the clock starts for both baselines.
pub struct Prepared {
    pub(crate) event_id: String,
    pub(crate) metric: String,
    pub(crate) quantity: i64,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
    pub(crate) actor_id: Option<String>,
    pub(crate) correlation_id: String,
    pub(crate) classification: &'static str,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) metadata: Value,
    pub(crate) payload_hash: Vec<u8>,
    pub(crate) operation_key: uuid::Uuid,
    /// The dedup keys the handler remembers for the event (the `(c)` baseline copies them).
    pub(crate) remembered: Vec<uuid::Uuid>,
}

pub fn prepare(
    work: &[Vec<Value>],
    tenant: &Tenant,
    catalog: &MetricCatalog,
) -> Vec<Vec<Prepared>> {
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
                    let e = validate_event(raw.clone(), &who).unwrap();
                    let keys = DedupKeys::of(tenant.id, &source, &e);
                    let operation_key = keys.operation;
                    let remembered: Vec<uuid::Uuid> = keys.remembered().collect();
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
                        operation_key,
                        remembered,
                    }
                })
                .collect()
        })
        .collect()
}

/// The older design on the same path as the handler: the API role, and per event its own
/// transaction — BEGIN, set the tenant, INSERT, COMMIT.
pub async fn run_per_row(
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
                sqlx::query(INSERT_SQL.as_str())
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
                    .bind(r.operation_key)
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
            "{}\t{}\t{}\t{}\t{}\t{}\tcrm\t{}\t{}\t{}\t{}\t\\\\x{}\t{}\n",
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
            r.idempotency_key
                .as_deref()
                .map(esc)
                .unwrap_or_else(|| "\\N".into()),
            esc(&r.metadata.to_string()),
            r.payload_hash
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            r.operation_key,
        ));
    }
    out.into_bytes()
}

pub async fn run_copy(
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
            let mut copy = conn.copy_in_raw(COPY_SQL.as_str()).await.unwrap();
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

/// (c) The raw limit of everything the handler writes since migration 0006: `COPY` of the event
/// rows and of their remembered dedup keys into the open key generation, in one transaction.
pub async fn run_copy_with_keys(
    owner: &PgPool,
    work: Vec<Vec<Prepared>>,
    tenant: &Tenant,
    batch: usize,
    callers: usize,
) -> Row {
    let events: usize = work.iter().map(Vec::len).sum();
    let generation: i32 =
        sqlx::query_scalar("SELECT generation FROM usage_key_generations WHERE closed_at IS NULL")
            .fetch_one(owner)
            .await
            .unwrap();
    let payloads: Vec<(Vec<u8>, Vec<u8>)> = work
        .iter()
        .enumerate()
        .map(|(b, rows)| {
            // The key rows point at a (day, seq) of their own: the key table has no foreign
            // key, and the write costs the same.
            let mut keys = String::new();
            for (i, r) in rows.iter().enumerate() {
                for key in &r.remembered {
                    keys.push_str(&format!(
                        "{generation}\t{key}\t{}\t{}\t{}\n",
                        tenant.id,
                        r.occurred_at.to_rfc3339(),
                        (b * 100_000 + i) as i64
                    ));
                }
            }
            (copy_text(rows, tenant), keys.into_bytes())
        })
        .collect();
    let pool = owner.clone();
    peak_rss_reset();
    let (elapsed, latencies) = run_concurrently(
        payloads,
        callers,
        move |_, (events, keys): (Vec<u8>, Vec<u8>)| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let mut copy = tx.copy_in_raw(COPY_SQL.as_str()).await.unwrap();
                copy.send(events).await.unwrap();
                copy.finish().await.unwrap();
                let mut copy = tx
                    .copy_in_raw(
                        "COPY usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq) \
                         FROM STDIN",
                    )
                    .await
                    .unwrap();
                copy.send(keys).await.unwrap();
                copy.finish().await.unwrap();
                tx.commit().await.unwrap();
            }
        },
    )
    .await;
    Row {
        workload: "(c) COPY events + keys",
        batch,
        callers,
        events,
        elapsed,
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}
