//! When to send again: exponential backoff with full jitter, and the pause the server asked
//! for (shared by every batch of a client).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::config::RetryPolicy;

/// The wait before retry number `attempt` (1 for the first retry): uniformly random between 0
/// and `min(cap, base × 2^(attempt - 1))` ("full jitter").
pub(crate) fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let ceiling = policy
        .base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(policy.cap);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
}

/// No request of the client leaves before this instant: set by `Retry-After` (on `429` and
/// `503`) and by a spent `RateLimit` budget.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    until: Mutex<Option<Instant>>,
}

impl Gate {
    /// Holds every send for at least `wait` from now.
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut current = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        if current.is_none_or(|c| c < until) {
            *current = Some(until);
        }
    }

    /// The instant sends are held until, if it is still ahead.
    pub fn closed_until(&self) -> Option<Instant> {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        until.filter(|u| *u > Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_attempts: None,
        };
        for attempt in 1..=40 {
            let ceiling = Duration::from_millis(100 * (1u64 << (attempt - 1).min(20)))
                .min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(backoff(&policy, attempt) <= ceiling);
            }
        }
        // Jitter: not always the ceiling.
        let waits: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff(&policy, 5)).collect();
        assert!(waits.len() > 1);
    }

    #[tokio::test]
    async fn the_gate_keeps_the_latest_pause() {
        let gate = Gate::default();
        assert_eq!(gate.closed_until(), None);
        gate.pause_for(Duration::from_secs(5));
        gate.pause_for(Duration::from_secs(1));
        let until = gate.closed_until().unwrap();
        assert!(until >= Instant::now() + Duration::from_secs(4));
    }
}
