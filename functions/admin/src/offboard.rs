//! `tenant.erase`: a tenant's offboarding — checked (disabled for its grace period) → its rows
//! in steps, each a transaction of its own → its Redis keys → its webhook signing secrets → its
//! tenant row → the receipt (docs/personal-data.md#offboarding-a-tenant). The same request
//! again resumes where it stopped, or returns the receipt.

use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::error::DisplayErrorContext;
use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
use meterbridge::domain::{TenantId, TenantStatus};
use meterbridge::redis::{delete_tenant_keys, Redis};
use meterbridge::repo::tenant_erasures::{self, Receipt, Request, STEP_BLOCKS, STEP_ROWS};
use meterbridge::repo::tenants;
use serde_json::{json, Value};

use crate::error::AdminError;
use crate::handler::Admin;
use crate::limits::checked_text;

/// The offboarding's share of one invocation (the admin function has 300 s).
const ERASE_TIME: Duration = Duration::from_secs(240);
/// No step starts with less time than this left.
const MIN_STEP_TIME: Duration = Duration::from_secs(5);
/// Keys a Redis SCAN step looks at.
const SCAN_COUNT: usize = 1_000;

pub const DEFAULT_GRACE_DAYS: u64 = 30;

/// The webhook signing secrets (`<prefix>/<provider>/<tenant slug>`) in Secrets Manager.
#[derive(Clone)]
pub struct WebhookSecrets {
    pub client: aws_sdk_secretsmanager::Client,
    pub prefix: String,
}

/// What `tenant.erase` asks for, as it arrived.
pub struct Asked<'a> {
    pub tenant: &'a str,
    pub reason: &'a str,
    pub requested_by: Option<&'a str>,
    pub keep_billing: bool,
}

pub async fn erase(admin: &Admin, asked: &Asked<'_>) -> Result<Value, AdminError> {
    let pool = admin.db.pool();
    let reason = checked_text(asked.reason, "reason", 500)?;
    let requested_by = checked_text(asked.requested_by.unwrap_or("admin"), "requestedBy", 128)?;
    let Some(tenant) = tenants::find_by_slug(pool, asked.tenant).await? else {
        // Finished before (its row is gone): the receipt again.
        return match tenant_erasures::find_by_slug(pool, asked.tenant).await? {
            Some(receipt) if receipt.finished_at.is_some() => Ok(report(receipt)),
            _ => Err(AdminError::NotFound(format!(
                "no tenant with slug {:?}",
                asked.tenant
            ))),
        };
    };
    match tenant.status {
        TenantStatus::Active => {
            return Err(AdminError::Conflict(format!(
                "tenant {:?} is active: disable it first (tenant disable), then erase it once \
                 its grace period of {} days has passed",
                tenant.slug,
                admin.tenant_erase_grace.num_days()
            )))
        }
        TenantStatus::Disabled => {
            let disabled_at = tenant.disabled_at.unwrap_or(tenant.created_at);
            let ends = disabled_at + admin.tenant_erase_grace;
            if admin.clock.now() < ends {
                return Err(AdminError::Conflict(format!(
                    "tenant {:?} was disabled at {}; its grace period ends at {} \
                     (TENANT_ERASE_GRACE_DAYS)",
                    tenant.slug,
                    disabled_at.to_rfc3339(),
                    ends.to_rfc3339()
                )));
            }
        }
        TenantStatus::Erased => {}
    }
    let receipt = tenant_erasures::start(
        pool,
        &Request {
            tenant: tenant.id,
            slug: &tenant.slug,
            reason,
            requested_by,
            keep_billing: asked.keep_billing,
        },
    )
    .await?;
    if receipt.finished_at.is_none() && receipt.keep_billing != asked.keep_billing {
        return Err(AdminError::Conflict(format!(
            "tenant {:?} is being erased with keepBilling = {}: run it again with the same choice",
            tenant.slug, receipt.keep_billing
        )));
    }
    let deadline = Instant::now() + ERASE_TIME;
    let receipt = Box::pin(run(admin, tenant.id, deadline)).await?;
    Ok(report(receipt))
}

/// Steps until the receipt is finished or the deadline comes.
async fn run(admin: &Admin, tenant: TenantId, deadline: Instant) -> Result<Receipt, AdminError> {
    let pool = admin.db.pool();
    loop {
        let receipt = tenant_erasures::find(pool, tenant)
            .await?
            .ok_or_else(|| AdminError::NotFound("the erasure's receipt is gone".into()))?;
        if receipt.finished_at.is_some() || Instant::now() + MIN_STEP_TIME > deadline {
            return Ok(receipt);
        }
        match receipt.phase.as_str() {
            "rows" | "keys" => {
                tenant_erasures::table_step(pool, &receipt, STEP_ROWS, STEP_BLOCKS).await?;
            }
            "redis" => redis_step(admin, &receipt).await?,
            "secrets" => {
                let deleted = delete_secrets(admin.webhook_secrets.as_ref(), &receipt).await?;
                tenant_erasures::record_secrets(pool, receipt.tenant_id, deleted).await?;
            }
            "tenant" => tenant_erasures::finish(pool, &receipt).await?,
            other => {
                return Err(AdminError::Conflict(format!(
                    "the erasure is in an unknown phase {other:?}"
                )))
            }
        }
    }
}

async fn redis_step(admin: &Admin, receipt: &Receipt) -> Result<(), AdminError> {
    let redis: &Redis = admin.redis.as_ref().ok_or_else(|| {
        AdminError::BadRequest(
            "no Redis is configured for the admin function (REDIS_SECRET_ID): the tenant's \
             Redis keys cannot be removed; configure it and run the erasure again"
                .into(),
        )
    })?;
    let unavailable = |e: String| AdminError::Unavailable(format!("Redis: {e}"));
    let mut conn = redis
        .connection()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let cursor = receipt.redis_cursor.as_deref().unwrap_or("0");
    let (deleted, next) =
        delete_tenant_keys(&mut conn, TenantId(receipt.tenant_id), cursor, SCAN_COUNT)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
    let deleted = i64::try_from(deleted).unwrap_or(i64::MAX);
    tenant_erasures::record_redis(admin.db.pool(), receipt.tenant_id, deleted, next.as_deref())
        .await?;
    Ok(())
}

/// Deletes (without a recovery window) every webhook signing secret of the tenant:
/// `<prefix>/<provider>/<slug>`, whatever the provider.
async fn delete_secrets(
    secrets: Option<&WebhookSecrets>,
    receipt: &Receipt,
) -> Result<i32, AdminError> {
    let secrets = secrets.ok_or_else(|| {
        AdminError::BadRequest(
            "no Secrets Manager client is configured for the admin function: the tenant's \
             webhook signing secrets cannot be removed"
                .into(),
        )
    })?;
    let unavailable = |e: String| AdminError::Unavailable(format!("Secrets Manager: {e}"));
    let prefix = format!("{}/", secrets.prefix);
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let page = secrets
            .client
            .list_secrets()
            .filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values(&prefix)
                    .build(),
            )
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| unavailable(DisplayErrorContext(e).to_string()))?;
        for name in page.secret_list().iter().filter_map(|s| s.name()) {
            let provider_and_slug = name.strip_prefix(&prefix).unwrap_or_default();
            if provider_and_slug
                .split_once('/')
                .is_some_and(|(provider, slug)| !provider.is_empty() && slug == receipt.slug)
            {
                names.push(name.to_owned());
            }
        }
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    for name in &names {
        secrets
            .client
            .delete_secret()
            .secret_id(name)
            .force_delete_without_recovery(true)
            .send()
            .await
            .map_err(|e| unavailable(DisplayErrorContext(e).to_string()))?;
    }
    Ok(i32::try_from(names.len()).unwrap_or(i32::MAX))
}

fn report(receipt: Receipt) -> Value {
    let finished = receipt.finished_at.is_some();
    json!({
        "tenant": receipt.slug,
        "erasure": receipt,
        "finished": finished,
        "next": if finished { "nothing: the same request again returns this receipt" }
                else { "run the same request again: it resumes where it stopped" },
    })
}
