//! What became of each recorded event, as the callback sees it.

use crate::event::Event;

/// The fate of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Stored by this request.
    Accepted,
    /// Already stored (by an earlier request, or earlier in the batch) with the same payload:
    /// nothing new was stored. A retry of a request whose answer was lost ends here.
    Duplicate,
    /// Shares a key (its id, idempotency key, or correlation id + metric + time) with a stored
    /// event whose payload differs: not stored, never retried. `code` says which key.
    Conflict,
    /// Refused: the event breaks a rule (`code` and `field` say which), or the whole request
    /// was refused (`401`, `403`, `400`…: `code` is the problem's). Not stored, never retried.
    Rejected,
    /// Given up unsent: the client was shut down (or dropped) before the server confirmed it,
    /// or its batch ran out of [`RetryPolicy::max_attempts`](crate::RetryPolicy). The server
    /// may or may not have stored it: recording it again (same id) is safe.
    Abandoned,
}

impl Status {
    /// `true` when the event is stored (now or before): accepted or duplicate.
    pub fn is_stored(self) -> bool {
        matches!(self, Status::Accepted | Status::Duplicate)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Duplicate => "duplicate",
            Status::Conflict => "conflict",
            Status::Rejected => "rejected",
            Status::Abandoned => "abandoned",
        }
    }

    pub(crate) fn parse(status: &str) -> Option<Status> {
        Some(match status {
            "accepted" => Status::Accepted,
            "duplicate" => Status::Duplicate,
            "conflict" => Status::Conflict,
            "rejected" => Status::Rejected,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event's outcome, passed to the [`on_outcome`](crate::ClientBuilder::on_outcome) callback.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outcome {
    /// The id the event was sent with.
    pub event_id: String,
    /// The event as it was sent (with its assigned id and time).
    pub event: Event,
    pub status: Status,
    /// For a rejection, conflict or abandonment: why (`unknown_metric`, `event_id_conflict`,
    /// `unauthorized`, `shutdown`, `retries_exhausted`…).
    pub code: Option<String>,
    /// For a rejection: the offending field (camelCase), when one is at fault.
    pub field: Option<String>,
    /// Human-readable detail.
    pub message: Option<String>,
}

impl Outcome {
    pub(crate) fn new(event: Event, status: Status) -> Self {
        Outcome {
            event_id: event.id().unwrap_or_default(),
            event,
            status,
            code: None,
            field: None,
            message: None,
        }
    }

    pub(crate) fn because(
        mut self,
        code: Option<String>,
        field: Option<String>,
        message: Option<String>,
    ) -> Self {
        self.code = code;
        self.field = field;
        self.message = message;
        self
    }
}
