//! parse → validate → one statement or transaction → respond, for each admin action.

use meterbridge::auth::generate_api_key;
use meterbridge::domain::{Scopes, SourceService, TenantSlug, TenantStatus, Trust};
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

fn no_tenant(slug: &str) -> AdminError {
    AdminError::NotFound(format!("no tenant with slug {slug:?}"))
}
