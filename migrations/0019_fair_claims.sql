-- The relay and the aggregation serve tenants fairly.
--
-- The relay's claim. Before: a claim took the oldest due rows of any tenant (outbox_events_due_idx). A tenant with
-- a backlog of 100,000 rows (a bulk import, a downstream outage) then held every claim until its
-- backlog drained, and another tenant's `payment.paid` waited behind all of it.
--
-- After: a claim finds the tenants with rows not yet final (a skip scan of this index, one
-- probe per tenant), takes each one's oldest due rows (at most a claim's worth per tenant), and
-- interleaves them: every tenant's first row before any tenant's second. A tenant with a due
-- row is published in the next claim cycle whatever the others' backlogs; order per aggregate
-- is kept as before (an event waits for its aggregate's earlier ones).
CREATE INDEX outbox_events_due_by_tenant_idx ON public.outbox_events (tenant_id, next_attempt_at, id)
    WHERE status IN ('PENDING', 'PROCESSING', 'FAILED');
-- It replaces the due index: left in place, the planner would walk it for one tenant's rows
-- (its order is the same once the tenant is fixed), reading every older row of the others.
DROP INDEX public.outbox_events_due_idx;

-- The aggregation's queue is worked fairly across tenants the same way: a chunk takes each
-- queued tenant's next cells and interleaves them, so one tenant's backfill of a year never
-- holds another tenant's cells back past the first chunk of a run.
CREATE INDEX usage_aggregation_queue_by_tenant
    ON public.usage_aggregation_queue (tenant_id, period_type, period_start, metric);
DROP INDEX public.usage_aggregation_queue_tenant;
