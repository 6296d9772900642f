-- Dedup keys in levels: each key is rewritten twice in its life, and every maintenance step is
-- bounded, whatever the window holds.
--
-- Before (0008, 0010): a full compaction merged every closed generation, the previous
-- compacted partition included, into a new partition once a day, and the recent merge rewrote
-- up to a day of keys every hour: each key was rewritten about 48 times in its 36 days, and
-- one compaction statement grew with the window (29 s at 10 M keys; past 60-90 M live keys it
-- outgrew the admin function's 300 s).
--
-- After:
--   * Level 0 is the open generation (an hour), as before: a unique B-tree every new key is
--     inserted into.
--   * Level 1: closed hours, each its own partition, as rotated (no rewrite).
--   * Level 2: days, each the merge of 24 closed hours (the first rewrite).
--   * Level 3: weeks, each the merge of 7 days (the second rewrite). A week is dropped whole
--     once every generation in it has expired; until then its expired generations are left out
--     of every probe by their numbers.
--   * Each level has one Bloom filter table, `usage_key_filter_rows`: a row per block of the
--     level (a power of two of them; a key's block is its first 32 bits' share), holding one
--     512-bit blocked Bloom filter per member partition side by side (its slot). A new key is
--     checked with one row read per level, whatever the number of members, and a member's
--     B-tree is probed only when its six bits are set (about 1.5 % of new keys per member at
--     10 bits a key). A member's filter is built once, from its keys, when it joins its level.
--   * The work comes in steps (`usage_event_keys_step`), each a transaction of its own bounded
--     by a number of keys: registering a closed hour, a chunk of a member's filter (a range of
--     blocks, which is a range of keys), a chunk of a merge (the keys of a range of blocks,
--     copied in key order into the new partition, its filter written alongside). A merge swaps
--     its new partition in, and drops its sources, only once complete, under the rotation lock
--     (ingestion holds it shared): a step cut short leaves the sources as they were, and the
--     next one resumes where the last committed one stopped.
--   * A level's geometry grows (doubles) when a member needs more blocks: each row is copied to
--     its two halves, which is what a filter of twice the blocks would hold for those members
--     (their bits per key do not change), under the rotation lock.
--   * Partitions from before this migration (the compacted one, the recent merge, closed hours)
--     join levels 3, 2 and 1, their filters built by the first steps; until then ingestion
--     probes them by their index, as it probes the closed hours not filtered yet.

------------------------------------------------------------------------------------------------
-- 1. Levels, their members, and their filters.
------------------------------------------------------------------------------------------------
CREATE TABLE public.usage_key_levels (
    level    smallint PRIMARY KEY CHECK (level BETWEEN 1 AND 3),
    -- Blocks of the level's filter: a power of two.
    blocks   integer  NOT NULL CHECK (blocks > 0 AND (blocks & (blocks - 1)) = 0),
    -- Members side by side in a row (each row holds slots * 512 bits).
    slots    smallint NOT NULL CHECK (slots BETWEEN 1 AND 64),
    -- How many members are merged into one of the next level (none for the last).
    merge_at smallint CHECK (merge_at > 1)
);
INSERT INTO public.usage_key_levels (level, blocks, slots, merge_at)
VALUES (1, 1, 40, 24), (2, 1, 12, 7), (3, 1, 12, NULL);

CREATE TABLE public.usage_key_parts (
    -- A partition of usage_event_keys other than the open generation's.
    name        text     PRIMARY KEY,
    level       smallint NOT NULL REFERENCES public.usage_key_levels (level),
    slot        smallint NOT NULL CHECK (slot >= 0),
    first_gen   integer  NOT NULL,
    last_gen    integer  NOT NULL CHECK (last_gen >= first_gen),
    -- Counted when it joined its level (NULL: not yet).
    keys        bigint   CHECK (keys >= 0),
    -- The next block its filter build writes; NULL once the filter is complete (only then is
    -- it checked through the filter).
    filter_next integer  CHECK (filter_next >= 0),
    UNIQUE (level, slot)
);

-- The merge in progress (at most one).
CREATE TABLE public.usage_key_merges (
    target     text     PRIMARY KEY,
    level      smallint NOT NULL REFERENCES public.usage_key_levels (level),
    slot       smallint NOT NULL,
    sources    text[]   NOT NULL,
    gens       integer[] NOT NULL,
    keys       bigint   NOT NULL,
    copied     bigint   NOT NULL DEFAULT 0,
    next_block integer  NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX usage_key_merges_one ON public.usage_key_merges ((true));

CREATE TABLE public.usage_key_filter_rows (
    level smallint    NOT NULL REFERENCES public.usage_key_levels (level),
    block integer     NOT NULL,
    -- slots * 512 bits: member s's filter block at bits [s * 512, s * 512 + 512).
    bits  bit varying NOT NULL,
    PRIMARY KEY (level, block)
);
-- Stored inline and uncompressed (at most 64 * 512 bits = 4 kB): a check reads one row.
ALTER TABLE public.usage_key_filter_rows ALTER COLUMN bits SET STORAGE PLAIN;

-- The block of a key among p_blocks (a power of two): the share of its first 32 bits, so that a
-- range of blocks is a range of keys.
CREATE FUNCTION public.usage_key_level_block(p_key uuid, p_blocks integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((((pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 0)::int8 << 24)
               | (pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 1)::int8 << 16)
               | (pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 2)::int8 << 8)
               | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 3)::int8) * p_blocks) >> 32)::integer;

-- The i-th (0-5) bit of a key in its 512-bit block: the low 9 bits of its bytes 4+2i, 5+2i.
CREATE FUNCTION public.usage_key_level_bit(p_key uuid, p_i integer) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (((pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 4 + 2 * p_i) << 8)
             | pg_catalog.get_byte(pg_catalog.uuid_send(p_key), 5 + 2 * p_i)) & 511);

-- Whether member p_slot of a filter row may hold a key (false: it certainly does not).
CREATE FUNCTION public.usage_key_level_maybe(p_bits bit varying, p_slot integer, p_key uuid)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 0)) = 1
       AND pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 1)) = 1
       AND pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 2)) = 1
       AND pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 3)) = 1
       AND pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 4)) = 1
       AND pg_catalog.get_bit(p_bits, p_slot * 512 + public.usage_key_level_bit(p_key, 5)) = 1;

-- The first key of a block (p_block < p_blocks).
CREATE FUNCTION public.usage_key_block_start(p_block integer, p_blocks integer) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN (pg_catalog.lpad(pg_catalog.to_hex((p_block::int8 << 32) / p_blocks), 8, '0')
            || '-0000-0000-0000-000000000000')::uuid;

REVOKE ALL ON FUNCTION public.usage_key_level_block(uuid, integer),
                       public.usage_key_level_bit(uuid, integer),
                       public.usage_key_level_maybe(bit varying, integer, uuid),
                       public.usage_key_block_start(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.usage_key_level_block(uuid, integer),
                          public.usage_key_level_bit(uuid, integer),
                          public.usage_key_level_maybe(bit varying, integer, uuid)
    TO meterbridge_ingest;
-- Ingestion reads where the keys are and the filters (the bits say nothing a tenant could read
-- back: every "maybe" is confirmed against the tenant-bound key table); nothing writes them but
-- the owner's maintenance.
GRANT SELECT ON public.usage_key_levels, public.usage_key_parts, public.usage_key_filter_rows
    TO meterbridge_ingest;

------------------------------------------------------------------------------------------------
-- 2. The building blocks of a step (the owner's, called only by the step function).
------------------------------------------------------------------------------------------------

-- Doubles a level's blocks until it has at least p_blocks: every row copied to its two halves
-- (block b of B blocks covers the keys of blocks 2b and 2b+1 of 2B), the builds in progress
-- moved along. Rewrites the level's filter; under the rotation lock, so that no ingestion
-- transaction reads rows of one geometry with the blocks of the other.
CREATE FUNCTION public.usage_key_level_grow(p_level smallint, p_blocks bigint) RETURNS integer
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_blocks integer;
        v_factor integer;
    BEGIN
        SELECT blocks INTO v_blocks FROM public.usage_key_levels WHERE level = p_level FOR UPDATE;
        IF v_blocks >= p_blocks THEN
            RETURN v_blocks;
        END IF;
        v_factor := 1;
        WHILE v_blocks::int8 * v_factor < p_blocks LOOP
            v_factor := v_factor * 2;
        END LOOP;
        IF v_blocks::int8 * v_factor > 1073741824 THEN
            RAISE EXCEPTION 'level % would need % filter blocks', p_level, v_blocks::int8 * v_factor
                USING ERRCODE = '54000';
        END IF;
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
        CREATE TEMP TABLE usage_key_grown ON COMMIT DROP AS
        SELECT r.block * v_factor + c.i AS block, r.bits
          FROM public.usage_key_filter_rows r
         CROSS JOIN pg_catalog.generate_series(0, v_factor - 1) AS c(i)
         WHERE r.level = p_level;
        DELETE FROM public.usage_key_filter_rows WHERE level = p_level;
        INSERT INTO public.usage_key_filter_rows (level, block, bits)
        SELECT p_level, block, bits FROM usage_key_grown;
        DROP TABLE usage_key_grown;
        UPDATE public.usage_key_levels SET blocks = v_blocks * v_factor WHERE level = p_level;
        UPDATE public.usage_key_parts SET filter_next = filter_next * v_factor
         WHERE level = p_level AND filter_next IS NOT NULL;
        UPDATE public.usage_key_merges SET next_block = next_block * v_factor
         WHERE level = p_level;
        RETURN v_blocks * v_factor;
    END $$;

-- The blocks a member of p_keys keys needs: about 10 bits a key, in 512-bit blocks.
CREATE FUNCTION public.usage_key_blocks_for(p_keys bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE
    RETURN greatest(1, ceil(p_keys * 10 / 512.0))::bigint;

-- Writes member p_slot's filter for blocks [p_from, p_to) of level p_level (p_blocks of them)
-- from the keys of table p_table (its generations p_gens, or all when NULL): every block of the
-- range, those without a key as zeros (a reused slot may hold an earlier member's bits).
CREATE FUNCTION public.usage_key_filter_write(
        p_level smallint, p_blocks integer, p_slot smallint, p_table text, p_gens integer[],
        p_from integer, p_to integer)
    RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_width integer;
        v_hi    text;
    BEGIN
        SELECT slots * 512 INTO v_width FROM public.usage_key_levels WHERE level = p_level;
        v_hi := CASE WHEN p_to >= p_blocks THEN 'true'
                     ELSE pg_catalog.format('k.key_hash < %L::uuid',
                                            public.usage_key_block_start(p_to, p_blocks)) END;
        EXECUTE pg_catalog.format(
            'INSERT INTO public.usage_key_filter_rows AS r (level, block, bits)
             SELECT %1$s, b.block,
                    overlay(pg_catalog.repeat(''0'', %2$s)::bit varying
                                       PLACING coalesce(m.bits, pg_catalog.repeat(''0'', 512)::bit(512))
                                       FROM %3$s * 512 + 1 FOR 512)
               FROM pg_catalog.generate_series(%4$s, %5$s - 1) AS b(block)
               LEFT JOIN (
                    SELECT public.usage_key_level_block(k.key_hash, %6$s) AS block,
                           pg_catalog.bit_or(
                               pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(
                               pg_catalog.set_bit(pg_catalog.set_bit(pg_catalog.set_bit(
                                   pg_catalog.repeat(''0'', 512)::bit(512),
                                   public.usage_key_level_bit(k.key_hash, 0), 1),
                                   public.usage_key_level_bit(k.key_hash, 1), 1),
                                   public.usage_key_level_bit(k.key_hash, 2), 1),
                                   public.usage_key_level_bit(k.key_hash, 3), 1),
                                   public.usage_key_level_bit(k.key_hash, 4), 1),
                                   public.usage_key_level_bit(k.key_hash, 5), 1)) AS bits
                      FROM public.%7$I k
                     WHERE k.key_hash >= %8$L::uuid AND %9$s AND %10$s
                     GROUP BY 1) m ON m.block = b.block
             ON CONFLICT (level, block) DO UPDATE
                SET bits = overlay(r.bits PLACING
                               substring(EXCLUDED.bits FROM %3$s * 512 + 1 FOR 512)
                               FROM %3$s * 512 + 1 FOR 512)',
            p_level, v_width, p_slot, p_from, p_to, p_blocks, p_table,
            public.usage_key_block_start(p_from, p_blocks), v_hi,
            CASE WHEN p_gens IS NULL THEN 'true'
                 ELSE pg_catalog.format('k.generation = ANY (%L::integer[])', p_gens) END);
    END $$;

-- The lowest slot of a level that no member and no merge holds (NULL: none).
CREATE FUNCTION public.usage_key_free_slot(p_level smallint) RETURNS smallint
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
    RETURN (SELECT min(s)::smallint
              FROM public.usage_key_levels l, pg_catalog.generate_series(0, l.slots - 1) AS s
             WHERE l.level = p_level
               AND NOT EXISTS (SELECT 1 FROM public.usage_key_parts p
                                WHERE p.level = p_level AND p.slot = s)
               AND NOT EXISTS (SELECT 1 FROM public.usage_key_merges m
                                WHERE m.level = p_level AND m.slot = s));

------------------------------------------------------------------------------------------------
-- 3. One step of the key maintenance: at most p_chunk_keys keys read or written. Returns what
--    it did (no row: nothing left to do). In order: drop partitions whose generations have all
--    expired; register a closed hour with level 1; a chunk of the oldest filter build; a chunk
--    of the merge in progress (and its swap once complete); start a merge (24 hours into a day,
--    7 days into a week) whose sources all have their filters.
------------------------------------------------------------------------------------------------
CREATE FUNCTION public.usage_event_keys_step(p_chunk_keys bigint DEFAULT 1000000)
    RETURNS TABLE (action text, object text)
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_part   public.usage_key_parts;
        v_merge  public.usage_key_merges;
        v_level  public.usage_key_levels;
        v_name   text;
        v_gen    integer;
        v_keys   bigint;
        v_slot   smallint;
        v_blocks integer;
        v_to     integer;
        v_n      bigint;
        v_srcs   text[];
        v_gens   integer[];
    BEGIN
        IF p_chunk_keys < 1000 THEN
            RAISE EXCEPTION 'a step takes at least 1000 keys' USING ERRCODE = '22023';
        END IF;
        PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_storage_lock_id());

        -- Partitions whose every generation has expired go whole (a merge's sources never do:
        -- the merge leaves expired generations out and drops its sources itself).
        FOR v_name IN
            SELECT g.stored_in FROM public.usage_key_generations g
             WHERE g.closed_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM public.usage_key_merges m
                                WHERE g.stored_in = ANY (m.sources))
             GROUP BY g.stored_in HAVING bool_and(g.expired_at IS NOT NULL) LOOP
            PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
            EXECUTE pg_catalog.format('DROP TABLE IF EXISTS public.%I', v_name);
            DELETE FROM public.usage_key_generations WHERE stored_in = v_name;
            DELETE FROM public.usage_key_parts WHERE name = v_name;
            action := 'dropped'; object := v_name; RETURN NEXT;
        END LOOP;
        IF FOUND THEN
            RETURN;
        END IF;

        -- A closed hour joins level 1 (its keys counted: the level's geometry follows its
        -- largest member).
        SELECT g.generation, g.stored_in INTO v_gen, v_name
          FROM public.usage_key_generations g
         WHERE g.closed_at IS NOT NULL AND g.expired_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM public.usage_key_parts p WHERE p.name = g.stored_in)
           AND NOT EXISTS (SELECT 1 FROM public.usage_key_merges m WHERE m.target = g.stored_in)
         ORDER BY g.generation LIMIT 1;
        IF v_gen IS NOT NULL THEN
            v_slot := public.usage_key_free_slot(1::smallint);
            IF v_slot IS NOT NULL THEN
                EXECUTE pg_catalog.format('SELECT count(*) FROM public.%I', v_name) INTO v_keys;
                PERFORM public.usage_key_level_grow(1::smallint, public.usage_key_blocks_for(v_keys));
                INSERT INTO public.usage_key_parts (name, level, slot, first_gen, last_gen, keys,
                                                    filter_next)
                SELECT v_name, 1, v_slot, min(generation), max(generation), v_keys, 0
                  FROM public.usage_key_generations WHERE stored_in = v_name;
                action := 'registered'; object := v_name; RETURN NEXT;
                RETURN;
            END IF;
        END IF;

        -- The oldest filter build: a chunk of its blocks.
        SELECT * INTO v_part FROM public.usage_key_parts
         WHERE filter_next IS NOT NULL ORDER BY level DESC, first_gen LIMIT 1;
        IF v_part.name IS NOT NULL THEN
            IF v_part.keys IS NULL THEN
                -- A partition from before the levels: counted first.
                EXECUTE pg_catalog.format('SELECT count(*) FROM public.%I', v_part.name) INTO v_keys;
                PERFORM public.usage_key_level_grow(v_part.level, public.usage_key_blocks_for(v_keys));
                UPDATE public.usage_key_parts SET keys = v_keys WHERE name = v_part.name;
                action := 'counted'; object := v_part.name; RETURN NEXT;
                RETURN;
            END IF;
            SELECT blocks INTO v_blocks FROM public.usage_key_levels WHERE level = v_part.level;
            v_n := greatest(1, v_blocks::int8 * p_chunk_keys / greatest(v_part.keys, 1));
            v_to := least(v_blocks::int8, v_part.filter_next + v_n)::integer;
            PERFORM public.usage_key_filter_write(v_part.level, v_blocks, v_part.slot, v_part.name,
                                                  NULL, v_part.filter_next, v_to);
            UPDATE public.usage_key_parts
               SET filter_next = CASE WHEN v_to >= v_blocks THEN NULL ELSE v_to END
             WHERE name = v_part.name;
            action := CASE WHEN v_to >= v_blocks THEN 'filtered' ELSE 'filtering' END;
            object := v_part.name; RETURN NEXT;
            RETURN;
        END IF;

        -- The merge in progress: the keys of a chunk of blocks, copied in key order, and their
        -- filter; once complete, the swap.
        SELECT * INTO v_merge FROM public.usage_key_merges;
        IF v_merge.target IS NOT NULL THEN
            SELECT blocks INTO v_blocks FROM public.usage_key_levels WHERE level = v_merge.level;
            IF v_merge.next_block < v_blocks THEN
                v_n := greatest(1, v_blocks::int8 * p_chunk_keys / greatest(v_merge.keys, 1));
                v_to := least(v_blocks::int8, v_merge.next_block + v_n)::integer;
                EXECUTE pg_catalog.format(
                    'INSERT INTO public.%I (generation, key_hash, tenant_id, occurred_at, seq)
                     SELECT generation, key_hash, tenant_id, occurred_at, seq
                       FROM public.usage_event_keys
                      WHERE generation = ANY (%L::integer[])
                        AND key_hash >= %L::uuid AND %s
                      ORDER BY key_hash, generation',
                    v_merge.target, v_merge.gens,
                    public.usage_key_block_start(v_merge.next_block, v_blocks),
                    CASE WHEN v_to >= v_blocks THEN 'true'
                         ELSE pg_catalog.format('key_hash < %L::uuid',
                                                public.usage_key_block_start(v_to, v_blocks)) END);
                GET DIAGNOSTICS v_n = ROW_COUNT;
                PERFORM public.usage_key_filter_write(v_merge.level, v_blocks, v_merge.slot,
                                                      v_merge.target, NULL, v_merge.next_block, v_to);
                UPDATE public.usage_key_merges SET next_block = v_to, copied = copied + v_n;
                action := 'merging'; object := v_merge.target; RETURN NEXT;
                RETURN;
            END IF;
            -- Complete: its bound (checked here, before the lock), then the swap.
            -- Written as ATTACH writes the partition's bound, so that it proves the bound
            -- without a scan under the lock.
            EXECUTE pg_catalog.format(
                'ALTER TABLE public.%I ADD CONSTRAINT %I CHECK (generation IN (%s))',
                v_merge.target, v_merge.target || '_bound',
                pg_catalog.array_to_string(v_merge.gens, ','));
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', v_merge.target);
            PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());
            FOREACH v_name IN ARRAY v_merge.sources LOOP
                EXECUTE pg_catalog.format('DROP TABLE public.%I', v_name);
                action := 'dropped'; object := v_name; RETURN NEXT;
            END LOOP;
            DELETE FROM public.usage_key_generations
             WHERE stored_in = ANY (v_merge.sources) AND generation <> ALL (v_merge.gens);
            UPDATE public.usage_key_generations SET stored_in = v_merge.target
             WHERE generation = ANY (v_merge.gens);
            DELETE FROM public.usage_key_parts WHERE name = ANY (v_merge.sources);
            EXECUTE pg_catalog.format(
                'ALTER TABLE public.usage_event_keys ATTACH PARTITION public.%I FOR VALUES IN (%s)',
                v_merge.target, pg_catalog.array_to_string(v_merge.gens, ','));
            INSERT INTO public.usage_key_parts (name, level, slot, first_gen, last_gen, keys,
                                                filter_next)
            SELECT v_merge.target, v_merge.level, v_merge.slot, min(g), max(g), v_merge.copied, NULL
              FROM pg_catalog.unnest(v_merge.gens) AS g;
            DELETE FROM public.usage_key_merges;
            action := 'merged'; object := v_merge.target; RETURN NEXT;
            RETURN;
        END IF;

        -- A new merge: the oldest members of a level once there are enough of them, all with
        -- their filters (hours before days: level 1 keeps its slots free).
        FOR v_level IN SELECT * FROM public.usage_key_levels WHERE merge_at IS NOT NULL
                        ORDER BY level LOOP
            SELECT array_agg(name ORDER BY first_gen), sum(keys)
              INTO v_srcs, v_keys
              FROM (SELECT * FROM public.usage_key_parts WHERE level = v_level.level
                     ORDER BY first_gen LIMIT v_level.merge_at) oldest
             HAVING count(*) = v_level.merge_at AND bool_and(filter_next IS NULL);
            CONTINUE WHEN v_srcs IS NULL;
            v_slot := public.usage_key_free_slot((v_level.level + 1)::smallint);
            CONTINUE WHEN v_slot IS NULL;
            SELECT array_agg(generation ORDER BY generation) INTO v_gens
              FROM public.usage_key_generations
             WHERE stored_in = ANY (v_srcs) AND expired_at IS NULL;
            IF v_gens IS NULL THEN
                CONTINUE;  -- every generation expired: dropped by the next step
            END IF;
            v_name := pg_catalog.format('usage_event_keys_l%s_%s_%s', v_level.level + 1,
                                        v_gens[1], v_gens[pg_catalog.cardinality(v_gens)]);
            PERFORM public.usage_key_level_grow((v_level.level + 1)::smallint,
                                                public.usage_key_blocks_for(v_keys));
            EXECUTE pg_catalog.format('DROP TABLE IF EXISTS public.%I', v_name);
            EXECUTE pg_catalog.format('CREATE TABLE public.%I (LIKE public.usage_event_keys)', v_name);
            EXECUTE pg_catalog.format('ALTER TABLE public.%I ADD CONSTRAINT %I UNIQUE (key_hash, generation)',
                                      v_name, v_name || '_unique');
            INSERT INTO public.usage_key_merges (target, level, slot, sources, gens, keys)
            VALUES (v_name, v_level.level + 1, v_slot, v_srcs, v_gens, v_keys);
            action := 'merge started'; object := v_name; RETURN NEXT;
            RETURN;
        END LOOP;
    END $$;
REVOKE ALL ON FUNCTION public.usage_key_level_grow(smallint, bigint),
                       public.usage_key_blocks_for(bigint),
                       public.usage_key_filter_write(smallint, integer, smallint, text, integer[], integer, integer),
                       public.usage_key_free_slot(smallint),
                       public.usage_event_keys_step(bigint) FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- 4. The maintenance of migration 0010, except that an expired generation is only marked: the
--    steps drop a partition once every generation in it has expired.
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

        -- Key generations first (see 0010): the rotation, a minute early at most.
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
        -- A generation closed more than the window ago holds only keys older than the window:
        -- it stops counting at once (ingestion probes live generations only).
        FOR v_gen IN SELECT * FROM public.usage_key_generations
                      WHERE closed_at <= p_now - p_dedup_window AND expired_at IS NULL
                      ORDER BY generation LOOP
            UPDATE public.usage_key_generations SET expired_at = p_now
             WHERE generation = v_gen.generation;
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
-- 5. What was there: the compacted partition joins level 3, the recent merge level 2, closed
--    hours level 1, each to have its filter built (counted first); the old filter goes.
------------------------------------------------------------------------------------------------
INSERT INTO public.usage_key_parts (name, level, slot, first_gen, last_gen, keys, filter_next)
SELECT stored_in, level, (row_number() OVER (PARTITION BY level ORDER BY first_gen) - 1)::smallint,
       first_gen, last_gen, NULL, 0
  FROM (SELECT g.stored_in,
               CASE WHEN g.stored_in LIKE 'usage\_event\_keys\_c%' THEN 3
                    WHEN g.stored_in LIKE 'usage\_event\_keys\_r%' THEN 2
                    ELSE 1 END::smallint AS level,
               min(g.generation) AS first_gen, max(g.generation) AS last_gen
          FROM public.usage_key_generations g
         WHERE g.closed_at IS NOT NULL
         GROUP BY g.stored_in) parts;

DROP FUNCTION public.usage_event_keys_compact(timestamptz, interval);
ALTER TABLE public.usage_key_generations DROP COLUMN filter_id, DROP COLUMN filter_blocks;
DROP TABLE public.usage_key_filter_blocks;
DROP SEQUENCE public.usage_key_filter_ids;
DROP FUNCTION public.usage_key_maybe(bit, uuid);
DROP FUNCTION public.usage_key_bit(uuid, integer);
DROP FUNCTION public.usage_key_block(uuid, integer);
