//! A client for the meterbridge usage-metering API.
//!
//! - **Recording usage** — [`Client::record`] queues an event and returns in microseconds,
//!   whatever the network does. A background task sends the queue in batches to
//!   `POST /v1/usage/events`, retries what failed, and reports each event's outcome.
//! - **Reading usage** — [`Client::realtime`], [`Client::summary`], [`Client::limits`].
//! - **Payments** — [`Client::create_payment`] (with an `Idempotency-Key`),
//!   [`Client::payment`], [`Client::list_payments`], [`Client::verify_payment`].
//!
//! ```no_run
//! use std::time::Duration;
//! use meterbridge_client::{Client, Event};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder("https://api.example.com", std::env::var("METERBRIDGE_KEY")?)
//!     .on_outcome(|outcome| tracing::debug!(?outcome.status, id = %outcome.event_id))
//!     .build()?;
//!
//! client.record(Event::new("api.requests", 1).actor_id("user-42"));
//!
//! let today = client.realtime(None).await?;
//! println!("{:?}", today.counters);
//!
//! client.shutdown(Duration::from_secs(5)).await?;
//! # Ok(()) }
//! ```
//!
//! # How recording works
//!
//! **Never blocking, never failing.** `record` stamps the event — an `eventId` (UUIDv7) when
//! it has none, and `occurredAt` — and puts it in a bounded in-memory queue (one uncontended
//! lock). It returns [`Recorded::Queued`], or [`Recorded::Dropped`] when the queue is full; it
//! never returns an error and, under the default [`OverflowPolicy::Drop`], never waits.
//!
//! **Batching.** The background task sends a batch as soon as [`max_batch`] events are
//! queued (500 by default, at most 1000, the API's limit) or when the oldest queued event has
//! waited [`linger`] (200 ms), whichever comes first, with up to [`max_in_flight`] batches
//! being sent at once.
//!
//! **Exactly-once storage.** Because each event's id is fixed when it is recorded, a batch is
//! resent byte for byte: a retry of a batch the server had stored comes back as duplicates,
//! never as second events.
//!
//! **Retries.** Connection errors, timeouts, `408`, `429` and `5xx` answers are retried with
//! exponential backoff and full jitter ([`RetryPolicy`]). A `Retry-After` (seconds or an
//! HTTP date) holds every request of the client until then, and so does a spent budget in the
//! IETF `RateLimit` header (`r=0`: paused for its `t` seconds). A `413` splits the batch in two
//! (as does a `429` without `Retry-After`, which means the batch costs more than the rate
//! limit's burst). Any other error status of the whole request — `400`, `401`, `403`… — is not
//! retried: its events are reported rejected with the problem's code.
//!
//! **Outcomes.** Each event settles once: [`Status::Accepted`], [`Status::Duplicate`],
//! [`Status::Conflict`] or [`Status::Rejected`] as the server answered (conflicts and
//! rejections are never retried), or [`Status::Abandoned`] if the client stopped before the
//! server confirmed it. Outcomes go to the optional [`on_outcome`] callback and are counted in
//! [`Client::stats`] and through the [`metrics`] facade (see [`Stats`]).
//!
//! **Overflow.** With a full queue the new event is dropped and counted, and a warning is
//! logged at most once per interval with the number dropped since the last one — or, with
//! [`OverflowPolicy::Block`], `record` parks the calling thread up to a deadline for room
//! first.
//!
//! **Flush and shutdown.** [`Client::flush`] sends everything recorded before the call and
//! waits up to a deadline for it to settle, reporting how many events it could not send (they
//! stay queued). [`Client::shutdown`] flushes, then stops the task; later records are dropped
//! and counted.
//!
//! # AWS Lambda
//!
//! Build the client once per container, outside the handler, and flush before the handler
//! returns: a frozen container runs no background task between invocations. See
//! `examples/lambda.rs`.
//!
//! # Logging
//!
//! The client logs with [`tracing`] (warnings for retries, refused batches and dropped
//! events). It never logs the API key, and its `Debug` output leaves it out.
//!
//! # TLS
//!
//! HTTPS uses rustls with the Mozilla root certificates compiled in. A process-level rustls
//! `CryptoProvider`, when one is installed, is used; otherwise ring — so building a client
//! never panics for want of a provider.
//!
//! [`max_batch`]: ClientBuilder::max_batch
//! [`linger`]: ClientBuilder::linger
//! [`max_in_flight`]: ClientBuilder::max_in_flight
//! [`on_outcome`]: ClientBuilder::on_outcome

mod backoff;
mod client;
mod config;
mod decimal;
mod delivery;
mod error;
mod event;
mod inflight;
mod outcome;
mod overflow;
mod payments;
mod queue;
mod sender;
mod shared;
mod stats;
mod transport;
mod usage;
mod wire;

pub use client::{Client, DropReason, Recorded};
pub use config::{BuildError, ClientBuilder, OverflowPolicy, RetryPolicy, MAX_BATCH_EVENTS};
pub use error::{Error, FieldError, FlushError, Problem, TransportError};
pub use event::Event;
pub use http::StatusCode;
pub use outcome::{Outcome, Status};
pub use payments::{
    CreatedPayment, NewPayment, Payment, PaymentPage, PaymentQuery, PaymentStatus,
    PaymentTransition, TransitionOutcome, Verification, VerificationMethod,
};
pub use stats::Stats;
pub use usage::{
    Aggregate, Classification, LimitStatus, Period, Realtime, Source, Summary, SummaryQuery,
    UsageLimits,
};
