-- Hardening after the first security review (issue 6). Each section names the defect it closes;
-- `shared/tests/privileges.rs` holds the reviewed list of every privilege each role ends with.

------------------------------------------------------------------------------------------------
-- 1. SECURITY DEFINER functions belong to a dedicated, powerless role, search only pg_catalog
--    (pg_temp last), and name every table with its schema. Before this, `pg_temp` was searched
--    first, so a temporary `api_keys` table shadowed the real one inside the owner's functions.
------------------------------------------------------------------------------------------------
DO $$
BEGIN
    BEGIN
        CREATE ROLE meterbridge_definer NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
            NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    -- Changing a function's owner needs membership of the new owner unless one is a superuser
    -- (on RDS the migrating user is not).
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT meterbridge_definer TO %I', current_user);
    END IF;
END
$$;

-- No role but the owner may create objects in, or use, the schema unless granted here; nobody
-- may create temporary objects (they are what shadowed the real tables); only the application
-- roles may connect.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO meterbridge_api, meterbridge_ops, meterbridge_definer;
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY, CONNECT ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO meterbridge_api, meterbridge_ops',
                   current_database());
END
$$;

-- The API role authenticates only through authenticate_api_key(); it never reads api_keys.
REVOKE ALL ON public.api_keys FROM meterbridge_api;
DROP POLICY api_own_tenant ON public.api_keys;

-- Policies call current_tenant_id() with the querying role's rights: only the API role needs it.
REVOKE ALL ON FUNCTION public.current_tenant_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.current_tenant_id() TO meterbridge_api;

-- What the two functions read and write, and nothing more. The definer is bound by RLS like any
-- role that does not own the tables, so it gets policies of its own.
GRANT SELECT (id, tenant_id, prefix, key_hash, source_service, trust, revoked_at, last_used_at)
    ON public.api_keys TO meterbridge_definer;
GRANT UPDATE (last_used_at) ON public.api_keys TO meterbridge_definer;
GRANT SELECT (id, slug, status) ON public.tenants TO meterbridge_definer;
CREATE POLICY definer_look_up ON public.api_keys FOR SELECT TO meterbridge_definer USING (true);
CREATE POLICY definer_touch ON public.api_keys FOR UPDATE TO meterbridge_definer
    USING (true) WITH CHECK (true);
CREATE POLICY definer_look_up ON public.tenants FOR SELECT TO meterbridge_definer USING (true);

------------------------------------------------------------------------------------------------
-- 2. The scheduled role reads; it never rewrites tenants or keys. Before this it could
--    un-revoke a key, re-enable a tenant or mint a key for any tenant.
------------------------------------------------------------------------------------------------
REVOKE ALL ON public.tenants, public.api_keys FROM meterbridge_ops;
DROP POLICY ops_all_tenants ON public.api_keys;
DROP POLICY ops_all_tenants ON public.tenants;
DROP POLICY ops_all_tenants ON public.usage_events;
GRANT SELECT ON public.tenants TO meterbridge_ops;
CREATE POLICY ops_read_all ON public.tenants FOR SELECT TO meterbridge_ops USING (true);
CREATE POLICY ops_read_all ON public.usage_events FOR SELECT TO meterbridge_ops USING (true);

-- A frozen or runaway session of an application role cannot hold locks for long, whatever its
-- client sets (the functions also set these per connection). Per database, so that databases
-- migrating side by side on one cluster never update the same catalog row.
DO $$
BEGIN
    EXECUTE format('ALTER ROLE meterbridge_api IN DATABASE %I SET lock_timeout = %L',
                   current_database(), '5s');
    EXECUTE format('ALTER ROLE meterbridge_api IN DATABASE %I SET statement_timeout = %L',
                   current_database(), '30s');
    EXECUTE format('ALTER ROLE meterbridge_api IN DATABASE %I SET idle_in_transaction_session_timeout = %L',
                   current_database(), '30s');
    EXECUTE format('ALTER ROLE meterbridge_ops IN DATABASE %I SET lock_timeout = %L',
                   current_database(), '5s');
    EXECUTE format('ALTER ROLE meterbridge_ops IN DATABASE %I SET idle_in_transaction_session_timeout = %L',
                   current_database(), '60s');
END
$$;

------------------------------------------------------------------------------------------------
-- 3. API keys carry scopes. External keys may only write usage: before this, any key could read
--    the whole tenant's usage. Existing internal keys keep everything they could do.
------------------------------------------------------------------------------------------------
ALTER TABLE public.api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['usage:write'];
UPDATE public.api_keys
   SET scopes = ARRAY['usage:write', 'usage:read', 'payments:write', 'payments:read',
                      'payments:verify']
 WHERE trust = 'internal';
ALTER TABLE public.api_keys
    ADD CONSTRAINT api_keys_scopes_known CHECK (
        cardinality(scopes) > 0
        AND scopes <@ ARRAY['usage:write', 'usage:read', 'payments:write', 'payments:read',
                            'payments:verify']::text[]),
    ADD CONSTRAINT api_keys_external_scopes CHECK (
        trust = 'internal' OR scopes <@ ARRAY['usage:write']::text[]);
GRANT SELECT (scopes) ON public.api_keys TO meterbridge_definer;

DROP FUNCTION public.authenticate_api_key(text);
DROP FUNCTION public.touch_api_key(uuid);

-- Authentication happens before the tenant is known, so the API role may not read api_keys
-- across tenants; this function returns the one candidate key for a prefix. The caller compares
-- the hash in constant time.
CREATE FUNCTION public.authenticate_api_key(p_prefix text)
    RETURNS TABLE (key_id uuid, tenant_id uuid, tenant_slug text, tenant_status text,
                   key_hash bytea, source_service text, trust text, scopes text[],
                   revoked boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT k.id, k.tenant_id, t.slug, t.status, k.key_hash, k.source_service, k.trust,
               k.scopes, k.revoked_at IS NOT NULL
          FROM public.api_keys k JOIN public.tenants t ON t.id = k.tenant_id
         WHERE k.prefix = p_prefix
    $$;

-- Records use of a verified key, at most once a minute per key, so the hot path stays read-only.
CREATE FUNCTION public.touch_api_key(p_key_id uuid) RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        UPDATE public.api_keys SET last_used_at = pg_catalog.now()
         WHERE id = p_key_id AND revoked_at IS NULL
           AND (last_used_at IS NULL
                OR last_used_at < pg_catalog.now() - pg_catalog.make_interval(mins => 1))
    $$;

ALTER FUNCTION public.authenticate_api_key(text) OWNER TO meterbridge_definer;
ALTER FUNCTION public.touch_api_key(uuid) OWNER TO meterbridge_definer;
REVOKE ALL ON FUNCTION public.authenticate_api_key(text), public.touch_api_key(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.authenticate_api_key(text), public.touch_api_key(uuid)
    TO meterbridge_api;

------------------------------------------------------------------------------------------------
-- 4. Caller-chosen keys are namespaced by source. Before this, `eventId` and `idempotencyKey`
--    were unique per tenant, so a partner's key could pre-claim an internal service's event id
--    and suppress its billing; and a default idempotency key (the event id) shared one space
--    with explicit ones. Now an idempotency key is stored only when the caller chose one that
--    differs from the event id; each is unique per (tenant, source). The business key
--    (correlation, metric, instant) stays tenant-wide: external keys cannot report BILLABLE
--    metrics, so they cannot pre-claim a billable operation.
--
--    Identifiers are only ever compared for equality, so they use the "C" collation: byte
--    comparison in every index instead of the database's linguistic one (much cheaper on an
--    en_US.UTF-8 database, as RDS creates them).
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_events
    DROP CONSTRAINT usage_events_pkey,
    DROP CONSTRAINT usage_events_idempotency_key,
    DROP CONSTRAINT usage_events_correlation,
    DROP CONSTRAINT usage_events_metric_fkey;
DROP INDEX public.usage_events_tenant_time_idx;
-- The catalog's key takes the same collation, or every foreign-key check would compare across
-- collations (measured: twice the cost of the check).
ALTER TABLE public.metrics ALTER COLUMN name TYPE text COLLATE "C";
ALTER TABLE public.usage_events
    ALTER COLUMN idempotency_key DROP NOT NULL,
    ALTER COLUMN event_id TYPE text COLLATE "C",
    ALTER COLUMN source_service TYPE text COLLATE "C",
    ALTER COLUMN idempotency_key TYPE text COLLATE "C",
    ALTER COLUMN correlation_id TYPE text COLLATE "C",
    ALTER COLUMN metric TYPE text COLLATE "C",
    ALTER COLUMN classification TYPE text COLLATE "C",
    -- Arrival order: the tiebreaker of the listing order (occurred_at, seq), so listing indexes
    -- hold eight fixed bytes instead of source and event id.
    ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
UPDATE public.usage_events SET idempotency_key = NULL WHERE idempotency_key = event_id;
ALTER TABLE public.usage_events
    ADD CONSTRAINT usage_events_pkey PRIMARY KEY (tenant_id, source_service, event_id),
    ADD CONSTRAINT usage_events_idempotency_key
        UNIQUE (tenant_id, source_service, idempotency_key),
    ADD CONSTRAINT usage_events_correlation
        UNIQUE (tenant_id, correlation_id, metric, occurred_at),
    ADD CONSTRAINT usage_events_metric_fkey FOREIGN KEY (metric) REFERENCES public.metrics (name),
    ADD CONSTRAINT usage_events_source_service
        CHECK (source_service ~ '^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$');

------------------------------------------------------------------------------------------------
-- 5. Every listing is an index range. GET /v1/usage/events reads one tenant's window of
--    occurred_at in (occurred_at, seq) order, optionally for one metric or one classification;
--    each shape has its index, so a filter that matches nothing costs one index descent instead
--    of a scan of the tenant's history.
------------------------------------------------------------------------------------------------
-- Unfiltered listing, the real-time fallback (one UTC day) and time-range rollups.
CREATE INDEX usage_events_tenant_time_idx
    ON public.usage_events (tenant_id, occurred_at, seq);
-- Listing filtered by metric; per-metric rollups.
CREATE INDEX usage_events_tenant_metric_time_idx
    ON public.usage_events (tenant_id, metric, occurred_at, seq);
-- Listing filtered by classification.
CREATE INDEX usage_events_tenant_class_time_idx
    ON public.usage_events (tenant_id, classification, occurred_at, seq);
