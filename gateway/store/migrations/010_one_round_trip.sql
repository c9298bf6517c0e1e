-- Per-call cost (issue 10): one round trip per authorisation for a caller the gateway
-- has seen, and cheaper arithmetic helpers. Measured with bench/rater_bench.py
-- (docs/benchmarks.md, "The rater's cost per cycle").
--
-- 1. A tenant's calling context has a version. The rules decide a call from its caller's
--    row, licences and tenant, and from whether the dialled string is one of the
--    tenant's own users or numbers. A gateway keeps the caller's part it last read with
--    the tenant's version; gw_authorise_known records a decision made from that copy
--    only while the version is still the tenant's and nothing internal matches the
--    dialled string, else it writes nothing and says so (the gateway then reads the
--    context again and decides afresh). Every change of what the rules read bumps the
--    version, whoever makes it: the triggers below, not the application.
-- 2. gw_authorise writes a pool-funded call's own rows first and the pool row last, so
--    that the lock every call of the tenant needs is held for the least time.
-- 3. gw_bill_round and gw_cost become PL/pgSQL: as SQL functions called from PL/pgSQL
--    they were not inlined and cost an executor start-up at every call.

-- ---- the context version ---------------------------------------------------------------

-- Versions come from one sequence, so that a version never repeats: not for a tenant
-- deleted and created again under the same id either.
CREATE SEQUENCE gw_context_versions;
ALTER TABLE tenants ADD COLUMN context_version bigint NOT NULL
    DEFAULT nextval('gw_context_versions');

-- any update of a tenant (its blocked classes, country, ...) is a new context
CREATE FUNCTION gw_tenant_context_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.context_version := nextval('gw_context_versions');
    RETURN NEW;
END
$$;

CREATE TRIGGER tenants_context_version BEFORE UPDATE ON tenants
FOR EACH ROW EXECUTE FUNCTION gw_tenant_context_bump();

-- a change of a row the rules read (users, licence_assignments, phone_numbers) is a new
-- context for the tenant it belonged to and the one it belongs to (the update of the
-- tenant row gets its version from the trigger above)
CREATE FUNCTION gw_context_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE tenants SET context_version = 0 WHERE id = OLD.tenant_id;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.tenant_id IS DISTINCT FROM OLD.tenant_id)
    THEN
        UPDATE tenants SET context_version = 0 WHERE id = NEW.tenant_id;
    END IF;
    RETURN NULL;
END
$$;

-- emptying one of those tables by hand is a new context for every tenant
CREATE FUNCTION gw_context_emptied() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tenants SET context_version = 0;
    RETURN NULL;
END
$$;

-- Deferred to the commit: the tenant row is locked only while its transaction commits,
-- so that provisioning writes of one tenant do not queue behind each other's whole
-- transactions (nor deadlock with a lock taken later in one of them).
CREATE CONSTRAINT TRIGGER users_context_version AFTER INSERT OR UPDATE OR DELETE ON users
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
CREATE CONSTRAINT TRIGGER licence_assignments_context_version
AFTER INSERT OR UPDATE OR DELETE ON licence_assignments
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
CREATE CONSTRAINT TRIGGER phone_numbers_context_version
AFTER INSERT OR UPDATE OR DELETE ON phone_numbers
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
CREATE TRIGGER users_context_emptied AFTER TRUNCATE ON users
FOR EACH STATEMENT EXECUTE FUNCTION gw_context_emptied();
CREATE TRIGGER licence_assignments_context_emptied AFTER TRUNCATE ON licence_assignments
FOR EACH STATEMENT EXECUTE FUNCTION gw_context_emptied();
CREATE TRIGGER phone_numbers_context_emptied AFTER TRUNCATE ON phone_numbers
FOR EACH STATEMENT EXECUTE FUNCTION gw_context_emptied();

-- ---- authorising from a known context ------------------------------------------------------

-- gw_authorise (migration 008), for an outbound decision the gateway made from the
-- caller's context at version p_version, assuming the dialled string is not internal:
-- p_extension is the dialled string as normalised (compared with extensions),
-- p_endpoint_name as typed (compared with endpoint names), p_suffix its last seven
-- digits or NULL (compared with the tenant's numbers, as the caller lookup does). When
-- the tenant's version moved on, or the dialled string may be internal, nothing is
-- written and one row with a NULL decision comes back.
CREATE FUNCTION gw_authorise_known(
    p_version bigint, p_extension text, p_endpoint_name text, p_suffix text,
    p_id uuid, p_tenant text, p_user text, p_direction text, p_caller text,
    p_destination text, p_class text, p_decision text, p_reason text, p_route text,
    p_pbx_uniqueid text, p_linkedid text, p_rate_kind text, p_sources text[],
    p_pool_country char(2), p_slice integer, p_now timestamptz, p_pbx text)
RETURNS TABLE (decision text, reason text, funded integer, price numeric,
               first_increment integer, increment integer, rate_prefix text)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tenants t
                   WHERE t.id = p_tenant AND t.context_version = p_version)
       OR EXISTS (SELECT 1 FROM users u
                  WHERE u.tenant_id = p_tenant AND u.deactivated_at IS NULL
                    AND (u.extension = p_extension OR u.sip_endpoint = p_endpoint_name))
       OR (p_suffix IS NOT NULL
           AND EXISTS (SELECT 1 FROM phone_numbers pn
                       WHERE pn.tenant_id = p_tenant
                         AND reverse(pn.e164) LIKE reverse(p_suffix) || '%')) THEN
        RETURN QUERY SELECT NULL::text, NULL::text, 0, NULL::numeric, 60, 60, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM gw_authorise(
        p_id, p_tenant, p_user, p_direction, p_caller, p_destination, p_class, p_decision,
        p_reason, p_route, p_pbx_uniqueid, p_linkedid, p_rate_kind, p_sources,
        p_pool_country, p_slice, p_now, p_pbx);
END
$$;

-- ---- gw_authorise: the pool row last --------------------------------------------------

-- As in migration 008, with a first path for a call paid from the pool first.
CREATE OR REPLACE FUNCTION gw_authorise(
    p_id uuid, p_tenant text, p_user text, p_direction text, p_caller text,
    p_destination text, p_class text, p_decision text, p_reason text, p_route text,
    p_pbx_uniqueid text, p_linkedid text, p_rate_kind text, p_sources text[],
    p_pool_country char(2), p_slice integer, p_now timestamptz,
    p_pbx text DEFAULT 'default')
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
    v_first integer;
    v_increment integer;
    v_capacity bigint;
    v_free bigint;
    v_ledger bigint;
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
    v_first := coalesce(v_rate.first_increment, 60);
    v_increment := coalesce(v_rate.increment, 60);
    -- A call paid from the pool first, whose pool has the slice free (nearly always):
    -- the call's own rows are written first and the pool row last, so that its lock,
    -- which every call of the tenant needs, is held only from that update to the commit.
    -- The update re-checks what is free under the lock; if the pool ran short meanwhile,
    -- this transaction's own rows are taken back and the slice reserved as below.
    IF v_decision = 'ALLOW' AND v_sources[1] = 'pool' THEN
        v_slice := gw_bill_round(p_slice, v_first, v_increment);
        v_capacity := gw_pool_capacity(p_tenant, p_pool_country);
        SELECT v_capacity - p.used_seconds - p.reserved_seconds INTO v_free FROM pools p
        WHERE p.tenant_id = p_tenant AND p.country = p_pool_country AND p.month = v_month;
        IF v_free >= v_slice THEN
            INSERT INTO calls (id, tenant_id, user_id, direction, caller, destination,
                               number_class, decision, reason, route, pbx, pbx_uniqueid,
                               linkedid, rate_kind, rate_prefix, price_per_minute,
                               first_increment, increment, sources, month, pool_country,
                               funded_seconds, state, authorised_at)
            VALUES (p_id, p_tenant, p_user, p_direction, p_caller, p_destination, p_class,
                    v_decision, v_reason, p_route, coalesce(p_pbx, 'default'),
                    p_pbx_uniqueid, p_linkedid, p_rate_kind, v_rate.prefix,
                    v_rate.price_per_minute, v_first, v_increment, v_sources, v_month,
                    p_pool_country, v_slice, 'authorised', p_now);
            INSERT INTO call_funding (call_id, source, position, reserved_seconds)
            VALUES (p_id, 'pool', 1, v_slice);
            INSERT INTO ledger (at, tenant_id, entry, account, country, month, call_id,
                                d_reserved_seconds)
            VALUES (p_now, p_tenant, 'reserve', 'pool', p_pool_country, v_month, p_id,
                    v_slice)
            RETURNING id INTO v_ledger;
            UPDATE pools p SET reserved_seconds = p.reserved_seconds + v_slice
            WHERE p.tenant_id = p_tenant AND p.country = p_pool_country AND p.month = v_month
              AND v_capacity - p.used_seconds - p.reserved_seconds >= v_slice;
            IF FOUND THEN
                RETURN QUERY SELECT v_decision, v_reason, v_slice, v_rate.price_per_minute,
                                    v_first, v_increment, v_rate.prefix;
                RETURN;
            END IF;
            DELETE FROM ledger WHERE id = v_ledger;
            DELETE FROM call_funding WHERE call_id = p_id;
            DELETE FROM calls WHERE id = p_id;
        END IF;
        v_slice := 0;
    END IF;
    INSERT INTO calls (id, tenant_id, user_id, direction, caller, destination, number_class,
                       decision, reason, route, pbx, pbx_uniqueid, linkedid, rate_kind,
                       rate_prefix, price_per_minute, first_increment, increment, sources,
                       month, pool_country, state, authorised_at)
    VALUES (p_id, p_tenant, p_user, p_direction, p_caller, p_destination, p_class,
            v_decision, v_reason, CASE WHEN v_decision = 'ALLOW' THEN p_route END,
            coalesce(p_pbx, 'default'), p_pbx_uniqueid, p_linkedid, p_rate_kind,
            v_rate.prefix, v_rate.price_per_minute,
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

-- ---- arithmetic helpers, same results ---------------------------------------------------

CREATE OR REPLACE FUNCTION gw_bill_round(p_seconds bigint, p_first integer, p_increment integer)
RETURNS bigint LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN CASE
        WHEN p_seconds <= 0 THEN 0
        WHEN p_seconds <= p_first THEN p_first
        ELSE p_first + ((p_seconds - p_first + p_increment - 1) / p_increment) * p_increment
    END;
END
$$;

CREATE OR REPLACE FUNCTION gw_cost(p_price numeric, p_seconds bigint)
RETURNS numeric LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN (ceil(p_price * p_seconds * 1000000 / 60) / 1000000)::numeric(20, 6);
END
$$;
