-- Alerts and webhooks (issue 11; docs/operations.md, "Alerts" and "Webhooks").
--
-- An alert is written in the same transaction as the money or minute movement that
-- caused it, by triggers on the tables that move (pools, addon_usage, wallets, ledger,
-- calls): the rater's functions are not changed, and a rewrite of them keeps the
-- alerts as long as it moves the same rows. The alerts table is the outbox: each new
-- alert also writes one delivery row per matching webhook subscription, which the
-- gateway's delivery worker sends later, outside any call's transaction.
--
-- Once per crossing: every alert has a unique key (tenant, kind, subject, period,
-- threshold) and is inserted with ON CONFLICT DO NOTHING, so 200 concurrent
-- authorisations that all find the pool past 80 % write one alert (the others wait for
-- the first one's index entry, then find it).
--
-- Cost on the call path: each trigger fires only WHEN the column it watches moved the
-- way that may matter (a counter grew, a balance fell, a ledger row of the one entry
-- kind), so a settlement, a release or a reservation of another kind runs no trigger
-- function at all; the functions read the tenant's settings by primary key.

-- ---- settings: per tenant, created with the tenant, defaults shipped -------------------

CREATE TABLE alert_settings (
    tenant_id                  text PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    -- pool used (used + reserved) at or past these percentages of its capacity
    pool_percents              integer[] NOT NULL DEFAULT '{80,100}'
        CHECK (1 <= ALL (pool_percents) AND 100 >= ALL (pool_percents)),
    -- one user's add-on used at or past these percentages (100: used up)
    addon_percents             integer[] NOT NULL DEFAULT '{100}'
        CHECK (1 <= ALL (addon_percents) AND 100 >= ALL (addon_percents)),
    -- the wallet's balance fell below this amount (NULL: off)
    wallet_below               numeric(20, 6) DEFAULT 10 CHECK (wallet_below >= 0),
    auto_recharge              boolean NOT NULL DEFAULT true,
    recharge_cap               boolean NOT NULL DEFAULT true,
    -- at least this many NO_BALANCE rejections within no_balance_minutes (NULL: off)
    no_balance_count           integer DEFAULT 5 CHECK (no_balance_count BETWEEN 1 AND 100000),
    no_balance_minutes         integer NOT NULL DEFAULT 15
        CHECK (no_balance_minutes BETWEEN 1 AND 1440),
    -- money reserved for international calls in one clock hour (UTC) at or above this
    -- (NULL: off); with international_block, further international calls are blocked
    -- (the tenant's blocked_classes) until an operator clears the alert
    international_hourly_limit numeric(20, 6) DEFAULT 50 CHECK (international_hourly_limit > 0),
    international_block        boolean NOT NULL DEFAULT false
);

INSERT INTO alert_settings (tenant_id) SELECT id FROM tenants;

CREATE FUNCTION gw_alert_settings_created() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO alert_settings (tenant_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER tenants_alert_settings AFTER INSERT ON tenants
FOR EACH ROW EXECUTE FUNCTION gw_alert_settings_created();

-- ---- the alerts (the outbox) -----------------------------------------------------------

CREATE TABLE alerts (
    id              bigserial PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('pool_used', 'addon_used', 'wallet_below',
                                                  'auto_recharge', 'recharge_cap_reached',
                                                  'no_balance_rejections',
                                                  'international_spend')),
    -- what crossed: a pool's country, a user (add-on), 'wallet', 'international'
    subject         text NOT NULL,
    -- the span it fires once in: a month, an hour, a window, or the crossing itself
    period          text NOT NULL,
    threshold       numeric,
    details         jsonb NOT NULL DEFAULT '{}',
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'acknowledged', 'cleared')),
    raised_at       timestamptz NOT NULL DEFAULT now(),
    -- this alert added 'international' to the tenant's blocked classes
    blocked         boolean NOT NULL DEFAULT false,
    acknowledged_at timestamptz,
    acknowledged_by text,
    cleared_at      timestamptz,
    cleared_by      text,
    note            text NOT NULL DEFAULT '',
    UNIQUE NULLS NOT DISTINCT (tenant_id, kind, subject, period, threshold)
);
CREATE INDEX alerts_open ON alerts (tenant_id, id) WHERE state <> 'cleared';
CREATE INDEX alerts_recent ON alerts (raised_at DESC);

-- ---- webhooks ------------------------------------------------------------------------

CREATE TABLE webhooks (
    id          bigserial PRIMARY KEY,
    -- NULL: every tenant's events
    tenant_id   text REFERENCES tenants (id) ON DELETE CASCADE,
    url         text NOT NULL CHECK (url ~ '^https?://[^[:space:]]+$' AND length(url) <= 2000),
    -- alert kinds to send; empty: every kind
    events      text[] NOT NULL DEFAULT '{}',
    secret      text NOT NULL CHECK (length(secret) BETWEEN 16 AND 200),
    enabled     boolean NOT NULL DEFAULT true,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_tenant ON webhooks (tenant_id);

-- One event to one subscription. Its id is the idempotency key the receiver sees on
-- every attempt; its body is fixed when the event happens, so every retry sends the same
-- bytes. A delivery is pending until delivered or dead; while one gateway process is
-- sending it, next_attempt_at is that attempt's lease (no other process claims it
-- before), and claim says which attempt may record the outcome.
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id      bigint NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    alert_id        bigint REFERENCES alerts (id) ON DELETE CASCADE,
    tenant_id       text,
    event           text NOT NULL,
    body            text NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    claim           uuid,
    claimed_by      text,
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, created_at DESC);
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant_id, created_at DESC);

-- The delivery log: one row per attempt, whatever its outcome.
CREATE TABLE webhook_attempts (
    id          bigserial PRIMARY KEY,
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    by          text NOT NULL DEFAULT '',
    status      integer,
    error       text,
    duration_ms integer NOT NULL DEFAULT 0
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, id);

-- Raises one alert once: NULL when it exists already (the same key), else its id, with
-- one delivery per enabled subscription of the tenant (or global) that wants its kind.
CREATE FUNCTION gw_raise_alert(p_tenant text, p_kind text, p_subject text, p_period text,
                               p_threshold numeric, p_details jsonb,
                               p_blocked boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    a alerts%ROWTYPE;
BEGIN
    INSERT INTO alerts (tenant_id, kind, subject, period, threshold, details, blocked)
    VALUES (p_tenant, p_kind, p_subject, p_period, p_threshold, p_details, p_blocked)
    ON CONFLICT DO NOTHING
    RETURNING * INTO a;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (id, webhook_id, alert_id, tenant_id, event, body)
    SELECT d.id, w.id, a.id, a.tenant_id, a.kind,
           jsonb_build_object(
               'id', d.id, 'event', a.kind,
               'alert', jsonb_build_object(
                   'id', a.id, 'tenant_id', a.tenant_id, 'kind', a.kind,
                   'subject', a.subject, 'period', a.period,
                   'threshold', a.threshold::text, 'raised_at', a.raised_at,
                   'blocked', a.blocked, 'details', a.details))::text
    FROM webhooks w CROSS JOIN LATERAL (SELECT gen_random_uuid() AS id) d
    WHERE w.enabled AND (w.tenant_id = a.tenant_id OR w.tenant_id IS NULL)
      AND (cardinality(w.events) = 0 OR a.kind = ANY (w.events));
    RETURN a.id;
END
$$;

-- ---- pools and add-ons: percentages of capacity ----------------------------------------

-- The number of a tenant's Calling Plan users located in a country, as gw_pool_capacity
-- counts them, kept with the tenant's context version it was counted at: every change
-- of users or licences moves that version (migration 010), so a row of another version
-- is stale. The pool trigger reads capacity from here (two primary-key reads) instead
-- of counting licences at every reservation; it counts again after a change.
CREATE TABLE alert_pool_users (
    tenant_id       text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    country         char(2) NOT NULL,
    context_version bigint NOT NULL,
    users           bigint NOT NULL,
    PRIMARY KEY (tenant_id, country)
);

-- A pool's capacity in seconds, as gw_pool_capacity gives it, from the count above.
-- Called by the pool trigger, which holds the pool's row lock: one writer per pool.
CREATE FUNCTION gw_alert_pool_capacity(p_tenant text, p_country char(2))
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v_version bigint;
    v_users bigint;
BEGIN
    SELECT t.context_version INTO v_version FROM tenants t WHERE t.id = p_tenant;
    SELECT c.users INTO v_users FROM alert_pool_users c
    WHERE c.tenant_id = p_tenant AND c.country = p_country AND c.context_version = v_version;
    IF NOT FOUND THEN
        SELECT count(*) INTO v_users
        FROM licence_assignments la JOIN users u ON u.id = la.user_id
        WHERE la.tenant_id = p_tenant AND la.sku = 'business_voice_calling_plan'
          AND u.usage_location = p_country;
        INSERT INTO alert_pool_users AS c (tenant_id, country, context_version, users)
        VALUES (p_tenant, p_country, v_version, v_users)
        ON CONFLICT (tenant_id, country) DO UPDATE
        SET context_version = EXCLUDED.context_version, users = EXCLUDED.users;
    END IF;
    RETURN v_users * coalesce((SELECT a.minutes FROM allotments a
                               WHERE a.country = p_country AND a.plan = 'domestic'), 0) * 60;
END
$$;

-- Fires when a pool's used + reserved seconds grew (a reservation): at or past a line,
-- the line's alert for the month is raised (once: its key).
CREATE FUNCTION gw_alert_pool() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_percents integer[];
    v_percent integer;
    v_capacity bigint;
    v_total bigint := NEW.used_seconds + NEW.reserved_seconds;
BEGIN
    SELECT s.pool_percents INTO v_percents FROM alert_settings s
    WHERE s.tenant_id = NEW.tenant_id;
    IF cardinality(v_percents) > 0 THEN
        v_capacity := gw_alert_pool_capacity(NEW.tenant_id, NEW.country);
        IF v_capacity > 0 THEN
            FOREACH v_percent IN ARRAY v_percents LOOP
                IF v_total * 100 >= v_capacity * v_percent THEN
                    PERFORM gw_raise_alert(
                        NEW.tenant_id, 'pool_used', NEW.country::text,
                        to_char(NEW.month, 'YYYY-MM'), v_percent,
                        jsonb_build_object('country', NEW.country,
                                           'month', to_char(NEW.month, 'YYYY-MM'),
                                           'capacity_seconds', v_capacity,
                                           'used_seconds', NEW.used_seconds,
                                           'reserved_seconds', NEW.reserved_seconds));
                END IF;
            END LOOP;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pools_alerts AFTER UPDATE OF used_seconds, reserved_seconds ON pools
FOR EACH ROW
WHEN (NEW.used_seconds + NEW.reserved_seconds > OLD.used_seconds + OLD.reserved_seconds)
EXECUTE FUNCTION gw_alert_pool();

CREATE FUNCTION gw_alert_addon() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_percents integer[];
    v_percent integer;
    v_capacity bigint;
    v_total bigint := NEW.used_seconds + NEW.reserved_seconds;
BEGIN
    SELECT s.addon_percents INTO v_percents FROM alert_settings s
    WHERE s.tenant_id = NEW.tenant_id;
    IF cardinality(v_percents) > 0 THEN
        v_capacity := gw_addon_capacity(NEW.user_id);
        IF v_capacity > 0 THEN
            FOREACH v_percent IN ARRAY v_percents LOOP
                IF v_total * 100 >= v_capacity * v_percent THEN
                    PERFORM gw_raise_alert(
                        NEW.tenant_id, 'addon_used', NEW.user_id,
                        to_char(NEW.month, 'YYYY-MM'), v_percent,
                        jsonb_build_object('user_id', NEW.user_id,
                                           'month', to_char(NEW.month, 'YYYY-MM'),
                                           'capacity_seconds', v_capacity,
                                           'used_seconds', NEW.used_seconds,
                                           'reserved_seconds', NEW.reserved_seconds));
                END IF;
            END LOOP;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER addon_usage_alerts AFTER UPDATE OF used_seconds, reserved_seconds ON addon_usage
FOR EACH ROW
WHEN (NEW.used_seconds + NEW.reserved_seconds > OLD.used_seconds + OLD.reserved_seconds)
EXECUTE FUNCTION gw_alert_addon();

-- ---- the wallet: its balance fell below the amount -------------------------------------

-- The balance (not the available balance): reservations come and go with every call,
-- the balance falls only by charges and rises by top-ups and recharges, so a crossing
-- is one charge taking it below the line, re-armed by money taking it back above.
-- Wallet updates are serialised by the row lock, so exactly one update crosses.
CREATE FUNCTION gw_alert_wallet() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_below numeric;
BEGIN
    SELECT s.wallet_below INTO v_below FROM alert_settings s WHERE s.tenant_id = NEW.tenant_id;
    IF v_below IS NOT NULL AND OLD.balance >= v_below AND NEW.balance < v_below THEN
        PERFORM gw_raise_alert(
            NEW.tenant_id, 'wallet_below', 'wallet',
            to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            v_below,
            jsonb_build_object('balance', NEW.balance::text, 'reserved', NEW.reserved::text,
                               'below', v_below::text));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER wallets_alerts AFTER UPDATE OF balance ON wallets
FOR EACH ROW WHEN (NEW.balance < OLD.balance)
EXECUTE FUNCTION gw_alert_wallet();

-- ---- the ledger: auto-recharges, and money reserved for international calls ------------

CREATE FUNCTION gw_alert_recharge() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    s alert_settings%ROWTYPE;
    v_count bigint;
    v_cap integer;
BEGIN
    SELECT * INTO s FROM alert_settings WHERE tenant_id = NEW.tenant_id;
    IF NOT FOUND OR NOT (s.auto_recharge OR s.recharge_cap) THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO v_count FROM ledger
    WHERE tenant_id = NEW.tenant_id AND entry = 'recharge' AND month = NEW.month;
    SELECT auto_recharge_monthly_cap INTO v_cap FROM wallets WHERE tenant_id = NEW.tenant_id;
    IF s.auto_recharge THEN
        PERFORM gw_raise_alert(
            NEW.tenant_id, 'auto_recharge', 'wallet', NEW.id::text, NULL,
            jsonb_build_object('amount', NEW.d_balance::text,
                               'month', to_char(NEW.month, 'YYYY-MM'),
                               'recharges_this_month', v_count, 'monthly_cap', v_cap,
                               'call_id', NEW.call_id));
    END IF;
    IF s.recharge_cap AND v_count >= v_cap THEN
        PERFORM gw_raise_alert(
            NEW.tenant_id, 'recharge_cap_reached', 'wallet', to_char(NEW.month, 'YYYY-MM'),
            v_cap,
            jsonb_build_object('month', to_char(NEW.month, 'YYYY-MM'),
                               'recharges_this_month', v_count, 'monthly_cap', v_cap));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER ledger_recharge_alerts AFTER INSERT ON ledger
FOR EACH ROW WHEN (NEW.entry = 'recharge')
EXECUTE FUNCTION gw_alert_recharge();

-- Money reserved from the wallet for international calls, per tenant and clock hour
-- (UTC, by the reservation's time): what those calls may cost. A reservation released
-- unused at settlement is not taken off: a fraud signal errs on the loud side.
CREATE TABLE international_spend (
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    hour      timestamptz NOT NULL,
    amount    numeric(20, 6) NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, hour)
);

CREATE FUNCTION gw_alert_international() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_limit numeric;
    v_block boolean;
    v_hour timestamptz := date_trunc('hour', NEW.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_amount numeric;
    v_blocked boolean := false;
BEGIN
    SELECT s.international_hourly_limit, s.international_block INTO v_limit, v_block
    FROM alert_settings s WHERE s.tenant_id = NEW.tenant_id;
    IF v_limit IS NULL OR NOT EXISTS (SELECT 1 FROM calls c WHERE c.id = NEW.call_id
                                      AND c.rate_kind = 'international') THEN
        RETURN NULL;
    END IF;
    INSERT INTO international_spend AS i (tenant_id, hour, amount)
    VALUES (NEW.tenant_id, v_hour, NEW.d_reserved)
    ON CONFLICT (tenant_id, hour) DO UPDATE SET amount = i.amount + EXCLUDED.amount
    RETURNING i.amount INTO v_amount;
    IF v_amount >= v_limit AND NOT EXISTS (
            SELECT 1 FROM alerts a WHERE a.tenant_id = NEW.tenant_id
              AND a.kind = 'international_spend' AND a.subject = 'international'
              AND a.period = to_char(v_hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24"Z"')
              AND a.threshold = v_limit) THEN
        IF v_block THEN
            -- the rules read blocked_classes (BLOCKED_DESTINATION); the tenant's context
            -- version moves with the update, so no gateway keeps the old copy
            UPDATE tenants SET blocked_classes = array_append(blocked_classes, 'international')
            WHERE id = NEW.tenant_id AND NOT ('international' = ANY (blocked_classes));
            v_blocked := FOUND;
        END IF;
        PERFORM gw_raise_alert(
            NEW.tenant_id, 'international_spend', 'international',
            to_char(v_hour AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24"Z"'), v_limit,
            jsonb_build_object('hour', to_char(v_hour AT TIME ZONE 'UTC',
                                               'YYYY-MM-DD"T"HH24:MI"Z"'),
                               'reserved', v_amount::text, 'limit', v_limit::text,
                               'call_id', NEW.call_id),
            v_blocked);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER ledger_international_alerts AFTER INSERT ON ledger
FOR EACH ROW WHEN (NEW.account = 'wallet' AND NEW.entry = 'reserve')
EXECUTE FUNCTION gw_alert_international();

-- ---- calls: NO_BALANCE rejections within a window --------------------------------------

-- Rejected calls are rows (state 'rejected', reason NO_BALANCE), written by the same
-- transaction that found nothing to reserve: they are counted by the call's own time
-- (authorised_at) over the tenant's window. One alert per window of the clock (UTC,
-- windows of no_balance_minutes from the epoch).
CREATE INDEX calls_no_balance ON calls (tenant_id, authorised_at) WHERE reason = 'NO_BALANCE';

CREATE FUNCTION gw_alert_no_balance() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_minutes integer;
    v_seen bigint;
    v_window double precision;
BEGIN
    SELECT s.no_balance_count, s.no_balance_minutes INTO v_count, v_minutes
    FROM alert_settings s WHERE s.tenant_id = NEW.tenant_id;
    IF v_count IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO v_seen FROM calls c
    WHERE c.tenant_id = NEW.tenant_id AND c.reason = 'NO_BALANCE'
      AND c.authorised_at > NEW.authorised_at - v_minutes * interval '1 minute'
      AND c.authorised_at <= NEW.authorised_at;
    IF v_seen >= v_count THEN
        v_window := v_minutes * 60;
        PERFORM gw_raise_alert(
            NEW.tenant_id, 'no_balance_rejections', 'calls',
            to_char(to_timestamp(floor(extract(epoch FROM NEW.authorised_at) / v_window)
                                 * v_window) AT TIME ZONE 'UTC',
                    'YYYY-MM-DD"T"HH24:MI"Z"'),
            v_count,
            jsonb_build_object('rejections', v_seen, 'minutes', v_minutes,
                               'last_call_id', NEW.id, 'last_destination', NEW.destination));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER calls_no_balance_alerts AFTER UPDATE OF reason ON calls
FOR EACH ROW WHEN (NEW.reason = 'NO_BALANCE' AND OLD.reason IS DISTINCT FROM 'NO_BALANCE')
EXECUTE FUNCTION gw_alert_no_balance();
CREATE TRIGGER calls_no_balance_inserted AFTER INSERT ON calls
FOR EACH ROW WHEN (NEW.reason = 'NO_BALANCE')
EXECUTE FUNCTION gw_alert_no_balance();
