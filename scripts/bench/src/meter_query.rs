//! The meter query (`GET /api/v1/meters/{slug}/query`) at its bound: `BENCH_METER_EVENTS`
//! (1,000,000, the most one query reads) events of one metric over 30 days, 90 % of them the
//! meter's CloudEvents type, through the real handler in-process — the whole range, per day and
//! groupBy key, per hour for one subject — beside the floor: the plain sum of the same rows'
//! quantities in SQL (one index range, no grouping), in the same run. Each query timed, median of
//! `BENCH_REPEAT` rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, SecondsFormat, Utc};
use ingest_usage::App;
use meterbridge::domain::meter::MeterDefinition;
use meterbridge::domain::Trust;
use meterbridge::repo::meters;
use meterbridge::repo::usage_settings::Change;
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::json;
use sqlx::PgPool;

use crate::measure::{median, peak_rss_kib, peak_rss_reset, Row};

const METRIC: &str = "api.requests";
const DAYS: i64 = 30;

pub fn events() -> usize {
    std::env::var("BENCH_METER_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// A tenant with a meter (`tokens`, type `prompt`, quantity at `$.tokens`, groupBy `model`) and
/// `n` events of its metric over the 30 days before `end`: 90 % of type `prompt`, 10 % of
/// another type (read by the query, counted in no value), 50 subjects, two models.
async fn seed(owner: &PgPool, n: usize, end: DateTime<Utc>) -> (uuid::Uuid, String) {
    let tenant = create_tenant(owner, "bench-meter").await;
    let key = create_api_key(owner, &tenant, "crm", Trust::Internal).await;
    let mut conn = owner.acquire().await.unwrap();
    let change = Change {
        tenant: tenant.id,
        actor: "bench",
        reason: "bench",
    };
    let meter = MeterDefinition {
        slug: "tokens".into(),
        event_type: "prompt".into(),
        metric: METRIC.into(),
        value_property: Some("$.tokens".into()),
        group_by: [("model".to_owned(), "$.model".to_owned())].into(),
    };
    meters::set(&mut conn, &change, &meter).await.unwrap();
    let start = end - chrono::Duration::days(DAYS);
    sqlx::query(
        "SELECT count(usage_events_create_partition(d::date))
           FROM generate_series($1::timestamptz, $2::timestamptz, interval '1 day') d",
    )
    .bind(start)
    .bind(end)
    .execute(owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at, actor_id,
                                   source_service, correlation_id, classification, metadata,
                                   payload_hash, operation_key)
         SELECT $1, 'ce:' || i, $2, 1 + i % 100,
                $3::timestamptz + (i * ($4::float8 / $5)) * interval '1 second',
                'actor-' || (i % 50), 'crm', 'ce:' || i, 'BILLABLE',
                jsonb_build_object('model', CASE WHEN i % 2 = 0 THEN 'small' ELSE 'big' END,
                                   'cloudevents', jsonb_build_object('source', 'gateway',
                                       'type', CASE WHEN i % 10 = 0 THEN 'other' ELSE 'prompt' END)),
                sha256(('ce:' || i)::bytea), gen_random_uuid()
           FROM generate_series(0, $5 - 1) i",
    )
    .bind(tenant.id)
    .bind(METRIC)
    .bind(start)
    .bind((end - start).num_seconds() as f64)
    .bind(n as i64)
    .execute(owner)
    .await
    .unwrap();
    sqlx::query("ANALYZE usage_events")
        .execute(owner)
        .await
        .unwrap();
    (tenant.id.0, key.key)
}

fn get(key: &str, query: &str) -> lambda_http::Request {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/query-meter.json"
    ))
    .unwrap();
    let mut e: serde_json::Value = serde_json::from_str(&template).unwrap();
    let path = "/api/v1/meters/tokens/query";
    e["headers"]["authorization"] = json!(format!("Bearer {key}"));
    e["rawPath"] = json!(path);
    e["requestContext"]["http"]["path"] = json!(path);
    e["rawQueryString"] = json!(query);
    e.as_object_mut().unwrap().remove("queryStringParameters");
    lambda_http::request::from_str(&e.to_string()).unwrap()
}

fn row(workload: &'static str, events: usize, latency: Duration) -> Row {
    Row {
        workload,
        batch: 1,
        callers: 1,
        events,
        elapsed: latency,
        latencies: vec![latency],
        peak_rss_kib: peak_rss_kib(),
    }
}

pub async fn run(owner: &PgPool, app: &Arc<App>, repeat: usize) -> Vec<Row> {
    let n = events();
    // A fixed range: a day boundary 2 days ago, so the storage window holds every partition.
    let end = Utc::now()
        .duration_trunc(chrono::Duration::days(1))
        .unwrap()
        - chrono::Duration::days(2);
    let (tenant, key) = seed(owner, n, end).await;
    let ts = |at: DateTime<Utc>| at.to_rfc3339_opts(SecondsFormat::Secs, true);
    let from = ts(end - chrono::Duration::days(DAYS));
    let to = ts(end);
    let shapes: [(&'static str, String); 3] = [
        ("meter query: whole range", format!("from={from}&to={to}")),
        (
            "meter query: DAY x model",
            format!("from={from}&to={to}&windowSize=DAY&groupBy=model"),
        ),
        (
            "meter query: HOUR, 1 subject",
            format!("from={from}&to={to}&windowSize=HOUR&subject=actor-7"),
        ),
    ];
    let _ = ingest_usage::handle(app, get(&key, &shapes[0].1)).await;
    let mut rows = Vec::new();
    let mut floor = Vec::new();
    let mut runs: Vec<Vec<Row>> = shapes.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeat {
        peak_rss_reset();
        let t = Instant::now();
        let total: Option<String> = sqlx::query_scalar(
            "SELECT sum(quantity)::text FROM usage_events
              WHERE tenant_id = $1 AND metric = $2 AND occurred_at >= $3 AND occurred_at < $4",
        )
        .bind(tenant)
        .bind(METRIC)
        .bind(end - chrono::Duration::days(DAYS))
        .bind(end)
        .fetch_one(owner)
        .await
        .unwrap();
        floor.push(row("SQL sum, same rows (floor)", n, t.elapsed()));
        assert!(total.is_some());
        for (i, (workload, query)) in shapes.iter().enumerate() {
            peak_rss_reset();
            let t = Instant::now();
            let response = ingest_usage::handle(app, get(&key, query)).await;
            let latency = t.elapsed();
            assert_eq!(response.status(), 200, "{workload}: {:?}", response.body());
            runs[i].push(row(workload, n, latency));
        }
    }
    rows.push(median(floor));
    rows.extend(runs.into_iter().map(median));
    rows
}
