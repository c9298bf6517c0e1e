"""Call lifecycle: the bridge between the PBX (AGI routes, AMI events) and billing.

One facade over the three jobs, each in its own module:

- ``routes``: the AGI routes (decide and answer; the hangup report);
- ``live``: the live calls, their renewals and deadline moves, their settlement;
- ``reconcile``: the PBX's CDR, adoption after a restart, the timer, the heartbeat.

``app.py`` builds one ``CallService`` and wires it to the AGI server and the AMI link.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..agi import AgiSession
from ..ami.events import Cdr, CoreShowChannel, DialEnd, Hangup
from ..billing.rater import Rater
from ..billing.recovery import Recovery
from ..metrics import Metrics
from .live import LiveCall, LiveCalls
from .reconcile import Reconciler
from .routes import AgiRoutes


class AmiLink(Protocol):
    """What the call service needs from the AMI client (``gateway.ami.AmiClient``)."""

    def on(self, event: Any, callback: Callable[[Any], Awaitable[None] | None]) -> None: ...

    async def setvar(self, channel: str, variable: str, value: str) -> None: ...

    async def getvar(self, channel: str, variable: str) -> str: ...

    async def live_channels(self) -> list[CoreShowChannel]: ...


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
    ):
        self.rater = rater
        self.metrics = metrics or Metrics()
        self.live_calls = LiveCalls(rater, self.metrics,
                                    renew_before_seconds=renew_before_seconds,
                                    monotonic=monotonic)
        self.agi_routes = AgiRoutes(rater, self.live_calls, self.metrics)
        self.reconciler = Reconciler(rater, recovery, self.live_calls,
                                     stale_after_seconds=stale_after_seconds,
                                     instance_id=instance_id,
                                     heartbeat_seconds=heartbeat_seconds, monotonic=monotonic,
                                     settle_grace_seconds=settle_grace_seconds,
                                     ring_allowance_seconds=ring_allowance_seconds)
        # the entry points, by the job that owns them
        self.agi_outbound = self.agi_routes.agi_outbound
        self.agi_inbound = self.agi_routes.agi_inbound
        self.agi_hangup = self.agi_routes.agi_hangup
        self.on_dial_end = self.live_calls.on_dial_end
        self.on_hangup = self.live_calls.on_hangup
        self.on_cdr = self.reconciler.on_cdr
        self.reconcile = self.reconciler.reconcile
        self.run_reconciler = self.reconciler.run_reconciler
        self.run_heartbeat = self.reconciler.run_heartbeat

    # ---- wiring ------------------------------------------------------------------------

    def routes(self) -> dict[str, Callable[[AgiSession], Awaitable[None]]]:
        """The AGI routes the dialplan calls: agi://host:port/<route>,args"""
        return self.agi_routes.routes()

    def attach_ami(self, ami: AmiLink) -> None:
        """Follow the PBX's events on ``ami``, and use it to move deadlines and list
        channels."""
        self.live_calls.ami = ami
        self.reconciler.ami = ami
        ami.on(DialEnd, self.on_dial_end)
        ami.on(Cdr, self.on_cdr)
        ami.on(Hangup, self.on_hangup)

    async def resync(self) -> None:
        """After an AMI reconnect, or once events were dropped: the PBX went on while we
        were blind. Deadlines first (a call may be seconds from a deadline that a failed
        move left too early), then reconcile (settle what ended, adopt what is up)."""
        await self.live_calls.resync_deadlines()
        await self.reconcile()

    async def stop(self) -> None:
        """Stop renewing; reservations stay in the database for the next start."""
        await self.live_calls.stop()

    # ---- state, for /status and tests ---------------------------------------------------

    @property
    def live(self) -> dict[uuid.UUID, LiveCall]:
        """The calls this process follows, by call id."""
        return self.live_calls.by_id

    def snapshot(self) -> list[dict[str, Any]]:
        return self.live_calls.snapshot()

    @property
    def last_reconcile(self) -> dict[str, Any]:
        return self.reconciler.last_reconcile

    @property
    def stale_after(self) -> int:
        """Seconds after which a call unknown to the PBX counts as ended unseen."""
        return self.reconciler.stale_after

    @stale_after.setter
    def stale_after(self, seconds: int) -> None:
        self.reconciler.stale_after = seconds

    async def settle(self, call_id: uuid.UUID, billable: int, *, by: str) -> None:
        """Settle (or release) a call once; see ``LiveCalls.settle``."""
        await self.live_calls.settle(call_id, billable, by=by)


__all__ = ["AmiLink", "CallService", "LiveCall"]
