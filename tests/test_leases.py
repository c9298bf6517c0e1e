"""A fleet of PBXs on one database (issue 9), in the store and billing layers: calls and
CDRs scoped by PBX name, the PBX leases (gw_lease), and settlements fenced by a lease,
against the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from gateway.ami.events import CoreShowChannel
from gateway.billing.rater import Rater, Renewal
from gateway.billing.recovery import Lease, Recovery
from gateway.calls.live import LiveCall, LiveCalls
from gateway.errors import Conflict, InvalidInput, NotOwner, Unavailable
from gateway.metrics import Metrics
from gateway.store.pool import open_pool
from gateway.store.repository import Repository
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.tenant import standard_tenant

pytestmark = pytest.mark.db

UNIQUEID = "1700000000.1"  # the same channel name on two Asterisks


@pytest.fixture
def recovery(repo):
    return Recovery(repo)


@pytest_asyncio.fixture
async def patient(database_url, repo):
    """A repository whose statements may wait on locks for long (the shared pool's server
    statement timeout is 4 s): for the tests that hold a lock on purpose."""
    pool = await open_pool(database_url, min_size=1, max_size=4, run_migrations=False,
                           command_timeout=60)
    yield Repository(pool)
    await pool.close()


async def call_row(repo, call_id):
    return await repo.pool.fetchrow(
        "SELECT pbx, pbx_uniqueid, state, billed_seconds, settled_by FROM calls WHERE id = $1",
        call_id)


async def waiting_on_lock(repo, query_part: str) -> int:
    """The backend whose statement containing ``query_part`` waits for a lock."""
    async with asyncio.timeout(20):
        while True:
            pid = await repo.pool.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'"
                " AND pid <> pg_backend_pid() LIMIT 1", query_part)
            if pid is not None:
                return pid
            await asyncio.sleep(0.02)


async def until_database_time_passes(repo, at: dt.datetime) -> None:
    async with asyncio.timeout(20):
        while True:
            if await repo.pool.fetchval("SELECT clock_timestamp() > $1", at):
                return
            await asyncio.sleep(0.05)


async def expire(repo, pbx: str) -> None:
    """The lease of ``pbx`` ran out (as its holder's death would leave it)."""
    await repo.pool.execute(
        "UPDATE pbx_leases SET expires_at = now() - interval '1 second' WHERE pbx = $1", pbx)


# ---- calls and CDRs, scoped by PBX ---------------------------------------------------------

async def test_the_same_uniqueid_on_two_pbxs_is_two_calls(admin, rater, repo):
    await standard_tenant(admin)
    one = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=UNIQUEID,
                                         pbx="pbx1")
    two = await rater.authorise_outbound("bob", "2125550100", pbx_uniqueid=UNIQUEID,
                                         pbx="pbx2")
    assert one.allow and two.allow and one.call_id != two.call_id
    assert await pool_row(repo) == (0, 600)
    s1 = await rater.settle(one.call_id, 65, by="agi")
    s2 = await rater.settle(two.call_id, 10, by="agi")
    assert (s1.outcome, s1.billed_seconds) == ("settled", 120)
    assert (s2.outcome, s2.billed_seconds) == ("settled", 60)
    assert tuple(await call_row(repo, one.call_id))[:4] == ("pbx1", UNIQUEID, "settled", 120)
    assert tuple(await call_row(repo, two.call_id))[:4] == ("pbx2", UNIQUEID, "settled", 60)
    assert (await repo.find_call_by_uniqueid("pbx1", UNIQUEID))["id"] == one.call_id
    assert (await repo.find_call_by_uniqueid("pbx2", UNIQUEID))["id"] == two.call_id
    assert await repo.find_call_by_uniqueid(UNIQUEID) is None  # PBX 'default' has none
    assert await pool_row(repo) == (180, 0)
    await ledger_agrees(repo)


async def test_the_same_uniqueid_twice_on_one_pbx_conflicts(admin, rater, repo):
    await standard_tenant(admin)
    for pbx in ("pbx1", "default"):
        d = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=UNIQUEID,
                                           pbx=pbx)
        assert d.allow
        with pytest.raises(Conflict) as e:
            await rater.authorise_outbound("bob", "2125550100", pbx_uniqueid=UNIQUEID,
                                           pbx=pbx)
        assert e.value.code == "DUPLICATE"
    assert await pool_row(repo) == (0, 600)  # the duplicates reserved nothing
    await ledger_agrees(repo)


async def test_a_call_without_a_pbx_name_is_the_default_pbxs(admin, rater, repo, recovery):
    await standard_tenant(admin)
    d = await rater.authorise_inbound("+15145550100", "2125550100", pbx_uniqueid=UNIQUEID)
    assert (await call_row(repo, d.call_id))["pbx"] == "default"
    assert await recovery.open_call_id(UNIQUEID) == d.call_id  # the form before names
    assert await recovery.open_call_id("default", UNIQUEID) == d.call_id
    assert await recovery.open_call_id("pbx1", UNIQUEID) is None


async def test_open_calls_are_read_per_pbx(admin, rater, recovery):
    await standard_tenant(admin)
    ids = {}
    for n, pbx in enumerate(("pbx1", "pbx2", "default", "pbx1")):
        d = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=f"17.{n}",
                                           pbx=pbx)
        ids[f"17.{n}"] = d.call_id
    await rater.release(ids["17.3"])
    assert [c.pbx_uniqueid for c in await recovery.open_calls("pbx1")] == ["17.0"]
    assert [c.pbx for c in await recovery.open_calls("pbx2")] == ["pbx2"]
    assert [c.pbx_uniqueid for c in await recovery.open_calls()] == ["17.2"]  # 'default'
    assert sorted(c.pbx for c in await recovery.open_calls(None)) == [
        "default", "pbx1", "pbx2"]
    call = await recovery.open_call("pbx2", "17.1")
    assert call is not None and (call.call_id, call.pbx) == (ids["17.1"], "pbx2")
    assert await recovery.open_call("pbx1", "17.1") is None
    assert await recovery.open_call("pbx1", "17.3") is None  # released: not open


async def add_cdr(repo, uniqueid, pbx, billsec, disposition="ANSWERED"):
    await repo.pool.execute(
        "INSERT INTO cdr (uniqueid, pbx, billsec, disposition) VALUES ($1, $2, $3, $4)",
        uniqueid, pbx, billsec, disposition)


async def test_cdr_records_are_read_per_pbx_and_a_nameless_one_is_the_defaults(
        repo, recovery):
    await add_cdr(repo, UNIQUEID, None, 30)  # a PBX whose dialplan has no GW_PBX
    await add_cdr(repo, UNIQUEID, "pbx2", 90)
    await add_cdr(repo, UNIQUEID, "pbx3", 0, "NO ANSWER")
    assert (await recovery.cdr("default", UNIQUEID)).billable_seconds == 30
    assert (await recovery.cdr(UNIQUEID)).billable_seconds == 30  # the form before names
    assert (await recovery.cdr("pbx2", UNIQUEID)).billable_seconds == 90
    assert (await recovery.cdr("pbx3", UNIQUEID)).disposition == "NO ANSWER"
    assert await recovery.cdr("pbx1", UNIQUEID) is None
    await add_cdr(repo, UNIQUEID, "default", 45)  # named 'default': the same PBX
    assert (await recovery.cdr("default", UNIQUEID)).billsec == 45  # the last one


async def test_cdr_table_check_is_per_pbx(admin, rater, repo, recovery, clock):
    await standard_tenant(admin)
    for n, pbx in enumerate(("pbx1", "pbx2", "default")):
        d = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=UNIQUEID,
                                           pbx=pbx)
        await rater.settle(d.call_id, 30 + n)
    await add_cdr(repo, UNIQUEID, "pbx1", 30)  # only pbx1 writes its records
    later = clock() + dt.timedelta(hours=1)
    assert (await recovery.cdr_table_check("pbx1", later)).state == "up"
    missing = await recovery.cdr_table_check("pbx2", later)
    assert (missing.state, missing.checked, missing.recorded) == ("missing", 1, 0)
    assert (await recovery.cdr_table_check(later)).state == "missing"  # 'default'
    assert (await recovery.cdr_table_check("pbx9", later)).state == "unverified"
    await add_cdr(repo, UNIQUEID, None, 32)  # a nameless record is the default PBX's
    assert (await recovery.cdr_table_check("default", later)).state == "up"
    assert await repo.cdr_coverage(later, settled_before=dt.timedelta(seconds=60),
                                   settled_after=dt.timedelta(days=7)) == (3, 2)


async def test_a_pbx_name_must_be_well_formed(admin, rater, repo, recovery):
    await standard_tenant(admin)
    for bad in ("", "pbx 1", "x" * 65, "pbx;1"):
        with pytest.raises(InvalidInput) as e:
            await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=UNIQUEID,
                                           pbx=bad)
        assert e.value.code == "INVALID_VALUE"
        with pytest.raises(InvalidInput):
            await recovery.lease(bad, "gw-a", 30)
    assert await pool_row(repo) == (0, 0)
    assert await recovery.leases() == []


# ---- leases --------------------------------------------------------------------------------

async def test_a_lease_is_taken_renewed_refused_taken_over_and_released(repo, recovery):
    first = await recovery.lease("pbx1", "gw-a", 30)  # absent: taken
    assert (first.pbx, first.owner, first.generation) == ("pbx1", "gw-a", 1)
    renewed = await recovery.lease("pbx1", "gw-a", 60)  # by its owner: renewed
    assert (renewed.owner, renewed.generation) == ("gw-a", 1)
    assert renewed.expires_at > first.expires_at
    refused = await recovery.lease("pbx1", "gw-b", 60)  # held by another: refused
    assert refused == Lease("pbx1", "gw-a", 1, renewed.expires_at)
    assert not refused.owned_by("gw-b") and refused.owned_by("gw-a")
    await expire(repo, "pbx1")
    taken = await recovery.lease("pbx1", "gw-b", 60)  # expired: taken over
    assert (taken.owner, taken.generation) == ("gw-b", 2)
    assert not await recovery.release_lease("pbx1", "gw-a")  # not gw-a's to give up
    assert await recovery.release_lease("pbx1", "gw-b")
    [released] = await recovery.leases()
    assert (released.owner, released.held) == ("gw-b", False)
    again = await recovery.lease("pbx1", "gw-a", 60)  # released: taken at once
    assert (again.owner, again.generation) == ("gw-a", 3)


async def test_a_lapsed_lease_taken_again_by_its_owner_is_a_new_tenure(repo, recovery):
    await recovery.lease("pbx1", "gw-a", 30)
    await expire(repo, "pbx1")
    again = await recovery.lease("pbx1", "gw-a", 30)
    assert (again.owner, again.generation) == ("gw-a", 2)


async def test_a_lease_expires_by_the_database_clock(repo, recovery):
    short = await recovery.lease("pbx1", "gw-a", Decimal("0.2"))
    await until_database_time_passes(repo, short.expires_at)
    taken = await recovery.lease("pbx1", "gw-b", 30)
    assert (taken.owner, taken.generation) == ("gw-b", 2)


async def test_leases_lists_every_pbx(recovery):
    await recovery.lease("pbx2", "gw-b", 30)
    await recovery.lease("pbx1", "gw-a", 30)
    assert [(x.pbx, x.owner, x.generation, x.held) for x in await recovery.leases()] == [
        ("pbx1", "gw-a", 1, True), ("pbx2", "gw-b", 1, True)]


@pytest.mark.parametrize("seconds", [0, -5])
async def test_a_lease_needs_positive_seconds(recovery, seconds):
    with pytest.raises(InvalidInput) as e:
        await recovery.lease("pbx1", "gw-a", seconds)
    assert e.value.code == "INVALID_VALUE"
    assert await recovery.leases() == []


async def test_processes_racing_for_a_lease_leave_exactly_one_owner(database_url, repo):
    """Several processes (each its own pool) ask for the same leases at once, absent and
    then expired: each time every answer names one and the same owner."""
    pools = [await open_pool(database_url, min_size=2, max_size=2, run_migrations=False)
             for _ in range(4)]
    try:
        contenders = [(f"gw-{n}", Recovery(Repository(p))) for n, p in enumerate(pools)]
        names = [f"pbx{n}" for n in range(10)]
        for generation in (1, 2):
            answers = await asyncio.gather(*(
                r.lease(name, owner, 30) for name in names for owner, r in contenders))
            for name in names:
                mine = [a for a in answers if a.pbx == name]
                assert len(mine) == len(contenders)
                assert len({(a.owner, a.generation, a.expires_at) for a in mine}) == 1, mine
                assert mine[0].generation == generation
            rows = await repo.pool.fetch("SELECT pbx, owner FROM pbx_leases")
            assert len(rows) == len(names)
            await repo.pool.execute("UPDATE pbx_leases SET expires_at = now()")
    finally:
        for p in pools:
            await p.close()


# ---- settlements and renewals fenced by the lease ---------------------------------------------

async def open_call(admin, rater, pbx="pbx1"):
    await standard_tenant(admin)
    d = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid=UNIQUEID, pbx=pbx)
    assert d.allow
    return d


async def test_a_fenced_settlement_needs_the_lease(admin, rater, repo, recovery):
    d = await open_call(admin, rater)
    fence = ("pbx1", "gw-a")
    with pytest.raises(NotOwner) as e:  # nobody holds the lease
        await rater.settle(d.call_id, 65, by="reconcile-cdr", fence=fence)
    assert e.value.code == "NOT_PBX_OWNER"
    await recovery.lease("pbx1", "gw-b", 30)
    with pytest.raises(NotOwner):  # another process holds it
        await rater.settle(d.call_id, 65, by="reconcile-cdr", fence=fence)
    with pytest.raises(NotOwner):  # a release is fenced the same way
        await rater.release(d.call_id, by="reconcile-estimate", fence=fence)
    await expire(repo, "pbx1")
    await recovery.lease("pbx1", "gw-a", 30)
    with pytest.raises(NotOwner):  # the right owner, another PBX
        await rater.settle(d.call_id, 65, by="reconcile-cdr", fence=("pbx2", "gw-a"))
    assert (await call_row(repo, d.call_id))["state"] == "authorised"
    assert await pool_row(repo) == (0, 300)
    await expire(repo, "pbx1")
    with pytest.raises(NotOwner):  # its own lease, expired
        await rater.settle(d.call_id, 65, by="reconcile-cdr", fence=fence)
    assert (await call_row(repo, d.call_id))["state"] == "authorised"
    await recovery.lease("pbx1", "gw-a", 30)
    s = await rater.settle(d.call_id, 65, by="reconcile-cdr", fence=fence)  # held
    assert (s.outcome, s.billed_seconds) == ("settled", 120)
    assert tuple(await call_row(repo, d.call_id))[2:] == ("settled", 120, "reconcile-cdr")
    assert await pool_row(repo) == (120, 0)
    await ledger_agrees(repo)


async def test_an_unfenced_settlement_needs_no_lease(admin, rater, repo, recovery):
    """The PBX's own reports (hangup, Cdr event) settle whoever owns the PBX."""
    d = await open_call(admin, rater)
    await recovery.lease("pbx1", "gw-b", 30)
    s = await rater.settle(d.call_id, 65, by="agi")
    assert s.outcome == "settled"


async def test_a_fenced_renewal_needs_the_lease(admin, rater, repo, recovery):
    d = await open_call(admin, rater)
    await recovery.lease("pbx1", "gw-b", 30)
    with pytest.raises(NotOwner):
        await rater.renew(d.call_id, fence=("pbx1", "gw-a"))
    assert await pool_row(repo) == (0, 300)  # nothing reserved
    r = await rater.renew(d.call_id, fence=("pbx1", "gw-b"))
    assert (r.slice_seconds, r.funded_seconds, r.open) == (300, 600, True)
    assert await pool_row(repo) == (0, 600)
    await ledger_agrees(repo)


async def test_a_fenced_settlement_inside_one_transaction_rolls_back_with_it(
        admin, rater, repo, recovery):
    d = await open_call(admin, rater)
    await recovery.lease("pbx1", "gw-a", 30)
    with pytest.raises(RuntimeError):
        async with repo.one_transaction() as tx:
            await tx.settle(d.call_id, 65, rater.clock(), "reconcile-cdr",
                            fence=("pbx1", "gw-a"))
            raise RuntimeError("abandon")
    assert (await call_row(repo, d.call_id))["state"] == "authorised"


async def test_a_take_over_in_flight_refuses_the_old_owners_settlement(
        admin, rater, repo, recovery, patient):
    """The old owner's settlement began while its lease was valid, and looks for the lease
    while the new owner's take-over (past the expiry) has not committed: it waits for the
    take-over, then finds the lease gone, and writes nothing."""
    d = await open_call(admin, rater)
    lease = await recovery.lease("pbx1", "gw-a", 2)
    with pytest.raises(NotOwner):
        async with patient.one_transaction() as old:  # its now() is before the expiry
            await until_database_time_passes(repo, lease.expires_at)
            async with patient.pool.acquire() as taker:
                tx = taker.transaction()
                await tx.start()
                taken = await taker.fetchrow("SELECT * FROM gw_lease('pbx1', 'gw-b', 30)")
                assert (taken["owner"], taken["generation"]) == ("gw-b", 2)
                settling = asyncio.create_task(old.settle(
                    d.call_id, 65, rater.clock(), "reconcile-cdr", fence=("pbx1", "gw-a")))
                await waiting_on_lock(repo, "gw_fence")
                assert not settling.done()
                await tx.commit()
            await settling
    assert (await call_row(repo, d.call_id))["state"] == "authorised"
    s = await rater.settle(d.call_id, 125, by="reconcile-cdr", fence=("pbx1", "gw-b"))
    assert (s.outcome, s.billed_seconds) == ("settled", 180)
    await ledger_agrees(repo)


async def test_a_fenced_settlement_in_flight_commits_before_the_take_over(
        admin, rater, repo, recovery, patient):
    """The old owner's settlement passed its fence, then its lease expired: the new
    owner's take-over waits for the settlement's commit (the fence), never the reverse."""
    d = await open_call(admin, rater)
    settler = Rater(patient, clock=rater.clock)
    async with patient.pool.acquire() as blocker:
        # hold the call's row: the settlement stops inside its fenced transaction
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM calls WHERE id = $1 FOR UPDATE", d.call_id)
        lease = await recovery.lease("pbx1", "gw-a", 2)
        settling = asyncio.create_task(
            settler.settle(d.call_id, 65, by="reconcile-cdr", fence=("pbx1", "gw-a")))
        settle_pid = await waiting_on_lock(repo, "gw_settle")
        await until_database_time_passes(repo, lease.expires_at)
        taking = asyncio.create_task(Recovery(patient).lease("pbx1", "gw-b", 30))
        take_pid = await waiting_on_lock(repo, "gw_lease")
        assert settle_pid in await repo.pool.fetchval("SELECT pg_blocking_pids($1)", take_pid)
        assert (await call_row(repo, d.call_id))["state"] == "authorised"
        await tx.commit()
    s = await settling
    assert (s.outcome, s.billed_seconds) == ("settled", 120)
    taken = await taking
    assert (taken.owner, taken.generation) == ("gw-b", 2)
    await ledger_agrees(repo)


# ---- the fence without a row lock (migration 009) ----------------------------------------------

async def test_a_frozen_fenced_transaction_cannot_keep_its_pbx_from_a_take_over(
        admin, rater, repo, recovery, patient):
    """The old owner froze inside a fenced settlement (SIGSTOP, a half-open link): it never
    sends another word. The server ends its idle transaction, and its fence with it, so
    another process takes the PBX over; the frozen settlement never commits."""
    d = await open_call(admin, rater)
    lease = await recovery.lease("pbx1", "gw-a", 3)
    patient.fence_idle_seconds = 1.0
    fenced = asyncio.Event()

    async def frozen_owner() -> None:
        async with patient.one_transaction() as tx:
            await tx.settle(d.call_id, 65, rater.clock(), "reconcile-cdr",
                            fence=("pbx1", "gw-a"))
            fenced.set()
            await asyncio.Event().wait()  # frozen: the transaction stays open, idle

    holder = asyncio.create_task(frozen_owner())
    await fenced.wait()
    await until_database_time_passes(repo, lease.expires_at)
    refused: list[str] = []
    try:
        async with asyncio.timeout(30):  # before the fix: refused for ever
            while True:
                try:
                    taken = await recovery.lease("pbx1", "gw-b", 3)
                    break
                except Unavailable as exc:
                    refused.append(exc.code)
    finally:
        holder.cancel()
        with contextlib.suppress(BaseException):
            await holder
    assert (taken.owner, taken.generation) == ("gw-b", 2)
    # while the frozen transaction lived, each attempt gave up at its lock timeout
    assert set(refused) <= {"LEASE_BUSY"}
    assert (await call_row(repo, d.call_id))["state"] == "authorised"
    s = await rater.settle(d.call_id, 125, by="reconcile-cdr", fence=("pbx1", "gw-b"))
    assert (s.outcome, s.billed_seconds) == ("settled", 180)
    await ledger_agrees(repo)


async def test_a_take_over_waits_for_fenced_writes_only_so_long(admin, rater, repo, recovery,
                                                                 patient):
    """A take-over waits for the fenced transactions in flight at most a sixth of the
    lease (half its renewal interval), then says the lease is busy: a lease attempt
    never hangs past its own interval."""
    d = await open_call(admin, rater)
    lease = await recovery.lease("pbx1", "gw-a", 3)
    patient.fence_idle_seconds = 60.0
    async with patient.one_transaction() as tx:
        await tx.settle(d.call_id, 65, rater.clock(), "reconcile-cdr", fence=("pbx1", "gw-a"))
        await until_database_time_passes(repo, lease.expires_at)
        with pytest.raises(Unavailable) as e:
            await recovery.lease("pbx1", "gw-b", 3)
        assert e.value.code == "LEASE_BUSY"
    # the settlement committed before any take-over; the next attempt takes the PBX
    assert (await call_row(repo, d.call_id))["state"] == "settled"
    taken = await recovery.lease("pbx1", "gw-b", 3)
    assert (taken.owner, taken.generation) == ("gw-b", 2)
    await ledger_agrees(repo)


async def test_the_owners_renewal_never_waits_for_its_own_fenced_writes(
        admin, rater, repo, recovery, patient):
    """A renewal of the lease by its holder does not conflict with the holder's fenced
    transactions: however many are in flight, the lease cannot run out behind them."""
    d = await open_call(admin, rater)
    first = await recovery.lease("pbx1", "gw-a", 30)
    patient.fence_idle_seconds = 60.0
    async with patient.one_transaction() as tx:
        await tx.renew(d.call_id, 300, rater.clock(), fence=("pbx1", "gw-a"))
        renewed = await recovery.lease("pbx1", "gw-a", 60)  # before the fix: blocked
        assert (renewed.owner, renewed.generation) == ("gw-a", 1)
        assert renewed.expires_at > first.expires_at
    assert await pool_row(repo) == (0, 600)  # the fenced renewal committed
    await ledger_agrees(repo)


async def test_a_waiting_take_over_is_not_overtaken_by_new_fenced_writes(
        admin, rater, repo, recovery, patient):
    """While a take-over waits for a fenced transaction, a new fenced write of the old
    owner queues behind the take-over (it does not slip past it), then finds the lease
    gone and writes nothing."""
    await standard_tenant(admin)
    one = await rater.authorise_outbound("alice", "2125550100", pbx_uniqueid="17.1", pbx="pbx1")
    two = await rater.authorise_outbound("bob", "2125550100", pbx_uniqueid="17.2", pbx="pbx1")
    lease = await recovery.lease("pbx1", "gw-a", 2)
    patient.fence_idle_seconds = 60.0
    late = Rater(patient, clock=rater.clock)
    async with patient.one_transaction() as tx:
        await tx.settle(one.call_id, 65, rater.clock(), "reconcile-cdr", fence=("pbx1", "gw-a"))
        await until_database_time_passes(repo, lease.expires_at)
        taking = asyncio.create_task(patient.lease("pbx1", "gw-b", 30, wait=60))
        take_pid = await waiting_on_lock(repo, "gw_lease")
        settling = asyncio.create_task(
            late.settle(two.call_id, 65, by="reconcile-cdr", fence=("pbx1", "gw-a")))
        settle_pid = await waiting_on_lock(repo, "gw_fence")
        assert take_pid in await repo.pool.fetchval("SELECT pg_blocking_pids($1)", settle_pid)
        assert not settling.done() and not taking.done()
    taken = await taking
    assert (taken["owner"], taken["generation"]) == ("gw-b", 2)
    with pytest.raises(NotOwner):
        await settling
    assert (await call_row(repo, one.call_id))["state"] == "settled"
    assert (await call_row(repo, two.call_id))["state"] == "authorised"
    await ledger_agrees(repo)


# ---- the lease keeper ---------------------------------------------------------------------------

async def test_a_lease_that_lapsed_and_was_taken_again_by_its_owner_adopts_its_calls_anew(
        admin, repo, clock):
    """An attempt timed out, the lease ran out in the database (a call's fenced renewal
    was refused meanwhile and gave up), and the next attempt took the lease again under
    the same owner. That is a new tenure: the table is dropped and the calls adopted again
    from the PBX, renewals and all."""
    from structlog.testing import capture_logs

    from tests.support.calls import LeasedAmi, Session, answer, leased_process

    await standard_tenant(admin)
    up = [CoreShowChannel(channel="PJSIP/alice-1", uniqueid="u1", linkedid="u1"),
          CoreShowChannel(channel="PJSIP/carrier-1", uniqueid="p1", linkedid="u1")]
    now = [1000.0]
    amis: list[LeasedAmi] = []
    svc, keeper = leased_process(Rater(repo, clock=clock), Recovery(repo), "gw-a",
                                 lambda: amis.append(LeasedAmi(up)) or amis[-1],
                                 monotonic=lambda: now[0])
    pbx = svc.pbx("pbx1")
    try:
        await keeper.attempt(strict=True)
        await svc.agi_outbound(Session("outbound", "2125550100", "alice", "u1", "pbx1",
                                       uniqueid="u1"))
        await pbx.on_dial_end(answer("u1", "PJSIP/carrier-1"))
        [before] = svc.live.values()
        assert before.renew_task is not None and pbx.lease.generation == 1

        await expire(repo, "pbx1")  # ran out while an attempt hung
        now[0] += 2  # well before the lease's end as this process counts it
        with capture_logs() as logs:
            await keeper.attempt()
            await keeper.served()
        assert [e["event"] for e in logs if e["event"].startswith("pbx_lease_")] == [
            "pbx_lease_lost", "pbx_lease_gained"]
        assert pbx.owned and pbx.lease.generation == 2 and pbx.lease_changes == 3
        assert before.renew_task.done() and amis[0].stopped and len(amis) == 2
        [after] = svc.live.values()
        assert after is not before and after.call_id == before.call_id
        assert after.dest_channel == "PJSIP/carrier-1"

        # the same generation, but asked for only after our lease's end as we count it:
        # as good as lapsed, the calls are adopted again all the same
        now[0] += 7
        with capture_logs() as logs:
            await keeper.attempt()
            await keeper.served()
        assert [e["event"] for e in logs if e["event"].startswith("pbx_lease_")] == [
            "pbx_lease_lost", "pbx_lease_gained"]
        assert pbx.owned and pbx.lease.generation == 2 and len(svc.live) == 1

        # in time, the same generation: nothing happens
        now[0] += 1
        with capture_logs() as logs:
            await keeper.attempt()
        assert [e["event"] for e in logs if e["event"].startswith("pbx_lease_")] == []
    finally:
        await keeper.stop()
        await svc.stop()
        await keeper.release()
    assert (await repo.pool.fetchval("SELECT state FROM calls")) == "answered"
    await ledger_agrees(repo)


class RefusingRater:
    """A rater whose first ``refusals`` renewals are refused by the fence."""

    slice_seconds = 3

    def __init__(self, refusals: int):
        self.refusals = refusals
        self.asked = 0

    async def renew(self, call_id, fence=None):
        self.asked += 1
        if self.asked <= self.refusals:
            raise NotOwner("gw-a does not hold the lease of PBX pbx1", code="NOT_PBX_OWNER")
        return Renewal(slice_seconds=0, funded_seconds=3, open=False)


@pytest.mark.parametrize("owned", [True, False])
async def test_a_renewal_refused_by_the_fence_is_tried_again_while_the_pbx_is_ours(owned):
    rater = RefusingRater(refusals=2)
    live = LiveCalls(rater, Metrics(), renew_before_seconds=30, monotonic=time.monotonic,
                     pbx="pbx1")
    live.fence = ("pbx1", "gw-a")
    live.owned = lambda: owned
    live.ami = object()  # a deadline link: renewals start
    call = LiveCall(call_id=uuid.uuid4(), direction="outbound", tenant_id="acme",
                    caller="alice", destination="12125550100", route="pstn", rated=True,
                    funded_seconds=0, uniqueid="u1", pbx="pbx1", dest_channel="PJSIP/c-1",
                    answered_mono=time.monotonic())
    live.track(call)
    live.start_renewals(call)
    assert call.renew_task is not None
    await asyncio.wait_for(call.renew_task, 30)
    # ours: tried again until the fence lets it through; another's: given up at once
    assert rater.asked == (3 if owned else 1)


# ---- start and stop of a process serving several PBXs ------------------------------------------

async def test_an_unreachable_pbx_does_not_stop_the_start_of_the_others(database_url):
    """pbx2's AMI cannot be reached: an outage, not a configuration error. The process
    starts, owns both PBXs, serves pbx2 without AMI and keeps trying its link."""
    from gateway.app import Gateway
    from gateway.config import Config, PbxConfig
    from tests.support.pbx.ports import free_port

    down = free_port()  # nothing listens there
    cfg = Config(database_url=database_url, agi_port=0, http_port=0, instance_name="gw-a",
                 pbx=(PbxConfig(name="pbx1"),
                      PbxConfig(name="pbx2", ami_host="127.0.0.1", ami_port=down,
                                ami_secret="s3cret")))
    gw = Gateway(cfg, configure_logs=False)
    try:
        await gw.start()  # before the fix: StartupError "ami: pbx2: AMI_UNREACHABLE ..."
        assert gw.calls.pbx("pbx1").owned and gw.calls.pbx("pbx2").owned
        assert gw.leases["pbx2"].ami is None
        assert gw.calls.pbx("pbx2").lease_error is None
    finally:
        await gw.stop()
    rows = await gw_leases(database_url)
    assert {r["pbx"]: r["held"] for r in rows} == {"pbx1": False, "pbx2": False}  # released


async def gw_leases(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT pbx, expires_at > now() AS held FROM pbx_leases")
    finally:
        await conn.close()


async def test_a_stop_hears_no_more_answers_once_it_stops_the_calls(database_url, admin):
    """At a stop the AMI links stop before the calls: an answer the PBX reports while the
    process stops can no longer start a renewal that nothing would cancel."""
    from gateway.app import Gateway
    from gateway.config import Config
    from tests.support.calls import LeasedAmi, Session, answer

    await standard_tenant(admin)
    gw = Gateway(Config(database_url=database_url, agi_port=0, http_port=0,
                        instance_name="gw-a"), configure_logs=False)
    await gw.start()
    pbx = gw.calls.pbx("default")
    ami = LeasedAmi()  # a link that delivers events until it is stopped
    pbx.attach_ami(ami)
    gw.leases["default"].ami = ami
    await gw.calls.agi_outbound(Session("outbound", "2125550100", "alice", "u1", "default",
                                        uniqueid="u1"))
    [call] = pbx.live.by_id.values()
    stop_calls = gw.calls.stop

    async def stop_then_hear_an_answer() -> None:
        await stop_calls()
        if not ami.stopped:  # the link still delivers: the PBX's DialEnd comes through
            await pbx.on_dial_end(answer("u1", "PJSIP/carrier-1"))

    gw.calls.stop = stop_then_hear_an_answer
    try:
        await gw.stop()
        assert ami.stopped
        assert call.renew_task is None or call.renew_task.done()
    finally:
        if call.renew_task is not None:
            call.renew_task.cancel()
