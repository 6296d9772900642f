//! Row-level security, proven against the real roles: each API function's role sees and
//! changes only the tenant its transaction names, nothing at all without one, and never the
//! tables of the other function.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

use meterbridge::auth::{hashes_match, parse_presented_key};
use meterbridge::domain::{TenantStatus, Trust};
use meterbridge::repo::{api_keys, tenants};
use meterbridge::testing::{
    create_api_key, create_tenant, pool_as, INGEST_ROLE, OPS_ROLE, PAYMENTS_ROLE,
};
use meterbridge::Database;
use sqlx::PgPool;

async fn count(executor: impl sqlx::PgExecutor<'_>, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(executor)
        .await
        .expect("count")
}

/// One event and one payment for `tenant`, written as the owner.
async fn seed(owner: &PgPool, tenant: uuid::Uuid) {
    meterbridge::testing::create_partitions_around_now(owner).await;
    sqlx::query(
        "INSERT INTO usage_events (tenant_id, event_id, metric, quantity, occurred_at,
                                   source_service, correlation_id, classification, payload_hash,
                                   operation_key)
         VALUES ($1, gen_random_uuid()::text, 'api.requests', 1, $2, 'crm', 'c', 'BILLABLE',
                 sha256('x'), gen_random_uuid())",
    )
    .bind(tenant)
    .bind(meterbridge::testing::now())
    .execute(owner)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO payments (tenant_id, id, amount_minor, currency, provider, correlation_id,
                               source_service)
         VALUES ($1, gen_random_uuid(), 100, 'USD', 'stripe', 'c', 'billing')",
    )
    .bind(tenant)
    .execute(owner)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_api_role_without_a_tenant_reads_nothing(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    seed(&owner, acme.id.0).await;
    for (role, table) in [(INGEST_ROLE, "usage_events"), (PAYMENTS_ROLE, "payments")] {
        let pool = pool_as(&owner, role).await;
        assert_eq!(count(&pool, table).await, 0, "{role}");
        // A transaction that set a tenant does not leak it to the next one on the connection.
        let db = Database::from_pool(pool.clone());
        let mut tx = db.tenant_tx(acme.id).await.unwrap();
        assert_eq!(count(&mut *tx, table).await, 1, "{role}");
        tx.commit().await.unwrap();
        assert_eq!(count(&pool, table).await, 0, "{role}");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn an_api_role_sees_only_the_tenant_it_acts_for(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    seed(&owner, acme.id.0).await;
    seed(&owner, globex.id.0).await;
    seed(&owner, globex.id.0).await;
    for (role, table) in [(INGEST_ROLE, "usage_events"), (PAYMENTS_ROLE, "payments")] {
        let db = Database::from_pool(pool_as(&owner, role).await);
        for (tenant, rows) in [(acme.id, 1), (globex.id, 2)] {
            let mut tx = db.tenant_tx(tenant).await.unwrap();
            assert_eq!(count(&mut *tx, table).await, rows, "{role}");
            let other: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE tenant_id <> $1"
            ))
            .bind(tenant)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            assert_eq!(other, 0, "{role} sees another tenant's {table}");
            tx.rollback().await.unwrap();
        }
        // Neither reads tenants or keys: both are reached only through the definer functions.
        let mut tx = db.tenant_tx(acme.id).await.unwrap();
        let own_keys = api_keys::list_for_tenant(&mut *tx, acme.id).await;
        assert_eq!(
            own_keys.unwrap_err().sqlstate().as_deref(),
            Some("42501"),
            "{role} may not read api_keys"
        );
        tx.rollback().await.unwrap();
        let mut tx = db.tenant_tx(acme.id).await.unwrap();
        let own_tenant = tenants::find(&mut *tx, acme.id).await;
        assert_eq!(
            own_tenant.unwrap_err().sqlstate().as_deref(),
            Some("42501"),
            "{role} may not read tenants"
        );
    }
}

/// Each API function's role is confined to its own tables: ingestion can neither read nor
/// write a payment, nor write an outbox row other than its own tenant's threshold events (a
/// payment's event is refused by the policy), payments can neither read nor write usage.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn each_api_role_keeps_to_its_own_tables(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    seed(&owner, acme.id.0).await;
    let attempts: [(&str, &[&str]); 2] = [
        (
            INGEST_ROLE,
            &[
                "SELECT count(*) FROM payments",
                "UPDATE payments SET status = 'PAID_VERIFIED'",
                "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version,
                     payload, correlation_id, idempotency_key, aggregate_type, aggregate_id,
                     aggregate_sequence, source_service)
                 VALUES (current_tenant_id(), gen_random_uuid(), 'payment.paid', 1, '{}', 'c',
                         'k', 'payment', gen_random_uuid(), 1, 'crm')",
                "UPDATE outbox_events SET status = 'PUBLISHED'",
                "SELECT count(*) FROM payment_audit",
                "SELECT count(*) FROM webhook_events",
                "SELECT webhook_tenant('acme')",
            ],
        ),
        (
            PAYMENTS_ROLE,
            &[
                "SELECT count(*) FROM usage_events",
                "UPDATE usage_events SET voided_at = now(), voided_by = 'x', void_reason = 'x'",
                "SELECT count(*) FROM usage_event_keys",
                "SELECT count(*) FROM usage_aggregates",
                "SELECT count(*) FROM metrics",
            ],
        ),
    ];
    for (role, statements) in attempts {
        let db = Database::from_pool(pool_as(&owner, role).await);
        for statement in statements {
            let mut tx = db.tenant_tx(acme.id).await.unwrap();
            let err = sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .expect_err(statement);
            // Ingestion may append its threshold events to the outbox: a payment's event is
            // refused by the row policy rather than by the grant.
            let refused = err.to_string().contains("permission denied")
                || (statement.contains("INSERT INTO outbox_events")
                    && err.to_string().contains("row-level security"));
            assert!(refused, "{role}: {statement}: {err}");
        }
    }
    let (status, events): (String, i64) = sqlx::query_as(
        "SELECT (SELECT status FROM payments), (SELECT count(*) FROM outbox_events)",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert_eq!((status.as_str(), events), ("PENDING", 0));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn api_roles_write_nothing_to_tenant_tables(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    for role in [INGEST_ROLE, PAYMENTS_ROLE] {
        let db = Database::from_pool(pool_as(&owner, role).await);
        for tenant in [None, Some(globex.id), Some(acme.id)] {
            let mut tx = match tenant {
                Some(t) => db.tenant_tx(t).await.unwrap(),
                None => db.begin().await.unwrap(),
            };
            let update = sqlx::query("UPDATE tenants SET name = 'pwned' WHERE id = $1")
                .bind(acme.id)
                .execute(&mut *tx)
                .await;
            assert!(update.is_err(), "{role} may not update tenants");
            tx.rollback().await.unwrap();

            let mut tx = db.begin().await.unwrap();
            let insert = sqlx::query(
                "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust)
                 VALUES ($1, '0123456789ab', decode(repeat('00', 32), 'hex'), 'x', 'internal')",
            )
            .bind(acme.id)
            .execute(&mut *tx)
            .await;
            assert!(insert.is_err(), "{role} may not create keys");
        }
    }
    assert_eq!(
        tenants::find(&owner, acme.id).await.unwrap().unwrap().name,
        "acme"
    );
    assert_eq!(count(&owner, "api_keys").await, 0);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn ops_role_crosses_tenants(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    let ops = pool_as(&owner, OPS_ROLE).await;
    let listed = tenants::list(&ops).await.unwrap();
    assert!(listed.contains(&acme) && listed.contains(&globex));
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn api_role_authenticates_keys_before_knowing_its_tenant(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let key = create_api_key(&owner, &acme, "crm", Trust::External).await;
    let api = pool_as(&owner, PAYMENTS_ROLE).await;

    let presented = parse_presented_key(&key.key).unwrap();
    let candidate = api_keys::find_candidate(&api, &presented.prefix)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(candidate.tenant_id, acme.id);
    assert_eq!(candidate.trust, Trust::External);
    assert_eq!(candidate.source_service.as_str(), "crm");
    assert_eq!(candidate.tenant_status, TenantStatus::Active);
    assert!(!candidate.revoked);
    assert!(hashes_match(&presented.hash, &candidate.key_hash));
    assert!(api_keys::find_candidate(&api, "ffffffffffff")
        .await
        .unwrap()
        .is_none());

    api_keys::touch(&api, candidate.key_id).await.unwrap();
    let listed = api_keys::list_for_tenant(&owner, acme.id).await.unwrap();
    assert!(listed[0].last_used_at.is_some());
}

/// Every table that holds a tenant's rows has RLS on, and no API-role policy ignores the tenant.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn every_tenant_owned_table_is_bound_by_rls(owner: PgPool) {
    let unprotected: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relrowsecurity
            AND (c.relname = 'tenants' OR EXISTS (
                 SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'))",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(
        unprotected.is_empty(),
        "tables without RLS: {unprotected:?}"
    );

    // (An INSERT policy has only its WITH CHECK.)
    let loose: Vec<String> = sqlx::query_scalar(
        "SELECT tablename || '.' || policyname FROM pg_policies
          WHERE schemaname = 'public'
            AND roles && ARRAY['meterbridge_ingest', 'meterbridge_payments']::name[]
            AND (coalesce(qual, with_check) IS NULL
                 OR coalesce(qual, with_check) NOT LIKE '%current_tenant_id()%')",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(
        loose.is_empty(),
        "API policies that ignore the tenant: {loose:?}"
    );

    let privileged: bool = sqlx::query_scalar(
        "SELECT bool_or(rolsuper OR rolbypassrls) FROM pg_roles
          WHERE rolname IN ('meterbridge_api', 'meterbridge_ingest', 'meterbridge_payments',
                            'meterbridge_ops')",
    )
    .fetch_one(&owner)
    .await
    .unwrap();
    assert!(!privileged, "application roles must not bypass RLS");
}

/// Running the migrations again (another database on the same cluster, or a retry) is harmless.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn migrations_are_repeatable(owner: PgPool) {
    meterbridge::db::MIGRATOR.run(&owner).await.unwrap();
    let sql = include_str!("../../migrations/0001_foundation.sql");
    let roles_block = &sql[sql.find("DO $$").unwrap()..sql.find("GRANT USAGE").unwrap()];
    sqlx::raw_sql(roles_block).execute(&owner).await.unwrap();
}
