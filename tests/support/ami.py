"""A fake Asterisk Manager Interface server speaking the wire format, for fast tests.

It follows Asterisk's framing (banner line, ``Key: Value`` blocks ended by a blank
line, ActionID echoed), answers ``Login``, ``Ping`` and ``Logoff`` itself and other
actions as scripted (``scripts[action name in lower case]``), else with ``Success``.
The real PBX harness is the judge for the behaviour of Asterisk itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["SECRET", "USERNAME", "FakeAmi", "FakeConn", "Script", "encode", "parse"]

USERNAME = "gateway"
SECRET = "s3cret-Pw-77"

Script = Callable[["FakeConn", dict[str, str]], Awaitable[None]]


def encode(fields: dict[str, str]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in fields.items()).encode() + b"\r\n"


def parse(block: bytes) -> dict[str, str]:
    fields = {}
    for line in block.decode().split("\r\n"):
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
    return fields


class FakeConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.closed = asyncio.Event()

    async def send(self, fields: dict[str, str]) -> None:
        self.writer.write(encode(fields))
        await self.writer.drain()

    async def reply(self, action: dict[str, str], **fields: str) -> None:
        await self.send({"Response": "Success", "ActionID": action["ActionID"], **fields})


class FakeAmi:
    """An asyncio AMI server: Login/Ping/Logoff built in, other actions scripted."""

    def __init__(self) -> None:
        self.secret = SECRET
        self.answer_pings = True
        self.scripts: dict[str, Script] = {}
        self.conns: list[FakeConn] = []
        self.received: list[dict[str, str]] = []
        self.logins = 0
        self.failed_logins = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.drop()
        self.server.close()
        await self.server.wait_closed()

    def drop(self) -> None:
        for conn in self.conns:
            conn.writer.close()

    @property
    def live(self) -> FakeConn:
        return self.conns[-1]

    async def event(self, fields: dict[str, str]) -> None:
        await self.live.send(fields)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConn(reader, writer)
        self.conns.append(conn)
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        try:
            while True:
                action = parse(await reader.readuntil(b"\r\n\r\n"))
                self.received.append(action)
                await self._answer(conn, action)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            conn.closed.set()
            writer.close()

    async def _answer(self, conn: FakeConn, action: dict[str, str]) -> None:
        name = action["Action"].lower()
        if name == "login":
            if action.get("Username") == USERNAME and action.get("Secret") == self.secret:
                self.logins += 1
                await conn.reply(action, Message="Authentication accepted")
                await conn.send(
                    {"Event": "FullyBooted", "Privilege": "system,all", "Status": "Fully Booted"}
                )
            else:
                self.failed_logins += 1
                await conn.send(
                    {
                        "Response": "Error",
                        "ActionID": action["ActionID"],
                        "Message": "Authentication failed",
                    }
                )
                conn.writer.close()
        elif name == "ping":
            if self.answer_pings:
                await conn.reply(action, Ping="Pong", Timestamp="1700000000.000000")
        elif name == "logoff":
            await conn.send(
                {"Response": "Goodbye", "ActionID": action["ActionID"], "Message": "Bye"}
            )
            conn.writer.close()
        elif name in self.scripts:
            await self.scripts[name](conn, action)
        else:
            await conn.reply(action, Message="OK")
