//! The client's settings: [`ClientBuilder`] and the policies it takes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Client;
use crate::outcome::Outcome;

/// The most events the API takes in one request.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// What [`Client::record`] does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Drop the new event at once (the default): `record` never waits. The event is counted
    /// in [`Stats::dropped`](crate::Stats::dropped), and a warning is logged at most once per
    /// [`ClientBuilder::drop_warning_interval`] with the number dropped since the last one.
    #[default]
    Drop,
    /// Wait up to `deadline` for room, then drop the event as [`OverflowPolicy::Drop`] does.
    ///
    /// The wait **parks the calling thread** (it is a plain blocking wait, usable from
    /// synchronous code). On a Tokio runtime it blocks that worker thread for up to
    /// `deadline`: never use it on a current-thread runtime (the client's own task could not
    /// run to make room), and on a multi-thread runtime keep `deadline` short or call `record`
    /// inside `tokio::task::block_in_place`.
    Block {
        /// The longest `record` waits for room.
        deadline: Duration,
    },
}

/// How failed sends are retried: exponential backoff with full jitter.
///
/// The `n`-th retry of a batch waits a random time between 0 and `min(cap, base × 2ⁿ⁻¹)`, and
/// never less than the server's `Retry-After` when it sent one. Connection errors, timeouts,
/// `408`, `429` and `5xx` answers are retried; a `413` (or a `429` without `Retry-After`: the
/// batch costs more than the rate limit's burst) splits the batch in two instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first retry's ceiling (default 100 ms).
    pub base: Duration,
    /// The longest wait between two attempts (default 30 s).
    pub cap: Duration,
    /// Attempts per batch before its events are abandoned (`None`, the default: keep trying
    /// while the client runs; [`Client::shutdown`] abandons what is still unsent).
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

/// The per-event outcome callback.
pub(crate) type Callback = Arc<dyn Fn(&Outcome) + Send + Sync>;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("invalid base URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("the API key is empty or holds characters an HTTP header cannot carry")]
    InvalidApiKey,
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    #[error("no Tokio runtime: build the client inside one, or give it a runtime handle")]
    NoRuntime,
    #[error("the HTTP client could not be built: {0}")]
    Http(String),
}

/// Settings of a [`Client`]; start with [`Client::builder`].
///
/// ```no_run
/// use std::time::Duration;
/// use meterbridge_client::{Client, OverflowPolicy, RetryPolicy};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::builder("https://api.example.com", std::env::var("METERBRIDGE_KEY")?)
///     .max_batch(500)
///     .linger(Duration::from_millis(200))
///     .queue_capacity(100_000)
///     .overflow(OverflowPolicy::Drop)
///     .retry(RetryPolicy { cap: Duration::from_secs(10), ..RetryPolicy::default() })
///     .on_outcome(|outcome| {
///         if !outcome.status.is_stored() {
///             tracing::warn!(?outcome, "usage event not stored");
///         }
///     })
///     .build()?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct ClientBuilder {
    pub(crate) base_url: String,
    pub(crate) payments_base_url: Option<String>,
    pub(crate) api_key: String,
    pub(crate) max_batch: usize,
    pub(crate) linger: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) retry: RetryPolicy,
    pub(crate) overflow: OverflowPolicy,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) drop_warning_interval: Duration,
    pub(crate) drop_grace: Duration,
    pub(crate) on_outcome: Option<Callback>,
    pub(crate) user_agent: Option<String>,
    pub(crate) runtime: Option<tokio::runtime::Handle>,
}

impl ClientBuilder {
    pub(crate) fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> Self {
        ClientBuilder {
            base_url: base_url.into(),
            payments_base_url: None,
            api_key: api_key.into(),
            max_batch: 500,
            linger: Duration::from_millis(200),
            queue_capacity: 100_000,
            max_in_flight: 2,
            retry: RetryPolicy::default(),
            overflow: OverflowPolicy::Drop,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            drop_warning_interval: Duration::from_secs(10),
            drop_grace: Duration::from_secs(5),
            on_outcome: None,
            user_agent: None,
            runtime: None,
        }
    }

    /// Where the payment routes (`/v1/payments…`) are served, when not at the base URL (a
    /// deployment serves both APIs behind one base URL; locally each function may have its
    /// own).
    pub fn payments_base_url(mut self, url: impl Into<String>) -> Self {
        self.payments_base_url = Some(url.into());
        self
    }

    /// Events per request, 1 to 1000 (default 500): a batch is sent as soon as this many are
    /// queued.
    pub fn max_batch(mut self, events: usize) -> Self {
        self.max_batch = events;
        self
    }

    /// How long the first queued event waits for others before a smaller batch is sent
    /// (default 200 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Events the queue holds at most (default 100,000), not counting batches being sent.
    pub fn queue_capacity(mut self, events: usize) -> Self {
        self.queue_capacity = events;
        self
    }

    /// Batches being sent (or waiting to be retried) at once, 1 to 64 (default 2).
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.max_in_flight = batches;
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    pub fn overflow(mut self, policy: OverflowPolicy) -> Self {
        self.overflow = policy;
        self
    }

    /// The longest one HTTP request may take, answer included (default 10 s); a send that
    /// times out is retried.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The longest connecting may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// At most one "events dropped" warning per this interval (default 10 s).
    pub fn drop_warning_interval(mut self, interval: Duration) -> Self {
        self.drop_warning_interval = interval;
        self
    }

    /// When the last handle of a client is dropped without [`Client::shutdown`], how long its
    /// task goes on sending what is queued before it stops (default 5 s). Prefer calling
    /// `shutdown`: a drop cannot wait, nor tell what was left unsent.
    pub fn drop_grace(mut self, grace: Duration) -> Self {
        self.drop_grace = grace;
        self
    }

    /// Called once per sent event with its outcome, on the client's background task: keep it
    /// quick and never block in it. A panic in it is caught and logged.
    pub fn on_outcome<F>(mut self, callback: F) -> Self
    where
        F: Fn(&Outcome) + Send + Sync + 'static,
    {
        self.on_outcome = Some(Arc::new(callback));
        self
    }

    /// The `User-Agent` header (default `meterbridge-client-rust/<version>`).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    /// The Tokio runtime the background task runs on (default: the current one).
    pub fn runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.runtime = Some(handle);
        self
    }

    /// Builds the client and starts its background task.
    pub fn build(self) -> Result<Client, BuildError> {
        Client::from_builder(self)
    }

    /// The settings checked, for the background task.
    pub(crate) fn settings(&self) -> Result<Settings, BuildError> {
        let invalid = |what: String| Err(BuildError::InvalidSetting(what));
        if !(1..=MAX_BATCH_EVENTS).contains(&self.max_batch) {
            return invalid(format!(
                "max_batch is 1 to {MAX_BATCH_EVENTS}, not {}",
                self.max_batch
            ));
        }
        if self.queue_capacity == 0 {
            return invalid("queue_capacity must be at least 1".into());
        }
        if !(1..=64).contains(&self.max_in_flight) {
            return invalid(format!(
                "max_in_flight is 1 to 64, not {}",
                self.max_in_flight
            ));
        }
        if self.retry.base.is_zero() || self.retry.cap < self.retry.base {
            return invalid("retry: base must be above 0 and cap at least base".into());
        }
        if self.retry.max_attempts == Some(0) {
            return invalid("retry: max_attempts must be at least 1".into());
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("timeouts must be above 0".into());
        }
        Ok(Settings {
            max_batch: self.max_batch,
            linger: self.linger,
            queue_capacity: self.queue_capacity,
            max_in_flight: self.max_in_flight,
            retry: self.retry,
            overflow: self.overflow,
            drop_warning_interval: self.drop_warning_interval,
            drop_grace: self.drop_grace,
        })
    }
}

/// Never prints the API key.
impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("payments_base_url", &self.payments_base_url)
            .field("api_key", &"<redacted>")
            .field("max_batch", &self.max_batch)
            .field("linger", &self.linger)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_in_flight", &self.max_in_flight)
            .field("retry", &self.retry)
            .field("overflow", &self.overflow)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("drop_warning_interval", &self.drop_warning_interval)
            .field("drop_grace", &self.drop_grace)
            .field("on_outcome", &self.on_outcome.is_some())
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

/// The checked settings the background task works by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub max_batch: usize,
    pub linger: Duration,
    pub queue_capacity: usize,
    pub max_in_flight: usize,
    pub retry: RetryPolicy,
    pub overflow: OverflowPolicy,
    pub drop_warning_interval: Duration,
    pub drop_grace: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let builder = || ClientBuilder::new("http://127.0.0.1:1", "mbk_test");
        assert!(builder().settings().is_ok());
        for bad in [
            builder().max_batch(0),
            builder().max_batch(1001),
            builder().queue_capacity(0),
            builder().max_in_flight(0),
            builder().retry(RetryPolicy {
                base: Duration::from_secs(2),
                cap: Duration::from_secs(1),
                max_attempts: None,
            }),
            builder().retry(RetryPolicy {
                max_attempts: Some(0),
                ..RetryPolicy::default()
            }),
        ] {
            assert!(
                matches!(bad.settings(), Err(BuildError::InvalidSetting(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let text = format!("{:?}", ClientBuilder::new("http://x", "mbk_secret_value"));
        assert!(!text.contains("mbk_secret_value"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
