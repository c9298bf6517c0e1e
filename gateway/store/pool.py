"""Database connection pools, and the embedded PostgreSQL used when no URL is given."""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from asyncpg import connect_utils

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
                    instance_id: str | None = None,
                    host_timeout: float | None = None) -> asyncpg.Pool:
    """Connect, bring the schema up to date, and return a pool. Every statement is
    bounded by ``command_timeout``: a stuck database fails the call closed instead of
    holding the PBX's channel (Asterisk waits for the AGI answer without a limit).

    The server cancels a statement sooner (``statement_timeout``, see
    ``server_statement_timeout``), so that a slow statement is rolled back and says so
    before the client gives up on it. That covers a slow server, not one that does not
    run at all (frozen, or the statement still unread): the rater voids an
    authorisation whose answer it never got (docs/billing.md).

    A URL that lists several servers is connected through ``HostList`` (each server
    tried with its own ``host_timeout``), the migration connection and the pool's
    alike; a URL with one server is connected by asyncpg as it is."""
    hosts = HostList(dsn, host_timeout=host_timeout)
    if run_migrations:
        conn = await hosts.connect()
        try:
            await migrate(conn)
        finally:
            await conn.close()
    pool = BoundedPool(dsn, min_size=min_size, max_size=max_size,
                       init=_init_connection(instance_id), reset=_keep_session,
                       command_timeout=command_timeout,
                       server_settings={"statement_timeout": str(
                           server_statement_timeout_ms(command_timeout))},
                       connection_class=asyncpg.Connection,
                       record_class=asyncpg.Record,
                       # asyncpg.create_pool's defaults
                       max_queries=50000, max_inactive_connection_lifetime=300.0,
                       loop=None, acquire_timeout=command_timeout,
                       **({"connect": hosts.connect} if hosts.several else {}))
    # the server that takes writes moved: the connections to the old one are stale
    # (hung, or read-only after a demotion), replace them as they come back
    hosts.on_move = pool.expire_connections
    return await pool


# asyncpg's target_session_attrs for which exactly one listed server is right at a time
_ONE_RIGHT_SERVER = {"read-write", "primary"}
# a server that gave one of these is unreachable, not ready, or not of the kind asked
# for: the next one is tried (an authentication or configuration error is not skipped)
_NEXT_SERVER = (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                asyncpg.TargetServerAttributeNotMatched)


class NoServerAvailable(ConnectionError):
    """None of the servers of a multi-host URL gave a usable connection; says what each
    one did. An ``OSError``, like the errors asyncpg raises for an unreachable server."""


class HostList:
    """Connections to a database URL that lists several servers (``host1:port1,host2:
    port2``, or ``?host=...&port=...``), tried one at a time, each with its own time
    limit (``host_timeout``).

    asyncpg tries the listed servers in order under ONE time limit for the whole list:
    a server that hangs (its host frozen, or dropping packets) takes the whole limit,
    and the servers after it are never tried. Here a hung server costs
    ``host_timeout`` and the next one is tried. ``target_session_attrs`` keeps its
    meaning: each server is asked for it (asyncpg checks it on each connection), and a
    server that does not match is passed over. For ``read-write`` and ``primary``,
    where one server is right at a time, the server that gave the last connection is
    tried first, so that a fail-over costs the hung server's ``host_timeout`` once,
    not on every new connection.

    The servers are read from the URL by asyncpg's own parser (host and port lists,
    the ``host``/``port`` query parameters, ``PGHOST``/``PGPORT``). A URL with one
    server is left to asyncpg unchanged (``several`` is False)."""

    HOST_TIMEOUT = 1.5  # seconds; a server on a working network answers in milliseconds

    def __init__(self, dsn: str, *, host_timeout: float | None = None):
        self.dsn = dsn
        self.host_timeout = self.HOST_TIMEOUT if host_timeout is None else host_timeout
        self.servers, self.target = _servers(dsn)
        self.several = len(self.servers) > 1
        self._last_good: int | None = None
        self.on_move: Callable[[], Any] | None = None

    def _order(self) -> list[int]:
        order = list(range(len(self.servers)))
        if self._last_good is not None and self.target in _ONE_RIGHT_SERVER:
            order.remove(self._last_good)
            order.insert(0, self._last_good)
        return order

    async def connect(self, dsn: str | None = None, **kwargs: Any) -> asyncpg.Connection:
        """A connection as ``asyncpg.connect(dsn, **kwargs)`` gives one (the pool calls
        it so: ``dsn`` is the URL the pool was made with, this object's own)."""
        dsn = self.dsn if dsn is None else dsn
        if not self.several:
            return await asyncpg.connect(dsn, **kwargs)
        kwargs.pop("timeout", None)  # the limit is per server here
        if self.target == "prefer-standby":
            # a standby if one answers, else any server that answers
            passes = ["standby", "any"]
        else:
            passes = [self.target]
        outcomes: list[str] = []
        last: BaseException | None = None
        for target in passes:
            for i in self._order():
                host, port = self.servers[i]
                started = time.monotonic()
                try:
                    conn = await asyncpg.connect(dsn, host=host, port=port,
                                                 target_session_attrs=target,
                                                 timeout=self.host_timeout, **kwargs)
                except TimeoutError as exc:
                    last = exc
                    outcomes.append(f"{_name(host, port)}: no answer in "
                                    f"{self.host_timeout:g} s")
                except _NEXT_SERVER as exc:
                    last = exc
                    outcomes.append(f"{_name(host, port)}: {_reason(exc)}")
                else:
                    self._chosen(i, host, port, outcomes, time.monotonic() - started)
                    return conn
        raise NoServerAvailable("no database server gave a connection with "
                                f"target_session_attrs={self.target}: "
                                + "; ".join(outcomes)) from last

    def _chosen(self, i: int, host: str, port: int, passed_over: list[str],
                seconds: float) -> None:
        moved = self._last_good is not None and self._last_good != i
        if passed_over or moved:
            log.warning("database_server_chosen", server=_name(host, port),
                        passed_over=passed_over, moved=moved,
                        connect_ms=round(seconds * 1000))
        self._last_good = i
        if moved and self.on_move is not None:
            result = self.on_move()
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)


def _servers(dsn: str) -> tuple[list[tuple[str, int]], str]:
    """The (host, port) pairs a URL lists, in order, and its target_session_attrs, as
    asyncpg reads them; a single pair when asyncpg's parser is not the one this code
    knows (a URL it cannot read is then left to asyncpg.connect to refuse)."""
    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        return [("", 0)], "any"
    names = inspect.signature(parse).parameters
    try:
        addrs, params = parse(**{name: (dsn if name == "dsn" else None) for name in names})
    except Exception:  # noqa: BLE001 - asyncpg.connect reports a bad URL itself
        return [("", 0)], "any"
    servers = []
    for addr in addrs:
        if isinstance(addr, str):  # a Unix socket's path, which asyncpg takes as a host
            servers.append((addr, 0))
        else:
            servers.append((str(addr[0]), int(addr[1])))
    target = getattr(params, "target_session_attrs", "any")
    return servers, str(getattr(target, "value", target))


def _name(host: str, port: int) -> str:
    return host if host.startswith("/") else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return "not of the kind asked for"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
