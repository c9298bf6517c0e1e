"""A database URL that lists several servers, one of them hung (``gateway.store.pool.
HostList``): each server is tried with its own time limit, so a server that accepts
connections and never answers (a frozen host) does not stop the next one from being
tried. The real test PostgreSQL is the server that answers; the hung one is a listening
socket of the test's own that takes connections and says nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from gateway.store.pool import HostList, NoServerAvailable, open_pool
from tests.support.database import scratch_database

pytestmark = [pytest.mark.db]

HOST_TIMEOUT = 0.5


class HungServer:
    """Accepts TCP connections and never answers, as a SIGSTOPped PostgreSQL's kernel
    does; counts the connections it was sent."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._open: list[asyncio.StreamWriter] = []

    async def start(self) -> HungServer:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.append(writer)

    async def close(self) -> None:
        for writer in self._open:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest_asyncio.fixture
async def hung() -> AsyncIterator[HungServer]:
    server = await HungServer().start()
    try:
        yield server
    finally:
        await server.close()


@pytest_asyncio.fixture
async def database_url() -> AsyncIterator[str]:
    async with scratch_database("gw_hosts") as url:
        yield url


def listing(url: str, first: str, *, attrs: str = "read-write") -> str:
    """``url`` (one server) with ``first`` listed before its server."""
    scheme, _, rest = url.partition("://")
    auth, _, hostpath = rest.rpartition("@")
    return f"{scheme}://{auth}@{first},{hostpath}?target_session_attrs={attrs}"


async def test_a_hung_server_first_in_the_list_costs_its_own_time_limit(
        hung: HungServer, database_url: str):
    url = listing(database_url, hung.address)
    # asyncpg alone: one time limit for the whole list, all of it spent on the hung server
    with pytest.raises(TimeoutError):
        await asyncpg.connect(url, timeout=4 * HOST_TIMEOUT)
    assert hung.connections == 1

    hosts = HostList(url, host_timeout=HOST_TIMEOUT)
    assert hosts.several and hosts.target == "read-write"
    conn = await asyncio.wait_for(hosts.connect(), 4 * HOST_TIMEOUT)
    try:
        assert await conn.fetchval("SELECT NOT pg_is_in_recovery()")
    finally:
        await conn.close()
    assert hung.connections == 2
    # the server that answered is tried first from now on: the hung one is not asked
    conn = await hosts.connect()
    await conn.close()
    assert hung.connections == 2


async def test_the_pool_and_the_migrations_go_past_a_hung_server(hung: HungServer,
                                                                 database_url: str):
    pool = await asyncio.wait_for(
        open_pool(listing(database_url, hung.address), min_size=2, max_size=3,
                  host_timeout=HOST_TIMEOUT), 10 * HOST_TIMEOUT)
    try:
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") > 0
        async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
            ports = {await conn.fetchval("SELECT inet_server_port()") for conn in (a, b, c)}
        assert ports == {int(database_url.split("@")[1].split("/")[0].rsplit(":", 1)[1])}
    finally:
        await pool.close()
    # the migration connection met the hung server; every later one went to the other
    assert hung.connections == 1


async def test_no_server_answers(hung: HungServer):
    other = await HungServer().start()
    try:
        url = f"postgresql://postgres@{hung.address},{other.address}/x"
        hosts = HostList(url, host_timeout=HOST_TIMEOUT)
        with pytest.raises(NoServerAvailable) as raised:
            await hosts.connect()
        assert isinstance(raised.value, OSError)  # the repository's DATABASE_UNAVAILABLE
        assert hung.address in str(raised.value) and other.address in str(raised.value)
        assert (hung.connections, other.connections) == (1, 1)
    finally:
        await other.close()


async def test_a_url_with_one_server_is_left_to_asyncpg(database_url: str):
    hosts = HostList(database_url)
    assert not hosts.several
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        assert pool._connect is asyncpg.connect  # asyncpg's own connect, as before
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()
