"""The HTTP surface: health probes, /status, /metrics, the operator page and the admin
REST API, built by one app factory around the composition root.

Errors become JSON in one middleware: a GatewayError keeps its status and stable code;
malformed JSON is 400 INVALID_JSON; unknown routes 404; anything unexpected is logged
and answered 500 INTERNAL_ERROR without details.
"""

from __future__ import annotations

import datetime as dt
import pathlib
from typing import Any

import structlog
from aiohttp import web

from ..errors import GatewayError
from ..metrics import CONTENT_TYPE_LATEST
from . import api
from .auth import Unauthorized, require_read
from .bodies import error_body, json_response
from .guard import ConnectionGuard, bounded
from .keys import GATEWAY, STARTED_AT
from .status import status_document

log = structlog.get_logger("gateway.http")

STATIC = pathlib.Path(__file__).parent / "static"
MAX_BODY = 16 * 1024 * 1024  # a large rate sheet as CSV

_HTTP_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN",
               404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE",
               408: "REQUEST_TIMEOUT", 415: "UNSUPPORTED_MEDIA_TYPE"}


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response = await handler(request)
    except GatewayError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if exc.status >= 500 or (request.path.startswith(api.PREFIX)
                                 and request.method not in ("GET", "HEAD")):
            log.info("http_refused", method=request.method, route=_route(request),
                     status=exc.status, code=exc.code, field=exc.field)
        return json_response(error_body(exc.code, exc.message, exc.field),
                             status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, exc.reason.upper().replace(" ", "_"))
        message = "no such route" if exc.status == 404 else exc.reason
        return json_response(error_body(code, message), status=exc.status, headers=headers)
    except Exception:  # noqa: BLE001 - the one place that turns surprises into a 500
        log.exception("http_internal_error", method=request.method, route=_route(request))
        return json_response(
            error_body("INTERNAL_ERROR", "internal error; the gateway log has the details"),
            status=500)
    if request.path.startswith(api.PREFIX) and request.method not in ("GET", "HEAD"):
        log.info("admin_write", method=request.method, route=_route(request),
                 status=response.status)
    return response


def _route(request: web.Request) -> str:
    """The route pattern, not the path: no ids or numbers of customers in every line."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


# ---- probes, status, metrics, page ------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about its dependencies (see /readyz)."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, components = await request.app[GATEWAY].readiness()
    failing = {name: c for name, c in components.items()
               if c.get("state") not in ("up", "not_configured", "standby")}
    return json_response({"status": "ready" if ready else "not_ready", "failing": failing,
                          "components": {n: c.get("state") for n, c in components.items()}},
                         status=200 if ready else 503)


def _check_read(request: web.Request) -> Any:
    gateway = request.app[GATEWAY]
    require_read(request, gateway.config.read_token, gateway.config.admin_token)
    return gateway


async def status(request: web.Request) -> web.Response:
    gateway = _check_read(request)
    doc = await status_document(gateway, request.app[STARTED_AT])
    return json_response(doc, headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    gateway = _check_read(request)
    gateway.ami_status()  # refreshes the AMI reconnect, backlog and live call gauges
    names = request.query.getall("name[]", [])  # only these samples, when given
    return web.Response(body=gateway.metrics.render(names),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


# The page holds no data; it fetches /status with the token given in ?token=.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "Referrer-Policy": "no-referrer",  # the URL may carry the read token
    "Cache-Control": "no-cache",
}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


def _static_handler() -> Any:
    """Serves the page's few files by name: no paths, so nothing outside the folder,
    and a missing file is a JSON 404 like any other (aiohttp's static route decides
    that only after the middleware)."""
    files = {p.name for p in STATIC.iterdir() if p.is_file()}

    async def static_file(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})

    return static_file


def build_app(gateway: Any, guard: ConnectionGuard | None = None,
              request_timeout: float = 60.0) -> web.Application:
    """The aiohttp application of one gateway. ``gateway`` is the composition root
    (gateway.app.Gateway) or anything with its attributes: config, provisioning, views,
    calls, metrics, readiness(), ami_status(). With a ``guard`` (the listener's connection
    guard), each request stops its connection's header clock and is bounded in time."""
    middlewares: list[Any] = [errors_as_json]
    if guard is not None:
        middlewares.append(bounded(guard, request_timeout))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[GATEWAY] = gateway
    app[STARTED_AT] = dt.datetime.now(dt.UTC)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", _static_handler())
    api.add_routes(app)
    return app
