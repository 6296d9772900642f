//! `ingest-usage`: authenticated, tenant-scoped batch ingestion of usage events with idempotent
//! dedup, real-time counters in Redis, usage queries and summaries, and corrections (voids).
//!
//! The Lambda entry point (`main.rs`) only wires [`App::from_env`] to [`routes::handle`]; tests
//! and the benchmark call the same functions in-process.

pub mod app;
pub mod batch;
pub mod cloudevents;
pub mod config;
pub mod corrections;
pub mod cursor;
pub mod ingest;
pub mod meter_query;
pub mod query;
pub mod routes;
pub mod summary;
pub mod thresholds;
pub mod usage_limits;

pub use app::App;
pub use config::IngestConfig;
pub use routes::handle;
