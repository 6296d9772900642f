-- Payments, their audit trail, the transactional outbox, and what makes payment requests and
-- provider webhooks idempotent. A payment's state change, its audit row and its outbox event are
-- written in one transaction by verify-payment (as meterbridge_api, under RLS); the outbox relay
-- (a later migration grants it what it needs) publishes the events.

-- ISO 4217 currencies in circulation, with the exponent of their minor unit (2 for USD: cents).
-- Reference data, not tenant-owned.
CREATE TABLE public.currencies (
    code       text     COLLATE "C" PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
    minor_unit smallint NOT NULL CHECK (minor_unit BETWEEN 0 AND 4)
);
INSERT INTO public.currencies (code, minor_unit)
SELECT code, CASE
        WHEN code IN ('BIF', 'CLP', 'DJF', 'GNF', 'ISK', 'JPY', 'KMF', 'KRW', 'PYG', 'RWF', 'UGX',
                      'UYI', 'VND', 'VUV', 'XAF', 'XOF', 'XPF') THEN 0
        WHEN code IN ('BHD', 'IQD', 'JOD', 'KWD', 'LYD', 'OMR', 'TND') THEN 3
        WHEN code IN ('CLF', 'UYW') THEN 4
        ELSE 2
    END
  FROM unnest(ARRAY[
    'AED', 'AFN', 'ALL', 'AMD', 'AOA', 'ARS', 'AUD', 'AWG', 'AZN', 'BAM', 'BBD', 'BDT', 'BGN',
    'BHD', 'BIF', 'BMD', 'BND', 'BOB', 'BOV', 'BRL', 'BSD', 'BTN', 'BWP', 'BYN', 'BZD', 'CAD',
    'CDF', 'CHE', 'CHF', 'CHW', 'CLF', 'CLP', 'CNY', 'COP', 'COU', 'CRC', 'CUP', 'CVE', 'CZK',
    'DJF', 'DKK', 'DOP', 'DZD', 'EGP', 'ERN', 'ETB', 'EUR', 'FJD', 'FKP', 'GBP', 'GEL', 'GHS',
    'GIP', 'GMD', 'GNF', 'GTQ', 'GYD', 'HKD', 'HNL', 'HTG', 'HUF', 'IDR', 'ILS', 'INR', 'IQD',
    'IRR', 'ISK', 'JMD', 'JOD', 'JPY', 'KES', 'KGS', 'KHR', 'KMF', 'KPW', 'KRW', 'KWD', 'KYD',
    'KZT', 'LAK', 'LBP', 'LKR', 'LRD', 'LSL', 'LYD', 'MAD', 'MDL', 'MGA', 'MKD', 'MMK', 'MNT',
    'MOP', 'MRU', 'MUR', 'MVR', 'MWK', 'MXN', 'MXV', 'MYR', 'MZN', 'NAD', 'NGN', 'NIO', 'NOK',
    'NPR', 'NZD', 'OMR', 'PAB', 'PEN', 'PGK', 'PHP', 'PKR', 'PLN', 'PYG', 'QAR', 'RON', 'RSD',
    'RUB', 'RWF', 'SAR', 'SBD', 'SCR', 'SDG', 'SEK', 'SGD', 'SHP', 'SLE', 'SOS', 'SRD', 'SSP',
    'STN', 'SVC', 'SYP', 'SZL', 'THB', 'TJS', 'TMT', 'TND', 'TOP', 'TRY', 'TTD', 'TWD', 'TZS',
    'UAH', 'UGX', 'USD', 'USN', 'UYI', 'UYU', 'UYW', 'UZS', 'VED', 'VES', 'VND', 'VUV', 'WST',
    'XAF', 'XCD', 'XCG', 'XOF', 'XPF', 'YER', 'ZAR', 'ZMW', 'ZWG'
  ]) AS c(code);

CREATE TABLE public.payments (
    tenant_id           uuid        NOT NULL REFERENCES public.tenants (id),
    id                  uuid        NOT NULL,
    -- Minor units (cents for USD): exact, never a float.
    amount_minor        bigint      NOT NULL CHECK (amount_minor > 0),
    currency            text        COLLATE "C" NOT NULL REFERENCES public.currencies (code),
    provider            text        COLLATE "C" NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_-]{0,31}$'),
    -- The provider's id of the payment (a Stripe PaymentIntent id): how webhooks find it.
    provider_reference  text        COLLATE "C" CHECK (length(provider_reference) BETWEEN 1 AND 255),
    status              text        COLLATE "C" NOT NULL DEFAULT 'PENDING'
                        CHECK (status IN ('PENDING', 'PAID_VERIFIED', 'FAILED', 'REFUNDED')),
    verified_at         timestamptz,
    verified_by         text        CHECK (length(verified_by) BETWEEN 1 AND 128),
    verification_method text        COLLATE "C" CHECK (verification_method IN
                            ('manual', 'provider_api', 'bank_reconciliation', 'provider_webhook')),
    description         text        CHECK (length(description) <= 500),
    metadata            jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    correlation_id      text        NOT NULL CHECK (length(correlation_id) BETWEEN 1 AND 128),
    -- The service whose key created it.
    source_service      text        COLLATE "C" NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- Incremented by every change: the state a reader saw.
    version             integer     NOT NULL DEFAULT 1 CHECK (version > 0),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT payments_provider_reference UNIQUE (tenant_id, provider, provider_reference),
    -- A verified payment says when, by whom and how; an unverified one says nothing of it.
    CONSTRAINT payments_verification CHECK (CASE
        WHEN status IN ('PAID_VERIFIED', 'REFUNDED')
            THEN verified_at IS NOT NULL AND verified_by IS NOT NULL
                 AND verification_method IS NOT NULL
        ELSE verified_at IS NULL AND verified_by IS NULL AND verification_method IS NULL
    END)
);
-- GET /v1/payments: one tenant's payments, newest first, keyset on (created_at, id).
CREATE INDEX payments_tenant_created_idx ON public.payments (tenant_id, created_at, id);
-- GET /v1/payments?status=: the same, for one status.
CREATE INDEX payments_tenant_status_created_idx
    ON public.payments (tenant_id, status, created_at, id);

-- Every attempted transition, accepted or refused: who, how, why, from and to. Append-only: the
-- API role may insert and read its own tenant's rows, never change them.
CREATE TABLE public.payment_audit (
    tenant_id      uuid        NOT NULL REFERENCES public.tenants (id),
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    -- NULL for an attempt that named no payment we know (a webhook with a bad signature).
    payment_id     uuid,
    action         text        COLLATE "C" NOT NULL
                   CHECK (action IN ('create', 'verify', 'fail', 'refund', 'webhook')),
    accepted       boolean     NOT NULL,
    from_status    text        COLLATE "C",
    to_status      text        COLLATE "C",
    -- `key:<prefix>/<source>`, `webhook:<provider>` or `admin`.
    actor          text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    -- verifiedBy (for a verification), or the webhook event id.
    actor_detail   text        CHECK (length(actor_detail) <= 255),
    method         text        COLLATE "C",
    reason         text        COLLATE "C" NOT NULL CHECK (length(reason) BETWEEN 1 AND 64),
    correlation_id text        NOT NULL CHECK (length(correlation_id) BETWEEN 1 AND 128),
    details        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    at             timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, payment_id) REFERENCES public.payments (tenant_id, id)
);
-- A payment's history, in order.
CREATE INDEX payment_audit_payment_idx ON public.payment_audit (tenant_id, payment_id, id);

-- The transactional outbox: each row is one event, written in the transaction that made it
-- true, and published by the relay at least once.
CREATE TABLE public.outbox_events (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id          uuid        NOT NULL REFERENCES public.tenants (id),
    -- What consumers deduplicate on.
    event_id           uuid        NOT NULL UNIQUE,
    event_type         text        COLLATE "C" NOT NULL CHECK (event_type ~ '^[a-z][a-z0-9_.]{0,127}$'),
    schema_version     integer     NOT NULL CHECK (schema_version > 0),
    -- The whole envelope, as published.
    payload            jsonb       NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    correlation_id     text        NOT NULL CHECK (length(correlation_id) BETWEEN 1 AND 128),
    -- `payment-paid-<payment id>`: one event per fact, however often it is attempted.
    idempotency_key    text        COLLATE "C" NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    aggregate_type     text        COLLATE "C" NOT NULL CHECK (aggregate_type ~ '^[a-z][a-z_]{0,63}$'),
    aggregate_id       uuid        NOT NULL,
    -- 1, 2, 3… per aggregate: the order in which its events happened.
    aggregate_sequence integer     NOT NULL CHECK (aggregate_sequence > 0),
    status             text        COLLATE "C" NOT NULL DEFAULT 'PENDING'
                       CHECK (status IN ('PENDING', 'PROCESSING', 'PUBLISHED', 'FAILED', 'DEAD')),
    attempts           integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- When the row is next due: the retry time of a PENDING/FAILED row, and the lease's end of a
    -- PROCESSING one (so a relay that died is taken over by the same index scan).
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    claim_token        uuid,
    lease_until        timestamptz,
    last_error         text        CHECK (length(last_error) <= 2000),
    source_service     text        COLLATE "C" NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    published_at       timestamptz,
    CONSTRAINT outbox_events_idempotency_key UNIQUE (tenant_id, idempotency_key),
    CONSTRAINT outbox_events_aggregate_sequence
        UNIQUE (tenant_id, aggregate_type, aggregate_id, aggregate_sequence)
);
-- The relay's claim, and nothing else: rows not yet final, by when they are due, oldest first.
-- Published and dead rows are not in it, so it stays the size of the backlog.
CREATE INDEX outbox_events_due_idx ON public.outbox_events (next_attempt_at, id)
    WHERE status IN ('PENDING', 'PROCESSING', 'FAILED');

-- A provider webhook event seen once: a replay of the same event id changes nothing.
CREATE TABLE public.webhook_events (
    tenant_id   uuid        NOT NULL REFERENCES public.tenants (id),
    provider    text        COLLATE "C" NOT NULL,
    event_id    text        COLLATE "C" NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
    event_type  text        NOT NULL CHECK (length(event_type) BETWEEN 1 AND 128),
    payment_id  uuid,
    outcome     text        COLLATE "C" NOT NULL CHECK (length(outcome) BETWEEN 1 AND 64),
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, provider, event_id)
);

-- An Idempotency-Key of POST /v1/payments, per (tenant, source): the request it first came
-- with and the response it got, replayed for the same request and refused for another.
CREATE TABLE public.idempotency_records (
    tenant_id       uuid        NOT NULL REFERENCES public.tenants (id),
    source_service  text        COLLATE "C" NOT NULL,
    idempotency_key text        COLLATE "C" NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    operation       text        COLLATE "C" NOT NULL,
    request_hash    bytea       NOT NULL CHECK (length(request_hash) = 32),
    response_status smallint    NOT NULL CHECK (response_status BETWEEN 100 AND 599),
    response_body   jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source_service, idempotency_key)
);

-- Row-level security: the API role sees and writes only its transaction's tenant.
ALTER TABLE public.payments ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.payment_audit ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.outbox_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.idempotency_records ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_own_tenant ON public.payments TO meterbridge_api
    USING (tenant_id = public.current_tenant_id()) WITH CHECK (tenant_id = public.current_tenant_id());
CREATE POLICY api_own_tenant ON public.payment_audit TO meterbridge_api
    USING (tenant_id = public.current_tenant_id()) WITH CHECK (tenant_id = public.current_tenant_id());
CREATE POLICY api_own_tenant ON public.outbox_events TO meterbridge_api
    USING (tenant_id = public.current_tenant_id()) WITH CHECK (tenant_id = public.current_tenant_id());
CREATE POLICY api_own_tenant ON public.webhook_events TO meterbridge_api
    USING (tenant_id = public.current_tenant_id()) WITH CHECK (tenant_id = public.current_tenant_id());
CREATE POLICY api_own_tenant ON public.idempotency_records TO meterbridge_api
    USING (tenant_id = public.current_tenant_id()) WITH CHECK (tenant_id = public.current_tenant_id());
-- The scheduled role reads payments and the outbox across tenants (what the relay claims and
-- what reports read); the relay's writes are granted with the relay.
CREATE POLICY ops_read_all ON public.payments FOR SELECT TO meterbridge_ops USING (true);
CREATE POLICY ops_read_all ON public.outbox_events FOR SELECT TO meterbridge_ops USING (true);

GRANT SELECT ON public.currencies TO meterbridge_api, meterbridge_ops;
-- Payments change only through the columns a transition touches.
GRANT SELECT, INSERT ON public.payments TO meterbridge_api;
GRANT UPDATE (status, verified_at, verified_by, verification_method, provider_reference,
              updated_at, version) ON public.payments TO meterbridge_api;
GRANT SELECT, INSERT ON public.payment_audit, public.outbox_events, public.webhook_events,
    public.idempotency_records TO meterbridge_api;
GRANT SELECT ON public.payments, public.outbox_events TO meterbridge_ops;

-- Webhooks arrive with no API key: the tenant is named in the path and proven by the signature.
-- The API role may not read tenants across tenants, so this function (owned by the powerless
-- definer, like the key lookup) returns the id of an active tenant by slug, and nothing else.
CREATE FUNCTION public.webhook_tenant(p_slug text) RETURNS uuid
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT t.id FROM public.tenants t WHERE t.slug = p_slug AND t.status = 'active'
    $$;
ALTER FUNCTION public.webhook_tenant(text) OWNER TO meterbridge_definer;
REVOKE ALL ON FUNCTION public.webhook_tenant(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.webhook_tenant(text) TO meterbridge_api;
