"""The decision table of billing rules §6 and the arithmetic of §7, as pure functions.

Nothing here touches the database: the rater loads a context, asks these functions
for a ``Ruling`` (the row of the table), and lets the store look up the rate and
reserve the funding atomically; the store may still turn an allowed rated ruling
into ``NO_RATE`` or ``NO_BALANCE`` (see docs/architecture.md, "Where decisions are made").
"""

from __future__ import annotations

import datetime as dt
from decimal import ROUND_CEILING, Decimal
from zoneinfo import ZoneInfo

from .model import (
    BUSINESS_VOICE_SKUS,
    CallerContext,
    Classified,
    NumberClass,
    NumberKind,
    RateKind,
    Reason,
    Route,
    Ruling,
    Sku,
    Source,
)

MONEY_QUANTUM = Decimal("0.000001")


def bill_round(seconds: int, first_increment: int = 60, increment: int = 60) -> int:
    """Answered seconds rounded up: the first increment, then whole increments."""
    if seconds <= 0:
        return 0
    if seconds <= first_increment:
        return first_increment
    extra = seconds - first_increment
    return first_increment + -(-extra // increment) * increment


def cost(price_per_minute: Decimal, seconds: int) -> Decimal:
    """Price of ``seconds`` at a per-minute price, rounded up to 6 decimals."""
    return (price_per_minute * seconds / 60).quantize(MONEY_QUANTUM, rounding=ROUND_CEILING)


def month_of(now: dt.datetime, timezone: str) -> dt.date:
    """First day of the calendar month ``now`` falls in, in the tenant's timezone."""
    local = now.astimezone(ZoneInfo(timezone))
    return local.date().replace(day=1)


def decide_outbound(
    ctx: CallerContext | None, dialled: str, classified: Classified
) -> Ruling:
    """Billing rules §6, outbound, first matching row wins."""
    cls = classified.number_class
    if cls is NumberClass.EMERGENCY:
        return Ruling(True, Reason.EMERGENCY, cls, Route.EMERGENCY, destination=dialled)
    if ctx is not None and ctx.internal_target is not None:
        return Ruling(
            True,
            Reason.INTERNAL,
            NumberClass.INTERNAL,
            Route.INTERNAL,
            destination=classified.e164 or dialled,
            target=ctx.internal_target,
        )
    if ctx is None:
        return Ruling(False, Reason.UNKNOWN_CALLER, cls, destination=dialled)
    licences = ctx.user.licences
    if not licences & BUSINESS_VOICE_SKUS:
        return Ruling(False, Reason.NO_LICENSE, cls, destination=dialled)
    if cls is NumberClass.INVALID or classified.e164 is None:
        return Ruling(False, Reason.INVALID_NUMBER, cls, destination=dialled)
    e164 = classified.e164
    if cls.value in ctx.tenant.blocked_classes:
        return Ruling(False, Reason.BLOCKED_DESTINATION, cls, destination=e164)
    if Sku.CALLING_PLAN not in licences:
        # Business Voice without Calling Plan: the partner carrier bills the minutes.
        return Ruling(True, Reason.PARTNER, cls, Route.PARTNER, destination=e164)
    if cls is NumberClass.TOLL_FREE:
        return Ruling(True, Reason.TOLL_FREE_FREE, cls, Route.PSTN, destination=e164)
    if cls is NumberClass.DOMESTIC:
        return Ruling(
            True,
            Reason.FUNDED,
            cls,
            Route.PSTN,
            destination=e164,
            rate_kind=RateKind.DOMESTIC_OVERAGE,
            sources=(Source.POOL, Source.WALLET),
            pool_country=ctx.user.usage_location,
        )
    # International (and toll-free or other numbers outside the domestic zone).
    sources = (Source.ADDON, Source.WALLET) if Sku.ADDON in licences else (Source.WALLET,)
    return Ruling(
        True,
        Reason.FUNDED,
        NumberClass.INTERNATIONAL,
        Route.PSTN,
        destination=e164,
        rate_kind=RateKind.INTERNATIONAL,
        sources=sources,
    )


def decide_inbound(
    e164: str | None, number_kind: NumberKind | None, target: str | None
) -> Ruling:
    """Billing rules §6, inbound: toll-free numbers are paid from the owner's wallet."""
    if e164 is None or number_kind is None or not target:
        # nobody owns it, or it rings nobody (its user was deleted): unallocated
        return Ruling(False, Reason.UNKNOWN_NUMBER, NumberClass.INVALID, destination=e164 or "")
    if number_kind is NumberKind.TOLL_FREE:
        return Ruling(
            True,
            Reason.FUNDED,
            NumberClass.TOLL_FREE,
            Route.INTERNAL,
            destination=e164,
            target=target,
            rate_kind=RateKind.TOLL_FREE_INBOUND,
            sources=(Source.WALLET,),
        )
    return Ruling(
        True,
        Reason.INBOUND_USER_NUMBER,
        NumberClass.DOMESTIC,
        Route.INTERNAL,
        destination=e164,
        target=target,
    )

