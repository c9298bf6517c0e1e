"""Webhook delivery: the signature, the retry schedule and the delivery worker.

The worker runs in every gateway process, as a task of its own with its own small
connection pool, and never in a call's path: it claims due deliveries from the outbox
(``webhook_deliveries``; ``FOR UPDATE SKIP LOCKED`` and a lease, so each attempt is made
by one process), posts each with a bounded timeout, and records the outcome. Delivery
is at least once: the receiver deduplicates by the delivery id (``X-Gateway-Delivery``,
also sent as ``Idempotency-Key``), which every retry of one delivery repeats. A
delivery recorded as delivered is never sent again.

Signature (docs/operations.md, "Webhooks"): ``X-Gateway-Signature: t=<unix seconds>,
v1=<hex HMAC-SHA256 of "<t>." + body, keyed with the subscription's secret>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from ..store.alerts import AlertStore

log = structlog.get_logger("gateway.webhooks")

SIGNATURE_HEADER = "X-Gateway-Signature"
DELIVERY_HEADER = "X-Gateway-Delivery"
EVENT_HEADER = "X-Gateway-Event"
# what a receiver's answer may be read to (the rest is not waited for)
MAX_ANSWER = 64 * 1024
# a lease lasts the attempt's timeout plus this, for recording its outcome
LEASE_MARGIN = 5.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body,
                   hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300,
           now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``tolerance``
    seconds old (the receiver's side; docs/operations.md has the same as a snippet)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def backoff(attempt: int, base: float, cap: float,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first):
    ``base`` doubled at each attempt, at most ``cap``, with jitter: uniformly between
    half of it and all of it, so that receivers coming back are not hit in step."""
    full = min(cap, base * 2 ** (max(attempt, 1) - 1))
    return full / 2 + rand() * full / 2


def safe_url(url: str) -> str:
    """A URL as it may be logged: scheme, host, port and path; no user, password or
    query (where receivers put tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unreadable URL)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookSender:
    """The delivery worker of one gateway process (``run`` until cancelled)."""

    def __init__(self, store: AlertStore, *, instance: str, timeout: float = 10.0,
                 max_attempts: int = 8, retry_base: float = 30.0, retry_max: float = 3600.0,
                 concurrency: int = 4, poll: float = 1.0):
        self.store = store
        self.instance = instance
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.concurrency = concurrency
        self.poll = poll
        self._inflight: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self.stats = {"delivered": 0, "failed": 0, "dead": 0}
        self._claim_failing = False

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers={"User-Agent": "agi-gateway-webhooks/1"})
        return self._http

    async def run(self) -> None:
        """Claim and send due deliveries, at most ``concurrency`` at a time, until
        cancelled. A database that does not answer is retried every ``poll`` seconds."""
        try:
            while True:
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(set(self._inflight), timeout=self.poll,
                                       return_when=asyncio.FIRST_COMPLETED)
                elif await self._claim(free) < free:
                    await asyncio.sleep(self.poll)  # nothing more is due now
        finally:
            await self.close()

    async def _claim(self, n: int) -> int:
        try:
            rows = await self.store.claim_deliveries(n, self.timeout + LEASE_MARGIN,
                                                     self.instance)
        except Exception as exc:  # noqa: BLE001 - the worker outlives any one failure
            # said once per outage, not at every poll
            if not self._claim_failing:
                log.warning("webhook_claim_failed", code=getattr(exc, "code", None),
                            error=str(exc) or type(exc).__name__)
            self._claim_failing = True
            return 0
        if self._claim_failing:
            log.info("webhook_claim_recovered")
            self._claim_failing = False
        for row in rows:
            task = asyncio.create_task(self._deliver(row), name=f"webhook-{row['id']}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        return len(rows)

    async def run_once(self) -> int:
        """Claim what is due now (up to ``concurrency``) and send it; return how many
        were attempted. For tests and one-off runs."""
        n = await self._claim(self.concurrency)
        if self._inflight:
            await asyncio.gather(*self._inflight)
        return n

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _deliver(self, row: Any) -> None:
        delivery_id: uuid.UUID = row["id"]
        attempt: int = row["attempts"]
        url: str = row["url"]
        body = row["body"].encode("utf-8")
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json",
                   DELIVERY_HEADER: str(delivery_id), "Idempotency-Key": str(delivery_id),
                   EVENT_HEADER: row["event"],
                   SIGNATURE_HEADER: sign(row["secret"], timestamp, body)}
        status: int | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            async with self._session().post(url, data=body, headers=headers,
                                            allow_redirects=False) as answer:
                status = answer.status
                await answer.content.read(MAX_ANSWER)
            if not 200 <= status < 300:
                error = f"answered HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure is a failed attempt
            # the message may name the URL: never its user, password or query
            error = (f"{type(exc).__name__}: {exc}".replace(url, safe_url(url)))[:300]
        duration_ms = round((time.monotonic() - started) * 1000)
        if error is None:
            outcome, retry_in = "delivered", 0.0
        elif attempt >= self.max_attempts:
            outcome, retry_in = "dead", 0.0
        else:
            outcome, retry_in = "retry", backoff(attempt, self.retry_base, self.retry_max)
        self.stats["delivered" if outcome == "delivered" else
                   "dead" if outcome == "dead" else "failed"] += 1
        event = {"delivered": "webhook_delivered", "dead": "webhook_dead",
                 "retry": "webhook_failed"}[outcome]
        (log.info if outcome == "delivered" else log.warning)(
            event, delivery_id=str(delivery_id), event_type=row["event"],
            receiver=safe_url(url), attempt=attempt, status=status, error=error,
            duration_ms=duration_ms,
            **({"retry_in_seconds": round(retry_in, 1)} if outcome == "retry" else {}))
        try:
            await self.store.record_attempt(
                delivery_id, row["claim"], attempt=attempt, by=self.instance, status=status,
                error=error, duration_ms=duration_ms, outcome=outcome, retry_in=retry_in)
        except Exception as exc:  # noqa: BLE001 - the worker outlives any one failure
            # the lease runs out and the delivery is attempted again: at least once
            log.warning("webhook_record_failed", delivery_id=str(delivery_id),
                        code=getattr(exc, "code", None), error=str(exc) or type(exc).__name__)
