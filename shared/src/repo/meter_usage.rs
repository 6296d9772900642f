//! A meter's usage over a time range (`GET /api/v1/meters/{slug}/query`): the sum of the
//! quantities of the meter's events — of its metric, stored from CloudEvents of its type, not
//! voided — per window, subject and groupBy values.
//!
//! One index range, `(tenant, metric, occurred_at)` of `usage_events_tenant_metric_time_idx`,
//! read at most `max_scanned` rows deep: a range holding more events of the metric than that is
//! refused (narrow it) rather than read, whatever the tenant stores. Run it in the tenant's
//! read transaction ([`crate::Database::tenant_read_tx`]).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use crate::db::DbError;
use crate::domain::meter::MAX_GROUP_BY;
use crate::domain::meter_query::WindowSize;
use crate::domain::TenantId;

#[derive(Debug, Clone)]
pub struct MeterUsageQuery<'a> {
    /// The meter's CloudEvents `type` and its metric.
    pub event_type: &'a str,
    pub metric: &'a str,
    /// `[from, to)`.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub window: Option<WindowSize>,
    /// Only these subjects (actors), when given.
    pub subjects: Option<&'a [String]>,
    /// One row per subject.
    pub by_subject: bool,
    /// One row per combination of these groupBy keys' values (at most [`MAX_GROUP_BY`]).
    pub group_by: &'a [String],
    /// Only events whose groupBy values include these (a JSON object of strings).
    pub group_filter: &'a Value,
    /// Most events of the metric in the range one query reads.
    pub max_scanned: i64,
    /// Most rows one answer carries.
    pub max_rows: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MeterUsageRow {
    /// The start of the row's window (`None` without a window size).
    pub window_start: Option<DateTime<Utc>>,
    pub subject: Option<String>,
    /// The row's groupBy values, one per key asked for (`null` where an event had none).
    pub group_by: Value,
    pub value: i128,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MeterUsage {
    Rows(Vec<MeterUsageRow>),
    /// The range holds more than `max_scanned` events of the metric.
    TooManyEvents,
    /// The answer would hold more than `max_rows` rows.
    TooManyRows,
}

pub async fn query(
    conn: &mut PgConnection,
    tenant: TenantId,
    q: &MeterUsageQuery<'_>,
) -> Result<MeterUsage, DbError> {
    if q.group_by.len() > MAX_GROUP_BY {
        return Err(DbError::Decode(format!(
            "at most {MAX_GROUP_BY} groupBy keys, not {}",
            q.group_by.len()
        )));
    }
    // Rows of the range that are not the meter's fall into one group with no keys (matched
    // false; IS TRUE, since an event without a CloudEvents type or an actor makes the test
    // null, not false): they are counted toward the rows read, never toward a value. The LIMIT
    // keeps at most max_rows + 2 groups: enough to tell an answer too long. A row's groupBy
    // values are an array with a place for each of the (at most 16) keys: no subquery per row.
    let rows = sqlx::query!(
        r#"SELECT g.window_start, g.subject, g.group_by AS "group_by: Vec<Option<String>>",
                  g.value::text AS value, g.matched AS "matched!",
                  (sum(g.events) OVER ())::int8 AS "scanned!"
             FROM (SELECT s.window_start, s.subject, s.group_by,
                          sum(s.quantity) FILTER (WHERE s.matched) AS value,
                          bool_or(s.matched) AS matched, count(*) AS events
                     FROM (SELECT e.quantity, m.matched,
                                  CASE WHEN m.matched AND $6::text IS NOT NULL
                                       THEN date_trunc($6, e.occurred_at, 'UTC') END
                                      AS window_start,
                                  CASE WHEN m.matched AND $8 THEN e.actor_id END AS subject,
                                  CASE WHEN m.matched AND cardinality($9::text[]) > 0
                                       THEN ARRAY[
                                             e.metadata ->> $9[1],
                                             e.metadata ->> $9[2],
                                             e.metadata ->> $9[3],
                                             e.metadata ->> $9[4],
                                             e.metadata ->> $9[5],
                                             e.metadata ->> $9[6],
                                             e.metadata ->> $9[7],
                                             e.metadata ->> $9[8],
                                             e.metadata ->> $9[9],
                                             e.metadata ->> $9[10],
                                             e.metadata ->> $9[11],
                                             e.metadata ->> $9[12],
                                             e.metadata ->> $9[13],
                                             e.metadata ->> $9[14],
                                             e.metadata ->> $9[15],
                                             e.metadata ->> $9[16]] END AS group_by
                             FROM (SELECT quantity, occurred_at, actor_id, metadata, voided_at
                                     FROM usage_events
                                    WHERE tenant_id = $1 AND metric = $2
                                      AND occurred_at >= $3 AND occurred_at < $4
                                    LIMIT $11) e
                            CROSS JOIN LATERAL (
                                  SELECT (e.voided_at IS NULL
                                     AND e.metadata -> 'cloudevents' ->> 'type' = $5
                                     AND ($7::text[] IS NULL OR e.actor_id = ANY ($7))
                                     AND e.metadata @> $10::jsonb) IS TRUE AS matched) m) s
                    GROUP BY 1, 2, 3) g
            LIMIT $12"#,
        tenant.0,
        q.metric,
        q.from,
        q.to,
        q.event_type,
        q.window.map(WindowSize::trunc_unit),
        q.subjects,
        q.by_subject,
        q.group_by,
        q.group_filter,
        q.max_scanned + 1,
        q.max_rows + 2
    )
    .fetch_all(&mut *conn)
    .await?;
    if rows.first().is_some_and(|r| r.scanned > q.max_scanned) {
        return Ok(MeterUsage::TooManyEvents);
    }
    // Ordered here, not in SQL: an ORDER BY under the LIMIT makes PostgreSQL sort every row it
    // read (it cannot know how few groups there are) where a hash aggregate needs no sort.
    let mut rows: Vec<_> = rows.into_iter().filter(|r| r.matched).collect();
    if rows.len() as i64 > q.max_rows {
        return Ok(MeterUsage::TooManyRows);
    }
    rows.sort_by(|a, b| {
        (&a.window_start, &a.subject, &a.group_by).cmp(&(&b.window_start, &b.subject, &b.group_by))
    });
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let value = r
            .value
            .as_deref()
            .unwrap_or("0")
            .parse::<i128>()
            .map_err(|_| DbError::Decode(format!("sum {:?} is not an integer", r.value)))?;
        out.push(MeterUsageRow {
            window_start: r.window_start,
            subject: r.subject,
            group_by: Value::Object(
                q.group_by
                    .iter()
                    .zip(r.group_by.unwrap_or_default())
                    .map(|(key, value)| (key.clone(), value.map_or(Value::Null, Value::String)))
                    .collect(),
            ),
            value,
        });
    }
    Ok(MeterUsage::Rows(out))
}
