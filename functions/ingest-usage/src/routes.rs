//! The HTTP edge: route → authorize → endpoint, with every error mapped to problem+json in one
//! place, and one span per request carrying request, tenant and correlation ids.

use std::time::Instant;

use lambda_http::http::{HeaderValue, Method};
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::domain::Scope;
use meterbridge::http::{correlation_id, presented_api_key, ApiError, CORRELATION_HEADER};
use tracing::Instrument;

use crate::app::App;
use crate::{ingest, query};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    PostEvents,
    ListEvents,
    Realtime,
}

impl Route {
    /// The scope a key needs for this route; checked in one place, [`dispatch`].
    pub fn scope(self) -> Scope {
        match self {
            Route::PostEvents => Scope::UsageWrite,
            Route::ListEvents | Route::Realtime => Scope::UsageRead,
        }
    }
}

/// Matches the path with or without an API Gateway stage prefix (`/prod/v1/...`).
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let path = path.trim_end_matches('/');
    let path = path.find("/v1/").map_or(path, |at| &path[at..]);
    match (path, method) {
        ("/v1/usage/events", &Method::POST) => Ok(Route::PostEvents),
        ("/v1/usage/events", &Method::GET) => Ok(Route::ListEvents),
        ("/v1/usage/realtime", &Method::GET) => Ok(Route::Realtime),
        ("/v1/usage/events" | "/v1/usage/realtime", _) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound(format!("no route for {path}"))),
    }
}

/// The whole request, start to finish; never fails (errors become problem+json responses).
pub async fn handle(app: &App, request: Request) -> Response<Body> {
    let correlation = correlation_id(request.headers());
    let request_id = request
        .lambda_context_ref()
        .map(|c| c.request_id.clone())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        correlation_id = %correlation,
        tenant_id = tracing::field::Empty,
        api_key = tracing::field::Empty,
        method = %request.method(),
        path = %request.uri().path(),
    );
    async {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let mut response = match dispatch(app, &request).await {
            Ok(response) => response,
            Err(error) => {
                if matches!(error, ApiError::Internal) {
                    tracing::error!("request failed with an internal error");
                }
                error.into_response(Some(&path), Some(&correlation))
            }
        };
        if let Ok(value) = HeaderValue::from_str(&correlation) {
            response.headers_mut().insert(CORRELATION_HEADER, value);
        }
        tracing::info!(
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request handled"
        );
        response
    }
    .instrument(span)
    .await
}

async fn dispatch(app: &App, request: &Request) -> Result<Response<Body>, ApiError> {
    let route = route(request.method(), request.uri().path())?;
    let caller = authorize(app, request).await?;
    caller.require(route.scope())?;
    match route {
        Route::PostEvents => ingest::post_events(app, &caller, request).await,
        Route::ListEvents => query::list_events(app, &caller, request).await,
        Route::Realtime => query::realtime(app, &caller, request).await,
    }
}

async fn authorize(app: &App, request: &Request) -> Result<Caller, ApiError> {
    let caller = app
        .auth
        .authenticate(&app.services.db, presented_api_key(request.headers()))
        .await?;
    let span = tracing::Span::current();
    span.record("tenant_id", tracing::field::display(caller.tenant_id));
    // The prefix is the key's public id (shown in listings); the key itself is never logged.
    span.record("api_key", caller.key_prefix.as_str());
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_and_without_a_stage() {
        assert_eq!(
            route(&Method::POST, "/v1/usage/events").unwrap(),
            Route::PostEvents
        );
        assert_eq!(
            route(&Method::POST, "/prod/v1/usage/events/").unwrap(),
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
    }
}
