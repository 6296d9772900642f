//! The HTTP edge every API function shares: route → authenticate and authorize → endpoint, every
//! error mapped to problem+json in one place, one span per request carrying the request, tenant
//! and correlation ids, and one "request handled" line per request. A function describes its
//! routes by implementing [`HttpApi`]; [`handle`] does the rest.

use std::future::Future;
use std::time::Instant;

use lambda_http::http::{HeaderValue, Method};
use lambda_http::{Body, Request, RequestExt, Response};
use tracing::Instrument;

use crate::auth::{Authenticator, Caller};
use crate::db::Database;
use crate::domain::Scope;
use crate::http::{
    correlation_id, insert_rate_limit_headers, presented_api_key, ApiError, CORRELATION_HEADER,
};
use crate::rate_limit::{self, Ask, Decision, Lease, RateLimiter};
use crate::redis::Redis;

/// How a route proves who calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An API key holding this scope; the endpoint receives the [`Caller`].
    ApiKey(Scope),
    /// No API key: the endpoint authenticates the request itself (a signed provider webhook).
    Public,
}

/// What a request is, as the edge hands it to an endpoint.
pub struct Call<'r> {
    pub request: &'r Request,
    /// Present exactly when the route's access is [`Access::ApiKey`].
    pub caller: Option<Caller>,
    /// From `x-correlation-id`, or generated; echoed in the response.
    pub correlation_id: String,
    /// The invocation's X-Ray trace header (`Root=…;Parent=…;Sampled=…`), when traced.
    pub trace_header: Option<String>,
}

impl Call<'_> {
    /// The authenticated caller of an [`Access::ApiKey`] route.
    pub fn caller(&self) -> Result<&Caller, ApiError> {
        self.caller.as_ref().ok_or(ApiError::Internal)
    }
}

pub trait HttpApi: Sync {
    /// A matched route, with whatever it took from the path.
    type Route: Send;

    fn database(&self) -> &Database;
    fn authenticator(&self) -> &Authenticator;

    /// The function's rate limiter (`None`: limits are off), and the Redis its budgets live in
    /// (`None`: this container's budgets only).
    fn rate_limiter(&self) -> Option<&RateLimiter>;
    fn redis(&self) -> Option<&Redis>;

    /// What a request of `route` weighs against the event budgets: the number of events it
    /// carries (0: the route takes none, and no event budget is charged). Read before the body
    /// is parsed for real, so it must be cheap and must not fail (a malformed body weighs 0,
    /// and is refused later).
    fn events_in(&self, _route: &Self::Route, _request: &Request) -> u32 {
        0
    }

    /// Matches a path (already stripped of any stage prefix, see [`api_path`]): 404 for no
    /// such path, 405 for a known path with another method.
    fn route(&self, method: &Method, path: &str) -> Result<(Self::Route, Access), ApiError>;

    fn call<'a>(
        &'a self,
        route: Self::Route,
        call: Call<'a>,
    ) -> impl Future<Output = Result<Response<Body>, ApiError>> + Send + 'a;
}

/// Runs an HTTP function in the Lambda runtime: every request through [`handle`], behind the
/// [`crate::request_guard::RequestGuard`], with EMF metrics flushed after each invocation.
pub async fn serve<A>(
    api: std::sync::Arc<A>,
    metrics: &'static metrics_cloudwatch_embedded::Collector,
) -> Result<(), lambda_runtime::Error>
where
    A: HttpApi + Send + 'static,
{
    crate::request_guard::run_http(metrics, move |request| {
        let api = std::sync::Arc::clone(&api);
        async move { Ok::<_, lambda_runtime::Error>(handle(api.as_ref(), request).await) }
    })
    .await
}

/// The path from `/v1/` (or OpenMeter's `/api/v1/`, whichever comes first) on: API Gateway may
/// prefix a stage (`/prod/v1/...`); a trailing slash is ignored.
pub fn api_path(path: &str) -> &str {
    let path = path.trim_end_matches('/');
    let native = path.find("/v1/");
    let openmeter = path.find("/api/v1/");
    match (openmeter, native) {
        (Some(o), Some(n)) if o < n => &path[o..],
        (_, Some(n)) => &path[n..],
        (Some(o), None) => &path[o..],
        (None, None) => path,
    }
}

/// The whole request, start to finish; never fails (errors become problem+json responses).
pub async fn handle<A: HttpApi>(api: &A, request: Request) -> Response<Body> {
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
        let mut response = match dispatch(api, &request, &correlation).await {
            Ok(response) => response,
            Err(error) => error_response(error, &path, &correlation),
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

fn error_response(error: ApiError, path: &str, correlation: &str) -> Response<Body> {
    if matches!(error, ApiError::Internal) {
        tracing::error!("request failed with an internal error");
    }
    error.into_response(Some(path), Some(correlation))
}

async fn dispatch<A: HttpApi>(
    api: &A,
    request: &Request,
    correlation: &str,
) -> Result<Response<Body>, ApiError> {
    let (route, access) = api.route(request.method(), api_path(request.uri().path()))?;
    let (caller, admission) = match access {
        Access::Public => (None, None),
        Access::ApiKey(scope) => {
            let caller = api
                .authenticator()
                .authenticate(api.database(), presented_api_key(request.headers()))
                .await?;
            record_tenant(&caller);
            caller.require(scope)?;
            let events = api.events_in(&route, request);
            let admission = admit(api, &caller, events).await?;
            (Some(caller), admission)
        }
    };
    let trace_header = request
        .lambda_context_ref()
        .and_then(|c| c.xray_trace_id.clone())
        .filter(|t| !t.is_empty() && t.len() <= 512);
    let call = Call {
        request,
        caller,
        correlation_id: correlation.to_owned(),
        trace_header,
    };
    let outcome = api.call(route, call).await;
    let Some(admission) = admission else {
        return outcome;
    };
    if let Some(lease) = admission.lease {
        lease.release();
    }
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => error_response(error, request.uri().path(), correlation),
    };
    insert_rate_limit_headers(response.headers_mut(), &admission.policy, &admission.state);
    Ok(response)
}

/// A request the rate limiter let through: its headers, and its in-flight slot.
struct Admission {
    policy: String,
    state: String,
    lease: Option<Lease>,
}

/// Charges the request against its key's and tenant's budgets, before any database work of the
/// endpoint: over a limit, 429 and nothing read or written.
async fn admit<A: HttpApi>(
    api: &A,
    caller: &Caller,
    events: u32,
) -> Result<Option<Admission>, ApiError> {
    let Some(limiter) = api.rate_limiter() else {
        return Ok(None);
    };
    let ask = Ask {
        tenant: caller.tenant_id,
        key_id: caller.key_id,
        limits: caller.limits,
        events,
    };
    match limiter.check(api.redis(), &ask).await {
        Decision::Allowed { budgets, lease, .. } => Ok(Some(Admission {
            policy: rate_limit::policy_header(&budgets),
            state: rate_limit::state_header(&budgets),
            lease,
        })),
        Decision::Limited(limited) => {
            metrics::counter!("RateLimited").increment(1);
            Err(ApiError::RateLimited {
                detail: limited.detail(),
                retry_after_secs: (!limited.never)
                    .then(|| rate_limit::retry_after_secs(limited.retry_after)),
                policy: rate_limit::policy_header(&limited.budgets),
                state: rate_limit::state_header(&limited.budgets),
            })
        }
    }
}

/// Puts the caller's tenant and key prefix on the request span (the key itself is never
/// logged: the prefix is its public id).
fn record_tenant(caller: &Caller) {
    let span = tracing::Span::current();
    span.record("tenant_id", tracing::field::display(caller.tenant_id));
    span.record("api_key", caller.key_prefix.as_str());
}

/// Puts a tenant established by other means (a webhook's signature) on the request span.
pub fn record_tenant_id(tenant: crate::domain::TenantId) {
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_prefixes_and_trailing_slashes_are_ignored() {
        assert_eq!(api_path("/v1/usage/events"), "/v1/usage/events");
        assert_eq!(api_path("/prod/v1/usage/events/"), "/v1/usage/events");
        assert_eq!(api_path("/other"), "/other");
        assert_eq!(api_path("/api/v1/events"), "/api/v1/events");
        assert_eq!(api_path("/prod/api/v1/events/"), "/api/v1/events");
        assert_eq!(
            api_path("/prod/v1/usage/limits/api.v1"),
            "/v1/usage/limits/api.v1"
        );
        assert_eq!(api_path("/"), "");
    }
}
