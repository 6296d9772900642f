//! Hostile input before our code runs. `lambda_http` turns an API Gateway event into an
//! `http::Request` with `expect`/`unwrap`: a raw query string with a `"` or a space, a `Host`
//! or `X-Forwarded-Proto` header that is not a host or a scheme, a path that is not a path, or a
//! body flagged base64 that is not, each panics inside the runtime — before any handler can
//! answer 400 (aws-lambda-rust-runtime issues #461, #489, #515). [`RequestGuard`] sits between
//! the runtime and `lambda_http::Adapter` and makes every such event well-formed first, keeping
//! what the caller meant: query characters that are invalid raw are percent-encoded (so the
//! decoded parameters are unchanged), an unusable `Host`/`X-Forwarded-Proto` is dropped (the
//! domain then comes from the request context), a body that is not base64 becomes an empty,
//! non-JSON text that the endpoint refuses with a 400.

use std::task::{Context, Poll};

use lambda_http::aws_lambda_events::apigw::{ApiGatewayProxyRequest, ApiGatewayV2httpRequest};
use lambda_http::http::{header, HeaderMap};
use lambda_http::request::LambdaRequest;
use lambda_http::{LambdaEvent, Service};

/// Wraps the `lambda_http::Adapter` of a function.
#[derive(Clone)]
pub struct RequestGuard<S> {
    inner: S,
}

impl<S> RequestGuard<S> {
    pub fn new(inner: S) -> Self {
        RequestGuard { inner }
    }
}

impl<S> Service<LambdaEvent<LambdaRequest>> for RequestGuard<S>
where
    S: Service<LambdaEvent<LambdaRequest>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut event: LambdaEvent<LambdaRequest>) -> Self::Future {
        sanitize(&mut event.payload);
        self.inner.call(event)
    }
}

/// Runs an HTTP function: the Lambda runtime, CloudWatch EMF metrics flushed after every
/// invocation, and [`RequestGuard`] in front of `lambda_http`'s conversion.
pub async fn run_http<'a, T, F, R>(
    metrics: &'static metrics_cloudwatch_embedded::Collector,
    handler: T,
) -> Result<(), lambda_runtime::Error>
where
    T: FnMut(lambda_http::Request) -> F,
    F: std::future::Future<Output = Result<R, lambda_runtime::Error>> + Send + 'a,
    R: lambda_http::IntoResponse,
{
    let adapter = lambda_http::Adapter::from(lambda_http::service_fn(handler));
    metrics_cloudwatch_embedded::lambda::service::run(metrics, RequestGuard::new(adapter)).await
}

/// What the body becomes when it claims to be base64 and is not.
pub const UNDECODABLE_BODY: &str = "(the request body was flagged base64 but is not base64)";

/// Makes an event safe for `lambda_http`'s conversion without changing its meaning.
pub fn sanitize(request: &mut LambdaRequest) {
    match request {
        LambdaRequest::ApiGatewayV2(ag) => sanitize_v2(ag),
        LambdaRequest::ApiGatewayV1(ag) => sanitize_v1(ag),
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

fn sanitize_v2(ag: &mut ApiGatewayV2httpRequest) {
    if let Some(query) = &mut ag.raw_query_string {
        *query = encode_invalid_query_bytes(query);
    }
    if let Some(path) = &mut ag.raw_path {
        ensure_leading_slash(path);
    }
    sanitize_headers(&mut ag.headers);
    sanitize_context(
        &mut ag.request_context.domain_name,
        &mut ag.request_context.stage,
    );
    sanitize_body(&mut ag.body, &mut ag.is_base64_encoded);
}

fn sanitize_v1(ag: &mut ApiGatewayProxyRequest) {
    if let Some(path) = &mut ag.path {
        ensure_leading_slash(path);
    }
    sanitize_headers(&mut ag.headers);
    sanitize_headers(&mut ag.multi_value_headers);
    sanitize_context(
        &mut ag.request_context.domain_name,
        &mut ag.request_context.stage,
    );
    sanitize_body(&mut ag.body, &mut ag.is_base64_encoded);
}

/// RFC 3986 query characters, and `%` (a stray `%` is accepted by `http`).
fn is_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

fn encode_invalid_query_bytes(query: &str) -> String {
    if query.bytes().all(is_query_byte) {
        return query.to_owned();
    }
    query
        .bytes()
        .map(|b| {
            if is_query_byte(b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn ensure_leading_slash(path: &mut String) {
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
}

/// A host name or address with an optional port: nothing that could end or extend an
/// authority.
fn is_host(value: &str) -> bool {
    let (name, port) = match value.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (value, None),
    };
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok())
}

fn sanitize_headers(headers: &mut HeaderMap) {
    let host_ok = headers
        .get_all(header::HOST)
        .iter()
        .all(|v| v.to_str().is_ok_and(is_host));
    if !host_ok {
        headers.remove(header::HOST);
    }
    let proto_ok = headers
        .get_all("x-forwarded-proto")
        .iter()
        .all(|v| matches!(v.to_str(), Ok("http" | "https")));
    if !proto_ok {
        headers.remove("x-forwarded-proto");
    }
}

fn sanitize_context(domain_name: &mut Option<String>, stage: &mut Option<String>) {
    if domain_name.as_deref().is_some_and(|d| !is_host(d)) {
        *domain_name = Some("localhost".into());
    }
    let stage_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"$-_.".contains(&b))
    };
    if stage.as_deref().is_some_and(|s| !stage_ok(s)) {
        *stage = None;
    }
}

fn sanitize_body(body: &mut Option<String>, is_base64_encoded: &mut bool) {
    use base64::Engine;
    if !*is_base64_encoded {
        return;
    }
    let decodes = body
        .as_deref()
        .is_none_or(|b| base64::engine::general_purpose::STANDARD.decode(b).is_ok());
    if !decodes {
        *body = Some(UNDECODABLE_BODY.to_owned());
        *is_base64_encoded = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lambda_http::RequestExt;
    use serde_json::json;

    fn v2_event() -> serde_json::Value {
        json!({
            "version": "2.0",
            "routeKey": "GET /v1/usage/events",
            "rawPath": "/v1/usage/events",
            "rawQueryString": "limit=2",
            "headers": {"host": "api.example.com", "content-type": "application/json"},
            "requestContext": {
                "accountId": "1", "apiId": "a", "domainName": "api.example.com",
                "domainPrefix": "api", "requestId": "r", "routeKey": "GET /v1/usage/events",
                "stage": "$default", "time": "t", "timeEpoch": 0,
                "http": {"method": "GET", "path": "/v1/usage/events", "protocol": "HTTP/1.1",
                         "sourceIp": "192.0.2.1", "userAgent": "x"}
            },
            "isBase64Encoded": false
        })
    }

    /// Sanitises, then converts as `lambda_http::Adapter` does (which panicked before).
    fn convert(event: serde_json::Value) -> lambda_http::Request {
        let mut request: LambdaRequest = serde_json::from_value(event).unwrap();
        sanitize(&mut request);
        lambda_http::Request::from(request)
    }

    #[test]
    fn hostile_v2_events_convert_without_panicking() {
        let cases: Vec<(&str, serde_json::Value)> = vec![
            ("/rawQueryString", json!("date=\"2026-11-25\"&x=<a b>")),
            ("/rawQueryString", json!("q=a b&r=é\u{7}")),
            ("/headers/host", json!("a b")),
            ("/headers/host", json!("ex.com:99999")),
            ("/headers/host", json!("[::1")),
            ("/headers/x-forwarded-proto", json!("a b")),
            ("/requestContext/domainName", json!("x y")),
            ("/requestContext/stage", json!("a b?#")),
            ("/rawPath", json!(":99999")),
            ("/rawPath", json!("@evil:1/x")),
        ];
        for (pointer, value) in cases {
            let mut event = v2_event();
            match pointer.strip_prefix("/headers/") {
                Some(name) => event["headers"][name] = value.clone(),
                None => *event.pointer_mut(pointer).unwrap() = value.clone(),
            }
            if pointer == "/requestContext/domainName" {
                event["headers"].as_object_mut().unwrap().remove("host");
            }
            let request = std::panic::catch_unwind(|| convert(event));
            assert!(request.is_ok(), "{pointer} = {value} still panics");
        }
    }

    #[test]
    fn query_parameters_keep_their_meaning() {
        let mut event = v2_event();
        event["rawQueryString"] = json!("date=\"2026-11-25\"&metric=api.requests&sp=a b&ok=%41");
        let request = convert(event);
        let params = request.query_string_parameters();
        assert_eq!(params.first("date"), Some("\"2026-11-25\""));
        assert_eq!(params.first("metric"), Some("api.requests"));
        assert_eq!(params.first("sp"), Some("a b"));
        assert_eq!(params.first("ok"), Some("A"));
        assert_eq!(request.uri().host(), Some("api.example.com"));
        // Well-formed events pass unchanged.
        let mut event = v2_event();
        event["rawQueryString"] = json!("from=2026-11-25T00%3A00%3A00Z&limit=5");
        let request = convert(event);
        assert_eq!(
            request.uri().query(),
            Some("from=2026-11-25T00%3A00%3A00Z&limit=5")
        );
    }

    #[test]
    fn a_body_that_is_not_base64_becomes_an_unparsable_text() {
        let mut event = v2_event();
        event["isBase64Encoded"] = json!(true);
        event["body"] = json!("%%% not base64 %%%");
        let request = std::panic::catch_unwind(|| convert(event)).expect("no panic");
        assert_eq!(request.body().as_ref(), UNDECODABLE_BODY.as_bytes());
        let mut event = v2_event();
        event["isBase64Encoded"] = json!(true);
        event["body"] = json!("eyJhIjoxfQ==");
        assert_eq!(convert(event).body().as_ref(), b"{\"a\":1}");
    }

    #[test]
    fn hostile_rest_events_convert_without_panicking() {
        let event = json!({
            "resource": "/{proxy+}", "path": ":99999", "httpMethod": "GET",
            "headers": {"Host": "a b", "X-Forwarded-Proto": "a b"},
            "multiValueHeaders": {"Host": ["a b"]},
            "queryStringParameters": {"q": "\" <>"},
            "multiValueQueryStringParameters": {"q": ["\" <>"]},
            "requestContext": {"accountId": "1", "resourceId": "r", "stage": "a b?",
                               "requestId": "r", "identity": {}, "resourcePath": "/x",
                               "httpMethod": "GET", "apiId": "a", "domainName": "x y"},
            "body": "!!", "isBase64Encoded": true
        });
        let request = std::panic::catch_unwind(|| convert(event));
        assert!(request.is_ok());
    }
}
