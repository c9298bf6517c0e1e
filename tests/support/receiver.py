"""A webhook receiver on loopback (a real aiohttp server) that answers each request as a
plan says: ``ok`` (200), ``fail`` (500) or ``hang`` (no answer until the test ends),
and records what it got: the delivery id, whether the signature verified, the body,
and what it answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.billing.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify

__all__ = ["Received", "Receiver", "receiver"]


@dataclass
class Received:
    key: str
    nth: int  # the how-manyth request for this key
    signed: bool
    body: dict[str, Any]
    answer: str  # ok, fail, hang


class Receiver:
    def __init__(self, secret: str, plan: Callable[[str, int], str] = lambda key, n: "ok"):
        self.secret = secret
        self.plan = plan
        self.got: list[Received] = []
        self.release = asyncio.Event()
        self.url = ""

    def for_key(self, key: str) -> list[Received]:
        return [r for r in self.got if r.key == key]

    def delivered(self) -> set[str]:
        return {r.key for r in self.got if r.answer == "ok"}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get(DELIVERY_HEADER, "")
        nth = len(self.for_key(key)) + 1
        answer = self.plan(key, nth)
        self.got.append(Received(key, nth, verify(self.secret,
                                                  request.headers.get(SIGNATURE_HEADER, ""),
                                                  body),
                                 json.loads(body), answer))
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=503)
        if answer == "fail":
            return web.Response(status=500, text="receiver failing")
        return web.Response(status=200, text="ok")


@contextlib.asynccontextmanager
async def receiver(secret: str, plan: Callable[[str, int], str] = lambda key, n: "ok",
                   path: str = "/hook") -> AsyncIterator[Receiver]:
    r = Receiver(secret, plan)
    app = web.Application()
    app.router.add_post(path, r.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    r.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield r
    finally:
        r.release.set()
        await runner.cleanup()
