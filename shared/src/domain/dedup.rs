//! Deduplication keys: each unique key of a usage event as a fixed 16-byte hash, the form in
//! which `usage_event_keys` stores and compares them (migration 0006 computes the same bytes
//! for the events stored before it).
//!
//! An event has up to three keys: its event id and its idempotency key (each unique per
//! tenant and source, in two separate spaces), remembered in `usage_event_keys`, and its
//! operation (correlation id, metric and instant, unique per tenant), stored with the event. A key is the first 16 bytes of the SHA-256 of its kind, the
//! tenant and its parts joined by U+001F; identifiers cannot contain control characters, so the
//! joined text names one key only. 128 bits make an accidental collision among even 10^12 keys
//! a chance of about 10^-15.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::usage::UsageEvent;
use super::{SourceService, TenantId};

/// The advisory lock that ingestion holds shared and the key-generation rotation exclusive.
pub const KEY_ROTATION_LOCK: i64 = super::advisory_locks::KEY_ROTATION.id;

/// The hashed unique keys of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKeys {
    pub event: Uuid,
    pub idempotency: Option<Uuid>,
    pub operation: Uuid,
}

impl DedupKeys {
    pub fn of(tenant: TenantId, source: &SourceService, event: &UsageEvent) -> Self {
        DedupKeys {
            event: Self::event_key(tenant, source, &event.event_id),
            idempotency: event
                .idempotency_key
                .as_deref()
                .map(|k| key("idem", tenant, [source.as_str(), k, ""])),
            operation: key(
                "op",
                tenant,
                [
                    &event.correlation_id,
                    &event.metric,
                    &event.occurred_at.timestamp_micros().to_string(),
                ],
            ),
        }
    }

    /// The key of an event id alone (to find a stored event by the id its source gave it).
    pub fn event_key(tenant: TenantId, source: &SourceService, event_id: &str) -> Uuid {
        key("event", tenant, [source.as_str(), event_id, ""])
    }

    /// The keys `usage_event_keys` remembers: the event id's, and the idempotency key's when
    /// there is one. (The operation key contains the instant, so it is unique within its day
    /// partition of `usage_events` instead.)
    pub fn remembered(&self) -> impl Iterator<Item = Uuid> + '_ {
        [Some(self.event), self.idempotency].into_iter().flatten()
    }
}

fn key(kind: &str, tenant: TenantId, parts: [&str; 3]) -> Uuid {
    const SEPARATOR: &[u8] = b"\x1f";
    let mut hash = Sha256::new();
    hash.update(kind.as_bytes());
    hash.update(SEPARATOR);
    hash.update(tenant.0.hyphenated().to_string().as_bytes());
    for part in parts {
        hash.update(SEPARATOR);
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId(Uuid::parse_str("11111111-1111-1111-1111-111111111111").unwrap())
    }

    #[test]
    fn the_key_is_the_sha256_prefix_of_the_joined_parts() {
        // The same bytes as migration 0006's usage_key('event', tenant, 'crm', 'e-1', ''):
        // sha256('event␟11111111-1111-1111-1111-111111111111␟crm␟e-1␟').
        let expected = Sha256::digest(
            "event\u{1f}11111111-1111-1111-1111-111111111111\u{1f}crm\u{1f}e-1\u{1f}".as_bytes(),
        );
        let got = key("event", tenant(), ["crm", "e-1", ""]);
        assert_eq!(got.as_bytes(), &expected[..16]);
    }

    #[test]
    fn kinds_tenants_and_part_boundaries_are_distinct_keys() {
        let other = TenantId(Uuid::nil());
        let a = key("event", tenant(), ["crm", "e-1", ""]);
        assert_ne!(a, key("idem", tenant(), ["crm", "e-1", ""]));
        assert_ne!(a, key("event", other, ["crm", "e-1", ""]));
        assert_ne!(a, key("event", tenant(), ["crme", "-1", ""]));
        assert_ne!(a, key("event", tenant(), ["crm", "e-1 ", ""]));
    }
}
