"""Idle and half-sent HTTP connections never stop call decisions (issue: 250 half-sent
requests once made an AGI session hang for 40 s and flooded the log with "Too many open
files" tracebacks)."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tests.faults.invariants import assert_invariants
from tests.faults.process import GatewayProcess
from tests.support.agi import agi_outbound
from tests.support.pbx import free_port

pytestmark = [pytest.mark.faults, pytest.mark.db]

DESCRIPTORS = 256  # the gateway process's hard limit: it cannot raise it
SLOW_CLIENTS = 400  # more than the process has descriptors


async def half_sent_request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    writer.write(b"GET /status HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")  # never finished
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Did the server close the connection within ``within`` seconds? A server that
    closes a socket holding bytes it never read (the half-sent header) makes the kernel
    send a reset instead of an orderly end: whichever arrives depends on whether those
    bytes came in before the close, so a reset counts as closed too."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, ConnectionError):
        return False


async def test_half_sent_http_requests_at_the_descriptor_limit_leave_agi_answering(database_url):
    agi_port = free_port()
    gw = GatewayProcess(nofile=DESCRIPTORS, database_url=database_url, agi_port=agi_port,
                        agi_max_sessions=50, http_header_timeout_seconds=2,
                        reconcile_interval_seconds=3600)
    await gw.start()
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        opened = await asyncio.gather(*(half_sent_request(gw.http_port)
                                        for _ in range(SLOW_CLIENTS)))
        clients = [c for c in opened if c is not None]
        # call decisions keep coming while the HTTP side is saturated: each answered in
        # the AGI client's own 5 s bound (an unknown caller is rejected after a lookup)
        for i in range(20):
            answer = await agi_outbound(agi_port, f"nobody-{i}", "2125550100")
            assert answer.get("GW_DECISION") == "REJECT"
            assert answer.get("GW_REASON") == "UNKNOWN_CALLER"
        # the half-sent requests are closed: at once over the cap, after the header timeout
        # for the rest
        closed = await asyncio.gather(*(closed_by_server(r, 6) for r, _ in clients))
        assert all(closed)
        status = await gw.status()
        assert status["http"]["refused"] > 0
        assert status["http"]["header_timeouts"] > 0
        assert status["http"]["max"] <= DESCRIPTORS - 50 - 64
        assert status["http"]["open"] <= 1  # only this request's own connection
        status_code, _ = await gw.readyz()
        assert status_code == 200
    finally:
        for _, writer in clients:
            writer.close()
        await gw.terminate()
    lines = gw.log_lines()
    for line in lines:
        json.loads(line)  # no plain-text traceback inside the JSON log
    # warnings are limited per kind: a flood of refusals is a few lines plus a count
    assert len(lines) < 100, "\n".join(lines[-20:])
    out_of_files = [line for line in lines if "Too many open files" in line]
    assert not out_of_files, out_of_files[:3]
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        await assert_invariants(pool)
    finally:
        await pool.close()
