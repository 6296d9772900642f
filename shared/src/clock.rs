//! Time, injected. The functions read "now" (the day an event counts for, the ingestion
//! window, a period's finality) from the [`Clock`] their [`crate::Services`] hold, so a test
//! can run them as of any instant (`meterbridge::testing::clock`).
//!
//! Cache expiry uses both clocks. Lambda freezes a container between invocations, and the
//! monotonic clock may not advance while it is frozen: an entry stamped with `Instant` alone
//! could outlive its TTL by the whole freeze. A [`Stamp`] records both clocks and is stale when
//! either says the TTL has passed (or when the wall clock went backwards), so a revoked key or a
//! rotated secret bites within the documented time however long the container slept.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    fn monotonic(&self) -> Instant;
    fn wall(&self) -> SystemTime;

    /// The wall clock as a UTC instant.
    fn now(&self) -> DateTime<Utc> {
        DateTime::<Utc>::from(self.wall())
    }
}

/// The process's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// When something was cached, by both clocks.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    monotonic: Instant,
    wall: SystemTime,
}

impl Stamp {
    pub fn now(clock: &dyn Clock) -> Self {
        Stamp {
            monotonic: clock.monotonic(),
            wall: clock.wall(),
        }
    }

    /// Whether at least `ttl` has passed by either clock.
    pub fn is_older_than(&self, clock: &dyn Clock, ttl: Duration) -> bool {
        let by_monotonic = clock.monotonic().saturating_duration_since(self.monotonic);
        let by_wall = clock.wall().duration_since(self.wall);
        by_monotonic >= ttl || by_wall.map_or(true, |age| age >= ttl)
    }
}

/// A clock whose wall time a test moves while its monotonic time stands still, as in a frozen
/// Lambda container.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug)]
pub struct FrozenClock {
    monotonic: Instant,
    wall: std::sync::Mutex<SystemTime>,
}

#[cfg(any(test, feature = "testing"))]
impl FrozenClock {
    pub fn new() -> Arc<Self> {
        Arc::new(FrozenClock {
            monotonic: Instant::now(),
            wall: std::sync::Mutex::new(SystemTime::now()),
        })
    }

    /// Stopped at `at`, by the wall clock.
    pub fn at(at: DateTime<Utc>) -> Arc<Self> {
        Arc::new(FrozenClock {
            monotonic: Instant::now(),
            wall: std::sync::Mutex::new(SystemTime::from(at)),
        })
    }

    pub fn advance_wall(&self, by: Duration) {
        if let Ok(mut wall) = self.wall.lock() {
            *wall += by;
        }
    }
}

/// The real clock moved to another instant: it reads `at` when made and runs on from there, so
/// a test sees the calendar of any day while timeouts and leases still pass in real time.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock {
    /// What the real wall clock is moved by (either way).
    ahead: Duration,
    behind: Duration,
}

#[cfg(any(test, feature = "testing"))]
impl ShiftedClock {
    pub fn starting_at(at: DateTime<Utc>) -> Self {
        let real = SystemTime::now();
        let at = SystemTime::from(at);
        match at.duration_since(real) {
            Ok(ahead) => ShiftedClock {
                ahead,
                behind: Duration::ZERO,
            },
            Err(e) => ShiftedClock {
                ahead: Duration::ZERO,
                behind: e.duration(),
            },
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for ShiftedClock {
    fn monotonic(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        let real = SystemTime::now() + self.ahead;
        real.checked_sub(self.behind).unwrap_or(real)
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for FrozenClock {
    fn monotonic(&self) -> Instant {
        self.monotonic
    }

    fn wall(&self) -> SystemTime {
        self.wall
            .lock()
            .map(|w| *w)
            .unwrap_or_else(|_| SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_expires_by_either_clock() {
        let clock = FrozenClock::new();
        let stamp = Stamp::now(clock.as_ref());
        let ttl = Duration::from_secs(60);
        assert!(!stamp.is_older_than(clock.as_ref(), ttl));
        clock.advance_wall(Duration::from_secs(59));
        assert!(!stamp.is_older_than(clock.as_ref(), ttl));
        clock.advance_wall(Duration::from_secs(1));
        assert!(
            stamp.is_older_than(clock.as_ref(), ttl),
            "the monotonic clock stood still; the wall clock says 60 s"
        );
        let real = SystemClock;
        let stamp = Stamp::now(&real);
        assert!(!stamp.is_older_than(&real, ttl));
        assert!(stamp.is_older_than(&real, Duration::ZERO));
        let backwards = Stamp {
            monotonic: Instant::now(),
            wall: SystemTime::now() + Duration::from_secs(3600),
        };
        assert!(
            backwards.is_older_than(&real, ttl),
            "a wall clock that went backwards expires the entry"
        );
    }

    #[test]
    fn a_shifted_clock_starts_where_it_is_told_and_runs_on() {
        for at in ["2028-02-29T23:59:30Z", "2001-01-01T00:00:00Z"] {
            let at: DateTime<Utc> = at.parse().unwrap();
            let clock = ShiftedClock::starting_at(at);
            let read = clock.now();
            assert!(
                read >= at && read - at < chrono::Duration::seconds(5),
                "{read}"
            );
        }
    }
}
