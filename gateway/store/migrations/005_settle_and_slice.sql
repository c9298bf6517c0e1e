-- One word per concept (docs/architecture.md, glossary): the step that ends a call is
-- "settle" everywhere, so gw_finish becomes gw_settle, and the time reserved at once is
-- a "slice", so p_want / granted become p_slice / slice_seconds. PostgreSQL cannot
-- rename a parameter or an output column in place, so each function is dropped and
-- created again with the same body; gw_finish is gone, not kept as an alias.
-- This file is applied in one transaction: other sessions see the old functions or
-- the new ones, never neither. A gateway still running the old code calls gw_finish
-- and fails: stop old gateways before migrating.

DROP FUNCTION gw_finish(uuid, integer, timestamptz, text);
DROP FUNCTION gw_renew(uuid, integer, timestamptz);
DROP FUNCTION gw_authorise(uuid, text, text, text, text, text, text, text, text, text, text,
                           text, text, text[], char(2), integer, timestamptz);
DROP FUNCTION gw_reserve(uuid, integer, timestamptz);

-- Reserves one slice of p_slice more seconds for an open call from its sources in
-- order; v_take is what one source gives. The caller holds the calls row lock.
-- Returns the seconds reserved, which may be more than p_slice (up to the next billing
-- boundary) or less (the sources ran dry).
CREATE FUNCTION gw_reserve(p_call uuid, p_slice integer, p_now timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
    v_source text;
    v_slice integer;
    v_left integer;
    v_take integer;
    v_position integer := 0;
    v_used bigint;
    v_reserved bigint;
    v_capacity bigint;
    v_balance numeric;
    v_wallet_reserved numeric;
    v_have_seconds integer;
    v_have_amount numeric;
    v_amount numeric;
    v_recharged boolean := false;
BEGIN
    SELECT * INTO c FROM calls WHERE id = p_call;
    -- extend the funded end to the next billing boundary, so that short slices
    -- never fund less than the rounding rule bills
    v_slice := gw_bill_round(c.funded_seconds + p_slice, c.first_increment, c.increment)
              - c.funded_seconds;
    v_left := v_slice;
    FOREACH v_source IN ARRAY c.sources LOOP
        v_position := v_position + 1;
        EXIT WHEN v_left <= 0;
        v_take := 0;
        v_amount := 0;
        IF v_source = 'pool' THEN
            v_capacity := gw_pool_capacity(c.tenant_id, c.pool_country);
            SELECT used_seconds, reserved_seconds INTO v_used, v_reserved FROM pools
            WHERE tenant_id = c.tenant_id AND country = c.pool_country AND month = c.month
            FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO pools (tenant_id, country, month)
                VALUES (c.tenant_id, c.pool_country, c.month) ON CONFLICT DO NOTHING;
                SELECT used_seconds, reserved_seconds INTO v_used, v_reserved FROM pools
                WHERE tenant_id = c.tenant_id AND country = c.pool_country AND month = c.month
                FOR UPDATE;
            END IF;
            v_take := LEAST(v_left, GREATEST(v_capacity - v_used - v_reserved, 0));
            IF v_take > 0 THEN
                UPDATE pools SET reserved_seconds = reserved_seconds + v_take
                WHERE tenant_id = c.tenant_id AND country = c.pool_country AND month = c.month;
                INSERT INTO ledger (at, tenant_id, entry, account, country, month, call_id,
                                    d_reserved_seconds)
                VALUES (p_now, c.tenant_id, 'reserve', 'pool', c.pool_country, c.month, c.id,
                        v_take);
            END IF;
        ELSIF v_source = 'addon' THEN
            SELECT used_seconds, reserved_seconds INTO v_used, v_reserved FROM addon_usage
            WHERE user_id = c.user_id AND month = c.month FOR UPDATE;
            IF NOT FOUND THEN
                INSERT INTO addon_usage (user_id, month, tenant_id)
                VALUES (c.user_id, c.month, c.tenant_id) ON CONFLICT DO NOTHING;
                SELECT used_seconds, reserved_seconds INTO v_used, v_reserved FROM addon_usage
                WHERE user_id = c.user_id AND month = c.month FOR UPDATE;
            END IF;
            v_capacity := gw_addon_capacity(c.user_id);
            v_take := LEAST(v_left, GREATEST(v_capacity - v_used - v_reserved, 0));
            IF v_take > 0 THEN
                UPDATE addon_usage SET reserved_seconds = reserved_seconds + v_take
                WHERE user_id = c.user_id AND month = c.month;
                INSERT INTO ledger (at, tenant_id, entry, account, month, user_id, call_id,
                                    d_reserved_seconds)
                VALUES (p_now, c.tenant_id, 'reserve', 'addon', c.month, c.user_id, c.id,
                        v_take);
            END IF;
        ELSIF v_source = 'wallet' THEN
            SELECT balance, reserved INTO v_balance, v_wallet_reserved FROM wallets
            WHERE tenant_id = c.tenant_id FOR UPDATE;
            SELECT coalesce(max(reserved_seconds), 0), coalesce(max(reserved_amount), 0)
            INTO v_have_seconds, v_have_amount
            FROM call_funding WHERE call_id = c.id AND source = 'wallet';
            -- an empty or short wallet may be refilled by auto-recharge before we give up
            IF gw_cost(c.price_per_minute, v_have_seconds + v_left) - v_have_amount
               > v_balance - v_wallet_reserved THEN
                v_recharged := gw_auto_recharge(c.tenant_id, p_now, c.id);
                IF v_recharged THEN
                    SELECT balance, reserved INTO v_balance, v_wallet_reserved FROM wallets
                    WHERE tenant_id = c.tenant_id;
                END IF;
            END IF;
            IF c.price_per_minute = 0 THEN
                v_take := v_left;
            ELSE
                -- the most seconds the available money pays for, in whole increments
                v_take := LEAST(v_left::bigint,
                    floor((v_balance - v_wallet_reserved + v_have_amount) * 60
                          / c.price_per_minute)::bigint - v_have_seconds)::integer;
                IF v_take < v_left THEN
                    v_take := v_take - v_take % c.increment;
                END IF;
                WHILE v_take > 0 AND gw_cost(c.price_per_minute, v_have_seconds + v_take)
                        - v_have_amount > v_balance - v_wallet_reserved LOOP
                    v_take := v_take - c.increment;
                END LOOP;
                v_take := GREATEST(v_take, 0);
            END IF;
            IF v_take > 0 THEN
                v_amount := gw_cost(c.price_per_minute, v_have_seconds + v_take) - v_have_amount;
                UPDATE wallets SET reserved = reserved + v_amount WHERE tenant_id = c.tenant_id;
                INSERT INTO ledger (at, tenant_id, entry, account, month, call_id,
                                    d_reserved_seconds, d_reserved)
                VALUES (p_now, c.tenant_id, 'reserve', 'wallet', c.month, c.id, v_take,
                        v_amount);
            END IF;
        END IF;
        IF v_take > 0 THEN
            INSERT INTO call_funding (call_id, source, position, reserved_seconds, reserved_amount)
            VALUES (c.id, v_source, v_position, v_take, v_amount)
            ON CONFLICT (call_id, source) DO UPDATE
            SET reserved_seconds = call_funding.reserved_seconds + EXCLUDED.reserved_seconds,
                reserved_amount = call_funding.reserved_amount + EXCLUDED.reserved_amount;
            v_left := v_left - v_take;
        END IF;
    END LOOP;
    IF v_slice - v_left > 0 THEN
        UPDATE calls SET funded_seconds = funded_seconds + (v_slice - v_left) WHERE id = c.id;
    END IF;
    RETURN v_slice - v_left;
END
$$;

-- Records one decision and, for an allowed rated call, looks up its rate and reserves
-- its first slice. Returns the final decision: a rated call that finds no rate becomes
-- NO_RATE, one that can reserve nothing becomes NO_BALANCE.
CREATE FUNCTION gw_authorise(
    p_id uuid, p_tenant text, p_user text, p_direction text, p_caller text,
    p_destination text, p_class text, p_decision text, p_reason text, p_route text,
    p_pbx_uniqueid text, p_linkedid text, p_rate_kind text, p_sources text[],
    p_pool_country char(2), p_slice integer, p_now timestamptz)
RETURNS TABLE (decision text, reason text, funded integer, price numeric,
               first_increment integer, increment integer, rate_prefix text)
LANGUAGE plpgsql AS $$
DECLARE
    v_currency text;
    v_month date;
    v_digits text := ltrim(p_destination, '+');
    v_rate rates%ROWTYPE;
    v_sources text[] := p_sources;
    v_decision text := p_decision;
    v_reason text := p_reason;
    v_slice integer := 0;
BEGIN
    SELECT t.currency, date_trunc('month', p_now AT TIME ZONE t.timezone)::date
    INTO v_currency, v_month FROM tenants t WHERE t.id = p_tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown tenant %', p_tenant USING ERRCODE = 'GW404';
    END IF;
    IF v_decision = 'ALLOW' AND p_rate_kind IS NOT NULL THEN
        SELECT r.* INTO v_rate FROM rates r
        WHERE r.kind = p_rate_kind AND r.currency = v_currency
          AND (r.tenant_id = p_tenant OR r.tenant_id IS NULL)
          AND r.prefix = ANY (ARRAY(SELECT left(v_digits, n)
                                    FROM generate_series(0, length(v_digits)) n))
        ORDER BY length(r.prefix) DESC, r.tenant_id IS NULL
        LIMIT 1;
        IF NOT FOUND AND p_rate_kind = 'domestic_overage' THEN
            -- the pool still pays domestic minutes; only overage needs a price
            v_sources := array_remove(v_sources, 'wallet');
        ELSIF NOT FOUND THEN
            -- rules §6 row 10: a destination without a rate is not callable, add-on or not
            v_decision := 'REJECT';
            v_reason := 'NO_RATE';
        END IF;
    END IF;
    INSERT INTO calls (id, tenant_id, user_id, direction, caller, destination, number_class,
                       decision, reason, route, pbx_uniqueid, linkedid, rate_kind, rate_prefix,
                       price_per_minute, first_increment, increment, sources, month,
                       pool_country, state, authorised_at)
    VALUES (p_id, p_tenant, p_user, p_direction, p_caller, p_destination, p_class,
            v_decision, v_reason, CASE WHEN v_decision = 'ALLOW' THEN p_route END,
            p_pbx_uniqueid, p_linkedid, p_rate_kind, v_rate.prefix, v_rate.price_per_minute,
            coalesce(v_rate.first_increment, 60), coalesce(v_rate.increment, 60),
            CASE WHEN v_decision = 'ALLOW' THEN v_sources ELSE '{}' END,
            v_month, p_pool_country,
            CASE WHEN v_decision = 'ALLOW' THEN 'authorised' ELSE 'rejected' END, p_now);
    IF v_decision = 'ALLOW' AND cardinality(v_sources) > 0 THEN
        v_slice := gw_reserve(p_id, p_slice, p_now);
        IF v_slice = 0 THEN
            v_decision := 'REJECT';
            v_reason := 'NO_BALANCE';
            UPDATE calls SET decision = v_decision, reason = v_reason, route = NULL,
                             state = 'rejected'
            WHERE id = p_id;
        END IF;
    END IF;
    RETURN QUERY SELECT v_decision, v_reason, v_slice, v_rate.price_per_minute,
                        coalesce(v_rate.first_increment, 60), coalesce(v_rate.increment, 60),
                        v_rate.prefix;
END
$$;

-- Reserves the next slice of an open call. Returns the seconds reserved now (the
-- slice, or less when its sources ran dry) and the call's funded total; a call that
-- is no longer open gets nothing.
CREATE FUNCTION gw_renew(p_call uuid, p_slice integer, p_now timestamptz)
RETURNS TABLE (slice_seconds integer, funded integer, state text)
LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
    v_slice integer := 0;
BEGIN
    SELECT * INTO c FROM calls WHERE id = p_call FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown call %', p_call USING ERRCODE = 'GW404';
    END IF;
    IF c.state IN ('authorised', 'answered') AND cardinality(c.sources) > 0 THEN
        v_slice := gw_reserve(p_call, p_slice, p_now);
    END IF;
    RETURN QUERY SELECT v_slice, c.funded_seconds + v_slice, c.state;
END
$$;

-- Settles a call exactly once. Bills the answered seconds rounded up to the rate's
-- increments (never past what was funded), charges the reservations in source order,
-- releases the rest and lets auto-recharge react. A call never answered, with nothing
-- to bill, ends 'released' instead of 'settled'. A second call changes nothing and
-- returns outcome 'already_settled' / 'already_released'.
-- The shared counters (pool, add-on, wallet) are updated last, so their row locks are
-- held for as short a time as possible before the commit.
CREATE FUNCTION gw_settle(p_call uuid, p_billable integer, p_now timestamptz, p_by text)
RETURNS TABLE (outcome text, billed integer, charged numeric)
LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
    f call_funding%ROWTYPE;
    v_billed integer;
    v_left integer;
    v_seconds integer;
    v_amount numeric;
    v_charged numeric := 0;
    v_state text;
    -- what to apply to each counter once the call's own rows are written
    v_pool_used integer := 0;
    v_pool_reserved integer := 0;
    v_addon_used integer := 0;
    v_addon_reserved integer := 0;
    v_wallet_charge numeric := 0;
    v_wallet_reserved numeric := 0;
    v_has_wallet boolean := false;
BEGIN
    SELECT * INTO c FROM calls WHERE id = p_call FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown call %', p_call USING ERRCODE = 'GW404';
    END IF;
    IF c.state IN ('settled', 'released') THEN
        RETURN QUERY SELECT 'already_' || c.state, c.billed_seconds, c.charged_amount;
        RETURN;
    END IF;
    IF c.state = 'rejected' THEN
        RETURN QUERY SELECT 'rejected'::text, 0, 0::numeric;
        RETURN;
    END IF;
    v_billed := gw_bill_round(GREATEST(p_billable, 0), c.first_increment, c.increment);
    IF cardinality(c.sources) > 0 THEN
        v_billed := LEAST(v_billed, c.funded_seconds);
    END IF;
    v_left := v_billed;
    FOR f IN SELECT * FROM call_funding WHERE call_id = p_call ORDER BY position LOOP
        v_seconds := LEAST(v_left, f.reserved_seconds);
        v_left := v_left - v_seconds;
        v_amount := 0;
        IF f.source = 'pool' THEN
            v_pool_used := v_seconds;
            v_pool_reserved := f.reserved_seconds;
            INSERT INTO ledger (at, tenant_id, entry, account, country, month, call_id,
                                d_used_seconds, d_reserved_seconds)
            SELECT p_now, c.tenant_id, e.entry, 'pool', c.pool_country, c.month, c.id, e.u, e.r
            FROM (VALUES ('charge', v_seconds, -v_seconds),
                         ('release', 0, v_seconds - f.reserved_seconds)) e(entry, u, r)
            WHERE e.u <> 0 OR e.r <> 0;
        ELSIF f.source = 'addon' THEN
            v_addon_used := v_seconds;
            v_addon_reserved := f.reserved_seconds;
            INSERT INTO ledger (at, tenant_id, entry, account, month, user_id, call_id,
                                d_used_seconds, d_reserved_seconds)
            SELECT p_now, c.tenant_id, e.entry, 'addon', c.month, c.user_id, c.id, e.u, e.r
            FROM (VALUES ('charge', v_seconds, -v_seconds),
                         ('release', 0, v_seconds - f.reserved_seconds)) e(entry, u, r)
            WHERE e.u <> 0 OR e.r <> 0;
        ELSE
            v_amount := gw_cost(c.price_per_minute, v_seconds);
            v_has_wallet := true;
            v_wallet_charge := v_amount;
            v_wallet_reserved := f.reserved_amount;
            INSERT INTO ledger (at, tenant_id, entry, account, month, call_id,
                                d_used_seconds, d_reserved_seconds, d_balance, d_reserved)
            SELECT p_now, c.tenant_id, e.entry, 'wallet', c.month, c.id, e.u, e.r, e.b, e.m
            FROM (VALUES ('charge', v_seconds, -v_seconds, -v_amount, -v_amount),
                         ('release', 0, v_seconds - f.reserved_seconds, 0::numeric,
                          v_amount - f.reserved_amount)) e(entry, u, r, b, m)
            WHERE e.u <> 0 OR e.r <> 0 OR e.b <> 0 OR e.m <> 0;
        END IF;
        UPDATE call_funding SET charged_seconds = v_seconds, charged_amount = v_amount
        WHERE call_id = p_call AND source = f.source;
        v_charged := v_charged + v_amount;
    END LOOP;
    v_state := CASE WHEN c.answered_at IS NULL AND p_billable <= 0 THEN 'released'
                    ELSE 'settled' END;
    UPDATE calls SET state = v_state, ended_at = p_now, billable_seconds = GREATEST(p_billable, 0),
                     billed_seconds = v_billed, charged_amount = v_charged, settled_by = p_by
    WHERE id = p_call;
    -- the shared counters, in the global lock order
    IF v_pool_reserved > 0 THEN
        UPDATE pools SET used_seconds = used_seconds + v_pool_used,
                         reserved_seconds = reserved_seconds - v_pool_reserved
        WHERE tenant_id = c.tenant_id AND country = c.pool_country AND month = c.month;
    END IF;
    IF v_addon_reserved > 0 THEN
        UPDATE addon_usage SET used_seconds = used_seconds + v_addon_used,
                               reserved_seconds = reserved_seconds - v_addon_reserved
        WHERE user_id = c.user_id AND month = c.month;
    END IF;
    IF v_has_wallet THEN
        UPDATE wallets SET balance = balance - v_wallet_charge,
                           reserved = reserved - v_wallet_reserved
        WHERE tenant_id = c.tenant_id;
        IF v_wallet_charge > 0 THEN
            PERFORM gw_auto_recharge(c.tenant_id, p_now, c.id);
        END IF;
    END IF;
    RETURN QUERY SELECT v_state, v_billed, v_charged;
END
$$;
