"""One PBX as this process serves it: its live calls, its reconciliation, its AMI link
(or none) and whether this process owns it now.

Several gateway processes may be configured for the same PBX; one of them at a time
holds its lease (``calls/lease.py``) and only that one follows the PBX's events, renews
its calls and reconciles it. The others still answer its AGI requests (authorisation
and hangup reports) but keep no table of its calls.

    AMI DialEnd ANSWER, call tracked     -> renewals start (as with one process)
    AMI DialEnd ANSWER, call not tracked -> authorised by another process: its row is
                                            loaded and followed from here on
    AMI Cdr                              -> settles the call (tracked or not)
    lease lost                           -> the table is dropped without settling
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from ..ami.events import Cdr, CoreShowChannel, DialEnd, Hangup
from ..billing.rater import Rater
from ..billing.recovery import Recovery
from ..metrics import Metrics
from .announce import Announcements
from .live import LiveCalls
from .reconcile import Reconciler, live_call_of

log = structlog.get_logger("gateway.calls")

DEFAULT_PBX = "default"  # the PBX of a request that names none (an older dialplan)


class AmiLink(Protocol):
    """What the call service needs from the AMI client (``gateway.ami.AmiClient``)."""

    def on(self, event: Any, callback: Callable[[Any], Awaitable[None] | None]) -> None: ...

    async def setvar(self, channel: str, variable: str, value: str) -> None: ...

    async def getvar(self, channel: str, variable: str) -> str: ...

    async def live_channels(self) -> list[CoreShowChannel]: ...

    async def originate_application(self, channel: str, application: str, data: str,
                                    variables: dict[str, str]) -> None: ...


class PbxCalls:
    """The calls of one PBX, and this process's standing with it."""

    def __init__(self, name: str, rater: Rater, recovery: Recovery, metrics: Metrics, *,
                 owner: str | None = None, leased: bool = False,
                 renew_before_seconds: int = 30,
                 monotonic: Callable[[], float] = time.monotonic,
                 stale_after_seconds: int = 15, settle_grace_seconds: int = 60,
                 ring_allowance_seconds: int = 300,
                 announcements: Announcements | None = None):
        self.name = name
        self.recovery = recovery
        self.metrics = metrics
        self.live = LiveCalls(rater, metrics, renew_before_seconds=renew_before_seconds,
                              monotonic=monotonic, pbx=name, announcements=announcements)
        self.reconciler = Reconciler(rater, recovery, self.live,
                                     stale_after_seconds=stale_after_seconds,
                                     monotonic=monotonic,
                                     settle_grace_seconds=settle_grace_seconds,
                                     ring_allowance_seconds=ring_allowance_seconds)
        self.ami: AmiLink | None = None
        # leased: owned only while this process holds the PBX's lease, and every
        # renewal and reconciliation settlement is fenced by it. Not leased (a lone
        # service, as in unit tests): always owned, nothing fenced.
        self.leased = leased
        self.owned = not leased
        self.owner = owner
        if leased:
            assert owner, "a leased PBX needs the owner's name"
            self.live.fence = (name, owner)
        self.lease: Any = None  # the lease row as last read (billing.recovery.Lease)
        self.lease_changes = 0  # gained or lost, since start
        self.lease_error: str | None = None  # the last failed lease attempt
        metrics.pbx_owned.labels(name).set(1 if self.owned else 0)
        metrics.live_calls.labels(name).set(0)

    # ---- the AMI link --------------------------------------------------------------------

    def attach_ami(self, ami: AmiLink) -> None:
        """Follow this PBX's events on ``ami``, and use it to move deadlines and list
        channels."""
        self.ami = ami
        self.live.ami = ami
        self.reconciler.ami = ami
        ami.on(DialEnd, self.on_dial_end)
        ami.on(Cdr, self.on_cdr)
        ami.on(Hangup, self.on_hangup)

    def detach_ami(self) -> None:
        self.ami = None
        self.live.ami = None
        self.reconciler.ami = None

    # ---- events ----------------------------------------------------------------------------

    async def on_dial_end(self, event: DialEnd) -> None:
        if not event.answered or not self.owned:
            return
        if event.uniqueid and self.live.find(event.uniqueid) is None:
            await self._follow_untracked(event.uniqueid)
        await self.live.on_dial_end(event)

    async def _follow_untracked(self, uniqueid: str) -> None:
        """A call of this PBX answered that we do not follow: another process (or ours
        before a restart) authorised it. Load it and follow it from its answer on."""
        try:
            open_call = await self.recovery.open_call(self.name, uniqueid)
        except Exception as exc:  # noqa: BLE001 - the next reconciliation adopts it
            log.warning("untracked_answer_not_loaded", pbx=self.name, uniqueid=uniqueid,
                        error=str(exc))
            return
        if open_call is None or self.live.find(uniqueid) is not None:
            return  # not ours to bill (emergency, settled), or tracked meanwhile
        if open_call.call_id in self.live.by_id:
            return
        self.live.track(live_call_of(open_call, self.name))
        log.info("followed_untracked_call", pbx=self.name, call_id=str(open_call.call_id),
                 uniqueid=uniqueid)

    async def on_cdr(self, event: Cdr) -> None:
        if self.owned:
            await self.reconciler.on_cdr(event)

    async def on_hangup(self, event: Hangup) -> None:
        await self.live.on_hangup(event)

    # ---- reconciliation --------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        return await self.reconciler.reconcile()

    async def resync(self) -> None:
        """After an AMI reconnect, or once events were dropped: the PBX went on while we
        were blind. Deadlines first (a call may be seconds from a deadline that a failed
        move left too early), then reconcile (settle what ended, adopt what is up)."""
        if not self.owned:
            return
        await self.live.resync_deadlines()
        await self.reconcile()

    async def drop(self) -> None:
        """The lease is lost: stop renewing and forget every call without settling it
        (the new owner adopts them)."""
        await self.reconciler.stop()
        await self.live.drop()

    async def stop(self) -> None:
        """Stop renewing; reservations stay in the database for the next owner."""
        await self.reconciler.stop()
        await self.live.stop()

    # ---- state, for /status ------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        lease = self.lease
        expires = getattr(lease, "expires_at", None)
        return {
            "owner": getattr(lease, "owner", None) if self.leased else self.owner,
            "owned": self.owned,
            "lease_expires_at": expires.isoformat() if expires is not None else None,
            "generation": getattr(lease, "generation", None),
            "lease_changes": self.lease_changes,
            "lease_error": self.lease_error,
            "live_calls": len(self.live.by_id),
            "last_reconcile": self.reconciler.last_reconcile or None,
        }


__all__ = ["DEFAULT_PBX", "AmiLink", "PbxCalls"]
