//! The ingestion function's own settings, read at cold start beside the shared [`Config`].

use std::time::Duration;

use meterbridge::config::{ConfigError, Env};
use meterbridge::domain::usage::EventLimits;
use meterbridge::rate_limit::RateLimitConfig;

#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Events per POST (1–1000 by default).
    pub max_batch_events: usize,
    /// Request body size in bytes (1 MiB by default).
    pub max_body_bytes: usize,
    pub event_limits: EventLimits,
    /// How long an API key verdict (valid, revoked, …) is reused; at most 60 s.
    pub auth_cache_ttl: Duration,
    /// How long the metric catalog is reused before it is read again.
    pub catalog_ttl: Duration,
    /// Lifetime of a real-time counter; events older than this skip Redis.
    pub counter_ttl_days: i64,
    pub max_page_size: i64,
    /// A listing page stops before its body would cost more than this in the Lambda response
    /// (JSON-in-JSON escaping counted), well under the 6 MB limit; the cursor continues.
    pub max_page_bytes: usize,
    /// The window a listing reads when it names no `from`.
    pub default_list_span: chrono::Duration,
    /// The widest window a listing may read.
    pub max_list_span: chrono::Duration,
    /// Per-key and per-tenant rate limits and the tenant's requests in flight.
    pub rate_limits: RateLimitConfig,
}

impl IngestConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from(&Env::process())
    }

    /// The documented defaults.
    pub fn defaults() -> Self {
        IngestConfig {
            max_batch_events: 1000,
            max_body_bytes: 1_048_576,
            event_limits: EventLimits::default(),
            auth_cache_ttl: Duration::from_secs(30),
            catalog_ttl: Duration::from_secs(300),
            counter_ttl_days: 7,
            max_page_size: 1000,
            max_page_bytes: 4_000_000,
            default_list_span: chrono::Duration::days(1),
            max_list_span: chrono::Duration::days(31),
            rate_limits: RateLimitConfig {
                enabled: true,
                lease_for: Duration::from_secs(60),
            },
        }
    }

    pub fn from<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let d = Self::defaults();
        let limits = d.event_limits;
        Ok(IngestConfig {
            max_batch_events: env.bounded_or(
                "MAX_BATCH_EVENTS",
                d.max_batch_events as u64,
                1..=10_000,
            )? as usize,
            max_body_bytes: env.bounded_or(
                "MAX_BODY_BYTES",
                d.max_body_bytes as u64,
                1024..=6_291_456,
            )? as usize,
            event_limits: EventLimits {
                max_age: chrono::Duration::days(env.bounded_or(
                    "MAX_EVENT_AGE_DAYS",
                    limits.max_age.num_days() as u64,
                    1..=366,
                )? as i64),
                max_future_skew: chrono::Duration::seconds(env.bounded_or(
                    "MAX_FUTURE_SKEW_SECONDS",
                    limits.max_future_skew.num_seconds() as u64,
                    0..=86_400,
                )? as i64),
                metadata_max_bytes: env.bounded_or(
                    "METADATA_MAX_BYTES",
                    limits.metadata_max_bytes as u64,
                    2..=65_536,
                )? as usize,
            },
            auth_cache_ttl: Duration::from_secs(env.bounded_or(
                "AUTH_CACHE_TTL_SECONDS",
                d.auth_cache_ttl.as_secs(),
                0..=60,
            )?),
            catalog_ttl: Duration::from_secs(env.bounded_or(
                "CATALOG_TTL_SECONDS",
                d.catalog_ttl.as_secs(),
                0..=3600,
            )?),
            counter_ttl_days: env.bounded_or(
                "COUNTER_TTL_DAYS",
                d.counter_ttl_days as u64,
                1..=90,
            )? as i64,
            max_page_size: d.max_page_size,
            max_page_bytes: env.bounded_or(
                "MAX_PAGE_BYTES",
                d.max_page_bytes as u64,
                65_536..=5_000_000,
            )? as usize,
            default_list_span: d.default_list_span,
            max_list_span: chrono::Duration::days(env.bounded_or(
                "MAX_LIST_SPAN_DAYS",
                d.max_list_span.num_days() as u64,
                1..=366,
            )? as i64),
            rate_limits: RateLimitConfig::from(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let c = IngestConfig::from(&Env::from_lookup(|_| None)).unwrap();
        assert_eq!(c.max_batch_events, 1000);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.auth_cache_ttl, Duration::from_secs(30));
        let err = IngestConfig::from(&Env::from_lookup(|k| {
            (k == "AUTH_CACHE_TTL_SECONDS").then(|| "120".into())
        }))
        .unwrap_err();
        assert!(err.to_string().contains("AUTH_CACHE_TTL_SECONDS"), "{err}");
    }
}
