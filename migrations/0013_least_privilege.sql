-- Least privilege, one more turn. Each section names the defect it closes; the reviewed list of
-- every privilege each role ends with is shared/tests/privileges.rs.

------------------------------------------------------------------------------------------------
-- 1. One role per API function. ingest-usage (partner-facing) and verify-payment
--    (internet-facing) shared meterbridge_api: code running in ingestion could mark a payment
--    PAID_VERIFIED and write a payment.paid outbox row. Now each has its role and its secret:
--      meterbridge_ingest    usage events, their dedup keys, the tenant's rollups
--      meterbridge_payments  payments, their audit, outbox, webhook events, idempotency records
--    Every policy of the old role moves to the role that uses the table; meterbridge_api keeps
--    no privilege in this database (the role itself is cluster-wide: other databases on the
--    instance may still use it, so it is not dropped).
------------------------------------------------------------------------------------------------
DO $$
BEGIN
    BEGIN
        CREATE ROLE meterbridge_ingest LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE meterbridge_payments LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO meterbridge_ingest, meterbridge_payments',
                   current_database());
    -- The same floors as the old role had, per database (see 0003).
    EXECUTE format('ALTER ROLE meterbridge_ingest IN DATABASE %I SET lock_timeout = %L',
                   current_database(), '5s');
    EXECUTE format('ALTER ROLE meterbridge_ingest IN DATABASE %I SET statement_timeout = %L',
                   current_database(), '30s');
    EXECUTE format('ALTER ROLE meterbridge_ingest IN DATABASE %I SET idle_in_transaction_session_timeout = %L',
                   current_database(), '30s');
    EXECUTE format('ALTER ROLE meterbridge_payments IN DATABASE %I SET lock_timeout = %L',
                   current_database(), '5s');
    EXECUTE format('ALTER ROLE meterbridge_payments IN DATABASE %I SET statement_timeout = %L',
                   current_database(), '30s');
    EXECUTE format('ALTER ROLE meterbridge_payments IN DATABASE %I SET idle_in_transaction_session_timeout = %L',
                   current_database(), '30s');
END
$$;
GRANT USAGE ON SCHEMA public TO meterbridge_ingest, meterbridge_payments;

-- Both authenticate API keys through the two SECURITY DEFINER functions, and bind their
-- policies to the transaction's tenant.
GRANT EXECUTE ON FUNCTION public.authenticate_api_key(text), public.touch_api_key(uuid),
                          public.current_tenant_id()
    TO meterbridge_ingest, meterbridge_payments;

-- Ingestion: writes and reads its tenant's events (naming its columns: never xact_id, seq,
-- created_at), voids them (the three void columns only), writes and probes its tenant's dedup
-- keys, reads the key generations and the Bloom filter, reads its tenant's rollups.
GRANT SELECT ON public.metrics, public.usage_events, public.usage_event_keys,
                public.usage_key_generations, public.usage_key_filter_blocks,
                public.usage_aggregates
    TO meterbridge_ingest;
GRANT INSERT (tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
              correlation_id, classification, idempotency_key, metadata, payload_hash,
              operation_key)
    ON public.usage_events TO meterbridge_ingest;
GRANT UPDATE (voided_at, voided_by, void_reason) ON public.usage_events TO meterbridge_ingest;
GRANT INSERT ON public.usage_event_keys TO meterbridge_ingest;
GRANT EXECUTE ON FUNCTION public.usage_key_block(uuid, integer), public.usage_key_bit(uuid, integer),
                          public.usage_key_maybe(bit, uuid)
    TO meterbridge_ingest;
ALTER POLICY api_own_tenant ON public.usage_events TO meterbridge_ingest;
ALTER POLICY api_own_tenant ON public.usage_event_keys TO meterbridge_ingest;
ALTER POLICY api_own_tenant ON public.usage_aggregates TO meterbridge_ingest;

-- Payments: creates and reads its tenant's payments and changes only the columns a
-- transition writes; appends audit rows, outbox events, webhook events and idempotency
-- records; marks its own fresh event published (the fast path: the delivery columns, not
-- published_at, which section 2 sets); reads the currencies; finds a webhook's tenant through
-- the SECURITY DEFINER webhook_tenant().
GRANT SELECT ON public.currencies TO meterbridge_payments;
GRANT SELECT, INSERT ON public.payments, public.payment_audit, public.outbox_events,
                        public.webhook_events, public.idempotency_records
    TO meterbridge_payments;
GRANT UPDATE (status, verified_at, verified_by, verification_method, provider_reference,
              updated_at, version, failed_attempts, last_failure)
    ON public.payments TO meterbridge_payments;
GRANT UPDATE (status, attempts, next_attempt_at, claim_token, lease_until, last_error)
    ON public.outbox_events TO meterbridge_payments;
GRANT EXECUTE ON FUNCTION public.webhook_tenant(text) TO meterbridge_payments;
ALTER POLICY api_own_tenant ON public.payments TO meterbridge_payments;
ALTER POLICY api_own_tenant ON public.payment_audit TO meterbridge_payments;
ALTER POLICY api_own_tenant ON public.outbox_events TO meterbridge_payments;
ALTER POLICY api_own_tenant ON public.webhook_events TO meterbridge_payments;
ALTER POLICY api_own_tenant ON public.idempotency_records TO meterbridge_payments;

-- Neither reads the tenants table (keys and webhooks find their tenant through the definer
-- functions): the old role's policy on it goes with its grant.
DROP POLICY api_own_tenant ON public.tenants;

-- The old role: nothing left in this database.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM meterbridge_api;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM meterbridge_api;
REVOKE ALL ON SCHEMA public FROM meterbridge_api;
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM meterbridge_api', current_database());
    EXECUTE format('ALTER ROLE meterbridge_api IN DATABASE %I RESET ALL', current_database());
END
$$;

------------------------------------------------------------------------------------------------
-- 2. The ops role could delete unpublished events: it may update the delivery columns, so it
--    could mark a PENDING row PUBLISHED with an old published_at, then delete it as "past its
--    retention". Now published_at is the server's: set by a trigger when a row becomes
--    PUBLISHED, never by an application role (none may update the column), and the retention
--    policy deletes only rows published more than a day ago by that clock.
------------------------------------------------------------------------------------------------
CREATE FUNCTION public.outbox_events_stamp_published() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    BEGIN
        -- A row becoming PUBLISHED is stamped now, unless the statement set published_at itself,
        -- which only the owner may (a backfill, a test).
        IF NEW.status = 'PUBLISHED' AND OLD.status IS DISTINCT FROM 'PUBLISHED'
           AND NEW.published_at IS NOT DISTINCT FROM OLD.published_at THEN
            NEW.published_at := pg_catalog.now();
        END IF;
        RETURN NEW;
    END $$;
REVOKE ALL ON FUNCTION public.outbox_events_stamp_published() FROM PUBLIC;
CREATE TRIGGER outbox_events_stamp_published BEFORE UPDATE ON public.outbox_events
    FOR EACH ROW EXECUTE FUNCTION public.outbox_events_stamp_published();
REVOKE UPDATE (published_at) ON public.outbox_events FROM meterbridge_ops;
DROP POLICY ops_retention ON public.outbox_events;
CREATE POLICY ops_retention ON public.outbox_events FOR DELETE TO meterbridge_ops
    USING (status = 'PUBLISHED' AND published_at < pg_catalog.now() - interval '1 day');

------------------------------------------------------------------------------------------------
-- 3. The ops role read every tenant's payments, and no ops path reads them.
------------------------------------------------------------------------------------------------
DROP POLICY ops_read_all ON public.payments;
REVOKE ALL ON public.payments FROM meterbridge_ops;

------------------------------------------------------------------------------------------------
-- 4. A key may hold usage:void: voiding another source's events needs it. Internal keys hold
--    every other scope by default, not this one (an operator grants it to the service that
--    corrects other services' usage).
------------------------------------------------------------------------------------------------
ALTER TABLE public.api_keys DROP CONSTRAINT api_keys_scopes_known;
ALTER TABLE public.api_keys ADD CONSTRAINT api_keys_scopes_known CHECK (
    cardinality(scopes) > 0
    AND scopes <@ ARRAY['usage:write', 'usage:read', 'usage:void', 'payments:write',
                        'payments:read', 'payments:verify']::text[]);
