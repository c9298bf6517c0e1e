"""Operator operations: provisioning tenants, users, licences, numbers, rates and credits.

Every input is checked here before anything is written, with typed errors that name
the field; the database constraints are the second line. The HTTP API and the CLI
both call this module.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import AsyncIterator, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers

from ..errors import Conflict, InvalidInput, NotFound
from ..rating import rules
from ..rating.model import CALLING_PLAN_COUNTRIES, NumberKind, RateKind, Sku, Tenant, User
from ..store.repository import Repository
from .rater import Clock, utcnow

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
_EXTENSION = re.compile(r"^[0-9]{2,8}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
_PREFIX = re.compile(r"^[0-9]{0,15}$")
MAX_AMOUNT = Decimal("1000000")
BLOCKABLE = {"premium_rate", "international", "domestic", "toll_free"}


def _need(value: Any, pattern: re.Pattern[str], field: str, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidInput(f"{field} must be {what}", code="INVALID_" + field.upper(),
                           field=field)
    return value


def check_country(value: Any, field: str = "country") -> str:
    if not isinstance(value, str) or value not in phonenumbers.SUPPORTED_REGIONS:
        raise InvalidInput(f"{field} {value!r} is not a known ISO 3166 country code",
                           code="UNKNOWN_COUNTRY", field=field)
    return value


def check_timezone(value: Any) -> str:
    try:
        if not isinstance(value, str) or not value:
            raise ValueError
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"timezone {value!r} is not an IANA timezone",
                           code="INVALID_TIMEZONE", field="timezone") from exc
    return value


def check_amount(value: Any, field: str = "amount", *, allow_zero: bool = False) -> Decimal:
    """A money amount: a decimal string or integer, never a float, at most 6 decimals."""
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidInput(f"{field} must be a decimal string, not a float",
                           code="INVALID_AMOUNT", field=field)
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError) as exc:
        raise InvalidInput(f"{field} {value!r} is not a number", code="INVALID_AMOUNT",
                           field=field) from exc
    if not amount.is_finite() or amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidInput(f"{field} must be {'≥' if allow_zero else '>'} 0",
                           code="INVALID_AMOUNT", field=field)
    if amount > MAX_AMOUNT:
        raise InvalidInput(f"{field} exceeds {MAX_AMOUNT}", code="INVALID_AMOUNT", field=field)
    if amount != amount.quantize(rules.MONEY_QUANTUM):
        raise InvalidInput(f"{field} has more than 6 decimals", code="INVALID_AMOUNT",
                           field=field)
    return amount


def check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{field} must be a whole number from {low} to {high}",
                           code="INVALID_" + field.upper(), field=field)
    return value


def check_e164(value: Any, field: str = "e164") -> str:
    if not isinstance(value, str) or not _E164.match(value):
        raise InvalidInput(f"{field} must be an E.164 number like +15145550100",
                           code="INVALID_NUMBER", field=field)
    try:
        possible = phonenumbers.is_possible_number(phonenumbers.parse(value))
    except phonenumbers.NumberParseException:
        possible = False
    if not possible:
        raise InvalidInput(f"{value} is not a possible phone number", code="INVALID_NUMBER",
                           field=field)
    return value


def check_sku(value: Any) -> Sku:
    try:
        return Sku(value)
    except ValueError as exc:
        raise InvalidInput(f"sku must be one of {', '.join(s.value for s in Sku)}",
                           code="UNKNOWN_SKU", field="sku") from exc


class Provisioning:
    def __init__(self, repo: Repository, *, clock: Clock = utcnow):
        self.repo = repo
        self.clock = clock

    @contextlib.asynccontextmanager
    async def one_transaction(self, *, rollback: bool = False
                              ) -> AsyncIterator[Provisioning]:
        """The same operations, all in one database transaction: committed when the
        block ends, nothing written if it raises, or never with ``rollback``."""
        async with self.repo.one_transaction(rollback=rollback) as repo:
            yield Provisioning(repo, clock=self.clock)

    # ---- tenants -------------------------------------------------------------------

    async def create_tenant(self, id: str, name: str, country: str, timezone: str = "UTC",
                            currency: str = "USD",
                            blocked_classes: Iterable[str] = ("premium_rate",)) -> None:
        _need(id, _ID, "id", "1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise InvalidInput("name must be 1-200 characters", code="INVALID_NAME",
                               field="name")
        tenant = Tenant(
            id=id,
            country=check_country(country),
            timezone=check_timezone(timezone),
            currency=_need(currency, _CURRENCY, "currency", "an ISO 4217 code like USD"),
            blocked_classes=self._blocked(blocked_classes),
        )
        await self.repo.create_tenant(tenant, name)

    @staticmethod
    def _blocked(values: Iterable[str]) -> frozenset[str]:
        if isinstance(values, str):
            values = [values]
        blocked = frozenset(values)
        unknown = blocked - BLOCKABLE
        if unknown:
            raise InvalidInput(f"blocked_classes may hold {sorted(BLOCKABLE)}",
                               code="INVALID_BLOCKED_CLASSES", field="blocked_classes")
        return blocked

    async def update_tenant(self, tenant_id: str, **changes: Any) -> None:
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "name":
                if not isinstance(value, str) or not 1 <= len(value) <= 200:
                    raise InvalidInput("name must be 1-200 characters", code="INVALID_NAME",
                                       field="name")
                fields["name"] = value
            elif key == "timezone":
                fields["timezone"] = check_timezone(value)
            elif key == "blocked_classes":
                fields["blocked_classes"] = sorted(self._blocked(value))
            else:
                raise InvalidInput(f"{key} cannot be changed", code="READ_ONLY_FIELD", field=key)
        await self.repo.update_tenant(tenant_id, fields)

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        r = await self.repo.find_tenant(tenant_id)
        if r is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")
        return dict(r)

    async def set_subscription(self, tenant_id: str, sku: str, quantity: int) -> None:
        sku = check_sku(sku)
        check_int(quantity, "quantity", 0, 1_000_000)
        await self._tenant_exists(tenant_id)
        await self.repo.set_subscription(tenant_id, sku.value, quantity)

    async def _tenant_exists(self, tenant_id: str) -> dict[str, Any]:
        return await self.get_tenant(tenant_id)

    # ---- users and licences ----------------------------------------------------------

    async def create_user(self, id: str, tenant_id: str, sip_endpoint: str,
                          usage_location: str, extension: str | None = None,
                          display_name: str = "") -> bool:
        """Create the user; the id of a deactivated user of the same tenant reactivates
        it with these details and its history (no licences, no numbers: assign them
        again). True when it reactivated one."""
        _need(id, _USER_ID, "id", "1-128 letters, digits, '_', '.', '@' or '-'")
        _need(sip_endpoint, _ENDPOINT, "sip_endpoint", "a PJSIP endpoint name")
        if extension is not None:
            _need(extension, _EXTENSION, "extension", "2-8 digits")
        if not isinstance(display_name, str) or len(display_name) > 200:
            raise InvalidInput("display_name must be at most 200 characters",
                               code="INVALID_DISPLAY_NAME", field="display_name")
        check_country(usage_location, "usage_location")
        await self._tenant_exists(tenant_id)
        return await self.repo.create_user(
            User(id=id, tenant_id=tenant_id, sip_endpoint=sip_endpoint,
                 usage_location=usage_location, extension=extension),
            display_name,
        )

    async def update_user(self, user_id: str, **changes: Any) -> None:
        fields: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "display_name":
                if not isinstance(value, str) or len(value) > 200:
                    raise InvalidInput("display_name must be at most 200 characters",
                                       code="INVALID_DISPLAY_NAME", field=key)
                fields[key] = value
            elif key == "extension":
                fields[key] = None if value is None else _need(value, _EXTENSION, key,
                                                                "2-8 digits")
            elif key == "usage_location":
                fields[key] = check_country(value, key)
            else:
                raise InvalidInput(f"{key} cannot be changed", code="READ_ONLY_FIELD", field=key)
        if "usage_location" in fields and fields["usage_location"] not in CALLING_PLAN_COUNTRIES:
            user = await self.get_user(user_id)
            if Sku.CALLING_PLAN.value in user["licences"]:
                raise Conflict("a Calling Plan user must be located in "
                               f"{', '.join(sorted(CALLING_PLAN_COUNTRIES))}",
                               code="CALLING_PLAN_COUNTRY", field="usage_location")
        await self.repo.update_user(user_id, fields)

    async def get_user(self, user_id: str) -> dict[str, Any]:
        r = await self.repo.find_user(user_id)
        if r is None:
            raise NotFound(f"no such user: {user_id}", code="UNKNOWN_USER")
        return dict(r)

    async def deactivate_user(self, user_id: str) -> None:
        """Deactivate the user: provisioning never deletes what bears history (its calls,
        ledger entries and add-on counters). Its licences return to the tenant, its
        numbers ring nobody, its endpoint name and extension are free for another user,
        and its phone is an unknown caller (UNKNOWN_CALLER). Refused with
        USER_HAS_OPEN_CALLS while one of its calls is open."""
        await self.repo.deactivate_user(user_id, self.clock())

    async def assign_licence(self, user_id: str, sku: str) -> None:
        """Assign one licence; never more than the tenant purchased (billing rules §2)."""
        sku = check_sku(sku)

        def check(user: Any, held: set[str]) -> None:
            if sku is Sku.CALLING_PLAN:
                if user["tenant_country"] not in CALLING_PLAN_COUNTRIES or (
                    user["usage_location"] not in CALLING_PLAN_COUNTRIES
                ):
                    raise Conflict(
                        "Business Voice with Calling Plan needs a tenant and a user located "
                        f"in {', '.join(sorted(CALLING_PLAN_COUNTRIES))}",
                        code="CALLING_PLAN_COUNTRY", field="sku")
                if Sku.BUSINESS_VOICE in held:
                    raise Conflict("the user already holds business_voice; unassign it first",
                                   code="LICENCE_CONFLICT", field="sku")
            elif sku is Sku.BUSINESS_VOICE:
                if Sku.CALLING_PLAN in held:
                    raise Conflict("the user already holds business_voice_calling_plan",
                                   code="LICENCE_CONFLICT", field="sku")
            elif Sku.CALLING_PLAN not in held:
                raise Conflict("the International Calling Plan needs "
                               "business_voice_calling_plan first",
                               code="ADDON_REQUIRES_CALLING_PLAN", field="sku")

        await self.repo.assign_licence(user_id, sku.value, check)

    async def unassign_licence(self, user_id: str, sku: str) -> None:
        sku = check_sku(sku)

        def check(held: set[str]) -> None:
            if sku.value not in held:
                raise NotFound(f"user {user_id} does not hold {sku.value}",
                               code="LICENCE_NOT_ASSIGNED", field="sku")
            if sku is Sku.CALLING_PLAN and Sku.ADDON.value in held:
                raise Conflict("unassign international_calling_plan first",
                               code="ADDON_REQUIRES_CALLING_PLAN", field="sku")

        await self.repo.unassign_licence(user_id, sku.value, check)

    # ---- numbers and rates -------------------------------------------------------------

    async def add_number(self, e164: str, tenant_id: str, kind: str,
                         user_id: str | None = None, target: str | None = None) -> None:
        check_e164(e164)
        try:
            kind = NumberKind(kind)
        except ValueError as exc:
            raise InvalidInput("kind must be user, toll_free or service",
                               code="INVALID_KIND", field="kind") from exc
        if target is not None:
            _need(target, _ENDPOINT, "target", "a PJSIP endpoint name")
        if kind is NumberKind.USER and user_id is None:
            raise InvalidInput("a user number needs user_id", code="MISSING_FIELD",
                               field="user_id")
        if user_id is None and target is None:
            raise InvalidInput("a number needs user_id or target to ring",
                               code="MISSING_FIELD", field="target")
        await self._tenant_exists(tenant_id)
        await self.repo.add_number(e164, tenant_id, kind.value, user_id, target)

    async def delete_number(self, e164: str) -> None:
        """Delete the number outright: it bears no history (each call keeps its own copy
        of the numbers it went between, and the ledger never names a number), and a call
        still open on it settles as if the number were there."""
        await self.repo.delete_number(e164)

    def _rate_row(self, r: dict[str, Any], tenant_id: str | None, line: str = "") -> tuple:
        where = f" (line {line})" if line else ""
        try:
            kind = RateKind(r.get("kind"))
        except ValueError as exc:
            raise InvalidInput(f"kind must be one of {', '.join(k.value for k in RateKind)}"
                               f"{where}", code="INVALID_KIND", field="kind") from exc
        prefix = str(r.get("prefix", "")).lstrip("+")
        _need(prefix, _PREFIX, "prefix", "0-15 digits" + where)
        currency = _need(r.get("currency", "USD"), _CURRENCY, "currency",
                         "an ISO 4217 code" + where)
        price = check_amount(r.get("price_per_minute"), "price_per_minute", allow_zero=True)
        if price > 1000:
            raise InvalidInput(f"price_per_minute above 1000{where}", code="INVALID_AMOUNT",
                               field="price_per_minute")
        first = check_int(_as_int(r.get("first_increment", 60)), "first_increment", 1, 3600)
        incr = check_int(_as_int(r.get("increment", 60)), "increment", 1, 3600)
        return (tenant_id, currency, kind.value, prefix, price, first, incr,
                str(r.get("description", ""))[:200])

    async def set_rates(self, rates: Iterable[dict[str, Any]], tenant_id: str | None = None
                        ) -> int:
        """Insert or replace rates, all or nothing."""
        if tenant_id is not None:
            await self._tenant_exists(tenant_id)
        rows = [self._rate_row(r, tenant_id) for r in rates]
        return await self.repo.upsert_rates(rows)

    async def import_rates_csv(self, text: str, tenant_id: str | None = None) -> int:
        """CSV with a header: kind,prefix,price_per_minute[,first_increment,increment,
        currency,description]. All rows or none."""
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"kind", "prefix", "price_per_minute"} <= set(
            reader.fieldnames
        ):
            raise InvalidInput("the CSV needs a header with kind,prefix,price_per_minute",
                               code="INVALID_CSV", field="csv")
        if tenant_id is not None:
            await self._tenant_exists(tenant_id)
        rows = []
        for line_no, r in enumerate(reader, start=2):
            cleaned = {k: v for k, v in r.items() if k and v not in (None, "")}
            rows.append(self._rate_row(cleaned, tenant_id, str(line_no)))
        if not rows:
            raise InvalidInput("the CSV holds no rates", code="INVALID_CSV", field="csv")
        return await self.repo.upsert_rates(rows)

    async def set_allotment(self, country: str, plan: str, minutes: int) -> None:
        check_country(country)
        if plan not in ("domestic", "international"):
            raise InvalidInput("plan must be domestic or international", code="INVALID_PLAN",
                               field="plan")
        check_int(minutes, "minutes", 0, 1_000_000)
        await self.repo.set_allotment(country, plan, minutes)

    # ---- wallet ----------------------------------------------------------------------

    async def topup(self, tenant_id: str, amount: Any, note: str = "manual top-up") -> Decimal:
        value = check_amount(amount)
        return await self.repo.topup(tenant_id, value, self.clock(), str(note)[:200])

    async def set_auto_recharge(self, tenant_id: str, *, enabled: bool, threshold: Any,
                                amount: Any, monthly_cap: int) -> None:
        if not isinstance(enabled, bool):
            raise InvalidInput("enabled must be true or false", code="INVALID_ENABLED",
                               field="enabled")
        await self.repo.set_auto_recharge(
            tenant_id, enabled, check_amount(threshold, "threshold", allow_zero=True),
            check_amount(amount, "amount", allow_zero=not enabled),
            check_int(monthly_cap, "monthly_cap", 0, 1000),
        )


def _as_int(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value
