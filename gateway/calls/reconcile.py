"""Reconciliation: bring the database in line with ONE PBX (its open calls, channels and
CDRs; never another PBX's).

    AMI Cdr                         -> the PBX's record settles the call (live)
    start / AMI reconnect / a timer -> adopt calls still up, settle those that ended
                                       while we were away from the PBX's CDR table,
                                       estimate or release what left no record
    a call past its funded end      -> settled from its record, else by the estimate:
      plus the grace                   nothing stays reserved forever, AMI or not
    gone, no record, and made by an -> the PBX crashed under it: billed only up to the
      earlier run of the PBX           last proof it was up (``reconcile-crash``)
    the PBX's lease gained          -> reconcile at once (``calls/lease.py``): every open
                                       call of an owned PBX is this process's to follow

The PBX's own record settles a call whichever way it arrives: as an AMI ``Cdr`` event
while we listen, or from the ``cdr`` table when we were not listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ..ami.events import Cdr, CoreShowChannel, CoreStatus, LinkLife, uniqueid_epoch
from ..billing.rater import MAX_BILLABLE, Rater
from ..billing.recovery import CdrTableCheck, OpenCall, Recovery
from .live import LiveCall, LiveCalls

log = structlog.get_logger("gateway.calls")


class ChannelsLink(Protocol):
    """What reconciling needs from the AMI link."""

    async def live_channels(self) -> list[CoreShowChannel]: ...

    # optional (``gateway.ami.AmiClient`` has both): what the crash rule needs
    #   async def core_status(self) -> CoreStatus
    #   def link_history(self) -> list[LinkLife]


# the PBX's clock is taken as ours unless it is at least this far off (its epoch is read
# in whole seconds): then the start it gives is moved onto our clock
CLOCK_SKEW_TOLERANCE = 2.0


class PbxRun:
    """The PBX's current run as read after a (re)connect: when it started (UTC, by the PBX's
    clock and by ours) and the last moment each earlier run was heard alive on a link."""

    def __init__(self, status: CoreStatus, history: list[LinkLife]):
        assert status.started_at is not None
        self.started_pbx = status.started_at  # by the PBX's clock: uniqueids compare to it
        ahead = status.clock_ahead if abs(status.clock_ahead) >= CLOCK_SKEW_TOLERANCE else 0.0
        self.started_at = status.started_at - dt.timedelta(seconds=ahead)  # our clock
        # links to an earlier run: the start they read was another, or (not read) they
        # were made before this run began; the PBX said its last word on them before it
        # went down
        earlier = [life for life in history
                   if (life.pbx_started_at is not None and life.pbx_started_at != self.started_pbx)
                   or (life.pbx_started_at is None and life.connected < self.started_at)]
        self.last_heard_before: dt.datetime | None = (
            max(life.last_heard_at for life in earlier) if earlier else None)

    def made_before(self, call: OpenCall) -> bool:
        """Whether ``call`` was made by an earlier run of the PBX (it died with it). The
        uniqueid's epoch is the PBX's own clock, the same clock as the start; without a
        readable uniqueid, the answer (our clock) tells."""
        epoch = uniqueid_epoch(call.pbx_uniqueid)
        if epoch is not None:
            return epoch < self.started_pbx.timestamp()
        seen = call.answered_at or call.authorised_at
        return seen < self.started_at


class Reconciler:
    """Settles what one PBX recorded, adopts what is still up on it."""

    def __init__(self, rater: Rater, recovery: Recovery, live: LiveCalls, *,
                 stale_after_seconds: int, monotonic: Callable[[], float],
                 settle_grace_seconds: int = 60, ring_allowance_seconds: int = 300):
        self.rater = rater
        self.recovery = recovery
        self.live = live
        self.pbx = live.pbx
        self.stale_after = stale_after_seconds
        self.settle_grace = dt.timedelta(seconds=settle_grace_seconds)
        self.ring_allowance = dt.timedelta(seconds=ring_allowance_seconds)
        self.monotonic = monotonic
        self.ami: ChannelsLink | None = None  # no AMI: from the CDR table only
        self.last_reconcile: dict[str, Any] = {}
        # uniqueid -> the last time a channel list showed the call up on the PBX
        self.seen_up: dict[str, dt.datetime] = {}
        self.cdr_table: CdrTableCheck | None = None  # None: not checked yet
        self._running = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    # ---- the PBX's record, live ---------------------------------------------------------

    async def on_cdr(self, event: Cdr) -> None:
        call = self.live.find(event.uniqueid)
        call_id = call.call_id if call is not None else None
        if call_id is None:
            if self.live.settled_here(event.uniqueid):
                return  # its hangup report was settled here: closed, exactly once
            # authorised by another process, or by ours before a restart
            call_id = await self.recovery.open_call_id(self.pbx, event.uniqueid or "")
            if call_id is None:
                return
        billable = event.billable_seconds if event.answered else 0
        with structlog.contextvars.bound_contextvars(call_id=str(call_id),
                                                     uniqueid=event.uniqueid):
            await self.live.settle(call_id, billable, by="cdr")

    # ---- reconciliation -----------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Bring the database in line with the PBX: adopt calls still up, settle those that
        ended while we were away from the PBX's CDR, release what never connected, close
        what is past its funded end (the rule of docs/billing.md, "Recovery").
        One run at a time (start, AMI reconnects, a lease gained and the timer may overlap)."""
        async with self._running:
            return await self._reconcile()

    async def _reconcile(self) -> dict[str, int]:
        counts = {"adopted": 0, "settled": 0, "released": 0, "estimated": 0, "expired": 0,
                  "crashed": 0, "kept": 0, "forgotten": 0}
        channels: list[CoreShowChannel] | None = None
        if self.ami is not None:
            try:
                channels = await self.ami.live_channels()
            except Exception as exc:  # noqa: BLE001 - try again at the next round
                log.warning("reconcile_no_channels", error=str(exc))
        up = {c.uniqueid for c in channels or []}
        now = self.rater.clock()
        run = await self._pbx_run() if channels is not None else None
        tracked_before = set(self.live.by_id)
        # every open call of this PBX, whichever process authorised it: the PBX's lease
        # makes this process the only one following them
        open_calls = await self.recovery.open_calls(self.pbx)
        for call in open_calls:
            uniqueid = call.pbx_uniqueid
            age = (now - call.authorised_at).total_seconds()
            tracked = call.call_id in self.live.by_id
            if channels is not None and uniqueid in up:
                self.seen_up[uniqueid] = now
                if not tracked:
                    self._adopt(call, channels)
                    counts["adopted"] += 1
                else:
                    counts["kept"] += 1
                continue
            if tracked and channels is not None and age < self.stale_after:
                counts["kept"] += 1
                continue
            cdr = await self.recovery.cdr(self.pbx, uniqueid) if uniqueid else None
            if cdr is not None:
                billable = cdr.billable_seconds
                await self.live.settle(call.call_id, billable, by="reconcile-cdr",
                                       fenced=True)
                counts["settled" if billable else "released"] += 1
            elif channels is not None and age >= self.stale_after:
                # Not on the PBX and no record of it: the call ended unseen.
                if run is not None and run.made_before(call):
                    # the PBX went down under it (a crash leaves no record): up to the
                    # last proof it was up, never past the PBX's restart
                    billable = self.crash_estimate(call, run, self.seen_up.get(uniqueid), now)
                    by, counted = "reconcile-crash", "crashed"
                else:
                    billable = self.estimate(call, now)
                    by, counted = "reconcile-estimate", "estimated"
                await self.live.settle(call.call_id, billable, by=by, fenced=True)
                counts[counted if billable else "released"] += 1
            elif now >= self.ends_by(call):
                # Without AMI we cannot ask the PBX, but past its funded end and the grace
                # the PBX has cut it: settle by the same estimate (docs/billing.md).
                billable = self.estimate(call, now)
                await self.live.settle(call.call_id, billable, by="reconcile-expired",
                                       fenced=True)
                counts["expired"] += 1
            else:
                counts["kept"] += 1
        # the table of live calls keeps no call the database says is over
        open_ids = {c.call_id for c in open_calls}
        still_open = {c.pbx_uniqueid for c in open_calls}
        for uniqueid in [u for u in self.seen_up if u not in still_open]:
            del self.seen_up[uniqueid]
        for call_id in tracked_before - open_ids:
            gone = self.live.by_id.get(call_id)
            if gone is not None:
                self.live.untrack(gone)
                counts["forgotten"] += 1
        await self._check_cdr_table(now)
        # /status shows this: a missing CDR table is a warning there
        cdr_table = self.cdr_table.view() if self.cdr_table else {"state": "unverified",
                                                                   "reason": "check failed"}
        self.last_reconcile = {"at": now.isoformat(), **counts,
                               "cdr_table": cdr_table["state"],
                               "cdr_table_reason": cdr_table["reason"]}
        log.info("reconciled", **counts, cdr_table=cdr_table["state"])
        return counts

    def ends_by(self, call: OpenCall) -> dt.datetime:
        """When the PBX has surely ended ``call``: its funded end (from the answer we
        saw; from the longest ringing allowed when we saw none) plus the grace. An
        unrated call has no funded end: a week, the longest call report accepted."""
        start = call.answered_at or call.authorised_at + self.ring_allowance
        talk = call.funded_seconds if call.rated else MAX_BILLABLE
        return start + dt.timedelta(seconds=talk) + self.settle_grace

    @staticmethod
    def estimate(call: OpenCall, now: dt.datetime) -> int:
        """Billable seconds of a call that ended and left no record: from the answer we
        saw to now, at most what it had funded (the PBX cut it there); never seen
        answered, nothing."""
        if call.answered_at is None:
            return 0
        return max(0, min(call.funded_seconds, int((now - call.answered_at).total_seconds())))

    @staticmethod
    def crash_estimate(call: OpenCall, run: PbxRun, seen_up: dt.datetime | None,
                       now: dt.datetime) -> int:
        """Billable seconds of a call the PBX lost in a crash (docs/billing.md,
        "Recovery"): from its answer to the last moment this process had proof the PBX
        was alive with the call up (the last word heard on the link to that run, the last
        channel list that showed the call, the answer itself), and never past the PBX's
        restart nor its funding. Never seen answered, nothing."""
        if call.answered_at is None:
            return 0
        proofs = [t for t in (run.last_heard_before, seen_up) if t is not None]
        end = min(run.started_at, now)
        if proofs:
            end = min(end, max(proofs))
        talked = int((end - call.answered_at).total_seconds())
        return max(0, min(call.funded_seconds, talked))

    async def _pbx_run(self) -> PbxRun | None:
        """The PBX's current run and the links to its earlier ones; None when the link
        cannot tell (then the plain estimate applies)."""
        ami: Any = self.ami
        if ami is None or not hasattr(ami, "core_status") or not hasattr(ami, "link_history"):
            return None
        try:
            status = await ami.core_status()
        except Exception as exc:  # noqa: BLE001 - the next round asks again
            log.warning("reconcile_no_core_status", pbx=self.pbx, error=str(exc))
            return None
        if status.started_at is None:
            return None
        return PbxRun(status, ami.link_history())

    async def _check_cdr_table(self, now: dt.datetime) -> None:
        try:
            check = await self.recovery.cdr_table_check(self.pbx, now)
        except Exception as exc:  # noqa: BLE001 - a warning only; try again next round
            log.warning("cdr_table_check_failed", error=str(exc))
            return
        if check.state == "missing" and (self.cdr_table is None
                                         or self.cdr_table.state != "missing"):
            log.warning("cdr_table_missing", **check.view())
        self.cdr_table = check

    def _adopt(self, open_call: OpenCall, channels: list[CoreShowChannel]) -> None:
        """A call still up that this process does not know (we restarted, or took the
        PBX's lease over): track it, renew its funding and put its deadline where the
        funding ends."""
        if open_call.call_id in self.live.by_id:
            return  # tracked meanwhile (its DialEnd came while we read the CDRs)
        call = live_call_of(open_call, self.pbx)
        caller = next(c for c in channels if c.uniqueid == open_call.pbx_uniqueid)
        call.channel = caller.channel
        peer = next((c for c in channels if c.linkedid == caller.linkedid
                     and c.uniqueid != open_call.pbx_uniqueid), None)
        if open_call.answered_at is not None:
            elapsed = (self.rater.clock() - open_call.answered_at).total_seconds()
            call.answered_at = open_call.answered_at
            call.answered_mono = self.monotonic() - elapsed
            call.dest_channel = peer.channel if peer else None
        self.live.track(call)
        log.info("adopted", call_id=str(call.call_id), answered=call.answered_at is not None)
        if call.dest_channel and call.rated and self.live.ami is not None:
            # the dead process may have renewed in the database and died before moving
            # the PBX's deadline: put it where the funding ends now, then keep renewing
            self._spawn(self._resync_then_renew(call))
        else:
            self.live.start_renewals(call)

    async def _resync_then_renew(self, call: LiveCall) -> None:
        await self.live._move_deadline(call)  # noqa: SLF001 - same package, one job
        if call.call_id in self.live.by_id:
            self.live.start_renewals(call)

    async def stop(self) -> None:
        """Cancel the deadline moves of adoptions still under way (the lease is lost or
        the process stops)."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_reconciler(self, interval: float) -> None:
        """Reconcile every ``interval`` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("reconcile_failed")


def live_call_of(open_call: OpenCall, pbx: str) -> LiveCall:
    """A live call built from its row, for a call this process did not authorise (or
    authorised before a restart)."""
    return LiveCall(
        call_id=open_call.call_id, direction=open_call.direction,
        tenant_id=open_call.tenant_id, caller=open_call.caller,
        destination=open_call.destination, route=open_call.route,
        rated=open_call.rated,
        funded_seconds=open_call.funded_seconds if open_call.rated else None,
        uniqueid=open_call.pbx_uniqueid, linkedid=open_call.linkedid,
        authorised_at=open_call.authorised_at, source="+".join(open_call.sources), pbx=pbx,
    )


__all__ = ["ChannelsLink", "PbxRun", "Reconciler", "live_call_of"]
