"""One schema source for the admin API's bodies: the request models below and the read
views (``billing.views``) are plain frozen dataclasses, and from them come

- the request body checks (``check``): an object with known fields of the right JSON
  type, money as a decimal string, no text a database cannot store;
- the JSON Schemas of the OpenAPI document (``json_schema``), requests and responses;
- the checks of one entity in a provisioning file (``check`` with ``where=``).

The checks here refuse what can never be right in shape, with the stable codes
UNKNOWN_FIELD, MISSING_FIELD, INVALID_TYPE, INVALID_BODY, EMPTY_BODY, INVALID_AMOUNT and
INVALID_TEXT. Provisioning stays the judge of values (patterns, ranges, known
countries); the published constraints (``spec``) describe what it accepts, so that a
body that conforms to the document is never refused for its values.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import types
import typing
import uuid
import zoneinfo
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar, NewType

import phonenumbers
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from ..errors import InvalidInput
from . import views as v

#: A money amount in a request: a decimal string (an integer is accepted too).
Money = NewType("Money", str)

#: What can be money at all, whatever the field: ASCII digits, at most 6 decimals. No
#: sign, exponent, separators or other digits (Decimal() would take "1_000", "1E+2").
MONEY_GRAMMAR = re.compile(r"[0-9]+(\.[0-9]{1,6})?")
#: The published patterns: 0 to 999999.999999, and the same above zero.
MONEY_PATTERN = r"^(?:0|[1-9][0-9]{0,5})(?:\.[0-9]{1,6})?$"
POSITIVE_MONEY_PATTERN = (
    r"^(?:[1-9][0-9]{0,5}(?:\.[0-9]{1,6})?|0\.(?:[1-9][0-9]{0,5}|0[1-9][0-9]{0,4}"
    r"|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$")
#: A decimal in a response: amounts, ledger deltas (negative for charges), minutes.
DECIMAL_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
#: Text PostgreSQL can store: no NUL character.
TEXT_PATTERN = r"^[^\u0000]*$"

TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
ENDPOINT_PATTERN = r"^[A-Za-z0-9_.-]{1,80}$"
EXTENSION_PATTERN = r"^[0-9]{2,8}$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"
#: A day from 2000-01-01 to 9999-12-31 that exists (leap years included), so that a day
#: the pattern allows is never refused.
DATE_PATTERN = (
    r"^(?:[2-9][0-9]{3}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))"
    r"|(?:[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)"
    r"-02-29)$")
MONTH_PATTERN = r"^(?:20[0-9]{2}|2[1-9][0-9]{2}|[3-9][0-9]{3})-(?:0[1-9]|1[0-2])$"
SKUS = ["business_voice", "business_voice_calling_plan", "international_calling_plan"]
BLOCKABLE_CLASSES = ["domestic", "international", "premium_rate", "toll_free"]
RATE_KINDS = ["domestic_overage", "international", "toll_free_inbound"]
NUMBER_KINDS = ["service", "toll_free", "user"]
PLANS = ["domestic", "international"]


@functools.cache
def countries() -> list[str]:
    """The ISO 3166 codes Provisioning knows (those phonenumbers has metadata for)."""
    return sorted(phonenumbers.SUPPORTED_REGIONS)


@functools.cache
def timezones() -> list[str]:
    """The IANA timezones of this machine's tz database."""
    return sorted(zoneinfo.available_timezones())


@functools.cache
def e164_pattern() -> str:
    """E.164 numbers of a possible length for their country code (what Provisioning's
    ``is_possible_number`` check accepts), from the phonenumbers metadata. The national
    part starts with 1-9: a leading 0 is a national prefix, not part of the number."""
    parts = []
    for code, regions in sorted(COUNTRY_CODE_TO_REGION_CODE.items()):
        region = regions[0]
        meta = (phonenumbers.PhoneMetadata.metadata_for_nongeo_region(code)
                if region == "001" else phonenumbers.PhoneMetadata.metadata_for_region(region))
        if meta is None or meta.general_desc is None:
            continue
        desc = meta.general_desc
        lengths = sorted({n for n in (*(desc.possible_length or ()),
                                      *(desc.possible_length_local_only or ()))
                          if n > 1 and len(str(code)) + n <= 15})
        if lengths:
            rest = "|".join(f"[0-9]{{{n - 1}}}" for n in lengths)
            parts.append(f"{code}[1-9](?:{rest})")
    return r"^\+(?:" + "|".join(parts) + ")$"


def spec(default: Any = dataclasses.MISSING, **schema: Any) -> Any:
    """A model field with published JSON Schema constraints (``pattern``, ``enum``,
    ``minimum``...); with ``default`` the field is optional and the default is
    documented (the handler then passes nothing and Provisioning applies it)."""
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"schema": schema})
    if default is not OMITTED:
        schema = {"default": default, **schema}
    return dataclasses.field(default=OMITTED, metadata={"schema": schema})


class _Omitted:
    def __repr__(self) -> str:
        return "OMITTED"


#: The value of an optional request field the body did not give.
OMITTED: Any = _Omitted()


def optional(**schema: Any) -> Any:
    """An optional field without a documented default (a PATCH field)."""
    return spec(OMITTED, **schema)


# ---- request bodies ------------------------------------------------------------------------

TEXT = {"pattern": TEXT_PATTERN}


@dataclasses.dataclass(frozen=True)
class TenantCreate:
    id: str = spec(pattern=TENANT_ID_PATTERN)
    name: str = spec(minLength=1, maxLength=200, **TEXT)
    country: str = spec(enum="countries", description="ISO 3166-1 alpha-2")
    timezone: str = spec("UTC", enum="timezones", description="IANA timezone")
    currency: str = spec("USD", pattern=CURRENCY_PATTERN)
    blocked_classes: list[str] = spec(["premium_rate"],
                                      items={"enum": BLOCKABLE_CLASSES})


@dataclasses.dataclass(frozen=True)
class TenantPatch:
    AT_LEAST_ONE: ClassVar[bool] = True
    name: str = optional(minLength=1, maxLength=200, **TEXT)
    timezone: str = optional(enum="timezones")
    blocked_classes: list[str] = optional(items={"enum": BLOCKABLE_CLASSES})


@dataclasses.dataclass(frozen=True)
class SubscriptionPut:
    quantity: int = spec(minimum=0, maximum=1_000_000)


@dataclasses.dataclass(frozen=True)
class UserCreate:
    id: str = spec(pattern=USER_ID_PATTERN)
    sip_endpoint: str = spec(pattern=ENDPOINT_PATTERN)
    usage_location: str = spec(enum="countries")
    extension: str | None = spec(None, pattern=EXTENSION_PATTERN)
    display_name: str = spec("", maxLength=200, **TEXT)


@dataclasses.dataclass(frozen=True)
class UserPatch:
    AT_LEAST_ONE: ClassVar[bool] = True
    display_name: str = optional(maxLength=200, **TEXT)
    extension: str | None = optional(pattern=EXTENSION_PATTERN)
    usage_location: str = optional(enum="countries")


@dataclasses.dataclass(frozen=True)
class NumberCreate:
    # a user number rings its user; the others ring a target endpoint (or a user)
    RULES: ClassVar[dict[str, Any]] = {"allOf": [
        {"if": {"properties": {"kind": {"const": "user"}}},
         "then": {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}}},
        {"anyOf": [{"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
                   {"required": ["target"], "properties": {"target": {"type": "string"}}}]},
    ]}
    e164: str = spec(pattern="e164", examples=["+15145550100"])
    kind: str = spec(enum=NUMBER_KINDS)
    user_id: str | None = spec(None, pattern=USER_ID_PATTERN)
    target: str | None = spec(None, pattern=ENDPOINT_PATTERN)


@dataclasses.dataclass(frozen=True)
class RateInput:
    kind: str = spec(enum=RATE_KINDS)
    prefix: str = spec(pattern=r"^\+?[0-9]{0,15}$")
    price_per_minute: Money = spec(
        pattern=r"^(?:[0-9]{1,3}(?:\.[0-9]{1,6})?|1000(?:\.0{1,6})?)$",
        description="per minute, 0 to 1000, a decimal string", examples=["0.045"])
    first_increment: int = spec(60, minimum=1, maximum=3600)
    increment: int = spec(60, minimum=1, maximum=3600)
    currency: str = spec("USD", pattern=CURRENCY_PATTERN)
    description: str = spec("", maxLength=200, **TEXT)


@dataclasses.dataclass(frozen=True)
class AllotmentPut:
    minutes: int = spec(minimum=0, maximum=1_000_000)


@dataclasses.dataclass(frozen=True)
class Topup:
    amount: Money = spec(pattern=POSITIVE_MONEY_PATTERN, examples=["12.50"])
    note: str = spec("manual top-up", maxLength=200, **TEXT)


@dataclasses.dataclass(frozen=True)
class AutoRechargeSettings:
    # the amount may be 0 only while auto-recharge is off
    RULES: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"enabled": {"const": True}}},
        "then": {"properties": {"amount": {"pattern": POSITIVE_MONEY_PATTERN}}}}
    enabled: bool = spec()
    threshold: Money = spec(pattern=MONEY_PATTERN)
    amount: Money = spec(pattern=MONEY_PATTERN)
    monthly_cap: int = spec(minimum=0, maximum=1000)


# ---- response envelopes (the items are billing.views) -------------------------------------


@dataclasses.dataclass(frozen=True)
class Error:
    code: str
    message: str
    field: str | None


@dataclasses.dataclass(frozen=True)
class ErrorBody:
    error: Error


@dataclasses.dataclass(frozen=True)
class TenantList:
    tenants: list[v.TenantSummary]


@dataclasses.dataclass(frozen=True)
class Subscriptions:
    tenant_id: str
    subscriptions: list[v.Subscription]


@dataclasses.dataclass(frozen=True)
class UserList:
    tenant_id: str
    users: list[v.User]


@dataclasses.dataclass(frozen=True)
class NumberList:
    tenant_id: str
    numbers: list[v.PhoneNumber]


@dataclasses.dataclass(frozen=True)
class RateList:
    tenant_id: str | None
    rates: list[v.Rate]


@dataclasses.dataclass(frozen=True)
class RateCount:
    tenant_id: str | None
    count: int


@dataclasses.dataclass(frozen=True)
class AllotmentList:
    allotments: list[v.Allotment]


@dataclasses.dataclass(frozen=True)
class TopupResult:
    tenant_id: str
    amount: Decimal
    balance: Decimal


@dataclasses.dataclass(frozen=True)
class CallList:
    tenant_id: str
    month: str | None = spec(pattern=r"^[0-9]{4}-[0-9]{2}$")
    calls: list[v.Call] = spec()


# ---- checking a body -----------------------------------------------------------------------


def _hints(model: type) -> dict[str, Any]:
    return typing.get_type_hints(model)


def _name(tp: Any) -> str:
    if tp is str or tp is Money:
        return "string"
    if tp is int:
        return "integer"
    if tp is bool:
        return "boolean"
    if typing.get_origin(tp) is list:
        return "list of strings"
    return "value"


def _is_text(value: str) -> bool:
    """Storable text: no NUL, no lone surrogate (JSON's "\\ud800" parses to one)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(value: str, field: str) -> str:
    """Refuse a string PostgreSQL cannot store (NUL, lone surrogates): INVALID_TEXT."""
    if not _is_text(value):
        raise InvalidInput(f"{field} holds a NUL character or an unpaired surrogate",
                           code="INVALID_TEXT", field=field)
    return value


def _check_value(tp: Any, value: Any, field: str, key: str) -> None:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and types.NoneType in typing.get_args(tp):
            return
        tp = next(t for t in typing.get_args(tp) if t is not types.NoneType)
    if tp is Money:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise InvalidInput(f"{key} must be a JSON string", code="INVALID_TYPE",
                               field=field)
        if isinstance(value, str) and not MONEY_GRAMMAR.fullmatch(value):
            raise InvalidInput(f"{key} must be a decimal string like 12.50 (digits 0-9, at "
                               "most 6 decimals)", code="INVALID_AMOUNT", field=field)
        return  # floats reach Provisioning, which refuses them as INVALID_AMOUNT
    if typing.get_origin(tp) is list and typing.get_args(tp) == (int,):
        if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise InvalidInput(f"{key} must be a list of whole numbers", code="INVALID_TYPE",
                               field=field)
        return
    if typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise InvalidInput(f"{key} must be a list of strings", code="INVALID_TYPE",
                               field=field)
        for x in value:
            check_text(x, field)
        return
    ok = {str: lambda x: isinstance(x, str),
          int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          bool: lambda x: isinstance(x, bool)}[tp](value)
    if not ok:
        raise InvalidInput(f"{key} must be a JSON {_name(tp)}", code="INVALID_TYPE",
                           field=field)
    if isinstance(value, str):
        check_text(value, field)


def check(model: type, data: Any, *, where: str = "") -> dict[str, Any]:
    """Check ``data`` against a request model: a JSON object whose keys are the model's
    fields, each of its JSON type, the required ones present. Returns the fields given
    (absent optional ones stay absent, so Provisioning applies its defaults).

    ``where`` names the entity in error fields: ``check(TenantCreate, t,
    where="tenants[0]")`` reports ``tenants[0].country``. The provisioning-file engine
    calls it for each entity; the HTTP handlers for each body."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise InvalidInput(f"the body{' ' + where if where else ''} must be a JSON object",
                           code="INVALID_BODY", field=where or None)
    hints = _hints(model)
    fields = [f.name for f in dataclasses.fields(model)]
    for key, value in data.items():
        if key not in hints or key not in fields:
            raise InvalidInput(f"unknown field {key!r}; allowed: {', '.join(fields)}",
                               code="UNKNOWN_FIELD", field=prefix + key)
        _check_value(hints[key], value, prefix + key, key)
    for f in dataclasses.fields(model):
        if f.default is dataclasses.MISSING and f.name not in data:
            raise InvalidInput(f"{f.name} is required", code="MISSING_FIELD",
                               field=prefix + f.name)
    if getattr(model, "AT_LEAST_ONE", False) and not data:
        raise InvalidInput(f"give at least one of {', '.join(fields)}", code="EMPTY_BODY")
    return dict(data)


# ---- JSON Schema ---------------------------------------------------------------------------

_NAMED = {"countries": countries, "timezones": timezones}


def constraints(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Published constraints with the named ones filled in: ``enum="countries"`` and
    ``"timezones"`` become their lists, ``pattern="e164"`` the E.164 pattern."""
    out = dict(schema)
    if isinstance(out.get("enum"), str):
        out["enum"] = _NAMED[out["enum"]]()
    if out.get("pattern") == "e164":
        out["pattern"] = e164_pattern()
    return out


def _type_schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [t for t in typing.get_args(tp) if t is not types.NoneType]
        schema = _type_schema(inner[0], components)
        if "$ref" in schema:
            return {"anyOf": [schema, {"type": "null"}]}
        return {**schema, "type": [schema["type"], "null"]}
    if typing.get_origin(tp) is list:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0], components)}
    if typing.get_origin(tp) is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(tp):
        return ref(tp, components)
    simple = {str: {"type": "string"}, int: {"type": "integer"}, bool: {"type": "boolean"},
              Money: {"type": "string", "pattern": MONEY_PATTERN,
                      "description": "a decimal string; JSON numbers with a fraction are "
                                     "refused"},
              Decimal: {"type": "string", "pattern": DECIMAL_PATTERN,
                        "description": "a decimal string"},
              dt.datetime: {"type": "string", "format": "date-time"},
              dt.date: {"type": "string", "format": "date"},
              uuid.UUID: {"type": "string", "format": "uuid"}}
    return dict(simple[tp])


def json_schema(model: type, components: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a request model or a view; nested views go into
    ``components`` (by class name) and are referenced."""
    hints = _hints(model)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(model):
        prop = _type_schema(hints[f.name], components)
        extra = constraints(f.metadata.get("schema", {}))
        if "items" in extra and prop.get("type") == "array":
            extra["items"] = {**prop["items"], **extra["items"]}
        if "anyOf" in prop and extra:
            prop = {"anyOf": [{**prop["anyOf"][0], **extra}, prop["anyOf"][1]]}
        else:
            prop.update(extra)
        properties[f.name] = prop
        if f.default is dataclasses.MISSING:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": required, "additionalProperties": False}
    if getattr(model, "AT_LEAST_ONE", False):
        schema["minProperties"] = 1
    if getattr(model, "RULES", None):
        schema.update(model.RULES)
    if model.__doc__ and not model.__doc__.startswith(model.__name__ + "("):
        schema["description"] = " ".join(model.__doc__.split())
    return schema


def ref(model: type, components: dict[str, Any]) -> dict[str, str]:
    """A reference to ``model``'s schema, adding it to ``components`` when first seen."""
    name = model.__name__
    if name not in components:
        components[name] = {}  # placeholder: a view may refer to itself through a list
        components[name] = json_schema(model, components)
    return {"$ref": f"#/components/schemas/{name}"}


_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")


def parse_day(value: str, field: str) -> dt.date:
    """YYYY-MM-DD -> that day (a query's day filter)."""
    try:
        if not re.fullmatch(DATE_PATTERN, value):
            raise ValueError(value)
        return dt.date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"{field} must be a day like 2026-11-05", code="INVALID_DATE",
                           field=field) from exc


def parse_month(value: str | None) -> dt.date | None:
    """YYYY-MM -> the first day of that month; None when absent (the API and the CLI)."""
    if value is None or value == "":
        return None
    m = _MONTH.match(value)
    if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 2000:
        raise InvalidInput("month must look like 2026-11", code="INVALID_MONTH", field="month")
    return dt.date(int(m.group(1)), int(m.group(2)), 1)
