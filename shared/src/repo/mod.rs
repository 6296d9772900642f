//! SQL, one module per table family, beside the row types it returns. Functions take any
//! executor, so callers choose the transaction (and with it the tenant RLS sees).

pub mod api_keys;
pub mod idempotency;
pub mod meter_usage;
pub mod meters;
pub mod metrics;
pub mod outbox;
pub mod payment_audit;
pub mod payments;
pub mod rate_limits;
pub mod subject_erasures;
pub mod subject_export;
pub mod tenant_erasures;
pub mod tenants;
pub mod usage_aggregates;
pub mod usage_changes;
pub mod usage_events;
pub mod usage_limits;
pub mod usage_settings;
pub mod usage_storage;
pub mod webhook_events;
