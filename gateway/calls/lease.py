"""The lease of one PBX: which gateway process serves it now.

Every ``lease_seconds / 3`` the process asks the database for the PBX's lease
(``Recovery.lease``: take it when free or expired, renew it when ours; the database's
clock decides). Then:

    gained  -> connect the PBX's AMI link, reconcile at once (adopt its calls still up,
               settle those that ended from its CDR), start its reconcile timer
    kept    -> nothing more (an AMI link that could not connect is tried again)
    lost    -> another process holds it, or renewals failed until our lease's own end:
               stop the timer and the AMI link, drop the live table without settling
               (``pbx_lease_lost``); the new owner adopts the calls
    lapsed  -> ours again, but as a new tenure (another generation: the lease ran out
               in between, and our fenced renewals may have been refused meanwhile):
               lost, then gained (the table dropped, the calls adopted again)
    stopped -> release it (graceful stop): another process takes it at its next attempt

A dead owner's lease expires ``lease_seconds`` after its last renewal; another process
configured for the PBX takes it at its next attempt, at most ``lease_seconds / 3`` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..billing.recovery import Recovery
from ..metrics import Metrics
from .pbx import AmiLink, PbxCalls

log = structlog.get_logger("gateway.calls")

# AMI failures at start that are the configuration's fault (the wrong PBX at that
# address, credentials refused): the process refuses to start. Any other (the PBX down or
# unreachable) is an outage: the PBX is served without AMI until its link is made.
CONFIGURATION_ERRORS = frozenset({"AMI_PBX_MISMATCH", "AMI_LOGIN_FAILED"})


class LeaseKeeper:
    """Takes, keeps and gives up one PBX's lease for this process."""

    def __init__(self, pbx: PbxCalls, recovery: Recovery, metrics: Metrics, *,
                 owner: str, lease_seconds: float, reconcile_interval: float,
                 ami_factory: Callable[[], Any] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        """``ami_factory()`` makes a new, not yet started AMI client for the PBX (None:
        the PBX is served without AMI)."""
        self.pbx = pbx
        self.recovery = recovery
        self.metrics = metrics
        self.owner = owner
        self.seconds = float(lease_seconds)
        self.interval = self.seconds / 3
        self.reconcile_interval = reconcile_interval
        self.ami_factory = ami_factory
        self.monotonic = monotonic
        # a call's renewal refused by the fence is tried again while the PBX is ours (the
        # lease lapsed and is being taken again), given up once it is not
        pbx.live.owned = lambda: pbx.owned
        self.held_until = 0.0  # monotonic time our lease surely lasts until
        self.generation: int | None = None  # the generation of the tenure we hold
        self.ami: Any = None  # the client started for this ownership
        self._timer: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        # the gain's work (AMI link, reconciliation) runs beside the renewals, so that a
        # slow PBX or a long reconciliation never lets the lease lapse
        self._serving: asyncio.Task[None] | None = None

    # ---- one attempt -----------------------------------------------------------------------

    async def attempt(self, *, strict: bool = False) -> None:
        """Ask for the lease once and act on the answer. ``strict`` (the first attempt
        at start): an AMI link refused for its configuration (``CONFIGURATION_ERRORS``)
        raises (the lease is released); an unreachable PBX is served without AMI."""
        name = self.pbx.name
        asked = self.monotonic()
        try:
            # a frozen database must not keep us from seeing our lease run out
            async with asyncio.timeout(max(self.interval, 1.0)):
                lease = await self.recovery.lease(name, self.owner, self.seconds)
        except Exception as exc:  # noqa: BLE001 - decided below
            self.pbx.lease_error = str(exc) or type(exc).__name__
            log.warning("pbx_lease_failed", pbx=name, error=self.pbx.lease_error)
            if self.pbx.owned and self.monotonic() >= self.held_until:
                await self._lose("the lease could not be renewed before it expired")
            return
        self.pbx.lease_error = None
        self.pbx.lease = lease
        if lease.owner != self.owner:
            if self.pbx.owned:
                await self._lose(f"taken by {lease.owner}")
            return
        generation = getattr(lease, "generation", None)
        if self.pbx.owned and (generation != self.generation or asked >= self.held_until):
            # ours again after it lapsed: whatever was refused in between (a renewal
            # told NOT_PBX_OWNER gave up) is put right by adopting the calls anew
            await self._lose(f"lapsed (generation {self.generation} then {generation})")
        # the database set its expiry at least this late
        self.held_until = asked + self.seconds
        self.generation = generation
        if not self.pbx.owned:
            self._gain(lease)
            if strict:  # at start: before the first call is taken
                await self._serve(strict=True)
            else:
                self._serving = asyncio.create_task(self._serve(strict=False),
                                                    name=f"serve-{self.pbx.name}")
        elif (self.ami is None and self.ami_factory is not None
              and (self._serving is None or self._serving.done())):
            # the PBX was unreachable at the gain: try its AMI link again
            self._serving = asyncio.create_task(self._reconnect(),
                                                name=f"ami-{self.pbx.name}")

    async def served(self) -> None:
        """Wait until the work of the last gain (or AMI retry) is done."""
        serving = self._serving
        if serving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(serving)

    def _gain(self, lease: Any) -> None:
        pbx = self.pbx
        pbx.owned = True
        pbx.lease_changes += 1
        self.metrics.pbx_owned.labels(pbx.name).set(1)
        self.metrics.pbx_lease_changes.labels(pbx.name).inc()
        log.info("pbx_lease_gained", pbx=pbx.name, owner=self.owner,
                 generation=getattr(lease, "generation", None))

    async def _serve(self, *, strict: bool) -> None:
        """Serve a PBX just gained: its AMI link, its calls, its reconcile timer."""
        pbx = self.pbx
        if self.ami_factory is not None:
            await self._connect(strict=strict)
        # adopt the PBX's calls still up (renewed before their funded end), settle those
        # that ended from its CDR; then find answers nobody heard (the old owner died
        # between a DialEnd and marking the call answered)
        try:
            await pbx.reconcile()
            await pbx.live.resync_deadlines()
        except Exception:  # noqa: BLE001 - the timer tries again
            log.exception("reconcile_failed", pbx=pbx.name)
        self._timer = asyncio.create_task(
            pbx.reconciler.run_reconciler(self.reconcile_interval),
            name=f"reconciler-{pbx.name}")

    async def _reconnect(self) -> None:
        await self._connect(strict=False)
        if self.ami is not None:  # blind until now: what changed meanwhile
            await self.pbx.resync()

    async def _connect(self, *, strict: bool) -> None:
        assert self.ami_factory is not None
        ami = self.ami_factory()
        self.pbx.attach_ami(ami)
        self.ami = ami  # stopped with the tenure, even while it is still connecting
        try:
            await ami.start()
        except Exception as exc:
            self.ami = None
            self.pbx.detach_ami()
            if strict and getattr(exc, "code", None) in CONFIGURATION_ERRORS:
                await self.release()
                raise
            # an outage (unreachable, no answer): served without AMI meanwhile, the link
            # tried again at each renewal
            log.warning("pbx_ami_not_connected", pbx=self.pbx.name, error=str(exc))
            return
        # after each AMI reconnect, and after dropped events, the PBX may have changed
        # while we were blind (the first login is followed by the gain's reconcile)
        ami.on_connect(self.pbx.resync)
        ami.on_events_lost(self.pbx.resync)

    async def _lose(self, reason: str) -> None:
        pbx = self.pbx
        pbx.owned = False
        pbx.lease_changes += 1
        self.metrics.pbx_owned.labels(pbx.name).set(0)
        self.metrics.pbx_lease_changes.labels(pbx.name).inc()
        log.warning("pbx_lease_lost", pbx=pbx.name, owner=self.owner, reason=reason,
                    live_calls=len(pbx.live.by_id))
        await self._stop_serving()
        await self._stop_timer()
        await self._stop_ami()
        await pbx.drop()

    async def _stop_serving(self) -> None:
        serving, self._serving = self._serving, None
        if serving is not None and not serving.done():
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving

    async def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await timer

    async def _stop_ami(self) -> None:
        ami, self.ami = self.ami, None
        self.pbx.detach_ami()
        if ami is not None:
            with contextlib.suppress(Exception):
                await ami.stop()

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Attempt every ``lease_seconds / 3``, forever."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.attempt()
            except Exception:  # noqa: BLE001 - keep the loop alive
                log.exception("pbx_lease_attempt_failed", pbx=self.pbx.name)

    def start(self) -> None:
        self._loop = asyncio.create_task(self.run(), name=f"lease-{self.pbx.name}")

    async def stop(self) -> None:
        """Stop asking and stop the reconcile timer (the lease is still held: the caller
        stops the calls, then ``release``s it)."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loop
        await self._stop_serving()
        await self._stop_timer()

    async def stop_ami(self) -> None:
        await self._stop_ami()

    async def release(self) -> None:
        """Give the lease up (graceful stop): the next process takes it at once."""
        if not self.pbx.owned:
            return
        self.pbx.owned = False
        self.metrics.pbx_owned.labels(self.pbx.name).set(0)
        try:
            await self.recovery.release_lease(self.pbx.name, self.owner)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning("pbx_lease_release_failed", pbx=self.pbx.name, error=str(exc))
            return
        log.info("pbx_lease_released", pbx=self.pbx.name, owner=self.owner)


__all__ = ["AmiLink", "LeaseKeeper"]
