//! parse → validate → one statement or transaction → respond, for each admin action.

use meterbridge::auth::generate_api_key;
use meterbridge::db::retry_transient;
use meterbridge::domain::payment::PaymentAction;
use meterbridge::domain::{Scopes, SourceService, TenantSlug, TenantStatus, Trust};
use meterbridge::payment_transition::{self, Actor, Outcome, Request, Target};
use meterbridge::repo::{api_keys, tenants};
use meterbridge::Database;
use serde_json::{json, Value};

use crate::command::Command;
use crate::error::AdminError;

const UNIQUE_VIOLATION: &str = "23505";

/// A Lambda payload: parses the action, then runs it.
pub async fn handle_event(db: &Database, payload: Value) -> Result<Value, AdminError> {
    let command: Command = serde_json::from_value(payload)
        .map_err(|e| AdminError::BadRequest(format!("invalid admin payload: {e}")))?;
    execute(db, command).await
}

pub async fn execute(db: &Database, command: Command) -> Result<Value, AdminError> {
    tracing::info!(action = command.name(), "admin action");
    match command {
        Command::Migrate => {
            db.migrate().await?;
            let applied: Vec<Value> = meterbridge::db::MIGRATOR
                .iter()
                .map(|m| json!({"version": m.version, "description": m.description}))
                .collect();
            Ok(json!({"migrated": true, "migrations": applied}))
        }
        Command::TenantCreate { slug, name } => {
            let slug = TenantSlug::parse(&slug)?;
            let name = name.unwrap_or_else(|| slug.to_string());
            if name.trim().is_empty() || name.chars().count() > 200 {
                return Err(AdminError::BadRequest("name: use 1-200 characters".into()));
            }
            match tenants::insert(db.pool(), &slug, name.trim()).await {
                Ok(tenant) => Ok(json!({"tenant": tenant})),
                Err(e) if e.sqlstate().as_deref() == Some(UNIQUE_VIOLATION) => {
                    Err(AdminError::Conflict(format!(
                        "a tenant with slug {:?} already exists",
                        slug.as_str()
                    )))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::TenantDisable { slug } => {
            let tenant = tenants::disable(db.pool(), &slug)
                .await?
                .ok_or_else(|| no_tenant(&slug))?;
            Ok(json!({"tenant": tenant}))
        }
        Command::TenantList => Ok(json!({"tenants": tenants::list(db.pool()).await?})),
        Command::ApiKeyCreate {
            tenant,
            source,
            trust,
            scopes,
        } => {
            let source = SourceService::parse(&source)?;
            let trust: Trust = trust.parse()?;
            let scopes = match scopes {
                Some(names) => Scopes::parse_for(&names, trust)?,
                None => Scopes::default_for(trust),
            };
            let tenant = tenants::find_by_slug(db.pool(), &tenant)
                .await?
                .ok_or_else(|| no_tenant(&tenant))?;
            if tenant.status == TenantStatus::Disabled {
                return Err(AdminError::Conflict(format!(
                    "tenant {:?} is disabled; it cannot get new keys",
                    tenant.slug
                )));
            }
            let new_key = generate_api_key();
            let record = api_keys::insert(
                db.pool(),
                tenant.id,
                &new_key.prefix,
                &new_key.hash,
                &source,
                trust,
                scopes,
            )
            .await?;
            Ok(json!({
                "apiKey": record,
                "key": new_key.key,
                "notice": "store this key now: it is shown once and cannot be recovered",
            }))
        }
        Command::ApiKeyRevoke { prefix } => {
            let record = api_keys::revoke(db.pool(), &prefix).await?.ok_or_else(|| {
                AdminError::NotFound(format!("no API key with prefix {prefix:?}"))
            })?;
            Ok(json!({"apiKey": record}))
        }
        Command::PaymentRefund {
            tenant,
            payment_id,
            reason,
        } => Box::pin(refund(db, &tenant, payment_id, &reason)).await,
        Command::ApiKeyList { tenant } => {
            let found = tenants::find_by_slug(db.pool(), &tenant)
                .await?
                .ok_or_else(|| no_tenant(&tenant))?;
            Ok(
                json!({"tenant": found.slug, "apiKeys": api_keys::list_for_tenant(db.pool(), found.id).await?}),
            )
        }
    }
}

async fn refund(
    db: &Database,
    tenant_slug: &str,
    payment_id: uuid::Uuid,
    reason: &str,
) -> Result<Value, AdminError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 255 || reason.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(
            "reason: use 1-255 characters without control characters".into(),
        ));
    }
    let tenant = tenants::find_by_slug(db.pool(), tenant_slug)
        .await?
        .ok_or_else(|| no_tenant(tenant_slug))?;
    let correlation_id = format!("admin-refund-{}", uuid::Uuid::new_v4());
    let request = Request {
        action: PaymentAction::Refund,
        verified_by: None,
        method: None,
        provider_reference: None,
        expect_amount_minor: None,
        expect_currency: None,
        correlation_id: &correlation_id,
        trace_header: None,
    };
    let actor = Actor {
        label: "admin".into(),
        source_service: "admin",
        detail: Some(reason),
    };
    let outcome = retry_transient(|| async {
        let mut tx = db.tenant_tx(tenant.id).await?;
        let outcome =
            payment_transition::apply(&mut tx, tenant.id, Target::Id(payment_id), &request, &actor)
                .await?;
        tx.commit().await?;
        Ok(outcome)
    })
    .await?;
    match outcome {
        Outcome::Applied { payment, .. } => Ok(json!({"outcome": "applied", "payment": payment})),
        Outcome::AlreadyDone(payment) => Ok(json!({"outcome": "unchanged", "payment": payment})),
        Outcome::Refused { reason, detail, .. } => {
            Err(AdminError::Conflict(format!("{detail} ({reason})")))
        }
        Outcome::NotFound => Err(AdminError::NotFound(format!(
            "tenant {tenant_slug:?} has no payment {payment_id}"
        ))),
    }
}

fn no_tenant(slug: &str) -> AdminError {
    AdminError::NotFound(format!("no tenant with slug {slug:?}"))
}
