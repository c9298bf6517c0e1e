"""Reconciliation: bring the database in line with the PBX.

    AMI Cdr                         -> the PBX's record settles the call (live)
    start / AMI reconnect / a timer -> adopt calls still up, settle those that ended
                                       while we were away from the PBX's CDR table,
                                       estimate or release what left no record
    every few seconds               -> heartbeat: other processes leave our calls alone

The PBX's own record settles a call whichever way it arrives: as an AMI ``Cdr`` event
while we listen, or from the ``cdr`` table when we were not listening.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from ..ami.events import Cdr, CoreShowChannel
from ..billing.rater import Rater
from ..billing.recovery import OpenCall, Recovery
from .live import LiveCall, LiveCalls

log = structlog.get_logger("gateway.calls")


class ChannelsLink(Protocol):
    """What reconciling needs from the AMI link."""

    async def live_channels(self) -> list[CoreShowChannel]: ...


class Reconciler:
    """Settles what the PBX recorded, adopts what is still up, keeps the heartbeat."""

    def __init__(self, rater: Rater, recovery: Recovery, live: LiveCalls, *,
                 stale_after_seconds: int, instance_id: str | None,
                 heartbeat_seconds: float, monotonic: Callable[[], float]):
        self.rater = rater
        self.recovery = recovery
        self.live = live
        self.stale_after = stale_after_seconds
        self.instance_id = instance_id
        self.heartbeat_seconds = heartbeat_seconds
        self.monotonic = monotonic
        self.ami: ChannelsLink | None = None  # no AMI: from the CDR table only
        self.last_reconcile: dict[str, Any] = {}
        self._running = asyncio.Lock()

    # ---- the PBX's record, live ---------------------------------------------------------

    async def on_cdr(self, event: Cdr) -> None:
        call = self.live.find(event.uniqueid)
        call_id = call.call_id if call is not None else None
        if call_id is None:
            # a call of another process, or of ours before a restart
            call_id = await self.recovery.open_call_id(event.uniqueid or "")
            if call_id is None:
                return
        billable = event.billable_seconds if event.answered else 0
        with structlog.contextvars.bound_contextvars(call_id=str(call_id),
                                                     uniqueid=event.uniqueid):
            await self.live.settle(call_id, billable, by="cdr")

    # ---- reconciliation -----------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Bring the database in line with the PBX: adopt calls still up, settle those that
        ended while we were away from the PBX's CDR, release what never connected.
        One run at a time (start, AMI reconnects and the timer may overlap)."""
        async with self._running:
            return await self._reconcile()

    async def _reconcile(self) -> dict[str, int]:
        counts = {"adopted": 0, "settled": 0, "released": 0, "estimated": 0, "kept": 0}
        channels: list[CoreShowChannel] | None = None
        if self.ami is not None:
            try:
                channels = await self.ami.live_channels()
            except Exception as exc:  # noqa: BLE001 - try again at the next round
                log.warning("reconcile_no_channels", error=str(exc))
        up = {c.uniqueid for c in channels or []}
        # calls of other gateway processes that are still alive stay theirs
        others = await self.recovery.live_instances(self.heartbeat_seconds * 4)
        others.discard(self.instance_id or "")
        now = self.rater.clock()
        for call in await self.recovery.open_calls():
            uniqueid = call.pbx_uniqueid
            age = (now - call.authorised_at).total_seconds()
            tracked = call.call_id in self.live.by_id
            if channels is not None and uniqueid in up:
                if not tracked and call.owner not in others:
                    self._adopt(call, channels)
                    counts["adopted"] += 1
                else:
                    counts["kept"] += 1
                continue
            if tracked and (channels is None or age < self.stale_after):
                counts["kept"] += 1
                continue
            cdr = await self.recovery.cdr(uniqueid) if uniqueid else None
            if cdr is not None:
                billable = cdr.billable_seconds
                await self.live.settle(call.call_id, billable, by="reconcile-cdr")
                counts["settled" if billable else "released"] += 1
            elif channels is not None and age >= self.stale_after:
                # Not on the PBX and no record of it: the call ended unseen. Bill at most
                # what it could have talked, from the answer we saw, else nothing.
                billable = 0
                if call.answered_at is not None:
                    billable = min(call.funded_seconds,
                                   int((now - call.answered_at).total_seconds()))
                await self.live.settle(call.call_id, billable, by="reconcile-estimate")
                counts["estimated" if billable else "released"] += 1
            else:
                counts["kept"] += 1
        self.last_reconcile = {"at": now.isoformat(), **counts}
        log.info("reconciled", **counts)
        return counts

    def _adopt(self, open_call: OpenCall, channels: list[CoreShowChannel]) -> None:
        """A call still up that this process does not know (we restarted): track it,
        renew its funding and put its deadline where the funding ends."""
        call = LiveCall(
            call_id=open_call.call_id, direction=open_call.direction,
            tenant_id=open_call.tenant_id, caller=open_call.caller,
            destination=open_call.destination, route=open_call.route,
            rated=open_call.rated,
            funded_seconds=open_call.funded_seconds if open_call.rated else None,
            uniqueid=open_call.pbx_uniqueid, linkedid=open_call.linkedid,
            authorised_at=open_call.authorised_at, source="+".join(open_call.sources),
        )
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
        self.live.start_renewals(call)

    async def run_reconciler(self, interval: float) -> None:
        """Reconcile every ``interval`` seconds, forever."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("reconcile_failed")

    # ---- heartbeat ----------------------------------------------------------------------

    async def run_heartbeat(self) -> None:
        """Tell other gateway processes sharing the database that this one is alive."""
        while True:
            try:
                await self.recovery.heartbeat(self.instance_id or "")
            except Exception as exc:  # noqa: BLE001 - try again at the next beat
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.heartbeat_seconds)


__all__ = ["ChannelsLink", "Reconciler"]
