//! Wiring only. Inside a Lambda runtime this serves JSON actions; anywhere else it is the CLI:
//! `cargo run -p admin -- tenant create acme`.

use std::process::ExitCode;
use std::sync::Arc;

use admin::cli::Cli;
use clap::Parser;
use lambda_runtime::{service_fn, LambdaEvent};
use meterbridge::telemetry::{init_metrics, init_tracing, LogTarget};
use meterbridge::Services;
use serde_json::Value;

const SERVICE: &str = "admin";

#[tokio::main]
async fn main() -> ExitCode {
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    init_tracing(if in_lambda {
        LogTarget::Stdout
    } else {
        LogTarget::Stderr
    });
    let outcome = if in_lambda {
        run_lambda().await
    } else {
        run_cli().await
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run_lambda() -> Result<(), String> {
    let services = Arc::new(
        Services::from_env(SERVICE)
            .await
            .map_err(|e| e.to_string())?,
    );
    let metrics = init_metrics(&services.config.metrics_namespace, &services.config.service)
        .map_err(|e| e.to_string())?;
    let handler = service_fn(move |event: LambdaEvent<Value>| {
        let services = Arc::clone(&services);
        async move { admin::handle_event(&services.db, event.payload).await }
    });
    metrics_cloudwatch_embedded::lambda::service::run(metrics, handler)
        .await
        .map_err(|e| e.to_string())
}

async fn run_cli() -> Result<(), String> {
    let command = Cli::parse().into_command();
    let services = Services::from_env(SERVICE)
        .await
        .map_err(|e| e.to_string())?;
    let output = admin::execute(&services.db, command)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&output).map_err(|e| e.to_string())?
    );
    Ok(())
}
