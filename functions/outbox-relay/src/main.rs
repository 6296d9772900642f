//! Wiring only: telemetry, the clients (once per container), then the runtime loop. Each
//! invocation is one relay run that stops claiming before the invocation's deadline.

use std::sync::Arc;

use lambda_runtime::LambdaEvent;
use meterbridge::relay::deadline_from_epoch_millis;
use meterbridge::telemetry::{init_metrics, init_tracing, LogTarget};
use outbox_relay::App;
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    init_tracing(LogTarget::Stdout);
    let app = Arc::new(App::from_env().await?);
    let metrics = init_metrics(
        &app.services.config.metrics_namespace,
        &app.services.config.service,
    )?;
    metrics_cloudwatch_embedded::lambda::handler::run(metrics, move |event: LambdaEvent<Value>| {
        let app = Arc::clone(&app);
        async move {
            let deadline = deadline_from_epoch_millis(event.context.deadline);
            tracing::debug!(
                deadline_ms = event.context.deadline,
                remaining_ms = deadline
                    .saturating_duration_since(std::time::Instant::now())
                    .as_millis() as u64,
                "relay invoked"
            );
            let report = outbox_relay::handle(&app, event.payload, deadline).await?;
            Ok::<_, lambda_runtime::Error>(serde_json::to_value(report)?)
        }
    })
    .await
}
