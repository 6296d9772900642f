-- Incremental aggregation: a run reads only the events that changed since the last one.
--
-- Before, a run recomputed every touched day, week and month from all of that period's events:
-- each 10-minute run re-read every active tenant's month so far, so its cost grew with the
-- month's volume. Now a run applies the change itself:
--
--   * A row's insert and its void are two changes, each in the transaction that made it:
--     `inserted_xact` (new, the inserting transaction) and `xact_id` (0007: the last writer,
--     the voiding transaction once voided). A run takes the transaction range
--     [watermark, bound) in chunks, each chunk in a transaction of its own that moves the
--     watermark: +1 for each row inserted in the range, -1 for each row voided in it. An
--     insert and its void in one chunk cancel out; a void always follows its insert.
--   * Totals, event counts and the XOR of the events' hashed seq (`seq_xor`, from which
--     `source_hash` is derived) change by the deltas. Week and month cells take the same
--     deltas as their days.
--   * Distinct actors stay exact: `usage_actor_days` holds, per (tenant, metric, day), each
--     actor's live event count (a hash of the actor id), and `usage_actor_periods`, per week
--     and month, on how many days each actor has events. A cell's distinct actors change when
--     an actor's count there goes from 0 to more or back.
--   * A cell is `actors_tracked` once its actor set is complete. Cells from before this
--     migration are not: the first change to one queues it for a recompute from its events
--     (as of the watermark), which builds its set; every later change is a delta. Backfills
--     recompute the same way. Actor sets of periods past ingestion's window are pruned by the
--     runs (their cells are then no longer tracked: a change, impossible by then, would queue
--     a recompute).

ALTER TABLE public.usage_events ADD COLUMN inserted_xact bigint;
ALTER TABLE public.usage_events
    ALTER COLUMN inserted_xact SET DEFAULT (pg_catalog.pg_current_xact_id()::text)::bigint;
-- The inserts of a transaction range, as xact_id's finds the voids.
CREATE INDEX usage_events_inserted_xact ON public.usage_events USING brin (inserted_xact)
    WITH (pages_per_range = 32);
-- Rows stored before this migration and not collected yet (above the watermark: the lag) get
-- their insert's transaction, so a void that rewrites `xact_id` cannot hide the insert from
-- the runs. Every row left without one was counted before: its insert is below every range.
-- (No writer runs concurrently: ADD COLUMN holds the table's exclusive lock. Voided rows
-- above the watermark have their cells queued; the recompute counts them as the changes do.)
UPDATE public.usage_events SET inserted_xact = xact_id
 WHERE voided_at IS NULL
   AND xact_id >= (SELECT watermark FROM public.usage_aggregation_state);
INSERT INTO public.usage_aggregation_queue (period_type, period_start, tenant_id, metric, reason)
SELECT DISTINCT p.period_type, pg_catalog.date_trunc(p.unit, e.occurred_at, 'UTC'),
       e.tenant_id, e.metric, 'change'
  FROM public.usage_events e
 CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month'))
       AS p(period_type, unit)
 WHERE e.voided_at IS NOT NULL
   AND e.xact_id >= (SELECT watermark FROM public.usage_aggregation_state)
ON CONFLICT DO NOTHING;

ALTER TABLE public.usage_aggregates
    ADD COLUMN seq_xor bigint,
    ADD COLUMN actors_tracked boolean NOT NULL DEFAULT false;

CREATE TABLE public.usage_actor_days (
    tenant_id uuid NOT NULL REFERENCES public.tenants (id),
    metric    text COLLATE "C" NOT NULL,
    day       date NOT NULL,
    -- md5 of the actor id, as a uuid: 16 bytes whatever the id (a marker, not a secret).
    actor     uuid NOT NULL,
    events    integer NOT NULL CHECK (events > 0),
    PRIMARY KEY (tenant_id, metric, day, actor)
);
-- Pruning takes the oldest days first.
CREATE INDEX usage_actor_days_day ON public.usage_actor_days (day);

CREATE TABLE public.usage_actor_periods (
    tenant_id    uuid NOT NULL REFERENCES public.tenants (id),
    metric       text COLLATE "C" NOT NULL,
    period_type  text COLLATE "C" NOT NULL CHECK (period_type IN ('weekly', 'monthly')),
    period_start date NOT NULL,
    actor        uuid NOT NULL,
    days         integer NOT NULL CHECK (days > 0),
    PRIMARY KEY (tenant_id, metric, period_type, period_start, actor)
);
CREATE INDEX usage_actor_periods_start ON public.usage_actor_periods (period_start);

ALTER TABLE public.usage_actor_days ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.usage_actor_periods ENABLE ROW LEVEL SECURITY;
CREATE POLICY ops_all ON public.usage_actor_days TO meterbridge_ops USING (true) WITH CHECK (true);
CREATE POLICY ops_all ON public.usage_actor_periods TO meterbridge_ops USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON public.usage_actor_days, public.usage_actor_periods
    TO meterbridge_ops;
