//! A usage event as the caller builds it, and its wire form (`UsageEventInput` of the API).

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

/// One usage event: `quantity` units of `metric`.
///
/// Only the metric and the quantity are required here; [`Client::record`](crate::Client::record)
/// fills in the rest when the caller did not:
///
/// - `eventId`: a fresh UUIDv7, assigned once, when the event is recorded — every retry of the
///   event resends the same id, so a retry can only ever be a duplicate, never a second event;
/// - `occurredAt`: the time of the `record` call;
/// - `correlationId`: the event id (each event its own operation).
///
/// The server checks the rest (its `UsageEventInput`): the metric must be in its catalog, the
/// quantity a whole number from 1 to 10¹², `occurredAt` at most 35 days old and 5 minutes
/// ahead, ids 1–128 characters without control characters, `metadata` a JSON object of at most
/// 4 KiB. An event that breaks a rule comes back [`Status::Rejected`] with the server's code;
/// it is never retried. The classification is the catalog's (the server sets it).
///
/// [`Status::Rejected`]: crate::Status::Rejected
///
/// ```
/// use meterbridge_client::Event;
///
/// let event = Event::new("api.requests", 3)
///     .actor_id("user-42")
///     .correlation_id("req-9f2")
///     .meta("endpoint", "/leads");
/// assert_eq!(event.metric, "api.requests");
/// assert_eq!(event.id(), None); // assigned when it is recorded
/// ```
#[derive(Clone, PartialEq)]
pub struct Event {
    /// The event's own id (unique per tenant and source); see [`Event::event_id`].
    pub event_id: Option<String>,
    /// A metric of the server's catalog, e.g. `api.requests`.
    pub metric: String,
    /// Whole units of the metric, 1 to 10¹².
    pub quantity: u64,
    /// When the usage happened; see [`Event::occurred_at`].
    pub occurred_at: Option<DateTime<Utc>>,
    /// The operation that caused the event; see [`Event::correlation_id`].
    pub correlation_id: Option<String>,
    /// Who caused the usage (the end user), 1–128 characters.
    pub actor_id: Option<String>,
    /// A key of your own the server deduplicates by besides the id, 1–256 characters.
    pub idempotency_key: Option<String>,
    /// Free-form JSON object, at most 4 KiB as canonical JSON.
    pub metadata: Option<Map<String, Value>>,
    /// The id assigned when it was recorded, if the caller gave none (kept as a UUID until the
    /// event is sent, so recording costs no formatting).
    generated_id: Option<Uuid>,
}

impl Event {
    /// `quantity` units of `metric` (a metric of the server's catalog, e.g. `api.requests`).
    pub fn new(metric: impl Into<String>, quantity: u64) -> Self {
        Event {
            event_id: None,
            metric: metric.into(),
            quantity,
            occurred_at: None,
            correlation_id: None,
            actor_id: None,
            idempotency_key: None,
            metadata: None,
            generated_id: None,
        }
    }

    /// The event's own id (1–128 characters, unique per tenant and source). Give one when the
    /// event may be recorded again — by a retry of your own operation, or from another
    /// process — so the server stores it once; without one, the client assigns a UUIDv7 when
    /// it is recorded.
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
    }

    /// When the usage happened (default: when it is recorded).
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }

    /// The operation that caused the event (default: the event id). With the metric and
    /// `occurredAt` it is unique per tenant: two events of one operation, metric and instant
    /// are the same event to the server.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Who caused the usage (the end user).
    pub fn actor_id(mut self, id: impl Into<String>) -> Self {
        self.actor_id = Some(id.into());
        self
    }

    /// A key of your own under which the server deduplicates the event besides its id.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: Map<String, Value>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Adds one metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata
            .get_or_insert_with(Map::new)
            .insert(key.into(), value.into());
        self
    }

    /// The id the event is (or will be) sent with: the caller's, or the one assigned when it
    /// was recorded; `None` for an event not yet recorded that has none.
    pub fn id(&self) -> Option<String> {
        match (&self.event_id, &self.generated_id) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(uuid)) => Some(uuid.hyphenated().to_string()),
            (None, None) => None,
        }
    }

    /// Fills in what the caller left out, at record time: the id and the time.
    pub(crate) fn stamp(&mut self) {
        if self.event_id.is_none() && self.generated_id.is_none() {
            self.generated_id = Some(Uuid::now_v7());
        }
        if self.occurred_at.is_none() {
            self.occurred_at = Some(Utc::now());
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.id())
            .field("metric", &self.metric)
            .field("quantity", &self.quantity)
            .field("occurred_at", &self.occurred_at)
            .field("correlation_id", &self.correlation_id)
            .field("actor_id", &self.actor_id)
            .field("idempotency_key", &self.idempotency_key)
            .field("metadata", &self.metadata)
            .finish()
    }
}

/// The event as the API reads it (camelCase; absent optional fields left out). Only stamped
/// events are sent, so the id and the time are there.
impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let id = self.id().unwrap_or_default();
        let occurred_at = self
            .occurred_at
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut s = serializer.serialize_struct("UsageEventInput", 8)?;
        s.serialize_field("eventId", &id)?;
        s.serialize_field("metric", &self.metric)?;
        s.serialize_field("quantity", &self.quantity)?;
        s.serialize_field("occurredAt", &occurred_at)?;
        s.serialize_field(
            "correlationId",
            self.correlation_id.as_deref().unwrap_or(&id),
        )?;
        if let Some(actor) = &self.actor_id {
            s.serialize_field("actorId", actor)?;
        }
        if let Some(key) = &self.idempotency_key {
            s.serialize_field("idempotencyKey", key)?;
        }
        if let Some(metadata) = &self.metadata {
            s.serialize_field("metadata", metadata)?;
        }
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stamped_event_serializes_as_the_api_reads_it() {
        let at = DateTime::parse_from_rfc3339("2026-11-25T10:00:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut event = Event::new("api.requests", 3)
            .event_id("evt-1")
            .occurred_at(at)
            .actor_id("user-42")
            .meta("endpoint", "/leads");
        event.stamp();
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"eventId": "evt-1", "metric": "api.requests", "quantity": 3,
                   "occurredAt": "2026-11-25T10:00:00.500000Z", "correlationId": "evt-1",
                   "actorId": "user-42", "metadata": {"endpoint": "/leads"}})
        );
    }

    #[test]
    fn stamping_assigns_a_uuid_v7_once() {
        let mut event = Event::new("api.requests", 1).idempotency_key("k-1");
        assert_eq!(event.id(), None);
        event.stamp();
        let id = event.id().unwrap();
        assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 7);
        let at = event.occurred_at;
        assert!(at.is_some());
        event.stamp();
        assert_eq!(event.id().unwrap(), id);
        assert_eq!(event.occurred_at, at);
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["eventId"], json!(id));
        assert_eq!(value["correlationId"], json!(id));
        assert_eq!(value["idempotencyKey"], json!("k-1"));
        assert!(value.get("actorId").is_none());
        assert!(value.get("metadata").is_none());
    }
}
