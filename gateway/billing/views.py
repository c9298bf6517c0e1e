"""Typed read views: what the HTTP API, /status and the CLI show of the store.

Every surface reads through ``Views`` and gets small frozen dataclasses back, built
field by field from the rows: a column added to a table (``calls.owner``) stays
internal until a view names it. The JSON schemas of the API responses are generated
from these classes (``billing.schemas``), so a view and its documentation cannot drift.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from ..errors import NotFound
from ..rating import rules
from ..rating.forecast import HISTORY
from ..store.repository import Repository
from . import reports
from .rater import Clock, utcnow

# ---- tenants, users, numbers -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Subscription:
    sku: str
    quantity: int
    assigned: int


@dataclasses.dataclass(frozen=True)
class TenantSummary:
    """A tenant as listed: without its subscriptions."""

    id: str
    name: str
    country: str
    timezone: str
    currency: str
    blocked_classes: list[str]
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Tenant(TenantSummary):
    subscriptions: list[Subscription]


@dataclasses.dataclass(frozen=True)
class User:
    id: str
    tenant_id: str
    display_name: str
    sip_endpoint: str
    extension: str | None
    usage_location: str
    licences: list[str]


@dataclasses.dataclass(frozen=True)
class PhoneNumber:
    e164: str
    tenant_id: str
    kind: str
    user_id: str | None
    target: str | None


# ---- rates and allotments ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rate:
    id: int
    tenant_id: str | None
    currency: str
    kind: str
    prefix: str
    price_per_minute: Decimal
    first_increment: int
    increment: int
    description: str


@dataclasses.dataclass(frozen=True)
class Allotment:
    country: str
    plan: str
    minutes: int


# ---- wallet, usage, calls ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    id: int
    at: dt.datetime
    tenant_id: str
    entry: str
    account: str
    country: str | None
    month: dt.date | None
    user_id: str | None
    call_id: uuid.UUID | None
    d_used_seconds: int
    d_reserved_seconds: int
    d_balance: Decimal
    d_reserved: Decimal
    note: str


@dataclasses.dataclass(frozen=True)
class AutoRecharge:
    enabled: bool
    threshold: Decimal
    amount: Decimal
    monthly_cap: int
    recharges_this_month: int


@dataclasses.dataclass(frozen=True)
class Wallet:
    balance: Decimal
    reserved: Decimal
    available: Decimal
    auto_recharge: AutoRecharge


@dataclasses.dataclass(frozen=True)
class WalletView(Wallet):
    """The wallet of a month with its recent movements (GET .../wallet)."""

    tenant_id: str
    currency: str
    month: dt.date
    recent_entries: list[LedgerEntry]


@dataclasses.dataclass(frozen=True)
class Pool:
    """A Calling Plan pool of one country in one month: seconds exact, minutes shown."""

    country: str
    capacity_minutes: Decimal
    used_minutes: Decimal
    reserved_minutes: Decimal
    remaining_minutes: Decimal
    capacity_seconds: int
    used_seconds: int
    reserved_seconds: int


@dataclasses.dataclass(frozen=True)
class AddonUsage:
    """One user's International Calling Plan minutes in one month."""

    user_id: str
    capacity_minutes: Decimal
    used_minutes: Decimal
    reserved_minutes: Decimal
    remaining_minutes: Decimal
    capacity_seconds: int
    used_seconds: int
    reserved_seconds: int


@dataclasses.dataclass(frozen=True)
class CallTotals:
    """Calls of a month grouped by direction, number class and decision."""

    direction: str
    number_class: str
    decision: str
    calls: int
    billed_seconds: int
    charged: Decimal


@dataclasses.dataclass(frozen=True)
class Usage:
    tenant_id: str
    month: dt.date
    currency: str
    pools: list[Pool]
    international_addon: list[AddonUsage]
    wallet: Wallet
    calls: list[CallTotals]


@dataclasses.dataclass(frozen=True)
class Call:
    """One call as recorded: its decision, funding and settlement (not the process that
    owns it: that is internal)."""

    id: uuid.UUID
    tenant_id: str
    user_id: str | None
    direction: str
    caller: str
    destination: str
    number_class: str
    decision: str
    reason: str
    route: str | None
    pbx_uniqueid: str | None
    linkedid: str | None
    rate_kind: str | None
    rate_prefix: str | None
    price_per_minute: Decimal | None
    first_increment: int
    increment: int
    sources: list[str]
    month: dt.date
    pool_country: str | None
    funded_seconds: int
    state: str
    authorised_at: dt.datetime
    answered_at: dt.datetime | None
    ended_at: dt.datetime | None
    billable_seconds: int | None
    billed_seconds: int | None
    charged_amount: Decimal | None
    settled_by: str | None


def _pick(cls: type, row: Any, **extra: Any) -> Any:
    """Build view ``cls`` from the row's columns of the same names: only those it names."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    return cls(**{n: row[n] for n in names}, **extra)


def _minutes(seconds: int) -> Decimal:
    # seconds are the exact figure; minutes are shown to the hundredth
    return (Decimal(seconds) / 60).quantize(Decimal("0.01"))


def _counters(row: Any) -> dict[str, Any]:
    cap, used, reserved = row["capacity_seconds"], row["used_seconds"], row["reserved_seconds"]
    return {"capacity_minutes": _minutes(cap), "used_minutes": _minutes(used),
            "reserved_minutes": _minutes(reserved),
            "remaining_minutes": _minutes(max(cap - used - reserved, 0)),
            "capacity_seconds": cap, "used_seconds": used, "reserved_seconds": reserved}


class Views:
    """The read side of billing: typed views over the store, for every surface."""

    def __init__(self, repo: Repository, *, clock: Clock = utcnow):
        self._repo = repo
        self.clock = clock

    # ---- tenants -----------------------------------------------------------------------

    async def list_tenants(self) -> list[TenantSummary]:
        return [_pick(TenantSummary, r) for r in await self._repo.list_tenants()]

    async def tenant(self, tenant_id: str) -> Tenant:
        """One tenant with its subscriptions; UNKNOWN_TENANT when there is none."""
        row = await self._repo.find_tenant(tenant_id)
        if row is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")
        subs = [_pick(Subscription, s) for s in await self._repo.subscriptions(tenant_id)]
        return _pick(Tenant, row, subscriptions=subs)

    # ---- users and numbers ------------------------------------------------------------

    async def users(self, tenant_id: str) -> list[User]:
        await self.tenant(tenant_id)
        return [_pick(User, r) for r in await self._repo.list_users(tenant_id)]

    async def user(self, user_id: str) -> User:
        row = await self._repo.find_user(user_id)
        if row is None:
            raise NotFound(f"no such user: {user_id}", code="UNKNOWN_USER")
        return _pick(User, row)

    async def numbers(self, tenant_id: str) -> list[PhoneNumber]:
        await self.tenant(tenant_id)
        return [_pick(PhoneNumber, r) for r in await self._repo.list_numbers(tenant_id)]

    # ---- rates and allotments ----------------------------------------------------------

    async def rates(self, tenant_id: str | None = None) -> list[Rate]:
        """The rates for every tenant (None) or a tenant's own ones."""
        if tenant_id is not None:
            await self.tenant(tenant_id)
        return [_pick(Rate, r) for r in await self._repo.list_rates(tenant_id)]

    async def allotments(self) -> list[Allotment]:
        return [_pick(Allotment, r) for r in await self._repo.allotments()]

    # ---- wallet, usage, calls -----------------------------------------------------------

    async def _month(self, tenant: Tenant, month: dt.date | None) -> dt.date:
        return month or rules.month_of(self.clock(), tenant.timezone)

    async def _wallet(self, tenant_id: str, month: dt.date) -> Wallet:
        w = await self._repo.get_wallet(tenant_id, month)
        return Wallet(
            balance=w["balance"], reserved=w["reserved"],
            available=w["balance"] - w["reserved"],
            auto_recharge=AutoRecharge(
                enabled=w["auto_recharge_enabled"],
                threshold=w["auto_recharge_threshold"],
                amount=w["auto_recharge_amount"],
                monthly_cap=w["auto_recharge_monthly_cap"],
                recharges_this_month=w["recharges_this_month"]))

    async def wallet(self, tenant_id: str, entries: int = 20) -> WalletView:
        """The wallet this month and its last ``entries`` top-ups, recharges and charges."""
        tenant = await self.tenant(tenant_id)
        month = await self._month(tenant, None)
        wallet = await self._wallet(tenant_id, month)
        recent = [_pick(LedgerEntry, r) for r in await self._repo.ledger(tenant_id, 200)
                  if r["account"] == "wallet" and r["entry"] in ("topup", "recharge", "charge")]
        return WalletView(**{f.name: getattr(wallet, f.name)
                             for f in dataclasses.fields(Wallet)},
                          tenant_id=tenant_id, currency=tenant.currency, month=month,
                          recent_entries=recent[:entries])

    async def usage(self, tenant_id: str, month: dt.date | None = None) -> Usage:
        """A tenant's month (its current one by default): pools, add-on minutes, wallet
        and call totals."""
        tenant = await self.tenant(tenant_id)
        month = await self._month(tenant, month)
        pools = [Pool(country=p["country"], **_counters(p))
                 for p in await self._repo.pools(tenant_id, month)]
        addons = [AddonUsage(user_id=a["user_id"], **_counters(a))
                  for a in await self._repo.addon_usage(tenant_id, month)]
        totals = [_pick(CallTotals, s)
                  for s in await self._repo.usage_summary(tenant_id, month)]
        return Usage(tenant_id=tenant_id, month=month, currency=tenant.currency, pools=pools,
                     international_addon=addons, wallet=await self._wallet(tenant_id, month),
                     calls=totals)

    async def calls(self, tenant_id: str, month: dt.date | None, limit: int, *,
                    user_id: str | None = None, direction: str | None = None,
                    decision: str | None = None, first_day: dt.date | None = None,
                    last_day: dt.date | None = None) -> list[Call]:
        """A tenant's calls, newest first, of one month or of all time; optionally only
        one user's, one direction, one decision, or those authorised from ``first_day``
        to ``last_day`` (inclusive, in the tenant's timezone)."""
        tenant = await self.tenant(tenant_id)
        tz = ZoneInfo(tenant.timezone)

        def midnight(day: dt.date) -> dt.datetime:
            return dt.datetime.combine(day, dt.time(), tzinfo=tz).astimezone(dt.UTC)

        since = midnight(first_day) if first_day else None
        before = (midnight(last_day + dt.timedelta(days=1))
                  if last_day and last_day < dt.date.max else None)
        rows = await self._repo.list_calls(tenant_id, month, limit, user_id=user_id,
                                           direction=direction, decision=decision,
                                           since=since, before=before)
        return [_pick(Call, r) for r in rows]

    # ---- forecast and month export --------------------------------------------------------

    async def forecast(self, tenant_id: str) -> reports.Forecast:
        """Each pool, add-on and the wallet of the current month, and when each runs out
        at the recent burn rate (docs/billing.md, "Forecast")."""
        tenant = await self.tenant(tenant_id)
        tz = ZoneInfo(tenant.timezone)
        now = self.clock()
        month = rules.month_of(now, tenant.timezone)
        month_start, month_end = reports.month_bounds(month, tz)
        usage = await self.usage(tenant_id, month)
        since = min(month_start, now - HISTORY)
        charges = reports.burns_by_account(await self._repo.charges_since(tenant_id, since))
        first = await self._repo.first_movement(tenant_id)
        created = min(tenant.created_at, first) if first else tenant.created_at
        common = dict(created_at=created, now=now, month_start=month_start,
                      month_end=month_end, tz=tz)
        accounts = []
        for p in usage.pools:
            accounts.append(reports.account_forecast(
                "pool", p.country, "seconds", capacity=Decimal(p.capacity_seconds),
                used=Decimal(p.used_seconds), reserved=Decimal(p.reserved_seconds),
                remaining=Decimal(max(p.capacity_seconds - p.used_seconds
                                      - p.reserved_seconds, 0)),
                burns=reports.burns_of(charges, "pool", p.country),
                month_burns=reports.burns_of(charges, "pool", p.country, month=month),
                horizon=month_end, **common))
        for a in usage.international_addon:
            accounts.append(reports.account_forecast(
                "addon", a.user_id, "seconds", capacity=Decimal(a.capacity_seconds),
                used=Decimal(a.used_seconds), reserved=Decimal(a.reserved_seconds),
                remaining=Decimal(max(a.capacity_seconds - a.used_seconds
                                      - a.reserved_seconds, 0)),
                burns=reports.burns_of(charges, "addon", a.user_id),
                month_burns=reports.burns_of(charges, "addon", a.user_id, month=month),
                horizon=month_end, **common))
        wallet_month = reports.burns_of(charges, "wallet", month=month)
        accounts.append(reports.account_forecast(
            "wallet", tenant.currency, "money", capacity=None,
            used=sum((b.amount for b in wallet_month), Decimal(0)),
            reserved=usage.wallet.reserved, remaining=max(usage.wallet.available, Decimal(0)),
            burns=reports.burns_of(charges, "wallet"), month_burns=wallet_month,
            horizon=now + reports.WALLET_HORIZON, **common))
        return reports.Forecast(tenant_id=tenant_id, currency=tenant.currency,
                                timezone=tenant.timezone, month=month, generated_at=now,
                                accounts=accounts)

    async def month_export(self, tenant_id: str, month: dt.date | None = None
                           ) -> reports.MonthExport:
        """A tenant's month (its current one by default): each call with its rated cost
        and funding sources, totals per user, pool, add-on and for the wallet."""
        tenant = await self.tenant(tenant_id)
        month = await self._month(tenant, month)
        start, end = reports.month_bounds(month, ZoneInfo(tenant.timezone))
        calls, wallet = await self._repo.month_export(tenant_id, month, start, end)
        return reports.build_export(
            tenant_id=tenant_id, name=tenant.name, currency=tenant.currency,
            timezone=tenant.timezone, month=month, now=self.clock(), calls=calls,
            wallet=wallet)


def as_dict(view: Any) -> dict[str, Any]:
    """A view as plain data (nested views too), for the CLI's tables and CSV."""
    return dataclasses.asdict(view)
