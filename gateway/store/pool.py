"""Database connection pools, and the embedded PostgreSQL used when no URL is given."""

from __future__ import annotations

import asyncio
import pathlib
import warnings
from typing import Any

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
    holding the PBX's channel (Asterisk waits for the AGI answer without a limit).

    The server cancels a statement sooner (``statement_timeout``, see
    ``server_statement_timeout``), so that a slow statement is rolled back and says so
    before the client gives up on it. That covers a slow server, not one that does not
    run at all (frozen, or the statement still unread): the rater voids an
    authorisation whose answer it never got (docs/billing.md)."""
    if run_migrations:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return await BoundedPool(dsn, min_size=min_size, max_size=max_size,
                             init=_init_connection(instance_id), reset=_keep_session,
                             command_timeout=command_timeout,
                             server_settings={"statement_timeout": str(
                                 server_statement_timeout_ms(command_timeout))},
                             connection_class=asyncpg.Connection,
                             record_class=asyncpg.Record,
                             # asyncpg.create_pool's defaults
                             max_queries=50000, max_inactive_connection_lifetime=300.0,
                             loop=None, acquire_timeout=command_timeout)


class BoundedPool(asyncpg.Pool):
    """A pool whose waits are bounded too, not only its statements: asyncpg waits for a
    free connection, and for the server to acknowledge a timed-out statement's
    cancellation before it takes the connection back, without a limit by default. With
    the server frozen, every call decision would then wait for it (and Asterisk waits
    for the AGI answer without a limit). Here getting a connection waits at most
    ``acquire_timeout``, and taking back a connection whose statement timed out waits
    at most ``RELEASE_TIMEOUT`` before the connection is closed (the pool opens a new
    one when needed)."""

    RELEASE_TIMEOUT = 1.0

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any):
        self._acquire_timeout = acquire_timeout
        super().__init__(*args, **kwargs)

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)

    async def release(self, connection: Any, *,
                      timeout: float | None = None) -> None:  # noqa: ASYNC109 - asyncpg's
        budget = self.RELEASE_TIMEOUT if timeout is None else min(timeout,
                                                                  self.RELEASE_TIMEOUT)
        await super().release(connection, timeout=budget)


def server_statement_timeout_ms(command_timeout: float) -> int:
    """The server's limit for one statement: a second under the client's, or a fifth
    under it when that is less, so that the server's cancellation (a definite rollback)
    normally arrives before the client's timeout (an unknown outcome)."""
    margin = min(1.0, command_timeout / 5)
    return max(1, int((command_timeout - margin) * 1000))


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
