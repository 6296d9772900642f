//! One result per submitted event, by index, and the in-batch dedup that decides which events
//! go to the database: the first event holding a unique key leads; a later event with the same
//! key follows it (a duplicate when its payload is the same, a conflict otherwise).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use meterbridge::domain::usage::{Rejection, UsageEvent};
use meterbridge::http::FieldError;
use meterbridge::repo::usage_events::ExistingKeys;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Accepted,
    Duplicate,
    Conflict,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventResult {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub accepted: usize,
    pub duplicates: usize,
    pub conflicts: usize,
    pub rejected: usize,
}

type CorrelationKey = (String, String, DateTime<Utc>);

/// The batch being decided.
pub struct Batch {
    results: Vec<Option<EventResult>>,
    /// Valid events that lead on all their keys, with their index: these go to the database.
    leaders: Vec<(usize, UsageEvent)>,
    /// (follower index, leader position in `leaders`, same payload?)
    followers: Vec<(usize, usize, bool)>,
}

impl Batch {
    pub fn new(size: usize) -> Self {
        Batch {
            results: vec![None; size],
            leaders: Vec::new(),
            followers: Vec::new(),
        }
    }

    pub fn reject(&mut self, index: usize, event_id: Option<&str>, rejection: Rejection) {
        self.results[index] = Some(EventResult {
            index,
            event_id: event_id.map(|id| id.chars().take(128).collect()),
            status: Status::Rejected,
            code: Some(rejection.code),
            field: Some(rejection.field).filter(|f| !f.is_empty()),
            message: Some(rejection.message),
        });
    }

    /// Adds valid events in submission order, deciding leaders and followers.
    pub fn add_valid(&mut self, events: Vec<(usize, UsageEvent)>) {
        let mut by_event_id: HashMap<String, usize> = HashMap::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut by_correlation: HashMap<CorrelationKey, usize> = HashMap::new();
        for (index, event) in events {
            let correlation = (
                event.correlation_id.clone(),
                event.metric.clone(),
                event.occurred_at,
            );
            let leader = event
                .idempotency_key
                .as_ref()
                .and_then(|key| by_key.get(key))
                .or_else(|| by_event_id.get(&event.event_id))
                .or_else(|| by_correlation.get(&correlation))
                .copied();
            match leader {
                Some(position) => {
                    let same = self.leaders[position].1.payload_hash == event.payload_hash;
                    self.followers.push((index, position, same));
                    self.results[index] = Some(EventResult {
                        index,
                        event_id: Some(event.event_id),
                        status: Status::Duplicate,
                        code: None,
                        field: None,
                        message: None,
                    });
                }
                None => {
                    let position = self.leaders.len();
                    by_event_id.insert(event.event_id.clone(), position);
                    if let Some(key) = &event.idempotency_key {
                        by_key.insert(key.clone(), position);
                    }
                    by_correlation.insert(correlation, position);
                    self.leaders.push((index, event));
                }
            }
        }
    }

    pub fn leaders(&self) -> Vec<&UsageEvent> {
        self.leaders.iter().map(|(_, e)| e).collect()
    }

    /// The later events of the batch that share a unique key with an earlier one but not its
    /// payload: (their index, the earlier one's index).
    pub fn conflicts_within(&self) -> Vec<(usize, usize)> {
        self.followers
            .iter()
            .filter(|(_, _, same)| !same)
            .map(|&(index, position, _)| (index, self.leaders[position].0))
            .collect()
    }

    /// The leaders that a stored event holds a key of with another payload: each with its
    /// index and why.
    pub fn conflicts_with(&self, source: &str, existing: &[ExistingKeys]) -> Vec<EventResult> {
        self.leaders
            .iter()
            .map(|(index, event)| settle_skipped(*index, event, source, existing))
            // A leader no stored event holds a key of was not in the collision.
            .filter(|r| r.status == Status::Conflict && r.code != Some("unresolved_collision"))
            .collect()
    }

    /// Settles every leader from the insert's outcome: inserted → accepted; skipped → duplicate
    /// or conflict against the stored event that holds its key. Then the followers.
    /// `source` is the submitting key's: event ids and idempotency keys are its own key spaces.
    pub fn settle(&mut self, source: &str, inserted: &[String], existing: &[ExistingKeys]) {
        let inserted: std::collections::HashSet<&str> =
            inserted.iter().map(String::as_str).collect();
        for (index, event) in &self.leaders {
            let result = if inserted.contains(event.event_id.as_str()) {
                outcome(*index, event, Status::Accepted, None, None)
            } else {
                settle_skipped(*index, event, source, existing)
            };
            self.results[*index] = Some(result);
        }
        for &(index, position, same) in &self.followers {
            let (leader_index, leader) = &self.leaders[position];
            let leader_status = self.results[*leader_index].as_ref().map(|r| r.status);
            let event_id = self.results[index]
                .as_ref()
                .and_then(|r| r.event_id.clone());
            self.results[index] = Some(if same && leader_status != Some(Status::Conflict) {
                EventResult {
                    index,
                    event_id,
                    status: Status::Duplicate,
                    code: None,
                    field: None,
                    message: Some(format!("repeats event {} of this batch", leader_index)),
                }
            } else {
                EventResult {
                    index,
                    event_id,
                    status: Status::Conflict,
                    code: Some("batch_conflict"),
                    field: None,
                    message: Some(format!(
                        "shares a unique key with event {} ({}) of this batch but not its payload",
                        leader_index, leader.event_id
                    )),
                }
            });
        }
    }

    /// The events that were stored by this request.
    pub fn accepted(&self) -> Vec<&UsageEvent> {
        self.leaders
            .iter()
            .filter(|(i, _)| matches!(&self.results[*i], Some(r) if r.status == Status::Accepted))
            .map(|(_, e)| e)
            .collect()
    }

    pub fn finish(self) -> (Counts, Vec<EventResult>) {
        let results: Vec<EventResult> = self.results.into_iter().flatten().collect();
        let mut counts = Counts::default();
        for r in &results {
            match r.status {
                Status::Accepted => counts.accepted += 1,
                Status::Duplicate => counts.duplicates += 1,
                Status::Conflict => counts.conflicts += 1,
                Status::Rejected => counts.rejected += 1,
            }
        }
        (counts, results)
    }
}

fn outcome(
    index: usize,
    event: &UsageEvent,
    status: Status,
    code: Option<&'static str>,
    message: Option<String>,
) -> EventResult {
    EventResult {
        index,
        event_id: Some(event.event_id.clone()),
        status,
        code,
        field: None,
        message,
    }
}

/// A leader that did not go in: a duplicate of the stored event holding its key, or a
/// conflict with it (another payload).
pub fn settle_skipped(
    index: usize,
    event: &UsageEvent,
    source: &str,
    existing: &[ExistingKeys],
) -> EventResult {
    let own = |row: &&ExistingKeys| row.source_service == source;
    let holder = event
        .idempotency_key
        .as_ref()
        .and_then(|key| {
            existing
                .iter()
                .filter(own)
                .find(|row| row.idempotency_key.as_ref() == Some(key))
        })
        .map(|row| (row, "idempotency_key_conflict", "idempotencyKey"))
        .or_else(|| {
            existing
                .iter()
                .filter(own)
                .find(|row| row.event_id == event.event_id)
                .map(|row| (row, "event_id_conflict", "eventId"))
        })
        .or_else(|| {
            existing
                .iter()
                .find(|row| {
                    row.correlation_id == event.correlation_id
                        && row.metric == event.metric
                        && row.occurred_at == event.occurred_at
                })
                .map(|row| (row, "correlation_conflict", "correlationId"))
        });
    match holder {
        Some((row, _, _)) if row.payload_hash == event.payload_hash => {
            outcome(index, event, Status::Duplicate, None, None)
        }
        Some((row, code, key)) => outcome(
            index,
            event,
            Status::Conflict,
            Some(code),
            Some(format!(
                "stored event {} has the same {key} with a different payload; nothing was changed",
                row.event_id
            )),
        ),
        // ON CONFLICT waits for a concurrent writer, so the holder is always visible by now.
        None => outcome(
            index,
            event,
            Status::Conflict,
            Some("unresolved_collision"),
            Some("collided with a concurrent write; resend to learn the outcome".into()),
        ),
    }
}

/// The per-event errors of an all-rejected batch, as RFC 9457 `errors`.
pub fn field_errors(results: &[EventResult]) -> Vec<FieldError> {
    results
        .iter()
        .map(|r| {
            let pointer = match &r.field {
                Some(field) => format!("/events/{}/{}", r.index, field),
                None => format!("/events/{}", r.index),
            };
            FieldError::new(
                r.code.unwrap_or("rejected"),
                pointer,
                r.message.clone().unwrap_or_default(),
            )
        })
        .collect()
}
