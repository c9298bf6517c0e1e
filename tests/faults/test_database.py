"""The database fails under call load (issue 8 item 2 and the fault suite's database
cases): a PostgreSQL cluster of the test's own (``ThrowawayPostgres``), a real gateway
in-process pointed at it, and AGI requests played as Asterisk would send them (no PBX is
needed: what matters is what the PBX is told and what the database then holds).

- Frozen (SIGSTOP) past the statement timeout: callers are told GATEWAY_ERROR within
  the client's timeout and a second; statements sent before the freeze run when it
  thaws, and an authorisation may then commit although the PBX was told to reject.
  The rater voids those call ids, so every call the PBX rejected holds nothing.
- Stopped and started again: calls during the outage are rejected GATEWAY_ERROR at
  once (emergency calls still go), /readyz says not ready, and the pool reconnects by
  itself when the database is back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from gateway.app import Gateway
from gateway.errors import Unavailable
from gateway.store.pool import open_pool
from gateway.store.repository import Repository
from tests.faults.invariants import assert_invariants
from tests.faults.postgres import ThrowawayPostgres
from tests.support.agi import agi_request
from tests.support.gateway import running_gateway
from tests.support.tenant import standard_tenant

pytestmark = [pytest.mark.faults, pytest.mark.db]

DOMESTIC = "2125550100"
COMMAND_TIMEOUT = 5.0  # gateway.store.pool.open_pool's client-side limit
# what a caller may wait at worst: the client's timeout, then a second for the server
# to acknowledge the cancellation (BoundedPool.RELEASE_TIMEOUT), and scheduling slack
WORST_ANSWER = COMMAND_TIMEOUT + 1.0 + 1.5


@dataclass
class Answer:
    uniqueid: str
    dialled: str
    variables: dict[str, str]
    seconds: float
    asked_at: float

    @property
    def reason(self) -> str:
        return self.variables.get("GW_REASON", "")


async def agi_outbound(port: int, endpoint: str, dialled: str) -> Answer:
    """Play Asterisk for one outbound AGI request (with a channel uniqueid of its own, to
    find the call afterwards); wait as long as Asterisk would, within reason."""
    uniqueid = f"{time.time():.6f}-{uuid.uuid4().hex[:6]}"
    asked = time.monotonic()
    variables = await agi_request(port, "outbound", [dialled, endpoint], uniqueid=uniqueid,
                                  endpoint=endpoint, extension=dialled, within=30)
    return Answer(uniqueid, dialled, variables, time.monotonic() - asked, asked)


class Load:
    """``workers`` callers dialling one after another until stopped."""

    def __init__(self, gw: Gateway, workers: int, dialled: str = DOMESTIC):
        self.port = gw.agi.port
        self.dialled = dialled
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(workers)]

    async def _caller(self) -> None:
        while not self._stop.is_set():
            self.answers.append(await agi_outbound(self.port, "alice", self.dialled))

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.answers


@pytest_asyncio.fixture
async def postgres() -> AsyncIterator[ThrowawayPostgres]:
    pg = await asyncio.to_thread(ThrowawayPostgres().init)
    await asyncio.to_thread(pg.start)
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.close)


@pytest_asyncio.fixture
async def gw(postgres: ThrowawayPostgres) -> AsyncIterator[Gateway]:
    async with running_gateway(postgres.url, db_pool_size=4) as gateway:
        # the load never hangs up: after the pool's 1,200 slices its calls are funded
        # from the wallet, so a fast run (more calls) never turns into NO_BALANCE
        await standard_tenant(gateway.provisioning, wallet="10000.00")
        yield gateway


async def rejected_calls_hold_nothing(gw: Gateway, answers: list[Answer]) -> int:
    """Every call the PBX was told to reject is rejected in the database too, holding
    nothing; returns how many of them had reached the database."""
    recorded = 0
    for a in answers:
        if a.variables.get("GW_DECISION") == "ALLOW":
            continue
        row = await gw.repo.find_call_by_uniqueid(a.uniqueid)
        if row is None:
            continue  # failed before its authorisation was sent: nothing to hold
        recorded += 1
        assert (row["decision"], row["state"]) in (("REJECT", "rejected"),
                                                   ("REJECT", "released")), dict(row)
        assert row["reason"] == a.reason, (dict(row), a.reason)
    return recorded


async def end_allowed_calls(gw: Gateway, answers: list[Answer]) -> None:
    """The calls that were allowed never connected here: their hangup reports release
    them (what the dialplan's hangup handler does; not the subject of these tests)."""
    for a in answers:
        if a.variables.get("GW_DECISION") == "ALLOW" and a.variables.get("GW_CALL_ID"):
            await gw.calls.live_calls.settle(uuid.UUID(a.variables["GW_CALL_ID"]), 0,
                                             by="agi")


async def test_database_frozen_past_the_statement_timeout(gw: Gateway,
                                                          postgres: ThrowawayPostgres):
    load = Load(gw, workers=8)
    await asyncio.sleep(1.0)
    postgres.freeze()
    frozen_at = time.monotonic()
    await asyncio.sleep(COMMAND_TIMEOUT + 2.0)  # past the client's and the server's limits
    postgres.thaw()
    thawed_at = time.monotonic()
    await asyncio.sleep(2.0)
    answers = await load.stop()

    # callers were answered in bounded time, and rejected while the database was frozen
    assert max(a.seconds for a in answers) < WORST_ANSWER
    # answered while it was frozen (from a second in: an answer already on its way when
    # it froze may still arrive). Not only callers who asked after the freeze: one pool's
    # callers wait together behind one statement (the rater coalesces them), so all of
    # them may have asked before it and be answered, together, within it.
    during = [a for a in answers if frozen_at + 1.0 <= a.asked_at + a.seconds <= thawed_at]
    assert during and {a.reason for a in during} == {"GATEWAY_ERROR"}
    assert {a.reason for a in answers} <= {"FUNDED", "GATEWAY_ERROR"}
    # back to normal once thawed
    assert answers[-1].reason == "FUNDED"

    # what the PBX was told is what the database holds, once the voids are through
    async with asyncio.timeout(20):
        await gw.rater.wait_voided()
    await rejected_calls_hold_nothing(gw, answers)
    await end_allowed_calls(gw, answers)
    await assert_invariants(gw.pool)


async def readiness(gw: Gateway) -> bool:
    """What /readyz says, over HTTP, as a load balancer or the operator sees it."""
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{gw.http_port}/readyz",
            timeout=aiohttp.ClientTimeout(total=5)) as reply:
        body = await reply.json()
    assert (reply.status == 200) == (body["status"] == "ready"), body
    if reply.status != 200:
        assert body["failing"].keys() == {"database"}, body
    return reply.status == 200


async def test_database_stopped_and_restarted_during_call_load(
        gw: Gateway, postgres: ThrowawayPostgres):
    load = Load(gw, workers=4)
    emergency = Load(gw, workers=1, dialled="911")
    await asyncio.sleep(1.0)
    assert await readiness(gw)
    await asyncio.to_thread(postgres.stop, "fast")
    stopped_at = time.monotonic()
    assert not await readiness(gw)
    await asyncio.sleep(3.0)
    assert not await readiness(gw)
    restarted_at = time.monotonic()
    await asyncio.to_thread(postgres.start)
    # the pool reconnects by itself: no restart of the gateway
    for _ in range(75):  # 15 s
        if await readiness(gw):
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the gateway did not get ready again within 15 s of the restart")
    ready_at = time.monotonic()
    await asyncio.sleep(1.5)
    answers = await load.stop()
    emergencies = await emergency.stop()

    during = [a for a in answers if stopped_at <= a.asked_at
              and a.asked_at + a.seconds <= restarted_at]
    assert during and {a.reason for a in during} == {"GATEWAY_ERROR"}
    # refused at once: a stopped database costs the caller no wait
    assert max(a.seconds for a in during) < 1.0
    after = [a for a in answers if a.asked_at >= ready_at]
    assert after and {a.reason for a in after} == {"FUNDED"}
    assert max(a.seconds for a in answers) < WORST_ANSWER
    # emergency calls never depend on the database
    assert emergencies and {a.reason for a in emergencies} == {"EMERGENCY"}

    async with asyncio.timeout(20):
        await gw.rater.wait_voided()
    await rejected_calls_hold_nothing(gw, answers)
    await end_allowed_calls(gw, answers)
    await assert_invariants(gw.pool)


async def test_the_server_cancels_a_slow_statement_before_the_client_gives_up(database_url):
    """A statement that is only slow is rolled back by the server, which says so, before
    the client's timeout would leave its outcome unknown."""
    pool = await open_pool(database_url, min_size=1, max_size=2, command_timeout=2.0,
                           run_migrations=False)
    try:
        repo = Repository(pool)
        started = time.monotonic()
        with pytest.raises(Unavailable) as e:
            await repo._fetchrow("SELECT pg_sleep(3)")
        assert isinstance(e.value.__cause__, asyncpg.QueryCanceledError)
        assert time.monotonic() - started < 2.0
        # the connection is usable at once: nothing left to cancel
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_waiting_for_a_connection_is_bounded(database_url):
    pool = await open_pool(database_url, min_size=1, max_size=1, command_timeout=1.0,
                           run_migrations=False)
    try:
        async with pool.acquire():
            started = time.monotonic()
            # (asyncio.timeout only keeps the test from hanging when the bound is missing)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(3):
                    await pool.fetchval("SELECT 1")  # the only connection is taken
            assert time.monotonic() - started < 1.5
    finally:
        await pool.close()
