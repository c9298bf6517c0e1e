"""What the benchmark (and an operator) can observe from outside the gateway: how long
AGI route handlers and AMI event handlers run (``/metrics``) and how many AMI events
wait for their handlers (``/status``, components.ami.event_backlog)."""

from __future__ import annotations

import asyncio

from gateway.agi import AgiServer
from gateway.ami import AmiClient
from gateway.app import Gateway
from gateway.config import Config
from gateway.metrics import Metrics
from tests.support.agi import agi_outbound
from tests.support.waiting import eventually


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of the registry, 0 when absent."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_agi_route_handler_time_is_in_metrics():
    metrics = Metrics()

    async def outbound(session):
        await asyncio.sleep(0.02)
        await session.set_variable("TEST_DECISION", "1")

    server = AgiServer({"outbound": outbound}, port=0, observe=metrics.observe_agi_handler)
    await server.start()
    try:
        assert await agi_outbound(server.port, "alice", "2125550100") == {"TEST_DECISION": "1"}
    finally:
        await server.stop()
    assert sample(metrics, "gateway_agi_handler_seconds_count", route="outbound") == 1
    assert sample(metrics, "gateway_agi_handler_seconds_sum", route="outbound") >= 0.02
    assert b'gateway_agi_handler_seconds_bucket{le="0.05",route="outbound"} 1.0' \
        in metrics.render()


class TinyAmi:
    """Just enough of an AMI server: a banner, any action answered with Success, and
    events sent on demand."""

    async def start(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        try:
            while True:
                block = (await reader.readuntil(b"\r\n\r\n")).decode()
                action_id = next(line.split(": ", 1)[1] for line in block.split("\r\n")
                                 if line.lower().startswith("actionid: "))
                writer.write(f"Response: Success\r\nActionID: {action_id}\r\n\r\n".encode())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    def send_event(self, name: str, **fields: str) -> None:
        lines = [f"Event: {name}", *(f"{k}: {v}" for k, v in fields.items())]
        self.writers[-1].write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()


async def test_ami_backlog_in_status_and_handler_time_in_metrics():
    metrics = Metrics()
    fake = TinyAmi()
    await fake.start()
    client = AmiClient("127.0.0.1", fake.port, "gateway", "secret",
                       observe=metrics.observe_ami_handler)
    release = asyncio.Event()
    handled: list[str] = []

    async def on_hangup(event: dict[str, str]) -> None:
        await release.wait()  # a slow handler: the next events queue up behind it
        handled.append(event["Uniqueid"])

    client.on_event("Hangup", on_hangup)
    assert client.status()["event_backlog"] == 0
    gateway = Gateway(Config(), configure_logs=False)  # what /metrics reads, not started
    gateway.ami = client
    await client.start()
    try:
        for n in range(3):
            fake.send_event("Hangup", Uniqueid=f"170000000{n}.1")
        await eventually(lambda: client.event_backlog == 2)  # one in the handler, two wait
        assert client.status()["event_backlog"] == 2
        # /metrics refreshes the gauge from the link (as it does the live calls)
        assert gateway.ami_status()["event_backlog"] == 2
        assert sample(metrics, "gateway_ami_event_backlog", pbx="") == 0  # the client's own
        assert sample(gateway.metrics, "gateway_ami_event_backlog", pbx="") == 2
        release.set()
        await eventually(lambda: len(handled) == 3)
        await eventually(lambda: client.event_backlog == 0)
    finally:
        await client.stop()
        await fake.close()
    assert sample(metrics, "gateway_ami_handler_seconds_count", event="Hangup") == 3
    # events nobody handles are not timed
    assert sample(metrics, "gateway_ami_handler_seconds_count", event="FullyBooted") == 0


def test_status_document_carries_the_ami_backlog():
    gateway = Gateway(Config(), configure_logs=False)
    gateway.ami = AmiClient("127.0.0.1", 5038, "gateway", "secret")
    assert gateway.ami_status()["event_backlog"] == 0


async def test_pool_statements_and_requests_are_in_metrics(database_url, repo):
    """How many of the pool-paid requests shared a statement: the requests sent, and
    the statements that carried them (fewer when one pool's requests were coalesced)."""
    from tests.support.gateway import running_gateway
    from tests.support.tenant import standard_tenant

    async with running_gateway(database_url) as gw:
        await standard_tenant(gw.provisioning)
        first = await gw.rater.authorise_outbound("alice", "2125550123")  # now known
        await gw.rater.release(first.call_id)
        # six at once leave in one statement; the releases one by one
        decisions = await asyncio.gather(
            *(gw.rater.authorise_outbound("alice", "2125550123") for _ in range(6)))
        assert all(d.allow for d in decisions)
        for d in decisions:
            await gw.rater.release(d.call_id)
        assert sample(gw.metrics, "gateway_pool_requests") == 14
        assert sample(gw.metrics, "gateway_pool_statements") == 2 + 1 + 6


async def test_database_pool_use_is_in_metrics(database_url):
    """The pool's connections: open, lent out now, and the most it opens."""
    from tests.support.gateway import running_gateway

    async with running_gateway(database_url, db_pool_size=5) as gw:
        assert sample(gw.metrics, "gateway_db_pool_connections_max") == 5

        def in_use() -> float:
            return sample(gw.metrics, "gateway_db_pool_connections_in_use")

        # the gateway's own background work borrows a connection now and then, briefly
        await eventually(lambda: in_use() == 0)
        async with gw.pool.acquire(), gw.pool.acquire():
            await eventually(lambda: in_use() == 2)
            assert sample(gw.metrics, "gateway_db_pool_connections") >= 2
        await eventually(lambda: in_use() == 0)
