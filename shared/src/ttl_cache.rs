//! A bounded map whose entries expire by both clocks ([`Stamp`]): the verdicts a container
//! remembers between invocations — an API key's, a webhook endpoint's signing secrets or their
//! absence — for at most a TTL. When it is full, expired entries go first, then everything: a
//! flood of distinct keys costs lookups, never memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Stamp};

pub struct TtlCache<K, V> {
    ttl: Duration,
    max_entries: usize,
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<K, (Stamp, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, max_entries: usize, clock: Arc<dyn Clock>) -> Self {
        TtlCache {
            ttl,
            max_entries: max_entries.max(1),
            clock,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The value stored for `key`, unless it is older than the TTL.
    pub fn get(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| !at.is_older_than(self.clock.as_ref(), self.ttl))
            .map(|(_, value)| value.clone())
    }

    pub fn insert(&self, key: K, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max_entries && !entries.contains_key(&key) {
            let (ttl, clock) = (self.ttl, self.clock.as_ref());
            entries.retain(|_, (at, _)| !at.is_older_than(clock, ttl));
            if entries.len() >= self.max_entries {
                entries.clear();
            }
        }
        entries.insert(key, (Stamp::now(self.clock.as_ref()), value));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FrozenClock;

    #[test]
    fn entries_expire_and_the_map_stays_bounded() {
        let clock = FrozenClock::new();
        let cache: TtlCache<u32, &str> = TtlCache::new(Duration::from_secs(60), 3, clock.clone());
        cache.insert(1, "one");
        assert_eq!(cache.get(&1), Some("one"));
        clock.advance_wall(Duration::from_secs(60));
        assert_eq!(cache.get(&1), None, "expired by the wall clock");
        for k in 2..=4 {
            cache.insert(k, "x");
        }
        assert!(cache.len() <= 3, "the expired entry made room");
        for k in 5..100 {
            cache.insert(k, "flood");
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.get(&99), Some("flood"));
    }
}
