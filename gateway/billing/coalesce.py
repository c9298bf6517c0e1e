"""Coalescing: requests of one key that arrive together go to the database as one batch.

While a batch of a key is in flight, the requests of that key that arrive wait for it
and then leave together as the next batch (at most ``limit`` of them); a request that
finds nothing in flight leaves at the event loop's next turn, with whatever arrived in
the same turn. So nothing waits when there is no queue, and under load a request waits
at most about one batch, which it would otherwise have spent waiting for the same row
lock in the database. One batch of a key at a time per process: the batches of one
pool never wait for each other's locks inside one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from ..errors import GatewayError

Request = TypeVar("Request")

# sends a batch; returns one answer per request, in order: a result, or the exception
# that request alone met (raised to its caller)
Send = Callable[[Sequence[Request]], Awaitable[Sequence[Any]]]


def _own_copy(exc: BaseException) -> BaseException:
    """One exception object per caller (each raises it with its own traceback)."""
    if isinstance(exc, GatewayError):
        copy = type(exc)(exc.message, code=exc.code, field=exc.field)
        copy.__cause__ = exc.__cause__
        return copy
    return exc


class Coalescer(Generic[Request]):
    def __init__(self, send: Send, *, limit: int = 32,
                 fails_with: Callable[[Request, BaseException], bool] | None = None):
        """``fails_with(request, exc)``: whether a request that waited for a batch that
        failed with ``exc`` fails the same at once, unsent (instead of waiting as long
        again for a database that did not answer); the others go as the next batch."""
        if limit < 1:
            raise ValueError("limit must be positive")
        self._send = send
        self.limit = limit
        self.fails_with = fails_with
        self._queued: dict[Hashable, list[tuple[Request, asyncio.Future[Any]]]] = {}
        self._draining: dict[Hashable, asyncio.Task[None]] = {}
        self.batches = 0  # batches sent, and the requests they carried (for /metrics)
        self.requests = 0

    async def submit(self, key: Hashable, request: Request) -> Any:
        """Send ``request`` with the others of ``key``; its answer (or its error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.setdefault(key, []).append((request, future))
        if key not in self._draining:
            self._draining[key] = loop.create_task(self._drain(key), name=f"coalesce-{key}")
        # a caller cancelled while it waits leaves its future cancelled: a request not yet
        # sent is then dropped, the answer of one sent already is not delivered
        return await future

    async def _drain(self, key: Hashable) -> None:
        try:
            while queue := self._queued.get(key):
                batch = [(r, f) for r, f in queue[:self.limit] if not f.done()]
                del queue[:self.limit]
                if not batch:
                    continue
                self.batches += 1
                self.requests += len(batch)
                try:
                    answers = await self._send([r for r, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - each caller gets it
                    cancelled = isinstance(exc, asyncio.CancelledError)
                    if self.fails_with is not None and not cancelled:
                        failing = [(r, f) for r, f in queue if self.fails_with(r, exc)]
                        queue[:] = [(r, f) for r, f in queue if not self.fails_with(r, exc)]
                        batch += failing
                    for _, future in batch:
                        if future.done():
                            continue
                        if cancelled:
                            future.cancel()
                        else:
                            future.set_exception(_own_copy(exc))
                    if cancelled:
                        raise
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():
                        continue
                    if isinstance(answer, BaseException):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            del self._draining[key]
            queue = self._queued.pop(key, [])
            for _, future in queue:  # only when cancelled: nothing is left otherwise
                future.cancel()

    @property
    def queued(self) -> int:
        """Requests waiting for their key's batch in flight to end."""
        return sum(len(q) for q in self._queued.values())
