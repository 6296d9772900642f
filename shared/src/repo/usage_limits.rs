//! usage_limits and usage_threshold_crossings (migration 0026): a tenant's limits (set and
//! removed by the admin function, audited), the crossings of their thresholds and the
//! `usage.threshold.crossed` events they write.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::usage_limit::{LimitPeriod, UsageLimit};
use crate::domain::TenantId;
use crate::repo::usage_settings::{self, Change};

fn decode(
    metric: String,
    period: &str,
    limit: i64,
    thresholds: Vec<i16>,
) -> Result<UsageLimit, DbError> {
    Ok(UsageLimit {
        metric,
        period: LimitPeriod::parse(period).map_err(|e| DbError::Decode(e.to_string()))?,
        limit,
        thresholds: thresholds
            .into_iter()
            .map(|t| u16::try_from(t).map_err(|_| DbError::Decode(format!("threshold {t}"))))
            .collect::<Result<_, _>>()?,
    })
}

/// The tenant's limits, by metric then period (run in the tenant's transaction for the API
/// role; the owner and the operations role see every tenant's, so name it).
pub async fn list(conn: &mut PgConnection, tenant: TenantId) -> Result<Vec<UsageLimit>, DbError> {
    sqlx::query!(
        r#"SELECT metric, period_type, limit_quantity, thresholds AS "thresholds!: Vec<i16>"
             FROM usage_limits WHERE tenant_id = $1 ORDER BY metric, period_type"#,
        tenant.0
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| decode(r.metric, &r.period_type, r.limit_quantity, r.thresholds))
    .collect()
}

fn as_json(limit: &UsageLimit) -> serde_json::Value {
    serde_json::json!({
        "metric": limit.metric, "period": limit.period, "limit": limit.limit,
        "thresholds": limit.thresholds,
    })
}

async fn current(
    conn: &mut PgConnection,
    tenant: TenantId,
    metric: &str,
    period: LimitPeriod,
) -> Result<Option<UsageLimit>, DbError> {
    Ok(list(conn, tenant)
        .await?
        .into_iter()
        .find(|l| l.metric == metric && l.period == period))
}

/// Sets (or replaces) a limit, audited as `usage.limits`. Returns the limit it replaced. The
/// metric must be in the catalog (a foreign key).
pub async fn set(
    conn: &mut PgConnection,
    change: &Change<'_>,
    limit: &UsageLimit,
) -> Result<Option<UsageLimit>, DbError> {
    let before = current(conn, change.tenant, &limit.metric, limit.period).await?;
    let thresholds: Vec<i16> = limit.thresholds.iter().map(|t| *t as i16).collect();
    sqlx::query!(
        "INSERT INTO usage_limits (tenant_id, metric, period_type, limit_quantity, thresholds)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, metric, period_type) DO UPDATE
            SET limit_quantity = EXCLUDED.limit_quantity, thresholds = EXCLUDED.thresholds,
                updated_at = now()",
        change.tenant.0,
        limit.metric,
        limit.period.as_str(),
        limit.limit,
        &thresholds
    )
    .execute(&mut *conn)
    .await?;
    usage_settings::audit(
        conn,
        change,
        "usage.limits",
        before.as_ref().map(as_json),
        Some(as_json(limit)),
    )
    .await?;
    Ok(before)
}

/// Removes a limit, audited. Returns it, or `None` when there was none.
pub async fn remove(
    conn: &mut PgConnection,
    change: &Change<'_>,
    metric: &str,
    period: LimitPeriod,
) -> Result<Option<UsageLimit>, DbError> {
    let Some(before) = current(conn, change.tenant, metric, period).await? else {
        return Ok(None);
    };
    sqlx::query!(
        "DELETE FROM usage_limits WHERE tenant_id = $1 AND metric = $2 AND period_type = $3",
        change.tenant.0,
        metric,
        period.as_str()
    )
    .execute(&mut *conn)
    .await?;
    usage_settings::audit(conn, change, "usage.limits", Some(as_json(&before)), None).await?;
    Ok(Some(before))
}

/// Who saw a crossing first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    /// Ingestion, from the counter values its Redis script returned.
    Ingestion,
    /// The aggregation, from the rollups (ingestion missed it: Redis down, or a crash between
    /// the commit and the count).
    Aggregation,
}

impl Detector {
    fn as_str(self) -> &'static str {
        match self {
            Detector::Ingestion => "ingestion",
            Detector::Aggregation => "aggregation",
        }
    }

    fn service(self) -> &'static str {
        match self {
            Detector::Ingestion => "ingest-usage",
            Detector::Aggregation => "aggregate-usage",
        }
    }
}

/// A threshold of a limit crossed in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub tenant_id: Uuid,
    pub metric: String,
    pub period: LimitPeriod,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub limit: i64,
    pub threshold: u16,
    /// The usage seen when it was detected.
    pub usage: i128,
}

/// Records crossings and writes one `usage.threshold.crossed` event for each that was not
/// recorded before, in one statement: the crossing's key (tenant, metric, period, limit,
/// threshold) makes each happen once, whoever detects it first and however often. Returns how
/// many were new.
pub async fn record_crossings(
    conn: &mut PgConnection,
    crossings: &[Crossing],
    detector: Detector,
    at: DateTime<Utc>,
) -> Result<u64, DbError> {
    if crossings.is_empty() {
        return Ok(0);
    }
    let tenants: Vec<Uuid> = crossings.iter().map(|c| c.tenant_id).collect();
    let metrics: Vec<&str> = crossings.iter().map(|c| c.metric.as_str()).collect();
    let periods: Vec<&str> = crossings.iter().map(|c| c.period.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = crossings.iter().map(|c| c.period_start).collect();
    let ends: Vec<DateTime<Utc>> = crossings.iter().map(|c| c.period_end).collect();
    let limits: Vec<i64> = crossings.iter().map(|c| c.limit).collect();
    let thresholds: Vec<i16> = crossings.iter().map(|c| c.threshold as i16).collect();
    let usages: Vec<String> = crossings.iter().map(|c| c.usage.to_string()).collect();
    let written = sqlx::query_scalar!(
        r#"WITH c AS (
               SELECT c.*, md5(c.tenant_id::text || '/' || c.period_type || '/'
                               || to_char(c.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '/'
                               || c.metric || '/' || c.limit_quantity)::uuid AS aggregate_id
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[],
                             $5::timestamptz[], $6::int8[], $7::int2[], $8::text[])
                      AS c(tenant_id, metric, period_type, period_start, period_end,
                           limit_quantity, threshold, usage_quantity)
           ), crossed AS (
               INSERT INTO usage_threshold_crossings AS x
                      (tenant_id, metric, period_type, period_start, limit_quantity, threshold,
                       usage_quantity, detected_by, crossed_at)
               SELECT tenant_id, metric, period_type, period_start, limit_quantity, threshold,
                      usage_quantity::numeric, $9, $10
                 FROM c
               ON CONFLICT DO NOTHING
               RETURNING x.tenant_id, x.metric, x.period_type, x.period_start, x.limit_quantity,
                         x.threshold
           ), events AS (
               SELECT c.*, gen_random_uuid() AS event_id,
                      'usage-threshold-' || c.aggregate_id || '-' || c.threshold AS key
                 FROM c JOIN crossed x USING (tenant_id, metric, period_type, period_start,
                                              limit_quantity, threshold)
           ), published AS (
               INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version,
                                          payload, correlation_id, idempotency_key,
                                          aggregate_type, aggregate_id, aggregate_sequence,
                                          source_service, created_at)
               SELECT e.tenant_id, e.event_id, 'usage.threshold.crossed', 1,
                      jsonb_build_object(
                          'eventId', e.event_id,
                          'eventType', 'usage.threshold.crossed',
                          'schemaVersion', 1,
                          'tenantId', e.tenant_id,
                          'occurredAt', to_char($10::timestamptz AT TIME ZONE 'UTC',
                                                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                          'correlationId', e.key,
                          'idempotencyKey', e.key,
                          'aggregateType', 'usage_threshold',
                          'aggregateId', e.aggregate_id,
                          'aggregateSequence', e.threshold,
                          'sourceService', $11::text,
                          'data', jsonb_build_object(
                              'metric', e.metric,
                              'periodType', e.period_type,
                              'periodStart', to_char(e.period_start AT TIME ZONE 'UTC',
                                                     'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                              'periodEnd', to_char(e.period_end AT TIME ZONE 'UTC',
                                                   'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                              'limit', e.limit_quantity::text,
                              'threshold', e.threshold,
                              'thresholdQuantity',
                                  ceil(e.limit_quantity::numeric * e.threshold / 100)::text,
                              'usage', e.usage_quantity,
                              'detectedBy', $9::text)),
                      e.key, e.key, 'usage_threshold', e.aggregate_id, e.threshold, $11, $10
                 FROM events e
               ON CONFLICT DO NOTHING
               RETURNING 1
           )
           SELECT count(*) AS "written!" FROM published"#,
        &tenants,
        &metrics as &[&str],
        &periods as &[&str],
        &starts,
        &ends,
        &limits,
        &thresholds,
        &usages,
        detector.as_str(),
        at,
        detector.service()
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(written as u64)
}

/// The thresholds the rollups show reached, in the period that holds `now` or the one before,
/// that have no crossing recorded: what ingestion missed. One statement over every tenant's
/// limits (bounded by their number), as the aggregation's role.
pub async fn missed_crossings(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<Vec<Crossing>, DbError> {
    let mut windows: Vec<(&str, DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for period in LimitPeriod::ALL {
        let (start, end) = period.window(now);
        let (before, _) = period.previous_window(now);
        windows.push((period.as_str(), start, end));
        windows.push((period.as_str(), before, start));
    }
    let types: Vec<&str> = windows.iter().map(|w| w.0).collect();
    let starts: Vec<DateTime<Utc>> = windows.iter().map(|w| w.1).collect();
    let ends: Vec<DateTime<Utc>> = windows.iter().map(|w| w.2).collect();
    let rows = sqlx::query!(
        r#"SELECT l.tenant_id, l.metric, l.period_type, w.period_start AS "period_start!",
                  w.period_end AS "period_end!", l.limit_quantity, t.threshold AS "threshold!",
                  a.total_quantity::text AS "usage!"
             FROM UNNEST($1::text[], $2::timestamptz[], $3::timestamptz[])
                  AS w(period_type, period_start, period_end)
             JOIN usage_limits l ON l.period_type = w.period_type
             JOIN usage_aggregates a
               ON a.tenant_id = l.tenant_id AND a.period_type = l.period_type
              AND a.period_start = w.period_start AND a.metric = l.metric
            CROSS JOIN LATERAL UNNEST(l.thresholds) AS t(threshold)
            WHERE a.total_quantity >= ceil(l.limit_quantity::numeric * t.threshold / 100)
              AND NOT EXISTS (
                  SELECT 1 FROM usage_threshold_crossings x
                   WHERE x.tenant_id = l.tenant_id AND x.metric = l.metric
                     AND x.period_type = l.period_type AND x.period_start = w.period_start
                     AND x.limit_quantity = l.limit_quantity AND x.threshold = t.threshold)"#,
        &types as &[&str],
        &starts,
        &ends
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Crossing {
                tenant_id: r.tenant_id,
                metric: r.metric,
                period: LimitPeriod::parse(&r.period_type)
                    .map_err(|e| DbError::Decode(e.to_string()))?,
                period_start: r.period_start,
                period_end: r.period_end,
                limit: r.limit_quantity,
                threshold: u16::try_from(r.threshold)
                    .map_err(|_| DbError::Decode(format!("threshold {}", r.threshold)))?,
                usage: r
                    .usage
                    .parse()
                    .map_err(|_| DbError::Decode(format!("usage {:?}", r.usage)))?,
            })
        })
        .collect()
}
