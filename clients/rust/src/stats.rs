//! The client's counters: an atomic snapshot ([`Stats`]) and the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::outcome::Status;

/// A snapshot of a client's counters since it was built ([`Client::stats`]).
///
/// Once everything recorded is settled, `recorded = dropped + accepted + duplicates +
/// conflicts + rejected + abandoned`; until then the difference is `queued + in_flight`.
///
/// The same figures are published through the [`metrics`] facade (install any recorder to see
/// them): counters `meterbridge_client_events_recorded`, `…_accepted`, `…_duplicates`,
/// `…_conflicts`, `…_rejected`, `…_dropped`, `…_abandoned`, `meterbridge_client_requests`,
/// `meterbridge_client_retries`, `meterbridge_client_splits`, and the gauge
/// `meterbridge_client_queued`.
///
/// [`Client::stats`]: crate::Client::stats
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// `record` calls.
    pub recorded: u64,
    /// Events waiting in the queue now.
    pub queued: u64,
    /// Events taken from the queue and not yet settled (being sent, or waiting to be retried).
    pub in_flight: u64,
    /// Events the server answered for (accepted, duplicate, conflict or rejected).
    pub sent: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub rejected: u64,
    /// Events never queued: the queue was full, or the client shut down.
    pub dropped: u64,
    /// Events given up unsent (see [`Status::Abandoned`]).
    pub abandoned: u64,
    /// HTTP requests made to send batches.
    pub requests: u64,
    /// Requests that were retries of an earlier one.
    pub retries: u64,
    /// Batches split in two (the server found one too large).
    pub splits: u64,
}

const RECORDED: &str = "meterbridge_client_events_recorded";
const DROPPED: &str = "meterbridge_client_events_dropped";
const REQUESTS: &str = "meterbridge_client_requests";
const RETRIES: &str = "meterbridge_client_retries";
const SPLITS: &str = "meterbridge_client_splits";
const QUEUED: &str = "meterbridge_client_queued";

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    recorded: AtomicU64,
    /// `recorded` as last published to the metrics facade (recording itself never touches it).
    recorded_published: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    conflicts: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    abandoned: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    splits: AtomicU64,
}

impl Counters {
    /// On the hot path: one relaxed increment.
    pub fn recorded(&self) {
        self.recorded.fetch_add(1, Relaxed);
    }

    pub fn dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
        metrics::counter!(DROPPED).increment(1);
    }

    pub fn request(&self, retry: bool) {
        self.requests.fetch_add(1, Relaxed);
        metrics::counter!(REQUESTS).increment(1);
        if retry {
            self.retries.fetch_add(1, Relaxed);
            metrics::counter!(RETRIES).increment(1);
        }
    }

    pub fn split(&self) {
        self.splits.fetch_add(1, Relaxed);
        metrics::counter!(SPLITS).increment(1);
    }

    /// `n` events settled with `status`.
    pub fn settled(&self, status: Status, n: u64) {
        if n == 0 {
            return;
        }
        let (counter, name) = match status {
            Status::Accepted => (&self.accepted, "meterbridge_client_events_accepted"),
            Status::Duplicate => (&self.duplicates, "meterbridge_client_events_duplicates"),
            Status::Conflict => (&self.conflicts, "meterbridge_client_events_conflicts"),
            Status::Rejected => (&self.rejected, "meterbridge_client_events_rejected"),
            Status::Abandoned => (&self.abandoned, "meterbridge_client_events_abandoned"),
        };
        counter.fetch_add(n, Relaxed);
        metrics::counter!(name).increment(n);
        if status != Status::Abandoned {
            self.sent.fetch_add(n, Relaxed);
        }
    }

    /// Publishes what the hot path counted without touching the facade, and the queue depth.
    pub fn publish(&self, queued: usize) {
        let recorded = self.recorded.load(Relaxed);
        let before = self.recorded_published.swap(recorded, Relaxed);
        if recorded > before {
            metrics::counter!(RECORDED).increment(recorded - before);
        }
        metrics::gauge!(QUEUED).set(queued as f64);
    }

    pub fn snapshot(&self, queued: u64, in_flight: u64) -> Stats {
        Stats {
            recorded: self.recorded.load(Relaxed),
            queued,
            in_flight,
            sent: self.sent.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            conflicts: self.conflicts.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            requests: self.requests.load(Relaxed),
            retries: self.retries.load(Relaxed),
            splits: self.splits.load(Relaxed),
        }
    }
}
