//! The events taken from the queue and not yet settled, as ranges of sequence numbers, and a
//! signal each time some settle (what `flush` waits on).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

pub(crate) struct InFlight {
    /// Unsettled parts: first sequence number → one past the last. A batch is one part until
    /// it is split.
    parts: Mutex<BTreeMap<u64, u64>>,
    /// Bumped whenever a part settles.
    progress: watch::Sender<u64>,
}

impl InFlight {
    pub fn new() -> Self {
        InFlight {
            parts: Mutex::new(BTreeMap::new()),
            progress: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, lo: u64, hi: u64) {
        self.lock().insert(lo, hi);
    }

    /// The part starting at `lo` becomes two, split before `mid`.
    pub fn split(&self, lo: u64, mid: u64) {
        let mut parts = self.lock();
        if let Some(hi) = parts.get(&lo).copied() {
            if lo < mid && mid < hi {
                parts.insert(lo, mid);
                parts.insert(mid, hi);
            }
        }
    }

    /// The part starting at `lo` is settled.
    pub fn settle(&self, lo: u64) {
        self.lock().remove(&lo);
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Unsettled events whose sequence number is below `target`.
    pub fn unsettled_before(&self, target: u64) -> u64 {
        self.lock()
            .range(..target)
            .map(|(lo, hi)| (*hi).min(target) - lo)
            .sum()
    }

    /// Unsettled events.
    pub fn len(&self) -> u64 {
        self.lock().iter().map(|(lo, hi)| hi - lo).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A receiver that sees every later settlement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parts_settle_on_their_own() {
        let in_flight = InFlight::new();
        in_flight.add(10, 20);
        in_flight.add(20, 25);
        assert_eq!(in_flight.len(), 15);
        assert_eq!(in_flight.unsettled_before(15), 5);
        in_flight.split(10, 14);
        in_flight.settle(10);
        assert_eq!(in_flight.unsettled_before(15), 1);
        assert_eq!(in_flight.unsettled_before(100), 11);
        in_flight.settle(14);
        in_flight.settle(20);
        assert!(in_flight.is_empty());
    }
}
