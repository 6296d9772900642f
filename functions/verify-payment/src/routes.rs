//! The routes of the payment API and what each needs; the shared edge ([`meterbridge::edge`])
//! authenticates, authorizes, maps errors and logs.

use lambda_http::http::Method;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Authenticator;
use meterbridge::domain::Scope;
use meterbridge::edge::{self, Access, Call, HttpApi};
use meterbridge::http::ApiError;
use meterbridge::rate_limit::RateLimiter;
use meterbridge::redis::Redis;
use meterbridge::Database;
use uuid::Uuid;

use crate::app::App;
use crate::{payments, verify, webhook};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Create,
    List,
    Get(Uuid),
    Verify(Uuid),
    Webhook { provider: String, tenant: String },
}

impl Route {
    /// Every route, as API Gateway names it (`METHOD /path/{param}`): `openapi.yaml` and the
    /// function's `HttpApi` events in `template.yaml` list exactly these (tests/contract.rs).
    pub const KEYS: [&'static str; 5] = [
        "POST /v1/payments",
        "GET /v1/payments",
        "GET /v1/payments/{paymentId}",
        "POST /v1/payments/{paymentId}/verify",
        "POST /v1/webhooks/{provider}/{tenant}",
    ];

    /// This route's entry in [`Route::KEYS`].
    pub fn key(&self) -> &'static str {
        match self {
            Route::Create => Self::KEYS[0],
            Route::List => Self::KEYS[1],
            Route::Get(_) => Self::KEYS[2],
            Route::Verify(_) => Self::KEYS[3],
            Route::Webhook { .. } => Self::KEYS[4],
        }
    }

    pub fn access(&self) -> Access {
        match self {
            Route::Create => Access::ApiKey(Scope::PaymentsWrite),
            Route::List | Route::Get(_) => Access::ApiKey(Scope::PaymentsRead),
            Route::Verify(_) => Access::ApiKey(Scope::PaymentsVerify),
            Route::Webhook { .. } => Access::Public,
        }
    }
}

/// Matches a path (with any stage prefix removed by the edge). A payment id that is not a UUID
/// names no payment: 404, like any unknown one.
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let payment =
        |id: &str| Uuid::try_parse(id).map_err(|_| ApiError::NotFound("no such payment".into()));
    let allowed = |expected: &Method, route: Route| {
        if method == expected {
            Ok(route)
        } else {
            Err(ApiError::MethodNotAllowed)
        }
    };
    match segments.as_slice() {
        ["v1", "payments"] => match *method {
            Method::POST => Ok(Route::Create),
            Method::GET => Ok(Route::List),
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["v1", "payments", id] => allowed(&Method::GET, Route::Get(payment(id)?)),
        ["v1", "payments", id, "verify"] => allowed(&Method::POST, Route::Verify(payment(id)?)),
        ["v1", "webhooks", provider, tenant] => {
            if !webhook::PROVIDERS.contains(provider) {
                return Err(ApiError::NotFound(format!(
                    "no webhook for provider {:?}",
                    provider.chars().take(32).collect::<String>()
                )));
            }
            allowed(
                &Method::POST,
                Route::Webhook {
                    provider: (*provider).to_owned(),
                    tenant: (*tenant).to_owned(),
                },
            )
        }
        _ => Err(ApiError::NotFound(format!(
            "no route for {}",
            path.chars().take(128).collect::<String>()
        ))),
    }
}

impl HttpApi for App {
    type Route = Route;

    fn database(&self) -> &Database {
        &self.services.db
    }

    fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.limiter.as_ref()
    }

    fn redis(&self) -> Option<&Redis> {
        self.services.redis.as_ref()
    }

    fn route(&self, method: &Method, path: &str) -> Result<(Route, Access), ApiError> {
        let route = route(method, path)?;
        let access = route.access();
        Ok((route, access))
    }

    async fn call(&self, route: Route, call: Call<'_>) -> Result<Response<Body>, ApiError> {
        match route {
            Route::Create => payments::create(self, &call).await,
            Route::List => payments::list(self, &call).await,
            Route::Get(id) => payments::get(self, &call, id).await,
            Route::Verify(id) => verify::verify(self, &call, id).await,
            Route::Webhook { provider, tenant } => {
                webhook::receive(self, &call, &provider, &tenant).await
            }
        }
    }
}

/// The whole request, start to finish; never fails (errors become problem+json responses).
pub async fn handle(app: &App, request: Request) -> Response<Body> {
    edge::handle(app, request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_their_access() {
        let id = Uuid::now_v7();
        assert_eq!(route(&Method::POST, "/v1/payments").unwrap(), Route::Create);
        assert_eq!(route(&Method::GET, "/v1/payments").unwrap(), Route::List);
        assert_eq!(
            route(&Method::GET, &format!("/v1/payments/{id}")).unwrap(),
            Route::Get(id)
        );
        assert_eq!(
            route(&Method::POST, &format!("/v1/payments/{id}/verify")).unwrap(),
            Route::Verify(id)
        );
        assert_eq!(
            route(&Method::POST, "/v1/webhooks/stripe/acme")
                .unwrap()
                .access(),
            Access::Public
        );
        assert_eq!(
            Route::Verify(id).access(),
            Access::ApiKey(Scope::PaymentsVerify)
        );
        for (method, path, status) in [
            (Method::DELETE, "/v1/payments".to_owned(), 405),
            (Method::POST, format!("/v1/payments/{id}"), 405),
            (Method::GET, format!("/v1/payments/{id}/verify"), 405),
            (Method::GET, "/v1/payments/not-a-uuid".to_owned(), 404),
            (Method::POST, "/v1/webhooks/paypal/acme".to_owned(), 404),
            (Method::GET, "/v1/webhooks/stripe/acme".to_owned(), 405),
            (Method::GET, "/v1/nothing".to_owned(), 404),
            (Method::GET, "/v1/payments/a/b/c".to_owned(), 404),
        ] {
            assert_eq!(
                route(&method, &path).unwrap_err().status(),
                status,
                "{method} {path}"
            );
        }
    }
}
