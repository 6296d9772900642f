-- Meters: how a tenant's CloudEvents become usage events (the OpenMeter-compatible ingestion,
-- POST /api/v1/events). A meter names a CloudEvents `type`, the metric of the catalog its
-- events count towards, where in the event's `data` the quantity is (a JSONPath; absent: each
-- event counts 1) and the `groupBy` properties kept in the usage event's metadata (key →
-- JSONPath), as OpenMeter's meter model does (`eventType`, `valueProperty`, `groupBy`). One
-- meter per event type and tenant. Managed by the admin function (`meter set|list|remove`),
-- audited in tenant_settings_audit.

CREATE TABLE public.meters (
    tenant_id      uuid        NOT NULL REFERENCES public.tenants (id),
    -- OpenMeter's meter slug: what GET /api/v1/meters/{slug}/query names.
    slug           text        COLLATE "C" NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    event_type     text        COLLATE "C" NOT NULL CHECK (length(event_type) BETWEEN 1 AND 256),
    metric         text        COLLATE "C" NOT NULL REFERENCES public.metrics (name),
    value_property text        COLLATE "C" CHECK (length(value_property) BETWEEN 2 AND 256),
    group_by       jsonb       NOT NULL DEFAULT '{}'
                   CHECK (jsonb_typeof(group_by) = 'object' AND length(group_by::text) <= 4096),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, slug),
    CONSTRAINT meters_one_per_event_type UNIQUE (tenant_id, event_type)
);
ALTER TABLE public.meters ENABLE ROW LEVEL SECURITY;

-- Ingestion reads its own tenant's meters (to map events, and to answer meter queries).
GRANT SELECT ON public.meters TO meterbridge_ingest;
CREATE POLICY api_own_tenant ON public.meters FOR SELECT TO meterbridge_ingest
    USING (tenant_id = public.current_tenant_id());
