"""Fast tests of the AMI client against a fake AMI server speaking the wire format
(``tests/support/ami.py``). The real PBX harness is the judge for the behaviour of
Asterisk itself.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from gateway.ami import (
    AMI_ACTION_FAILED,
    AMI_DISCONNECTED,
    AMI_LOGIN_FAILED,
    AMI_PBX_MISMATCH,
    AMI_TIMEOUT,
    AMI_UNREACHABLE,
    AmiClient,
    AmiError,
)
from gateway.ami.events import Cdr, CoreShowChannel, DialEnd, Hangup
from tests.support.ami import SECRET, USERNAME, FakeAmi, FakeConn, encode


async def never_answer(conn: FakeConn, action: dict[str, str]) -> None:
    return None


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def fake():
    server = FakeAmi()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def make_client(fake):
    clients: list[AmiClient] = []

    def make(**overrides) -> AmiClient:
        options = dict(
            action_timeout=0.3,
            ping_interval=60.0,
            connect_timeout=0.5,
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        options.update(overrides)
        host = options.pop("host", "127.0.0.1")
        port = options.pop("port", fake.port)
        secret = options.pop("secret", SECRET)
        client = AmiClient(host, port, USERNAME, secret, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_login_ok_and_system_events_reach_handlers(fake, make_client):
    booted: list[dict[str, str]] = []
    client = make_client()
    client.on_event("FullyBooted", booted.append)

    await client.start()

    assert client.state == "connected"
    login = fake.received[0]
    assert login["Action"] == "Login"
    assert login["Username"] == USERNAME
    assert login["Events"] == "on"
    await eventually(lambda: len(booted) == 1)
    assert booted[0]["Status"] == "Fully Booted"
    status = client.status()
    assert status["state"] == "connected"
    assert status["address"] == f"127.0.0.1:{fake.port}"
    assert status["ami_version"] == "11.0.0"
    assert SECRET not in repr(status) and SECRET not in repr(client)


async def test_wrong_secret_raises_login_failed_quickly(fake, make_client):
    client = make_client(secret="wrong-secret")
    started = time.monotonic()
    with pytest.raises(AmiError) as caught:
        await client.start()

    assert caught.value.code == AMI_LOGIN_FAILED
    assert "Authentication failed" in str(caught.value)
    assert "wrong-secret" not in str(caught.value)
    assert time.monotonic() - started < 0.25
    assert client.state == "disconnected"
    assert client.last_error is not None and AMI_LOGIN_FAILED in client.last_error
    # A failed start leaves nothing retrying in the background.
    await asyncio.sleep(0.15)
    assert len(fake.conns) == 1


async def test_unreachable_port_raises_unreachable(make_client):
    client = make_client(port=free_port())
    with pytest.raises(AmiError) as caught:
        await client.start()
    assert caught.value.code == AMI_UNREACHABLE
    assert client.state == "disconnected"


async def test_server_without_banner_is_unreachable_after_connect_timeout(make_client):
    async def silent(reader, writer):
        await reader.read()  # accept, never greet; ends when the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = make_client(port=port, connect_timeout=0.2)
    started = time.monotonic()
    try:
        with pytest.raises(AmiError) as caught:
            await client.start()
    finally:
        server.close()
    elapsed = time.monotonic() - started
    assert caught.value.code == AMI_UNREACHABLE
    assert 0.15 < elapsed < 1.0


async def test_responses_matched_by_action_id_with_interleaved_events(fake, make_client):
    held: list[dict[str, str]] = []

    async def hold_first(conn, action):
        held.append(action)

    async def answer_second_then_first(conn, action):
        first = held[0]
        # An event echoing the still-pending ActionID: a real event, not a response.
        await conn.send({"Event": "VarSet", "ActionID": first["ActionID"], "Variable": "X"})
        await conn.send({"Event": "Newexten", "Channel": "PJSIP/alice-00000001"})
        await conn.send({"Response": "Success", "ActionID": "someone-else", "Message": "stale"})
        await conn.reply(action, Message="second")
        await conn.send({"Event": "Hangup", "Channel": "PJSIP/alice-00000001", "Cause": "16"})
        await conn.reply(first, Message="first")

    fake.scripts["first"] = hold_first
    fake.scripts["second"] = answer_second_then_first
    seen: list[str] = []
    client = make_client()
    client.on_event("*", lambda event: seen.append(event["Event"]))
    await client.start()

    first_task = asyncio.create_task(client.action({"Action": "First"}))
    await eventually(lambda: bool(held))
    second = await client.action({"Action": "Second"})
    first = await first_task

    assert second["Message"] == "second"
    assert first["Message"] == "first"
    assert first["ActionID"] == held[0]["ActionID"]
    await eventually(lambda: "Hangup" in seen)
    assert [name for name in seen if name != "FullyBooted"] == ["VarSet", "Newexten", "Hangup"]


async def test_action_timeout_when_server_never_answers(fake, make_client):
    fake.scripts["status"] = never_answer
    client = make_client(action_timeout=0.2)
    await client.start()

    started = time.monotonic()
    with pytest.raises(AmiError) as caught:
        await client.action({"Action": "Status"})
    elapsed = time.monotonic() - started

    assert caught.value.code == AMI_TIMEOUT
    assert 0.15 < elapsed < 0.6
    # The link itself is fine: the next action is answered.
    assert (await client.action({"Action": "Ping"}))["Ping"] == "Pong"
    assert client.state == "connected"


async def test_error_response_raises_action_failed_with_message(fake, make_client):
    async def no_such_channel(conn, action):
        await conn.send(
            {"Response": "Error", "ActionID": action["ActionID"], "Message": "No such channel"}
        )

    client = make_client()
    await client.start()

    await client.setvar("PJSIP/alice-00000001", "TIMEOUT(absolute)", "10")
    assert {k: fake.received[-1][k] for k in ("Action", "Channel", "Variable", "Value")} == {
        "Action": "Setvar",
        "Channel": "PJSIP/alice-00000001",
        "Variable": "TIMEOUT(absolute)",
        "Value": "10",
    }
    await client.hangup("PJSIP/bob-00000002", cause=17)
    assert fake.received[-1]["Cause"] == "17"

    fake.scripts["hangup"] = no_such_channel
    with pytest.raises(AmiError) as caught:
        await client.hangup("PJSIP/gone-00000009")
    assert caught.value.code == AMI_ACTION_FAILED
    assert "No such channel" in str(caught.value)
    assert caught.value.response is not None
    assert caught.value.response["Message"] == "No such channel"


async def test_crlf_in_values_is_refused_before_sending(fake, make_client):
    client = make_client()
    await client.start()
    sent = len(fake.received)
    with pytest.raises(ValueError):
        await client.setvar("PJSIP/a-1", "X", "1\r\nAction: Hangup\r\nChannel: /.*/")
    await asyncio.sleep(0.05)
    assert len(fake.received) == sent


async def test_action_while_disconnected_raises_at_once(fake, make_client):
    fake.scripts["status"] = never_answer
    client = make_client(action_timeout=2.0, backoff_initial=5.0, backoff_max=5.0)

    with pytest.raises(AmiError) as caught:
        await client.action({"Action": "Ping"})
    assert caught.value.code == AMI_DISCONNECTED

    await client.start()
    pending = asyncio.create_task(client.action({"Action": "Status"}))
    await eventually(lambda: fake.received[-1]["Action"] == "Status")
    fake.drop()

    started = time.monotonic()
    with pytest.raises(AmiError) as caught:
        await pending
    assert caught.value.code == AMI_DISCONNECTED
    assert time.monotonic() - started < 0.5  # not the 2 s action timeout
    assert client.state == "disconnected"

    started = time.monotonic()
    with pytest.raises(AmiError) as caught:
        await client.action({"Action": "Ping"})
    assert caught.value.code == AMI_DISCONNECTED
    assert time.monotonic() - started < 0.05


async def test_reconnects_after_server_drop_and_resyncs(fake, make_client):
    connects = 0
    hangups: list[dict[str, str]] = []

    async def resync() -> None:
        nonlocal connects
        connects += 1

    client = make_client()
    client.on_connect(resync)
    client.on_event("Hangup", hangups.append)
    await client.start()
    await eventually(lambda: connects == 1)
    assert client.reconnects == 0

    fake.drop()
    await eventually(lambda: connects == 2 and client.state == "connected")

    assert client.reconnects == 1
    assert fake.logins == 2
    assert client.last_error is not None and "closed" in client.last_error
    await fake.event({"Event": "Hangup", "Channel": "PJSIP/bob-00000003", "Cause": "16"})
    await eventually(lambda: len(hangups) == 1)
    assert hangups[0]["Channel"] == "PJSIP/bob-00000003"
    assert (await client.action({"Action": "Ping"}))["Ping"] == "Pong"


async def test_wrong_secret_on_reconnect_is_logged_and_retried(fake, make_client):
    client = make_client(backoff_initial=0.02, backoff_max=0.08)
    await client.start()
    with capture_logs() as logs:
        fake.secret = "rotated"
        fake.drop()
        await eventually(lambda: fake.failed_logins >= 4)
        assert client.state != "connected"
        fake.secret = SECRET
        await eventually(lambda: client.state == "connected")

    failures = [e for e in logs if e["event"] == "ami.reconnect_failed"]
    assert len(failures) >= 3
    assert {e["code"] for e in failures} == {AMI_LOGIN_FAILED}
    assert all(e["log_level"] == "error" for e in failures)
    # logged at attempts 1, 2, 4...: a long outage leaves a few lines, not one per try
    assert [e["attempt"] for e in failures][:3] == [1, 2, 4]
    delays = [e["retry_within"] for e in failures]
    assert delays[:3] == [0.04, 0.08, 0.08]  # doubled, then capped at backoff_max
    assert SECRET not in repr(logs)
    assert client.reconnects == 1


async def test_unanswered_ping_declares_link_dead_and_reconnects(fake, make_client):
    client = make_client(ping_interval=0.1, action_timeout=0.15)
    await client.start()
    first = fake.live
    fake.answer_pings = False

    await asyncio.wait_for(first.closed.wait(), 1.0)  # closed by the client
    assert client.last_error is not None and "Ping" in client.last_error
    fake.answer_pings = True
    await eventually(lambda: client.reconnects == 1 and client.state == "connected")
    assert len(fake.conns) == 2


async def test_core_show_channels_collects_the_list(fake, make_client):
    async def core_show_channels(conn, action):
        aid = action["ActionID"]
        await conn.reply(action, EventList="start", Message="Channels will follow")
        await conn.send({"Event": "CoreShowChannel", "ActionID": aid, "Channel": "PJSIP/a-1"})
        await conn.send({"Event": "Newchannel", "Channel": "PJSIP/c-3"})
        await conn.send({"Event": "CoreShowChannel", "ActionID": aid, "Channel": "PJSIP/b-2"})
        await conn.send(
            {
                "Event": "CoreShowChannelsComplete",
                "ActionID": aid,
                "EventList": "Complete",
                "ListItems": "2",
            }
        )

    fake.scripts["coreshowchannels"] = core_show_channels
    seen: list[str] = []
    client = make_client()
    client.on_event("*", lambda event: seen.append(event["Event"]))
    await client.start()

    channels = await client.core_show_channels()

    assert [c["Channel"] for c in channels] == ["PJSIP/a-1", "PJSIP/b-2"]
    assert all(c["Event"] == "CoreShowChannel" for c in channels)
    await eventually(lambda: "Newchannel" in seen)
    assert "CoreShowChannel" not in seen and "CoreShowChannelsComplete" not in seen


async def test_live_channels_are_typed(fake, make_client):
    async def core_show_channels(conn, action):
        aid = action["ActionID"]
        await conn.reply(action, EventList="start", Message="Channels will follow")
        await conn.send({"Event": "CoreShowChannel", "ActionID": aid, "Channel": "PJSIP/a-1",
                         "UniqueID": "1.1", "LinkedID": "1.1"})
        await conn.send({"Event": "CoreShowChannel", "ActionID": aid, "Channel": "PJSIP/b-2",
                         "Uniqueid": "1.2", "Linkedid": "1.1"})
        await conn.send({"Event": "CoreShowChannelsComplete", "ActionID": aid,
                         "EventList": "Complete", "ListItems": "2"})

    fake.scripts["coreshowchannels"] = core_show_channels
    client = make_client()
    await client.start()

    assert await client.live_channels() == [
        CoreShowChannel(uniqueid="1.1", channel="PJSIP/a-1", linkedid="1.1"),
        CoreShowChannel(uniqueid="1.2", channel="PJSIP/b-2", linkedid="1.1"),
    ]


async def test_typed_handlers_get_parsed_events_and_failures_are_logged(fake, make_client):
    """``on(DialEnd, ...)`` delivers DialEnd events only, parsed; a failing typed handler
    is logged under its own name and the next event still arrives."""
    ends: list[DialEnd] = []

    async def broken(event: Hangup) -> None:
        raise RuntimeError("typed handler bug")

    client = make_client()
    client.on(DialEnd, ends.append)
    client.on(Hangup, broken)
    await client.start()

    with capture_logs() as logs:
        await fake.event({"Event": "Hangup", "Channel": "PJSIP/a-1", "Uniqueid": "1.1"})
        await fake.event({"Event": "DialEnd", "DialStatus": "ANSWER", "UniqueID": "1.1",
                          "DestChannel": "PJSIP/carrier-2", "Linkedid": "1.1"})
        await eventually(lambda: len(ends) == 1)

    assert ends == [DialEnd(uniqueid="1.1", dial_status="ANSWER",
                            dest_channel="PJSIP/carrier-2", linkedid="1.1")]
    [failed] = [e for e in logs if e["event"] == "ami.event_handler_failed"]
    assert "broken" in failed["handler"]


# --- the typed events, parsed at the edge ----------------------------------------------


def test_dial_end_parses_whatever_the_header_case():
    for uniqueid_header in ("Uniqueid", "UniqueID", "UNIQUEID", "uniqueid"):
        event = DialEnd.parse({"Event": "DialEnd", uniqueid_header: "17.3",
                               "dialstatus": "ANSWER", "DESTCHANNEL": "PJSIP/carrier-1",
                               "LinkedID": "17.1"})
        assert event == DialEnd(uniqueid="17.3", dial_status="ANSWER",
                                dest_channel="PJSIP/carrier-1", linkedid="17.1")
        assert event.answered


def test_cdr_parses_whatever_the_header_case():
    for uniqueid_header in ("UniqueID", "Uniqueid"):
        cdr = Cdr.parse({"Event": "Cdr", uniqueid_header: "17.3", "Disposition": "ANSWERED",
                         "billableseconds": "61"})
        assert cdr == Cdr(uniqueid="17.3", disposition="ANSWERED", billable_seconds=61)
        assert cdr.answered


def test_missing_or_malformed_fields_are_none_or_zero():
    assert DialEnd.parse({"Event": "DialEnd"}) == DialEnd(None, None, None, None)
    assert not DialEnd.parse({"DialStatus": "CANCEL"}).answered
    assert Hangup.parse({}) == Hangup(uniqueid=None, channel=None)
    assert CoreShowChannel.parse({"Channel": ""}) == CoreShowChannel(None, None, None)
    for billable in ("", "ten", "  ", "1.5"):
        cdr = Cdr.parse({"UniqueID": "1", "Disposition": "ANSWERED",
                         "BillableSeconds": billable})
        assert cdr.billable_seconds == 0
    assert Cdr.parse({"UniqueID": "1"}) == Cdr("1", None, 0)
    assert not Cdr.parse({"Disposition": "NO ANSWER", "BillableSeconds": "9"}).answered
    assert Cdr.parse({"BillableSeconds": " 7 "}).billable_seconds == 7


def test_events_are_frozen():
    event = Hangup.parse({"Uniqueid": "1"})
    with pytest.raises(AttributeError):
        event.uniqueid = "2"  # type: ignore[misc]


async def test_list_without_completion_times_out(fake, make_client):
    async def incomplete(conn, action):
        await conn.reply(action, EventList="start", Message="Channels will follow")

    fake.scripts["coreshowchannels"] = incomplete
    client = make_client(action_timeout=0.2)
    await client.start()
    with pytest.raises(AmiError) as caught:
        await client.core_show_channels()
    assert caught.value.code == AMI_TIMEOUT


async def test_failing_callbacks_do_not_stop_other_events(fake, make_client):
    good: list[str] = []

    def broken_sync(event):
        raise RuntimeError("sync handler bug")

    async def broken_async(event):
        raise RuntimeError("async handler bug")

    client = make_client()
    client.on_event("Hangup", broken_sync)
    client.on_event("Hangup", broken_async)
    client.on_event("Hangup", lambda event: good.append(event["Channel"]))
    await client.start()

    with capture_logs() as logs:
        await fake.event({"Event": "Hangup", "Channel": "PJSIP/a-1"})
        await fake.event({"Event": "Hangup", "Channel": "PJSIP/b-2"})
        await eventually(lambda: len(good) == 2)

    assert good == ["PJSIP/a-1", "PJSIP/b-2"]
    failed = [e for e in logs if e["event"] == "ami.event_handler_failed"]
    assert len(failed) == 4
    assert client.state == "connected"
    assert (await client.action({"Action": "Ping"}))["Ping"] == "Pong"


async def test_trailing_empty_value_and_split_utf8_survive_framing(fake, make_client):
    cdrs: list[dict[str, str]] = []
    client = make_client()
    client.on_event("Cdr", cdrs.append)
    await client.start()

    raw = encode({"Event": "Cdr", "CallerID": '"Zoë" <100>', "UserField": ""})
    cut = raw.index("ë".encode()) + 1  # split inside the two-byte character
    fake.live.writer.write(raw[:cut])
    await fake.live.writer.drain()
    await asyncio.sleep(0.02)
    fake.live.writer.write(raw[cut:])

    await eventually(lambda: len(cdrs) == 1)
    assert cdrs[0]["CallerID"] == '"Zoë" <100>'
    assert cdrs[0]["UserField"] == ""


async def test_stop_logs_off_and_stops_reconnecting(fake, make_client):
    client = make_client()
    await client.start()
    await client.stop()

    assert client.state == "stopped"
    assert fake.received[-1]["Action"] == "Logoff"
    with pytest.raises(AmiError) as caught:
        await client.action({"Action": "Ping"})
    assert caught.value.code == AMI_DISCONNECTED
    await asyncio.sleep(0.15)  # three back-off periods
    assert len(fake.conns) == 1


# -- a gateway that cannot keep up: a bounded backlog, counted drops, a re-sync ------------


async def test_a_full_event_backlog_drops_counts_and_resyncs_once_drained(fake, make_client):
    release = asyncio.Event()
    taken: list[str] = []  # off the backlog, into the handler
    handled: list[str] = []

    async def slow(event: dict[str, str]) -> None:
        taken.append(event["Uniqueid"])
        await release.wait()  # the gateway is stuck (e.g. the database is slow)
        handled.append(event["Uniqueid"])

    dropped: list[str] = []
    resyncs: list[int] = []
    client = make_client(max_event_backlog=5, on_event_dropped=dropped.append)
    client.on_event("DialEnd", slow)
    client.on_events_lost(lambda: resyncs.append(client.event_backlog))
    await client.start()

    for n in range(50):
        await fake.event({"Event": "DialEnd", "Uniqueid": f"u-{n}", "DialStatus": "ANSWER"})
    # events nobody handles take no place in the backlog and are never "dropped"
    for n in range(200):
        await fake.event({"Event": "VarSet", "Variable": f"V{n}", "Value": "x"})
    await client.action({"Action": "Ping"})  # actions still answered: the reader never blocks
    # one in the handler, the backlog full or one short (whether the handler took its
    # event before or after the backlog filled is up to the scheduler), the rest dropped
    await eventually(lambda: client.events_dropped + client.event_backlog + len(taken) == 50)
    status = client.status()
    waiting = status["event_backlog"]
    assert len(taken) == 1 and waiting in (4, 5) and status["max_event_backlog"] == 5
    assert status["events_dropped"] == 49 - waiting
    assert status["resyncs_after_drops"] == 0
    assert dropped == ["DialEnd"] * status["events_dropped"]
    assert resyncs == []  # no re-sync while the stale backlog would overtake it

    release.set()
    await eventually(lambda: len(resyncs) == 1)
    assert resyncs[0] <= 2  # ran once the backlog was down to half its bound
    await eventually(lambda: len(handled) == 1 + waiting)
    # the first five, then whichever found the place the handler freed; in arrival order
    assert handled[:5] == [f"u-{n}" for n in range(5)]
    assert handled == sorted(handled, key=lambda u: int(u[2:]))
    assert client.status()["resyncs_after_drops"] == 1
    await asyncio.sleep(0.05)
    assert len(resyncs) == 1  # once per overflow


async def test_getvar_returns_the_value_and_empty_when_unset(fake, make_client):
    async def getvar(conn, action):
        value = "8.916" if action["Channel"] == "PJSIP/carrier-00000001" else ""
        await conn.reply(action, Variable=action["Variable"], Value=value)

    fake.scripts["getvar"] = getvar
    client = make_client()
    await client.start()
    assert await client.getvar("PJSIP/carrier-00000001", "TIMEOUT(absolute)") == "8.916"
    assert await client.getvar("PJSIP/alice-00000000", "TIMEOUT(absolute)") == ""
    assert fake.received[-1]["Variable"] == "TIMEOUT(absolute)"


async def test_an_action_refused_while_down_cuts_a_long_back_off_short(fake, make_client):
    client = make_client(backoff_initial=0.05, backoff_max=5.0)
    await client.start()
    fake.secret = "rotated"  # every reconnect is refused: the back-off grows
    fake.drop()
    await eventually(lambda: fake.failed_logins >= 5, within=5.0)  # next wait: 1.6 s
    fake.secret = SECRET
    with pytest.raises(AmiError) as caught:
        await client.action({"Action": "Setvar"})  # e.g. a deadline move, retried
    assert caught.value.code == AMI_DISCONNECTED
    started = time.monotonic()
    await eventually(lambda: client.state == "connected", within=1.0)
    assert time.monotonic() - started < 0.5


# ---- the PBX's identity: GW_PBX read after each login ---------------------------------------


def gw_pbx_says(fake: FakeAmi, holder: dict[str, str]) -> None:
    """Answer ``Getvar`` of the global GW_PBX (no Channel) with ``holder["name"]``, as
    Asterisk does: ``Value:`` empty when the global is unset."""

    async def getvar(conn: FakeConn, action: dict[str, str]) -> None:
        assert "Channel" not in action and action["Variable"] == "GW_PBX"
        await conn.reply(action, Variable="GW_PBX", Value=holder["name"])

    fake.scripts["getvar"] = getvar


async def test_the_pbx_that_names_itself_as_configured_is_used(fake, make_client):
    gw_pbx_says(fake, {"name": "pbx1"})
    booted: list[dict[str, str]] = []
    client = make_client(expected_pbx="pbx1", single_pbx=False)
    client.on_event("FullyBooted", booted.append)
    await client.start()
    assert client.state == "connected"
    assert [a["Action"] for a in fake.received[:2]] == ["Login", "Getvar"]
    status = client.status()
    assert (status["pbx"], status["pbx_reported"]) == ("pbx1", "pbx1")
    # FullyBooted came before the identity was known: held, then delivered
    await eventually(lambda: len(booted) == 1)


async def test_a_pbx_that_says_it_is_another_fails_start_clearly(fake, make_client):
    gw_pbx_says(fake, {"name": "pbx2"})
    booted: list[dict[str, str]] = []
    client = make_client(expected_pbx="pbx1", misconfigured_retry=0.05)
    client.on_event("FullyBooted", booted.append)
    with pytest.raises(AmiError) as caught:
        await client.start()
    assert caught.value.code == AMI_PBX_MISMATCH
    assert caught.value.message == (
        f"PBX identity mismatch: configured 'pbx1', the PBX at 127.0.0.1:{fake.port} "
        "says it is 'pbx2' (GW_PBX)")
    assert client.state == "misconfigured"
    assert client.status()["pbx_reported"] == "pbx2"
    assert "pbx2" in (client.status()["last_error"] or "")
    await asyncio.sleep(0.15)
    assert len(fake.conns) == 1  # a failed start leaves nothing retrying
    assert fake.conns[0].closed.is_set()  # the refused link is closed
    assert booted == []  # nothing the refused PBX sent reached a handler


async def test_an_unnamed_pbx_is_accepted_only_as_the_only_one(fake, make_client):
    gw_pbx_says(fake, {"name": ""})
    alone = make_client(expected_pbx="default", single_pbx=True)
    with capture_logs() as logs:
        await alone.start()
    assert alone.state == "connected"
    assert alone.status()["pbx_reported"] == ""
    warnings = [e for e in logs if e["event"] == "pbx_unnamed"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["pbx"] == "default"

    one_of_several = make_client(expected_pbx="pbx1", single_pbx=False)
    with pytest.raises(AmiError) as caught:
        await one_of_several.start()
    assert caught.value.code == AMI_PBX_MISMATCH
    assert "configured 'pbx1'" in caught.value.message
    assert "GW_PBX is empty" in caught.value.message
    assert f"127.0.0.1:{fake.port}" in caught.value.message
    assert one_of_several.state == "misconfigured"


async def test_without_an_expected_name_nothing_is_asked(fake, make_client):
    client = make_client()
    await client.start()
    assert "getvar" not in [a["Action"].lower() for a in fake.received]
    assert client.status()["pbx"] is None and client.status()["pbx_reported"] is None


async def test_a_pbx_that_cannot_be_asked_is_refused(fake, make_client):
    async def denied(conn: FakeConn, action: dict[str, str]) -> None:
        await conn.send({"Response": "Error", "ActionID": action["ActionID"],
                         "Message": "Permission denied"})

    fake.scripts["getvar"] = denied
    client = make_client(expected_pbx="pbx1")
    with pytest.raises(AmiError) as caught:
        await client.start()
    assert caught.value.code == AMI_PBX_MISMATCH
    assert "Permission denied" in caught.value.message and "'pbx1'" in caught.value.message


async def test_a_renamed_pbx_on_reconnect_is_misconfigured_until_fixed(fake, make_client):
    says = {"name": "pbx1"}
    gw_pbx_says(fake, says)
    connects = 0
    booted: list[dict[str, str]] = []

    def connected() -> None:
        nonlocal connects
        connects += 1

    client = make_client(expected_pbx="pbx1", misconfigured_retry=0.1)
    client.on_connect(connected)
    client.on_event("FullyBooted", booted.append)
    await client.start()
    await eventually(lambda: connects == 1 and len(booted) == 1)

    with capture_logs() as logs:
        says["name"] = "pbx2"  # e.g. the address now reaches another PBX
        fake.drop()
        await eventually(lambda: client.state == "misconfigured")
        await eventually(lambda: fake.logins >= 3)  # retried
        assert client.state == "misconfigured"
        status = client.status()
        assert "says it is 'pbx2' (GW_PBX)" in (status["last_error"] or "")
        assert status["pbx_reported"] == "pbx2"
        with pytest.raises(AmiError) as caught:
            await client.action({"Action": "Ping"})
        assert caught.value.code == AMI_DISCONNECTED and "misconfigured" in caught.value.message
        assert connects == 1 and len(booted) == 1  # the wrong PBX's events reached no one

        says["name"] = "pbx1"  # the operator fixes the dialplan
        await eventually(lambda: client.state == "connected" and connects == 2)
    assert client.status()["pbx_reported"] == "pbx1"
    await eventually(lambda: len(booted) == 2)
    mismatches = [e for e in logs if e["event"] == "ami.pbx_mismatch"]
    assert mismatches and mismatches[0]["log_level"] == "error"
    assert "'pbx2'" in mismatches[0]["error"]
