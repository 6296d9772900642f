//! Wiring only: telemetry, the clients (once per container), then the runtime loop. Each
//! invocation is one job that stops taking work before the invocation's deadline.

use std::sync::Arc;

use aggregate_usage::App;
use lambda_runtime::LambdaEvent;
use meterbridge::relay::deadline_from_epoch_millis;
use meterbridge::telemetry::{init_metrics, init_tracing, LogTarget};
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
            let answer = aggregate_usage::handle(&app, event.payload, deadline).await?;
            Ok::<_, lambda_runtime::Error>(answer)
        }
    })
    .await
}
