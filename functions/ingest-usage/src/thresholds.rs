//! Usage-limit thresholds crossed by a batch, detected from the counter values the Redis
//! script returned after the commit (no read of its own: a batch of a tenant without limits
//! costs one cache lookup), and recorded with their `usage.threshold.crossed` events in one
//! short transaction. A failure here never fails the batch — its events are stored and
//! counted — and the aggregation's next run records what was missed.

use chrono::{DateTime, Utc};
use meterbridge::auth::Caller;
use meterbridge::domain::period::midnight;
use meterbridge::domain::usage_limit::{LimitPeriod, UsageLimit};
use meterbridge::repo::usage_limits::{self, Crossing, Detector};
use meterbridge::usage_counters::{Counted, Span};
use meterbridge::DbError;

use crate::app::App;

/// The crossings a batch's counter changes make: for each counter that went up and has a limit
/// of its span, the thresholds between its value before and after.
pub fn crossings(tenant: uuid::Uuid, limits: &[UsageLimit], counted: &[Counted]) -> Vec<Crossing> {
    let mut out = Vec::new();
    for c in counted.iter().filter(|c| c.added > 0) {
        let period = match c.cell.span {
            Span::Day => LimitPeriod::Daily,
            Span::Month => LimitPeriod::Monthly,
        };
        let Some(limit) = limits
            .iter()
            .find(|l| l.period == period && l.metric == c.cell.metric)
        else {
            continue;
        };
        let Some(end) = period.period_type().end_of(c.cell.start) else {
            continue;
        };
        for threshold in limit.crossed_between(c.value - c.added, c.value) {
            out.push(Crossing {
                tenant_id: tenant,
                metric: limit.metric.clone(),
                period,
                period_start: midnight(c.cell.start),
                period_end: midnight(end),
                limit: limit.limit,
                threshold,
                usage: c.value,
            });
        }
    }
    out
}

/// Records the crossings of a batch's counter changes, if any; logs and counts a failure.
pub async fn record(app: &App, caller: &Caller, counted: &[Counted], now: DateTime<Utc>) {
    if counted.iter().all(|c| c.added <= 0) {
        return;
    }
    let outcome = async {
        let limits = app.usage_limits(caller.tenant_id).await?;
        let found = crossings(caller.tenant_id.0, &limits, counted);
        if found.is_empty() {
            return Ok::<u64, DbError>(0);
        }
        let mut tx = app.services.db.tenant_tx(caller.tenant_id).await?;
        let written =
            usage_limits::record_crossings(&mut tx, &found, Detector::Ingestion, now).await?;
        tx.commit().await?;
        Ok(written)
    }
    .await;
    match outcome {
        Ok(0) => {}
        Ok(written) => {
            metrics::counter!("UsageThresholdsCrossed").increment(written);
            tracing::info!(crossings = written, "usage limit thresholds crossed");
        }
        Err(e) => {
            metrics::counter!("UsageThresholdFailures").increment(1);
            tracing::warn!(error = %e, "threshold crossings not recorded; the aggregation will");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use meterbridge::usage_counters::Cell;

    #[test]
    fn only_counters_with_a_limit_of_their_span_cross() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let limits = vec![
            UsageLimit::new(
                "api.requests",
                LimitPeriod::Monthly,
                1000,
                Some(vec![50, 80, 100]),
            )
            .unwrap(),
            UsageLimit::new("api.requests", LimitPeriod::Daily, 10, Some(vec![100])).unwrap(),
        ];
        let counted = |cell: Cell, added: i128, value: i128| Counted { cell, added, value };
        let found = crossings(
            uuid::Uuid::nil(),
            &limits,
            &[
                counted(Cell::month(day, "api.requests"), 400, 850),
                counted(Cell::day(day, "api.requests"), 400, 9),
                counted(Cell::month(day, "leads.processed"), 5000, 5000),
                counted(Cell::day(day, "api.requests"), -5, 20),
            ],
        );
        let seen: Vec<(LimitPeriod, u16, String)> = found
            .iter()
            .map(|c| (c.period, c.threshold, c.period_start.to_rfc3339()))
            .collect();
        assert_eq!(
            seen,
            [
                (LimitPeriod::Monthly, 50, "2026-12-01T00:00:00+00:00".into()),
                (LimitPeriod::Monthly, 80, "2026-12-01T00:00:00+00:00".into()),
            ]
        );
        assert_eq!(
            found[0].period_end.to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
        assert_eq!(found[0].usage, 850);
    }
}
