//! The warning about dropped events, logged at most once per interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::queue::Refused;

pub(crate) struct DropWarning {
    interval: Duration,
    capacity: usize,
    /// Dropped since the last warning.
    since_last: AtomicU64,
    /// When the last warning was logged.
    last: Mutex<Option<Instant>>,
}

impl DropWarning {
    pub fn new(interval: Duration, capacity: usize) -> Self {
        DropWarning {
            interval,
            capacity,
            since_last: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// One event dropped: warns when the interval since the last warning has passed, with how
    /// many were dropped since. Never waits: a thread that finds another warning leaves the
    /// count to it.
    pub fn dropped(&self, why: Refused) {
        self.since_last.fetch_add(1, Ordering::Relaxed);
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            return;
        }
        *last = Some(now);
        let dropped = self.since_last.swap(0, Ordering::Relaxed);
        match why {
            Refused::Full => tracing::warn!(
                dropped,
                capacity = self.capacity,
                "meterbridge-client: the usage queue is full; events dropped since the last warning"
            ),
            Refused::Closed => tracing::warn!(
                dropped,
                "meterbridge-client: events recorded after shutdown were dropped"
            ),
        }
    }
}
