-- The BRIN summaries of the storage maintenance (0020) never wait for a VACUUM.
--
-- Before: `brin_summarize_range` takes the partition's SHARE UPDATE EXCLUSIVE lock, which an
-- autovacuum of the partition holds too, and the function waited for it up to its 1 s lock
-- timeout before skipping the partition: in the scheduled-work simulation the maintenance's
-- median run stayed flat (46-58 ms a day over 40 days) while its maximum jumped between 55 and
-- 786 ms with no trend, the runs that met an autovacuum of the day being written.
--
-- After: the function asks for the partition's lock without waiting (`LOCK ... NOWAIT`) before
-- its first range, and a partition that a VACUUM holds is skipped at once (`summary skipped
-- (locked)`): the next run takes it from where it stopped. The lock is held to the end of the
-- caller's transaction, so the caller runs the function in short transactions of its own (the
-- maintenance calls it step by step, each step within `p_budget`); meanwhile autovacuum skips
-- the partition rather than waiting, and ingestion's inserts are not blocked (ROW EXCLUSIVE
-- does not conflict). A run that summarized nothing writes no progress row; a budget of zero
-- or less summarizes nothing and reports the work left.

CREATE OR REPLACE FUNCTION public.usage_events_brin_summarize(p_from date,
                                                              p_budget interval DEFAULT '5 seconds')
RETURNS TABLE (action text, object text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_started timestamptz := pg_catalog.clock_timestamp();
    v_index regclass;
    v_table regclass;
    v_per_range bigint;
    v_blocks bigint;
    v_done bigint;
    v_block bigint;
    v_ranges bigint;
BEGIN
    -- Progress of partitions dropped since.
    DELETE FROM public.usage_events_brin_progress p
     WHERE pg_catalog.to_regclass(p.index_name) IS NULL;
    FOR v_index, v_table, v_per_range IN
        SELECT i.inhrelid::regclass, x.indrelid::regclass,
               coalesce((SELECT o.option_value::bigint
                           FROM pg_catalog.pg_options_to_table(c.reloptions) o
                          WHERE o.option_name = 'pages_per_range'), 128)
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
          JOIN pg_catalog.pg_index x ON x.indexrelid = i.inhrelid
          JOIN pg_catalog.pg_class t ON t.oid = x.indrelid
         WHERE i.inhparent IN ('public.usage_events_xact'::regclass,
                               'public.usage_events_inserted_xact'::regclass)
           AND t.relname ~ '^usage_events_p[0-9]{8}$'
           AND pg_catalog.to_date(pg_catalog.substr(t.relname, 15), 'YYYYMMDD') >= p_from
         ORDER BY t.relname, c.relname
    LOOP
        v_blocks := pg_catalog.pg_relation_size(v_table)
                    / pg_catalog.current_setting('block_size')::bigint;
        SELECT p.summarized_blocks INTO v_done
          FROM public.usage_events_brin_progress p
         WHERE p.index_name = v_index::text;
        v_done := coalesce(v_done, 0);
        IF v_blocks <= v_done THEN
            CONTINUE;
        END IF;
        IF pg_catalog.clock_timestamp() - v_started >= p_budget THEN
            action := 'summary left work';
            object := pg_catalog.format('%s (from page %s of %s)', v_index, v_done, v_blocks);
            RETURN NEXT;
            CONTINUE;
        END IF;
        -- From the range holding the last page summarized (a partial range, summarized
        -- before, is skipped at once).
        v_block := v_done / v_per_range * v_per_range;
        v_ranges := 0;
        BEGIN
            EXECUTE pg_catalog.format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT',
                                      v_table);
            LOOP
                v_ranges := v_ranges + pg_catalog.brin_summarize_range(v_index, v_block);
                v_block := v_block + v_per_range;
                EXIT WHEN v_block >= v_blocks
                       OR pg_catalog.clock_timestamp() - v_started >= p_budget;
            END LOOP;
        EXCEPTION WHEN lock_not_available THEN
            action := 'summary skipped (locked)';
            object := v_index::text;
            RETURN NEXT;
            CONTINUE;
        END;
        v_done := least(v_block, v_blocks);
        INSERT INTO public.usage_events_brin_progress AS p (index_name, summarized_blocks)
        VALUES (v_index::text, v_done)
        ON CONFLICT (index_name) DO UPDATE SET summarized_blocks = EXCLUDED.summarized_blocks;
        IF v_ranges > 0 THEN
            action := 'summarized';
            object := pg_catalog.format('%s (%s ranges)', v_index, v_ranges);
            RETURN NEXT;
        END IF;
        IF v_done < v_blocks THEN
            action := 'summary left work';
            object := pg_catalog.format('%s (from page %s of %s)', v_index, v_done, v_blocks);
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION public.usage_events_brin_summarize(date, interval) FROM PUBLIC;
