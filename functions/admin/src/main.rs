//! Wiring only. Inside a Lambda runtime this serves JSON actions; anywhere else it is the CLI:
//! `cargo run -p admin -- tenant create acme`.

use std::process::ExitCode;
use std::sync::Arc;

use std::time::Duration;

use admin::cli::Cli;
use admin::export::{Destination, ExportStore};
use admin::offboard::{WebhookSecrets, DEFAULT_GRACE_DAYS};
use admin::Admin;
use admin::Command;
use clap::Parser;
use lambda_runtime::{service_fn, LambdaEvent};
use meterbridge::aggregation::AggregationConfig;
use meterbridge::config::webhook_secret_prefix;
use meterbridge::config::Env;
use meterbridge::relay::{Relay, RelayConfig};
use meterbridge::repo::usage_storage::StoragePolicy;
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
    // Boxed: the futures are large (the whole admin surface), and boxing keeps main's small.
    let outcome = if in_lambda {
        Box::pin(run_lambda()).await
    } else {
        Box::pin(run_cli()).await
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The database, and the outbox relay when an event bus is configured (`EVENT_BUS_NAME`).
async fn admin_from_env() -> Result<(Services, Admin), String> {
    let mut services = Services::from_env(SERVICE)
        .await
        .map_err(|e| e.to_string())?;
    let env = Env::process();
    let relay = match env.optional("EVENT_BUS_NAME") {
        None => None,
        Some(_) => {
            let config = RelayConfig::from(&env).map_err(|e| e.to_string())?;
            let events = Relay::eventbridge_client(services.aws().await, Duration::from_secs(10));
            Some(Relay::new(services.db.clone(), events, config))
        }
    };
    let admin = Admin {
        db: services.db.clone(),
        clock: services.clock.clone(),
        relay,
        storage: StoragePolicy::from_env(&env).map_err(|e| e.to_string())?,
        aggregation: AggregationConfig::from_env(&env).map_err(|e| e.to_string())?,
        exports: ExportStore::from_env(&env, services.aws().await).map_err(|e| e.to_string())?,
        redis: services.redis.take(),
        webhook_secrets: Some(WebhookSecrets {
            client: aws_sdk_secretsmanager::Client::new(services.aws().await),
            prefix: webhook_secret_prefix(&env).map_err(|e| e.to_string())?,
        }),
        tenant_erase_grace: chrono::Duration::days(
            env.bounded_or("TENANT_ERASE_GRACE_DAYS", DEFAULT_GRACE_DAYS, 1..=3650)
                .map_err(|e| e.to_string())? as i64,
        ),
    };
    Ok((services, admin))
}

async fn run_lambda() -> Result<(), String> {
    let (services, admin) = admin_from_env().await?;
    let admin = Arc::new(admin);
    let metrics = init_metrics(&services.config.metrics_namespace, &services.config.service)
        .map_err(|e| e.to_string())?;
    let handler = service_fn(move |event: LambdaEvent<Value>| {
        let admin = Arc::clone(&admin);
        async move { admin::handle_event(&admin, event.payload).await }
    });
    metrics_cloudwatch_embedded::lambda::service::run(metrics, handler)
        .await
        .map_err(|e| e.to_string())
}

async fn run_cli() -> Result<(), String> {
    let command = Cli::parse().into_command();
    // An export to standard output owns it: the manifest goes to standard error.
    let stdout_taken = matches!(
        command,
        Command::SubjectExport {
            to: Destination::Stdout,
            ..
        }
    );
    let (_services, admin) = admin_from_env().await?;
    let output = admin::execute(&admin, command)
        .await
        .map_err(|e| e.to_string())?;
    let output = serde_json::to_string_pretty(&output).map_err(|e| e.to_string())?;
    if stdout_taken {
        eprintln!("{output}");
    } else {
        println!("{output}");
    }
    Ok(())
}
