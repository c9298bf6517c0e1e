-- The fence of a PBX's lease without a lock on its row (issue 9, second pass).
--
-- Until now a fenced transaction (a reconciliation's settlement, a call's renewal) held
-- the lease row FOR SHARE until its commit, and every gw_lease updated that row. Two
-- faults followed. A process that froze inside a fenced transaction (SIGSTOP, a
-- half-open TCP link) kept its row lock for ever: no other process could take the PBX
-- over. And new share lockers of a row may pass an updater already waiting, so under
-- load the owner's own renewal could wait behind its own fenced statements until the
-- lease ran out.
--
-- Now the fence is a transaction-level advisory lock per PBX. A fenced transaction
-- takes it shared (gw_fence); gw_lease takes it exclusively, and only for a change of
-- tenure (a take-over, or a lease taken again after it lapsed). The holder's renewal of
-- its own lease in time takes no advisory lock, so it never waits for fenced
-- statements; a take-over waits for those in flight, and a waiting take-over is not
-- overtaken by new shared requests (heavyweight locks queue in order). The wait of a
-- take-over is bounded by lock_timeout; the gateway also ends a fenced transaction left
-- idle (idle_in_transaction_session_timeout), so a frozen holder loses its lock.

-- The advisory lock key of a PBX's lease: (a constant for the lease table, the name's
-- hash). Two names with one hash only share a queue.
CREATE FUNCTION gw_lease_lock_key(p_pbx text)
RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(p_pbx) $$;

-- Whether p_owner holds an unexpired lease of p_pbx, holding the PBX's fence (shared)
-- until the transaction ends. The row is read after the lock is granted (each statement
-- of a volatile function reads with a snapshot of its own): a take-over that committed
-- while we waited is seen.
CREATE FUNCTION gw_fence(p_pbx text, p_owner text)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pbx_leases'), gw_lease_lock_key(p_pbx));
    RETURN EXISTS (SELECT 1 FROM pbx_leases l
                   WHERE l.pbx = p_pbx AND l.owner = p_owner AND l.expires_at > now());
END
$$;

DROP FUNCTION gw_lease(text, text, numeric);

-- As in migration 008 (the answer, the generations), plus: a renewal in time by the
-- holder takes no lock but its row's; any other call first takes the PBX's fence
-- exclusively, waiting at most p_wait seconds (default a sixth of p_seconds: half the
-- renewal interval) before it fails with lock_not_available.
CREATE FUNCTION gw_lease(p_pbx text, p_owner text, p_seconds numeric,
                         p_wait numeric DEFAULT NULL)
RETURNS TABLE (owner text, generation bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_lock_timeout text := current_setting('lock_timeout');
BEGIN
    IF p_seconds IS NULL OR p_seconds <= 0 THEN
        RAISE EXCEPTION 'lease seconds must be positive, not %', p_seconds
            USING ERRCODE = 'check_violation';
    END IF;
    PERFORM set_config('lock_timeout',
                       greatest(100, round(coalesce(p_wait, p_seconds / 6) * 1000))::text,
                       true);
    -- the holder renews in time: no change of tenure, no fence
    RETURN QUERY
    UPDATE pbx_leases AS l SET expires_at = now() + p_seconds * interval '1 second'
    WHERE l.pbx = p_pbx AND l.owner = p_owner AND l.expires_at > now()
    RETURNING l.owner, l.generation, l.expires_at;
    IF NOT FOUND THEN
        -- absent, expired or another's: a change of tenure may follow, so wait for the
        -- fenced transactions in flight (and keep new ones out until we commit)
        PERFORM pg_advisory_xact_lock(hashtext('pbx_leases'), gw_lease_lock_key(p_pbx));
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
    END IF;
    PERFORM set_config('lock_timeout', v_lock_timeout, true);
END
$$;
