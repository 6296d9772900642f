//! Errors of the request methods and of `flush`, and the API's problem documents.

use std::fmt;
use std::time::Duration;

use http::StatusCode;
use serde::Deserialize;

/// An RFC 9457 problem document (`application/problem+json`), as the API sends with every
/// error. When an answer carried no problem document (a gateway's own error page, say), the
/// client makes one up from the status: `code` is then `http_<status>` and `detail` the start
/// of the body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Problem {
    /// `https://meterbridge.dev/problems/<code>`.
    #[serde(rename = "type", default)]
    pub type_uri: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub detail: Option<String>,
    /// The stable, machine-readable code: `malformed_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `payload_too_large`, `validation_failed`, `rate_limited`,
    /// `service_unavailable`…
    #[serde(default)]
    pub code: String,
    /// The request path.
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// One entry per invalid field or batch item.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

/// What is wrong with one field or one batch item.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct FieldError {
    pub code: String,
    /// A JSON pointer (RFC 6901) into the request, e.g. `/events/3/quantity`.
    #[serde(default)]
    pub pointer: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub index: Option<usize>,
    #[serde(default)]
    pub id: Option<String>,
}

impl Problem {
    /// The problem in an error answer's body, or one made up from the status.
    pub(crate) fn from_body(status: StatusCode, body: &[u8]) -> Problem {
        match serde_json::from_slice::<Problem>(body) {
            Ok(problem) if !problem.code.is_empty() => problem,
            _ => {
                let text = String::from_utf8_lossy(body);
                let detail: String = text.chars().take(500).collect();
                Problem {
                    title: status.canonical_reason().map(str::to_owned),
                    status: Some(status.as_u16()),
                    detail: (!detail.trim().is_empty()).then_some(detail),
                    code: format!("http_{}", status.as_u16()),
                    ..Problem::default()
                }
            }
        }
    }

    /// For an item of a batch: the index and the field a pointer `/events/<i>[/<field>]` names.
    pub(crate) fn item(pointer: &str) -> Option<(usize, Option<String>)> {
        let rest = pointer.strip_prefix("/events/")?;
        let (index, field) = match rest.split_once('/') {
            Some((index, field)) => (index, Some(field.replace("~1", "/").replace("~0", "~"))),
            None => (rest, None),
        };
        Some((index.parse().ok()?, field))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// An HTTP failure before any answer: connection refused or reset, DNS, TLS, timeout.
#[derive(Debug)]
pub struct TransportError(pub(crate) reqwest::Error);

impl TransportError {
    pub fn is_timeout(&self) -> bool {
        self.0.is_timeout()
    }

    pub fn is_connect(&self) -> bool {
        self.0.is_connect()
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // With its causes: reqwest's own message alone is only "error sending request".
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(&self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl std::error::Error for TransportError {}

/// The error of a request method (reads and payments).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The API answered with an error status and its problem document.
    #[error("the API answered {status}: {problem}")]
    Api {
        status: StatusCode,
        problem: Box<Problem>,
        /// `Retry-After`, on `429` and `503`.
        retry_after: Option<Duration>,
    },
    /// No answer: the request could not be sent or timed out.
    #[error("the request failed: {0}")]
    Transport(#[from] TransportError),
    /// A success answer the client could not read.
    #[error("could not read the API's {status} answer: {source}")]
    Decode {
        status: StatusCode,
        #[source]
        source: serde_json::Error,
    },
    /// An argument the API cannot take (caught before sending).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// The answer's status, when there was an answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Api { status, .. } | Error::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Api { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The problem's code (`not_found`, `conflict`, `rate_limited`…).
    pub fn code(&self) -> Option<&str> {
        self.problem().map(|p| p.code.as_str())
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the same request may succeed later: no answer, `408`, `429` or `5xx`.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport(_) => true,
            Error::Api { status, .. } => {
                *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || status.is_server_error()
            }
            _ => false,
        }
    }
}

/// `flush` or `shutdown` ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// `unsent` events recorded before the call were not settled by the deadline. After
    /// `flush` they stay queued (or in flight) and are sent later; after `shutdown` they were
    /// abandoned.
    #[error("{unsent} events were not sent by the deadline")]
    TimedOut { unsent: u64 },
}

impl FlushError {
    pub fn unsent(&self) -> u64 {
        match self {
            FlushError::TimedOut { unsent } => *unsent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_read_or_made_up() {
        let body = br#"{"type": "https://meterbridge.dev/problems/validation_failed",
            "title": "Validation failed", "status": 422, "detail": "all 1 events were rejected",
            "code": "validation_failed", "instance": "/v1/usage/events", "correlationId": "c-1",
            "errors": [{"code": "unknown_metric", "pointer": "/events/0/metric", "message": "no"}]}"#;
        let problem = Problem::from_body(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(problem.code, "validation_failed");
        assert_eq!(problem.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(problem.errors[0].code, "unknown_metric");
        let made_up = Problem::from_body(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(made_up.code, "http_502");
        assert_eq!(made_up.detail.as_deref(), Some("<html>bad gateway</html>"));
    }

    #[test]
    fn pointers_name_batch_items() {
        assert_eq!(
            Problem::item("/events/3/metric"),
            Some((3, Some("metric".into())))
        );
        assert_eq!(Problem::item("/events/12"), Some((12, None)));
        assert_eq!(Problem::item("/other/1"), None);
    }
}
