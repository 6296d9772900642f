//! Rate limits: the budgets a request is charged against, their defaults by key trust, the
//! per-tenant and per-key overrides, and the GCRA arithmetic that decides one charge. The Redis
//! script (`crate::rate_limit`) runs the same steps atomically for every budget of a request;
//! the in-container fallback runs these. No I/O here.
//!
//! GCRA (the generic cell rate algorithm) keeps one number per budget: its theoretical arrival
//! time (TAT), the instant by which everything charged so far would have been paid off at the
//! budget's rate. A charge of `cost` units moves it `cost × interval` later (interval = 1 s /
//! rate); the charge is allowed when the new TAT runs at most `burst × interval` ahead of now.
//! So a budget allows `burst` units at once and `rate` a second sustained, and its state
//! expires by itself once the TAT has passed.

use std::fmt;

use super::{InvalidValue, Trust};

/// The most units a second a budget may allow (one a microsecond: the arithmetic's grain).
pub const MAX_RATE: u32 = 1_000_000;
/// The most units one budget may allow at once.
pub const MAX_BURST: u32 = 10_000_000;
/// The most requests one tenant may hold in flight, across all containers.
pub const MAX_IN_FLIGHT: u32 = 1_000;

/// A budget: `per_second` units a second sustained, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Rate { per_second, burst }
    }

    /// Microseconds one unit occupies.
    pub fn interval_us(self) -> i64 {
        (1_000_000 / i64::from(self.per_second.clamp(1, MAX_RATE))).max(1)
    }

    /// How far the TAT may run ahead of now, in microseconds.
    pub fn tolerance_us(self) -> i64 {
        self.interval_us() * i64::from(self.burst.max(1))
    }

    pub fn validate(self, field: &'static str) -> Result<Self, InvalidValue> {
        if !(1..=MAX_RATE).contains(&self.per_second) {
            return Err(InvalidValue::new(
                field,
                format!("a rate is 1 to {MAX_RATE} a second"),
            ));
        }
        if !(1..=MAX_BURST).contains(&self.burst) {
            return Err(InvalidValue::new(
                field,
                format!("a burst is 1 to {MAX_BURST}"),
            ));
        }
        Ok(self)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s (burst {})", self.per_second, self.burst)
    }
}

/// What one charge against one budget concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub allowed: bool,
    /// The budget's TAT after the charge (unchanged when refused).
    pub tat_us: i64,
    /// Units still available at once after this charge (before it, when refused).
    pub remaining: u32,
    /// Microseconds until the budget is whole again.
    pub reset_us: i64,
    /// When refused: microseconds until the same charge would be allowed (0 when allowed).
    pub retry_after_us: i64,
    /// The charge exceeds the burst: waiting never helps.
    pub never: bool,
}

/// Charges `cost` units against a budget whose TAT is `tat_us` (`None`: untouched, or expired)
/// at `now_us` (microseconds since the Unix epoch).
pub fn charge(tat_us: Option<i64>, now_us: i64, rate: Rate, cost: u32) -> Charge {
    let interval = rate.interval_us();
    let tolerance = rate.tolerance_us();
    let base = tat_us.map_or(now_us, |t| t.max(now_us));
    let next = base + interval * i64::from(cost);
    let units = |span: i64| (span.max(0) / interval).min(i64::from(u32::MAX)) as u32;
    if next - now_us <= tolerance {
        Charge {
            allowed: true,
            tat_us: next,
            remaining: units(tolerance - (next - now_us)),
            reset_us: next - now_us,
            retry_after_us: 0,
            never: false,
        }
    } else {
        Charge {
            allowed: false,
            tat_us: base,
            remaining: units(tolerance - (base - now_us)),
            reset_us: base - now_us,
            retry_after_us: next - now_us - tolerance,
            never: cost > rate.burst,
        }
    }
}

/// A tenant's or a key's overrides of the defaults; `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub requests: Option<Rate>,
    pub events: Option<Rate>,
    /// A tenant's only: its requests in flight.
    pub max_in_flight: Option<u32>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }
}

/// The budgets one request of a key is charged against, within one API function (each function
/// keeps its own: a flood of usage never spends a tenant's payment budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests of this key.
    pub key_requests: Rate,
    /// Events of this key (ingestion: a batch costs its number of events).
    pub key_events: Rate,
    /// Requests of every key of the tenant together.
    pub tenant_requests: Rate,
    /// Events of every key of the tenant together.
    pub tenant_events: Rate,
    /// Requests of the tenant in flight at once, across every container.
    pub max_in_flight: u32,
}

/// The defaults: an internal key (a service of the tenant's own) gets ten times an external
/// (partner) key's budget; the tenant's together are twice an internal key's, so two keys of
/// one tenant cannot take more than that.
pub const INTERNAL_KEY_REQUESTS: Rate = Rate::new(100, 200);
pub const INTERNAL_KEY_EVENTS: Rate = Rate::new(20_000, 40_000);
pub const EXTERNAL_KEY_REQUESTS: Rate = Rate::new(10, 20);
pub const EXTERNAL_KEY_EVENTS: Rate = Rate::new(2_000, 4_000);
pub const TENANT_REQUESTS: Rate = Rate::new(200, 400);
pub const TENANT_EVENTS: Rate = Rate::new(40_000, 80_000);
pub const TENANT_IN_FLIGHT: u32 = 10;

impl Limits {
    /// The defaults for a key of `trust`.
    pub fn defaults(trust: Trust) -> Self {
        let (key_requests, key_events) = match trust {
            Trust::Internal => (INTERNAL_KEY_REQUESTS, INTERNAL_KEY_EVENTS),
            Trust::External => (EXTERNAL_KEY_REQUESTS, EXTERNAL_KEY_EVENTS),
        };
        Limits {
            key_requests,
            key_events,
            tenant_requests: TENANT_REQUESTS,
            tenant_events: TENANT_EVENTS,
            max_in_flight: TENANT_IN_FLIGHT,
        }
    }

    /// The defaults for `trust`, with the tenant's and then the key's overrides applied.
    pub fn resolve(trust: Trust, tenant: &Overrides, key: &Overrides) -> Self {
        let d = Limits::defaults(trust);
        Limits {
            key_requests: key.requests.unwrap_or(d.key_requests),
            key_events: key.events.unwrap_or(d.key_events),
            tenant_requests: tenant.requests.unwrap_or(d.tenant_requests),
            tenant_events: tenant.events.unwrap_or(d.tenant_events),
            max_in_flight: tenant.max_in_flight.unwrap_or(d.max_in_flight),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn a_budget_allows_its_burst_at_once_then_its_rate() {
        let rate = Rate::new(10, 20);
        let now = 1_700_000_000 * S;
        let mut tat = None;
        for i in 0..20 {
            let c = charge(tat, now, rate, 1);
            assert!(c.allowed, "unit {i}");
            assert_eq!(c.remaining, 19 - i);
            tat = Some(c.tat_us);
        }
        let refused = charge(tat, now, rate, 1);
        assert!(!refused.allowed && !refused.never);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after_us, S / 10);
        assert_eq!(refused.tat_us, tat.unwrap(), "a refusal changes nothing");
        // Waiting what it said is enough, and a tenth of a second buys exactly one unit.
        let later = charge(tat, now + refused.retry_after_us, rate, 1);
        assert!(later.allowed);
        assert!(!charge(Some(later.tat_us), now + refused.retry_after_us, rate, 1).allowed);
        // After the reset the whole burst is back.
        assert_eq!(charge(tat, now + refused.reset_us, rate, 20).remaining, 0);
        assert!(charge(tat, now + refused.reset_us, rate, 20).allowed);
    }

    #[test]
    fn a_charge_costs_its_units() {
        let rate = Rate::new(1_000, 2_000);
        let now = 5 * S;
        let first = charge(None, now, rate, 1_500);
        assert!(first.allowed);
        assert_eq!(first.remaining, 500);
        let second = charge(Some(first.tat_us), now, rate, 1_000);
        assert!(!second.allowed && !second.never);
        assert_eq!(second.retry_after_us, S / 2);
        assert!(charge(Some(first.tat_us), now, rate, 500).allowed);
        let too_big = charge(None, now, rate, 2_001);
        assert!(!too_big.allowed && too_big.never);
    }

    #[test]
    fn an_old_tat_counts_as_none() {
        let rate = Rate::new(5, 5);
        assert_eq!(
            charge(Some(1), 100 * S, rate, 1),
            charge(None, 100 * S, rate, 1)
        );
    }

    #[test]
    fn extreme_rates_stay_in_range() {
        let fast = Rate::new(MAX_RATE, MAX_BURST);
        assert_eq!(fast.interval_us(), 1);
        let c = charge(None, i64::MAX / 4, fast, u32::MAX);
        assert!(!c.allowed && c.never);
        let slow = Rate::new(1, 1);
        assert!(charge(None, 0, slow, 1).allowed);
        assert!(Rate::new(0, 1).validate("r").is_err());
        assert!(Rate::new(1, 0).validate("r").is_err());
        assert!(Rate::new(MAX_RATE + 1, 1).validate("r").is_err());
    }

    #[test]
    fn external_keys_get_far_less_and_overrides_win() {
        let internal = Limits::defaults(Trust::Internal);
        let external = Limits::defaults(Trust::External);
        assert!(external.key_requests.per_second * 10 <= internal.key_requests.per_second);
        assert!(external.key_events.per_second * 10 <= internal.key_events.per_second);
        // A full batch of 1,000 events always fits an event burst.
        assert!(external.key_events.burst >= 1_000);
        let tenant = Overrides {
            requests: Some(Rate::new(7, 7)),
            max_in_flight: Some(3),
            ..Overrides::default()
        };
        let key = Overrides {
            events: Some(Rate::new(9, 1_000)),
            ..Overrides::default()
        };
        let l = Limits::resolve(Trust::External, &tenant, &key);
        assert_eq!(l.tenant_requests, Rate::new(7, 7));
        assert_eq!(l.max_in_flight, 3);
        assert_eq!(l.key_events, Rate::new(9, 1_000));
        assert_eq!(l.key_requests, EXTERNAL_KEY_REQUESTS);
        assert_eq!(l.tenant_events, TENANT_EVENTS);
    }
}
