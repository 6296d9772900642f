-- 0007: usage aggregation (issue 9).
--
-- 1. Every event row records the transaction that last wrote it (`xact_id`), so aggregation can
--    find what changed since its last run without ever missing a late commit: a run takes the
--    oldest transaction still running (`pg_snapshot_xmin`) as its upper bound, and every
--    transaction below that bound has finished. A BRIN index (per partition, a few pages) finds
--    the rows of a transaction range; it costs ingestion almost nothing.
-- 2. Corrections: an event is voided (who, when, why), never deleted. The API role may write
--    the three void columns and nothing else of a stored event; a trigger stamps the voiding
--    transaction into `xact_id`, so the next aggregation run sees the change, and refuses to
--    void twice or to undo a void.
-- 3. `usage_aggregates`: the rollups billing reads, daily / weekly (ISO, Monday) / monthly, in
--    UTC. `usage_aggregation_queue`: the cells a run still has to compute (a run that stops
--    before its deadline leaves the rest here). `usage_aggregation_state`: the watermark.

------------------------------------------------------------------------------------------------
-- 1. The writing transaction of each event row.
------------------------------------------------------------------------------------------------
-- Added without a default first (no rewrite of the stored rows; they are queued below), then
-- given one for every row written from now on. bigint, not xid8: BRIN has no xid8 operator
-- class, and a 64-bit transaction id stays below 2^63 for as long as any cluster can live.
ALTER TABLE public.usage_events ADD COLUMN xact_id bigint;
ALTER TABLE public.usage_events
    ALTER COLUMN xact_id SET DEFAULT (pg_catalog.pg_current_xact_id()::text)::bigint;
CREATE INDEX usage_events_xact ON public.usage_events USING brin (xact_id)
    WITH (pages_per_range = 32);

------------------------------------------------------------------------------------------------
-- 2. Voids.
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_events
    ADD COLUMN voided_at timestamptz,
    ADD COLUMN voided_by text COLLATE "C",
    ADD COLUMN void_reason text,
    ADD CONSTRAINT usage_events_void_complete CHECK (
        (voided_at IS NULL) = (voided_by IS NULL) AND (voided_at IS NULL) = (void_reason IS NULL)),
    ADD CONSTRAINT usage_events_voided_by_length CHECK (length(voided_by) BETWEEN 1 AND 128),
    ADD CONSTRAINT usage_events_void_reason_length CHECK (length(void_reason) BETWEEN 1 AND 500);

CREATE FUNCTION public.usage_events_on_update() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    BEGIN
        IF OLD.voided_at IS NOT NULL THEN
            RAISE EXCEPTION 'usage event % is already voided', OLD.event_id
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        NEW.xact_id := (pg_catalog.pg_current_xact_id()::text)::bigint;
        RETURN NEW;
    END $$;
REVOKE ALL ON FUNCTION public.usage_events_on_update() FROM PUBLIC;
CREATE TRIGGER usage_events_on_update BEFORE UPDATE ON public.usage_events
    FOR EACH ROW EXECUTE FUNCTION public.usage_events_on_update();

-- Ingestion names the columns it writes; `xact_id` is never one of them (a forged low value
-- would hide a row from aggregation), nor are the void columns. A void writes those only.
REVOKE INSERT ON public.usage_events FROM meterbridge_api;
GRANT INSERT (tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
              correlation_id, classification, idempotency_key, metadata, payload_hash,
              operation_key)
    ON public.usage_events TO meterbridge_api;
GRANT UPDATE (voided_at, voided_by, void_reason) ON public.usage_events TO meterbridge_api;

------------------------------------------------------------------------------------------------
-- 3. Rollups.
------------------------------------------------------------------------------------------------
CREATE TABLE public.usage_aggregates (
    tenant_id       uuid NOT NULL REFERENCES public.tenants (id),
    period_type     text COLLATE "C" NOT NULL
                    CHECK (period_type IN ('daily', 'weekly', 'monthly')),
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    metric          text COLLATE "C" NOT NULL REFERENCES public.metrics (name),
    classification  text COLLATE "C" NOT NULL
                    CHECK (classification IN ('BILLABLE', 'NON_BILLABLE', 'INFO')),
    -- Exact at any size: a sum of bigints.
    total_quantity  numeric NOT NULL CHECK (total_quantity >= 0 AND scale(total_quantity) = 0),
    event_count     bigint NOT NULL CHECK (event_count >= 0),
    distinct_actors bigint NOT NULL CHECK (distinct_actors >= 0),
    -- What the cell was computed from: SHA-256 of its event count and the XOR of 64-bit hashes
    -- of its events' seq (any event added or voided changes it).
    source_hash     bytea NOT NULL,
    computed_at     timestamptz NOT NULL,
    final           boolean NOT NULL DEFAULT false,
    finalized_at    timestamptz,
    -- Changes after the cell became final (late events, voids), and the last of them.
    revisions_after_final integer NOT NULL DEFAULT 0,
    revised_at      timestamptz,
    PRIMARY KEY (tenant_id, period_type, period_start, metric),
    CHECK (period_end > period_start),
    CHECK (final = (finalized_at IS NOT NULL))
);
-- Cells waiting to become final: a short range, scanned by every run.
CREATE INDEX usage_aggregates_open ON public.usage_aggregates (period_end) WHERE NOT final;
-- The counters' repair reads the recent daily cells of every tenant; backfill reads a range.
CREATE INDEX usage_aggregates_period ON public.usage_aggregates (period_type, period_start);
-- A tenant's last aggregation (the status job).
CREATE INDEX usage_aggregates_tenant_computed ON public.usage_aggregates (tenant_id, computed_at);

CREATE TABLE public.usage_aggregation_queue (
    period_type  text COLLATE "C" NOT NULL
                 CHECK (period_type IN ('daily', 'weekly', 'monthly')),
    period_start timestamptz NOT NULL,
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id),
    metric       text COLLATE "C" NOT NULL REFERENCES public.metrics (name),
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    -- Why: 'change' (events written since the last run) or 'backfill'.
    reason       text COLLATE "C" NOT NULL CHECK (reason IN ('change', 'backfill')),
    PRIMARY KEY (period_type, period_start, tenant_id, metric)
);
CREATE INDEX usage_aggregation_queue_tenant ON public.usage_aggregation_queue (tenant_id);

CREATE TABLE public.usage_aggregation_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Every transaction below this id has been collected into the queue.
    watermark   bigint NOT NULL,
    last_run_at timestamptz,
    last_run    jsonb
);

-- The advisory lock of an aggregation run (transaction-scoped; a second run skips).
CREATE FUNCTION public.usage_aggregation_lock_id() RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
    AS $$ SELECT 7235010426170002::bigint $$;
REVOKE ALL ON FUNCTION public.usage_aggregation_lock_id() FROM PUBLIC;

-- The starting point: every transaction from now on is above the watermark, and every event
-- stored before (whose xact_id is NULL) has its cells queued.
INSERT INTO public.usage_aggregation_state (watermark)
VALUES ((pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text)::bigint);

INSERT INTO public.usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
SELECT DISTINCT p.period_type, pg_catalog.date_trunc(p.unit, e.occurred_at, 'UTC'),
       e.tenant_id, e.metric, 'change'
  FROM public.usage_events e
 CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
       AS p(period_type, unit)
ON CONFLICT DO NOTHING;

------------------------------------------------------------------------------------------------
-- 4. Who may do what. Tenants read their own rollups; the ops role (the aggregation job)
--    writes them, works the queue and moves the watermark. Nothing else.
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_aggregates ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON public.usage_aggregates FOR SELECT TO meterbridge_api
    USING (tenant_id = public.current_tenant_id());
CREATE POLICY ops_all ON public.usage_aggregates TO meterbridge_ops USING (true) WITH CHECK (true);
GRANT SELECT ON public.usage_aggregates TO meterbridge_api;
GRANT SELECT, INSERT, UPDATE ON public.usage_aggregates TO meterbridge_ops;

ALTER TABLE public.usage_aggregation_queue ENABLE ROW LEVEL SECURITY;
CREATE POLICY ops_all ON public.usage_aggregation_queue TO meterbridge_ops
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, DELETE ON public.usage_aggregation_queue TO meterbridge_ops;

GRANT SELECT, UPDATE ON public.usage_aggregation_state TO meterbridge_ops;
GRANT EXECUTE ON FUNCTION public.usage_aggregation_lock_id() TO meterbridge_ops;
