-- No JIT compilation for the functions' roles.
--
-- PostgreSQL compiles a statement with LLVM once its estimated cost passes jit_above_cost
-- (100,000 by default; RDS keeps it). The ingest statement's estimate passes it as soon as the
-- dedup keys have a level with filters: the planner cannot know that about 1 % of a key's filter
-- checks go on to probe a member, and costs each probe of every member. Its plan then spends
-- 250-320 ms compiling (257 functions, "Emission" alone 242 ms) to run about 60 ms of work, on
-- every batch, since each batch is planned anew (plan_cache_mode = force_custom_plan). Measured
-- in the scheduled-work simulation (auto_explain): ingestion fell from 22 k events/s on an empty
-- database to 5-7 k events/s once the first hours had filters. No statement of these roles is
-- an analytic query that compilation would pay back: the aggregation already turns JIT off in
-- its transactions. Per database, as the roles' other settings (0003, 0013).
DO $$
BEGIN
    EXECUTE format('ALTER ROLE meterbridge_ingest IN DATABASE %I SET jit = off', current_database());
    EXECUTE format('ALTER ROLE meterbridge_payments IN DATABASE %I SET jit = off', current_database());
    EXECUTE format('ALTER ROLE meterbridge_ops IN DATABASE %I SET jit = off', current_database());
END
$$;
