//! The routes of the usage API and the scope each needs; the shared edge
//! ([`meterbridge::edge`]) authenticates, authorizes, maps errors and logs.

use lambda_http::http::Method;
use lambda_http::{Body, Request, Response};
use meterbridge::auth::Authenticator;
use meterbridge::domain::Scope;
use meterbridge::edge::{self, Access, Call, HttpApi};
use meterbridge::http::ApiError;
use meterbridge::Database;

use crate::app::App;
use crate::{ingest, query};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    PostEvents,
    ListEvents,
    Realtime,
}

impl Route {
    /// The scope a key needs for this route.
    pub fn scope(self) -> Scope {
        match self {
            Route::PostEvents => Scope::UsageWrite,
            Route::ListEvents | Route::Realtime => Scope::UsageRead,
        }
    }
}

/// Matches a path (with any stage prefix removed by the edge).
pub fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    match (path, method) {
        ("/v1/usage/events", &Method::POST) => Ok(Route::PostEvents),
        ("/v1/usage/events", &Method::GET) => Ok(Route::ListEvents),
        ("/v1/usage/realtime", &Method::GET) => Ok(Route::Realtime),
        ("/v1/usage/events" | "/v1/usage/realtime", _) => Err(ApiError::MethodNotAllowed),
        _ => Err(ApiError::NotFound(format!("no route for {path}"))),
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

    fn route(&self, method: &Method, path: &str) -> Result<(Route, Access), ApiError> {
        let route = route(method, path)?;
        Ok((route, Access::ApiKey(route.scope())))
    }

    async fn call(&self, route: Route, call: Call<'_>) -> Result<Response<Body>, ApiError> {
        let caller = call.caller()?;
        match route {
            Route::PostEvents => ingest::post_events(self, caller, call.request).await,
            Route::ListEvents => query::list_events(self, caller, call.request).await,
            Route::Realtime => query::realtime(self, caller, call.request).await,
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
    }
}
