-- Core schema of the rater. Money is numeric, time is whole seconds (bigint/int).
-- Every balance and every pool counter has a matching stream of rows in `ledger`.

CREATE TABLE tenants (
    id              text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    country         char(2) NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    timezone        text NOT NULL DEFAULT 'UTC',
    currency        char(3) NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    -- number classes outbound calls may not reach (operator policy, rules §6 row 6)
    blocked_classes text[] NOT NULL DEFAULT '{premium_rate}',
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    sku       text NOT NULL CHECK (sku IN ('business_voice_calling_plan', 'business_voice',
                                           'international_calling_plan')),
    quantity  integer NOT NULL CHECK (quantity BETWEEN 0 AND 1000000),
    PRIMARY KEY (tenant_id, sku)
);

CREATE TABLE users (
    id             text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$'),
    tenant_id      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    display_name   text NOT NULL DEFAULT '',
    sip_endpoint   text NOT NULL UNIQUE CHECK (sip_endpoint ~ '^[A-Za-z0-9_.-]{1,80}$'),
    extension      text CHECK (extension ~ '^[0-9]{2,8}$'),
    usage_location char(2) NOT NULL CHECK (usage_location ~ '^[A-Z]{2}$'),
    UNIQUE (tenant_id, extension)
);
CREATE INDEX users_tenant_location ON users (tenant_id, usage_location);

CREATE TABLE licence_assignments (
    user_id   text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    sku       text NOT NULL,
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, sku),
    FOREIGN KEY (tenant_id, sku) REFERENCES subscriptions (tenant_id, sku)
);
CREATE INDEX licence_assignments_tenant ON licence_assignments (tenant_id, sku);

CREATE TABLE phone_numbers (
    e164      text PRIMARY KEY CHECK (e164 ~ '^\+[1-9][0-9]{1,14}$'),
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind      text NOT NULL CHECK (kind IN ('user', 'toll_free', 'service')),
    user_id   text REFERENCES users (id) ON DELETE SET NULL,
    -- PBX endpoint the number rings when it is not a user's own number
    target    text CHECK (target ~ '^[A-Za-z0-9_.-]{1,80}$')
);
CREATE INDEX phone_numbers_tenant ON phone_numbers (tenant_id);
-- finds a tenant's number from its national form (suffix match) with an index
CREATE INDEX phone_numbers_reversed ON phone_numbers (reverse(e164) text_pattern_ops);

-- Minutes per assigned licence per month. 'domestic' rows are the Calling Plan pools;
-- 'international' rows are the add-on's per-user allotment (operator configuration).
CREATE TABLE allotments (
    country char(2) NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    plan    text NOT NULL CHECK (plan IN ('domestic', 'international')),
    minutes integer NOT NULL CHECK (minutes BETWEEN 0 AND 1000000),
    PRIMARY KEY (country, plan)
);
INSERT INTO allotments (country, plan, minutes) VALUES
    ('CA', 'domestic', 3000), ('GB', 'domestic', 1200), ('US', 'domestic', 3000),
    -- example values: the product article gives no figure for the add-on
    ('CA', 'international', 600), ('GB', 'international', 600), ('US', 'international', 600);

CREATE TABLE rates (
    id               bigserial PRIMARY KEY,
    tenant_id        text REFERENCES tenants (id) ON DELETE CASCADE,  -- NULL: every tenant
    currency         char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    kind             text NOT NULL CHECK (kind IN ('international', 'domestic_overage',
                                                   'toll_free_inbound')),
    prefix           text NOT NULL CHECK (prefix ~ '^[0-9]{0,15}$'),
    price_per_minute numeric(18, 6) NOT NULL CHECK (price_per_minute BETWEEN 0 AND 1000),
    first_increment  integer NOT NULL DEFAULT 60 CHECK (first_increment BETWEEN 1 AND 3600),
    increment        integer NOT NULL DEFAULT 60 CHECK (increment BETWEEN 1 AND 3600),
    description      text NOT NULL DEFAULT '',
    UNIQUE NULLS NOT DISTINCT (tenant_id, currency, kind, prefix)
);
CREATE INDEX rates_lookup ON rates (kind, currency, prefix);

CREATE TABLE wallets (
    tenant_id                 text PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    balance                   numeric(20, 6) NOT NULL DEFAULT 0 CHECK (balance >= 0),
    reserved                  numeric(20, 6) NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    auto_recharge_enabled     boolean NOT NULL DEFAULT false,
    auto_recharge_threshold   numeric(20, 6) NOT NULL DEFAULT 0 CHECK (auto_recharge_threshold >= 0),
    auto_recharge_amount      numeric(20, 6) NOT NULL DEFAULT 0 CHECK (auto_recharge_amount >= 0),
    auto_recharge_monthly_cap integer NOT NULL DEFAULT 0 CHECK (auto_recharge_monthly_cap >= 0),
    CHECK (balance >= reserved)
);

CREATE TABLE pools (
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    country          char(2) NOT NULL,
    month            date NOT NULL,
    used_seconds     bigint NOT NULL DEFAULT 0 CHECK (used_seconds >= 0),
    reserved_seconds bigint NOT NULL DEFAULT 0 CHECK (reserved_seconds >= 0),
    PRIMARY KEY (tenant_id, country, month)
);

CREATE TABLE addon_usage (
    user_id          text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    month            date NOT NULL,
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    used_seconds     bigint NOT NULL DEFAULT 0 CHECK (used_seconds >= 0),
    reserved_seconds bigint NOT NULL DEFAULT 0 CHECK (reserved_seconds >= 0),
    PRIMARY KEY (user_id, month)
);

CREATE TABLE calls (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id          text,
    direction        text NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    caller           text NOT NULL,
    destination      text NOT NULL,
    number_class     text NOT NULL,
    decision         text NOT NULL CHECK (decision IN ('ALLOW', 'REJECT')),
    reason           text NOT NULL,
    route            text,
    pbx_uniqueid     text UNIQUE,
    linkedid         text,
    rate_kind        text,
    rate_prefix      text,
    price_per_minute numeric(18, 6),
    first_increment  integer NOT NULL DEFAULT 60,
    increment        integer NOT NULL DEFAULT 60,
    sources          text[] NOT NULL DEFAULT '{}',
    month            date NOT NULL,
    pool_country     char(2),
    funded_seconds   integer NOT NULL DEFAULT 0 CHECK (funded_seconds >= 0),
    state            text NOT NULL CHECK (state IN ('rejected', 'authorised', 'answered',
                                                    'settled', 'released')),
    authorised_at    timestamptz NOT NULL,
    answered_at      timestamptz,
    ended_at         timestamptz,
    billable_seconds integer,
    billed_seconds   integer,
    charged_amount   numeric(20, 6),
    settled_by       text
);
CREATE INDEX calls_tenant_month ON calls (tenant_id, month);
CREATE INDEX calls_open ON calls (state) WHERE state IN ('authorised', 'answered');

-- What one call holds or used from each of its sources ('pool', 'addon', 'wallet').
CREATE TABLE call_funding (
    call_id          uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    source           text NOT NULL CHECK (source IN ('pool', 'addon', 'wallet')),
    position         integer NOT NULL,
    reserved_seconds integer NOT NULL DEFAULT 0 CHECK (reserved_seconds >= 0),
    reserved_amount  numeric(20, 6) NOT NULL DEFAULT 0 CHECK (reserved_amount >= 0),
    charged_seconds  integer NOT NULL DEFAULT 0 CHECK (charged_seconds >= 0),
    charged_amount   numeric(20, 6) NOT NULL DEFAULT 0 CHECK (charged_amount >= 0),
    PRIMARY KEY (call_id, source)
);

-- Append-only movements. Each row holds deltas; the sums per account equal the
-- counters in wallets / pools / addon_usage (billing rules §8).
CREATE TABLE ledger (
    id                 bigserial PRIMARY KEY,
    at                 timestamptz NOT NULL,
    tenant_id          text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    entry              text NOT NULL CHECK (entry IN ('reserve', 'charge', 'release', 'topup',
                                                      'recharge')),
    account            text NOT NULL CHECK (account IN ('pool', 'addon', 'wallet')),
    country            char(2),
    month              date,
    user_id            text,
    call_id            uuid,
    d_used_seconds     bigint NOT NULL DEFAULT 0,
    d_reserved_seconds bigint NOT NULL DEFAULT 0,
    d_balance          numeric(20, 6) NOT NULL DEFAULT 0,
    d_reserved         numeric(20, 6) NOT NULL DEFAULT 0,
    note               text NOT NULL DEFAULT ''
);
CREATE INDEX ledger_tenant ON ledger (tenant_id, id);
CREATE INDEX ledger_call ON ledger (call_id) WHERE call_id IS NOT NULL;
