"""Call lifecycle: the bridge between the PBXs (AGI routes, AMI events) and billing.

One facade over the jobs, each in its own module:

- ``routes``: the AGI routes (decide and answer; the hangup report), each request mapped
  to its PBX;
- ``pbx``: one PBX as this process serves it: ``live`` (its live calls, renewals,
  deadline moves, settlement) and ``reconcile`` (its CDR, adoption, the timer);
- ``lease``: which process owns each PBX now (``app.py`` runs one keeper per PBX).

``app.py`` builds one ``CallService`` with a ``PbxCalls`` per configured PBX and wires it
to the AGI server and each PBX's AMI link. Built without PBX names (unit tests, and the
old single-PBX shape) it serves one PBX, ``default``, owned without a lease.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import structlog

from ..agi import AgiSession
from ..billing.rater import Rater
from ..billing.recovery import Recovery
from ..metrics import Metrics
from .announce import Announcements
from .live import LiveCall, LiveCalls
from .pbx import DEFAULT_PBX, AmiLink, PbxCalls
from .routes import AgiRoutes, PbxMap

log = structlog.get_logger("gateway.calls")


class CallService:
    def __init__(
        self,
        rater: Rater,
        recovery: Recovery,
        *,
        metrics: Metrics | None = None,
        renew_before_seconds: int = 30,
        monotonic: Callable[[], float] = time.monotonic,
        stale_after_seconds: int = 15,
        instance_id: str | None = None,
        heartbeat_seconds: float = 5.0,
        settle_grace_seconds: int = 60,
        ring_allowance_seconds: int = 300,
        pbxes: Sequence[str] = (DEFAULT_PBX,),
        agi_peers: Mapping[str, Collection[str]] | None = None,
        leased: bool = False,
        announcements: Announcements | None = None,
    ):
        """``pbxes``: the PBXs this process serves; ``leased``: each is owned only while
        this process holds its lease (``calls/lease.py``), else always; ``announcements``:
        what callers hear (``calls/announce.py``; None: nothing, as in unit tests)."""
        if not pbxes:
            raise ValueError("a call service serves at least one PBX")
        self.rater = rater
        self.recovery = recovery
        self.metrics = metrics or Metrics()
        self.instance_id = instance_id
        self.heartbeat_seconds = heartbeat_seconds
        self.pbxes: dict[str, PbxCalls] = {
            name: PbxCalls(name, rater, recovery, self.metrics, owner=instance_id,
                           leased=leased, renew_before_seconds=renew_before_seconds,
                           monotonic=monotonic, stale_after_seconds=stale_after_seconds,
                           settle_grace_seconds=settle_grace_seconds,
                           ring_allowance_seconds=ring_allowance_seconds,
                           announcements=announcements)
            for name in pbxes}
        # end reports of PBXs this process does not serve: settled, never tracked
        self._unserved = LiveCalls(rater, self.metrics,
                                   renew_before_seconds=renew_before_seconds,
                                   monotonic=monotonic, pbx="")
        self.pbx_map = PbxMap(list(self.pbxes), agi_peers)
        self._unknown: set[str] = set()  # PBX names seen in AGI requests, not served here
        self.agi_routes = AgiRoutes(rater, self.pbx_map, self._tracking, self._reporting,
                                    self.metrics, announcements)
        # the first PBX's parts: the only one in the single-PBX shape
        first = next(iter(self.pbxes.values()))
        self.first = first
        self.live_calls = first.live
        self.reconciler = first.reconciler
        # the entry points, by the job that owns them
        self.agi_outbound = self.agi_routes.agi_outbound
        self.agi_inbound = self.agi_routes.agi_inbound
        self.agi_hangup = self.agi_routes.agi_hangup
        self.on_dial_end = first.on_dial_end
        self.on_hangup = first.on_hangup
        self.on_cdr = first.on_cdr

    # ---- wiring ------------------------------------------------------------------------

    def routes(self) -> dict[str, Callable[[AgiSession], Awaitable[None]]]:
        """The AGI routes the dialplan calls: agi://host:port/<route>,args"""
        return self.agi_routes.routes()

    def pbx(self, name: str | None = None) -> PbxCalls:
        """A PBX this process serves (the first one without a name)."""
        return self.first if name is None else self.pbxes[name]

    def attach_ami(self, ami: AmiLink, pbx: str | None = None) -> None:
        """Follow the PBX's events on ``ami``, and use it to move deadlines and list
        channels."""
        self.pbx(pbx).attach_ami(ami)

    def _tracking(self, pbx: str) -> LiveCalls | None:
        served = self.pbxes.get(pbx)
        if served is None and pbx not in self._unknown:
            # recorded on that PBX all the same: its owner, if any process serves it,
            # follows the call; said once, as it is likely a name mistyped somewhere
            self._unknown.add(pbx)
            log.warning("agi_pbx_not_served", pbx=pbx, served=sorted(self.pbxes))
        return served.live if served is not None and served.owned else None

    def _reporting(self, pbx: str, call_id: uuid.UUID) -> LiveCalls:
        for served in self.pbxes.values():
            if call_id in served.live.by_id:
                return served.live
        served = self.pbxes.get(pbx)
        return served.live if served is not None else self._unserved

    # ---- reconciliation ------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Reconcile every PBX this process owns; the counts added up."""
        total: dict[str, int] = {}
        for served in self.pbxes.values():
            if not served.owned:
                continue
            for key, n in (await served.reconcile()).items():
                total[key] = total.get(key, 0) + n
        return total

    async def run_reconciler(self, interval: float) -> None:
        """Reconcile every owned PBX every ``interval`` seconds, forever (without leases;
        with them each PBX's keeper runs its own timer while it owns the PBX)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("reconcile_failed")

    async def resync(self) -> None:
        """The first PBX's re-sync (``PbxCalls.resync``)."""
        await self.first.resync()

    # ---- heartbeat -----------------------------------------------------------------------

    async def run_heartbeat(self) -> None:
        """Say that this process is alive (``/status`` lists the processes sharing the
        database). Which process serves a PBX is decided by its lease, not by this."""
        while True:
            try:
                await self.recovery.heartbeat(self.instance_id or "")
            except Exception as exc:  # noqa: BLE001 - try again at the next beat
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.heartbeat_seconds)

    async def stop(self) -> None:
        """Stop renewing; reservations stay in the database for the next owner."""
        for served in self.pbxes.values():
            await served.stop()

    # ---- state, for /status and tests ---------------------------------------------------

    @property
    def live(self) -> dict[uuid.UUID, LiveCall]:
        """The calls this process follows, by call id, on every PBX."""
        out: dict[uuid.UUID, LiveCall] = {}
        for served in self.pbxes.values():
            out.update(served.live.by_id)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return [c for served in self.pbxes.values() for c in served.live.snapshot()]

    @property
    def last_reconcile(self) -> dict[str, Any]:
        """The single PBX's last reconciliation; with several, the latest of any."""
        if len(self.pbxes) == 1:
            return self.first.reconciler.last_reconcile
        runs = [p.reconciler.last_reconcile for p in self.pbxes.values()
                if p.reconciler.last_reconcile]
        return max(runs, key=lambda r: r.get("at", "")) if runs else {}

    @property
    def stale_after(self) -> int:
        """Seconds after which a call unknown to the PBX counts as ended unseen."""
        return self.first.reconciler.stale_after

    @stale_after.setter
    def stale_after(self, seconds: int) -> None:
        for served in self.pbxes.values():
            served.reconciler.stale_after = seconds

    async def settle(self, call_id: uuid.UUID, billable: int, *, by: str) -> None:
        """Settle (or release) a call once; see ``LiveCalls.settle``."""
        for served in self.pbxes.values():
            if call_id in served.live.by_id:
                await served.live.settle(call_id, billable, by=by)
                return
        await self.first.live.settle(call_id, billable, by=by)


__all__ = ["AmiLink", "CallService", "LiveCall", "PbxCalls"]
