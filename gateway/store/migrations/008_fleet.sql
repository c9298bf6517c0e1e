-- A fleet of PBXs on one database (issue 9). Each PBX has a name; a call's channel
-- uniqueid is unique only on its own PBX (two Asterisks may well produce the same
-- "1700000000.1"), so calls and CDRs say which PBX they come from. One gateway process
-- at a time owns a PBX, by a lease in pbx_leases; a process settles a PBX's calls on
-- reconciliation only while it holds that PBX's lease (the repository's fenced settle).
-- Applied in one transaction, like every migration.
--
-- This migration rewrites the keys of calls and cdr: it holds both tables exclusively
-- until it commits (a few seconds on a million rows each; see docs/fleet.md,
-- "Migrating"), so it is applied with every gateway process stopped. A lock it cannot
-- have within lock_timeout (a process still running, a long report reading calls) makes
-- it fail at once, with nothing changed, instead of queueing: a queued exclusive lock
-- would stop every other query on calls and cdr behind it (cdr_pgsql's inserts too) for
-- as long as it waited.

SET LOCAL lock_timeout = '3s';
-- Both tables at once, before any change: a lock that is not to be had fails the
-- migration before it has done any work, and cdr_pgsql never waits behind a half-done
-- calls rewrite.
LOCK TABLE calls, cdr IN ACCESS EXCLUSIVE MODE;

-- ---- calls: the PBX a call's channel lives on ------------------------------------------

-- Every call recorded before the fleet came from the single PBX, now named 'default'.
-- ADD COLUMN with a constant default changes only the catalogue (no row is rewritten);
-- its CHECK reads the table once. (Adding the CHECK NOT VALID and validating it after
-- would read it all the same, and gain nothing here: within this one transaction the
-- exclusive lock taken above is held to the end anyway.)
ALTER TABLE calls ADD COLUMN pbx text NOT NULL DEFAULT 'default'
    CONSTRAINT calls_pbx_name CHECK (pbx ~ '^[A-Za-z0-9_.-]{1,64}$');
ALTER TABLE calls DROP CONSTRAINT calls_pbx_uniqueid_key;
ALTER TABLE calls ADD CONSTRAINT calls_pbx_channel_key UNIQUE (pbx, pbx_uniqueid);
-- reconciliation reads one PBX's open calls
DROP INDEX calls_open;
CREATE INDEX calls_open ON calls (pbx, state) WHERE state IN ('authorised', 'answered');

-- ---- cdr: the PBX that wrote a record ---------------------------------------------------

-- Filled by cdr_pgsql from the CDR variable "pbx" (the dialplan sets CDR(pbx) from
-- GW_PBX). NULL: written by a PBX whose dialplan has no GW_PBX, which counts as 'default'.
ALTER TABLE cdr ADD COLUMN pbx text;
DROP INDEX cdr_uniqueid;
CREATE INDEX cdr_pbx_uniqueid ON cdr ((coalesce(pbx, 'default')), uniqueid);

-- ---- leases: which gateway process owns which PBX ---------------------------------------

-- One row per PBX that a process has ever owned. All times are the database's clock.
-- A released or expired lease keeps its row (and its generation), so that a generation
-- never repeats for a PBX.
CREATE TABLE pbx_leases (
    pbx         text PRIMARY KEY CHECK (pbx ~ '^[A-Za-z0-9_.-]{1,64}$'),
    owner       text NOT NULL,                 -- a process's instance name (calls.owner's)
    generation  bigint NOT NULL DEFAULT 1,     -- +1 at each new tenure
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Takes or renews p_owner's lease of p_pbx for p_seconds from now, in one statement:
-- inserted when absent; updated only while p_owner holds it or once it has expired.
-- A new tenure (another owner, or the same one after the lease lapsed) adds one to the
-- generation and restarts acquired_at; a renewal in time keeps both. Returns the row as
-- it is after the call: its owner says whether p_owner holds the lease now.
CREATE FUNCTION gw_lease(p_pbx text, p_owner text, p_seconds numeric)
RETURNS TABLE (owner text, generation bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    IF p_seconds IS NULL OR p_seconds <= 0 THEN
        RAISE EXCEPTION 'lease seconds must be positive, not %', p_seconds
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN QUERY
    INSERT INTO pbx_leases AS l (pbx, owner, expires_at)
    VALUES (p_pbx, p_owner, now() + p_seconds * interval '1 second')
    ON CONFLICT (pbx) DO UPDATE
    SET owner = EXCLUDED.owner,
        generation = l.generation
            + CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > now() THEN 0 ELSE 1 END,
        acquired_at = CASE WHEN l.owner = EXCLUDED.owner AND l.expires_at > now()
                           THEN l.acquired_at ELSE now() END,
        expires_at = EXCLUDED.expires_at
    WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()
    RETURNING l.owner, l.generation, l.expires_at;
    IF NOT FOUND THEN
        -- held by another process: ON CONFLICT locked the row, so it is as it stays
        RETURN QUERY SELECT l.owner, l.generation, l.expires_at
                     FROM pbx_leases l WHERE l.pbx = p_pbx;
    END IF;
END
$$;

-- Gives up p_owner's lease of p_pbx (a graceful stop): the lease expires now, so the
-- next process takes it at once, with the next generation. Returns whether p_owner
-- held it.
CREATE FUNCTION gw_lease_release(p_pbx text, p_owner text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pbx_leases SET expires_at = LEAST(expires_at, now())
    WHERE pbx = p_pbx AND owner = p_owner AND expires_at > now();
    RETURN FOUND;
END
$$;

-- ---- gw_authorise and gw_void record the call's PBX -------------------------------------

-- p_pbx comes last, with a default: a gateway that does not know of PBX names yet
-- records its calls as the 'default' PBX's, as before. Bodies as in migrations 005 and
-- 006, with the PBX written into the calls row.
DROP FUNCTION gw_authorise(uuid, text, text, text, text, text, text, text, text, text, text,
                           text, text, text[], char(2), integer, timestamptz);
DROP FUNCTION gw_void(uuid, text, text, text, text, text, text, text, timestamptz);

CREATE FUNCTION gw_authorise(
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

-- As in migration 006: make an authorisation whose answer was lost say what the PBX was
-- told. The tombstone records the call's PBX, so that it holds the channel's uniqueid on
-- that PBX only.
CREATE FUNCTION gw_void(p_call uuid, p_tenant text, p_direction text, p_caller text,
                        p_destination text, p_class text, p_pbx_uniqueid text,
                        p_linkedid text, p_now timestamptz, p_pbx text DEFAULT 'default')
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    c calls%ROWTYPE;
BEGIN
    INSERT INTO calls (id, tenant_id, direction, caller, destination, number_class,
                       decision, reason, pbx, pbx_uniqueid, linkedid, month, state,
                       authorised_at, settled_by)
    VALUES (p_call, p_tenant, p_direction, p_caller, p_destination, p_class,
            'REJECT', 'GATEWAY_ERROR', coalesce(p_pbx, 'default'), p_pbx_uniqueid,
            p_linkedid, gw_month(p_tenant, p_now), 'rejected', p_now, 'void')
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN 'voided';
    END IF;
    SELECT * INTO c FROM calls WHERE id = p_call FOR UPDATE;
    IF NOT FOUND THEN
        -- the conflict was the channel's uniqueid on that PBX, held by another call
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
