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
