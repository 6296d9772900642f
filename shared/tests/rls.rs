//! Row-level security, proven against the real roles: the API role sees and changes only the
//! tenant its transaction names, and nothing at all without one.

use meterbridge::auth::{hashes_match, parse_presented_key};
use meterbridge::domain::{TenantStatus, Trust};
use meterbridge::repo::{api_keys, tenants};
use meterbridge::testing::{create_api_key, create_tenant, pool_as, API_ROLE, OPS_ROLE};
use meterbridge::Database;
use sqlx::PgPool;

async fn count(executor: impl sqlx::PgExecutor<'_>, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(executor)
        .await
        .expect("count")
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn api_role_without_a_tenant_reads_nothing(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    create_api_key(&owner, &acme, "crm", Trust::Internal).await;
    let api = pool_as(&owner, API_ROLE).await;

    assert_eq!(count(&api, "tenants").await, 0);
    assert_eq!(count(&api, "usage_events").await, 0);
    // A transaction that set a tenant does not leak it to the next one on the same connection.
    let db = Database::from_pool(api.clone());
    let mut tx = db.tenant_tx(acme.id).await.unwrap();
    assert_eq!(count(&mut *tx, "tenants").await, 1);
    tx.commit().await.unwrap();
    assert_eq!(count(&api, "tenants").await, 0);
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn api_role_sees_only_the_tenant_it_acts_for(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    create_api_key(&owner, &acme, "crm", Trust::Internal).await;
    create_api_key(&owner, &globex, "crm", Trust::Internal).await;
    create_api_key(&owner, &globex, "web", Trust::External).await;
    let db = Database::from_pool(pool_as(&owner, API_ROLE).await);

    let mut tx = db.tenant_tx(acme.id).await.unwrap();
    assert_eq!(tenants::list(&mut *tx).await.unwrap(), vec![acme.clone()]);
    assert!(tenants::find(&mut *tx, globex.id).await.unwrap().is_none());
    tx.rollback().await.unwrap();

    let mut tx = db.tenant_tx(globex.id).await.unwrap();
    assert_eq!(tenants::list(&mut *tx).await.unwrap(), vec![globex.clone()]);
    assert!(tenants::find(&mut *tx, acme.id).await.unwrap().is_none());
    tx.rollback().await.unwrap();

    // Keys are read only through authenticate_api_key(): not even the tenant's own.
    let mut tx = db.tenant_tx(acme.id).await.unwrap();
    let own_keys = api_keys::list_for_tenant(&mut *tx, acme.id).await;
    assert_eq!(
        own_keys.unwrap_err().sqlstate().as_deref(),
        Some("42501"),
        "the API role may not read api_keys"
    );
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn api_role_writes_nothing_to_tenant_tables(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    let db = Database::from_pool(pool_as(&owner, API_ROLE).await);

    for tenant in [None, Some(globex.id), Some(acme.id)] {
        let mut tx = match tenant {
            Some(t) => db.tenant_tx(t).await.unwrap(),
            None => db.begin().await.unwrap(),
        };
        let update = sqlx::query("UPDATE tenants SET name = 'pwned' WHERE id = $1")
            .bind(acme.id)
            .execute(&mut *tx)
            .await;
        assert!(update.is_err(), "API role may not update tenants");
        tx.rollback().await.unwrap();

        let mut tx = db.begin().await.unwrap();
        let insert = sqlx::query(
            "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust)
             VALUES ($1, '0123456789ab', decode(repeat('00', 32), 'hex'), 'x', 'internal')",
        )
        .bind(acme.id)
        .execute(&mut *tx)
        .await;
        assert!(insert.is_err(), "API role may not create keys");
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
    let api = pool_as(&owner, API_ROLE).await;

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

    let loose: Vec<String> = sqlx::query_scalar(
        "SELECT tablename || '.' || policyname FROM pg_policies
          WHERE schemaname = 'public' AND 'meterbridge_api' = ANY(roles)
            AND (qual IS NULL OR qual NOT LIKE '%current_tenant_id()%')",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    assert!(
        loose.is_empty(),
        "API policies that ignore the tenant: {loose:?}"
    );

    let privileged: bool = sqlx::query_scalar(
        "SELECT bool_or(rolsuper OR rolbypassrls) FROM pg_roles WHERE rolname IN ('meterbridge_api', 'meterbridge_ops')",
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
