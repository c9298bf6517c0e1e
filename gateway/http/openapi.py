"""The OpenAPI 3.1 description of the admin API, generated: the paths from ``api.ROUTES``
and each handler's ``@operation``, the schemas from the request models and read views
(``billing.schemas``, ``billing.views``). Nothing here is written by hand but the error
descriptions, so the document and the handlers cannot drift."""

from __future__ import annotations

import functools
import re
from typing import Any

from .. import __doc__ as _package_doc
from ..billing import schemas
from . import api

_PARAM = re.compile(r"{([^}]+)}")

_ERRORS = {400: "The body is not valid JSON (INVALID_JSON)",
           404: "No such tenant, user, number, alert, webhook, delivery or route",
           409: "Clashes with the current state (duplicate, licence limit)",
           422: "Invalid field; error.field names it; nothing was written",
           401: "Missing or wrong bearer token (code UNAUTHORIZED)",
           503: "Admin API disabled (ADMIN_API_DISABLED) or database unavailable"}


def _schema(value: Any, components: dict[str, Any]) -> dict[str, Any]:
    """A model becomes a reference; a plain JSON Schema may hold models too."""
    if isinstance(value, type):
        return schemas.ref(value, components)
    if isinstance(value, dict):
        return {k: _schema(x, components) for k, x in value.items()}
    if isinstance(value, list):
        return [_schema(x, components) for x in value]
    return value


def _operation(name: str, path: str, op: api.Operation,
               components: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag], "operationId": name}
    if op.read:
        out["description"] = "A read: the read token is enough."
    if op.query:
        out["parameters"] = [
            {"name": api.QUERY[n].get("name", n), "in": "query", "required": False,
             "schema": schemas.constraints({k: x for k, x in api.QUERY[n].items()
                                            if k != "name"})} for n in op.query]
    errors = set(op.errors)
    if op.body is not None:
        media = op.body if isinstance(op.body, dict) else {"application/json": op.body}
        out["requestBody"] = {"required": True, "content": {
            m: {"schema": _schema(x, components)} for m, x in media.items()}}
        if "application/json" in media:
            errors.add(400)
    if op.body is not None or op.query or _PARAM.search(path):
        errors.add(422)  # a field, a query value or a path id that can never be right
    ok: dict[str, Any] = {"description": {201: "Created", 204: "Done, no content"}.get(
        op.ok, "OK")}
    if op.returns is not None:
        ok["content"] = {op.media: {"schema": schemas.ref(op.returns, components)}}
    elif op.media != "application/json":
        ok["content"] = {op.media: {"schema": {"type": "string"}}}
    responses = {str(op.ok): ok}
    for status in sorted({*errors, 401, 503}):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    out["responses"] = responses
    return out


@functools.cache
def _document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    schemas.ref(schemas.ErrorBody, components)
    paths: dict[str, Any] = {}
    for method, path, handler in api.ROUTES:
        item = paths.setdefault(path, {})
        params = _PARAM.findall(path)
        if params:
            item["parameters"] = [
                {"name": n, "in": "path", "required": True,
                 "schema": schemas.constraints(api.PATH_PARAMS[n])} for n in params]
        op = handler.operation  # type: ignore[attr-defined]
        item[method.lower()] = _operation(handler.__name__, path, op, components)
    paths["/openapi.json"] = {"get": {
        "summary": "This document", "tags": ["meta"], "security": [],
        "operationId": "get_openapi",
        "responses": {"200": {"description": "OpenAPI 3.1",
                              "content": {"application/json": {}}}}}}
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
            "schemas": dict(sorted(components.items())),
            "responses": {f"E{s}": {"description": d, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                for s, d in _ERRORS.items()},
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (built once per process; callers must not change it)."""
    return _document()
