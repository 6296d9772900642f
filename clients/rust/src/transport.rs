//! HTTP: the API's URLs, the API key, and answers read whole.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use reqwest::Url;
use serde::de::DeserializeOwned;

use crate::config::{BuildError, ClientBuilder};
use crate::error::{Error, Problem, TransportError};

/// An answer, its body read.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub(crate) struct Transport {
    http: reqwest::Client,
    /// `Bearer <key>`, marked sensitive (never printed by `http`'s Debug).
    auth: HeaderValue,
    usage_base: Url,
    payments_base: Url,
    events_url: Url,
}

/// Never prints the API key.
impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("usage_base", &self.usage_base.as_str())
            .field("payments_base", &self.payments_base.as_str())
            .finish_non_exhaustive()
    }
}

fn base_url(url: &str) -> Result<Url, BuildError> {
    let invalid = |reason: &str| BuildError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    if parsed.cannot_be_a_base() || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid(
            "a base URL has a host, maybe a path, and nothing else",
        ));
    }
    Ok(parsed)
}

/// `base` with `segments` appended (each percent-encoded as a path segment).
fn join(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

impl Transport {
    pub fn new(builder: &ClientBuilder) -> Result<Self, BuildError> {
        let usage_base = base_url(&builder.base_url)?;
        let payments_base = match &builder.payments_base_url {
            Some(url) => base_url(url)?,
            None => usage_base.clone(),
        };
        let key = builder.api_key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BuildError::InvalidApiKey);
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| BuildError::InvalidApiKey)?;
        auth.set_sensitive(true);
        let user_agent = builder
            .user_agent
            .clone()
            .unwrap_or_else(|| format!("meterbridge-client-rust/{}", env!("CARGO_PKG_VERSION")));
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .timeout(builder.request_timeout)
            .connect_timeout(builder.connect_timeout)
            // A connection idle this long may have been dropped by the other side (or frozen
            // with a Lambda container): open a new one instead of finding out by an error.
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| BuildError::Http(TransportError(e).to_string()))?;
        Ok(Transport {
            events_url: join(&usage_base, &["v1", "usage", "events"]),
            http,
            auth,
            usage_base,
            payments_base,
        })
    }

    pub fn usage_url(&self, segments: &[&str]) -> Url {
        join(&self.usage_base, segments)
    }

    pub fn payments_url(&self, segments: &[&str]) -> Url {
        join(&self.payments_base, segments)
    }

    /// `POST /v1/usage/events` with a serialized batch.
    pub async fn post_events(
        &self,
        body: Bytes,
        correlation_id: &str,
    ) -> Result<Answer, TransportError> {
        let request = self
            .http
            .post(self.events_url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-correlation-id", correlation_id)
            .body(body);
        self.send(request).await
    }

    pub fn get(&self, url: Url) -> reqwest::RequestBuilder {
        self.http.get(url)
    }

    pub fn post_json(&self, url: Url, body: Bytes) -> reqwest::RequestBuilder {
        self.http
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
    }

    /// Sends `request` with the API key and reads the whole answer.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, TransportError> {
        let response = request
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(TransportError)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(TransportError)?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// Sends `request` and reads its `expected` answer as `T`; any other status is an
    /// [`Error::Api`] with the problem.
    pub async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        expected: StatusCode,
    ) -> Result<(T, HeaderMap), Error> {
        let answer = self.send(request).await?;
        if answer.status != expected {
            return Err(api_error(&answer));
        }
        let value = serde_json::from_slice(&answer.body).map_err(|source| Error::Decode {
            status: answer.status,
            source,
        })?;
        Ok((value, answer.headers))
    }
}

/// The error an unexpected answer is.
pub(crate) fn api_error(answer: &Answer) -> Error {
    Error::Api {
        status: answer.status,
        problem: Box::new(Problem::from_body(answer.status, &answer.body)),
        retry_after: crate::wire::retry_after(&answer.headers, std::time::SystemTime::now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_base_path_and_encode_segments() {
        let base = base_url("http://127.0.0.1:9000/lambda-url/ingest-usage/").unwrap();
        assert_eq!(
            join(&base, &["v1", "usage", "limits", "a b/c"]).as_str(),
            "http://127.0.0.1:9000/lambda-url/ingest-usage/v1/usage/limits/a%20b%2Fc"
        );
        let bare = base_url("https://api.example.com").unwrap();
        assert_eq!(
            join(&bare, &["v1", "payments"]).as_str(),
            "https://api.example.com/v1/payments"
        );
        assert!(base_url("ftp://example.com").is_err());
        assert!(base_url("https://example.com/?a=1").is_err());
        assert!(base_url("not a url").is_err());
    }

    #[test]
    fn an_https_client_builds_whatever_crypto_providers_are_compiled_in() {
        // No process-level rustls provider is installed here; building must not panic.
        let builder = ClientBuilder::new("https://api.example.com", "mbk_test");
        let transport = Transport::new(&builder).unwrap();
        assert!(!format!("{transport:?}").contains("mbk_test"));
    }

    #[test]
    fn keys_that_no_header_can_carry_are_refused() {
        for key in ["", "   ", "mbk with space", "mbk\u{e9}"] {
            let builder = ClientBuilder::new("https://api.example.com", key);
            assert!(matches!(
                Transport::new(&builder),
                Err(BuildError::InvalidApiKey)
            ));
        }
    }
}
