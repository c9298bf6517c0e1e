"""Live calls: the calls this process follows from the decision to the settlement.

    AMI DialEnd ANSWER -> the call's talk time starts; renewals are scheduled
    each slice's end   -> rater renews -> AMI Setvar TIMEOUT(absolute) on the callee
    funding final      -> the caller hears a warning ``warning_seconds`` before the end
    AMI Hangup         -> renewals stop
    any end report     -> rater settles (or releases) once; the call leaves the table

The PBX enforces the funded end on its own: the dialplan dials with ``L(funded ms)``,
which puts a hangup deadline on the callee channel at answer. The gateway only moves
that deadline further when it has reserved more time.

A move can fail (the AMI link is down). The PBX then keeps the earlier deadline, which
is safe but cuts a call that is paid for, so a failed move is sent again until it gets
through or the funding has run out, and after every AMI reconnect each answered call's
deadline is read back from the PBX and corrected (``resync_deadlines``). A call
answered while the link was down (its ``DialEnd`` lost) is found there too: its callee
channel carries the deadline ``L()`` put on it at answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from .. import dialplan_variables as var
from ..ami.client import AMI_ACTION_FAILED
from ..ami.events import CoreShowChannel, DialEnd, Hangup
from ..billing.rater import Rater
from ..errors import GatewayError
from ..metrics import Metrics
from .announce import Announcements, renew_margin, warning_due

log = structlog.get_logger("gateway.calls")

NOT_PBX_OWNER = "NOT_PBX_OWNER"  # a fenced write refused: another process owns the PBX

DEADLINE = "TIMEOUT(absolute)"  # on the callee channel; seconds from when it arrives
# Uniqueids of the calls this process settled lately, so that the PBX's Cdr for such a
# call (it comes after the hangup report) needs no database lookup to know it is closed.
# A uniqueid names one call of its PBX (UNIQUE (pbx, pbx_uniqueid)). About 100 bytes
# each: at most about 1 MiB.
SETTLED_REMEMBERED = 10_000
# A failed deadline move is sent again this often while the call is funded: once the
# AMI link is back, the call's deadline is right within this time.
DEADLINE_RETRY_SECONDS = 0.5
# The PBX's deadline read back may differ from ours by the time between the answer and
# our DialEnd handling, and by the read's own delay: beyond this it is corrected.
DEADLINE_TOLERANCE_SECONDS = 1.0
# A DialEnd heard late (a loaded PBX or gateway, a backlog on the AMI link) counts from
# when the PBX sent it (its ``Timestamp``), so that the funded end stays where the PBX's
# own answer puts it; the correction is bounded, so that a PBX clock far behind ours
# (no NTP) cuts calls at most this much early rather than at once.
EVENT_LAG_MAX_SECONDS = 10.0


class DeadlineLink(Protocol):
    """What moving and checking a deadline needs from the AMI link."""

    async def setvar(self, channel: str, variable: str, value: str) -> None: ...

    async def getvar(self, channel: str, variable: str) -> str: ...

    async def live_channels(self) -> list[CoreShowChannel]: ...

    async def originate_application(self, channel: str, application: str, data: str,
                                    variables: dict[str, str]) -> None: ...


def _channel_gone(exc: Exception) -> bool:
    """The PBX answered that the channel no longer exists: the call has ended."""
    return (getattr(exc, "code", None) == AMI_ACTION_FAILED
            and "no such channel" in str(exc).lower())


@dataclass
class LiveCall:
    """One call this process follows (mutable: it changes as the call goes on)."""

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
    pbx: str = "default"  # the PBX that carries the call
    channel: str | None = None
    dest_channel: str | None = None
    authorised_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    answered_at: dt.datetime | None = None
    answered_mono: float | None = None
    source: str = ""
    renew_task: asyncio.Task[None] | None = None
    # the funded seconds whose end the PBX's deadline is known to be at (None: unknown,
    # e.g. an adopted call); behind ``funded_seconds`` while a move has not got through
    deadline_sent_for: int | None = None
    deadline_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # no more funding is coming: the last reservation (the first, or a renewal) came back
    # short or empty, so the deadline the PBX has is the call's end
    funding_final: bool = False
    warning_task: asyncio.Task[None] | None = None
    warned: bool = False

    @property
    def deadline_behind(self) -> bool:
        return self.deadline_sent_for != self.funded_seconds

    def view(self, now_mono: float) -> dict[str, Any]:
        """The call as ``/status`` shows it."""
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
            "pbx": self.pbx,
        }


class LiveCalls:
    """The table of one PBX's live calls, their renewals and their settlement."""

    def __init__(self, rater: Rater, metrics: Metrics, *, renew_before_seconds: int,
                 monotonic: Callable[[], float], pbx: str = "default",
                 announcements: Announcements | None = None):
        self.pbx = pbx
        # the cut-off warning (none without announcements, as in unit tests)
        self.warning_seconds = announcements.warning_seconds if announcements else 0
        self.warning_prompt = announcements.warning_prompt if announcements else ""
        # (pbx, owner) while this process holds the PBX's lease: renewals and the
        # reconciler's settlements commit only while the lease is still ours. None: no
        # lease is kept (one process, one PBX, as in unit tests).
        self.fence: tuple[str, str] | None = None
        # whether this process owns the PBX now (its lease keeper answers; without one
        # a renewal refused by the fence ends the renewals)
        self.owned: Callable[[], bool] = lambda: False
        self.rater = rater
        self.metrics = metrics
        self.renew_before = renew_before_seconds
        self.monotonic = monotonic
        self.ami: DeadlineLink | None = None  # no AMI: the PBX keeps the first deadline
        self.by_id: dict[uuid.UUID, LiveCall] = {}
        self._by_uniqueid: dict[str, uuid.UUID] = {}
        self._settled: dict[str, None] = {}  # uniqueids, oldest first (SETTLED_REMEMBERED)

    # ---- the table ---------------------------------------------------------------------

    def track(self, call: LiveCall) -> None:
        self.by_id[call.call_id] = call
        if call.uniqueid:
            self._by_uniqueid[call.uniqueid] = call.call_id
        self._count()

    def untrack(self, call: LiveCall) -> None:
        self.by_id.pop(call.call_id, None)
        if call.uniqueid:
            self._by_uniqueid.pop(call.uniqueid, None)
        if call.renew_task is not None and call.renew_task is not asyncio.current_task():
            call.renew_task.cancel()
        _cancel(call.warning_task)
        self._count()

    def settled_here(self, uniqueid: str | None) -> bool:
        """This process settled (or released) the call of ``uniqueid`` lately."""
        return bool(uniqueid) and uniqueid in self._settled

    def _count(self) -> None:
        self.metrics.live_calls.labels(self.pbx).set(len(self.by_id))

    def find(self, uniqueid: str | None) -> LiveCall | None:
        """The live call whose caller channel is ``uniqueid``."""
        call_id = self._by_uniqueid.get(uniqueid or "")
        return self.by_id.get(call_id) if call_id else None

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.monotonic()
        return [c.view(now) for c in self.by_id.values()]

    async def stop(self) -> None:
        """Stop renewing; reservations stay in the database for the next start."""
        tasks = [c.renew_task for c in self.by_id.values() if c.renew_task]
        tasks += [c.warning_task for c in self.by_id.values() if c.warning_task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drop(self) -> None:
        """The PBX's lease is lost: stop renewing and forget every call WITHOUT settling
        (the new owner adopts them; their reservations stay in the database)."""
        await self.stop()
        self.by_id.clear()
        self._by_uniqueid.clear()
        self._count()

    # ---- the call is answered ------------------------------------------------------------

    async def on_dial_end(self, event: DialEnd) -> None:
        if not event.answered:
            return
        call = self.find(event.uniqueid)
        if call is None or call.answered_mono is not None:
            return
        with structlog.contextvars.bound_contextvars(call_id=str(call.call_id),
                                                     uniqueid=call.uniqueid):
            await self._answered(call, event)

    async def _answered(self, call: LiveCall, event: DialEnd) -> None:
        now = self.rater.clock()
        late = self._heard_late_by(event, now)
        call.answered_mono = self.monotonic() - late
        call.answered_at = now - dt.timedelta(seconds=late)
        call.dest_channel = event.dest_channel
        call.deadline_sent_for = call.funded_seconds  # Dial's L() set it at answer
        call.linkedid = call.linkedid or event.linkedid
        try:
            await self.rater.answered(call.call_id, call.answered_at)
        except Exception:  # noqa: BLE001 - the call goes on; reconcile will see it
            log.exception("mark_answered_failed", call_id=str(call.call_id))
        log.info("answered", call_id=str(call.call_id), dest_channel=call.dest_channel,
                 funded_seconds=call.funded_seconds)
        self.start_renewals(call)
        if call.funding_final:
            self._schedule_warning(call)

    def _heard_late_by(self, event: DialEnd, now: dt.datetime) -> float:
        """How long ago the PBX sent ``event`` (0 without its ``Timestamp``, or when the
        PBX's clock is ahead of ours), at most ``EVENT_LAG_MAX_SECONDS``."""
        if event.sent_at is None:
            return 0.0
        late = now.timestamp() - event.sent_at
        if late > DEADLINE_TOLERANCE_SECONDS:  # the call's id is bound to the log
            log.warning("answer_heard_late", seconds=round(late, 3),
                        counted_from_pbx=round(min(late, EVENT_LAG_MAX_SECONDS), 3))
        return min(max(late, 0.0), EVENT_LAG_MAX_SECONDS)

    def start_renewals(self, call: LiveCall) -> None:
        """Renew an answered, rated call's funding before each slice ends (needs AMI to
        move the deadline, and the callee's channel to move it on)."""
        if (call.rated and call.answered_mono is not None and call.dest_channel
                and self.ami is not None):
            call.renew_task = asyncio.create_task(self._renew_loop(call),
                                                  name=f"renew-{call.call_id}")

    # ---- renewals --------------------------------------------------------------------------

    def _renew_margin(self) -> float:
        # never renew more often than a third of a slice ahead; with cut-off warnings on,
        # early enough to know before the warning is due (announce.renew_margin)
        return renew_margin(self.renew_before, self.warning_seconds,
                            self.rater.slice_seconds)

    async def _renew_loop(self, call: LiveCall) -> None:
        assert call.answered_mono is not None and call.funded_seconds is not None
        while True:
            end = call.answered_mono + call.funded_seconds
            await asyncio.sleep(max(0.0, end - self._renew_margin() - self.monotonic()))
            try:
                renewal = await self._renew(call)
            except GatewayError as exc:
                if exc.code != NOT_PBX_OWNER:
                    log.warning("renew_failed", call_id=str(call.call_id), code=exc.code,
                                error=exc.message)
                    self.metrics.reservations.labels("error").inc()
                    await asyncio.sleep(1)
                    continue
                if self.owned():
                    # our lease lapsed and is being taken again: the keeper drops and
                    # re-adopts the calls, or the next renewal passes the fence
                    await asyncio.sleep(DEADLINE_RETRY_SECONDS)
                    continue
                # the PBX's lease went to another process: it renews the call now
                log.warning("renew_not_owner", call_id=str(call.call_id), pbx=self.pbx)
                return
            except Exception:  # noqa: BLE001 - the PBX keeps the deadline it has
                log.exception("renew_failed", call_id=str(call.call_id))
                self.metrics.reservations.labels("error").inc()
                await asyncio.sleep(1)
                continue
            if not renewal.open:
                return
            if renewal.slice_seconds <= 0:
                self.metrics.reservations.labels("exhausted").inc()
                log.info("funding_exhausted", call_id=str(call.call_id),
                         funded_seconds=call.funded_seconds)
                call.funding_final = True
                self._schedule_warning(call)
                return  # the PBX ends the call at the deadline it already has
            self.metrics.reservations.labels("granted").inc()
            call.funded_seconds = renewal.funded_seconds
            # a short slice: the sources ran dry, this deadline is the end (a top-up before
            # the next renewal would still extend it, and the warning then moves too)
            final = renewal.slice_seconds < self.rater.slice_seconds
            if call.funding_final and not final:
                _cancel(call.warning_task)  # funded again: no warning due now
                call.warned = False
            call.funding_final = final
            if not await self._move_deadline(call):
                return  # the call is over on the PBX; its end report settles it
            if final:
                self._schedule_warning(call)

    async def _renew(self, call: LiveCall) -> Any:
        if self.fence is None:
            return await self.rater.renew(call.call_id)
        return await self.rater.renew(call.call_id, fence=self.fence)

    def _funded_left(self, call: LiveCall) -> float:
        assert call.answered_mono is not None and call.funded_seconds is not None
        return call.answered_mono + call.funded_seconds - self.monotonic()

    async def _move_deadline(self, call: LiveCall) -> bool:
        """Move the PBX's deadline to the funded end; while that fails (AMI down), try
        again every ``DEADLINE_RETRY_SECONDS`` as long as the call is funded. False when
        the call is over: the funding ran out first (the PBX has then cut the call at its
        earlier deadline), or the PBX has no such channel any more."""
        failures = 0
        while True:
            async with call.deadline_lock:
                if not call.deadline_behind:  # a re-sync after a reconnect was quicker
                    return True
                if self._funded_left(call) <= 0:
                    log.warning("deadline_never_moved", call_id=str(call.call_id),
                                funded_seconds=call.funded_seconds,
                                pbx_deadline_for=call.deadline_sent_for)
                    return False
                sent = await self._send_deadline(call, "ok", quiet=failures > 0)
                if sent != "failed":
                    return sent == "sent"
            failures += 1
            await asyncio.sleep(DEADLINE_RETRY_SECONDS)

    async def _check_deadline(self, call: LiveCall) -> str:
        """Read the call's deadline back from the PBX and correct it when it is out of
        step with the funding; called under ``call.deadline_lock``. ``in_step``,
        ``corrected``, ``gone`` (no such channel), ``failed`` (the correction did not get
        through) or ``link_lost`` (the read did not)."""
        assert self.ami is not None and call.dest_channel is not None
        try:
            value = await self.ami.getvar(call.dest_channel, DEADLINE)
        except Exception as exc:  # noqa: BLE001 - decided below
            if _channel_gone(exc):
                return "gone"
            if getattr(exc, "code", None) != AMI_ACTION_FAILED:
                log.warning("deadline_check_failed", call_id=str(call.call_id), error=str(exc))
                return "link_lost"
            value = ""  # the PBX would not tell: send it anyway
        pbx_left = _seconds(value)
        left = self._funded_left(call)
        if pbx_left is not None and abs(pbx_left - left) <= DEADLINE_TOLERANCE_SECONDS:
            call.deadline_sent_for = call.funded_seconds
            return "in_step"
        log.warning("deadline_out_of_step", call_id=str(call.call_id),
                    pbx_seconds_left=value, funded_seconds_left=round(left, 3))
        sent = await self._send_deadline(call, "corrected", verify=False)
        return "corrected" if sent == "sent" else sent

    async def _send_deadline(self, call: LiveCall, result: str, *, quiet: bool = False,
                             verify: bool = True) -> str:
        """Send the time left now (TIMEOUT(absolute) counts from when it arrives); called
        under ``call.deadline_lock``. ``sent``; ``gone`` when the PBX has no such channel
        any more (nothing left to move); ``failed`` when it should be tried again."""
        assert self.ami is not None and call.dest_channel is not None
        funded = call.funded_seconds
        remaining = self._funded_left(call)
        started = self.monotonic()
        try:
            await self.ami.setvar(call.dest_channel, DEADLINE, f"{max(remaining, 0.5):.3f}")
        except Exception as exc:  # noqa: BLE001 - the old, earlier deadline stays: safe
            if _channel_gone(exc):
                call.deadline_sent_for = funded
                log.info("deadline_channel_gone", call_id=str(call.call_id))
                return "gone"
            self.metrics.deadline_moves.labels("failed").inc()
            # retried twice a second: one warning per call, the retries at debug level
            (log.debug if quiet else log.warning)(
                "deadline_move_failed", call_id=str(call.call_id), error=str(exc),
                retry_every=DEADLINE_RETRY_SECONDS)
            return "failed"
        call.deadline_sent_for = funded
        self.metrics.deadline_moves.labels(result).inc()
        took = self.monotonic() - started
        log.info("deadline_moved", call_id=str(call.call_id), remaining=round(remaining, 3),
                 funded_seconds=funded, result=result, took=round(took, 3))
        if verify and took > DEADLINE_TOLERANCE_SECONDS:
            # a stalled link delivered it late, and it counts from its arrival: the PBX's
            # deadline may now be past the funded end by up to that delay
            if await self._check_deadline(call) == "gone":
                return "gone"
        return "sent"

    async def resync_deadlines(self) -> dict[str, int]:
        """After the AMI link is back (or events were lost): read each answered call's
        deadline from the PBX and send the time left *now* where it does not match the
        funding (a move that failed meanwhile, or one whose answer was lost with the
        link). Stops at the first sign the link is gone again: the next login re-runs it."""
        counts = {"answers_found": 0, "checked": 0, "corrected": 0, "gone": 0}
        if self.ami is None:
            return counts
        try:
            counts["answers_found"] = await self._find_unseen_answers()
        except Exception as exc:  # noqa: BLE001 - the link is gone again
            log.warning("deadline_resync_stopped", error=str(exc), **counts)
            return counts
        for call in list(self.by_id.values()):
            if (not call.rated or call.answered_mono is None or call.funded_seconds is None
                    or not call.dest_channel or call.call_id not in self.by_id):
                continue
            async with call.deadline_lock:
                if self._funded_left(call) <= 0:
                    continue
                counts["checked"] += 1
                outcome = await self._check_deadline(call)
                if outcome == "link_lost":
                    log.warning("deadline_resync_stopped", **counts)
                    return counts
                if outcome in ("corrected", "gone"):
                    counts[outcome] += 1
        log.info("deadlines_resynced", **counts)
        return counts

    async def _find_unseen_answers(self) -> int:
        """Calls answered while we did not hear it (``DialEnd`` lost with the link, or
        dropped): the PBX put the first slice's deadline on the callee's channel at
        answer, so a callee channel of the call with a deadline means answered, and its
        time left says how long ago. Mark them answered and start their renewals."""
        assert self.ami is not None
        ringing = [c for c in self.by_id.values()
                   if c.rated and c.answered_mono is None and c.uniqueid and c.funded_seconds]
        if not ringing:
            return 0
        channels = await self.ami.live_channels()
        found = 0
        for call in ringing:
            caller = next((c for c in channels if c.uniqueid == call.uniqueid), None)
            if caller is None or not caller.linkedid:
                continue  # ended: its end report or reconciliation settles it
            for peer in channels:
                if (peer.linkedid != caller.linkedid or peer.uniqueid == call.uniqueid
                        or not peer.channel):
                    continue
                try:
                    left = _seconds(await self.ami.getvar(peer.channel, DEADLINE))
                except Exception as exc:  # noqa: BLE001 - gone meanwhile, or link lost
                    if _channel_gone(exc):
                        continue
                    raise
                if left is None or call.answered_mono is not None:
                    continue  # still ringing (no deadline yet), or DialEnd came meanwhile
                assert call.funded_seconds is not None
                talked = max(0.0, call.funded_seconds - left)
                call.answered_mono = self.monotonic() - talked
                call.answered_at = self.rater.clock() - dt.timedelta(seconds=talked)
                call.dest_channel = peer.channel
                call.linkedid = call.linkedid or caller.linkedid
                call.deadline_sent_for = call.funded_seconds
                log.warning("answer_found", call_id=str(call.call_id),
                            dest_channel=peer.channel, talked=round(talked, 3))
                try:
                    await self.rater.answered(call.call_id, call.answered_at)
                except Exception:  # noqa: BLE001 - the call goes on; reconcile will see it
                    log.exception("mark_answered_failed", call_id=str(call.call_id))
                self.start_renewals(call)
                found += 1
                break
        return found

    # ---- the warning before the cut ---------------------------------------------------------

    def _schedule_warning(self, call: LiveCall) -> None:
        """Have the caller hear the warning ``warning_seconds`` before the call's funded
        end (at once when that is already past); once per deadline."""
        if (self.warning_seconds <= 0 or call.warned or self.ami is None
                or call.answered_mono is None or call.funded_seconds is None
                or not call.channel):
            return
        _cancel(call.warning_task)
        call.warning_task = asyncio.create_task(self._warn(call),
                                                name=f"warn-{call.call_id}")

    async def _warn(self, call: LiveCall) -> None:
        due = warning_due(self._funded_left(call), self.warning_seconds)
        if due is None:
            return
        await asyncio.sleep(due)
        if call.call_id not in self.by_id or self.ami is None or not call.funding_final:
            return
        call.warned = True
        left = self._funded_left(call)
        try:
            await self.ami.originate_application(
                f"Local/{var.WARNING_EXTEN}@{var.WARNING_CONTEXT}/n", "ChanSpy",
                f"{call.channel},qwEu",
                {var.WARNING: self.warning_prompt, "CDR_PROP(disable)": "1"})
        except Exception as exc:  # noqa: BLE001 - the call goes on; only the warning is lost
            self.metrics.cutoff_warnings.labels("failed").inc()
            log.warning("cutoff_warning_failed", call_id=str(call.call_id),
                        channel=call.channel, error=str(exc))
            return
        self.metrics.cutoff_warnings.labels("sent").inc()
        log.info("cutoff_warning_sent", call_id=str(call.call_id), channel=call.channel,
                 seconds_left=round(left, 3), funded_seconds=call.funded_seconds)

    # ---- the call ends -------------------------------------------------------------------

    async def on_hangup(self, event: Hangup) -> None:
        call = self.find(event.uniqueid)
        if call is not None and call.renew_task is not None:
            call.renew_task.cancel()
        if call is not None:
            _cancel(call.warning_task)

    async def settle(self, call_id: uuid.UUID, billable: int, *, by: str,
                     fenced: bool = False) -> None:
        """Settle (or release, when nothing was answered) once; later reports are no-ops.
        ``by`` names the report: agi, cdr, reconcile-cdr, reconcile-estimate. ``fenced``
        (reconciliation's own settlements): only while this process holds the PBX's
        lease; otherwise nothing happens (NOT_PBX_OWNER)."""
        call = self.by_id.get(call_id)
        fence = self.fence if fenced else None
        try:
            if fence is not None:  # a release is a settlement of 0 s
                result = await self.rater.settle(call_id, billable, by=by, fence=fence)
            elif billable > 0:
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
            self.untrack(call)
            if call.uniqueid:
                while len(self._settled) >= SETTLED_REMEMBERED:
                    self._settled.pop(next(iter(self._settled)))
                self._settled[call.uniqueid] = None


def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and task is not asyncio.current_task():
        task.cancel()


def _seconds(value: str) -> float | None:
    """TIMEOUT(absolute) as read back: seconds left, or None when the channel has no
    deadline ("0") or the value is not a number."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 else None
