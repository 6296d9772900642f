-- Final-period events. Downstream systems (billing above all) learn that a period is final, or
-- that a final period was revised, from an outbox event instead of polling the summary:
--
--   usage.period.finalized  a cell (tenant, metric, period type and start) became final;
--   usage.period.revised    a final cell changed (a late event, a void, a backfill), with its
--                           values before the change and the revision number.
--
-- They are written by triggers on usage_aggregates, so every path that makes a cell final or
-- revises it (the run's deltas, its recomputes, the finalize step, a backfill) writes its
-- event in the same transaction, and no future path can forget to. One event per (cell,
-- revision): its aggregate is the cell (aggregateId, a UUID derived from the cell's key) and
-- its sequence is the revision plus one, both unique in the outbox, so a revision never
-- overtakes its finalisation and a re-run writes nothing new.
--
-- Off by default: a tenant that bills monthly does not want 30 daily events per metric. A
-- period type is switched on per tenant with the admin function (`usage period-events set`),
-- audited in tenant_settings_audit.

CREATE TABLE public.usage_period_event_settings (
    tenant_id   uuid        NOT NULL REFERENCES public.tenants (id),
    period_type text        COLLATE "C" NOT NULL
                CHECK (period_type IN ('daily', 'weekly', 'monthly')),
    enabled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period_type)
);
ALTER TABLE public.usage_period_event_settings ENABLE ROW LEVEL SECURITY;
-- The aggregation (meterbridge_ops) reads whether a tenant wants a period type's events.
CREATE POLICY ops_read_all ON public.usage_period_event_settings FOR SELECT TO meterbridge_ops
    USING (true);
GRANT SELECT ON public.usage_period_event_settings TO meterbridge_ops;

-- Who changed which of a tenant's usage settings (period events, and usage limits later), when,
-- why, from what to what. Written by the admin function (the database owner) in the change's
-- transaction; no application role reads or writes it.
CREATE TABLE public.tenant_settings_audit (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    tenant_id uuid        NOT NULL REFERENCES public.tenants (id),
    setting   text        COLLATE "C" NOT NULL CHECK (setting ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    actor     text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 128),
    reason    text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    before    jsonb,
    after     jsonb
);
ALTER TABLE public.tenant_settings_audit ENABLE ROW LEVEL SECURITY;
CREATE INDEX tenant_settings_audit_tenant_at ON public.tenant_settings_audit (tenant_id, at);

-- The aggregation may append usage events to the outbox, and only those: never a payment's.
GRANT INSERT (tenant_id, event_id, event_type, schema_version, payload, correlation_id,
              idempotency_key, aggregate_type, aggregate_id, aggregate_sequence, source_service,
              created_at)
    ON public.outbox_events TO meterbridge_ops;
CREATE POLICY ops_usage_events ON public.outbox_events FOR INSERT TO meterbridge_ops
    WITH CHECK (aggregate_type = 'usage_period' AND event_type LIKE 'usage.%');

-- The event of a cell that became final (sequence 1) or of its revision n (sequence n + 1),
-- when its tenant wants its period type's events. Runs with the writer's rights (the
-- aggregation's meterbridge_ops, under the policy above; or the owner).
CREATE FUNCTION public.usage_aggregates_period_event() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_revised   boolean := TG_OP = 'UPDATE' AND OLD.final;
        v_type      text;
        v_at        timestamptz;
        v_sequence  integer;
        v_aggregate uuid;
        v_event     uuid := pg_catalog.gen_random_uuid();
        v_key       text;
        v_data      jsonb;
        v_envelope  jsonb;
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM public.usage_period_event_settings s
                        WHERE s.tenant_id = NEW.tenant_id AND s.period_type = NEW.period_type) THEN
            RETURN NULL;
        END IF;
        IF v_revised THEN
            v_type := 'usage.period.revised';
            v_at := coalesce(NEW.revised_at, NEW.computed_at);
            v_sequence := NEW.revisions_after_final + 1;
        ELSE
            v_type := 'usage.period.finalized';
            v_at := coalesce(NEW.finalized_at, NEW.computed_at);
            v_sequence := 1;
        END IF;
        -- The cell's identity as a UUID: md5 of "<tenant>/<period type>/<YYYY-MM-DD>/<metric>".
        v_aggregate := md5(NEW.tenant_id::text || '/' || NEW.period_type || '/'
                           || to_char(NEW.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '/'
                           || NEW.metric)::uuid;
        v_key := 'usage-period-' || v_aggregate::text || '-r' || NEW.revisions_after_final;
        v_data := jsonb_build_object(
            'metric', NEW.metric,
            'periodType', NEW.period_type,
            'periodStart', to_char(NEW.period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            'periodEnd', to_char(NEW.period_end AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
            'classification', NEW.classification,
            'totalQuantity', NEW.total_quantity::text,
            'eventCount', NEW.event_count,
            'distinctActors', NEW.distinct_actors,
            'computedAt', to_char(NEW.computed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'finalizedAt', to_char(NEW.finalized_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'revision', NEW.revisions_after_final);
        IF v_revised THEN
            v_data := v_data || jsonb_build_object('previous', jsonb_build_object(
                'classification', OLD.classification,
                'totalQuantity', OLD.total_quantity::text,
                'eventCount', OLD.event_count,
                'distinctActors', OLD.distinct_actors,
                'computedAt', to_char(OLD.computed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                'revision', OLD.revisions_after_final));
        END IF;
        v_envelope := jsonb_build_object(
            'eventId', v_event,
            'eventType', v_type,
            'schemaVersion', 1,
            'tenantId', NEW.tenant_id,
            'occurredAt', to_char(v_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'correlationId', v_key,
            'idempotencyKey', v_key,
            'aggregateType', 'usage_period',
            'aggregateId', v_aggregate,
            'aggregateSequence', v_sequence,
            'sourceService', 'aggregate-usage',
            'data', v_data);
        INSERT INTO public.outbox_events (tenant_id, event_id, event_type, schema_version, payload,
                                          correlation_id, idempotency_key, aggregate_type,
                                          aggregate_id, aggregate_sequence, source_service,
                                          created_at)
        VALUES (NEW.tenant_id, v_event, v_type, 1, v_envelope, v_key, v_key, 'usage_period',
                v_aggregate, v_sequence, 'aggregate-usage', v_at)
        ON CONFLICT DO NOTHING;
        RETURN NULL;
    END $$;
REVOKE ALL ON FUNCTION public.usage_aggregates_period_event() FROM PUBLIC;

-- Filtered in the trigger's WHEN, so writes of open cells (nearly all) never call it.
CREATE TRIGGER usage_aggregates_finalized AFTER INSERT ON public.usage_aggregates
    FOR EACH ROW WHEN (NEW.final)
    EXECUTE FUNCTION public.usage_aggregates_period_event();
CREATE TRIGGER usage_aggregates_final_changed AFTER UPDATE ON public.usage_aggregates
    FOR EACH ROW
    WHEN (NEW.final AND (NOT OLD.final OR NEW.revisions_after_final > OLD.revisions_after_final))
    EXECUTE FUNCTION public.usage_aggregates_period_event();
