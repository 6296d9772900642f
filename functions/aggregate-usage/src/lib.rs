//! `aggregate-usage`: rolls `usage_events` up into `usage_aggregates` and repairs the Redis
//! counters (see [`meterbridge::aggregation`]). Connected as `meterbridge_ops`. Payloads:
//!
//! - `{"job": "aggregate"}` (the schedule's input; an empty payload means the same): an
//!   incremental run;
//! - `{"job": "backfill", "from": "2026-11-01", "to": "2026-11-07", "tenant": "acme",
//!   "periods": ["daily"]}`: recompute that range (days inclusive; tenant and periods optional);
//! - `{"job": "status"}`: per tenant, the last aggregation, the backlog and the oldest
//!   unaggregated work.

use std::time::Instant;

use chrono::NaiveDate;
use meterbridge::aggregation::{AggregationConfig, AggregationError, Aggregator, Backfill};
use meterbridge::config::Env;
use meterbridge::domain::period::PeriodType;
use meterbridge::{Services, StartupError};
use serde::Deserialize;
use serde_json::Value;

pub struct App {
    pub services: Services,
    pub config: AggregationConfig,
}

impl App {
    pub async fn from_env() -> Result<Self, StartupError> {
        let config = AggregationConfig::from_env(&Env::process())?;
        let services = Services::from_env("aggregate-usage").await?;
        Ok(Self::new(services, config))
    }

    pub fn new(services: Services, config: AggregationConfig) -> Self {
        App { services, config }
    }

    pub fn aggregator(&self) -> Aggregator<'_> {
        Aggregator::new(&self.services.db, self.services.redis.as_ref(), self.config)
    }
}

/// An invocation payload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "job", rename_all = "lowercase", deny_unknown_fields)]
pub enum Job {
    Aggregate,
    Backfill {
        from: NaiveDate,
        to: NaiveDate,
        #[serde(default)]
        tenant: Option<String>,
        #[serde(default)]
        periods: Option<Vec<PeriodType>>,
    },
    Status,
}

impl Job {
    pub fn parse(payload: Value) -> Result<Job, InvocationError> {
        match payload {
            Value::Null => Ok(Job::Aggregate),
            Value::Object(ref o) if o.is_empty() => Ok(Job::Aggregate),
            other => {
                let fields = other.as_object().map_or(0, |o| o.len());
                let job: Job = serde_json::from_value(other).map_err(|e| {
                    InvocationError::BadPayload(format!(
                        "{e}; expected {{\"job\": \"aggregate\" | \"backfill\" | \"status\"}}"
                    ))
                })?;
                // A unit job takes no other field (serde ignores them for unit variants).
                if matches!(job, Job::Aggregate | Job::Status) && fields > 1 {
                    return Err(InvocationError::BadPayload(
                        "this job takes no field but \"job\"".into(),
                    ));
                }
                Ok(job)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    #[error("bad payload: {0}")]
    BadPayload(String),
    #[error(transparent)]
    Aggregation(#[from] AggregationError),
}

impl From<InvocationError> for lambda_runtime::Diagnostic {
    fn from(e: InvocationError) -> Self {
        let error_type = match &e {
            InvocationError::BadPayload(_)
            | InvocationError::Aggregation(AggregationError::BadRequest(_)) => "BadPayload",
            InvocationError::Aggregation(AggregationError::Database(
                meterbridge::DbError::Unavailable(_),
            )) => "DatabaseUnavailable",
            InvocationError::Aggregation(_) => "AggregationFailed",
        };
        lambda_runtime::Diagnostic {
            error_type: error_type.to_owned(),
            error_message: e.to_string(),
        }
    }
}

/// One invocation: the job the payload names, stopping before `deadline`.
pub async fn handle(
    app: &App,
    payload: Value,
    deadline: Instant,
) -> Result<Value, InvocationError> {
    let now = app.services.clock.now();
    let answer = match Job::parse(payload)? {
        Job::Aggregate => {
            let report = app.aggregator().aggregate(now, deadline).await?;
            log_run("aggregate", &report);
            serde_json::to_value(report)
        }
        Job::Backfill {
            from,
            to,
            tenant,
            periods,
        } => {
            let request = Backfill::of(from, to, tenant, periods);
            let report = app.aggregator().backfill(&request, now, deadline).await?;
            log_run("backfill", &report);
            serde_json::to_value(report)
        }
        Job::Status => serde_json::to_value(app.aggregator().status(now).await?),
    };
    answer.map_err(|e| InvocationError::BadPayload(e.to_string()))
}

fn log_run(job: &str, report: &meterbridge::aggregation::RunReport) {
    tracing::info!(
        job,
        outcome = %report.outcome,
        chunks = report.collected.chunks,
        changes = report.collected.changes,
        cells_changed = report.collected.cells_changed,
        cells_queued = report.collected.cells_queued,
        examined = report.cells_examined,
        written = report.cells_written,
        unchanged = report.cells_unchanged,
        finalized = report.finalized,
        revisions = report.revisions,
        queued_after = report.queued_after,
        drift_found = report.counters.as_ref().map(|c| c.drift_found),
        repaired = report.counters.as_ref().map(|c| c.repaired),
        duration_ms = report.duration_ms,
        "aggregation run"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads() {
        assert_eq!(Job::parse(Value::Null).unwrap(), Job::Aggregate);
        assert_eq!(Job::parse(json!({})).unwrap(), Job::Aggregate);
        assert_eq!(
            Job::parse(json!({"job": "aggregate"})).unwrap(),
            Job::Aggregate
        );
        assert_eq!(Job::parse(json!({"job": "status"})).unwrap(), Job::Status);
        assert_eq!(
            Job::parse(
                json!({"job": "backfill", "from": "2026-11-01", "to": "2026-11-07",
                              "tenant": "acme", "periods": ["daily", "monthly"]})
            )
            .unwrap(),
            Job::Backfill {
                from: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
                to: NaiveDate::from_ymd_opt(2026, 11, 7).unwrap(),
                tenant: Some("acme".into()),
                periods: Some(vec![PeriodType::Daily, PeriodType::Monthly]),
            }
        );
        for bad in [
            json!({"job": "relay"}),
            json!({"job": "aggregate", "extra": 1}),
            json!({"job": "backfill", "from": "2026-13-01", "to": "2026-11-07"}),
            json!({"job": "backfill", "from": "2026-11-01"}),
            json!({"job": "backfill", "from": "2026-11-01", "to": "2026-11-02", "periods": ["hourly"]}),
            json!([1]),
        ] {
            assert!(Job::parse(bad.clone()).is_err(), "{bad}");
        }
    }
}
