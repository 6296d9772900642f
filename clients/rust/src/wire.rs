//! The ingestion endpoint's bodies and the headers the client paces itself by.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// `{"events": [...]}`, serialized once per batch and resent as is by every retry.
pub(crate) fn batch_body(events: &[Event]) -> Result<Bytes, serde_json::Error> {
    #[derive(Serialize)]
    struct Batch<'a> {
        events: &'a [Event],
    }
    serde_json::to_vec(&Batch { events }).map(Bytes::from)
}

/// A `200` answer to a batch: one result per event, by index.
#[derive(Debug, Deserialize)]
pub(crate) struct BatchAnswer {
    pub results: Vec<EventResult>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EventResult {
    pub index: usize,
    pub status: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// `Retry-After`: delay-seconds or an HTTP-date (RFC 9110), as a wait from `now`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The pause the IETF `RateLimit` header asks for: a budget with nothing left (`r=0`) is whole
/// again in `t` seconds; `None` when every budget has some left (or there is no header).
pub(crate) fn rate_limit_pause(headers: &HeaderMap) -> Option<Duration> {
    let mut pause: Option<u64> = None;
    for value in headers.get_all("ratelimit") {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut remaining = None;
            let mut reset = None;
            for param in item.split(';').skip(1) {
                match param.trim().split_once('=') {
                    Some(("r", v)) => remaining = v.trim().parse::<u64>().ok(),
                    Some(("t", v)) => reset = v.trim().parse::<u64>().ok(),
                    _ => {}
                }
            }
            if remaining == Some(0) {
                let wait = reset.unwrap_or(1).max(1);
                pause = Some(pause.map_or(wait, |p| p.max(wait)));
            }
        }
    }
    pause.map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_608_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "3")]), now),
            Some(Duration::from_secs(3))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &later)]), now),
            Some(Duration::from_secs(7))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_spent_budget_paces_the_next_send() {
        let spent = headers(&[(
            "ratelimit",
            "\"key-requests\";r=187;t=1, \"key-events\";r=0;t=2, \"tenant-events\";r=0;t=1",
        )]);
        assert_eq!(rate_limit_pause(&spent), Some(Duration::from_secs(2)));
        let left = headers(&[("ratelimit", "\"key-requests\";r=5;t=1")]);
        assert_eq!(rate_limit_pause(&left), None);
        assert_eq!(rate_limit_pause(&HeaderMap::new()), None);
    }

    #[test]
    fn a_batch_is_one_events_array() {
        let mut event = Event::new("api.requests", 2).event_id("e-1");
        event.stamp();
        let body: serde_json::Value =
            serde_json::from_slice(&batch_body(&[event]).unwrap()).unwrap();
        assert_eq!(body["events"][0]["eventId"], "e-1");
        assert_eq!(body.as_object().unwrap().len(), 1);
    }
}
