-- Coalesced steps on one pool (issue 10, the hot pool). Every authorisation and every
-- settlement paid from a tenant's pool updates that pool's row and holds its lock until
-- its commit (the WAL flush): one after another, the pool's calls queue on that window
-- twice per call. A gateway process now sends the authorisations (and the settlements)
-- of one pool that arrive together as one statement: one transaction, one lock window
-- and one commit for all of them.
--
-- Each request is decided as it would be alone (gw_authorise_known or gw_authorise,
-- gw_settle) in order, each in a subtransaction of its own (a BEGIN ... EXCEPTION
-- block), so that one that fails (a channel's uniqueid taken, an unknown call) leaves
-- nothing and takes none of the others with it: its error comes back in its row, and
-- the others commit. An error of the statement itself (a statement timeout, the
-- connection lost, a failure at the commit) leaves nothing of any of them, like one
-- failed statement of each: the gateway tells each caller so (and voids each
-- authorisation whose outcome it cannot know, as for one).
--
-- The tables and what their rows mean do not change: a coalesced call writes the rows
-- it would write alone.

-- Authorises n requests, the i-th element of each array being the i-th request's
-- argument of gw_authorise (migration 010); p_version[i] NULL for a decision made from
-- a freshly read context (gw_authorise), else gw_authorise_known's check comes first
-- with p_extension, p_endpoint_name and p_suffix. p_sources holds each request's
-- sources joined by commas. Returns one row per request, in order (ord = i): what
-- gw_authorise(_known) returned, or the SQLSTATE, message and detail of its error.
CREATE FUNCTION gw_authorise_batch(
    p_version bigint[], p_extension text[], p_endpoint_name text[], p_suffix text[],
    p_id uuid[], p_tenant text[], p_user text[], p_direction text[], p_caller text[],
    p_destination text[], p_class text[], p_decision text[], p_reason text[],
    p_route text[], p_pbx_uniqueid text[], p_linkedid text[], p_rate_kind text[],
    p_sources text[], p_pool_country text[], p_slice integer[], p_now timestamptz[],
    p_pbx text[])
RETURNS TABLE (ord integer, decision text, reason text, funded integer, price numeric,
               first_increment integer, increment integer, rate_prefix text,
               error_state text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_sources text[];
BEGIN
    FOR i IN 1 .. coalesce(cardinality(p_id), 0) LOOP
        ord := i;
        error_state := NULL;
        error_message := NULL;
        error_detail := NULL;
        v_sources := CASE WHEN p_sources[i] = '' THEN '{}'::text[]
                          ELSE string_to_array(p_sources[i], ',') END;
        BEGIN
            IF p_version[i] IS NULL THEN
                SELECT * INTO r FROM gw_authorise(
                    p_id[i], p_tenant[i], p_user[i], p_direction[i], p_caller[i],
                    p_destination[i], p_class[i], p_decision[i], p_reason[i], p_route[i],
                    p_pbx_uniqueid[i], p_linkedid[i], p_rate_kind[i], v_sources,
                    p_pool_country[i]::char(2), p_slice[i], p_now[i], p_pbx[i]);
            ELSE
                SELECT * INTO r FROM gw_authorise_known(
                    p_version[i], p_extension[i], p_endpoint_name[i], p_suffix[i],
                    p_id[i], p_tenant[i], p_user[i], p_direction[i], p_caller[i],
                    p_destination[i], p_class[i], p_decision[i], p_reason[i], p_route[i],
                    p_pbx_uniqueid[i], p_linkedid[i], p_rate_kind[i], v_sources,
                    p_pool_country[i]::char(2), p_slice[i], p_now[i], p_pbx[i]);
            END IF;
            decision := r.decision;
            reason := r.reason;
            funded := r.funded;
            price := r.price;
            first_increment := r.first_increment;
            increment := r.increment;
            rate_prefix := r.rate_prefix;
        EXCEPTION WHEN OTHERS THEN
            -- (a statement timeout or a cancellation is not caught by OTHERS: it ends the
            -- whole statement, and nothing of the batch commits)
            GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE,
                                    error_message = MESSAGE_TEXT,
                                    error_detail = PG_EXCEPTION_DETAIL;
            decision := NULL;
            reason := NULL;
            funded := 0;
            price := NULL;
            first_increment := NULL;
            increment := NULL;
            rate_prefix := NULL;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Settles n calls (gw_settle's arguments, element by element), in order, each in a
-- subtransaction of its own. The calls' rows are locked first, in the order of their
-- ids, so that the lock order of every step (calls row -> pool -> add-on -> wallet) holds
-- for the batch as a whole: a batch never holds a pool row while it waits for a call's.
-- Returns one row per call, in order: gw_settle's answer or its error.
CREATE FUNCTION gw_settle_batch(p_call uuid[], p_billable integer[], p_now timestamptz[],
                                p_by text[])
RETURNS TABLE (ord integer, outcome text, billed integer, charged numeric,
               error_state text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    PERFORM 1 FROM calls c WHERE c.id = ANY (p_call) ORDER BY c.id FOR UPDATE;
    FOR i IN 1 .. coalesce(cardinality(p_call), 0) LOOP
        ord := i;
        error_state := NULL;
        error_message := NULL;
        error_detail := NULL;
        BEGIN
            SELECT * INTO r FROM gw_settle(p_call[i], p_billable[i], p_now[i], p_by[i]);
            outcome := r.outcome;
            billed := r.billed;
            charged := r.charged;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE,
                                    error_message = MESSAGE_TEXT,
                                    error_detail = PG_EXCEPTION_DETAIL;
            outcome := NULL;
            billed := NULL;
            charged := NULL;
        END;
        RETURN NEXT;
    END LOOP;
END
$$;

-- One pool's settlements and authorisations that arrived together, in one statement:
-- the settlements first (gw_settle_batch, which locks their calls' rows before the
-- pool's), then the authorisations (gw_authorise_batch), so that the seconds the
-- settlements free are there for the authorisations. One row per request: step
-- 'settle' or 'authorise', its place in its own array (ord), and that step's answer.
CREATE FUNCTION gw_pool_batch(
    p_settle_call uuid[], p_settle_billable integer[], p_settle_now timestamptz[],
    p_settle_by text[],
    p_version bigint[], p_extension text[], p_endpoint_name text[], p_suffix text[],
    p_id uuid[], p_tenant text[], p_user text[], p_direction text[], p_caller text[],
    p_destination text[], p_class text[], p_decision text[], p_reason text[],
    p_route text[], p_pbx_uniqueid text[], p_linkedid text[], p_rate_kind text[],
    p_sources text[], p_pool_country text[], p_slice integer[], p_now timestamptz[],
    p_pbx text[])
RETURNS TABLE (step text, ord integer, decision text, reason text, funded integer,
               price numeric, first_increment integer, increment integer,
               rate_prefix text, outcome text, billed integer, charged numeric,
               error_state text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_settle_call), 0) > 0 THEN
        RETURN QUERY
        SELECT 'settle', s.ord, NULL::text, NULL::text, NULL::integer, NULL::numeric,
               NULL::integer, NULL::integer, NULL::text, s.outcome, s.billed, s.charged,
               s.error_state, s.error_message, s.error_detail
        FROM gw_settle_batch(p_settle_call, p_settle_billable, p_settle_now, p_settle_by) s;
    END IF;
    IF coalesce(cardinality(p_id), 0) > 0 THEN
        RETURN QUERY
        SELECT 'authorise', a.ord, a.decision, a.reason, a.funded, a.price,
               a.first_increment, a.increment, a.rate_prefix, NULL::text, NULL::integer,
               NULL::numeric, a.error_state, a.error_message, a.error_detail
        FROM gw_authorise_batch(p_version, p_extension, p_endpoint_name, p_suffix, p_id,
                                p_tenant, p_user, p_direction, p_caller, p_destination,
                                p_class, p_decision, p_reason, p_route, p_pbx_uniqueid,
                                p_linkedid, p_rate_kind, p_sources, p_pool_country,
                                p_slice, p_now, p_pbx) a;
    END IF;
END
$$;
