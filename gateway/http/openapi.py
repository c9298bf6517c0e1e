"""The OpenAPI 3.1 description of the admin API, written by hand.

Kept in sync with ``api.ROUTES`` by a test that checks every registered route appears
here with its method. Schemas say what Provisioning accepts; Provisioning stays the judge.
"""

from __future__ import annotations

import re
from typing import Any

from .. import __doc__ as _package_doc

_PARAM = re.compile(r"{([^}]+)}")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (),
         closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
NULL_STR = {"type": ["string", "null"]}
MONEY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,6})?$",
         "description": "a decimal string; JSON numbers with a fraction are refused",
         "examples": ["12.50"]}
MONTH = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}$", "examples": ["2026-11"]}
SKU = {"type": "string", "enum": ["business_voice_calling_plan", "business_voice",
                                  "international_calling_plan"]}
TIMESTAMP = {"type": "string", "format": "date-time"}
MINUTES = {"type": "string", "description": "minutes to the hundredth, as a decimal string"}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _obj({"code": STR, "message": STR, "field": NULL_STR},
                                 ("code", "message", "field"))}, ("error",)),
    "Subscription": _obj({"sku": SKU, "quantity": INT, "assigned": INT}, closed=False),
    "Tenant": _obj({
        "id": STR, "name": STR, "country": STR, "timezone": STR, "currency": STR,
        "blocked_classes": {"type": "array", "items": STR}, "created_at": TIMESTAMP,
        "subscriptions": {"type": "array", "items": _ref("Subscription")},
    }, closed=False),
    "TenantCreate": _obj({
        "id": {**STR, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "name": STR, "country": {**STR, "description": "ISO 3166-1 alpha-2"},
        "timezone": {**STR, "default": "UTC"}, "currency": {**STR, "default": "USD"},
        "blocked_classes": {"type": "array", "items": {"enum": [
            "premium_rate", "international", "domestic", "toll_free"]},
            "default": ["premium_rate"]},
    }, ("id", "name", "country")),
    "TenantPatch": _obj({"name": STR, "timezone": STR,
                         "blocked_classes": {"type": "array", "items": STR}}),
    "SubscriptionPut": _obj({"quantity": {**INT, "minimum": 0}}, ("quantity",)),
    "Subscriptions": _obj({"tenant_id": STR, "subscriptions": {
        "type": "array", "items": _ref("Subscription")}}, closed=False),
    "User": _obj({"id": STR, "tenant_id": STR, "display_name": STR, "sip_endpoint": STR,
                  "extension": NULL_STR, "usage_location": STR,
                  "licences": {"type": "array", "items": SKU}}, closed=False),
    "UserCreate": _obj({"id": STR, "sip_endpoint": STR, "usage_location": STR,
                        "extension": NULL_STR, "display_name": STR},
                       ("id", "sip_endpoint", "usage_location")),
    "UserPatch": _obj({"display_name": STR, "extension": NULL_STR, "usage_location": STR}),
    "Number": _obj({"e164": STR, "tenant_id": STR,
                    "kind": {"enum": ["user", "toll_free", "service"]},
                    "user_id": NULL_STR, "target": NULL_STR}, closed=False),
    "NumberCreate": _obj({"e164": {**STR, "examples": ["+15145550100"]},
                          "kind": {"enum": ["user", "toll_free", "service"]},
                          "user_id": NULL_STR, "target": NULL_STR}, ("e164", "kind")),
    "RateInput": _obj({
        "kind": {"enum": ["international", "domestic_overage", "toll_free_inbound"]},
        "prefix": {**STR, "pattern": "^[0-9]{0,15}$"}, "price_per_minute": MONEY,
        "first_increment": {**INT, "default": 60}, "increment": {**INT, "default": 60},
        "currency": {**STR, "default": "USD"}, "description": STR,
    }, ("kind", "prefix", "price_per_minute")),
    "Rate": _obj({"id": INT, "tenant_id": NULL_STR, "currency": STR, "kind": STR,
                  "prefix": STR, "price_per_minute": MONEY, "first_increment": INT,
                  "increment": INT, "description": STR}, closed=False),
    "RateCount": _obj({"tenant_id": NULL_STR, "count": INT}, closed=False),
    "Allotment": _obj({"country": STR, "plan": {"enum": ["domestic", "international"]},
                       "minutes": INT}, closed=False),
    "AllotmentPut": _obj({"minutes": {**INT, "minimum": 0}}, ("minutes",)),
    "Topup": _obj({"amount": MONEY, "note": STR}, ("amount",)),
    "TopupResult": _obj({"tenant_id": STR, "amount": MONEY, "balance": MONEY}, closed=False),
    "AutoRecharge": _obj({"enabled": BOOL, "threshold": MONEY, "amount": MONEY,
                          "monthly_cap": {**INT, "minimum": 0, "maximum": 1000}},
                         ("enabled", "threshold", "amount", "monthly_cap")),
    "Wallet": _obj({"balance": MONEY, "reserved": MONEY, "available": MONEY,
                    "auto_recharge": _obj({
                        "enabled": BOOL, "threshold": MONEY, "amount": MONEY,
                        "monthly_cap": INT, "recharges_this_month": INT}, closed=False)},
                   closed=False),
    "WalletView": {"allOf": [_ref("Wallet"), _obj({
        "tenant_id": STR, "currency": STR, "month": STR,
        "recent_entries": {"type": "array", "items": {"type": "object"}}}, closed=False)]},
    "Pool": _obj({"country": STR, "capacity_minutes": MINUTES, "used_minutes": MINUTES,
                  "reserved_minutes": MINUTES, "remaining_minutes": MINUTES,
                  "capacity_seconds": INT, "used_seconds": INT, "reserved_seconds": INT},
                 closed=False),
    "Usage": _obj({
        "tenant_id": STR, "month": {**STR, "format": "date"}, "currency": STR,
        "pools": {"type": "array", "items": _ref("Pool")},
        "international_addon": {"type": "array", "items": {"type": "object"}},
        "wallet": _ref("Wallet"),
        "calls": {"type": "array", "items": {"type": "object"}},
    }, closed=False),
    "Call": _obj({"id": {**STR, "format": "uuid"}, "direction": STR, "caller": STR,
                  "destination": STR, "decision": STR, "reason": STR, "state": STR,
                  "authorised_at": TIMESTAMP, "billed_seconds": {"type": ["integer", "null"]},
                  "charged_amount": {"type": ["string", "null"]}}, closed=False),
}


def _list_of(key: str, item: str, **extra: Any) -> dict[str, Any]:
    return _obj({key: {"type": "array", "items": _ref(item)}, **extra}, closed=False)


def _op(summary: str, tag: str, *, body: str | dict[str, Any] | None = None,
        ok: int = 200, returns: str | dict[str, Any] | None = None,
        query: tuple[tuple[str, dict[str, Any]], ...] = (),
        errors: tuple[int, ...] = (404, 422)) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag]}
    if query:
        op["parameters"] = [{"name": n, "in": "query", "required": False, "schema": s}
                            for n, s in query]
    if body is not None:
        if isinstance(body, str):
            body = {"application/json": {"schema": _ref(body)}}
        op["requestBody"] = {"required": True, "content": body}
    response: dict[str, Any] = {"description": "OK" if ok != 201 else "Created"}
    if ok == 204:
        response["description"] = "Done, no content"
    elif returns is not None:
        schema = _ref(returns) if isinstance(returns, str) else returns
        response["content"] = {"application/json": {"schema": schema}}
    responses = {str(ok): response}
    for status in (*errors, 401, 503):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    op["responses"] = responses
    return op


TENANT_Q = (("tenant_id", {**STR, "description": "a tenant's own rates; absent: the rates "
                                                  "for every tenant"}),)

# path (below /api/v1) -> method -> operation
PATHS: dict[str, dict[str, Any]] = {
    "/tenants": {
        "post": _op("Create a tenant (and its empty wallet)", "tenants", body="TenantCreate",
                    ok=201, returns="Tenant", errors=(409, 422)),
        "get": _op("List tenants", "tenants", returns=_list_of("tenants", "Tenant"),
                   errors=()),
    },
    "/tenants/{tenant_id}": {
        "get": _op("One tenant with its subscriptions", "tenants", returns="Tenant",
                   errors=(404,)),
        "patch": _op("Change name, timezone or blocked classes", "tenants",
                     body="TenantPatch", returns="Tenant"),
    },
    "/tenants/{tenant_id}/subscriptions": {
        "get": _op("Purchased and assigned licences per SKU", "tenants",
                   returns="Subscriptions", errors=(404,)),
    },
    "/tenants/{tenant_id}/subscriptions/{sku}": {
        "put": _op("Set the purchased quantity of a SKU", "tenants", body="SubscriptionPut",
                   returns="Subscriptions", errors=(404, 409, 422)),
    },
    "/tenants/{tenant_id}/users": {
        "post": _op("Create a user", "users", body="UserCreate", ok=201, returns="User",
                    errors=(404, 409, 422)),
        "get": _op("List a tenant's users with their licences", "users",
                   returns=_list_of("users", "User", tenant_id=STR), errors=(404,)),
    },
    "/users/{user_id}": {
        "get": _op("One user with licences", "users", returns="User", errors=(404,)),
        "patch": _op("Change display name, extension or usage location", "users",
                     body="UserPatch", returns="User", errors=(404, 409, 422)),
        "delete": _op("Delete a user (its licences return to the tenant)", "users", ok=204,
                      errors=(404,)),
    },
    "/users/{user_id}/licences/{sku}": {
        "put": _op("Assign a licence (never more than purchased)", "licences",
                   returns="User", errors=(404, 409, 422)),
        "delete": _op("Unassign a licence", "licences", returns="User",
                      errors=(404, 409, 422)),
    },
    "/tenants/{tenant_id}/numbers": {
        "post": _op("Add a phone number", "numbers", body="NumberCreate", ok=201,
                    returns="Number", errors=(404, 409, 422)),
        "get": _op("List a tenant's numbers", "numbers",
                   returns=_list_of("numbers", "Number", tenant_id=STR), errors=(404,)),
    },
    "/numbers/{e164}": {
        "delete": _op("Remove a phone number", "numbers", ok=204, errors=(404,)),
    },
    "/rates": {
        "post": _op("Insert or replace rates, all or none", "rates",
                    body={"application/json": {"schema": {
                        "type": "array", "minItems": 1, "items": _ref("RateInput")}}},
                    returns="RateCount", query=TENANT_Q),
        "get": _op("List rates", "rates", returns=_list_of("rates", "Rate", tenant_id=NULL_STR),
                   query=TENANT_Q, errors=(404,)),
    },
    "/rates/import": {
        "post": _op("Import rates from CSV (header: kind,prefix,price_per_minute"
                    "[,first_increment,increment,currency,description]), all or none",
                    "rates", body={"text/csv": {"schema": STR}}, returns="RateCount",
                    query=TENANT_Q),
    },
    "/allotments": {
        "get": _op("Minutes per assigned licence per month, by country and plan",
                   "allotments", returns=_list_of("allotments", "Allotment"), errors=()),
    },
    "/allotments/{country}/{plan}": {
        "put": _op("Set an allotment", "allotments", body="AllotmentPut",
                   returns="Allotment", errors=(422,)),
    },
    "/tenants/{tenant_id}/wallet/topups": {
        "post": _op("Add Communications Credits by hand", "wallet", body="Topup", ok=201,
                    returns="TopupResult"),
    },
    "/tenants/{tenant_id}/wallet/auto-recharge": {
        "put": _op("Set auto-recharge", "wallet", body="AutoRecharge", returns="WalletView"),
    },
    "/tenants/{tenant_id}/wallet": {
        "get": _op("Balance, reserved, available, auto-recharge and recent entries",
                   "wallet", returns="WalletView", errors=(404,)),
    },
    "/tenants/{tenant_id}/usage": {
        "get": _op("Pools, add-on minutes, wallet and call totals of a month", "usage",
                   returns="Usage", query=(("month", MONTH),)),
    },
    "/tenants/{tenant_id}/calls": {
        "get": _op("Calls, newest first", "usage",
                   returns=_list_of("calls", "Call", tenant_id=STR, month=NULL_STR),
                   query=(("month", MONTH), ("limit", {**INT, "minimum": 1,
                                                       "maximum": 1000, "default": 100}))),
    },
    "/openapi.json": {
        "get": {"summary": "This document", "tags": ["meta"], "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {}}}}},
    },
}

_ERRORS = {404: "No such tenant, user, number or route",
           409: "Clashes with the current state (duplicate, licence limit)",
           422: "Invalid field; error.field names it; nothing was written",
           401: "Missing or wrong bearer token (code UNAUTHORIZED)",
           503: "Admin API disabled (ADMIN_API_DISABLED) or database unavailable"}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, ops in PATHS.items():
        params = [{"name": n, "in": "path", "required": True, "schema": STR}
                  for n in _PARAM.findall(path)]
        paths[path] = {**({"parameters": params} if params else {}), **ops}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gateway admin API", "version": "1",
                 "description": (_package_doc or "").strip() + " Provisioning and "
                 "reading; money as decimal strings; errors as "
                 "{\"error\": {\"code\", \"message\", \"field\"}}."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "admin_token"}},
            "schemas": SCHEMAS,
            "responses": {f"E{s}": {"description": d, "content": {"application/json": {
                "schema": _ref("Error")}}} for s, d in _ERRORS.items()},
        },
    }
