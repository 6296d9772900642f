//! meterbridge's shared crate: configuration, secrets, connections, domain types, repositories,
//! HTTP problem documents and telemetry. Functions depend on this crate and on nothing of each
//! other's.

pub mod aggregation;
pub mod auth;
pub mod clock;
pub mod config;
pub mod context;
pub mod db;
pub mod domain;
pub mod edge;
pub mod http;
pub mod json;
pub mod payment_transition;
pub mod rate_limit;
pub mod redis;
pub mod relay;
pub mod repo;
pub mod request_guard;
pub mod secrets;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod ttl_cache;
pub mod usage_counters;

pub use config::Config;
pub use context::{Services, StartupError};
pub use db::{Database, DbError};
