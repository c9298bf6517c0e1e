"""Bearer tokens: the admin token for the admin API, the read token (or the admin token)
for /status and /metrics. Tokens are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from aiohttp import web

from ..errors import GatewayError


class Unauthorized(GatewayError):
    status = 401
    code = "UNAUTHORIZED"


class AdminApiDisabled(GatewayError):
    status = 503
    code = "ADMIN_API_DISABLED"


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(given: str | None, expected: str) -> bool:
    # Compare bytes: compare_digest refuses non-ASCII str, and a token may hold any text.
    return bool(expected) and given is not None and hmac.compare_digest(
        given.encode("utf-8"), expected.encode("utf-8"))


def require_admin(request: web.Request, admin_token: str) -> None:
    """The admin API is never open: with no admin token configured it is switched off."""
    if not admin_token:
        raise AdminApiDisabled("the admin API is disabled: set admin_token "
                               "(GATEWAY_ADMIN_TOKEN) to enable it")
    if not _matches(bearer(request), admin_token):
        raise Unauthorized("missing or wrong bearer token for the admin API")


def require_api_read(request: web.Request, read_token: str, admin_token: str) -> None:
    """A read of the admin API (usage, calls, wallet, forecast, export): the admin API
    must be enabled; the admin token or, when one is set, the read token."""
    if not admin_token:
        raise AdminApiDisabled("the admin API is disabled: set admin_token "
                               "(GATEWAY_ADMIN_TOKEN) to enable it")
    given = bearer(request)
    if not (_matches(given, admin_token) or _matches(given, read_token)):
        raise Unauthorized("missing or wrong bearer token (admin_token, or read_token for "
                           "reads)")


def require_read(request: web.Request, read_token: str, admin_token: str) -> None:
    """/status and /metrics: open when no read token is configured (bind http_host to
    loopback then); otherwise the read token or the admin token."""
    if not read_token:
        return
    given = bearer(request)
    if not (_matches(given, read_token) or _matches(given, admin_token)):
        raise Unauthorized("missing or wrong bearer token (read_token or admin_token)")
