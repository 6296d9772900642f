//! `POST /v1/payments/{id}/verify`: an internal service verifies a payment (keys with
//! `payments:verify` only, which external keys can never hold).

use lambda_http::http::StatusCode;
use lambda_http::{Body, Response};
use meterbridge::db::retry_transient;
use meterbridge::domain::payment::{
    parse_currency_code, PaymentAction, VerificationMethod, MAX_AMOUNT_MINOR,
};
use meterbridge::edge::Call;
use meterbridge::http::{json_response, parse_json_body, ApiError};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::App;
use crate::body::Fields;
use crate::payments::{actor_label, not_found, reference_conflict};
use meterbridge::payment_transition::{self as transition, Actor, Outcome, Target};

struct VerifyRequest {
    verified_by: String,
    method: VerificationMethod,
    provider_reference: Option<String>,
    amount_minor: Option<i64>,
    currency: Option<String>,
}

fn read(body: Value) -> Result<VerifyRequest, ApiError> {
    let mut f = Fields::of(
        body,
        &[
            "verifiedBy",
            "verificationMethod",
            "providerReference",
            "amountMinor",
            "currency",
        ],
    )?;
    let verified_by = f.text("verifiedBy", true, 128);
    let method = f.text("verificationMethod", true, 32).and_then(|raw| {
        match VerificationMethod::parse_requested(&raw) {
            Ok(m) => Some(m),
            Err(e) => {
                f.invalid("verificationMethod", e.message);
                None
            }
        }
    });
    let provider_reference = f.text("providerReference", false, 255);
    let amount_minor = f.integer("amountMinor", false, 1..=MAX_AMOUNT_MINOR);
    let currency = f
        .text("currency", false, 3)
        .and_then(|raw| match parse_currency_code(&raw) {
            Ok(c) => Some(c),
            Err(e) => {
                f.invalid("currency", e.message);
                None
            }
        });
    f.finish()?;
    match (verified_by, method) {
        (Some(verified_by), Some(method)) => Ok(VerifyRequest {
            verified_by,
            method,
            provider_reference,
            amount_minor,
            currency,
        }),
        _ => Err(ApiError::Internal),
    }
}

pub async fn verify(app: &App, call: &Call<'_>, id: Uuid) -> Result<Response<Body>, ApiError> {
    let caller = call.caller()?;
    let body = parse_json_body(
        call.request.headers(),
        call.request.body().as_ref(),
        app.config.max_body_bytes,
    )?;
    let asked = read(body)?;
    let actor = Actor {
        label: actor_label(caller),
        source_service: caller.source.as_str(),
        detail: Some(&asked.verified_by),
    };
    let request = transition::Request {
        action: PaymentAction::Verify,
        verified_by: Some(&asked.verified_by),
        method: Some(asked.method),
        provider_reference: asked.provider_reference.as_deref(),
        failure: None,
        expect_amount_minor: asked.amount_minor,
        expect_currency: asked.currency.as_deref(),
        correlation_id: &call.correlation_id,
        trace_header: call.trace_header.as_deref(),
    };
    let outcome = retry_transient(|| async {
        let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
        let outcome =
            transition::apply(&mut tx, caller.tenant_id, Target::Id(id), &request, &actor).await?;
        tx.commit().await?;
        Ok(outcome)
    })
    .await
    .map_err(reference_conflict)?;
    if let Outcome::Applied { event_id, .. } = &outcome {
        app.publish_now(caller.tenant_id, *event_id).await;
    }
    respond(outcome)
}

/// The answer to a transition, the same for every route: 200 with the payment when it moved or
/// already had, 409 when refused or too late (a caller's verification of a refunded payment),
/// 404 when there is no such payment.
pub fn respond(outcome: Outcome) -> Result<Response<Body>, ApiError> {
    match outcome {
        Outcome::Applied { payment, .. } => Ok(json_response(
            StatusCode::OK,
            &json!({ "outcome": "applied", "payment": payment }),
        )),
        Outcome::AlreadyDone(payment) => Ok(json_response(
            StatusCode::OK,
            &json!({ "outcome": "unchanged", "payment": payment }),
        )),
        Outcome::Refused { reason, detail, .. } | Outcome::Stale { reason, detail, .. } => {
            Err(ApiError::Conflict(format!("{detail} ({reason})")))
        }
        Outcome::NotFound => Err(not_found()),
    }
}
