//! Logs and metrics. Logs are JSON lines (CloudWatch Logs Insights queries them by field); each
//! request runs in a span carrying its request, tenant and correlation ids. Metrics use the
//! CloudWatch Embedded Metric Format through `metrics_cloudwatch_embedded`, flushed after every
//! invocation by its Lambda layer.

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,aws_secretsmanager_caching=warn,aws_config=warn,sqlx=warn";

/// Where log lines go: stdout inside Lambda, stderr for command-line tools (whose stdout is
/// their output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Installs the JSON log subscriber; a second call is a no-op. `RUST_LOG` overrides the level.
pub fn init_tracing(target: LogTarget) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true);
    let _ = match target {
        LogTarget::Stdout => builder.try_init(),
        LogTarget::Stderr => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The EMF collector for this process, with the function as its dimension.
pub fn init_metrics(
    namespace: &str,
    function: &str,
) -> Result<&'static metrics_cloudwatch_embedded::Collector, metrics_cloudwatch_embedded::Error> {
    metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace(namespace.to_owned())
        .with_dimension("Function", function.to_owned())
        .lambda_cold_start_metric("ColdStart")
        .with_lambda_request_id("RequestId")
        .init()
}
