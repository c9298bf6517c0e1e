"""Real FastAGI sessions and AMI streams, replayed without a PBX or a database.

The transcripts in ``tests/fixtures/`` were recorded from Asterisk 22 talking to the
real gateway (``tests/record_transcripts.py``; format in ``tests/fixtures/README.md``).
Here a fake Asterisk plays the recorded Asterisk side, byte for byte, into our
``AgiServer`` and a fake AMI server plays the recorded stream into ``AmiClient``. Then
the same recordings are broken the way networks and peers break them: truncated at
every line of the environment, cut in the middle of a line, garbage, an extra
``HANGUP``, replies split across TCP writes, an AMI stream cut mid-event or with
garbage blocks. The server must answer or close cleanly and keep serving a normal
session at the same time; the AMI client must deliver every real event and never die.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway import dialplan_variables as var
from gateway.agi import AgiReply, AgiServer, AgiSession
from gateway.ami import AmiClient
from gateway.ami.events import Cdr, DialEnd, Hangup
from gateway.calls.announce import Announcements
from gateway.calls.service import CallService
from gateway.rating.model import Decision, Reason, Route, Source
from tests.support.agi import mset_items

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WITHIN = 3.0  # no single replay may take longer than this: a hang fails, it never blocks
CONCURRENT = 60  # connections replayed at once


# --- reading the fixtures (format: tests/fixtures/README.md) -------------------------------

_SIMPLE_ESCAPES = {"\\": b"\\", "r": b"\r", "n": b"\n", "t": b"\t"}


def unescape(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
        elif text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += _SIMPLE_ESCAPES[text[i + 1]]
            i += 2
    return bytes(out)


@dataclass(frozen=True)
class Step:
    """One event of an AGI connection: a side sent ``data`` (a line with its LF, or a
    fragment), or closed (``data is None``)."""

    side: str  # "A" Asterisk, "G" gateway
    data: bytes | None

    @property
    def line(self) -> str:
        assert self.data is not None
        return self.data.decode("utf-8", "replace").removesuffix("\n")


@dataclass(frozen=True)
class AgiTranscript:
    name: str
    steps: tuple[Step, ...]

    @classmethod
    def load(cls, path: Path) -> AgiTranscript:
        steps = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            if raw.startswith("#"):
                continue
            side, kind, payload = raw[0], raw[1], raw[3:]
            assert side in "AG" and kind in ">-.", f"{path.name}: bad line {raw!r}"
            if kind == ".":
                steps.append(Step(side, None))
            else:
                steps.append(Step(side, unescape(payload) + (b"\n" if kind == ">" else b"")))
        return cls(path.stem, tuple(steps))

    @property
    def env_end(self) -> int:
        """Index of the blank line that ends the environment block."""
        return next(i for i, s in enumerate(self.steps) if s.side == "A" and s.data == b"\n")

    @property
    def env_lines(self) -> list[bytes]:
        return [s.data for s in self.steps[: self.env_end]]

    @property
    def env(self) -> dict[str, str]:
        return dict(line.decode().rstrip("\n")[4:].split(": ", 1) for line in self.env_lines)

    @property
    def args(self) -> tuple[str, ...]:
        env = self.env
        return tuple(env[f"arg_{n}"] for n in range(1, 100) if f"arg_{n}" in env)

    @property
    def commands(self) -> list[str]:
        return [s.line for s in self.steps if s.side == "G" and s.data is not None]

    def expected_replies(self) -> list[tuple[str, bool]]:
        """For each command: the recorded final reply line, and whether a ``HANGUP`` had
        come before it (what ``session.hung_up`` must say once the reply is read)."""
        out: list[tuple[str, bool]] = []
        hangup_seen = False
        waiting = False
        for step in self.steps[self.env_end + 1 :]:
            if step.data is None:
                continue
            if step.side == "G":
                waiting = True
            elif step.line == "HANGUP":
                hangup_seen = True
            elif waiting and not step.line.startswith("100 "):
                out.append((step.line, hangup_seen))
                waiting = False
        return out

    def set_variables(self) -> dict[str, str]:
        """The variables the gateway set: one ``EXEC MSet "A=1,B=2"`` (or, in older
        recordings, one ``SET VARIABLE`` per variable)."""
        found = {}
        for command in self.commands:
            m = re.fullmatch(r'(SET VARIABLE (\S+)|EXEC MSet) "((?:[^"\\]|\\.)*)"', command)
            assert m, command
            value = re.sub(r"\\(.)", r"\1", m.group(3))
            if m.group(2):
                found[m.group(2)] = value
            else:
                found.update(mset_items(value))
        return found


@dataclass(frozen=True)
class AmiTranscript:
    name: str
    received: bytes  # every byte Asterisk sent on the recorder's connection

    @classmethod
    def load(cls, path: Path) -> AmiTranscript:
        received = b"".join(
            unescape(line[2:])
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("< ")
        )
        return cls(path.stem, received)

    @property
    def banner(self) -> bytes:
        return self.received[: self.received.index(b"\r\n") + 2]

    @property
    def blocks(self) -> list[bytes]:
        """Every message after the banner, each with its ``\\r\\n\\r\\n``."""
        body = self.received[len(self.banner) :]
        parts = body.split(b"\r\n\r\n")
        assert parts[-1] == b"", "the recorded stream ends mid-message"
        return [p + b"\r\n\r\n" for p in parts[:-1]]

    def response_to(self, action_id: bytes) -> bytes:
        return next(b for b in self.blocks if f"ActionID: {action_id.decode()}\r\n".encode() in b)

    @property
    def event_blocks(self) -> list[bytes]:
        return [b for b in self.blocks if b.startswith(b"Event: ")]

    @property
    def events(self) -> list[dict[str, str]]:
        """The events as plain dicts, parsed here independently of the client."""
        out = []
        for block in self.event_blocks:
            fields: dict[str, str] = {}
            for line in block[:-4].decode("utf-8").split("\r\n"):
                key, _, value = line.partition(": ")
                fields[key] = f"{fields[key]}\n{value}" if key in fields else value
            out.append(fields)
        return out


AGI = {p.stem: AgiTranscript.load(p) for p in sorted((FIXTURES / "agi").glob("*.txt"))}
AMI = {p.stem: AmiTranscript.load(p) for p in sorted((FIXTURES / "ami").glob("*.txt"))}
AGI_WITH_COMMANDS = [name for name, t in AGI.items() if t.commands]
NORMAL = "domestic_answered-outbound"  # served alongside every broken session


# --- the fake Asterisk --------------------------------------------------------------------


@dataclass
class Replayed:
    """What the server did to one replayed connection."""

    port: int  # our local port = session.peer[1] on the server side
    received: list[bytes] = field(default_factory=list)  # lines the server sent
    closed: bool = False  # the server closed the connection (within WITHIN)


async def replay(port: int, steps: Sequence[Step], *, split: bool = False) -> Replayed:
    """Play the Asterisk side of ``steps`` against the server on ``port``.

    A lines are written (with ``split``: in three TCP writes each); at each G line one
    line is read from the server; at "A closed" our side shuts its writing half. The
    server's lines and whether it closed are returned, not asserted, so that a server
    that says something else than recorded shows up in the test's assertion.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    result = Replayed(port=writer.get_extra_info("sockname")[1])
    try:
        async with asyncio.timeout(WITHIN):
            for step in steps:
                if step.side == "G":
                    if step.data is None:
                        break  # checked below: the server must close
                    line = await reader.readline()
                    if not line:
                        result.closed = True
                        return result
                    result.received.append(line)
                elif step.data is None:
                    writer.write_eof()
                else:
                    with contextlib.suppress(ConnectionError):
                        await _write(writer, step.data, split)
            while line := await reader.readline():
                result.received.append(line)
            result.closed = True
    except TimeoutError:
        pass
    except ConnectionError:
        result.closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return result


async def replay_all(port: int, variants: Sequence[Sequence[Step]]) -> list[Replayed]:
    """Replay many connections at once, at most ``CONCURRENT`` at a time: more than the
    listen backlog (asyncio's default, 100) would leave some waiting for a SYN retry."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(steps: Sequence[Step]) -> Replayed:
        async with gate:
            return await replay(port, steps)

    return await asyncio.gather(*(one(steps) for steps in variants))


async def _write(writer: asyncio.StreamWriter, data: bytes, split: bool) -> None:
    if not split or len(data) < 3:
        writer.write(data)
        await writer.drain()
        return
    third = len(data) // 3
    for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.002)  # separate segments on the wire


class ReplayRoutes:
    """A route that issues exactly the commands recorded for the session's call."""

    def __init__(self) -> None:
        self.by_call = {(t.env["uniqueid"], t.env["network_script"]): t for t in AGI.values()}
        self.sessions: dict[int, dict[str, Any]] = {}

    async def handle(self, session: AgiSession) -> None:
        request = session.request
        seen: dict[str, Any] = {"args": request.args, "replies": []}
        self.sessions[session.peer[1]] = seen
        transcript = self.by_call[(request.uniqueid, request.script)]
        for command in transcript.commands:
            reply = await session.command(command)
            seen["replies"].append((reply, session.hung_up))
        seen["done"] = True

    def routes(self) -> dict[str, Callable[[AgiSession], Any]]:
        return dict.fromkeys(("outbound", "inbound", "hangup"), self.handle)


@pytest.fixture
async def agi_server():
    servers: list[AgiServer] = []

    async def start(routes, **options) -> AgiServer:
        options = {"header_timeout": 0.4, "command_timeout": 0.4, "session_timeout": 2.0,
                   **options}
        server = AgiServer(routes, port=0, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0)


def _result_of(line: str) -> str | None:
    m = re.match(r"\d{3} result=(\S*)", line)
    return m.group(1) if m else None


def assert_replayed_as_recorded(t: AgiTranscript, done: Replayed, routes: ReplayRoutes) -> None:
    assert done.closed, f"{t.name}: the server did not close"
    assert [line.decode().rstrip("\n") for line in done.received] == t.commands
    seen = routes.sessions.get(done.port)
    assert seen is not None and seen.get("done"), f"{t.name}: the handler did not finish"
    assert seen["args"] == t.args
    replies: list[tuple[AgiReply, bool]] = seen["replies"]
    expected = t.expected_replies()
    assert len(replies) == len(expected) == len(t.commands)
    for (reply, hung_up), (line, hangup_before) in zip(replies, expected, strict=True):
        assert reply.raw == line
        assert reply.code == int(line[:3])
        assert reply.result == _result_of(line)
        assert hung_up == hangup_before


async def assert_serves_normally(server: AgiServer, routes: ReplayRoutes, normal) -> None:
    done = await normal
    assert_replayed_as_recorded(AGI[NORMAL], done, routes)
    assert server.stats["sessions_active"] == 0
    assert server.stats["handler_errors"] == 0


# --- the recordings themselves --------------------------------------------------------------


def test_recordings_hold_the_cases_the_tests_rely_on():
    assert {t.env["network_script"] for t in AGI.values()} == set(var.ROUTES)
    decisions = {t.name: t.set_variables().get(var.DECISION) for t in AGI.values()}
    assert decisions["no_license-outbound"] == "REJECT"
    assert decisions["domestic_answered-outbound"] == decisions["toll_free_inbound-inbound"] \
        == "ALLOW"
    gone = AGI["caller_gone_while_deciding-outbound"]
    first_command = next(i for i, s in enumerate(gone.steps) if s.side == "G")
    assert Step("A", b"HANGUP\n") in gone.steps[gone.env_end : first_command]
    # every answer with a call id pushed the hangup handler, and the real PBX ran it:
    # each such call has a hangup recording, the caller gone while deciding included
    for t in AGI.values():
        answer = t.set_variables()
        if var.CALL_ID in answer:
            assert answer[var.HANGUP_HANDLER] == var.HANGUP_HANDLER_AT, t.name
            assert f"{t.name.rsplit('-', 1)[0]}-hangup" in AGI, t.name
        elif t.env["network_script"] != var.HANGUP_ROUTE:
            assert var.HANGUP_HANDLER not in answer, t.name
    # What real Asterisk does that a hand-written fake might not: one more HANGUP once
    # the gateway has closed its side, in every session.
    for t in AGI.values():
        assert t.steps[-3:] == (Step("G", None), Step("A", b"HANGUP\n"), Step("A", None)), t.name
    statuses = {name: [e.get("DialStatus") for e in a.events if e["Event"] == "DialEnd"]
                for name, a in AMI.items()}
    assert statuses["domestic_answered"] == statuses["toll_free_inbound"] == ["ANSWER"]
    assert statuses["cancelled_ringing"] == ["CANCEL"]
    assert statuses["no_license"] == statuses["caller_gone_while_deciding"] == []


# --- AGI: the recordings as they were ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AGI))
async def test_agi_session_replays_as_recorded(agi_server, name):
    routes = ReplayRoutes()
    server = await agi_server(routes.routes())
    t = AGI[name]
    done = await replay(server.port, t.steps)
    assert_replayed_as_recorded(t, done, routes)
    assert server.stats["sessions_total"] == 1
    assert (server.stats["protocol_errors"], server.stats["handler_errors"]) == (0, 0)


class StubRater:
    """Answers as the real rater did in the recording; records what it was asked."""

    def __init__(self, decision: Decision | None = None) -> None:
        self.decision = decision
        self.asked: list[tuple[Any, ...]] = []

    async def authorise_outbound(self, endpoint, dialled, *, pbx_uniqueid, linkedid, pbx):
        # the recordings come from a PBX without GW_PBX: the sole PBX configured
        assert pbx == "default"
        self.asked.append(("outbound", endpoint, dialled, pbx_uniqueid, linkedid))
        return self.decision

    async def authorise_inbound(self, called, caller, *, pbx_uniqueid, linkedid, pbx):
        assert pbx == "default"
        self.asked.append(("inbound", called, caller, pbx_uniqueid, linkedid))
        return self.decision

    async def settle(self, call_id, billable, *, by, fence=None):
        self.asked.append(("settle", call_id, billable, by))
        return _Settled()

    async def release(self, call_id, *, by, fence=None):
        self.asked.append(("release", call_id, by))
        return _Settled()

    async def answered(self, call_id, at):
        self.asked.append(("answered", call_id))
        return True

    def clock(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class StubRecovery:
    """The store's side of reconciliation: no call is open there."""

    async def open_call_id(self, pbx_uniqueid):
        return None


@dataclass
class _Settled:
    outcome: str = "settled"


def recorded_decision(t: AgiTranscript) -> Decision:
    v = t.set_variables()
    route = Route(v[var.ROUTE]) if v.get(var.ROUTE) else None
    number = v.get(var.NUMBER, "")
    return Decision(
        allow=v[var.DECISION] == "ALLOW",
        reason=Reason(v[var.REASON]),
        call_id=uuid.UUID(v[var.CALL_ID]) if v.get(var.CALL_ID) else None,
        route=route,
        funded_seconds=int(v[var.FUNDED]) if v.get(var.FUNDED) else None,
        destination=f"+{number}" if route in (Route.PSTN, Route.PARTNER) else number,
        target=v.get(var.TARGET) or None,
        sources=(Source.POOL,),
    )


@pytest.mark.parametrize("name", sorted(AGI))
async def test_call_routes_answer_the_recorded_sessions_as_the_gateway_did(agi_server, name):
    """The real routes of gateway.calls, with the rater's recorded answer, send what the
    gateway sent to the real Asterisk; a hangup report settles what Asterisk reported."""
    t = AGI[name]
    script = t.env["network_script"]
    rater = StubRater(recorded_decision(t) if script != var.HANGUP_ROUTE else None)
    # the recording's gateway ran with its stock announcements, as the gateway does
    calls = CallService(rater, StubRecovery(),  # type: ignore[arg-type]
                        announcements=Announcements())
    server = await agi_server(calls.routes())
    done = await replay(server.port, t.steps)
    await calls.stop()

    assert done.closed
    assert [line.decode().rstrip("\n") for line in done.received] == t.commands
    assert (server.stats["protocol_errors"], server.stats["handler_errors"]) == (0, 0)
    args = t.args
    if script == var.OUTBOUND_ROUTE:  # dialled, the caller's endpoint, linkedid
        assert rater.asked == [("outbound", args[1], args[0], t.env["uniqueid"], args[2])]
    elif script == var.INBOUND_ROUTE:  # called, caller id, linkedid
        assert rater.asked == [("inbound", args[0], args[1], t.env["uniqueid"], args[2])]
    else:  # call id, ANSWEREDTIME_MS, DIALSTATUS, CDR(billsec)
        call_id = uuid.UUID(args[0])
        billable = int(args[1]) // 1000  # whole seconds, truncated like the CDR
        if args[2] == "ANSWER":
            assert billable == int(args[3]) > 0  # the same figure as CDR(billsec)
            assert rater.asked == [("settle", call_id, billable, "agi")]
        else:
            assert billable == 0
            assert rater.asked == [("release", call_id, "agi")]


# --- AGI: broken variants of the recordings, each beside a normal session --------------------


async def test_environment_truncated_at_every_line_boundary(agi_server):
    """EOF after any number of environment lines: closed at once, no handler, no command;
    the same truncation without EOF (one session of each route): closed by the header
    timeout."""
    routes = ReplayRoutes()
    server = await agi_server(routes.routes(), header_timeout=0.2)
    cases = [t.steps[:n] for t in AGI.values() for n in range(t.env_end + 1)]
    one_per_route = {t.env["network_script"]: t for t in AGI.values()}.values()
    stalls = [t.steps[:n] for t in one_per_route for n in range(t.env_end + 1)]
    normal = asyncio.create_task(replay(server.port, AGI[NORMAL].steps))
    started = time.monotonic()
    closed = await replay_all(server.port, [[*steps, Step("A", None)] for steps in cases])
    stalled = await replay_all(server.port, stalls)
    await assert_serves_normally(server, routes, normal)

    assert all(done.closed and done.received == [] for done in closed + stalled)
    assert time.monotonic() - started < WITHIN
    assert not set(routes.sessions) & {done.port for done in closed + stalled}
    assert server.stats["timeouts"] == len(stalled)
    assert server.stats["protocol_errors"] == 0
    assert server.stats["sessions_total"] == len(cases) + len(stalled) + 1


async def test_line_cut_in_the_middle(agi_server):
    """An environment line or a reply cut mid-way, then EOF or silence: the session ends
    cleanly (the command that got half a reply is the last one sent)."""
    routes = ReplayRoutes()
    server = await agi_server(routes.routes())
    broken: list[tuple[list[Step], int]] = []  # (steps, commands the server should send)
    for t in AGI.values():
        for n in (0, t.env_end // 2, t.env_end - 1):
            line = t.steps[n].data
            cut = [*t.steps[:n], Step("A", line[: len(line) // 2])]
            broken += [([*cut, Step("A", None)], 0), (cut, 0)]
        if t.commands:
            first = next(i for i, s in enumerate(t.steps) if s.side == "G")
            reply = next(s for s in t.steps[first:] if s.side == "A" and s.line != "HANGUP")
            head = [s for s in t.steps[: first + 1]]
            cut = [*head, Step("A", reply.data[: len(reply.data) // 2])]
            broken += [([*cut, Step("A", None)], 1), (cut, 1)]
    normal = asyncio.create_task(replay(server.port, AGI[NORMAL].steps))
    done = await replay_all(server.port, [steps for steps, _ in broken])
    await assert_serves_normally(server, routes, normal)

    for (_, commands), result in zip(broken, done, strict=True):
        assert result.closed
        assert len(result.received) == commands
        seen = routes.sessions.get(result.port)
        assert seen is None or "done" not in seen
    assert server.stats["protocol_errors"] == 0


GARBAGE_LINES = [
    b"\x00\xff\xfe\x80\x81 binary\n",
    b"GET / HTTP/1.1\r\n",
    b"agi_channel PJSIP/no-colon\n",
]


async def test_garbage_gets_a_clean_close(agi_server):
    """Garbage in place of an environment line, before the environment, in place of a
    reply, or as one endless line: a protocol error, the connection closed, nothing
    more sent."""
    routes = ReplayRoutes()
    server = await agi_server(routes.routes(), max_line_bytes=4096)
    broken: list[tuple[list[Step], int]] = []
    endless = Step("A", b"\xff" * 10_000)
    for t in AGI.values():
        for garbage in GARBAGE_LINES:
            bad = Step("A", garbage)
            broken.append(([bad, *t.steps], 0))
            middle = t.env_end // 2
            broken.append(([*t.steps[:middle], bad, *t.steps[middle + 1 :]], 0))
            if t.commands:
                first = next(i for i, s in enumerate(t.steps) if s.side == "G")
                broken.append(([*t.steps[: first + 1], bad, *t.steps[first + 1 :]], 1))
        broken.append(([*t.steps[:3], endless], 0))
    normal = asyncio.create_task(replay(server.port, AGI[NORMAL].steps))
    done = await replay_all(server.port, [steps for steps, _ in broken])
    await assert_serves_normally(server, routes, normal)

    for (_, commands), result in zip(broken, done, strict=True):
        assert result.closed
        assert len(result.received) == commands
    assert server.stats["protocol_errors"] == len(broken)


async def test_extra_unsolicited_hangup_before_every_reply(agi_server):
    """A HANGUP before each reply (Asterisk sends it whenever the channel goes): the same
    commands, the same replies, and the session knows the channel is gone."""
    routes = ReplayRoutes()
    server = await agi_server(routes.routes())
    hangup = Step("A", b"HANGUP\n")
    variants = {}
    for t in AGI.values():
        steps: list[Step] = []
        for step in t.steps:
            steps.append(step)
            if step.side == "G" and step.data is not None:
                steps.append(hangup)
        variants[t.name] = steps
    normal = asyncio.create_task(replay(server.port, AGI[NORMAL].steps))
    done = await asyncio.gather(*(replay(server.port, s) for s in variants.values()))
    await assert_serves_normally(server, routes, normal)

    for name, result in zip(variants, done, strict=True):
        t = AGI[name]
        assert result.closed
        assert [line.decode().rstrip("\n") for line in result.received] == t.commands
        if t.commands:
            replies = routes.sessions[result.port]["replies"]
            assert [r.raw for r, _ in replies] == [line for line, _ in t.expected_replies()]
            assert all(hung_up for _, hung_up in replies)
    assert (server.stats["protocol_errors"], server.stats["handler_errors"]) == (0, 0)


async def test_every_line_split_across_tcp_writes(agi_server):
    routes = ReplayRoutes()
    server = await agi_server(routes.routes())
    normal = asyncio.create_task(replay(server.port, AGI[NORMAL].steps))
    names = AGI_WITH_COMMANDS
    done = await asyncio.gather(*(replay(server.port, AGI[n].steps, split=True) for n in names))
    await assert_serves_normally(server, routes, normal)
    for name, result in zip(names, done, strict=True):
        assert_replayed_as_recorded(AGI[name], result, routes)
    assert server.stats["protocol_errors"] == 0


# --- AMI: a fake server playing the recorded stream -----------------------------------------


class AmiReplay:
    """Serves a recorded stream: the banner, the recorded answer to Login (with the
    client's ActionID), then one payload per connection; later connections get the
    next payload. ``close_after`` closes the connection once its payload is sent."""

    def __init__(self, t: AmiTranscript, payloads: list[bytes], close_after: list[bool]):
        self.t = t
        self.payloads = payloads
        self.close_after = close_after
        self.logins = 0
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    def _answer(self, recorded_to: bytes, action: bytes) -> bytes:
        action_id = re.search(rb"ActionID: (.*)\r\n", action).group(1)
        recorded = self.t.response_to(recorded_to)
        return re.sub(rb"ActionID: .*\r\n", lambda _: b"ActionID: " + action_id + b"\r\n",
                      recorded, count=1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        index = min(self.connections, len(self.payloads) - 1)
        self.connections += 1
        try:
            writer.write(self.t.banner)
            login = await reader.readuntil(b"\r\n\r\n")
            assert login.startswith(b"Action: Login\r\n")
            self.logins += 1
            writer.write(self._answer(b"tap-login", login))
            writer.write(self.payloads[index])
            await writer.drain()
            if self.close_after[index]:
                return
            while True:
                action = await reader.readuntil(b"\r\n\r\n")
                if action.startswith(b"Action: Logoff\r\n"):
                    writer.write(self._answer(b"tap-logoff", action))
                    return
                action_id = re.search(rb"ActionID: (.*)\r\n", action).group(1)
                writer.write(b"Response: Success\r\nActionID: " + action_id + b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def ami_replay():
    started: list[tuple[AmiReplay, AmiClient]] = []

    async def start(t: AmiTranscript, payloads: list[bytes], close_after: list[bool] | None = None,
                    handlers: dict[type, Callable[[Any], Any]] | None = None
                    ) -> tuple[AmiReplay, AmiClient, list[dict[str, str]]]:
        fake = AmiReplay(t, payloads, close_after or [False] * len(payloads))
        port = await fake.start()
        client = AmiClient("127.0.0.1", port, "gateway", "not-the-recorded-secret",
                           action_timeout=0.5, ping_interval=60.0, connect_timeout=0.5,
                           backoff_initial=0.02, backoff_max=0.1)
        for event, handler in (handlers or {}).items():
            client.on(event, handler)
        delivered: list[dict[str, str]] = []
        client.on_event("*", delivered.append)  # runs after the named handlers of an event
        started.append((fake, client))
        await client.start()
        return fake, client, delivered

    yield start
    for fake, client in started:
        await client.stop()
        await fake.close()


async def until(predicate: Callable[[], bool], within: float = WITHIN) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _one(events: list[dict[str, str]], name: str) -> dict[str, str]:
    [event] = [e for e in events if e["Event"] == name]
    return event


@pytest.mark.parametrize("name", sorted(AMI))
async def test_ami_client_delivers_the_recorded_events(ami_replay, name):
    t = AMI[name]
    fake, client, delivered = await ami_replay(t, [b"".join(t.event_blocks)])
    await until(lambda: len(delivered) >= len(t.events))
    await asyncio.sleep(0.05)  # nothing more may come

    assert delivered == t.events
    assert [e["Event"] for e in delivered][0] == "FullyBooted"
    assert client.state == "connected" and client.reconnects == 0
    assert client.status()["ami_version"] == t.banner.decode().strip().rpartition("/")[2]


@pytest.mark.parametrize(("call", "route", "callee"), [
    ("domestic_answered", "outbound", "PJSIP/carrier-"),
    ("toll_free_inbound", "inbound", "PJSIP/alice-"),
])
async def test_ami_answer_and_cdr_name_the_channel_the_agi_session_announced(
        ami_replay, call, route, callee):
    """What gateway.calls keys on: DialEnd's Uniqueid and Cdr's UniqueID are the AGI
    session's agi_uniqueid; DestChannel is the callee, where the deadline is moved."""
    t = AMI[call]
    _, _, delivered = await ami_replay(t, [b"".join(t.event_blocks)])
    await until(lambda: len(delivered) >= len(t.events))
    uniqueid = AGI[f"{call}-{route}"].env["uniqueid"]
    dial_end, cdr = _one(delivered, "DialEnd"), _one(delivered, "Cdr")
    assert (dial_end["DialStatus"], dial_end["Uniqueid"]) == ("ANSWER", uniqueid)
    assert dial_end["DestChannel"].startswith(callee)
    assert (cdr["UniqueID"], cdr["Disposition"]) == (uniqueid, "ANSWERED")
    assert int(cdr["BillableSeconds"]) >= 1
    assert cdr["UserField"] == "" and cdr["AccountCode"] == ""  # empty values kept
    # the typed events read the same ids whatever the header's case
    assert DialEnd.parse(dial_end).uniqueid == Cdr.parse(cdr).uniqueid == uniqueid
    assert DialEnd.parse(dial_end).answered and Cdr.parse(cdr).answered
    hangup = AGI[f"{call}-hangup"]
    assert hangup.args[2] == "ANSWER" and int(hangup.args[3]) == int(cdr["BillableSeconds"])


# What gateway.calls does with each recorded call's events, after the AGI decision.
AMI_OUTCOMES = {
    "domestic_answered": ["answered", "settle"],
    "toll_free_inbound": ["answered", "settle"],
    "cancelled_ringing": ["release"],
    "no_license": [],  # rejected: nothing tracked, no Cdr (cdr.conf unanswered = no)
    "caller_gone_while_deciding": [],  # no Dial, no Cdr: only the hangup AGI ends it
}


@pytest.mark.parametrize("call", sorted(AMI))
async def test_call_service_follows_a_recorded_call_from_agi_to_ami(agi_server, ami_replay,
                                                                   call):
    """The recorded decision session, then the recorded AMI stream, into gateway.calls
    (the rater stubbed): DialEnd marks the call answered, Cdr settles it with the
    PBX's billable seconds, or releases it when nothing was answered."""
    [decide] = [t for name, t in AGI.items()
                if name.startswith(f"{call}-") and not name.endswith("-hangup")]
    decision = recorded_decision(decide)
    rater = StubRater(decision)
    calls = CallService(rater, StubRecovery())  # type: ignore[arg-type]
    server = await agi_server(calls.routes())
    assert (await replay(server.port, decide.steps)).closed
    t = AMI[call]
    handlers = {DialEnd: calls.on_dial_end, Cdr: calls.on_cdr, Hangup: calls.on_hangup}
    _, _, delivered = await ami_replay(t, [b"".join(t.event_blocks)], handlers=handlers)
    await until(lambda: len(delivered) >= len(t.events))
    await calls.stop()

    after = rater.asked[1:]
    assert [a[0] for a in after] == AMI_OUTCOMES[call]
    cdrs = [e for e in t.events if e["Event"] == "Cdr"]
    if "settle" in AMI_OUTCOMES[call]:
        assert after[-1] == ("settle", decision.call_id, int(cdrs[0]["BillableSeconds"]), "cdr")
    if "release" in AMI_OUTCOMES[call]:
        assert after[-1] == ("release", decision.call_id, "cdr")
    assert bool(calls.live) == (call == "caller_gone_while_deciding")


async def test_ami_cancelled_call_has_no_billable_time(ami_replay):
    t = AMI["cancelled_ringing"]
    _, _, delivered = await ami_replay(t, [b"".join(t.event_blocks)])
    await until(lambda: len(delivered) >= len(t.events))
    assert _one(delivered, "DialEnd")["DialStatus"] == "CANCEL"
    cdr = _one(delivered, "Cdr")
    assert (cdr["Disposition"], cdr["BillableSeconds"]) == ("NO ANSWER", "0")


async def test_ami_stream_cut_mid_event_reconnects_and_goes_on(ami_replay):
    """The link drops in the middle of DialEnd: the half event is never delivered, the
    client logs in again and the events sent on the new link all arrive once."""
    t = AMI["domestic_answered"]
    blocks = t.event_blocks
    k = next(i for i, b in enumerate(blocks) if b.startswith(b"Event: DialEnd\r\n"))
    cut = b"".join(blocks[:k]) + blocks[k][: len(blocks[k]) // 2]
    fake, client, delivered = await ami_replay(t, [cut, b"".join(blocks[k:])], [True, False])
    await until(lambda: len(delivered) >= len(blocks))
    await asyncio.sleep(0.05)

    assert delivered == t.events
    assert (fake.logins, client.reconnects, client.state) == (2, 1, "connected")


GARBAGE_BLOCKS = [
    b"\x00\xff\xfe\x80\r\n\r\n",
    b"this is not a header\r\nnor is this\r\n\r\n",
    b"Event:\r\n\r\n",
    b"\r\n\r\n",
    b"Response: Success\r\nActionID: nobody-asked\r\nMessage: stray\r\n\r\n",
]


async def test_ami_garbage_blocks_are_skipped_and_later_events_delivered(ami_replay):
    t = AMI["domestic_answered"]
    mixed = b"".join(block + GARBAGE_BLOCKS[i % len(GARBAGE_BLOCKS)]
                     for i, block in enumerate(t.event_blocks))
    fake, client, delivered = await ami_replay(t, [mixed])
    await until(lambda: len(delivered) >= len(t.events))
    await asyncio.sleep(0.05)

    assert delivered == t.events
    assert (client.state, client.reconnects) == ("connected", 0)


async def test_ami_endless_garbage_drops_the_link_and_reconnects(ami_replay):
    """More than the client's read limit without a block terminator: the link is given
    up, the client reconnects and delivers what the new link brings."""
    t = AMI["toll_free_inbound"]
    blocks = t.event_blocks
    half = len(blocks) // 2
    flood = b"".join(blocks[:half]) + b"X" * (1024 * 1024 + 10)
    fake, client, delivered = await ami_replay(t, [flood, b"".join(blocks[half:])])
    await until(lambda: len(delivered) >= len(blocks))
    await asyncio.sleep(0.05)

    assert delivered == t.events
    assert (fake.logins, client.reconnects, client.state) == (2, 1, "connected")
    assert "larger than" in (client.last_error or "")
