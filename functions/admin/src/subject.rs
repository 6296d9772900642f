//! `subject.erase`: a data subject of a tenant erased — validate → find the tenant → steps, each
//! a transaction of its own → the receipt (docs/decisions/0007-subject-erasure.md).

use std::time::{Duration, Instant};

use meterbridge::repo::subject_erasures::{self, Pace, Request, ANOTHER_SUBJECT};
use meterbridge::repo::tenants;
use meterbridge::Database;
use serde_json::{json, Value};

use crate::error::AdminError;
use crate::limits::checked_text;

/// The erasure's share of one invocation (the admin function has 300 s): what is left, the same
/// request run again resumes.
const ERASURE_TIME: Duration = Duration::from_secs(240);

/// What `subject.erase` asks for, as it arrived.
pub struct Asked<'a> {
    pub tenant: &'a str,
    pub actor_id: &'a str,
    pub request_id: &'a str,
    pub reason: &'a str,
    pub requested_by: Option<&'a str>,
}

/// An actor id as ingestion accepts it, matched exactly as stored: not trimmed.
pub(crate) fn checked_actor_id(actor: &str) -> Result<&str, AdminError> {
    if actor.is_empty() || actor.chars().count() > 128 || actor.chars().any(char::is_control) {
        return Err(AdminError::BadRequest(
            "actorId: 1-128 characters without control characters, as the events carry it".into(),
        ));
    }
    Ok(actor)
}

pub async fn erase(db: &Database, asked: &Asked<'_>) -> Result<Value, AdminError> {
    let actor = checked_actor_id(asked.actor_id)?;
    let request = Request {
        tenant: tenants::find_by_slug(db.pool(), asked.tenant)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no tenant with slug {:?}", asked.tenant)))?
            .id,
        request_id: checked_text(asked.request_id, "requestId", 128)?,
        actor_id: actor,
        reason: checked_text(asked.reason, "reason", 500)?,
        requested_by: checked_text(asked.requested_by.unwrap_or("admin"), "requestedBy", 128)?,
    };
    let deadline = Instant::now() + ERASURE_TIME;
    let receipt = subject_erasures::erase(db.pool(), &request, Pace::ADMIN, deadline)
        .await
        .map_err(|e| match e.sqlstate().as_deref() {
            Some(ANOTHER_SUBJECT) => AdminError::Conflict(format!(
                "erasure request {:?} of tenant {:?} is another subject's: use a new requestId",
                request.request_id, asked.tenant
            )),
            _ => AdminError::Database(e),
        })?;
    let finished = receipt.finished_at.is_some();
    Ok(json!({
        "tenant": asked.tenant,
        "erasure": receipt,
        "finished": finished,
        "next": if finished { "nothing: the same request again returns this receipt" }
                else { "run the same request again: it resumes where it stopped" },
    }))
}
