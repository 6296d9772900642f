//! `verify-payment`: payment records and their verification — by an internal service, or by a
//! provider's signed webhook — with the `payment.paid` (`.failed`, `.refunded`) event written to
//! the outbox in the same transaction as the payment's change.
//!
//! The Lambda entry point (`main.rs`) only wires [`App::from_env`] to [`routes::handle`]; tests
//! and the benchmark call the same functions in-process.

pub mod app;
pub mod body;
pub mod config;
pub mod payments;
pub mod routes;
pub mod signature;
pub mod verify;
pub mod webhook;

pub use app::App;
pub use config::PaymentsConfig;
pub use routes::handle;
