//! Environment → typed [`Config`], validated once at cold start.
//!
//! Every problem names the variable, so a misconfigured function fails its cold start with a
//! message that says what to fix.

use std::str::FromStr;
use std::time::Duration;

/// The name prefix of the webhook signing secrets (`<prefix>/<provider>/<tenant slug>`):
/// `WEBHOOK_SECRET_PREFIX`, or `meterbridge/<STAGE>/webhooks`.
pub fn webhook_secret_prefix<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<String, ConfigError> {
    let stage = env.optional("STAGE").unwrap_or_else(|| "local".into());
    let prefix = env
        .optional("WEBHOOK_SECRET_PREFIX")
        .unwrap_or_else(|| format!("meterbridge/{stage}/webhooks"));
    if prefix.ends_with('/') || prefix.chars().any(char::is_whitespace) {
        return Err(ConfigError::Invalid {
            name: "WEBHOOK_SECRET_PREFIX",
            reason: "a secret name prefix without spaces or a trailing '/'".into(),
        });
    }
    Ok(prefix)
}

/// A variable that is missing or does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("missing environment variable {0}")]
    Missing(&'static str),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Reads variables from a lookup (the process environment, or a map in tests).
pub struct Env<F: Fn(&str) -> Option<String>> {
    lookup: F,
}

impl Env<fn(&str) -> Option<String>> {
    /// The process environment. Empty values count as unset.
    pub fn process() -> Self {
        Env {
            lookup: |name| std::env::var(name).ok(),
        }
    }
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    pub fn from_lookup(lookup: F) -> Self {
        Env { lookup }
    }

    pub fn optional(&self, name: &'static str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.optional(name).ok_or(ConfigError::Missing(name))
    }

    /// Parses `name` when set; `default` otherwise.
    pub fn parse_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.optional(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: format!("{raw:?}: {e}"),
            }),
        }
    }

    /// A positive number within `range`, when set; `default` otherwise.
    pub fn bounded_or(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let value = self.parse_or(name, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Invalid {
                name,
                reason: format!("{value} is outside {}..={}", range.start(), range.end()),
            })
        }
    }

    pub fn millis_or(
        &self,
        name: &'static str,
        default_ms: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.bounded_or(name, default_ms, range)
            .map(Duration::from_millis)
    }

    pub fn running_in_lambda(&self) -> bool {
        self.optional("AWS_LAMBDA_RUNTIME_API").is_some()
    }
}

/// Where the PostgreSQL credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseSource {
    /// A Secrets Manager secret in the RDS JSON shape; host/port/dbname fall back to these.
    Secret {
        secret_id: String,
        host: Option<String>,
        port: Option<u16>,
        dbname: Option<String>,
    },
    /// `DATABASE_URL`: tests and local tools only (refused inside a Lambda runtime).
    Url(String),
}

impl std::fmt::Debug for DatabaseSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseSource::Secret { secret_id, .. } => write!(f, "Secret({secret_id})"),
            DatabaseSource::Url(_) => f.write_str("Url(<redacted>)"),
        }
    }
}

/// Where the Redis URL and auth come from.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisSource {
    Secret {
        secret_id: String,
    },
    /// `REDIS_URL`: tests and local tools only (refused inside a Lambda runtime).
    Url(String),
}

impl std::fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisSource::Secret { secret_id } => write!(f, "Secret({secret_id})"),
            RedisSource::Url(_) => f.write_str("Url(<redacted>)"),
        }
    }
}

/// How to talk to Redis beyond its URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// `REDIS_CLUSTER`: use the cluster client (ElastiCache cluster mode, Serverless). A secret
    /// with `"cluster": true` turns it on as well.
    pub cluster: bool,
    /// `REDIS_TLS_CA_FILE`: a PEM file of the CAs a `rediss://` server must chain to, in place of
    /// the built-in public roots (a private CA, or the tests' own).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `REDIS_REQUIRE_TLS`, on by default inside Lambda: only a verified `rediss://` connection
    /// is made (a network path we do not own, as for the database's `verify-full`). Off only for
    /// the local stack, whose Redis has no TLS.
    pub require_tls: bool,
}

/// libpq's `sslmode` values, as `DB_SSL_MODE` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbSslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for DbSslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "disable" => DbSslMode::Disable,
            "allow" => DbSslMode::Allow,
            "prefer" => DbSslMode::Prefer,
            "require" => DbSslMode::Require,
            "verify-ca" => DbSslMode::VerifyCa,
            "verify-full" => DbSslMode::VerifyFull,
            _ => {
                return Err(
                    "expected one of disable, allow, prefer, require, verify-ca, verify-full"
                        .into(),
                )
            }
        })
    }
}

/// TLS to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTls {
    /// `DB_SSL_MODE`. Unset, it is `verify-full` inside Lambda (a network path we do not own)
    /// and `prefer` elsewhere (local servers rarely have TLS).
    pub mode: DbSslMode,
    /// Whether `DB_SSL_MODE` was set: only then does it override an `sslmode` in `DATABASE_URL`.
    pub mode_is_explicit: bool,
    /// `DB_SSL_ROOT_CERT`: a PEM bundle of CAs the server may chain to (the RDS bundle), trusted
    /// besides the built-in public roots. Only `verify-ca` and `verify-full` look at it.
    pub root_cert: Option<std::path::PathBuf>,
}

/// What every function needs, read once at cold start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The function's name in logs and metrics (`AWS_LAMBDA_FUNCTION_NAME`, or the binary's).
    pub service: String,
    pub stage: String,
    pub database: DatabaseSource,
    pub db_tls: DbTls,
    /// `None` when the function was given no Redis (the admin function needs none).
    pub redis: Option<RedisSource>,
    pub redis_options: RedisOptions,
    pub secrets_ttl: Duration,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_statement_timeout: Duration,
    /// PostgreSQL `lock_timeout`: how long a statement waits for a row or table lock.
    pub db_lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout`: a session idle inside a transaction
    /// (a frozen or killed container's) is ended, releasing its locks.
    pub db_idle_in_transaction_timeout: Duration,
    /// PostgreSQL 17's `transaction_timeout`: no transaction of this function outlives its
    /// invocation (each holds the instance's xmin, and so vacuum and the aggregation's
    /// watermark, while it runs). Older servers do without it: the jobs' deadlines and statement
    /// timeouts bound their transactions.
    pub db_transaction_timeout: Duration,
    pub redis_timeout: Duration,
    pub metrics_namespace: String,
}

impl Config {
    pub fn from_env(default_service: &str) -> Result<Self, ConfigError> {
        Self::from(&Env::process(), default_service)
    }

    pub fn from<F: Fn(&str) -> Option<String>>(
        env: &Env<F>,
        default_service: &str,
    ) -> Result<Self, ConfigError> {
        let in_lambda = env.running_in_lambda();
        let local_only = |name: &'static str| -> Result<Option<String>, ConfigError> {
            match env.optional(name) {
                Some(_) if in_lambda => Err(ConfigError::Invalid {
                    name,
                    reason: "is for tests and local tools only; inside Lambda use the secret"
                        .into(),
                }),
                other => Ok(other),
            }
        };

        let database = match (local_only("DATABASE_URL")?, env.optional("DB_SECRET_ID")) {
            (Some(url), _) => DatabaseSource::Url(url),
            (None, Some(secret_id)) => DatabaseSource::Secret {
                secret_id,
                host: env.optional("DB_HOST"),
                port: match env.optional("DB_PORT") {
                    None => None,
                    Some(_) => Some(env.parse_or("DB_PORT", 5432u16)?),
                },
                dbname: env.optional("DB_NAME"),
            },
            (None, None) => return Err(ConfigError::Missing("DB_SECRET_ID")),
        };
        let db_tls = DbTls {
            mode: env.parse_or(
                "DB_SSL_MODE",
                if in_lambda {
                    DbSslMode::VerifyFull
                } else {
                    DbSslMode::Prefer
                },
            )?,
            mode_is_explicit: env.optional("DB_SSL_MODE").is_some(),
            root_cert: match env.optional("DB_SSL_ROOT_CERT") {
                None => None,
                Some(path) => Some(pem_bundle("DB_SSL_ROOT_CERT", path)?),
            },
        };
        let redis = match (local_only("REDIS_URL")?, env.optional("REDIS_SECRET_ID")) {
            (Some(url), _) => Some(RedisSource::Url(url)),
            (None, Some(secret_id)) => Some(RedisSource::Secret { secret_id }),
            (None, None) => None,
        };

        Ok(Config {
            service: env
                .optional("AWS_LAMBDA_FUNCTION_NAME")
                .unwrap_or_else(|| default_service.to_owned()),
            stage: env.optional("STAGE").unwrap_or_else(|| "local".into()),
            database,
            db_tls,
            redis,
            redis_options: RedisOptions {
                cluster: env.parse_or("REDIS_CLUSTER", false)?,
                tls_ca_file: match env.optional("REDIS_TLS_CA_FILE") {
                    None => None,
                    Some(path) => Some(pem_bundle("REDIS_TLS_CA_FILE", path)?),
                },
                require_tls: env.parse_or("REDIS_REQUIRE_TLS", in_lambda)?,
            },
            secrets_ttl: Duration::from_secs(env.bounded_or(
                "SECRETS_TTL_SECONDS",
                300,
                1..=86_400,
            )?),
            db_max_connections: env.bounded_or("DB_MAX_CONNECTIONS", 2, 1..=50)? as u32,
            db_acquire_timeout: env.millis_or("DB_ACQUIRE_TIMEOUT_MS", 3_000, 100..=60_000)?,
            db_statement_timeout: env.millis_or(
                "DB_STATEMENT_TIMEOUT_MS",
                10_000,
                100..=900_000,
            )?,
            db_lock_timeout: env.millis_or("DB_LOCK_TIMEOUT_MS", 2_000, 10..=60_000)?,
            db_idle_in_transaction_timeout: env.millis_or(
                "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
                10_000,
                100..=600_000,
            )?,
            db_transaction_timeout: env.millis_or(
                "DB_TRANSACTION_TIMEOUT_MS",
                900_000,
                1_000..=900_000,
            )?,
            redis_timeout: env.millis_or("REDIS_TIMEOUT_MS", 250, 10..=10_000)?,
            metrics_namespace: env
                .optional("METRICS_NAMESPACE")
                .unwrap_or_else(|| "Meterbridge".into()),
        })
    }
}

/// A CA bundle is checked at cold start: missing or empty, it would otherwise surface only as
/// every connection failing its handshake.
fn pem_bundle(name: &'static str, path: String) -> Result<std::path::PathBuf, ConfigError> {
    let invalid = |reason| ConfigError::Invalid { name, reason };
    let pem = std::fs::read_to_string(&path).map_err(|e| invalid(format!("{path}: {e}")))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(format!("{path} holds no PEM certificate")));
    }
    Ok(path.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(move |k| map.get(k).cloned())
    }

    #[test]
    fn secret_sources_with_fallbacks_and_defaults() {
        let config = Config::from(
            &env(&[
                ("DB_SECRET_ID", "db"),
                ("DB_HOST", "h"),
                ("DB_PORT", "6543"),
                ("REDIS_SECRET_ID", "r"),
            ]),
            "svc",
        )
        .unwrap();
        assert_eq!(
            config.database,
            DatabaseSource::Secret {
                secret_id: "db".into(),
                host: Some("h".into()),
                port: Some(6543),
                dbname: None
            }
        );
        assert_eq!(
            config.redis,
            Some(RedisSource::Secret {
                secret_id: "r".into()
            })
        );
        assert_eq!(config.redis_options, RedisOptions::default());
        assert_eq!(config.service, "svc");
        assert_eq!(config.db_max_connections, 2);
        assert_eq!(config.secrets_ttl, Duration::from_secs(300));
    }

    #[test]
    fn missing_database_names_the_variable() {
        let err = Config::from(&env(&[]), "svc").unwrap_err();
        assert_eq!(err, ConfigError::Missing("DB_SECRET_ID"));
        assert!(err.to_string().contains("DB_SECRET_ID"));
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let err = Config::from(
            &env(&[("DB_SECRET_ID", "db"), ("DB_MAX_CONNECTIONS", "many")]),
            "svc",
        )
        .unwrap_err();
        assert!(err.to_string().contains("DB_MAX_CONNECTIONS"), "{err}");
        let err = Config::from(
            &env(&[("DB_SECRET_ID", "db"), ("DB_MAX_CONNECTIONS", "0")]),
            "svc",
        )
        .unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let err =
            Config::from(&env(&[("DB_SECRET_ID", "db"), ("DB_PORT", "x")]), "svc").unwrap_err();
        assert!(err.to_string().contains("DB_PORT"), "{err}");
    }

    #[test]
    fn redis_cluster_mode_and_ca_file() {
        let ca =
            std::env::temp_dir().join(format!("meterbridge-redis-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let with = |cluster: &str, ca: &std::path::Path| {
            let ca = ca.to_string_lossy().into_owned();
            Config::from(
                &env(&[
                    ("DB_SECRET_ID", "db"),
                    ("REDIS_CLUSTER", cluster),
                    ("REDIS_TLS_CA_FILE", &ca),
                ]),
                "svc",
            )
        };
        let config = with("true", &ca).unwrap();
        assert!(config.redis_options.cluster);
        assert_eq!(
            config.redis_options.tls_ca_file.as_deref(),
            Some(ca.as_path())
        );
        let err = with("yes", &ca).unwrap_err().to_string();
        assert!(err.contains("REDIS_CLUSTER"), "{err}");
        std::fs::remove_file(&ca).unwrap();
        let err = with("false", &ca).unwrap_err().to_string();
        assert!(err.contains("REDIS_TLS_CA_FILE"), "{err}");
    }

    #[test]
    fn url_overrides_are_refused_inside_lambda() {
        let config = Config::from(&env(&[("DATABASE_URL", "postgres://x")]), "svc").unwrap();
        assert_eq!(config.database, DatabaseSource::Url("postgres://x".into()));
        let err = Config::from(
            &env(&[
                ("DATABASE_URL", "postgres://x"),
                ("DB_SECRET_ID", "db"),
                ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
            ]),
            "svc",
        )
        .unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn db_ssl_mode_defaults_to_verify_full_only_inside_lambda() {
        let local = Config::from(&env(&[("DB_SECRET_ID", "db")]), "svc").unwrap();
        let expected = DbTls {
            mode: DbSslMode::Prefer,
            mode_is_explicit: false,
            root_cert: None,
        };
        assert_eq!(local.db_tls, expected);
        let lambda = Config::from(
            &env(&[
                ("DB_SECRET_ID", "db"),
                ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
            ]),
            "svc",
        )
        .unwrap();
        assert_eq!(lambda.db_tls.mode, DbSslMode::VerifyFull);
        assert!(!lambda.db_tls.mode_is_explicit);
    }

    #[test]
    fn redis_requires_tls_inside_lambda_unless_told_otherwise() {
        let lambda = [
            ("DB_SECRET_ID", "db"),
            ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ];
        let config = |vars: &[(&str, &str)]| Config::from(&env(vars), "svc").unwrap();
        assert!(!config(&[("DB_SECRET_ID", "db")]).redis_options.require_tls);
        assert!(config(&lambda).redis_options.require_tls);
        let local_stack = [lambda.as_slice(), &[("REDIS_REQUIRE_TLS", "false")]].concat();
        assert!(!config(&local_stack).redis_options.require_tls);
        let bad = [lambda.as_slice(), &[("REDIS_REQUIRE_TLS", "maybe")]].concat();
        assert!(Config::from(&env(&bad), "svc").is_err());
    }

    #[test]
    fn db_ssl_mode_takes_libpq_values_and_nothing_else() {
        for (raw, mode) in [
            ("disable", DbSslMode::Disable),
            ("allow", DbSslMode::Allow),
            ("prefer", DbSslMode::Prefer),
            ("require", DbSslMode::Require),
            ("verify-ca", DbSslMode::VerifyCa),
            ("VERIFY-FULL", DbSslMode::VerifyFull),
        ] {
            let config =
                Config::from(&env(&[("DB_SECRET_ID", "db"), ("DB_SSL_MODE", raw)]), "svc").unwrap();
            assert_eq!(config.db_tls.mode, mode, "{raw}");
            assert!(config.db_tls.mode_is_explicit);
        }
        for raw in ["verify_full", "true", "strict"] {
            let err = Config::from(&env(&[("DB_SECRET_ID", "db"), ("DB_SSL_MODE", raw)]), "svc")
                .unwrap_err();
            assert!(err.to_string().contains("DB_SSL_MODE"), "{err}");
            assert!(err.to_string().contains("verify-full"), "{err}");
        }
    }

    #[test]
    fn db_ssl_root_cert_must_be_a_readable_pem_bundle() {
        let dir = std::env::temp_dir().join(format!("meterbridge-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let bundle = dir.join("ca.pem");
        std::fs::write(
            &bundle,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let not_pem = dir.join("notes.txt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let missing = dir.join("absent.pem");
        let with = |path: &std::path::Path| {
            let path = path.to_string_lossy().into_owned();
            Config::from(
                &env(&[("DB_SECRET_ID", "db"), ("DB_SSL_ROOT_CERT", &path)]),
                "svc",
            )
        };

        let config = with(&bundle).unwrap();
        assert_eq!(config.db_tls.root_cert.as_deref(), Some(bundle.as_path()));
        for bad in [&not_pem, &missing] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("DB_SSL_ROOT_CERT"), "{err}");
            assert!(err.contains(&*bad.to_string_lossy()), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_output_hides_urls() {
        let config =
            Config::from(&env(&[("DATABASE_URL", "postgres://u:secret@h/db")]), "svc").unwrap();
        assert!(!format!("{config:?}").contains("secret@"));
    }
}
