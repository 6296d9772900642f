-- Erasure of a data subject (docs/decisions/0007-subject-erasure.md): the subject's actor id is
-- replaced, on every event of theirs, by one random token per request, and their events'
-- metadata emptied; the distinct-actor sets are re-keyed from md5(id) to md5(token). Quantities,
-- metrics, instants, classification, ids, dedup keys and payload hashes stay: no bill changes,
-- and a replay of an erased event is still a duplicate.

-- One random salt per installation: a request names its subject by sha256(salt || tenant || id),
-- so the same subject is recognised without the id being kept.
CREATE TABLE public.subject_erasure_salt (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    salt      bytea   NOT NULL CHECK (length(salt) = 32)
);
INSERT INTO public.subject_erasure_salt (salt)
VALUES (decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
REVOKE ALL ON public.subject_erasure_salt FROM PUBLIC;

-- An erasure request and its receipt. Nothing in it names the subject once it has finished: the
-- token (which the erased rows carry) is cleared then.
CREATE TABLE public.subject_erasures (
    tenant_id       uuid        NOT NULL REFERENCES public.tenants (id),
    -- The caller's id for the request (a ticket): the same one again returns the receipt.
    request_id      text        COLLATE "C" NOT NULL
                                CHECK (length(request_id) BETWEEN 1 AND 128),
    subject_hash    bytea       NOT NULL CHECK (length(subject_hash) = 32),
    reason          text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    requested_by    text        NOT NULL CHECK (length(requested_by) BETWEEN 1 AND 128),
    -- While it runs: the token the subject's rows get ('erased:' and 128 random bits).
    token           text        COLLATE "C" CHECK (token ~ '^erased:[0-9a-f]{32}$'),
    -- The aggregation's watermark when it started: rows inserted or voided from it on are
    -- erased by the last step, under the aggregation's lock, with the actor sets.
    started_mark    bigint      NOT NULL,
    -- Days before this one are done (live and archived alike).
    next_day        date,
    events_erased   bigint      NOT NULL DEFAULT 0,
    actor_days      bigint      NOT NULL DEFAULT 0,
    actor_periods   bigint      NOT NULL DEFAULT 0,
    steps           integer     NOT NULL DEFAULT 0,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (tenant_id, request_id),
    CHECK ((finished_at IS NULL) = (token IS NOT NULL))
);
ALTER TABLE public.subject_erasures ENABLE ROW LEVEL SECURITY;
-- Voids of a row under erasure wait for it (below): the definer reads the running requests.
CREATE POLICY definer_look_up ON public.subject_erasures FOR SELECT TO meterbridge_definer
    USING (true);
GRANT SELECT (tenant_id, token) ON public.subject_erasures TO meterbridge_definer;

-- Whether an event's actor is the token of an erasure still running: a void of it would reach
-- the aggregation before the actor sets are re-keyed, so it waits (retryable) until the
-- erasure finishes.
CREATE FUNCTION public.usage_event_under_erasure(p_tenant uuid, p_actor text)
    RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $$
        SELECT EXISTS (SELECT 1 FROM public.subject_erasures e
                        WHERE e.tenant_id = p_tenant AND e.token = p_actor)
    $$;
ALTER FUNCTION public.usage_event_under_erasure(uuid, text) OWNER TO meterbridge_definer;
REVOKE ALL ON FUNCTION public.usage_event_under_erasure(uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.usage_event_under_erasure(uuid, text) TO meterbridge_ingest;

-- The update trigger: a void moves the row's xact_id (the aggregation takes it as a change); an
-- update that touches no void column is an erasure (the API roles may update the void columns
-- only), which the aggregation must never see as a change: xact_id kept, voided rows included.
CREATE OR REPLACE FUNCTION public.usage_events_on_update() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    AS $$
    BEGIN
        IF NEW.voided_at IS NOT DISTINCT FROM OLD.voided_at
           AND NEW.voided_by IS NOT DISTINCT FROM OLD.voided_by
           AND NEW.void_reason IS NOT DISTINCT FROM OLD.void_reason THEN
            NEW.xact_id := OLD.xact_id;
            RETURN NEW;
        END IF;
        IF OLD.voided_at IS NOT NULL THEN
            RAISE EXCEPTION 'usage event % is already voided', OLD.event_id
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        IF OLD.actor_id LIKE 'erased:%'
           AND public.usage_event_under_erasure(OLD.tenant_id, OLD.actor_id) THEN
            RAISE EXCEPTION 'usage event % is being erased: retry the void later', OLD.event_id
                USING ERRCODE = 'lock_not_available';
        END IF;
        NEW.xact_id := (pg_catalog.pg_current_xact_id()::text)::bigint;
        RETURN NEW;
    END
    $$;

-- One step of an erasure, in the caller's transaction, under the aggregation's lock: at most
-- p_rows event rows, day by day from where the request stopped (live and archived days), then
-- the last step. Returns the request's row (the receipt). Rows the aggregation has not taken
-- yet (inserted or voided from its watermark on) are left to the last step, so the aggregation
-- never reads a token before the actor sets carry it.
CREATE FUNCTION public.usage_subject_erase_step(p_tenant uuid, p_request text, p_actor text,
                                                p_reason text, p_requested_by text,
                                                p_rows integer)
RETURNS SETOF public.subject_erasures
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_hash bytea;
    v_req public.subject_erasures;
    v_mark bigint;
    v_left integer := greatest(p_rows, 1);
    v_table regclass;
    v_day date;
    v_n bigint;
    v_token text;
BEGIN
    IF p_actor IS NULL OR length(p_actor) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION 'an actor id has 1-128 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_catalog.pg_advisory_xact_lock(public.usage_aggregation_lock_id());
    SELECT s.watermark INTO v_mark FROM public.usage_aggregation_state s;
    v_mark := coalesce(v_mark, 0);
    SELECT pg_catalog.sha256(s.salt || pg_catalog.uuid_send(p_tenant)
                             || pg_catalog.convert_to(p_actor, 'UTF8'))
      INTO v_hash FROM public.subject_erasure_salt s;
    INSERT INTO public.subject_erasures AS e (tenant_id, request_id, subject_hash, reason,
                                              requested_by, token, started_mark)
    VALUES (p_tenant, p_request, v_hash, p_reason, p_requested_by,
            'erased:' || replace(gen_random_uuid()::text, '-', ''), v_mark)
    ON CONFLICT (tenant_id, request_id) DO NOTHING;
    SELECT * INTO v_req FROM public.subject_erasures e
     WHERE e.tenant_id = p_tenant AND e.request_id = p_request FOR UPDATE;
    IF v_req.subject_hash <> v_hash THEN
        RAISE EXCEPTION 'erasure request % is another subject''s', p_request
            USING ERRCODE = 'unique_violation';
    END IF;
    IF v_req.finished_at IS NOT NULL THEN
        RETURN NEXT v_req;
        RETURN;
    END IF;
    v_token := v_req.token;

    -- The days, oldest first, from where it stopped: attached and archived partitions alike.
    FOR v_table, v_day IN
        SELECT c.oid::regclass, pg_catalog.to_date(pg_catalog.substr(c.relname, 15), 'YYYYMMDD')
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname IN ('public', 'usage_archive') AND c.relkind = 'r'
           AND c.relname ~ '^usage_events_p[0-9]{8}$'
           AND (v_req.next_day IS NULL
                OR pg_catalog.to_date(pg_catalog.substr(c.relname, 15), 'YYYYMMDD')
                   >= v_req.next_day)
         ORDER BY 2
    LOOP
        EXECUTE pg_catalog.format(
            'UPDATE %s SET actor_id = $1, metadata = ''{}''
              WHERE ctid = ANY (ARRAY (
                    SELECT ctid FROM %s
                     WHERE tenant_id = $2 AND actor_id = $3
                       AND coalesce(inserted_xact, 0) < $4 AND coalesce(xact_id, 0) < $4
                     LIMIT $5))', v_table, v_table)
            USING v_token, p_tenant, p_actor, v_mark, v_left;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_req.events_erased := v_req.events_erased + v_n;
        v_left := v_left - v_n::integer;
        IF v_left <= 0 THEN
            -- This day may hold more: the next step starts with it again.
            UPDATE public.subject_erasures e
               SET next_day = v_day, events_erased = v_req.events_erased, steps = e.steps + 1
             WHERE e.tenant_id = p_tenant AND e.request_id = p_request
            RETURNING * INTO v_req;
            RETURN NEXT v_req;
            RETURN;
        END IF;
        v_req.next_day := v_day + 1;
    END LOOP;

    -- The last step: what the aggregation had not taken when the request started (or since),
    -- found by transaction id (what arrived, not what is stored), then the actor sets.
    UPDATE public.usage_events u SET actor_id = v_token, metadata = '{}'
     WHERE u.tenant_id = p_tenant AND u.actor_id = p_actor
       AND (u.inserted_xact >= v_req.started_mark OR u.xact_id >= v_req.started_mark);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_req.events_erased := v_req.events_erased + v_n;
    UPDATE public.usage_actor_days d SET actor = pg_catalog.md5(v_token)::uuid
     WHERE d.tenant_id = p_tenant AND d.actor = pg_catalog.md5(p_actor)::uuid;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_req.actor_days := v_n;
    UPDATE public.usage_actor_periods d SET actor = pg_catalog.md5(v_token)::uuid
     WHERE d.tenant_id = p_tenant AND d.actor = pg_catalog.md5(p_actor)::uuid;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_req.actor_periods := v_n;
    UPDATE public.subject_erasures e
       SET next_day = v_req.next_day, events_erased = v_req.events_erased,
           actor_days = v_req.actor_days, actor_periods = v_req.actor_periods,
           steps = e.steps + 1, token = NULL, finished_at = pg_catalog.now()
     WHERE e.tenant_id = p_tenant AND e.request_id = p_request
    RETURNING * INTO v_req;
    RETURN NEXT v_req;
END
$$;

REVOKE ALL ON FUNCTION public.usage_subject_erase_step(uuid, text, text, text, text, integer)
    FROM PUBLIC;
