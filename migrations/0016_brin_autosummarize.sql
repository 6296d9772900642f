-- The aggregation reads what changed through the BRIN indexes on `usage_events.inserted_xact`
-- and `usage_events.xact_id` (0007, 0014). A BRIN index knows nothing of a page range until that
-- range is summarized, and an unsummarized range matches every search: without summaries, each
-- run reads the whole of every day partition written since its last VACUUM. An insert-only day
-- partition is vacuumed once 20 % of it is new (autovacuum_vacuum_insert_scale_factor), so at
-- high rates a run could read a fifth of a day. Measured in the scheduled-work simulation with
-- autovacuum off: 1.7 s a run after two days of 1 M events, growing by the day.
--
-- After: each partition's BRIN index on those columns is `autosummarize = on`: when an insert
-- moves on to the next page range, autovacuum summarizes the one before within its naptime
-- (a minute by default), so a run reads the last minute or so of pages and the ranges that
-- changed. The option cannot be set on a partitioned index (PostgreSQL 15), and a partition
-- created later copies its parent's options: `usage_events_brin_autosummarize` sets it on every
-- attached partition's index that lacks it, called here and by each storage maintenance run
-- after it creates the days ahead. (Autovacuum must be on, as on RDS by default.)

CREATE FUNCTION public.usage_events_brin_autosummarize()
RETURNS TABLE (action text, object text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_index regclass;
BEGIN
    FOR v_index IN
        SELECT i.inhrelid::regclass
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent IN ('public.usage_events_xact'::regclass,
                               'public.usage_events_inserted_xact'::regclass)
           AND NOT coalesce('autosummarize=on' = ANY (c.reloptions), false)
         ORDER BY c.relname
    LOOP
        EXECUTE pg_catalog.format('ALTER INDEX %s SET (autosummarize = on)', v_index);
        action := 'autosummarized';
        object := v_index::text;
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION public.usage_events_brin_autosummarize() FROM PUBLIC;

SELECT count(*) FROM public.usage_events_brin_autosummarize();
