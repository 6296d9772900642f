//! Shared set-up for the relay tests: a fresh database per test (#[sqlx::test]); an EventBridge
//! bus of the test's own in moto, routed by a rule to an SQS queue it reads back; and a small
//! fault-injecting HTTP proxy between the SDK and moto that fails chosen entries or whole calls
//! and records, in order, every entry EventBridge accepted.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meterbridge::config::{Config, Env};
use meterbridge::domain::Tenant;
use meterbridge::relay::RelayConfig;
pub use meterbridge::testing::Bus;
use meterbridge::testing::{
    create_tenant, database_url_as, moto_endpoint, moto_sdk_config, OPS_ROLE,
};
use meterbridge::Services;
use outbox_relay::App;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// Which entries (by their parsed Detail) a fault applies to.
pub type Matcher = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

/// What the proxy does to PutEvents calls.
#[derive(Default)]
pub struct Faults {
    /// The next this many calls fail whole, with (HTTP status, error type).
    pub fail_calls: usize,
    pub call_failure: Option<(u16, String)>,
    /// Entries whose detail matches get this per-entry error code (and are not forwarded).
    pub entry_faults: Vec<(Matcher, String)>,
}

struct ProxyState {
    upstream: String,
    faults: Mutex<Faults>,
    /// Details of the entries accepted, in the order accepted.
    accepted: Mutex<Vec<Value>>,
    /// Every PutEvents call: how many entries it carried.
    calls: Mutex<Vec<usize>>,
    /// Answer accepted entries here instead of forwarding to moto (for volume tests).
    local: bool,
}

pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// A proxy in front of moto.
    pub async fn start() -> Proxy {
        Self::start_with(false).await
    }

    /// A proxy that answers like EventBridge itself (every forwarded entry accepted).
    pub async fn start_local() -> Proxy {
        Self::start_with(true).await
    }

    async fn start_with(local: bool) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream: moto_endpoint(),
            faults: Mutex::new(Faults::default()),
            accepted: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            local,
        });
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&serving);
                let client = client.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        let client = client.clone();
                        async move { Ok::<_, hyper::Error>(handle(&state, &client, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Proxy {
            url: format!("http://{addr}"),
            state,
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock().unwrap() = faults;
    }

    pub fn accepted(&self) -> Vec<Value> {
        self.state.accepted.lock().unwrap().clone()
    }

    pub fn calls(&self) -> Vec<usize> {
        self.state.calls.lock().unwrap().clone()
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn handle(
    state: &ProxyState,
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if target != "AWSEvents.PutEvents" {
        return forward(state, client, parts, body).await.1;
    }
    let mut request: Value = serde_json::from_slice(&body).unwrap();
    let entries: Vec<Value> = request["Entries"].as_array().cloned().unwrap_or_default();
    state.calls.lock().unwrap().push(entries.len());
    // Whole-call failures, and per-entry faults decided before anything is forwarded.
    let mut failed: HashMap<usize, String> = HashMap::new();
    {
        let mut faults = state.faults.lock().unwrap();
        if faults.fail_calls > 0 {
            faults.fail_calls -= 1;
            let (status, kind) = faults
                .call_failure
                .clone()
                .unwrap_or((500, "InternalException".into()));
            return reply(
                status,
                json!({"__type": kind, "message": "injected by the test proxy"}),
            );
        }
        for (i, entry) in entries.iter().enumerate() {
            let detail: Value = serde_json::from_str(entry["Detail"].as_str().unwrap_or("{}"))
                .unwrap_or(Value::Null);
            if let Some((_, code)) = faults
                .entry_faults
                .iter()
                .find(|(matches, _)| matches(&detail))
            {
                failed.insert(i, code.clone());
            }
        }
    }
    let forwarded: Vec<(usize, Value)> = entries
        .iter()
        .cloned()
        .enumerate()
        .filter(|(i, _)| !failed.contains_key(i))
        .collect();
    let mut upstream_results: Vec<Value> = Vec::new();
    if !forwarded.is_empty() {
        if state.local {
            upstream_results = forwarded
                .iter()
                .map(|_| json!({"EventId": Uuid::new_v4().to_string()}))
                .collect();
        } else {
            request["Entries"] = Value::Array(forwarded.iter().map(|(_, e)| e.clone()).collect());
            let (status, response) =
                forward(state, client, parts, Bytes::from(request.to_string())).await;
            if status != 200 {
                return response;
            }
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let answer: Value = serde_json::from_slice(&body).unwrap();
            upstream_results = answer["Entries"].as_array().cloned().unwrap_or_default();
        }
    }
    // Merge: the injected failures and moto's answers, in the caller's order.
    let mut upstream = upstream_results.into_iter();
    let mut results = Vec::new();
    let mut failed_count = 0;
    for (i, entry) in entries.iter().enumerate() {
        match failed.get(&i) {
            Some(code) => {
                failed_count += 1;
                results
                    .push(json!({"ErrorCode": code, "ErrorMessage": "injected by the test proxy"}));
            }
            None => {
                let result = upstream
                    .next()
                    .unwrap_or(json!({"ErrorCode": "InternalFailure"}));
                if result.get("ErrorCode").is_some() {
                    failed_count += 1;
                } else {
                    let detail: Value =
                        serde_json::from_str(entry["Detail"].as_str().unwrap_or("{}")).unwrap();
                    state.accepted.lock().unwrap().push(detail);
                }
                results.push(result);
            }
        }
    }
    reply(
        200,
        json!({"FailedEntryCount": failed_count, "Entries": results}),
    )
}

async fn forward(
    state: &ProxyState,
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    parts: hyper::http::request::Parts,
    body: Bytes,
) -> (u16, Response<Full<Bytes>>) {
    let uri = format!(
        "{}{}",
        state.upstream,
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut builder = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != "host" && name != "content-length" {
            builder = builder.header(name, value);
        }
    }
    let response = client
        .request(builder.body(Full::new(body)).unwrap())
        .await
        .expect("moto answers");
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (status, Response::from_parts(parts, Full::new(body)))
}

/// A relay App as the Lambda builds it (as meterbridge_ops), publishing through `endpoint`.
pub async fn relay_app(
    owner: &PgPool,
    endpoint: &str,
    bus: &str,
    overrides: &[(&str, &str)],
) -> App {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url_as(owner, OPS_ROLE));
    vars.insert("EVENT_BUS_NAME".into(), bus.into());
    vars.insert("RELAY_BACKOFF_BASE_MS".into(), "1".into());
    vars.insert("RELAY_BACKOFF_CAP_SECONDS".into(), "1".into());
    vars.insert("RELAY_DEADLINE_MARGIN_MS".into(), "0".into());
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let config = Config::from(&env, "outbox-relay").unwrap();
    let relay = RelayConfig::from(&env).unwrap();
    let sdk = moto_sdk_config()
        .await
        .into_builder()
        .endpoint_url(endpoint)
        .build();
    let services = Services::build_with_aws(config, Some(sdk)).await.unwrap();
    App::new(services, relay).await
}

/// A deadline far enough away for any test run.
pub fn later() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(120)
}

/// Writes `count` events for each of `aggregates` new aggregates (sequence 1..=count) of a
/// fresh tenant, PENDING, as the payment transition would; returns the tenant.
pub async fn seed_events(owner: &PgPool, aggregates: usize, count: usize) -> Tenant {
    let tenant = create_tenant(owner, "relay").await;
    sqlx::query(
        "WITH e AS (
             SELECT a.id AS aggregate_id, s AS sequence, gen_random_uuid() AS event_id
               FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, $2::int)) AS a,
                    generate_series(1, $3::int) AS s)
         INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service)
         SELECT $1, e.event_id, 'payment.paid', 1,
                jsonb_build_object('eventId', e.event_id, 'eventType', 'payment.paid',
                                   'aggregateId', e.aggregate_id,
                                   'aggregateSequence', e.sequence,
                                   'data', jsonb_build_object('n', e.sequence)),
                'test', 'k-' || e.aggregate_id || '-' || e.sequence, 'payment', e.aggregate_id,
                e.sequence, 'test'
           FROM e ORDER BY e.aggregate_id, e.sequence",
    )
    .bind(tenant.id)
    .bind(aggregates as i32)
    .bind(count as i32)
    .execute(owner)
    .await
    .unwrap();
    tenant
}

pub async fn statuses(owner: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT status, count(*) FROM outbox_events GROUP BY status")
        .fetch_all(owner)
        .await
        .unwrap()
        .into_iter()
        .collect()
}
