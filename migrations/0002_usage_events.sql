-- Usage events: the record of every accepted event. Rows are immutable: the API role may insert
-- and read its own tenant's rows, never update or delete them.
CREATE TABLE usage_events (
    tenant_id       uuid        NOT NULL REFERENCES tenants (id),
    event_id        text        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 128),
    metric          text        NOT NULL REFERENCES metrics (name),
    -- A positive whole number of the metric's unit.
    quantity        bigint      NOT NULL CHECK (quantity > 0),
    occurred_at     timestamptz NOT NULL,
    actor_id        text                 CHECK (length(actor_id) BETWEEN 1 AND 128),
    -- From the API key, never from the request body.
    source_service  text        NOT NULL,
    correlation_id  text        NOT NULL CHECK (length(correlation_id) BETWEEN 1 AND 128),
    -- Copied from the catalog at ingestion, so a later reclassification does not rewrite history.
    classification  text        NOT NULL CHECK (classification IN ('BILLABLE', 'NON_BILLABLE', 'INFO')),
    idempotency_key text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    metadata        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    -- SHA-256 of the canonical payload: a resend with the same key and hash is a duplicate, with
    -- the same key and another hash a conflict.
    payload_hash    bytea       NOT NULL CHECK (length(payload_hash) = 32),
    created_at      timestamptz NOT NULL DEFAULT now(),

    -- Dedup by the caller's event id.
    PRIMARY KEY (tenant_id, event_id),
    -- Dedup by idempotency key (defaults to the event id).
    CONSTRAINT usage_events_idempotency_key UNIQUE (tenant_id, idempotency_key),
    -- The same operation (correlation) cannot report the same metric twice at the same instant.
    CONSTRAINT usage_events_correlation UNIQUE (tenant_id, correlation_id, metric, occurred_at)
);

-- The one non-unique index. Serves GET /v1/usage/events (tenant + occurred_at range, keyset
-- pagination on (occurred_at, event_id)), the PostgreSQL fallback of GET /v1/usage/realtime
-- (tenant + one UTC day), and rollups by time range. Each further index would cost every insert.
CREATE INDEX usage_events_tenant_time_idx ON usage_events (tenant_id, occurred_at, event_id);

ALTER TABLE usage_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON usage_events TO meterbridge_api
    USING (tenant_id = current_tenant_id()) WITH CHECK (tenant_id = current_tenant_id());
CREATE POLICY ops_all_tenants ON usage_events TO meterbridge_ops USING (true) WITH CHECK (true);

GRANT SELECT, INSERT ON usage_events TO meterbridge_api;
GRANT SELECT ON usage_events TO meterbridge_ops;

-- Authentication also returns the tenant's slug, so an event that names its tenant by slug can be
-- checked against the key's tenant.
DROP FUNCTION authenticate_api_key(text);
CREATE FUNCTION authenticate_api_key(p_prefix text)
    RETURNS TABLE (key_id uuid, tenant_id uuid, tenant_slug text, tenant_status text, key_hash bytea,
                   source_service text, trust text, revoked boolean)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
        SELECT k.id, k.tenant_id, t.slug, t.status, k.key_hash, k.source_service, k.trust,
               k.revoked_at IS NOT NULL
          FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
         WHERE k.prefix = p_prefix
    $$;
REVOKE ALL ON FUNCTION authenticate_api_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION authenticate_api_key(text) TO meterbridge_api;
