//! HTTP errors as RFC 9457 problem details (`application/problem+json`): one error type,
//! [`ApiError`], mapped to a status, a stable code and a body in exactly one place.

use lambda_http::http::{header, HeaderValue, StatusCode};
use lambda_http::{Body, Response};
use serde::Serialize;

use crate::db::DbError;

/// Problem types live under this URI; the README documents each code.
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
        }
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
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after_secs: u32,
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
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::PayloadTooLarge(_) => ("payload_too_large", "Payload too large"),
            ApiError::UnsupportedMediaType(_) => {
                ("unsupported_media_type", "Unsupported media type")
            }
            ApiError::Unprocessable { .. } => ("validation_failed", "Validation failed"),
            ApiError::Unavailable { .. } => ("service_unavailable", "Service unavailable"),
            ApiError::Internal => ("internal_error", "Internal error"),
        }
    }

    pub fn code(&self) -> &'static str {
        self.kind().0
    }

    pub fn to_problem(&self, instance: Option<&str>, correlation_id: Option<&str>) -> Problem {
        let (code, title) = self.kind();
        let errors = match self {
            ApiError::Unprocessable { errors, .. } => errors.clone(),
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
    let (status, bytes) = match serde_json::to_vec(body) {
        Ok(bytes) => (status, bytes),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, b"{}".to_vec()),
    };
    let mut response = Response::new(Body::Binary(bytes));
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
