//! What the function keeps between invocations: the shared clients, the API key verdict cache
//! and the currency catalog. Built once per container.

use std::collections::HashMap;
use std::sync::Arc;

use meterbridge::auth::Authenticator;
use meterbridge::clock::{Stamp, SystemClock};
use meterbridge::repo::payments;
use meterbridge::{DbError, Services, StartupError};
use tokio::sync::RwLock;

use crate::config::PaymentsConfig;

/// ISO 4217 code → exponent of its minor unit.
pub type Currencies = HashMap<String, i16>;

pub struct App {
    pub services: Services,
    pub config: PaymentsConfig,
    pub auth: Authenticator,
    currencies: RwLock<Option<(Stamp, Arc<Currencies>)>>,
}

impl App {
    pub async fn from_env() -> Result<Self, StartupError> {
        let config = PaymentsConfig::from_env()?;
        let services = Services::from_env("verify-payment").await?;
        Ok(Self::new(services, config))
    }

    pub fn new(services: Services, config: PaymentsConfig) -> Self {
        App {
            auth: Authenticator::new(config.auth_cache_ttl),
            services,
            config,
            currencies: RwLock::new(None),
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
