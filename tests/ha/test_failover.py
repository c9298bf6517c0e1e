"""The database fails over under call load (issue 9 case 7): a primary and a synchronous
streaming replica managed by Patroni with etcd (``tests.support.patroni``), the gateway as
a real process given a multi-host database URL that asks for the read-write server.

The PBX is played over its two wires, as the fault suite does for the database cases:
AGI requests as Asterisk sends them (authorisations, hangup reports) and an AMI server
(``ModelPbx``) that lists its channels, answers calls (``DialEnd``), keeps each callee's
hangup deadline as ``Setvar TIMEOUT(absolute)`` moves it, cuts a call whose deadline
passes, and reports every end (``Hangup``, ``Cdr``, the hangup AGI report).

The primary's host dies (Patroni and PostgreSQL SIGKILLed together), or hangs (all of
them SIGSTOPped: connections are still taken, nothing answers), during a steady load of
authorisations and a few answered calls renewed in short slices. Patroni promotes the
replica; the gateway goes on without a restart. The test prints how long authorisations
failed and what callers were told meanwhile, then checks the money in SQL on the new
primary (the billing rules' §8 invariants): nothing billed twice, lost or left reserved.

Run on its own with ``scripts/test -m ha -s`` (``-s`` shows the measurements).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from gateway.billing.provisioning import Provisioning
from gateway.store.pool import open_pool
from gateway.store.repository import Repository
from tests.faults.invariants import assert_invariants
from tests.faults.process import GatewayProcess
from tests.support.agi import agi_request
from tests.support.ami import SECRET, USERNAME, FakeAmi, FakeConn
from tests.support.ci import need
from tests.support.patroni import HaCluster, tools_missing
from tests.support.pbx import free_port
from tests.support.tenant import standard_tenant

pytestmark = [pytest.mark.ha, pytest.mark.faults]

PBX_NAME = "default"
DOMESTIC = "2125550100"
SLICE = 10  # seconds of funding per reservation: a live call is renewed every 7 s
RENEW_BEFORE = 3
LIVE_CALLS = 4
HOLD = 40.0  # seconds a live call talks unless its funding runs out first
LOAD_WORKERS = 4
AFTER_KILL = 25.0  # the load goes on this long after the primary is killed


# ---- the PBX, played over AMI and AGI ------------------------------------------------------


@dataclass
class Channel:
    """A call on the model PBX: the caller's channel and, once answered, the callee's."""

    uniqueid: str
    channel: str
    dest_channel: str
    call_id: str
    funded: int
    answered_at: float | None = None
    deadline: float | None = None  # monotonic; the callee's TIMEOUT(absolute)
    ended_at: float | None = None
    ended_by: str = ""  # phone | deadline
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def linkedid(self) -> str:
        return self.uniqueid

    @property
    def talk_ms(self) -> int:
        assert self.answered_at is not None and self.ended_at is not None
        return int((self.ended_at - self.answered_at) * 1000)


class ModelPbx:
    """What the gateway sees of a PBX: its AMI link and its AGI requests."""

    def __init__(self) -> None:
        self.ami = FakeAmi()
        self.ami.scripts.update(getvar=self._getvar, setvar=self._setvar,
                                coreshowchannels=self._core_show_channels)
        self.channels: dict[str, Channel] = {}  # up, by the caller's uniqueid
        self.agi_port = 0
        self._sequence = 0
        self._watch: asyncio.Task[None] | None = None
        self.reports_failed = 0

    async def start(self) -> None:
        await self.ami.start()
        self._watch = asyncio.create_task(self._enforce_deadlines())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.ami.close()

    def next_uniqueid(self) -> str:
        self._sequence += 1
        return f"{time.time():.0f}.{self._sequence}"

    def _by_dest(self, name: str) -> Channel | None:
        return next((c for c in self.channels.values() if c.dest_channel == name), None)

    # ---- AMI actions ---------------------------------------------------------------------

    async def _getvar(self, conn: FakeConn, action: dict[str, str]) -> None:
        variable = action.get("Variable", "")
        if variable == "GW_PBX" and not action.get("Channel"):
            await conn.reply(action, Variable=variable, Value=PBX_NAME)
            return
        chan = self._by_dest(action.get("Channel", ""))
        if chan is None:
            await _no_such_channel(conn, action)
        elif variable == "TIMEOUT(absolute)":
            left = 0.0 if chan.deadline is None else max(0.0, chan.deadline - time.monotonic())
            await conn.reply(action, Variable=variable, Value=f"{left:.3f}")
        else:
            await conn.reply(action, Variable=variable, Value="")

    async def _setvar(self, conn: FakeConn, action: dict[str, str]) -> None:
        chan = self._by_dest(action.get("Channel", ""))
        if chan is None:
            await _no_such_channel(conn, action)
            return
        if action.get("Variable") == "TIMEOUT(absolute)":
            chan.deadline = time.monotonic() + float(action["Value"])
        await conn.reply(action, Message="Variable Set")

    async def _core_show_channels(self, conn: FakeConn, action: dict[str, str]) -> None:
        await conn.reply(action, EventList="start", Message="Channels will follow")
        items = 0
        for chan in list(self.channels.values()):
            for uniqueid, name in ((chan.uniqueid, chan.channel),
                                   (f"{chan.uniqueid}-b", chan.dest_channel)):
                await conn.send({"Event": "CoreShowChannel", "ActionID": action["ActionID"],
                                 "Channel": name, "Uniqueid": uniqueid,
                                 "Linkedid": chan.linkedid})
                items += 1
        await conn.send({"Event": "CoreShowChannelsComplete", "ActionID": action["ActionID"],
                         "EventList": "Complete", "ListItems": str(items)})

    # ---- calls ---------------------------------------------------------------------------

    async def answer(self, chan: Channel) -> None:
        """The callee answers: Dial's L() puts the first deadline on its channel."""
        self.channels[chan.uniqueid] = chan
        chan.answered_at = time.monotonic()
        chan.deadline = chan.answered_at + chan.funded
        await self.ami.event({"Event": "DialEnd", "Uniqueid": chan.uniqueid,
                              "DestChannel": chan.dest_channel, "DialStatus": "ANSWER",
                              "Linkedid": chan.linkedid})

    async def _enforce_deadlines(self) -> None:
        while True:
            now = time.monotonic()
            for chan in list(self.channels.values()):
                if chan.deadline is not None and now >= chan.deadline:
                    await self.end(chan, "deadline", at=chan.deadline)
            await asyncio.sleep(0.05)

    async def end(self, chan: Channel, by: str, at: float | None = None) -> None:
        """The call ends: the PBX reports it on both wires (AMI Hangup and Cdr, and the
        dialplan's hangup AGI report), as Asterisk does."""
        if self.channels.pop(chan.uniqueid, None) is None:
            return
        chan.ended_at = at if at is not None else time.monotonic()
        chan.ended_by = by
        for uniqueid, name in ((chan.uniqueid, chan.channel),
                               (f"{chan.uniqueid}-b", chan.dest_channel)):
            await self.ami.event({"Event": "Hangup", "Uniqueid": uniqueid, "Channel": name,
                                  "Linkedid": chan.linkedid})
        await self.ami.event({"Event": "Cdr", "UniqueID": chan.uniqueid,
                              "Disposition": "ANSWERED",
                              "BillableSeconds": str(chan.talk_ms // 1000)})
        await self.hangup_report(chan.uniqueid, chan.call_id, chan.talk_ms, "ANSWER")
        chan.ended.set()

    async def hangup_report(self, uniqueid: str, call_id: str, answered_ms: int,
                            dial_status: str) -> None:
        try:
            await agi(self.agi_port, "hangup", uniqueid,
                      [call_id, str(answered_ms), dial_status, str(answered_ms // 1000),
                       PBX_NAME])
        except (OSError, TimeoutError):
            self.reports_failed += 1


async def _no_such_channel(conn: FakeConn, action: dict[str, str]) -> None:
    await conn.send({"Response": "Error", "ActionID": action["ActionID"],
                     "Message": "No such channel"})


# ---- AGI as Asterisk sends it ---------------------------------------------------------------


@dataclass
class Answer:
    uniqueid: str
    variables: dict[str, str]
    asked_at: float
    seconds: float
    reported_at: float | None = None  # when the hangup report of an allowed call ended

    @property
    def reason(self) -> str:
        return self.variables.get("GW_REASON", "")

    @property
    def allowed(self) -> bool:
        return self.variables.get("GW_DECISION") == "ALLOW"


async def agi(port: int, script: str, uniqueid: str, args: list[str]) -> Answer:
    """One FastAGI session; the variables the gateway set (one MSet or SET VARIABLEs)."""
    asked = time.monotonic()
    variables = await agi_request(port, script, args, uniqueid=uniqueid,
                                  extension=DOMESTIC, within=30)
    return Answer(uniqueid, variables, asked, time.monotonic() - asked)


async def authorise(pbx: ModelPbx) -> Answer:
    uniqueid = pbx.next_uniqueid()
    return await agi(pbx.agi_port, "outbound", uniqueid,
                     [DOMESTIC, "alice", uniqueid, PBX_NAME])


class Load:
    """Callers dialling one after another; each allowed call is not answered (its hangup
    report releases it at once), so the load is authorisations, not talk."""

    def __init__(self, pbx: ModelPbx, workers: int):
        self.pbx = pbx
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(workers)]

    async def _caller(self) -> None:
        while not self._stop.is_set():
            answer = await authorise(self.pbx)
            self.answers.append(answer)
            if answer.allowed and answer.variables.get("GW_CALL_ID"):
                await self.pbx.ami.event({"Event": "Cdr", "UniqueID": answer.uniqueid,
                                          "Disposition": "NO ANSWER",
                                          "BillableSeconds": "0"})
                await self.pbx.hangup_report(answer.uniqueid, answer.variables["GW_CALL_ID"],
                                             0, "NOANSWER")
                answer.reported_at = time.monotonic()
            await asyncio.sleep(0.05)  # a caller's pace, even when refused at once

    async def stop(self) -> list[Answer]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.answers

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def live_call(pbx: ModelPbx, hold: float) -> Channel:
    """A call authorised, answered at once, and hung up by the phone after ``hold`` s
    unless the PBX cuts it first at its funded end."""
    answer = await authorise(pbx)
    assert answer.reason == "FUNDED", answer.variables
    n = pbx._sequence
    chan = Channel(uniqueid=answer.uniqueid, channel=f"PJSIP/alice-{n:08x}",
                   dest_channel=f"PJSIP/carrier-{n:08x}",
                   call_id=answer.variables["GW_CALL_ID"],
                   funded=int(answer.variables["GW_FUNDED"]))
    await pbx.answer(chan)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(chan.ended.wait(), hold)
    await pbx.end(chan, "phone")
    return chan


# ---- fixtures ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[HaCluster]:
    if tools_missing():
        need(f"{', '.join(tools_missing())} (apt-get install etcd-server patroni)")
    ha = HaCluster()
    try:
        await asyncio.to_thread(ha.start)
        yield ha
    finally:
        await asyncio.to_thread(ha.close)


@pytest_asyncio.fixture
async def pbx() -> AsyncIterator[ModelPbx]:
    model = ModelPbx()
    await model.start()
    try:
        yield model
    finally:
        await model.close()


@pytest_asyncio.fixture
async def gateway(cluster: HaCluster, pbx: ModelPbx) -> AsyncIterator[GatewayProcess]:
    pool = await open_pool(cluster.url, min_size=1, max_size=2)  # runs the migrations
    try:
        admin = Provisioning(Repository(pool))
        # funded from the wallet once the pool's minutes are reserved: never NO_BALANCE
        await standard_tenant(admin, wallet="10000.00")
        # per-second increments, so that a slice is SLICE seconds of funding
        await admin.set_rates([{"kind": "domestic_overage", "prefix": "1",
                                "price_per_minute": "0.02", "first_increment": 1,
                                "increment": 1}])
    finally:
        await pool.close()
    pbx.agi_port = free_port()
    gw = GatewayProcess(database_url=cluster.url, agi_port=pbx.agi_port,
                        ami_host="127.0.0.1", ami_port=pbx.ami.port, ami_username=USERNAME,
                        ami_secret=SECRET, pbx_name=PBX_NAME, instance_name="gw-ha",
                        slice_seconds=SLICE, renew_before_seconds=RENEW_BEFORE,
                        reconcile_interval_seconds=3, db_pool_size=6,
                        # longer than the fail-over: the lease, kept in the database,
                        # outlives the outage and the calls stay this process's
                        lease_seconds=30)
    try:
        await gw.start()
        yield gw
    finally:
        await gw.close()


# ---- the test ------------------------------------------------------------------------------


def gateway_events(gw: GatewayProcess) -> dict[str, int]:
    """How many times the gateway logged each of the events a fail-over shows in."""
    counts: collections.Counter[str] = collections.Counter()
    for line in gw.log_lines():
        with contextlib.suppress(ValueError, AttributeError):
            event = json.loads(line).get("event", "")
            if event in NOTABLE:
                counts[event] += 1
    return dict(counts)


NOTABLE = {"renew_failed", "deadline_moved", "deadline_move_failed", "settle_failed",
           "authorisation_failed", "pbx_lease_lost", "reconciled", "void_failed",
           "authorisation_voided", "void_retrying", "voids_abandoned",
           "database_server_chosen"}


def timeline(answers: list[Answer], killed_at: float) -> str:
    """Per second from the breakdown: answers allowed / failed and the longest wait."""
    seconds: dict[int, list[Answer]] = collections.defaultdict(list)
    for a in answers:
        if a.asked_at >= killed_at - 1:
            seconds[int(a.asked_at - killed_at + 1) - 1].append(a)
    return " ".join(
        f"{s}:{sum(a.allowed for a in group)}/{sum(not a.allowed for a in group)}"
        f"({max(a.seconds for a in group):.1f}s)" for s, group in sorted(seconds.items()))


def explain_outage(answers: list[Answer], killed_at: float, promoted_at: float) -> dict:
    """How long authorisations failed, and what callers were told meanwhile."""
    failed = [a for a in answers if not a.allowed and a.asked_at >= killed_at - 1]
    report: dict = {"promoted_after_s": round(promoted_at - killed_at, 2),
                    "answers": len(answers), "failed": len(failed)}
    if failed:
        first = min(a.asked_at for a in failed)
        last = max(a.asked_at + a.seconds for a in failed)
        report.update(
            first_failure_after_kill_s=round(first - killed_at, 2),
            failing_for_s=round(last - first, 2),
            told=dict(collections.Counter(
                (a.reason, a.variables.get("GW_CAUSE", "")) for a in failed)),
            longest_wait_s=round(max(a.seconds for a in failed), 2),
            # when the last failed answer came, counted from the promotion
            last_failure_after_promotion_s=round(last - promoted_at, 2))
    allowed_again = [a for a in answers if a.allowed and a.asked_at >= promoted_at]
    if allowed_again:
        report["first_allowed_after_promotion_s"] = round(
            min(a.asked_at for a in allowed_again) - promoted_at, 2)
    report["longest_wait_overall_s"] = round(max(a.seconds for a in answers), 2)
    return report


async def test_the_primary_dies_under_load_and_the_gateway_carries_on_on_the_replica(
        cluster: HaCluster, pbx: ModelPbx, gateway: GatewayProcess):
    await fail_over(cluster, pbx, gateway, "killed")


async def test_the_primary_hangs_under_load_and_the_gateway_carries_on_on_the_replica(
        cluster: HaCluster, pbx: ModelPbx, gateway: GatewayProcess):
    """The primary's host hangs instead of dying (Patroni and PostgreSQL SIGSTOPped): its
    kernel still takes connections and nothing answers them. Each server of the URL is
    tried with its own short time limit (``gateway.store.pool.HostList``), so once the
    replica is promoted new connections reach it, and authorisations resume, instead of
    every connection waiting on the hung server until the pool gives up."""
    report = await fail_over(cluster, pbx, gateway, "frozen")
    assert "first_allowed_after_promotion_s" in report, report
    # the gateway saw the writable server move, and went to the promoted one
    new = cluster.primary()
    chosen = [event for event in map(_json, gateway.log_lines())
              if event.get("event") == "database_server_chosen"]
    assert any(e.get("moved") and e.get("server") == new.address for e in chosen), chosen


def _json(line: str) -> dict:
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict):
            return event
    return {}


async def fail_over(cluster: HaCluster, pbx: ModelPbx, gateway: GatewayProcess,
                    how: str) -> dict:
    """The primary is ``killed`` or ``frozen`` under load; Patroni promotes the replica;
    what callers were told is printed and the money checked on the new primary."""
    old = cluster.primary()
    load = Load(pbx, LOAD_WORKERS)
    calls: list[asyncio.Task[Channel]] = []
    try:
        for _ in range(LIVE_CALLS):  # staggered: their renewals fall at different moments
            calls.append(asyncio.create_task(live_call(pbx, HOLD)))
            await asyncio.sleep(SLICE / LIVE_CALLS)
        live = (await gateway.status())["live_calls"]  # the calls, or how many
        assert (live if isinstance(live, int) else len(live)) >= LIVE_CALLS, live

        killed_at = time.monotonic()
        await asyncio.to_thread(old.kill if how == "killed" else old.freeze)
        new = await asyncio.to_thread(cluster.wait_primary, old.name, 60)
        promoted_at = time.monotonic()
        await asyncio.sleep(max(0.0, killed_at + AFTER_KILL - time.monotonic()))
        answers = await load.stop()
        ended = await asyncio.gather(*calls)
    finally:
        await load.cancel()
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        # nothing stays stopped: a frozen primary is killed (its host is gone for good)
        await asyncio.to_thread(old.kill)
    report = explain_outage(answers, killed_at, promoted_at)
    print(f"\nprimary {how}, fail-over {old.name} -> {new.name}: {report}")
    print("answers by the second they were asked in, from the", how, "primary "
          "(allowed/failed, longest wait):", timeline(answers, killed_at))
    for chan in ended:
        print(f"live call {chan.call_id}: ended by {chan.ended_by} after "
              f"{chan.talk_ms / 1000:.1f} s")
    print("gateway log:", gateway_events(gateway))

    # the same process all along, and it authorises again on the new primary
    assert gateway.proc is not None and gateway.proc.returncode is None
    # the fault was felt: authorisations failed, or (a hung primary holding the workers'
    # hangup reports instead) none was answered for seconds after it
    done = sorted(a.asked_at + a.seconds for a in answers)
    silence = max((b - a for a, b in itertools.pairwise(done) if b >= killed_at), default=0.0)
    assert report["failed"] > 0 or silence >= 3.0, (report, silence)
    failed = [a for a in answers if not a.allowed]
    assert {a.reason for a in failed} == {"GATEWAY_ERROR"}, report
    tail = answers[-LOAD_WORKERS * 5:]
    assert all(a.reason == "FUNDED" for a in tail), [a.reason for a in tail]

    # every live call either talked until the phone hung up or was cut at its deadline
    for chan in ended:
        assert chan.ended_by in ("phone", "deadline"), chan

    # the money, on the promoted server: each call closed once, nothing left reserved
    pool = await open_pool(cluster.url, min_size=1, max_size=2, run_migrations=False)
    try:
        deadline = time.monotonic() + 60
        open_sql = "SELECT count(*) FROM calls WHERE state IN ('authorised', 'answered')"
        while (left := await pool.fetchval(open_sql)) != 0:
            assert time.monotonic() < deadline, f"{left} calls still open"
            await asyncio.sleep(0.5)
        for chan in ended:
            row = await pool.fetchrow("SELECT * FROM calls WHERE id = $1",
                                      uuid.UUID(chan.call_id))
            assert row["state"] == "settled", dict(row)
            # the talk time the PBX reported (or, when its reports were lost in the
            # outage, reconciliation's estimate, capped at the funded end); the price
            # rounds it up to the rate's increments
            assert abs(row["billable_seconds"] - chan.talk_ms // 1000) <= 1, \
                ({k: row[k] for k in ("settled_by", "billable_seconds", "funded_seconds",
                                      "answered_at", "ended_at", "authorised_at")}, chan.talk_ms,
                 [line for line in gateway.log_lines() if chan.call_id in line][-12:])
        # what the PBX was told is what the database holds: a rejected call holds nothing
        for a in failed:
            row = await pool.fetchrow("SELECT id, decision, state, settled_by FROM calls"
                                      " WHERE pbx_uniqueid = $1", a.uniqueid)
            if row is not None:
                assert (row["decision"], row["state"]) in (("REJECT", "rejected"),
                                                           ("REJECT", "released")), \
                    (dict(row), [line for line in gateway.log_lines()
                                 if str(row["id"]) in line][-12:])
        # synchronous replication: what the old primary committed and answered before it
        # died is on the new one; the calls it had released stay released by the PBX's
        # own reports, not found open again and closed by reconciliation
        before = {uuid.UUID(a.variables["GW_CALL_ID"]) for a in answers
                  if a.allowed and a.reported_at is not None
                  and a.reported_at < killed_at - 0.5}
        rows = await pool.fetch("SELECT id, state, settled_by FROM calls WHERE id = ANY($1)",
                                list(before))
        assert len(rows) == len(before) > 0
        assert {(r["state"], r["settled_by"]) for r in rows} <= {("released", "agi"),
                                                                ("released", "cdr")}, \
            collections.Counter((r["state"], r["settled_by"]) for r in rows)
        print("load calls by outcome:", dict(collections.Counter(
            (r["state"], r["settled_by"]) for r in await pool.fetch(
                "SELECT state, settled_by FROM calls"))))
        await assert_invariants(pool)
    finally:
        await pool.close()
    return report
