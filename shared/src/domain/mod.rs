//! Plain types and their validation. No I/O lives here.

pub mod advisory_locks;
pub mod api_key;
pub mod dedup;
pub mod meter;
pub mod meter_query;
pub mod metric;
pub mod outbox;
pub mod payment;
pub mod period;
pub mod rate_limit;
pub mod rollup;
pub mod tenant;
pub mod time;
pub mod usage;
pub mod usage_limit;

pub use api_key::{Scope, Scopes, SourceService, Trust};
pub use metric::{Classification, MetricCatalog, MetricDefinition};
pub use tenant::{Tenant, TenantId, TenantSlug, TenantStatus};

/// A value that failed validation: which field, and why (safe to show to the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub message: String,
}

impl InvalidValue {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidValue {
            field,
            message: message.into(),
        }
    }
}

/// `true` when `s` is 1..=max chars of `[a-z0-9]` with inner `extra` characters allowed
/// (never first or last).
pub(crate) fn is_slug_like(s: &str, max: usize, extra: &[u8]) -> bool {
    let bytes = s.as_bytes();
    let plain = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes.first().is_some_and(plain)
        && bytes.last().is_some_and(plain)
        && bytes.iter().all(|b| plain(b) || extra.contains(b))
}
