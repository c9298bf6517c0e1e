"""The admin REST API under /api/v1: provisioning and reading, JSON in and out.

Handlers are thin: check the request's shape (bodies.shape), call Provisioning, which applies
every rule before writing, and render what was written. Money travels as decimal
strings both ways. Every route needs the admin bearer token (auth.require_admin);
``openapi.py`` describes each of them.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from ..errors import InvalidInput, Unavailable
from .auth import require_admin
from .bodies import (
    ARRAY,
    BOOLEAN,
    INTEGER,
    MONEY,
    NULLABLE_STRING,
    STRING,
    json_response,
    read_json,
    shape,
    string_list,
)
from .keys import GATEWAY

log = structlog.get_logger("gateway.http")

PREFIX = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")
MAX_CALLS = 1000


# ---- plumbing --------------------------------------------------------------------------


def _gateway(request: web.Request) -> Any:
    return request.app[GATEWAY]


def _admin(request: web.Request) -> Any:
    admin = _gateway(request).provisioning
    if admin is None:
        raise Unavailable("the gateway is not started", code="NOT_STARTED")
    return admin


def _repo(request: web.Request) -> Any:
    return _admin(request).repo


def parse_month(value: str | None) -> dt.date | None:
    """YYYY-MM -> the first day of that month; None when absent."""
    if value is None or value == "":
        return None
    m = _MONTH.match(value)
    if not m or not 1 <= int(m.group(2)) <= 12 or int(m.group(1)) < 2000:
        raise InvalidInput("month must look like 2026-11", code="INVALID_MONTH", field="month")
    return dt.date(int(m.group(1)), int(m.group(2)), 1)


def _limit(value: str | None, default: int = 100) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= MAX_CALLS:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_CALLS}",
                           code="INVALID_LIMIT", field="limit")
    return int(value)


def _tenant_query(request: web.Request) -> str | None:
    return request.query.get("tenant_id") or None


# ---- tenants ---------------------------------------------------------------------------

TENANT_FIELDS = {"id": STRING, "name": STRING, "country": STRING, "timezone": STRING,
                 "currency": STRING, "blocked_classes": ARRAY}
TENANT_PATCH_FIELDS = {"name": STRING, "timezone": STRING, "blocked_classes": ARRAY}


async def _tenant_view(request: web.Request, tenant_id: str) -> dict[str, Any]:
    tenant = await _admin(request).get_tenant(tenant_id)
    subs = await _repo(request).subscriptions(tenant_id)
    return {**tenant, "subscriptions": [dict(s) for s in subs]}


async def create_tenant(request: web.Request) -> web.Response:
    body = shape(await read_json(request), TENANT_FIELDS, required=("id", "name", "country"))
    if "blocked_classes" in body:
        string_list(body["blocked_classes"], "blocked_classes")
    await _admin(request).create_tenant(**body)
    return json_response(await _tenant_view(request, body["id"]), status=201,
                         headers={"Location": f"{PREFIX}/tenants/{body['id']}"})


async def list_tenants(request: web.Request) -> web.Response:
    rows = await _repo(request).list_tenants()
    return json_response({"tenants": [dict(r) for r in rows]})


async def get_tenant(request: web.Request) -> web.Response:
    return json_response(await _tenant_view(request, request.match_info["tenant_id"]))


async def patch_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), TENANT_PATCH_FIELDS, at_least_one=True)
    if "blocked_classes" in body:
        string_list(body["blocked_classes"], "blocked_classes")
    await _admin(request).update_tenant(tenant_id, **body)
    return json_response(await _tenant_view(request, tenant_id))


async def list_subscriptions(request: web.Request) -> web.Response:
    view = await _tenant_view(request, request.match_info["tenant_id"])
    return json_response({"tenant_id": view["id"], "subscriptions": view["subscriptions"]})


async def put_subscription(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), {"quantity": INTEGER}, required=("quantity",))
    await _admin(request).set_subscription(tenant_id, request.match_info["sku"],
                                           body["quantity"])
    view = await _tenant_view(request, tenant_id)
    return json_response({"tenant_id": tenant_id, "subscriptions": view["subscriptions"]})


# ---- users and licences -----------------------------------------------------------------

USER_FIELDS = {"id": STRING, "sip_endpoint": STRING, "usage_location": STRING,
               "extension": NULLABLE_STRING, "display_name": STRING}
USER_PATCH_FIELDS = {"display_name": STRING, "extension": NULLABLE_STRING,
                     "usage_location": STRING}


async def create_user(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), USER_FIELDS,
                 required=("id", "sip_endpoint", "usage_location"))
    admin = _admin(request)
    await admin.create_user(tenant_id=tenant_id, **body)
    return json_response(await admin.get_user(body["id"]), status=201,
                         headers={"Location": f"{PREFIX}/users/{body['id']}"})


async def list_users(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    await _admin(request).get_tenant(tenant_id)
    rows = await _repo(request).list_users(tenant_id)
    return json_response({"tenant_id": tenant_id, "users": [dict(r) for r in rows]})


async def get_user(request: web.Request) -> web.Response:
    return json_response(await _admin(request).get_user(request.match_info["user_id"]))


async def patch_user(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    body = shape(await read_json(request), USER_PATCH_FIELDS, at_least_one=True)
    admin = _admin(request)
    await admin.update_user(user_id, **body)
    return json_response(await admin.get_user(user_id))


async def delete_user(request: web.Request) -> web.Response:
    await _admin(request).delete_user(request.match_info["user_id"])
    return web.Response(status=204)


async def assign_licence(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    admin = _admin(request)
    await admin.assign_licence(user_id, request.match_info["sku"])
    return json_response(await admin.get_user(user_id))


async def unassign_licence(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    admin = _admin(request)
    await admin.unassign_licence(user_id, request.match_info["sku"])
    return json_response(await admin.get_user(user_id))


# ---- numbers ----------------------------------------------------------------------------

NUMBER_FIELDS = {"e164": STRING, "kind": STRING, "user_id": NULLABLE_STRING,
                 "target": NULLABLE_STRING}


async def add_number(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), NUMBER_FIELDS, required=("e164", "kind"))
    await _admin(request).add_number(tenant_id=tenant_id, **body)
    rows = await _repo(request).list_numbers(tenant_id)
    row = next(dict(r) for r in rows if r["e164"] == body["e164"])
    return json_response(row, status=201)


async def list_numbers(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    await _admin(request).get_tenant(tenant_id)
    rows = await _repo(request).list_numbers(tenant_id)
    return json_response({"tenant_id": tenant_id, "numbers": [dict(r) for r in rows]})


async def delete_number(request: web.Request) -> web.Response:
    await _admin(request).delete_number(request.match_info["e164"])
    return web.Response(status=204)


# ---- rates and allotments -------------------------------------------------------------

RATE_FIELDS = {"kind": STRING, "prefix": STRING, "price_per_minute": MONEY,
               "first_increment": INTEGER, "increment": INTEGER, "currency": STRING,
               "description": STRING}


async def set_rates(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, list) or not body:
        raise InvalidInput("the body must be a non-empty JSON list of rates",
                           code="INVALID_BODY", field="rates")
    rates = [shape(r, RATE_FIELDS, required=("kind", "prefix", "price_per_minute"),
                   where=f"rates[{i}]") for i, r in enumerate(body)]
    tenant_id = _tenant_query(request)
    count = await _admin(request).set_rates(rates, tenant_id)
    return json_response({"tenant_id": tenant_id, "count": count})


async def import_rates(request: web.Request) -> web.Response:
    if request.content_type not in ("text/csv", "text/plain"):
        raise InvalidInput("send the rates as text/csv", code="UNSUPPORTED_MEDIA_TYPE",
                           field="content-type")
    raw = await request.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput("the CSV must be UTF-8", code="INVALID_CSV", field="csv") from exc
    tenant_id = _tenant_query(request)
    count = await _admin(request).import_rates_csv(text, tenant_id)
    return json_response({"tenant_id": tenant_id, "count": count})


async def list_rates(request: web.Request) -> web.Response:
    tenant_id = _tenant_query(request)
    if tenant_id is not None:
        await _admin(request).get_tenant(tenant_id)
    rows = await _repo(request).list_rates(tenant_id)
    return json_response({"tenant_id": tenant_id, "rates": [dict(r) for r in rows]})


async def list_allotments(request: web.Request) -> web.Response:
    rows = await _repo(request).allotments()
    return json_response({"allotments": [dict(r) for r in rows]})


async def put_allotment(request: web.Request) -> web.Response:
    body = shape(await read_json(request), {"minutes": INTEGER}, required=("minutes",))
    country, plan = request.match_info["country"], request.match_info["plan"]
    await _admin(request).set_allotment(country, plan, body["minutes"])
    return json_response({"country": country, "plan": plan, "minutes": body["minutes"]})


# ---- wallet, usage, calls -------------------------------------------------------------

AUTO_RECHARGE_FIELDS = {"enabled": BOOLEAN, "threshold": MONEY, "amount": MONEY,
                        "monthly_cap": INTEGER}


async def _wallet_view(request: web.Request, tenant_id: str) -> dict[str, Any]:
    usage = await _admin(request).usage(tenant_id)
    entries = [dict(r) for r in await _repo(request).ledger(tenant_id, 200)
               if r["account"] == "wallet" and r["entry"] in ("topup", "recharge", "charge")]
    return {"tenant_id": tenant_id, "currency": usage["currency"], "month": usage["month"],
            **usage["wallet"], "recent_entries": entries[:20]}


async def topup(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), {"amount": MONEY, "note": STRING},
                 required=("amount",))
    balance = await _admin(request).topup(tenant_id, body["amount"], body.get("note", "manual top-up"))
    log.info("wallet_topup", tenant_id=tenant_id, amount=str(body["amount"]),
             balance=str(balance))
    return json_response({"tenant_id": tenant_id, "amount": str(body["amount"]),
                          "balance": balance}, status=201)


async def put_auto_recharge(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = shape(await read_json(request), AUTO_RECHARGE_FIELDS,
                 required=tuple(AUTO_RECHARGE_FIELDS))
    await _admin(request).set_auto_recharge(tenant_id, **body)
    return json_response(await _wallet_view(request, tenant_id))


async def get_wallet(request: web.Request) -> web.Response:
    return json_response(await _wallet_view(request, request.match_info["tenant_id"]))


async def get_usage(request: web.Request) -> web.Response:
    month = parse_month(request.query.get("month"))
    return json_response(await _admin(request).usage(request.match_info["tenant_id"], month))


async def list_calls(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    month = parse_month(request.query.get("month"))
    limit = _limit(request.query.get("limit"))
    await _admin(request).get_tenant(tenant_id)
    rows = await _repo(request).list_calls(tenant_id, month, limit)
    return json_response({"tenant_id": tenant_id, "month": month.isoformat()[:7]
                          if month else None, "calls": [dict(r) for r in rows]})


# ---- registration ---------------------------------------------------------------------

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/tenants", create_tenant),
    ("GET", "/tenants", list_tenants),
    ("GET", "/tenants/{tenant_id}", get_tenant),
    ("PATCH", "/tenants/{tenant_id}", patch_tenant),
    ("GET", "/tenants/{tenant_id}/subscriptions", list_subscriptions),
    ("PUT", "/tenants/{tenant_id}/subscriptions/{sku}", put_subscription),
    ("POST", "/tenants/{tenant_id}/users", create_user),
    ("GET", "/tenants/{tenant_id}/users", list_users),
    ("GET", "/users/{user_id}", get_user),
    ("PATCH", "/users/{user_id}", patch_user),
    ("DELETE", "/users/{user_id}", delete_user),
    ("PUT", "/users/{user_id}/licences/{sku}", assign_licence),
    ("DELETE", "/users/{user_id}/licences/{sku}", unassign_licence),
    ("POST", "/tenants/{tenant_id}/numbers", add_number),
    ("GET", "/tenants/{tenant_id}/numbers", list_numbers),
    ("DELETE", "/numbers/{e164}", delete_number),
    ("POST", "/rates", set_rates),
    ("POST", "/rates/import", import_rates),
    ("GET", "/rates", list_rates),
    ("GET", "/allotments", list_allotments),
    ("PUT", "/allotments/{country}/{plan}", put_allotment),
    ("POST", "/tenants/{tenant_id}/wallet/topups", topup),
    ("PUT", "/tenants/{tenant_id}/wallet/auto-recharge", put_auto_recharge),
    ("GET", "/tenants/{tenant_id}/wallet", get_wallet),
    ("GET", "/tenants/{tenant_id}/usage", get_usage),
    ("GET", "/tenants/{tenant_id}/calls", list_calls),
]


def _admin_only(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        require_admin(request, request.app[GATEWAY].config.admin_token)
        return await handler(request)

    return guarded


async def openapi_document(request: web.Request) -> web.Response:
    from .openapi import document

    return json_response(document())


def add_routes(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, _admin_only(handler))
    # the description of the API is no secret: readable without a token
    app.router.add_get(PREFIX + "/openapi.json", openapi_document)
