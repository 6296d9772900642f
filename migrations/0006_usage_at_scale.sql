-- Ingestion at scale: usage_events in day partitions with a retention policy, and deduplication
-- moved to a compact table of hashed keys that is itself partitioned for cheap expiry.
--
-- Before: three unique B-trees on long random text keys (event id, idempotency key, operation)
-- plus three time indexes, all on one table that only grew. Once those indexes outgrew memory,
-- every insert became random page reads and full-page WAL writes (ingestion fell to 25-30 % of
-- its empty-table rate at 10 M rows).
--
-- After:
--   * usage_events is partitioned by UTC day of occurred_at. Its partitions hold the listing
--     indexes, whose keys begin (tenant, [metric | classification,] occurred_at): new rows land
--     at the right edge of each tenant's range, so inserts touch few pages whatever the
--     table's size. The first of them is also the table's unique key (tenant, occurred_at,
--     seq), by which a dedup key points at its event. The operation key (correlation, metric,
--     instant) contains the instant, so it is unique within its day: a 16-byte hash with the
--     instant, in one more index of the day partition (small, and dropped with the day). A day partition is detached (and moved to
--     the schema usage_archive, from which it can be exported) once it is older than the
--     retention, and dropped some days later: never deleted row by row.
--   * usage_event_keys holds, for every stored event, a 16-byte hash of its event id and, when
--     the caller chose one, of its idempotency key (each unique per tenant and source, and
--     independent of the instant). It is partitioned by key *generation*: ingestion writes into
--     the open generation, whose unique index catches concurrent duplicates; the closed one is
--     probed for earlier duplicates, and dropped whole once it is older than the deduplication
--     window. A generation is opened and closed by the maintenance (the owner),
--     under an exclusive advisory lock that every ingestion transaction holds in shared mode:
--     no ingestion transaction ever straddles a rotation, so no duplicate slips between two
--     generations.

------------------------------------------------------------------------------------------------
-- 1. The key hash, here only to carry the keys of the events already stored; ingestion computes
--    the same bytes in Rust (meterbridge::domain::dedup::DedupKeys): the first 16 bytes of the
--    SHA-256 of kind, tenant and parts joined by U+001F (identifiers cannot hold control
--    characters, so the join is unambiguous).
------------------------------------------------------------------------------------------------
CREATE FUNCTION pg_temp.usage_key(p_kind text, p_tenant uuid, p_a text, p_b text, p_c text)
    RETURNS uuid LANGUAGE sql IMMUTABLE
    AS $$
        SELECT encode(substr(sha256(convert_to(
                   p_kind || chr(31) || p_tenant::text || chr(31) || p_a || chr(31) || p_b
                   || chr(31) || p_c, 'UTF8')), 1, 16), 'hex')::uuid
    $$;

------------------------------------------------------------------------------------------------
-- 2. The partitioned table, the same columns and checks as before.
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_events RENAME TO usage_events_0005;

CREATE TABLE public.usage_events (
    tenant_id       uuid        NOT NULL REFERENCES public.tenants (id),
    event_id        text        COLLATE "C" NOT NULL CHECK (length(event_id) BETWEEN 1 AND 128),
    metric          text        COLLATE "C" NOT NULL REFERENCES public.metrics (name),
    quantity        bigint      NOT NULL CHECK (quantity > 0),
    occurred_at     timestamptz NOT NULL,
    actor_id        text                 CHECK (length(actor_id) BETWEEN 1 AND 128),
    source_service  text        COLLATE "C" NOT NULL
        CHECK (source_service ~ '^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$'),
    correlation_id  text        COLLATE "C" NOT NULL CHECK (length(correlation_id) BETWEEN 1 AND 128),
    classification  text        COLLATE "C" NOT NULL
        CHECK (classification IN ('BILLABLE', 'NON_BILLABLE', 'INFO')),
    idempotency_key text        COLLATE "C" CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    metadata        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    payload_hash    bytea       NOT NULL CHECK (length(payload_hash) = 32),
    created_at      timestamptz NOT NULL DEFAULT now(),
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    -- The hash of (tenant, correlation_id, metric, occurred_at): see section 1.
    operation_key   uuid        NOT NULL
) PARTITION BY RANGE (occurred_at);

-- One day partition, named usage_events_pYYYYMMDD; returns its name when it was created.
CREATE FUNCTION public.usage_events_create_partition(p_day date) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_name text := 'usage_events_p' || to_char(p_day, 'YYYYMMDD');
    BEGIN
        IF to_regclass('public.' || v_name) IS NOT NULL THEN
            RETURN NULL;
        END IF;
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.usage_events '
                       'FOR VALUES FROM (%L) TO (%L)', v_name,
                       p_day::timestamp AT TIME ZONE 'UTC',
                       (p_day + 1)::timestamp AT TIME ZONE 'UTC');
        -- No role may read a partition directly; should one ever be granted, it sees nothing.
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_name);
        RETURN v_name;
    END $$;
REVOKE ALL ON FUNCTION public.usage_events_create_partition(date) FROM PUBLIC;

-- Every day the stored events need, and the 36 days ingestion accepts up to a week ahead.
SELECT count(public.usage_events_create_partition(d::date))
  FROM generate_series(
           least((SELECT min(occurred_at) FROM public.usage_events_0005), now() - interval '36 days')
               AT TIME ZONE 'UTC',
           (now() + interval '7 days') AT TIME ZONE 'UTC',
           interval '1 day') AS d;

INSERT INTO public.usage_events
       (tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
        correlation_id, classification, idempotency_key, metadata, payload_hash, created_at, seq,
        operation_key)
OVERRIDING SYSTEM VALUE
SELECT tenant_id, event_id, metric, quantity, occurred_at, actor_id, source_service,
       correlation_id, classification, idempotency_key, metadata, payload_hash, created_at, seq,
       pg_temp.usage_key('op', tenant_id, correlation_id, metric,
                         (extract(epoch FROM occurred_at) * 1000000)::bigint::text)
  FROM public.usage_events_0005;

SELECT setval(pg_get_serial_sequence('public.usage_events', 'seq'),
              greatest((SELECT max(seq) FROM public.usage_events), 1),
              (SELECT max(seq) IS NOT NULL FROM public.usage_events));

------------------------------------------------------------------------------------------------
-- 3. The dedup keys and their generations.
------------------------------------------------------------------------------------------------
CREATE TABLE public.usage_key_generations (
    generation integer     PRIMARY KEY,
    opened_at  timestamptz NOT NULL,
    closed_at  timestamptz,
    CHECK (closed_at IS NULL OR closed_at >= opened_at)
);
-- Exactly one generation is open at a time.
CREATE UNIQUE INDEX usage_key_generations_one_open ON public.usage_key_generations ((true))
    WHERE closed_at IS NULL;

CREATE TABLE public.usage_event_keys (
    generation  integer     NOT NULL,
    key_hash    uuid        NOT NULL,
    tenant_id   uuid        NOT NULL,
    -- The event holding the key: usage_events' unique key (tenant_id, occurred_at, seq).
    occurred_at timestamptz NOT NULL,
    seq         bigint      NOT NULL,
    CONSTRAINT usage_event_keys_unique UNIQUE (key_hash, generation)
) PARTITION BY LIST (generation);

-- The partition of one generation, named usage_event_keys_gN.
CREATE FUNCTION public.usage_event_keys_create_partition(p_generation integer) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_name text := 'usage_event_keys_g' || p_generation;
    BEGIN
        IF to_regclass('public.' || v_name) IS NOT NULL THEN
            RETURN NULL;
        END IF;
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.usage_event_keys '
                       'FOR VALUES IN (%s)', v_name, p_generation);
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_name);
        RETURN v_name;
    END $$;
REVOKE ALL ON FUNCTION public.usage_event_keys_create_partition(integer) FROM PUBLIC;

INSERT INTO public.usage_key_generations (generation, opened_at) VALUES (1, now());
SELECT count(public.usage_event_keys_create_partition(1));

INSERT INTO public.usage_event_keys (generation, key_hash, tenant_id, occurred_at, seq)
SELECT 1, k.key_hash, e.tenant_id, e.occurred_at, e.seq
  FROM public.usage_events e
 CROSS JOIN LATERAL (VALUES
        (pg_temp.usage_key('event', e.tenant_id, e.source_service, e.event_id, '')),
        (CASE WHEN e.idempotency_key IS NOT NULL
              THEN pg_temp.usage_key('idem', e.tenant_id, e.source_service, e.idempotency_key, '')
         END)
       ) AS k(key_hash)
 WHERE k.key_hash IS NOT NULL;

DROP TABLE public.usage_events_0005;

------------------------------------------------------------------------------------------------
-- 4. Indexes, each for a query (built after the copy).
------------------------------------------------------------------------------------------------
-- The unique key; GET /v1/usage/events unfiltered; the real-time fallback (one UTC day);
-- time-range rollups; a dedup key's lookup of its event.
ALTER TABLE public.usage_events
    ADD CONSTRAINT usage_events_key UNIQUE (tenant_id, occurred_at, seq);
-- GET /v1/usage/events?metric=…; per-metric rollups.
CREATE INDEX usage_events_tenant_metric_time_idx
    ON public.usage_events (tenant_id, metric, occurred_at, seq);
-- GET /v1/usage/events?classification=….
CREATE INDEX usage_events_tenant_class_time_idx
    ON public.usage_events (tenant_id, classification, occurred_at, seq);
-- Dedup of the operation: the same (correlation, metric, instant) once per tenant.
ALTER TABLE public.usage_events
    ADD CONSTRAINT usage_events_operation UNIQUE (operation_key, occurred_at);

------------------------------------------------------------------------------------------------
-- 5. Retired partitions wait here for export (in AWS, aws_s3.query_export_to_s3) until the
--    maintenance drops them.
------------------------------------------------------------------------------------------------
CREATE SCHEMA usage_archive;
REVOKE ALL ON SCHEMA usage_archive FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- 6. The maintenance, run by the owner (the admin function, on a schedule): creates the day
--    partitions ahead, detaches those past the retention, drops archived ones, rotates the key
--    generation and drops the generations past the deduplication window. Idempotent; p_now is
--    a parameter so that tests can move time.
------------------------------------------------------------------------------------------------
CREATE FUNCTION public.usage_storage_maintain(
        p_now            timestamptz,
        p_days_ahead     integer,
        p_retention_days integer,
        p_archive_days   integer,
        p_rotate_every   interval,
        p_dedup_window   interval)
    RETURNS TABLE (action text, object text)
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_today   date := (p_now AT TIME ZONE 'UTC')::date;
        v_name    text;
        v_day     date;
        v_open    public.usage_key_generations;
        v_next    integer;
    BEGIN
        IF p_retention_days < 40 THEN
            RAISE EXCEPTION 'retention must be at least 40 days (ingestion accepts events 35 days old)'
                USING ERRCODE = '22023';
        END IF;
        IF p_days_ahead NOT BETWEEN 1 AND 60 OR p_archive_days NOT BETWEEN 0 AND 365 THEN
            RAISE EXCEPTION 'days ahead must be 1-60 and archive days 0-365' USING ERRCODE = '22023';
        END IF;
        IF p_dedup_window < interval '36 days' OR p_rotate_every < interval '1 hour' THEN
            RAISE EXCEPTION 'the dedup window must be at least 36 days and a generation at least an hour'
                USING ERRCODE = '22023';
        END IF;
        -- A remembered key must always find its event.
        IF make_interval(days => p_retention_days) < p_dedup_window + p_rotate_every + interval '1 day' THEN
            RAISE EXCEPTION 'the retention must outlast the dedup window plus a generation'
                USING ERRCODE = '22023';
        END IF;

        -- Key generations first: open the next once the open one is p_rotate_every old. The
        -- exclusive lock waits for every ingestion transaction in flight (they hold it shared)
        -- and holds new ones back until this transaction commits. It is taken before any
        -- table lock below, which an ingestion transaction holding it shared may be waiting
        -- for (the other order deadlocks).
        SELECT * INTO v_open FROM public.usage_key_generations WHERE closed_at IS NULL;
        IF v_open.opened_at <= p_now - p_rotate_every THEN
            PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
            v_next := v_open.generation + 1;
            PERFORM public.usage_event_keys_create_partition(v_next);
            UPDATE public.usage_key_generations SET closed_at = p_now
             WHERE generation = v_open.generation;
            INSERT INTO public.usage_key_generations (generation, opened_at) VALUES (v_next, p_now);
            action := 'rotated'; object := 'usage_event_keys_g' || v_next; RETURN NEXT;
        END IF;
        -- A generation closed more than the window ago holds only keys older than the window.
        FOR v_next IN SELECT generation FROM public.usage_key_generations
                       WHERE closed_at <= p_now - p_dedup_window ORDER BY 1 LOOP
            EXECUTE format('DROP TABLE IF EXISTS public.%I', 'usage_event_keys_g' || v_next);
            DELETE FROM public.usage_key_generations WHERE generation = v_next;
            action := 'expired'; object := 'usage_event_keys_g' || v_next; RETURN NEXT;
        END LOOP;

        -- Day partitions: every day ingestion may write, and p_days_ahead more.
        FOR v_day IN SELECT d::date FROM generate_series(v_today - 36, v_today + p_days_ahead,
                                                         interval '1 day') AS d LOOP
            v_name := public.usage_events_create_partition(v_day);
            IF v_name IS NOT NULL THEN
                action := 'created'; object := v_name; RETURN NEXT;
            END IF;
        END LOOP;

        -- Retention: detach whole days past it into usage_archive; drop archived days later.
        FOR v_name, v_day IN
            SELECT c.relname, to_date(substr(c.relname, 15), 'YYYYMMDD')
              FROM pg_catalog.pg_inherits i
              JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'public.usage_events'::regclass
               AND c.relname ~ '^usage_events_p[0-9]{8}$'
             ORDER BY 1 LOOP
            IF v_day + 1 <= v_today - p_retention_days THEN
                EXECUTE format('ALTER TABLE public.usage_events DETACH PARTITION public.%I', v_name);
                EXECUTE format('ALTER TABLE public.%I SET SCHEMA usage_archive', v_name);
                action := 'archived'; object := v_name; RETURN NEXT;
            END IF;
        END LOOP;
        FOR v_name IN
            SELECT c.relname FROM pg_catalog.pg_class c
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'usage_archive' AND c.relkind = 'r'
               AND c.relname ~ '^usage_events_p[0-9]{8}$'
               AND to_date(substr(c.relname, 15), 'YYYYMMDD') + 1
                   <= v_today - p_retention_days - p_archive_days
             ORDER BY 1 LOOP
            EXECUTE format('DROP TABLE usage_archive.%I', v_name);
            action := 'dropped'; object := v_name; RETURN NEXT;
        END LOOP;

    END $$;
REVOKE ALL ON FUNCTION public.usage_storage_maintain(timestamptz, integer, integer, integer,
                                                     interval, interval) FROM PUBLIC;

-- The advisory lock id of key rotation (ingestion takes it shared, the rotation exclusive).
CREATE FUNCTION public.usage_keys_lock_id() RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
    AS $$ SELECT 7235010426170001::bigint $$;
REVOKE ALL ON FUNCTION public.usage_keys_lock_id() FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- 7. Who may do what. RLS on the parents applies to every partition read through them; the
--    partitions themselves grant nothing, so no application role can reach one directly.
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON public.usage_events TO meterbridge_api
    USING (tenant_id = public.current_tenant_id())
    WITH CHECK (tenant_id = public.current_tenant_id());
CREATE POLICY ops_read_all ON public.usage_events FOR SELECT TO meterbridge_ops USING (true);
GRANT SELECT, INSERT ON public.usage_events TO meterbridge_api;
GRANT SELECT ON public.usage_events TO meterbridge_ops;

-- Ingestion writes and probes its own tenant's keys, and reads which generation is open. The
-- ops role needs neither.
ALTER TABLE public.usage_event_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON public.usage_event_keys TO meterbridge_api
    USING (tenant_id = public.current_tenant_id())
    WITH CHECK (tenant_id = public.current_tenant_id());
GRANT SELECT, INSERT ON public.usage_event_keys TO meterbridge_api;
GRANT SELECT ON public.usage_key_generations TO meterbridge_api;
