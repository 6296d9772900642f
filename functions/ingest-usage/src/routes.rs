//! The routes of the usage API and the scope each needs; the shared edge
//! ([`meterbridge::edge`]) authenticates, authorizes, maps errors and logs.

use lambda_http::http::Method;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Authenticator;
use meterbridge::domain::Scope;
use meterbridge::edge::{self, Access, Call, HttpApi};
use meterbridge::http::ApiError;
use meterbridge::rate_limit::RateLimiter;
use meterbridge::redis::Redis;
use meterbridge::Database;

use crate::app::App;
use crate::{cloudevents, corrections, ingest, meter_query, query, summary, usage_limits};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    PostEvents,
    ListEvents,
    Realtime,
    Summary,
    /// The event id, percent-decoded.
    VoidEvent(String),
    UsageLimits,
    /// The metric, percent-decoded.
    MetricLimits(String),
    /// OpenMeter-compatible CloudEvents ingestion.
    CloudEvents,
    /// OpenMeter-compatible meter query; the meter's slug, percent-decoded.
    MeterQuery(String),
}

impl Route {
    /// Every route, as API Gateway names it (`METHOD /path/{param}`): `openapi.yaml` and the
    /// function's `HttpApi` events in `template.yaml` list exactly these (tests/contract.rs).
    pub const KEYS: [&'static str; 9] = [
        "POST /v1/usage/events",
        "GET /v1/usage/events",
        "GET /v1/usage/realtime",
        "GET /v1/usage/summary",
        "POST /v1/usage/events/{eventId}/void",
        "GET /v1/usage/limits",
        "GET /v1/usage/limits/{metric}",
        "POST /api/v1/events",
        "GET /api/v1/meters/{slug}/query",
    ];

    /// This route's entry in [`Route::KEYS`].
    pub fn key(&self) -> &'static str {
        match self {
            Route::PostEvents => Self::KEYS[0],
            Route::ListEvents => Self::KEYS[1],
            Route::Realtime => Self::KEYS[2],
            Route::Summary => Self::KEYS[3],
            Route::VoidEvent(_) => Self::KEYS[4],
            Route::UsageLimits => Self::KEYS[5],
            Route::MetricLimits(_) => Self::KEYS[6],
            Route::CloudEvents => Self::KEYS[7],
            Route::MeterQuery(_) => Self::KEYS[8],
        }
    }

    /// The scope a key needs for this route (a void also needs an internal key).
    pub fn scope(&self) -> Scope {
        match self {
            Route::PostEvents | Route::VoidEvent(_) | Route::CloudEvents => Scope::UsageWrite,
            Route::ListEvents
            | Route::Realtime
            | Route::Summary
            | Route::UsageLimits
            | Route::MetricLimits(_)
            | Route::MeterQuery(_) => Scope::UsageRead,
        }
    }
}

/// Matches a path (with any stage prefix removed by the edge).
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let allowed = |expected: Method, route: Route| {
        if *method == expected {
            Ok(route)
        } else {
            Err(ApiError::MethodNotAllowed)
        }
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "usage", "events"] => match *method {
            Method::POST => Ok(Route::PostEvents),
            Method::GET => Ok(Route::ListEvents),
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["v1", "usage", "realtime"] => allowed(Method::GET, Route::Realtime),
        ["v1", "usage", "summary"] => allowed(Method::GET, Route::Summary),
        ["v1", "usage", "limits"] => allowed(Method::GET, Route::UsageLimits),
        ["api", "v1", "events"] => allowed(Method::POST, Route::CloudEvents),
        ["api", "v1", "meters", slug, "query"] if !slug.is_empty() => {
            let slug =
                percent_decode(slug).ok_or_else(|| ApiError::NotFound("no such meter".into()))?;
            allowed(Method::GET, Route::MeterQuery(slug))
        }
        ["v1", "usage", "limits", metric] if !metric.is_empty() => {
            let metric = percent_decode(metric)
                .ok_or_else(|| ApiError::Malformed("the metric is not valid UTF-8".into()))?;
            allowed(Method::GET, Route::MetricLimits(metric))
        }
        ["v1", "usage", "events", id, "void"] if !id.is_empty() => {
            let id = percent_decode(id)
                .ok_or_else(|| ApiError::NotFound("no such usage event".into()))?;
            allowed(Method::POST, Route::VoidEvent(id))
        }
        _ => Err(ApiError::NotFound(format!("no route for {path}"))),
    }
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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

    fn events_in(&self, route: &Route, request: &Request) -> u32 {
        match route {
            Route::PostEvents => ingest::count_events(request.body().as_ref()),
            Route::CloudEvents => cloudevents::count_events(request.body().as_ref()),
            _ => 0,
        }
    }

    fn route(&self, method: &Method, path: &str) -> Result<(Route, Access), ApiError> {
        let route = route(method, path)?;
        let scope = route.scope();
        Ok((route, Access::ApiKey(scope)))
    }

    async fn call(&self, route: Route, call: Call<'_>) -> Result<Response<Body>, ApiError> {
        let caller = call.caller()?;
        match route {
            Route::PostEvents => ingest::post_events(self, caller, call.request).await,
            Route::ListEvents => query::list_events(self, caller, call.request).await,
            Route::Realtime => query::realtime(self, caller, call.request).await,
            Route::Summary => summary::summary(self, caller, call.request).await,
            Route::VoidEvent(id) => corrections::void_event(self, caller, &id, call.request).await,
            Route::UsageLimits => usage_limits::limits(self, caller, None).await,
            Route::CloudEvents => cloudevents::post_events(self, caller, call.request).await,
            Route::MetricLimits(metric) => usage_limits::limits(self, caller, Some(&metric)).await,
            Route::MeterQuery(slug) => meter_query::query(self, caller, &slug, call.request).await,
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
    use meterbridge::edge::api_path;

    #[test]
    fn routes_with_and_without_a_stage() {
        assert_eq!(
            route(&Method::POST, "/v1/usage/events").unwrap(),
            Route::PostEvents
        );
        assert_eq!(
            route(&Method::POST, api_path("/prod/v1/usage/events/")).unwrap(),
            Route::PostEvents
        );
        assert_eq!(
            route(&Method::GET, "/v1/usage/realtime").unwrap(),
            Route::Realtime
        );
        assert_eq!(
            route(&Method::DELETE, "/v1/usage/events")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(route(&Method::GET, "/v1/other").unwrap_err().status(), 404);
        assert_eq!(
            route(&Method::GET, "/v1/usage/summary").unwrap(),
            Route::Summary
        );
        assert_eq!(
            route(&Method::GET, "/v1/usage/limits").unwrap(),
            Route::UsageLimits
        );
        assert_eq!(
            route(&Method::GET, "/v1/usage/limits/api.requests").unwrap(),
            Route::MetricLimits("api.requests".into())
        );
        assert_eq!(
            route(&Method::GET, "/v1/usage/limits/%ff")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            route(&Method::POST, "/v1/usage/limits")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            route(&Method::POST, "/v1/usage/events/evt%2F1%20a/void").unwrap(),
            Route::VoidEvent("evt/1 a".into())
        );
        assert_eq!(
            route(&Method::GET, "/v1/usage/events/e1/void")
                .unwrap_err()
                .status(),
            405
        );
        assert_eq!(
            route(&Method::GET, "/api/v1/meters/tokens_total/query").unwrap(),
            Route::MeterQuery("tokens_total".into())
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/meters/tokens_total/query")
                .unwrap_err()
                .status(),
            405
        );
        for bad in [
            "/api/v1/meters//query",
            "/api/v1/meters/%zz/query",
            "/v1/usage/events//void",
            "/v1/usage/events/%zz/void",
            "/v1/usage/events/%ff/void",
        ] {
            assert_eq!(
                route(&Method::POST, bad).unwrap_err().status(),
                404,
                "{bad}"
            );
        }
    }
}
