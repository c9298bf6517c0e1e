-- The PBX's own record of every call. Asterisk's cdr_pgsql inserts one row per CDR,
-- matching columns by name; after a restart the gateway settles calls that ended
-- while it was away from these rows.
CREATE TABLE cdr (
    id          bigserial PRIMARY KEY,
    start       timestamptz,
    answer      timestamptz,
    "end"       timestamptz,
    clid        text,
    src         text,
    dst         text,
    dcontext    text,
    channel     text,
    dstchannel  text,
    lastapp     text,
    lastdata    text,
    duration    integer,
    billsec     integer,
    disposition text,
    amaflags    integer,
    accountcode text,
    uniqueid    text,
    linkedid    text,
    userfield   text,
    peeraccount text,
    sequence    integer
);
CREATE INDEX cdr_uniqueid ON cdr (uniqueid);
