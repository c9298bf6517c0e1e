"""The AMI identity check against a real Asterisk: after its login the client reads the
PBX's global GW_PBX and uses the link only when the PBX is the one configured."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from gateway.ami import AMI_PBX_MISMATCH, AmiClient, AmiError
from tests.support.pbx import Pbx, free_port

pytestmark = [pytest.mark.pbx, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def named_pbx(pbx_root: Path) -> Iterator[Pbx]:
    pbx = Pbx(root=pbx_root, gw_agi=f"127.0.0.1:{free_port()}", globals={"GW_PBX": "pbx1"})
    pbx.start()
    yield pbx
    pbx.stop()


@pytest_asyncio.fixture
async def pbx(named_pbx: Pbx):
    named_pbx.cli("dialplan set global GW_PBX pbx1")
    yield named_pbx
    named_pbx.cli("dialplan set global GW_PBX pbx1")


@pytest_asyncio.fixture
async def client_for(pbx: Pbx):
    clients: list[AmiClient] = []

    def make(expected: str, *, single_pbx: bool) -> AmiClient:
        client = AmiClient(pbx.ami_host, pbx.ami_port, pbx.ami_user, pbx.ami_secret,
                           expected_pbx=expected, single_pbx=single_pbx)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.stop()


async def test_the_pbx_named_as_configured_is_connected(pbx, client_for):
    client = client_for("pbx1", single_pbx=False)
    await client.start()
    assert client.state == "connected"
    status = client.status()
    assert (status["pbx"], status["pbx_reported"]) == ("pbx1", "pbx1")
    # the link is usable: the account's permissions carry Getvar and the rest
    assert (await client.action({"Action": "Ping"}))["Ping"] == "Pong"


async def test_a_pbx_named_otherwise_fails_start_with_a_clear_message(pbx, client_for):
    client = client_for("pbx2", single_pbx=True)
    with pytest.raises(AmiError) as caught:
        await client.start()
    assert caught.value.code == AMI_PBX_MISMATCH
    assert caught.value.message == (
        f"PBX identity mismatch: configured 'pbx2', the PBX at {pbx.ami_host}:{pbx.ami_port} "
        "says it is 'pbx1' (GW_PBX)")
    assert client.state == "misconfigured"
    assert client.status()["pbx_reported"] == "pbx1"


async def test_an_unnamed_pbx_is_accepted_alone_and_refused_among_several(pbx, client_for):
    pbx.cli('dialplan set global GW_PBX ""')  # a dialplan from before PBX names

    alone = client_for("default", single_pbx=True)
    with capture_logs() as logs:
        await alone.start()
    assert alone.state == "connected"
    assert alone.status()["pbx_reported"] == ""
    assert [e["log_level"] for e in logs if e["event"] == "pbx_unnamed"] == ["warning"]

    among_several = client_for("pbx1", single_pbx=False)
    with pytest.raises(AmiError) as caught:
        await among_several.start()
    assert caught.value.code == AMI_PBX_MISMATCH
    assert "configured 'pbx1'" in caught.value.message
    assert f"{pbx.ami_host}:{pbx.ami_port}" in caught.value.message
    assert "GW_PBX is empty" in caught.value.message
    assert among_several.state == "misconfigured"


class Relay:
    """A TCP relay in front of the PBX's AMI port whose connections the test can cut,
    as a network fault would: the client then reconnects through it."""

    def __init__(self, port: int):
        self.target = port
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def test_a_pbx_renamed_before_a_reconnect_is_misconfigured_until_fixed(pbx):
    relay = Relay(pbx.ami_port)
    port = await relay.start()
    client = AmiClient(pbx.ami_host, port, pbx.ami_user, pbx.ami_secret,
                       expected_pbx="pbx1", single_pbx=False, misconfigured_retry=0.2,
                       backoff_initial=0.05, backoff_max=0.2)
    logins = 0

    def counted() -> None:
        nonlocal logins
        logins += 1

    client.on_connect(counted)
    try:
        await client.start()
        await wait_for(lambda: logins == 1)
        await pbx.acli("dialplan set global GW_PBX pbx2")
        relay.cut()
        await wait_for(lambda: client.state == "misconfigured")
        status = client.status()
        assert status["pbx_reported"] == "pbx2"
        assert (f"configured 'pbx1', the PBX at 127.0.0.1:{port} says it is 'pbx2' (GW_PBX)"
                in (status["last_error"] or ""))
        with pytest.raises(AmiError):
            await client.action({"Action": "Ping"})
        assert logins == 1

        await pbx.acli("dialplan set global GW_PBX pbx1")  # the operator's fix
        await wait_for(lambda: client.state == "connected" and logins == 2)
        assert client.status()["pbx_reported"] == "pbx1"
        assert (await client.action({"Action": "Ping"}))["Ping"] == "Pong"
    finally:
        await client.stop()
        await relay.close()


async def wait_for(predicate, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
