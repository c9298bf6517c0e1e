"""What the crash rule reads from a real Asterisk 22 (docs/billing.md, "Recovery"): when
the PBX's current run started (``CoreStatus``, in its local time, with the offset its
``STRFTIME`` gives), and each AMI link's life across a SIGKILL and a new start."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ami import AmiClient
from tests.support.fleet import FleetPbx
from tests.support.pbx import free_port
from tests.support.waiting import eventually

pytestmark = [pytest.mark.pbx, pytest.mark.timeout(120)]


@pytest.fixture
def pbx(pbx_root: Path) -> Iterator[FleetPbx]:
    pbx = FleetPbx("pbx1", root=pbx_root, gw_agi=f"127.0.0.1:{free_port()}")
    pbx.start()
    yield pbx
    pbx.stop()


async def test_core_status_and_the_links_lives_across_a_crash(pbx):
    client = AmiClient(pbx.ami_host, pbx.ami_port, pbx.ami_user, pbx.ami_secret,
                       expected_pbx="pbx1", backoff_initial=0.1, backoff_max=0.5)
    await client.start()
    try:
        before = await client.core_status()
        now = dt.datetime.now(dt.UTC)
        # the start is in the past, recent (this test started it), in UTC, whole seconds
        assert before.started_at is not None and before.started_at.microsecond == 0
        assert now - dt.timedelta(seconds=120) < before.started_at <= now, before
        assert abs(before.clock_ahead) < 2 and before.current_calls == 0  # one clock here
        [first] = client.link_history()
        assert first.pbx_started_at == before.started_at
        await asyncio.sleep(1.1)  # the new run starts in a later second
        killed_at = time.time()
        await asyncio.to_thread(pbx.restart, crash=True)
        await eventually(lambda: client.state == "connected"
                         and len(client.link_history()) == 2, within=30)
        after = await client.core_status()
        old, new = client.link_history()
        assert old is first and old.lost_at is not None
        # the crashed run was last heard before it was killed; the new run started after
        assert old.last_heard <= killed_at + 0.5
        assert after.started_at is not None
        assert after.started_at > before.started_at
        assert after.started_at.timestamp() >= int(killed_at)
        assert new.pbx_started_at == after.started_at
        assert client.status()["pbx_started_at"] == after.started_at.isoformat()
    finally:
        await client.stop()
