//! `POST /v1/webhooks/{provider}/{tenantSlug}`: a provider tells us about a payment. No API key:
//! the tenant is named in the path and proven by the signature, checked against that tenant's
//! signing secrets (Secrets Manager, `<prefix>/<provider>/<tenant slug>`,
//! `{"signingSecrets": ["whsec_…", …]}` — two while a secret is being rotated).
//!
//! Anyone on the internet can call this route, so nothing unsigned costs more than a cached
//! lookup and a MAC: the signature is checked before the database is touched, the endpoint's
//! secrets (or their absence) are cached per container, and a refusal writes no row — it is
//! counted (`WebhookSignaturesRefused`) and logged at most once per 10 s. An unknown tenant, a
//! tenant without secrets, a disabled tenant and a bad, stale or missing signature all get the
//! same 401 by the same path, so the route tells an outsider nothing about which tenants exist.
//! Each provider event is acted on once: a replay answers 200 and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use lambda_http::http::StatusCode;
use lambda_http::{Body, Response};
use meterbridge::db::retry_transient;
use meterbridge::domain::payment::{PaymentAction, VerificationMethod};
use meterbridge::domain::{TenantId, TenantSlug};
use meterbridge::edge::{record_tenant_id, Call};
use meterbridge::http::{json_response, ApiError};
use meterbridge::repo::webhook_events;
use meterbridge::secrets::SecretsError;
use meterbridge::telemetry::SampledLog;
use meterbridge::DbError;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::App;
use crate::signature;
use crate::verify::respond;
use meterbridge::payment_transition::{self as transition, Actor, Outcome, Target};

/// Providers whose webhooks this function understands.
pub const PROVIDERS: &[&str] = &["stripe"];

/// The shortest signing secret used: Stripe's are `whsec_` and 32 characters more. A shorter one
/// (a placeholder, a truncated paste) is refused when it is loaded, never used to verify.
pub const MIN_SECRET_CHARS: usize = 32;

/// An endpoint's usable signing secrets, or `None` when it has none (no secret stored, or none
/// long enough): what the per-container cache remembers, absence included.
pub type EndpointSecrets = Option<Arc<Vec<String>>>;

#[derive(Deserialize)]
struct SigningSecrets {
    #[serde(rename = "signingSecrets")]
    signing_secrets: Vec<String>,
}

/// A Stripe event, as much of it as we read.
#[derive(Deserialize)]
struct StripeEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: StripeData,
}

#[derive(Deserialize)]
struct StripeData {
    object: Value,
}

/// One line per this many seconds for refused requests; the metric counts every one.
static REFUSALS_LOG: SampledLog = SampledLog::every(Duration::from_secs(10));

/// The one answer to every refused delivery, counted and (sampled) logged; nothing is written.
fn refuse(provider: &str, reason: &'static str) -> ApiError {
    metrics::counter!("WebhookSignaturesRefused").increment(1);
    if let Some(held_back) = REFUSALS_LOG.admit() {
        tracing::warn!(
            provider,
            reason,
            held_back,
            "webhook refused (one line per 10 s at most; WebhookSignaturesRefused counts each)"
        );
    }
    ApiError::Unauthorized("the webhook signature is missing, invalid or stale".into())
}

pub async fn receive(
    app: &App,
    call: &Call<'_>,
    provider: &str,
    tenant_slug: &str,
) -> Result<Response<Body>, ApiError> {
    let body = call.request.body().as_ref();
    if body.len() > app.config.webhook_max_body_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the body is {} bytes; the limit is {}",
            body.len(),
            app.config.webhook_max_body_bytes
        )));
    }
    let Ok(slug) = TenantSlug::parse(tenant_slug) else {
        return Err(refuse(provider, "malformed_tenant"));
    };
    let secrets = match signing_secrets(app, provider, &slug).await {
        Ok(Some(secrets)) => secrets,
        Ok(None) => return Err(refuse(provider, "no_signing_secret")),
        Err(e) => {
            tracing::error!(error = %e, "webhook signing secrets unavailable");
            return Err(ApiError::Unavailable {
                detail: "the signing secrets could not be read; retry later".into(),
                retry_after_secs: 5,
            });
        }
    };
    let header = call
        .request
        .headers()
        .get(signature::HEADER)
        .and_then(|v| v.to_str().ok());
    let tolerance = app.config.webhook_tolerance.as_secs() as i64;
    let now = app.services.clock.now().timestamp();
    if let Err(refused) = signature::verify(header, body, &secrets, now, tolerance) {
        return Err(refuse(provider, refused.code()));
    }
    // Signed with the endpoint's secret: only now is the database asked, for an active tenant.
    let Some(tenant) = tenant(app, &slug).await? else {
        return Err(refuse(provider, "tenant_not_active"));
    };
    record_tenant_id(tenant);

    let event: StripeEvent = serde_json::from_slice(body).map_err(|e| {
        ApiError::Malformed(format!("the signed body is not a {provider} event: {e}"))
    })?;
    if event.id.is_empty() || event.id.len() > 255 {
        return Err(ApiError::Malformed(
            "the event id must be 1-255 characters".into(),
        ));
    }
    if event.kind.is_empty() || event.kind.chars().count() > 128 {
        return Err(ApiError::Malformed(
            "the event type must be 1-128 characters".into(),
        ));
    }
    handle_event(app, tenant, provider, &event, call).await
}

async fn tenant(app: &App, slug: &TenantSlug) -> Result<Option<TenantId>, DbError> {
    let mut conn = app.services.db.acquire().await?;
    webhook_events::tenant_by_slug(&mut conn, slug.as_str()).await
}

/// The endpoint's signing secrets, from the container's cache or (on a miss) fresh from Secrets
/// Manager; an endpoint without usable secrets is remembered as such, for the same time, so an
/// unknown slug and a tenant without a secret cost the same: one cached lookup.
pub async fn signing_secrets(
    app: &App,
    provider: &str,
    slug: &TenantSlug,
) -> Result<EndpointSecrets, SecretsError> {
    let endpoint = format!("{provider}/{slug}");
    if let Some(known) = app.webhook_secrets.get(&endpoint) {
        return Ok(known);
    }
    let id = format!("{}/{endpoint}", app.config.webhook_secret_prefix);
    let secrets = app.services.secrets().await?;
    let found = match secrets.get_json::<SigningSecrets>(&id, true).await {
        Ok(found) => usable(found.signing_secrets, &id),
        Err(SecretsError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    app.webhook_secrets.insert(endpoint, found.clone());
    Ok(found)
}

/// The secrets long enough to use; the others are refused (counted, and logged by their secret's
/// name, never their value).
fn usable(secrets: Vec<String>, secret_id: &str) -> EndpointSecrets {
    let total = secrets.len();
    let kept: Vec<String> = secrets
        .into_iter()
        .filter(|s| s.chars().count() >= MIN_SECRET_CHARS)
        .collect();
    if kept.len() < total {
        metrics::counter!("WebhookSigningSecretsRefused").increment((total - kept.len()) as u64);
        tracing::error!(
            secret_id,
            refused = total - kept.len(),
            "webhook signing secrets shorter than {MIN_SECRET_CHARS} characters refused"
        );
    }
    (!kept.is_empty()).then(|| Arc::new(kept))
}

/// What an event asks of which payment.
struct Asked {
    action: PaymentAction,
    /// The provider's reference of the payment.
    reference: String,
    amount_minor: Option<i64>,
    currency: Option<String>,
    /// For a failed attempt: the provider's code for it.
    failure: Option<String>,
}

impl Asked {
    fn of(action: PaymentAction, reference: String) -> Self {
        Asked {
            action,
            reference,
            amount_minor: None,
            currency: None,
            failure: None,
        }
    }
}

/// The longest failure code kept (Stripe's are short: `card_declined`, `insufficient_funds`).
const MAX_FAILURE_CODE: usize = 64;

/// What a Stripe event asks, if anything; `Err` names what a relevant event lacks. The
/// PaymentIntent's lifecycle: `payment_failed` is one failed attempt (the intent goes back to
/// `requires_payment_method` and may still succeed), `succeeded` and `canceled` end it, a full
/// `charge.refunded` refunds it. Other events (`processing`, `requires_action`, `created`...)
/// change nothing here, whatever order they arrive in.
fn requested(event: &StripeEvent) -> Result<Option<Asked>, &'static str> {
    let object = &event.data.object;
    let text = |field: &str| object.get(field).and_then(Value::as_str).map(str::to_owned);
    match event.kind.as_str() {
        "payment_intent.succeeded" => {
            let reference = text("id").ok_or("data.object.id is missing")?;
            let amount = object
                .get("amount_received")
                .or_else(|| object.get("amount"))
                .and_then(Value::as_i64)
                .ok_or("data.object.amount is missing")?;
            let currency = text("currency").ok_or("data.object.currency is missing")?;
            Ok(Some(Asked {
                amount_minor: Some(amount),
                currency: Some(currency),
                ..Asked::of(PaymentAction::Verify, reference)
            }))
        }
        "payment_intent.payment_failed" => {
            let reference = text("id").ok_or("data.object.id is missing")?;
            // The decline code when there is one (`insufficient_funds`), else the error's code.
            let error = object.get("last_payment_error");
            let code = |field: &str| {
                error
                    .and_then(|e| e.get(field))
                    .and_then(Value::as_str)
                    .filter(|c| {
                        !c.is_empty()
                            && c.len() <= MAX_FAILURE_CODE
                            && c.bytes().all(|b| b.is_ascii_graphic())
                    })
                    .map(str::to_owned)
            };
            Ok(Some(Asked {
                failure: code("decline_code").or_else(|| code("code")),
                ..Asked::of(PaymentAction::Fail, reference)
            }))
        }
        "payment_intent.canceled" => {
            let reference = text("id").ok_or("data.object.id is missing")?;
            Ok(Some(Asked::of(PaymentAction::Cancel, reference)))
        }
        // A full refund; a partial one leaves the payment as it is.
        "charge.refunded" if object.get("refunded").and_then(Value::as_bool) == Some(true) => {
            let reference =
                text("payment_intent").ok_or("data.object.payment_intent is missing")?;
            Ok(Some(Asked::of(PaymentAction::Refund, reference)))
        }
        _ => Ok(None),
    }
}

async fn handle_event(
    app: &App,
    tenant: TenantId,
    provider: &str,
    event: &StripeEvent,
    call: &Call<'_>,
) -> Result<Response<Body>, ApiError> {
    let correlation_id = call.correlation_id.as_str();
    let trace_header = call.trace_header.as_deref();
    let requested = requested(event)
        .map_err(|problem| ApiError::Malformed(format!("the {} event: {problem}", event.kind)))?;
    let actor = Actor {
        label: format!("webhook:{provider}"),
        source_service: provider,
        detail: Some(&event.id),
    };
    let verified_by = format!("{provider}-webhook");
    enum Handled {
        Replay(Option<String>),
        Ignored,
        Transition(Box<Outcome>),
    }
    let handled = retry_transient(|| async {
        let mut tx = app.services.db.tenant_tx(tenant).await?;
        let Some(asked) = &requested else {
            let first = webhook_events::record(
                &mut tx,
                tenant,
                provider,
                &event.id,
                &event.kind,
                None,
                "ignored",
            )
            .await?;
            tx.commit().await?;
            return Ok(if first {
                Handled::Ignored
            } else {
                Handled::Replay(None)
            });
        };
        let request = transition::Request {
            action: asked.action,
            verified_by: Some(&verified_by),
            method: Some(VerificationMethod::ProviderWebhook),
            provider_reference: None,
            failure: asked.failure.as_deref(),
            expect_amount_minor: asked.amount_minor,
            expect_currency: asked.currency.as_deref(),
            correlation_id,
            trace_header,
        };
        let target = Target::Reference {
            provider,
            reference: &asked.reference,
        };
        let outcome = transition::apply(&mut tx, tenant, target, &request, &actor).await?;
        let recorded = match &outcome {
            Outcome::Applied { payment, .. } => Some((payment.id, "applied")),
            Outcome::AlreadyDone(p) => Some((p.id, "unchanged")),
            // Reported too late (the payment moved past it): acknowledged and seen, so the
            // provider stops retrying what can never change anything.
            Outcome::Stale { payment, .. } => Some((payment.id, "stale")),
            // A refusal keeps its audit row; the event is not marked seen, so a corrected
            // redelivery (or one after the event it waits for) can still act. An unknown
            // payment may be created in a moment: the provider retries a 404.
            Outcome::Refused { .. } | Outcome::NotFound => None,
        };
        if let Some((payment_id, outcome_code)) = recorded {
            let first = webhook_events::record(
                &mut tx,
                tenant,
                provider,
                &event.id,
                &event.kind,
                Some(payment_id),
                outcome_code,
            )
            .await?;
            if !first {
                tx.rollback().await?;
                let mut tx = app.services.db.tenant_read_tx(tenant).await?;
                let earlier = webhook_events::outcome(&mut tx, tenant, provider, &event.id).await?;
                tx.commit().await?;
                return Ok(Handled::Replay(earlier));
            }
        }
        tx.commit().await?;
        Ok(Handled::Transition(Box::new(outcome)))
    })
    .await?;
    match handled {
        Handled::Replay(earlier) => Ok(json_response(
            StatusCode::OK,
            &json!({ "received": true, "outcome": "duplicate", "firstOutcome": earlier }),
        )),
        Handled::Ignored => Ok(json_response(
            StatusCode::OK,
            &json!({ "received": true, "outcome": "ignored" }),
        )),
        Handled::Transition(outcome) => match *outcome {
            Outcome::Stale {
                payment, reason, ..
            } => Ok(json_response(
                StatusCode::OK,
                &json!({ "received": true, "outcome": "stale", "reason": reason, "payment": payment }),
            )),
            outcome => {
                if let Outcome::Applied { event_id, .. } = &outcome {
                    app.publish_now(tenant, *event_id).await;
                }
                respond(outcome)
            }
        },
    }
}
