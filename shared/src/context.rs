//! The clients a function shares across invocations, built once per container at cold start.

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::{Config, ConfigError, DatabaseSource, RedisSource};
use crate::db::{Database, DbError};
use crate::redis::Redis;
use crate::secrets::{Secrets, SecretsError};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Redis(#[from] crate::redis::RedisError),
}

pub struct Services {
    pub config: Config,
    aws: tokio::sync::OnceCell<aws_config::SdkConfig>,
    secrets: tokio::sync::OnceCell<Arc<Secrets>>,
    pub db: Database,
    /// Present when the function was configured with Redis.
    pub redis: Option<Redis>,
    /// Where "now" comes from: the system clock, or a test's.
    pub clock: Arc<dyn Clock>,
}

impl Services {
    /// Reads the environment and builds every client. Nothing here connects to PostgreSQL or
    /// Redis yet; secrets are read (and cached) now, so a wrong secret name fails the cold start.
    pub async fn from_env(default_service: &str) -> Result<Self, StartupError> {
        let config = Config::from_env(default_service)?;
        Self::build(config).await
    }

    pub async fn build(config: Config) -> Result<Self, StartupError> {
        Self::build_with_aws(config, None).await
    }

    /// As [`Services::build`], with an AWS configuration made by the caller (tests point it at
    /// the emulator). Without one, it is loaded from the environment when first needed.
    pub async fn build_with_aws(
        config: Config,
        aws: Option<aws_config::SdkConfig>,
    ) -> Result<Self, StartupError> {
        let aws = tokio::sync::OnceCell::new_with(aws);
        let needs_secrets = matches!(config.database, DatabaseSource::Secret { .. })
            || matches!(config.redis, Some(RedisSource::Secret { .. }));
        let secrets = if needs_secrets {
            let sdk = aws.get_or_init(aws_config::load_from_env).await;
            Some(Arc::new(Secrets::new(sdk, config.secrets_ttl).await?))
        } else {
            None
        };
        let db = Database::connect(&config, secrets.clone()).await?;
        let redis = config.redis.clone().map(|source| {
            Redis::with_options(
                source,
                secrets.clone(),
                config.redis_timeout,
                config.redis_options.clone(),
            )
        });
        if let Some(redis) = redis.as_ref().filter(|_| config.redis_options.require_tls) {
            redis.check().await?;
        }
        let secrets = match secrets {
            Some(secrets) => tokio::sync::OnceCell::new_with(Some(secrets)),
            None => tokio::sync::OnceCell::new(),
        };
        Ok(Services {
            config,
            aws,
            secrets,
            db,
            redis,
            clock: crate::clock::system(),
        })
    }

    /// The same clients, reading "now" from `clock` (tests run the functions as of any day).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The cached Secrets Manager client: the one the credentials were read with, or one built
    /// on first use.
    pub async fn secrets(&self) -> Result<Arc<Secrets>, SecretsError> {
        let ttl = self.config.secrets_ttl;
        self.secrets
            .get_or_try_init(|| async {
                let sdk = self.aws().await;
                Secrets::new(sdk, ttl).await.map(Arc::new)
            })
            .await
            .cloned()
    }

    /// The AWS SDK configuration (region, credentials, `AWS_ENDPOINT_URL`), loaded once.
    pub async fn aws(&self) -> &aws_config::SdkConfig {
        self.aws.get_or_init(aws_config::load_from_env).await
    }
}
