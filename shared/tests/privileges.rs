//! Least privilege, proven from the catalog: every privilege each application role holds is in
//! the reviewed list below (a migration that widens a role fails here until the list is
//! reviewed), and the SECURITY DEFINER functions cannot be hijacked through temporary objects.

use meterbridge::domain::Trust;
use meterbridge::repo::api_keys;
use meterbridge::testing::{
    create_api_key, create_tenant, database_name, pool_as, INGEST_ROLE, OPS_ROLE, PAYMENTS_ROLE,
};
use sqlx::PgPool;

/// The reviewed list. Change it only together with the migration that needs the change, and
/// say in that migration why the role needs it.
const REVIEWED: &[&str] = &[
    // The retired shared API role (one per function since migration 0013): nothing in this
    // database. The role is cluster-wide, so it may still log in elsewhere on the instance.
    "meterbridge_api: ROLE LOGIN",
    // ingest-usage's role (migration 0013): connects; authenticates only through the two
    // SECURITY DEFINER functions; inserts its own tenant's usage events naming the columns it
    // may write (never xact_id, aggregation's change marker: a forged low value would hide a
    // row; nor seq or created_at), voids them (the three void columns only), writes and probes
    // its own tenant's dedup keys (never updates or deletes one: expiry drops whole generations
    // as the owner), reads which generation is open, where the closed ones are and their
    // levels' Bloom filters (0015: bits no tenant reads back, every "maybe" is confirmed
    // against the tenant-bound key table), reads the catalog and its own tenant's rollups. Nothing of payments
    // or tenants. Usage limits (0026): reads its own tenant's limits, records its own tenant's
    // threshold crossings (as detected by ingestion) and appends their events to the outbox
    // (usage.threshold.crossed only, its own tenant only: never a payment's event); reads the
    // aggregation's watermark (the limits' PostgreSQL fallback). Meters (0027): reads its own
    // tenant's, to map CloudEvents.
    "meterbridge_ingest: CONNECT ON DATABASE",
    "meterbridge_ingest: EXECUTE ON FUNCTION api_key_rate_limits(uuid,bytea)",
    "meterbridge_ingest: EXECUTE ON FUNCTION authenticate_api_key(text)",
    "meterbridge_ingest: EXECUTE ON FUNCTION current_tenant_id()",
    "meterbridge_ingest: EXECUTE ON FUNCTION touch_api_key(uuid)",
    "meterbridge_ingest: EXECUTE ON FUNCTION usage_event_under_erasure(uuid,text)",
    "meterbridge_ingest: EXECUTE ON FUNCTION usage_key_level_bit(uuid,integer)",
    "meterbridge_ingest: EXECUTE ON FUNCTION usage_key_level_block(uuid,integer)",
    "meterbridge_ingest: EXECUTE ON FUNCTION usage_key_level_maybe(bit varying,integer,uuid)",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.actor_id",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.classification",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.correlation_id",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.event_id",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.idempotency_key",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.metadata",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.metric",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.occurred_at",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.operation_key",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.payload_hash",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.quantity",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.source_service",
    "meterbridge_ingest: INSERT ON COLUMN usage_events.tenant_id",
    "meterbridge_ingest: INSERT ON TABLE usage_event_keys",
    "meterbridge_ingest: POLICY api_own_tenant ALL ON usage_event_keys USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_ingest: POLICY api_own_tenant ALL ON usage_events USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_ingest: POLICY api_own_tenant SELECT ON usage_aggregates USING (tenant_id = current_tenant_id())",
    "meterbridge_ingest: ROLE LOGIN",
    "meterbridge_ingest: SELECT ON TABLE metrics",
    "meterbridge_ingest: SELECT ON TABLE usage_aggregates",
    "meterbridge_ingest: SELECT ON TABLE usage_event_keys",
    "meterbridge_ingest: SELECT ON TABLE usage_events",
    "meterbridge_ingest: SELECT ON TABLE usage_key_filter_slices",
    "meterbridge_ingest: SELECT ON TABLE usage_key_generations",
    "meterbridge_ingest: SELECT ON TABLE usage_key_levels",
    "meterbridge_ingest: SELECT ON TABLE usage_key_parts",
    "meterbridge_ingest: SET idle_in_transaction_session_timeout=30s",
    "meterbridge_ingest: SET jit=off",
    "meterbridge_ingest: SET lock_timeout=5s",
    "meterbridge_ingest: SET statement_timeout=30s",
    "meterbridge_ingest: UPDATE ON COLUMN usage_events.void_reason",
    "meterbridge_ingest: UPDATE ON COLUMN usage_events.voided_at",
    "meterbridge_ingest: UPDATE ON COLUMN usage_events.voided_by",
    "meterbridge_ingest: POLICY api_own_tenant SELECT ON meters USING (tenant_id = current_tenant_id())",
    "meterbridge_ingest: SELECT ON TABLE meters",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.aggregate_id",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.aggregate_sequence",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.aggregate_type",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.correlation_id",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.created_at",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.event_id",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.event_type",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.idempotency_key",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.payload",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.schema_version",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.source_service",
    "meterbridge_ingest: INSERT ON COLUMN outbox_events.tenant_id",
    "meterbridge_ingest: INSERT ON TABLE usage_threshold_crossings",
    "meterbridge_ingest: POLICY api_own_tenant ALL ON usage_threshold_crossings USING (tenant_id = current_tenant_id()) WITH CHECK ((tenant_id = current_tenant_id()) AND (detected_by = 'ingestion'::text))",
    "meterbridge_ingest: POLICY api_own_tenant SELECT ON usage_limits USING (tenant_id = current_tenant_id())",
    "meterbridge_ingest: POLICY ingest_threshold_events INSERT ON outbox_events WITH CHECK ((tenant_id = current_tenant_id()) AND (aggregate_type = 'usage_threshold'::text) AND (event_type = 'usage.threshold.crossed'::text))",
    "meterbridge_ingest: SELECT ON COLUMN usage_aggregation_state.watermark",
    "meterbridge_ingest: SELECT ON TABLE usage_limits",
    "meterbridge_ingest: SELECT ON TABLE usage_threshold_crossings",
    "meterbridge_ingest: USAGE ON SCHEMA public",
    // verify-payment's role (migration 0013): connects; authenticates through the definer
    // functions and finds a webhook's tenant through webhook_tenant(); inserts and reads its own
    // tenant's payments, audit rows, outbox events, webhook events and idempotency records;
    // changes only the columns a payment transition writes (0012: failed attempts counted),
    // and of its own fresh outbox event only the delivery columns (the fast path; never
    // published_at, which the server stamps); reads the currencies. Nothing of usage, nothing
    // deleted, tenants and keys never read.
    "meterbridge_payments: CONNECT ON DATABASE",
    "meterbridge_payments: EXECUTE ON FUNCTION api_key_rate_limits(uuid,bytea)",
    "meterbridge_payments: EXECUTE ON FUNCTION authenticate_api_key(text)",
    "meterbridge_payments: EXECUTE ON FUNCTION current_tenant_id()",
    "meterbridge_payments: EXECUTE ON FUNCTION touch_api_key(uuid)",
    "meterbridge_payments: EXECUTE ON FUNCTION webhook_tenant(text)",
    "meterbridge_payments: INSERT ON TABLE idempotency_records",
    "meterbridge_payments: INSERT ON TABLE outbox_events",
    "meterbridge_payments: INSERT ON TABLE payment_audit",
    "meterbridge_payments: INSERT ON TABLE payments",
    "meterbridge_payments: INSERT ON TABLE webhook_events",
    "meterbridge_payments: POLICY api_own_tenant ALL ON idempotency_records USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_payments: POLICY api_own_tenant ALL ON outbox_events USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_payments: POLICY api_own_tenant ALL ON payment_audit USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_payments: POLICY api_own_tenant ALL ON payments USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_payments: POLICY api_own_tenant ALL ON webhook_events USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id())",
    "meterbridge_payments: ROLE LOGIN",
    "meterbridge_payments: SELECT ON TABLE currencies",
    "meterbridge_payments: SELECT ON TABLE idempotency_records",
    "meterbridge_payments: SELECT ON TABLE outbox_events",
    "meterbridge_payments: SELECT ON TABLE payment_audit",
    "meterbridge_payments: SELECT ON TABLE payments",
    "meterbridge_payments: SELECT ON TABLE webhook_events",
    "meterbridge_payments: SET idle_in_transaction_session_timeout=30s",
    "meterbridge_payments: SET jit=off",
    "meterbridge_payments: SET lock_timeout=5s",
    "meterbridge_payments: SET statement_timeout=30s",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.attempts",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.claim_token",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.last_error",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.lease_until",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.next_attempt_at",
    "meterbridge_payments: UPDATE ON COLUMN outbox_events.status",
    "meterbridge_payments: UPDATE ON COLUMN payments.failed_attempts",
    "meterbridge_payments: UPDATE ON COLUMN payments.last_failure",
    "meterbridge_payments: UPDATE ON COLUMN payments.provider_reference",
    "meterbridge_payments: UPDATE ON COLUMN payments.status",
    "meterbridge_payments: UPDATE ON COLUMN payments.updated_at",
    "meterbridge_payments: UPDATE ON COLUMN payments.verification_method",
    "meterbridge_payments: UPDATE ON COLUMN payments.verified_at",
    "meterbridge_payments: UPDATE ON COLUMN payments.verified_by",
    "meterbridge_payments: UPDATE ON COLUMN payments.version",
    "meterbridge_payments: USAGE ON SCHEMA public",
    // The owner of the SECURITY DEFINER functions: cannot log in; reads the columns key lookup
    // needs and writes last_used_at, nothing else.
    "meterbridge_definer: EXECUTE ON FUNCTION api_key_rate_limits(uuid,bytea)",
    "meterbridge_definer: EXECUTE ON FUNCTION authenticate_api_key(text)",
    "meterbridge_definer: EXECUTE ON FUNCTION touch_api_key(uuid)",
    "meterbridge_definer: EXECUTE ON FUNCTION usage_event_under_erasure(uuid,text)",
    "meterbridge_definer: EXECUTE ON FUNCTION webhook_tenant(text)",
    "meterbridge_definer: OWNER OF FUNCTION api_key_rate_limits(uuid,bytea)",
    "meterbridge_definer: OWNER OF FUNCTION authenticate_api_key(text)",
    "meterbridge_definer: OWNER OF FUNCTION touch_api_key(uuid)",
    "meterbridge_definer: OWNER OF FUNCTION usage_event_under_erasure(uuid,text)",
    "meterbridge_definer: OWNER OF FUNCTION webhook_tenant(text)",
    "meterbridge_definer: POLICY definer_look_up SELECT ON api_keys USING true",
    "meterbridge_definer: POLICY definer_look_up SELECT ON rate_limit_overrides USING true",
    "meterbridge_definer: POLICY definer_look_up SELECT ON subject_erasures USING true",
    "meterbridge_definer: POLICY definer_look_up SELECT ON tenants USING true",
    "meterbridge_definer: POLICY definer_touch UPDATE ON api_keys USING true WITH CHECK true",
    "meterbridge_definer: ROLE NOLOGIN",
    "meterbridge_definer: SELECT ON COLUMN api_keys.id",
    "meterbridge_definer: SELECT ON COLUMN api_keys.key_hash",
    "meterbridge_definer: SELECT ON COLUMN api_keys.last_used_at",
    "meterbridge_definer: SELECT ON COLUMN api_keys.prefix",
    "meterbridge_definer: SELECT ON COLUMN api_keys.revoked_at",
    "meterbridge_definer: SELECT ON COLUMN api_keys.scopes",
    "meterbridge_definer: SELECT ON COLUMN api_keys.source_service",
    "meterbridge_definer: SELECT ON COLUMN api_keys.tenant_id",
    "meterbridge_definer: SELECT ON COLUMN api_keys.trust",
    "meterbridge_definer: SELECT ON COLUMN subject_erasures.tenant_id",
    "meterbridge_definer: SELECT ON COLUMN subject_erasures.token",
    "meterbridge_definer: SELECT ON COLUMN tenants.id",
    "meterbridge_definer: SELECT ON COLUMN tenants.slug",
    "meterbridge_definer: SELECT ON COLUMN tenants.status",
    "meterbridge_definer: SELECT ON TABLE rate_limit_overrides",
    "meterbridge_definer: UPDATE ON COLUMN api_keys.last_used_at",
    "meterbridge_definer: USAGE ON SCHEMA public",
    // The scheduled functions' role. Reads across tenants what aggregation and the relay read
    // (no payments since 0013: no ops path reads one); nothing on api_keys, no writes to
    // tenants. The relay claims and marks every tenant's outbox rows (the delivery columns only;
    // published_at is stamped by the server) and deletes PUBLISHED ones a day or more after the
    // server stamped them, no sooner, whatever the relay asks (0013). The aggregation writes the
    // rollups (never deletes one), keeps their actor sets (0014: counts per actor and day, and
    // days per actor and week or month, pruned past ingestion's window), works its queue,
    // moves its watermark and takes its advisory lock; it reads events, it never writes one.
    "meterbridge_ops: CONNECT ON DATABASE",
    "meterbridge_ops: DELETE ON TABLE idempotency_records",
    "meterbridge_ops: DELETE ON TABLE outbox_events",
    "meterbridge_ops: DELETE ON TABLE usage_actor_days",
    "meterbridge_ops: DELETE ON TABLE usage_actor_periods",
    "meterbridge_ops: DELETE ON TABLE usage_aggregation_queue",
    "meterbridge_ops: EXECUTE ON FUNCTION usage_aggregation_lock_id()",
    // The aggregation appends final-period and late threshold events to the outbox (0025,
    // 0026): usage events only.
    "meterbridge_ops: INSERT ON COLUMN outbox_events.aggregate_id",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.aggregate_sequence",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.aggregate_type",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.correlation_id",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.created_at",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.event_id",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.event_type",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.idempotency_key",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.payload",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.schema_version",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.source_service",
    "meterbridge_ops: INSERT ON COLUMN outbox_events.tenant_id",
    "meterbridge_ops: INSERT ON TABLE usage_actor_days",
    "meterbridge_ops: INSERT ON TABLE usage_actor_periods",
    "meterbridge_ops: INSERT ON TABLE usage_aggregates",
    "meterbridge_ops: INSERT ON TABLE usage_aggregation_queue",
    "meterbridge_ops: POLICY ops_all ALL ON usage_actor_days USING true WITH CHECK true",
    "meterbridge_ops: POLICY ops_all ALL ON usage_actor_periods USING true WITH CHECK true",
    "meterbridge_ops: POLICY ops_all ALL ON usage_aggregates USING true WITH CHECK true",
    "meterbridge_ops: POLICY ops_all ALL ON usage_aggregation_queue USING true WITH CHECK true",
    // The relay's retention of stored idempotent responses: older than a day, never read.
    "meterbridge_ops: POLICY ops_retention DELETE ON idempotency_records USING (created_at < (now() - '1 day'::interval))",
    "meterbridge_ops: POLICY ops_retention_read SELECT ON idempotency_records USING (created_at < (now() - '1 day'::interval))",
    "meterbridge_ops: POLICY ops_read_all SELECT ON outbox_events USING true",
    "meterbridge_ops: POLICY ops_read_all SELECT ON tenants USING true",
    "meterbridge_ops: POLICY ops_read_all SELECT ON usage_events USING true",
    "meterbridge_ops: POLICY ops_read_all SELECT ON usage_period_event_settings USING true",
    "meterbridge_ops: POLICY ops_relay UPDATE ON outbox_events USING true WITH CHECK true",
    "meterbridge_ops: POLICY ops_usage_events INSERT ON outbox_events WITH CHECK (((aggregate_type = 'usage_period'::text) AND (event_type ~~ 'usage.period.%'::text)) OR ((aggregate_type = 'usage_threshold'::text) AND (event_type = 'usage.threshold.crossed'::text)))",
    "meterbridge_ops: POLICY ops_retention DELETE ON outbox_events USING ((status = 'PUBLISHED'::text) AND (published_at < (now() - '1 day'::interval)))",
    "meterbridge_ops: ROLE LOGIN",
    "meterbridge_ops: SELECT ON COLUMN idempotency_records.created_at",
    "meterbridge_ops: SELECT ON COLUMN idempotency_records.idempotency_key",
    "meterbridge_ops: SELECT ON COLUMN idempotency_records.source_service",
    "meterbridge_ops: SELECT ON COLUMN idempotency_records.tenant_id",
    "meterbridge_ops: SELECT ON TABLE currencies",
    "meterbridge_ops: SELECT ON TABLE metrics",
    "meterbridge_ops: SELECT ON TABLE outbox_events",
    "meterbridge_ops: SELECT ON TABLE tenants",
    "meterbridge_ops: SELECT ON TABLE usage_actor_days",
    "meterbridge_ops: SELECT ON TABLE usage_actor_periods",
    "meterbridge_ops: SELECT ON TABLE usage_aggregates",
    "meterbridge_ops: SELECT ON TABLE usage_aggregation_queue",
    "meterbridge_ops: SELECT ON TABLE usage_aggregation_state",
    "meterbridge_ops: SELECT ON TABLE usage_events",
    "meterbridge_ops: SELECT ON TABLE usage_period_event_settings",
    "meterbridge_ops: SET idle_in_transaction_session_timeout=60s",
    "meterbridge_ops: SET jit=off",
    "meterbridge_ops: SET lock_timeout=5s",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.attempts",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.claim_token",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.last_error",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.lease_until",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.next_attempt_at",
    "meterbridge_ops: UPDATE ON COLUMN outbox_events.status",
    "meterbridge_ops: UPDATE ON TABLE usage_actor_days",
    "meterbridge_ops: UPDATE ON TABLE usage_actor_periods",
    "meterbridge_ops: UPDATE ON TABLE usage_aggregates",
    "meterbridge_ops: UPDATE ON TABLE usage_aggregation_state",
    // Usage limits (0026): reads every tenant's limits, records the crossings ingestion missed
    // (as detected by the aggregation) with their events.
    "meterbridge_ops: INSERT ON TABLE usage_threshold_crossings",
    "meterbridge_ops: POLICY ops_crossings ALL ON usage_threshold_crossings USING true WITH CHECK (detected_by = 'aggregation'::text)",
    "meterbridge_ops: POLICY ops_read_all SELECT ON usage_limits USING true",
    "meterbridge_ops: SELECT ON TABLE usage_limits",
    "meterbridge_ops: SELECT ON TABLE usage_threshold_crossings",
    "meterbridge_ops: USAGE ON SCHEMA public",
    // PUBLIC (every role): nothing at all in this database.
];

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn each_role_holds_exactly_the_reviewed_privileges(owner: PgPool) {
    let held: Vec<String> = sqlx::query_scalar(include_str!("privileges.sql"))
        .fetch_all(&owner)
        .await
        .unwrap();
    let unexpected: Vec<&String> = held
        .iter()
        .filter(|p| !REVIEWED.contains(&p.as_str()))
        .collect();
    let missing: Vec<&&str> = REVIEWED
        .iter()
        .filter(|p| !held.iter().any(|h| h == **p))
        .collect();
    assert!(
        unexpected.is_empty() && missing.is_empty(),
        "privileges not in the reviewed list: {unexpected:#?}\nreviewed but not held: {missing:#?}"
    );
}

/// A SECURITY DEFINER function runs with its owner's rights; every one must search only
/// pg_catalog (pg_temp last, so nothing a caller creates can shadow a name) and be owned by a
/// role that cannot log in and is not a superuser.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn security_definer_functions_are_pinned_and_powerless(owner: PgPool) {
    let functions: Vec<(String, Vec<String>, String, bool, bool)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}'), r.rolname::text,
                r.rolsuper, r.rolcanlogin
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           JOIN pg_roles r ON r.oid = p.proowner
          WHERE n.nspname = 'public' AND p.prosecdef ORDER BY 1",
    )
    .fetch_all(&owner)
    .await
    .unwrap();
    let names: Vec<&str> = functions.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "api_key_rate_limits(uuid,bytea)",
            "authenticate_api_key(text)",
            "touch_api_key(uuid)",
            "usage_event_under_erasure(uuid,text)",
            "webhook_tenant(text)"
        ],
        "the reviewed SECURITY DEFINER functions"
    );
    for (name, config, owner_role, superuser, login) in functions {
        assert_eq!(
            config,
            ["search_path=pg_catalog, pg_temp"],
            "{name} must pin its search_path"
        );
        assert_eq!(owner_role, "meterbridge_definer", "{name}");
        assert!(!superuser && !login, "{name} is owned by a powerful role");
    }
}

#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn application_roles_cannot_create_temporary_objects(owner: PgPool) {
    for role in [INGEST_ROLE, PAYMENTS_ROLE, OPS_ROLE] {
        let pool = pool_as(&owner, role).await;
        let err = sqlx::query("CREATE TEMP TABLE api_keys (id uuid)")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{role}: {err}"
        );
    }
}

/// Even if TEMP were granted again by mistake, temporary look-alike tables change nothing: the
/// functions name `public.` tables and search pg_temp last.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn temporary_tables_cannot_hijack_the_definer_functions(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let globex = create_tenant(&owner, "globex").await;
    let key = create_api_key(&owner, &acme, "crm", Trust::Internal).await;
    let stored_events = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM usage_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    sqlx::query(&format!(
        "GRANT TEMPORARY ON DATABASE \"{}\" TO meterbridge_ingest",
        database_name(&owner)
    ))
    .execute(&owner)
    .await
    .unwrap();
    let api = pool_as(&owner, INGEST_ROLE).await;
    let mut conn = api.acquire().await.unwrap();
    for statement in [
        "CREATE TEMP TABLE tenants (id uuid, slug text, status text)",
        "CREATE TEMP TABLE api_keys (id uuid, tenant_id uuid, prefix text, key_hash bytea,
             source_service text, trust text, scopes text[], revoked_at timestamptz,
             last_used_at timestamptz)",
        "CREATE TEMP TABLE loot (events bigint)",
        // A forged internal key for globex, whose hash the attacker knows.
        &format!(
            "INSERT INTO pg_temp.tenants VALUES ('{}', 'globex', 'active')",
            globex.id
        ),
        &format!(
            "INSERT INTO pg_temp.api_keys (id, tenant_id, prefix, key_hash, source_service, trust,
                                           scopes)
             VALUES ('{}', '{}', 'f0f0f0f0f0f0', decode(repeat('11', 32), 'hex'), 'crm',
                     'internal', '{{usage:read}}')",
            uuid::Uuid::new_v4(),
            globex.id
        ),
        // A trigger that would run as the function's owner and read every tenant's events.
        "CREATE FUNCTION pg_temp.steal() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO pg_temp.loot SELECT count(*) FROM public.usage_events; RETURN NEW; END $$",
        "CREATE TRIGGER steal BEFORE UPDATE ON pg_temp.api_keys
             FOR EACH ROW EXECUTE FUNCTION pg_temp.steal()",
        &format!(
            "INSERT INTO pg_temp.api_keys (id, prefix) SELECT id, prefix FROM (VALUES ('{}'::uuid, '{}')) v(id, prefix)",
            api_keys::find_candidate(&api, &meterbridge::auth::parse_presented_key(&key.key).unwrap().prefix)
                .await
                .unwrap()
                .unwrap()
                .key_id,
            "hijack"
        ),
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }

    let forged = api_keys::find_candidate(&mut *conn, "f0f0f0f0f0f0")
        .await
        .unwrap();
    assert!(
        forged.is_none(),
        "a temporary table forged a key: {forged:?}"
    );

    let presented = meterbridge::auth::parse_presented_key(&key.key).unwrap();
    let real = api_keys::find_candidate(&mut *conn, &presented.prefix)
        .await
        .unwrap()
        .expect("the real key is still found");
    api_keys::touch(&mut *conn, real.key_id).await.unwrap();
    let loot: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_temp.loot")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(loot, 0, "the attacker's trigger ran inside touch_api_key");
    assert_eq!(stored_events(owner.clone()).await, 0);
    let touched = api_keys::list_for_tenant(&owner, acme.id).await.unwrap();
    assert!(
        touched[0].last_used_at.is_some(),
        "the real row was touched"
    );
}

/// The scheduled role reads; it cannot change tenants or keys, or read keys at all.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_ops_role_cannot_rewrite_tenants_or_keys(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    let key = create_api_key(&owner, &acme, "crm", Trust::Internal).await;
    api_keys::revoke(&owner, &key.prefix).await.unwrap();
    meterbridge::repo::tenants::disable(&owner, &acme.slug)
        .await
        .unwrap();
    let ops = pool_as(&owner, OPS_ROLE).await;
    for statement in [
        "UPDATE api_keys SET revoked_at = NULL",
        "UPDATE tenants SET status = 'active', disabled_at = NULL",
        "INSERT INTO api_keys (tenant_id, prefix, key_hash, source_service, trust)
         SELECT id, 'abcdefabcdef', decode(repeat('00', 32), 'hex'), 'x', 'internal' FROM tenants",
        "SELECT count(*) FROM api_keys",
        "DELETE FROM usage_events",
        "INSERT INTO metrics (name, classification, unit) VALUES ('x.y', 'INFO', 'u')",
    ] {
        let err = sqlx::query(statement).execute(&ops).await.unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{statement}: {err}"
        );
    }
    let listed = meterbridge::repo::tenants::list(&ops).await.unwrap();
    assert_eq!(listed.len(), 1, "ops reads tenants across the database");

    // The relay may delete published outbox rows only, and change only delivery columns.
    sqlx::query(
        "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service)
         VALUES ($1, gen_random_uuid(), 'payment.paid', 1, '{}', 'c', 'k', 'payment',
                 gen_random_uuid(), 1, 'test')",
    )
    .bind(acme.id)
    .execute(&owner)
    .await
    .unwrap();
    let deleted = sqlx::query("DELETE FROM outbox_events")
        .execute(&ops)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(deleted, 0, "a pending event is not the relay's to delete");
    let err = sqlx::query("UPDATE outbox_events SET payload = '{\"forged\": true}'")
        .execute(&ops)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(api_keys::list_for_tenant(&owner, acme.id).await.unwrap()[0]
        .revoked_at
        .is_some());
}

/// The relay's role may mark rows published (that is its job) but cannot backdate them, so it
/// cannot make an unpublished event disappear as "past its retention": a row it marks is
/// stamped with the server's clock and kept a day at least. Nor does it read payments.
#[sqlx::test(migrator = "meterbridge::db::MIGRATOR")]
async fn the_ops_role_cannot_make_an_unpublished_event_disappear(owner: PgPool) {
    let acme = create_tenant(&owner, "acme").await;
    sqlx::query(
        "INSERT INTO outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                    correlation_id, idempotency_key, aggregate_type, aggregate_id,
                                    aggregate_sequence, source_service)
         VALUES ($1, gen_random_uuid(), 'payment.paid', 1, '{}', 'c', 'k', 'payment',
                 gen_random_uuid(), 1, 'test')",
    )
    .bind(acme.id)
    .execute(&owner)
    .await
    .unwrap();
    let ops = pool_as(&owner, OPS_ROLE).await;
    // Backdating, with the status or on its own: no privilege on the column.
    for statement in [
        "UPDATE outbox_events SET status = 'PUBLISHED', published_at = now() - interval '30 days'",
        "UPDATE outbox_events SET published_at = now() - interval '30 days'",
        "SELECT count(*) FROM payments",
    ] {
        let err = sqlx::query(statement).execute(&ops).await.unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{statement}: {err}"
        );
    }
    // Marking it published is allowed; the server stamps when.
    let marked = sqlx::query("UPDATE outbox_events SET status = 'PUBLISHED'")
        .execute(&ops)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(marked, 1);
    let stamped: bool =
        sqlx::query_scalar("SELECT published_at > now() - interval '1 minute' FROM outbox_events")
            .fetch_one(&owner)
            .await
            .unwrap();
    assert!(stamped, "published_at is the server's now");
    // And it cannot be deleted before a day has passed, whatever cutoff the caller names.
    let mut conn = ops.acquire().await.unwrap();
    let deleted = meterbridge::repo::outbox::delete_published(
        &mut conn,
        meterbridge::testing::now() + chrono::Duration::days(365),
        100,
    )
    .await
    .unwrap();
    assert_eq!(deleted, 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
        .fetch_one(&owner)
        .await
        .unwrap();
    assert_eq!(left, 1);
}
