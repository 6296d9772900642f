//! What the function keeps between invocations: the shared clients, the API key verdict cache
//! and the metric catalog. Built once per container.

use std::sync::Arc;

use meterbridge::auth::Authenticator;
use meterbridge::clock::{Stamp, SystemClock};
use meterbridge::domain::MetricCatalog;
use meterbridge::rate_limit::RateLimiter;
use meterbridge::repo::metrics;
use meterbridge::{DbError, Services, StartupError};
use tokio::sync::RwLock;

use crate::config::IngestConfig;

pub struct App {
    pub services: Services,
    pub config: IngestConfig,
    pub auth: Authenticator,
    /// Per-key and per-tenant budgets (`None`: limits are off).
    pub limiter: Option<RateLimiter>,
    catalog: RwLock<Option<(Stamp, Arc<MetricCatalog>)>>,
}

impl App {
    pub async fn from_env() -> Result<Self, StartupError> {
        let config = IngestConfig::from_env()?;
        let services = Services::from_env("ingest-usage").await?;
        Ok(Self::new(services, config))
    }

    pub fn new(services: Services, config: IngestConfig) -> Self {
        App {
            auth: Authenticator::with_clock(config.auth_cache_ttl, Arc::clone(&services.clock)),
            limiter: config
                .rate_limits
                .limiter("usage", Arc::clone(&services.clock)),
            services,
            config,
            catalog: RwLock::new(None),
        }
    }

    /// The metric catalog, read from PostgreSQL at most once per `catalog_ttl`.
    pub async fn catalog(&self) -> Result<Arc<MetricCatalog>, DbError> {
        let fresh = |at: &Stamp| !at.is_older_than(&SystemClock, self.config.catalog_ttl);
        if let Some((at, catalog)) = self.catalog.read().await.as_ref() {
            if fresh(at) {
                return Ok(Arc::clone(catalog));
            }
        }
        let mut slot = self.catalog.write().await;
        if let Some((at, catalog)) = slot.as_ref() {
            if fresh(at) {
                return Ok(Arc::clone(catalog));
            }
        }
        let mut conn = self.services.db.acquire().await?;
        let catalog = Arc::new(MetricCatalog::new(metrics::catalog(&mut *conn).await?));
        *slot = Some((Stamp::now(&SystemClock), Arc::clone(&catalog)));
        Ok(catalog)
    }
}
