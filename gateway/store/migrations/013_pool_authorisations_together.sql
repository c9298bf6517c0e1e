-- One pool's requests written together (issue 10, the hot pool). Migration 012 sends the
-- authorisations and settlements of one pool that arrive together as one statement, but
-- still decides them one by one: about sixteen statements and a subtransaction for each
-- authorisation, about ten for each settlement, all run while the statement holds the
-- pool row's lock. When every authorisation of such a statement would take the pool's
-- fast path of gw_authorise (an ALLOW paid from the pool first, whose pool has the slice
-- free) and the pool has every slice free, they are written with a few statements for
-- all of them: the checks, each table's rows in one INSERT, and one UPDATE of the pool
-- row for the sum of the slices. Likewise the settlements of calls funded by the pool
-- alone.
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
-- No row and nothing written unless they all take the pool's fast path: n >= 2 requests
-- of one tenant and one pool country, each an ALLOW paid from the pool first, each with
-- a price when it names a rate kind (a domestic overage without one drops the wallet,
-- as gw_authorise does), all in one month, every one made from the tenant's current
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
                          AND EXISTS (
                              SELECT 1 FROM phone_numbers pn
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
          AND r.prefix = ANY (ARRAY(
                  SELECT left(ltrim(q.destination, '+'), k)
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

-- Migration 012's gw_authorise_batch, kept as the one-by-one way, and a new one that
-- tries gw_authorise_together first: its rows when it wrote the batch, else (no row, or
-- any error: its subtransaction leaves nothing) each request decided alone, in order,
-- in a subtransaction of its own.
ALTER FUNCTION gw_authorise_batch(
    bigint[], text[], text[], text[], uuid[], text[], text[], text[], text[], text[],
    text[], text[], text[], text[], text[], text[], text[], text[], text[], integer[],
    timestamptz[], text[])
RENAME TO gw_authorise_one_by_one;

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
            -- (a statement timeout or a cancellation is not caught by OTHERS: it ends the
            -- whole statement, and nothing of the batch commits)
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
    RETURN QUERY SELECT * FROM gw_authorise_one_by_one(
        p_version, p_extension, p_endpoint_name, p_suffix, p_id, p_tenant, p_user,
        p_direction, p_caller, p_destination, p_class, p_decision, p_reason, p_route,
        p_pbx_uniqueid, p_linkedid, p_rate_kind, p_sources, p_pool_country, p_slice,
        p_now, p_pbx);
END
$$;

-- ---- settlements ----------------------------------------------------------------------

-- The settlements of gw_settle_batch (same arguments; the calls' rows already locked)
-- written together: one row, each call's outcome and billed seconds at its place (its
-- charge is 0: the pool pays). No row and nothing written unless they are n >= 2
-- distinct open calls of one pool and one month, each funded by that pool alone. Each
-- table's rows are gw_settle's, in request order: the ledger's charge and release of
-- each call (those not zero), its funding row's charged seconds, the call row; then the
-- pool row once, by the sums.
CREATE FUNCTION gw_settle_together(p_call uuid[], p_billable integer[],
                                   p_now timestamptz[], p_by text[])
RETURNS TABLE (outcome text[], billed integer[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(cardinality(p_call), 0);
    v_fits boolean;
    v_tenant text;
    v_country char(2);
    v_month date;
    -- per call, in order
    v_billed integer[];
    v_reserved integer[];
    v_seconds integer[];
    v_state text[];
BEGIN
    IF n < 2 OR (SELECT count(DISTINCT q.id) FROM unnest(p_call) AS q(id)) <> n THEN
        RETURN;
    END IF;
    SELECT count(c.id) = n
           AND bool_and(c.state IN ('authorised', 'answered') AND cardinality(c.sources) > 0
                        AND f.sources = ARRAY['pool'])
           AND count(DISTINCT (c.tenant_id, c.pool_country, c.month)) = 1,
           min(c.tenant_id), min(c.pool_country), min(c.month),
           array_agg(LEAST(gw_bill_round(GREATEST(q.billable, 0), c.first_increment,
                                         c.increment), c.funded_seconds)::integer
                     ORDER BY q.i),
           array_agg(f.reserved ORDER BY q.i),
           array_agg(CASE WHEN c.answered_at IS NULL AND q.billable <= 0 THEN 'released'
                          ELSE 'settled' END ORDER BY q.i)
    INTO v_fits, v_tenant, v_country, v_month, v_billed, v_reserved, v_state
    FROM unnest(p_call, p_billable) WITH ORDINALITY AS q(id, billable, i)
    LEFT JOIN calls c ON c.id = q.id
    LEFT JOIN LATERAL (SELECT array_agg(cf.source ORDER BY cf.position) AS sources,
                              sum(cf.reserved_seconds)::integer AS reserved
                       FROM call_funding cf WHERE cf.call_id = c.id) f ON true;
    IF v_fits IS NOT TRUE THEN
        RETURN;
    END IF;
    SELECT array_agg(LEAST(b, r) ORDER BY i) INTO v_seconds
    FROM unnest(v_billed, v_reserved) WITH ORDINALITY AS q(b, r, i);
    INSERT INTO ledger (at, tenant_id, entry, account, country, month, call_id,
                        d_used_seconds, d_reserved_seconds)
    SELECT p_now[q.i], v_tenant, e.entry, 'pool', v_country, v_month, q.id, e.u, e.r
    FROM unnest(p_call) WITH ORDINALITY AS q(id, i)
    CROSS JOIN LATERAL (VALUES (1, 'charge', v_seconds[q.i], -v_seconds[q.i]),
                               (2, 'release', 0, v_seconds[q.i] - v_reserved[q.i]))
               AS e(k, entry, u, r)
    WHERE e.u <> 0 OR e.r <> 0
    ORDER BY q.i, e.k;
    UPDATE call_funding cf SET charged_seconds = v_seconds[q.i], charged_amount = 0
    FROM unnest(p_call) WITH ORDINALITY AS q(id, i)
    WHERE cf.call_id = q.id AND cf.source = 'pool';
    UPDATE calls c SET state = v_state[q.i], ended_at = p_now[q.i],
                       billable_seconds = GREATEST(p_billable[q.i], 0),
                       billed_seconds = v_billed[q.i], charged_amount = 0,
                       settled_by = p_by[q.i]
    FROM unnest(p_call) WITH ORDINALITY AS q(id, i)
    WHERE c.id = q.id;
    IF (SELECT sum(r) FROM unnest(v_reserved) AS q(r)) > 0 THEN
        UPDATE pools p
        SET used_seconds = p.used_seconds + (SELECT sum(s) FROM unnest(v_seconds) AS q(s)),
            reserved_seconds = p.reserved_seconds
                               - (SELECT sum(r) FROM unnest(v_reserved) AS q(r))
        WHERE p.tenant_id = v_tenant AND p.country = v_country AND p.month = v_month;
    END IF;
    RETURN QUERY SELECT v_state, v_billed;
END
$$;

-- Migration 012's gw_settle_batch, kept as the one-by-one way, and a new one that
-- locks the calls' rows in the order of their ids (as that one does) and tries
-- gw_settle_together first: its rows when it wrote the batch, else each call settled
-- alone, in order, in a subtransaction of its own.
ALTER FUNCTION gw_settle_batch(uuid[], integer[], timestamptz[], text[])
RENAME TO gw_settle_one_by_one;

CREATE FUNCTION gw_settle_batch(p_call uuid[], p_billable integer[], p_now timestamptz[],
                                p_by text[])
RETURNS TABLE (ord integer, outcome text, billed integer, charged numeric,
               error_state text, error_message text, error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    v_outcome text[];
    v_billed integer[];
BEGIN
    IF coalesce(cardinality(p_call), 0) >= 2 THEN
        PERFORM 1 FROM calls c WHERE c.id = ANY (p_call) ORDER BY c.id FOR UPDATE;
        BEGIN
            SELECT * INTO v_outcome, v_billed
            FROM gw_settle_together(p_call, p_billable, p_now, p_by);
        EXCEPTION WHEN OTHERS THEN
            -- (a statement timeout or a cancellation is not caught here)
            v_outcome := NULL;
        END;
        IF v_outcome IS NOT NULL THEN
            RETURN QUERY
            SELECT i, v_outcome[i], v_billed[i], 0::numeric, NULL::text, NULL::text,
                   NULL::text
            FROM generate_series(1, cardinality(p_call)) i;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM gw_settle_one_by_one(p_call, p_billable, p_now, p_by);
END
$$;
