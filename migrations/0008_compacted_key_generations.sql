-- Ingestion at scale, second step: a small open key generation, and the closed ones compacted
-- into one partition.
--
-- Migration 0006 opened a key generation for as long as the window (36 days), so the open
-- generation's unique B-tree held up to 36 days of random 16-byte keys. Once it outgrew
-- shared_buffers every key's insert read a random leaf and dirtied it (written back at eviction,
-- and in full to the WAL after each checkpoint): at 30 M stored rows ingestion kept 55-62 % of
-- its empty-table rate. Reading a B-tree at random costs a fraction of writing it at random.
--
-- After:
--   * A generation stays open a day (DEDUP_GENERATION_HOURS, 24): its B-tree is a day of keys.
--   * usage_event_keys_compact (the admin function runs it after the maintenance, in its own
--     transaction) merges the partitions of the closed generations into one, built sorted
--     (usage_event_keys_c<first>_<last>, one LIST partition for all their generation numbers),
--     leaving out the generations past the window. A key then costs one insert into a small,
--     hot B-tree and one read-only probe of the compacted one (and of a generation closed since
--     the last compaction). The merge reads only closed generations, which nothing writes, so
--     it needs no lock while it builds; it swaps the new partition in under the key-rotation
--     lock held exclusively, like a rotation: no ingestion transaction sees half a swap.
--   * A generation's keys count while its row in usage_key_generations is not expired:
--     ingestion reads the live generations with the open one and probes only those, so the
--     maintenance expires a generation that sits inside a compacted partition by marking it,
--     and the next compaction leaves its keys out.
--   * Maintenance and compaction take one advisory lock (usage_storage_lock_id), so a
--     rotation never waits behind a compaction's build while holding ingestion back.

------------------------------------------------------------------------------------------------
-- 1. Where each generation's keys are, and whether they still count.
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_key_generations
    ADD COLUMN stored_in  text,
    ADD COLUMN expired_at timestamptz;
UPDATE public.usage_key_generations SET stored_in = 'usage_event_keys_g' || generation;
ALTER TABLE public.usage_key_generations
    ALTER COLUMN stored_in SET NOT NULL,
    ADD CONSTRAINT usage_key_generations_open_is_live CHECK (closed_at IS NOT NULL OR expired_at IS NULL);

-- The advisory lock that serializes maintenance and compaction runs.
CREATE FUNCTION public.usage_storage_lock_id() RETURNS bigint
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
    AS $$ SELECT 7235010426170002::bigint $$;
REVOKE ALL ON FUNCTION public.usage_storage_lock_id() FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- 2. The maintenance, as in 0006, but: serialized with compaction; a new generation records
--    its partition; an expired generation in a compacted partition is marked (its keys stop
--    counting at once; the next compaction removes them); a generation alone in its partition
--    is dropped whole as before.
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
        SELECT * INTO v_open FROM public.usage_key_generations WHERE closed_at IS NULL;
        IF v_open.opened_at <= p_now - p_rotate_every THEN
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

------------------------------------------------------------------------------------------------
-- 3. Compaction: every partition of closed generations merged into one, without the expired
--    generations. Nothing to do while at most one such partition exists and holds no expired
--    generation. Returns ('compacted', the new partition) and ('dropped', each merged one).
------------------------------------------------------------------------------------------------
CREATE FUNCTION public.usage_event_keys_compact()
    RETURNS TABLE (action text, object text)
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_parts   text[];
        v_live    integer[];
        v_expired boolean;
        v_name    text;
        v_part    text;
        v_list    text;
        v_keys    bigint;
        v_filter  integer;
        v_blocks  integer;
    BEGIN
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_storage_lock_id());
        SELECT coalesce(array_agg(DISTINCT g.stored_in), '{}'),
               coalesce(array_agg(g.generation ORDER BY g.generation)
                            FILTER (WHERE g.expired_at IS NULL), '{}'),
               coalesce(bool_or(g.expired_at IS NOT NULL), false)
          INTO v_parts, v_live, v_expired
          FROM public.usage_key_generations g
         WHERE g.closed_at IS NOT NULL;
        IF pg_catalog.cardinality(v_parts) = 0
           OR (pg_catalog.cardinality(v_parts) = 1 AND NOT v_expired) THEN
            RETURN;
        END IF;

        IF pg_catalog.cardinality(v_live) > 0 THEN
            v_name := pg_catalog.format('usage_event_keys_c%s_%s', v_live[1],
                                        v_live[pg_catalog.cardinality(v_live)]);
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
            -- Its Bloom filter: about 10 bits per key, in 4096-bit blocks (section 4).
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
        DELETE FROM public.usage_key_generations WHERE expired_at IS NOT NULL;
        DELETE FROM public.usage_key_filter_blocks WHERE filter IS DISTINCT FROM v_filter;
        IF v_name IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER TABLE public.usage_event_keys ATTACH PARTITION public.%I
                                       FOR VALUES IN (%s)', v_name, v_list);
            UPDATE public.usage_key_generations
               SET stored_in = v_name, filter_id = v_filter, filter_blocks = v_blocks
             WHERE generation = ANY (v_live);
            action := 'compacted'; object := v_name; RETURN NEXT;
        END IF;
    END $$;
REVOKE ALL ON FUNCTION public.usage_event_keys_compact() FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- 4. A Bloom filter of the compacted partition, so that a new key costs no read of it.
--
--    The compacted partition is immutable, so the compaction describes it once: a blocked
--    Bloom filter of about 10 bits per key (six bits per key, all in one 4096-bit block:
--    about 1 % false positives), 4096-bit rows in usage_key_filter_blocks. Ingestion checks a
--    key against its block first and reads the compacted partition's B-tree only when all six
--    bits are set: for a new key (almost every key) one read of a row of a table about a
--    twenty-fifth the size of that B-tree, and hot, instead of a random leaf of the B-tree. Both sides
--    compute the slots with the functions below, from the key's own bytes (the key is a hash).
--    The compaction sets the bits as one aggregate: the OR of each key's six-bit mask, per
--    block (about 2 microseconds a key here).
------------------------------------------------------------------------------------------------
ALTER TABLE public.usage_key_generations
    ADD COLUMN filter_id     integer,
    ADD COLUMN filter_blocks integer CHECK (filter_blocks > 0),
    ADD CONSTRAINT usage_key_generations_filter CHECK ((filter_id IS NULL) = (filter_blocks IS NULL));
CREATE SEQUENCE public.usage_key_filter_ids AS integer;

CREATE TABLE public.usage_key_filter_blocks (
    filter integer NOT NULL,
    block  integer NOT NULL,
    -- A block no key falls in has no row (and every key of it is certainly new).
    bits   bit(4096) NOT NULL,
    PRIMARY KEY (filter, block)
);
-- Stored inline and uncompressed: every probe reads one row.
ALTER TABLE public.usage_key_filter_blocks ALTER COLUMN bits SET STORAGE PLAIN;

-- The block of a key: its first four bytes, modulo the number of blocks.
CREATE FUNCTION public.usage_key_block(p_key uuid, p_blocks integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 0)::int8 << 24
             | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 1)::int8 << 16
             | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 2)::int8 << 8
             | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 3)::int8) % p_blocks)::integer;

-- The i-th (0-5) bit of a key in its block: the low 12 bits of its bytes 4+2i and 5+2i.
CREATE FUNCTION public.usage_key_bit(p_key uuid, p_i integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 4 + 2 * p_i) << 8
             | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 5 + 2 * p_i)) & 4095);

-- Whether a block may hold a key (false: it certainly does not).
CREATE FUNCTION public.usage_key_maybe(p_bits bit, p_key uuid) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 0)) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 1)) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 2)) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 3)) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 4)) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_bit(p_key, 5)) = 1;

REVOKE ALL ON FUNCTION public.usage_key_block(uuid, integer), public.usage_key_bit(uuid, integer),
                       public.usage_key_maybe(bit, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.usage_key_block(uuid, integer), public.usage_key_bit(uuid, integer),
                          public.usage_key_maybe(bit, uuid) TO meterbridge_api;
-- The bits say nothing a tenant could read back (a probe confirms every "maybe" against the
-- tenant-bound key table); ingestion reads them, nothing writes them but the compaction.
GRANT SELECT ON public.usage_key_filter_blocks TO meterbridge_api;
