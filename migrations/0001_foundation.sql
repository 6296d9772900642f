-- Foundation: roles, tenants, API keys, the metric catalog, and row-level security.
--
-- Roles. API-facing functions connect as meterbridge_api, which every tenant-owned table binds
-- with row-level security keyed by the per-transaction setting `meterbridge.tenant_id`.
-- Scheduled functions connect as meterbridge_ops, which has a cross-tenant policy on each table.
-- The admin function runs migrations as the database owner. Roles are cluster-wide, so they are
-- created only when missing; the exception handler also absorbs the race between two databases
-- migrating at once (parallel tests each get their own database on one cluster).
DO $$
BEGIN
    BEGIN
        CREATE ROLE meterbridge_api LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE meterbridge_ops LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
END
$$;

GRANT USAGE ON SCHEMA public TO meterbridge_api, meterbridge_ops;

-- The tenant a transaction acts for: NULL when unset (or reset to '' at the end of an earlier
-- transaction on the same connection), so every policy below matches nothing by default.
CREATE FUNCTION current_tenant_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('meterbridge.tenant_id', true), '')::uuid $$;

CREATE TABLE tenants (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    slug        text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

CREATE TABLE api_keys (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    -- Public, random lookup id embedded in the key (mbk_<prefix>_<secret>); UNIQUE gives the index
    -- that authentication looks keys up by.
    prefix         text        NOT NULL UNIQUE CHECK (prefix ~ '^[0-9a-f]{12}$'),
    -- SHA-256 of the whole key. The key itself is never stored.
    key_hash       bytea       NOT NULL CHECK (length(key_hash) = 32),
    source_service text        NOT NULL CHECK (source_service ~ '^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$'),
    trust          text        NOT NULL CHECK (trust IN ('internal', 'external')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz,
    last_used_at   timestamptz
);
-- `api-key list` lists one tenant's keys, newest first.
CREATE INDEX api_keys_tenant_created_idx ON api_keys (tenant_id, created_at DESC);

-- The metric catalog is global reference data, not tenant-owned.
CREATE TABLE metrics (
    name           text        PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$'),
    classification text        NOT NULL CHECK (classification IN ('BILLABLE', 'NON_BILLABLE', 'INFO')),
    unit           text        NOT NULL CHECK (length(unit) BETWEEN 1 AND 32),
    description    text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now()
);

INSERT INTO metrics (name, classification, unit, description) VALUES
    ('leads.processed',                'BILLABLE',     'lead',       'Leads processed'),
    ('leads.qualified',                'BILLABLE',     'lead',       'Leads qualified'),
    ('leads.routed',                   'BILLABLE',     'lead',       'Leads routed to an owner'),
    ('scoring.requests',               'BILLABLE',     'request',    'Scoring requests served'),
    ('scoring.models.used',            'BILLABLE',     'model',      'Scoring model invocations'),
    ('voice.minutes.authorized',       'BILLABLE',     'minute',     'Voice minutes authorized'),
    ('voice.calls.initiated',          'BILLABLE',     'call',       'Voice calls initiated'),
    ('voice.calls.completed',          'BILLABLE',     'call',       'Voice calls completed'),
    ('api.requests',                   'BILLABLE',     'request',    'API requests'),
    ('api.requests.successful',        'BILLABLE',     'request',    'Successful API requests'),
    ('integrations.api.calls',         'BILLABLE',     'call',       'Calls to integration APIs'),
    ('sla.timers.started',             'NON_BILLABLE', 'timer',      'SLA timers started'),
    ('sla.timers.violated',            'NON_BILLABLE', 'timer',      'SLA timers violated'),
    ('sla.escalations.triggered',      'NON_BILLABLE', 'escalation', 'SLA escalations triggered'),
    ('api.requests.failed',            'NON_BILLABLE', 'request',    'Failed API requests'),
    ('integrations.webhooks.received', 'NON_BILLABLE', 'webhook',    'Integration webhooks received');

-- Row-level security. Policies name their role, so a role with no policy on a table sees nothing.
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON tenants FOR SELECT TO meterbridge_api
    USING (id = current_tenant_id());
CREATE POLICY ops_all_tenants ON tenants TO meterbridge_ops USING (true) WITH CHECK (true);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON api_keys FOR SELECT TO meterbridge_api
    USING (tenant_id = current_tenant_id());
CREATE POLICY ops_all_tenants ON api_keys TO meterbridge_ops USING (true) WITH CHECK (true);

GRANT SELECT ON tenants, api_keys, metrics TO meterbridge_api;
GRANT SELECT, INSERT, UPDATE ON tenants, api_keys TO meterbridge_ops;
GRANT SELECT ON metrics TO meterbridge_ops;

-- Authentication happens before the tenant is known, so the API role may not read api_keys
-- across tenants; this function (running as the owner) returns the one candidate key for a
-- prefix. The caller compares the hash in constant time.
CREATE FUNCTION authenticate_api_key(p_prefix text)
    RETURNS TABLE (key_id uuid, tenant_id uuid, tenant_status text, key_hash bytea,
                   source_service text, trust text, revoked boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT k.id, k.tenant_id, t.status, k.key_hash, k.source_service, k.trust,
               k.revoked_at IS NOT NULL
          FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE k.prefix = p_prefix
    $$;

-- Records use of a verified key, at most once a minute per key, so the hot path stays read-only.
CREATE FUNCTION touch_api_key(p_key_id uuid) RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        UPDATE api_keys SET last_used_at = now()
         WHERE id = p_key_id AND revoked_at IS NULL
           AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
    $$;

REVOKE ALL ON FUNCTION authenticate_api_key(text), touch_api_key(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION authenticate_api_key(text), touch_api_key(uuid) TO meterbridge_api;
