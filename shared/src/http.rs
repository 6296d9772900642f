//! HTTP errors as RFC 9457 problem details (`application/problem+json`): one error type,
//! [`ApiError`], mapped to a status, a stable code and a body in exactly one place.

use lambda_http::http::{header, HeaderValue, StatusCode};
use lambda_http::{Body, Response};
use serde::Serialize;

use crate::db::DbError;

/// Problem types live under this URI; docs/api.md documents each code.
pub const PROBLEM_TYPE_BASE: &str = "https://meterbridge.dev/problems/";
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// What went wrong with one field or one batch item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldError {
    /// Stable, machine-readable reason (`unknown_metric`, `quantity_not_positive`, …).
    pub code: String,
    /// JSON pointer to the offending value (`/events/3/quantity`).
    pub pointer: String,
    pub message: String,
    /// For a batch refused whole: the failing item's position in the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// For a batch refused whole: the failing item's own id, as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl FieldError {
    pub fn new(
        code: impl Into<String>,
        pointer: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        FieldError {
            code: code.into(),
            pointer: pointer.into(),
            message: message.into(),
            index: None,
            id: None,
        }
    }

    /// The same error, naming the batch item it is about (its id at most 128 characters).
    pub fn of_item(mut self, index: usize, id: Option<&str>) -> Self {
        self.index = Some(index);
        self.id = id.map(|id| id.chars().take(128).collect());
        self
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// The stable code (last segment of `type`), for clients that switch on it.
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(rename = "correlationId", skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request is valid but contradicts the resource's state (a refused transition, a
    /// reused idempotency key with another body, a duplicate reference).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// Events of a batch that is stored whole or not at all are invalid: nothing was stored.
    #[error("{detail}")]
    InvalidEvents {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// Events of a batch that is stored whole or not at all conflict with stored events or with
    /// each other: nothing was stored.
    #[error("{detail}")]
    ConflictingEvents {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after_secs: u32,
    },
    /// A rate limit refused the request before anything was read or written.
    #[error("{detail}")]
    RateLimited {
        detail: String,
        /// `None` when no wait makes the request pass (it costs more than a burst).
        retry_after_secs: Option<u64>,
        /// The `RateLimit-Policy` and `RateLimit` header values.
        policy: String,
        state: String,
    },
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::InvalidEvents { .. } => StatusCode::BAD_REQUEST,
            ApiError::ConflictingEvents { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// (code, title) — the code is the last segment of the problem type.
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::Malformed(_) => ("malformed_request", "Malformed request"),
            ApiError::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => ("forbidden", "Forbidden"),
            ApiError::NotFound(_) => ("not_found", "Not found"),
            ApiError::MethodNotAllowed => ("method_not_allowed", "Method not allowed"),
            ApiError::Conflict(_) => ("conflict", "Conflict"),
            ApiError::PayloadTooLarge(_) => ("payload_too_large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported_media_type", "Unsupported media type")
            }
            ApiError::Unprocessable { .. } => ("validation_failed", "Validation failed"),
            ApiError::InvalidEvents { .. } => ("invalid_events", "Invalid events"),
            ApiError::ConflictingEvents { .. } => ("conflicting_events", "Conflicting events"),
            ApiError::Unavailable { .. } => ("service_unavailable", "Service unavailable"),
            ApiError::RateLimited { .. } => ("rate_limited", "Too many requests"),
            ApiError::Internal => ("internal_error", "Internal error"),
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind().0
    }

    pub fn to_problem(&self, instance: Option<&str>, correlation_id: Option<&str>) -> Problem {
        let (code, title) = self.kind();
        let errors = match self {
            ApiError::Unprocessable { errors, .. }
            | ApiError::InvalidEvents { errors, .. }
            | ApiError::ConflictingEvents { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        Problem {
            type_uri: format!("{PROBLEM_TYPE_BASE}{code}"),
            title,
            status: self.status().as_u16(),
            detail: self.to_string(),
            code,
            instance: instance.map(str::to_owned),
            correlation_id: correlation_id.map(str::to_owned),
            errors,
        }
    }

    /// The problem+json response, with `Retry-After` / `WWW-Authenticate` / `Allow` where the
    /// status calls for them.
    pub fn into_response(
        self,
        instance: Option<&str>,
        correlation_id: Option<&str>,
    ) -> Response<Body> {
        let problem = self.to_problem(instance, correlation_id);
        let mut response = json_response(self.status(), &problem);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        match &self {
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::RateLimited {
                retry_after_secs,
                policy,
                state,
                ..
            } => {
                if let Some(secs) = retry_after_secs {
                    headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
                }
                insert_rate_limit_headers(headers, policy, state);
            }
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"meterbridge\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// The `RateLimit-Policy` and `RateLimit` headers (IETF draft-ietf-httpapi-ratelimit-headers).
pub const RATE_LIMIT_POLICY_HEADER: &str = "ratelimit-policy";
pub const RATE_LIMIT_HEADER: &str = "ratelimit";

pub fn insert_rate_limit_headers(headers: &mut header::HeaderMap, policy: &str, state: &str) {
    for (name, value) in [
        (RATE_LIMIT_POLICY_HEADER, policy),
        (RATE_LIMIT_HEADER, state),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(header::HeaderName::from_static(name), value);
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(source) => {
                tracing::error!(error = %source, "database unavailable");
                ApiError::Unavailable {
                    detail: "the database is unavailable; nothing was stored, retry later".into(),
                    retry_after_secs: 5,
                }
            }
            DbError::Busy(source) => {
                tracing::warn!(error = %source, "database busy");
                ApiError::Unavailable {
                    detail: "the database was busy (lock wait, deadlock or timeout); nothing was \
                             stored, retry shortly"
                        .into(),
                    retry_after_secs: 1,
                }
            }
            DbError::Contended(why) => {
                tracing::warn!(why, "transaction contended");
                ApiError::Unavailable {
                    detail: "concurrent requests kept colliding with this one; nothing was \
                             stored, retry shortly"
                        .into(),
                    retry_after_secs: 1,
                }
            }
            DbError::NoPartition(source) => {
                metrics::counter!("StorageNotReady").increment(1);
                tracing::error!(error = %source, "no partition for an event: run the storage maintenance");
                ApiError::Unavailable {
                    detail: "storage for this date is not ready; nothing was stored, retry later"
                        .into(),
                    retry_after_secs: 30,
                }
            }
            DbError::InvalidValue(source) => {
                tracing::info!(error = %source, "database refused a value of the request");
                ApiError::Malformed(
                    "a value in the request is out of range or not representable (SQLSTATE class \
                     22); nothing was stored"
                        .into(),
                )
            }
            other => {
                tracing::error!(error = %other, "database error");
                ApiError::Internal
            }
        }
    }
}

/// A JSON response with the given status. Serialising our own types cannot fail; if it ever
/// did, the caller gets a bare 500 rather than a panic.
pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    match serde_json::to_string(body) {
        Ok(text) => json_text_response(status, text),
        Err(_) => json_text_response(StatusCode::INTERNAL_SERVER_ERROR, "{}".into()),
    }
}

/// A JSON document that is already serialised. Bodies go out as text: a binary body would be
/// base64-encoded by the Lambda integration, a third larger.
pub fn json_text_response(status: StatusCode, json: String) -> Response<Body> {
    let mut response = Response::new(Body::Text(json));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_documents_follow_rfc_9457() {
        let err = ApiError::Unprocessable {
            detail: "every event was rejected".into(),
            errors: vec![FieldError::new(
                "unknown_metric",
                "/events/0/metric",
                "no such metric",
            )],
        };
        let value =
            serde_json::to_value(err.to_problem(Some("/v1/usage/events"), Some("c-1"))).unwrap();
        assert_eq!(
            value["type"],
            "https://meterbridge.dev/problems/validation_failed"
        );
        assert_eq!(value["title"], "Validation failed");
        assert_eq!(value["status"], 422);
        assert_eq!(value["detail"], "every event was rejected");
        assert_eq!(value["instance"], "/v1/usage/events");
        assert_eq!(value["errors"][0]["code"], "unknown_metric");
        assert_eq!(value["errors"][0]["pointer"], "/events/0/metric");
    }

    #[test]
    fn unavailable_says_when_to_retry() {
        let response = ApiError::Unavailable {
            detail: "down".into(),
            retry_after_secs: 5,
        }
        .into_response(None, None);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            PROBLEM_CONTENT_TYPE
        );
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        match e {
            AuthError::Missing | AuthError::Invalid | AuthError::Revoked => {
                ApiError::Unauthorized(e.to_string())
            }
            AuthError::TenantDisabled => {
                ApiError::Forbidden("the tenant of this API key is disabled".into())
            }
            AuthError::MissingScope(_) => ApiError::Forbidden(e.to_string()),
            AuthError::Database(db) => db.into(),
        }
    }
}

/// The API key a request presents: `Authorization: Bearer <key>`, else `x-api-key`.
pub fn presented_api_key(headers: &http::HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        });
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The caller's correlation id when it is sane (1–128 visible ASCII characters), else a new one.
pub fn correlation_id(headers: &http::HeaderMap) -> String {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Parses a JSON request body of at most `max_bytes`: 413 when larger, 415 when declared as
/// something other than JSON, 400 when it is not valid UTF-8 JSON or repeats an object key
/// (serde's message says where).
pub fn parse_json_body(
    headers: &http::HeaderMap,
    body: &[u8],
    max_bytes: usize,
) -> Result<serde_json::Value, ApiError> {
    if body.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the body is {} bytes; the limit is {max_bytes}",
            body.len()
        )));
    }
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "send application/json, not {essence:?}"
            )));
        }
    }
    if body.is_empty() {
        return Err(ApiError::Malformed(
            "the request body is empty; send a JSON document".into(),
        ));
    }
    crate::json::from_slice_strict(body)
        .map_err(|e| ApiError::Malformed(format!("the body is not valid JSON: {e}")))
}

#[cfg(test)]
mod request_tests {
    use super::*;
    use http::HeaderMap;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn api_keys_come_from_bearer_or_x_api_key() {
        assert_eq!(
            presented_api_key(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            presented_api_key(&headers(&[("authorization", "bearer  abc ")])),
            Some("abc")
        );
        assert_eq!(
            presented_api_key(&headers(&[("x-api-key", "xyz")])),
            Some("xyz")
        );
        assert_eq!(
            presented_api_key(&headers(&[("authorization", "Basic Zm9v")])),
            None
        );
        assert_eq!(presented_api_key(&headers(&[])), None);
    }

    #[test]
    fn correlation_ids_are_kept_when_sane() {
        assert_eq!(
            correlation_id(&headers(&[("x-correlation-id", "req-42")])),
            "req-42"
        );
        let generated = correlation_id(&headers(&[("x-correlation-id", &"x".repeat(200))]));
        assert_eq!(generated.len(), 36);
    }

    #[test]
    fn bodies_are_checked_before_parsing() {
        let json = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert!(parse_json_body(&json, br#"{"a":1}"#, 100).is_ok());
        assert_eq!(
            parse_json_body(&json, &[b' '; 101], 100)
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(parse_json_body(&json, b"{", 100).unwrap_err().status(), 400);
        assert_eq!(
            parse_json_body(&json, b"{\"a\":\"\xff\"}", 100)
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(parse_json_body(&json, b"", 100).unwrap_err().status(), 400);
        let form = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        assert_eq!(
            parse_json_body(&form, b"a=1", 100).unwrap_err().status(),
            415
        );
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            parse_json_body(&json, deep.as_bytes(), 100_000)
                .unwrap_err()
                .status(),
            400
        );
    }
}
