-- Usage limits and threshold alerts. A tenant sets, per metric and period (a UTC day or month),
-- a limit and thresholds in percent of it (for example 50, 80, 100); the read API answers how
-- much is left, and `usage.threshold.crossed` is written to the outbox once per (tenant, metric,
-- period, limit, threshold) crossed. Limits never refuse usage: usage already happened, and
-- enforcement is the caller's decision, made from the read API.
--
-- Crossings are detected by ingestion, from the counter values its Redis script returns after
-- a batch is stored, and — when that missed one (Redis down, a crash between the commit and
-- the count) — by the aggregation, from the rollups. Both write through one statement
-- (meterbridge::repo::usage_limits::record_crossings): the crossing row's primary key makes
-- the event happen once, whoever sees it first, and a void that brings usage back under a
-- threshold never re-fires it within the period.

CREATE TABLE public.usage_limits (
    tenant_id      uuid        NOT NULL REFERENCES public.tenants (id),
    metric         text        COLLATE "C" NOT NULL REFERENCES public.metrics (name),
    period_type    text        COLLATE "C" NOT NULL CHECK (period_type IN ('daily', 'monthly')),
    -- Up to 10^17, so a threshold's quantity (at most 1000 % of it) stays far below 2^63.
    limit_quantity bigint      NOT NULL CHECK (limit_quantity BETWEEN 1 AND 100000000000000000),
    -- Percent of the limit, ascending, distinct, each 1..1000.
    thresholds     smallint[]  NOT NULL
                   CHECK (cardinality(thresholds) BETWEEN 1 AND 10
                          AND array_ndims(thresholds) = 1
                          AND 1 <= ALL (thresholds) AND 1000 >= ALL (thresholds)),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric, period_type)
);

CREATE TABLE public.usage_threshold_crossings (
    tenant_id      uuid        NOT NULL REFERENCES public.tenants (id),
    metric         text        COLLATE "C" NOT NULL,
    period_type    text        COLLATE "C" NOT NULL CHECK (period_type IN ('daily', 'monthly')),
    period_start   timestamptz NOT NULL,
    limit_quantity bigint      NOT NULL CHECK (limit_quantity > 0),
    threshold      smallint    NOT NULL CHECK (threshold BETWEEN 1 AND 1000),
    -- The usage seen when the crossing was detected (at least the threshold's quantity).
    usage_quantity numeric     NOT NULL CHECK (usage_quantity >= 0 AND scale(usage_quantity) = 0),
    detected_by    text        COLLATE "C" NOT NULL CHECK (detected_by IN ('ingestion', 'aggregation')),
    crossed_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, metric, period_type, period_start, limit_quantity, threshold)
);

ALTER TABLE public.usage_limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.usage_threshold_crossings ENABLE ROW LEVEL SECURITY;

-- Ingestion reads its tenant's limits (to detect crossings and answer the read API) and
-- records its tenant's crossings with their events; it changes no limit.
GRANT SELECT ON public.usage_limits TO meterbridge_ingest;
CREATE POLICY api_own_tenant ON public.usage_limits FOR SELECT TO meterbridge_ingest
    USING (tenant_id = public.current_tenant_id());
GRANT SELECT, INSERT ON public.usage_threshold_crossings TO meterbridge_ingest;
CREATE POLICY api_own_tenant ON public.usage_threshold_crossings TO meterbridge_ingest
    USING (tenant_id = public.current_tenant_id())
    WITH CHECK (tenant_id = public.current_tenant_id() AND detected_by = 'ingestion');
GRANT INSERT (tenant_id, event_id, event_type, schema_version, payload, correlation_id,
              idempotency_key, aggregate_type, aggregate_id, aggregate_sequence, source_service,
              created_at)
    ON public.outbox_events TO meterbridge_ingest;
CREATE POLICY ingest_threshold_events ON public.outbox_events FOR INSERT TO meterbridge_ingest
    WITH CHECK (tenant_id = public.current_tenant_id() AND aggregate_type = 'usage_threshold'
                AND event_type = 'usage.threshold.crossed');
-- The fallback read of the limits API (Redis down): the rollups as of the aggregation's
-- watermark, plus what committed since.
GRANT SELECT (watermark) ON public.usage_aggregation_state TO meterbridge_ingest;

-- The aggregation reads every tenant's limits and records the crossings ingestion missed.
GRANT SELECT ON public.usage_limits TO meterbridge_ops;
CREATE POLICY ops_read_all ON public.usage_limits FOR SELECT TO meterbridge_ops USING (true);
GRANT SELECT, INSERT ON public.usage_threshold_crossings TO meterbridge_ops;
CREATE POLICY ops_crossings ON public.usage_threshold_crossings TO meterbridge_ops
    USING (true) WITH CHECK (detected_by = 'aggregation');
ALTER POLICY ops_usage_events ON public.outbox_events
    WITH CHECK ((aggregate_type = 'usage_period' AND event_type LIKE 'usage.period.%')
                OR (aggregate_type = 'usage_threshold' AND event_type = 'usage.threshold.crossed'));
