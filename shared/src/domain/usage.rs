//! Usage events: the validation every submitted event passes, and the canonical payload hash
//! that tells a duplicate (same key, same payload) from a conflict (same key, other payload).

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::time::TimeError;
use super::{Classification, MetricCatalog, SourceService, TenantId, Trust};

/// Largest quantity one event may carry: keeps daily sums far from i64 overflow.
pub const MAX_QUANTITY: i64 = 1_000_000_000_000;
const MAX_ID_CHARS: usize = 128;
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;

/// The fields an event may carry (camelCase on the wire).
pub const KNOWN_FIELDS: &[&str] = &[
    "eventId",
    "metric",
    "quantity",
    "occurredAt",
    "correlationId",
    "actorId",
    "idempotencyKey",
    "metadata",
    "tenantId",
    "tenant",
    "source",
    "sourceService",
];

/// Limits that a deployment may tune.
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    pub max_age: Duration,
    pub max_future_skew: Duration,
    pub metadata_max_bytes: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_age: Duration::days(35),
            max_future_skew: Duration::minutes(5),
            metadata_max_bytes: 4096,
        }
    }
}

/// Who is submitting, as established by the API key, and what the catalog says.
pub struct Submitter<'a> {
    pub tenant_id: TenantId,
    pub tenant_slug: &'a str,
    pub source: &'a SourceService,
    pub trust: Trust,
    pub catalog: &'a MetricCatalog,
    pub now: DateTime<Utc>,
    pub limits: EventLimits,
}

/// A validated event, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub event_id: String,
    pub metric: String,
    pub quantity: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor_id: Option<String>,
    pub correlation_id: String,
    /// The caller's own idempotency key, when it chose one other than the event id. Event ids
    /// and idempotency keys are two separate key spaces, each unique per (tenant, source).
    pub idempotency_key: Option<String>,
    pub metadata: Value,
    pub classification: Classification,
    pub payload_hash: [u8; 32],
}

/// Why one event was rejected: a stable code, the offending field (camelCase), a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

impl Rejection {
    fn new(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        Rejection {
            code,
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Every rejection code, for documentation and tests.
pub const REJECTION_CODES: &[&str] = &[
    "invalid_event",
    "unknown_field",
    "missing_field",
    "invalid_type",
    "invalid_value",
    "tenant_mismatch",
    "source_mismatch",
    "unknown_metric",
    "billable_from_external_source",
    "quantity_not_integer",
    "quantity_not_positive",
    "quantity_too_large",
    "invalid_timestamp",
    "occurred_at_too_old",
    "occurred_at_in_future",
    "metadata_not_object",
    "metadata_too_large",
];

/// The event id a raw event names, if it names one as a string (for per-item results).
pub fn raw_event_id(raw: &Value) -> Option<&str> {
    raw.get("eventId").and_then(Value::as_str)
}

/// Validates one submitted event, taking it apart (its metadata moves into the result).
pub fn validate_event(raw: Value, who: &Submitter<'_>) -> Result<UsageEvent, Rejection> {
    let Value::Object(mut obj) = raw else {
        return Err(Rejection::new(
            "invalid_event",
            "",
            "each event must be a JSON object",
        ));
    };
    if let Some(unknown) = obj.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
        return Err(Rejection::new(
            "unknown_field",
            unknown,
            format!("unknown field {unknown:?}"),
        ));
    }

    let event_id = required_id(&obj, "eventId", MAX_ID_CHARS)?;
    let metric_name = required_str(&obj, "metric")?;
    let correlation_id = required_id(&obj, "correlationId", MAX_ID_CHARS)?;
    let actor_id = optional_id(&obj, "actorId", MAX_ID_CHARS)?;
    let idempotency_key = optional_id(&obj, "idempotencyKey", MAX_IDEMPOTENCY_KEY_CHARS)?
        .filter(|key| *key != event_id);

    for field in ["tenantId", "tenant"] {
        if let Some(named) = optional_str(&obj, field)? {
            let is_own = named == who.tenant_id.to_string()
                || (field == "tenant" && named == who.tenant_slug);
            if !is_own {
                return Err(Rejection::new(
                    "tenant_mismatch",
                    field,
                    "the event names a tenant other than the API key's",
                ));
            }
        }
    }
    for field in ["source", "sourceService"] {
        if let Some(named) = optional_str(&obj, field)? {
            if named != who.source.as_str() {
                return Err(Rejection::new(
                    "source_mismatch",
                    field,
                    format!(
                        "the event names source {named:?}, the API key belongs to {:?}",
                        who.source.as_str()
                    ),
                ));
            }
        }
    }

    let metric = who.catalog.get(metric_name).ok_or_else(|| {
        Rejection::new(
            "unknown_metric",
            "metric",
            format!("{:?} is not in the metric catalog", truncate(metric_name)),
        )
    })?;
    if metric.classification == Classification::Billable && who.trust == Trust::External {
        return Err(Rejection::new(
            "billable_from_external_source",
            "metric",
            format!(
                "{} is BILLABLE and may only be reported by an internal source",
                metric.name
            ),
        ));
    }

    let quantity = quantity(&obj)?;
    let occurred_at = occurred_at(&obj, who)?;
    let metadata = match obj.remove("metadata") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(object @ Value::Object(_)) => object,
        Some(_) => {
            return Err(Rejection::new(
                "metadata_not_object",
                "metadata",
                "metadata must be a JSON object",
            ))
        }
    };
    let mut canonical_metadata = String::new();
    write_canonical(&metadata, &mut canonical_metadata);
    // PostgreSQL text and jsonb cannot hold U+0000.
    if canonical_metadata.contains("\\u0000") {
        return Err(Rejection::new(
            "invalid_value",
            "metadata",
            "metadata must not contain NUL (\\u0000) characters",
        ));
    }
    if canonical_metadata.len() > who.limits.metadata_max_bytes {
        return Err(Rejection::new(
            "metadata_too_large",
            "metadata",
            format!(
                "metadata is {} bytes; the limit is {}",
                canonical_metadata.len(),
                who.limits.metadata_max_bytes
            ),
        ));
    }

    let payload_hash = payload_hash(&[
        ("actorId", actor_id.as_deref().unwrap_or("")),
        ("correlationId", &correlation_id),
        ("eventId", &event_id),
        // The effective key: an absent key and one equal to the event id are the same payload.
        (
            "idempotencyKey",
            idempotency_key.as_deref().unwrap_or(&event_id),
        ),
        ("metadata", &canonical_metadata),
        ("metric", &metric.name),
        (
            "occurredAt",
            &occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
        ("quantity", &quantity.to_string()),
        ("source", who.source.as_str()),
    ]);

    Ok(UsageEvent {
        event_id,
        metric: metric.name.clone(),
        quantity,
        occurred_at,
        actor_id,
        correlation_id,
        idempotency_key,
        metadata,
        classification: metric.classification,
        payload_hash,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn optional_str<'v>(
    obj: &'v Map<String, Value>,
    field: &str,
) -> Result<Option<&'v str>, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Rejection::new(
            "invalid_type",
            field,
            format!("{field} must be a string"),
        )),
    }
}

fn required_str<'v>(obj: &'v Map<String, Value>, field: &str) -> Result<&'v str, Rejection> {
    optional_str(obj, field)?
        .ok_or_else(|| Rejection::new("missing_field", field, format!("{field} is required")))
}

/// Largest number of characters of an event id (and of correlation and actor ids).
pub const MAX_EVENT_ID_CHARS: usize = MAX_ID_CHARS;

/// An identifier: 1..=max characters, no control characters (so no NUL), not blank.
pub fn is_valid_id(value: &str, max: usize) -> bool {
    let chars = value.chars().count();
    chars > 0 && chars <= max && !value.trim().is_empty() && !value.chars().any(char::is_control)
}

fn check_id(value: &str, field: &str, max: usize) -> Result<String, Rejection> {
    if !is_valid_id(value, max) {
        return Err(Rejection::new(
            "invalid_value",
            field,
            format!("{field} must be 1-{max} characters without control characters"),
        ));
    }
    Ok(value.to_owned())
}

fn required_id(obj: &Map<String, Value>, field: &str, max: usize) -> Result<String, Rejection> {
    check_id(required_str(obj, field)?, field, max)
}

fn optional_id(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, Rejection> {
    optional_str(obj, field)?
        .map(|v| check_id(v, field, max))
        .transpose()
}

fn quantity(obj: &Map<String, Value>) -> Result<i64, Rejection> {
    let field = "quantity";
    let number = match obj.get(field) {
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                "missing_field",
                field,
                "quantity is required",
            ))
        }
        Some(Value::Number(n)) => n,
        Some(_) => {
            return Err(Rejection::new(
                "invalid_type",
                field,
                "quantity must be a number",
            ))
        }
    };
    let too_large = || {
        Rejection::new(
            "quantity_too_large",
            field,
            format!("quantity may be at most {MAX_QUANTITY}"),
        )
    };
    if let Some(q) = number.as_i64() {
        if q <= 0 {
            return Err(Rejection::new(
                "quantity_not_positive",
                field,
                "quantity must be greater than 0",
            ));
        }
        if q > MAX_QUANTITY {
            return Err(too_large());
        }
        return Ok(q);
    }
    if number.as_u64().is_some() {
        return Err(too_large());
    }
    Err(Rejection::new(
        "quantity_not_integer",
        field,
        "quantity must be a whole number of the metric's unit",
    ))
}

fn occurred_at(obj: &Map<String, Value>, who: &Submitter<'_>) -> Result<DateTime<Utc>, Rejection> {
    let field = "occurredAt";
    let raw = required_str(obj, field)?;
    let at = super::time::parse_instant(raw).map_err(|e| {
        let message = match e {
            TimeError::Unparsable => {
                "occurredAt must be an RFC 3339 timestamp, e.g. 2026-11-25T10:00:00Z"
            }
            TimeError::LeapSecond => {
                "occurredAt must not be a leap second (:60); send :59.999999 or the next second"
            }
            TimeError::OutOfRange => "occurredAt is outside 2000-01-01..2100-01-01",
        };
        Rejection::new("invalid_timestamp", field, message)
    })?;
    if at < who.now - who.limits.max_age {
        return Err(Rejection::new(
            "occurred_at_too_old",
            field,
            format!(
                "occurredAt is more than {} days in the past",
                who.limits.max_age.num_days()
            ),
        ));
    }
    if at > who.now + who.limits.max_future_skew {
        return Err(Rejection::new(
            "occurred_at_in_future",
            field,
            format!(
                "occurredAt is more than {} seconds in the future",
                who.limits.max_future_skew.num_seconds()
            ),
        ));
    }
    Ok(at)
}

/// SHA-256 over length-prefixed (name, value) pairs: unambiguous whatever the values contain.
fn payload_hash(fields: &[(&str, &str)]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for (name, value) in fields {
        for part in [name, value] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher.finalize().into()
}

/// JSON with object keys sorted at every level, so equal documents hash equally whatever the key
/// order they arrived in.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MetricDefinition;
    use serde_json::json;

    fn catalog() -> MetricCatalog {
        MetricCatalog::new([
            MetricDefinition {
                name: "api.requests".into(),
                classification: Classification::Billable,
                unit: "request".into(),
            },
            MetricDefinition {
                name: "sla.timers.started".into(),
                classification: Classification::NonBillable,
                unit: "timer".into(),
            },
        ])
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn check(raw: Value, trust: Trust) -> Result<UsageEvent, Rejection> {
        let catalog = catalog();
        let source = SourceService::parse("crm").unwrap();
        let who = Submitter {
            tenant_id: TenantId(uuid::Uuid::nil()),
            tenant_slug: "acme",
            source: &source,
            trust,
            catalog: &catalog,
            now: now(),
            limits: EventLimits::default(),
        };
        validate_event(raw, &who)
    }

    fn base() -> Value {
        json!({"eventId": "e-1", "metric": "api.requests", "quantity": 3,
               "occurredAt": "2026-11-25T11:00:00.1234567+01:00", "correlationId": "c-1"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = base();
        v[field] = value;
        v
    }

    fn code(raw: Value) -> &'static str {
        check(raw, Trust::Internal).unwrap_err().code
    }

    #[test]
    fn a_valid_event_is_normalised() {
        let e = check(base(), Trust::Internal).unwrap();
        assert_eq!(
            e.idempotency_key, None,
            "a key equal to the event id adds nothing"
        );
        let e = check(with("idempotencyKey", json!("k-1")), Trust::Internal).unwrap();
        assert_eq!(e.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(e.classification, Classification::Billable);
        assert_eq!(
            e.occurred_at.to_rfc3339(),
            "2026-11-25T10:00:00.123456+00:00"
        );
        assert_eq!(e.metadata, json!({}));
    }

    #[test]
    fn every_rule_has_its_code() {
        assert_eq!(
            check(json!([1]), Trust::Internal).unwrap_err().code,
            "invalid_event"
        );
        assert_eq!(code(with("quantitiy", json!(1))), "unknown_field");
        let mut missing = base();
        missing.as_object_mut().unwrap().remove("correlationId");
        assert_eq!(code(missing), "missing_field");
        assert_eq!(code(with("eventId", json!(7))), "invalid_type");
        assert_eq!(code(with("eventId", json!(""))), "invalid_value");
        assert_eq!(
            code(with("eventId", json!("a".repeat(129)))),
            "invalid_value"
        );
        assert_eq!(code(with("actorId", json!("bad\u{0}id"))), "invalid_value");
        assert_eq!(
            code(with("tenantId", json!("someone-else"))),
            "tenant_mismatch"
        );
        assert_eq!(code(with("tenant", json!("globex"))), "tenant_mismatch");
        assert!(check(with("tenant", json!("acme")), Trust::Internal).is_ok());
        assert!(check(
            with("tenantId", json!(uuid::Uuid::nil().to_string())),
            Trust::Internal
        )
        .is_ok());
        assert_eq!(code(with("source", json!("billing"))), "source_mismatch");
        assert!(check(with("sourceService", json!("crm")), Trust::Internal).is_ok());
        assert_eq!(code(with("metric", json!("api.request"))), "unknown_metric");
        assert_eq!(
            check(base(), Trust::External).unwrap_err().code,
            "billable_from_external_source"
        );
        assert!(check(with("metric", json!("sla.timers.started")), Trust::External).is_ok());
        assert_eq!(code(with("quantity", json!(1.5))), "quantity_not_integer");
        assert_eq!(code(with("quantity", json!(1.0))), "quantity_not_integer");
        assert_eq!(code(with("quantity", json!("3"))), "invalid_type");
        assert_eq!(code(with("quantity", json!(0))), "quantity_not_positive");
        assert_eq!(code(with("quantity", json!(-4))), "quantity_not_positive");
        assert_eq!(
            code(with("quantity", json!(u64::MAX))),
            "quantity_too_large"
        );
        assert_eq!(code(with("quantity", json!(1e300))), "quantity_not_integer");
        assert_eq!(
            code(with("quantity", json!(MAX_QUANTITY + 1))),
            "quantity_too_large"
        );
        assert_eq!(
            code(with("occurredAt", json!("yesterday"))),
            "invalid_timestamp"
        );
        assert_eq!(
            code(with("occurredAt", json!("2026-11-24T23:59:60Z"))),
            "invalid_timestamp",
            "a leap second would land on another day in Redis than in PostgreSQL"
        );
        assert_eq!(
            code(with("occurredAt", json!("2026-10-20T11:59:59Z"))),
            "occurred_at_too_old"
        );
        assert_eq!(
            code(with("occurredAt", json!("2026-11-25T12:05:01Z"))),
            "occurred_at_in_future"
        );
        assert!(check(
            with("occurredAt", json!("2026-11-25T12:05:00Z")),
            Trust::Internal
        )
        .is_ok());
        assert_eq!(code(with("metadata", json!([1]))), "metadata_not_object");
        assert_eq!(
            code(with("metadata", json!({"k": "a\u{0}b"}))),
            "invalid_value"
        );
        assert_eq!(
            code(with("metadata", json!({"a\u{0}": 1}))),
            "invalid_value"
        );
        assert_eq!(
            code(with("metadata", json!({"k": "x".repeat(5000)}))),
            "metadata_too_large"
        );
        for c in ["invalid_event", "unknown_field", "quantity_too_large"] {
            assert!(REJECTION_CODES.contains(&c));
        }
    }

    #[test]
    fn the_hash_ignores_key_order_but_not_content() {
        let a = check(
            with(
                "metadata",
                json!({"a": 1, "b": {"y": 2, "x": [1, {"q": 1, "p": 2}]}}),
            ),
            Trust::Internal,
        )
        .unwrap();
        let b = check(
            with(
                "metadata",
                json!({"b": {"x": [1, {"p": 2, "q": 1}], "y": 2}, "a": 1}),
            ),
            Trust::Internal,
        )
        .unwrap();
        assert_eq!(a.payload_hash, b.payload_hash);
        let c = check(with("quantity", json!(4)), Trust::Internal).unwrap();
        assert_ne!(a.payload_hash, c.payload_hash);
        let d = check(base(), Trust::Internal).unwrap();
        let e = check(with("idempotencyKey", json!("e-1")), Trust::Internal).unwrap();
        assert_eq!(
            d.payload_hash, e.payload_hash,
            "the default key equals an explicit one"
        );
        let f = check(
            with("occurredAt", json!("2026-11-25T10:00:00.123456Z")),
            Trust::Internal,
        )
        .unwrap();
        assert_eq!(
            d.payload_hash, f.payload_hash,
            "same instant, other offset and precision"
        );
    }
}
