//! The admin function: operator actions (migrate, tenants, API keys, payments, the outbox) invoked
//! as a Lambda with a
//! JSON action, or from the command line with the same code.

pub mod cli;
pub mod command;
pub mod error;
pub mod export;
pub mod handler;
pub mod limits;
pub mod meters;
pub mod offboard;
pub mod period_events;
pub mod settings;
pub mod subject;
pub mod usage_limits;

pub use command::Command;
pub use error::AdminError;
pub use handler::{execute, handle_event, Admin};
