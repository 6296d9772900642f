//! `outbox-relay`: on a schedule, publishes the outbox to EventBridge (see
//! [`meterbridge::relay`]). Connected as `meterbridge_ops`. The invocation payload is the
//! schedule's input, `{"job": "relay"}` (an empty object means the same).

use std::time::Instant;

use meterbridge::config::Env;
use meterbridge::relay::{Relay, RelayConfig, RelayError, RunReport};
use meterbridge::{Services, StartupError};
use serde::Deserialize;
use serde_json::Value;

pub struct App {
    pub services: Services,
    pub relay: Relay,
}

impl App {
    pub async fn from_env() -> Result<Self, StartupError> {
        let config = RelayConfig::from(&Env::process())?;
        let services = Services::from_env("outbox-relay").await?;
        Ok(Self::new(services, config).await)
    }

    pub async fn new(services: Services, config: RelayConfig) -> Self {
        let events = Relay::eventbridge_client(services.aws().await, call_timeout());
        let relay = Relay::new(services.db.clone(), events, config);
        App { services, relay }
    }
}

/// How long one PutEvents call may take: short of the lease by far.
fn call_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(default)]
    job: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    #[error("bad payload: {0}")]
    BadPayload(String),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl From<InvocationError> for lambda_runtime::Diagnostic {
    fn from(e: InvocationError) -> Self {
        let error_type = match &e {
            InvocationError::BadPayload(_) => "BadPayload",
            InvocationError::Relay(RelayError::Database(meterbridge::DbError::Unavailable(_))) => {
                "DatabaseUnavailable"
            }
            InvocationError::Relay(_) => "RelayFailed",
        };
        lambda_runtime::Diagnostic {
            error_type: error_type.to_owned(),
            error_message: e.to_string(),
        }
    }
}

/// One invocation: a relay run that stops claiming before `deadline`.
pub async fn handle(
    app: &App,
    payload: Value,
    deadline: Instant,
) -> Result<RunReport, InvocationError> {
    let payload: Payload = match payload {
        Value::Null => Payload::default(),
        other => {
            serde_json::from_value(other).map_err(|e| InvocationError::BadPayload(e.to_string()))?
        }
    };
    match payload.job.as_deref() {
        None | Some("relay") => {}
        Some(other) => {
            return Err(InvocationError::BadPayload(format!(
                "unknown job {other:?}; this function runs \"relay\""
            )))
        }
    }
    let report = app.relay.run(deadline).await?;
    report.emit_metrics();
    tracing::info!(
        claimed = report.claimed,
        published = report.published,
        dead = report.dead,
        pending = report.pending,
        oldest_pending_age_seconds = report.oldest_pending_age_seconds,
        "relay run"
    );
    Ok(report)
}
