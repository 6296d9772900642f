//! The payments API: create a payment (with an `Idempotency-Key`), read and list payments,
//! verify one.

use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::client::Client;
use crate::error::Error;

/// A payment's state: `PENDING` → `PAID_VERIFIED`, `FAILED` (it may still be paid) or
/// `CANCELED`; `FAILED` and `CANCELED` → `PAID_VERIFIED`; `PAID_VERIFIED` → `REFUNDED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum PaymentStatus {
    Pending,
    PaidVerified,
    Failed,
    Canceled,
    Refunded,
    /// A state this version of the client does not know.
    #[serde(other)]
    Other,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "PENDING",
            PaymentStatus::PaidVerified => "PAID_VERIFIED",
            PaymentStatus::Failed => "FAILED",
            PaymentStatus::Canceled => "CANCELED",
            PaymentStatus::Refunded => "REFUNDED",
            PaymentStatus::Other => "OTHER",
        }
    }
}

/// How a payment was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum VerificationMethod {
    Manual,
    ProviderApi,
    BankReconciliation,
    /// By the provider's signed webhook (never in a [`Verification`]: the API refuses it).
    ProviderWebhook,
    #[serde(other)]
    Other,
}

/// A payment as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Payment {
    pub id: Uuid,
    /// Whole minor units of the currency (cents for USD).
    pub amount_minor: u64,
    /// ISO 4217, in capitals.
    pub currency: String,
    pub provider: String,
    pub provider_reference: Option<String>,
    pub status: PaymentStatus,
    pub verified_at: Option<DateTime<Utc>>,
    pub verified_by: Option<String>,
    pub verification_method: Option<VerificationMethod>,
    pub description: Option<String>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    pub correlation_id: String,
    pub source_service: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// 1 at creation, one more at every change of state.
    pub version: u32,
    pub failed_attempts: u32,
    pub last_failure: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    payment: Payment,
}

/// A payment to record (`PENDING`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[must_use]
pub struct NewPayment {
    /// 1 to 10¹⁵ minor units.
    pub amount_minor: u64,
    /// An ISO 4217 code in circulation (any case).
    pub currency: String,
    /// `stripe`, `adyen`, `bank-transfer`…: 1–32 of `a-z`, `0-9`, `_`, `-`.
    pub provider: String,
    /// The provider's id of the payment (unique per tenant and provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

impl NewPayment {
    pub fn new(
        amount_minor: u64,
        currency: impl Into<String>,
        provider: impl Into<String>,
    ) -> Self {
        NewPayment {
            amount_minor,
            currency: currency.into(),
            provider: provider.into(),
            provider_reference: None,
            description: None,
            metadata: None,
        }
    }

    pub fn provider_reference(mut self, reference: impl Into<String>) -> Self {
        self.provider_reference = Some(reference.into());
        self
    }

    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    pub fn metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.metadata = Some(metadata);
        self
    }
}

/// The answer to [`Client::create_payment`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatedPayment {
    /// The payment as it was created.
    pub payment: Payment,
    /// `true` when the `Idempotency-Key` was used before with the same body: this is the
    /// first answer again, and nothing was created now.
    pub replayed: bool,
}

/// An internal service's statement that a payment was paid. The optional fields are
/// expectations: a payment that is not what they say is a `409` and stays as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
#[must_use]
pub struct Verification {
    /// Who verified it (a person or a service), 1–128 characters.
    pub verified_by: String,
    /// `manual`, `provider_api` or `bank_reconciliation`.
    pub verification_method: VerificationMethod,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_minor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

impl Verification {
    pub fn new(verified_by: impl Into<String>, method: VerificationMethod) -> Self {
        Verification {
            verified_by: verified_by.into(),
            verification_method: method,
            provider_reference: None,
            amount_minor: None,
            currency: None,
        }
    }

    /// Expects this amount (else `409 amount_mismatch`).
    pub fn amount_minor(mut self, amount: u64) -> Self {
        self.amount_minor = Some(amount);
        self
    }

    /// Expects this currency (else `409 currency_mismatch`).
    pub fn currency(mut self, currency: impl Into<String>) -> Self {
        self.currency = Some(currency.into());
        self
    }

    /// Expects this reference, or records it on a payment that has none.
    pub fn provider_reference(mut self, reference: impl Into<String>) -> Self {
        self.provider_reference = Some(reference.into());
        self
    }
}

/// Whether a transition moved the payment now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum TransitionOutcome {
    /// The payment moved now (and its event was written).
    Applied,
    /// It already was where the action leads; nothing changed (a retry is safe).
    Unchanged,
    #[serde(other)]
    Other,
}

/// The answer to [`Client::verify_payment`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PaymentTransition {
    pub outcome: TransitionOutcome,
    pub payment: Payment,
}

/// The parameters of [`Client::list_payments`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct PaymentQuery {
    pub status: Option<PaymentStatus>,
    /// 1 to 100 (default 20).
    pub limit: Option<u32>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// A page of payments, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PaymentPage {
    pub payments: Vec<Payment>,
    /// Present exactly when more payments follow.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

fn json_body<T: Serialize>(value: &T) -> Result<bytes::Bytes, Error> {
    serde_json::to_vec(value)
        .map(bytes::Bytes::from)
        .map_err(|e| Error::InvalidArgument(e.to_string()))
}

impl Client {
    /// `POST /v1/payments`: records a `PENDING` payment. Needs `payments:write`.
    ///
    /// With an `idempotency_key` (1–255 visible ASCII characters, per tenant and source), a
    /// retry with the same key and body answers with the first answer
    /// ([`CreatedPayment::replayed`]) instead of creating a second payment — send one whenever
    /// the call may be retried. The same key with another body is a `409`.
    pub async fn create_payment(
        &self,
        payment: &NewPayment,
        idempotency_key: Option<&str>,
    ) -> Result<CreatedPayment, Error> {
        let transport = self.transport();
        let url = transport.payments_url(&["v1", "payments"]);
        let mut request = transport.post_json(url, json_body(payment)?);
        if let Some(key) = idempotency_key {
            let key = key.trim();
            if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::InvalidArgument(
                    "an Idempotency-Key is 1–255 visible ASCII characters".into(),
                ));
            }
            request = request.header("idempotency-key", key);
        }
        let (envelope, headers): (Envelope, _) =
            transport.call(request, StatusCode::CREATED).await?;
        let replayed = headers
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        Ok(CreatedPayment {
            payment: envelope.payment,
            replayed,
        })
    }

    /// `GET /v1/payments/{id}`: one payment (another tenant's is the same `404` as a missing
    /// one). Needs `payments:read`.
    pub async fn payment(&self, id: Uuid) -> Result<Payment, Error> {
        let transport = self.transport();
        let url = transport.payments_url(&["v1", "payments", &id.to_string()]);
        let (envelope, _): (Envelope, _) =
            transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(envelope.payment)
    }

    /// `GET /v1/payments`: the tenant's payments, newest first, a page at a time. Needs
    /// `payments:read`.
    pub async fn list_payments(&self, query: &PaymentQuery) -> Result<PaymentPage, Error> {
        let transport = self.transport();
        let mut url = transport.payments_url(&["v1", "payments"]);
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(status) = query.status {
                pairs.append_pair("status", status.as_str());
            }
            if let Some(limit) = query.limit {
                pairs.append_pair("limit", &limit.to_string());
            }
            if let Some(cursor) = &query.cursor {
                pairs.append_pair("cursor", cursor);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let (page, _) = transport.call(transport.get(url), StatusCode::OK).await?;
        Ok(page)
    }

    /// `POST /v1/payments/{id}/verify`: states that the payment was paid (→ `PAID_VERIFIED`).
    /// Verifying again is [`TransitionOutcome::Unchanged`], so a retry is safe. Needs
    /// `payments:verify` (internal keys only).
    pub async fn verify_payment(
        &self,
        id: Uuid,
        verification: &Verification,
    ) -> Result<PaymentTransition, Error> {
        let transport = self.transport();
        let url = transport.payments_url(&["v1", "payments", &id.to_string(), "verify"]);
        let request = transport.post_json(url, json_body(verification)?);
        let (transition, _) = transport.call(request, StatusCode::OK).await?;
        Ok(transition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_serialize_as_the_api_reads_them() {
        let payment = NewPayment::new(4999, "USD", "stripe")
            .provider_reference("pi_1")
            .description("Pro plan");
        assert_eq!(
            serde_json::to_value(&payment).unwrap(),
            json!({"amountMinor": 4999, "currency": "USD", "provider": "stripe",
                   "providerReference": "pi_1", "description": "Pro plan"})
        );
        let verification = Verification::new("finance-bot", VerificationMethod::ProviderApi)
            .amount_minor(4999)
            .currency("USD");
        assert_eq!(
            serde_json::to_value(&verification).unwrap(),
            json!({"verifiedBy": "finance-bot", "verificationMethod": "provider_api",
                   "amountMinor": 4999, "currency": "USD"})
        );
    }

    #[test]
    fn a_documented_payment_reads_into_its_type() {
        let payment: Payment = serde_json::from_value(json!({
            "id": "01a213a6-1e5c-775d-a755-c5a33b51c8c6", "amountMinor": 4999, "currency": "USD",
            "provider": "stripe", "providerReference": "pi_3Q", "status": "PAID_VERIFIED",
            "verifiedAt": "2026-11-25T10:00:00Z", "verifiedBy": "finance-bot",
            "verificationMethod": "provider_api", "description": null, "metadata": {},
            "correlationId": "c", "sourceService": "billing",
            "createdAt": "2026-11-25T09:00:00Z", "updatedAt": "2026-11-25T10:00:00Z",
            "version": 2, "failedAttempts": 0, "lastFailure": null}))
        .unwrap();
        assert_eq!(payment.status, PaymentStatus::PaidVerified);
        assert_eq!(
            payment.verification_method,
            Some(VerificationMethod::ProviderApi)
        );
    }
}
