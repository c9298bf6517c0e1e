"""The rater's cheaper paths of migration 010. The one-round-trip authorisation of a
caller seen before: decided from the context read last time, recorded only while it is
still the tenant's, and the same decision as the two-trip path in every case; a stale
attempt writes nothing. The pool row written last in gw_authorise: re-checked under its
lock, and reserved the general way when the pool ran short meanwhile."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.billing.rater import Rater
from gateway.rating.model import Reason, Route
from gateway.store.repository import Repository
from tests.faults.invariants import assert_invariants
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db


class Counting(Repository):
    """The real repository, counting the round trips of the authorisation path."""

    def __init__(self, pool):
        super().__init__(pool)
        self.trips: list[str] = []

    async def find_caller(self, *a, **kw):
        self.trips.append("find_caller")
        return await super().find_caller(*a, **kw)

    async def authorise(self, **kw):
        self.trips.append("authorise")
        return await super().authorise(**kw)

    async def authorise_known(self, **kw):
        result = await super().authorise_known(**kw)
        self.trips.append("authorise_known" if result else "authorise_known:stale")
        return result


@pytest.fixture
def counting(repo):
    return Counting(repo.pool)


@pytest.fixture
def known_rater(counting, clock):
    return Rater(counting, clock=clock)


async def calls_count(repo) -> int:
    return await repo.pool.fetchval("SELECT count(*) FROM calls")


async def test_a_caller_seen_before_is_authorised_in_one_round_trip(
        admin, known_rater, counting, repo):
    await standard_tenant(admin, wallet="10")
    first = await known_rater.authorise_outbound("alice", "5145550123")
    assert counting.trips == ["find_caller", "authorise"]
    counting.trips.clear()
    second = await known_rater.authorise_outbound("alice", "5145550123")
    assert counting.trips == ["authorise_known"]
    for d in (first, second):
        assert (d.allow, d.reason, d.route, d.funded_seconds) == (
            True, Reason.FUNDED, Route.PSTN, 300)
    # international through the add-on, a rejection: the same decisions as a fresh rater
    fresh = Rater(repo, clock=known_rater.clock)
    for caller, dialled in (("bob", "+442079460000"), ("bob", "+449099000000"),
                            ("dave", "5145550123"), ("carol", "5145550123")):
        for _ in range(2):
            got = await known_rater.authorise_outbound(caller, dialled)
            want = await fresh.authorise_outbound(caller, dialled)
            fresh._known.clear()
            assert (got.allow, got.reason, got.route, got.funded_seconds) == (
                want.allow, want.reason, want.route, want.funded_seconds), (caller, dialled)
    assert "authorise_known" in counting.trips
    for d in (first, second):
        await known_rater.settle(d.call_id, 61)
    assert await pool_row(repo) == (240, 0)
    await ledger_agrees(repo)


async def test_a_number_ending_like_one_of_the_tenants_own_is_still_one_round_trip(
        admin, known_rater, counting, repo):
    """New York's 212 555 0100 ends with the same seven digits as alice's own number
    (+1 514 555 0100): only the dialled number's whole E.164 decides that it is not
    internal, as the two-trip path decides it (issue 10: every such call took three
    round trips). Her own number, dialled either way, is still internal."""
    await standard_tenant(admin)
    await known_rater.authorise_outbound("alice", "5145550123")
    counting.trips.clear()
    for dialled in ("2125550100", "+12125550100", "12125550100"):
        d = await known_rater.authorise_outbound("alice", dialled)
        assert (d.allow, d.route, d.destination) == (True, Route.PSTN, "+12125550100")
    assert counting.trips == ["authorise_known"] * 3
    for dialled in ("5145550100", "+15145550100"):
        d = await known_rater.authorise_outbound("bob", dialled)
        assert (d.allow, d.route, d.target) == (True, Route.INTERNAL, "alice"), dialled
    await ledger_agrees(repo)


async def test_a_changed_context_is_read_again_and_the_stale_attempt_writes_nothing(
        admin, known_rater, counting, repo):
    await standard_tenant(admin, wallet="10")
    d = await known_rater.authorise_outbound("alice", "5145550123")
    await known_rater.release(d.call_id)
    before = await calls_count(repo)
    await admin.unassign_licence("alice", "business_voice_calling_plan")
    counting.trips.clear()
    d = await known_rater.authorise_outbound("alice", "5145550123")
    assert (d.allow, d.reason) == (False, Reason.NO_LICENSE)
    assert counting.trips == ["authorise_known:stale", "find_caller", "authorise"]
    assert await calls_count(repo) == before + 1  # the rejection only
    # each kind of change the rules read makes the known context stale
    await admin.assign_licence("alice", "business_voice_calling_plan")
    d = await known_rater.authorise_outbound("alice", "+15145550123")
    await known_rater.release(d.call_id)
    fresh = Rater(repo, clock=known_rater.clock)
    changes = [
        (admin.update_tenant(TENANT, blocked_classes=["premium_rate", "domestic"]),
         Reason.BLOCKED_DESTINATION),
        (admin.update_tenant(TENANT, blocked_classes=["premium_rate"]), Reason.FUNDED),
        (admin.update_user("alice", usage_location="GB"), None),
        (admin.update_user("alice", usage_location="CA"), Reason.FUNDED),
        (admin.deactivate_user("alice"), Reason.UNKNOWN_CALLER),
    ]
    for change, reason in changes:
        await change
        counting.trips.clear()
        d = await known_rater.authorise_outbound("alice", "+15145550123")
        assert counting.trips[:2] == ["authorise_known:stale", "find_caller"], reason
        want = await fresh.authorise_outbound("alice", "+15145550123")
        fresh._known.clear()
        assert (d.allow, d.reason, d.sources) == (want.allow, want.reason, want.sources)
        for call in (d, want):
            if call.call_id is not None and call.allow:
                await known_rater.release(call.call_id)
        if reason is not None:
            assert d.reason is reason
    await ledger_agrees(repo)


async def test_a_change_made_by_hand_in_sql_makes_the_context_stale(
        admin, known_rater, counting, repo):
    await standard_tenant(admin)
    assert (await known_rater.authorise_outbound("alice", "5145550123")).allow
    await repo.pool.execute("DELETE FROM licence_assignments WHERE user_id = 'alice'")
    d = await known_rater.authorise_outbound("alice", "5145550123")
    assert (d.allow, d.reason) == (False, Reason.NO_LICENSE)
    await repo.pool.execute("UPDATE tenants SET name = 'Renamed' WHERE id = $1", TENANT)
    counting.trips.clear()
    await known_rater.authorise_outbound("alice", "5145550123")
    assert counting.trips == ["authorise_known:stale", "find_caller", "authorise"]


async def test_a_known_caller_dialling_an_internal_target_gets_the_internal_route(
        admin, known_rater, counting, repo):
    await standard_tenant(admin)
    assert (await known_rater.authorise_outbound("alice", "5145550123")).allow
    for dialled, target in (("102", "bob"), ("bob", "bob"), ("+15145550111", "bob"),
                            ("5145550100", "alice"), ("+15145550100", "alice")):
        counting.trips.clear()
        d = await known_rater.authorise_outbound("alice", dialled)
        assert (d.allow, d.reason, d.route, d.target) == (
            True, Reason.INTERNAL, Route.INTERNAL, target), dialled
        assert counting.trips == ["authorise_known:stale", "find_caller", "authorise"]
    # a number added after the context was read is internal at once
    await known_rater.authorise_outbound("alice", "5145550123")
    await admin.add_number("+15145550123", TENANT, "service", target="bob")
    d = await known_rater.authorise_outbound("alice", "5145550123")
    assert (d.reason, d.target) == (Reason.INTERNAL, "bob")
    assert await pool_row(repo) == (0, 600)  # the two calls before the number was added


async def test_an_endpoint_given_to_another_tenant_is_not_decided_from_the_old_one(
        admin, known_rater, counting, repo):
    await standard_tenant(admin)
    await standard_tenant(admin, tenant="other", prefix="o-")
    d = await known_rater.authorise_outbound("alice", "5145550123")
    assert d.tenant_id == TENANT
    await known_rater.release(d.call_id)
    await admin.deactivate_user("alice")
    await admin.create_user("alice2", "other", sip_endpoint="alice", usage_location="CA")
    await admin.assign_licence("alice2", "business_voice_calling_plan")
    d = await known_rater.authorise_outbound("alice", "5145550123")
    assert (d.allow, d.tenant_id) == (True, "other")
    call = await repo.find_call(d.call_id)
    assert (call["tenant_id"], call["user_id"]) == ("other", "alice2")


async def test_versions_never_repeat_for_a_tenant_created_again(admin, repo):
    await standard_tenant(admin)
    first = await repo.pool.fetchval(
        "SELECT context_version FROM tenants WHERE id = $1", TENANT)
    await repo.pool.execute("DELETE FROM tenants WHERE id = $1", TENANT)
    await standard_tenant(admin)
    again = await repo.pool.fetchval(
        "SELECT context_version FROM tenants WHERE id = $1", TENANT)
    assert again > first


async def test_known_callers_racing_a_licence_change_keep_the_invariants(
        admin, repo, clock):
    """Many concurrent authorisations from known callers while a licence comes and goes:
    each call is decided from a context that was current when it was recorded, and the
    counters agree with the ledger."""
    await standard_tenant(admin, wallet="50")
    rater = Rater(repo, clock=clock, slice_seconds=60)
    for caller in ("alice", "bob"):
        d = await rater.authorise_outbound(caller, "5145550123")
        await rater.settle(d.call_id, 30)

    async def churn():
        for _ in range(5):
            await admin.unassign_licence("alice", "business_voice_calling_plan")
            await asyncio.sleep(0)
            await admin.assign_licence("alice", "business_voice_calling_plan")

    async def one(i):
        d = await rater.authorise_outbound("alice" if i % 2 else "bob", "5145550123")
        if d.allow:
            await rater.settle(d.call_id, 45)
        return d

    decisions, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(60))),
                                        churn())
    assert {d.reason for d in decisions} <= {Reason.FUNDED, Reason.NO_LICENSE}
    assert all(d.allow for d in decisions if d.reason is Reason.FUNDED)
    # every recorded call of alice's that was allowed had her licence when recorded:
    # nothing allowed is left open, and the money agrees
    assert await repo.pool.fetchval(
        "SELECT count(*) FROM calls WHERE state IN ('authorised', 'answered')") == 0
    await ledger_agrees(repo)
    await assert_invariants(repo.pool)


# ---- the pool row written last (gw_authorise, migration 010) ---------------------------

async def test_a_pool_that_runs_short_while_waiting_for_its_lock_is_reserved_from_again(
        admin, rater, repo, database_url):
    """gw_authorise writes a pool-funded call's own rows first and updates the pool row
    last, re-checking under its lock what is free. When another authorisation took the
    pool while this one waited for the lock, its rows are taken back and the slice is
    reserved the general way: what the pool still has, then the wallet."""
    await standard_tenant(admin, wallet="10")  # alice and bob: 2 x 3000 min = 360,000 s
    capacity = await repo.pool.fetchval("SELECT gw_pool_capacity($1, 'CA')", TENANT)
    warm = await rater.authorise_outbound("alice", "5145550123")  # the month's pool row
    await rater.release(warm.call_id)
    other = await asyncpg.connect(database_url)
    try:
        tx = other.transaction()
        await tx.start()
        # another gateway reserves all but 120 s of the pool and has not committed yet
        taken = await other.fetchrow(
            "SELECT * FROM gw_authorise(gen_random_uuid(), $1, 'bob', 'outbound', 'bob',"
            " '+15145550199', 'domestic', 'ALLOW', 'FUNDED', 'pstn', NULL, NULL,"
            " 'domestic_overage', '{pool}', 'CA', $2, $3)",
            TENANT, capacity - 120, rater.clock())
        assert taken["funded"] == capacity - 120
        waiting = asyncio.create_task(rater.authorise_outbound("alice", "5145550123"))
        for _ in range(200):  # until it waits for the pool row's lock
            if await repo.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the authorisation never waited for the pool row")
        await tx.commit()
        d = await waiting
    finally:
        await other.close()
    assert (d.allow, d.funded_seconds) == (True, 300)
    funding = {r["source"]: r["reserved_seconds"] for r in await repo.pool.fetch(
        "SELECT source, reserved_seconds FROM call_funding WHERE call_id = $1", d.call_id)}
    assert funding == {"pool": 120, "wallet": 180}
    assert await pool_row(repo) == (0, capacity)
    # no row of the attempt that was taken back is left
    assert await repo.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE call_id = $1 AND entry = 'reserve'",
        d.call_id) == 2
    await rater.settle(d.call_id, 200)
    await ledger_agrees(repo)
