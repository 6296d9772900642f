//! The relay workload: outbox rows relayed to a local PutEvents endpoint (an in-process HTTP
//! server that answers like EventBridge, for measuring only) beside the raw limit — the same
//! claim and mark statements with no publishing; and the fast path's latency, verify request
//! to PutEvents accepted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meterbridge::config::{Config, Env};
use meterbridge::domain::Tenant;
use meterbridge::relay::{Relay, RelayConfig};
use meterbridge::repo::outbox;
use meterbridge::{Database, Services};
use serde_json::{json, Value};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::measure::{peak_rss_kib, peak_rss_reset, Row};

pub const RELAY: &str = "relay: to PutEvents";
pub const RAW: &str = "relay: claim+mark only";
pub const FAST_PATH: &str = "verify + fast path";

/// A local endpoint that accepts every PutEvents entry; returns its URL.
pub async fn local_eventbridge() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let entries = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v["Entries"].as_array().map(Vec::len))
                            .unwrap_or(0);
                        let results: Vec<Value> = (0..entries)
                            .map(|_| json!({"EventId": Uuid::new_v4()}))
                            .collect();
                        let answer = json!({"FailedEntryCount": 0, "Entries": results}).to_string();
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .header("content-type", "application/x-amz-json-1.1")
                                .body(Full::new(Bytes::from(answer)))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

/// An SDK configuration for the local endpoint.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "bench", "bench", None, None, "bench",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// An emptied outbox and `count` PENDING rows, one per aggregate.
pub async fn seed(owner: &PgPool, tenant: &Tenant, count: usize) {
    for statement in [
        "TRUNCATE outbox_events",
        "VACUUM ANALYZE outbox_events",
        "CHECKPOINT",
    ] {
        sqlx::query(statement).execute(owner).await.unwrap();
    }
    sqlx::query(
        "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service)
         SELECT $1, e, 'payment.paid', 1,
                jsonb_build_object('eventId', e, 'eventType', 'payment.paid', 'schemaVersion', 1,
                                   'data', jsonb_build_object('paymentId', e, 'amountMinor', 4999,
                                                              'currency', 'USD')),
                'bench', 'payment-paid-' || e, 'payment', e, 1, 'crm'
           FROM (SELECT gen_random_uuid() AS e FROM generate_series(1, $2::int)) AS s",
    )
    .bind(tenant.id)
    .bind(count as i32)
    .execute(owner)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox_events")
        .execute(owner)
        .await
        .unwrap();
}

fn config(endpoint_bus: &str) -> RelayConfig {
    RelayConfig {
        event_bus_name: endpoint_bus.into(),
        deadline_margin: Duration::ZERO,
        ..RelayConfig::default()
    }
}

pub async fn run_relay(ops: &PgPool, endpoint: &str, count: usize) -> Row {
    let sdk = sdk_config(endpoint).await;
    let events = Relay::eventbridge_client(&sdk, Duration::from_secs(10));
    let relay = Relay::new(Database::from_pool(ops.clone()), events, config("bench"));
    peak_rss_reset();
    let started = Instant::now();
    let report = relay
        .run(Instant::now() + Duration::from_secs(600))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(report.published as usize, count, "{report:?}");
    Row {
        workload: RELAY,
        batch: config("bench").batch_size as usize,
        callers: config("bench").workers,
        events: count,
        elapsed,
        latencies: vec![elapsed / count.max(1) as u32],
        peak_rss_kib: peak_rss_kib(),
    }
}

/// The raw limit: the relay's own claim and mark statements, with the same batch and the same
/// number of workers, and no publishing in between.
pub async fn run_raw(ops: &PgPool, count: usize) -> Row {
    let c = config("bench");
    peak_rss_reset();
    let started = Instant::now();
    let workers = (0..c.workers).map(|_| {
        let ops = ops.clone();
        let c = c.clone();
        tokio::spawn(async move {
            let mut done = 0;
            let run_started = chrono::Utc::now();
            loop {
                let token = Uuid::new_v4();
                let mut conn = ops.acquire().await.unwrap();
                let claimed = outbox::claim_due(
                    &mut conn,
                    token,
                    c.lease.as_secs_f64(),
                    c.batch_size,
                    run_started,
                )
                .await
                .unwrap();
                if claimed.is_empty() {
                    return done;
                }
                let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
                done += outbox::mark_published(&mut conn, token, &ids)
                    .await
                    .unwrap() as usize;
            }
        })
    });
    let done: usize = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    let elapsed = started.elapsed();
    assert_eq!(done, count);
    Row {
        workload: RAW,
        batch: c.batch_size as usize,
        callers: c.workers,
        events: count,
        elapsed,
        latencies: vec![elapsed / count.max(1) as u32],
        peak_rss_kib: peak_rss_kib(),
    }
}

/// Verifications through the handler with the fast path on, publishing to the local endpoint:
/// each request returns after its event was accepted by PutEvents (or given back), so its
/// latency bounds the time from request to accepted event.
pub async fn run_fast_path(api_url: &str, endpoint: &str, key: &str, payments: Vec<Uuid>) -> Row {
    let count = payments.len();
    let vars: HashMap<String, String> = [
        ("DATABASE_URL".to_owned(), api_url.to_owned()),
        ("EVENT_BUS_NAME".to_owned(), "bench".to_owned()),
    ]
    .into_iter()
    .collect();
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let services = Services::build_with_aws(
        Config::from(&env, "bench").unwrap(),
        Some(sdk_config(endpoint).await),
    )
    .await
    .unwrap();
    let app = Arc::new(verify_payment::App::new(
        services,
        verify_payment::PaymentsConfig::from(&env).unwrap(),
    ));
    let (requests, warm) = crate::verify::verify_requests(key, &payments);
    let _ = verify_payment::handle(&app, lambda_http::request::from_str(&warm).unwrap()).await;
    peak_rss_reset();
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    for request in requests {
        let t = Instant::now();
        let response = verify_payment::handle(&app, request).await;
        assert_eq!(response.status(), 200);
        latencies.push(t.elapsed());
    }
    Row {
        workload: FAST_PATH,
        batch: 1,
        callers: 1,
        events: count,
        elapsed: started.elapsed(),
        latencies,
        peak_rss_kib: peak_rss_kib(),
    }
}
