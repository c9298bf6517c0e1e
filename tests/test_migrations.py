"""Migrations: applied in order, recorded, safe to run twice and from two processes at
once, and `python -m gateway migrate` does it from the command line."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import pytest

from gateway.store.migrate import migrate, migration_files
from tests.support.database import scratch_database

pytestmark = pytest.mark.db


@pytest.fixture
async def empty_database():
    async with scratch_database("gw_mig") as url:
        yield url


async def test_migrations_apply_once_in_order(empty_database):
    conn = await asyncpg.connect(empty_database)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
        versions = [r["version"] for r in await conn.fetch(
            "SELECT version FROM schema_migrations ORDER BY applied_at, version")]
    finally:
        await conn.close()
    expected = [v for v, _ in migration_files()]
    assert first == expected and expected == sorted(expected)
    assert second == []
    assert versions == expected


async def test_two_processes_migrating_at_once(empty_database):
    env = {**os.environ, "GATEWAY_DATABASE_URL": empty_database}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "migrate", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(2)]
    outs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    printed = sorted(o[0].decode().strip() for o in outs)
    # exactly one of them applied the migrations; the other found them done
    assert printed[0].startswith("applied: 001_schema")
    assert printed[1] == "applied: nothing (up to date)"
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
            migration_files())
    finally:
        await conn.close()


async def test_latest_functions_use_one_word_per_concept(empty_database):
    """After every migration, the server-side steps speak the glossary's words: settle
    (never finish) and slice (never want/granted), in names, arguments and columns."""
    conn = await asyncpg.connect(empty_database)
    try:
        await migrate(conn)
        functions = {r["proname"]: r for r in await conn.fetch(
            "SELECT proname, coalesce(proargnames, '{}') AS args FROM pg_proc"
            " WHERE proname LIKE 'gw\\_%'")}
    finally:
        await conn.close()
    assert {"gw_authorise", "gw_renew", "gw_settle", "gw_reserve"} <= functions.keys()
    assert "gw_finish" not in functions
    names = {a for f in functions.values() for a in f["args"]}
    assert not {"p_want", "granted"} & names
    assert "p_slice" in functions["gw_renew"]["args"]
    assert "slice_seconds" in functions["gw_renew"]["args"]


async def apply_up_to(conn, last: str) -> None:
    """Apply the migrations up to ``last`` (inclusive), as an older gateway did."""
    await conn.execute("CREATE TABLE schema_migrations ("
                       " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
    for version, sql in migration_files():
        if version > last:
            break
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)


async def schema_of(conn) -> dict[str, list[tuple]]:
    """What a migrated database consists of, comparable across databases."""
    return {
        "columns": [tuple(r) for r in await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " ORDER BY table_name, column_name")],
        "constraints": [tuple(r) for r in await conn.fetch(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
            " ORDER BY 1, 2")],
        "indexes": [tuple(r) for r in await conn.fetch(
            "SELECT tablename, indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = 'public' ORDER BY 1, 2")],
        "functions": [tuple(r) for r in await conn.fetch(
            "SELECT proname, pg_get_function_identity_arguments(oid),"
            " pg_get_function_result(oid), md5(prosrc) FROM pg_proc"
            " WHERE pronamespace = 'public'::regnamespace ORDER BY 1, 2")],
    }


@pytest.mark.parametrize("last", [v for v, _ in migration_files()[:-1]])
async def test_upgrading_from_an_older_version_gives_the_fresh_schema(last):
    async with scratch_database("gw_mig") as fresh_url, scratch_database("gw_mig") as old_url:
        fresh, old = await asyncpg.connect(fresh_url), await asyncpg.connect(old_url)
        try:
            await migrate(fresh)
            await apply_up_to(old, last)
            applied = await migrate(old)
            assert applied == [v for v, _ in migration_files() if v > last]
            assert await schema_of(old) == await schema_of(fresh)
        finally:
            await fresh.close()
            await old.close()


async def test_the_fleet_migration_gives_existing_calls_and_records_to_pbx_default(
        empty_database):
    """Calls and CDRs written before PBX names become PBX 'default''s: the gateway still
    finds and settles them, and an older gateway's gw_authorise call still works."""
    conn = await asyncpg.connect(empty_database)
    try:
        await apply_up_to(conn, "007_user_deactivation")
        await conn.execute(
            "INSERT INTO tenants (id, name, country, timezone, currency)"
            " VALUES ('acme', 'Acme', 'CA', 'America/Toronto', 'USD');"
            " INSERT INTO wallets (tenant_id) VALUES ('acme');"
            " INSERT INTO cdr (uniqueid, billsec, disposition)"
            " VALUES ('1700000000.1', 42, 'ANSWERED')")
        decision = await conn.fetchval(
            "SELECT decision FROM gw_authorise(gen_random_uuid(), 'acme', NULL,"
            " 'inbound', '2125550100', '+15145550100', 'local', 'ALLOW', 'INTERNAL',"
            " 'internal', '1700000000.1', NULL, NULL, '{}', NULL, 300, now())")
        assert decision == "ALLOW"
        assert (await migrate(conn))[:2] == ["008_fleet", "009_lease_fence"]
        rows = await conn.fetch("SELECT pbx, pbx_uniqueid, state FROM calls")
        assert [tuple(r) for r in rows] == [("default", "1700000000.1", "authorised")]
        assert await conn.fetchval("SELECT pbx FROM cdr") is None
        # an older gateway's call (17 arguments) records PBX 'default'
        await conn.execute(
            "SELECT * FROM gw_authorise(gen_random_uuid(), 'acme', NULL, 'inbound', 'x',"
            " '+15145550100', 'local', 'ALLOW', 'INTERNAL', 'internal', '1700000000.2',"
            " NULL, NULL, '{}', NULL, 300, now())")
        # the same channel on the default PBX is still one call; on another PBX a new one
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "SELECT * FROM gw_authorise(gen_random_uuid(), 'acme', NULL, 'inbound', 'x',"
                " '+15145550100', 'local', 'ALLOW', 'INTERNAL', 'internal', '1700000000.1',"
                " NULL, NULL, '{}', NULL, 300, now(), 'default')")
        await conn.execute(
            "SELECT * FROM gw_authorise(gen_random_uuid(), 'acme', NULL, 'inbound', 'x',"
            " '+15145550100', 'local', 'ALLOW', 'INTERNAL', 'internal', '1700000000.1',"
            " NULL, NULL, '{}', NULL, 300, now(), 'pbx2')")
        assert [tuple(r) for r in await conn.fetch(
            "SELECT pbx, pbx_uniqueid FROM calls ORDER BY pbx, pbx_uniqueid")] == [
            ("default", "1700000000.1"), ("default", "1700000000.2"), ("pbx2", "1700000000.1")]
    finally:
        await conn.close()


async def test_the_fleet_migration_fails_at_once_behind_a_lock_and_changes_nothing(
        empty_database):
    """Migration 008 rewrites the keys of calls and cdr under an exclusive lock. A
    process still holding a lock on either (a gateway left running, a long report) makes
    it fail by its lock_timeout, before any change, rather than queue: a queued exclusive
    lock would hold every other query on those tables behind it. Once the lock is gone
    it applies."""
    conn, holder = await asyncpg.connect(empty_database), await asyncpg.connect(empty_database)
    try:
        await apply_up_to(conn, "007_user_deactivation")
        for table in ("calls", "cdr"):
            reading = holder.transaction()
            await reading.start()
            await holder.fetchval(f"SELECT count(*) FROM {table}")  # ACCESS SHARE, kept
            with pytest.raises(asyncpg.LockNotAvailableError):
                await asyncio.wait_for(migrate(conn), 60)  # the guard of a hang, no limit
            await reading.rollback()
            assert await conn.fetchval(
                "SELECT max(version) FROM schema_migrations") == "007_user_deactivation"
            assert await conn.fetchval(
                "SELECT count(*) FROM information_schema.columns"
                " WHERE table_name IN ('calls', 'cdr') AND column_name = 'pbx'") == 0
            assert await conn.fetchval("SELECT to_regclass('pbx_leases')") is None
        applied = await migrate(conn)
        assert applied[0] == "008_fleet"
        assert await conn.fetchval("SHOW lock_timeout") == "0"  # SET LOCAL: 008's alone
    finally:
        await holder.close()
        await conn.close()
