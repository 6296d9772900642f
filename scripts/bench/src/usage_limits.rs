//! Usage limits in the ingest workload: the handler's rate for a tenant with a monthly limit
//! and three thresholds on every metric of the catalog (so every counter a batch changes is
//! checked for a crossing), beside the same workload for a tenant without limits; and the
//! limits read (`GET /v1/usage/limits`, one Redis round trip) beside the realtime read
//! (`GET /v1/usage/realtime`, also one Redis script), in-process, each request timed.

use std::sync::Arc;
use std::time::Instant;

use ingest_usage::App;
use meterbridge::auth::NewApiKey;
use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::domain::{MetricCatalog, Trust};
use meterbridge::repo::usage_limits;
use meterbridge::repo::usage_settings::Change;
use meterbridge::testing::{create_api_key, create_tenant};
use serde_json::json;
use sqlx::PgPool;

use crate::measure::{peak_rss_kib, peak_rss_reset, Row};

pub const LIMITED: &str = "limits: 3 thresholds/metric";
pub const LIMITS_READ: &str = "GET /v1/usage/limits";
pub const REALTIME_READ: &str = "GET /v1/usage/realtime";

/// A tenant with a monthly limit, thresholds 50/80/100 %, on every metric of the catalog. The
/// limit is never reached in the run, so what is measured is the detection on every batch; a
/// crossing itself costs one short transaction per threshold and period.
pub async fn limited_tenant(owner: &PgPool, catalog: &MetricCatalog) -> NewApiKey {
    let tenant = create_tenant(owner, "bench-limits").await;
    let key = create_api_key(owner, &tenant, "crm", Trust::Internal).await;
    let mut conn = owner.acquire().await.unwrap();
    let change = Change {
        tenant: tenant.id,
        actor: "bench",
        reason: "bench",
    };
    for metric in catalog.names() {
        let limit = UsageLimit::new(
            metric,
            LimitPeriod::Monthly,
            1_000_000_000_000_000,
            Some(vec![50, 80, 100]),
        )
        .unwrap();
        usage_limits::set(&mut conn, &change, &limit).await.unwrap();
    }
    key
}

fn get(key: &str, path: &str) -> lambda_http::Request {
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../events/ingest-usage/usage-limits.json"
    ))
    .unwrap();
    let mut e: serde_json::Value = serde_json::from_str(&template).unwrap();
    e["headers"]["authorization"] = json!(format!("Bearer {key}"));
    e["rawPath"] = json!(path);
    e["requestContext"]["http"]["path"] = json!(path);
    lambda_http::request::from_str(&e.to_string()).unwrap()
}

/// `n` sequential reads of `path` through the handler, each timed.
pub async fn reads(app: &Arc<App>, key: &str, path: &str, n: usize, workload: &'static str) -> Row {
    // Warm: the key cache, the catalog, the tenant's limits, the connections.
    let _ = ingest_usage::handle(app, get(key, path)).await;
    let requests: Vec<lambda_http::Request> = (0..n).map(|_| get(key, path)).collect();
    peak_rss_reset();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for request in requests {
        let t = Instant::now();
        let response = ingest_usage::handle(app, request).await;
        latencies.push(t.elapsed());
        assert_eq!(response.status(), 200, "{path} failed during the benchmark");
    }
    Row {
        workload,
        batch: 1,
        callers: 1,
        events: n,
        elapsed: started.elapsed(),
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}
