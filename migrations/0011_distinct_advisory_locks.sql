-- Each advisory lock its own id. Migration 0008 gave the storage maintenance's lock
-- (usage_storage_lock_id) the id of the aggregation's (usage_aggregation_lock_id, 0007): while a
-- compaction held it for minutes every aggregation run skipped as "locked", and while an
-- aggregation ran the hourly maintenance failed on its lock timeout. The functions that take
-- the lock call usage_storage_lock_id(), so replacing it is the whole change. The list of every
-- lock is meterbridge::domain::advisory_locks; shared/tests/advisory_locks.rs compares the two.
CREATE OR REPLACE FUNCTION public.usage_storage_lock_id() RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
    AS $$ SELECT 7235010426170003::bigint $$;
