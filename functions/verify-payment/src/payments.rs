//! `POST /v1/payments` (idempotent with an `Idempotency-Key`), `GET /v1/payments/{id}`,
//! `GET /v1/payments` (keyset pages, newest first).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use lambda_http::http::{HeaderValue, StatusCode};
use lambda_http::{Body, Request, RequestExt, Response};
use meterbridge::auth::Caller;
use meterbridge::db::retry_transient;
use meterbridge::domain::advisory_locks;
use meterbridge::domain::payment::{
    parse_currency_code, parse_provider, PaymentStatus, MAX_AMOUNT_MINOR,
};
use meterbridge::domain::time::parse_instant;
use meterbridge::domain::usage::write_canonical;
use meterbridge::edge::Call;
use meterbridge::http::{json_response, parse_json_body, ApiError};
use meterbridge::repo::idempotency::{self, KeyOwner, Recorded};
use meterbridge::repo::payment_audit::{self, AuditEntry};
use meterbridge::repo::payments::{self, NewPayment, Payment};
use meterbridge::DbError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::app::App;
use crate::body::Fields;

/// A database error, with the unique violation of a provider reference another payment holds
/// (a create, or a verification recording a reference while a create races it) as a 409.
pub fn reference_conflict(e: DbError) -> ApiError {
    match e.sqlstate().as_deref() {
        Some(UNIQUE_VIOLATION) => ApiError::Conflict(
            "another payment of this tenant has the same provider and providerReference".into(),
        ),
        _ => e.into(),
    }
}

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
const CREATE: &str = "payment.create";
const UNIQUE_VIOLATION: &str = "23505";

/// The body of a payment creation, validated.
struct NewPaymentRequest {
    amount_minor: i64,
    currency: String,
    provider: String,
    provider_reference: Option<String>,
    description: Option<String>,
    metadata: Value,
    /// SHA-256 of the canonical body: what an idempotency key is bound to.
    hash: [u8; 32],
}

async fn read_new_payment(app: &App, body: Value) -> Result<NewPaymentRequest, ApiError> {
    let mut canonical = String::new();
    write_canonical(&body, &mut canonical);
    let hash: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
    let mut f = Fields::of(
        body,
        &[
            "amountMinor",
            "currency",
            "provider",
            "providerReference",
            "description",
            "metadata",
        ],
    )?;
    let amount_minor = f.integer("amountMinor", true, 1..=MAX_AMOUNT_MINOR);
    let currency = match f.text("currency", true, 3) {
        Some(raw) => match parse_currency_code(&raw) {
            Ok(code) if app.currencies().await?.contains_key(&code) => Some(code),
            _ => {
                f.invalid("currency", "must be an ISO 4217 currency code such as USD");
                None
            }
        },
        None => None,
    };
    let provider = f
        .text("provider", true, 32)
        .and_then(|raw| match parse_provider(&raw) {
            Ok(p) => Some(p),
            Err(e) => {
                f.invalid("provider", e.message);
                None
            }
        });
    let provider_reference = f.text("providerReference", false, 255);
    let description = f.text("description", false, 500);
    let metadata = f.object("metadata", 4096);
    f.finish()?;
    match (amount_minor, currency, provider) {
        (Some(amount_minor), Some(currency), Some(provider)) => Ok(NewPaymentRequest {
            amount_minor,
            currency,
            provider,
            provider_reference,
            description,
            metadata: metadata.unwrap_or_else(|| json!({})),
            hash,
        }),
        _ => Err(ApiError::Internal),
    }
}

/// The `Idempotency-Key` header, when sent: 1-255 visible ASCII characters.
fn idempotency_key(request: &Request) -> Result<Option<String>, ApiError> {
    let Some(value) = request.headers().get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .map(|k| Some(k.to_owned()))
        .ok_or_else(|| {
            ApiError::Malformed(
                "the Idempotency-Key header must be 1-255 visible ASCII characters".into(),
            )
        })
}

enum Created {
    New(Value),
    Replay(Recorded),
}

pub async fn create(app: &App, call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let caller = call.caller()?;
    let body = parse_json_body(
        call.request.headers(),
        call.request.body().as_ref(),
        app.config.max_body_bytes,
    )?;
    let key = idempotency_key(call.request)?;
    let new = read_new_payment(app, body).await?;

    let created =
        retry_transient(|| create_once(app, caller, &call.correlation_id, &new, key.as_deref()))
            .await
            .map_err(reference_conflict)?;
    match created {
        Created::New(body) => Ok(json_response(StatusCode::CREATED, &body)),
        Created::Replay(recorded) => {
            if recorded.operation != CREATE || recorded.request_hash != new.hash {
                return Err(ApiError::Conflict(
                    "this Idempotency-Key was used with another request; send a new key".into(),
                ));
            }
            let status = u16::try_from(recorded.response_status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .ok_or(ApiError::Internal)?;
            let mut response = json_response(status, &recorded.response_body);
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
    }
}

/// One attempt. With a key, a transaction-scoped advisory lock on it makes concurrent requests
/// with the same key wait for each other: the first creates and records, the others replay.
async fn create_once(
    app: &App,
    caller: &Caller,
    correlation_id: &str,
    new: &NewPaymentRequest,
    key: Option<&str>,
) -> Result<Created, DbError> {
    let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
    let owner = key.map(|key| KeyOwner {
        tenant: caller.tenant_id,
        source_service: caller.source.as_str(),
        key,
    });
    if let Some(owner) = owner {
        sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
            .bind(advisory_locks::space::IDEMPOTENCY_KEYS)
            .bind(advisory_lock_key(&owner))
            .execute(&mut *tx)
            .await?;
        if let Some(recorded) = idempotency::find(&mut tx, owner).await? {
            tx.rollback().await?;
            return Ok(Created::Replay(recorded));
        }
    }
    let payment = payments::insert(
        &mut tx,
        caller.tenant_id,
        &NewPayment {
            id: Uuid::now_v7(),
            amount_minor: new.amount_minor,
            currency: &new.currency,
            provider: &new.provider,
            provider_reference: new.provider_reference.as_deref(),
            description: new.description.as_deref(),
            metadata: &new.metadata,
            correlation_id,
            source_service: caller.source.as_str(),
        },
    )
    .await?;
    payment_audit::insert(
        &mut tx,
        caller.tenant_id,
        &AuditEntry {
            payment_id: Some(payment.id),
            action: "create",
            accepted: true,
            from_status: None,
            to_status: Some(payment.status.as_str()),
            actor: &actor_label(caller),
            actor_detail: None,
            method: None,
            reason: "created",
            correlation_id,
            details: json!({}),
        },
    )
    .await?;
    let body = json!({ "payment": payment });
    if let Some(owner) = owner {
        idempotency::record(&mut tx, owner, CREATE, &new.hash, 201, &body).await?;
    }
    tx.commit().await?;
    Ok(Created::New(body))
}

/// The second key of an idempotency key's advisory lock, in the idempotency keys' own space (a
/// collision only makes two keys wait for each other briefly).
fn advisory_lock_key(owner: &KeyOwner<'_>) -> i32 {
    let digest = Sha256::new()
        .chain_update(b"idempotency\0")
        .chain_update(owner.tenant.0.as_bytes())
        .chain_update(owner.source_service.as_bytes())
        .chain_update(b"\0")
        .chain_update(owner.key.as_bytes())
        .finalize();
    let mut first = [0u8; 4];
    first.copy_from_slice(&digest[..4]);
    i32::from_be_bytes(first)
}

/// How the audit trail names an API key's holder.
pub fn actor_label(caller: &Caller) -> String {
    format!("key:{}/{}", caller.key_prefix, caller.source)
}

pub async fn get(app: &App, call: &Call<'_>, id: Uuid) -> Result<Response<Body>, ApiError> {
    let caller = call.caller()?;
    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let payment = payments::find(&mut tx, caller.tenant_id, id).await?;
    tx.commit().await.map_err(DbError::from)?;
    match payment {
        Some(payment) => Ok(json_response(
            StatusCode::OK,
            &json!({ "payment": payment }),
        )),
        None => Err(not_found()),
    }
}

/// Another tenant's payment and one that never existed are the same 404.
pub fn not_found() -> ApiError {
    ApiError::NotFound("no such payment".into())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    payments: Vec<Payment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorWire {
    /// created_at of the last payment returned
    c: String,
    /// its id
    i: Uuid,
}

pub async fn list(app: &App, call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let caller = call.caller()?;
    let params = call.request.query_string_parameters();
    let param = |name: &str| params.first(name).map(str::trim).filter(|v| !v.is_empty());
    let bad = |name: &str, problem: &str| {
        ApiError::Malformed(format!("query parameter {name} {problem}"))
    };
    let status = param("status")
        .map(|s| {
            s.parse::<PaymentStatus>()
                .map_err(|e| bad("status", &e.message))
        })
        .transpose()?;
    let max = app.config.max_page_size;
    let limit = match param("limit") {
        None => 20,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| bad("limit", &format!("must be a whole number from 1 to {max}")))?,
    };
    let before = param("cursor")
        .map(|raw| {
            decode_cursor(raw).ok_or_else(|| bad("cursor", "is not a cursor this API returned"))
        })
        .transpose()?;

    let mut tx = app.services.db.tenant_read_tx(caller.tenant_id).await?;
    let mut payments = payments::list(&mut tx, caller.tenant_id, status, before, limit + 1).await?;
    tx.commit().await.map_err(DbError::from)?;
    let next_cursor = if payments.len() as i64 > limit {
        payments.truncate(limit as usize);
        payments.last().map(|p| encode_cursor(p.created_at, p.id))
    } else {
        None
    };
    Ok(json_response(
        StatusCode::OK,
        &Page {
            payments,
            next_cursor,
        },
    ))
}

fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    let wire = CursorWire {
        c: created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        i: id,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).unwrap_or_default())
}

fn decode_cursor(raw: &str) -> Option<(DateTime<Utc>, Uuid)> {
    if raw.len() > 256 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    let wire: CursorWire = serde_json::from_slice(&bytes).ok()?;
    Some((parse_instant(&wire.c).ok()?, wire.i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let at = parse_instant("2026-11-25T10:00:00.123456Z").unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        for bad in [
            "x".to_owned(),
            URL_SAFE_NO_PAD.encode("{}"),
            URL_SAFE_NO_PAD.encode(
                r#"{"c":"+262142-01-01T00:00:00Z","i":"00000000-0000-0000-0000-000000000000"}"#,
            ),
            URL_SAFE_NO_PAD.encode(r#"{"c":"2026-11-25T00:00:00Z","i":"nope"}"#),
            "A".repeat(300),
        ] {
            assert_eq!(decode_cursor(&bad), None, "{bad}");
        }
    }
}
