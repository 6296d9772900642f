//! Real-time counters in Redis: accepted events are added to `usage:{tenant}:{day}:{metric}`
//! and `usage:{tenant}:month:{YYYY-MM}:{metric}` after the commit (a void subtracts), and read
//! back by day (the realtime route) or by day and month (the usage limits). Redis is a cache of PostgreSQL
//! here: a failure is logged and counted, never passed on to the caller. aggregate-usage
//! repairs the counters from PostgreSQL with [`observe`] then [`repair`], a compare-and-set
//! that never overwrites an increment made after the observation.
//!
//! A counter is exact at any size: a hash `{hi, lo}` worth `hi * 10^15 + lo`, kept normalised
//! (`0 <= lo < 10^15`) by one Lua script. A plain `INCRBY` string would overflow at 2^63 (about
//! 9.2 million maximum-quantity events in a day), and Lua's doubles are exact only below 2^53;
//! with `lo` below 10^15 every number the script handles stays exact, and `hi` (an int64 of
//! units of 10^15) cannot overflow for any input the API accepts.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use crate::domain::usage::UsageEvent;
use crate::domain::TenantId;
use crate::redis::{keys, Redis, RedisError};
use chrono::{DateTime, Duration, NaiveDate, Utc};

/// The base of a counter's low part.
pub const LOW_BASE: i128 = 1_000_000_000_000_000;

/// KEYS: counters; ARGV[3i-2], ARGV[3i-1]: the high and low parts of what to add to KEYS[i]
/// (either may be negative; the result is normalised); ARGV[3i]: its TTL in seconds. A counter
/// written by an earlier version as a plain `INCRBY` string is converted first. Returns each
/// counter's new `{hi, lo}`: what ingestion detects threshold crossings from.
static ADD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local base = 1000000000000000
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'string' then
    local legacy = redis.call('GET', key)
    redis.call('DEL', key)
    local hi = string.sub(legacy, 1, -16)
    if hi == '' or hi == '-' then hi = '0' end
    redis.call('HSET', key, 'hi', hi, 'lo', string.format('%.0f', tonumber(string.sub(legacy, -15))))
  end
  local lo = redis.call('HINCRBY', key, 'lo', ARGV[3 * i - 1])
  local carry = math.floor(lo / base)
  if carry ~= 0 then
    lo = redis.call('HINCRBY', key, 'lo', string.format('%.0f', -carry * base))
  end
  local add = tonumber(ARGV[3 * i - 2]) + carry
  local hi
  if add ~= 0 then
    hi = redis.call('HINCRBY', key, 'hi', string.format('%.0f', add))
  else
    hi = tonumber(redis.call('HGET', key, 'hi') or '0')
  end
  redis.call('EXPIRE', key, ARGV[3 * i])
  out[i] = {hi, lo}
end
return out
",
    )
});

/// KEYS: counters. Returns `[hi, lo]` per key (nil parts when absent); an earlier version's
/// plain string counter comes back as `[nil, value]`.
static READ: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'hash' then
    out[i] = redis.call('HMGET', key, 'hi', 'lo')
  elseif kind == 'string' then
    out[i] = {false, redis.call('GET', key)}
  else
    out[i] = {false, false}
  end
end
return out
",
    )
});

/// A total as the script's two arguments: `(total div 10^15, total mod 10^15)`.
pub fn split(total: i128) -> (i64, i64) {
    // |total| of one batch is far below 2^63 * 10^15, so both parts fit.
    let hi = total.div_euclid(LOW_BASE);
    let lo = total.rem_euclid(LOW_BASE);
    (
        i64::try_from(hi).unwrap_or(i64::MAX),
        i64::try_from(lo).unwrap_or(0),
    )
}

/// The value of a counter read as `(hi, lo)`.
pub fn join(hi: Option<i64>, lo: Option<i64>) -> Option<i128> {
    match (hi, lo) {
        (None, None) => None,
        (hi, lo) => Some(i128::from(hi.unwrap_or(0)) * LOW_BASE + i128::from(lo.unwrap_or(0))),
    }
}

/// Whether an event's day still has a live counter (days older than the TTL skip Redis).
pub fn day_is_counted(day: NaiveDate, now: DateTime<Utc>, ttl_days: i64) -> bool {
    day > now.date_naive() - Duration::days(ttl_days)
}

/// How long a month's counter lives after its last change: past the month and ingestion's
/// window for late events (35 days), whatever `COUNTER_TTL_DAYS` says for days.
pub const MONTH_COUNTER_TTL_DAYS: i64 = 70;

/// What a counter counts: a UTC day's units of a metric, or a UTC month's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Span {
    Day,
    Month,
}

/// One counter of a tenant: its span, the span's first day, the metric.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub span: Span,
    pub start: NaiveDate,
    pub metric: String,
}

impl Cell {
    pub fn day(day: NaiveDate, metric: &str) -> Cell {
        Cell {
            span: Span::Day,
            start: day,
            metric: metric.to_owned(),
        }
    }

    /// The counter of the month that holds `day`.
    pub fn month(day: NaiveDate, metric: &str) -> Cell {
        Cell {
            span: Span::Month,
            start: crate::domain::period::PeriodType::Monthly.start_of(day),
            metric: metric.to_owned(),
        }
    }

    pub fn key(&self, tenant: TenantId) -> String {
        match self.span {
            Span::Day => keys::usage_counter(tenant, self.start, &self.metric),
            Span::Month => keys::usage_month_counter(tenant, self.start, &self.metric),
        }
    }

    /// Its lifetime after a change: `ttl_days` for a day, [`MONTH_COUNTER_TTL_DAYS`] for a month.
    pub fn ttl_seconds(&self, ttl_days: i64) -> i64 {
        match self.span {
            Span::Day => ttl_days * 86_400,
            Span::Month => MONTH_COUNTER_TTL_DAYS * 86_400,
        }
    }

    /// Whether it is still counted at `now` (a day within `ttl_days`, a month within
    /// [`MONTH_COUNTER_TTL_DAYS`] of its first day): older ones are not created again by a late
    /// change, which would start them from that change alone.
    pub fn is_counted(&self, now: DateTime<Utc>, ttl_days: i64) -> bool {
        match self.span {
            Span::Day => day_is_counted(self.start, now, ttl_days),
            Span::Month => day_is_counted(self.start, now, MONTH_COUNTER_TTL_DAYS),
        }
    }
}

/// A counter after a change: what was added, and its value now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub cell: Cell,
    pub added: i128,
    pub value: i128,
}

/// Adds accepted events to their day's and month's counters in one atomic script. Returns the
/// counters changed with their new values; `Err` only to let the caller log and count the
/// failure.
pub async fn add(
    redis: &Redis,
    tenant: TenantId,
    events: &[&UsageEvent],
    now: DateTime<Utc>,
    ttl_days: i64,
) -> Result<Vec<Counted>, RedisError> {
    let mut sums: BTreeMap<(NaiveDate, &str), i128> = BTreeMap::new();
    for e in events {
        *sums
            .entry((e.occurred_at.date_naive(), e.metric.as_str()))
            .or_default() += i128::from(e.quantity);
    }
    add_totals(redis, tenant, &sums, now, ttl_days).await
}

/// Adds signed totals per `(day, metric)` to a tenant's day and month counters in one atomic
/// script, skipping counters no longer counted ([`Cell::is_counted`]). Returns the counters
/// changed, with their new values.
pub async fn add_totals(
    redis: &Redis,
    tenant: TenantId,
    totals: &BTreeMap<(NaiveDate, &str), i128>,
    now: DateTime<Utc>,
    ttl_days: i64,
) -> Result<Vec<Counted>, RedisError> {
    let mut cells: BTreeMap<Cell, i128> = BTreeMap::new();
    for ((day, metric), total) in totals {
        for cell in [Cell::day(*day, metric), Cell::month(*day, metric)] {
            if cell.is_counted(now, ttl_days) {
                *cells.entry(cell).or_default() += *total;
            }
        }
    }
    cells.retain(|_, total| *total != 0);
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = ADD.prepare_invoke();
    for (cell, total) in &cells {
        let (hi, lo) = split(*total);
        invocation
            .key(cell.key(tenant))
            .arg(hi)
            .arg(lo)
            .arg(cell.ttl_seconds(ttl_days));
    }
    let mut conn = redis.connection().await?;
    let values: Vec<(i64, i64)> = match invocation.invoke_async(&mut conn).await {
        Ok(values) => values,
        Err(e) => {
            redis.forget_connection_on(&e).await;
            return Err(e.into());
        }
    };
    Ok(cells
        .into_iter()
        .zip(values)
        .map(|((cell, added), (hi, lo))| Counted {
            cell,
            added,
            value: join(Some(hi), Some(lo)).unwrap_or(0),
        })
        .collect())
}

/// The values of counters of one tenant (one hash slot) in one round trip: `None` for a counter
/// that does not exist.
pub async fn read(
    redis: &Redis,
    tenant: TenantId,
    cells: &[Cell],
) -> Result<Vec<Option<i128>>, RedisError> {
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = READ.prepare_invoke();
    for cell in cells {
        invocation.key(cell.key(tenant));
    }
    let mut conn = redis.connection().await?;
    match invocation
        .invoke_async::<Vec<(Option<i64>, Option<i64>)>>(&mut conn)
        .await
    {
        Ok(values) => Ok(values.into_iter().map(|(hi, lo)| join(hi, lo)).collect()),
        Err(e) => {
            redis.forget_connection_on(&e).await;
            Err(e.into())
        }
    }
}

/// KEYS: counters. Returns per key its state as one comparable token: `none`, `h:<hi>:<lo>`
/// (absent parts as 0) or `s:<value>` (an earlier version's plain string).
static SNAPSHOT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind == 'hash' then
    local v = redis.call('HMGET', key, 'hi', 'lo')
    out[i] = 'h:' .. (v[1] or '0') .. ':' .. (v[2] or '0')
  elseif kind == 'string' then
    out[i] = 's:' .. redis.call('GET', key)
  else
    out[i] = 'none'
  end
end
return out
",
    )
});

/// KEYS: counters; ARGV[4i-3], ARGV[4i-2], ARGV[4i-1]: the token KEYS[i] was read as, and the
/// high and low parts of its correct value; ARGV[4i]: its TTL in seconds. A counter still in the state
/// it was read in is set to the correct value (deleted when that is 0); one that changed since
/// (an increment raced the repair) is left alone. Returns 1 (set) or 0 (left) per key.
static COMPARE_AND_SET: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  local now
  if kind == 'hash' then
    local v = redis.call('HMGET', key, 'hi', 'lo')
    now = 'h:' .. (v[1] or '0') .. ':' .. (v[2] or '0')
  elseif kind == 'string' then
    now = 's:' .. redis.call('GET', key)
  else
    now = 'none'
  end
  if now == ARGV[4 * i - 3] then
    redis.call('DEL', key)
    if ARGV[4 * i - 2] ~= '0' or ARGV[4 * i - 1] ~= '0' then
      redis.call('HSET', key, 'hi', ARGV[4 * i - 2], 'lo', ARGV[4 * i - 1])
      redis.call('EXPIRE', key, ARGV[4 * i])
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
",
    )
});

/// A counter as read for a repair: its exact value and the token that names that state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub token: String,
    /// `None` when the counter does not exist.
    pub value: Option<i128>,
}

impl Observed {
    fn parse(token: String) -> Self {
        let value = if let Some(rest) = token.strip_prefix("h:") {
            rest.split_once(':').and_then(|(hi, lo)| {
                Some(
                    i128::from(hi.parse::<i64>().ok()?) * LOW_BASE
                        + i128::from(lo.parse::<i64>().ok()?),
                )
            })
        } else if let Some(rest) = token.strip_prefix("s:") {
            rest.parse::<i128>().ok()
        } else {
            None
        };
        Observed { token, value }
    }
}

/// Reads counters of one tenant (one hash slot) for a repair.
pub async fn observe(
    redis: &Redis,
    tenant: TenantId,
    cells: &[Cell],
) -> Result<Vec<Observed>, RedisError> {
    if cells.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = SNAPSHOT.prepare_invoke();
    for cell in cells {
        invocation.key(cell.key(tenant));
    }
    let mut conn = redis.connection().await?;
    match invocation.invoke_async::<Vec<String>>(&mut conn).await {
        Ok(tokens) => Ok(tokens.into_iter().map(Observed::parse).collect()),
        Err(e) => {
            redis.forget_connection_on(&e).await;
            Err(e.into())
        }
    }
}

/// A counter to set: its cell, the state it was observed in, and its correct value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub cell: Cell,
    pub observed: Observed,
    pub value: i128,
}

/// Sets counters of one tenant to their correct values where each is still as observed.
/// Returns, per counter, whether it was set (`false`: it changed meanwhile and was left).
pub async fn repair(
    redis: &Redis,
    tenant: TenantId,
    fixes: &[Fix],
    ttl_days: i64,
) -> Result<Vec<bool>, RedisError> {
    if fixes.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = COMPARE_AND_SET.prepare_invoke();
    for fix in fixes {
        let (hi, lo) = split(fix.value);
        invocation
            .key(fix.cell.key(tenant))
            .arg(&fix.observed.token)
            .arg(hi)
            .arg(lo)
            .arg(fix.cell.ttl_seconds(ttl_days));
    }
    let mut conn = redis.connection().await?;
    match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
        Ok(set) => Ok(set.into_iter().map(|s| s == 1).collect()),
        Err(e) => {
            redis.forget_connection_on(&e).await;
            Err(e.into())
        }
    }
}

/// The counters of one tenant and day for the given metrics (absent counters are omitted).
pub async fn read_day<'m>(
    redis: &Redis,
    tenant: TenantId,
    day: NaiveDate,
    metrics: impl Iterator<Item = &'m str>,
) -> Result<BTreeMap<String, i128>, RedisError> {
    let metrics: Vec<&str> = metrics.collect();
    if metrics.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut invocation = READ.prepare_invoke();
    for metric in &metrics {
        invocation.key(keys::usage_counter(tenant, day, metric));
    }
    let mut conn = redis.connection().await?;
    let values: Vec<(Option<i64>, Option<i64>)> = match invocation.invoke_async(&mut conn).await {
        Ok(values) => values,
        Err(e) => {
            redis.forget_connection_on(&e).await;
            return Err(e.into());
        }
    };
    Ok(metrics
        .into_iter()
        .zip(values)
        .filter_map(|(m, (hi, lo))| join(hi, lo).filter(|n| *n != 0).map(|n| (m.to_owned(), n)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_days_within_the_ttl_are_counted() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T00:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        assert!(day_is_counted(day(25), now, 7));
        assert!(day_is_counted(day(19), now, 7));
        assert!(!day_is_counted(day(18), now, 7));
    }

    #[test]
    fn totals_split_and_join_exactly() {
        for total in [
            0i128,
            1,
            LOW_BASE - 1,
            LOW_BASE,
            i128::from(i64::MAX) + 1,
            -1,
            -LOW_BASE - 7,
        ] {
            let (hi, lo) = split(total);
            assert!((0..LOW_BASE as i64).contains(&lo), "{total}");
            assert_eq!(join(Some(hi), Some(lo)), Some(total));
        }
        assert_eq!(join(None, None), None);
        assert_eq!(join(None, Some(5)), Some(5));
    }
}
