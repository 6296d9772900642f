//! The event envelope: the versioned contract every outbox event is published in. Consumers
//! deduplicate on `eventId` and order an aggregate's events by `aggregateSequence`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::TenantId;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<D> {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub tenant_id: TenantId,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub idempotency_key: String,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub aggregate_sequence: i32,
    pub source_service: String,
    pub data: D,
}

/// `data` of `payment.paid`, `payment.failed`, `payment.canceled` and `payment.refunded`
/// (schema version 1; `failedAttempts` and `lastFailure` were added to it, as optional fields
/// may be).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentEventData {
    pub payment_id: Uuid,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub provider: String,
    pub provider_reference: Option<String>,
    pub verified_at: Option<DateTime<Utc>>,
    pub verified_by: Option<String>,
    pub verification_method: Option<String>,
    /// Attempts to pay that failed so far.
    pub failed_attempts: i32,
    /// The provider's code for the last failed attempt.
    pub last_failure: Option<String>,
}

pub const PAYMENT_EVENT_SCHEMA_VERSION: i32 = 1;
pub const PAYMENT_AGGREGATE: &str = "payment";
