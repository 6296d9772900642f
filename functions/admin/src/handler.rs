//! parse → validate → one statement or transaction → respond, for each admin action.

use meterbridge::aggregation::{AggregationConfig, AggregationError, Aggregator, Backfill};
use std::sync::Arc;

use meterbridge::auth::generate_api_key;
use meterbridge::clock::Clock;
use meterbridge::db::retry_transient;
use meterbridge::domain::payment::PaymentAction;
use meterbridge::domain::{Scopes, SourceService, TenantSlug, TenantStatus, Trust};
use meterbridge::payment_transition::{self, Actor, Outcome, Request, Target};
use meterbridge::relay::Relay;
use meterbridge::repo::outbox;
use meterbridge::repo::usage_storage::{self, StoragePolicy};

use meterbridge::repo::{api_keys, tenants};
use meterbridge::{Database, DbError};
use serde_json::{json, Value};

use crate::command::Command;
use crate::error::AdminError;
use crate::export::{self, Destination, ExportStore};
use crate::limits;
use crate::meters;
use crate::offboard;
use crate::period_events;
use crate::subject;
use crate::usage_limits;

const UNIQUE_VIOLATION: &str = "23505";

/// What the admin actions act on: the database (as its owner), and the outbox relay when an
/// event bus is configured.
pub struct Admin {
    pub db: Database,
    /// Where "now" comes from (the storage policy and the aggregation run as of it).
    pub clock: Arc<dyn Clock>,
    pub relay: Option<Relay>,
    pub storage: StoragePolicy,
    pub aggregation: AggregationConfig,
    /// Where subject exports go (`EXPORT_BUCKET`); none: only the command line's standard
    /// output.
    pub exports: Option<ExportStore>,
    /// A tenant's offboarding removes its Redis keys (`REDIS_SECRET_ID`) and its webhook
    /// signing secrets, once it has been disabled this long (`TENANT_ERASE_GRACE_DAYS`).
    pub redis: Option<meterbridge::redis::Redis>,
    pub webhook_secrets: Option<offboard::WebhookSecrets>,
    pub tenant_erase_grace: chrono::Duration,
}

impl Admin {
    pub fn new(db: Database) -> Self {
        Admin {
            db,
            clock: meterbridge::clock::system(),
            relay: None,
            storage: StoragePolicy::default(),
            aggregation: AggregationConfig::default(),
            exports: None,
            redis: None,
            webhook_secrets: None,
            tenant_erase_grace: chrono::Duration::days(offboard::DEFAULT_GRACE_DAYS as i64),
        }
    }

    /// The aggregation, as the owner and without Redis (the counters' repair is the
    /// aggregate-usage function's; these runs report it as skipped).
    fn aggregator(&self) -> Aggregator<'_> {
        Aggregator::new(&self.db, None, self.aggregation)
    }
}

fn aggregation_error(e: AggregationError) -> AdminError {
    match e {
        AggregationError::Database(db) => AdminError::Database(db),
        AggregationError::BadRequest(m) => AdminError::BadRequest(m),
    }
}

/// A Lambda payload: parses the action, then runs it.
pub async fn handle_event(admin: &Admin, payload: Value) -> Result<Value, AdminError> {
    let command: Command = serde_json::from_value(payload)
        .map_err(|e| AdminError::BadRequest(format!("invalid admin payload: {e}")))?;
    execute(admin, command).await
}

pub async fn execute(admin: &Admin, command: Command) -> Result<Value, AdminError> {
    tracing::info!(action = command.name(), "admin action");
    let db = &admin.db;
    match command {
        Command::OutboxStatus => Box::pin(outbox_status(db)).await,
        Command::OutboxRedrive {
            event_ids,
            event_type,
            reason,
            actor,
        } => {
            if event_ids.is_empty() && event_type.is_none() {
                return Err(AdminError::BadRequest(
                    "name the DEAD events to redrive: eventIds, or eventType".into(),
                ));
            }
            Box::pin(outbox_change(
                db,
                "redrive",
                &event_ids,
                event_type.as_deref(),
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::OutboxSkip {
            event_ids,
            reason,
            actor,
        } => {
            if event_ids.is_empty() {
                return Err(AdminError::BadRequest(
                    "eventIds: name the DEAD events to skip".into(),
                ));
            }
            Box::pin(outbox_change(
                db,
                "skip",
                &event_ids,
                None,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::OutboxRelay => {
            let relay = admin.relay.as_ref().ok_or_else(|| {
                AdminError::BadRequest(
                    "no event bus is configured for the admin function (EVENT_BUS_NAME)".into(),
                )
            })?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let report = Box::pin(relay.run(deadline)).await.map_err(|e| match e {
                meterbridge::relay::RelayError::Database(db) => AdminError::Database(db),
            })?;
            Ok(json!({ "relay": report }))
        }
        Command::UsageMaintain => {
            let now = admin.clock.now();
            let mut tx = db.pool().begin().await.map_err(DbError::from)?;
            let mut done = usage_storage::maintain(&mut tx, now, &admin.storage).await?;
            tx.commit().await.map_err(DbError::from)?;
            // Step by step, each in a transaction of its own, within the invocation's time.
            let started = std::time::Instant::now();
            let deadline = started + usage_storage::SCHEDULED_STEPS_TIME;
            let summaries = usage_storage::summarize(
                db.pool(),
                now,
                &admin.storage,
                started + usage_storage::SCHEDULED_SUMMARY_TIME,
            )
            .await?;
            done.extend(summaries.actions);
            let keys = usage_storage::compact(db.pool(), &admin.storage, deadline).await?;
            done.extend(keys.actions);
            for step in &done {
                tracing::info!(action = %step.action, object = %step.object, "usage storage");
            }
            Ok(json!({
                "policy": admin.storage,
                "actions": done,
                "summaryWorkLeft": summaries.more,
                "keySteps": keys.steps,
                "keyWorkLeft": keys.more
            }))
        }
        Command::UsageStatus => {
            let mut conn = db.pool().acquire().await.map_err(DbError::from)?;
            Ok(json!({"policy": admin.storage, "storage": usage_storage::status(&mut conn).await?}))
        }
        Command::UsageAggregate => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            let aggregator = admin.aggregator();
            let report = Box::pin(aggregator.aggregate(admin.clock.now(), deadline))
                .await
                .map_err(aggregation_error)?;
            Ok(json!({ "aggregation": report }))
        }
        Command::UsageBackfill {
            from,
            to,
            tenant,
            periods,
        } => {
            let request = Backfill::of(from, to, tenant, periods);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            let aggregator = admin.aggregator();
            let report = Box::pin(aggregator.backfill(&request, admin.clock.now(), deadline))
                .await
                .map_err(aggregation_error)?;
            Ok(json!({ "backfill": report }))
        }
        Command::SubjectErase {
            tenant,
            actor_id,
            request_id,
            reason,
            requested_by,
        } => {
            let asked = subject::Asked {
                tenant: &tenant,
                actor_id: &actor_id,
                request_id: &request_id,
                reason: &reason,
                requested_by: requested_by.as_deref(),
            };
            Box::pin(subject::erase(db, &asked)).await
        }
        Command::SubjectExport {
            tenant,
            actor_id,
            to,
        } => {
            let asked = export::Asked {
                tenant: &tenant,
                actor_id: &actor_id,
            };
            match to {
                Destination::Stdout => {
                    let manifest =
                        Box::pin(export::to_writer(db, &asked, tokio::io::stdout())).await?;
                    Ok(json!({ "manifest": manifest }))
                }
                Destination::S3 => {
                    let store = admin.exports.as_ref().ok_or_else(|| {
                        AdminError::BadRequest(
                            "no export bucket is configured for the admin function \
                             (EXPORT_BUCKET)"
                                .into(),
                        )
                    })?;
                    Box::pin(export::to_s3(db, store, &asked)).await
                }
            }
        }
        Command::UsageAggregationStatus => {
            let aggregator = admin.aggregator();
            let status = Box::pin(aggregator.status(admin.clock.now()))
                .await
                .map_err(aggregation_error)?;
            Ok(json!({ "aggregation": status }))
        }
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
        Command::TenantErase {
            tenant,
            reason,
            requested_by,
            keep_billing,
        } => {
            let asked = offboard::Asked {
                tenant: &tenant,
                reason: &reason,
                requested_by: requested_by.as_deref(),
                keep_billing,
            };
            Box::pin(offboard::erase(admin, &asked)).await
        }
        Command::TenantLimitsSet {
            tenant,
            api_key_prefix,
            requests_per_second,
            request_burst,
            events_per_second,
            event_burst,
            max_in_flight,
            reason,
            actor,
        } => {
            let requested = limits::Requested {
                requests_per_second,
                request_burst,
                events_per_second,
                event_burst,
                max_in_flight,
            };
            Box::pin(limits::set(
                db,
                &tenant,
                api_key_prefix.as_deref(),
                &requested,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::UsagePeriodEventsSet {
            tenant,
            periods,
            reason,
            actor,
        } => {
            Box::pin(period_events::set(
                db,
                &tenant,
                &periods,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::UsagePeriodEventsShow { tenant } => {
            Box::pin(period_events::show(db, &tenant)).await
        }
        Command::UsageLimitsSet {
            tenant,
            metric,
            period,
            limit,
            thresholds,
            reason,
            actor,
        } => {
            let requested = usage_limits::Requested {
                metric: &metric,
                period: &period,
                limit,
                thresholds,
            };
            Box::pin(usage_limits::set(
                db,
                &tenant,
                requested,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::UsageLimitsList { tenant } => Box::pin(usage_limits::list(db, &tenant)).await,
        Command::MeterSet {
            tenant,
            slug,
            event_type,
            metric,
            value_property,
            group_by,
            reason,
            actor,
        } => {
            let meter = meterbridge::domain::meter::MeterDefinition {
                slug,
                event_type,
                metric,
                value_property,
                group_by,
            };
            Box::pin(meters::set(db, &tenant, &meter, &reason, actor.as_deref())).await
        }
        Command::MeterList { tenant } => Box::pin(meters::list(db, &tenant)).await,
        Command::MeterRemove {
            tenant,
            slug,
            reason,
            actor,
        } => {
            Box::pin(meters::remove(
                db,
                &tenant,
                &slug,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::UsageLimitsRemove {
            tenant,
            metric,
            period,
            reason,
            actor,
        } => {
            Box::pin(usage_limits::remove(
                db,
                &tenant,
                &metric,
                &period,
                &reason,
                actor.as_deref(),
            ))
            .await
        }
        Command::TenantLimitsShow { tenant } => Box::pin(limits::show(db, &tenant)).await,
        Command::TenantLimitsClear {
            tenant,
            api_key_prefix,
            reason,
            actor,
        } => {
            Box::pin(limits::clear(
                db,
                &tenant,
                api_key_prefix.as_deref(),
                &reason,
                actor.as_deref(),
            ))
            .await
        }
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
            if tenant.status != TenantStatus::Active {
                return Err(AdminError::Conflict(format!(
                    "tenant {:?} is {}; it cannot get new keys",
                    tenant.slug,
                    tenant.status.as_str()
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
        failure: None,
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
        Outcome::Refused { reason, detail, .. } | Outcome::Stale { reason, detail, .. } => {
            Err(AdminError::Conflict(format!("{detail} ({reason})")))
        }
        Outcome::NotFound => Err(AdminError::NotFound(format!(
            "tenant {tenant_slug:?} has no payment {payment_id}"
        ))),
    }
}

async fn outbox_status(db: &Database) -> Result<Value, AdminError> {
    let mut conn = db.acquire().await?;
    let lines = outbox::status_lines(&mut conn).await?;
    let (backlog, oldest) = outbox::backlog(&mut conn).await?;
    let total = |status: &str| -> i64 {
        lines
            .iter()
            .filter(|l| l.status == status)
            .map(|l| l.count)
            .sum()
    };
    let due: i64 = lines.iter().map(|l| l.due).sum();
    Ok(json!({
        "pending": total("PENDING"),
        "processing": total("PROCESSING"),
        "failed": total("FAILED"),
        "dead": total("DEAD"),
        "published": total("PUBLISHED"),
        "skipped": total("SKIPPED"),
        "due": due,
        "backlog": backlog,
        "oldestPendingAgeSeconds": oldest,
        "byEventType": lines,
    }))
}

/// Redrives or skips DEAD events, and records who did it and why, in one transaction.
async fn outbox_change(
    db: &Database,
    action: &str,
    event_ids: &[uuid::Uuid],
    event_type: Option<&str>,
    reason: &str,
    actor: Option<&str>,
) -> Result<Value, AdminError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(AdminError::BadRequest(
            "reason: use 1-500 characters".into(),
        ));
    }
    let actor = actor
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .unwrap_or("admin");
    if actor.chars().count() > 128 {
        return Err(AdminError::BadRequest(
            "actor: use at most 128 characters".into(),
        ));
    }
    let mut tx = db.begin().await?;
    let changed = match action {
        "redrive" => outbox::redrive(&mut tx, event_ids, event_type).await?,
        _ => outbox::skip(&mut tx, event_ids).await?,
    };
    if !changed.is_empty() {
        outbox::log_admin_action(&mut tx, action, actor, reason, &changed).await?;
    }
    tx.commit().await.map_err(meterbridge::DbError::from)?;
    Ok(json!({ "action": action, "eventIds": changed, "count": changed.len() }))
}

fn no_tenant(slug: &str) -> AdminError {
    AdminError::NotFound(format!("no tenant with slug {slug:?}"))
}
