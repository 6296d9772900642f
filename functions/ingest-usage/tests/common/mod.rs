//! Shared set-up for the ingestion tests: a fresh database per test (via #[sqlx::test]), a fresh
//! tenant with keys, the app built exactly as in Lambda (config from variables), and requests
//! made from the fixtures in events/ingest-usage/.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use ingest_usage::{App, IngestConfig};
use lambda_http::Request;
use meterbridge::auth::NewApiKey;
use meterbridge::config::{Config, Env};
use meterbridge::domain::{Tenant, Trust};
use meterbridge::repo::{api_keys, tenants};
use meterbridge::testing::{
    create_api_key, create_tenant, database_url_as, redis_url, render, require_redis, INGEST_ROLE,
};
pub use meterbridge::testing::{percent_encode, request_from_json, Reply};
use meterbridge::Services;
use serde_json::Value;
use sqlx::PgPool;

pub struct Fixture {
    pub owner: PgPool,
    pub tenant: Tenant,
    pub internal: NewApiKey,
    pub external: NewApiKey,
    pub revoked: NewApiKey,
    pub disabled_tenant_key: NewApiKey,
    /// Unique per test: fixture event ids are `<run>-evt-N`.
    pub run: String,
    /// `{{NOW}}` in fixtures: fixed per test, so a resent fixture is the same payload.
    pub now: chrono::DateTime<chrono::Utc>,
}

impl Fixture {
    pub async fn new(owner: &PgPool) -> Fixture {
        require_redis();
        meterbridge::testing::storage_as_of_now(owner).await;
        let tenant = create_tenant(owner, "acme").await;
        let internal = create_api_key(owner, &tenant, "crm", Trust::Internal).await;
        let external = create_api_key(owner, &tenant, "web-widget", Trust::External).await;
        let revoked = create_api_key(owner, &tenant, "crm", Trust::Internal).await;
        api_keys::revoke(owner, &revoked.prefix).await.unwrap();
        let disabled = create_tenant(owner, "gone").await;
        let disabled_tenant_key = create_api_key(owner, &disabled, "crm", Trust::Internal).await;
        tenants::disable(owner, &disabled.slug).await.unwrap();
        Fixture {
            owner: owner.clone(),
            tenant,
            internal,
            external,
            revoked,
            disabled_tenant_key,
            run: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            now: meterbridge::testing::now(),
        }
    }

    /// The app as the Lambda builds it, as the API role, with variable overrides.
    pub async fn app(&self, overrides: &[(&str, &str)]) -> App {
        app_with(&self.owner, overrides).await
    }

    /// The app reading "now" from `clock` instead of the tests' clock.
    pub async fn app_by(&self, clock: std::sync::Arc<dyn meterbridge::clock::Clock>) -> App {
        let App {
            services, config, ..
        } = app_with(&self.owner, &[]).await;
        App::new(services.with_clock(clock), config)
    }

    pub fn placeholders(&self) -> Vec<(&'static str, String)> {
        let now = self.now;
        vec![
            ("INTERNAL_KEY", self.internal.key.clone()),
            ("EXTERNAL_KEY", self.external.key.clone()),
            ("REVOKED_KEY", self.revoked.key.clone()),
            ("DISABLED_TENANT_KEY", self.disabled_tenant_key.key.clone()),
            (
                "NOW",
                now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
            ("TODAY", now.date_naive().to_string()),
            ("RUN", self.run.clone()),
        ]
    }

    /// A request from a fixture file with the placeholders filled in.
    pub fn fixture(&self, name: &str) -> Request {
        let values = self.placeholders();
        let pairs: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request_from_json(&render(&fixture_text(name), &pairs))
    }

    /// POST /v1/usage/events with `body`, authenticated with `key`.
    pub fn post(&self, key: &str, body: &Value) -> Request {
        self.post_raw(key, &body.to_string())
    }

    /// POST /v1/usage/events with `body` and the internal key, and the reply.
    pub async fn submit(&self, app: &App, body: Value) -> Reply {
        send(app, self.post(&self.internal.key, &body)).await
    }

    pub fn post_raw(&self, key: &str, body: &str) -> Request {
        let mut event: Value = serde_json::from_str(&fixture_text("post-events.json")).unwrap();
        event["headers"]["authorization"] = Value::String(format!("Bearer {key}"));
        event["body"] = Value::String(body.to_owned());
        request_from_json(&event.to_string())
    }

    /// POST /v1/usage/events/{eventId}/void with `key` and `body`.
    pub fn void(&self, key: &str, event_id: &str, body: &Value) -> Request {
        let mut request: Value = serde_json::from_str(&fixture_text("void-event.json")).unwrap();
        let path = format!("/v1/usage/events/{}/void", percent_encode(event_id));
        request["headers"]["authorization"] = Value::String(format!("Bearer {key}"));
        request["rawPath"] = Value::String(path.clone());
        request["requestContext"]["http"]["path"] = Value::String(path);
        request["body"] = Value::String(body.to_string());
        request_from_json(&request.to_string())
    }

    /// A GET with a query string (a name may repeat), authenticated with `key`.
    pub fn get(&self, key: &str, path: &str, query: &[(&str, &str)]) -> Request {
        let mut event: Value = serde_json::from_str(&fixture_text("list-events.json")).unwrap();
        event["headers"]["authorization"] = Value::String(format!("Bearer {key}"));
        event["rawPath"] = Value::String(path.into());
        event["requestContext"]["http"]["path"] = Value::String(path.into());
        let params: serde_json::Map<String, Value> = query
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        event["rawQueryString"] = Value::String(
            query
                .iter()
                .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
                .collect::<Vec<_>>()
                .join("&"),
        );
        event["queryStringParameters"] = Value::Object(params);
        request_from_json(&event.to_string())
    }

    /// Sets the tenant's meter `slug` for CloudEvents of `event_type` (as the admin function
    /// does), its quantity at `value` (or 1) and a groupBy key `model` at `$.model`.
    pub async fn set_meter(&self, slug: &str, event_type: &str, metric: &str, value: Option<&str>) {
        let mut conn = self.owner.acquire().await.unwrap();
        let change = meterbridge::repo::usage_settings::Change {
            tenant: self.tenant.id,
            actor: "test",
            reason: "test",
        };
        let definition = meterbridge::domain::meter::MeterDefinition {
            slug: slug.into(),
            event_type: event_type.into(),
            metric: metric.into(),
            value_property: value.map(str::to_owned),
            group_by: [("model".to_owned(), "$.model".to_owned())].into(),
        };
        meterbridge::repo::meters::set(&mut conn, &change, &definition)
            .await
            .unwrap();
    }

    /// One valid event with a unique id.
    pub fn event(&self, n: usize, metric: &str, quantity: i64) -> Value {
        serde_json::json!({
            "eventId": format!("{}-e{n}", self.run),
            "metric": metric,
            "quantity": quantity,
            "occurredAt": meterbridge::testing::now().to_rfc3339(),
            "correlationId": format!("{}-c{n}", self.run),
        })
    }

    /// Lets the tenant hold `n` requests in flight (the default is 10): for tests of many
    /// containers sending at once, which are about what happens to the events, not the limits.
    pub async fn allow_in_flight(&self, n: u32) {
        let overrides = meterbridge::domain::rate_limit::Overrides {
            max_in_flight: Some(n),
            ..Default::default()
        };
        meterbridge::testing::set_limits(&self.owner, &self.tenant, None, &overrides).await;
    }

    pub async fn stored_events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE tenant_id = $1")
            .bind(self.tenant.id)
            .fetch_one(&self.owner)
            .await
            .unwrap()
    }

    /// Today's Redis counter for a metric of this tenant.
    pub async fn counter(&self, metric: &str) -> Option<i128> {
        let key = meterbridge::redis::keys::usage_counter(
            self.tenant.id,
            meterbridge::testing::now().date_naive(),
            metric,
        );
        meterbridge::testing::read_counter(&redis_url(), &key).await
    }
}

pub async fn app_with(owner: &PgPool, overrides: &[(&str, &str)]) -> App {
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("DATABASE_URL".into(), database_url_as(owner, INGEST_ROLE));
    vars.insert("REDIS_URL".into(), redis_url());
    vars.insert("DB_ACQUIRE_TIMEOUT_MS".into(), "2000".into());
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    let env = Env::from_lookup(move |k| vars.get(k).cloned());
    let config = Config::from(&env, "ingest-usage").unwrap();
    let ingest = IngestConfig::from(&env).unwrap();
    let services = Services::build_with_aws(config, None)
        .await
        .unwrap()
        .with_clock(meterbridge::testing::clock());
    App::new(services, ingest)
}

/// The `status` of each per-event result of a POST.
pub fn statuses(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_owned())
        .collect()
}

pub fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/ingest-usage")
}

pub fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(events_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub async fn send(app: &App, request: Request) -> Reply {
    Reply::of(ingest_usage::handle(app, request).await)
}
