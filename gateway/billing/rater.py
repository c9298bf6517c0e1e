"""The rater: decides, reserves, renews and settles calls. Knows nothing of AGI or AMI.

Data path of one authorisation: one query loads the caller's context, the pure rules
give a ``Ruling``, and one call of ``gw_authorise`` records it, looks up the rate and
reserves the first slice atomically — two database round trips. For a caller seen
before, the context read last time is used again and the one call checks that it is
still the tenant's (its context version) and that the dialled string is not internal:
one round trip; when the check fails nothing is written and the two-trip path runs.
The rules decide the row of the table; the database decides funding, so an allowed
rated ruling may come back as ``NO_RATE`` or ``NO_BALANCE``, and the returned
``Decision`` is what it recorded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..errors import Conflict, GatewayError, InvalidInput, NotFound, Unavailable
from ..rating import numbers, rules
from ..rating.model import (
    CallerContext,
    Classified,
    Decision,
    Direction,
    NumberClass,
    Reason,
    Route,
    Ruling,
    Settlement,
    Source,
)
from ..store.repository import DEFAULT_PBX, AuthoriseResult, CallerRow, Fence, Repository
from .coalesce import Coalescer

log = structlog.get_logger("gateway.rater")

Clock = Callable[[], dt.datetime]

MAX_DIALLED = 64
# callers whose context is kept for the one-round-trip path (oldest dropped first)
MAX_KNOWN_CALLERS = 10_000
MAX_BILLABLE = 7 * 24 * 3600  # a week: anything longer is not a call report
# requests of one pool sent in one statement at most (each is a subtransaction there:
# PostgreSQL keeps up to 64 of them per transaction in shared memory, more cost others)
BATCH_LIMIT = 32
# open pool-paid calls whose pool is kept for their settlement's batch (oldest dropped
# first: a call whose pool is not known is settled alone, as ever)
MAX_OPEN_POOL_CALLS = 100_000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# A lost authorisation is voided again after this long, doubling up to the maximum,
# until the database answers.
VOID_RETRY_FIRST = 0.25
VOID_RETRY_MAX = 5.0


@dataclass(frozen=True)
class _Void:
    """What voiding one lost authorisation needs: enough to write its tombstone."""

    call_id: uuid.UUID
    tenant_id: str
    direction: str
    caller: str
    destination: str
    number_class: str
    pbx_uniqueid: str | None
    linkedid: str | None
    pbx: str = DEFAULT_PBX


@dataclass(frozen=True)
class Renewal:
    """What renewing one call reserved."""

    slice_seconds: int  # reserved now: the slice, or less when the sources ran dry
    funded_seconds: int  # the call's funded total after this renewal
    open: bool  # False when the call was already settled or released


PoolKey = tuple[str, str]  # (tenant, pool country)


@dataclass(frozen=True)
class _PoolStep:
    """One request of a pool's batch: an authorisation (``Repository.authorise``'s
    arguments) or a settlement (``Repository.settle``'s, unfenced)."""

    authorise: dict[str, Any] | None = None
    settle: tuple[uuid.UUID, int, dt.datetime, str] | None = None


class Rater:
    """With ``batch_limit`` > 1, the authorisations paid from one pool that arrive while
    one of that pool's is in the database go together as the next statement, and so do
    the settlements of the calls this process authorised from one pool (see
    ``coalesce.Coalescer``; ``batch_limit`` 1: each alone). Each request is decided and
    answered as it would be alone; they share one transaction, one hold of the pool
    row's lock and one commit."""

    def __init__(self, repo: Repository, *, clock: Clock = utcnow, slice_seconds: int = 300,
                 batch_limit: int = BATCH_LIMIT):
        if slice_seconds < 1:
            raise ValueError("slice_seconds must be positive")
        if not 1 <= batch_limit <= 64:
            raise ValueError("batch_limit must be from 1 to 64")
        self.repo = repo
        self.clock = clock
        self.slice_seconds = slice_seconds
        # voids in progress, by call id (see _void_later)
        self._voids: dict[uuid.UUID, asyncio.Task[None]] = {}
        # endpoint -> the caller's context as last read, with its tenant's version
        self._known: dict[str, CallerRow] = {}
        self.batch_limit = batch_limit
        # one pool's authorisations and settlements, sent together
        # (a statement that got no answer fails the authorisations that waited for it:
        # under a frozen database each caller is answered within one statement's
        # timeout; the settlements that waited are sent, to a server that may have
        # taken over meanwhile: their callers are the PBX's end reports, not a caller
        # waiting to dial)
        self._pool_steps: Coalescer[_PoolStep] = Coalescer(
            self._send_pool_steps, limit=batch_limit,
            fails_with=lambda step, exc: (step.authorise is not None
                                          and isinstance(exc, Unavailable)))
        # call id -> its pool, for the calls this process authorised from a pool
        self._pool_of: dict[uuid.UUID, PoolKey] = {}

    # ---- authorisation ---------------------------------------------------------------

    async def authorise_outbound(
        self,
        sip_endpoint: str,
        dialled: str,
        *,
        pbx_uniqueid: str | None = None,
        linkedid: str | None = None,
        pbx: str = DEFAULT_PBX,
    ) -> Decision:
        """Billing rules §6, outbound, for a call from ``sip_endpoint`` to ``dialled``,
        whose caller channel is ``pbx_uniqueid`` on PBX ``pbx``."""
        # A SIP user name is compared as dialled: normalising "front.desk" like a phone
        # number would make it "frontdesk", someone else's name or nobody's.
        raw = (dialled or "")[:MAX_DIALLED + 1]
        dialled = numbers.normalise(dialled)[:MAX_DIALLED + 1]
        # Row 1 first, before any I/O: emergency calls go whatever the rater's health.
        if numbers.is_emergency(dialled, None):
            return self._emergency(dialled, sip_endpoint)
        row = None
        if sip_endpoint and len(sip_endpoint) <= 80:
            known = self._known.get(sip_endpoint)
            if known is not None:
                decided = await self._authorise_known(known, sip_endpoint, dialled, raw,
                                                      pbx_uniqueid, linkedid, pbx)
                if decided is not None:
                    return decided
                self._known.pop(sip_endpoint, None)  # the context changed: read it again
            row = await self.repo.find_caller(sip_endpoint, dialled, raw)
            if row is not None and row.context_version is not None:
                self._remember(sip_endpoint, row)
        if row is None:
            ruling = rules.decide_outbound(None, dialled, Classified(NumberClass.INVALID))
            return self._log(Decision(False, ruling.reason, None, destination=dialled),
                             sip_endpoint)
        classified = (
            numbers.classify(dialled, row.user.usage_location)
            if len(dialled) <= MAX_DIALLED
            else Classified(NumberClass.INVALID)
        )
        internal = row.internal_user_endpoint
        if internal is None and classified.e164 is not None:
            internal = next(
                (target or "" for e164, target in row.number_candidates
                 if e164 == classified.e164),
                None,
            )
        ctx = CallerContext(user=row.user, tenant=row.tenant, internal_target=internal)
        # a call to a SIP user name records the name as dialled, not its normalised form
        ruling = rules.decide_outbound(ctx, raw if internal == raw else dialled, classified)
        if ruling.reason is Reason.EMERGENCY:
            return self._emergency(dialled, sip_endpoint)
        decision = await self._record(ruling, ctx.tenant.id, ctx.user.id,
                                      Direction.OUTBOUND, sip_endpoint, pbx_uniqueid,
                                      linkedid, pbx)
        assert decision is not None  # recorded unconditionally
        return decision

    def _remember(self, sip_endpoint: str, row: CallerRow) -> None:
        self._known.pop(sip_endpoint, None)
        while len(self._known) >= MAX_KNOWN_CALLERS:
            self._known.pop(next(iter(self._known)))
        self._known[sip_endpoint] = row

    async def _authorise_known(self, known: CallerRow, sip_endpoint: str, dialled: str,
                               raw: str, pbx_uniqueid: str | None, linkedid: str | None,
                               pbx: str) -> Decision | None:
        """Decide from the caller's context as last read, assuming the dialled string is
        not internal; recorded only if the database finds both still true (one round
        trip). None when it does not: nothing was written."""
        classified = (
            numbers.classify(dialled, known.user.usage_location)
            if len(dialled) <= MAX_DIALLED
            else Classified(NumberClass.INVALID)
        )
        ctx = CallerContext(user=known.user, tenant=known.tenant, internal_target=None)
        ruling = rules.decide_outbound(ctx, dialled, classified)
        if ruling.reason is Reason.EMERGENCY:
            return self._emergency(dialled, sip_endpoint)
        assert known.context_version is not None
        return await self._record(ruling, ctx.tenant.id, ctx.user.id, Direction.OUTBOUND,
                                  sip_endpoint, pbx_uniqueid, linkedid, pbx,
                                  known=(known.context_version, dialled, raw,
                                         classified.e164))

    @property
    def known_callers(self) -> int:
        """Callers whose context is kept for the one-round-trip path."""
        return len(self._known)

    async def authorise_inbound(
        self,
        called: str,
        caller: str = "",
        *,
        pbx_uniqueid: str | None = None,
        linkedid: str | None = None,
        pbx: str = DEFAULT_PBX,
    ) -> Decision:
        """Billing rules §6, inbound: a call from the carrier to ``called``, whose
        channel is ``pbx_uniqueid`` on PBX ``pbx``."""
        e164 = numbers.inbound_e164(called)
        number = await self.repo.find_inbound_number(e164) if e164 else None
        if number is None or not number.target:
            ruling = rules.decide_inbound(e164, None, None)
            return self._log(Decision(False, ruling.reason, None, destination=called), caller)
        ruling = rules.decide_inbound(number.e164, number.kind, number.target)
        decision = await self._record(ruling, number.tenant_id, None, Direction.INBOUND,
                                      numbers.normalise(caller)[:MAX_DIALLED] or "anonymous",
                                      pbx_uniqueid, linkedid, pbx)
        assert decision is not None  # recorded unconditionally
        return decision

    async def _record(self, ruling: Ruling, tenant_id: str, user_id: str | None,
                      direction: Direction, caller: str, pbx_uniqueid: str | None,
                      linkedid: str | None, pbx: str,
                      known: tuple[int, str, str, str | None] | None = None
                      ) -> Decision | None:
        """Record ``ruling``. With ``known`` = (context version, dialled, dialled as typed,
        the dialled number's E.164 or None), only if the database finds the context still
        current (else None, nothing written; see ``_authorise_known``)."""
        call_id = uuid.uuid4()
        destination = ruling.destination[:MAX_DIALLED]
        request = dict(
            call_id=call_id,
            tenant_id=tenant_id,
            user_id=user_id,
            direction=direction.value,
            caller=caller,
            destination=destination,
            number_class=ruling.number_class.value,
            decision="ALLOW" if ruling.allow else "REJECT",
            reason=ruling.reason.value,
            route=ruling.route.value if ruling.route else None,
            pbx_uniqueid=pbx_uniqueid,
            linkedid=linkedid,
            rate_kind=ruling.rate_kind.value if ruling.rate_kind else None,
            sources=[s.value for s in ruling.sources],
            pool_country=ruling.pool_country,
            slice_seconds=self.slice_seconds,
            now=self.clock(),
            pbx=pbx,
        )
        if known is not None:
            request.update(context_version=known[0], dialled=known[1],
                           dialled_as_typed=known[2], dialled_e164=known[3])
        pool = ((tenant_id, ruling.pool_country)
                if ruling.allow and ruling.pool_country and ruling.sources
                and ruling.sources[0] is Source.POOL else None)
        try:
            if pool is not None and self.batch_limit > 1:
                result = await self._pool_steps.submit(pool, _PoolStep(authorise=request))
            else:
                result = await self._authorise_alone(request)
        except (Unavailable, asyncio.CancelledError):
            # No answer from the database (timeout, lost connection, cancelled): the
            # authorisation may still commit there, while the PBX is told GATEWAY_ERROR.
            # Void it in the background until the database answers, so that both agree.
            self._void_later(_Void(call_id, tenant_id, direction.value, caller, destination,
                                   ruling.number_class.value, pbx_uniqueid, linkedid, pbx))
            raise
        if result is None:
            return None
        # the store's answer wins: it may have turned an allowed ruling into a rejection
        allow = result.decision == "ALLOW"
        if allow and pool is not None:
            self._remember_pool(call_id, pool)
        decision = Decision(
            allow=allow,
            reason=Reason(result.reason),
            call_id=call_id,
            route=ruling.route if allow else None,
            funded_seconds=result.funded if allow and ruling.rated else None,
            destination=ruling.destination,
            target=ruling.target,
            number_class=ruling.number_class,
            tenant_id=tenant_id,
            price_per_minute=result.price,
            sources=ruling.sources if allow else (),
            funding_final=allow and ruling.rated and result.funded < self.slice_seconds,
        )
        return self._log(decision, caller)

    async def _authorise_alone(self, request: dict) -> AuthoriseResult | None:
        if "context_version" in request:
            return await self.repo.authorise_known(**request)
        return await self.repo.authorise(**request)

    async def _send_pool_steps(self, steps: list[_PoolStep]) -> list[Any]:
        """One pool's authorisations and settlements that arrived together: one
        statement, the settlements first (one alone goes the usual way)."""
        if len(steps) == 1:
            step = steps[0]
            if step.settle is not None:
                return [await self.repo.settle(*step.settle)]
            assert step.authorise is not None
            return [await self._authorise_alone(step.authorise)]
        settled, authorised = await self.repo.pool_batch(
            [s.settle for s in steps if s.settle is not None],
            [s.authorise for s in steps if s.authorise is not None])
        answers_of = {True: iter(settled), False: iter(authorised)}
        return [next(answers_of[s.settle is not None]) for s in steps]

    def _remember_pool(self, call_id: uuid.UUID, pool: PoolKey) -> None:
        while len(self._pool_of) >= MAX_OPEN_POOL_CALLS:
            self._pool_of.pop(next(iter(self._pool_of)))
        self._pool_of[call_id] = pool

    @property
    def coalesced(self) -> dict[str, int]:
        """Statements sent for pool-paid authorisations and settlements, the requests
        they carried (a statement of one is a request sent alone), and the requests
        waiting now for their pool's statement in flight."""
        return {"batches": self._pool_steps.batches, "requests": self._pool_steps.requests,
                "queued": self._pool_steps.queued}

    # ---- authorisations whose answer was lost ---------------------------------------------

    def _void_later(self, void: _Void) -> None:
        task = asyncio.get_running_loop().create_task(self._void_until_done(void),
                                                      name=f"void-{void.call_id}")
        self._voids[void.call_id] = task
        task.add_done_callback(lambda _t: self._voids.pop(void.call_id, None))

    async def _void_until_done(self, void: _Void) -> None:
        delay = VOID_RETRY_FIRST
        while True:
            try:
                outcome = await self.repo.void_authorisation(
                    call_id=void.call_id, tenant_id=void.tenant_id, direction=void.direction,
                    caller=void.caller, destination=void.destination,
                    number_class=void.number_class, pbx_uniqueid=void.pbx_uniqueid,
                    linkedid=void.linkedid, now=self.clock(), pbx=void.pbx)
            except (NotFound, InvalidInput, Conflict):
                # a definite refusal (the tenant is gone, a value the schema refuses):
                # nothing a retry could change
                log.exception("void_failed", call_id=str(void.call_id))
                return
            except Exception as exc:  # noqa: BLE001 - anything else may pass: retry
                # Unavailable, and any error the database may not give twice (a standby
                # refusing writes during a fail-over, a deadlock, too many connections):
                # giving up would leave a funded ALLOW that the PBX was told is a REJECT
                log.warning("void_retrying", call_id=str(void.call_id),
                            error=exc.message if isinstance(exc, GatewayError) else repr(exc),
                            retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, VOID_RETRY_MAX)
                continue
            log.info("authorisation_voided", call_id=str(void.call_id), outcome=outcome)
            return

    @property
    def voids_pending(self) -> int:
        """Authorisations whose answer was lost and that are not voided yet."""
        return len(self._voids)

    async def wait_voided(self) -> None:
        """Return once every pending void is done (bound it with ``asyncio.timeout``)."""
        while self._voids:
            await asyncio.gather(*list(self._voids.values()), return_exceptions=True)

    async def stop(self) -> None:
        """Stop voiding. A void left undone leaves at worst a call authorised and never
        dialled: reconciliation releases it past its funded end (docs/billing.md)."""
        tasks = list(self._voids.values())
        for task in tasks:
            task.cancel()
        if tasks:
            log.warning("voids_abandoned", call_ids=[str(c) for c in self._voids])
            await asyncio.gather(*tasks, return_exceptions=True)

    def _emergency(self, dialled: str, caller: str) -> Decision:
        return self._log(
            Decision(True, Reason.EMERGENCY, None, route=Route.EMERGENCY, destination=dialled,
                     number_class=NumberClass.EMERGENCY),
            caller,
        )

    @staticmethod
    def _log(decision: Decision, caller: str) -> Decision:
        log.info(
            "decision",
            decision=decision.decision,
            reason=decision.reason.value,
            call_id=str(decision.call_id) if decision.call_id else None,
            caller=caller,
            destination=decision.destination,
            route=decision.route.value if decision.route else None,
            funded_seconds=decision.funded_seconds,
            tenant_id=decision.tenant_id,
        )
        return decision

    # ---- while the call is up ----------------------------------------------------------

    async def answered(self, call_id: uuid.UUID, at: dt.datetime | None = None) -> bool:
        return await self.repo.mark_answered(call_id, at or self.clock())

    async def renew(self, call_id: uuid.UUID, seconds: int | None = None, *,
                    fence: Fence | None = None) -> Renewal:
        """Reserve the next slice; it may come from another source, or only in part.
        With ``fence`` = (pbx, owner): only while ``owner`` holds the lease of ``pbx``,
        else ``NotOwner`` and nothing reserved."""
        wanted = self.slice_seconds if seconds is None else seconds
        if not 1 <= wanted <= 86400:
            raise InvalidInput(f"slice of {wanted} s is out of range", code="INVALID_SECONDS")
        reserved, funded, state = await self.repo.renew(call_id, wanted, self.clock(),
                                                        fence=fence)
        log.info("renewed", call_id=str(call_id), slice_seconds=reserved, funded_seconds=funded)
        return Renewal(reserved, funded, state in ("authorised", "answered"))

    # ---- the end of a call ---------------------------------------------------------------

    async def settle(self, call_id: uuid.UUID, billable_seconds: int, *, by: str = "api",
                     fence: Fence | None = None) -> Settlement:
        """Bill the answered seconds once; a second report changes nothing and says so.
        With ``fence`` = (pbx, owner): only while ``owner`` holds the lease of ``pbx``,
        else ``NotOwner`` and nothing written (reconciliation's settlements)."""
        if isinstance(billable_seconds, bool) or not isinstance(billable_seconds, int):
            raise InvalidInput("billable seconds must be a whole number", code="INVALID_SECONDS")
        if not 0 <= billable_seconds <= MAX_BILLABLE:
            raise InvalidInput(f"billable seconds {billable_seconds} out of range",
                               code="INVALID_SECONDS")
        return await self._settle(call_id, billable_seconds, by, fence)

    async def release(self, call_id: uuid.UUID, *, by: str = "api",
                      fence: Fence | None = None) -> Settlement:
        """A call that never connected: give back everything it reserved (fenced as
        ``settle``)."""
        return await self._settle(call_id, 0, by, fence)

    async def _settle(self, call_id: uuid.UUID, billable: int, by: str,
                      fence: Fence | None) -> Settlement:
        pool = self._pool_of.pop(call_id, None)
        if pool is not None and fence is None and self.batch_limit > 1:
            s = await self._pool_steps.submit(
                pool, _PoolStep(settle=(call_id, billable, self.clock(), by)))
        else:
            s = await self.repo.settle(call_id, billable, self.clock(), by, fence=fence)
        log.info("settlement", call_id=str(call_id), outcome=s.outcome,
                 billable_seconds=billable, billed_seconds=s.billed_seconds,
                 charged=str(s.charged), by=by)
        return s


__all__ = ["DEFAULT_PBX", "Clock", "Fence", "Rater", "Renewal", "Settlement", "utcnow"]
