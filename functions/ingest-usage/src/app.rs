//! What the function keeps between invocations: the shared clients, the API key verdict cache
//! and the metric catalog. Built once per container.

use std::sync::Arc;

use meterbridge::auth::Authenticator;
use meterbridge::clock::{Stamp, SystemClock};
use meterbridge::domain::meter::Meter;
use meterbridge::domain::usage_limit::UsageLimit;
use meterbridge::domain::{MetricCatalog, TenantId};
use meterbridge::rate_limit::RateLimiter;
use meterbridge::repo::{meters, metrics, usage_limits};
use meterbridge::ttl_cache::TtlCache;
use meterbridge::{DbError, Services, StartupError};
use tokio::sync::RwLock;

use crate::config::IngestConfig;

/// Tenants whose usage limits (and meters) one container remembers.
const USAGE_LIMITS_CACHED_TENANTS: usize = 10_000;

pub struct App {
    pub services: Services,
    pub config: IngestConfig,
    pub auth: Authenticator,
    /// Per-key and per-tenant budgets (`None`: limits are off).
    pub limiter: Option<RateLimiter>,
    catalog: RwLock<Option<(Stamp, Arc<MetricCatalog>)>>,
    /// Each tenant's usage limits, read at most once per key-cache TTL (a change applies
    /// within it, as a key's does).
    usage_limits: TtlCache<TenantId, Arc<Vec<UsageLimit>>>,
    /// Each tenant's meters (the CloudEvents mapping), read at most once per key-cache TTL.
    meters: TtlCache<TenantId, Arc<Vec<Meter>>>,
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
            catalog: RwLock::new(None),
            usage_limits: TtlCache::new(
                config.auth_cache_ttl,
                USAGE_LIMITS_CACHED_TENANTS,
                Arc::clone(&services.clock),
            ),
            meters: TtlCache::new(
                config.auth_cache_ttl,
                USAGE_LIMITS_CACHED_TENANTS,
                Arc::clone(&services.clock),
            ),
            services,
            config,
        }
    }

    /// A tenant's meters, from the cache or (once per TTL) from PostgreSQL.
    pub async fn meters(&self, tenant: TenantId) -> Result<Arc<Vec<Meter>>, DbError> {
        if let Some(meters) = self.meters.get(&tenant) {
            return Ok(meters);
        }
        let mut tx = self.services.db.tenant_read_tx(tenant).await?;
        let definitions = meters::list(&mut tx, tenant).await?;
        tx.commit().await?;
        let parsed = crate::cloudevents::parse_meters(&definitions);
        self.meters.insert(tenant, Arc::clone(&parsed));
        Ok(parsed)
    }

    /// A tenant's usage limits, from the cache or (once per TTL) from PostgreSQL.
    pub async fn usage_limits(&self, tenant: TenantId) -> Result<Arc<Vec<UsageLimit>>, DbError> {
        if let Some(limits) = self.usage_limits.get(&tenant) {
            return Ok(limits);
        }
        let mut tx = self.services.db.tenant_read_tx(tenant).await?;
        let limits = Arc::new(usage_limits::list(&mut tx, tenant).await?);
        tx.commit().await?;
        self.usage_limits.insert(tenant, Arc::clone(&limits));
        Ok(limits)
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
