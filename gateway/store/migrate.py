"""Applies the ``.sql`` files beside this module in name order, each once.

Safe to run twice and from several processes at once: a session-level advisory lock
serialises runners, and each file is applied and recorded in one transaction.
"""

from __future__ import annotations

from importlib import resources

import asyncpg
import structlog

log = structlog.get_logger("gateway.store")

# Arbitrary constant naming "the gateway's schema migrations" for pg_advisory_lock.
_LOCK_KEY = 0x6761_7465_7761_79


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("gateway.store") / "migrations"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Bring the schema up to date; return the versions applied by this call."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied_now.append(version)
            log.info("migration_applied", version=version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
