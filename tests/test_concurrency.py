"""Many calls at once on one pool or one wallet, in one process and in two: the
funded total never exceeds what exists, nothing deadlocks, the only refusal is
NO_BALANCE."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal

import pytest

from gateway.billing.rater import Rater
from tests.faults.invariants import assert_invariants
from tests.support.ledger import ledger_agrees
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

CALLS = 200


async def many_users(admin, n: int) -> None:
    """A tenant with n Calling Plan users, each with a 1-minute allotment: a pool of n
    minutes, shared by everyone."""
    await standard_tenant(admin, calling_plan_licences=n + 2)
    await admin.set_allotment("CA", "domestic", 1)
    for i in range(n):
        await admin.create_user(f"u{i}", TENANT, f"u{i}", "CA")
        await admin.assign_licence(f"u{i}", "business_voice_calling_plan")


async def test_one_pool_200_concurrent_authorisations(admin, repo, clock):
    await many_users(admin, 48)  # + alice and bob = 50 licences = 3000 s
    rater = Rater(repo, clock=clock, slice_seconds=60)
    results = await asyncio.gather(
        *(rater.authorise_outbound(f"u{i % 48}", "2125550100") for i in range(CALLS)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    funded = sum(d.funded_seconds for d in results if d.allow)
    assert funded == 3000  # exactly the capacity: every slice is one whole minute
    assert {d.reason.value for d in results if not d.allow} == {"NO_BALANCE"}
    assert sum(1 for d in results if d.allow) == 50
    await ledger_agrees(repo)


async def test_one_wallet_200_concurrent_authorisations_and_settlements(admin, repo, clock):
    await standard_tenant(admin, wallet="1.00")
    await admin.set_allotment("CA", "international", 0)  # bob's add-on holds nothing
    rater = Rater(repo, clock=clock, slice_seconds=60)

    async def cycle(i: int):
        d = await rater.authorise_outbound("alice" if i % 2 else "bob", "+442079460000")
        if d.allow and i % 3 == 0:
            await rater.settle(d.call_id, 30)  # billed 60 s = 0.05, frees nothing
        return d

    results = await asyncio.gather(*(cycle(i) for i in range(CALLS)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    allowed = [d for d in results if d.allow]
    assert len(allowed) == 20  # 1.00 at 0.05 per minute
    assert {d.reason.value for d in results if not d.allow} == {"NO_BALANCE"}
    w = await repo.get_wallet(TENANT)
    assert w["balance"] - w["reserved"] == 0
    assert w["balance"] >= 0
    await ledger_agrees(repo)


async def run_worker(url: str, caller: str, dialled: str, n: int, slice_seconds: int,
                     settle: bool | int) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.concurrency_worker", url, caller, dialled, str(n),
        str(slice_seconds), str(int(settle)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_two_gateway_processes_share_one_pool(admin, repo, database_url):
    await many_users(admin, 48)
    a, b = await asyncio.gather(
        run_worker(database_url, "u{m}", "2125550100", 100, 60, settle=False),
        run_worker(database_url, "alice", "2125550100", 100, 60, settle=True),
    )
    assert a["errors"] == [] and b["errors"] == []
    assert a["funded"] + b["funded"] == 3000
    assert set(a["reasons"]) | set(b["reasons"]) == {"FUNDED", "NO_BALANCE"}
    await ledger_agrees(repo)


async def test_two_gateway_processes_share_one_wallet(admin, repo, database_url):
    await standard_tenant(admin, wallet="2.00")
    await admin.set_allotment("CA", "international", 0)
    a, b = await asyncio.gather(
        run_worker(database_url, "alice", "+442079460000", 100, 60, settle=True),
        run_worker(database_url, "bob", "+442079460000", 100, 60, settle=False),
    )
    assert a["errors"] == [] and b["errors"] == []
    assert a["allowed"] + b["allowed"] == 40  # 2.00 at 0.05 per minute
    w = await repo.get_wallet(TENANT)
    assert w["balance"] - w["reserved"] == Decimal(0)
    await ledger_agrees(repo)


async def test_three_gateway_processes_coalescing_on_one_pool(admin, repo, database_url):
    """Each process sends its concurrent requests of the pool in shared statements
    (gw_pool_batch); together they still fund exactly the pool, and each call reported
    twice at once is settled once."""
    await many_users(admin, 48)  # 3000 s
    workers = await asyncio.gather(
        run_worker(database_url, "u{m}", "2125550123", 100, 60, settle=0),
        run_worker(database_url, "u{m}", "2125550123", 100, 60, settle=2),
        run_worker(database_url, "alice", "2125550123", 100, 60, settle=2),
    )
    assert [w["errors"] for w in workers] == [[], [], []]
    assert sum(w["funded"] for w in workers) == 3000  # one-minute slices, billed whole
    assert set().union(*(w["reasons"] for w in workers)) == {"FUNDED", "NO_BALANCE"}
    settled = workers[1]["allowed"] + workers[2]["allowed"]
    assert workers[1]["first_settlements"] + workers[2]["first_settlements"] == settled
    # the requests of each process went fewer statements than requests
    assert sum(w["batches"] for w in workers) < sum(w["requests"] for w in workers)
    charges = await repo.pool.fetchval("SELECT count(*) FROM ledger WHERE entry = 'charge'")
    assert charges == settled
    for row in await repo.open_calls():
        await Rater(repo).release(row["id"])
    await assert_invariants(repo.pool)
