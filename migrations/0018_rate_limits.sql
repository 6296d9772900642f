-- Per-tenant and per-key rate limits: the overrides of the defaults, and their audit.
--
-- The budgets themselves live in Redis (meterbridge::rate_limit): requests and events a second
-- per API key and per tenant, and the tenant's requests in flight. Their defaults depend on a
-- key's trust (meterbridge::domain::rate_limit); an operator overrides them per tenant or per
-- key with the admin function (`tenant limits set`), which writes a row here and an audit row
-- in one transaction. The API functions read a key's overrides with the key itself, through
-- `api_key_rate_limits`, and cache them with the key's verdict: a change bites within the
-- key cache's 60 s.

CREATE TABLE public.rate_limit_overrides (
    tenant_id           uuid        NOT NULL REFERENCES public.tenants (id),
    -- NULL: the tenant's budgets (every key together) and its requests in flight; else one
    -- key's budgets.
    api_key_id          uuid        REFERENCES public.api_keys (id),
    requests_per_second integer     CHECK (requests_per_second BETWEEN 1 AND 1000000),
    request_burst       integer     CHECK (request_burst BETWEEN 1 AND 10000000),
    events_per_second   integer     CHECK (events_per_second BETWEEN 1 AND 1000000),
    -- At least a full batch (1,000 events), so that one can always pass.
    event_burst         integer     CHECK (event_burst BETWEEN 1000 AND 10000000),
    max_in_flight       integer     CHECK (max_in_flight BETWEEN 1 AND 1000),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((requests_per_second IS NULL) = (request_burst IS NULL)),
    CHECK ((events_per_second IS NULL) = (event_burst IS NULL)),
    CHECK (api_key_id IS NULL OR max_in_flight IS NULL),
    UNIQUE NULLS NOT DISTINCT (tenant_id, api_key_id)
);
ALTER TABLE public.rate_limit_overrides ENABLE ROW LEVEL SECURITY;

-- Who changed which limits, when, why, from what to what. Written by the admin function (the
-- database owner) in the change's transaction; no application role reads or writes it.
CREATE TABLE public.rate_limit_audit (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    tenant_id  uuid        NOT NULL REFERENCES public.tenants (id),
    api_key_id uuid        REFERENCES public.api_keys (id),
    actor      text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 128),
    reason     text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    before     jsonb,
    after      jsonb
);
ALTER TABLE public.rate_limit_audit ENABLE ROW LEVEL SECURITY;
CREATE INDEX rate_limit_audit_tenant_at ON public.rate_limit_audit (tenant_id, at);

-- A key's overrides and its tenant's, for the key's own lookup: SECURITY DEFINER, as
-- authenticate_api_key, so the API roles read nothing of the table but what concerns a key
-- they hold (its id and the hash of the key as presented: another tenant's limits stay
-- unreadable even to code that learnt a key's id).
CREATE POLICY definer_look_up ON public.rate_limit_overrides FOR SELECT TO meterbridge_definer
    USING (true);
GRANT SELECT ON public.rate_limit_overrides TO meterbridge_definer;

CREATE FUNCTION public.api_key_rate_limits(p_key_id uuid, p_key_hash bytea)
    RETURNS TABLE (scope text, requests_per_second integer, request_burst integer,
                   events_per_second integer, event_burst integer, max_in_flight integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT CASE WHEN o.api_key_id IS NULL THEN 'tenant' ELSE 'key' END,
               o.requests_per_second, o.request_burst, o.events_per_second, o.event_burst,
               o.max_in_flight
          FROM public.api_keys k
          JOIN public.rate_limit_overrides o
            ON o.tenant_id = k.tenant_id AND (o.api_key_id IS NULL OR o.api_key_id = k.id)
         WHERE k.id = p_key_id AND k.key_hash = p_key_hash
    $$;
ALTER FUNCTION public.api_key_rate_limits(uuid, bytea) OWNER TO meterbridge_definer;
REVOKE ALL ON FUNCTION public.api_key_rate_limits(uuid, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.api_key_rate_limits(uuid, bytea) TO meterbridge_ingest, meterbridge_payments;
