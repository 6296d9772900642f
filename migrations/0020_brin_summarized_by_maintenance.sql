-- The aggregation reads new events through the BRIN indexes on `usage_events.inserted_xact` and
-- `usage_events.xact_id`, and a page range the index has not summarized matches every search.
--
-- Before: summaries came only from autosummarize (0016) and VACUUM. Autosummarize queues its
-- requests in one array of 256 for the whole instance, and autovacuum works it once a naptime;
-- when the inserts fill ranges faster than that, requests are dropped ("request for BRIN range
-- summarization ... was not recorded" in the server log) and those ranges stay unsummarized until
-- the partition's next VACUUM. Measured in the scheduled-work simulation (1 M events a day, a
-- day partition of 41,700 pages, ranges of 32 pages): at a day's end 210 of its 1,304 ranges
-- were unsummarized, so a run read up to 6,700 pages of it where its own events fill about 300,
-- and each closed day's partial last range (which neither autosummarize nor VACUUM summarizes)
-- was read by every run.
--
-- After: each storage maintenance run also summarizes, as the owner, the new page ranges of the
-- day partitions inside ingestion's window, range by range from where it last stopped
-- (`usage_events_brin_progress` keeps, per index, the heap pages summarized so far, so a run's
-- cost follows what was written since, not what is stored; a partial last range is summarized
-- too, and inserts into it later widen its summary). The unsummarized tail a run may read is
-- then about one maintenance period of inserts, whatever autovacuum keeps up with. A run
-- summarizes for at most `p_budget` (the maintenance has a statement timeout, and must never
-- fail for this): what is left, it records and the next run resumes. An index locked by a
-- VACUUM is skipped (the next run takes it) rather than waited for.

CREATE TABLE public.usage_events_brin_progress (
    index_name text PRIMARY KEY,
    -- The heap's size in pages when this index's ranges were last summarized.
    summarized_blocks bigint NOT NULL CHECK (summarized_blocks >= 0)
);

CREATE FUNCTION public.usage_events_brin_summarize(p_from date,
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
        -- From the range holding the last page summarized (a partial range, summarized
        -- before, is skipped at once).
        v_block := v_done / v_per_range * v_per_range;
        v_ranges := 0;
        BEGIN
            WHILE v_block < v_blocks
                  AND pg_catalog.clock_timestamp() - v_started < p_budget LOOP
                v_ranges := v_ranges + pg_catalog.brin_summarize_range(v_index, v_block);
                v_block := v_block + v_per_range;
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
