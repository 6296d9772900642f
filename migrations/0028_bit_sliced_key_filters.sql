-- The levels' Bloom filters, bit-sliced: a new key's check costs the same whatever the number of
-- a level's members.
--
-- Before (0015): a level's filter row held each member's 512-bit block side by side (member s's
-- bit b at s * 512 + b), and a key was tested member by member, up to six bits each: the
-- check grew with the members (21.6 microseconds a key at 24 members; 16.7 bit-sliced).
--
-- After: the same bits, sliced by position: for each of a block's 512 bit positions, the
-- members' bits side by side (member s's bit b at b * slots + s). A key's six positions are six
-- slices of `slots` bits; ANDed, each bit still set is a member that may hold the key (about
-- 0.4 % each, as before). So a level costs one row read and six substrings per key, and only a
-- "maybe" costs more (one probe of that member's index); level 1, whose 24 members' false
-- positives add up, gets twice the bits a key (`usage_key_levels.key_bits`). The table is new
-- (`usage_key_filter_slices`, the old `usage_key_filter_rows` dropped): code of either layout
-- fails on the other's schema rather than reading its bits wrong (deploy, then `migrate` at
-- once; ingestion answers errors in between, and callers retry: nothing is stored twice).
--
-- The filters are rebuilt from the keys by the maintenance steps, as 0015 built the first ones:
-- every member's filter build starts again at block 0 and a merge in progress starts again
-- (its target's filter was half written in the old layout). Until a member's filter is
-- complete, ingestion probes its index, as it does for the hours closed since the last step:
-- correct, slower for the hours the steps take (seconds per million keys).

-- Under the rotation lock: no ingestion transaction holds the generations read before it.
SELECT pg_catalog.pg_advisory_xact_lock(public.usage_keys_lock_id());

DROP TABLE public.usage_key_filter_rows;

CREATE TABLE public.usage_key_filter_slices (
    level smallint    NOT NULL REFERENCES public.usage_key_levels (level),
    block integer     NOT NULL,
    -- 512 slices of `slots` bits: member s's bit b at b * slots + s.
    bits  bit varying NOT NULL,
    PRIMARY KEY (level, block)
);
-- Stored inline and uncompressed (at most 64 * 512 bits = 4 kB): a check reads one row.
ALTER TABLE public.usage_key_filter_slices ALTER COLUMN bits SET STORAGE PLAIN;
-- Ingestion reads the filters (the bits say nothing a tenant could read back: every "maybe" is
-- confirmed against the tenant-bound key table); nothing writes them but the owner's
-- maintenance.
GRANT SELECT ON public.usage_key_filter_slices TO meterbridge_ingest;

-- Whether member p_slot of a level's filter row may hold a key (false: it certainly does not).
-- The row's width says the level's slots.
CREATE OR REPLACE FUNCTION public.usage_key_level_maybe(p_bits bit varying, p_slot integer,
                                                        p_key uuid)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 0) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 1) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 2) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 3) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 4) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1
       AND pg_catalog.get_bit(p_bits, public.usage_key_level_bit(p_key, 5) * (pg_catalog.length(p_bits) / 512) + p_slot) = 1;

-- Bits a key in each level's filter. Level 1's: twice the others'. Its 24 members' false
-- positives add up (each a probe of that hour's index: about 8 % of new keys at 10 bits, 1 % at
-- 20), and its filters hold an hour's keys each, the smallest of the three levels.
ALTER TABLE public.usage_key_levels
    ADD COLUMN key_bits smallint NOT NULL DEFAULT 10 CHECK (key_bits BETWEEN 10 AND 64);
-- Its geometry doubles with it now, while the filters are empty (they are rebuilt below).
UPDATE public.usage_key_levels SET key_bits = 20, blocks = blocks * 2 WHERE level = 1;

-- As 0015's, on the new table, and scaled by the level's bits a key: doubles a level's blocks
-- until it has at least p_blocks (the blocks of a filter of 10 bits a key,
-- usage_key_blocks_for) * key_bits / 10; every row copied to its two halves (a row's layout
-- does not depend on the blocks), under the rotation lock.
CREATE OR REPLACE FUNCTION public.usage_key_level_grow(p_level smallint, p_blocks bigint)
    RETURNS integer
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_blocks integer;
        v_factor integer;
    BEGIN
        SELECT blocks, (p_blocks * key_bits + 9) / 10 INTO v_blocks, p_blocks
          FROM public.usage_key_levels WHERE level = p_level FOR UPDATE;
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
          FROM public.usage_key_filter_slices r
         CROSS JOIN pg_catalog.generate_series(0, v_factor - 1) AS c(i)
         WHERE r.level = p_level;
        DELETE FROM public.usage_key_filter_slices WHERE level = p_level;
        INSERT INTO public.usage_key_filter_slices (level, block, bits)
        SELECT p_level, block, bits FROM usage_key_grown;
        DROP TABLE usage_key_grown;
        UPDATE public.usage_key_levels SET blocks = v_blocks * v_factor WHERE level = p_level;
        UPDATE public.usage_key_parts SET filter_next = filter_next * v_factor
         WHERE level = p_level AND filter_next IS NOT NULL;
        UPDATE public.usage_key_merges SET next_block = next_block * v_factor
         WHERE level = p_level;
        RETURN v_blocks * v_factor;
    END $$;

-- Writes member p_slot's filter for blocks [p_from, p_to) of level p_level (p_blocks of them)
-- from the keys of table p_table (its generations p_gens, or all when NULL): every block of the
-- range, those without a key as zeros (a reused slot may hold an earlier member's bits). The
-- member's 512-bit block is built as in 0015, then spread into the slices: as text, each of its
-- bits becomes `slots` characters, the bit at the member's place among zeros (three replace()
-- calls, in C), and the row keeps the other members' bits (AND with a mask of ones but the
-- member's places) and takes the member's (OR).
CREATE OR REPLACE FUNCTION public.usage_key_filter_write(
        p_level smallint, p_blocks integer, p_slot smallint, p_table text, p_gens integer[],
        p_from integer, p_to integer)
    RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    DECLARE
        v_slots integer;
        v_hi    text;
        v_zero  text;
        v_one   text;
        v_keep  bit varying;
    BEGIN
        SELECT slots INTO v_slots FROM public.usage_key_levels WHERE level = p_level;
        IF v_slots IS NULL OR p_slot < 0 OR p_slot >= v_slots THEN
            RAISE EXCEPTION 'slot % is not one of level %''s % slots', p_slot, p_level, v_slots
                USING ERRCODE = '22023';
        END IF;
        v_zero := pg_catalog.repeat('0', v_slots);
        v_one := pg_catalog.repeat('0', p_slot) || '1' || pg_catalog.repeat('0', v_slots - p_slot - 1);
        v_keep := pg_catalog.repeat(pg_catalog.repeat('1', p_slot) || '0'
                                    || pg_catalog.repeat('1', v_slots - p_slot - 1), 512)::bit varying;
        v_hi := CASE WHEN p_to >= p_blocks THEN 'true'
                     ELSE pg_catalog.format('k.key_hash < %L::uuid',
                                            public.usage_key_block_start(p_to, p_blocks)) END;
        EXECUTE pg_catalog.format(
            'INSERT INTO public.usage_key_filter_slices AS r (level, block, bits)
             SELECT %1$s, b.block,
                    pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                        coalesce(m.bits, pg_catalog.repeat(''0'', 512)::bit(512))::text,
                        ''1'', ''x''), ''0'', $1), ''x'', $2)::bit varying
               FROM pg_catalog.generate_series(%2$s, %3$s - 1) AS b(block)
               LEFT JOIN (
                    SELECT public.usage_key_level_block(k.key_hash, %4$s) AS block,
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
                      FROM public.%5$I k
                     WHERE k.key_hash >= %6$L::uuid AND %7$s AND %8$s
                     GROUP BY 1) m ON m.block = b.block
             ON CONFLICT (level, block) DO UPDATE
                SET bits = (r.bits & $3) | EXCLUDED.bits',
            p_level, p_from, p_to, p_blocks, p_table,
            public.usage_key_block_start(p_from, p_blocks), v_hi,
            CASE WHEN p_gens IS NULL THEN 'true'
                 ELSE pg_catalog.format('k.generation = ANY (%L::integer[])', p_gens) END)
        USING v_zero, v_one, v_keep;
    END $$;

-- Every filter is built again, in the new layout, by the steps; a merge in progress starts
-- again (its sources are untouched until its swap).
UPDATE public.usage_key_parts SET filter_next = 0;
DO $$
    DECLARE
        v_target text;
    BEGIN
        SELECT target INTO v_target FROM public.usage_key_merges;
        IF v_target IS NOT NULL THEN
            EXECUTE pg_catalog.format('TRUNCATE public.%I', v_target);
            UPDATE public.usage_key_merges SET copied = 0, next_block = 0;
        END IF;
    END $$;
