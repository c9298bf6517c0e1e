"""The /status document: health of each component, live calls, each PBX (its owner
process, AMI link and calls), the gateway processes sharing the database, each tenant's month (pools, add-on minutes, wallet),
decision counters and the last reconciliation.

Read-only; secrets never appear (the configuration goes through Config.public()).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog

from ..billing.views import as_dict
from ..errors import GatewayError, NotFound

log = structlog.get_logger("gateway.http")


async def status_document(gateway: Any, started_at: dt.datetime) -> dict[str, Any]:
    ready, components = await gateway.readiness()
    now = dt.datetime.now(dt.UTC)
    calls = gateway.calls
    doc: dict[str, Any] = {
        "generated_at": now,
        "started_at": started_at,
        "uptime_seconds": int((now - started_at).total_seconds()),
        "ready": ready,
        "components": components,
        "live_calls": calls.snapshot() if calls is not None else [],
        "decisions": decision_counts(gateway.metrics.reason_counts),
        "last_reconcile": (calls.last_reconcile or None) if calls is not None else None,
        # each PBX: which process owns it (its lease), its AMI link, its calls
        "pbxes": gateway.pbxes_status(),
        "config": gateway.config.public(),
    }
    guard = getattr(gateway, "http_guard", None)
    if guard is not None:  # open, refused and timed-out HTTP connections
        doc["http"] = guard.stats()
    doc["processes"] = await _processes(gateway)
    doc["tenants"], doc["tenants_error"] = await _tenants(gateway)
    return doc


def decision_counts(counts: Any) -> list[dict[str, Any]]:
    """Allow/reject counters since start, by direction and reason."""
    return [
        {"direction": direction, "decision": decision, "reason": reason, "count": n}
        for (direction, decision, reason), n in sorted(counts.items())
    ]


async def _processes(gateway: Any) -> list[dict[str, Any]] | None:
    """The gateway processes sharing the database; None when it cannot be read."""
    try:
        return await gateway.processes_status()
    except Exception as exc:  # noqa: BLE001 - the rest of the page stays useful
        log.warning("status_processes_failed", error=str(exc) or type(exc).__name__)
        return None


async def _tenants(gateway: Any) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Each tenant's current month. A database failure leaves the rest of the page
    useful: the tenants part says what went wrong instead."""
    views = gateway.views
    if views is None:
        return [], {"code": "NOT_STARTED", "message": "the gateway is not started"}
    try:
        out = []
        for t in await views.list_tenants():
            try:
                usage = await views.usage(t.id)
            except NotFound:
                continue  # deleted since the list was read
            out.append({**as_dict(usage), "name": t.name, "country": t.country,
                        "timezone": t.timezone})
        return out, None
    except GatewayError as exc:
        log.warning("status_tenants_failed", code=exc.code, error=exc.message)
        return [], {"code": exc.code, "message": exc.message}
