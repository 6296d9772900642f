//! `tenant.limits.*`: a tenant's and its keys' rate limit overrides — validate → one
//! transaction (the change and its audit row) → respond.

use meterbridge::domain::rate_limit::{self, Limits, Overrides, Rate};
use meterbridge::domain::{TenantId, Trust};
use meterbridge::repo::rate_limits::{self, Change};
use meterbridge::repo::{api_keys, tenants};
use meterbridge::{Database, DbError};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::AdminError;

/// The smallest event burst: a full batch must always be able to pass.
const MIN_EVENT_BURST: u32 = 1_000;

/// What `tenant.limits.set` asks for.
pub struct Requested {
    pub requests_per_second: Option<u32>,
    pub request_burst: Option<u32>,
    pub events_per_second: Option<u32>,
    pub event_burst: Option<u32>,
    pub max_in_flight: Option<u32>,
}

impl Requested {
    fn overrides(&self, for_key: bool) -> Result<Overrides, AdminError> {
        let pair = |rate: Option<u32>,
                    burst: Option<u32>,
                    field: &'static str,
                    min_burst: u32|
         -> Result<Option<Rate>, AdminError> {
            match (rate, burst) {
                (None, None) => Ok(None),
                (None, Some(_)) => Err(AdminError::BadRequest(format!(
                    "{field}: a burst needs its rate (set both)"
                ))),
                (Some(rate), burst) => {
                    let burst = burst.unwrap_or(rate.saturating_mul(2).max(min_burst));
                    if burst < min_burst {
                        return Err(AdminError::BadRequest(format!(
                            "{field}: the burst must be at least {min_burst} (a full batch)"
                        )));
                    }
                    Ok(Some(Rate::new(rate, burst).validate(field)?))
                }
            }
        };
        let overrides = Overrides {
            requests: pair(
                self.requests_per_second,
                self.request_burst,
                "requestsPerSecond",
                1,
            )?,
            events: pair(
                self.events_per_second,
                self.event_burst,
                "eventsPerSecond",
                MIN_EVENT_BURST,
            )?,
            max_in_flight: self.max_in_flight,
        };
        if let Some(n) = overrides.max_in_flight {
            if for_key {
                return Err(AdminError::BadRequest(
                    "maxInFlight: is the tenant's, not a key's (leave out apiKeyPrefix)".into(),
                ));
            }
            if !(1..=rate_limit::MAX_IN_FLIGHT).contains(&n) {
                return Err(AdminError::BadRequest(format!(
                    "maxInFlight: 1 to {}",
                    rate_limit::MAX_IN_FLIGHT
                )));
            }
        }
        if overrides.is_empty() {
            return Err(AdminError::BadRequest(
                "name a limit to set: requestsPerSecond, eventsPerSecond or maxInFlight".into(),
            ));
        }
        Ok(overrides)
    }
}

pub(crate) fn checked_text<'a>(
    value: &'a str,
    field: &str,
    max: usize,
) -> Result<&'a str, AdminError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(format!(
            "{field}: use 1-{max} characters without control characters"
        )));
    }
    Ok(value)
}

/// The tenant, and the key of `prefix` when one is named (it must be the tenant's).
async fn target(
    db: &Database,
    slug: &str,
    prefix: Option<&str>,
) -> Result<(TenantId, Option<Uuid>), AdminError> {
    let tenant = tenants::find_by_slug(db.pool(), slug)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no tenant with slug {slug:?}")))?;
    let Some(prefix) = prefix else {
        return Ok((tenant.id, None));
    };
    let key = api_keys::list_for_tenant(db.pool(), tenant.id)
        .await?
        .into_iter()
        .find(|k| k.prefix == prefix)
        .ok_or_else(|| {
            AdminError::NotFound(format!(
                "tenant {slug:?} has no API key with prefix {prefix:?}"
            ))
        })?;
    Ok((tenant.id, Some(key.id)))
}

/// The audited change a request names: its reason and actor checked, its tenant and key found.
async fn change<'a>(
    db: &Database,
    slug: &str,
    prefix: Option<&str>,
    reason: &'a str,
    actor: Option<&'a str>,
) -> Result<Change<'a>, AdminError> {
    let reason = checked_text(reason, "reason", 500)?;
    let actor = checked_text(actor.unwrap_or("admin"), "actor", 128)?;
    let (tenant, key) = target(db, slug, prefix).await?;
    Ok(Change {
        tenant,
        key,
        actor,
        reason,
    })
}

pub async fn set(
    db: &Database,
    slug: &str,
    prefix: Option<&str>,
    requested: &Requested,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let overrides = requested.overrides(prefix.is_some())?;
    let change = change(db, slug, prefix, reason, actor).await?;
    let mut tx = db.begin().await?;
    let row = rate_limits::set(&mut tx, &change, &overrides).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(json!({"tenant": slug, "override": row, "appliesWithin": "60 s (the API key cache)"}))
}

pub async fn clear(
    db: &Database,
    slug: &str,
    prefix: Option<&str>,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let change = change(db, slug, prefix, reason, actor).await?;
    let mut tx = db.begin().await?;
    let cleared = rate_limits::clear(&mut tx, &change).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(json!({"tenant": slug, "apiKeyPrefix": prefix, "cleared": cleared}))
}

pub async fn show(db: &Database, slug: &str) -> Result<Value, AdminError> {
    let (tenant, _) = target(db, slug, None).await?;
    let overrides = rate_limits::list(db.pool(), tenant).await?;
    let describe = |l: Limits| {
        json!({
            "keyRequests": rate_json(l.key_requests),
            "keyEvents": rate_json(l.key_events),
            "tenantRequests": rate_json(l.tenant_requests),
            "tenantEvents": rate_json(l.tenant_events),
            "maxInFlight": l.max_in_flight,
        })
    };
    Ok(json!({
        "tenant": slug,
        "defaults": {
            "internal": describe(Limits::defaults(Trust::Internal)),
            "external": describe(Limits::defaults(Trust::External)),
        },
        "overrides": overrides,
    }))
}

fn rate_json(rate: Rate) -> Value {
    json!({"perSecond": rate.per_second, "burst": rate.burst})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(
        rps: Option<u32>,
        burst: Option<u32>,
        eps: Option<u32>,
        in_flight: Option<u32>,
    ) -> Requested {
        Requested {
            requests_per_second: rps,
            request_burst: burst,
            events_per_second: eps,
            event_burst: None,
            max_in_flight: in_flight,
        }
    }

    #[test]
    fn a_rate_without_burst_gets_twice_the_rate_and_event_bursts_fit_a_batch() {
        let o = ask(Some(5), None, Some(100), Some(3))
            .overrides(false)
            .unwrap();
        assert_eq!(o.requests, Some(Rate::new(5, 10)));
        assert_eq!(o.events, Some(Rate::new(100, 1_000)));
        assert_eq!(o.max_in_flight, Some(3));
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(ask(None, None, None, None).overrides(false).is_err());
        assert!(ask(None, Some(5), None, None).overrides(false).is_err());
        assert!(ask(Some(0), None, None, None).overrides(false).is_err());
        assert!(ask(Some(u32::MAX), None, None, None)
            .overrides(false)
            .is_err());
        assert!(ask(None, None, None, Some(2)).overrides(true).is_err());
        assert!(ask(None, None, None, Some(0)).overrides(false).is_err());
        let small_burst = Requested {
            event_burst: Some(999),
            ..ask(None, None, Some(10), None)
        };
        assert!(small_burst.overrides(false).is_err());
        assert!(checked_text(" ", "reason", 10).is_err());
        assert!(checked_text("a\u{7}b", "reason", 10).is_err());
        assert_eq!(checked_text(" ok ", "reason", 10).unwrap(), "ok");
    }
}
