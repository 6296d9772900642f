//! payments: create, read (by id, by provider reference, pages), lock for a transition, and
//! apply one. Every function runs inside a tenant transaction; the explicit tenant filters are
//! belt and braces on top of row-level security.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::payment::{PaymentStatus, VerificationMethod};
use crate::domain::TenantId;

/// A payment as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub id: Uuid,
    pub amount_minor: i64,
    pub currency: String,
    pub provider: String,
    pub provider_reference: Option<String>,
    pub status: PaymentStatus,
    pub verified_at: Option<DateTime<Utc>>,
    pub verified_by: Option<String>,
    pub verification_method: Option<VerificationMethod>,
    pub description: Option<String>,
    pub metadata: Value,
    pub correlation_id: String,
    pub source_service: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i32,
    /// Attempts to pay that failed (a later one may still succeed).
    pub failed_attempts: i32,
    /// The provider's code for the last failed attempt (`card_declined`).
    pub last_failure: Option<String>,
}

struct PaymentRow {
    id: Uuid,
    amount_minor: i64,
    currency: String,
    provider: String,
    provider_reference: Option<String>,
    status: String,
    verified_at: Option<DateTime<Utc>>,
    verified_by: Option<String>,
    verification_method: Option<String>,
    description: Option<String>,
    metadata: Value,
    correlation_id: String,
    source_service: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i32,
    failed_attempts: i32,
    last_failure: Option<String>,
}

impl TryFrom<PaymentRow> for Payment {
    type Error = DbError;
    fn try_from(r: PaymentRow) -> Result<Self, DbError> {
        Ok(Payment {
            id: r.id,
            amount_minor: r.amount_minor,
            currency: r.currency,
            provider: r.provider,
            provider_reference: r.provider_reference,
            status: r.status.parse()?,
            verified_at: r.verified_at,
            verified_by: r.verified_by,
            verification_method: r.verification_method.map(|m| m.parse()).transpose()?,
            description: r.description,
            metadata: r.metadata,
            correlation_id: r.correlation_id,
            source_service: r.source_service,
            created_at: r.created_at,
            updated_at: r.updated_at,
            version: r.version,
            failed_attempts: r.failed_attempts,
            last_failure: r.last_failure,
        })
    }
}

/// What a new payment is made of.
#[derive(Debug, Clone)]
pub struct NewPayment<'a> {
    pub id: Uuid,
    pub amount_minor: i64,
    pub currency: &'a str,
    pub provider: &'a str,
    pub provider_reference: Option<&'a str>,
    pub description: Option<&'a str>,
    pub metadata: &'a Value,
    pub correlation_id: &'a str,
    pub source_service: &'a str,
}

/// Inserts a PENDING payment. A provider reference already used by another of the tenant's
/// payments fails with a unique violation on `payments_provider_reference`.
pub async fn insert(
    conn: &mut PgConnection,
    tenant: TenantId,
    new: &NewPayment<'_>,
) -> Result<Payment, DbError> {
    sqlx::query_as!(
        PaymentRow,
        r#"INSERT INTO payments (tenant_id, id, amount_minor, currency, provider, provider_reference,
                                 description, metadata, correlation_id, source_service)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
           RETURNING id, amount_minor, currency, provider, provider_reference, status, verified_at,
                     verified_by, verification_method, description, metadata, correlation_id,
                     source_service, created_at, updated_at, version, failed_attempts, last_failure"#,
        tenant.0,
        new.id,
        new.amount_minor,
        new.currency,
        new.provider,
        new.provider_reference,
        new.description,
        new.metadata,
        new.correlation_id,
        new.source_service
    )
    .fetch_one(&mut *conn)
    .await?
    .try_into()
}

pub async fn find(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<Payment>, DbError> {
    sqlx::query_as!(
        PaymentRow,
        r#"SELECT id, amount_minor, currency, provider, provider_reference, status, verified_at,
                  verified_by, verification_method, description, metadata, correlation_id,
                  source_service, created_at, updated_at, version, failed_attempts, last_failure
             FROM payments WHERE tenant_id = $1 AND id = $2"#,
        tenant.0,
        id
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Payment::try_from)
    .transpose()
}

/// The payment, locked until the transaction ends: transitions of one payment run one at a
/// time, whoever asks for them.
pub async fn lock(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<Payment>, DbError> {
    sqlx::query_as!(
        PaymentRow,
        r#"SELECT id, amount_minor, currency, provider, provider_reference, status, verified_at,
                  verified_by, verification_method, description, metadata, correlation_id,
                  source_service, created_at, updated_at, version, failed_attempts, last_failure
             FROM payments WHERE tenant_id = $1 AND id = $2
              FOR UPDATE"#,
        tenant.0,
        id
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Payment::try_from)
    .transpose()
}

/// Whether another of the tenant's payments holds this provider reference (which the unique
/// index `payments_provider_reference` keeps for one payment).
pub async fn reference_taken(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider: &str,
    reference: &str,
    except: Uuid,
) -> Result<bool, DbError> {
    let taken = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM payments
                           WHERE tenant_id = $1 AND provider = $2 AND provider_reference = $3
                             AND id <> $4) AS "taken!""#,
        tenant.0,
        provider,
        reference,
        except
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(taken)
}

/// The payment a provider knows by `reference`, locked like [`lock`].
pub async fn lock_by_reference(
    conn: &mut PgConnection,
    tenant: TenantId,
    provider: &str,
    reference: &str,
) -> Result<Option<Payment>, DbError> {
    sqlx::query_as!(
        PaymentRow,
        r#"SELECT id, amount_minor, currency, provider, provider_reference, status, verified_at,
                  verified_by, verification_method, description, metadata, correlation_id,
                  source_service, created_at, updated_at, version, failed_attempts, last_failure
             FROM payments WHERE tenant_id = $1 AND provider = $2 AND provider_reference = $3
              FOR UPDATE"#,
        tenant.0,
        provider,
        reference
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Payment::try_from)
    .transpose()
}

/// What a transition writes. Verification fields are set only by a verification; a failed
/// attempt is counted, and its code kept.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    pub to: PaymentStatus,
    pub verified_by: Option<&'a str>,
    pub verification_method: Option<VerificationMethod>,
    pub provider_reference: Option<&'a str>,
    /// `Some` for a failed attempt: the provider's code for it, when it gave one.
    pub failed_attempt: Option<Option<&'a str>>,
}

/// Applies a transition to a payment locked by this transaction; bumps its version (the
/// payment's events are numbered by it).
pub async fn apply(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    change: &Change<'_>,
) -> Result<Payment, DbError> {
    let verifies = change.to == PaymentStatus::PaidVerified;
    sqlx::query_as!(
        PaymentRow,
        r#"UPDATE payments
              SET status = $3,
                  verified_at = CASE WHEN $4 THEN now() ELSE verified_at END,
                  verified_by = CASE WHEN $4 THEN $5 ELSE verified_by END,
                  verification_method = CASE WHEN $4 THEN $6 ELSE verification_method END,
                  provider_reference = coalesce(provider_reference, $7),
                  failed_attempts = failed_attempts + $8::int,
                  last_failure = CASE WHEN $8 = 1 THEN $9 ELSE last_failure END,
                  updated_at = now(),
                  version = version + 1
            WHERE tenant_id = $1 AND id = $2
        RETURNING id, amount_minor, currency, provider, provider_reference, status, verified_at,
                  verified_by, verification_method, description, metadata, correlation_id,
                  source_service, created_at, updated_at, version, failed_attempts, last_failure"#,
        tenant.0,
        id,
        change.to.as_str(),
        verifies,
        change.verified_by,
        change.verification_method.map(VerificationMethod::as_str),
        change.provider_reference,
        i32::from(change.failed_attempt.is_some()),
        change.failed_attempt.flatten()
    )
    .fetch_one(&mut *conn)
    .await?
    .try_into()
}

/// A page of the tenant's payments, newest first, optionally of one status, strictly before
/// `before` (created_at, id). One index range: `(tenant, [status,] created_at, id)` backwards.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    status: Option<PaymentStatus>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Payment>, DbError> {
    let (before_at, before_id) = match before {
        Some((at, id)) => (at, id),
        None => (DateTime::<Utc>::MAX_UTC, Uuid::max()),
    };
    sqlx::query_as!(
        PaymentRow,
        r#"SELECT id, amount_minor, currency, provider, provider_reference, status, verified_at,
                  verified_by, verification_method, description, metadata, correlation_id,
                  source_service, created_at, updated_at, version, failed_attempts, last_failure
             FROM payments
            WHERE tenant_id = $1
              AND ($2::text IS NULL OR status = $2)
              AND (created_at, id) < ($3::timestamptz, $4::uuid)
            ORDER BY created_at DESC, id DESC
            LIMIT $5"#,
        tenant.0,
        status.map(PaymentStatus::as_str),
        before_at,
        before_id,
        limit
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(Payment::try_from)
    .collect()
}

/// The catalog of currencies: code → exponent of the minor unit.
pub async fn currencies(conn: &mut PgConnection) -> Result<Vec<(String, i16)>, DbError> {
    Ok(
        sqlx::query!("SELECT code, minor_unit FROM currencies ORDER BY code")
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.code, r.minor_unit))
            .collect(),
    )
}
