-- Two fixes of issue 8 (docs/billing.md, "Auto-recharge" and "When the database does
-- not answer"):
--
-- 1. Auto-recharge when the available balance falls below the threshold, whatever
--    lowered it: a wallet reservation (at authorise or renew) now checks, not only a
--    reservation that finds the wallet short or a charge at settlement. "Once per
--    crossing" needs a memory: wallets.recharged_below says a recharge was made since
--    the available balance last fell below the threshold; a trigger clears it whenever
--    the available balance is back at or above the threshold, whoever moved it.
-- 2. gw_void: the compensating step for an authorisation whose answer the gateway never
--    got (client timeout, lost connection). The PBX was told GATEWAY_ERROR, so the
--    database must end up saying the same: a committed authorisation is released, and
--    one still in flight is kept from ever taking effect by a tombstone row under the
--    same primary key (the two inserts serialise on calls.id).

ALTER TABLE wallets ADD COLUMN recharged_below boolean NOT NULL DEFAULT false;

CREATE FUNCTION gw_wallet_rearm() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.balance - NEW.reserved >= NEW.auto_recharge_threshold THEN
        NEW.recharged_below := false;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER wallets_rearm BEFORE UPDATE ON wallets
FOR EACH ROW EXECUTE FUNCTION gw_wallet_rearm();

-- Adds the auto-recharge amount once when the wallet's available balance (balance -
-- reserved) is below its threshold, no recharge was made since it fell below (unless
-- p_needed: a reservation finds the wallet too short and the money is needed now), and
-- the month's cap allows. The caller holds the wallet row lock. True when recharged.
CREATE FUNCTION gw_auto_recharge(p_tenant text, p_now timestamptz, p_call uuid,
                                 p_needed boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    w wallets%ROWTYPE;
    v_month date := gw_month(p_tenant, p_now);
BEGIN
    SELECT * INTO w FROM wallets WHERE tenant_id = p_tenant;
    IF NOT w.auto_recharge_enabled OR w.auto_recharge_amount <= 0
       OR w.balance - w.reserved >= w.auto_recharge_threshold
       OR (w.recharged_below AND NOT p_needed) THEN
        RETURN false;
    END IF;
    IF (SELECT count(*) FROM ledger
        WHERE tenant_id = p_tenant AND entry = 'recharge' AND month = v_month)
       >= w.auto_recharge_monthly_cap THEN
        RETURN false;
    END IF;
    UPDATE wallets SET balance = balance + w.auto_recharge_amount, recharged_below = true
    WHERE tenant_id = p_tenant;
    INSERT INTO ledger (at, tenant_id, entry, account, month, call_id, d_balance, note)
    VALUES (p_now, p_tenant, 'recharge', 'wallet', v_month, p_call, w.auto_recharge_amount,
            'auto-recharge below ' || w.auto_recharge_threshold);
    RETURN true;
END
$$;

-- The check after something lowered the available balance (gw_settle calls it after a
-- charge): once per crossing.
CREATE OR REPLACE FUNCTION gw_auto_recharge(p_tenant text, p_now timestamptz, p_call uuid)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RETURN gw_auto_recharge(p_tenant, p_now, p_call, false);
END
$$;

CREATE OR REPLACE FUNCTION gw_reserve(p_call uuid, p_slice integer, p_now timestamptz)
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
            -- (the money is needed now: this try does not wait for a crossing)
            IF gw_cost(c.price_per_minute, v_have_seconds + v_left) - v_have_amount
               > v_balance - v_wallet_reserved THEN
                v_recharged := gw_auto_recharge(c.tenant_id, p_now, c.id, true);
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
                -- billing rules §5: this reservation lowered the available balance; if
                -- it fell below the threshold, recharge now (once per crossing, and
                -- at most once per reservation)
                IF NOT v_recharged THEN
                    PERFORM gw_auto_recharge(c.tenant_id, p_now, c.id);
                END IF;
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

-- Voids an authorisation whose answer never reached the gateway: the PBX was told
-- GATEWAY_ERROR. Safe to run any number of times, before, during or after the
-- authorisation's own transaction:
--   * the authorisation never ran, or has not committed yet: a rejected GATEWAY_ERROR
--     row takes its id (a tombstone); an authorisation still in flight then fails on
--     the primary key and leaves nothing (INSERT ... ON CONFLICT waits for it first);
--   * it committed: the call is released (nothing was talked; the PBX never dialled)
--     and its decision becomes what the PBX was told.
-- Returns 'voided' (tombstone written), 'released', or the state the call already had.
CREATE FUNCTION gw_void(p_call uuid, p_tenant text, p_direction text, p_caller text,
                        p_destination text, p_class text, p_pbx_uniqueid text,
                        p_linkedid text, p_now timestamptz)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
BEGIN
    INSERT INTO calls (id, tenant_id, direction, caller, destination, number_class,
                       decision, reason, pbx_uniqueid, linkedid, month, state, authorised_at,
                       settled_by)
    VALUES (p_call, p_tenant, p_direction, p_caller, p_destination, p_class,
            'REJECT', 'GATEWAY_ERROR', p_pbx_uniqueid, p_linkedid, gw_month(p_tenant, p_now),
            'rejected', p_now, 'void')
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN 'voided';
    END IF;
    SELECT * INTO c FROM calls WHERE id = p_call FOR UPDATE;
    IF NOT FOUND THEN
        -- the conflict was the channel's uniqueid, held by another call: nothing of ours
        RETURN 'voided';
    END IF;
    IF c.state IN ('authorised', 'answered') THEN
        PERFORM gw_settle(p_call, 0, p_now, 'void');
        UPDATE calls SET decision = 'REJECT', reason = 'GATEWAY_ERROR', route = NULL
        WHERE id = p_call;
        RETURN 'released';
    END IF;
    IF c.decision = 'ALLOW' THEN
        -- settled already (cannot happen for a call the PBX never dialled; kept as is)
        RETURN c.state;
    END IF;
    UPDATE calls SET reason = 'GATEWAY_ERROR' WHERE id = p_call AND reason <> 'GATEWAY_ERROR';
    RETURN c.state;
END
$$;
