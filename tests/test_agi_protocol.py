"""FastAGI protocol and server, against a scripted fake Asterisk over real TCP on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from gateway.agi import (
    AgiProtocolError,
    AgiServer,
    AgiSession,
    AgiTimeout,
    parse_environment,
    parse_reply,
    quote,
)

UNIQUEID = "1700000000.1"
CHANNEL = "PJSIP/alice-00000000"

# The environment block in the order Asterisk 22 sends it (see asterisk-notes, FastAGI).
BASE_ENV = [
    ("network", "yes"),
    ("network_script", "outbound"),
    ("request", "agi://127.0.0.1:4573/outbound"),
    ("channel", CHANNEL),
    ("language", "en"),
    ("type", "PJSIP"),
    ("uniqueid", UNIQUEID),
    ("version", "22.1.0"),
    ("callerid", "1001"),
    ("calleridname", "Alice Example"),
    ("callingpres", "0"),
    ("callingani2", "0"),
    ("callington", "0"),
    ("callingtns", "0"),
    ("dnid", "0049301234567"),
    ("rdnis", "unknown"),
    ("context", "from-phones"),
    ("extension", "0049301234567"),
    ("priority", "2"),
    ("enhanced", "0.0"),
    ("accountcode", ""),
    ("threadid", "140211234567890"),
]


def env_lines(script: str = "outbound", args: Sequence[str] = ()) -> list[str]:
    lines = []
    for key, value in BASE_ENV:
        if key == "network_script":
            value = script
        elif key == "request":
            value = f"agi://127.0.0.1:4573/{script}"
        lines.append(f"agi_{key}: {value}")
    lines += [f"agi_arg_{i}: {arg}" for i, arg in enumerate(args, start=1)]
    return lines


def env_block(script: str = "outbound", args: Sequence[str] = ()) -> bytes:
    return ("\n".join(env_lines(script, args)) + "\n\n").encode()


class FakeAsterisk:
    """A scripted Asterisk: sends an environment, answers each command with the next reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.commands: list[str] = []

    @classmethod
    async def connect(cls, port: int) -> FakeAsterisk:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, replies: Sequence[str]) -> None:
        """Read a command, send the next scripted reply; stop at EOF or when replies run out."""
        for reply in replies:
            line = await self.reader.readline()
            if not line:
                return
            self.commands.append(line.decode().rstrip("\n"))
            await self.send(reply.encode())

    async def wait_closed(self, within: float = 2.0) -> bool:
        """True once the server closed the connection; unanswered commands are recorded."""
        async with asyncio.timeout(within):
            try:
                while line := await self.reader.readline():
                    self.commands.append(line.decode().rstrip("\n"))
            except ConnectionResetError:
                pass
        self.writer.close()
        return True


async def call(port: int, replies: Sequence[str] = (), script: str = "outbound", args=()):
    fake = await FakeAsterisk.connect(port)
    await fake.send(env_block(script, args))
    await fake.answer(replies)
    assert await fake.wait_closed()
    return fake


def recording_handler():
    """A handler that only records that it ran, and the list it records into."""
    calls: list[str] = []

    async def handler(session: AgiSession) -> None:
        calls.append(session.request.script)

    return calls, handler


@pytest.fixture
async def serve():
    servers: list[AgiServer] = []

    async def start(routes=None, **options) -> AgiServer:
        server = AgiServer(routes or {}, port=0, **options)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0)


# --- pure parsing ---------------------------------------------------------------------------


def test_environment_parsing_with_args_and_script_path():
    lines = env_lines("outbound/extra?mode=x", args=["0049301234567", UNIQUEID, "", "a b"])
    # Numbered, not listed, order: arg_10 and arg_11 come first on the wire.
    lines = lines[:-4] + [f"agi_arg_{n}: a{n}" for n in range(11, 4, -1)] + lines[-4:]
    request = parse_environment([line + "\r\n" for line in lines] + ["\n", "agi_ignored: x"])

    assert request.script == "outbound"
    assert request.args == ("0049301234567", UNIQUEID, "", "a b", *(f"a{n}" for n in range(5, 12)))
    assert request.env["network_script"] == "outbound/extra?mode=x"
    assert request.env["accountcode"] == ""
    assert request.env["calleridname"] == "Alice Example"
    assert "agi_channel" not in request.env and "ignored" not in request.env
    assert request.channel == CHANNEL
    assert request.uniqueid == UNIQUEID
    assert request.callerid == "1001"
    assert request.extension == "0049301234567"
    assert request.context == "from-phones"
    assert request.request == "agi://127.0.0.1:4573/outbound/extra?mode=x"
    with pytest.raises(TypeError):
        request.env["channel"] = "x"  # type: ignore[index]


def test_environment_script_falls_back_to_request_url():
    request = parse_environment(["agi_request: agi://10.0.0.1:4573/authorize?x=1", ""])
    assert request.script == "authorize"
    assert request.args == ()


@pytest.mark.parametrize(
    "lines",
    [
        ["agi_channel PJSIP/x"],  # no colon
        ["channel: PJSIP/x"],  # no agi_ prefix
        ["agi_: x"],
        ["agi_channel: a", "agi_channel: b"],  # repeated key
        ["agi_arg_1: alice\x00"],  # NUL: never from Asterisk, refused by PostgreSQL
    ],
)
def test_environment_rejects_malformed_lines(lines):
    with pytest.raises(AgiProtocolError) as info:
        parse_environment(lines)
    assert info.value.raw in lines


@pytest.mark.parametrize(
    ("line", "code", "result", "data"),
    [
        ("200 result=1 (tenant1)", 200, "1", "tenant1"),
        ("200 result=1", 200, "1", None),
        ("200 result=-1", 200, "-1", None),
        ("200 result=0 endpos=1234", 200, "0", None),
        ("200 result= (timeout)", 200, "", "timeout"),
        ("200 result=1 (hangup)", 200, "1", "hangup"),
        ("200 result=1 (a b (c) d)", 200, "1", "a b (c) d"),
        ("200 result=1 ()", 200, "1", ""),
        ("200 result=1 (tenant1)\r\n", 200, "1", "tenant1"),
        ("510 Invalid or unknown command", 510, None, None),
        ("511 Command Not Permitted on a dead channel or intercept routine", 511, None, None),
        ("520 Invalid command syntax.  Proper usage not available.", 520, None, None),
        ("503 result=-2 Memory allocation failure", 503, "-2", None),
        ("100 result=0 Trying...", 100, "0", None),
    ],
)
def test_parse_reply(line, code, result, data):
    reply = parse_reply(line)
    assert (reply.code, reply.result, reply.data) == (code, result, data)
    assert reply.raw == line.rstrip("\r\n")


def test_parse_multiline_520():
    lines = [
        "520-Invalid command syntax.  Proper usage follows:",
        " Usage: GET VARIABLE <variablename>",
        "520 End of proper usage.",
    ]
    reply = parse_reply(lines)
    assert reply.code == 520
    assert reply.result is None
    assert reply.raw == "\n".join(lines)


@pytest.mark.parametrize(
    "lines",
    [
        "HANGUP",
        "",
        "200",
        "200 resulting",
        "20 result=1",
        "hello",
        ["520-Invalid command syntax.  Proper usage follows:", "Usage: x"],
        ["200 result=1", "200 result=1"],
    ],
)
def test_parse_reply_rejects_garbage(lines):
    with pytest.raises(AgiProtocolError) as info:
        parse_reply(lines)
    expected = lines if isinstance(lines, str) else "\n".join(lines)
    assert info.value.raw == expected


def asterisk_parse_args(line: str) -> list[str]:
    """Python transcription of res_agi.c parse_args(), to check quote() round-trips."""
    argv: list[str] = []
    quoted = escaped = False
    whitespace = True
    for ch in line:
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                argv.append("")
                whitespace = False
            continue
        if ch in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            argv.append("")
            whitespace = False
        argv[-1] += ch
        escaped = False
    return argv


@pytest.mark.parametrize(
    "value", ["", "ALLOW", "no credit left", 'say "hi"', "back\\slash", '\\"', "trail\\", "ü €"]
)
def test_quote_round_trips_through_asterisk_parser(value):
    quoted = quote(value)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert asterisk_parse_args(f"SET VARIABLE GW_REASON {quoted}") == [
        "SET",
        "VARIABLE",
        "GW_REASON",
        value,
    ]


def test_quote_escapes_and_rejects_line_breaks():
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    for bad in ("a\nSET VARIABLE X 1", "a\rb"):
        with pytest.raises(ValueError):
            quote(bad)


# --- server: conversation -----------------------------------------------------------------


async def test_replies_and_unsolicited_hangup_do_not_desync(serve):
    results: list[object] = []

    async def outbound(session: AgiSession) -> None:
        results.append(session.request.args)
        results.append(await session.get_variable("CDR(accountcode)"))
        results.append(session.hung_up)
        results.append((await session.command("FOO")).code)
        reply = await session.command("GET VARIABLE")
        results.append((reply.code, "Usage: GET VARIABLE" in reply.raw))
        results.append(await session.get_variable("ACTION"))
        results.append((await session.command("ANSWER")).code)
        results.append(await session.get_variable("NOPE"))
        results.append((await session.command("GOSUB sub s 1")).result)
        reply = await session.set_variable("GW_REASON", 'no "credit" \\ left')
        results.append((reply.code, reply.result))

    server = await serve({"outbound": outbound})
    fake = await call(
        server.port,
        args=["0049301234567", UNIQUEID],
        replies=[
            "HANGUP\n200 result=1 (tenant1)\n",
            "510 Invalid or unknown command\n",
            "520-Invalid command syntax.  Proper usage follows:\n"
            " Usage: GET VARIABLE <variablename>\n"
            " Returns 0 if <variablename> is not set.\n"
            "520 End of proper usage.\n",
            "200 result=1 (hangup)\r\n",
            "511 Command Not Permitted on a dead channel or intercept routine\n",
            "200 result=0\n",
            "100 result=0 Trying...\n200 result=0 Gosub complete\n",
            "200 result=1\n",
        ],
    )

    assert fake.commands == [
        "GET VARIABLE CDR(accountcode)",
        "FOO",
        "GET VARIABLE",
        "GET VARIABLE ACTION",
        "ANSWER",
        "GET VARIABLE NOPE",
        "GOSUB sub s 1",
        'SET VARIABLE GW_REASON "no \\"credit\\" \\\\ left"',
    ]
    assert results == [
        ("0049301234567", UNIQUEID),
        "tenant1",
        True,
        510,
        (520, True),
        "hangup",
        511,
        None,
        "0",
        (200, "1"),
    ]
    assert server.stats["handler_errors"] == 0
    assert server.stats["protocol_errors"] == 0


async def test_hangup_arriving_between_commands(serve):
    seen: list[object] = []

    async def outbound(session: AgiSession) -> None:
        # Refused before sending: Asterisk would split a line over 2047 bytes in two.
        for bad in ("VERBOSE " + "x" * 3000, "VERBOSE a\nHANGUP"):
            with pytest.raises(ValueError):
                await session.command(bad)
        seen.append(await session.get_variable("A"))
        seen.append(session.hung_up)
        seen.append(await session.get_variable("B"))
        seen.append(session.hung_up)

    server = await serve({"outbound": outbound})
    await call(server.port, replies=["200 result=1 (a)\nHANGUP\n", "200 result=1 (b)\n"])
    assert seen == ["a", False, "b", True]


async def test_command_timeout_makes_session_unusable(serve):
    seen: list[type[BaseException]] = []

    async def outbound(session: AgiSession) -> None:
        try:
            await session.get_variable("SLOW")
        except AgiTimeout:
            seen.append(AgiTimeout)
        try:
            await session.get_variable("AFTER")
        except AgiProtocolError:
            seen.append(AgiProtocolError)

    server = await serve({"outbound": outbound}, command_timeout=0.1)
    fake = await FakeAsterisk.connect(server.port)
    await fake.send(env_block())
    assert await fake.wait_closed()  # never answers
    assert fake.commands == ["GET VARIABLE SLOW"]
    assert seen == [AgiTimeout, AgiProtocolError]


async def test_oversize_reply_line_is_protocol_error(serve):
    async def outbound(session: AgiSession) -> None:
        await session.get_variable("BIG")

    server = await serve({"outbound": outbound}, max_line_bytes=1024)
    await call(server.port, replies=["200 result=1 (" + "x" * 2000 + ")\n"])
    assert server.stats["protocol_errors"] == 1
    assert server.stats["handler_errors"] == 0


# --- server: environment block limits ------------------------------------------------------


async def test_oversize_header_line_closes(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler}, max_line_bytes=128)
    fake = await FakeAsterisk.connect(server.port)
    await fake.send(b"agi_network: yes\nagi_calleridname: " + b"x" * 500 + b"\n\n")
    assert await fake.wait_closed()
    assert fake.commands == []
    assert called == []
    assert server.stats["protocol_errors"] == 1


@pytest.mark.parametrize(("headers", "served"), [(5, True), (6, False)])
async def test_header_count_is_bounded(serve, headers, served):
    called = []

    async def outbound(session: AgiSession) -> None:
        called.append(session.request.script)

    server = await serve({"outbound": outbound}, max_headers=5)
    fake = await FakeAsterisk.connect(server.port)
    lines = ["agi_network_script: outbound"] + [f"agi_x{i}: {i}" for i in range(headers - 1)]
    await fake.send(("\n".join(lines) + "\n\n").encode())
    assert await fake.wait_closed()
    assert called == (["outbound"] if served else [])
    assert server.stats["protocol_errors"] == (0 if served else 1)


async def test_header_timeout(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler}, header_timeout=0.2)
    fake = await FakeAsterisk.connect(server.port)
    started = time.monotonic()
    await fake.send(b"agi_network: yes\nagi_network_script: outbound\n")  # no blank line
    assert await fake.wait_closed(within=2.0)
    assert 0.15 < time.monotonic() - started < 1.5
    assert called == []
    assert server.stats["timeouts"] == 1


# A header loop that spins on EOF never yields: nothing else runs, timeouts included. Only
# pytest-timeout's thread method can end such a run (it kills the process: a loud failure).
@pytest.mark.timeout(3, method="thread")
async def test_client_closing_mid_header_does_not_block_others(serve):
    async def outbound(session: AgiSession) -> None:
        await session.set_variable("GW_DECISION", await session.get_variable("X") or "DENY")

    server = await serve({"outbound": outbound})
    started = time.monotonic()
    half_closer = await FakeAsterisk.connect(server.port)
    await half_closer.send(b"agi_network: yes\nagi_network_scr")
    half_closer.writer.write_eof()  # the server sees EOF in the middle of a line
    closer = await FakeAsterisk.connect(server.port)
    await closer.send(b"agi_network: yes\n")
    closer.writer.close()  # gone after a complete line, before the blank one
    await asyncio.sleep(0.05)

    fake = await call(server.port, replies=["200 result=1 (ALLOW)\n", "200 result=1\n"])
    assert fake.commands == ["GET VARIABLE X", 'SET VARIABLE GW_DECISION "ALLOW"']
    assert await half_closer.wait_closed(within=1.0)
    assert half_closer.commands == []
    assert time.monotonic() - started < 1.0
    assert server.stats["sessions_active"] == 0
    assert server.stats["sessions_total"] == 3
    assert server.stats["protocol_errors"] == 0
    assert server.stats["timeouts"] == 0


async def test_crlf_line_endings_are_tolerated(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler})
    fake = await FakeAsterisk.connect(server.port)
    await fake.send(env_block().replace(b"\n", b"\r\n"))
    assert await fake.wait_closed()
    assert called == ["outbound"]
    assert server.stats["protocol_errors"] == 0


# --- server: admission -----------------------------------------------------------------


async def test_allow_list_rejects_other_peers(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler}, allowed_peers=["10.0.0.0/8", "192.0.2.7"])
    fake = await FakeAsterisk.connect(server.port)
    assert await fake.wait_closed(within=1.0)
    assert fake.commands == []
    assert called == []
    assert server.stats["rejected_peer"] == 1
    assert server.stats["sessions_total"] == 0

    allowed = await serve({}, allowed_peers=["127.0.0.0/8"])
    fake = await call(allowed.port, script="ping", replies=["200 result=1\n"])
    assert fake.commands == ['SET VARIABLE GW_PONG "1"']
    assert allowed.stats["rejected_peer"] == 0


def test_allow_list_accepts_ipv4_mapped_addresses():
    server = AgiServer({}, allowed_peers=["10.0.0.0/8", "::1"])
    assert server._peer_allowed("::ffff:10.1.2.3")
    assert server._peer_allowed("::1")
    assert not server._peer_allowed("127.0.0.1")
    assert not server._peer_allowed("not-an-address")
    with pytest.raises(TypeError):
        AgiServer({}, allowed_peers="127.0.0.1")


async def test_max_sessions_rejects_instead_of_queueing(serve):
    entered = asyncio.Event()
    release = asyncio.Event()

    async def outbound(session: AgiSession) -> None:
        entered.set()
        await release.wait()
        await session.set_variable("GW_DECISION", "ALLOW")

    server = await serve({"outbound": outbound}, max_sessions=1)
    first = await FakeAsterisk.connect(server.port)
    await first.send(env_block())
    await asyncio.wait_for(entered.wait(), 1.0)

    second = await FakeAsterisk.connect(server.port)
    assert await second.wait_closed(within=1.0)
    assert server.stats["rejected_busy"] == 1

    release.set()
    await first.answer(["200 result=1\n"])
    assert await first.wait_closed()
    assert first.commands == ['SET VARIABLE GW_DECISION "ALLOW"']
    assert server.stats["sessions_total"] == 1
    assert server.stats["sessions_active"] == 0


async def test_hangup_reports_are_served_while_decisions_are_busy(serve):
    """A hangup report settles money: at max_sessions decisions it still runs (in the
    reserve), a new decision is refused once its route is read, and only past
    max_sessions + reserved_sessions is a connection refused unread."""
    release = asyncio.Event()
    entered: list[str] = []

    async def held(session: AgiSession) -> None:
        entered.append(session.request.script)
        await release.wait()

    server = await serve({"outbound": held, "hangup": held}, max_sessions=1,
                         reserved_routes=("hangup",), reserved_sessions=1)
    decision = await FakeAsterisk.connect(server.port)
    await decision.send(env_block("outbound"))
    for _ in range(100):
        if entered:
            break
        await asyncio.sleep(0.01)

    refused = await call(server.port, script="outbound")  # decisions are full
    assert refused.commands == [] and server.stats["rejected_busy"] == 1
    assert server.stats["rejected_busy_unread"] == 0

    report = await FakeAsterisk.connect(server.port)
    await report.send(env_block("hangup"))
    for _ in range(100):
        if entered == ["outbound", "hangup"]:
            break
        await asyncio.sleep(0.01)
    assert entered == ["outbound", "hangup"]

    # max_sessions + reserved_sessions connections open: the next is refused unread
    unread = await FakeAsterisk.connect(server.port)
    assert await unread.wait_closed(within=1.0)
    assert server.stats["rejected_busy"] == 2 and server.stats["rejected_busy_unread"] == 1

    release.set()
    assert await decision.wait_closed() and await report.wait_closed()
    assert server.stats["sessions_active"] == 0
    again = await call(server.port, script="outbound")  # the decision slot is free again
    assert again.commands == [] and entered[-1] == "outbound"
    assert server.stats["rejected_busy"] == 2


def test_the_reserve_defaults_to_a_fifth_of_max_sessions():
    assert AgiServer({}, max_sessions=500, reserved_routes=("hangup",))._reserved_sessions == 100
    assert AgiServer({}, max_sessions=5, reserved_routes=("hangup",))._reserved_sessions == 10
    assert AgiServer({}, max_sessions=500)._reserved_sessions == 0


# --- server: routes and handlers --------------------------------------------------------


async def test_ping_route_is_built_in(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler})
    fake = await call(server.port, script="ping", replies=["200 result=1\n"])
    assert fake.commands == ['SET VARIABLE GW_PONG "1"']
    assert called == []
    assert server.stats["sessions_total"] == 1
    with pytest.raises(ValueError):
        AgiServer({"ping": handler})


async def test_unknown_route_sends_nothing(serve):
    called, handler = recording_handler()
    server = await serve({"outbound": handler})
    with capture_logs() as logs:
        fake = await call(server.port, script="nosuch/x")
    assert fake.commands == []
    assert called == []
    assert server.stats["unknown_route"] == 1
    events = [entry for entry in logs if entry["event"] == "agi.unknown_route"]
    assert len(events) == 1
    assert events[0]["script"] == "nosuch"


async def test_handler_exception_is_logged_with_call_ids(serve):
    async def outbound(session: AgiSession) -> None:
        await session.get_variable("CDR(accountcode)")
        raise RuntimeError("boom")

    server = await serve({"outbound": outbound})
    with capture_logs() as logs:
        fake = await call(server.port, replies=["200 result=1 (tenant1)\n"])
    assert fake.commands == ["GET VARIABLE CDR(accountcode)"]
    assert server.stats["handler_errors"] == 1
    errors = [entry for entry in logs if entry["event"] == "agi.handler_error"]
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"
    assert errors[0]["exc_info"] is True
    assert (errors[0]["uniqueid"], errors[0]["channel"], errors[0]["script"]) == (
        UNIQUEID,
        CHANNEL,
        "outbound",
    )


async def test_session_timeout_cancels_handler(serve):
    seen = []

    async def outbound(session: AgiSession) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    server = await serve({"outbound": outbound}, session_timeout=0.2)
    started = time.monotonic()
    await call(server.port)
    assert time.monotonic() - started < 1.5
    assert seen == ["cancelled"]
    assert server.stats["timeouts"] == 1
    assert server.stats["handler_errors"] == 0


# --- server: shutdown -------------------------------------------------------------------


async def test_stop_lets_inflight_session_finish_within_grace(serve):
    entered = asyncio.Event()
    seen = []

    async def outbound(session: AgiSession) -> None:
        entered.set()
        seen.append(await session.get_variable("X"))

    server = await serve({"outbound": outbound})
    port = server.port
    fake = await FakeAsterisk.connect(port)
    await fake.send(env_block())
    await asyncio.wait_for(entered.wait(), 1.0)

    stopping = asyncio.create_task(server.stop(grace=2.0))
    await asyncio.sleep(0.05)
    assert not server.listening
    await fake.answer(["200 result=1 (late)\n"])
    await asyncio.wait_for(stopping, 2.0)
    assert seen == ["late"]
    assert await fake.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_stop_cancels_sessions_after_grace(serve):
    entered = asyncio.Event()
    seen = []

    async def outbound(session: AgiSession) -> None:
        entered.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    server = await serve({"outbound": outbound})
    fake = await FakeAsterisk.connect(server.port)
    await fake.send(env_block())
    await asyncio.wait_for(entered.wait(), 1.0)

    started = time.monotonic()
    await server.stop(grace=0.1)
    assert time.monotonic() - started < 1.5
    assert seen == ["cancelled"]
    assert await fake.wait_closed(within=1.0)
    assert server.stats["sessions_active"] == 0
    assert server.stats["handler_errors"] == 0
    assert not server.listening


async def test_set_variables_is_one_mset_command_or_a_clear_refusal(serve):
    seen: list = []

    async def handler(session: AgiSession) -> None:
        reply = await session.set_variables([("GW_A", "x-1"), ("GW_B", ""), ("GW_C", "+15")])
        seen.append(reply.code)
        with pytest.raises(ValueError):
            await session.set_variables([("GW_E", 'say "hi"')])
        with pytest.raises(ValueError):
            await session.set_variables([("GW_F", "a b,c")])
        # commas: one quoted MSet item, as the dialplan writes a hangup handler's place
        reply = await session.set_variables([("GW_D", "a,b"),
                                             ("CHANNEL(hangup_handler_push)", "ctx,s,1")])
        seen.append(reply.code)

    server = await serve({"outbound": handler})
    fake = await call(server.port, replies=["200 result=0\n", "200 result=0\n"])
    assert fake.commands == ['EXEC MSet "GW_A=x-1,GW_B=,GW_C=+15"',
                             'EXEC MSet "\\"GW_D=a,b\\",\\"CHANNEL(hangup_handler_push)=ctx,s,1\\""']
    assert seen == [200, 200]
