"""JSON in and out: one encoder (Decimal as strings, dates ISO, views as objects) and
request bodies read strictly: UTF-8 only, no NaN or Infinity, no duplicate keys, no
nesting deep enough to exhaust the parser. The shape of a body is checked against its
model by ``billing.schemas.check``.
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

from ..errors import GatewayError


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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # the standard parser keeps the last of duplicate keys: a silent overwrite
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


async def read_json(request: web.Request) -> Any:
    """The body parsed as JSON: UTF-8, NaN, Infinity and duplicate keys refused, all as
    INVALID_JSON. Numbers with a fraction become floats, which Provisioning refuses for
    money: amounts travel as strings."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson("the body is not UTF-8 (RFC 8259 JSON is)") from exc
    if not text.strip():
        raise InvalidJson("the request needs a JSON body")
    try:
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except RecursionError as exc:
        raise InvalidJson("the body is nested too deeply") from exc
    except ValueError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc
