"""When a pool, an add-on or a wallet runs out at the recent burn rate: pure arithmetic
over the charges of the last weeks (docs/billing.md, "Forecast").

The burn rate is a profile of 168 hourly rates, one per hour of the week in the
tenant's timezone (Monday 00:00-01:00 is slot 0): each slot's rate is what was charged
in that slot over the history, divided by how long the history covered that slot. A
business that calls on weekday mornings burns in weekday mornings, and the forecast
says so. With less than a week of history the profile is flat (everything charged,
divided by the history's length, counted as at least a day). The forecast then walks
forward hour by hour from now, spending each hour's expected use, until what is left
reaches zero or the horizon ends.

Amounts are Decimal: seconds for pools and add-ons, money for the wallet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Iterable
from decimal import Decimal
from zoneinfo import ZoneInfo

WEEK_HOURS = 168
#: how far back the burn rate looks
HISTORY = dt.timedelta(weeks=4)
#: the least history for a profile by hour of week; below it, a flat rate
PROFILE_MIN = dt.timedelta(days=7)
#: a short history is counted as at least this long (one call an hour after the
#: tenant was created is not a rate of a call an hour)
FLAT_MIN = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
ZERO = Decimal(0)


@dataclasses.dataclass(frozen=True)
class Burn:
    """One charge: when, and how much (seconds or money, positive)."""

    at: dt.datetime
    amount: Decimal


@dataclasses.dataclass(frozen=True)
class BurnRate:
    """Expected use per hour in each of the week's 168 local hours."""

    basis: str  # "hour_of_week", "flat" or "none" (nothing charged in the history)
    history: dt.timedelta  # how much history the rate was drawn from
    per_hour: tuple[Decimal, ...]

    @property
    def per_day(self) -> Decimal:
        """The average day's use (the week's use / 7)."""
        return sum(self.per_hour, ZERO) / 7


@dataclasses.dataclass(frozen=True)
class Outlook:
    """What is left, the rate, and when it runs out before ``horizon`` (None: it lasts)."""

    remaining: Decimal
    rate: BurnRate
    runs_out_at: dt.datetime | None
    horizon: dt.datetime

    @property
    def status(self) -> str:
        """``exhausted`` (nothing left now), ``runs_out`` (before the horizon),
        ``no_recent_use`` (nothing charged in the history) or ``lasts``."""
        if self.remaining <= 0:
            return "exhausted"
        if self.runs_out_at is not None:
            return "runs_out"
        return "no_recent_use" if self.rate.basis == "none" else "lasts"


def slot_of(at: dt.datetime, tz: ZoneInfo) -> int:
    """The hour of the week of ``at`` in ``tz``: Monday 00:00-00:59 is 0, Sunday 23:xx 167."""
    local = at.astimezone(tz)
    return local.weekday() * 24 + local.hour


def _segments(start: dt.datetime, end: dt.datetime) -> Iterable[tuple[dt.datetime, dt.datetime]]:
    """[start, end) cut at every whole UTC hour (so that each piece has one local hour
    of the week, for zones whose offsets are whole hours; a piece of a half-hour zone
    counts in the local hour it starts in)."""
    t = start
    while t < end:
        next_hour = t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0) + HOUR
        piece_end = min(next_hour, end)
        yield t, piece_end
        t = piece_end


def _hours(delta: dt.timedelta) -> Decimal:
    return Decimal(int(delta.total_seconds() * 1_000_000)) / 3_600_000_000


@functools.lru_cache(maxsize=6)
def _walk(start: dt.datetime, end: dt.datetime, tz: ZoneInfo
          ) -> tuple[tuple[dt.datetime, Decimal, int], ...]:
    """The pieces of [start, end): each one's start, length in hours and hour of the week.
    The last few are kept for the next account of the same tenant: they share now, the
    month's end and the history's start (a year's walk is about 2 MB)."""
    return tuple((a, _hours(b - a), slot_of(a, tz)) for a, b in _segments(start, end))


def burn_rate(burns: Iterable[Burn], *, start: dt.datetime, now: dt.datetime,
              tz: ZoneInfo) -> BurnRate:
    """The burn rate from the charges in [max(start, now - HISTORY), now); ``start`` is
    when the account could first be charged (the tenant's creation)."""
    start = min(max(start, now - HISTORY), now)
    history = now - start
    amounts = [0] * WEEK_HOURS
    by_slot = [ZERO] * WEEK_HOURS
    total = ZERO
    for b in burns:
        if start <= b.at < now and b.amount > 0:
            s = slot_of(b.at, tz)
            by_slot[s] += b.amount
            amounts[s] += 1
            total += b.amount
    if total == 0:
        return BurnRate("none", history, (ZERO,) * WEEK_HOURS)
    flat = total / _hours(max(history, FLAT_MIN))
    if history < PROFILE_MIN:
        return BurnRate("flat", history, (flat,) * WEEK_HOURS)
    exposure = [ZERO] * WEEK_HOURS
    for _, hours, slot in _walk(start, now, tz):
        exposure[slot] += hours
    # a slot the history never covered (a skipped daylight-saving hour) takes the flat rate
    per_hour = tuple(by_slot[s] / exposure[s] if exposure[s] > 0 else flat
                     for s in range(WEEK_HOURS))
    return BurnRate("hour_of_week", history, per_hour)


def run_out(rate: BurnRate, remaining: Decimal, *, now: dt.datetime, horizon: dt.datetime,
            tz: ZoneInfo) -> dt.datetime | None:
    """When ``remaining`` is spent at ``rate`` from ``now``; None if not before ``horizon``."""
    if remaining <= 0:
        return now
    left = remaining
    for a, hours, slot in _walk(now, horizon, tz):
        per_hour = rate.per_hour[slot]
        use = per_hour * hours
        if use >= left:
            seconds = left / per_hour * 3600
            return a + dt.timedelta(seconds=float(seconds))
        left -= use
    return None


def expected_use(rate: BurnRate, *, now: dt.datetime, until: dt.datetime,
                 tz: ZoneInfo) -> Decimal:
    """What ``rate`` spends between ``now`` and ``until``."""
    return sum((rate.per_hour[slot] * hours for _, hours, slot in _walk(now, until, tz)),
               ZERO)


def outlook(burns: Iterable[Burn], remaining: Decimal, *, start: dt.datetime,
            now: dt.datetime, horizon: dt.datetime, tz: ZoneInfo) -> Outlook:
    """The burn rate of ``burns`` and when ``remaining`` runs out at it."""
    rate = burn_rate(burns, start=start, now=now, tz=tz)
    return Outlook(remaining, rate, run_out(rate, remaining, now=now, horizon=horizon, tz=tz),
                   horizon)


def day_ends(now: dt.datetime, until: dt.datetime, tz: ZoneInfo) -> list[dt.datetime]:
    """Each local midnight after ``now`` up to ``until``, then ``until`` itself."""
    out: list[dt.datetime] = []
    local = now.astimezone(tz)
    day = local.date()
    while True:
        day += dt.timedelta(days=1)
        midnight = dt.datetime.combine(day, dt.time(), tzinfo=tz).astimezone(dt.UTC)
        if midnight >= until:
            break
        out.append(midnight)
    out.append(until)
    return out


def projection(rate: BurnRate, start_value: Decimal, *, now: dt.datetime,
               until: dt.datetime, tz: ZoneInfo) -> list[tuple[dt.datetime, Decimal]]:
    """The expected cumulative use at each local day's end from ``now`` to ``until``,
    starting from ``start_value`` (what is used or held now)."""
    ends = day_ends(now, until, tz)
    points = [(now, start_value)]
    value, i = start_value, 0
    for a, hours, slot in _walk(now, until, tz):
        while a >= ends[i]:
            points.append((ends[i], value))
            i += 1
        value += rate.per_hour[slot] * hours
    points.extend((end, value) for end in ends[i:])
    return points
