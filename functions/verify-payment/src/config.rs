//! The payment function's own settings, read at cold start beside the shared [`Config`].
//!
//! [`Config`]: meterbridge::Config

use std::time::Duration;

use meterbridge::config::{webhook_secret_prefix, ConfigError, Env};
use meterbridge::rate_limit::RateLimitConfig;

#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    /// Request body size of the API routes.
    pub max_body_bytes: usize,
    /// Request body size of a provider webhook (Stripe's events are a few kB; 256 KiB at most).
    pub webhook_max_body_bytes: usize,
    /// How far a webhook's signed timestamp may be from now, either way.
    pub webhook_tolerance: Duration,
    /// Signing secrets live at `<prefix>/<provider>/<tenant slug>`.
    pub webhook_secret_prefix: String,
    /// How long an API key verdict is reused (≤ 60 s).
    pub auth_cache_ttl: Duration,
    /// How long the currency catalog is reused.
    pub currency_ttl: Duration,
    pub max_page_size: i64,
    /// The fast path: when set (`EVENT_BUS_NAME` and the relay's variables), a transition's
    /// event is published right after its commit; the scheduled relay is the safety net.
    pub fast_path: Option<meterbridge::relay::RelayConfig>,
    /// How long the fast path may add to a request before it leaves the event to the relay.
    pub fast_path_timeout: Duration,
    /// Per-key and per-tenant request budgets and the tenant's requests in flight.
    pub rate_limits: RateLimitConfig,
}

impl PaymentsConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from(&Env::process())
    }

    pub fn from<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let prefix = webhook_secret_prefix(env)?;
        Ok(PaymentsConfig {
            max_body_bytes: env.bounded_or("MAX_BODY_BYTES", 65_536, 1024..=1_048_576)? as usize,
            webhook_max_body_bytes: env.bounded_or(
                "WEBHOOK_MAX_BODY_BYTES",
                262_144,
                1024..=1_048_576,
            )? as usize,
            webhook_tolerance: Duration::from_secs(env.bounded_or(
                "WEBHOOK_TOLERANCE_SECONDS",
                300,
                1..=3600,
            )?),
            webhook_secret_prefix: prefix,
            auth_cache_ttl: Duration::from_secs(env.bounded_or(
                "AUTH_CACHE_TTL_SECONDS",
                30,
                0..=60,
            )?),
            currency_ttl: Duration::from_secs(env.bounded_or(
                "CURRENCY_TTL_SECONDS",
                3600,
                0..=86_400,
            )?),
            max_page_size: 100,
            fast_path: match env.optional("EVENT_BUS_NAME") {
                None => None,
                Some(_) => {
                    let mut relay = meterbridge::relay::RelayConfig::from(env)?;
                    // A claim the fast path could not finish goes back to the relay soon.
                    relay.lease = Duration::from_secs(15);
                    Some(relay)
                }
            },
            fast_path_timeout: env.millis_or("FAST_PATH_TIMEOUT_MS", 1000, 10..=10_000)?,
            rate_limits: RateLimitConfig::from(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let c = PaymentsConfig::from(&Env::from_lookup(|_| None)).unwrap();
        assert_eq!(c.webhook_secret_prefix, "meterbridge/local/webhooks");
        assert_eq!(c.webhook_tolerance, Duration::from_secs(300));
        let c = PaymentsConfig::from(&Env::from_lookup(|k| {
            (k == "STAGE").then(|| "prod".to_owned())
        }))
        .unwrap();
        assert_eq!(c.webhook_secret_prefix, "meterbridge/prod/webhooks");
        let err = PaymentsConfig::from(&Env::from_lookup(|k| {
            (k == "WEBHOOK_TOLERANCE_SECONDS").then(|| "0".to_owned())
        }))
        .unwrap_err();
        assert!(err.to_string().contains("WEBHOOK_TOLERANCE_SECONDS"));
    }
}
