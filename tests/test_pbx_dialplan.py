"""The shipped dialplan (dialplan/extensions_gateway.conf) on a real Asterisk 22.

Every test places real SIP calls with SIPp phones and checks what the phone
saw. The gateway is played by ``FakeGateway``, a tiny FastAGI responder defined
here (the real gateway is tested elsewhere); AMI is spoken over a raw asyncio
connection (``Ami``) logged in with the least-privilege permissions of
dialplan/manager.conf.example.

Results feed docs/dialplan.md (cause -> SIP table, talk-time source, which
asterisk-notes facts held).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import dialplan_variables as var
from gateway.agi.protocol import quote
from gateway.calls.causes import REJECT_CAUSES
from gateway.store.pool import open_pool
from tests.support.database import scratch_database
from tests.support.pbx import DIALPLAN_DIR, CallResult, Pbx, cdr_pgsql, free_port

pytestmark = [pytest.mark.pbx, pytest.mark.timeout(180)]

NUMBER = "15551234567"  # what the phones dial (the gateway would normalise it)
PBX_NAME = "pbx-test.1"  # the shared PBX's GW_PBX

#: The gateway's reason -> (Q.850 cause, SIP final response) table: the real PBX must
#: turn each cause into exactly that response.
REASON_CAUSE_SIP = REJECT_CAUSES


# ---------------------------------------------------------------------------
# A tiny FastAGI responder
# ---------------------------------------------------------------------------


@dataclass
class AgiRequest:
    env: dict[str, str]
    received_at: float
    #: commands this session sent and the replies it got
    dialogue: list[tuple[str, str]] = field(default_factory=list)
    #: unsolicited lines (Asterisk's "HANGUP")
    unsolicited: list[str] = field(default_factory=list)

    @property
    def script(self) -> str:
        return self.env.get("agi_network_script", "")

    @property
    def args(self) -> list[str]:
        out, i = [], 1
        while f"agi_arg_{i}" in self.env:
            out.append(self.env[f"agi_arg_{i}"])
            i += 1
        return out


class AgiSession:
    """One FastAGI connection, seen from the server side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: AgiRequest):
        self.reader, self.writer, self.req = reader, writer, req

    async def read_line(self, seconds: float = 10.0) -> str:
        line = await asyncio.wait_for(self.reader.readline(), seconds)
        if not line:
            raise ConnectionError("Asterisk closed the AGI connection")
        return line.decode().rstrip("\r\n")

    async def command(self, line: str, seconds: float = 10.0) -> str:
        """Send one command, return its reply (a multi-line 520 reply joined by newlines)."""
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        reply = await self.read_line(seconds)
        while reply == "HANGUP":  # unsolicited: the channel hung up meanwhile
            self.req.unsolicited.append(reply)
            reply = await self.read_line(seconds)
        if reply.startswith("520-"):
            lines = [reply]
            while not lines[-1].startswith("520 "):
                lines.append(await self.read_line(seconds))
            reply = "\n".join(lines)
        self.req.dialogue.append((line, reply))
        return reply

    async def set(self, variables: dict[str, object]) -> None:
        """Set ``variables`` one by one; with a call id, push the hangup handler right after
        it, as the gateway's answer does (``var.ALLOW_ANSWER``)."""
        for name, value in variables.items():
            reply = await self.command(f'SET VARIABLE {name} "{value}"')
            assert reply.startswith("200 result=1"), reply
            if name == var.CALL_ID:
                reply = await self.command(
                    f'SET VARIABLE {var.HANGUP_HANDLER} "{var.HANGUP_HANDLER_AT}"')
                assert reply.startswith("200 result=1"), reply


Handler = Callable[[AgiRequest, AgiSession], Awaitable[None]]


class FakeGateway:
    """asyncio FastAGI server on 127.0.0.1:<free port>; ``handler`` decides per test."""

    def __init__(self) -> None:
        self.requests: list[AgiRequest] = []
        self.errors: list[BaseException] = []
        self.handler: Handler | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()

    async def start(self) -> FakeGateway:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def reset(self, handler: Handler | None = None) -> None:
        self.requests.clear()
        self.errors.clear()
        self.handler = handler

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            env: dict[str, str] = {}
            while True:
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"", b"\n", b"\r\n"):
                    break
                key, _, value = line.decode().rstrip("\r\n").partition(": ")
                env[key] = value
            req = AgiRequest(env, time.time())
            self.requests.append(req)
            async with self._changed:
                self._changed.notify_all()
            if self.handler is not None:
                await self.handler(req, AgiSession(reader, writer, req))
        except Exception as e:  # recorded; tests assert there were none
            self.errors.append(e)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            async with self._changed:
                self._changed.notify_all()

    def of(self, script: str) -> list[AgiRequest]:
        return [r for r in self.requests if r.script == script]

    async def wait_for(self, script: str, count: int = 1, seconds: float = 15.0) -> AgiRequest:
        async def ready() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.of(script)) >= count)

        await asyncio.wait_for(ready(), seconds)
        return self.of(script)[count - 1]


def decide(variables: dict[str, object]) -> Handler:
    """A handler answering outbound/inbound requests with these variables."""

    async def handler(req: AgiRequest, agi: AgiSession) -> None:
        if req.script in (var.OUTBOUND_ROUTE, var.INBOUND_ROUTE):
            await agi.set(variables)

    return handler


def allow(route: str = "pstn", more: dict[str, object] | None = None, *,
          call_id: str = "call-1") -> Handler:
    values: dict[str, object] = {var.DECISION: "ALLOW", var.REASON: "FUNDED",
                                 var.CALL_ID: call_id}
    values |= {var.ROUTE: route, var.NUMBER: NUMBER} | (more or {})
    return decide(values)


# ---------------------------------------------------------------------------
# A raw asyncio AMI client
# ---------------------------------------------------------------------------


class Ami:
    def __init__(self) -> None:
        self.banner = ""
        self.events: list[dict[str, str]] = []
        self._pending: dict[str, asyncio.Future] = {}
        self._lists: dict[str, list[dict[str, str]]] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next = 0

    async def connect(self, pbx: Pbx) -> Ami:
        reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(pbx.ami_host, pbx.ami_port), 5
        )
        self.banner = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        self._task = asyncio.create_task(self._read(reader))
        resp = await self.action("Login", Username=pbx.ami_user, Secret=pbx.ami_secret)
        assert resp.get("Response") == "Success", resp
        return self

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.action("Logoff"), 2)
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _read(self, reader: asyncio.StreamReader) -> None:
        msg: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\r\n")
            if text:
                key, _, value = text.partition(": ")
                msg.setdefault(key, value)
                continue
            if not msg:
                continue
            action_id = msg.get("ActionID", "")
            if "Response" in msg and action_id in self._pending:
                self._pending.pop(action_id).set_result(msg)
            elif "Event" in msg:
                if action_id in self._lists:
                    self._lists[action_id].append(msg)
                async with self._changed:
                    self.events.append(msg)
                    self._changed.notify_all()
            msg = {}

    async def action(self, name: str, seconds: float = 5.0, **fields: str) -> dict[str, str]:
        self._next += 1
        action_id = f"t{self._next}"
        fut = asyncio.get_running_loop().create_future()
        self._pending[action_id] = fut
        text = f"Action: {name}\r\nActionID: {action_id}\r\n"
        text += "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        self._writer.write(text.encode())
        await self._writer.drain()
        return await asyncio.wait_for(fut, seconds)

    async def action_list(self, name: str, complete: str, **fields: str) -> list[dict[str, str]]:
        """An action answered by a list of events ending with ``complete``."""
        action_id = f"t{self._next + 1}"
        self._lists[action_id] = []
        resp = await self.action(name, **fields)
        assert resp.get("Response") == "Success", resp
        await self.wait_event(
            lambda e: e.get("Event") == complete and e.get("ActionID") == action_id
        )
        return [e for e in self._lists.pop(action_id) if e.get("Event") != complete]

    async def wait_event(
        self, pred: Callable[[dict[str, str]], bool], seconds: float = 15.0
    ) -> dict[str, str]:
        async def find() -> dict[str, str]:
            async with self._changed:
                await self._changed.wait_for(lambda: any(pred(e) for e in self.events))
                return next(e for e in self.events if pred(e))

        return await asyncio.wait_for(find(), seconds)


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def gw():
    server = await FakeGateway().start()
    yield server
    await server.close()


@pytest.fixture(scope="module")
def shared_pbx(pbx_root, gw):  # noqa: F811
    """One PBX for most tests (boots in about a second); each test resets it."""
    pbx = Pbx(root=pbx_root, gw_agi=f"127.0.0.1:{gw.port}", pbx_name=PBX_NAME,
              globals={var.AGI_BACKUP: ""})
    pbx.start()
    yield pbx
    pbx.stop()


@pytest.fixture
async def pbx(shared_pbx: Pbx, gw: FakeGateway):
    gw.reset()
    globals_before = dict(shared_pbx.globals)
    yield shared_pbx
    # Leave no call or phone behind for the next test, and undo global changes.
    await shared_pbx.clear()
    for name, value in globals_before.items():
        if shared_pbx.globals.get(name) != value:
            await asyncio.to_thread(shared_pbx.set_global, name, value)
    assert not gw.errors, f"the fake gateway failed: {gw.errors!r}"


@pytest.fixture
async def ami(pbx: Pbx):
    client = await Ami().connect(pbx)
    yield client
    await client.close()


def explain(*results: CallResult) -> str:
    return "\n".join(r.summary() for r in results)


async def callee(pbx: Pbx, endpoint: str = "carrier", **kw):
    return await pbx.uas(endpoint, **kw).started()


# ---------------------------------------------------------------------------
# Outbound: funded calls and their deadline
# ---------------------------------------------------------------------------


async def test_funded_call_is_cut_five_seconds_after_answer_despite_ringing(pbx, gw):
    gw.handler = allow("pstn", {var.FUNDED: 5})
    uas = await callee(pbx, ring_ms=2000)
    phone = await pbx.call("alice", NUMBER, scenario="until_bye", max_wait=30)
    trunk = await uas.result()
    why = explain(phone, trunk)
    assert phone.final_code == 200, why
    assert trunk.invite.first_line.startswith(f"INVITE sip:{NUMBER}@"), why
    assert phone.bye_from == "pbx" and trunk.bye_from == "pbx", why
    # 2 s of ringing are not counted: the deadline runs from answer.
    assert phone.answered_at - phone.messages[0].at >= 1.9, why
    assert 4.0 <= phone.talk <= 6.0, why
    assert abs(trunk.talk - 5.0) < 0.3, why


async def test_fractional_funding_becomes_milliseconds(pbx, gw):
    gw.handler = allow("pstn", {var.FUNDED: "2.5"})
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="until_bye", max_wait=20)
    trunk = await uas.result()
    assert phone.bye_from == "pbx", explain(phone, trunk)
    assert abs(trunk.talk - 2.5) < 0.3, explain(phone, trunk)


@pytest.mark.parametrize("funded", ["", "0"])
async def test_unfunded_or_zero_means_no_limit(pbx, gw, funded):
    gw.handler = allow("pstn", {var.FUNDED: funded})
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="hold", hold=3)
    trunk = await uas.result()
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone, trunk)
    assert "L(" not in _dial_data(pbx), _dial_data(pbx)


def _dial_data(pbx: Pbx) -> str:
    lines = [ln for ln in pbx.log_text().splitlines() if "Dial(" in ln]
    return lines[-1] if lines else ""


async def test_ami_setvar_timeout_on_callee_moves_the_deadline(pbx, gw, ami):
    gw.handler = allow("pstn", {var.FUNDED: 3})
    uas = await callee(pbx, ring_ms=500)
    call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="until_bye", max_wait=30))
    dial_end = await ami.wait_event(
        lambda e: (
            e.get("Event") == "DialEnd"
            and e.get("DialStatus") == "ANSWER"
            and e.get("Channel", "").startswith("PJSIP/alice-")
        )
    )
    assert dial_end["DestChannel"].startswith("PJSIP/carrier-"), dial_end
    await asyncio.sleep(1.0)
    # A fractional value: 6.5 s from now, i.e. ~7.5 s after answer instead of 3.
    set_at = time.time()
    resp = await ami.action(
        "Setvar", Channel=dial_end["DestChannel"], Variable="TIMEOUT(absolute)", Value="6.5"
    )
    assert resp["Response"] == "Success", resp
    phone = await call
    trunk = await uas.result()
    why = explain(phone, trunk)
    assert phone.bye_from == "pbx", why
    # Cut 6.5 s after the Setvar arrived (fractions honoured: not 6 or 7).
    assert abs(phone.bye_at - (set_at + 6.5)) < 0.3, why
    assert 7.0 < trunk.talk < 8.0, why


async def test_timeout_set_on_the_caller_channel_also_ends_the_call(pbx, gw, ami):
    """The caller's own TIMEOUT(absolute) is independent of L(): whichever comes first."""
    gw.handler = allow("pstn", {var.FUNDED: 10})
    uas = await callee(pbx)
    call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="until_bye", max_wait=30))
    dial_end = await ami.wait_event(
        lambda e: e.get("Event") == "DialEnd" and e.get("DialStatus") == "ANSWER"
    )
    set_at = time.time()
    resp = await ami.action(
        "Setvar", Channel=dial_end["Channel"], Variable="TIMEOUT(absolute)", Value="2"
    )
    assert resp["Response"] == "Success", resp
    phone = await call
    await uas.result()
    assert phone.bye_from == "pbx" and abs(phone.bye_at - (set_at + 2)) < 0.3, explain(phone)


async def test_limit_with_warning_is_fixed_at_bridge_time(make_pbx, gw):  # noqa: F811
    """[source] fact: with a warning in L() the deadline is a bridge hook, not the callee's
    TIMEOUT(absolute), so moving TIMEOUT(absolute) on the callee does not extend it."""
    gw.reset()
    pbx = make_pbx(
        gw_agi=f"127.0.0.1:{gw.port}",
        contexts={"dave": "test-limit-warning"},
        extra_dialplan=(
            "[test-limit-warning]\n"
            "exten => _X.,1,Dial(PJSIP/${EXTEN}@carrier,,L(4000:2000))\n"
            " same => n,Hangup()\n"
        ),
    )
    ami = await Ami().connect(pbx)
    try:
        uas = await callee(pbx)
        call = asyncio.create_task(pbx.call("dave", NUMBER, scenario="until_bye", max_wait=30))
        dial_end = await ami.wait_event(
            lambda e: e.get("Event") == "DialEnd" and e.get("DialStatus") == "ANSWER"
        )
        resp = await ami.action(
            "Setvar", Channel=dial_end["DestChannel"], Variable="TIMEOUT(absolute)", Value="10"
        )
        assert resp["Response"] == "Success", resp
        phone = await call
        trunk = await uas.result()
        assert phone.bye_from == "pbx", explain(phone, trunk)
        assert abs(trunk.talk - 4.0) < 0.4, explain(phone, trunk)
    finally:
        await ami.close()


# ---------------------------------------------------------------------------
# The hangup handler
# ---------------------------------------------------------------------------


async def test_hangup_handler_reports_call_id_and_talk_time(pbx, gw):
    gw.handler = allow("pstn", call_id="call-hh-1")
    uas = await callee(pbx, ring_ms=1000)
    phone = await pbx.call("alice", NUMBER, scenario="hold", hold=3.3)
    trunk = await uas.result()
    report = await gw.wait_for("hangup")
    call_id, talk_ms, dial_status, billsec, pbx_name = report.args
    assert pbx_name == PBX_NAME
    assert call_id == "call-hh-1"
    assert dial_status == "ANSWER"
    # Ringing (1 s) is not talk time; the PBX's figure matches the phone's (measured: within 5 ms).
    assert abs(int(talk_ms) / 1000 - phone.talk) < 0.1, (talk_ms, explain(phone, trunk))
    assert billsec == "3"  # CDR(billsec): whole seconds, truncated
    # The report comes from the caller channel that asked for the decision.
    assert report.env["agi_uniqueid"] == gw.of("outbound")[0].env["agi_uniqueid"]


async def test_hangup_handler_after_a_deadline_cut(pbx, gw):
    gw.handler = allow("pstn", {var.FUNDED: 2}, call_id="call-hh-2")
    uas = await callee(pbx, ring_ms=1500)
    phone = await pbx.call("alice", NUMBER, scenario="until_bye", max_wait=20)
    await uas.result()
    report = await gw.wait_for("hangup")
    assert report.args[0] == "call-hh-2" and report.args[2] == "ANSWER"
    assert abs(int(report.args[1]) - 2000) < 100, report.args
    assert abs(int(report.args[1]) / 1000 - phone.talk) < 0.1, (report.args, explain(phone))


async def test_hangup_handler_for_a_call_cancelled_while_ringing(pbx, gw):
    gw.handler = allow("pstn", call_id="call-hh-3")
    uas = await callee(pbx, answer=False)
    phone = await pbx.call("alice", NUMBER, scenario="cancel", cancel_after=1)
    trunk = await uas.result()
    assert phone.final_code == 487 and trunk.final_code == 487, explain(phone, trunk)
    report = await gw.wait_for("hangup")
    assert report.args == ["call-hh-3", "0", "CANCEL", "0", PBX_NAME]


@pytest.mark.parametrize(
    ("callee_code", "phone_code", "dial_status"),
    [(486, 486, "BUSY"), (404, 404, "CHANUNAVAIL"), (603, 403, "CHANUNAVAIL"), (503, 503, "CONGESTION")],
)  # fmt: skip
async def test_callee_refusal_reaches_the_phone_and_the_report(
    pbx, gw, callee_code, phone_code, dial_status
):
    gw.handler = allow("pstn", {var.FUNDED: 30}, call_id="call-refused")
    uas = await callee(pbx, reject=callee_code, ring_ms=300)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    trunk = await uas.result()
    assert trunk.final_code == callee_code, explain(phone, trunk)
    # Asterisk maps the callee's response to a cause and back (603 -> 21 -> 403).
    assert phone.final_code == phone_code, explain(phone, trunk)
    report = await gw.wait_for("hangup")
    assert report.args == ["call-refused", "0", dial_status, "0", PBX_NAME]


async def test_no_hangup_report_without_a_call_id(pbx, gw):
    gw.handler = decide({var.DECISION: "ALLOW", var.ROUTE: "pstn", var.NUMBER: NUMBER})
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="hold", hold=1)
    await uas.result()
    assert phone.final_code == 200
    await asyncio.sleep(0.5)
    assert gw.of("hangup") == []


# ---------------------------------------------------------------------------
# REJECT: cause -> SIP response, default deny, fail policy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reason", sorted(REASON_CAUSE_SIP))
async def test_reject_reason_gives_the_documented_sip_response(pbx, gw, reason):
    cause, sip = REASON_CAUSE_SIP[reason]
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: reason, var.CAUSE: cause})
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == sip, explain(phone)
    # The Q.850 cause travels to the phone too (res_pjsip_rfc3326).
    assert phone.final_response.header("Reason") == f"Q.850;cause={cause}", explain(phone)


@pytest.mark.parametrize(
    ("cause", "sip"),
    [(1, 404), (3, 404), (17, 486), (18, 408), (19, 480), (21, 403), (22, 410), (28, 484),
     (29, 501), (31, 480), (34, 503), (38, 500), (42, 503), (50, 603), (57, 603), (58, 488),
     (16, 603), (127, 500)],
)  # fmt: skip
async def test_cause_to_sip_mapping(pbx, gw, cause, sip):
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: "X", var.CAUSE: cause})
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == sip, explain(phone)


@pytest.mark.parametrize("cause", ["", "abc", "21;x"])
async def test_reject_without_a_usable_cause_is_403(pbx, gw, cause):
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: "X", var.CAUSE: cause})
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 403, explain(phone)


async def test_reject_produces_no_call_to_any_trunk(pbx, gw):
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: "NO_BALANCE", var.CAUSE: 31})
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    trunk = await uas.result(within=0.5)
    assert phone.final_code == 480 and not trunk.invited, explain(phone, trunk)


async def test_gateway_closing_without_a_decision_is_denied(pbx, gw):
    async def silent(req: AgiRequest, agi: AgiSession) -> None:
        return None  # read the environment, close the socket

    gw.handler = silent
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    trunk = await uas.result(within=0.5)
    assert phone.final_code == 503 and not trunk.invited, explain(phone, trunk)
    # [source] fact: an early close still counts as AGISTATUS=SUCCESS.
    assert "AGISTATUS=SUCCESS decision= " in pbx.log_text()


@pytest.mark.parametrize(
    "variables",
    [
        {var.DECISION: "allow", var.ROUTE: "pstn", var.NUMBER: NUMBER},
        {var.DECISION: "ALLOW ", var.ROUTE: "pstn", var.NUMBER: NUMBER},
        {var.DECISION: "MAYBE"},
        {var.DECISION: "ALLOW", var.ROUTE: "moon", var.NUMBER: NUMBER},
        {var.DECISION: "ALLOW", var.ROUTE: "pstn", var.NUMBER: ""},
        {var.DECISION: "ALLOW", var.ROUTE: "pstn", var.NUMBER: "1555&PJSIP/bob"},
        {var.DECISION: "ALLOW", var.ROUTE: "internal", var.TARGET: "bob&PJSIP/carol"},
        {var.DECISION: "ALLOW", var.ROUTE: "pstn", var.NUMBER: NUMBER, var.FUNDED: "ten"},
    ],
    ids=["lowercase", "trailing-space", "unknown", "bad-route", "no-number",
         "number-injection", "target-injection", "bad-funded"],
)  # fmt: skip
async def test_anything_but_a_clean_decision_is_denied(pbx, gw, variables):
    gw.handler = decide(variables)
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    trunk = await uas.result(within=0.5)
    assert phone.final_code == 503 and not trunk.invited, explain(phone, trunk)


async def test_gateway_down_fail_closed_gives_503(pbx, gw):
    pbx.set_global(var.AGI, f"127.0.0.1:{free_port()}")  # nobody listens there
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    trunk = await uas.result(within=0.5)
    assert phone.final_code == 503 and not trunk.invited, explain(phone, trunk)
    assert "AGISTATUS=FAILURE" in pbx.log_text()
    assert gw.requests == []


async def test_gateway_down_fail_open_connects_unlimited(make_pbx):  # noqa: F811
    # Built with the policy (not set at run time) to show constructor overrides.
    pbx = make_pbx(gw_agi=f"127.0.0.1:{free_port()}", fail_policy="open")
    uas = await callee(pbx)
    phone = await pbx.call("alice", "+" + NUMBER, scenario="hold", hold=2)
    trunk = await uas.result()
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone, trunk)
    # The '+' is dropped; the call goes to the PSTN trunk as dialled.
    assert trunk.invite.first_line.startswith(f"INVITE sip:{NUMBER}@"), explain(trunk)


async def test_unknown_fail_policy_value_fails_closed(pbx, gw):
    pbx.set_global(var.AGI, f"127.0.0.1:{free_port()}")
    pbx.set_global(var.FAIL_POLICY, "opne")
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 503, explain(phone)


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["911", "112"])
async def test_emergency_number_dials_with_the_gateway_down(pbx, gw, number):
    pbx.set_global(var.AGI, f"127.0.0.1:{free_port()}")
    uas = await callee(pbx, "emergency")
    phone = await pbx.call("alice", number, scenario="hold", hold=2)
    trunk = await uas.result()
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone, trunk)
    assert trunk.invite.first_line.startswith(f"INVITE sip:{number}@"), explain(trunk)
    assert "AGISTATUS" not in pbx.log_text().split(f"emergency call {number}")[-1]


async def test_emergency_numbers_are_configurable(pbx, gw):
    pbx.set_global(var.EMERGENCY_NUMBERS, "911,0118")
    pbx.set_global(var.AGI, f"127.0.0.1:{free_port()}")
    uas = await callee(pbx, "emergency")
    phone = await pbx.call("alice", "0118", scenario="hold", hold=1)
    await uas.result()
    assert phone.final_code == 200, explain(phone)
    # ... and 112 is no longer one: with the gateway down it fails closed.
    phone = await pbx.call("alice", "112", scenario="expect_error", max_wait=10)
    assert phone.final_code == 503, explain(phone)


async def test_empty_globals_take_their_defaults_where_they_are_used(pbx, gw):
    """No settings subroutine: an empty GW_EMERGENCY_NUMBERS still means 911, 933, 112
    and 999 (dialled with the gateway down), and an empty GW_AGI asks 127.0.0.1 on
    FastAGI's port 4573."""
    pbx.set_global(var.EMERGENCY_NUMBERS, "")
    pbx.set_global(var.AGI, "")
    uas = await callee(pbx, "emergency")
    phone = await pbx.call("alice", "112", scenario="hold", hold=1)
    trunk = await uas.result()
    assert phone.final_code == 200, explain(phone, trunk)
    assert trunk.invite.first_line.startswith("INVITE sip:112@"), explain(trunk)
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 503, explain(phone)
    log = pbx.log_text()
    assert "agi://127.0.0.1/outbound," in log, log[-3000:]


async def test_internal_route_rings_the_target_phone(pbx, gw):
    gw.handler = allow("internal", {var.TARGET: "bob", var.NUMBER: ""})
    uas = await callee(pbx, "bob", ring_ms=500)
    phone = await pbx.call("alice", "201", scenario="hold", hold=1)
    bob = await uas.result()
    assert phone.final_code == 200 and bob.final_code == 200, explain(phone, bob)
    assert bob.invite.first_line.startswith("INVITE sip:bob@"), explain(bob)


async def test_partner_route_uses_the_partner_trunk(pbx, gw):
    gw.handler = allow("partner", {var.FUNDED: 2})
    uas = await callee(pbx, "partner")
    phone = await pbx.call("alice", NUMBER, scenario="until_bye", max_wait=20)
    trunk = await uas.result()
    assert trunk.invite.first_line.startswith(f"INVITE sip:{NUMBER}@"), explain(trunk)
    assert phone.bye_from == "pbx" and abs(trunk.talk - 2.0) < 0.3, explain(phone, trunk)


async def test_emergency_route_decided_by_the_gateway_is_never_limited(pbx, gw):
    # 933 is not in this PBX's local list, so the gateway is asked and says "emergency".
    pbx.set_global(var.EMERGENCY_NUMBERS, "911")
    gw.handler = allow("emergency", {var.NUMBER: "933", var.FUNDED: 1})
    uas = await callee(pbx, "emergency")
    phone = await pbx.call("alice", "933", scenario="hold", hold=2.5)
    trunk = await uas.result()
    assert gw.of("outbound"), "the gateway was asked"
    assert trunk.invite.first_line.startswith("INVITE sip:933@"), explain(trunk)
    assert phone.bye_from == "phone" and phone.talk > 2.3, explain(phone, trunk)


async def test_agi_arguments_follow_the_contract(pbx, gw):
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: "NO_RATE", var.CAUSE: 3})
    await pbx.call("carol", "+442079460000", scenario="expect_error")
    req = gw.of("outbound")[0]
    number, endpoint, linkedid, pbx_name = req.args
    assert pbx_name == PBX_NAME and req.args[var.OUTBOUND_PBX] == PBX_NAME
    assert (number, endpoint) == ("+442079460000", "carol")
    # [source] fact: no linkedid in the environment, hence the argument. For the
    # caller's own channel the linkedid is its uniqueid.
    assert not any("linkedid" in k.lower() for k in req.env), req.env
    assert linkedid == req.env["agi_uniqueid"]
    assert req.env["agi_channel"].startswith("PJSIP/carol-")
    assert req.env["agi_network_script"] == "outbound"


# ---------------------------------------------------------------------------
# Inbound
# ---------------------------------------------------------------------------


async def test_inbound_allow_rings_the_target_phone(pbx, gw):
    gw.handler = decide({var.DECISION: "ALLOW", var.REASON: "INBOUND_USER_NUMBER",
                         var.CALL_ID: "in-1", var.TARGET: "bob"})
    uas = await callee(pbx, "bob", ring_ms=1000)
    carrier = await pbx.call(
        "carrier", "15557654321", scenario="hold", hold=2, caller_id="15550001111"
    )
    bob = await uas.result()
    assert carrier.final_code == 200 and bob.final_code == 200, explain(carrier, bob)
    req = gw.of("inbound")[0]
    assert req.args[:2] == ["15557654321", "15550001111"]
    assert req.args[2] == req.env["agi_uniqueid"]
    assert req.args[var.INBOUND_PBX] == PBX_NAME and len(req.args) == len(var.INBOUND_ARGS)
    report = await gw.wait_for("hangup")
    assert report.args[0] == "in-1" and abs(int(report.args[1]) / 1000 - carrier.talk) < 0.1


async def test_inbound_funded_call_is_cut(pbx, gw):
    gw.handler = decide({var.DECISION: "ALLOW", var.CALL_ID: "in-2", var.TARGET: "bob",
                         var.FUNDED: 2})
    uas = await callee(pbx, "bob", ring_ms=500)
    carrier = await pbx.call("carrier", "18005550100", scenario="until_bye", max_wait=20)
    bob = await uas.result()
    assert carrier.bye_from == "pbx" and abs(bob.talk - 2.0) < 0.3, explain(carrier, bob)


async def test_inbound_reject_unknown_number(pbx, gw):
    gw.handler = decide({var.DECISION: "REJECT", var.REASON: "UNKNOWN_NUMBER", var.CAUSE: 1})
    carrier = await pbx.call("carrier", "15550009999", scenario="expect_error", max_wait=10)
    assert carrier.final_code == 404, explain(carrier)


async def test_inbound_gateway_down_fails_closed_by_default(pbx, gw):
    pbx.set_global(var.AGI, f"127.0.0.1:{free_port()}")
    carrier = await pbx.call("carrier", "15557654321", scenario="expect_error", max_wait=10)
    assert carrier.final_code == 503, explain(carrier)


async def test_inbound_gateway_down_fail_open_uses_the_fallback_context(make_pbx):  # noqa: F811
    pbx = make_pbx(
        gw_agi=f"127.0.0.1:{free_port()}",
        inbound_fail_policy="open",
        extra_dialplan=(
            "[gateway-inbound-fallback]\n"
            "exten => 15557654321,1,Dial(PJSIP/bob)\n"
            " same => n,Hangup()\n"
        ),
    )
    uas = await callee(pbx, "bob")
    carrier = await pbx.call("carrier", "15557654321", scenario="hold", hold=1)
    bob = await uas.result()
    assert carrier.final_code == 200 and bob.final_code == 200, explain(carrier, bob)
    # A number the fallback does not know is still rejected.
    carrier = await pbx.call("carrier", "15550000000", scenario="expect_error", max_wait=10)
    assert carrier.final_code == 503, explain(carrier)


# ---------------------------------------------------------------------------
# Fail-over to GW_AGI_BACKUP, and the PBX's name (GW_PBX)
# ---------------------------------------------------------------------------


def down() -> str:
    """host:port where nothing listens (Asterisk's connect is refused: AGISTATUS=FAILURE)."""
    return f"127.0.0.1:{free_port()}"


def warnings(log: str, text: str) -> int:
    """How many WARNING lines of the PBX's log hold ``text`` (the dialplan's Log() lines;
    the 'Executing' line before each also shows the text, and is not counted)."""
    return sum(text in line for line in log.splitlines() if "WARNING[" in line)


def first_down_second_up(pbx: Pbx, gw: FakeGateway) -> str:
    """GW_AGI points nowhere, GW_AGI_BACKUP at the fake gateway; returns the dead address."""
    dead = down()
    pbx.set_global(var.AGI, dead)
    pbx.set_global(var.AGI_BACKUP, f"127.0.0.1:{gw.port}")
    return dead


async def test_first_gateway_down_the_backup_decides_and_hears_the_hangup(pbx, gw):
    dead = first_down_second_up(pbx, gw)
    gw.handler = allow("pstn", {var.FUNDED: 30}, call_id="call-fo-1")
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="hold", hold=1.5)
    trunk = await uas.result()
    # Nothing the caller can see: answered, connected, its own hang-up.
    assert phone.final_code == 200 and phone.bye_from == "phone", explain(phone, trunk)
    assert trunk.invite.first_line.startswith(f"INVITE sip:{NUMBER}@"), explain(trunk)
    asked = gw.of(var.OUTBOUND_ROUTE)
    assert len(asked) == 1 and asked[0].args[var.OUTBOUND_PBX] == PBX_NAME
    assert asked[0].args[var.OUTBOUND_DIALLED] == NUMBER
    report = await gw.wait_for(var.HANGUP_ROUTE)
    assert report.args[var.HANGUP_CALL_ID] == "call-fo-1"
    assert report.args[var.HANGUP_DIALSTATUS] == "ANSWER"
    assert report.args[var.HANGUP_PBX] == PBX_NAME
    assert abs(int(report.args[var.HANGUP_ANSWERED_MS]) / 1000 - phone.talk) < 0.1
    assert f"gateway {dead} unreachable - asking the backup" in pbx.log_text()


async def test_a_sip_user_name_is_decided_by_the_backup(pbx, gw):
    first_down_second_up(pbx, gw)
    gw.handler = allow("internal", {var.TARGET: "bob", var.NUMBER: ""}, call_id="call-fo-2")
    uas = await callee(pbx, "bob")
    phone = await pbx.call("alice", "front.desk", scenario="hold", hold=1)
    bob = await uas.result()
    assert phone.final_code == 200 and bob.final_code == 200, explain(phone, bob)
    req = gw.of(var.OUTBOUND_ROUTE)[0]
    assert req.args[var.OUTBOUND_DIALLED] == "front.desk"
    assert req.args[var.OUTBOUND_PBX] == PBX_NAME
    assert (await gw.wait_for(var.HANGUP_ROUTE)).args[var.HANGUP_CALL_ID] == "call-fo-2"


async def test_an_inbound_call_is_decided_by_the_backup(pbx, gw):
    first_down_second_up(pbx, gw)
    gw.handler = decide({var.DECISION: "ALLOW", var.CALL_ID: "in-fo", var.TARGET: "bob"})
    uas = await callee(pbx, "bob")
    carrier = await pbx.call("carrier", "15557654321", scenario="hold", hold=1,
                             caller_id="15550001111")
    bob = await uas.result()
    assert carrier.final_code == 200 and bob.final_code == 200, explain(carrier, bob)
    req = gw.of(var.INBOUND_ROUTE)[0]
    assert req.args[var.INBOUND_CALLED] == "15557654321"
    assert req.args[var.INBOUND_CALLER] == "15550001111"
    assert req.args[var.INBOUND_PBX] == PBX_NAME
    report = await gw.wait_for(var.HANGUP_ROUTE)
    assert report.args[var.HANGUP_CALL_ID] == "in-fo"
    assert report.args[var.HANGUP_PBX] == PBX_NAME


async def test_the_hangup_report_goes_to_the_backup_when_the_deciding_gateway_is_gone(pbx, gw):
    """Decided by the first gateway, which then dies: the report reaches the second."""
    first = await FakeGateway().start()
    try:
        first.handler = allow("pstn", call_id="call-fo-3")
        pbx.set_global(var.AGI, f"127.0.0.1:{first.port}")
        pbx.set_global(var.AGI_BACKUP, f"127.0.0.1:{gw.port}")
        uas = await callee(pbx)
        call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="hold", hold=2))
        await first.wait_for(var.OUTBOUND_ROUTE)
    finally:
        await first.close()  # nothing listens there any more
    phone = await call
    await uas.result()
    assert phone.final_code == 200, explain(phone)
    report = await gw.wait_for(var.HANGUP_ROUTE)
    assert report.args[var.HANGUP_CALL_ID] == "call-fo-3"
    assert report.args[var.HANGUP_DIALSTATUS] == "ANSWER"
    assert report.args[var.HANGUP_PBX] == PBX_NAME
    assert gw.of(var.OUTBOUND_ROUTE) == [] and first.of(var.HANGUP_ROUTE) == []
    assert not first.errors and len(first.of(var.OUTBOUND_ROUTE)) == 1


async def test_the_hangup_report_is_tried_on_two_addresses_only(pbx, gw):
    """Both gateways gone before the hang-up: the handler gives up after the backup (no
    loop), and the channel ends."""
    first = await FakeGateway().start()
    second = await FakeGateway().start()
    try:
        first.handler = allow("pstn", call_id="call-fo-4")
        pbx.set_global(var.AGI, f"127.0.0.1:{first.port}")
        pbx.set_global(var.AGI_BACKUP, f"127.0.0.1:{second.port}")
        uas = await callee(pbx)
        call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="hold", hold=2))
        await first.wait_for(var.OUTBOUND_ROUTE)
    finally:
        await first.close()
        await second.close()
    phone = await call
    await uas.result()
    assert phone.final_code == 200, explain(phone)
    assert await asyncio.to_thread(pbx.wait_no_channels, 10), pbx.channels()
    log = pbx.log_text()
    assert warnings(log, "reporting call call-fo-4 to the backup") == 1, log[-3000:]
    assert second.requests == [] and first.of(var.HANGUP_ROUTE) == []


async def test_a_gateway_that_resets_the_session_is_not_failed_over(pbx, gw):
    """Fail-over is for a gateway that cannot be reached. One that took the request and
    then died mid-session (the connection reset) may have started to decide: asking
    the backup would ask twice for one call."""
    first = await FakeGateway().start()

    async def reset(req: AgiRequest, agi: AgiSession) -> None:
        sock = agi.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        agi.writer.transport.abort()

    try:
        first.handler = reset
        pbx.set_global(var.AGI, f"127.0.0.1:{first.port}")
        pbx.set_global(var.AGI_BACKUP, f"127.0.0.1:{gw.port}")
        gw.handler = allow("pstn")
        phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    finally:
        await first.close()
    assert len(first.of(var.OUTBOUND_ROUTE)) == 1
    assert gw.requests == [], "the backup was asked"
    assert phone.final_code == 503, explain(phone)
    assert "NO_DECISION" in pbx.log_text().split("gateway outbound " + NUMBER)[-1]


@pytest.mark.parametrize(("number", "direction"), [
    (NUMBER, "outbound"), ("front.desk", "outbound"), ("15557654321", "inbound")])
async def test_both_gateways_down_fail_closed(pbx, gw, number, direction):
    mark = len(pbx.log_text())
    pbx.set_global(var.AGI, down())
    pbx.set_global(var.AGI_BACKUP, down())
    uas = await callee(pbx, "bob" if direction == "inbound" else "carrier")
    endpoint = "carrier" if direction == "inbound" else "alice"
    phone = await pbx.call(endpoint, number, scenario="expect_error", max_wait=10)
    trunk = await uas.result(within=0.5)
    assert phone.final_code == 503 and not trunk.invited, explain(phone, trunk)
    # each address was tried once: one fail-over, then the fail policy
    log = pbx.log_text()[mark:]
    assert warnings(log, "unreachable - asking the backup") == 1, log[-3000:]
    assert "(GATEWAY_UNAVAILABLE)" in log.split("asking the backup")[-1]


async def test_both_gateways_down_fail_open_dials_unrated(pbx, gw):
    mark = len(pbx.log_text())
    pbx.set_global(var.FAIL_POLICY, "open")
    pbx.set_global(var.AGI, down())
    pbx.set_global(var.AGI_BACKUP, down())
    uas = await callee(pbx)
    phone = await pbx.call("alice", "+" + NUMBER, scenario="hold", hold=1)
    trunk = await uas.result()
    assert phone.final_code == 200, explain(phone, trunk)
    assert trunk.invite.first_line.startswith(f"INVITE sip:{NUMBER}@"), explain(trunk)
    assert warnings(pbx.log_text()[mark:], "unreachable - asking the backup") == 1


async def test_emergency_dials_with_both_gateways_down(pbx, gw):
    pbx.set_global(var.AGI, down())
    pbx.set_global(var.AGI_BACKUP, down())
    uas = await callee(pbx, "emergency")
    phone = await pbx.call("alice", "911", scenario="hold", hold=1)
    trunk = await uas.result()
    assert phone.final_code == 200, explain(phone, trunk)
    assert trunk.invite.first_line.startswith("INVITE sip:911@"), explain(trunk)
    assert "asking the backup" not in pbx.log_text().split("emergency call 911")[-1]


async def test_a_pbx_without_a_name_sends_an_empty_last_argument(make_pbx, gw):
    """A dialplan with no GW_PBX global still sends the argument, empty: the gateway
    then goes by the peer address (its rules 2 to 4)."""
    gw.reset(decide({var.DECISION: "REJECT", var.REASON: "NO_RATE", var.CAUSE: 3,
                     var.CALL_ID: "call-noname"}))
    pbx = make_pbx(gw_agi=f"127.0.0.1:{gw.port}")
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 404, explain(phone)
    req = gw.of(var.OUTBOUND_ROUTE)[0]
    assert len(req.args) == len(var.OUTBOUND_ARGS) and req.args[var.OUTBOUND_PBX] == ""
    report = await gw.wait_for(var.HANGUP_ROUTE)
    assert len(report.args) == len(var.HANGUP_ARGS) and report.args[var.HANGUP_PBX] == ""


@pytest.mark.db
async def test_cdr_pgsql_writes_the_pbx_name_into_the_pbx_column(make_pbx, gw):
    """CDR(pbx), set by the settings' MSet, lands in cdr.pbx; with GW_PBX empty the
    column is NULL (not ''), which the gateway counts as the PBX "default"."""
    async with scratch_database("gw_dialplan_cdr") as url:
        pool = await open_pool(url, min_size=1, max_size=2)
        try:
            # the column comes with the gateway's migrations; added here in case they
            # do not have it yet (cdr_pgsql reads the columns once, when it loads)
            await pool.execute("ALTER TABLE cdr ADD COLUMN IF NOT EXISTS pbx text")
            gw.reset(allow("pstn"))
            pbx = make_pbx(gw_agi=f"127.0.0.1:{gw.port}", pbx_name="pbx-cdr", **cdr_pgsql(url))
            rows = {}
            for name in ("pbx-cdr", ""):
                pbx.set_global(var.PBX, name)
                gw.reset(allow("pstn"))
                uas = await callee(pbx)
                phone = await pbx.call("alice", NUMBER, scenario="hold", hold=1)
                await uas.result()
                assert phone.final_code == 200, explain(phone)
                uniqueid = gw.of(var.OUTBOUND_ROUTE)[0].env["agi_uniqueid"]
                rows[name] = await _cdr_rows(pool, uniqueid)
            assert [r["disposition"] for r in rows["pbx-cdr"]] == ["ANSWERED"], rows
            assert [r["pbx"] for r in rows["pbx-cdr"]] == ["pbx-cdr"], rows
            assert [r["pbx"] for r in rows[""]] == [None], rows
        finally:
            await pool.close()


async def _cdr_rows(pool, uniqueid: str, seconds: float = 10.0) -> list:
    """The cdr rows of one call, once cdr_pgsql has written them (it does at hangup)."""
    deadline = time.monotonic() + seconds
    while True:
        rows = await pool.fetch(f"SELECT disposition, {var.CDR_PBX} AS pbx FROM cdr"
                                " WHERE uniqueid = $1", uniqueid)
        if rows or time.monotonic() > deadline:
            return [dict(r) for r in rows]
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------
# AMI: least privilege, events, CDRs
# ---------------------------------------------------------------------------


async def test_cdr_event_carries_the_agi_uniqueid(pbx, gw, ami):
    gw.handler = allow("pstn", call_id="call-cdr")
    uas = await callee(pbx)
    phone = await pbx.call("alice", NUMBER, scenario="hold", hold=2.5)
    await uas.result()
    uniqueid = gw.of("outbound")[0].env["agi_uniqueid"]
    cdr = await ami.wait_event(lambda e: e.get("Event") == "Cdr" and e.get("UniqueID") == uniqueid)
    assert cdr["Disposition"] == "ANSWERED"
    assert cdr["Destination"] == NUMBER
    # Whole seconds, truncated: 2.5 s of talk bill as 2.
    assert cdr["BillableSeconds"] == "2" and 2.4 < phone.talk < 2.7, (cdr, explain(phone))
    # [source] fact: cdr_manager.conf [mappings] adds fields (linkedid here).
    assert cdr.get("LinkedID") == uniqueid, cdr


def test_ami_eventfilter_lets_through_every_event_the_gateway_handles():
    # The example account's eventfilter lines (what the PBX tests log in with) and the
    # events the calls layer subscribes to must stay in step: an event the gateway
    # starts handling but the filter does not name would never reach it.
    from gateway.calls.service import CallService
    from tests.support.calls import FakeAmi
    from tests.support.pbx.asterisk import _manager_perms

    _, _, filters = _manager_perms()
    named = set()
    for line in filters:
        m = re.fullmatch(r"eventfilter\(action\(include\),name\((\w+)\)\) =", line)
        assert m, line  # name-only include filters, nothing that excludes
        named.add(m.group(1))
    link = FakeAmi()
    CallService(None, None).attach_ami(link)
    handled = {event.NAME for event in link.handlers}
    assert handled == {"DialEnd", "Hangup", "Cdr"}, handled
    assert named == handled | {"FullyBooted"}, named


async def test_ami_least_privilege_is_enough(pbx, gw, ami):
    # [source] banner, and FullyBooted arrives with read=system.
    assert ami.banner == "Asterisk Call Manager/11.0.0"
    await ami.wait_event(lambda e: e.get("Event") == "FullyBooted", seconds=5)
    assert (await ami.action("Ping"))["Response"] == "Success"
    gw.handler = allow("pstn", call_id="call-ami")
    uas = await callee(pbx)
    call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="until_bye", max_wait=30))
    dial_end = await ami.wait_event(
        lambda e: e.get("Event") == "DialEnd" and e.get("DialStatus") == "ANSWER"
    )
    # The list answering CoreShowChannels is not subject to the account's eventfilter.
    channels = await ami.action_list("CoreShowChannels", "CoreShowChannelsComplete")
    names = {c["Channel"] for c in channels}
    assert {dial_end["Channel"], dial_end["DestChannel"]} <= names, names
    # Hangup by regular expression (what a gateway uses to sweep a call).
    carrier_name = dial_end["DestChannel"]
    resp = await ami.action("Hangup", Channel=f"/^{carrier_name}$/")
    assert resp["Response"] == "Success", resp
    phone = await call
    await uas.result()
    assert phone.bye_from == "pbx", explain(phone)
    hangup = await ami.wait_event(
        lambda e: e.get("Event") == "Hangup" and e.get("Channel") == carrier_name
    )
    assert hangup["Cause"].isdigit() and hangup.get("Cause-txt"), hangup
    await ami.wait_event(lambda e: e.get("Event") == "Cdr" and e.get("UniqueID")
                         == dial_end["Uniqueid"])
    # The account's eventfilter lines: only the events the gateway acts on are sent
    # (without them this call also brings Newchannel, DialBegin, BridgeEnter, ...).
    sent = {e["Event"] for e in ami.events if "ActionID" not in e}
    assert sent == {"FullyBooted", "DialEnd", "Hangup", "Cdr"}, sent
    # Not granted: system/command. Originate is (the cut-off warning), but not of a
    # System/Exec-like application, which needs "system".
    denied = await ami.action("Command", Command="core show version")
    assert denied["Response"] == "Error", denied
    denied = await ami.action("Originate", Channel="Local/s@gateway-warning/n",
                              Application="System", Data="true")
    assert denied["Response"] == "Error", denied


# ---------------------------------------------------------------------------
# FastAGI behaviour the gateway relies on
# ---------------------------------------------------------------------------


async def test_agi_protocol_details(pbx, gw):
    """Unknown command, usage reply, quoting; decision still works afterwards."""

    async def handler(req: AgiRequest, agi: AgiSession) -> None:
        if req.script != "outbound":
            return
        assert (await agi.command("FOO BAR")).startswith("510 ")
        usage = await agi.command("GET VARIABLE")
        assert usage.startswith("520-") and usage.endswith("520 End of proper usage."), usage
        req.env["_set_unquoted"] = await agi.command(f"SET VARIABLE {var.REASON} value with spaces")
        unquoted = await agi.command(f"GET VARIABLE {var.REASON}")
        await agi.command(f'SET VARIABLE {var.REASON} "value with spaces"')
        quoted = await agi.command(f"GET VARIABLE {var.REASON}")
        req.env["_unquoted"], req.env["_quoted"] = unquoted, quoted
        await agi.set({var.DECISION: "REJECT", var.CAUSE: 17})

    gw.handler = handler
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 486, explain(phone)
    req = gw.of("outbound")[0]
    assert req.env["_quoted"] == "200 result=1 (value with spaces)"
    # Unquoted spaces are a syntax error (multi-line 520) and set nothing: the variable
    # does not exist (result=0; the dialplan clears only GW_DECISION).
    assert req.env["_set_unquoted"].startswith("520-Invalid command syntax"), req.dialogue
    assert req.env["_unquoted"] == "200 result=0"


async def test_agi_waits_for_a_slow_gateway_and_reports_a_hangup(pbx, gw, ami):
    """Asterisk does not time the gateway out; a hangup meanwhile arrives as 'HANGUP'."""
    release = asyncio.Event()

    async def slow(req: AgiRequest, agi: AgiSession) -> None:
        if req.script == "outbound":
            await asyncio.wait_for(release.wait(), 30)
            reply = await agi.command("GET VARIABLE CHANNEL(state)")
            req.env["_after_hangup"] = reply
            await agi.set({var.DECISION: "ALLOW", var.ROUTE: "pstn", var.NUMBER: NUMBER})
        elif req.script == "hangup":
            req.env["_dead"] = await agi.command("ANSWER")

    gw.handler = slow
    call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="expect_error", max_wait=30))
    req = await gw.wait_for("outbound")
    await asyncio.sleep(4)  # longer than any connect/read timeout would be
    assert not call.done()
    chan = req.env["agi_channel"]
    assert (await ami.action("Hangup", Channel=chan, Cause="21"))["Response"] == "Success"
    # The hung-up channel lives on (the phone hears nothing) until the gateway
    # ends its AGI session: a gateway must close promptly on "HANGUP".
    await asyncio.sleep(1.5)
    assert not call.done()
    assert not any(e.get("Event") == "Hangup" and e.get("Channel") == chan for e in ami.events)
    release.set()
    phone = await call
    assert phone.final_code == 403, explain(phone)
    await ami.wait_event(lambda e: e.get("Event") == "Hangup" and e.get("Channel") == chan)
    assert req.unsolicited == ["HANGUP"], req.dialogue
    assert req.env["_after_hangup"].startswith("200 result=1"), req.dialogue
    # No GW_CALL_ID was set, so no hangup report.
    assert gw.of("hangup") == []


async def test_an_answer_after_the_caller_hung_up_still_pushes_the_handler_that_reports(
        pbx, gw, ami):
    """The gateway's answer pushes the hangup handler in its MSet (quoted, as the gateway
    sends it). A caller who hangs up while the gateway decides still gets that answer,
    handler included, and the handler reports the call once the session ends."""
    release = asyncio.Event()

    async def slow(req: AgiRequest, agi: AgiSession) -> None:
        if req.script == "outbound":
            await asyncio.wait_for(release.wait(), 30)
            data = ",".join([f"{var.REASON}=FUNDED", f"{var.CALL_ID}=call-gone",
                             f'"{var.HANGUP_HANDLER}={var.HANGUP_HANDLER_AT}"',
                             f"{var.ROUTE}=pstn", f"{var.NUMBER}={NUMBER}",
                             f"{var.DECISION}=ALLOW"])
            req.env["_mset"] = await agi.command(f"EXEC MSet {quote(data)}")

    gw.handler = slow
    call = asyncio.create_task(pbx.call("alice", NUMBER, scenario="expect_error", max_wait=30))
    req = await gw.wait_for("outbound")
    chan = req.env["agi_channel"]
    assert (await ami.action("Hangup", Channel=chan, Cause="16"))["Response"] == "Success"
    await asyncio.sleep(0.5)
    release.set()
    await call
    assert req.env["_mset"].startswith("200 result=0"), req.dialogue
    report = await gw.wait_for("hangup")
    assert report.args == ["call-gone", "0", "", "0", PBX_NAME]
    assert report.env["agi_uniqueid"] == req.env["agi_uniqueid"]
    await asyncio.sleep(0.5)
    assert len(gw.of("hangup")) == 1  # one answer, one handler, one report


async def test_dead_channel_commands_are_refused_in_the_hangup_handler(pbx, gw):
    async def handler(req: AgiRequest, agi: AgiSession) -> None:
        if req.script == "outbound":
            await agi.set({var.DECISION: "REJECT", var.CAUSE: 21, var.CALL_ID: "call-dead"})
        elif req.script == "hangup":
            req.env["_answer"] = await agi.command("ANSWER")

    gw.handler = handler
    phone = await pbx.call("alice", NUMBER, scenario="expect_error", max_wait=10)
    assert phone.final_code == 403
    report = await gw.wait_for("hangup")
    await asyncio.sleep(0.3)
    assert report.env["_answer"].startswith("511 "), report.env["_answer"]
    assert report.args[:3] == ["call-dead", "0", ""]


# ---------------------------------------------------------------------------
# The shipped files load as they are
# ---------------------------------------------------------------------------


def test_shipped_dialplan_loads_without_warnings(shared_pbx):
    log = shared_pbx.log_text().splitlines()
    complaints = [ln for ln in log if "pbx_config" in ln and ("WARNING" in ln or "ERROR" in ln)]
    assert complaints == []
    out = shared_pbx.cli("dialplan show gateway-decide")
    assert "Hangup(34)" in out and "L($[TRUNC(0${" + var.FUNDED + "} * 1000)])" in out


async def test_shipped_examples_load(make_pbx):  # noqa: F811
    sip_port, ami_port = free_port("both"), free_port()
    pjsip = (DIALPLAN_DIR / "pjsip.conf.example").read_text()
    manager = (DIALPLAN_DIR / "manager.conf.example").read_text()
    pbx = make_pbx(
        extra_config={
            "pjsip.conf": pjsip.replace("bind=0.0.0.0:5060", f"bind=127.0.0.1:{sip_port}"),
            "manager.conf": manager.replace("port = 5038", f"port = {ami_port}"),
            "cdr_manager.conf": (DIALPLAN_DIR / "cdr_manager.conf.example").read_text(),
        }
    )
    endpoints = pbx.cli("pjsip show endpoints")
    for name in ("maple-front", "carrier", "partner", "emergency"):
        assert re.search(rf"Endpoint:\s+{name}\b", endpoints), endpoints
    assert "gateway-outbound" in pbx.cli("pjsip show endpoint maple-front")
    assert "gateway-inbound" in pbx.cli("pjsip show endpoint carrier")
    status = pbx.cli("cdr show status")
    assert re.search(r"Logging:\s+Enabled", status) and "cdr_manager" in status, status
    # The example AMI account logs in and sees what the gateway needs.
    pbx.ami_port, pbx.ami_secret = ami_port, "change-me-to-a-long-random-secret"
    ami = await Ami().connect(pbx)
    try:
        await ami.wait_event(lambda e: e.get("Event") == "FullyBooted", seconds=5)
        assert (await ami.action("Ping"))["Response"] == "Success"
        assert await ami.action_list("CoreShowChannels", "CoreShowChannelsComplete") == []
    finally:
        await ami.close()


async def test_pjsiphangup_could_send_402(make_pbx):  # noqa: F811
    """No Q.850 cause maps to 402; PJSIPHangup (Asterisk >= 20.6) can send it.

    Not used by the shipped dialplan (the contract is Hangup(GW_CAUSE)); this
    records the option for NO_BALANCE in docs/dialplan.md.
    """
    pbx = make_pbx(
        contexts={"dave": "test-pjsip-hangup"},
        extra_dialplan="[test-pjsip-hangup]\nexten => _X.,1,PJSIPHangup(${EXTEN})\n",
    )
    phone = await pbx.call("dave", "402", scenario="expect_error", max_wait=10)
    assert phone.final_response.first_line == "SIP/2.0 402 Payment Required", explain(phone)
