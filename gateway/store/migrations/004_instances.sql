-- Several gateway processes may share one database and one PBX. Each call remembers
-- the process that authorised it (set per connection in gateway.instance), and each
-- process keeps a heartbeat here, so that reconciliation adopts only the calls of
-- processes that are gone.
CREATE TABLE gateway_instances (
    id         text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE calls
    ADD COLUMN owner text DEFAULT nullif(current_setting('gateway.instance', true), '');
