//! `tenant.erase`: a tenant disabled for its grace period leaves no row in any table that has a
//! `tenant_id` (live and archived days, dedup keys included), no Redis key under its hash tag
//! and no webhook signing secret — and another tenant keeps all of its; billing records can be
//! kept; cut short, it resumes with one receipt; replayed, it returns the receipt; refused with
//! nothing written for a tenant that is missing, active or inside its grace period, and for
//! hostile input.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use admin::offboard::WebhookSecrets;
use admin::{handle_event, Admin, AdminError};
use chrono::{DateTime, Utc};
use common::{aggregate_all, day};
use meterbridge::clock::FrozenClock;
use meterbridge::config::RedisSource;
use meterbridge::domain::{Tenant, Trust};
use meterbridge::redis::Redis;
use meterbridge::repo::tenant_erasures;
use meterbridge::testing::{
    archive, create_api_key, create_day_partitions, create_tenant, moto_sdk_config, redis_url,
};
use meterbridge::Database;
use serde_json::{json, Value};
use sqlx::PgPool;

/// Every table with a `tenant_id` (day and key partitions each on their own), but the receipts.
async fn tenant_tables(owner: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.oid::regclass::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
          WHERE n.nspname IN ('public', 'usage_archive') AND c.relkind = 'r'
            AND c.relname <> 'tenant_erasures'
          ORDER BY 1",
    )
    .fetch_all(owner)
    .await
    .unwrap()
}

/// The tenant's rows per table (day and key partitions summed under their parent).
async fn rows_of(owner: &PgPool, tenant: uuid::Uuid) -> BTreeMap<String, i64> {
    let mut rows = BTreeMap::new();
    for table in tenant_tables(owner).await {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE tenant_id = $1"
        ))
        .bind(tenant)
        .fetch_one(owner)
        .await
        .unwrap();
        let name = if table.contains("usage_events_p") {
            "usage_events".to_owned()
        } else if table.contains("usage_event_keys_") {
            "usage_event_keys".to_owned()
        } else {
            table
        };
        *rows.entry(name).or_default() += n;
    }
    let tenant_row: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(owner)
        .await
        .unwrap();
    rows.insert("tenants".into(), tenant_row);
    rows
}

/// A row of the tenant in every table that has a `tenant_id`, the way the functions write them.
async fn seed(admin: &Admin, owner: &PgPool, tenant: &Tenant) {
    let t = tenant.id.0;
    create_day_partitions(owner, day("2026-05-28"), day("2026-06-03")).await;
    let key = create_api_key(owner, tenant, "crm", Trust::Internal).await;
    for (at, actor) in [
        ("2026-05-29T10:00:00Z", "u-1"),
        ("2026-06-01T10:00:00Z", "u-1"),
        ("2026-06-02T10:00:00Z", "u-2"),
    ] {
        sqlx::query(
            "WITH e AS (
               INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at,
                                         actor_id, source_service, correlation_id,
                                         classification, payload_hash, operation_key)
               VALUES ($1, gen_random_uuid()::text, 'api.requests', 3, $2, $3, 'crm', 'c',
                       'BILLABLE', sha256('x'), gen_random_uuid())
               RETURNING tenant_id, occurred_at, seq)
             INSERT INTO usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
             SELECT (SELECT max(generation) FROM usage_key_generations WHERE closed_at IS NULL),
                    gen_random_uuid(), tenant_id, occurred_at, seq FROM e",
        )
        .bind(t)
        .bind(DateTime::parse_from_rfc3339(at).unwrap())
        .bind(actor)
        .execute(owner)
        .await
        .unwrap();
    }
    for statement in [
        "INSERT INTO payments (tenant_id, id, amount_minor, currency, provider, correlation_id,
                               source_service, description)
         VALUES ($1, gen_random_uuid(), 100, 'USD', 'stripe', 'c', 'billing', 'a payer''s order')",
        "INSERT INTO payment_audit (tenant_id, payment_id, action, accepted, actor, reason,
                                    correlation_id)
         SELECT $1, id, 'create', true, 'admin', 'created', 'c' FROM payments
          WHERE tenant_id = $1",
        "INSERT INTO idempotency_records (tenant_id, source_service, idempotency_key, operation,
                                          request_hash, response_status, response_body)
         VALUES ($1, 'billing', 'k-1', 'payment.create', sha256('r'), 201, '{}')",
        "INSERT INTO webhook_events (tenant_id, provider, event_id, event_type, outcome)
         VALUES ($1, 'stripe', 'evt_1', 'charge.succeeded', 'applied')",
        "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service, status)
         VALUES ($1, gen_random_uuid(), 'payment.paid', 1, '{}', 'c', gen_random_uuid()::text,
                 'payment', gen_random_uuid(), 1, 'billing', 'PUBLISHED')",
    ] {
        sqlx::query(statement).bind(t).execute(owner).await.unwrap();
    }
    // Limits (tenant and key), a subject erasure, period events, a usage limit: through the
    // admin actions.
    for payload in [
        json!({"action": "tenant.limits.set", "tenant": tenant.slug.as_str(),
               "requestsPerSecond": 50, "reason": "seed"}),
        json!({"action": "tenant.limits.set", "tenant": tenant.slug.as_str(),
               "apiKeyPrefix": key.prefix, "requestsPerSecond": 5, "reason": "seed"}),
        json!({"action": "subject.erase", "tenant": tenant.slug.as_str(), "actorId": "u-2",
               "requestId": "DSAR-1", "reason": "seed"}),
        json!({"action": "usage.period-events.set", "tenant": tenant.slug.as_str(),
               "periods": ["monthly"], "reason": "seed"}),
        json!({"action": "meter.set", "tenant": tenant.slug.as_str(), "slug": "calls",
               "eventType": "api-calls", "metric": "api.requests", "reason": "seed"}),
        // Crossed by the seeded events: the aggregation records the crossings.
        json!({"action": "usage.limits.set", "tenant": tenant.slug.as_str(),
               "metric": "api.requests", "period": "monthly", "limit": 5, "thresholds": [50],
               "reason": "seed"}),
    ] {
        handle_event(admin, payload.clone())
            .await
            .unwrap_or_else(|e| panic!("{payload}: {e}"));
    }
}

/// The tenants' events aggregated, their oldest day moved to the archive, and a cell of each
/// left waiting in the aggregation's queue.
async fn aggregate_and_archive(admin: &Admin, owner: &PgPool) {
    aggregate_all(admin, owner).await;
    archive(owner, "2026-05-29").await;
    sqlx::query(
        "INSERT INTO usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
         SELECT 'daily', '2026-06-02', id, 'api.requests', 'backfill' FROM tenants",
    )
    .execute(owner)
    .await
    .unwrap();
}

/// Redis keys of the tenant as the functions write them: a counter, a rate-limit bucket, an
/// in-flight slot.
async fn redis_keys(tenant: uuid::Uuid) -> Vec<String> {
    let keys = vec![
        format!("usage:{{{tenant}}}:2026-06-01:api.requests"),
        format!("tenant:api:rate-limit:{{{tenant}}}:ingest:requests"),
        format!("tenant:api:in-flight:{{{tenant}}}:ingest"),
    ];
    let mut conn = redis_conn().await;
    for k in &keys {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    keys
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn existing(keys: &[String]) -> usize {
    let mut conn = redis_conn().await;
    let mut n = 0;
    for k in keys {
        let e: bool = redis::cmd("EXISTS")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        n += usize::from(e);
    }
    n
}

/// The admin function as configured in AWS: Redis, Secrets Manager (moto) under a prefix of
/// this test's own.
async fn admin(owner: &PgPool) -> (Admin, WebhookSecrets) {
    let mut admin = Admin::new(Database::from_pool(owner.clone()));
    admin.redis = Some(Redis::new(
        RedisSource::Url(redis_url()),
        None,
        Duration::from_secs(2),
    ));
    let secrets = WebhookSecrets {
        client: aws_sdk_secretsmanager::Client::new(&moto_sdk_config().await),
        prefix: format!(
            "meterbridge/test-{}/webhooks",
            uuid::Uuid::new_v4().simple()
        ),
    };
    admin.webhook_secrets = Some(secrets.clone());
    (admin, secrets)
}

async fn put_secret(secrets: &WebhookSecrets, provider: &str, slug: &str) -> String {
    let name = format!("{}/{provider}/{slug}", secrets.prefix);
    secrets
        .client
        .create_secret()
        .name(&name)
        .secret_string(r#"{"signingSecrets":["whsec_test"]}"#)
        .send()
        .await
        .unwrap();
    name
}

async fn secret_exists(secrets: &WebhookSecrets, name: &str) -> bool {
    secrets
        .client
        .get_secret_value()
        .secret_id(name)
        .send()
        .await
        .is_ok()
}

/// Disables the tenant; the admin's clock then stands `days` after it.
async fn disable(admin: &mut Admin, owner: &PgPool, tenant: &Tenant, days: i64) {
    handle_event(
        admin,
        json!({"action": "tenant.disable", "slug": tenant.slug.as_str()}),
    )
    .await
    .unwrap();
    let at: DateTime<Utc> = sqlx::query_scalar("SELECT disabled_at FROM tenants WHERE id = $1")
        .bind(tenant.id.0)
        .fetch_one(owner)
        .await
        .unwrap();
    admin.clock = FrozenClock::at(at + chrono::Duration::days(days));
}

async fn erase(admin: &Admin, payload: Value) -> Result<Value, AdminError> {
    handle_event(admin, payload).await
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_tenant_erase_leaves_nothing_of_the_tenant_and_touches_no_other(owner: PgPool) {
    let (mut admin, secrets) = admin(&owner).await;
    admin.clock = FrozenClock::at("2026-06-03T00:00:00Z".parse().unwrap());
    let gone = create_tenant(&owner, "leaving").await;
    let other = create_tenant(&owner, "staying").await;
    seed(&admin, &owner, &gone).await;
    seed(&admin, &owner, &other).await;
    aggregate_and_archive(&admin, &owner).await;
    // The seed reaches every table that has a tenant_id: a new one must be seeded here.
    let before = rows_of(&owner, gone.id.0).await;
    let empty: Vec<&String> = before
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(t, _)| t)
        .collect();
    assert!(
        empty.is_empty(),
        "tables the seed does not reach: {empty:?}"
    );
    let others_before = rows_of(&owner, other.id.0).await;
    let gone_keys = redis_keys(gone.id.0).await;
    let other_keys = redis_keys(other.id.0).await;
    let gone_secrets = [
        put_secret(&secrets, "stripe", gone.slug.as_str()).await,
        put_secret(&secrets, "paddle", gone.slug.as_str()).await,
    ];
    let other_secret = put_secret(&secrets, "stripe", other.slug.as_str()).await;

    disable(&mut admin, &owner, &gone, 31).await;
    let payload = json!({"action": "tenant.erase", "tenant": gone.slug.as_str(),
                         "reason": "contract ended", "requestedBy": "ops@example.com"});
    // An earlier invocation was cut short after a few steps of the rows phase.
    let started = tenant_erasures::start(
        &owner,
        &tenant_erasures::Request {
            tenant: gone.id,
            slug: gone.slug.as_str(),
            reason: "contract ended",
            requested_by: "ops@example.com",
            keep_billing: false,
        },
    )
    .await
    .unwrap();
    for _ in 0..3 {
        assert!(tenant_erasures::table_step(&owner, &started, 1, 1)
            .await
            .unwrap());
    }
    let done = erase(&admin, payload.clone()).await.unwrap();
    assert_eq!(done["finished"], true, "{done}");
    let receipt = &done["erasure"];
    assert_eq!(receipt["phase"], "done");
    assert_eq!(receipt["redisKeys"], 3, "{receipt}");
    assert_eq!(receipt["secretsDeleted"], 2, "{receipt}");
    // Every row counted once in the receipt, under its table.
    let deleted = &receipt["rowsDeleted"];
    for (table, n) in &before {
        assert_eq!(deleted[table], *n, "{table}: {receipt}");
    }

    // Nothing of the tenant is left; the other tenant has all it had.
    let after = rows_of(&owner, gone.id.0).await;
    assert!(after.values().all(|n| *n == 0), "{after:?}");
    assert_eq!(rows_of(&owner, other.id.0).await, others_before);
    assert_eq!(existing(&gone_keys).await, 0);
    assert_eq!(existing(&other_keys).await, other_keys.len());
    for name in &gone_secrets {
        assert!(!secret_exists(&secrets, name).await, "{name}");
    }
    assert!(secret_exists(&secrets, &other_secret).await);

    // Replayed: the receipt, nothing else (the tenant's row is gone, its slug found in it).
    let again = erase(&admin, payload).await.unwrap();
    assert_eq!(again, done);
    let receipts: i64 = sqlx::query_scalar("SELECT count(*) FROM tenant_erasures")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(receipts, 1);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_tenant_erase_can_keep_the_billing_records(owner: PgPool) {
    let (mut admin, _secrets) = admin(&owner).await;
    admin.clock = FrozenClock::at("2026-06-03T00:00:00Z".parse().unwrap());
    let tenant = create_tenant(&owner, "billed").await;
    seed(&admin, &owner, &tenant).await;
    aggregate_and_archive(&admin, &owner).await;
    let before = rows_of(&owner, tenant.id.0).await;
    disable(&mut admin, &owner, &tenant, 30).await;
    let payload = json!({"action": "tenant.erase", "tenant": tenant.slug.as_str(),
                         "reason": "contract ended", "keepBilling": true});
    let done = erase(&admin, payload.clone()).await.unwrap();
    assert_eq!(done["finished"], true, "{done}");
    assert_eq!(done["erasure"]["keepBilling"], true);
    let after = rows_of(&owner, tenant.id.0).await;
    for (table, n) in &after {
        let kept = ["usage_aggregates", "payments", "payment_audit", "tenants"];
        if kept.contains(&table.as_str()) {
            assert_eq!(n, &before[table], "{table} kept");
        } else {
            assert_eq!(*n, 0, "{table} emptied");
        }
    }
    // A backfill over its days leaves its kept rollups as they are (no events to recompute
    // them from).
    let rollups = |owner: PgPool| async move {
        sqlx::query_as::<_, (String, String, String, String)>(
            "SELECT period_type, period_start::text, total_quantity::text, event_count::text
               FROM usage_aggregates ORDER BY 1, 2",
        )
        .fetch_all(&owner)
        .await
        .unwrap()
    };
    let kept = rollups(owner.clone()).await;
    assert!(!kept.is_empty());
    let backfill = json!({"action": "usage.backfill", "from": "2026-05-01", "to": "2026-06-30"});
    erase(&admin, backfill).await.unwrap();
    assert_eq!(rollups(owner.clone()).await, kept);

    // The tenant stays, erased: no new key, disabling it again changes nothing, the receipt on
    // replay.
    let listed = erase(&admin, json!({"action": "tenant.list"}))
        .await
        .unwrap();
    let status = listed["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["slug"] == tenant.slug.as_str())
        .unwrap()["status"]
        .clone();
    assert_eq!(status, "erased");
    let err = erase(
        &admin,
        json!({"action": "api-key.create", "tenant": tenant.slug.as_str(),
               "source": "crm", "trust": "internal"}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.error_type(), "Conflict", "{err}");
    erase(
        &admin,
        json!({"action": "tenant.disable", "slug": tenant.slug.as_str()}),
    )
    .await
    .unwrap();
    assert_eq!(erase(&admin, payload).await.unwrap(), done);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn a_tenant_erase_is_refused_before_anything_is_written(owner: PgPool) {
    let (mut admin, _secrets) = admin(&owner).await;
    let tenant = create_tenant(&owner, "acme").await;
    let ok = json!({"action": "tenant.erase", "tenant": tenant.slug.as_str(), "reason": "gone"});
    let with = |field: &str, value: Value| {
        let mut p = ok.clone();
        p[field] = value;
        p
    };
    // Active: disable it first.
    let err = erase(&admin, ok.clone()).await.unwrap_err();
    assert_eq!(err.error_type(), "Conflict", "{err}");
    assert!(err.to_string().contains("disable it first"), "{err}");
    // Inside its grace period (30 days by default).
    disable(&mut admin, &owner, &tenant, 29).await;
    let err = erase(&admin, ok.clone()).await.unwrap_err();
    assert_eq!(err.error_type(), "Conflict", "{err}");
    assert!(err.to_string().contains("grace period ends"), "{err}");
    admin.clock = FrozenClock::at(
        sqlx::query_scalar::<_, DateTime<Utc>>("SELECT disabled_at FROM tenants")
            .fetch_one(&owner)
            .await
            .unwrap()
            + chrono::Duration::days(31),
    );
    let cases = [
        (with("tenant", json!("no-such-tenant")), "NotFound"),
        (with("tenant", json!("x".repeat(10_000))), "NotFound"),
        (with("tenant", json!(7)), "BadRequest"),
        (with("reason", json!("")), "BadRequest"),
        (with("reason", json!("r".repeat(501))), "BadRequest"),
        (with("reason", json!("why\nnot")), "BadRequest"),
        (with("requestedBy", json!("b".repeat(200))), "BadRequest"),
        (with("keepBilling", json!("yes")), "BadRequest"),
        (with("unexpected", json!(true)), "BadRequest"),
    ];
    for (payload, kind) in cases {
        let err = erase(&admin, payload.clone()).await.unwrap_err();
        assert_eq!(err.error_type(), kind, "{payload}: {err}");
    }
    let receipts: i64 = sqlx::query_scalar("SELECT count(*) FROM tenant_erasures")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(receipts, 0, "nothing written");

    // Without Redis the erasure stops before its Redis keys (rows gone, receipt open); the same
    // request resumes once Redis is configured. Another keepBilling mid-way is refused.
    let redis = admin.redis.take();
    let err = erase(&admin, ok.clone()).await.unwrap_err();
    assert_eq!(err.error_type(), "BadRequest", "{err}");
    assert!(err.to_string().contains("REDIS_SECRET_ID"), "{err}");
    let open = tenant_erasures::find(&owner, tenant.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(open.phase, "redis");
    let err = erase(&admin, with("keepBilling", json!(true)))
        .await
        .unwrap_err();
    assert_eq!(err.error_type(), "Conflict", "{err}");
    admin.redis = redis;
    let done = erase(&admin, ok).await.unwrap();
    assert_eq!(done["finished"], true, "{done}");
}
