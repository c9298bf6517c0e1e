-- One pool's authorisations written together (issue 10, the hot pool). Migration 012
-- sends the authorisations of one pool that arrive together as one statement, but still
-- decides them one by one: about sixteen statements and a subtransaction each, all run
-- while the batch holds the pool row's lock. When every request of such a batch would
-- take the pool's fast path of gw_authorise (an ALLOW paid from the pool first, whose
-- pool has the slice free), and the pool has every slice free, the batch is written
-- with a few statements for all of them: the checks, each table's rows in one INSERT,
-- and one UPDATE of the pool row for the sum of the slices.
--
-- The rows are the ones the requests would write one by one, in the same order (the
-- ledger's ids follow the requests). A batch that does not qualify, a pool that ran
-- short meanwhile, or any error on the way (a channel's uniqueid taken) leaves nothing
-- of this path (a subtransaction), and the requests are decided one by one as before:
-- each gets what it would alone. The pool's alert trigger runs once for the batch's
-- update instead of once per request; it compares the pool's total with each line, so
-- the same lines are raised.

-- The requests of gw_authorise_batch (same arguments) written together: one row, each
-- request's answer at its place in the arrays (its decision ALLOW, its reason as given).
-- No row and nothing written when they do not all take the pool's fast path: n >= 2 requests of
-- one tenant and one pool country, each an ALLOW paid from the pool first, each with a
-- price when it names a rate kind (a domestic overage without one drops the wallet, as
-- gw_authorise does), all in one month, every one made from the tenant's current
-- context when it says which (gw_authorise_known's check), and the pool's free seconds
-- covering all their slices. Raises GW4R1 when the pool's update finds them no longer
-- free; the caller's subtransaction takes back what was written.
CREATE FUNCTION gw_authorise_together(
    p_version bigint[], p_extension text[], p_endpoint_name text[], p_suffix text[],
    p_id uuid[], p_tenant text[], p_user text[], p_direction text[], p_caller text[],
    p_destination text[], p_class text[], p_decision text[], p_reason text[],
    p_route text[], p_pbx_uniqueid text[], p_linkedid text[], p_rate_kind text[],
    p_sources text[], p_pool_country text[], p_slice integer[], p_now timestamptz[],
    p_pbx text[])
RETURNS TABLE (funded integer[], price numeric[], first_increment integer[],
               increment integer[], rate_prefix text[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(cardinality(p_id), 0);
    v_tenant text := p_tenant[1];
    v_country char(2) := p_pool_country[1]::char(2);
    v_currency text;
    v_timezone text;
    v_version bigint;
    v_month date;
    v_capacity bigint;
    v_free bigint;
    v_total bigint;
    -- per request, in order
    v_prefix text[];
    v_price numeric[];
    v_first integer[];
    v_increment integer[];
    v_slice integer[];
    v_sources text[];
    v_priced boolean;
BEGIN
    IF n < 2
       OR EXISTS (SELECT 1 FROM unnest(p_tenant, p_pool_country, p_decision, p_sources)
                                AS q(tenant, country, decision, sources)
                  WHERE q.tenant IS DISTINCT FROM v_tenant
                     OR q.country::char(2) IS DISTINCT FROM v_country
                     OR q.decision IS DISTINCT FROM 'ALLOW'
                     OR split_part(q.sources, ',', 1) IS DISTINCT FROM 'pool') THEN
        RETURN;
    END IF;
    SELECT t.currency, t.timezone, t.context_version INTO v_currency, v_timezone, v_version
    FROM tenants t WHERE t.id = v_tenant;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT min(date_trunc('month', q.at AT TIME ZONE v_timezone)::date)
    INTO v_month FROM unnest(p_now) AS q(at)
    HAVING min(date_trunc('month', q.at AT TIME ZONE v_timezone))
         = max(date_trunc('month', q.at AT TIME ZONE v_timezone));
    IF v_month IS NULL THEN
        RETURN;  -- a month's end within the batch
    END IF;
    -- gw_authorise_known's check, for each request that says which context it was made
    -- from: the version still current, the dialled string none of the tenant's users,
    -- extensions or numbers
    IF EXISTS (SELECT 1 FROM unnest(p_version, p_extension, p_endpoint_name, p_suffix)
                             AS q(version, extension, endpoint_name, suffix)
               WHERE q.version IS NOT NULL
                 AND (q.version IS DISTINCT FROM v_version
                      OR EXISTS (SELECT 1 FROM users u
                                 WHERE u.tenant_id = v_tenant AND u.deactivated_at IS NULL
                                   AND (u.extension = q.extension
                                        OR u.sip_endpoint = q.endpoint_name))
                      OR (q.suffix IS NOT NULL
                          AND EXISTS (SELECT 1 FROM phone_numbers pn
                                      WHERE pn.tenant_id = v_tenant
                                        AND reverse(pn.e164) LIKE reverse(q.suffix) || '%'))))
    THEN
        RETURN;
    END IF;
    -- each request's price, as gw_authorise looks it up, and its slice
    SELECT array_agg(r.prefix ORDER BY q.i), array_agg(r.price_per_minute ORDER BY q.i),
           array_agg(coalesce(r.first_increment, 60) ORDER BY q.i),
           array_agg(coalesce(r.increment, 60) ORDER BY q.i),
           array_agg(gw_bill_round(q.slice, coalesce(r.first_increment, 60),
                                   coalesce(r.increment, 60))::integer ORDER BY q.i),
           array_agg(CASE WHEN q.kind IS NOT NULL AND r.found IS NULL
                          THEN array_to_string(array_remove(string_to_array(q.sources, ','),
                                                            'wallet'), ',')
                          ELSE q.sources END ORDER BY q.i),
           bool_and(q.kind IS NULL OR r.found OR q.kind = 'domestic_overage')
    INTO v_prefix, v_price, v_first, v_increment, v_slice, v_sources, v_priced
    FROM unnest(p_rate_kind, p_destination, p_sources, p_slice)
         WITH ORDINALITY AS q(kind, destination, sources, slice, i)
    LEFT JOIN LATERAL (
        SELECT true AS found, r.prefix, r.price_per_minute, r.first_increment, r.increment
        FROM rates r
        WHERE r.kind = q.kind AND r.currency = v_currency
          AND (r.tenant_id = v_tenant OR r.tenant_id IS NULL)
          AND r.prefix = ANY (ARRAY(SELECT left(ltrim(q.destination, '+'), k)
                                    FROM generate_series(0, length(ltrim(q.destination, '+'))) k))
        ORDER BY length(r.prefix) DESC, r.tenant_id IS NULL
        LIMIT 1) r ON q.kind IS NOT NULL;
    IF NOT v_priced THEN
        RETURN;  -- a destination without a rate: rejected one by one (NO_RATE)
    END IF;
    SELECT sum(s) INTO v_total FROM unnest(v_slice) AS q(s);
    v_capacity := gw_pool_capacity(v_tenant, v_country);
    SELECT v_capacity - p.used_seconds - p.reserved_seconds INTO v_free FROM pools p
    WHERE p.tenant_id = v_tenant AND p.country = v_country AND p.month = v_month;
    IF v_free IS NULL OR v_free < v_total THEN
        RETURN;
    END IF;
    INSERT INTO calls (id, tenant_id, user_id, direction, caller, destination, number_class,
                       decision, reason, route, pbx, pbx_uniqueid, linkedid, rate_kind,
                       rate_prefix, price_per_minute, first_increment, increment, sources,
                       month, pool_country, funded_seconds, state, authorised_at)
    SELECT q.id, v_tenant, q.user_id, q.direction, q.caller, q.destination, q.class,
           'ALLOW', q.reason, q.route, coalesce(q.pbx, 'default'), q.pbx_uniqueid,
           q.linkedid, q.kind, v_prefix[q.i], v_price[q.i], v_first[q.i],
           v_increment[q.i], string_to_array(v_sources[q.i], ','), v_month, v_country,
           v_slice[q.i], 'authorised', q.at
    FROM unnest(p_id, p_user, p_direction, p_caller, p_destination, p_class, p_reason,
                p_route, p_pbx, p_pbx_uniqueid, p_linkedid, p_rate_kind, p_now)
         WITH ORDINALITY AS q(id, user_id, direction, caller, destination, class, reason,
                              route, pbx, pbx_uniqueid, linkedid, kind, at, i)
    ORDER BY q.i;
    INSERT INTO call_funding (call_id, source, position, reserved_seconds)
    SELECT q.id, 'pool', 1, v_slice[q.i]
    FROM unnest(p_id) WITH ORDINALITY AS q(id, i) ORDER BY q.i;
    INSERT INTO ledger (at, tenant_id, entry, account, country, month, call_id,
                        d_reserved_seconds)
    SELECT q.at, v_tenant, 'reserve', 'pool', v_country, v_month, q.id, v_slice[q.i]
    FROM unnest(p_id, p_now) WITH ORDINALITY AS q(id, at, i) ORDER BY q.i;
    UPDATE pools p SET reserved_seconds = p.reserved_seconds + v_total
    WHERE p.tenant_id = v_tenant AND p.country = v_country AND p.month = v_month
      AND v_capacity - p.used_seconds - p.reserved_seconds >= v_total;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the pool ran short of the batch''s slices' USING ERRCODE = 'GW4R1';
    END IF;
    RETURN QUERY SELECT v_slice, v_price, v_first, v_increment, v_prefix;
END
$$;

-- As in migration 012, trying gw_authorise_together first: its rows when it wrote the
-- batch, else (no row, or any error: its subtransaction leaves nothing) each request
-- decided alone, in order, in a subtransaction of its own.
CREATE OR REPLACE FUNCTION gw_authorise_batch(
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
    v_funded integer[];
    v_price numeric[];
    v_first integer[];
    v_increment integer[];
    v_prefix text[];
BEGIN
    IF coalesce(cardinality(p_id), 0) >= 2 THEN
        BEGIN
            SELECT * INTO v_funded, v_price, v_first, v_increment, v_prefix
            FROM gw_authorise_together(
                p_version, p_extension, p_endpoint_name, p_suffix, p_id, p_tenant, p_user,
                p_direction, p_caller, p_destination, p_class, p_decision, p_reason,
                p_route, p_pbx_uniqueid, p_linkedid, p_rate_kind, p_sources,
                p_pool_country, p_slice, p_now, p_pbx);
        EXCEPTION WHEN OTHERS THEN
            -- (as below, a statement timeout or a cancellation is not caught here)
            v_funded := NULL;
        END;
        IF v_funded IS NOT NULL THEN
            RETURN QUERY
            SELECT i, 'ALLOW'::text, p_reason[i], v_funded[i], v_price[i], v_first[i],
                   v_increment[i], v_prefix[i], NULL::text, NULL::text, NULL::text
            FROM generate_series(1, cardinality(p_id)) i;
            RETURN;
        END IF;
    END IF;
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
