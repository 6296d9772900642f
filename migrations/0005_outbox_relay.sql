-- The outbox relay: what it may change, how an aggregate's events stay in order, and the
-- operator's audited actions on dead events.

-- SKIPPED: a DEAD event an operator chose to pass over (audited in outbox_admin_log), so the
-- events after it in its aggregate may go.
ALTER TABLE public.outbox_events DROP CONSTRAINT outbox_events_status_check;
ALTER TABLE public.outbox_events ADD CONSTRAINT outbox_events_status_check
    CHECK (status IN ('PENDING', 'PROCESSING', 'PUBLISHED', 'FAILED', 'DEAD', 'SKIPPED'));

-- The X-Ray trace of the request that wrote the event, passed on to EventBridge.
ALTER TABLE public.outbox_events ADD COLUMN trace_header text
    CHECK (length(trace_header) <= 512);

-- A claim takes an event only when every earlier event of its aggregate is published (or
-- skipped): this index holds exactly the events that can still hold others back, so the check
-- reads a handful of rows, however long the table.
CREATE INDEX outbox_events_aggregate_open_idx
    ON public.outbox_events (tenant_id, aggregate_type, aggregate_id, aggregate_sequence)
    WHERE status NOT IN ('PUBLISHED', 'SKIPPED');

-- Retention deletes published rows oldest first, in bounded batches.
CREATE INDEX outbox_events_published_idx ON public.outbox_events (published_at)
    WHERE status = 'PUBLISHED';

-- Operators' actions on the outbox (redrive, skip): who, what, why. Written by the admin
-- function (the database owner); no application role reads or writes it.
CREATE TABLE public.outbox_admin_log (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    action    text        NOT NULL CHECK (action IN ('redrive', 'skip')),
    actor     text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 128),
    reason    text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    event_ids uuid[]      NOT NULL
);
ALTER TABLE public.outbox_admin_log ENABLE ROW LEVEL SECURITY;

-- The relay (meterbridge_ops) claims and marks rows of every tenant, and deletes published ones
-- past their retention; it changes only the delivery columns.
GRANT UPDATE (status, attempts, next_attempt_at, claim_token, lease_until, last_error,
              published_at) ON public.outbox_events TO meterbridge_ops;
GRANT DELETE ON public.outbox_events TO meterbridge_ops;
CREATE POLICY ops_relay ON public.outbox_events FOR UPDATE TO meterbridge_ops
    USING (true) WITH CHECK (true);
CREATE POLICY ops_retention ON public.outbox_events FOR DELETE TO meterbridge_ops
    USING (status = 'PUBLISHED');

-- verify-payment publishes its own tenant's fresh event at once (the relay is the safety net):
-- the same delivery columns, under the API role's tenant policy.
GRANT UPDATE (status, attempts, next_attempt_at, claim_token, lease_until, last_error,
              published_at) ON public.outbox_events TO meterbridge_api;
