//! Recording usage from an AWS Lambda function.
//!
//! The client is built once per container, before the runtime loop, so its connection pool and
//! queue outlive single invocations. Each invocation records its usage — `record` returns at
//! once — and flushes before returning, within the invocation's deadline: once the handler
//! returns, Lambda may freeze the container, and a frozen container runs no background task.
//! Whatever a flush could not send stays queued and goes out with the next invocation's flush.
//!
//! Environment: `METERBRIDGE_URL` (the API's base URL) and `METERBRIDGE_API_KEY` (better read
//! from Secrets Manager in production).

use std::time::{Duration, SystemTime};

use lambda_runtime::{service_fn, Error, LambdaEvent};
use meterbridge_client::{Client, Event};
use serde_json::{json, Value};

/// Time kept back from the invocation's deadline for returning the response.
const MARGIN: Duration = Duration::from_millis(300);

async fn handler(client: &Client, event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, context) = event.into_parts();
    let user = payload["user"].as_str().unwrap_or("anonymous").to_owned();

    // ... the function's own work ...

    client.record(
        Event::new("api.requests", 1)
            .actor_id(user)
            .correlation_id(context.request_id.clone()),
    );

    // Send before returning, but never past the invocation's deadline.
    let left = context
        .deadline()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(MARGIN);
    if let Err(e) = client.flush(left.min(Duration::from_secs(2))).await {
        // Still queued: the next invocation's flush sends it.
        tracing::warn!(error = %e, "usage not sent yet");
    }
    Ok(json!({"ok": true}))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let client = Client::builder(
        std::env::var("METERBRIDGE_URL")?,
        std::env::var("METERBRIDGE_API_KEY")?,
    )
    // A container handles one invocation at a time: small batches, sent at the flush.
    .max_batch(100)
    .on_outcome(|outcome| {
        if !outcome.status.is_stored() {
            tracing::warn!(
                event_id = %outcome.event_id,
                status = %outcome.status,
                code = outcome.code.as_deref().unwrap_or_default(),
                "usage event not stored"
            );
        }
    })
    .build()?;
    lambda_runtime::run(service_fn(|event| handler(&client, event))).await
}
