-- The aggregation reads new events through the BRIN indexes on `usage_events.inserted_xact` and
-- `usage_events.xact_id`, and a page range the index has not summarized matches every search.
--
-- Before: summaries came only from autosummarize (0016) and VACUUM. Autosummarize queues its
-- requests in one array of 256 for the whole instance, and autovacuum works it once a naptime;
-- when the inserts fill ranges faster than that, requests are dropped ("request for BRIN range
-- summarization ... was not recorded" in the server log) and those ranges stay unsummarized until
-- the partition's next VACUUM. Measured in the scheduled-work simulation (1 M events a day, a
-- day partition of 41,700 pages): at a day's end 210 of its 326 ranges were unsummarized, so a
-- run read up to 27,000 pages where its own events fill about 300, and each closed day's
-- partial last range (which neither autosummarize nor VACUUM summarizes) was read by every run.
--
-- After: each storage maintenance run also summarizes, as the owner, the new page ranges of the
-- day partitions inside ingestion's window, and only of those that grew since it last did
-- (`usage_events_brin_progress` keeps each index's heap size at its last summary, so a run's
-- cost follows what was written since, not what is stored; a partial last range is summarized
-- too, and inserts into it later widen its summary). The unsummarized tail a run may read is
-- then at most one maintenance period of inserts, whatever autovacuum keeps up with. An index
-- locked by a VACUUM or another run is skipped (the next run takes it) rather than waited for.

CREATE TABLE public.usage_events_brin_progress (
    index_name text PRIMARY KEY,
    -- The heap's size in pages when this index's ranges were last summarized.
    summarized_blocks bigint NOT NULL CHECK (summarized_blocks >= 0)
);

CREATE FUNCTION public.usage_events_brin_summarize(p_from date)
RETURNS TABLE (action text, object text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '1s'
AS $$
DECLARE
    v_index regclass;
    v_table regclass;
    v_blocks bigint;
    v_done bigint;
    v_ranges integer;
BEGIN
    -- Progress of partitions dropped since.
    DELETE FROM public.usage_events_brin_progress p
     WHERE pg_catalog.to_regclass(p.index_name) IS NULL;
    FOR v_index, v_table IN
        SELECT i.inhrelid::regclass, x.indrelid::regclass
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_index x ON x.indexrelid = i.inhrelid
          JOIN pg_catalog.pg_class t ON t.oid = x.indrelid
         WHERE i.inhparent IN ('public.usage_events_xact'::regclass,
                               'public.usage_events_inserted_xact'::regclass)
           AND t.relname ~ '^usage_events_p[0-9]{8}$'
           AND pg_catalog.to_date(pg_catalog.substr(t.relname, 15), 'YYYYMMDD') >= p_from
         ORDER BY t.relname, 1
    LOOP
        v_blocks := pg_catalog.pg_relation_size(v_table)
                    / pg_catalog.current_setting('block_size')::bigint;
        SELECT p.summarized_blocks INTO v_done
          FROM public.usage_events_brin_progress p
         WHERE p.index_name = v_index::text;
        IF v_blocks <= coalesce(v_done, 0) THEN
            CONTINUE;
        END IF;
        BEGIN
            v_ranges := pg_catalog.brin_summarize_new_values(v_index);
        EXCEPTION WHEN lock_not_available THEN
            action := 'summary skipped (locked)';
            object := v_index::text;
            RETURN NEXT;
            CONTINUE;
        END;
        INSERT INTO public.usage_events_brin_progress AS p (index_name, summarized_blocks)
        VALUES (v_index::text, v_blocks)
        ON CONFLICT (index_name) DO UPDATE SET summarized_blocks = EXCLUDED.summarized_blocks;
        IF v_ranges > 0 THEN
            action := 'summarized';
            object := pg_catalog.format('%s (%s ranges)', v_index, v_ranges);
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION public.usage_events_brin_summarize(date) FROM PUBLIC;
