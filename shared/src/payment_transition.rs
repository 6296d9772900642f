//! The one place a payment changes state. In one transaction: lock the payment row, check what
//! the caller expects of it, decide by the state machine, apply, write the audit row and the
//! outbox event. A refused attempt writes its audit row and nothing else; any failure rolls back
//! all of it. Every route (internal verification, provider webhook) and the admin refund go
//! through [`apply`].

use crate::db::DbError;
use crate::domain::outbox::{
    Envelope, PaymentEventData, PAYMENT_AGGREGATE, PAYMENT_EVENT_SCHEMA_VERSION,
};
use crate::domain::payment::{decide, Decision, PaymentAction, VerificationMethod};
use crate::domain::TenantId;
use crate::repo::outbox;
use crate::repo::payment_audit::{self, AuditEntry};
use crate::repo::payments::{self, Change, Payment};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

/// Which payment.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Id(Uuid),
    /// The payment a provider knows by this reference (a webhook).
    Reference {
        provider: &'a str,
        reference: &'a str,
    },
}

/// Who asks, as the audit trail records it.
#[derive(Debug, Clone)]
pub struct Actor<'a> {
    /// `key:<prefix>/<source>`, `webhook:<provider>` or `admin`.
    pub label: String,
    /// The service the change is attributed to (the outbox row's source).
    pub source_service: &'a str,
    /// verifiedBy, or the webhook event id.
    pub detail: Option<&'a str>,
}

/// What is asked.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub action: PaymentAction,
    /// For a verification: who verified it and how.
    pub verified_by: Option<&'a str>,
    pub method: Option<VerificationMethod>,
    /// The provider's reference: must match the payment's, or is recorded when it has none.
    pub provider_reference: Option<&'a str>,
    /// For a failed attempt: the provider's code for it (`card_declined`).
    pub failure: Option<&'a str>,
    /// What the caller expects the payment to be for.
    pub expect_amount_minor: Option<i64>,
    pub expect_currency: Option<&'a str>,
    pub correlation_id: &'a str,
    /// The X-Ray trace of the request, carried to EventBridge with the event.
    pub trace_header: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The payment moved; its event (`event_id`) is in the outbox.
    Applied {
        payment: Payment,
        event_id: Uuid,
    },
    /// The payment already was where the action leads: nothing changed.
    AlreadyDone(Payment),
    /// Not allowed (now): `reason` is a stable code, `detail` a sentence. Audited.
    Refused {
        payment: Payment,
        reason: &'static str,
        detail: String,
    },
    /// Too late: the payment moved past what this reports, and it changes nothing (an earlier
    /// attempt's failure delivered after the success). Audited; a provider's delivery of it is
    /// acknowledged, not refused.
    Stale {
        payment: Payment,
        reason: &'static str,
        detail: String,
    },
    NotFound,
}

/// Runs one attempt inside the caller's tenant transaction (which the caller commits, so that
/// a refusal's audit row is kept).
pub async fn apply(
    tx: &mut PgConnection,
    tenant: TenantId,
    target: Target<'_>,
    request: &Request<'_>,
    actor: &Actor<'_>,
) -> Result<Outcome, DbError> {
    let payment = match target {
        Target::Id(id) => payments::lock(tx, tenant, id).await?,
        Target::Reference {
            provider,
            reference,
        } => payments::lock_by_reference(tx, tenant, provider, reference).await?,
    };
    let Some(payment) = payment else {
        return Ok(Outcome::NotFound);
    };

    let refused = match mismatch(&payment, request) {
        Some(refused) => Some(refused),
        None => reference_in_use(tx, tenant, &payment, request).await?,
    };
    if let Some((reason, detail)) = refused {
        audit(tx, tenant, &payment, request, actor, false, None, reason).await?;
        return Ok(Outcome::Refused {
            payment,
            reason,
            detail,
        });
    }
    match decide(payment.status, request.action) {
        Decision::Refuse(reason) => {
            audit(tx, tenant, &payment, request, actor, false, None, reason).await?;
            let detail = format!(
                "the payment is {}; it cannot be {}",
                payment.status,
                past_tense(request.action)
            );
            Ok(Outcome::Refused {
                payment,
                reason,
                detail,
            })
        }
        Decision::Stale(reason) => {
            audit(tx, tenant, &payment, request, actor, false, None, reason).await?;
            let detail = format!(
                "the payment is {}: this {} comes after it and changes nothing",
                payment.status,
                request.action.as_str()
            );
            Ok(Outcome::Stale {
                payment,
                reason,
                detail,
            })
        }
        Decision::AlreadyDone => {
            let reason = match request.action {
                PaymentAction::Verify => "already_verified",
                PaymentAction::Fail => "already_failed",
                PaymentAction::Cancel => "already_canceled",
                PaymentAction::Refund => "already_refunded",
            };
            audit(tx, tenant, &payment, request, actor, false, None, reason).await?;
            Ok(Outcome::AlreadyDone(payment))
        }
        Decision::Apply(to) => {
            let verifies = request.action == PaymentAction::Verify;
            let changed = payments::apply(
                tx,
                tenant,
                payment.id,
                &Change {
                    to,
                    verified_by: request.verified_by.filter(|_| verifies),
                    verification_method: request.method.filter(|_| verifies),
                    provider_reference: request.provider_reference,
                    failed_attempt: (request.action == PaymentAction::Fail)
                        .then_some(request.failure),
                },
            )
            .await?;
            audit(
                tx,
                tenant,
                &payment,
                request,
                actor,
                true,
                Some(&changed),
                past_tense(request.action),
            )
            .await?;
            let event_id = publish(tx, tenant, &changed, request, actor).await?;
            Ok(Outcome::Applied {
                payment: changed,
                event_id,
            })
        }
    }
}

/// A payment that is not what the caller says it is: (reason, detail).
fn mismatch(payment: &Payment, request: &Request<'_>) -> Option<(&'static str, String)> {
    if let Some(amount) = request.expect_amount_minor {
        if amount != payment.amount_minor {
            return Some((
                "amount_mismatch",
                format!(
                    "the payment is for {} minor units, not {amount}",
                    payment.amount_minor
                ),
            ));
        }
    }
    if let Some(currency) = request.expect_currency {
        if !currency.eq_ignore_ascii_case(&payment.currency) {
            return Some((
                "currency_mismatch",
                format!("the payment is in {}, not {currency}", payment.currency),
            ));
        }
    }
    if let (Some(asked), Some(known)) = (request.provider_reference, &payment.provider_reference) {
        if asked != known {
            return Some((
                "reference_mismatch",
                "the payment has another provider reference".into(),
            ));
        }
    }
    None
}

/// A reference to record (the payment has none) that another payment already holds: the update
/// would break the unique index, so it is refused like a mismatch.
async fn reference_in_use(
    tx: &mut PgConnection,
    tenant: TenantId,
    payment: &Payment,
    request: &Request<'_>,
) -> Result<Option<(&'static str, String)>, DbError> {
    let (Some(asked), None) = (request.provider_reference, &payment.provider_reference) else {
        return Ok(None);
    };
    let taken = payments::reference_taken(tx, tenant, &payment.provider, asked, payment.id).await?;
    Ok(taken.then(|| {
        (
            "reference_in_use",
            "another payment of this tenant has this provider reference".into(),
        )
    }))
}

fn past_tense(action: PaymentAction) -> &'static str {
    match action {
        PaymentAction::Verify => "verified",
        PaymentAction::Fail => "failed",
        PaymentAction::Cancel => "canceled",
        PaymentAction::Refund => "refunded",
    }
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    tx: &mut PgConnection,
    tenant: TenantId,
    before: &Payment,
    request: &Request<'_>,
    actor: &Actor<'_>,
    accepted: bool,
    after: Option<&Payment>,
    reason: &str,
) -> Result<(), DbError> {
    let mut details = json!({});
    if let Some(amount) = request.expect_amount_minor {
        details["expectedAmountMinor"] = json!(amount);
    }
    if let Some(currency) = request.expect_currency {
        details["expectedCurrency"] = json!(currency);
    }
    if let Some(reference) = request.provider_reference {
        details["providerReference"] = json!(reference);
    }
    if let Some(failure) = request.failure {
        details["failure"] = json!(failure);
    }
    payment_audit::insert(
        tx,
        tenant,
        &AuditEntry {
            payment_id: Some(before.id),
            action: request.action.as_str(),
            accepted,
            from_status: Some(before.status.as_str()),
            to_status: after.map(|p| p.status.as_str()),
            actor: &actor.label,
            actor_detail: actor.detail.or(request.verified_by),
            method: request.method.map(VerificationMethod::as_str),
            reason,
            correlation_id: request.correlation_id,
            details,
        },
    )
    .await
}

/// The outbox row of an applied transition, in the same transaction; returns its event id. The
/// event's sequence is the payment's version (which this transition bumped) less one: a
/// counter kept on the payment row itself, never read back from outbox rows that retention
/// deletes. The first change of a payment is event 1.
async fn publish(
    tx: &mut PgConnection,
    tenant: TenantId,
    payment: &Payment,
    request: &Request<'_>,
    actor: &Actor<'_>,
) -> Result<Uuid, DbError> {
    let sequence = payment.version - 1;
    let envelope = Envelope {
        event_id: Uuid::now_v7(),
        event_type: request.action.event_type().to_owned(),
        schema_version: PAYMENT_EVENT_SCHEMA_VERSION,
        tenant_id: tenant,
        occurred_at: payment.updated_at,
        correlation_id: request.correlation_id.to_owned(),
        idempotency_key: request.action.event_idempotency_key(payment.id, sequence),
        aggregate_type: PAYMENT_AGGREGATE.to_owned(),
        aggregate_id: payment.id,
        aggregate_sequence: sequence,
        source_service: actor.source_service.to_owned(),
        data: PaymentEventData {
            payment_id: payment.id,
            status: payment.status.as_str().to_owned(),
            amount_minor: payment.amount_minor,
            currency: payment.currency.clone(),
            provider: payment.provider.clone(),
            provider_reference: payment.provider_reference.clone(),
            verified_at: payment.verified_at,
            verified_by: payment.verified_by.clone(),
            verification_method: payment.verification_method.map(|m| m.as_str().to_owned()),
            failed_attempts: payment.failed_attempts,
            last_failure: payment.last_failure.clone(),
        },
    };
    outbox::insert(tx, &envelope, request.trace_header).await?;
    Ok(envelope.event_id)
}
