//! One batch's journey: sent, retried as the answers say, split when too large, and each of
//! its events settled — counted and passed to the callback — exactly once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{sleep, sleep_until};

use crate::backoff::backoff;
use crate::error::{Problem, TransportError};
use crate::event::Event;
use crate::outcome::{Outcome, Status};
use crate::queue::Taken;
use crate::shared::Shared;
use crate::transport::Answer;
use crate::wire::{self, BatchAnswer};

/// Events with consecutive sequence numbers from `lo`, sent in one request.
struct Part {
    lo: u64,
    events: Vec<Event>,
}

/// What an answer (or its absence) means for a batch.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// One result per event.
    Results(BatchAnswer),
    /// `422`: every event was rejected, each named in the problem's `errors`.
    AllRejected(Problem),
    /// Refused whole, not to be retried (`400`, `401`, `403`…): every event is rejected with
    /// the problem's code.
    Refused(Problem),
    /// Too large (`413`, or `429` without `Retry-After`: more than a rate limit's burst).
    Split,
    /// Worth another try, not before `after` when the server said.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
}

pub(crate) fn classify(answer: Result<Answer, TransportError>, events: usize) -> Verdict {
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            return Verdict::Retry {
                after: None,
                reason: e.to_string(),
            }
        }
    };
    let status = answer.status;
    let after = wire::retry_after(&answer.headers, SystemTime::now());
    let problem = || Problem::from_body(status, &answer.body);
    if status.is_success() {
        return match serde_json::from_slice::<BatchAnswer>(&answer.body) {
            Ok(results) => Verdict::Results(results),
            // Not the API's answer (a base URL pointing elsewhere?): retrying cannot help.
            Err(e) => Verdict::Refused(Problem {
                code: "unreadable_answer".into(),
                status: Some(status.as_u16()),
                detail: Some(format!("the {status} answer is not a batch result: {e}")),
                ..Problem::default()
            }),
        };
    }
    match status {
        StatusCode::UNPROCESSABLE_ENTITY => Verdict::AllRejected(problem()),
        StatusCode::PAYLOAD_TOO_LARGE if events > 1 => Verdict::Split,
        StatusCode::TOO_MANY_REQUESTS if after.is_none() && events > 1 => Verdict::Split,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => Verdict::Retry {
            after,
            reason: problem().to_string(),
        },
        s if s.is_server_error() => Verdict::Retry {
            after,
            reason: problem().to_string(),
        },
        _ => Verdict::Refused(problem()),
    }
}

/// Sends a batch taken from the queue until each of its events is settled; holds its
/// in-flight permit until then.
pub(crate) async fn deliver(shared: Arc<Shared>, taken: Taken, _permit: OwnedSemaphorePermit) {
    let mut stop = shared.stop.subscribe();
    let mut flushes = shared.flushes.subscribe();
    let mut parts = vec![Part {
        lo: taken.lo,
        events: taken.events,
    }];
    while let Some(part) = parts.pop() {
        match send(&shared, part, &mut stop, &mut flushes).await {
            Sent::Settled => {}
            Sent::Split(first, second) => {
                parts.push(second);
                parts.push(first);
            }
            Sent::Stopped(part) => {
                abandon(&shared, part.lo, part.events, "shutdown");
                for part in parts.drain(..) {
                    abandon(&shared, part.lo, part.events, "shutdown");
                }
                return;
            }
        }
    }
}

/// Abandons events the client is giving up on.
pub(crate) fn abandon(shared: &Shared, lo: u64, events: Vec<Event>, why: &str) {
    let n = events.len();
    let message = match why {
        "shutdown" => "the client stopped before the server confirmed the event",
        _ => "every attempt to send the event failed",
    };
    settle(
        shared,
        lo,
        events.into_iter().map(|event| {
            Outcome::new(event, Status::Abandoned).because(
                Some(why.to_owned()),
                None,
                Some(message.to_owned()),
            )
        }),
    );
    if n > 0 {
        tracing::warn!(
            events = n,
            reason = why,
            "meterbridge-client: usage events abandoned unsent"
        );
    }
}

enum Sent {
    Settled,
    Split(Part, Part),
    Stopped(Part),
}

/// Resolves once the client is stopping.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the client itself is gone, so stop too.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn send(
    shared: &Shared,
    part: Part,
    stop: &mut watch::Receiver<bool>,
    flushes: &mut watch::Receiver<u64>,
) -> Sent {
    let body = match wire::batch_body(&part.events) {
        Ok(body) => body,
        Err(e) => {
            reject_all(
                shared,
                part,
                &Problem {
                    code: "unserializable".into(),
                    detail: Some(e.to_string()),
                    ..Problem::default()
                },
            );
            return Sent::Settled;
        }
    };
    let correlation_id = format!("mbc-{}", uuid::Uuid::now_v7().simple());
    let policy = shared.settings.retry;
    // Failed attempts (for `max_attempts`), and the backoff's step (a flush starts it over).
    let mut failures: u32 = 0;
    let mut step: u32 = 0;
    loop {
        if let Some(until) = shared.gate.closed_until() {
            tokio::select! {
                () = sleep_until(until) => {}
                () = stopping(stop) => return Sent::Stopped(part),
            }
        }
        if *stop.borrow() {
            return Sent::Stopped(part);
        }
        shared.counters.request(failures > 0);
        let answer = tokio::select! {
            answer = shared.transport.post_events(body.clone(), &correlation_id) => answer,
            () = stopping(stop) => return Sent::Stopped(part),
        };
        if let Ok(answer) = &answer {
            if let Some(pause) = wire::rate_limit_pause(&answer.headers) {
                shared.gate.pause_for(pause);
            }
        }
        match classify(answer, part.events.len()) {
            Verdict::Results(results) => {
                settle_results(shared, part, results);
                return Sent::Settled;
            }
            Verdict::AllRejected(problem) => {
                settle_rejected(shared, part, &problem);
                return Sent::Settled;
            }
            Verdict::Refused(problem) => {
                tracing::warn!(
                    code = %problem.code,
                    detail = problem.detail.as_deref().unwrap_or_default(),
                    events = part.events.len(),
                    %correlation_id,
                    "meterbridge-client: the API refused a batch; its events are rejected"
                );
                reject_all(shared, part, &problem);
                return Sent::Settled;
            }
            Verdict::Split => {
                let Part { lo, mut events } = part;
                let mid = events.len() / 2;
                let second = events.split_off(mid);
                shared.in_flight.split(lo, lo + mid as u64);
                shared.counters.split();
                tracing::debug!(
                    events = mid + second.len(),
                    "meterbridge-client: batch too large, split in two"
                );
                return Sent::Split(
                    Part { lo, events },
                    Part {
                        lo: lo + mid as u64,
                        events: second,
                    },
                );
            }
            Verdict::Retry { after, reason } => {
                failures += 1;
                step += 1;
                if policy.max_attempts.is_some_and(|max| failures >= max) {
                    abandon(shared, part.lo, part.events, "retries_exhausted");
                    return Sent::Settled;
                }
                if let Some(after) = after {
                    shared.gate.pause_for(after);
                }
                let wait = backoff(&policy, step);
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(
                        attempt = failures,
                        retry_in_ms = wait.max(after.unwrap_or_default()).as_millis() as u64,
                        events = part.events.len(),
                        %reason,
                        "meterbridge-client: sending usage failed; retrying"
                    );
                } else {
                    tracing::debug!(attempt = failures, %reason, "meterbridge-client: retrying");
                }
                // The backoff; a flush cuts it short (never a server-imposed pause: the gate
                // holds the next attempt until then).
                tokio::select! {
                    () = sleep(wait) => {}
                    _ = flushes.changed() => step = 0,
                    () = stopping(stop) => return Sent::Stopped(part),
                }
            }
        }
    }
}

/// Settles a part by the server's per-event results.
fn settle_results(shared: &Shared, part: Part, answer: BatchAnswer) {
    let lo = part.lo;
    let mut events: Vec<Option<Event>> = part.events.into_iter().map(Some).collect();
    let mut outcomes = Vec::with_capacity(events.len());
    for result in answer.results {
        let Some(event) = events.get_mut(result.index).and_then(Option::take) else {
            continue;
        };
        let (status, code) = match Status::parse(&result.status) {
            Some(status) => (status, result.code),
            None => (
                Status::Rejected,
                Some(format!("unknown_status_{}", result.status)),
            ),
        };
        outcomes.push(Outcome::new(event, status).because(code, result.field, result.message));
    }
    // An event the answer did not mention: its fate is unknown, so it is not "sent".
    outcomes.extend(events.into_iter().flatten().map(|event| {
        Outcome::new(event, Status::Abandoned).because(
            Some("no_result".into()),
            None,
            Some("the server's answer had no result for this event".into()),
        )
    }));
    settle(shared, lo, outcomes);
}

/// Settles a part the server rejected whole with a `422`: each event by its entry in `errors`.
fn settle_rejected(shared: &Shared, part: Part, problem: &Problem) {
    let mut reasons: Vec<Option<(String, Option<String>, String)>> = vec![None; part.events.len()];
    for error in &problem.errors {
        if let Some((index, field)) = Problem::item(&error.pointer) {
            if let Some(slot) = reasons.get_mut(index) {
                slot.get_or_insert((error.code.clone(), field, error.message.clone()));
            }
        }
    }
    let outcomes = part.events.into_iter().zip(reasons).map(|(event, reason)| {
        let (code, field, message) = reason.unwrap_or_else(|| {
            (
                problem.code.clone(),
                None,
                problem.detail.clone().unwrap_or_default(),
            )
        });
        Outcome::new(event, Status::Rejected).because(Some(code), field, Some(message))
    });
    settle(shared, part.lo, outcomes);
}

fn reject_all(shared: &Shared, part: Part, problem: &Problem) {
    let outcomes = part.events.into_iter().map(|event| {
        Outcome::new(event, Status::Rejected).because(
            Some(problem.code.clone()),
            None,
            problem.detail.clone(),
        )
    });
    settle(shared, part.lo, outcomes);
}

/// Counts the outcomes, hands each to the callback, then marks the part settled (so a flush
/// that returns has seen every callback of its events).
fn settle(shared: &Shared, lo: u64, outcomes: impl IntoIterator<Item = Outcome>) {
    let mut counts = [0u64; 5];
    for outcome in outcomes {
        counts[index(outcome.status)] += 1;
        if let Some(callback) = &shared.callback {
            let call = std::panic::AssertUnwindSafe(|| callback(&outcome));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!(
                    event_id = %outcome.event_id,
                    "meterbridge-client: the outcome callback panicked"
                );
            }
        }
    }
    for status in [
        Status::Accepted,
        Status::Duplicate,
        Status::Conflict,
        Status::Rejected,
        Status::Abandoned,
    ] {
        shared.counters.settled(status, counts[index(status)]);
    }
    shared.in_flight.settle(lo);
}

fn index(status: Status) -> usize {
    match status {
        Status::Accepted => 0,
        Status::Duplicate => 1,
        Status::Conflict => 2,
        Status::Rejected => 3,
        Status::Abandoned => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue};

    fn answer(status: u16, headers: &[(&'static str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn answers_are_classified_as_documented() {
        let ok = r#"{"accepted": 1, "duplicates": 0, "conflicts": 0, "rejected": 0,
                     "results": [{"index": 0, "eventId": "e", "status": "accepted"}]}"#;
        assert!(matches!(
            classify(Ok(answer(200, &[], ok)), 1),
            Verdict::Results(_)
        ));
        assert!(matches!(
            classify(Ok(answer(200, &[], "<html>")), 1),
            Verdict::Refused(p) if p.code == "unreadable_answer"
        ));
        assert!(matches!(
            classify(Ok(answer(422, &[], r#"{"code": "validation_failed"}"#)), 2),
            Verdict::AllRejected(_)
        ));
        assert!(matches!(
            classify(Ok(answer(413, &[], "")), 2),
            Verdict::Split
        ));
        assert!(matches!(
            classify(Ok(answer(413, &[], r#"{"code": "payload_too_large"}"#)), 1),
            Verdict::Refused(p) if p.code == "payload_too_large"
        ));
        assert!(matches!(
            classify(Ok(answer(429, &[("retry-after", "2")], "")), 5),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            classify(Ok(answer(429, &[], "")), 5),
            Verdict::Split
        ));
        assert!(matches!(
            classify(Ok(answer(503, &[("retry-after", "5")], "")), 5),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(5)
        ));
        assert!(matches!(
            classify(Ok(answer(500, &[], "")), 5),
            Verdict::Retry { after: None, .. }
        ));
        assert!(matches!(
            classify(Ok(answer(408, &[], "")), 5),
            Verdict::Retry { .. }
        ));
        for refused in [400, 401, 403, 404, 415] {
            assert!(matches!(
                classify(Ok(answer(refused, &[], r#"{"code": "unauthorized"}"#)), 5),
                Verdict::Refused(_)
            ));
        }
    }
}
