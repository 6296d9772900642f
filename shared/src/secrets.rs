//! Secrets Manager through AWS's caching client: values are cached in-process for the
//! configured TTL, and [`Secrets::get_json`] with `refresh = true` bypasses the cache (used once
//! after an authentication failure, so a rotated password heals without a redeploy).

use std::num::NonZeroUsize;
use std::time::Duration;

use aws_secretsmanager_caching::SecretsManagerCachingClient;
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("could not set up the Secrets Manager client: {0}")]
    Client(String),
    #[error("could not read secret {secret_id}: {reason}")]
    Fetch { secret_id: String, reason: String },
    #[error("secret {secret_id} has no string value")]
    NotString { secret_id: String },
    #[error("secret {secret_id} is not the expected JSON: {reason}")]
    Shape { secret_id: String, reason: String },
}

/// Cached access to Secrets Manager; one per container.
pub struct Secrets {
    client: SecretsManagerCachingClient,
}

impl Secrets {
    pub async fn new(sdk: &aws_config::SdkConfig, ttl: Duration) -> Result<Self, SecretsError> {
        let builder = aws_sdk_secretsmanager::config::Builder::from(sdk);
        let max_entries = NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN);
        let client = SecretsManagerCachingClient::from_builder(builder, max_entries, ttl, false)
            .await
            .map_err(|e| SecretsError::Client(e.to_string()))?;
        Ok(Secrets { client })
    }

    /// The secret's string value parsed as JSON; `refresh` skips the cache.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        secret_id: &str,
        refresh: bool,
    ) -> Result<T, SecretsError> {
        let value = self.get_string(secret_id, refresh).await?;
        serde_json::from_str(&value).map_err(|e| SecretsError::Shape {
            secret_id: secret_id.to_owned(),
            // serde's message names the field; it never echoes the secret's values.
            reason: e.to_string(),
        })
    }

    async fn get_string(&self, secret_id: &str, refresh: bool) -> Result<String, SecretsError> {
        // The caching client's error is not Send: turn it into ours before anything else awaits.
        let output = match self
            .client
            .get_secret_value(secret_id, None, None, refresh)
            .await
        {
            Ok(output) => output,
            Err(e) => {
                return Err(SecretsError::Fetch {
                    secret_id: secret_id.to_owned(),
                    reason: e.to_string(),
                })
            }
        };
        output.secret_string.ok_or_else(|| SecretsError::NotString {
            secret_id: secret_id.to_owned(),
        })
    }
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
