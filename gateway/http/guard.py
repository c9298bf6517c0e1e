"""Keeps the HTTP listener from starving the call path.

The AGI listener and the HTTP listener share one process and one file-descriptor limit.
Idle or half-sent HTTP connections (a stuck scraper, a port scan, a slow-loris client)
must never use up the descriptors that call decisions need, so each HTTP connection is
wrapped in a ``Guarded`` protocol that:

- is refused at once when ``max_connections`` are already open;
- must send a complete request header within ``header_timeout`` seconds of opening, or
  of finishing its previous request (keep-alive), or it is closed;
- while a request is being handled the header clock is stopped; the handler itself is
  bounded by ``request_timeout`` (the ``bounded`` middleware), slow bodies included.

aiohttp has no header-read timeout of its own, hence this small wrapper: it only
delegates the asyncio protocol calls and watches for the end of a header block.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("gateway.http")

_HEADER_END = b"\r\n\r\n"


class ConnectionGuard:
    """Counts the open HTTP connections and builds a guarded protocol for each."""

    def __init__(self, *, max_connections: int, header_timeout: float,
                 factory: Callable[[], asyncio.Protocol] | None = None):
        self.factory = factory  # aiohttp's server, set once the app runner is set up
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._by_transport: dict[Any, Guarded] = {}

    def __call__(self) -> asyncio.Protocol:
        return Guarded(self)

    def stats(self) -> dict[str, int]:
        return {"open": self.open, "max": self.max_connections, "refused": self.refused,
                "header_timeouts": self.timed_out}

    def request_started(self, transport: Any) -> None:
        guard = self._by_transport.get(transport)
        if guard is not None:
            guard.stop_clock()

    def request_finished(self, transport: Any) -> None:
        guard = self._by_transport.get(transport)
        if guard is not None:
            guard.start_clock()


class Guarded(asyncio.Protocol):
    """One HTTP connection: aiohttp's handler inside, a header deadline outside."""

    def __init__(self, owner: ConnectionGuard):
        self.owner = owner
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        owner = self.owner
        if owner.open >= owner.max_connections:
            owner.refused += 1
            log.warning("http_connection_refused", open=owner.open, max=owner.max_connections)
            transport.abort()
            return
        owner.open += 1
        self.transport = transport  # type: ignore[assignment]
        owner._by_transport[transport] = self
        assert owner.factory is not None, "the guard's factory is set before it listens"
        self.inner = owner.factory()
        self.inner.connection_made(transport)
        self.start_clock()

    def start_clock(self) -> None:
        self.stop_clock()
        self.tail = b""
        if self.transport is not None and not self.transport.is_closing():
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.owner.header_timeout, self._expired)

    def stop_clock(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self.owner.timed_out += 1
        log.warning("http_header_timeout", timeout=self.owner.header_timeout)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.timer is not None:
            # the clock stops at the end of a header block; the middleware restarts it
            # when the request has been answered
            seen = self.tail + data[:4096] if len(data) > 4096 else self.tail + data
            if _HEADER_END in seen or _HEADER_END in data:
                self.stop_clock()
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self.stop_clock()
        self.owner.open -= 1
        self.owner._by_transport.pop(self.transport, None)
        self.inner.connection_lost(exc)


def bounded(guard: ConnectionGuard, request_timeout: float) -> Any:
    """Middleware: stops the connection's header clock while a request is handled, bounds
    the handling (slow bodies included), and restarts the clock when it is answered."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.transport
        guard.request_started(transport)
        try:
            async with asyncio.timeout(request_timeout):
                return await handler(request)
        except TimeoutError:
            log.warning("http_request_timeout", method=request.method, timeout=request_timeout)
            raise web.HTTPRequestTimeout() from None
        finally:
            guard.request_finished(transport)

    return middleware


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (as far as allowed); return
    (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_target = 65536
    else:
        hard_target = hard
    if soft != resource.RLIM_INFINITY and soft < hard_target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# Connections asyncio accepts on the HTTP listener in one go (its listen backlog, and
# asyncio's default) before the guard sees any of them.
ACCEPT_BURST = 100


def connection_cap(configured: int, soft_limit: int, agi_sessions: int) -> int:
    """HTTP connections allowed: the configured number, but never more than what leaves
    the AGI listener its sessions and a margin (database pool, AMI, log files), and room
    for the connections asyncio accepts in one go before the guard can refuse any
    (``ACCEPT_BURST``, the listener's backlog): without it a burst arriving while HTTP
    is at its cap ran the process out of descriptors ("Too many open files")."""
    if soft_limit == resource.RLIM_INFINITY:
        return configured
    spare = soft_limit - agi_sessions - 64 - ACCEPT_BURST
    return max(8, min(configured, spare))
