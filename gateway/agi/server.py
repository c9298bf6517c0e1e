"""A FastAGI server on ``asyncio.start_server``, bounded in every dimension.

Asterisk waits for a FastAGI server without any timeout, so this side bounds its own
time: the environment block (line length, header count, read time), each command, and
the whole session. It knows nothing about what the routes do; a route is a coroutine
taking an :class:`AgiSession`.

Why not panoramisk's FastAGI: its header loop spins without yielding when the client
closes early, an unsolicited ``HANGUP`` or a multi-line ``520`` shifts every later reply
by one, and a variable whose value is ``hangup`` reads as a hangup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import structlog

from gateway.agi.protocol import (
    HANGUP_LINE,
    USAGE_END,
    AgiCommandError,
    AgiConnectionClosed,
    AgiProtocolError,
    AgiReply,
    AgiRequest,
    AgiTimeout,
    is_multiline_start,
    parse_environment,
    parse_reply,
    quote,
)
from gateway.dialplan_variables import PING_ROUTE, PONG

__all__ = ["PING_ROUTE", "AgiServer", "AgiSession", "Handler"]

# Asterisk reads each command with fgets() into a 2048-byte buffer (AGI_BUF_LEN in
# res_agi.c): a longer line would be split into two commands and two replies.
MAX_COMMAND_BYTES = 2046
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.+@:-]*$")
# A value with commas goes into MSet as one quoted item ("NAME=a,b,c"): a dialplan
# location such as the hangup handler's context,extension,priority.
_LISTED_VALUE = re.compile(r"^[A-Za-z0-9_.+@:,-]*$")
# Upper bound on lines read for one reply (interim 100s, HANGUP, 520 usage text).
MAX_REPLY_LINES = 256
_CLOSE_TIMEOUT = 1.0

_STAT_KEYS = (
    "sessions_active",
    "sessions_total",
    "rejected_peer",
    "rejected_busy",
    "rejected_busy_unread",
    "protocol_errors",
    "timeouts",
    "handler_errors",
    "unknown_route",
)

_logger = structlog.get_logger("gateway.agi")

Handler = Callable[["AgiSession"], Awaitable[None]]


async def _read_line(reader: asyncio.StreamReader) -> str | None:
    """One line without its terminator, or ``None`` at end of stream.

    The reader's ``limit`` bounds the line length: a longer line is a protocol error.
    """
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None  # closed, possibly mid-line
    except asyncio.LimitOverrunError:
        raise AgiProtocolError("line longer than max_line_bytes") from None
    except ConnectionError:
        return None
    line = raw.decode("utf-8", errors="replace")
    return line[:-2] if line.endswith("\r\n") else line[:-1]


class AgiSession:
    """One FastAGI connection: the request and a strictly sequential command channel."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: AgiRequest,
        peer: tuple[str, int],
        *,
        command_timeout: float,
        log: Any,
    ) -> None:
        self.request = request
        self.peer = peer
        self.hung_up = False
        self.log = log
        self._reader = reader
        self._writer = writer
        self._command_timeout = command_timeout
        self._lock = asyncio.Lock()
        self._unusable: str | None = None

    async def command(self, line: str, *, reply_timeout: float | None = None) -> AgiReply:
        """Send one command and read exactly its reply.

        Unsolicited ``HANGUP`` lines are skipped (and set :attr:`hung_up`), interim
        ``100`` lines are skipped, a multi-line ``520`` is read to its end. Every reply
        code, 510/511/520 included, comes back as an :class:`AgiReply`. Raises
        :class:`AgiTimeout` when the reply does not arrive within ``reply_timeout`` (default:
        the server's ``command_timeout``), :class:`AgiConnectionClosed` when Asterisk
        closes. After any failure mid-command the session refuses further commands,
        since a late reply would be read as the answer to the next one.
        """
        if "\n" in line or "\r" in line:
            raise ValueError("an AGI command cannot contain a line break")
        data = line.encode("utf-8") + b"\n"
        if len(data) > MAX_COMMAND_BYTES + 1:
            raise ValueError(f"AGI command longer than {MAX_COMMAND_BYTES} bytes")
        async with self._lock:
            if self._unusable is not None:
                raise AgiProtocolError(f"session unusable: {self._unusable}")
            deadline = asyncio.timeout(
                self._command_timeout if reply_timeout is None else reply_timeout
            )
            try:
                async with deadline:
                    self._writer.write(data)
                    try:
                        await self._writer.drain()
                    except ConnectionError as exc:
                        raise AgiConnectionClosed(f"connection lost: {exc}") from None
                    return await self._read_reply()
            except TimeoutError:
                self._unusable = f"no reply to {line!r}"
                if deadline.expired():
                    raise AgiTimeout(f"no reply to {line!r} in time") from None
                raise
            except BaseException as exc:
                self._unusable = f"{type(exc).__name__} during {line!r}"
                raise

    async def _next_line(self) -> str:
        line = await _read_line(self._reader)
        if line is None:
            raise AgiConnectionClosed("Asterisk closed the connection")
        return line

    async def _read_reply(self) -> AgiReply:
        for _ in range(MAX_REPLY_LINES):
            line = await self._next_line()
            if line == HANGUP_LINE:
                if not self.hung_up:
                    self.log.info("agi.hangup_received")
                self.hung_up = True
                continue
            if is_multiline_start(line):
                lines = [line]
                while not lines[-1].endswith(USAGE_END):
                    if len(lines) >= MAX_REPLY_LINES:
                        raise AgiProtocolError("multi-line reply too long", raw="\n".join(lines))
                    lines.append(await self._next_line())
                return parse_reply(lines)
            reply = parse_reply(line)
            if reply.code == 100:  # "100 result=0 Trying..." precedes the real reply
                continue
            return reply
        raise AgiProtocolError(f"no final reply within {MAX_REPLY_LINES} lines")

    async def set_variable(self, name: str, value: str) -> AgiReply:
        """``SET VARIABLE name "value"``; returns Asterisk's reply."""
        _check_name(name)
        return await self.command(f"SET VARIABLE {name} {quote(value)}")

    async def set_variables(self, variables: Sequence[tuple[str, str]]) -> AgiReply:
        """Set several channel variables in one command (``EXEC MSet``): one round trip
        instead of one per variable, and all of them or none. Values must be plain
        (letters, digits and ``_.+@:-``); one with commas too is sent as a quoted MSet
        item, as the dialplan writes ``"CHANNEL(hangup_handler_push)=ctx,exten,1"``."""
        items = []
        for name, value in variables:
            _check_name(name)
            if _PLAIN_VALUE.match(value):
                items.append(f"{name}={value}")
            elif _LISTED_VALUE.match(value):
                items.append(f'"{name}={value}"')
            else:
                raise ValueError(f"{name}: value {value!r} cannot go through MSet")
        data = ",".join(items)
        return await self.command(f"EXEC MSet {quote(data)}")

    async def get_variable(self, name: str) -> str | None:
        """``GET VARIABLE name``: the value, or ``None`` when the variable is not set.

        A reply other than ``200`` raises :class:`AgiCommandError`.
        """
        _check_name(name)
        reply = await self.command(f"GET VARIABLE {name}")
        if reply.code != 200:
            raise AgiCommandError(f"GET VARIABLE {name} failed: {reply.raw!r}", reply)
        if reply.result == "0":
            return None
        return reply.data if reply.data is not None else ""

    async def verbose(self, message: str, level: int = 1) -> None:
        """Write ``message`` to the Asterisk console at ``level`` (1-4)."""
        if not 1 <= level <= 4:
            raise ValueError("verbose level must be 1..4")
        await self.command(f"VERBOSE {quote(message)} {level}")


def _check_name(name: str) -> None:
    if not name or any(ch.isspace() or ch in '"\\' for ch in name):
        raise ValueError(f"not a usable channel variable name: {name!r}")


def _parse_networks(
    peers: Collection[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if isinstance(peers, str):
        raise TypeError("allowed_peers must be a collection of addresses, not one string")
    return tuple(ipaddress.ip_network(p, strict=False) for p in peers)


class AgiServer:
    """Accept FastAGI connections and hand each one to the handler of its route."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        *,
        host: str = "127.0.0.1",
        port: int = 4573,
        allowed_peers: Collection[str] | None = None,
        max_sessions: int = 500,
        reserved_routes: Collection[str] = (),
        reserved_sessions: int | None = None,
        max_line_bytes: int = 8192,
        max_headers: int = 256,
        header_timeout: float = 5.0,
        command_timeout: float = 5.0,
        session_timeout: float = 30.0,
        logger: Any = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        """``observe(route, seconds)``, when given, hears how long each route handler ran
        (e.g. a metrics histogram); the server itself keeps no timings.

        ``max_sessions`` bounds the sessions of ordinary routes (the call decisions);
        ``reserved_routes`` (the hangup report, which settles money) may use
        ``reserved_sessions`` more (default: a fifth of ``max_sessions``, at least 10), so
        that a burst of decisions cannot refuse a settlement. Past ``max_sessions +
        reserved_sessions`` connections at once, a new one is refused before its route is
        read (``rejected_busy_unread``); below that, a decision past ``max_sessions`` is
        refused once its route is read, and a reserved route always runs."""
        if PING_ROUTE in routes:
            raise ValueError(f"route {PING_ROUTE!r} is built in")
        self._routes = dict(routes)
        self._host = host
        self._port = port
        self._allowed = None if allowed_peers is None else _parse_networks(allowed_peers)
        self._max_sessions = max_sessions
        self._reserved_routes = frozenset(reserved_routes)
        if reserved_sessions is None:
            reserved_sessions = max(10, max_sessions // 5) if self._reserved_routes else 0
        self._reserved_sessions = reserved_sessions
        self._ordinary_active = 0  # sessions running a route that is not reserved
        self._max_line_bytes = max_line_bytes
        self._max_headers = max_headers
        self._header_timeout = header_timeout
        self._command_timeout = command_timeout
        self._session_timeout = session_timeout
        self._log = logger if logger is not None else _logger
        self._observe = observe
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)

    @property
    def port(self) -> int:
        """The bound port once started (useful with ``port=0``), else the configured one."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("AGI server already started")
        self._stopping = False
        self._server = await asyncio.start_server(
            self._handle_client,
            self._host,
            self._port,
            limit=self._max_line_bytes,
            # A burst of calls must not wait in the kernel: Asterisk gives up on a
            # FastAGI connect after about 2 s and applies its fail policy.
            backlog=max(128, self._max_sessions + self._reserved_sessions),
        )
        self._log.info("agi.listening", host=self._host, port=self.port)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let sessions finish for up to ``grace`` seconds, cancel the rest."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(grace, 0.0))
        if pending:
            self._log.warning("agi.stop_cancelling", sessions=len(pending))
            for task in pending:
                task.cancel()
            _, stuck = await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT + 1.0)
            if stuck:
                self._log.error("agi.stop_stuck", sessions=len(stuck))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await server.wait_closed()
        self._log.info("agi.stopped", stats=dict(self.stats))

    def _peer_allowed(self, host: str) -> bool:
        if self._allowed is None:
            return True
        try:
            addr = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a in net for a in candidates for net in self._allowed)

    async def _handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)
            await _close(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = (str(peername[0]), int(peername[1])) if peername else ("", 0)
        log = self._log.bind(peer=f"{peer[0]}:{peer[1]}")
        if self._stopping:
            return
        if not self._peer_allowed(peer[0]):
            self.stats["rejected_peer"] += 1
            log.warning("agi.peer_rejected")
            return
        if self.stats["sessions_active"] >= self._max_sessions + self._reserved_sessions:
            # Refused unread: this may be a hangup report (the reconciliation settles
            # its call later; see docs/operations.md).
            self.stats["rejected_busy"] += 1
            self.stats["rejected_busy_unread"] += 1
            log.warning("agi.busy", route=None, max_sessions=self._max_sessions,
                        reserved_sessions=self._reserved_sessions)
            return

        self.stats["sessions_active"] += 1
        self.stats["sessions_total"] += 1
        started = time.monotonic()
        session: AgiSession | None = None
        ordinary = False
        deadline = asyncio.timeout(self._session_timeout)
        try:
            async with deadline:
                request = await self._read_request(reader)
                log = log.bind(
                    uniqueid=request.uniqueid, channel=request.channel, script=request.script
                )
                if request.script not in self._reserved_routes:
                    if self._ordinary_active >= self._max_sessions:
                        # Send nothing: the dialplan denies a call without a decision.
                        self.stats["rejected_busy"] += 1
                        log.warning("agi.busy", route=request.script,
                                    max_sessions=self._max_sessions)
                        return
                    ordinary = True
                    self._ordinary_active += 1
                session = AgiSession(
                    reader,
                    writer,
                    request,
                    peer,
                    command_timeout=self._command_timeout,
                    log=log,
                )
                with structlog.contextvars.bound_contextvars(
                    uniqueid=request.uniqueid, channel=request.channel, script=request.script
                ):
                    await self._dispatch(session, log)
        except AgiTimeout as exc:
            self.stats["timeouts"] += 1
            log.warning("agi.timeout", error=str(exc))
        except AgiConnectionClosed as exc:
            log.info("agi.peer_closed", error=str(exc))
        except AgiProtocolError as exc:
            self.stats["protocol_errors"] += 1
            log.warning("agi.protocol_error", error=str(exc), raw=exc.raw)
        except TimeoutError:
            if deadline.expired():
                self.stats["timeouts"] += 1
                log.warning("agi.session_timeout", session_timeout=self._session_timeout)
            else:
                self.stats["handler_errors"] += 1
                log.exception("agi.handler_error")
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("agi.handler_error")
        finally:
            self.stats["sessions_active"] -= 1
            if ordinary:
                self._ordinary_active -= 1
            log.debug(
                "agi.session_end",
                duration_ms=round((time.monotonic() - started) * 1000),
                hung_up=session.hung_up if session is not None else None,
            )

    async def _read_request(self, reader: asyncio.StreamReader) -> AgiRequest:
        lines: list[str] = []
        deadline = asyncio.timeout(self._header_timeout)
        try:
            async with deadline:
                while True:
                    line = await _read_line(reader)
                    if line is None:
                        raise AgiConnectionClosed("closed before the end of the environment")
                    if line == "":
                        break
                    if len(lines) >= self._max_headers:
                        raise AgiProtocolError(
                            f"more than {self._max_headers} environment lines", raw=line
                        )
                    lines.append(line)
        except TimeoutError:
            if deadline.expired():
                raise AgiTimeout(f"environment incomplete after {self._header_timeout}s") from None
            raise
        return parse_environment(lines)

    async def _dispatch(self, session: AgiSession, log: Any) -> None:
        script = session.request.script
        if script == PING_ROUTE:
            await session.set_variable(PONG, "1")
            return
        handler = self._routes.get(script)
        if handler is None:
            # Send nothing: the dialplan denies unless the gateway set its decision.
            self.stats["unknown_route"] += 1
            log.warning("agi.unknown_route", request=session.request.request)
            return
        started = time.perf_counter()
        try:
            await handler(session)
        finally:
            if self._observe is not None:
                self._observe(script, time.perf_counter() - started)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()
