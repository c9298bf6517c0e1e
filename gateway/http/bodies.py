"""JSON in and out: one encoder (Decimal as strings, dates ISO), request bodies read
strictly, and the shape of a body checked before anything reaches Provisioning.

Provisioning applies the rules (patterns, ranges, money); this module only makes sure that a
body is an object with known fields of the right JSON type, so that a typo never
passes silently and a wrong type never turns into a 500.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

from ..errors import GatewayError, InvalidInput


class InvalidJson(GatewayError):
    status = 400
    code = "INVALID_JSON"


def _default(value: Any) -> Any:
    # Money never becomes a float on the way out.
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Mapping):  # asyncpg.Record is a Mapping-like with keys()
        return dict(value)
    if hasattr(value, "keys") and hasattr(value, "items"):
        return dict(value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False)


def json_response(value: Any, status: int = 200, **kwargs: Any) -> web.Response:
    return web.json_response(value, status=status, dumps=dumps, **kwargs)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    """The body parsed as JSON; NaN and Infinity refused. Numbers with a fraction become
    floats, which Provisioning refuses for money: amounts travel as strings."""
    text = await request.text()
    if not text.strip():
        raise InvalidJson("the request needs a JSON body")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc


# JSON types, named the way the error messages and the OpenAPI document name them.
STRING, INTEGER, BOOLEAN, ARRAY, OBJECT = "string", "integer", "boolean", "array", "object"
MONEY = "money"  # a decimal string (an integer is accepted too; Provisioning refuses floats)
NULLABLE_STRING = "string|null"


def _is(kind: str, value: Any) -> bool:
    if kind == STRING:
        return isinstance(value, str)
    if kind == NULLABLE_STRING:
        return value is None or isinstance(value, str)
    if kind == INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == BOOLEAN:
        return isinstance(value, bool)
    if kind == ARRAY:
        return isinstance(value, list)
    if kind == OBJECT:
        return isinstance(value, dict)
    if kind == MONEY:
        # floats pass here on purpose: Provisioning.check_amount refuses them with its own code
        return not isinstance(value, bool) and isinstance(value, str | int | float)
    raise AssertionError(kind)


def shape(body: Any, fields: Mapping[str, str], *, required: tuple[str, ...] = (),
          at_least_one: bool = False, where: str = "") -> dict[str, Any]:
    """Check that ``body`` is an object whose keys are among ``fields`` (name -> JSON
    type) and that ``required`` ones are present. Returns the body as a dict."""
    prefix = f"{where}." if where else ""
    if not isinstance(body, dict):
        raise InvalidInput(f"the body{' ' + where if where else ''} must be a JSON object",
                           code="INVALID_BODY", field=where or None)
    for key, value in body.items():
        kind = fields.get(key)
        if kind is None:
            raise InvalidInput(f"unknown field {key!r}; allowed: {', '.join(fields)}",
                               code="UNKNOWN_FIELD", field=prefix + key)
        if not _is(kind, value):
            raise InvalidInput(f"{key} must be a JSON {kind.replace('money', 'string')}",
                               code="INVALID_TYPE", field=prefix + key)
    for key in required:
        if key not in body:
            raise InvalidInput(f"{key} is required", code="MISSING_FIELD", field=prefix + key)
    if at_least_one and not body:
        raise InvalidInput(f"give at least one of {', '.join(fields)}", code="EMPTY_BODY")
    return body


def string_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{field} must be a list of strings", code="INVALID_TYPE",
                           field=field)
    return value
