//! Wiring only: telemetry, the clients (once per container), then the runtime loop.

use std::sync::Arc;

use meterbridge::telemetry::{init_metrics, init_tracing, LogTarget};
use verify_payment::App;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    init_tracing(LogTarget::Stdout);
    let app = Arc::new(App::from_env().await?);
    let metrics = init_metrics(
        &app.services.config.metrics_namespace,
        &app.services.config.service,
    )?;
    meterbridge::edge::serve(app, metrics).await
}
