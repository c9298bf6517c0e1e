"""The admin REST API under /api/v1: provisioning and reading, JSON in and out.

Handlers are thin: check the request body against its model (``billing.schemas``), call
Provisioning, which applies every rule before writing, and answer with a typed view
(``billing.views``). Money travels as decimal strings both ways. Every route needs the
admin bearer token (auth.require_admin). Each handler says what it takes and returns
with ``@operation``; ``openapi.py`` builds the OpenAPI document from that and ROUTES.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import functools
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import structlog
from aiohttp import web

from ..billing import alerts as a
from ..billing import reports as r
from ..billing import schemas as s
from ..billing import views as v
from ..errors import InvalidInput, Unavailable
from .auth import require_admin, require_api_read
from .bodies import json_response, read_json
from .keys import GATEWAY

log = structlog.get_logger("gateway.http")

PREFIX = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_CALLS = 1000


# ---- what each operation takes and returns (the OpenAPI document is built from it) ------


@dataclasses.dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    body: type | dict[str, Any] | None = None  # a request model, or media type -> schema
    ok: int = 200
    returns: type | None = None  # a view or envelope; None with 204
    query: tuple[str, ...] = ()  # names in QUERY
    #: the error statuses besides 401 and 503; 404 and 409 where they depend on state
    errors: tuple[int, ...] = (404, 422)
    #: a read: the read token is enough (the operator page's per-tenant view uses these)
    read: bool = False
    #: the media type of the answer (``returns`` None with text/csv: a CSV file)
    media: str = "application/json"


def operation(summary: str, tag: str, **kw: Any) -> Callable[[Handler], Handler]:
    """Attach the operation's description to its handler."""

    def mark(handler: Handler) -> Handler:
        handler.operation = Operation(summary, tag, **kw)  # type: ignore[attr-defined]
        return handler

    return mark


#: the path parameters of every route, with what a valid one looks like
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "tenant_id": {"type": "string", "pattern": s.TENANT_ID_PATTERN},
    "user_id": {"type": "string", "pattern": s.USER_ID_PATTERN},
    "sku": {"type": "string", "enum": s.SKUS},
    "e164": {"type": "string", "pattern": r"^\+[1-9][0-9]{1,14}$"},
    "country": {"type": "string", "enum": "countries"},
    "plan": {"type": "string", "enum": s.PLANS},
    "alert_id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "webhook_id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "delivery_id": {"type": "string", "format": "uuid"},
}
QUERY: dict[str, dict[str, Any]] = {
    "tenant_id": {"type": "string", "pattern": s.TENANT_ID_PATTERN,
                  "description": "a tenant's own rates, or its alerts, webhooks (with the "
                                 "global ones) or deliveries; absent: every tenant's"},
    "month": {"type": "string", "pattern": s.MONTH_PATTERN, "examples": ["2026-11"]},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_CALLS, "default": 100},
    # a query parameter whose name differs from its key here says so with "name"
    "alert_state": {"name": "state", "type": "string",
                    "pattern": "^(?:{0})(?:,(?:{0}))*$".format("|".join(a.STATES)),
                    "description": "comma-separated states; absent: any"},
    "delivery_state": {"name": "state", "type": "string",
                       "pattern": "^(?:{0})(?:,(?:{0}))*$".format("|".join(a.DELIVERY_STATES)),
                       "description": "comma-separated states; absent: any"},
    "webhook_id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "user_id": {"type": "string", "pattern": s.USER_ID_PATTERN,
                "description": "only this user's calls"},
    "direction": {"type": "string", "enum": ["inbound", "outbound"]},
    "decision": {"type": "string", "enum": ["ALLOW", "REJECT"]},
    "from": {"type": "string", "format": "date", "pattern": s.DATE_PATTERN,
             "description": "calls authorised on or after this day (tenant's timezone)"},
    "to": {"type": "string", "format": "date", "pattern": s.DATE_PATTERN,
           "description": "calls authorised on or before this day (tenant's timezone)"},
}


# ---- plumbing --------------------------------------------------------------------------


def _gateway(request: web.Request) -> Any:
    return request.app[GATEWAY]


def _admin(request: web.Request) -> Any:
    admin = _gateway(request).provisioning
    if admin is None:
        raise Unavailable("the gateway is not started", code="NOT_STARTED")
    return admin


def _views(request: web.Request) -> v.Views:
    views = _gateway(request).views
    if views is None:
        raise Unavailable("the gateway is not started", code="NOT_STARTED")
    return views


def _query_month(request: web.Request) -> dt.date | None:
    # given but empty is a mistake (a form left blank), not "the current month"
    if request.query.get("month") == "":
        raise InvalidInput("month must look like 2026-11", code="INVALID_MONTH", field="month")
    return s.parse_month(request.query.get("month"))


def _limit(value: str | None, default: int = 100) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= MAX_CALLS:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_CALLS}",
                           code="INVALID_LIMIT", field="limit")
    return int(value)


def _choice(request: web.Request, name: str) -> str | None:
    """An optional query value that must be one of QUERY[name]'s values."""
    value = request.query.get(name)
    if value is None:
        return None
    allowed = QUERY[name]["enum"]
    if value not in allowed:
        raise InvalidInput(f"{name} must be one of {', '.join(allowed)}",
                           code="INVALID_" + name.upper(), field=name)
    return value


def _day(request: web.Request, name: str) -> dt.date | None:
    value = request.query.get(name)
    if value is None:
        return None
    return s.parse_day(value, name)


def _tenant_query(request: web.Request) -> str | None:
    # absent means "every tenant's"; given but empty is a mistake
    if request.query.get("tenant_id") == "":
        raise InvalidInput("tenant_id must not be empty; leave it out for every tenant's "
                           "(rates, alerts, webhooks, deliveries)", code="INVALID_ID",
                           field="tenant_id")
    return request.query.get("tenant_id")


# ---- tenants ---------------------------------------------------------------------------


@operation("Create a tenant (and its empty wallet)", "tenants", body=s.TenantCreate, ok=201,
           returns=v.Tenant, errors=(409, 422))
async def create_tenant(request: web.Request) -> web.Response:
    body = s.check(s.TenantCreate, await read_json(request))
    await _admin(request).create_tenant(**body)
    return json_response(await _views(request).tenant(body["id"]), status=201,
                         headers={"Location": f"{PREFIX}/tenants/{body['id']}"})


@operation("List tenants", "tenants", returns=s.TenantList, errors=())
async def list_tenants(request: web.Request) -> web.Response:
    return json_response(s.TenantList(await _views(request).list_tenants()))


@operation("One tenant with its subscriptions", "tenants", returns=v.Tenant, errors=(404,))
async def get_tenant(request: web.Request) -> web.Response:
    return json_response(await _views(request).tenant(request.match_info["tenant_id"]))


@operation("Change name, timezone or blocked classes", "tenants", body=s.TenantPatch,
           returns=v.Tenant)
async def patch_tenant(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.TenantPatch, await read_json(request))
    await _admin(request).update_tenant(tenant_id, **body)
    return json_response(await _views(request).tenant(tenant_id))


async def _subscriptions(request: web.Request, tenant_id: str) -> s.Subscriptions:
    tenant = await _views(request).tenant(tenant_id)
    return s.Subscriptions(tenant_id=tenant.id, subscriptions=tenant.subscriptions)


@operation("Purchased and assigned licences per SKU", "tenants", returns=s.Subscriptions,
           errors=(404,))
async def list_subscriptions(request: web.Request) -> web.Response:
    return json_response(await _subscriptions(request, request.match_info["tenant_id"]))


@operation("Set the purchased quantity of a SKU", "tenants", body=s.SubscriptionPut,
           returns=s.Subscriptions, errors=(404, 409, 422))
async def put_subscription(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.SubscriptionPut, await read_json(request))
    await _admin(request).set_subscription(tenant_id, request.match_info["sku"],
                                           body["quantity"])
    return json_response(await _subscriptions(request, tenant_id))


# ---- users and licences -----------------------------------------------------------------


@operation("Create a user; the id of a deactivated user of the same tenant reactivates it "
           "with its history (licences and numbers are assigned again)", "users",
           body=s.UserCreate, ok=201, returns=v.User, errors=(404, 409, 422))
async def create_user(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.UserCreate, await read_json(request))
    await _admin(request).create_user(tenant_id=tenant_id, **body)
    return json_response(await _views(request).user(body["id"]), status=201,
                         headers={"Location": f"{PREFIX}/users/{body['id']}"})


@operation("List a tenant's users with their licences", "users", returns=s.UserList,
           errors=(404,), read=True)
async def list_users(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    return json_response(s.UserList(tenant_id, await _views(request).users(tenant_id)))


@operation("One user with licences", "users", returns=v.User, errors=(404,))
async def get_user(request: web.Request) -> web.Response:
    return json_response(await _views(request).user(request.match_info["user_id"]))


@operation("Change display name, extension or usage location", "users", body=s.UserPatch,
           returns=v.User, errors=(404, 409, 422))
async def patch_user(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    body = s.check(s.UserPatch, await read_json(request))
    await _admin(request).update_user(user_id, **body)
    return json_response(await _views(request).user(user_id))


@operation("Deactivate a user: its calls, ledger and counters stay, its licences return "
           "to the tenant, its numbers ring nobody; 409 USER_HAS_OPEN_CALLS while a call "
           "is open", "users", ok=204, errors=(404, 409))
async def delete_user(request: web.Request) -> web.Response:
    await _admin(request).deactivate_user(request.match_info["user_id"])
    return web.Response(status=204)


@operation("Assign a licence (never more than purchased)", "licences", returns=v.User,
           errors=(404, 409, 422))
async def assign_licence(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    await _admin(request).assign_licence(user_id, request.match_info["sku"])
    return json_response(await _views(request).user(user_id))


@operation("Unassign a licence", "licences", returns=v.User, errors=(404, 409, 422))
async def unassign_licence(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    await _admin(request).unassign_licence(user_id, request.match_info["sku"])
    return json_response(await _views(request).user(user_id))


# ---- numbers ----------------------------------------------------------------------------


@operation("Add a phone number", "numbers", body=s.NumberCreate, ok=201,
           returns=v.PhoneNumber, errors=(404, 409, 422))
async def add_number(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.NumberCreate, await read_json(request))
    await _admin(request).add_number(tenant_id=tenant_id, **body)
    numbers = await _views(request).numbers(tenant_id)
    return json_response(next(n for n in numbers if n.e164 == body["e164"]), status=201)


@operation("List a tenant's numbers", "numbers", returns=s.NumberList, errors=(404,))
async def list_numbers(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    return json_response(s.NumberList(tenant_id, await _views(request).numbers(tenant_id)))


@operation("Remove a phone number", "numbers", ok=204, errors=(404,))
async def delete_number(request: web.Request) -> web.Response:
    await _admin(request).delete_number(request.match_info["e164"])
    return web.Response(status=204)


# ---- rates and allotments -------------------------------------------------------------

RATE_SHEET = {"type": "array", "minItems": 1, "items": s.RateInput}
#: what the CSV import accepts, as a pattern (the header may name more columns; see the
#: summary): the fuzz run sends such sheets
CSV_SHEET = {"type": "string", "pattern": (
    r"^kind,prefix,price_per_minute\n(?:(?:international|domestic_overage|toll_free_inbound)"
    r",[0-9]{0,15},[0-9]{1,3}(?:\.[0-9]{1,6})?\n){1,20}$")}


@operation("Insert or replace rates, all or none", "rates",
           body={"application/json": RATE_SHEET}, returns=s.RateCount, query=("tenant_id",))
async def set_rates(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, list) or not body:
        raise InvalidInput("the body must be a non-empty JSON list of rates",
                           code="INVALID_BODY", field="rates")
    rates = [s.check(s.RateInput, r, where=f"rates[{i}]") for i, r in enumerate(body)]
    tenant_id = _tenant_query(request)
    count = await _admin(request).set_rates(rates, tenant_id)
    return json_response(s.RateCount(tenant_id, count))


@operation("Import rates from CSV (header: kind,prefix,price_per_minute"
           "[,first_increment,increment,currency,description]), all or none", "rates",
           body={"text/csv": CSV_SHEET}, returns=s.RateCount, query=("tenant_id",))
async def import_rates(request: web.Request) -> web.Response:
    if request.content_type not in ("text/csv", "text/plain"):
        raise InvalidInput("send the rates as text/csv", code="UNSUPPORTED_MEDIA_TYPE",
                           field="content-type")
    raw = await request.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput("the CSV must be UTF-8", code="INVALID_CSV", field="csv") from exc
    s.check_text(text, "csv")
    tenant_id = _tenant_query(request)
    try:
        count = await _admin(request).import_rates_csv(text, tenant_id)
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise InvalidInput(f"the CSV cannot be read: {exc}", code="INVALID_CSV",
                           field="csv") from exc
    return json_response(s.RateCount(tenant_id, count))


@operation("List rates", "rates", returns=s.RateList, query=("tenant_id",), errors=(404,))
async def list_rates(request: web.Request) -> web.Response:
    tenant_id = _tenant_query(request)
    return json_response(s.RateList(tenant_id, await _views(request).rates(tenant_id)))


@operation("Minutes per assigned licence per month, by country and plan", "allotments",
           returns=s.AllotmentList, errors=())
async def list_allotments(request: web.Request) -> web.Response:
    return json_response(s.AllotmentList(await _views(request).allotments()))


@operation("Set an allotment", "allotments", body=s.AllotmentPut, returns=v.Allotment,
           errors=(422,))
async def put_allotment(request: web.Request) -> web.Response:
    body = s.check(s.AllotmentPut, await read_json(request))
    country, plan = request.match_info["country"], request.match_info["plan"]
    await _admin(request).set_allotment(country, plan, body["minutes"])
    return json_response(v.Allotment(country, plan, body["minutes"]))


# ---- wallet, usage, calls -------------------------------------------------------------


@operation("Add Communications Credits by hand", "wallet", body=s.Topup, ok=201,
           returns=s.TopupResult)
async def topup(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.Topup, await read_json(request))
    balance = await _admin(request).topup(tenant_id, body["amount"],
                                          body.get("note", "manual top-up"))
    log.info("wallet_topup", tenant_id=tenant_id, amount=str(body["amount"]),
             balance=str(balance))
    return json_response(s.TopupResult(tenant_id, Decimal(str(body["amount"])), balance),
                         status=201)


@operation("Set auto-recharge", "wallet", body=s.AutoRechargeSettings, returns=v.WalletView)
async def put_auto_recharge(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    body = s.check(s.AutoRechargeSettings, await read_json(request))
    await _admin(request).set_auto_recharge(tenant_id, **body)
    return json_response(await _views(request).wallet(tenant_id))


@operation("Balance, reserved, available, auto-recharge and recent entries", "wallet",
           returns=v.WalletView, errors=(404,), read=True)
async def get_wallet(request: web.Request) -> web.Response:
    return json_response(await _views(request).wallet(request.match_info["tenant_id"]))


@operation("Pools, add-on minutes, wallet and call totals of a month", "usage",
           returns=v.Usage, query=("month",), read=True)
async def get_usage(request: web.Request) -> web.Response:
    month = _query_month(request)
    return json_response(await _views(request).usage(request.match_info["tenant_id"], month))


@operation("Calls, newest first; filtered by user, direction, decision and days (from and "
           "to, inclusive, in the tenant's timezone)", "usage", returns=s.CallList,
           query=("month", "limit", "user_id", "direction", "decision", "from", "to"),
           read=True)
async def list_calls(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    month = _query_month(request)
    limit = _limit(request.query.get("limit"))
    user_id = request.query.get("user_id")
    if user_id == "":
        raise InvalidInput("user_id must not be empty; leave it out for every user",
                           code="INVALID_ID", field="user_id")
    calls = await _views(request).calls(
        tenant_id, month, limit, user_id=user_id, direction=_choice(request, "direction"),
        decision=_choice(request, "decision"), first_day=_day(request, "from"),
        last_day=_day(request, "to"))
    return json_response(s.CallList(tenant_id, month.isoformat()[:7] if month else None,
                                    calls))


# ---- alerts and webhooks -----------------------------------------------------------------


def _alerts(request: web.Request) -> a.Alerts:
    alerts = _gateway(request).alerts
    if alerts is None:
        raise Unavailable("the gateway is not started", code="NOT_STARTED")
    return alerts


def _id(value: str | None, field: str) -> int:
    """A row id from the path or the query: a whole number from 1 to 2**63 - 1."""
    if value is None or not value.isascii() or not value.isdigit() \
            or not 1 <= int(value) < 2**63:
        raise InvalidInput(f"{field} must be a whole number from 1 to 2**63 - 1",
                           code="INVALID_ID", field=field)
    return int(value)


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidInput("delivery_id must be a UUID", code="INVALID_ID",
                           field="delivery_id") from exc


async def _known_tenant(request: web.Request, tenant_id: str | None) -> str | None:
    if tenant_id is not None:
        await _views(request).tenant(tenant_id)  # UNKNOWN_TENANT
    return tenant_id


@operation("Alerts of every tenant (or of tenant_id), newest first", "alerts",
           returns=a.AlertList, query=("tenant_id", "alert_state", "limit"), errors=(404,))
async def list_alerts(request: web.Request) -> web.Response:
    tenant_id = await _known_tenant(request, _tenant_query(request))
    alerts = await _alerts(request).list(tenant_id, request.query.get("state"),
                                         _limit(request.query.get("limit")))
    return json_response(a.AlertList(tenant_id, alerts))


@operation("A tenant's alerts, newest first", "alerts", returns=a.AlertList,
           query=("alert_state", "limit"), errors=(404,), read=True)
async def list_tenant_alerts(request: web.Request) -> web.Response:
    tenant_id = await _known_tenant(request, request.match_info["tenant_id"])
    alerts = await _alerts(request).list(tenant_id, request.query.get("state"),
                                         _limit(request.query.get("limit")))
    return json_response(a.AlertList(tenant_id, alerts))


@operation("One alert", "alerts", returns=a.Alert, errors=(404,))
async def get_alert(request: web.Request) -> web.Response:
    return json_response(await _alerts(request).get(
        _id(request.match_info["alert_id"], "alert_id")))


@operation("Acknowledge an alert (seen; it stays listed until cleared)", "alerts",
           body=a.AlertAction, returns=a.Alert, errors=(404,))
async def acknowledge_alert(request: web.Request) -> web.Response:
    alert_id = _id(request.match_info["alert_id"], "alert_id")
    body = s.check(a.AlertAction, await read_json(request))
    alert = await _alerts(request).acknowledge(alert_id, "api", body.get("note", ""))
    log.info("alert_acknowledged", alert_id=alert_id, tenant_id=alert.tenant_id)
    return json_response(alert)


@operation("Clear an alert (resolved); an international-spend alert that blocked "
           "international calls lifts the block", "alerts", body=a.AlertAction,
           returns=a.Alert, errors=(404,))
async def clear_alert(request: web.Request) -> web.Response:
    alert_id = _id(request.match_info["alert_id"], "alert_id")
    body = s.check(a.AlertAction, await read_json(request))
    alert = await _alerts(request).clear(alert_id, "api", body.get("note", ""))
    log.info("alert_cleared", alert_id=alert_id, tenant_id=alert.tenant_id,
             unblocked=alert.blocked)
    return json_response(alert)


@operation("A tenant's alert lines", "alerts", returns=a.AlertSettings, errors=(404,))
async def get_alert_settings(request: web.Request) -> web.Response:
    return json_response(await _alerts(request).settings(request.match_info["tenant_id"]))


@operation("Change a tenant's alert lines (null switches one off)", "alerts",
           body=a.AlertSettingsPatch, returns=a.AlertSettings)
async def patch_alert_settings(request: web.Request) -> web.Response:
    body = s.check(a.AlertSettingsPatch, await read_json(request))
    return json_response(await _alerts(request).set_settings(
        request.match_info["tenant_id"], **body))


@operation("Subscribe a URL to alerts (of one tenant, or of every tenant)", "webhooks",
           body=a.WebhookCreate, ok=201, returns=a.WebhookCreated, errors=(404, 422))
async def create_webhook(request: web.Request) -> web.Response:
    body = s.check(a.WebhookCreate, await read_json(request))
    hook = await _alerts(request).create_webhook(**body)
    return json_response(hook, status=201,
                         headers={"Location": f"{PREFIX}/webhooks/{hook.id}"})


@operation("Webhook subscriptions (secrets never shown): every one, or those that get "
           "tenant_id's events", "webhooks", returns=a.WebhookList, query=("tenant_id",),
           errors=(404,))
async def list_webhooks(request: web.Request) -> web.Response:
    tenant_id = await _known_tenant(request, _tenant_query(request))
    return json_response(a.WebhookList(tenant_id, await _alerts(request).webhooks(tenant_id)))


@operation("One webhook subscription (without its secret)", "webhooks", returns=a.Webhook,
           errors=(404,))
async def get_webhook(request: web.Request) -> web.Response:
    return json_response(await _alerts(request).webhook(
        _id(request.match_info["webhook_id"], "webhook_id")))


@operation("Change a subscription's URL, events, secret, description or enabled",
           "webhooks", body=a.WebhookPatch, returns=a.Webhook)
async def patch_webhook(request: web.Request) -> web.Response:
    webhook_id = _id(request.match_info["webhook_id"], "webhook_id")
    body = s.check(a.WebhookPatch, await read_json(request))
    return json_response(await _alerts(request).update_webhook(webhook_id, **body))


@operation("Remove a subscription, its deliveries and their log", "webhooks", ok=204,
           errors=(404,))
async def delete_webhook(request: web.Request) -> web.Response:
    await _alerts(request).delete_webhook(_id(request.match_info["webhook_id"], "webhook_id"))
    return web.Response(status=204)


@operation("Webhook deliveries, newest first", "webhooks", returns=a.DeliveryList,
           query=("webhook_id", "tenant_id", "delivery_state", "limit"), errors=(404,),
           read=True)
async def list_deliveries(request: web.Request) -> web.Response:
    webhook = request.query.get("webhook_id")
    deliveries = await _alerts(request).deliveries(
        webhook_id=None if webhook is None else _id(webhook, "webhook_id"),
        tenant_id=await _known_tenant(request, _tenant_query(request)),
        state=request.query.get("state"), limit=_limit(request.query.get("limit")))
    return json_response(a.DeliveryList(deliveries))


@operation("One delivery with its body as sent and its attempts", "webhooks",
           returns=a.DeliveryDetail, errors=(404,))
async def get_delivery(request: web.Request) -> web.Response:
    return json_response(await _alerts(request).delivery(
        _uuid(request.match_info["delivery_id"])))


@operation("Send a dead delivery again (its attempts start afresh)", "webhooks",
           returns=a.DeliveryDetail, errors=(404,))
async def retry_delivery(request: web.Request) -> web.Response:
    return json_response(await _alerts(request).retry_delivery(
        _uuid(request.match_info["delivery_id"])))


# ---- forecast and month export --------------------------------------------------------


@operation("When each pool, add-on and the wallet runs out at the recent burn rate (by "
           "hour of week over the last four weeks; see docs/billing.md, Forecast)",
           "reports", returns=r.Forecast, errors=(404,), read=True)
async def get_forecast(request: web.Request) -> web.Response:
    return json_response(await _views(request).forecast(request.match_info["tenant_id"]))


@operation("A month's calls with their rated cost and funding, and totals per user, pool, "
           "add-on and for the wallet", "reports", returns=r.MonthExport, query=("month",),
           read=True)
async def get_export(request: web.Request) -> web.Response:
    month = _query_month(request)
    return json_response(await _views(request).month_export(
        request.match_info["tenant_id"], month))


@operation("The same month export as one CSV file: a row per call (record 'call'), then "
           "per user, pool, add-on and the wallet", "reports", query=("month",), read=True,
           media="text/csv")
async def get_export_csv(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    export = await _views(request).month_export(tenant_id, _query_month(request))
    name = f"{tenant_id}-{export.month.isoformat()[:7]}.csv"
    return web.Response(text=r.export_csv(export), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


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
    ("GET", "/alerts", list_alerts),
    ("GET", "/tenants/{tenant_id}/alerts", list_tenant_alerts),
    ("GET", "/alerts/{alert_id}", get_alert),
    ("POST", "/alerts/{alert_id}/acknowledge", acknowledge_alert),
    ("POST", "/alerts/{alert_id}/clear", clear_alert),
    ("GET", "/tenants/{tenant_id}/alert-settings", get_alert_settings),
    ("PATCH", "/tenants/{tenant_id}/alert-settings", patch_alert_settings),
    ("POST", "/webhooks", create_webhook),
    ("GET", "/webhooks", list_webhooks),
    ("GET", "/webhooks/{webhook_id}", get_webhook),
    ("PATCH", "/webhooks/{webhook_id}", patch_webhook),
    ("DELETE", "/webhooks/{webhook_id}", delete_webhook),
    ("GET", "/webhook-deliveries", list_deliveries),
    ("GET", "/webhook-deliveries/{delivery_id}", get_delivery),
    ("POST", "/webhook-deliveries/{delivery_id}/retry", retry_delivery),
    ("GET", "/tenants/{tenant_id}/forecast", get_forecast),
    ("GET", "/tenants/{tenant_id}/export", get_export),
    ("GET", "/tenants/{tenant_id}/export.csv", get_export_csv),
]


def _admin_only(handler: Handler) -> Handler:
    read = handler.operation.read  # type: ignore[attr-defined]

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        config = request.app[GATEWAY].config
        if read:
            require_api_read(request, config.read_token, config.admin_token)
        else:
            require_admin(request, config.admin_token)
        # ids and query values go into SQL: a NUL or a lone surrogate is never one
        for name, value in (*request.match_info.items(), *request.query.items()):
            s.check_text(value, name)
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
