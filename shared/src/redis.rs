//! Redis: a lazily connected client (a cold start never waits on, or fails for, Redis) and the
//! counter keys, built in one place. A single node is reached through a `ConnectionManager`, a
//! cluster (ElastiCache cluster mode or Serverless) through the crate's async cluster client;
//! callers see one [`RedisConnection`] either way. `rediss://` verifies the server against the
//! public roots, or against `REDIS_TLS_CA_FILE` when set.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::{RedisOptions, RedisSource};
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
    #[error("REDIS_TLS_CA_FILE {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A CA file means the operator expects TLS; a plain URL would silently go without.
    #[error("REDIS_TLS_CA_FILE is set but the Redis URL is not rediss://")]
    CaWithoutTls,
    /// Inside Lambda the connection must be TLS, verified: a `redis://` URL, or a `rediss://`
    /// one marked `#insecure`, is refused (as the database refuses less than verify-full).
    #[error("inside Lambda the Redis URL must be rediss:// with the certificate verified")]
    TlsRequired,
}

/// After a failed connect, requests skip Redis for this long instead of each waiting for a
/// connect timeout of its own.
const RECONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// A connection to one node or to a cluster. Clones are cheap and share the sockets (one per
/// node). In a cluster every command, script and pipeline must keep to one hash slot: the
/// counter keys' `{tenant}` tag does that for one tenant's keys.
#[derive(Clone)]
pub enum RedisConnection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisConnection::Node(c) => f.debug_tuple("Node").field(c).finish(),
            RedisConnection::Cluster(_) => f.write_str("Cluster"),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConnection::Node(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConnection::Node(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Node(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

enum State {
    Unconnected,
    Connected(RedisConnection),
    /// The last connect failed at this instant.
    Down(Instant),
}

/// One per container.
pub struct Redis {
    source: RedisSource,
    secrets: Option<Arc<Secrets>>,
    timeout: Duration,
    options: RedisOptions,
    state: Mutex<State>,
}

impl Redis {
    /// A single node, verified against the public roots if the URL is `rediss://`.
    pub fn new(source: RedisSource, secrets: Option<Arc<Secrets>>, timeout: Duration) -> Self {
        Self::with_options(source, secrets, timeout, RedisOptions::default())
    }

    pub fn with_options(
        source: RedisSource,
        secrets: Option<Arc<Secrets>>,
        timeout: Duration,
        options: RedisOptions,
    ) -> Self {
        Redis {
            source,
            secrets,
            timeout,
            options,
            state: Mutex::new(State::Unconnected),
        }
    }

    /// The shared connection, connecting on first use. An authentication failure re-reads the
    /// secret once (a rotated AUTH token heals without a redeploy).
    /// After a failed connect, calls fail fast for a few seconds rather than each waiting on
    /// an unreachable server.
    pub async fn connection(&self) -> Result<RedisConnection, RedisError> {
        let mut state = self.state.lock().await;
        match &*state {
            State::Connected(conn) => return Ok(conn.clone()),
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
            Ok(conn) => {
                *state = State::Connected(conn.clone());
                Ok(conn)
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

    /// Checks the configured endpoint against the TLS requirement without connecting (the
    /// cold start calls it, so a plain-text Redis fails the deployment, not every request).
    pub async fn check(&self) -> Result<(), RedisError> {
        let (info, _) = self.endpoint(false).await?;
        self.require_tls(&info)
    }

    fn require_tls(&self, info: &ConnectionInfo) -> Result<(), RedisError> {
        let verified = matches!(
            info.addr(),
            ConnectionAddr::TcpTls {
                insecure: false,
                ..
            }
        );
        if self.options.require_tls && !verified {
            return Err(RedisError::TlsRequired);
        }
        Ok(())
    }

    async fn open(&self, refresh_secret: bool) -> Result<RedisConnection, RedisError> {
        let (info, cluster) = self.endpoint(refresh_secret).await?;
        self.require_tls(&info)?;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let certificates = match &self.options.tls_ca_file {
            None => None,
            Some(_) if !tls => return Err(RedisError::CaWithoutTls),
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca(path)?),
            }),
        };
        if tls {
            crate::tls::install_crypto_provider();
        }
        let connect = async {
            if cluster {
                // One retry, as for a single node: the request's own timeout bounds the rest
                // (the crate's default waits over a second between retries).
                let mut builder = ClusterClient::builder([info])
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(1);
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let conn = builder.build()?.get_async_connection().await?;
                Ok::<_, RedisError>(RedisConnection::Cluster(conn))
            } else {
                let client = match certificates {
                    Some(certificates) => redis::Client::build_with_tls(info, certificates)?,
                    None => redis::Client::open(info)?,
                };
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1);
                let conn = ConnectionManager::new_with_config(client, config).await?;
                Ok(RedisConnection::Node(conn))
            }
        };
        tokio::time::timeout(self.timeout * 4, connect)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout * 4))?
    }

    /// The address and auth to connect with, and whether it is a cluster.
    async fn endpoint(&self, refresh_secret: bool) -> Result<(ConnectionInfo, bool), RedisError> {
        let secret_id = match &self.source {
            RedisSource::Url(url) => {
                return Ok((url.as_str().into_connection_info()?, self.options.cluster))
            }
            RedisSource::Secret { secret_id } => secret_id,
        };
        let secrets = self.secrets.as_ref().ok_or_else(|| {
            SecretsError::Client(
                "REDIS_SECRET_ID is set but no Secrets Manager client was built".into(),
            )
        })?;
        let ClusterSecret { secret, cluster } = secrets.get_json(secret_id, refresh_secret).await?;
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
        Ok((info, self.options.cluster || cluster))
    }
}

/// The Redis secret, and whether it names a cluster: `"cluster": true` (or `"true"`, as the
/// console's key/value editor stores it). Secrets without the field are single nodes.
#[derive(Deserialize)]
struct ClusterSecret {
    #[serde(flatten)]
    secret: RedisSecret,
    #[serde(default, deserialize_with = "bool_or_text")]
    cluster: bool,
}

fn bool_or_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Flag::deserialize(deserializer)? {
        Flag::Bool(b) => Ok(b),
        Flag::Text(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

fn read_ca(path: &Path) -> Result<Vec<u8>, RedisError> {
    std::fs::read(path).map_err(|source| RedisError::CaFile {
        path: path.to_owned(),
        source,
    })
}

/// One SCAN step over the node that holds `tenant`'s hash tag, deleting what it finds of the
/// tenant's keys (every key meterbridge writes for a tenant carries `{<tenant id>}`: counters,
/// rate-limit state, in-flight slots). In a cluster all of them live in the tag's slot, so the
/// scan runs on that slot's primary only. Returns the keys deleted and the next cursor (`None`
/// once the scan is complete).
pub async fn delete_tenant_keys(
    conn: &mut RedisConnection,
    tenant: TenantId,
    cursor: &str,
    count: usize,
) -> Result<(u64, Option<String>), redis::RedisError> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
    let tag = format!("{{{tenant}}}");
    let mut scan = redis::cmd("SCAN");
    scan.arg(cursor)
        .arg("MATCH")
        .arg(format!("*{tag}*"))
        .arg("COUNT")
        .arg(count);
    let (next, found): (String, Vec<String>) = match conn {
        RedisConnection::Node(c) => scan.query_async(c).await?,
        RedisConnection::Cluster(c) => {
            let route = Route::with_slot(Slot::for_key(&tag), SlotAddr::Master);
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
            redis::from_redis_value(c.route_command(scan, routing).await?)?
        }
    };
    let deleted = if found.is_empty() {
        0
    } else {
        redis::cmd("DEL").arg(&found).query_async(conn).await?
    };
    Ok((deleted, (next != "0").then_some(next)))
}

/// Counter keys. The tenant id is a Redis Cluster hash tag, so one tenant's counters live in one
/// slot and a pipeline or MGET over them works in cluster mode too.
pub mod keys {
    use super::*;

    /// `usage:{<tenant>}:<YYYY-MM-DD>:<metric>`: units of `metric` the tenant used on that UTC day.
    pub fn usage_counter(tenant: TenantId, day: NaiveDate, metric: &str) -> String {
        format!("usage:{{{tenant}}}:{}:{metric}", day.format("%Y-%m-%d"))
    }

    /// `usage:{<tenant>}:month:<YYYY-MM>:<metric>`: units of `metric` the tenant used in that
    /// UTC month (`month` is any day of it).
    pub fn usage_month_counter(tenant: TenantId, month: NaiveDate, metric: &str) -> String {
        format!(
            "usage:{{{tenant}}}:month:{}:{metric}",
            month.format("%Y-%m")
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use redis::cluster_routing::Slot;

        #[test]
        fn counter_keys() {
            let tenant = TenantId(uuid::Uuid::nil());
            let day = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
            assert_eq!(
                usage_counter(tenant, day, "api.requests"),
                "usage:{00000000-0000-0000-0000-000000000000}:2026-11-05:api.requests"
            );
            assert_eq!(
                usage_month_counter(tenant, day, "api.requests"),
                "usage:{00000000-0000-0000-0000-000000000000}:month:2026-11:api.requests"
            );
        }

        #[test]
        fn one_tenants_counters_share_a_slot() {
            let tenant = TenantId(uuid::Uuid::new_v4());
            let day = NaiveDate::from_ymd_opt(2026, 11, 5).unwrap();
            let slot = Slot::for_key(usage_counter(tenant, day, "api.requests"));
            // A metric may itself contain braces; the first `{...}` (the tenant) still decides.
            for (day, metric) in [(day.succ_opt().unwrap(), "x"), (day, "odd{metric}")] {
                assert_eq!(Slot::for_key(usage_counter(tenant, day, metric)), slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_may_name_a_cluster() {
        let parse = |json: &str| serde_json::from_str::<ClusterSecret>(json).unwrap();
        let old = parse(r#"{"url":"rediss://h:6379","authToken":"t"}"#);
        assert!(!old.cluster);
        assert_eq!(old.secret.auth_token.as_deref(), Some("t"));
        let new = parse(r#"{"url":"rediss://h:6379","password":"pw","cluster":true}"#);
        assert!(new.cluster);
        assert_eq!(new.secret.auth_token.as_deref(), Some("pw"));
        assert!(parse(r#"{"url":"rediss://h:6379","cluster":"true"}"#).cluster);
        assert!(!parse(r#"{"url":"rediss://h:6379","cluster":"false"}"#).cluster);
        assert!(serde_json::from_str::<ClusterSecret>(r#"{"url":"u","cluster":"yes"}"#).is_err());
    }
}
