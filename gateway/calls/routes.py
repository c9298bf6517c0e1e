"""The AGI routes the dialplan calls (agi://host:port/<route>,<args>; the contract is in
``gateway.dialplan_variables``):

    outbound / inbound -> rater decides and reserves -> channel variables (one MSet)
    hangup             -> the call's talk time -> settled (or released) once

A failure while deciding denies the call (GATEWAY_ERROR): the gateway fails closed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from .. import dialplan_variables as var
from ..agi import AgiError, AgiSession
from ..billing.rater import Rater
from ..errors import GatewayError
from ..metrics import Metrics
from ..rating.model import Decision, Reason, Route
from .causes import cause_for
from .live import LiveCall, LiveCalls

log = structlog.get_logger("gateway.calls")


class AgiRoutes:
    """Answers the dialplan's AGI requests."""

    def __init__(self, rater: Rater, live: LiveCalls, metrics: Metrics):
        self.rater = rater
        self.live = live
        self.metrics = metrics

    def routes(self) -> dict[str, Callable[[AgiSession], Awaitable[None]]]:
        """The handlers by route name, for the AGI server."""
        return {var.OUTBOUND_ROUTE: self.agi_outbound, var.INBOUND_ROUTE: self.agi_inbound,
                var.HANGUP_ROUTE: self.agi_hangup}

    # ---- the decision ------------------------------------------------------------------

    async def agi_outbound(self, session: AgiSession) -> None:
        """args: dialled, caller's PJSIP endpoint, linkedid."""
        req = session.request
        dialled = _arg(req.args, var.OUTBOUND_DIALLED) or req.extension or ""
        endpoint = _arg(req.args, var.OUTBOUND_ENDPOINT) or _endpoint_of(req.channel)
        await self._decide(session, "outbound", endpoint, dialled,
                           lambda: self.rater.authorise_outbound(
                               endpoint, dialled, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, var.OUTBOUND_LINKEDID)))

    async def agi_inbound(self, session: AgiSession) -> None:
        """args: called number (DNIS), caller id number, linkedid."""
        req = session.request
        called = _arg(req.args, var.INBOUND_CALLED) or req.extension or ""
        caller = _arg(req.args, var.INBOUND_CALLER) or req.callerid or ""
        await self._decide(session, "inbound", caller, called,
                           lambda: self.rater.authorise_inbound(
                               called, caller, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, var.INBOUND_LINKEDID)))

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
        if d.allow and d.call_id is not None:
            self.live.track(LiveCall(
                call_id=d.call_id, direction=direction, tenant_id=d.tenant_id, caller=caller,
                destination=d.destination, route=d.route.value if d.route else None,
                rated=d.funded_seconds is not None, funded_seconds=d.funded_seconds,
                uniqueid=session.request.uniqueid or None, channel=session.request.channel,
                source="+".join(s.value for s in d.sources),
            ))
        variables = _answer_variables(d)
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

    # ---- the end of the call --------------------------------------------------------------

    async def agi_hangup(self, session: AgiSession) -> None:
        """args: call id, answered talk time in ms, DIALSTATUS, CDR(billsec)."""
        with _bound(session):
            await self._hangup_report(session)

    async def _hangup_report(self, session: AgiSession) -> None:
        args = session.request.args
        try:
            call_id = uuid.UUID(_arg(args, var.HANGUP_CALL_ID) or "")
        except ValueError:
            log.warning("hangup_report_without_call_id", args=list(args))
            return
        answered_ms = _int(_arg(args, var.HANGUP_ANSWERED_MS))
        billsec = _int(_arg(args, var.HANGUP_BILLSEC))
        if answered_ms is not None:
            # whole seconds, truncated as the PBX's CDR counts them, so that the AGI
            # report and the Cdr event bill the same call the same way
            billable = answered_ms // 1000
        else:
            billable = billsec or 0
        await self.live.settle(call_id, billable, by="agi")


def _answer_variables(d: Decision) -> list[tuple[str, str]]:
    """The channel variables that carry a decision, in ``var.ANSWER`` order."""
    number = d.destination.lstrip("+") if d.route in (Route.PSTN, Route.PARTNER) else \
        d.destination
    values = {
        var.REASON: d.reason.value,
        var.CALL_ID: str(d.call_id) if d.call_id else "",
        var.ROUTE: d.route.value if d.route else "",
        var.NUMBER: number if d.allow else "",
        var.TARGET: d.target or "",
        var.FUNDED: str(d.funded_seconds) if d.funded_seconds is not None else "",
        var.CAUSE: "" if d.allow else str(cause_for(d.reason.value)),
        var.DECISION: d.decision,
    }
    return [(name, values[name]) for name in var.ANSWER]


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
