"""The call lifecycle against the real PostgreSQL, with a recording AGI session and a
fake AMI link (the real PBX proves the same paths in test_e2e_*)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from decimal import Decimal

import pytest

from gateway import dialplan_variables as var
from gateway.ami import AMI_ACTION_FAILED, AMI_DISCONNECTED, AmiError
from gateway.ami import client as ami_client
from gateway.ami.events import (
    Cdr,
    CoreShowChannel,
    CoreStatus,
    LinkLife,
    uniqueid_epoch,
)
from gateway.billing.rater import Rater
from gateway.billing.recovery import OpenCall, Recovery
from gateway.calls.reconcile import PbxRun, Reconciler
from gateway.calls.service import CallService
from tests.support.ami import SECRET as AMI_SECRET
from tests.support.ami import USERNAME as AMI_USERNAME
from tests.support.ami import FakeAmi as FakeAmiServer
from tests.support.calls import FakeAmi, LeasedAmi, Session, answer, leased_process
from tests.support.gateway import running_gateway
from tests.support.ledger import ledger_agrees, pool_row
from tests.support.tenant import TENANT, standard_tenant
from tests.support.waiting import eventually

pytestmark = pytest.mark.db


@pytest.fixture
def service(rater, repo):
    svc = CallService(rater, Recovery(repo), renew_before_seconds=30)
    svc.attach_ami(FakeAmi())
    yield svc


async def test_outbound_allow_sets_variables_decision_last(admin, service, repo):
    await standard_tenant(admin)
    s = Session("outbound", "2125550100", "alice", "1700000000.1")
    await service.agi_outbound(s)
    v = s.vars
    assert s.variables[-1] == (var.DECISION, "ALLOW")
    assert (v[var.ROUTE], v[var.NUMBER], v[var.FUNDED]) == ("pstn", "12125550100", "300")
    # only what the dialplan reads after an ALLOW (each variable is an AMI message)
    assert [name for name, _ in s.variables] == [
        var.REASON, var.CALL_ID, var.HANGUP_HANDLER, var.ROUTE, var.NUMBER, var.FUNDED,
        var.DECISION]
    assert v[var.HANGUP_HANDLER] == "gateway-hangup,s,1"
    assert v[var.REASON] == "FUNDED"
    assert len(service.live) == 1
    row = await repo.find_call_by_uniqueid("1700000000.1")
    assert str(row["id"]) == v[var.CALL_ID]
    assert service.metrics.reason_counts[("outbound", "ALLOW", "FUNDED")] == 1


async def test_outbound_reject_carries_the_cause(admin, service):
    await standard_tenant(admin)
    s = Session("outbound", "2125550100", "carol")
    await service.agi_outbound(s)
    assert (s.vars[var.DECISION], s.vars[var.REASON], s.vars[var.CAUSE]) == (
        "REJECT", "NO_LICENSE", "50")
    assert service.live == {}


async def test_internal_call_names_the_target(admin, service):
    await standard_tenant(admin)
    s = Session("outbound", "102", "carol")
    await service.agi_outbound(s)
    assert (s.vars[var.DECISION], s.vars[var.ROUTE], s.vars[var.TARGET],
            s.vars[var.FUNDED]) == ("ALLOW", "internal", "bob", "")


async def test_rater_failure_fails_closed_but_emergency_goes(admin, service):
    class Broken:
        async def find_caller(self, *a):
            raise OSError("database down")

    service.rater.repo = Broken()
    s = Session("outbound", "2125550100", "alice")
    await service.agi_outbound(s)
    assert (s.vars[var.DECISION], s.vars[var.REASON], s.vars[var.CAUSE]) == (
        "REJECT", "GATEWAY_ERROR", "34")
    s = Session("outbound", "911", "alice", uniqueid="2")
    await service.agi_outbound(s)
    assert (s.vars[var.DECISION], s.vars[var.ROUTE]) == ("ALLOW", "emergency")


async def test_channel_gone_mid_reply_never_leaves_allow(admin, service, repo):
    await standard_tenant(admin)
    s = Session("outbound", "2125550100", "alice", fail_after=3)
    await service.agi_outbound(s)
    assert var.DECISION not in s.vars
    # the reservation is still held, and reconcile releases it once it is stale
    service.stale_after = 0
    counts = await service.reconcile()
    assert counts["released"] == 1
    assert await pool_row(repo) == (0, 0)


async def test_hangup_report_settles_and_cdr_after_changes_nothing(admin, service, repo):
    await standard_tenant(admin)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-1")
    await service.agi_outbound(s)
    call_id = s.vars[var.CALL_ID]
    await service.on_dial_end(answer("u-1", "PJSIP/carrier-00000002"))
    assert (await repo.find_call(service.live[next(iter(service.live))].call_id))["state"] \
        == "answered"
    await service.agi_hangup(Session("hangup", call_id, "61200", "ANSWER", "61"))
    await service.on_cdr(Cdr(uniqueid="u-1", disposition="ANSWERED", billable_seconds=75))
    assert await pool_row(repo) == (120, 0)  # 61.2 s -> 61 -> two minutes, once
    assert service.live == {}
    assert service.metrics.settlements.labels("agi", "settled")._value.get() == 1
    await ledger_agrees(repo)


async def test_the_cdr_of_a_call_settled_here_costs_no_database_lookup(
        admin, service, repo, monkeypatch):
    """After this process settled a call from its hangup report, the PBX's Cdr for it
    (which comes after) is known settled without asking the database (issue 10: one
    query a call less); a Cdr of a call this process did not settle still asks."""
    from gateway.billing.recovery import Recovery
    asked: list[str | None] = []
    real = Recovery.open_call_id

    async def counted(self, pbx, uniqueid=None):
        asked.append(uniqueid)
        return await real(self, pbx, uniqueid)

    monkeypatch.setattr(Recovery, "open_call_id", counted)
    await standard_tenant(admin)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-7")
    await service.agi_outbound(s)
    await service.on_dial_end(answer("u-7", "PJSIP/carrier-00000002"))
    await service.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "3200", "ANSWER", "3"))
    await service.on_cdr(Cdr(uniqueid="u-7", disposition="ANSWERED", billable_seconds=3))
    await service.on_cdr(Cdr(uniqueid="u-7", disposition="ANSWERED", billable_seconds=3))
    assert asked == []
    await service.on_cdr(Cdr(uniqueid="u-elsewhere", disposition="ANSWERED",
                             billable_seconds=3))
    assert asked == ["u-elsewhere"]
    assert (await repo.find_call(uuid.UUID(s.vars[var.CALL_ID])))["billable_seconds"] == 3
    await ledger_agrees(repo)


async def test_cdr_alone_settles_and_unanswered_releases(admin, service, repo):
    await standard_tenant(admin, wallet="5")
    s = Session("outbound", "+442079460000", "alice", uniqueid="u-2")
    await service.agi_outbound(s)
    await service.on_cdr(Cdr(uniqueid="u-2", disposition="NO ANSWER", billable_seconds=0))
    w = await repo.get_wallet(TENANT)
    assert (w["balance"], w["reserved"]) == (Decimal(5), 0)
    assert service.live == {}


async def per_second_service(admin, repo, clock, ami, slice_seconds=3):
    await standard_tenant(admin)
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.02", "first_increment": 1,
                            "increment": 1}])
    svc = CallService(Rater(repo, clock=clock, slice_seconds=slice_seconds),
                      Recovery(repo), renew_before_seconds=30)
    svc.attach_ami(ami)
    return svc


async def test_renewal_moves_the_deadline_on_the_callee(admin, repo, clock):
    ami = FakeAmi()
    svc = await per_second_service(admin, repo, clock, ami, slice_seconds=2)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-3")
    await svc.agi_outbound(s)
    assert s.vars[var.FUNDED] == "2"
    await svc.on_dial_end(answer("u-3", "PJSIP/carrier-00000009"))
    await asyncio.sleep(2.6)  # renewals at ~1 s and ~3 s... at least two by now
    assert len(ami.setvars) >= 1
    channel, variable, value, _ = ami.setvars[0]
    assert (channel, variable) == ("PJSIP/carrier-00000009", "TIMEOUT(absolute)")
    assert 2.5 <= float(value) <= 3.5  # 4 s funded, renewed ~1 s after answer
    call = next(iter(svc.live.values()))
    assert call.funded_seconds >= 4
    await svc.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "2600", "ANSWER", "2"))
    await asyncio.sleep(0)
    assert call.renew_task.done()
    used, reserved = await pool_row(repo)
    assert (used, reserved) == (2, 0)  # 2.6 s: whole seconds, as the CDR counts them
    await svc.stop()


@pytest.mark.parametrize(("late", "counted"), [(2.0, 2.0), (0.0, 0.0), (-3.0, 0.0),
                                                (45.0, 10.0)])
async def test_an_answer_heard_late_counts_from_when_the_pbx_sent_it(admin, repo, clock,
                                                                      late, counted):
    """A DialEnd heard ``late`` seconds after the PBX sent it (its ``Timestamp``): the
    funded end counts from the PBX's answer, so a deadline moved later is not later by
    that much (one CI run under load: DialEnds 4 s late, a re-sent deadline let a call
    talk 13 s on 8 s funded). A PBX clock ahead of ours counts as on time; one far
    behind, as ``EVENT_LAG_MAX_SECONDS`` late."""
    ami = FakeAmi()
    svc = await per_second_service(admin, repo, clock, ami, slice_seconds=3)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-late")
    await svc.agi_outbound(s)
    heard = dataclasses.replace(answer("u-late", "PJSIP/carrier-0000000c"),
                                sent_at=clock().timestamp() - late)
    heard_at = asyncio.get_running_loop().time()
    await svc.on_dial_end(heard)
    call = next(iter(svc.live.values()))
    row = await repo.find_call(call.call_id)
    assert row["answered_at"] == clock() - dt.timedelta(seconds=counted)
    for _ in range(100):  # the first renewal (6 s funded) moves the deadline
        if ami.setvars or call.renew_task.done():
            break
        await asyncio.sleep(0.05)
    if counted >= 6:
        # answered 10 s ago by the PBX's clock: 6 s funded ended before we heard it, the
        # PBX has cut the call at its own deadline; nothing is moved
        assert ami.setvars == [] and call.renew_task.done()
        await svc.stop()
        return
    [(channel, variable, value, sent)] = ami.setvars[:1]
    assert (channel, variable) == ("PJSIP/carrier-0000000c", "TIMEOUT(absolute)")
    assert call.funded_seconds >= 6
    # the time left when it was sent, counted from the PBX's answer (0.5 s at the least)
    left = max(6 - counted - (sent - heard_at), 0.5)
    assert abs(float(value) - left) <= 0.1, (value, left)
    await svc.stop()


async def test_no_more_funding_leaves_the_deadline_alone(admin, repo, clock):
    await standard_tenant(admin)
    await admin.set_allotment("CA", "domestic", 0)
    await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                            "price_per_minute": "0.60", "first_increment": 1,
                            "increment": 1}])
    await admin.topup(TENANT, "0.02")  # two seconds of overage
    rater = Rater(repo, clock=clock, slice_seconds=2)
    svc = CallService(rater, Recovery(repo))
    ami = FakeAmi()
    svc.attach_ami(ami)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-4")
    await svc.agi_outbound(s)
    assert s.vars[var.FUNDED] == "2"
    await svc.on_dial_end(answer("u-4", "PJSIP/carrier-0000000a"))
    await asyncio.sleep(1.5)
    assert ami.setvars == []  # nothing more could be reserved: the PBX keeps its deadline
    assert svc.metrics.reservations.labels("exhausted")._value.get() == 1
    await svc.stop()


async def test_reconcile_settles_from_cdr_adopts_live_and_estimates(admin, service, repo,
                                                                    clock):
    await standard_tenant(admin)
    for uid in ("gone-cdr", "still-up", "gone-no-record"):
        await service.agi_outbound(Session("outbound", "2125550100", "alice", uniqueid=uid))
    for uid in ("gone-cdr", "still-up", "gone-no-record"):
        await service.on_dial_end(answer(uid, f"PJSIP/carrier-{uid}"))
    # a restart: a new service knows nothing of these calls
    fresh = CallService(service.rater, Recovery(repo), stale_after_seconds=10)
    ami = FakeAmi()
    fresh.attach_ami(ami)
    ami.channels = [
        CoreShowChannel(channel="PJSIP/alice-1", uniqueid="still-up", linkedid="still-up"),
        CoreShowChannel(channel="PJSIP/carrier-x", uniqueid="peer", linkedid="still-up"),
    ]
    await repo.pool.execute(
        "INSERT INTO cdr (uniqueid, billsec, disposition) VALUES ('gone-cdr', 100, 'ANSWERED')")
    clock.advance(seconds=40)
    counts = await fresh.reconcile()
    assert {k: counts[k] for k in ("adopted", "settled", "released", "estimated", "kept")} \
        == {"adopted": 1, "settled": 1, "released": 0, "estimated": 1, "kept": 0}
    rows = {r["pbx_uniqueid"]: r for r in await repo.pool.fetch("SELECT * FROM calls")}
    assert (rows["gone-cdr"]["state"], rows["gone-cdr"]["billed_seconds"],
            rows["gone-cdr"]["settled_by"]) == ("settled", 120, "reconcile-cdr")
    assert (rows["gone-no-record"]["billed_seconds"],
            rows["gone-no-record"]["settled_by"]) == (60, "reconcile-estimate")
    assert rows["still-up"]["state"] == "answered"
    adopted = fresh.live[rows["still-up"]["id"]]
    assert adopted.dest_channel == "PJSIP/carrier-x"
    await fresh.stop()
    await service.stop()
    await ledger_agrees(repo)


async def test_reconcile_of_one_pbx_adopts_all_its_calls_and_leaves_other_pbxs_alone(
        admin, repo, clock):
    """Every open call of an owned PBX is followed, whichever process authorised it (the
    old rule, "calls of other live processes stay theirs", is the lease's job now); a
    call of another PBX is never looked at, even under the same uniqueid."""
    await standard_tenant(admin)
    svc = CallService(Rater(repo, clock=clock), Recovery(repo), pbxes=("pbx1", "pbx2"),
                      stale_after_seconds=10)
    ami1, ami2 = FakeAmi(), FakeAmi()
    svc.attach_ami(ami1, "pbx1")
    svc.attach_ami(ami2, "pbx2")
    for pbx in ("pbx1", "pbx2"):  # the same uniqueid on both PBXs
        await svc.agi_outbound(Session("outbound", "2125550100", "alice", "same", pbx,
                                       uniqueid="same"))
    await svc.agi_outbound(Session("outbound", "2125550100", "alice", "other", "pbx1",
                                   uniqueid="other"))
    # authorised by another process, alive or not: no longer a reason to keep off
    await repo.pool.execute("UPDATE calls SET owner = 'gw-live'")
    await repo.heartbeat("gw-live")
    rows = {(r["pbx"], r["pbx_uniqueid"]): r for r in await repo.pool.fetch(
        "SELECT * FROM calls")}
    assert set(rows) == {("pbx1", "same"), ("pbx2", "same"), ("pbx1", "other")}
    fresh = CallService(svc.rater, Recovery(repo), pbxes=("pbx1", "pbx2"),
                        instance_id="gw-me", stale_after_seconds=10)
    ami1.channels = [
        CoreShowChannel(channel="PJSIP/alice-1", uniqueid="same", linkedid="same"),
        CoreShowChannel(channel="PJSIP/alice-2", uniqueid="other", linkedid="other"),
    ]
    fresh.attach_ami(ami1, "pbx1")
    fresh.attach_ami(ami2, "pbx2")  # pbx2 lists no channel: its call has ended
    counts = await fresh.pbx("pbx1").reconcile()
    assert (counts["adopted"], counts["kept"]) == (2, 0)
    assert {(c.pbx, c.uniqueid) for c in fresh.live.values()} == {("pbx1", "same"),
                                                                  ("pbx1", "other")}
    clock.advance(seconds=11)
    counts = await fresh.pbx("pbx2").reconcile()
    assert (counts["adopted"], counts["released"]) == (0, 1)
    states = {(r["pbx"], r["pbx_uniqueid"]): r["state"] for r in await repo.pool.fetch(
        "SELECT * FROM calls")}
    assert states == {("pbx1", "same"): "authorised", ("pbx2", "same"): "released",
                      ("pbx1", "other"): "authorised"}
    await fresh.stop()
    await svc.stop()
    await ledger_agrees(repo)


async def test_calls_remember_the_process_that_authorised_them(database_url, admin):
    from gateway.store.pool import open_pool
    from gateway.store.repository import Repository

    await standard_tenant(admin)
    pool = await open_pool(database_url, min_size=1, max_size=2, run_migrations=False,
                           instance_id="gw-42")
    try:
        d = await Rater(Repository(pool)).authorise_outbound("alice", "2125550100")
        assert await pool.fetchval("SELECT owner FROM calls WHERE id = $1", d.call_id) == "gw-42"
    finally:
        await pool.close()


async def test_one_canonical_line_per_decision_and_settlement_with_the_call_ids(admin,
                                                                                service):
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    await standard_tenant(admin)
    with capture_logs(processors=[merge_contextvars]) as logs:
        s = Session("outbound", "2125550100", "alice", uniqueid="u-log")
        await service.agi_outbound(s)
        await service.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "30500", "ANSWER",
                                         "30", uniqueid="u-log"))
    decisions = [e for e in logs if e["event"] == "decision"]
    settlements = [e for e in logs if e["event"] == "settlement"]
    assert len(decisions) == 1 and len(settlements) == 1
    assert decisions[0]["uniqueid"] == "u-log" and decisions[0]["agi"] == "outbound"
    assert decisions[0]["call_id"] == s.vars[var.CALL_ID]
    assert (settlements[0]["uniqueid"], settlements[0]["billed_seconds"]) == ("u-log", 60)


# restart and recovery (issue 8 items 3 and 8) -------------------------------------------

def test_the_instance_name_is_stable_per_node_and_port():
    from gateway.app import instance_name
    from gateway.config import Config

    assert instance_name(Config(agi_port=4573)) == instance_name(Config(agi_port=4573))
    assert instance_name(Config(agi_port=4573)) != instance_name(Config(agi_port=4574))
    assert instance_name(Config(instance_name="gw-a", agi_port=4573)) == "gw-a"
    assert instance_name(Config(agi_port=0)) != instance_name(Config(agi_port=0))


async def test_restart_adopts_its_previous_incarnations_calls_at_once(admin, service, repo):
    await standard_tenant(admin)
    await service.agi_outbound(Session("outbound", "2125550100", "alice", uniqueid="mine"))
    await service.on_dial_end(answer("mine", "PJSIP/carrier-mine"))
    # killed a moment ago: its heartbeat is fresh, and the restart has the same name
    await repo.pool.execute("UPDATE calls SET owner = 'node1-4573'")
    await repo.heartbeat("node1-4573")
    again = CallService(service.rater, Recovery(repo), instance_id="node1-4573")
    ami = FakeAmi()
    again.attach_ami(ami)
    ami.channels = [
        CoreShowChannel(channel="PJSIP/alice-1", uniqueid="mine", linkedid="mine"),
        CoreShowChannel(channel="PJSIP/carrier-mine", uniqueid="peer", linkedid="mine"),
    ]
    counts = await again.reconcile()
    assert counts["adopted"] == 1
    await asyncio.sleep(0.05)
    # the deadline is put where the funding ends at once (the dead process may have
    # renewed without moving it), then renewals go on
    assert [s[:2] for s in ami.setvars] == [("PJSIP/carrier-mine", "TIMEOUT(absolute)")]
    assert 290 <= float(ami.setvars[0][2]) <= 300
    await again.stop()
    await service.stop()


async def test_the_heartbeat_only_says_the_process_is_alive(admin, service, repo):
    """Other processes' heartbeats no longer decide anything: a PBX's lease does."""
    me = CallService(service.rater, Recovery(repo), instance_id="gw-me",
                     heartbeat_seconds=0.05)
    await repo.heartbeat("gw-other")
    await repo.pool.execute("UPDATE gateway_instances SET last_seen = now()"
                            " - interval '1 hour' WHERE id = 'gw-other'")
    beat = asyncio.create_task(me.run_heartbeat())
    try:
        for _ in range(100):
            if "gw-me" in await repo.live_instances(60):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a few more beats; another process's expiry does nothing
    finally:
        beat.cancel()
    assert await repo.live_instances(60) == {"gw-me"}
    assert me.live == {} and me.last_reconcile == {}


async def test_status_warns_while_the_pbx_writes_no_cdr_rows(admin, service, repo, clock):
    await standard_tenant(admin)
    await service.reconcile()
    assert service.last_reconcile["cdr_table"] == "unverified"  # nothing to check against yet
    for uid in ("r-1", "r-2"):
        s = Session("outbound", "2125550100", "alice", uniqueid=uid)
        await service.agi_outbound(s)
        await service.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "30500", "ANSWER",
                                         "30"))
    clock.advance(seconds=61)  # cdr_pgsql writes at hangup; a minute covers it
    await service.reconcile()
    assert service.last_reconcile["cdr_table"] == "missing"
    assert "cdr_pgsql" in service.last_reconcile["cdr_table_reason"]
    await repo.pool.execute("INSERT INTO cdr (uniqueid, billsec, disposition)"
                            " VALUES ('r-2', 30, 'ANSWERED')")
    await service.reconcile()
    assert service.last_reconcile["cdr_table"] == "up"


# ---- the AMI link down around a renewal (issue 8 item 7) ------------------------------------


class FlakyAmi(FakeAmi):
    """A fake AMI link that can be down, and that reads back the deadlines it was sent."""

    def __init__(self):
        super().__init__()
        self.down = False
        self.deadlines: dict[str, float] = {}  # channel -> loop time of its hangup
        self.gone: set[str] = set()  # channels hung up
        self.delays: list[float] = []  # seconds the next Setvars take to arrive

    async def setvar(self, channel, variable, value):
        if self.down:
            raise AmiError(AMI_DISCONNECTED, "AMI 127.0.0.1:5038 not connected (disconnected)")
        if channel in self.gone:
            raise AmiError(AMI_ACTION_FAILED, "Setvar failed: No such channel")
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))  # a stalled link; it counts from arrival
        await super().setvar(channel, variable, value)
        self.deadlines[channel] = asyncio.get_running_loop().time() + float(value)

    async def getvar(self, channel, variable):
        if self.down:
            raise AmiError(AMI_DISCONNECTED, "AMI 127.0.0.1:5038 not connected (disconnected)")
        if channel not in self.deadlines:
            raise AmiError(AMI_ACTION_FAILED, "Getvar failed: No such channel")
        return f"{self.deadlines[channel] - asyncio.get_running_loop().time():.3f}"


async def test_a_deadline_move_that_failed_is_sent_again_once_the_link_is_back(
        admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-7")
    await svc.agi_outbound(s)
    await svc.on_dial_end(answer("u-7", "PJSIP/carrier-00000007"))
    [call] = svc.live.values()
    ami.down = True  # the renewal at ~2 s reserves, and its deadline move fails
    await asyncio.sleep(2.4)
    assert call.funded_seconds == 6 and ami.setvars == []
    assert svc.metrics.deadline_moves.labels("failed")._value.get() >= 1
    ami.down = False  # back 0.6 s before the PBX's old deadline
    await asyncio.sleep(0.5)
    [(channel, variable, value, sent_at)] = ami.setvars
    assert (channel, variable) == ("PJSIP/carrier-00000007", "TIMEOUT(absolute)")
    # the time left when it was sent (it counts from arrival), not when it was reserved
    left = call.answered_mono + 6 - sent_at
    assert abs(float(value) - left) < 0.05 and float(value) < 3.7
    assert not call.deadline_behind
    await svc.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "3000", "ANSWER", "3"))
    await svc.stop()


async def test_a_deadline_move_stops_retrying_once_the_funding_has_run_out(admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-8")
    await svc.agi_outbound(s)
    await svc.on_dial_end(answer("u-8", "PJSIP/carrier-00000008"))
    [call] = svc.live.values()
    ami.down = True  # down for good: the PBX cuts at 3 s, and no end report reaches us
    await asyncio.sleep(6.5)
    assert call.renew_task.done()  # no renewal for a call the PBX has cut
    assert call.funded_seconds == 6
    await svc.stop()


async def test_a_deadline_move_delivered_late_is_read_back_and_corrected(admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-13")
    await svc.agi_outbound(s)
    await svc.on_dial_end(answer("u-13", "PJSIP/carrier-0000000d"))
    [call] = svc.live.values()
    ami.delays = [1.5]  # the renewal's move, sent at 2 s, arrives at 3.5 s: 1.5 s too far
    await asyncio.sleep(3.8)
    assert len(ami.setvars) == 2  # the late one, then the correction
    assert abs(ami.deadlines["PJSIP/carrier-0000000d"] - (call.answered_mono + 6)) < 0.05
    assert svc.metrics.deadline_moves.labels("corrected")._value.get() == 1
    await svc.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "3800", "ANSWER", "3"))
    await svc.stop()


async def test_no_renewal_once_the_pbx_says_the_callee_channel_is_gone(admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-12")
    await svc.agi_outbound(s)
    await svc.on_dial_end(answer("u-12", "PJSIP/carrier-0000000c"))
    [call] = svc.live.values()
    ami.gone.add("PJSIP/carrier-0000000c")  # hung up, and its end reports are lost
    await asyncio.sleep(4.5)  # renewed at 2 s; would have been again at 5 s... no more
    assert call.renew_task.done()
    reserves = await repo.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE entry = 'reserve' AND call_id = $1", call.call_id)
    assert reserves == 2  # the first slice and the renewal that found the channel gone
    await svc.stop()


async def test_resync_reads_each_deadline_back_and_corrects_those_out_of_step(
        admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami, slice_seconds=20)
    for n in (1, 2, 3):
        await svc.agi_outbound(Session("outbound", "2125550100", "alice", uniqueid=f"u-{n}"))
        await svc.on_dial_end(answer(f"u-{n}", f"PJSIP/carrier-0000000{n}"))
    now = asyncio.get_running_loop().time()
    ami.deadlines = {"PJSIP/carrier-00000001": now + 20,  # right
                     "PJSIP/carrier-00000002": now + 4}  # a move that never arrived
    # carrier-00000003: "No such channel", the call ended while the link was down
    counts = await svc.live_calls.resync_deadlines()
    assert counts == {"answers_found": 0, "checked": 3, "corrected": 1, "gone": 1}
    [(channel, _, value, _)] = ami.setvars
    assert channel == "PJSIP/carrier-00000002" and 19 < float(value) <= 20
    assert svc.metrics.deadline_moves.labels("corrected")._value.get() == 1
    ami.down = True  # the link gone again: stop, the next login runs it again
    assert (await svc.live_calls.resync_deadlines())["checked"] == 1
    await svc.stop()


async def test_resync_finds_a_call_answered_while_the_link_was_down(admin, repo, clock):
    ami = FlakyAmi()
    svc = await per_second_service(admin, repo, clock, ami, slice_seconds=3)
    s = Session("outbound", "2125550100", "alice", uniqueid="u-9")
    await svc.agi_outbound(s)
    [call] = svc.live.values()
    # its DialEnd was lost with the link: the PBX shows the callee up with the deadline
    # L() put on it at answer, 1 s ago
    ami.channels = [
        CoreShowChannel(uniqueid="u-9", channel="PJSIP/alice-00000009", linkedid="u-9"),
        CoreShowChannel(uniqueid="u-10", channel="PJSIP/carrier-0000000a", linkedid="u-9"),
        CoreShowChannel(uniqueid="u-11", channel="PJSIP/bob-0000000b", linkedid="u-11")]
    ami.deadlines = {"PJSIP/carrier-0000000a": asyncio.get_running_loop().time() + 2.0}
    counts = await svc.live_calls.resync_deadlines()
    assert counts["answers_found"] == 1 and counts["corrected"] == 0
    assert call.dest_channel == "PJSIP/carrier-0000000a"
    assert abs(asyncio.get_running_loop().time() - call.answered_mono - 1.0) < 0.1
    row = await repo.pool.fetchrow("SELECT state FROM calls WHERE id = $1", call.call_id)
    assert row["state"] == "answered"
    await asyncio.sleep(1.5)  # renewed at 2 s of talk, and the deadline moved to 6 s
    [(channel, _, value, _)] = ami.setvars
    assert channel == "PJSIP/carrier-0000000a" and 3.5 < float(value) <= 4.0
    await svc.agi_hangup(Session("hangup", s.vars[var.CALL_ID], "2500", "ANSWER", "2"))
    await svc.stop()


# ---- the gateway not keeping up with AMI events (issue 8 item 15) ---------------------------


async def test_a_flood_of_ami_events_is_dropped_counted_and_followed_by_a_resync(
        repo, database_url, monkeypatch):
    monkeypatch.setattr(ami_client, "DEFAULT_MAX_EVENT_BACKLOG", 20)
    pbx = FakeAmiServer()
    listed: list[float] = []  # each CoreShowChannels: a reconciliation asking the PBX

    async def core_show_channels(conn, action):
        listed.append(asyncio.get_running_loop().time())
        await conn.reply(action, EventList="start")
        await conn.send({"Event": "CoreShowChannelsComplete", "ActionID": action["ActionID"],
                         "EventList": "Complete", "ListItems": "0"})

    pbx.scripts["coreshowchannels"] = core_show_channels
    await pbx.start()
    try:
        async with running_gateway(database_url, ami_host="127.0.0.1", ami_port=pbx.port,
                                   ami_username=AMI_USERNAME, ami_secret=AMI_SECRET) as gw:
            assert len(listed) == 1  # the reconciliation at start
            # each Cdr of a call no gateway knows costs a database look-up: the PBX
            # sends them faster than that
            for n in range(300):
                await pbx.event({"Event": "Cdr", "UniqueID": f"9.{n}",
                                 "Disposition": "ANSWERED", "BillableSeconds": "5"})
            await eventually(lambda: gw.ami.events_dropped > 0, within=10)
            await eventually(lambda: len(listed) == 2, within=10)  # the re-sync reconciled
            status = gw.ami_status()
            assert status["resyncs_after_drops"] == 1
            assert 0 < status["events_dropped"] < 300 and status["max_event_backlog"] == 20
            metrics = gw.metrics.render().decode()
            assert (f'gateway_ami_events_dropped_total{{event="Cdr"}} '
                    f'{float(status["events_dropped"])}') in metrics
    finally:
        await pbx.close()


# ---- several PBXs, one owner each through a lease (issue 9) -----------------------------------


def test_an_agi_request_is_mapped_to_its_pbx_in_the_documented_order():
    from gateway.calls.routes import PbxMap, PbxNotServed

    def session(*args: str, peer: str = "10.0.0.9") -> Session:
        s = Session("outbound", *args)
        s.peer = (peer, 40000)
        return s

    fleet = PbxMap(["pbx1", "pbx2"], {"pbx1": ["10.0.0.11"], "pbx2": ["10.0.2.0/24"]})
    at = var.OUTBOUND_PBX
    # 1. the GW_PBX argument, well-formed, of a PBX this process serves
    assert fleet.pbx_of(session("2125550100", "alice", "l", "pbx2", peer="10.0.0.11"),
                        at) == "pbx2"
    # ... and one it does not serve is refused, not recorded on a PBX nobody follows
    with pytest.raises(PbxNotServed) as refused:
        fleet.pbx_of(session("2125550100", "alice", "l", "pbx9"), at)
    assert refused.value.named == "pbx9" and "'pbx9'" in refused.value.message
    # 2. else the PBX whose AGI peers hold the address (an empty or malformed name)
    assert fleet.pbx_of(session("2125550100", "alice", "l", "", peer="10.0.0.11"),
                        at) == "pbx1"
    assert fleet.pbx_of(session("2125550100", "alice", "l", "bad name!",
                                peer="10.0.2.7"), at) == "pbx2"
    assert fleet.pbx_of(session("2125550100", "alice", "l", peer="10.0.2.7"), at) == "pbx2"
    # 4. several PBXs and nothing to tell them apart: refused (no "default" any more)
    with pytest.raises(PbxNotServed):
        fleet.pbx_of(session("2125550100", "alice", "l"), at)
    overlapping = PbxMap(["pbx1", "pbx2"], {"pbx1": ["10.0.0.0/8"], "pbx2": ["10.0.0.11"]})
    with pytest.raises(PbxNotServed):  # two matches: not one
        overlapping.pbx_of(session("2125550100", "alice", "l", peer="10.0.0.11"), at)
    # 3. a single PBX configured: that one, whatever the peer
    assert PbxMap(["solo"]).pbx_of(session("2125550100", "alice", "l"), at) == "solo"
    assert PbxMap(["solo"]).pbx_of(Session("outbound", "2125550100"), at) == "solo"


async def test_a_dead_owners_pbx_is_taken_over_its_calls_adopted_and_the_old_owner_fenced(
        admin, repo, clock):
    await standard_tenant(admin)
    rater = Rater(repo, clock=clock)
    recovery = Recovery(repo)
    ami_a = LeasedAmi()
    a, keeper_a = leased_process(rater, recovery, "gw-a", lambda: ami_a)
    b_amis: list[LeasedAmi] = []
    b, keeper_b = leased_process(rater, recovery, "gw-b",
                                 lambda: b_amis.append(LeasedAmi(up)) or b_amis[-1])
    await keeper_a.attempt(strict=True)
    await keeper_b.attempt(strict=True)
    assert (a.pbx("pbx1").owned, b.pbx("pbx1").owned) == (True, False)
    assert ami_a.started and b_amis == []  # the standby keeps no AMI link
    assert b.pbx("pbx1").view()["owner"] == "gw-a"

    # any process answers the PBX's AGI requests; only the owner follows the calls
    s_a = Session("outbound", "2125550100", "alice", "via-a", "pbx1", uniqueid="via-a")
    s_b = Session("outbound", "2125550100", "alice", "via-b", "pbx1", uniqueid="via-b")
    await a.agi_outbound(s_a)
    await b.agi_outbound(s_b)
    assert (s_a.vars[var.DECISION], s_b.vars[var.DECISION]) == ("ALLOW", "ALLOW")
    assert [c.uniqueid for c in a.live.values()] == ["via-a"] and b.live == {}
    # the owner hears the answer of the call it did not authorise: it loads and follows it
    await a.pbx("pbx1").on_dial_end(answer("via-a", "PJSIP/carrier-a"))
    await a.pbx("pbx1").on_dial_end(answer("via-b", "PJSIP/carrier-b"))
    followed = {c.uniqueid: c for c in a.live.values()}
    assert set(followed) == {"via-a", "via-b"}
    assert followed["via-b"].answered_at is not None
    assert followed["via-b"].renew_task is not None  # renewals started
    await b.pbx("pbx1").on_dial_end(answer("via-b", "PJSIP/carrier-b"))
    assert b.live == {}  # the standby ignores the PBX's events

    # A dies: no more renewals, its lease lapses
    await a.stop()
    await repo.pool.execute("UPDATE pbx_leases SET expires_at = now() - interval '1 second'")
    up = [CoreShowChannel(channel="PJSIP/alice-1", uniqueid="via-a", linkedid="via-a"),
          CoreShowChannel(channel="PJSIP/carrier-a", uniqueid="pa", linkedid="via-a"),
          CoreShowChannel(channel="PJSIP/alice-2", uniqueid="via-b", linkedid="via-b"),
          CoreShowChannel(channel="PJSIP/carrier-b", uniqueid="pb", linkedid="via-b")]
    await keeper_b.attempt()
    await keeper_b.served()  # its AMI link made, its calls reconciled
    pbx_b = b.pbx("pbx1")
    assert pbx_b.owned and len(b_amis) == 1 and b_amis[0].started
    assert pbx_b.reconciler.last_reconcile["adopted"] == 2
    assert {c.dest_channel for c in b.live.values()} == {"PJSIP/carrier-a", "PJSIP/carrier-b"}
    # each adopted call's deadline is put where its funding ends, then renewals go on
    # (a read-back that finds no deadline on this fake link sends one more: same place)
    await eventually(lambda: {s[0] for s in b_amis[0].setvars}
                     == {"PJSIP/carrier-a", "PJSIP/carrier-b"})
    assert {s[1] for s in b_amis[0].setvars} == {"TIMEOUT(absolute)"}
    assert all(0 < float(s[2]) <= 300 for s in b_amis[0].setvars)  # within the funding
    assert b.metrics.pbx_lease_changes.labels("pbx1")._value.get() == 1
    assert b.metrics.pbx_owned.labels("pbx1")._value.get() == 1
    lease = await repo.pool.fetchrow("SELECT * FROM pbx_leases WHERE pbx = 'pbx1'")
    assert (lease["owner"], lease["generation"]) == ("gw-b", 2)

    # A comes back to life: it sees B's lease, drops its table without settling
    await keeper_a.attempt()
    assert not a.pbx("pbx1").owned and a.live == {} and ami_a.stopped
    assert a.metrics.pbx_owned.labels("pbx1")._value.get() == 0
    states = [r["state"] for r in await repo.pool.fetch("SELECT state FROM calls")]
    assert states == ["answered", "answered"]
    # and whatever it still tries to settle on its own is refused by the fence
    call_id = followed["via-a"].call_id
    await a.pbx("pbx1").live.settle(call_id, 10, by="reconcile-estimate", fenced=True)
    assert await repo.pool.fetchval("SELECT state FROM calls WHERE id = $1",
                                    call_id) == "answered"

    # a graceful stop gives the lease up: the other process takes it at its next attempt
    await keeper_b.stop()
    await b.stop()
    await keeper_b.release()
    await keeper_a.attempt()
    assert a.pbx("pbx1").owned
    await keeper_a.stop()
    await a.stop()
    await keeper_a.release()
    await ledger_agrees(repo)


async def test_a_lease_that_cannot_be_renewed_is_given_up_when_it_expires(admin, repo,
                                                                         clock):
    from structlog.testing import capture_logs

    class Flaky(Recovery):
        down = False

        async def lease(self, pbx, owner, seconds):
            if self.down:
                raise ConnectionError("database unreachable")
            return await super().lease(pbx, owner, seconds)

    await standard_tenant(admin)
    recovery = Flaky(repo)
    now = [1000.0]
    amis: list[LeasedAmi] = []
    svc, keeper = leased_process(Rater(repo, clock=clock), recovery, "gw-a",
                                 lambda: amis.append(LeasedAmi()) or amis[-1],
                                 monotonic=lambda: now[0])
    await keeper.attempt(strict=True)
    await svc.agi_outbound(Session("outbound", "2125550100", "alice", "u1", "pbx1",
                                   uniqueid="u1"))
    assert len(svc.live) == 1
    recovery.down = True
    now[0] += 5.9  # the lease taken at 1000 lasts until 1006 at least
    await keeper.attempt()
    assert svc.pbx("pbx1").owned and svc.pbx("pbx1").lease_error == "database unreachable"
    now[0] += 0.2
    with capture_logs() as logs:
        await keeper.attempt()
    assert not svc.pbx("pbx1").owned and svc.live == {} and amis[0].stopped
    assert [e["event"] for e in logs if e["event"] == "pbx_lease_lost"] == ["pbx_lease_lost"]
    # dropped, not settled: the next owner adopts it
    assert await repo.pool.fetchval("SELECT state FROM calls") == "authorised"
    recovery.down = False
    await keeper.attempt()  # the row is still ours (no one took it): owned again
    await keeper.served()
    # a new AMI link for the new tenure, re-synced after each of its reconnects
    assert svc.pbx("pbx1").owned and len(amis) == 2 and amis[1].started
    assert amis[1].connect_callbacks == [svc.pbx("pbx1").resync]
    await svc.stop()
    await keeper.stop()
    await keeper.release()
    assert await repo.pool.fetchval(
        "SELECT count(*) FROM pbx_leases WHERE expires_at > now()") == 0  # released


async def test_a_pbx_unreachable_at_the_take_over_is_served_from_its_cdr_until_its_ami_is_back(
        admin, repo, clock):
    class Unreachable(LeasedAmi):
        async def start(self):
            raise AmiError("AMI_UNREACHABLE", "AMI 10.0.0.11:5038 unreachable")

    await standard_tenant(admin)
    amis: list[LeasedAmi] = []

    def factory():
        amis.append(Unreachable() if not amis else LeasedAmi())
        return amis[-1]

    svc, keeper = leased_process(Rater(repo, clock=clock), Recovery(repo), "gw-a", factory)
    await keeper.attempt()  # not at start: the lease is kept all the same
    await keeper.served()
    pbx = svc.pbx("pbx1")
    assert pbx.owned and keeper.ami is None and pbx.ami is None
    assert pbx.reconciler.last_reconcile["cdr_table"]  # reconciled without channels
    await keeper.attempt()  # the next renewal tries the link again
    await keeper.served()
    assert keeper.ami is amis[1] and amis[1].started and pbx.ami is amis[1]
    assert amis[1].connect_callbacks == [pbx.resync]
    await keeper.stop()
    await svc.stop()
    await keeper.release()


# ---- a PBX that crashed under its calls (docs/billing.md, "Recovery") --------------------


def crashed_call(uniqueid: str, answered: dt.datetime | None, *, funded: int = 300
                 ) -> OpenCall:
    authorised = (answered or dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)) \
        - dt.timedelta(seconds=3)
    return OpenCall(call_id=uuid.uuid4(), direction="outbound", tenant_id=TENANT,
                    caller="alice", destination="12125550100", route="pstn",
                    sources=("pool",), funded_seconds=funded, pbx_uniqueid=uniqueid,
                    linkedid=uniqueid, owner="gw-a", authorised_at=authorised,
                    answered_at=answered, pbx="pbx2")


def link_life(connected: dt.datetime, heard: dt.datetime,
              started: dt.datetime | None = None) -> LinkLife:
    return LinkLife(connected_at=connected.timestamp(), last_heard=heard.timestamp(),
                    pbx_started_at=started)


def seconds(n: float) -> dt.timedelta:
    return dt.timedelta(seconds=n)


ANSWER = dt.datetime(2026, 11, 15, 12, 0, tzinfo=dt.UTC)
OLD_RUN = ANSWER - dt.timedelta(hours=2)  # when the PBX's crashed run had started
RESTART = ANSWER + seconds(60)  # the PBX crashed some time before this and came back


def uid(at: dt.datetime, n: int = 1) -> str:
    return f"{int(at.timestamp())}.{n}"


def test_a_call_lost_in_a_crash_is_billed_to_the_last_word_heard_from_its_run():
    old = link_life(OLD_RUN + seconds(5), ANSWER + seconds(7), OLD_RUN)
    new = link_life(RESTART + seconds(2), RESTART + seconds(30), RESTART)
    run = PbxRun(CoreStatus(started_at=RESTART, current_calls=0), [old, new])
    assert run.last_heard_before == ANSWER + seconds(7)  # the new run's link is no proof
    now = RESTART + seconds(30)
    call = crashed_call(uid(ANSWER - seconds(3)), ANSWER)
    assert run.made_before(call)
    # the owner renewed it while the PBX was down: 90 s funded; it talked 7 s, proven
    assert Reconciler.crash_estimate(call, run, None, now) == 7
    assert Reconciler.estimate(call, now) == 90  # what the plain estimate would bill
    # a channel list showed it up later than the last word on the link: the later proof
    assert Reconciler.crash_estimate(call, run, ANSWER + seconds(9), now) == 9
    # never past its funding
    short = crashed_call(uid(ANSWER - seconds(3)), ANSWER, funded=5)
    assert Reconciler.crash_estimate(short, run, None, now) == 5
    # never answered, nothing; heard last before the answer (the link was cut before,
    # the PBX crashed later): the answer itself is the only proof, nothing is billed
    assert Reconciler.crash_estimate(crashed_call(uid(ANSWER), None), run, None, now) == 0
    cut = PbxRun(CoreStatus(started_at=RESTART, current_calls=0),
                 [link_life(OLD_RUN, ANSWER - seconds(20), OLD_RUN), new])
    assert Reconciler.crash_estimate(call, cut, None, now) == 0


def test_without_a_link_to_the_crashed_run_the_restart_bounds_the_bill():
    # a process that took the PBX's lease while it was down never heard its old run
    new = link_life(RESTART + seconds(2), RESTART + seconds(30), RESTART)
    run = PbxRun(CoreStatus(started_at=RESTART, current_calls=0), [new])
    assert run.last_heard_before is None
    call = crashed_call(uid(ANSWER - seconds(3)), ANSWER)
    assert Reconciler.crash_estimate(call, run, None, RESTART + seconds(500)) == 60
    # a link whose start was never read counts as the old run's only when it was made
    # before the restart
    unread_old = link_life(OLD_RUN, ANSWER + seconds(12))
    unread_new = link_life(RESTART + seconds(1), RESTART + seconds(20))
    run = PbxRun(CoreStatus(started_at=RESTART, current_calls=0), [unread_old, unread_new])
    assert run.last_heard_before == ANSWER + seconds(12)


def test_the_uniqueid_tells_which_run_made_a_call_on_the_pbx_clock():
    run = PbxRun(CoreStatus(started_at=RESTART, current_calls=0, clock_ahead=30.0), [])
    # the PBX's clock is 30 s ahead of ours: its start, on our clock, is 30 s earlier
    assert run.started_at == RESTART - seconds(30)
    # uniqueids are the PBX's clock too: compared with the start as the PBX gave it
    assert run.made_before(crashed_call(uid(RESTART - seconds(1)), RESTART - seconds(20)))
    assert not run.made_before(crashed_call(uid(RESTART), RESTART - seconds(20)))
    assert run.made_before(crashed_call(f"pbx2-{uid(RESTART - seconds(5))}", None))
    # no epoch in it: the answer (our clock) against the start (our clock)
    assert run.made_before(crashed_call("odd", RESTART - seconds(31)))
    assert not run.made_before(crashed_call("odd", RESTART - seconds(29)))
    assert uniqueid_epoch("1795823785.12") == 1795823785
    assert uniqueid_epoch("gw-1795823785.12") == 1795823785
    assert uniqueid_epoch("u-3") is None and uniqueid_epoch(None) is None


def test_core_status_is_read_in_the_pbx_local_time_and_turned_into_utc():
    headers = {"Response": "Success", "CoreStartupDate": "2026-11-27",
               "CoreStartupTime": "18:56:25", "CoreCurrentCalls": "4"}
    status = CoreStatus.parse(headers, "1795823800 -0500", read_at=1795823790.4)
    assert status.started_at == dt.datetime(2026, 11, 27, 23, 56, 25, tzinfo=dt.UTC)
    assert status.current_calls == 4 and status.clock_ahead == pytest.approx(9.6)
    east = CoreStatus.parse({**headers, "CoreStartupTime": "05:26:25",
                             "CoreStartupDate": "2026-11-28"}, "1795823800 +0530",
                            read_at=1795823800.0)
    assert east.started_at == dt.datetime(2026, 11, 27, 23, 56, 25, tzinfo=dt.UTC)
    # a PBX that does not say: no start, and the crash rule does not apply
    assert CoreStatus.parse(headers, "", read_at=0.0).started_at is None
    assert CoreStatus.parse({"Response": "Success"}, "1 +0000", read_at=0.0).started_at is None


class CrashedPbx(FakeAmi):
    """A link to a PBX that restarted at ``started_at``; ``history`` as the client keeps it."""

    def __init__(self, started_at: dt.datetime, history: list[LinkLife]):
        super().__init__()
        self.status = CoreStatus(started_at=started_at, current_calls=0)
        self.history = history

    async def core_status(self):
        return self.status

    def link_history(self):
        return list(self.history)


async def test_reconcile_bills_a_crashed_pbxs_calls_only_up_to_its_last_word(
        admin, service, repo, clock):
    """Made by the run that crashed, gone, no record: ``reconcile-crash``, to the last word
    heard from that run; a call made by the current run and gone without a record keeps the
    plain estimate; one still up is adopted and its sighting noted."""
    await standard_tenant(admin)
    t0 = clock.now
    crashed, current, up = uid(t0, 1), uid(t0 + seconds(400), 2), uid(t0, 3)
    for n, u in enumerate((crashed, current, up)):
        await service.agi_outbound(Session("outbound", "2125550100", "alice", uniqueid=u))
        await service.on_dial_end(answer(u, f"PJSIP/carrier-{n}"))
    restart = t0 + seconds(300)
    history = [link_life(t0 - seconds(600), t0 + seconds(70), t0 - seconds(3600)),
               link_life(restart + seconds(2), restart + seconds(200), restart)]
    fresh = CallService(service.rater, Recovery(repo), stale_after_seconds=10)
    ami = CrashedPbx(restart, history)
    fresh.attach_ami(ami)
    ami.channels = [CoreShowChannel(channel="PJSIP/alice-1", uniqueid=up, linkedid=up)]
    clock.advance(seconds=500)  # renewed while the PBX was down; found gone only now
    counts = await fresh.reconcile()
    assert (counts["crashed"], counts["estimated"], counts["adopted"]) == (1, 1, 1)
    rows = {r["pbx_uniqueid"]: r for r in await repo.pool.fetch("SELECT * FROM calls")}
    # 70 s talked, whole minutes: 120 (the plain estimate would have billed 500 s: 540)
    assert (rows[crashed]["settled_by"], rows[crashed]["billed_seconds"]) == (
        "reconcile-crash", 120)
    assert (rows[current]["settled_by"], rows[current]["billed_seconds"]) == (
        "reconcile-estimate", 300)  # the estimate, capped by its 300 s of funding
    assert rows[up]["state"] == "answered"
    assert fresh.pbx().reconciler.seen_up == {up: clock.now}
    await fresh.stop()
    await service.stop()
    await ledger_agrees(repo)


async def test_the_ami_client_keeps_each_links_life_and_reads_the_pbx_start():
    pbx = FakeAmiServer()
    now = [1795823000.0]

    async def core_status(conn, action):
        await conn.reply(action, CoreStartupDate="2026-11-27", CoreStartupTime="23:56:25",
                         CoreCurrentCalls="0")

    async def getvar(conn, action):
        assert action["Variable"] == "STRFTIME(,,%s %z)"
        await conn.reply(action, Variable=action["Variable"], Value="1795823000 +0000")

    pbx.scripts["corestatus"] = core_status
    pbx.scripts["getvar"] = getvar
    await pbx.start()
    client = ami_client.AmiClient("127.0.0.1", pbx.port, AMI_USERNAME, AMI_SECRET,
                                  backoff_initial=0.05, wall=lambda: now[0])
    try:
        await client.start()
        [first] = client.link_history()
        assert first.connected_at == first.last_heard == 1795823000.0
        status = await client.core_status()
        assert status.started_at == dt.datetime(2026, 11, 27, 23, 56, 25, tzinfo=dt.UTC)
        assert first.pbx_started_at == status.started_at
        now[0] += 5
        await pbx.event({"Event": "Newchannel"})  # any word from the PBX is proof of life
        await eventually(lambda: first.last_heard == 1795823005.0, within=5)
        now[0] += 20  # silence, then the link drops: the silence proves nothing
        pbx.drop()
        await eventually(lambda: len(client.link_history()) == 2, within=5)
        assert first.last_heard == 1795823005.0 and first.lost_at == 1795823025.0
        second = client.link_history()[1]
        assert second.pbx_started_at is None and second.connected_at == 1795823025.0
        assert client.status()["last_heard_at"] == "2026-11-27T23:43:45+00:00"
    finally:
        await client.stop()
        await pbx.close()


# ---- AGI requests of a PBX this process does not serve (issue 9 review) ------------------------


def peered(script: str, *args: str, peer: str, uniqueid: str) -> Session:
    s = Session(script, *args, uniqueid=uniqueid)
    s.peer = (peer, 40000)
    return s


async def _calls(repo) -> dict[str, str]:
    return {r["pbx_uniqueid"]: r["pbx"]
            for r in await repo.pool.fetch("SELECT pbx_uniqueid, pbx FROM calls")}


async def test_a_request_naming_a_pbx_not_served_here_is_refused_and_nothing_reserved(
        admin, repo, clock):
    from structlog.testing import capture_logs

    await standard_tenant(admin)
    svc = CallService(Rater(repo, clock=clock), Recovery(repo), pbxes=("pbx1", "pbx2"),
                      agi_peers={"pbx1": ["10.0.0.11"]})
    with capture_logs() as logs:
        out = peered("outbound", "2125550100", "alice", "l", "pbx9", peer="10.0.0.11",
                     uniqueid="u-out")
        await svc.agi_outbound(out)
        inbound = peered("inbound", "+15145550101", "2125550100", "l", "pbx9",
                         peer="10.0.0.11", uniqueid="u-in")
        await svc.agi_inbound(inbound)
    for s in (out, inbound):  # GATEWAY_ERROR: the dialplan's 503
        assert (s.vars[var.DECISION], s.vars[var.REASON], s.vars[var.CAUSE],
                s.vars.get(var.CALL_ID)) == ("REJECT", "GATEWAY_ERROR", "34", None), s.vars
    assert await _calls(repo) == {} and svc.live == {}
    said = [e for e in logs if e["event"] == "agi_pbx_not_served"]
    assert [(e["route"], e["named_pbx"], e["peer"], e["action"], e["log_level"])
            for e in said] == [("outbound", "pbx9", "10.0.0.11:40000", "refused", "error"),
                               ("inbound", "pbx9", "10.0.0.11:40000", "refused", "error")]
    assert "pbx1, pbx2" in said[0]["error"]  # what this process does serve
    assert svc.metrics.reason_counts[("outbound", "REJECT", "GATEWAY_ERROR")] == 1
    await svc.stop()
    await ledger_agrees(repo)


async def test_a_single_pbx_process_refuses_a_request_naming_another_pbx(admin, repo, clock):
    await standard_tenant(admin)
    svc = CallService(Rater(repo, clock=clock), Recovery(repo))  # the flat form: "default"
    named = peered("outbound", "2125550100", "alice", "l", "pbx2", peer="127.0.0.1",
                   uniqueid="u-named")
    await svc.agi_outbound(named)
    assert named.vars[var.REASON] == "GATEWAY_ERROR"
    # an old dialplan (no GW_PBX) or one naming this PBX: the one configured
    unnamed = peered("outbound", "2125550100", "alice", "l", "", peer="127.0.0.1",
                     uniqueid="u-unnamed")
    await svc.agi_outbound(unnamed)
    ours = peered("outbound", "2125550100", "alice", "l", "default", peer="127.0.0.1",
                  uniqueid="u-ours")
    await svc.agi_outbound(ours)
    assert (unnamed.vars[var.DECISION], ours.vars[var.DECISION]) == ("ALLOW", "ALLOW")
    assert await _calls(repo) == {"u-unnamed": "default", "u-ours": "default"}
    await svc.stop()


async def test_several_pbxs_a_request_naming_none_is_mapped_by_its_peer_or_refused(
        admin, repo, clock):
    from structlog.testing import capture_logs

    await standard_tenant(admin)
    svc = CallService(Rater(repo, clock=clock), Recovery(repo), pbxes=("pbx1", "pbx2"),
                      agi_peers={"pbx1": ["10.0.0.11"], "pbx2": ["10.0.2.0/24"]})
    sessions = {
        # the AGI server on a dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d
        "mapped": peered("outbound", "2125550100", "alice", "l", "", peer="::ffff:10.0.0.11",
                         uniqueid="mapped"),
        "plain": peered("outbound", "2125550100", "alice", "l", "", peer="10.0.2.7",
                        uniqueid="plain"),
        "malformed": peered("outbound", "2125550100", "alice", "l", "not a name!",
                            peer="10.0.2.8", uniqueid="malformed"),
        "stranger": peered("outbound", "2125550100", "alice", "l", "", peer="10.9.9.9",
                           uniqueid="stranger"),
        "no-peer": Session("outbound", "2125550100", "alice", "l", uniqueid="no-peer"),
    }
    with capture_logs() as logs:
        for s in sessions.values():
            await svc.agi_outbound(s)
    decisions = {k: s.vars[var.REASON] for k, s in sessions.items()}
    assert decisions == {"mapped": "FUNDED", "plain": "FUNDED", "malformed": "FUNDED",
                         "stranger": "GATEWAY_ERROR", "no-peer": "GATEWAY_ERROR"}
    assert await _calls(repo) == {"mapped": "pbx1", "plain": "pbx2", "malformed": "pbx2"}
    said = [(e["named_pbx"], e["peer"]) for e in logs if e["event"] == "agi_pbx_not_served"]
    assert said == [(None, "10.9.9.9:40000"), (None, None)]
    assert {c.uniqueid: c.pbx for c in svc.live.values()} == {
        "mapped": "pbx1", "plain": "pbx2", "malformed": "pbx2"}
    await svc.stop()


async def test_the_end_report_of_a_call_on_a_pbx_not_served_here_is_settled_and_said(
        admin, repo, clock):
    """Its call exists already (authorised by the PBX's own gateway): the report is the
    PBX's statement of the talk time, and settling it only frees the reservation."""
    from structlog.testing import capture_logs

    await standard_tenant(admin)
    rater = Rater(repo, clock=clock)
    theirs = CallService(rater, Recovery(repo), pbxes=("pbx2",))
    s = peered("outbound", "2125550100", "alice", "l", "pbx2", peer="10.0.2.7",
               uniqueid="u-2")
    await theirs.agi_outbound(s)
    assert s.vars[var.DECISION] == "ALLOW"
    ours = CallService(rater, Recovery(repo), pbxes=("pbx1",))
    with capture_logs() as logs:
        await ours.agi_hangup(peered("hangup", s.vars[var.CALL_ID], "42300", "ANSWER", "42",
                                     "pbx2", peer="10.0.2.7", uniqueid="u-2"))
    row = await repo.pool.fetchrow("SELECT * FROM calls WHERE pbx_uniqueid = 'u-2'")
    # 42 s talked, billed by the minute
    assert (row["state"], row["billed_seconds"], row["settled_by"]) == ("settled", 60, "agi")
    [said] = [e for e in logs if e["event"] == "agi_pbx_not_served"]
    assert (said["route"], said["named_pbx"], said["action"], said["call_id"]) == (
        "hangup", "pbx2", "settled", s.vars[var.CALL_ID])
    await ours.stop()
    await theirs.stop()
    await ledger_agrees(repo)
