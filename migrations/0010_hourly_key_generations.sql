-- Ingestion at scale, fourth step: hour-long key generations, compacted in two levels.
--
-- Migration 0008 kept a generation open a day, so the B-tree every new key is written into
-- held up to a day of random 16-byte keys (half a day on average). A random write dirties its
-- page, and the first write to a page after each checkpoint puts the whole page in the WAL: at
-- 30 M stored rows a 40 k-event burst wrote thousands of that B-tree's pages, 1.6-1.9 times
-- the WAL of an empty table, and each commit waited for it. Reading a B-tree at random dirties
-- nothing and writes no WAL.
--
-- After:
--   * A generation stays open an hour (DEDUP_GENERATION_HOURS, 1 by default): the B-tree every
--     key is written into holds an hour of keys, a few hundred pages.
--   * usage_event_keys_compact(p_now, p_full_after) compacts in two levels:
--       - a full compaction, as in 0008 (every closed generation merged into one partition with
--         its Bloom filter, the expired ones left out), once a closed generation outside the
--         filtered partition has waited p_full_after (DEDUP_FULL_COMPACTION_HOURS, 24): the
--         window's keys are rewritten once a day, as before;
--       - otherwise a recent merge: the generations closed since the last full compaction,
--         when they sit in two partitions or more, are merged into one, built in key order
--         without a filter (usage_event_keys_r<first>_<last>, at most p_full_after of keys).
--         Ingestion probes it by one descent per key, read-only.
--     A key therefore costs one insert into an hour's B-tree, one read-only probe of the
--     recent partition, and one filter check (the compacted partition's B-tree only on a
--     "maybe").
--   * p_full_after = 0 (the default, for a call by hand) always compacts fully.
--   * The maintenance (as in 0008) rotates a generation up to a minute early (a sixtieth of a
--     generation at most), so an hourly schedule that fires a few seconds earlier than the
--     last time does not leave an hour-long generation open for two. A key is still remembered
--     the window after its generation closed, which is after it was stored.

DROP FUNCTION public.usage_event_keys_compact();

CREATE FUNCTION public.usage_event_keys_compact(
        p_now        timestamptz DEFAULT pg_catalog.now(),
        p_full_after interval DEFAULT interval '0')
    RETURNS TABLE (action text, object text)
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_full    boolean;
        v_parts   text[];
        v_live    integer[];
        v_expired boolean;
        v_bare    boolean;
        v_name    text;
        v_part    text;
        v_list    text;
        v_keys    bigint;
        v_filter  integer;
        v_blocks  integer;
    BEGIN
        IF p_full_after < interval '0' OR p_full_after > interval '7 days' THEN
            RAISE EXCEPTION 'a full compaction must come within 0 to 7 days' USING ERRCODE = '22023';
        END IF;
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_storage_lock_id());
        -- Full when asked (p_full_after 0), or once a generation outside the filtered
        -- partition has waited long enough (or has expired: no compaction ran for a window).
        SELECT p_full_after = interval '0'
               OR coalesce(bool_or(g.filter_id IS NULL
                                   AND (g.closed_at <= p_now - p_full_after OR g.expired_at IS NOT NULL)),
                           false)
          INTO v_full
          FROM public.usage_key_generations g
         WHERE g.closed_at IS NOT NULL;
        -- The partitions to merge, and the live generations they hold: every closed one for a
        -- full compaction; for a recent merge, those outside the filtered partition.
        SELECT coalesce(array_agg(DISTINCT g.stored_in), '{}'),
               coalesce(array_agg(g.generation ORDER BY g.generation)
                            FILTER (WHERE g.expired_at IS NULL), '{}'),
               coalesce(bool_or(g.expired_at IS NOT NULL), false),
               coalesce(bool_or(g.filter_id IS NULL), false)
          INTO v_parts, v_live, v_expired, v_bare
          FROM public.usage_key_generations g
         WHERE g.closed_at IS NOT NULL AND (v_full OR g.filter_id IS NULL);
        IF v_full THEN
            -- Nothing to do for one partition that has its filter and no expired keys.
            IF pg_catalog.cardinality(v_parts) = 0
               OR (pg_catalog.cardinality(v_parts) = 1 AND NOT v_expired AND NOT v_bare) THEN
                RETURN;
            END IF;
        ELSIF pg_catalog.cardinality(v_parts) < 2 THEN
            RETURN;
        END IF;

        IF pg_catalog.cardinality(v_live) > 0 THEN
            v_name := pg_catalog.format(CASE WHEN v_full THEN 'usage_event_keys_c%s_%s'
                                             ELSE 'usage_event_keys_r%s_%s' END,
                                        v_live[1], v_live[pg_catalog.cardinality(v_live)]);
            v_list := pg_catalog.array_to_string(v_live, ',');
            IF pg_catalog.to_regclass('public.' || v_name) IS NOT NULL THEN
                RAISE EXCEPTION 'compaction target % exists', v_name USING ERRCODE = '55000';
            END IF;
            -- Built outside the rotation lock: closed generations take no more writes.
            EXECUTE pg_catalog.format('CREATE TABLE public.%I (LIKE public.usage_event_keys)', v_name);
            EXECUTE pg_catalog.format(
                'INSERT INTO public.%I (generation, key_hash, tenant_id, occurred_at, seq)
                 SELECT generation, key_hash, tenant_id, occurred_at, seq
                   FROM public.usage_event_keys WHERE generation IN (%s) ORDER BY key_hash',
                v_name, v_list);
            GET DIAGNOSTICS v_keys = ROW_COUNT;
            IF v_full THEN
                -- Its Bloom filter (migration 0008, section 4): about 10 bits per key, in
                -- 4096-bit blocks.
                v_blocks := greatest(1, ceil(v_keys * 10 / 4096.0))::integer;
                v_filter := pg_catalog.nextval('public.usage_key_filter_ids');
                EXECUTE pg_catalog.format(
                    'INSERT INTO public.usage_key_filter_blocks (filter, block, bits)
                     SELECT %3$s, public.usage_key_block(k.key_hash, %2$s),
                            pg_catalog.bit_or(
                                pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(
                                pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(
                                    pg_catalog.repeat(''0'', 4096)::bit(4096),
                                    public.usage_key_bit(k.key_hash, 0), 1),
                                    public.usage_key_bit(k.key_hash, 1), 1),
                                    public.usage_key_bit(k.key_hash, 2), 1),
                                    public.usage_key_bit(k.key_hash, 3), 1),
                                    public.usage_key_bit(k.key_hash, 4), 1),
                                    public.usage_key_bit(k.key_hash, 5), 1))
                       FROM public.%1$I k
                      GROUP BY 2',
                    v_name, v_blocks, v_filter);
            END IF;
            -- Implies the partition bound, so ATTACH needs no scan.
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ADD CONSTRAINT %I CHECK (generation IN (%s))',
                                      v_name, v_name || '_bound', v_list);
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ADD CONSTRAINT %I UNIQUE (key_hash, generation)',
                                      v_name, v_name || '_unique');
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_name);
        END IF;

        -- The swap, with ingestion held back (it holds this lock shared).
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
        FOREACH v_part IN ARRAY v_parts LOOP
            EXECUTE pg_catalog.format('ALTER TABLE public.usage_event_keys DETACH PARTITION public.%I', v_part);
            EXECUTE pg_catalog.format('DROP TABLE public.%I', v_part);
            action := 'dropped'; object := v_part; RETURN NEXT;
        END LOOP;
        IF v_full THEN
            DELETE FROM public.usage_key_generations WHERE expired_at IS NOT NULL;
            DELETE FROM public.usage_key_filter_blocks WHERE filter IS DISTINCT FROM v_filter;
        END IF;
        IF v_name IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER TABLE public.usage_event_keys ATTACH PARTITION public.%I
                                       FOR VALUES IN (%s)', v_name, v_list);
            UPDATE public.usage_key_generations
               SET stored_in = v_name, filter_id = v_filter, filter_blocks = v_blocks
             WHERE generation = ANY (v_live);
            action := CASE WHEN v_full THEN 'compacted' ELSE 'merged' END;
            object := v_name;
            RETURN NEXT;
        END IF;
    END $$;
REVOKE ALL ON FUNCTION public.usage_event_keys_compact(timestamptz, interval) FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- The maintenance of migration 0008, with the rotation's minute of slack.
------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION public.usage_storage_maintain(
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
        v_gen     public.usage_key_generations;
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
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_storage_lock_id());

        -- Key generations first: open the next once the open one is p_rotate_every old. The
        -- exclusive lock waits for every ingestion transaction in flight (they hold it shared)
        -- and holds new ones back until this transaction commits. It is taken before any
        -- table lock below, which an ingestion transaction holding it shared may be waiting
        -- for (the other order deadlocks).
        -- A minute early at most (a sixtieth of a generation): an hourly schedule that fires a
        -- few seconds earlier than the last time still rotates an hour-long generation.
        SELECT * INTO v_open FROM public.usage_key_generations WHERE closed_at IS NULL;
        IF v_open.opened_at <= p_now - p_rotate_every
                               + LEAST(p_rotate_every / 60, interval '1 minute') THEN
            PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
            v_next := v_open.generation + 1;
            PERFORM public.usage_event_keys_create_partition(v_next);
            UPDATE public.usage_key_generations SET closed_at = p_now
             WHERE generation = v_open.generation;
            INSERT INTO public.usage_key_generations (generation, opened_at, stored_in)
            VALUES (v_next, p_now, 'usage_event_keys_g' || v_next);
            action := 'rotated'; object := 'usage_event_keys_g' || v_next; RETURN NEXT;
        END IF;
        -- A generation closed more than the window ago holds only keys older than the window.
        FOR v_gen IN SELECT * FROM public.usage_key_generations
                      WHERE closed_at <= p_now - p_dedup_window AND expired_at IS NULL
                      ORDER BY generation LOOP
            IF v_gen.stored_in = 'usage_event_keys_g' || v_gen.generation THEN
                EXECUTE format('DROP TABLE IF EXISTS public.%I', v_gen.stored_in);
                DELETE FROM public.usage_key_generations WHERE generation = v_gen.generation;
            ELSE
                UPDATE public.usage_key_generations SET expired_at = p_now
                 WHERE generation = v_gen.generation;
            END IF;
            action := 'expired'; object := 'usage_event_keys_g' || v_gen.generation; RETURN NEXT;
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

