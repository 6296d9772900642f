//! Per-key and per-tenant rate limits, and the tenant's share of requests in flight, kept in
//! Redis so that every container of a function sees the same budgets.
//!
//! One request is one script call (one round trip): it charges the key's and the tenant's
//! request budgets and, for ingestion, their event budgets (a batch costs its number of events),
//! and takes a lease on one of the tenant's in-flight slots — all or nothing, atomically. Every
//! key of one check carries the tenant as its hash tag (`tenant:api:rate-limit:{<tenant>}:…`),
//! so the script runs on one slot of a cluster. A budget's state is one GCRA instant that
//! expires by itself; a lease is a member of the tenant's in-flight set scored by its expiry, so
//! a container that dies holding one frees it when the function's timeout has passed.
//!
//! A container remembers the budgets' state Redis reported with a refusal, and refuses a
//! request that state already refuses without asking Redis again (see [`Refusals`]): a caller
//! retrying in a loop past its limit costs the shared Redis a round trip only when its budget
//! could pass again.
//!
//! When Redis cannot be reached the request is not refused for that reason (usage is never
//! lost because the limiter failed): the same budgets are charged in this container's memory
//! instead, the `RateLimiterFallback` metric counts it, and an alarm watches that metric.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::clock::Clock;
use crate::config::{ConfigError, Env};
use crate::domain::rate_limit::{charge, Charge, Limits, Rate};
use crate::domain::TenantId;
use crate::redis::{Redis, RedisConnection, RedisError};

/// KEYS[1..n]: budgets; KEYS[n+1]: the tenant's in-flight set.
/// ARGV[1]: now (µs since the epoch); ARGV[2]: n; then per budget its interval (µs a unit),
/// tolerance (µs) and cost (units); then the in-flight limit (0: no lease), the lease's id and
/// its expiry (µs).
/// Returns `{allowed (0/1), leases held before this one, TAT of budget 1 before, …}` (a TAT of
/// -1: none). The arithmetic is [`charge`]'s; a refusal writes nothing. A budget's state is kept
/// a minute past its TAT (a TAT in the past counts as none): a container whose clock runs a
/// little behind still finds it.
static CHECK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local allowed = 1
local out = {0, 0}
local next_tats = {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i])
  local tolerance = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  local stored = redis.call('GET', KEYS[i])
  local base = now
  if stored then
    out[i + 2] = stored
    base = math.max(tonumber(stored), now)
  else
    out[i + 2] = '-1'
  end
  local next_tat = base + interval * cost
  if next_tat - now > tolerance then allowed = 0 end
  next_tats[i] = next_tat
end
local max_in_flight = tonumber(ARGV[3 * n + 3])
local set = KEYS[n + 1]
if max_in_flight > 0 then
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  local held = redis.call('ZCARD', set)
  out[2] = held
  if held >= max_in_flight then allowed = 0 end
end
if allowed == 1 then
  for i = 1, n do
    local ttl = math.floor((next_tats[i] - now) / 1000) + 60000
    redis.call('SET', KEYS[i], string.format('%.0f', next_tats[i]), 'PX', ttl)
  end
  if max_in_flight > 0 then
    local expiry = tonumber(ARGV[3 * n + 5])
    redis.call('ZADD', set, string.format('%.0f', expiry), ARGV[3 * n + 4])
    redis.call('PEXPIRE', set, math.floor((expiry - now) / 1000) + 1000)
  end
end
out[1] = allowed
return out
",
    )
});

/// Which budget a charge is against (the name in the `RateLimit` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    KeyRequests,
    KeyEvents,
    TenantRequests,
    TenantEvents,
}

impl Budget {
    pub fn name(self) -> &'static str {
        match self {
            Budget::KeyRequests => "key-requests",
            Budget::KeyEvents => "key-events",
            Budget::TenantRequests => "tenant-requests",
            Budget::TenantEvents => "tenant-events",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Budget::KeyRequests => "this API key's request budget",
            Budget::KeyEvents => "this API key's event budget",
            Budget::TenantRequests => "the tenant's request budget",
            Budget::TenantEvents => "the tenant's event budget",
        }
    }

    fn key(self, endpoint: &str, tenant: TenantId, key_id: Uuid) -> String {
        match self {
            Budget::KeyRequests => {
                format!("tenant:api:rate-limit:{{{tenant}}}:{endpoint}:key:{key_id}:requests")
            }
            Budget::KeyEvents => {
                format!("tenant:api:rate-limit:{{{tenant}}}:{endpoint}:key:{key_id}:events")
            }
            Budget::TenantRequests => {
                format!("tenant:api:rate-limit:{{{tenant}}}:{endpoint}:requests")
            }
            Budget::TenantEvents => format!("tenant:api:rate-limit:{{{tenant}}}:{endpoint}:events"),
        }
    }
}

/// The tenant's in-flight set for one function.
pub fn in_flight_key(endpoint: &str, tenant: TenantId) -> String {
    format!("tenant:api:in-flight:{{{tenant}}}:{endpoint}")
}

/// What one request asks of the limiter.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub tenant: TenantId,
    pub key_id: Uuid,
    pub limits: Limits,
    /// Events in the request (0 for a route that takes none: no event budget is charged).
    pub events: u32,
}

impl Ask {
    fn budgets(&self) -> Vec<(Budget, Rate, u32)> {
        let mut budgets = vec![
            (Budget::KeyRequests, self.limits.key_requests, 1),
            (Budget::TenantRequests, self.limits.tenant_requests, 1),
        ];
        if self.events > 0 {
            budgets.push((Budget::KeyEvents, self.limits.key_events, self.events));
            budgets.push((Budget::TenantEvents, self.limits.tenant_events, self.events));
        }
        budgets
    }
}

/// One budget as a request left it, for the `RateLimit-Policy` and `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetState {
    pub budget: Budget,
    pub rate: Rate,
    pub charge: Charge,
}

/// Where the decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Redis,
    /// Redis was unreachable: this container's own budgets.
    Container,
}

/// The limiter's answer.
#[derive(Debug)]
pub enum Decision {
    Allowed {
        budgets: Vec<BudgetState>,
        /// The in-flight slot taken; give it back with [`Lease::release`].
        lease: Option<Lease>,
        source: Source,
    },
    Limited(Limited),
}

/// A refused request: nothing was charged, nothing will be stored.
#[derive(Debug, Clone)]
pub struct Limited {
    pub budgets: Vec<BudgetState>,
    /// The budget that refused (the one whose wait is longest), or `None` when the tenant's
    /// requests in flight are at their limit.
    pub by: Option<Budget>,
    pub max_in_flight: u32,
    pub retry_after: Duration,
    /// The request costs more than the refusing budget's burst: no wait makes it pass.
    pub never: bool,
}

impl Limited {
    /// What the problem document says.
    pub fn detail(&self) -> String {
        match self.by {
            None => format!(
                "the tenant already has {} requests in flight, its limit; retry when one has finished",
                self.max_in_flight
            ),
            Some(budget) => {
                let rate = self
                    .budgets
                    .iter()
                    .find(|b| b.budget == budget)
                    .map(|b| b.rate.to_string())
                    .unwrap_or_default();
                if self.never {
                    format!(
                        "the request costs more than {} allows at once ({rate}); send smaller batches",
                        budget.describe()
                    )
                } else {
                    format!(
                        "{} ({rate}) is spent; nothing was stored, retry after {} s",
                        budget.describe(),
                        retry_after_secs(self.retry_after)
                    )
                }
            }
        }
    }
}

/// A request's in-flight slot. Give it back with [`Lease::release`] (or drop it: a panic, a
/// cancelled request); one never given back (a container that died) expires with its lease,
/// past the function's timeout.
pub struct Lease {
    conn: RedisConnection,
    set: String,
    id: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Gives the slot back, off the request's path: the removal is sent by a task of its own,
    /// so a request waits for one Redis round trip (its check), not two. The task runs while the
    /// response is handed to the Lambda runtime, before the container asks for its next event;
    /// a removal that fails only delays the slot's return to its lease's expiry.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left to send it: the slot expires with its lease
        };
        let mut conn = self.conn.clone();
        let mut command = redis::cmd("ZREM");
        command.arg(&self.set).arg(&self.id);
        runtime.spawn(async move {
            if let Err(e) = command.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %e, "rate limiter: an in-flight slot was not released; it expires with its lease");
            }
        });
    }
}

/// Whole seconds to wait, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_micros().div_ceil(1_000_000).max(1) as u64
}

/// `RateLimit-Policy`: each budget charged, as its burst (`q`) over the window in which its rate
/// refills it (`w`, seconds).
pub fn policy_header(budgets: &[BudgetState]) -> String {
    budgets
        .iter()
        .map(|b| {
            let window = u64::from(b.rate.burst).div_ceil(u64::from(b.rate.per_second.max(1)));
            format!(
                "\"{}\";q={};w={}",
                b.budget.name(),
                b.rate.burst,
                window.max(1)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `RateLimit`: what is left of each budget (`r`) and the seconds until it is whole (`t`).
pub fn state_header(budgets: &[BudgetState]) -> String {
    budgets
        .iter()
        .map(|b| {
            let reset = (b.charge.reset_us.max(0) as u64).div_ceil(1_000_000);
            format!(
                "\"{}\";r={};t={}",
                b.budget.name(),
                b.charge.remaining,
                reset
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The limiter's settings, read at cold start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// `RATE_LIMITS_ENABLED` (true): false turns every limit of the function off.
    pub enabled: bool,
    /// `RATE_LIMIT_LEASE_SECONDS` (60): how long an in-flight slot is held at most — longer
    /// than the function's timeout (29 s), so only a dead container's slot expires.
    pub lease_for: Duration,
}

impl RateLimitConfig {
    pub fn from<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        Ok(RateLimitConfig {
            enabled: env.parse_or("RATE_LIMITS_ENABLED", true)?,
            lease_for: Duration::from_secs(env.bounded_or(
                "RATE_LIMIT_LEASE_SECONDS",
                60,
                30..=900,
            )?),
        })
    }

    /// The function's limiter for the budgets of `endpoint`, `None` when limits are off.
    pub fn limiter(self, endpoint: &'static str, clock: Arc<dyn Clock>) -> Option<RateLimiter> {
        self.enabled
            .then(|| RateLimiter::new(endpoint, self.lease_for, clock))
    }
}

/// One per container and function.
pub struct RateLimiter {
    /// The function's budgets' namespace (`usage`, `payments`).
    endpoint: &'static str,
    /// How long a lease may be held: past the function's timeout, a lease is a dead
    /// container's.
    lease_for: Duration,
    clock: Arc<dyn Clock>,
    /// The fallback's budgets: their TATs by Redis key.
    local: Mutex<HashMap<String, i64>>,
    /// The TATs Redis answered with its last refusals, by Redis key (see [`Refusals`]).
    refusals: Refusals,
}

/// The fallback forgets its budgets past this many (a flood of keys costs no memory).
const LOCAL_BUDGETS: usize = 10_000;

/// What Redis said when it last refused a request of this container: each budget's TAT, by its
/// Redis key. A TAT only ever moves forward (every container's charge pushes it later; none
/// pulls it back), so a remembered one is a lower bound of the budget's state now, and a
/// request it already refuses would be refused by Redis too — with the same arithmetic
/// ([`charge`]) and today's rates, as the script would. Such a request is refused here without
/// a round trip: a caller retrying in a loop costs the shared Redis nothing until its budget
/// could pass again, when the request goes to Redis as any other. Allowed requests always go to
/// Redis; nothing here ever lets a request through.
#[derive(Default)]
struct Refusals(Mutex<HashMap<String, i64>>);

impl Refusals {
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// The TATs remembered for `keys` that still bind at `now` (`None` for the others), or
    /// `None` when none does; those that no longer bind are forgotten.
    fn bounds(&self, keys: &[String], now: i64) -> Option<Vec<Option<i64>>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let tats: Vec<Option<i64>> = keys
            .iter()
            .map(|k| match map.get(k) {
                Some(tat) if *tat > now => Some(*tat),
                Some(_) => {
                    map.remove(k);
                    None
                }
                None => None,
            })
            .collect();
        tats.iter().any(Option::is_some).then_some(tats)
    }

    /// Remembers the TATs Redis reported with a refusal (past ones bind nothing).
    fn remember(&self, keys: Vec<String>, tats: &[Option<i64>], now: i64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= LOCAL_BUDGETS {
            map.retain(|_, tat| *tat > now);
            if map.len() >= LOCAL_BUDGETS {
                map.clear();
            }
        }
        for (key, tat) in keys.into_iter().zip(tats) {
            if let Some(tat) = tat.filter(|tat| *tat > now) {
                let kept = map.entry(key).or_insert(tat);
                *kept = (*kept).max(tat);
            }
        }
    }
}

impl RateLimiter {
    pub fn new(endpoint: &'static str, lease_for: Duration, clock: Arc<dyn Clock>) -> Self {
        RateLimiter {
            endpoint,
            lease_for,
            clock,
            local: Mutex::new(HashMap::new()),
            refusals: Refusals::default(),
        }
    }

    fn now_us(&self) -> i64 {
        self.clock.now().timestamp_micros()
    }

    /// Charges a request against its budgets and takes an in-flight slot; with no Redis, or
    /// none reachable, against this container's budgets. A request that what Redis answered
    /// this container's last refusals already refuses is refused without asking it again.
    pub async fn check(&self, redis: Option<&Redis>, ask: &Ask) -> Decision {
        let now = self.now_us();
        if let Some(limited) = self.refused_before(ask, now) {
            return Decision::Limited(limited);
        }
        if let Some(redis) = redis {
            match self.check_redis(redis, ask, now).await {
                Ok(decision) => return decision,
                Err(e) => {
                    metrics::counter!("RateLimiterFallback").increment(1);
                    tracing::warn!(error = %e, "rate limiter: Redis unreachable, this container's budgets apply");
                }
            }
        }
        self.check_local(ask, now)
    }

    /// The Redis key of each of `budgets`.
    fn keys(&self, ask: &Ask, budgets: &[(Budget, Rate, u32)]) -> Vec<String> {
        budgets
            .iter()
            .map(|(b, _, _)| b.key(self.endpoint, ask.tenant, ask.key_id))
            .collect()
    }

    /// The refusal Redis would answer, computed from the TATs of its earlier refusals, if
    /// those already refuse the request.
    fn refused_before(&self, ask: &Ask, now: i64) -> Option<Limited> {
        if self.refusals.is_empty() {
            return None;
        }
        let budgets = ask.budgets();
        let keys = self.keys(ask, &budgets);
        let tats = self.refusals.bounds(&keys, now)?;
        let states = states(&budgets, &tats, now);
        if states.iter().all(|s| s.charge.allowed) {
            return None;
        }
        Some(limited(states, false, ask.limits.max_in_flight))
    }

    async fn check_redis(
        &self,
        redis: &Redis,
        ask: &Ask,
        now: i64,
    ) -> Result<Decision, RedisError> {
        let budgets = ask.budgets();
        let keys = self.keys(ask, &budgets);
        let lease_id = Uuid::new_v4().to_string();
        let set = in_flight_key(self.endpoint, ask.tenant);
        let mut invocation = CHECK.prepare_invoke();
        invocation.arg(now).arg(budgets.len());
        for (key, (_, rate, cost)) in keys.iter().zip(&budgets) {
            invocation
                .key(key)
                .arg(rate.interval_us())
                .arg(rate.tolerance_us())
                .arg(*cost);
        }
        let expiry = now + self.lease_for.as_micros() as i64;
        invocation
            .key(&set)
            .arg(ask.limits.max_in_flight)
            .arg(&lease_id)
            .arg(expiry);
        let mut conn = redis.connection().await?;
        let answer: Vec<redis::Value> = match invocation.invoke_async(&mut conn).await {
            Ok(answer) => answer,
            Err(e) => {
                redis.forget_connection_on(&e).await;
                return Err(e.into());
            }
        };
        let number = |v: Option<&redis::Value>| -> Option<i64> {
            match v? {
                redis::Value::Int(i) => Some(*i),
                redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                redis::Value::SimpleString(s) => s.parse().ok(),
                _ => None,
            }
        };
        let allowed = number(answer.first()) == Some(1);
        let held = number(answer.get(1)).unwrap_or(0);
        let tats: Vec<Option<i64>> = (0..budgets.len())
            .map(|i| number(answer.get(i + 2)).filter(|t| *t >= 0))
            .collect();
        let states = states(&budgets, &tats, now);
        if allowed {
            return Ok(Decision::Allowed {
                budgets: states,
                lease: (ask.limits.max_in_flight > 0).then_some(Lease {
                    conn,
                    set,
                    id: lease_id,
                }),
                source: Source::Redis,
            });
        }
        self.refusals.remember(keys, &tats, now);
        let in_flight_full =
            ask.limits.max_in_flight > 0 && held >= i64::from(ask.limits.max_in_flight);
        Ok(Decision::Limited(limited(
            states,
            in_flight_full,
            ask.limits.max_in_flight,
        )))
    }

    fn check_local(&self, ask: &Ask, now: i64) -> Decision {
        let budgets = ask.budgets();
        let keys = self.keys(ask, &budgets);
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if local.len() >= LOCAL_BUDGETS {
            local.retain(|_, tat| *tat > now);
            if local.len() >= LOCAL_BUDGETS {
                local.clear();
            }
        }
        let tats: Vec<Option<i64>> = keys.iter().map(|k| local.get(k).copied()).collect();
        let states = states(&budgets, &tats, now);
        if states.iter().all(|s| s.charge.allowed) {
            for (key, state) in keys.into_iter().zip(&states) {
                local.insert(key, state.charge.tat_us);
            }
            // One request at a time per container (Lambda): no in-flight slot to count here.
            Decision::Allowed {
                budgets: states,
                lease: None,
                source: Source::Container,
            }
        } else {
            Decision::Limited(limited(states, false, ask.limits.max_in_flight))
        }
    }
}

/// Each budget's charge, computed from its TAT before the request.
fn states(budgets: &[(Budget, Rate, u32)], tats: &[Option<i64>], now: i64) -> Vec<BudgetState> {
    budgets
        .iter()
        .zip(tats)
        .map(|((budget, rate, cost), tat)| BudgetState {
            budget: *budget,
            rate: *rate,
            charge: charge(*tat, now, *rate, *cost),
        })
        .collect()
}

fn limited(states: Vec<BudgetState>, in_flight_full: bool, max_in_flight: u32) -> Limited {
    let refusing = states
        .iter()
        .filter(|s| !s.charge.allowed)
        .max_by_key(|s| (s.charge.never, s.charge.retry_after_us))
        .copied();
    match refusing {
        Some(state) => Limited {
            by: Some(state.budget),
            retry_after: Duration::from_micros(state.charge.retry_after_us.max(0) as u64),
            never: state.charge.never,
            max_in_flight,
            budgets: states,
        },
        None => Limited {
            by: None,
            // A slot frees when a request ends: typically well within a second.
            retry_after: Duration::from_secs(if in_flight_full { 1 } else { 0 }),
            never: false,
            max_in_flight,
            budgets: states,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn every_key_of_a_check_shares_the_tenants_slot() {
        let tenant = TenantId(Uuid::new_v4());
        let key = Uuid::new_v4();
        let slot = Slot::for_key(in_flight_key("usage", tenant));
        for budget in [
            Budget::KeyRequests,
            Budget::KeyEvents,
            Budget::TenantRequests,
            Budget::TenantEvents,
        ] {
            assert_eq!(Slot::for_key(budget.key("usage", tenant, key)), slot);
            assert!(budget
                .key("usage", tenant, key)
                .starts_with("tenant:api:rate-limit:{"));
        }
    }

    #[test]
    fn headers_name_each_budget() {
        let state = |budget, rate: Rate, cost| BudgetState {
            budget,
            rate,
            charge: charge(None, 0, rate, cost),
        };
        let budgets = [
            state(Budget::KeyRequests, Rate::new(10, 20), 1),
            state(Budget::KeyEvents, Rate::new(2_000, 4_000), 1_000),
        ];
        assert_eq!(
            policy_header(&budgets),
            "\"key-requests\";q=20;w=2, \"key-events\";q=4000;w=2"
        );
        assert_eq!(
            state_header(&budgets),
            "\"key-requests\";r=19;t=1, \"key-events\";r=3000;t=1"
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1_001)), 2);
    }
}
