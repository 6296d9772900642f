//! What the function keeps between invocations: the shared clients, the API key verdict cache
//! and the currency catalog. Built once per container.

use std::collections::HashMap;
use std::sync::Arc;

use meterbridge::auth::Authenticator;
use meterbridge::clock::{Stamp, SystemClock};
use meterbridge::domain::TenantId;
use meterbridge::rate_limit::RateLimiter;
use meterbridge::relay::Relay;
use meterbridge::repo::payments;
use meterbridge::ttl_cache::TtlCache;
use meterbridge::{DbError, Services, StartupError};
use tokio::sync::RwLock;

use crate::config::PaymentsConfig;
use crate::webhook::EndpointSecrets;

/// The most webhook endpoints a container remembers (a flood of made-up slugs clears the cache;
/// it never grows past this).
const WEBHOOK_ENDPOINTS_CACHED: usize = 10_000;

/// ISO 4217 code → exponent of its minor unit.
pub type Currencies = HashMap<String, i16>;

pub struct App {
    pub services: Services,
    pub config: PaymentsConfig,
    pub auth: Authenticator,
    /// Per-key and per-tenant budgets (`None`: limits are off).
    pub limiter: Option<RateLimiter>,
    currencies: RwLock<Option<(Stamp, Arc<Currencies>)>>,
    /// Webhook endpoints' signing secrets, and the absence of any, per `<provider>/<slug>`:
    /// reused for the secrets' TTL, so a rotation bites within it.
    pub(crate) webhook_secrets: TtlCache<String, EndpointSecrets>,
    /// The fast path's publisher, built on first use.
    relay: tokio::sync::OnceCell<Relay>,
}

impl App {
    pub async fn from_env() -> Result<Self, StartupError> {
        let config = PaymentsConfig::from_env()?;
        let services = Services::from_env("verify-payment").await?;
        Ok(Self::new(services, config))
    }

    pub fn new(services: Services, config: PaymentsConfig) -> Self {
        App {
            auth: Authenticator::with_clock(config.auth_cache_ttl, Arc::clone(&services.clock)),
            limiter: config
                .rate_limits
                .limiter("payments", Arc::clone(&services.clock)),
            webhook_secrets: TtlCache::new(
                services.config.secrets_ttl,
                WEBHOOK_ENDPOINTS_CACHED,
                meterbridge::clock::system(),
            ),
            services,
            config,
            currencies: RwLock::new(None),
            relay: tokio::sync::OnceCell::new(),
        }
    }

    /// The fast path: publishes a transition's event right after its commit. Whatever happens
    /// here, the request has succeeded: an event not published now stays in the outbox for the
    /// scheduled relay (a failed call gives it back at once; a timed-out one after its short
    /// lease).
    pub async fn publish_now(&self, tenant: TenantId, event_id: uuid::Uuid) {
        let Some(config) = &self.config.fast_path else {
            return;
        };
        let relay = self
            .relay
            .get_or_init(|| async {
                let events = Relay::eventbridge_client(
                    self.services.aws().await,
                    self.config.fast_path_timeout,
                );
                Relay::new(self.services.db.clone(), events, config.clone())
            })
            .await;
        match tokio::time::timeout(
            self.config.fast_path_timeout,
            relay.publish_now(tenant, event_id),
        )
        .await
        {
            Ok(Ok(true)) => metrics::counter!("FastPathPublished").increment(1),
            Ok(Ok(false)) => {
                metrics::counter!("FastPathDeferred").increment(1);
                tracing::info!(%event_id, "event left to the relay (not published now)");
            }
            Ok(Err(e)) => {
                metrics::counter!("FastPathDeferred").increment(1);
                tracing::warn!(%event_id, error = %e, "fast path failed; the relay will publish");
            }
            Err(_) => {
                metrics::counter!("FastPathDeferred").increment(1);
                tracing::warn!(%event_id, "fast path timed out; the relay will publish");
            }
        }
    }

    /// The currency catalog, read from PostgreSQL at most once per `currency_ttl`.
    pub async fn currencies(&self) -> Result<Arc<Currencies>, DbError> {
        let fresh = |at: &Stamp| !at.is_older_than(&SystemClock, self.config.currency_ttl);
        if let Some((at, currencies)) = self.currencies.read().await.as_ref() {
            if fresh(at) {
                return Ok(Arc::clone(currencies));
            }
        }
        let mut slot = self.currencies.write().await;
        if let Some((at, currencies)) = slot.as_ref() {
            if fresh(at) {
                return Ok(Arc::clone(currencies));
            }
        }
        let mut conn = self.services.db.acquire().await?;
        let currencies: Arc<Currencies> =
            Arc::new(payments::currencies(&mut conn).await?.into_iter().collect());
        *slot = Some((Stamp::now(&SystemClock), Arc::clone(&currencies)));
        Ok(currencies)
    }
}
