-- A stored response to an Idempotency-Key is kept for IDEMPOTENCY_RETENTION_DAYS (30 by
-- default), then deleted by the relay's retention step (as meterbridge_ops), in batches along
-- the index below: it holds a payment's description and metadata, personal data kept no longer
-- than a client's retries need (docs/personal-data.md).
CREATE INDEX idempotency_records_created ON public.idempotency_records (created_at);

-- The relay may find and delete old records, never read what they hold (response_body,
-- request_hash), never touch one younger than a day.
GRANT SELECT (tenant_id, source_service, idempotency_key, created_at), DELETE
    ON public.idempotency_records TO meterbridge_ops;
CREATE POLICY ops_retention_read ON public.idempotency_records FOR SELECT TO meterbridge_ops
    USING (created_at < now() - interval '1 day');
CREATE POLICY ops_retention ON public.idempotency_records FOR DELETE TO meterbridge_ops
    USING (created_at < now() - interval '1 day');
