//! SQL, one module per table family, beside the row types it returns. Functions take any
//! executor, so callers choose the transaction (and with it the tenant RLS sees).

pub mod api_keys;
pub mod metrics;
pub mod tenants;
pub mod usage_events;
