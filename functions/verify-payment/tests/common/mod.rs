//! Shared set-up for the payment tests: a fresh database per test (via #[sqlx::test]), a fresh
//! tenant with keys and a webhook signing secret of its own in moto, the app built exactly as in
//! Lambda (as the API role, secrets from Secrets Manager), and requests made from the fixtures in
//! events/verify-payment/.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use aws_sdk_secretsmanager::Client as SecretsClient;
use lambda_http::Request;
use meterbridge::auth::NewApiKey;
use meterbridge::config::{Config, Env};
use meterbridge::domain::{Scope, Scopes, Tenant, Trust};
use meterbridge::testing::{
    create_api_key, create_scoped_api_key, create_tenant, database_url_as, moto_sdk_config, render,
    PAYMENTS_ROLE,
};
pub use meterbridge::testing::{percent_encode, request_from_json, Reply};
use meterbridge::Services;
use serde_json::{json, Value};
use sqlx::PgPool;
use verify_payment::signature::sign;
use verify_payment::{App, PaymentsConfig};

pub struct Fixture {
    pub owner: PgPool,
    pub tenant: Tenant,
    /// Every scope.
    pub internal: NewApiKey,
    /// usage:write only, like every external key.
    pub external: NewApiKey,
    /// payments:read only.
    pub reader: NewApiKey,
    pub run: String,
    /// Where this test's webhook secrets live in moto.
    pub secret_prefix: String,
    /// The tenant's Stripe signing secret.
    pub signing_secret: String,
    pub sdk: aws_config::SdkConfig,
}

impl Fixture {
    pub async fn new(owner: &PgPool) -> Fixture {
        let sdk = moto_sdk_config().await;
        let tenant = create_tenant(owner, "shop").await;
        let internal = create_api_key(owner, &tenant, "billing", Trust::Internal).await;
        let external = create_api_key(owner, &tenant, "storefront", Trust::External).await;
        let reader = create_scoped_api_key(
            owner,
            &tenant,
            "reports",
            Trust::Internal,
            Scopes::of(&[Scope::PaymentsRead]),
        )
        .await;
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let secret_prefix = format!("meterbridge/test/{run}/webhooks");
        let signing_secret = format!("whsec_{}", uuid::Uuid::new_v4().simple());
        let fx = Fixture {
            owner: owner.clone(),
            tenant,
            internal,
            external,
            reader,
            run,
            secret_prefix,
            signing_secret,
            sdk,
        };
        fx.put_signing_secrets(&[fx.signing_secret.as_str()]).await;
        fx
    }

    /// Sets the tenant's active Stripe signing secrets (a rotation has two).
    pub async fn put_signing_secrets(&self, secrets: &[&str]) {
        let client = SecretsClient::new(&self.sdk);
        let name = format!("{}/stripe/{}", self.secret_prefix, self.tenant.slug);
        let value = json!({ "signingSecrets": secrets }).to_string();
        let created = client
            .create_secret()
            .name(&name)
            .secret_string(&value)
            .send()
            .await;
        if created.is_err() {
            client
                .put_secret_value()
                .secret_id(&name)
                .secret_string(&value)
                .send()
                .await
                .expect("update the signing secret in moto");
        }
    }

    /// The app as the Lambda builds it, as the API role, with variable overrides.
    pub async fn app(&self, overrides: &[(&str, &str)]) -> App {
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert(
            "DATABASE_URL".into(),
            database_url_as(&self.owner, PAYMENTS_ROLE),
        );
        vars.insert("DB_ACQUIRE_TIMEOUT_MS".into(), "5000".into());
        vars.insert("WEBHOOK_SECRET_PREFIX".into(), self.secret_prefix.clone());
        for (k, v) in overrides {
            vars.insert(k.to_string(), v.to_string());
        }
        let env = Env::from_lookup(move |k| vars.get(k).cloned());
        let config = Config::from(&env, "verify-payment").unwrap();
        let payments = PaymentsConfig::from(&env).unwrap();
        let services = Services::build_with_aws(config, Some(self.sdk.clone()))
            .await
            .unwrap()
            .with_clock(meterbridge::testing::clock());
        App::new(services, payments)
    }

    pub fn placeholders(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut values = vec![
            ("INTERNAL_KEY".to_owned(), self.internal.key.clone()),
            ("EXTERNAL_KEY".to_owned(), self.external.key.clone()),
            ("RUN".to_owned(), self.run.clone()),
            ("TENANT_SLUG".to_owned(), self.tenant.slug.clone()),
        ];
        values.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        values
    }

    /// A request from a fixture file with the placeholders filled in; a webhook fixture's
    /// `{{STRIPE_SIGNATURE}}` is signed over its rendered body with the tenant's secret.
    pub fn fixture(&self, name: &str, extra: &[(&str, &str)]) -> Request {
        let values = self.placeholders(extra);
        let pairs: Vec<(&str, &str)> = values
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut event: Value = serde_json::from_str(&render(&fixture_text(name), &pairs)).unwrap();
        if event["headers"]["stripe-signature"] == "{{STRIPE_SIGNATURE}}" {
            let body = event["body"].as_str().unwrap().to_owned();
            event["headers"]["stripe-signature"] =
                json!(sign(&self.signing_secret, now(), body.as_bytes()));
        }
        request_from_json(&event.to_string())
    }

    /// A request to `path` with `key` (none: no Authorization header), a JSON body and headers.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Request {
        let mut event: Value = serde_json::from_str(&fixture_text("get-payment.json")).unwrap();
        event["requestContext"]["http"]["method"] = json!(method);
        event["routeKey"] = json!(format!("{method} {path}"));
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        event["rawPath"] = json!(path);
        event["requestContext"]["http"]["path"] = json!(path);
        let mut params = serde_json::Map::new();
        let mut raw = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(k.to_owned(), json!(v));
            raw.push(format!("{}={}", percent_encode(k), percent_encode(v)));
        }
        event["rawQueryString"] = json!(raw.join("&"));
        event["queryStringParameters"] = Value::Object(params);
        let headers_obj = event["headers"].as_object_mut().unwrap();
        headers_obj.remove("authorization");
        if let Some(key) = key {
            headers_obj.insert("authorization".into(), json!(format!("Bearer {key}")));
        }
        for (name, value) in headers {
            headers_obj.insert(name.to_string(), json!(value));
        }
        if let Some(body) = body {
            event["body"] = json!(body);
        }
        request_from_json(&event.to_string())
    }

    /// POST a JSON body with the internal key.
    pub fn post(&self, path: &str, body: &Value) -> Request {
        self.request(
            "POST",
            path,
            Some(&self.internal.key),
            Some(&body.to_string()),
            &[],
        )
    }

    pub fn get(&self, key: &str, path: &str) -> Request {
        self.request("GET", path, Some(key), None, &[])
    }

    /// A Stripe delivery to this tenant's webhook, signed with `secret` at `timestamp`.
    pub fn webhook_signed(&self, body: &str, secret: &str, timestamp: i64) -> Request {
        let signature = sign(secret, timestamp, body.as_bytes());
        self.webhook_with_header(body, Some(&signature))
    }

    /// A Stripe delivery signed now with the tenant's secret.
    pub fn webhook(&self, body: &str) -> Request {
        self.webhook_signed(body, &self.signing_secret, now())
    }

    pub fn webhook_with_header(&self, body: &str, signature: Option<&str>) -> Request {
        let path = format!("/v1/webhooks/stripe/{}", self.tenant.slug);
        let headers: Vec<(&str, &str)> = signature
            .map(|s| vec![("stripe-signature", s)])
            .unwrap_or_default();
        self.request("POST", &path, None, Some(body), &headers)
    }

    /// A Stripe event of `kind` about the payment intent `reference`.
    pub fn stripe_event(&self, event_id: &str, kind: &str, reference: &str, amount: i64) -> String {
        let object = if kind == "charge.refunded" {
            json!({"id": format!("ch_{event_id}"), "object": "charge", "payment_intent": reference,
                   "amount": amount, "amount_refunded": amount, "refunded": true, "currency": "usd"})
        } else {
            json!({"id": reference, "object": "payment_intent", "amount": amount,
                   "amount_received": amount, "currency": "usd"})
        };
        json!({"id": event_id, "object": "event", "type": kind, "data": {"object": object}})
            .to_string()
    }

    /// Creates a PENDING payment with the internal key; returns its JSON.
    pub async fn create_payment(&self, app: &App, amount: i64, reference: &str) -> Value {
        let r = send(
            app,
            self.post(
                "/v1/payments",
                &json!({"amountMinor": amount, "currency": "USD", "provider": "stripe",
                        "providerReference": reference}),
            ),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["payment"].clone()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE tenant_id = $1"
        ))
        .bind(self.tenant.id)
        .fetch_one(&self.owner)
        .await
        .unwrap()
    }
}

pub fn now() -> i64 {
    meterbridge::testing::now().timestamp()
}

pub fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/verify-payment")
}

pub fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(events_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub async fn send(app: &App, request: Request) -> Reply {
    Reply::of(verify_payment::handle(app, request).await)
}
