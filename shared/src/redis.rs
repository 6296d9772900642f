//! Redis: a lazily connected `ConnectionManager` (a cold start never waits on, or fails for,
//! Redis) and the counter keys, built in one place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use tokio::sync::Mutex;

use crate::config::RedisSource;
use crate::domain::TenantId;
use crate::secrets::{RedisSecret, Secrets, SecretsError};

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis credentials: {0}")]
    Credentials(#[from] SecretsError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis was unreachable moments ago; skipped")]
    Down,
}

/// After a failed connect, requests skip Redis for this long instead of each waiting for a
/// connect timeout of its own.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(5);

enum State {
    Unconnected,
    Connected(ConnectionManager),
    /// The last connect failed at this instant.
    Down(Instant),
}

/// One per container; clones of the connection are cheap and share one multiplexed socket.
pub struct Redis {
    source: RedisSource,
    secrets: Option<Arc<Secrets>>,
    timeout: Duration,
    state: Mutex<State>,
}

impl Redis {
    pub fn new(source: RedisSource, secrets: Option<Arc<Secrets>>, timeout: Duration) -> Self {
        Redis {
            source,
            secrets,
            timeout,
            state: Mutex::new(State::Unconnected),
        }
    }

    /// The shared connection, connecting on first use. An authentication failure re-reads the
    /// secret once (a rotated AUTH token heals without a redeploy).
    /// After a failed connect, calls fail fast for a few seconds rather than each waiting on
    /// an unreachable server.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let mut state = self.state.lock().await;
        match &*state {
            State::Connected(manager) => return Ok(manager.clone()),
            State::Down(at) if at.elapsed() < RECONNECT_BACKOFF => return Err(RedisError::Down),
            _ => {}
        }
        let opened = match self.open(false).await {
            Err(RedisError::Redis(e)) if e.kind() == redis::ErrorKind::AuthenticationFailed => {
                tracing::warn!("redis refused the credentials; re-reading the secret");
                self.open(true).await
            }
            other => other,
        };
        match opened {
            Ok(manager) => {
                *state = State::Connected(manager.clone());
                Ok(manager)
            }
            Err(e) => {
                *state = State::Down(Instant::now());
                Err(e)
            }
        }
    }

    /// Drops the connection after an authentication failure so the next use reconnects with a
    /// freshly read secret.
    pub async fn forget_connection_on(&self, error: &redis::RedisError) {
        if error.kind() == redis::ErrorKind::AuthenticationFailed {
            *self.state.lock().await = State::Unconnected;
        }
    }

    async fn open(&self, refresh_secret: bool) -> Result<ConnectionManager, RedisError> {
        let client = match &self.source {
            RedisSource::Url(url) => redis::Client::open(url.as_str())?,
            RedisSource::Secret { secret_id } => {
                let secrets = self.secrets.as_ref().ok_or_else(|| {
                    SecretsError::Client(
                        "REDIS_SECRET_ID is set but no Secrets Manager client was built".into(),
                    )
                })?;
                let secret: RedisSecret = secrets.get_json(secret_id, refresh_secret).await?;
                let mut info = secret.url.as_str().into_connection_info()?;
                if secret.auth_token.is_some() || secret.username.is_some() {
                    let mut settings = info.redis_settings().clone();
                    if let Some(token) = &secret.auth_token {
                        settings = settings.set_password(token);
                    }
                    if let Some(user) = &secret.username {
                        settings = settings.set_username(user);
                    }
                    info = info.set_redis_settings(settings);
                }
                redis::Client::open(info)?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        tokio::time::timeout(
            self.timeout * 4,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| RedisError::Timeout(self.timeout * 4))?
        .map_err(RedisError::from)
    }
}

/// Counter keys. The tenant id is a Redis Cluster hash tag, so one tenant's counters live in one
/// slot and a pipeline or MGET over them works in cluster mode too.
pub mod keys {
    use super::*;

    /// `usage:{<tenant>}:<YYYY-MM-DD>:<metric>`: units of `metric` the tenant used on that UTC day.
    pub fn usage_counter(tenant: TenantId, day: NaiveDate, metric: &str) -> String {
        format!("usage:{{{tenant}}}:{}:{metric}", day.format("%Y-%m-%d"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn counter_keys() {
            let tenant = TenantId(uuid::Uuid::nil());
            let day = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
            assert_eq!(
                usage_counter(tenant, day, "api.requests"),
                "usage:{00000000-0000-0000-0000-000000000000}:2026-11-05:api.requests"
            );
        }
    }
}
