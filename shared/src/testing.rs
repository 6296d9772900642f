//! Test helpers: the real services, per-test tenants, and connections as the application roles.
//! A missing service fails the test with a message that says how to start it; nothing is skipped.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aws_sdk_secretsmanager::config::{Credentials, Region};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::auth::{generate_api_key, NewApiKey};
use crate::clock::{Clock, ShiftedClock};
use crate::domain::rate_limit::Overrides;
use crate::domain::{Scopes, SourceService, Tenant, TenantSlug, Trust};
use crate::repo::usage_storage::{self, StorageAction, StoragePolicy};
use crate::repo::{api_keys, rate_limits, tenants};

/// The role ingest-usage connects as.
pub const INGEST_ROLE: &str = "meterbridge_ingest";
/// The role verify-payment connects as.
pub const PAYMENTS_ROLE: &str = "meterbridge_payments";
pub const OPS_ROLE: &str = "meterbridge_ops";

/// The variable that moves the tests' clock: an RFC 3339 instant.
pub const TEST_NOW_VARIABLE: &str = "MB_TEST_NOW";

/// The clock tests run the functions by: the real clock moved to `MB_TEST_NOW` when that is set
/// (so the date-sensitive tests can be run as of any day: scripts/test.sh runs them at the
/// calendar's edges), the real clock otherwise. Either way it runs on in real time from the
/// first call in the process.
pub fn clock() -> Arc<dyn Clock> {
    static SHIFT: OnceLock<Option<ShiftedClock>> = OnceLock::new();
    let shift = SHIFT.get_or_init(|| {
        let at = std::env::var(TEST_NOW_VARIABLE)
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        let at = DateTime::parse_from_rfc3339(at.trim()).unwrap_or_else(|e| {
            panic!("{TEST_NOW_VARIABLE}={at:?} is not an RFC 3339 instant: {e}")
        });
        Some(ShiftedClock::starting_at(at.with_timezone(&Utc)))
    });
    match shift {
        Some(shifted) => Arc::new(*shifted),
        None => crate::clock::system(),
    }
}

/// "Now" by the tests' [`clock`].
pub fn now() -> DateTime<Utc> {
    clock().now()
}

/// The UTC day of [`now`].
pub fn today() -> NaiveDate {
    now().date_naive()
}

/// The value of the real-time counter at `key` in the Redis of `url` (`None`: absent), read
/// straight from Redis as a test checks it.
pub async fn read_counter(url: &str, key: &str) -> Option<i128> {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis is reachable");
    let (hi, lo): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(key)
        .arg("hi")
        .arg("lo")
        .query_async(&mut conn)
        .await
        .expect("a counter is a hash");
    crate::usage_counters::join(hi, lo)
}

/// Creates the day partitions of `usage_events` from `first` to `last` (inclusive) that are
/// missing, as the owner. The migrations create those around the real today; a test that runs
/// as of another day, or writes events at fixed instants, creates its own.
pub async fn create_day_partitions(owner: &PgPool, first: NaiveDate, last: NaiveDate) {
    sqlx::query(
        "SELECT count(usage_events_create_partition(d::date))
           FROM generate_series($1::date, $2::date, interval '1 day') AS d",
    )
    .bind(first)
    .bind(last)
    .execute(owner)
    .await
    .expect("create day partitions");
}

/// The day partitions ingestion may write as of [`now`]: 36 days back, 14 ahead (as the storage
/// maintenance keeps them).
pub async fn create_partitions_around_now(owner: &PgPool) {
    let today = today();
    create_day_partitions(
        owner,
        today - chrono::Duration::days(36),
        today + chrono::Duration::days(14),
    )
    .await;
}

/// Moves the day partition of `day` (`YYYY-MM-DD`) to the archive schema, as the storage
/// maintenance does past the retention.
pub async fn archive(owner: &PgPool, day: &str) {
    let table = format!("usage_events_p{}", day.replace('-', ""));
    for statement in [
        format!("ALTER TABLE usage_events DETACH PARTITION {table}"),
        format!("ALTER TABLE {table} SET SCHEMA usage_archive"),
    ] {
        sqlx::query(&statement)
            .execute(owner)
            .await
            .expect("archive a day partition");
    }
}

/// Moves the aggregation's watermark past every event stored so far, as if the aggregation had
/// taken them (for work that treats taken and pending events differently, like an erasure).
pub async fn mark_aggregated(owner: &PgPool) {
    sqlx::query("UPDATE usage_aggregation_state SET watermark = pg_current_xact_id()::text::int8")
        .execute(owner)
        .await
        .expect("move the aggregation's watermark");
}

/// The id of the API key with `prefix`.
pub async fn api_key_id(owner: &PgPool, prefix: &str) -> uuid::Uuid {
    sqlx::query_scalar("SELECT id FROM api_keys WHERE prefix = $1")
        .bind(prefix)
        .fetch_one(owner)
        .await
        .expect("the API key")
}

/// Overrides the rate limits of `tenant` (or of its key `key`), as the admin action does.
pub async fn set_limits(
    owner: &PgPool,
    tenant: &Tenant,
    key: Option<uuid::Uuid>,
    overrides: &Overrides,
) {
    let mut tx = owner.begin().await.expect("a transaction");
    let change = rate_limits::Change {
        tenant: tenant.id,
        key,
        actor: "test",
        reason: "a test's limits",
    };
    rate_limits::set(&mut tx, &change, overrides)
        .await
        .expect("set the limits");
    tx.commit().await.expect("commit the limits");
}

/// The storage maintenance as of `now`, as the admin function's `usage.maintain` runs it
/// before the key steps: [`usage_storage::maintain`] in a transaction of its own, then the
/// BRIN summaries to the end. Returns what both did.
pub async fn maintain_storage(
    owner: &PgPool,
    now: DateTime<Utc>,
    policy: &StoragePolicy,
) -> Vec<StorageAction> {
    let mut tx = owner.begin().await.expect("a transaction");
    let mut done = usage_storage::maintain(&mut tx, now, policy)
        .await
        .expect("the storage maintenance");
    tx.commit().await.expect("commit the storage maintenance");
    let far = std::time::Instant::now() + Duration::from_secs(600);
    let summaries = usage_storage::summarize(owner, now, policy, far)
        .await
        .expect("the BRIN summaries");
    assert!(!summaries.more, "{summaries:?}");
    done.extend(summaries.actions);
    done
}

/// The storage as if the migrations had run at [`now`]: the day partitions around it (and none
/// of the empty ones the migrations made around the real today), and the open key generation
/// opened at it (so the maintenance rotates it an hour after `now`). Does nothing on a database
/// migrated only as far as before the partitioning (a migration test's).
pub async fn storage_as_of_now(owner: &PgPool) {
    let partitioned: bool = sqlx::query_scalar(
        "SELECT to_regprocedure('public.usage_events_create_partition(date)') IS NOT NULL",
    )
    .fetch_one(owner)
    .await
    .expect("the catalog");
    if !partitioned {
        return;
    }
    create_partitions_around_now(owner).await;
    let today = today();
    let elsewhere: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'public.usage_events'::regclass
            AND c.relname ~ '^usage_events_p[0-9]{8}$'
            AND to_date(substr(c.relname, 15), 'YYYYMMDD') NOT BETWEEN $1 AND $2",
    )
    .bind(today - chrono::Duration::days(36))
    .bind(today + chrono::Duration::days(14))
    .fetch_all(owner)
    .await
    .expect("the day partitions");
    for partition in elsewhere {
        let empty: bool = sqlx::query_scalar(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM public.{partition})"
        ))
        .fetch_one(owner)
        .await
        .expect("a day partition");
        if empty {
            sqlx::query(&format!("DROP TABLE public.{partition}"))
                .execute(owner)
                .await
                .expect("drop a day partition");
        }
    }
    sqlx::query("UPDATE usage_key_generations SET opened_at = $1 WHERE closed_at IS NULL")
        .bind(now())
        .execute(owner)
        .await
        .expect("open the key generation now");
}

/// The moto endpoint the tests use (`AWS_ENDPOINT_URL`, default `http://127.0.0.1:5055`).
pub fn moto_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:5055".into())
}

/// The Redis the tests use (`REDIS_URL`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn require_listening(what: &str, endpoint: &str, hint: &str) {
    let authority = endpoint
        .split("://")
        .nth(1)
        .unwrap_or(endpoint)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let addr = authority.rsplit('@').next().unwrap_or_default().to_owned();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&addr)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    assert!(reachable, "{what} is not reachable at {endpoint}: {hint}");
}

/// An SDK configuration pointing at moto, with its dummy credentials.
pub async fn moto_sdk_config() -> aws_config::SdkConfig {
    let endpoint = moto_endpoint();
    require_listening(
        "moto",
        &endpoint,
        "run scripts/test.sh or scripts/demo.sh (they start moto)",
    );
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "meterbridge-tests",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

pub fn require_redis() -> String {
    let url = redis_url();
    require_listening(
        "Redis",
        &url,
        "start it: redis-server --daemonize yes --port 6379 --save \"\"",
    );
    url
}

/// A pool on the same (per-test) database as `pool`, logged in as `role`.
pub async fn pool_as(pool: &PgPool, role: &str) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .username(role)
        .password("");
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("cannot connect as {role}: {e}"))
}

/// Runs the aggregation as the scheduled function does (as the ops role, "now" by the tests'
/// clock) until its watermark is past every stored event: a transaction open elsewhere on the
/// server, a parallel test's, may hold a run's watermark back for a moment.
pub async fn aggregate_until_caught_up(owner: &PgPool) {
    use crate::aggregation::{AggregationConfig, Aggregator};
    let ops = crate::Database::from_pool(pool_as(owner, OPS_ROLE).await);
    let aggregator = Aggregator::new(&ops, None, AggregationConfig::default());
    for _ in 0..600 {
        let report = aggregator
            .aggregate(now(), std::time::Instant::now() + Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("aggregation: {e}"));
        let newest: i64 = sqlx::query_scalar("SELECT coalesce(max(xact_id), 0) FROM usage_events")
            .fetch_one(owner)
            .await
            .unwrap_or_else(|e| panic!("newest xact: {e}"));
        if report.outcome == "done" && report.collected.watermark > newest {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the aggregation never caught up");
}

/// A fresh, uniquely named tenant (slug `<hint>-<random>`).
pub async fn create_tenant(owner: &PgPool, hint: &str) -> Tenant {
    let slug = TenantSlug::parse(&format!(
        "{hint}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ))
    .expect("test slug");
    tenants::insert(owner, &slug, hint)
        .await
        .expect("create tenant")
}

/// A key for `tenant`'s `source` service, with the default scopes of its trust.
pub async fn create_api_key(
    owner: &PgPool,
    tenant: &Tenant,
    source: &str,
    trust: Trust,
) -> NewApiKey {
    create_scoped_api_key(owner, tenant, source, trust, Scopes::default_for(trust)).await
}

/// A key for `tenant`'s `source` service with the given scopes.
pub async fn create_scoped_api_key(
    owner: &PgPool,
    tenant: &Tenant,
    source: &str,
    trust: Trust,
    scopes: Scopes,
) -> NewApiKey {
    let new_key = generate_api_key();
    let source = SourceService::parse(source).expect("test source");
    api_keys::insert(
        owner,
        tenant.id,
        &new_key.prefix,
        &new_key.hash,
        &source,
        trust,
        scopes,
    )
    .await
    .expect("create api key");
    new_key
}

/// A new, migrated database of its own on the cluster at `DATABASE_URL`, for tests that cannot
/// use `#[sqlx::test]` (which owns the async runtime): the caller drops it with
/// [`drop_database`].
pub async fn fresh_database() -> PgPool {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test cluster");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL");
    let name = format!("mb_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create database");
    let options = (*admin.connect_options()).clone().database(&name);
    admin.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect to the new database");
    crate::db::MIGRATOR.run(&pool).await.expect("migrations");
    pool
}

/// Drops a database made by [`fresh_database`].
pub async fn drop_database(pool: PgPool) {
    let name = database_name(&pool);
    let options = (*pool.connect_options()).clone().database("postgres");
    pool.close().await;
    if let Ok(admin) = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
    {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}

/// Applies the embedded migrations up to and including `version` (for tests of a later
/// migration against data written under an earlier schema).
pub async fn migrate_up_to(pool: &PgPool, version: i64) {
    let earlier = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            crate::db::MIGRATOR
                .iter()
                .filter(|m| m.version <= version)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    earlier.run(pool).await.expect("earlier migrations");
}

/// The per-test database's name.
pub fn database_name(pool: &PgPool) -> String {
    pool.connect_options()
        .get_database()
        .expect("the test pool names its database")
        .to_owned()
}

/// A `postgres://` URL for the same (per-test) database as `pool`, logged in as `role`.
pub fn database_url_as(pool: &PgPool, role: &str) -> String {
    let options = pool.connect_options();
    format!(
        "postgres://{role}@{}:{}/{}",
        options.get_host(),
        options.get_port(),
        database_name(pool)
    )
}

/// Replaces `{{NAME}}` placeholders in an event fixture.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |text, (name, value)| {
            text.replace(&format!("{{{{{name}}}}}"), value)
        })
}

/// An API Gateway (v2) request from its JSON, as Lambda would deliver it.
pub fn request_from_json(json: &str) -> lambda_http::Request {
    lambda_http::request::from_str(json).expect("an API Gateway v2 request")
}

/// A query-string component as a client sends it (API Gateway passes the decoded values in
/// `queryStringParameters`).
pub fn percent_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A handler's response, its body parsed as JSON (`Null` when empty).
pub struct Reply {
    pub status: lambda_http::http::StatusCode,
    pub headers: lambda_http::http::HeaderMap,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn of(response: lambda_http::Response<lambda_http::Body>) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes: Vec<u8> = match response.into_body() {
            lambda_http::Body::Text(t) => t.into_bytes(),
            lambda_http::Body::Binary(b) => b,
            _ => Vec::new(),
        };
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON response body")
        };
        Reply {
            status,
            headers,
            body,
        }
    }
}

/// A bus of the test's own in moto, with a rule routing our source to a queue.
pub struct Bus {
    pub name: String,
    pub queue_url: String,
    pub sqs: aws_sdk_sqs::Client,
}

impl Bus {
    pub async fn create(with_queue: bool) -> Bus {
        let sdk = moto_sdk_config().await;
        let events = aws_sdk_eventbridge::Client::new(&sdk);
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let name = format!("test-{}", uuid::Uuid::new_v4().simple());
        events
            .create_event_bus()
            .name(&name)
            .send()
            .await
            .expect("moto");
        let mut queue_url = String::new();
        if with_queue {
            queue_url = sqs
                .create_queue()
                .queue_name(&name)
                .send()
                .await
                .expect("moto")
                .queue_url()
                .expect("moto")
                .to_owned();
            let arn = sqs
                .get_queue_attributes()
                .queue_url(&queue_url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                .send()
                .await
                .expect("moto")
                .attributes()
                .expect("moto")[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
                .clone();
            events
                .put_rule()
                .name(&name)
                .event_bus_name(&name)
                .event_pattern(
                    serde_json::json!({"source": ["meterbridge.payments", "meterbridge.usage"]})
                        .to_string(),
                )
                .send()
                .await
                .expect("moto");
            events
                .put_targets()
                .rule(&name)
                .event_bus_name(&name)
                .targets(
                    aws_sdk_eventbridge::types::Target::builder()
                        .id("queue")
                        .arn(arn)
                        .build()
                        .expect("moto"),
                )
                .send()
                .await
                .expect("moto");
        }
        Bus {
            name,
            queue_url,
            sqs,
        }
    }

    /// The outbox relay as outbox-relay builds it (as meterbridge_ops, the default
    /// configuration but no deadline margin), publishing to this bus in moto.
    pub async fn relay(&self, owner: &PgPool) -> crate::relay::Relay {
        use crate::relay::{Relay, RelayConfig};
        let vars = std::collections::HashMap::from([
            ("DATABASE_URL", database_url_as(owner, OPS_ROLE)),
            ("EVENT_BUS_NAME", self.name.clone()),
            ("RELAY_DEADLINE_MARGIN_MS", "0".to_owned()),
        ]);
        let env = crate::config::Env::from_lookup(move |k| vars.get(k).cloned());
        let config = crate::Config::from(&env, "outbox-relay").expect("a relay configuration");
        let sdk = moto_sdk_config().await;
        let services = crate::Services::build_with_aws(config, Some(sdk.clone()))
            .await
            .expect("the relay's services");
        let events = Relay::eventbridge_client(&sdk, Duration::from_secs(10));
        Relay::new(
            services.db.clone(),
            events,
            RelayConfig::from(&env).expect("a relay configuration"),
        )
    }

    /// Every message on the queue (waits briefly for stragglers), each an EventBridge envelope.
    pub async fn drain(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut empty_polls = 0;
        while empty_polls < 2 {
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .expect("moto");
            let messages = received.messages();
            if messages.is_empty() {
                empty_polls += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            for m in messages {
                out.push(
                    serde_json::from_str(m.body().expect("a body"))
                        .expect("an EventBridge envelope"),
                );
                self.sqs
                    .delete_message()
                    .queue_url(&self.queue_url)
                    .receipt_handle(m.receipt_handle().expect("moto"))
                    .send()
                    .await
                    .expect("moto");
            }
        }
        out
    }
}

pub mod contract;

/// What the process logs from now on, as the functions format it, at the levels `rust_log`
/// asks for (the pinned crates' levels kept, see [`crate::telemetry::log_filter`]). Installs the
/// process's global subscriber: once per test process (nextest runs each test in its own).
pub fn capture_logs(rust_log: &str) -> CapturedLogs {
    let captured = CapturedLogs::default();
    let writer = captured.clone();
    crate::telemetry::json_logs(crate::telemetry::log_filter(Some(rust_log)), move || {
        writer.clone()
    })
    .try_init()
    .expect("the first log subscriber of this test process");
    captured
}

/// The log lines captured by [`capture_logs`].
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
