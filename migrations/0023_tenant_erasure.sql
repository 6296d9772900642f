-- Tenant offboarding (docs/personal-data.md#offboarding-a-tenant): once a tenant has been
-- disabled for its grace period, `admin tenant erase` removes every row of it, in every table
-- and day partition (live and archived) and every dedup-key partition, its Redis keys and its
-- webhook signing secrets, in steps, with a receipt. Billing records (aggregates, payments and
-- their audit) may be kept; the tenant's row then stays, marked erased, for them to name.

ALTER TABLE public.tenants DROP CONSTRAINT tenants_status_check;
ALTER TABLE public.tenants ADD CONSTRAINT tenants_status_check
    CHECK (status IN ('active', 'disabled', 'erased'));

-- One per tenant: its progress while it runs, its receipt once finished. No foreign key: the
-- tenant's row goes (unless billing is kept).
CREATE TABLE public.tenant_erasures (
    tenant_id        uuid        PRIMARY KEY,
    slug             text        COLLATE "C" NOT NULL,
    reason           text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    requested_by     text        NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 128),
    -- Aggregates, payments and payment audit kept (and the tenant's row, status 'erased').
    keep_billing     boolean     NOT NULL,
    -- rows: the tenant's tables and day partitions; keys: the dedup-key partitions; then its
    -- Redis keys, its secrets, its tenant row.
    phase            text        COLLATE "C" NOT NULL DEFAULT 'rows'
                                 CHECK (phase IN ('rows', 'keys', 'redis', 'secrets', 'tenant',
                                                  'done')),
    -- The tables of the phase already emptied of the tenant's rows.
    tables_done      oid[]       NOT NULL DEFAULT '{}',
    -- In a table read by block range (no index leads with tenant_id): the next block.
    next_block       bigint      CHECK (next_block >= 0),
    -- The Redis SCAN cursor of the redis phase.
    redis_cursor     text        COLLATE "C",
    -- Rows deleted per table (day partitions and key partitions counted under their parent).
    rows_deleted     jsonb       NOT NULL DEFAULT '{}',
    redis_keys       bigint      NOT NULL DEFAULT 0,
    secrets_deleted  integer     NOT NULL DEFAULT 0,
    steps            integer     NOT NULL DEFAULT 0,
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    CHECK ((finished_at IS NULL) = (phase <> 'done'))
);
-- The owner (the admin function) only: no role is granted anything on it.
ALTER TABLE public.tenant_erasures ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.tenant_erasures FROM PUBLIC;
