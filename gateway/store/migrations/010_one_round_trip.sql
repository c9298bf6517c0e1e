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
-- 2. gw_bill_round and gw_cost become PL/pgSQL: as SQL functions called from PL/pgSQL
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

CREATE TRIGGER users_context_version AFTER INSERT OR UPDATE OR DELETE ON users
FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
CREATE TRIGGER licence_assignments_context_version
AFTER INSERT OR UPDATE OR DELETE ON licence_assignments
FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
CREATE TRIGGER phone_numbers_context_version AFTER INSERT OR UPDATE OR DELETE ON phone_numbers
FOR EACH ROW EXECUTE FUNCTION gw_context_changed();
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
