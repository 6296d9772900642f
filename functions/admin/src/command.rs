//! The actions the admin function understands, as they arrive in a Lambda payload:
//! `{"action": "tenant.create", "slug": "acme", "name": "Acme Inc"}`.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", deny_unknown_fields)]
pub enum Command {
    /// Applies pending migrations.
    #[serde(rename = "migrate")]
    Migrate,
    #[serde(rename = "tenant.create")]
    TenantCreate {
        slug: String,
        /// Display name; the slug when absent.
        #[serde(default)]
        name: Option<String>,
    },
    #[serde(rename = "tenant.disable")]
    TenantDisable { slug: String },
    #[serde(rename = "tenant.list")]
    TenantList,
    /// Offboards a tenant disabled for its grace period: every row of it (live and archived
    /// days, dedup keys), its Redis keys, its webhook signing secrets and its keys removed, in
    /// steps with a receipt; the same request again resumes it, or returns the receipt.
    #[serde(rename = "tenant.erase", rename_all = "camelCase")]
    TenantErase {
        tenant: String,
        reason: String,
        #[serde(default)]
        requested_by: Option<String>,
        /// Keep the billing records (usage aggregates, payments and their audit) and the
        /// tenant's row, marked erased.
        #[serde(default)]
        keep_billing: bool,
    },
    /// Overrides a tenant's rate limits (no `apiKeyPrefix`: its budgets together and its
    /// requests in flight) or one of its keys'; fields left out keep their current value.
    /// Audited in rate_limit_audit; the API functions apply it within their key cache's 60 s.
    #[serde(rename = "tenant.limits.set", rename_all = "camelCase")]
    TenantLimitsSet {
        tenant: String,
        #[serde(default)]
        api_key_prefix: Option<String>,
        #[serde(default)]
        requests_per_second: Option<u32>,
        /// Defaults to twice the rate.
        #[serde(default)]
        request_burst: Option<u32>,
        #[serde(default)]
        events_per_second: Option<u32>,
        /// Defaults to twice the rate, and at least a full batch (1,000).
        #[serde(default)]
        event_burst: Option<u32>,
        #[serde(default)]
        max_in_flight: Option<u32>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// The defaults by key trust and the tenant's overrides.
    #[serde(rename = "tenant.limits.show")]
    TenantLimitsShow { tenant: String },
    /// Removes a tenant's (or one key's) overrides: the defaults apply again. Audited.
    #[serde(rename = "tenant.limits.clear", rename_all = "camelCase")]
    TenantLimitsClear {
        tenant: String,
        #[serde(default)]
        api_key_prefix: Option<String>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// Creates a key for a tenant's service; the key is returned once and never again.
    #[serde(rename = "api-key.create")]
    ApiKeyCreate {
        tenant: String,
        source: String,
        trust: String,
        /// `usage:write`, `usage:read`, `usage:void`, `payments:write`, `payments:read`,
        /// `payments:verify`;
        /// absent: every scope but `usage:void` for an internal key, `usage:write` for an external
        /// one.
        #[serde(default)]
        scopes: Option<Vec<String>>,
    },
    #[serde(rename = "api-key.revoke")]
    ApiKeyRevoke { prefix: String },
    #[serde(rename = "api-key.list")]
    ApiKeyList { tenant: String },
    /// Marks a verified payment refunded (PAID_VERIFIED → REFUNDED), audited, with its
    /// `payment.refunded` event, as a provider's `charge.refunded` webhook would.
    #[serde(rename = "payment.refund")]
    PaymentRefund {
        tenant: String,
        #[serde(rename = "paymentId")]
        payment_id: uuid::Uuid,
        reason: String,
    },
    /// The outbox's backlog: rows per event type and status, due now, oldest pending age.
    #[serde(rename = "outbox.status")]
    OutboxStatus,
    /// DEAD events (by id, or all of one event type) back to PENDING with their attempts reset;
    /// audited in outbox_admin_log.
    #[serde(rename = "outbox.redrive")]
    OutboxRedrive {
        #[serde(default, rename = "eventIds")]
        event_ids: Vec<uuid::Uuid>,
        #[serde(default, rename = "eventType")]
        event_type: Option<String>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// DEAD events passed over for good, so the later events of their aggregates may go;
    /// audited in outbox_admin_log.
    #[serde(rename = "outbox.skip")]
    OutboxSkip {
        #[serde(rename = "eventIds")]
        event_ids: Vec<uuid::Uuid>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// One relay run, now.
    #[serde(rename = "outbox.relay")]
    OutboxRelay,
    /// The usage storage policy, applied now: day partitions created ahead and retired past
    /// the retention, dedup-key generations rotated and expired (scheduled hourly).
    #[serde(rename = "usage.maintain")]
    UsageMaintain,
    /// Day partitions, archived days and key generations.
    #[serde(rename = "usage.status")]
    UsageStatus,
    /// One incremental aggregation run, now (the aggregate-usage function's scheduled job).
    #[serde(rename = "usage.aggregate")]
    UsageAggregate,
    /// Recomputes the aggregates of a range of days (inclusive) from the events.
    #[serde(rename = "usage.backfill")]
    UsageBackfill {
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        #[serde(default)]
        tenant: Option<String>,
        /// `daily`, `weekly`, `monthly`; all when absent.
        #[serde(default)]
        periods: Option<Vec<meterbridge::domain::period::PeriodType>>,
    },
    /// Per tenant: last aggregation, backlog, oldest unaggregated work.
    #[serde(rename = "usage.aggregation-status")]
    UsageAggregationStatus,
    /// The period types whose final-period events (`usage.period.finalized`,
    /// `usage.period.revised`) the tenant wants: exactly these (an empty list turns them off).
    /// Audited in tenant_settings_audit.
    #[serde(rename = "usage.period-events.set")]
    UsagePeriodEventsSet {
        tenant: String,
        periods: Vec<meterbridge::domain::period::PeriodType>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// The period types whose final-period events the tenant gets.
    #[serde(rename = "usage.period-events.show")]
    UsagePeriodEventsShow { tenant: String },
    /// Sets (or replaces) a tenant's usage limit on a metric per `daily` or `monthly` period,
    /// with thresholds in percent of it (default 80 and 100); `usage.threshold.crossed` is
    /// published once per period and threshold. Never refuses usage. Audited.
    #[serde(rename = "usage.limits.set")]
    UsageLimitsSet {
        tenant: String,
        metric: String,
        period: String,
        limit: u64,
        #[serde(default)]
        thresholds: Option<Vec<u16>>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// Sets (or replaces) a tenant's meter: how its CloudEvents of `eventType` map to usage
    /// events of `metric` (`POST /api/v1/events`). Audited.
    #[serde(rename = "meter.set", rename_all = "camelCase")]
    MeterSet {
        tenant: String,
        slug: String,
        event_type: String,
        metric: String,
        /// A JSONPath into `data` (`$.tokens`); absent: each event counts 1.
        #[serde(default)]
        value_property: Option<String>,
        /// Metadata key → JSONPath into `data`.
        #[serde(default)]
        group_by: std::collections::BTreeMap<String, String>,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// A tenant's meters.
    #[serde(rename = "meter.list")]
    MeterList { tenant: String },
    /// Removes a tenant's meter. Audited.
    #[serde(rename = "meter.remove")]
    MeterRemove {
        tenant: String,
        slug: String,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// A tenant's usage limits.
    #[serde(rename = "usage.limits.list")]
    UsageLimitsList { tenant: String },
    /// Removes a tenant's usage limit. Audited.
    #[serde(rename = "usage.limits.remove")]
    UsageLimitsRemove {
        tenant: String,
        metric: String,
        period: String,
        reason: String,
        #[serde(default)]
        actor: Option<String>,
    },
    /// Erases a data subject of a tenant: their actor id replaced on every event by a random
    /// token, their events' metadata emptied; totals and distinct-actor counts unchanged. In
    /// steps; the same `requestId` again resumes it, or returns its receipt once finished.
    #[serde(rename = "subject.erase", rename_all = "camelCase")]
    SubjectErase {
        tenant: String,
        actor_id: String,
        /// The caller's id for the request (a ticket number).
        request_id: String,
        reason: String,
        #[serde(default)]
        requested_by: Option<String>,
    },
    /// Exports what is held about a data subject of a tenant as JSON Lines with a manifest: to
    /// the export bucket (`EXPORT_BUCKET`) with presigned links, or (command line) to standard
    /// output.
    #[serde(rename = "subject.export", rename_all = "camelCase")]
    SubjectExport {
        tenant: String,
        actor_id: String,
        /// Standard output is the command line's; a payload always writes to the bucket.
        #[serde(skip)]
        to: crate::export::Destination,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Migrate => "migrate",
            Command::TenantCreate { .. } => "tenant.create",
            Command::TenantDisable { .. } => "tenant.disable",
            Command::TenantList => "tenant.list",
            Command::TenantErase { .. } => "tenant.erase",
            Command::TenantLimitsSet { .. } => "tenant.limits.set",
            Command::TenantLimitsShow { .. } => "tenant.limits.show",
            Command::TenantLimitsClear { .. } => "tenant.limits.clear",
            Command::ApiKeyCreate { .. } => "api-key.create",
            Command::ApiKeyRevoke { .. } => "api-key.revoke",
            Command::ApiKeyList { .. } => "api-key.list",
            Command::PaymentRefund { .. } => "payment.refund",
            Command::OutboxStatus => "outbox.status",
            Command::OutboxRedrive { .. } => "outbox.redrive",
            Command::OutboxSkip { .. } => "outbox.skip",
            Command::OutboxRelay => "outbox.relay",
            Command::UsageMaintain => "usage.maintain",
            Command::UsageStatus => "usage.status",
            Command::UsageAggregate => "usage.aggregate",
            Command::UsageBackfill { .. } => "usage.backfill",
            Command::UsageAggregationStatus => "usage.aggregation-status",
            Command::UsagePeriodEventsSet { .. } => "usage.period-events.set",
            Command::UsagePeriodEventsShow { .. } => "usage.period-events.show",
            Command::UsageLimitsSet { .. } => "usage.limits.set",
            Command::UsageLimitsList { .. } => "usage.limits.list",
            Command::MeterSet { .. } => "meter.set",
            Command::MeterList { .. } => "meter.list",
            Command::MeterRemove { .. } => "meter.remove",
            Command::UsageLimitsRemove { .. } => "usage.limits.remove",
            Command::SubjectErase { .. } => "subject.erase",
            Command::SubjectExport { .. } => "subject.export",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_parse() {
        let cmd: Command =
            serde_json::from_value(json!({"action": "tenant.create", "slug": "acme"})).unwrap();
        assert_eq!(
            cmd,
            Command::TenantCreate {
                slug: "acme".into(),
                name: None
            }
        );
        let cmd: Command = serde_json::from_value(json!({"action": "migrate"})).unwrap();
        assert_eq!(cmd, Command::Migrate);
    }

    #[test]
    fn unknown_actions_and_fields_are_refused() {
        let err =
            serde_json::from_value::<Command>(json!({"action": "tenant.delete"})).unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let err = serde_json::from_value::<Command>(
            json!({"action": "tenant.create", "slug": "a", "tenantId": "x"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("tenantId"), "{err}");
        let err = serde_json::from_value::<Command>(json!({"slug": "a"})).unwrap_err();
        assert!(err.to_string().contains("action"), "{err}");
    }
}
