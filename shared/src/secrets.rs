//! Secrets Manager through AWS's caching client: values are cached in-process for the
//! configured TTL, and [`Secrets::get_json`] with `refresh = true` bypasses the cache (used once
//! after an authentication failure, so a rotated password heals without a redeploy). The
//! caching client measures its TTL on the monotonic clock, which may stand still while Lambda
//! freezes the container; each secret is therefore also re-read once its TTL has passed by the
//! wall clock.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_secretsmanager_caching::SecretsManagerCachingClient;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::clock::{Clock, Stamp};

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("could not set up the Secrets Manager client: {0}")]
    Client(String),
    #[error("could not read secret {secret_id}: {reason}")]
    Fetch { secret_id: String, reason: String },
    #[error("secret {secret_id} does not exist")]
    NotFound { secret_id: String },
    #[error("secret {secret_id} has no string value")]
    NotString { secret_id: String },
    #[error("secret {secret_id} is not the expected JSON: {reason}")]
    Shape { secret_id: String, reason: String },
}

/// Cached access to Secrets Manager; one per container.
pub struct Secrets {
    client: SecretsManagerCachingClient,
    ttl: Duration,
    clock: Arc<dyn Clock>,
    /// When each secret was last read from Secrets Manager (rather than the cache).
    fetched: Mutex<HashMap<String, Stamp>>,
}

impl Secrets {
    pub async fn new(sdk: &aws_config::SdkConfig, ttl: Duration) -> Result<Self, SecretsError> {
        Self::with_clock(sdk, ttl, crate::clock::system()).await
    }

    pub async fn with_clock(
        sdk: &aws_config::SdkConfig,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SecretsError> {
        let builder = aws_sdk_secretsmanager::config::Builder::from(sdk);
        // Database and Redis credentials, and one signing secret per (tenant, provider) for a
        // function that receives webhooks.
        let max_entries = NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN);
        let client = SecretsManagerCachingClient::from_builder(builder, max_entries, ttl, false)
            .await
            .map_err(|e| SecretsError::Client(e.to_string()))?;
        Ok(Secrets {
            client,
            ttl,
            clock,
            fetched: Mutex::new(HashMap::new()),
        })
    }

    /// The secret's string value parsed as JSON; `refresh` skips the cache.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        secret_id: &str,
        refresh: bool,
    ) -> Result<T, SecretsError> {
        let value = self.get_string(secret_id, refresh).await?;
        parse_secret(&value).map_err(|reason| SecretsError::Shape {
            secret_id: secret_id.to_owned(),
            reason,
        })
    }

    async fn get_string(&self, secret_id: &str, refresh: bool) -> Result<String, SecretsError> {
        let now = Stamp::now(self.clock.as_ref());
        let stale = {
            let fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
            match fetched.get(secret_id) {
                Some(at) => at.is_older_than(self.clock.as_ref(), self.ttl),
                None => false,
            }
        };
        let refresh = refresh || stale;
        // The caching client's error is not Send: turn it into ours before anything else awaits.
        let output = match self
            .client
            .get_secret_value(secret_id, None, None, refresh)
            .await
        {
            Ok(output) => output,
            Err(e) => {
                let not_found = e
                    .downcast_ref::<aws_sdk_secretsmanager::error::SdkError<
                        aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError,
                    >>()
                    .and_then(|e| e.as_service_error())
                    .is_some_and(|e| e.is_resource_not_found_exception())
                    || e.to_string().contains("ResourceNotFoundException");
                return Err(if not_found {
                    SecretsError::NotFound {
                        secret_id: secret_id.to_owned(),
                    }
                } else {
                    SecretsError::Fetch {
                        secret_id: secret_id.to_owned(),
                        reason: e.to_string(),
                    }
                });
            }
        };
        {
            let mut fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
            if refresh || !fetched.contains_key(secret_id) {
                fetched.insert(secret_id.to_owned(), now);
            }
        }
        output.secret_string.ok_or_else(|| SecretsError::NotString {
            secret_id: secret_id.to_owned(),
        })
    }
}

/// Parses a secret's JSON. The error names the field and what is wrong with it, never a value:
/// serde's own messages quote the offending value (`invalid type: integer `12345``), and in a
/// secret that value is the password.
fn parse_secret<T: DeserializeOwned>(value: &str) -> Result<T, String> {
    let mut deserializer = serde_json::Deserializer::from_str(value);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                if message.starts_with("missing field") || message.starts_with("unknown field") {
                    // These quote a field name, which is not secret.
                    message
                        .split(" at line")
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                } else {
                    format!("field {path} has the wrong type or an invalid value")
                }
            }
            _ => format!(
                "not a JSON document (error at line {} column {})",
                inner.line(),
                inner.column()
            ),
        }
    })
}

/// Database credentials in the shape RDS writes them; host, port and dbname may come from the
/// environment instead.
#[derive(Clone, Deserialize)]
pub struct DbCredentials {
    pub username: String,
    pub password: String,
    pub host: Option<String>,
    #[serde(default, deserialize_with = "port_from_number_or_string")]
    pub port: Option<u16>,
    pub dbname: Option<String>,
}

impl std::fmt::Debug for DbCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .finish()
    }
}

/// The Redis endpoint and its auth (ElastiCache AUTH token, optionally with an ACL user).
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedisSecret {
    pub url: String,
    #[serde(default, alias = "auth_token", alias = "password")]
    pub auth_token: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
}

impl std::fmt::Debug for RedisSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSecret")
            .field("url", &"<redacted>")
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("username", &self.username)
            .finish()
    }
}

fn port_from_number_or_string<'de, D>(deserializer: D) -> Result<Option<u16>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    match Option::<Port>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Port::Number(n)) => Ok(Some(n)),
        Some(Port::Text(s)) => s.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rds_shape_with_numeric_or_text_port() {
        let c: DbCredentials = serde_json::from_str(
            r#"{"username":"u","password":"p","engine":"postgres","host":"h","port":5432,"dbname":"d"}"#,
        )
        .unwrap();
        assert_eq!(c.port, Some(5432));
        let c: DbCredentials =
            serde_json::from_str(r#"{"username":"u","password":"p","port":"6432"}"#).unwrap();
        assert_eq!(c.port, Some(6432));
        assert_eq!(c.host, None);
    }

    #[test]
    fn shape_errors_name_the_field_never_the_value() {
        for (doc, field) in [
            (r#"{"username": "u", "password": 12345678}"#, "password"),
            (r#"{"username": "u", "password": ["hunter2x"]}"#, "password"),
            (
                r#"{"username": "u", "password": "p", "port": "99hunter2x"}"#,
                "port",
            ),
            (r#"{"username": "u"}"#, "password"),
        ] {
            let err = parse_secret::<DbCredentials>(doc).unwrap_err();
            assert!(err.contains(field), "{doc}: {err}");
            for secret in ["12345678", "hunter2x"] {
                assert!(!err.contains(secret), "{doc}: {err}");
            }
        }
        let err = parse_secret::<DbCredentials>(r#"{"password": "hunter2x"#).unwrap_err();
        assert!(!err.contains("hunter2x") && err.contains("line 1"), "{err}");
        assert!(parse_secret::<DbCredentials>(r#"{"username":"u","password":"p"}"#).is_ok());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c: DbCredentials =
            serde_json::from_str(r#"{"username":"u","password":"hunter2"}"#).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let r: RedisSecret =
            serde_json::from_str(r#"{"url":"redis://h:6379","authToken":"s3cr3t-value"}"#).unwrap();
        assert!(!format!("{r:?}").contains("s3cr3t-value"));
        let r: RedisSecret =
            serde_json::from_str(r#"{"url":"redis://h:6379","password":"pw"}"#).unwrap();
        assert_eq!(r.auth_token.as_deref(), Some("pw"));
    }
}
