//! The command line: `admin tenant create acme --name "Acme Inc"` builds the same [`Command`]
//! a Lambda payload does.

use clap::{Parser, Subcommand};

use crate::command::Command;
use crate::export::Destination;

#[derive(Debug, Parser)]
#[command(name = "admin", about = "meterbridge operator actions", version)]
pub struct Cli {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Apply pending database migrations
    Migrate,
    /// Manage tenants
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Manage API keys
    #[command(name = "api-key")]
    ApiKey {
        #[command(subcommand)]
        action: ApiKeyAction,
    },
    /// Act on payments
    Payment {
        #[command(subcommand)]
        action: PaymentCommand,
    },
    /// Inspect and operate the outbox
    Outbox {
        #[command(subcommand)]
        action: OutboxCommand,
    },
    /// Usage event storage: partitions, retention, dedup keys
    Usage {
        #[command(subcommand)]
        action: UsageCommand,
    },
    /// A tenant's meters: how its CloudEvents map to usage events
    Meter {
        #[command(subcommand)]
        action: MeterCommand,
    },
    /// A tenant's data subjects (end users): export and erasure
    Subject {
        #[command(subcommand)]
        action: SubjectCommand,
    },
}

#[derive(Debug, Subcommand)]
enum MeterCommand {
    /// Set or replace a meter (one per CloudEvents type); audited
    Set {
        tenant: String,
        slug: String,
        /// The CloudEvents `type` it counts
        #[arg(long)]
        event_type: String,
        /// The metric of the catalog its events count towards
        #[arg(long)]
        metric: String,
        /// JSONPath of the quantity in `data` (absent: each event counts 1)
        #[arg(long)]
        value_property: Option<String>,
        /// KEY=JSONPATH kept in the usage event's metadata (repeatable)
        #[arg(long = "group-by", value_parser = parse_group_by)]
        group_by: Vec<(String, String)>,
        #[arg(long)]
        reason: String,
    },
    /// A tenant's meters
    List { tenant: String },
    /// Remove a meter; audited
    Remove {
        tenant: String,
        slug: String,
        #[arg(long)]
        reason: String,
    },
}

fn parse_group_by(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .map(|(k, p)| (k.to_owned(), p.to_owned()))
        .ok_or_else(|| "expected KEY=JSONPATH, e.g. model=$.model".to_owned())
}

#[derive(Debug, Subcommand)]
enum SubjectCommand {
    /// Export what is held about a data subject as JSON Lines: to standard output (the
    /// manifest to standard error), or with --s3 to the export bucket, with links
    Export {
        #[arg(long)]
        tenant: String,
        /// The actor id exactly as the events carry it
        #[arg(long)]
        actor_id: String,
        /// Write to the export bucket (EXPORT_BUCKET) and print presigned links
        #[arg(long)]
        s3: bool,
    },
    /// Erase a data subject: their actor id replaced by a random token on every event, their
    /// events' metadata emptied; totals and distinct-actor counts unchanged. Run the same
    /// --request again to resume, or to read its receipt
    Erase {
        #[arg(long)]
        tenant: String,
        /// The actor id exactly as the events carry it
        #[arg(long)]
        actor_id: String,
        /// Your id for the request (a ticket number)
        #[arg(long)]
        request: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        requested_by: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Apply the storage policy now (partitions ahead, retention, key generations)
    Maintain,
    /// Day partitions, archived days and key generations
    Status,
    /// One incremental aggregation run now
    Aggregate,
    /// Recompute the aggregates of a range of days (inclusive)
    Backfill {
        /// First day, YYYY-MM-DD
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last day, YYYY-MM-DD
        #[arg(long)]
        to: chrono::NaiveDate,
        /// One tenant's slug (all tenants when absent)
        #[arg(long)]
        tenant: Option<String>,
        /// daily, weekly, monthly (repeatable; all when absent)
        #[arg(long = "period", value_parser = parse_period)]
        periods: Vec<meterbridge::domain::period::PeriodType>,
    },
    /// Per tenant: last aggregation, backlog, oldest unaggregated work
    AggregationStatus,
    /// Which period types' final-period events a tenant gets (off by default)
    #[command(name = "period-events")]
    PeriodEvents {
        #[command(subcommand)]
        action: PeriodEventsAction,
    },
    /// A tenant's usage limits and their thresholds (they never refuse usage)
    Limits {
        #[command(subcommand)]
        action: UsageLimitsAction,
    },
}

#[derive(Debug, Subcommand)]
enum UsageLimitsAction {
    /// Set or replace a limit on a metric per daily or monthly period; audited
    Set {
        tenant: String,
        #[arg(long)]
        metric: String,
        /// daily or monthly
        #[arg(long)]
        period: String,
        /// Units of the metric per period (1 to 10^17)
        #[arg(long)]
        limit: u64,
        /// A threshold in percent of the limit (repeatable; default 80 and 100)
        #[arg(long = "threshold")]
        thresholds: Vec<u16>,
        #[arg(long)]
        reason: String,
    },
    /// A tenant's limits
    List { tenant: String },
    /// Remove a limit; audited
    Remove {
        tenant: String,
        #[arg(long)]
        metric: String,
        #[arg(long)]
        period: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum PeriodEventsAction {
    /// Exactly these period types (none: all off); audited
    Set {
        tenant: String,
        /// daily, weekly, monthly (repeatable; none turns them all off)
        #[arg(long = "period", value_parser = parse_period)]
        periods: Vec<meterbridge::domain::period::PeriodType>,
        #[arg(long)]
        reason: String,
    },
    /// The period types a tenant gets events for
    Show { tenant: String },
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// The backlog by event type and status
    Status,
    /// Put DEAD events back to PENDING (by id, or every one of an event type)
    Redrive {
        #[arg(long = "event-id")]
        event_ids: Vec<uuid::Uuid>,
        #[arg(long)]
        event_type: Option<String>,
        #[arg(long)]
        reason: String,
    },
    /// Pass over DEAD events for good, releasing their aggregates' later events
    Skip {
        event_ids: Vec<uuid::Uuid>,
        #[arg(long)]
        reason: String,
    },
    /// One relay run now (needs EVENT_BUS_NAME)
    Relay,
}

#[derive(Debug, Subcommand)]
enum PaymentCommand {
    /// Mark a verified payment refunded (publishes payment.refunded)
    Refund {
        tenant: String,
        payment_id: uuid::Uuid,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum TenantAction {
    /// Create a tenant
    Create {
        slug: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Disable a tenant: its keys stop working
    Disable { slug: String },
    /// List tenants
    List,
    /// Offboard a tenant disabled for its grace period: every row, Redis key, signing secret
    /// and key of it removed, in steps with a receipt. Run it again to resume
    Erase {
        slug: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        requested_by: Option<String>,
        /// Keep its billing records (usage aggregates, payments and their audit)
        #[arg(long)]
        keep_billing: bool,
    },
    /// A tenant's rate limits: the defaults and its overrides
    Limits {
        #[command(subcommand)]
        action: LimitsAction,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsAction {
    /// Override a tenant's limits, or one of its keys' (--key); audited
    Set {
        tenant: String,
        /// The key's prefix (its public id); absent: the tenant's own budgets
        #[arg(long = "key")]
        api_key_prefix: Option<String>,
        #[arg(long)]
        requests_per_second: Option<u32>,
        /// Default: twice the rate
        #[arg(long)]
        request_burst: Option<u32>,
        #[arg(long)]
        events_per_second: Option<u32>,
        /// Default: twice the rate, at least 1000
        #[arg(long)]
        event_burst: Option<u32>,
        /// The tenant's requests in flight at once (not per key)
        #[arg(long)]
        max_in_flight: Option<u32>,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        actor: Option<String>,
    },
    /// The defaults by key trust and the tenant's overrides
    Show { tenant: String },
    /// Remove a tenant's (or one key's) overrides; audited
    Clear {
        tenant: String,
        #[arg(long = "key")]
        api_key_prefix: Option<String>,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        actor: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ApiKeyAction {
    /// Create a key for a tenant's service (printed once)
    Create {
        tenant: String,
        #[arg(long)]
        source: String,
        #[arg(long, default_value = "internal")]
        trust: String,
        /// A scope the key holds (repeat for several); default: all but usage:void for internal
        /// keys, usage:write for external ones
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Revoke a key by its prefix
    Revoke { prefix: String },
    /// List a tenant's keys (prefixes only)
    List { tenant: String },
}

fn parse_period(raw: &str) -> Result<meterbridge::domain::period::PeriodType, String> {
    meterbridge::domain::period::PeriodType::parse(raw).map_err(|e| e.message)
}

impl Cli {
    pub fn into_command(self) -> Command {
        match self.action {
            Action::Migrate => Command::Migrate,
            Action::Tenant { action } => match action {
                TenantAction::Create { slug, name } => Command::TenantCreate { slug, name },
                TenantAction::Disable { slug } => Command::TenantDisable { slug },
                TenantAction::List => Command::TenantList,
                TenantAction::Erase {
                    slug,
                    reason,
                    requested_by,
                    keep_billing,
                } => Command::TenantErase {
                    tenant: slug,
                    reason,
                    requested_by,
                    keep_billing,
                },
                TenantAction::Limits { action } => match action {
                    LimitsAction::Set {
                        tenant,
                        api_key_prefix,
                        requests_per_second,
                        request_burst,
                        events_per_second,
                        event_burst,
                        max_in_flight,
                        reason,
                        actor,
                    } => Command::TenantLimitsSet {
                        tenant,
                        api_key_prefix,
                        requests_per_second,
                        request_burst,
                        events_per_second,
                        event_burst,
                        max_in_flight,
                        reason,
                        actor,
                    },
                    LimitsAction::Show { tenant } => Command::TenantLimitsShow { tenant },
                    LimitsAction::Clear {
                        tenant,
                        api_key_prefix,
                        reason,
                        actor,
                    } => Command::TenantLimitsClear {
                        tenant,
                        api_key_prefix,
                        reason,
                        actor,
                    },
                },
            },
            Action::ApiKey { action } => match action {
                ApiKeyAction::Create {
                    tenant,
                    source,
                    trust,
                    scopes,
                } => Command::ApiKeyCreate {
                    tenant,
                    source,
                    trust,
                    scopes: (!scopes.is_empty()).then_some(scopes),
                },
                ApiKeyAction::Revoke { prefix } => Command::ApiKeyRevoke { prefix },
                ApiKeyAction::List { tenant } => Command::ApiKeyList { tenant },
            },
            Action::Outbox { action } => match action {
                OutboxCommand::Status => Command::OutboxStatus,
                OutboxCommand::Redrive {
                    event_ids,
                    event_type,
                    reason,
                } => Command::OutboxRedrive {
                    event_ids,
                    event_type,
                    reason,
                    actor: std::env::var("USER").ok(),
                },
                OutboxCommand::Skip { event_ids, reason } => Command::OutboxSkip {
                    event_ids,
                    reason,
                    actor: std::env::var("USER").ok(),
                },
                OutboxCommand::Relay => Command::OutboxRelay,
            },
            Action::Usage { action } => match action {
                UsageCommand::Maintain => Command::UsageMaintain,
                UsageCommand::Status => Command::UsageStatus,
                UsageCommand::Aggregate => Command::UsageAggregate,
                UsageCommand::Backfill {
                    from,
                    to,
                    tenant,
                    periods,
                } => Command::UsageBackfill {
                    from,
                    to,
                    tenant,
                    periods: (!periods.is_empty()).then_some(periods),
                },
                UsageCommand::AggregationStatus => Command::UsageAggregationStatus,
                UsageCommand::PeriodEvents {
                    action:
                        PeriodEventsAction::Set {
                            tenant,
                            periods,
                            reason,
                        },
                } => Command::UsagePeriodEventsSet {
                    tenant,
                    periods,
                    reason,
                    actor: None,
                },
                UsageCommand::PeriodEvents {
                    action: PeriodEventsAction::Show { tenant },
                } => Command::UsagePeriodEventsShow { tenant },
                UsageCommand::Limits { action } => match action {
                    UsageLimitsAction::Set {
                        tenant,
                        metric,
                        period,
                        limit,
                        thresholds,
                        reason,
                    } => Command::UsageLimitsSet {
                        tenant,
                        metric,
                        period,
                        limit,
                        thresholds: (!thresholds.is_empty()).then_some(thresholds),
                        reason,
                        actor: None,
                    },
                    UsageLimitsAction::List { tenant } => Command::UsageLimitsList { tenant },
                    UsageLimitsAction::Remove {
                        tenant,
                        metric,
                        period,
                        reason,
                    } => Command::UsageLimitsRemove {
                        tenant,
                        metric,
                        period,
                        reason,
                        actor: None,
                    },
                },
            },
            Action::Meter { action } => match action {
                MeterCommand::Set {
                    tenant,
                    slug,
                    event_type,
                    metric,
                    value_property,
                    group_by,
                    reason,
                } => Command::MeterSet {
                    tenant,
                    slug,
                    event_type,
                    metric,
                    value_property,
                    group_by: group_by.into_iter().collect(),
                    reason,
                    actor: None,
                },
                MeterCommand::List { tenant } => Command::MeterList { tenant },
                MeterCommand::Remove {
                    tenant,
                    slug,
                    reason,
                } => Command::MeterRemove {
                    tenant,
                    slug,
                    reason,
                    actor: None,
                },
            },
            Action::Subject { action } => match action {
                SubjectCommand::Export {
                    tenant,
                    actor_id,
                    s3,
                } => Command::SubjectExport {
                    tenant,
                    actor_id,
                    to: if s3 {
                        Destination::S3
                    } else {
                        Destination::Stdout
                    },
                },
                SubjectCommand::Erase {
                    tenant,
                    actor_id,
                    request,
                    reason,
                    requested_by,
                } => Command::SubjectErase {
                    tenant,
                    actor_id,
                    request_id: request,
                    reason,
                    requested_by,
                },
            },
            Action::Payment { action } => match action {
                PaymentCommand::Refund {
                    tenant,
                    payment_id,
                    reason,
                } => Command::PaymentRefund {
                    tenant,
                    payment_id,
                    reason,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("admin").chain(args.iter().copied()))
            .map(Cli::into_command)
    }

    #[test]
    fn cli_builds_the_same_commands_as_payloads() {
        assert_eq!(parse(&["migrate"]).unwrap(), Command::Migrate);
        assert_eq!(
            parse(&[
                "tenant",
                "limits",
                "set",
                "acme",
                "--key",
                "0123456789ab",
                "--events-per-second",
                "500",
                "--reason",
                "partner retry loop",
            ])
            .unwrap(),
            serde_json::from_value::<Command>(serde_json::json!({
                "action": "tenant.limits.set", "tenant": "acme", "apiKeyPrefix": "0123456789ab",
                "eventsPerSecond": 500, "reason": "partner retry loop"}))
            .unwrap()
        );
        assert_eq!(
            parse(&["tenant", "limits", "show", "acme"]).unwrap(),
            Command::TenantLimitsShow {
                tenant: "acme".into()
            }
        );
        assert_eq!(
            parse(&[
                "usage",
                "backfill",
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-07",
                "--tenant",
                "acme",
                "--period",
                "daily"
            ])
            .unwrap(),
            serde_json::from_value::<Command>(serde_json::json!({
                "action": "usage.backfill", "from": "2026-11-01", "to": "2026-11-07",
                "tenant": "acme", "periods": ["daily"]}))
            .unwrap()
        );
        assert!(parse(&[
            "usage",
            "backfill",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-07",
            "--period",
            "hourly"
        ])
        .is_err());
        assert_eq!(
            parse(&["usage", "aggregate"]).unwrap(),
            Command::UsageAggregate
        );
        assert_eq!(
            parse(&[
                "usage",
                "period-events",
                "set",
                "acme",
                "--period",
                "monthly",
                "--reason",
                "billing"
            ])
            .unwrap(),
            serde_json::from_value::<Command>(serde_json::json!({
                "action": "usage.period-events.set", "tenant": "acme", "periods": ["monthly"],
                "reason": "billing"}))
            .unwrap()
        );
        assert_eq!(
            parse(&[
                "usage",
                "limits",
                "set",
                "acme",
                "--metric",
                "api.requests",
                "--period",
                "monthly",
                "--limit",
                "1000000",
                "--threshold",
                "50",
                "--threshold",
                "100",
                "--reason",
                "plan"
            ])
            .unwrap(),
            serde_json::from_value::<Command>(serde_json::json!({
                "action": "usage.limits.set", "tenant": "acme", "metric": "api.requests",
                "period": "monthly", "limit": 1_000_000, "thresholds": [50, 100],
                "reason": "plan"}))
            .unwrap()
        );
        assert_eq!(
            parse(&[
                "meter",
                "set",
                "acme",
                "tokens",
                "--event-type",
                "prompt",
                "--metric",
                "api.requests",
                "--value-property",
                "$.tokens",
                "--group-by",
                "model=$.model",
                "--reason",
                "llm"
            ])
            .unwrap(),
            serde_json::from_value::<Command>(serde_json::json!({
                "action": "meter.set", "tenant": "acme", "slug": "tokens", "eventType": "prompt",
                "metric": "api.requests", "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"}, "reason": "llm"}))
            .unwrap()
        );
        assert!(parse(&[
            "meter",
            "set",
            "acme",
            "t",
            "--event-type",
            "p",
            "--metric",
            "m",
            "--group-by",
            "no-equals",
            "--reason",
            "r"
        ])
        .is_err());
        assert_eq!(
            parse(&["usage", "period-events", "show", "acme"]).unwrap(),
            Command::UsagePeriodEventsShow {
                tenant: "acme".into()
            }
        );
        // An export: to the bucket with --s3, as the payload; to standard output without.
        let payload = serde_json::json!({
            "action": "subject.export", "tenant": "acme", "actorId": "user-42"});
        assert_eq!(
            parse(&[
                "subject",
                "export",
                "--tenant",
                "acme",
                "--actor-id",
                "user-42",
                "--s3"
            ])
            .unwrap(),
            serde_json::from_value::<Command>(payload).unwrap()
        );
        assert_eq!(
            parse(&[
                "subject",
                "export",
                "--tenant",
                "acme",
                "--actor-id",
                "user-42"
            ])
            .unwrap(),
            Command::SubjectExport {
                tenant: "acme".into(),
                actor_id: "user-42".into(),
                to: Destination::Stdout
            }
        );
        assert_eq!(
            parse(&["usage", "aggregation-status"]).unwrap(),
            Command::UsageAggregationStatus
        );
        assert_eq!(
            parse(&["tenant", "create", "acme", "--name", "Acme Inc"]).unwrap(),
            Command::TenantCreate {
                slug: "acme".into(),
                name: Some("Acme Inc".into())
            }
        );
        assert_eq!(
            parse(&["api-key", "create", "acme", "--source", "crm"]).unwrap(),
            Command::ApiKeyCreate {
                tenant: "acme".into(),
                source: "crm".into(),
                trust: "internal".into(),
                scopes: None,
            }
        );
        assert_eq!(
            parse(&[
                "api-key",
                "create",
                "acme",
                "--source",
                "bi",
                "--scope",
                "usage:read"
            ])
            .unwrap(),
            Command::ApiKeyCreate {
                tenant: "acme".into(),
                source: "bi".into(),
                trust: "internal".into(),
                scopes: Some(vec!["usage:read".into()]),
            }
        );
        assert_eq!(
            parse(&["api-key", "revoke", "0123456789ab"]).unwrap(),
            Command::ApiKeyRevoke {
                prefix: "0123456789ab".into()
            }
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["tenant", "explode"]).is_err());
        assert!(
            parse(&["api-key", "create", "acme"]).is_err(),
            "--source is required"
        );
        assert!(parse(&[]).is_err());
    }
}
