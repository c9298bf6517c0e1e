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
