//! Listing cursors: opaque to clients (base64url of a small JSON document), carrying the position
//! of the last event returned and the window of the listing, so that a next page reads the same
//! window whatever the clock says by then. A cursor is validated as strictly as any parameter:
//! it names instants in range and a position number, and nothing else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use meterbridge::domain::time::parse_instant;
use meterbridge::http::ApiError;
use meterbridge::repo::usage_events::ListPosition;
use serde::{Deserialize, Serialize};

use crate::query::bad_param;

/// Longer than any cursor this API returns.
const MAX_CURSOR_CHARS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub position: ListPosition,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    /// occurred_at of the last event returned
    a: String,
    /// its arrival sequence
    q: i64,
    /// the window
    f: String,
    t: String,
}

fn stamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn encode(cursor: &Cursor) -> String {
    let wire = Wire {
        a: stamp(cursor.position.occurred_at),
        q: cursor.position.seq,
        f: stamp(cursor.from),
        t: stamp(cursor.to),
    };
    // Serialising four strings and a number cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).unwrap_or_default())
}

pub fn decode(raw: &str) -> Result<Cursor, ApiError> {
    let invalid = || bad_param("cursor", "is not a cursor this API returned");
    if raw.len() > MAX_CURSOR_CHARS {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    let wire: Wire = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let instant = |s: &str| parse_instant(s).map_err(|_| invalid());
    Ok(Cursor {
        position: ListPosition {
            occurred_at: instant(&wire.a)?,
            seq: wire.q,
        },
        from: instant(&wire.f)?,
        to: instant(&wire.t)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        parse_instant(s).unwrap()
    }

    fn sample() -> Cursor {
        Cursor {
            position: ListPosition {
                occurred_at: at("2026-11-25T10:00:00.123456Z"),
                seq: 42,
            },
            from: at("2026-11-24T10:00:00Z"),
            to: at("2026-11-25T10:05:00Z"),
        }
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = sample();
        assert_eq!(decode(&encode(&cursor)).unwrap(), cursor);
    }

    #[test]
    fn garbage_and_forgeries_are_refused() {
        let forged = |a: &str, q: serde_json::Value| {
            URL_SAFE_NO_PAD.encode(
                serde_json::json!({"a": a, "q": q,
                    "f": "2026-11-24T00:00:00Z", "t": "2026-11-25T00:00:00Z"})
                .to_string(),
            )
        };
        let good_at = "2026-11-25T00:00:00Z";
        for raw in [
            "not a cursor".to_owned(),
            URL_SAFE_NO_PAD.encode("x|y"),
            URL_SAFE_NO_PAD.encode("2026-11-25T10:00:00.000000Z|\u{0}"),
            URL_SAFE_NO_PAD.encode("{}"),
            forged(good_at, serde_json::json!("7")),
            forged(good_at, serde_json::json!(1.5)),
            forged(good_at, serde_json::json!(u64::MAX)),
            forged("+262142-01-01T00:00:00Z", serde_json::json!(1)),
            forged("-5000-01-01T00:00:00Z", serde_json::json!(1)),
            forged("2016-12-31T23:59:60Z", serde_json::json!(1)),
            forged("2026-11-25T00:00:00\u{0}Z", serde_json::json!(1)),
            "A".repeat(MAX_CURSOR_CHARS + 1),
        ] {
            let err = decode(&raw).unwrap_err();
            assert_eq!(err.status(), 400, "{raw}");
        }
        assert!(decode(&forged(good_at, serde_json::json!(7))).is_ok());
    }
}
