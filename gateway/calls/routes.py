"""The AGI routes the dialplan calls (agi://host:port/<route>,<args>; the contract is in
``gateway.dialplan_variables``):

    outbound / inbound -> rater decides and reserves -> channel variables (one MSet)
    hangup             -> the call's talk time -> settled (or released) once

A failure while deciding denies the call (GATEWAY_ERROR): the gateway fails closed.

Each request is mapped to its PBX (``PbxMap``): the PBX's name as the route's last
argument (``GW_PBX``), else the PBX whose AGI peers the request came from, else the only
PBX configured. A request that maps to no PBX this process is configured with is refused
(GATEWAY_ERROR, nothing reserved): a call recorded on a PBX that no process serves would
never be renewed, reconciled or expired, and its reservation would hold the tenant's
money for good. Any process answers the requests of the PBXs it is configured with; an
allowed call is followed (tracked) only by the process that owns its PBX.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import structlog

from .. import dialplan_variables as var
from ..agi import AgiError, AgiSession
from ..billing.rater import Rater
from ..errors import GatewayError
from ..metrics import Metrics
from ..rating.model import Decision, Reason, Route
from .announce import Announcements
from .causes import cause_for
from .live import LiveCall, LiveCalls

log = structlog.get_logger("gateway.calls")


PBX_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PbxNotServed(GatewayError):
    """An AGI request names a PBX this process is not configured with, or cannot be told
    apart among several: it is refused rather than recorded on a PBX nobody follows."""

    status = 503
    code = "PBX_NOT_SERVED"

    def __init__(self, message: str, *, named: str | None):
        super().__init__(message)
        self.named = named


class PbxMap:
    """Which PBX an AGI request comes from."""

    def __init__(self, names: Sequence[str],
                 peers: Mapping[str, Collection[str]] | None = None):
        self.names = tuple(names)
        self._peers = [(name, ipaddress.ip_network(p, strict=False))
                       for name, addresses in (peers or {}).items() for p in addresses]

    def pbx_of(self, session: AgiSession, index: int) -> str:
        """1. the ``GW_PBX`` argument at ``index`` when present and well-formed; 2. the
        PBX whose ``agi_peers`` hold the peer address (exactly one); 3. the only PBX
        configured. The answer is always one of this process's PBXs: a name it is not
        configured with, or several PBXs and nothing to tell which, raises
        ``PbxNotServed`` (the caller refuses the request)."""
        named = _arg(session.request.args, index)
        if named is not None and PBX_NAME.fullmatch(named):
            if named in self.names:
                return named
            raise PbxNotServed(
                f"the AGI request names PBX {named!r}, which this process is not "
                f"configured with (it serves {', '.join(self.names)}): list that PBX in "
                "the configuration of every gateway its dialplan names in GW_AGI or "
                "GW_AGI_BACKUP", named=named)
        found = self.by_peer(getattr(session, "peer", None))
        if found is not None:
            return found
        if len(self.names) == 1:
            return self.names[0]
        raise PbxNotServed(
            "the AGI request names no PBX (empty or malformed GW_PBX) and its peer "
            f"address is in the agi_peers of none of this process's PBXs "
            f"({', '.join(self.names)}), or of more than one", named=named)

    def by_peer(self, peer: Any) -> str | None:
        """The one PBX whose ``agi_peers`` hold the peer's address (an IPv4-mapped IPv6
        address counts as its IPv4 address, as for the AGI server's allow list)."""
        if not peer or not self._peers:
            return None
        try:
            address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
        except ValueError:
            return None
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        found = {name for name, net in self._peers
                 for a in candidates if a.version == net.version and a in net}
        return found.pop() if len(found) == 1 else None


class AgiRoutes:
    """Answers the dialplan's AGI requests."""

    def __init__(self, rater: Rater, pbx_map: PbxMap,
                 tracking: Callable[[str], LiveCalls | None],
                 reporting: Callable[[str, uuid.UUID], LiveCalls], metrics: Metrics,
                 announcements: Announcements | None = None):
        """``tracking(pbx)``: the table that follows the PBX's calls, None when this
        process does not own the PBX now; ``reporting(pbx, call_id)``: the table that
        settles a call's end report (the one following it, if any); ``announcements``:
        what a rejected call hears (None: the answer carries no GW_ANNOUNCE at all, as
        before announcements existed)."""
        self.rater = rater
        self.announcements = announcements
        self.pbx_map = pbx_map
        self.tracking = tracking
        self.reporting = reporting
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
        await self._decide(session, "outbound", endpoint, dialled, var.OUTBOUND_PBX,
                           lambda pbx: self.rater.authorise_outbound(
                               endpoint, dialled, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, var.OUTBOUND_LINKEDID), pbx=pbx))

    async def agi_inbound(self, session: AgiSession) -> None:
        """args: called number (DNIS), caller id number, linkedid."""
        req = session.request
        called = _arg(req.args, var.INBOUND_CALLED) or req.extension or ""
        caller = _arg(req.args, var.INBOUND_CALLER) or req.callerid or ""
        await self._decide(session, "inbound", caller, called, var.INBOUND_PBX,
                           lambda pbx: self.rater.authorise_inbound(
                               called, caller, pbx_uniqueid=req.uniqueid or None,
                               linkedid=_arg(req.args, var.INBOUND_LINKEDID), pbx=pbx))

    async def _decide(self, session: AgiSession, direction: str, caller: str, dialled: str,
                      pbx_index: int, authorise: Callable[[str], Awaitable[Decision]]
                      ) -> None:
        with _bound(session):
            started = time.perf_counter()
            try:
                pbx = self.pbx_map.pbx_of(session, pbx_index)
            except PbxNotServed as exc:
                # refused before anything is reserved: the dialplan answers GATEWAY_ERROR
                # with its 503 (emergency numbers never ask the gateway)
                _not_served(session, exc, direction, refused=True)
                decision = Decision(False, Reason.GATEWAY_ERROR, None, destination=dialled)
                await self._answer(session, direction, decision, caller, exc.named or "",
                                   started)
                return
            with structlog.contextvars.bound_contextvars(pbx=pbx):
                try:
                    decision = await authorise(pbx)
                except Exception as exc:  # noqa: BLE001 - one deny path for every failure
                    decision = self._failed(direction, exc, dialled, caller)
                await self._answer(session, direction, decision, caller, pbx, started)

    def _failed(self, direction: str, exc: Exception, dialled: str, caller: str) -> Decision:
        if isinstance(exc, GatewayError):
            log.error("authorisation_failed", direction=direction, code=exc.code,
                      error=exc.message, caller=caller, destination=dialled)
        else:
            log.exception("authorisation_failed", direction=direction, caller=caller,
                          destination=dialled)
        return Decision(False, Reason.GATEWAY_ERROR, None, destination=dialled)

    async def _answer(self, session: AgiSession, direction: str, d: Decision, caller: str,
                      pbx: str, started: float) -> None:
        reason = d.reason.value
        self.metrics.count_decision(direction, d.decision, reason,
                                    time.perf_counter() - started)
        live = self.tracking(pbx) if d.allow and d.call_id is not None else None
        if live is not None and d.call_id is not None:
            # this process owns the call's PBX: it follows the call (else the owner does,
            # from the call's DialEnd on)
            live.track(LiveCall(
                call_id=d.call_id, direction=direction, tenant_id=d.tenant_id, caller=caller,
                destination=d.destination, route=d.route.value if d.route else None,
                rated=d.funded_seconds is not None, funded_seconds=d.funded_seconds,
                uniqueid=session.request.uniqueid or None, channel=session.request.channel,
                source="+".join(s.value for s in d.sources), pbx=pbx,
                funding_final=d.funding_final,
            ))
        announce = None
        if not d.allow and self.announcements is not None:
            announce = self.announcements.for_rejection(
                reason, session.request.env.get("language", ""))
        variables = _answer_variables(d, announce)
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
        try:
            pbx = self.pbx_map.pbx_of(session, var.HANGUP_PBX)
        except PbxNotServed as exc:
            # The call exists already (some gateway authorised it): its end report is the
            # PBX's own statement of the talk time, and settling it (exactly once, in SQL)
            # only ever frees its reservation, so it is settled all the same; loudly, as
            # the configuration is wrong.
            _not_served(session, exc, "hangup", refused=False, call_id=str(call_id))
            pbx = exc.named or ""
        await self.reporting(pbx, call_id).settle(call_id, billable, by="agi")


def _not_served(session: AgiSession, exc: PbxNotServed, route: str, *, refused: bool,
                **fields: Any) -> None:
    """One error line naming the PBX the request named (if any) and the peer it came
    from: a dialplan sends this process requests of a PBX it is not configured with."""
    peer = getattr(session, "peer", None)
    log.error("agi_pbx_not_served", route=route, named_pbx=exc.named,
              peer=f"{peer[0]}:{peer[1]}" if peer else None,
              action="refused" if refused else "settled", error=exc.message, **fields)


def _answer_variables(d: Decision, announce: str | None = None) -> list[tuple[str, str]]:
    """The channel variables that carry a decision, in ``var.ALLOW_ANSWER`` or
    ``var.REJECT_ANSWER`` order, and only those the dialplan reads after it (each one
    set is a message on the PBX's AMI queue): no CALL_ID and no hangup handler when the
    call has no id, NUMBER or TARGET by the route, ANNOUNCE only with ``announce`` (even
    empty)."""
    trunk = d.route in (Route.PSTN, Route.PARTNER, Route.EMERGENCY)
    number = d.destination.lstrip("+") if d.route in (Route.PSTN, Route.PARTNER) else \
        d.destination
    values = {
        var.REASON: d.reason.value,
        var.CALL_ID: str(d.call_id) if d.call_id else None,
        var.HANGUP_HANDLER: var.HANGUP_HANDLER_AT if d.call_id else None,
        var.ROUTE: d.route.value if d.route else "",
        var.NUMBER: number if trunk else None,
        var.TARGET: None if trunk else d.target or "",
        var.FUNDED: str(d.funded_seconds) if d.funded_seconds is not None else "",
        var.CAUSE: str(cause_for(d.reason.value)),
        var.ANNOUNCE: announce,
        var.DECISION: d.decision,
    }
    names = var.ALLOW_ANSWER if d.allow else var.REJECT_ANSWER
    return [(name, value) for name in names if (value := values[name]) is not None]


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
