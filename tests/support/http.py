"""JSON over HTTP to a running gateway, money kept as Decimal."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

import aiohttp

from .gateway import ADMIN

__all__ = ["Client", "Reply", "floats_in"]


@dataclasses.dataclass
class Reply:
    """One HTTP reply, its JSON body parsed (numbers with a fraction as Decimal)."""

    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        """The body's ``error`` object (the reply must be an error)."""
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        return self.body["error"]


class Client:
    """JSON over HTTP to one gateway, with the admin token unless told otherwise."""

    def __init__(self, session: aiohttp.ClientSession, port: int, token: str | None = ADMIN):
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    async def __call__(self, method: str, path: str, body: Any = None, *, raw: bytes | str |
                       None = None, token: str | None | bool = True,
                       content_type: str = "application/json") -> Reply:
        headers = {}
        token = self.token if token is True else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if raw is not None:
            data = raw
            headers["Content-Type"] = content_type
        elif body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = content_type
        async with self.session.request(method, self.base + path, data=data,
                                        headers=headers) as r:
            text = await r.text()
            try:
                parsed = json.loads(text, parse_float=Decimal) if text else None
            except ValueError:
                parsed = text
            return Reply(r.status, parsed, r.headers)


def floats_in(value: Any, path: str = "") -> list[str]:
    """Where a JSON document holds a number with a fraction (parsed as Decimal)."""
    if isinstance(value, Decimal):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in floats_in(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in floats_in(v, f"{path}[{i}]")]
    return []
