"""Call lifecycle: the bridge between the PBX (AGI routes, AMI events) and the rater.

    AGI outbound/inbound -> rater decides and reserves -> channel variables
    AMI DialEnd ANSWER   -> the call's talk time starts; renewals are scheduled
    each slice's end     -> rater renews -> AMI Setvar TIMEOUT(absolute) on the callee
    AGI hangup / AMI Cdr -> rater settles, exactly once, whichever arrives first
    start / AMI reconnect / every minute -> reconcile with the PBX's channels and CDRs

The PBX enforces the funded end on its own: the dialplan dials with ``L(funded ms)``,
which puts a hangup deadline on the callee channel at answer. The gateway only moves
that deadline further when it has reserved more time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..agi import AgiError, AgiSession
from ..billing.rater import Rater
from ..errors import GatewayError
from ..metrics import Metrics
from ..rating.model import Decision, Reason, Route
from .causes import cause_for

log = structlog.get_logger("gateway.calls")

@dataclass
class LiveCall:
    call_id: uuid.UUID
    direction: str
    tenant_id: str | None
    caller: str
    destination: str
    route: str | None
    rated: bool
    funded_seconds: int | None
    uniqueid: str | None
    linkedid: str | None = None
    channel: str | None = None
    dest_channel: str | None = None
    authorised_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    answered_at: dt.datetime | None = None
    answered_mono: float | None = None
    source: str = ""
    renew_task: asyncio.Task[None] | None = None

    def view(self, now_mono: float) -> dict[str, Any]:
        funded_until = None
        if self.answered_at is not None and self.funded_seconds is not None:
            funded_until = (self.answered_at + dt.timedelta(seconds=self.funded_seconds))
        return {
            "call_id": str(self.call_id),
            "direction": self.direction,
            "tenant_id": self.tenant_id,
            "caller": self.caller,
            "destination": self.destination,
            "route": self.route,
            "state": "answered" if self.answered_at else "ringing",
            "funded_seconds": self.funded_seconds,
            "funded_until": funded_until.isoformat() if funded_until else None,
            "talk_seconds": round(now_mono - self.answered_mono, 1)
            if self.answered_mono is not None else 0,
            "source": self.source,
            "channel": self.channel,
        }


class CallService:
    def __init__(
        self,
        rater: Rater,
        *,
        metrics: Metrics | None = None,
        renew_before_seconds: int = 30,
        monotonic: Callable[[], float] = time.monotonic,
        stale_after_seconds: int = 15,
        instance_id: str | None = None,
        heartbeat_seconds: float = 5.0,
    ):
        self.rater = rater
        self.repo = rater.repo
        self.metrics = metrics or Metrics()
        self.renew_before = renew_before_seconds
        self.monotonic = monotonic
        self.stale_after = stale_after_seconds
        self.instance_id = instance_id
        self.heartbeat_seconds = heartbeat_seconds
        self.ami: Any = None
        self.live: dict[uuid.UUID, LiveCall] = {}
        self._by_uniqueid: dict[str, uuid.UUID] = {}
        self._reconciling = asyncio.Lock()
        self.last_reconcile: dict[str, Any] = {}

    # ---- wiring ------------------------------------------------------------------------

    def routes(self) -> dict[str, Callable[[AgiSession], Any]]:
        """The AGI routes the dialplan calls: agi://host:port/<route>,args"""
        return {"outbound": self.agi_outbound, "inbound": self.agi_inbound,
                "hangup": self.agi_hangup}

    def attach_ami(self, ami: Any) -> None:
        self.ami = ami
        ami.on_event("DialEnd", self.on_dial_end)
        ami.on_event("Cdr", self.on_cdr)
        ami.on_event("Hangup", self.on_hangup)

    async def stop(self) -> None:
        """Stop renewing; reservations stay in the database for the next start."""
        tasks = [c.renew_task for c in self.live.values() if c.renew_task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.monotonic()
        return [c.view(now) for c in self.live.values()]

    # ---- AGI routes --------------------------------------------------------------------

    async def agi_outbound(self, session: AgiSession) -> None:
        """args: dialled, caller's PJSIP endpoint, linkedid."""
        req = session.request
        dialled = _arg(req.args, 0) or req.extension or ""
        endpoint = _arg(req.args, 1) or _endpoint_of(req.channel)
        await self._decide(session, "outbound", endpoint, dialled,
                           lambda: self.rater.authorise_outbound(
                               endpoint, dialled, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, 2)))

    async def agi_inbound(self, session: AgiSession) -> None:
        """args: called number (DNIS), caller id number, linkedid."""
        req = session.request
        called = _arg(req.args, 0) or req.extension or ""
        caller = _arg(req.args, 1) or req.callerid or ""
        await self._decide(session, "inbound", caller, called,
                           lambda: self.rater.authorise_inbound(
                               called, caller, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, 2)))

    async def _decide(self, session: AgiSession, direction: str, caller: str, dialled: str,
                      authorise: Callable[[], Awaitable[Decision]]) -> None:
        with _bound(session):
            started = time.perf_counter()
            try:
                decision = await authorise()
            except Exception as exc:  # noqa: BLE001 - one deny path for every failure
                decision = self._failed(direction, exc, dialled, caller)
            await self._answer(session, direction, decision, caller, started)

    def _failed(self, direction: str, exc: Exception, dialled: str, caller: str) -> Decision:
        if isinstance(exc, GatewayError):
            log.error("authorisation_failed", direction=direction, code=exc.code,
                      error=exc.message, caller=caller, destination=dialled)
        else:
            log.exception("authorisation_failed", direction=direction, caller=caller,
                          destination=dialled)
        return Decision(False, Reason.GATEWAY_ERROR, None, destination=dialled)

    async def _answer(self, session: AgiSession, direction: str, d: Decision, caller: str,
                      started: float) -> None:
        reason = d.reason.value
        self.metrics.count_decision(direction, d.decision, reason,
                                    time.perf_counter() - started)
        call = None
        if d.allow and d.call_id is not None:
            call = LiveCall(
                call_id=d.call_id, direction=direction, tenant_id=d.tenant_id, caller=caller,
                destination=d.destination, route=d.route.value if d.route else None,
                rated=d.funded_seconds is not None, funded_seconds=d.funded_seconds,
                uniqueid=session.request.uniqueid or None, channel=session.request.channel,
                source="+".join(s.value for s in d.sources),
            )
            self._track(call)
        number = d.destination.lstrip("+") if d.route in (Route.PSTN, Route.PARTNER) else \
            d.destination
        variables = [
            ("GW_REASON", reason),
            ("GW_CALL_ID", str(d.call_id) if d.call_id else ""),
            ("GW_ROUTE", d.route.value if d.route else ""),
            ("GW_NUMBER", number if d.allow else ""),
            ("GW_TARGET", d.target or ""),
            ("GW_FUNDED", str(d.funded_seconds) if d.funded_seconds is not None else ""),
            ("GW_CAUSE", "" if d.allow else str(cause_for(reason))),
            # last: were they ever set one by one, a session cut short would never
            # leave an ALLOW behind
            ("GW_DECISION", d.decision),
        ]
        try:
            try:
                reply = await session.set_variables(variables)  # one round trip
            except ValueError:  # a value MSet cannot carry: one command per variable
                reply = None
                for name, value in variables:
                    await session.set_variable(name, value)
            if reply is not None and not reply.ok:
                log.warning("agi_reply_refused", call_id=str(d.call_id), reply=reply.raw)
        except (AgiError, OSError) as exc:
            # The channel went away while we answered: its reservation is released by
            # the hangup report, the CDR, or the next reconciliation.
            log.warning("agi_reply_failed", call_id=str(d.call_id), error=str(exc))

    # ---- the call is answered ------------------------------------------------------------

    async def on_dial_end(self, event: dict[str, str]) -> None:
        if event.get("DialStatus") != "ANSWER":
            return
        call = self._find(event.get("Uniqueid"))
        if call is None or call.answered_mono is not None:
            return
        with structlog.contextvars.bound_contextvars(call_id=str(call.call_id),
                                                     uniqueid=call.uniqueid):
            await self._answered(call, event)

    async def _answered(self, call: LiveCall, event: dict[str, str]) -> None:
        call.answered_mono = self.monotonic()
        call.answered_at = self.rater.clock()
        call.dest_channel = event.get("DestChannel")
        call.linkedid = call.linkedid or event.get("Linkedid")
        try:
            await self.rater.answered(call.call_id, call.answered_at)
        except Exception:  # noqa: BLE001 - the call goes on; reconcile will see it
            log.exception("mark_answered_failed", call_id=str(call.call_id))
        log.info("answered", call_id=str(call.call_id), dest_channel=call.dest_channel,
                 funded_seconds=call.funded_seconds)
        if call.rated and call.dest_channel and self.ami is not None:
            call.renew_task = asyncio.create_task(self._renew_loop(call),
                                                  name=f"renew-{call.call_id}")

    def _renew_margin(self) -> float:
        # never renew more often than a third of a slice ahead
        return float(min(self.renew_before, max(1, self.rater.slice_seconds // 3)))

    async def _renew_loop(self, call: LiveCall) -> None:
        assert call.answered_mono is not None and call.funded_seconds is not None
        while True:
            end = call.answered_mono + call.funded_seconds
            await asyncio.sleep(max(0.0, end - self._renew_margin() - self.monotonic()))
            try:
                renewal = await self.rater.renew(call.call_id)
            except Exception:  # noqa: BLE001 - the PBX keeps the deadline it has
                log.exception("renew_failed", call_id=str(call.call_id))
                self.metrics.reservations.labels("error").inc()
                await asyncio.sleep(1)
                continue
            if not renewal.open:
                return
            if renewal.granted_seconds <= 0:
                self.metrics.reservations.labels("exhausted").inc()
                log.info("funding_exhausted", call_id=str(call.call_id),
                         funded_seconds=call.funded_seconds)
                return  # the PBX ends the call at the deadline it already has
            self.metrics.reservations.labels("granted").inc()
            call.funded_seconds = renewal.funded_seconds
            await self._move_deadline(call)

    async def _move_deadline(self, call: LiveCall) -> None:
        """TIMEOUT(absolute) counts from when it arrives: send the time left now."""
        assert call.answered_mono is not None and call.funded_seconds is not None
        remaining = call.answered_mono + call.funded_seconds - self.monotonic()
        try:
            await self.ami.setvar(call.dest_channel, "TIMEOUT(absolute)",
                                  f"{max(remaining, 0.5):.3f}")
            self.metrics.deadline_moves.labels("ok").inc()
            log.info("deadline_moved", call_id=str(call.call_id), remaining=round(remaining, 3),
                     funded_seconds=call.funded_seconds)
        except Exception as exc:  # noqa: BLE001 - the old, earlier deadline stays: safe
            self.metrics.deadline_moves.labels("failed").inc()
            log.warning("deadline_move_failed", call_id=str(call.call_id), error=str(exc))

    # ---- the call ends -------------------------------------------------------------------

    async def agi_hangup(self, session: AgiSession) -> None:
        """args: call id, answered talk time in ms, DIALSTATUS, CDR(billsec)."""
        with _bound(session):
            await self._hangup_report(session)

    async def _hangup_report(self, session: AgiSession) -> None:
        args = session.request.args
        try:
            call_id = uuid.UUID(_arg(args, 0) or "")
        except ValueError:
            log.warning("hangup_report_without_call_id", args=list(args))
            return
        answered_ms = _int(_arg(args, 1))
        billsec = _int(_arg(args, 3))
        if answered_ms is not None:
            # whole seconds, truncated as the PBX's CDR counts them, so that the AGI
            # report and the Cdr event bill the same call the same way
            billable = answered_ms // 1000
        else:
            billable = billsec or 0
        await self.finish(call_id, billable, by="agi")

    async def on_cdr(self, event: dict[str, str]) -> None:
        call_id = self._by_uniqueid.get(event.get("UniqueID", ""))
        if call_id is None:
            row = await self.repo.find_call_by_uniqueid(event.get("UniqueID", ""))
            if row is None or row["state"] not in ("authorised", "answered"):
                return
            call_id = row["id"]
        billable = _int(event.get("BillableSeconds")) or 0
        if event.get("Disposition") != "ANSWERED":
            billable = 0
        with structlog.contextvars.bound_contextvars(call_id=str(call_id),
                                                     uniqueid=event.get("UniqueID")):
            await self.finish(call_id, billable, by="cdr")

    async def on_hangup(self, event: dict[str, str]) -> None:
        call = self._find(event.get("Uniqueid"))
        if call is not None and call.renew_task is not None:
            call.renew_task.cancel()

    async def finish(self, call_id: uuid.UUID, billable: int, *, by: str) -> None:
        """Settle (or release, when nothing was answered) once; later reports are no-ops."""
        call = self.live.get(call_id)
        try:
            if billable > 0:
                result = await self.rater.settle(call_id, billable, by=by)
            else:
                result = await self.rater.release(call_id, by=by)
        except GatewayError as exc:
            log.warning("settle_refused", call_id=str(call_id), code=exc.code, by=by)
            return
        except Exception:  # noqa: BLE001 - reconcile retries from the PBX's record
            log.exception("settle_failed", call_id=str(call_id), by=by)
            return
        self.metrics.settlements.labels(by, result.outcome).inc()
        if call is not None:
            self._untrack(call)

    # ---- reconciliation ------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Bring the database in line with the PBX: adopt calls still up, settle those that
        ended while we were away from the PBX's CDR, release what never connected.
        One run at a time (start, AMI reconnects and the timer may overlap)."""
        async with self._reconciling:
            return await self._reconcile()

    async def _reconcile(self) -> dict[str, int]:
        counts = {"adopted": 0, "settled": 0, "released": 0, "estimated": 0, "kept": 0}
        channels: list[dict[str, str]] | None = None
        if self.ami is not None:
            try:
                channels = await self.ami.core_show_channels()
            except Exception as exc:  # noqa: BLE001 - try again at the next round
                log.warning("reconcile_no_channels", error=str(exc))
        up = {c.get("Uniqueid"): c for c in channels or []}
        # calls of other gateway processes that are still alive stay theirs
        others = await self.repo.live_instances(self.heartbeat_seconds * 4)
        others.discard(self.instance_id or "")
        now = self.rater.clock()
        for row in await self.repo.open_calls():
            uniqueid = row["pbx_uniqueid"]
            age = (now - row["authorised_at"]).total_seconds()
            if channels is not None and uniqueid in up:
                if row["id"] not in self.live and row["owner"] not in others:
                    await self._adopt(row, channels)
                    counts["adopted"] += 1
                else:
                    counts["kept"] += 1
                continue
            if row["id"] in self.live and (channels is None or age < self.stale_after):
                counts["kept"] += 1
                continue
            cdr = await self.repo.find_cdr(uniqueid) if uniqueid else None
            if cdr is not None:
                billable = cdr["billsec"] if cdr["disposition"] == "ANSWERED" else 0
                await self.finish(row["id"], billable, by="reconcile-cdr")
                counts["settled" if billable else "released"] += 1
            elif channels is not None and age >= self.stale_after:
                # Not on the PBX and no record of it: the call ended unseen. Bill at most
                # what it could have talked, from the answer we saw, else nothing.
                billable = 0
                if row["answered_at"] is not None:
                    billable = min(row["funded_seconds"],
                                   int((now - row["answered_at"]).total_seconds()))
                await self.finish(row["id"], billable, by="reconcile-estimate")
                counts["estimated" if billable else "released"] += 1
            else:
                counts["kept"] += 1
        self.last_reconcile = {"at": now.isoformat(), **counts}
        log.info("reconciled", **counts)
        return counts

    async def _adopt(self, row: Any, channels: list[dict[str, str]]) -> None:
        """A call still up that this process does not know (we restarted): track it,
        renew its funding and put its deadline where the funding ends."""
        call = LiveCall(
            call_id=row["id"], direction=row["direction"], tenant_id=row["tenant_id"],
            caller=row["caller"], destination=row["destination"], route=row["route"],
            rated=bool(row["sources"]), funded_seconds=row["funded_seconds"]
            if row["sources"] else None, uniqueid=row["pbx_uniqueid"],
            linkedid=row["linkedid"], authorised_at=row["authorised_at"],
            source="+".join(row["sources"]),
        )
        caller = next(c for c in channels if c.get("Uniqueid") == row["pbx_uniqueid"])
        call.channel = caller.get("Channel")
        peer = next((c for c in channels if c.get("Linkedid") == caller.get("Linkedid")
                     and c.get("Uniqueid") != row["pbx_uniqueid"]), None)
        if row["answered_at"] is not None:
            elapsed = (self.rater.clock() - row["answered_at"]).total_seconds()
            call.answered_at = row["answered_at"]
            call.answered_mono = self.monotonic() - elapsed
            call.dest_channel = peer.get("Channel") if peer else None
        self._track(call)
        log.info("adopted", call_id=str(call.call_id), answered=call.answered_at is not None)
        if call.rated and call.answered_mono is not None and call.dest_channel:
            call.renew_task = asyncio.create_task(self._renew_loop(call),
                                                  name=f"renew-{call.call_id}")

    async def run_heartbeat(self) -> None:
        """Tell other gateway processes sharing the database that this one is alive."""
        while True:
            try:
                await self.repo.heartbeat(self.instance_id or "")
            except Exception as exc:  # noqa: BLE001 - try again at the next beat
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.heartbeat_seconds)

    async def run_reconciler(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("reconcile_failed")

    # ---- bookkeeping ---------------------------------------------------------------------

    def _track(self, call: LiveCall) -> None:
        self.live[call.call_id] = call
        if call.uniqueid:
            self._by_uniqueid[call.uniqueid] = call.call_id
        self.metrics.live_calls.set(len(self.live))

    def _untrack(self, call: LiveCall) -> None:
        self.live.pop(call.call_id, None)
        if call.uniqueid:
            self._by_uniqueid.pop(call.uniqueid, None)
        if call.renew_task is not None and call.renew_task is not asyncio.current_task():
            call.renew_task.cancel()
        self.metrics.live_calls.set(len(self.live))

    def _find(self, uniqueid: str | None) -> LiveCall | None:
        call_id = self._by_uniqueid.get(uniqueid or "")
        return self.live.get(call_id) if call_id else None


def _bound(session: AgiSession) -> Any:
    """Every log line while serving this AGI session names the PBX channel."""
    req = session.request
    return structlog.contextvars.bound_contextvars(uniqueid=req.uniqueid or None,
                                                   channel=req.channel or None,
                                                   agi=req.script)


def _arg(args: tuple[str, ...], i: int) -> str | None:
    return args[i].strip() if len(args) > i and args[i].strip() else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _endpoint_of(channel: str) -> str:
    """PJSIP/alice-00000001 -> alice"""
    name = channel.partition("/")[2]
    return name.rpartition("-")[0] if "-" in name else name
