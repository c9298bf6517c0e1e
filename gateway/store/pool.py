"""Database connection pools, and the embedded PostgreSQL used when no URL is given."""

from __future__ import annotations

import asyncio
import pathlib
import warnings

import asyncpg
import structlog

from .migrate import migrate

log = structlog.get_logger("gateway.db")


def _init_connection(instance_id: str | None):
    async def init(conn: asyncpg.Connection) -> None:
        # The rater computes months in the tenant's timezone itself; keep sessions in UTC.
        await conn.execute("SET TIME ZONE 'UTC'")
        if instance_id:
            # calls.owner defaults to this: which process authorised the call
            await conn.execute("SELECT set_config('gateway.instance', $1, false)",
                               instance_id)
    return init


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query: our sessions hold no advisory locks,
    cursors, LISTENs or settings to undo, and the query would cost one more round trip
    for every statement on the call path."""


async def open_pool(dsn: str, *, min_size: int = 2, max_size: int = 10,
                    run_migrations: bool = True, command_timeout: float = 5.0,
                    instance_id: str | None = None) -> asyncpg.Pool:
    """Connect, bring the schema up to date, and return a pool. Every statement is
    bounded by ``command_timeout``: a stuck database fails the call closed instead of
    holding the PBX's channel (Asterisk waits for the AGI answer without a limit)."""
    if run_migrations:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     init=_init_connection(instance_id),
                                     reset=_keep_session,
                                     command_timeout=command_timeout)


def start_embedded(data_dir: pathlib.Path) -> tuple[str, object]:
    """Start (or reuse) an embedded PostgreSQL in ``data_dir``; return its URL and handle.

    pgserver ships the server binaries in its wheel and keeps the server running while
    a handle is held.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, containers)
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver  # imported here: only the embedded mode needs it

        server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    return server.get_uri(), server


async def start_embedded_async(data_dir: pathlib.Path) -> tuple[str, object]:
    return await asyncio.to_thread(start_embedded, data_dir)
