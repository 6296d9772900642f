//! Logs and metrics. Logs are JSON lines (CloudWatch Logs Insights queries them by field); each
//! request runs in a span carrying its request, tenant and correlation ids. Metrics use the
//! CloudWatch Embedded Metric Format through `metrics_cloudwatch_embedded`, flushed after every
//! invocation by its Lambda layer.

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,aws_config=warn,sqlx=warn";

/// Crates whose verbose levels log what must never reach the logs: `lambda_runtime` and
/// `lambda_http` log raw invocation events (with their `Authorization` headers) at TRACE, the
/// HTTP and AWS SDK stacks log request and response bodies (Secrets Manager's hold passwords).
/// Their levels are fixed here, whatever `RUST_LOG` says.
const PINNED: &[(&str, &str)] = &[
    ("lambda_runtime", "info"),
    ("lambda_runtime_api_client", "info"),
    ("lambda_http", "info"),
    ("hyper", "info"),
    ("hyper_util", "info"),
    ("h2", "info"),
    ("reqwest", "info"),
    ("aws_smithy_runtime", "info"),
    ("aws_smithy_runtime_api", "info"),
    ("aws_smithy_http", "info"),
    ("aws_smithy_http_client", "info"),
    ("aws_sdk_secretsmanager", "info"),
    ("aws_sdk_eventbridge", "info"),
    // Debug builds log every cache hit at INFO.
    ("aws_secretsmanager_caching", "warn"),
];

/// The log filter: `RUST_LOG` (or the default) for everything but the [`PINNED`] crates, which
/// log at their pinned level or quieter: a directive that names a pinned crate is kept only when
/// it asks for `info` or less, and one that names a module inside a pinned crate is dropped.
pub fn log_filter(rust_log: Option<&str>) -> EnvFilter {
    let pinned_crate = |directive: &str| -> Option<(&'static str, bool)> {
        let (target, level) = directive.split_once('=').unwrap_or((directive, ""));
        let target = target.split('[').next().unwrap_or_default().trim();
        PINNED.iter().find_map(|(krate, _)| {
            if target == *krate {
                let quiet = matches!(
                    level.trim().to_ascii_lowercase().as_str(),
                    "off" | "error" | "warn" | "info"
                );
                Some((*krate, quiet && !directive.contains('[')))
            } else if target
                .strip_prefix(krate)
                .is_some_and(|rest| rest.starts_with("::"))
            {
                Some((*krate, false))
            } else {
                None
            }
        })
    };
    let mut quieted = Vec::new();
    let wanted: Vec<&str> = rust_log
        .unwrap_or(DEFAULT_FILTER)
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| match pinned_crate(d) {
            None => true,
            Some((krate, quiet)) => {
                if quiet {
                    quieted.push(krate);
                }
                quiet
            }
        })
        .collect();
    let mut filter =
        EnvFilter::try_new(wanted.join(",")).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    for (krate, level) in PINNED.iter().filter(|(k, _)| !quieted.contains(k)) {
        if let Ok(directive) = format!("{krate}={level}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Where log lines go: stdout inside Lambda, stderr for command-line tools (whose stdout is
/// their output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// Installs the JSON log subscriber; a second call is a no-op. `RUST_LOG` sets the levels,
/// except those [`log_filter`] pins.
pub fn init_tracing(target: LogTarget) {
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let _ = match target {
        LogTarget::Stdout => json_logs(filter, std::io::stdout).try_init(),
        LogTarget::Stderr => json_logs(filter, std::io::stderr).try_init(),
    };
}

/// The JSON log lines' format, written to `writer` (tests capture what the functions log with
/// it).
pub fn json_logs<W>(
    filter: EnvFilter,
    writer: W,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::JsonFields,
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    EnvFilter,
    W,
>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_target(false)
        .with_current_span(true)
        .with_span_list(false)
        .flatten_event(true)
        .with_writer(writer)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged_with(rust_log: &str) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(log_filter(Some(rust_log)))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "lambda_runtime::layers::api_response", body = "Authorization: Bearer mbk_secret", "raw JSON event received from Lambda");
            tracing::debug!(target: "aws_smithy_runtime::client::http", body = "{\"password\":\"hunter2\"}", "read response body");
            tracing::trace!(target: "lambda_http", "request headers: mbk_secret");
            tracing::trace!(target: "ingest_usage::ingest", "own trace line");
            tracing::info!(target: "lambda_runtime", "runtime started");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn rust_log_cannot_open_the_runtime_and_sdk_logs() {
        for rust_log in [
            "trace",
            "trace,lambda_runtime=trace",
            "lambda_runtime::layers=trace,aws_smithy_runtime=trace,lambda_http=trace,ingest_usage=trace",
            "lambda_runtime[span]=trace,trace",
        ] {
            let logged = logged_with(rust_log);
            assert!(!logged.contains("mbk_secret"), "{rust_log}: {logged}");
            assert!(!logged.contains("hunter2"), "{rust_log}: {logged}");
            assert!(logged.contains("runtime started"), "{rust_log}: {logged}");
            assert!(logged.contains("own trace line"), "{rust_log}: {logged}");
        }
        let quiet = logged_with("warn");
        assert!(!quiet.contains("own trace line"));
        assert!(
            quiet.contains("runtime started"),
            "pinned crates keep their level"
        );
        assert!(!logged_with("warn,lambda_runtime=warn").contains("runtime started"));
        assert!(logged_with("not a [ filter").contains("runtime started"));
    }
}

/// Lets a log line through at most once per period, counting the ones it held back: for what
/// anyone on the internet can trigger (an unsigned webhook), where a line per request would let
/// them fill the logs and the bill. The metric counts every one.
pub struct SampledLog {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl SampledLog {
    pub const fn every(period: std::time::Duration) -> Self {
        SampledLog {
            every: period,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last line)` when a line may be written now.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                let held_back = state.1;
                *state = (Some(now), 0);
                Some(held_back)
            }
        }
    }
}

#[cfg(test)]
mod sampled_log_tests {
    use super::SampledLog;

    #[test]
    fn one_line_per_period_and_the_rest_counted() {
        let log = SampledLog::every(std::time::Duration::from_secs(3600));
        assert_eq!(log.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(log.admit(), None);
        }
        let now = SampledLog::every(std::time::Duration::ZERO);
        assert_eq!(now.admit(), Some(0));
        assert_eq!(now.admit(), Some(0));
    }
}
