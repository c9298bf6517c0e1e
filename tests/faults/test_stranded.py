"""Lost settlements (issue 8 item 1): nothing stays reserved forever. A call whose end
was never reported is settled or released by reconciliation once it is past its funded
end plus the grace, from the PBX's record when there is one, else by the estimate of
docs/billing.md; with AMI or without. The real PostgreSQL, a settable clock, no PBX:
each case is what the gateway sees when the PBX's report is lost."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.ami.events import DialEnd
from gateway.billing.rater import Rater
from gateway.billing.recovery import Recovery
from gateway.calls.service import CallService
from tests.faults.invariants import assert_invariants
from tests.support.calls import FakeAmi, Session
from tests.support.ledger import pool_row
from tests.support.tenant import standard_tenant

pytestmark = [pytest.mark.faults, pytest.mark.db]

DOMESTIC = "2125550100"
GRACE = 60
RING = 300


def service(repo, clock, *, ami: FakeAmi | None = None, **kw) -> CallService:
    svc = CallService(Rater(repo, clock=clock), Recovery(repo), settle_grace_seconds=GRACE,
                      ring_allowance_seconds=RING, **kw)
    if ami is not None:
        svc.attach_ami(ami)
    return svc


class DeadAmi(FakeAmi):
    """The AMI link is down: no channel list."""

    async def live_channels(self):
        raise ConnectionError("AMI_DISCONNECTED")


async def call_up(svc: CallService, uniqueid: str, *, answered: bool) -> str:
    s = Session("outbound", DOMESTIC, "alice", uniqueid=uniqueid)
    await svc.agi_outbound(s)
    if answered:
        await svc.on_dial_end(DialEnd.parse({"Event": "DialEnd", "DialStatus": "ANSWER",
                                             "Uniqueid": uniqueid,
                                             "DestChannel": f"PJSIP/carrier-{uniqueid}"}))
    return s.vars["GW_CALL_ID"]


async def test_hangup_report_lost_with_ami_down_is_settled_after_the_funded_end(
        admin, repo, clock):
    await standard_tenant(admin)
    svc = service(repo, clock, ami=DeadAmi())
    await call_up(svc, "lost-1", answered=True)  # funded 300 s; its hangup never reported
    clock.advance(seconds=300 + GRACE - 1)
    counts = await svc.reconcile()
    assert counts["kept"] == 1 and await pool_row(repo) == (0, 300)  # may still be up
    clock.advance(seconds=2)
    counts = await svc.reconcile()
    assert counts["expired"] == 1
    row = await repo.pool.fetchrow("SELECT * FROM calls")
    # seen answered, no record: billed to its funded end, where the PBX cut it
    assert (row["state"], row["billed_seconds"], row["settled_by"]) == (
        "settled", 300, "reconcile-expired")
    assert svc.live == {}
    await svc.stop()
    await assert_invariants(repo.pool)


async def test_gateway_without_ami_releases_a_call_never_seen_answered(admin, repo, clock):
    await standard_tenant(admin)
    svc = service(repo, clock)  # no AMI at all: no answer seen, no channels
    await call_up(svc, "no-ami", answered=False)
    clock.advance(seconds=RING + 300 + GRACE - 1)  # it may have rung, then talked
    assert (await svc.reconcile())["kept"] == 1
    clock.advance(seconds=2)
    assert (await svc.reconcile())["expired"] == 1
    row = await repo.pool.fetchrow("SELECT * FROM calls")
    assert (row["state"], row["billed_seconds"]) == ("released", 0)
    assert svc.live == {}
    await assert_invariants(repo.pool)


async def test_without_ami_the_cdr_table_settles_exactly_and_at_once(admin, repo, clock):
    await standard_tenant(admin)
    svc = service(repo, clock)
    call_id = await call_up(svc, "no-ami-cdr", answered=False)
    await repo.pool.execute("INSERT INTO cdr (uniqueid, billsec, disposition)"
                            " VALUES ('no-ami-cdr', 42, 'ANSWERED')")
    clock.advance(seconds=50)  # well before any funded end: the record is enough
    counts = await svc.reconcile()
    assert counts["settled"] == 1
    row = await repo.pool.fetchrow("SELECT * FROM calls WHERE id = $1::uuid", call_id)
    assert (row["billable_seconds"], row["billed_seconds"], row["settled_by"]) == (
        42, 60, "reconcile-cdr")
    assert svc.live == {}
    await assert_invariants(repo.pool)


async def test_over_long_answered_time_is_refused_then_settled_by_the_timer(admin, repo,
                                                                            clock):
    await standard_tenant(admin)
    ami = DeadAmi()
    svc = service(repo, clock, ami=ami)
    call_id = await call_up(svc, "8-days", answered=True)
    eight_days_ms = str(8 * 86400 * 1000)
    await svc.agi_hangup(Session("hangup", call_id, eight_days_ms, "ANSWER", "691200"))
    row = await repo.pool.fetchrow("SELECT * FROM calls")
    assert row["state"] == "answered"  # the report was refused: not a call's length
    clock.advance(seconds=300 + GRACE - 1)
    assert (await svc.reconcile())["kept"] == 1  # the AMI link is down: it may be up
    clock.advance(seconds=2)
    timer = asyncio.create_task(svc.run_reconciler(0.05))  # the timer, not a direct call
    try:
        for _ in range(100):
            row = await repo.pool.fetchrow("SELECT * FROM calls")
            if row["state"] == "settled":
                break
            await asyncio.sleep(0.05)
    finally:
        timer.cancel()
    assert (row["state"], row["billed_seconds"], row["settled_by"]) == (
        "settled", 300, "reconcile-expired")
    assert svc.live == {}
    await svc.stop()
    await assert_invariants(repo.pool)


async def test_live_table_forgets_calls_the_database_has_ended(admin, repo, clock):
    await standard_tenant(admin)
    svc = service(repo, clock, ami=DeadAmi())
    ids = [await call_up(svc, f"ended-{i}", answered=False) for i in range(5)]
    # settled elsewhere (another process's report, an operator) while this one is blind
    for call_id in ids:
        await svc.rater.release(uuid.UUID(call_id), by="api")
    assert len(svc.live) == 5
    counts = await svc.reconcile()
    assert counts["forgotten"] == 5 and svc.live == {}
    await assert_invariants(repo.pool)


async def test_unanswered_call_of_a_live_gateway_is_released_once_expired(admin, repo, clock):
    """Nothing stays reserved forever, whoever owns the call."""
    await standard_tenant(admin)
    other = service(repo, clock, ami=DeadAmi())
    await call_up(other, "theirs", answered=False)
    await repo.pool.execute("UPDATE calls SET owner = 'gw-alive'")
    await repo.heartbeat("gw-alive")
    me = service(repo, clock, ami=DeadAmi(), instance_id="gw-me")
    clock.advance(seconds=RING + 300 + GRACE + 1)
    assert (await me.reconcile())["expired"] == 1
    await assert_invariants(repo.pool)


async def test_an_unrated_call_holds_nothing_and_is_closed_only_after_a_week(admin, repo,
                                                                           clock):
    await standard_tenant(admin)
    svc = service(repo, clock)  # no AMI
    await svc.agi_outbound(Session("outbound", "102", "carol", uniqueid="internal"))
    clock.advance(days=6)  # an internal call has no funded end: it may still be up
    assert (await svc.reconcile())["kept"] == 1
    clock.advance(days=1, seconds=RING + GRACE + 1)
    assert (await svc.reconcile())["expired"] == 1
    row = await repo.pool.fetchrow("SELECT * FROM calls")
    assert (row["route"], row["state"], row["billed_seconds"]) == ("internal", "released", 0)
    await assert_invariants(repo.pool)
