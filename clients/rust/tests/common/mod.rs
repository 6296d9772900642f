//! The real stack in-process: an HTTP server on 127.0.0.1 that turns each request into the API
//! Gateway (HTTP API, payload 2.0) event Lambda would deliver and hands it to the real
//! `ingest-usage` handler (or, for `/v1/payments…`, the real `verify-payment` handler), both
//! built as in Lambda against the test's own database (PostgreSQL, as the functions' roles) and
//! Redis. In front of the handlers, a fault switch: refuse connections, answer scripted
//! statuses instead of the handler, or answer slowly. Every request is logged with its times.
//!
//! The server runs on a multi-thread runtime of its own, so it answers while the test's
//! runtime (where the client runs) is busy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use meterbridge::auth::NewApiKey;
use meterbridge::config::{Config, Env};
use meterbridge::domain::{Tenant, Trust};
use meterbridge::testing::{
    create_api_key, create_tenant, database_url_as, redis_url, request_from_json, require_redis,
    INGEST_ROLE, PAYMENTS_ROLE,
};
use meterbridge::Services;
use meterbridge_client::{Client, ClientBuilder, Outcome, Status};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::task::{AbortHandle, JoinHandle};

/// An answer the server gives instead of calling the handler.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Scripted {
    /// A problem+json answer with `status` and `code`, and extra headers.
    pub fn problem(status: u16, code: &str, headers: &[(&str, &str)]) -> Scripted {
        Scripted {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: json!({"type": format!("https://meterbridge.dev/problems/{code}"),
                         "title": code, "status": status, "detail": "injected by the test",
                         "code": code})
            .to_string(),
        }
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub received: Instant,
    /// The wall clock when it arrived (to compare with an HTTP-date `Retry-After`).
    pub received_at: std::time::SystemTime,
    pub answered: Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub retry_after: Option<String>,
    /// Events in a POST /v1/usage/events body.
    pub events: usize,
    /// The `x-correlation-id` the client sent.
    pub correlation_id: Option<String>,
    pub scripted: bool,
}

#[derive(Default)]
struct Faults {
    /// Answers for the next POSTs to /v1/usage/events, in order, instead of the handler.
    scripted: VecDeque<Scripted>,
    /// Added before the handler answers a POST to /v1/usage/events.
    delay: Duration,
    /// Headers added to the next answers of the handler to POSTs to /v1/usage/events.
    decorations: VecDeque<Vec<(String, String)>>,
}

struct State {
    ingest: ingest_usage::App,
    payments: verify_payment::App,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Logged>>,
    /// When each POST to /v1/usage/events arrived (logged before it is answered).
    arrivals: Mutex<Vec<Instant>>,
    /// The body of fixtures/post-events.json: the shape of every request made here.
    template: Value,
}

/// The in-process HTTP server in front of the real handlers.
pub struct Server {
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
    accept: Mutex<Option<JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("cannot listen on {addr} again: {e}"));
    socket.listen(1024).unwrap()
}

impl Server {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().unwrap()
    }

    async fn start(owner: &PgPool) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let ingest_url = database_url_as(owner, INGEST_ROLE);
        let payments_url = database_url_as(owner, PAYMENTS_ROLE);
        let (ingest, payments, listener) = runtime
            .spawn(async move {
                let ingest = ingest_app(ingest_url).await;
                let payments = payments_app(payments_url).await;
                let listener = listen("127.0.0.1:0".parse().unwrap());
                (ingest, payments, listener)
            })
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let template_text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../events/ingest-usage/post-events.json"),
        )
        .unwrap();
        let state = Arc::new(State {
            ingest,
            payments,
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
            template: serde_json::from_str(&template_text).unwrap(),
        });
        let server = Server {
            addr,
            url: format!("http://{addr}"),
            state,
            runtime: Some(runtime),
            accept: Mutex::new(None),
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let state = Arc::clone(&self.state);
        let connections = Arc::clone(&self.connections);
        let handle = self.runtime().handle().clone();
        let accept = self.runtime().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                let connection = handle.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, hyper::Error>(answer(&state, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                connections.lock().unwrap().push(connection.abort_handle());
            }
        });
        *self.accept.lock().unwrap() = Some(accept);
    }

    /// Stops listening and closes every open connection: connecting is refused until `up`.
    pub async fn down(&self) {
        let accept = self.accept.lock().unwrap().take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
        // The aborted tasks (and their sockets) are dropped by the server's runtime.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Listens again on the same address.
    pub async fn up(&self) {
        let addr = self.addr;
        let listener = self
            .runtime()
            .spawn(async move { listen(addr) })
            .await
            .unwrap();
        self.serve(listener);
    }

    /// The next POSTs to /v1/usage/events get these answers instead of the handler's.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.state.faults.lock().unwrap().scripted.extend(answers);
    }

    /// Every POST to /v1/usage/events waits this long before the handler answers.
    pub fn delay(&self, delay: Duration) {
        self.state.faults.lock().unwrap().delay = delay;
    }

    /// The handler's next answers to POSTs to /v1/usage/events get these headers too.
    pub fn decorate(&self, headers: &[(&str, &str)]) {
        self.state.faults.lock().unwrap().decorations.push_back(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// When each POST to /v1/usage/events arrived, answered or not.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.state.arrivals.lock().unwrap().clone()
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }

    /// The logged POSTs to /v1/usage/events.
    pub fn posts(&self) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.method == "POST" && l.path == "/v1/usage/events")
            .collect()
    }

    pub fn payments_app(&self) -> &verify_payment::App {
        &self.state.payments
    }
}

async fn ingest_app(database_url: String) -> ingest_usage::App {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url);
    vars.insert("REDIS_URL".into(), redis_url());
    vars.insert("DB_ACQUIRE_TIMEOUT_MS".into(), "5000".into());
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let config = Config::from(&env, "ingest-usage").unwrap();
    let ingest = ingest_usage::IngestConfig::from(&env).unwrap();
    let services = Services::build_with_aws(config, None)
        .await
        .unwrap()
        .with_clock(meterbridge::testing::clock());
    ingest_usage::App::new(services, ingest)
}

async fn payments_app(database_url: String) -> verify_payment::App {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url);
    vars.insert("DB_ACQUIRE_TIMEOUT_MS".into(), "5000".into());
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let config = Config::from(&env, "verify-payment").unwrap();
    let payments = verify_payment::PaymentsConfig::from(&env).unwrap();
    let services = Services::build_with_aws(config, None)
        .await
        .unwrap()
        .with_clock(meterbridge::testing::clock());
    verify_payment::App::new(services, payments)
}

type Answer = hyper::Response<Full<Bytes>>;

async fn answer(state: &State, request: hyper::Request<Incoming>) -> Answer {
    let received = Instant::now();
    let received_at = std::time::SystemTime::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let method = parts.method.to_string();
    let path = parts.uri.path().to_owned();
    let is_post_events = method == "POST" && path == "/v1/usage/events";
    let events = if is_post_events {
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["events"].as_array().map(Vec::len))
            .unwrap_or(0)
    } else {
        0
    };
    if is_post_events {
        state.arrivals.lock().unwrap().push(received);
    }
    let (scripted, delay) = if is_post_events {
        let mut faults = state.faults.lock().unwrap();
        (faults.scripted.pop_front(), faults.delay)
    } else {
        (None, Duration::ZERO)
    };
    let was_scripted = scripted.is_some();
    let response = match scripted {
        Some(scripted) => {
            let mut builder = hyper::Response::builder()
                .status(scripted.status)
                .header("content-type", "application/problem+json");
            for (name, value) in &scripted.headers {
                // `date+N`: an HTTP date N seconds from now, made when answering.
                let value = match value.strip_prefix("date+") {
                    Some(secs) => httpdate::fmt_http_date(
                        std::time::SystemTime::now() + Duration::from_secs(secs.parse().unwrap()),
                    ),
                    None => value.clone(),
                };
                builder = builder.header(name, value);
            }
            builder.body(Full::new(Bytes::from(scripted.body))).unwrap()
        }
        None => {
            tokio::time::sleep(delay).await;
            let event = apigw_event(&state.template, &parts, &body);
            let request = request_from_json(&event.to_string());
            let response = if path.starts_with("/v1/payments") {
                verify_payment::handle(&state.payments, request).await
            } else {
                ingest_usage::handle(&state.ingest, request).await
            };
            let mut response = to_hyper(response);
            if is_post_events {
                let decoration = state.faults.lock().unwrap().decorations.pop_front();
                for (name, value) in decoration.unwrap_or_default() {
                    response.headers_mut().insert(
                        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        http::HeaderValue::from_str(&value).unwrap(),
                    );
                }
            }
            response
        }
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.log.lock().unwrap().push(Logged {
        received,
        received_at,
        answered: Instant::now(),
        method,
        path,
        status: response.status().as_u16(),
        retry_after: response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        events,
        correlation_id: header("x-correlation-id"),
        scripted: was_scripted,
    });
    response
}

/// The API Gateway HTTP API (payload 2.0) event for a request, as Lambda delivers it.
fn apigw_event(template: &Value, parts: &http::request::Parts, body: &Bytes) -> Value {
    let mut event = template.clone();
    let method = parts.method.as_str();
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    event["routeKey"] = json!("$default");
    event["rawPath"] = json!(path);
    event["rawQueryString"] = json!(query);
    event["requestContext"]["http"]["method"] = json!(method);
    event["requestContext"]["http"]["path"] = json!(path);
    event["requestContext"]["routeKey"] = json!("$default");
    // queryStringParameters: decoded, a repeated name's values joined with commas.
    let parsed = reqwest::Url::parse(&format!("http://localhost/?{query}")).unwrap();
    let mut params = serde_json::Map::new();
    for (name, value) in parsed.query_pairs() {
        match params.get_mut(name.as_ref()) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            _ => {
                params.insert(name.into_owned(), json!(value));
            }
        }
    }
    if params.is_empty() {
        event
            .as_object_mut()
            .unwrap()
            .remove("queryStringParameters");
    } else {
        event["queryStringParameters"] = Value::Object(params);
    }
    // Headers: lower-case names, a repeated header's values joined with commas.
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push(',');
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), json!(value));
            }
        }
    }
    event["headers"] = Value::Object(headers);
    match std::str::from_utf8(body) {
        Ok(text) if !text.is_empty() => {
            event["body"] = json!(text);
            event["isBase64Encoded"] = json!(false);
        }
        Ok(_) => {
            event.as_object_mut().unwrap().remove("body");
            event["isBase64Encoded"] = json!(false);
        }
        Err(_) => {
            use base64::Engine;
            event["body"] = json!(base64::engine::general_purpose::STANDARD.encode(body));
            event["isBase64Encoded"] = json!(true);
        }
    }
    event
}

fn to_hyper(response: lambda_http::Response<lambda_http::Body>) -> Answer {
    let (parts, body) = response.into_parts();
    let bytes = match body {
        lambda_http::Body::Text(text) => Bytes::from(text),
        lambda_http::Body::Binary(binary) => Bytes::from(binary),
        _ => Bytes::new(),
    };
    let mut response = hyper::Response::new(Full::new(bytes));
    *response.status_mut() = parts.status;
    *response.headers_mut() = parts.headers;
    response
}

/// A test's tenant, its internal key, and the server in front of the real handlers.
pub struct Stack {
    pub owner: PgPool,
    pub tenant: Tenant,
    pub key: NewApiKey,
    pub server: Server,
    /// Unique per test: event ids start with it.
    pub run: String,
}

impl Stack {
    pub async fn new(owner: &PgPool) -> Stack {
        require_redis();
        meterbridge::testing::storage_as_of_now(owner).await;
        let tenant = create_tenant(owner, "client").await;
        let key = create_api_key(owner, &tenant, "crm", Trust::Internal).await;
        let server = Server::start(owner).await;
        Stack {
            owner: owner.clone(),
            tenant,
            key,
            server,
            run: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        }
    }

    /// A client of this stack's server with the tenant's internal key.
    pub fn client(&self) -> ClientBuilder {
        Client::builder(&self.server.url, &self.key.key)
    }

    /// Event `n` of this test: a unique id, `quantity` units of `api.requests`, now (by the
    /// tests' clock, never the wall clock's date).
    pub fn event(&self, n: usize, quantity: u64) -> meterbridge_client::Event {
        meterbridge_client::Event::new("api.requests", quantity)
            .event_id(format!("{}-{n}", self.run))
            .occurred_at(meterbridge::testing::now())
    }

    /// An event of `metric` with a client-assigned id.
    pub fn anonymous(&self, metric: &str, quantity: u64) -> meterbridge_client::Event {
        meterbridge_client::Event::new(metric, quantity).occurred_at(meterbridge::testing::now())
    }

    /// (rows, sum of quantities) of the tenant's stored usage events.
    pub async fn stored(&self) -> (i64, i64) {
        let (count, sum): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), sum(quantity)::int8 FROM usage_events WHERE tenant_id = $1",
        )
        .bind(self.tenant.id)
        .fetch_one(&self.owner)
        .await
        .unwrap();
        (count, sum.unwrap_or(0))
    }

    /// Rows of the tenant's usage events with this id.
    pub async fn stored_with_id(&self, event_id: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM usage_events WHERE tenant_id = $1 AND event_id = $2",
        )
        .bind(self.tenant.id)
        .bind(event_id)
        .fetch_one(&self.owner)
        .await
        .unwrap()
    }
}

/// Collects every outcome the callback sees.
#[derive(Clone, Default)]
pub struct Outcomes(Arc<Mutex<Vec<Outcome>>>);

impl Outcomes {
    pub fn callback(&self) -> impl Fn(&Outcome) + Send + Sync + 'static {
        let outcomes = Arc::clone(&self.0);
        move |outcome| outcomes.lock().unwrap().push(outcome.clone())
    }

    pub fn all(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn count(&self, status: Status) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.status == status)
            .count()
    }

    /// The outcome of the event with `id` (the only one).
    pub fn of(&self, id: &str) -> Outcome {
        let all: Vec<Outcome> = self
            .all()
            .into_iter()
            .filter(|o| o.event_id == id)
            .collect();
        assert_eq!(all.len(), 1, "outcomes of {id}: {all:?}");
        all.into_iter().next().unwrap()
    }
}
