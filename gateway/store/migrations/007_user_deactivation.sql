-- Provisioning never deletes a user (issue 8 item 4; docs/operations.md, "Removing
-- users, numbers and tenants"). A user's calls, ledger entries and add-on counters are
-- history: DELETE of a user cascaded to addon_usage, so re-creating the user gave the
-- month's used add-on minutes back, and the user's open calls could no longer be
-- settled (their reserved seconds had nowhere to go). "Deleting" a user now sets
-- deactivated_at; the row stays, and so does everything that refers to it.

ALTER TABLE users ADD COLUMN deactivated_at timestamptz;

-- A deactivated user frees its endpoint name and extension, as a deleted one did: both
-- are unique among active users only.
ALTER TABLE users DROP CONSTRAINT users_sip_endpoint_key;
ALTER TABLE users DROP CONSTRAINT users_tenant_id_extension_key;
CREATE UNIQUE INDEX users_active_sip_endpoint ON users (sip_endpoint)
    WHERE deactivated_at IS NULL;
CREATE UNIQUE INDEX users_active_extension ON users (tenant_id, extension)
    WHERE deactivated_at IS NULL;

-- The second line: a user whose add-on counters exist cannot be deleted at all, by
-- provisioning or by hand.
ALTER TABLE addon_usage DROP CONSTRAINT addon_usage_user_id_fkey;
ALTER TABLE addon_usage ADD CONSTRAINT addon_usage_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE RESTRICT;
