"""Two reports for operators, as typed views (``Views.forecast``, ``Views.month_export``)
built here from plain rows:

- the forecast: for each pool, add-on and the wallet, what is left and the day it runs
  out at the recent burn rate (the arithmetic is ``rating.forecast``), with what the
  page's burn-down chart draws: the month's use so far by day and the projection;
- the month export: each call of a tenant's month with its rated cost and what each
  funding source was charged, and totals per user, per pool, per add-on and for the
  wallet, as JSON or CSV (``export_csv``).

Money and seconds are Decimal and int; nothing goes through a float.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from ..rating import forecast as fc

SECONDS_QUANTUM = Decimal("0.01")
MONEY_QUANTUM = Decimal("0.000001")
#: how far ahead a wallet's run-out is looked for (pools and add-ons: the month's end)
WALLET_HORIZON = dt.timedelta(days=366)


# ---- forecast -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForecastPoint:
    at: dt.datetime
    value: Decimal


@dataclasses.dataclass(frozen=True)
class AccountForecast:
    """One pool (item: its country), add-on (item: its user) or the wallet (item: the
    currency): this month's figures, the recent burn rate and when what is left runs out
    at it. ``unit`` is ``seconds`` (pool, add-on) or ``money`` (wallet). ``status``:
    ``runs_out`` (at ``runs_out_at``, before the horizon: the month's end for a pool or
    an add-on, a year for the wallet), ``lasts``, ``no_recent_use`` or ``exhausted``.
    ``history``: what was used by the end of each day of the month so far; ``projection``:
    used and held now, then expected by the end of each day to the month's end."""

    account: str
    item: str
    unit: str
    capacity: Decimal | None
    used: Decimal
    reserved: Decimal
    remaining: Decimal
    burn_per_day: Decimal
    basis: str
    history_days: Decimal
    status: str
    runs_out_at: dt.datetime | None
    runs_out_on: dt.date | None
    horizon: dt.datetime
    history: list[ForecastPoint]
    projection: list[ForecastPoint]


@dataclasses.dataclass(frozen=True)
class Forecast:
    """A tenant's accounts and when each runs out at the recent burn rate (by hour of the
    week over the last four weeks; flat below a week of history)."""

    tenant_id: str
    currency: str
    timezone: str
    month: dt.date
    generated_at: dt.datetime
    accounts: list[AccountForecast]


def month_bounds(month: dt.date, tz: ZoneInfo) -> tuple[dt.datetime, dt.datetime]:
    """The month's first instant and the next month's, in the tenant's timezone, as UTC."""
    nxt = (month.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return (dt.datetime.combine(month, dt.time(), tzinfo=tz).astimezone(dt.UTC),
            dt.datetime.combine(nxt, dt.time(), tzinfo=tz).astimezone(dt.UTC))


def _q(value: Decimal, unit: str) -> Decimal:
    return value.quantize(MONEY_QUANTUM if unit == "money" else SECONDS_QUANTUM)


def account_forecast(account: str, item: str, unit: str, *, capacity: Decimal | None,
                     used: Decimal, reserved: Decimal, remaining: Decimal,
                     burns: list[fc.Burn], month_burns: list[fc.Burn],
                     created_at: dt.datetime, now: dt.datetime, month_start: dt.datetime,
                     month_end: dt.datetime, horizon: dt.datetime,
                     tz: ZoneInfo) -> AccountForecast:
    """One account's forecast from its recent charges (``burns``, any month) and this
    month's (``month_burns``, for the history)."""
    o = fc.outlook(burns, remaining, start=created_at, now=now, horizon=horizon, tz=tz)
    history = [ForecastPoint(month_start, Decimal(0))]
    total, pending = Decimal(0), sorted(month_burns, key=lambda b: b.at)
    for end in fc.day_ends(month_start, now, tz)[:-1]:
        while pending and pending[0].at < end:
            total += pending.pop(0).amount
        history.append(ForecastPoint(end, _q(total, unit)))
    history.append(ForecastPoint(now, _q(used, unit)))
    projection = [ForecastPoint(at, _q(v, unit)) for at, v in
                  fc.projection(o.rate, used + reserved, now=now, until=month_end, tz=tz)]
    return AccountForecast(
        account=account, item=item, unit=unit, capacity=capacity, used=used,
        reserved=reserved, remaining=remaining, burn_per_day=_q(o.rate.per_day, unit),
        basis=o.rate.basis,
        history_days=(Decimal(int(o.rate.history.total_seconds())) / 86400).quantize(
            Decimal("0.01")),
        status=o.status, runs_out_at=o.runs_out_at,
        runs_out_on=o.runs_out_at.astimezone(tz).date() if o.runs_out_at else None,
        horizon=horizon, history=history, projection=projection)


def burns_by_account(charges: Iterable[Mapping[str, Any]]
                     ) -> dict[tuple[str, str | None], list[tuple[dt.date | None, fc.Burn]]]:
    """The charges (ledger rows) as burns, grouped by account: ``("pool", country)``,
    ``("addon", user_id)``, ``("wallet", None)``; each with the month it was charged to.
    Seconds for a pool or an add-on, money for the wallet (its charges are negative
    balance deltas)."""
    out: dict[tuple[str, str | None], list[tuple[dt.date | None, fc.Burn]]] = {}
    for c in charges:
        account = c["account"]
        key = {"pool": c["country"], "addon": c["user_id"]}.get(account)
        amount = -c["d_balance"] if account == "wallet" else Decimal(c["d_used_seconds"])
        out.setdefault((account, key), []).append((c["month"], fc.Burn(c["at"], amount)))
    return out


def burns_of(grouped: Mapping[tuple[str, str | None], list[tuple[dt.date | None, fc.Burn]]],
             account: str, key: str | None = None, *, month: dt.date | None = None
             ) -> list[fc.Burn]:
    """One account's burns (of one month, when given)."""
    return [b for m, b in grouped.get((account, key), []) if month is None or m == month]


# ---- the month export ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportCall:
    """One call of the month: its decision, rate, billed time and what each funding
    source was charged (pool and add-on in seconds, the wallet in seconds and money;
    ``charged_amount`` is the call's rated cost, all of it from the wallet)."""

    id: uuid.UUID
    authorised_at: dt.datetime
    answered_at: dt.datetime | None
    ended_at: dt.datetime | None
    user_id: str | None
    direction: str
    caller: str
    destination: str
    number_class: str
    decision: str
    reason: str
    state: str
    rate_kind: str | None
    rate_prefix: str | None
    price_per_minute: Decimal | None
    sources: list[str]
    pool_country: str | None
    billed_seconds: int
    pool_seconds: int
    addon_seconds: int
    wallet_seconds: int
    wallet_amount: Decimal
    charged_amount: Decimal


@dataclasses.dataclass(frozen=True)
class UserTotal:
    """A user's calls of the month (``user_id`` null: inbound calls to numbers of no
    user, e.g. toll-free numbers ringing a service)."""

    user_id: str | None
    calls: int
    billed_seconds: int
    pool_seconds: int
    addon_seconds: int
    wallet_seconds: int
    wallet_amount: Decimal


@dataclasses.dataclass(frozen=True)
class PoolTotal:
    country: str
    calls: int
    used_seconds: int
    used_minutes: Decimal


@dataclasses.dataclass(frozen=True)
class AddonTotal:
    user_id: str
    calls: int
    used_seconds: int
    used_minutes: Decimal


@dataclasses.dataclass(frozen=True)
class WalletTotal:
    """The wallet's part of the month: what the month's calls were charged, and the
    top-ups and auto-recharges made during the month (tenant's timezone)."""

    currency: str
    calls: int
    charged_seconds: int
    charged: Decimal
    topups: Decimal
    recharges: Decimal
    recharge_count: int


@dataclasses.dataclass(frozen=True)
class MonthExport:
    """A tenant's month (calls authorised in it, tenant's timezone): each call with its
    rated cost and funding, totals per user, pool, add-on and for the wallet.
    ``open_calls`` counts calls not settled yet: their charges are not final."""

    tenant_id: str
    name: str
    currency: str
    timezone: str
    month: dt.date
    generated_at: dt.datetime
    open_calls: int
    calls: list[ExportCall]
    users: list[UserTotal]
    pools: list[PoolTotal]
    addons: list[AddonTotal]
    wallet: WalletTotal


def _minutes(seconds: int) -> Decimal:
    return (Decimal(seconds) / 60).quantize(Decimal("0.01"))


def build_export(*, tenant_id: str, name: str, currency: str, timezone: str,
                 month: dt.date, now: dt.datetime, calls: list[Mapping[str, Any]],
                 wallet: list[Mapping[str, Any]]) -> MonthExport:
    """The export from the store's rows (``Repository.month_export``)."""
    rows = [ExportCall(
        id=c["id"], authorised_at=c["authorised_at"], answered_at=c["answered_at"],
        ended_at=c["ended_at"], user_id=c["user_id"], direction=c["direction"],
        caller=c["caller"], destination=c["destination"], number_class=c["number_class"],
        decision=c["decision"], reason=c["reason"], state=c["state"],
        rate_kind=c["rate_kind"], rate_prefix=c["rate_prefix"],
        price_per_minute=c["price_per_minute"], sources=list(c["sources"]),
        pool_country=c["pool_country"], billed_seconds=c["billed_seconds"] or 0,
        pool_seconds=int(c["pool_seconds"]), addon_seconds=int(c["addon_seconds"]),
        wallet_seconds=int(c["wallet_seconds"]), wallet_amount=c["wallet_amount"],
        charged_amount=c["charged_amount"] or Decimal(0)) for c in calls]
    users: dict[str | None, list[ExportCall]] = {}
    pools: dict[str, list[ExportCall]] = {}
    addons: dict[str, list[ExportCall]] = {}
    for r in rows:
        users.setdefault(r.user_id, []).append(r)
        if r.pool_seconds and r.pool_country:
            pools.setdefault(r.pool_country, []).append(r)
        if r.addon_seconds and r.user_id:
            addons.setdefault(r.user_id, []).append(r)
    user_totals = [UserTotal(
        user_id=u, calls=len(cs), billed_seconds=sum(c.billed_seconds for c in cs),
        pool_seconds=sum(c.pool_seconds for c in cs),
        addon_seconds=sum(c.addon_seconds for c in cs),
        wallet_seconds=sum(c.wallet_seconds for c in cs),
        wallet_amount=sum((c.wallet_amount for c in cs), Decimal(0)))
        for u, cs in sorted(users.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
    pool_totals = [PoolTotal(country, len(cs), s := sum(c.pool_seconds for c in cs),
                             _minutes(s)) for country, cs in sorted(pools.items())]
    addon_totals = [AddonTotal(user, len(cs), s := sum(c.addon_seconds for c in cs),
                               _minutes(s)) for user, cs in sorted(addons.items())]
    moved = {w["entry"]: w for w in wallet}
    on_wallet = [r for r in rows if r.wallet_seconds or r.wallet_amount]
    wallet_total = WalletTotal(
        currency=currency, calls=len(on_wallet),
        charged_seconds=sum(r.wallet_seconds for r in on_wallet),
        charged=sum((r.wallet_amount for r in on_wallet), Decimal(0)),
        topups=moved["topup"]["amount"] if "topup" in moved else Decimal(0),
        recharges=moved["recharge"]["amount"] if "recharge" in moved else Decimal(0),
        recharge_count=moved["recharge"]["entries"] if "recharge" in moved else 0)
    return MonthExport(
        tenant_id=tenant_id, name=name, currency=currency, timezone=timezone, month=month,
        generated_at=now,
        open_calls=sum(1 for r in rows if r.state in ("authorised", "answered")),
        calls=rows, users=user_totals, pools=pool_totals, addons=addon_totals,
        wallet=wallet_total)


#: The CSV's columns: one file, one row per call (record ``call``), then one per user,
#: pool, add-on and the wallet (records ``user``, ``pool``, ``addon``, ``wallet``), each
#: filling the columns that apply to it.
CSV_COLUMNS = ["record", "call_id", "authorised_at", "answered_at", "ended_at", "user_id",
               "direction", "caller", "destination", "number_class", "decision", "reason",
               "state", "rate_kind", "rate_prefix", "price_per_minute", "sources",
               "pool_country", "calls", "billed_seconds", "pool_seconds", "addon_seconds",
               "wallet_seconds", "wallet_amount", "topups", "recharges"]


# A spreadsheet runs a cell that starts with one of these as a formula. Caller ids of
# inbound calls come from outside (a SIP From header), so a text cell that would be read
# as a formula is written with a leading apostrophe; a plain number (an E.164 "+1514…",
# a negative amount) is left as it is.
_FORMULA_START = ("=", "@", "+", "-", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    text = str(value)
    if text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def export_csv(export: MonthExport) -> str:
    """The export as one CSV file (``CSV_COLUMNS``); times in UTC, ISO 8601."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n", restval="")
    writer.writeheader()

    def row(**cells: Any) -> None:
        writer.writerow({k: _cell(v) for k, v in cells.items()})

    for c in export.calls:
        row(record="call", call_id=c.id, authorised_at=c.authorised_at,
            answered_at=c.answered_at, ended_at=c.ended_at, user_id=c.user_id,
            direction=c.direction, caller=c.caller, destination=c.destination,
            number_class=c.number_class, decision=c.decision, reason=c.reason,
            state=c.state, rate_kind=c.rate_kind, rate_prefix=c.rate_prefix,
            price_per_minute=c.price_per_minute, sources=c.sources,
            pool_country=c.pool_country, calls=1, billed_seconds=c.billed_seconds,
            pool_seconds=c.pool_seconds, addon_seconds=c.addon_seconds,
            wallet_seconds=c.wallet_seconds, wallet_amount=c.wallet_amount)
    for u in export.users:
        row(record="user", user_id=u.user_id, calls=u.calls, billed_seconds=u.billed_seconds,
            pool_seconds=u.pool_seconds, addon_seconds=u.addon_seconds,
            wallet_seconds=u.wallet_seconds, wallet_amount=u.wallet_amount)
    for p in export.pools:
        row(record="pool", pool_country=p.country, calls=p.calls, pool_seconds=p.used_seconds)
    for a in export.addons:
        row(record="addon", user_id=a.user_id, calls=a.calls, addon_seconds=a.used_seconds)
    w = export.wallet
    row(record="wallet", calls=w.calls, wallet_seconds=w.charged_seconds,
        wallet_amount=w.charged, topups=w.topups, recharges=w.recharges)
    return out.getvalue()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def to_json(view: Any) -> str:
    """A report as JSON, as the API answers it: money and seconds as decimal strings,
    times ISO 8601 (the CLI's --json and export files)."""
    return json.dumps(dataclasses.asdict(view), default=_json_default, ensure_ascii=False,
                      indent=1) + "\n"
