"""The operator page in a real browser: headless Chromium loads / from a started
gateway, the page's JavaScript fetches /status with the token from ?token= and draws
the PBXs (one owned here, one on standby), the live call, the tenant's pool and its
wallet. Checked twice: the DOM after the scripts ran (--dump-dom) and a screenshot that
must not be blank."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from gateway.config import PbxConfig
from tests.support.agi import agi_outbound
from tests.support.ci import need
from tests.support.gateway import READ, running_gateway
from tests.support.png import colours, png_rows
from tests.support.tenant import TENANT, standard_tenant

pytestmark = pytest.mark.db

# Where the screenshot is kept when set (to look at it); a temporary folder otherwise.
SCREENSHOT_DIR = os.environ.get("GATEWAY_SCREENSHOT_DIR")


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        need("chromium (apt-get install chromium) for the operator page test")
    return path


async def run_chromium(binary: str, profile: str, *args: str) -> bytes:
    """One headless run; its own profile folder so that two runs can go side by side.
    Async, so that the gateway in this event loop keeps answering the page."""
    proc = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,900",
        "--virtual-time-budget=5000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def row(html: str, marker: str) -> str:
    """The table row (``<tr ...>...</tr>``) whose opening tag carries ``marker``."""
    start = html.find(marker)
    assert start >= 0, f"no row with {marker}"
    start = html.rfind("<tr", 0, start)
    return html[start:html.index("</tr>", start)]


async def test_operator_page_draws_pbxs_calls_pools_and_wallets(database_url, admin, repo,
                                                                 tmp_path):
    binary = chromium()
    await standard_tenant(admin, wallet="20.00")
    # a small pool, so that the live call's reserved slice shows on its gauge
    await admin.set_allotment("CA", "domestic", 10)
    # two PBXs: pbx-east is ours (its AGI requests come from here; no AMI); pbx-west is
    # held by another live process, so this one is on standby for it and never opens
    # the AMI link configured for it (nothing listens there)
    await repo.pool.execute("INSERT INTO pbx_leases (pbx, owner, expires_at)"
                            " VALUES ('pbx-west', 'gw-other', now() + interval '1 hour')")
    pbxes = (PbxConfig(name="pbx-east", agi_peers=("127.0.0.1",)),
             PbxConfig(name="pbx-west", ami_host="127.0.0.1", ami_port=9, ami_secret="s"))
    async with running_gateway(database_url, pbx=pbxes, instance_name="gw-here") as gw:
        reply = await agi_outbound(gw.agi.port, "alice", "+15145550123")
        assert reply["GW_DECISION"] == "ALLOW"
        url = f"http://127.0.0.1:{gw.http_port}/?token={READ}"
        shots = SCREENSHOT_DIR or str(tmp_path)
        png = os.path.join(shots, "operator-page.png")
        dom, _ = await asyncio.gather(
            run_chromium(binary, str(tmp_path / "profile-dom"), "--dump-dom", url),
            run_chromium(binary, str(tmp_path / "profile-shot"), f"--screenshot={png}", url),
        )
    html = dom.decode()
    # drawn by app.js from /status, so the fetch with the token worked
    assert f'data-tenant="{TENANT}"' in html
    assert 'data-pool="CA"' in html and 'data-capacity="20.00"' in html
    assert "Acme Ltd" in html
    assert "0.00 used + 5.00 reserved / 20.00 min" in html  # the live call's slice
    assert 'style="width: 25%;"' in html  # ...drawn as a quarter of the bar
    assert f'data-call="{reply["GW_CALL_ID"]}"' in html
    assert "20.00 USD available" in html
    assert 'class="pill ok">ready<' in html
    assert "Cannot read /status" not in html and "needs a read token" not in html
    # each PBX: who owns it, its AMI link, its calls, its reconciliation and CDR table
    east = row(html, 'data-pbx="pbx-east"')
    assert 'data-owned="true"' in east and "this process" in east and "(gw-here)" in east
    assert "standby" not in east
    assert '<span class="state not_configured"' in east  # no AMI host for it
    assert '<td class="num">1</td>' in east  # the live call is this PBX's
    assert "nothing to do" in east or "kept" in east  # reconciled when the lease was won
    assert 'class="state unverified"' in east  # no settled call to check table cdr with
    west = row(html, 'data-pbx="pbx-west"')
    assert 'data-owned="false"' in west and 'class="standby"' in west
    assert "gw-other" in west and "this process" not in west and "expired" not in west
    assert '<span class="state standby"' in west  # not drawn as an error
    assert "state down" not in west and '<td class="num">0</td>' in west
    assert "by its owner" in west and "checked by its owner" in west
    assert "(1 of 2 owned here)" in html
    assert "<td>pbx-east</td>" in row(html, f'data-call="{reply["GW_CALL_ID"]}"')

    data = open(png, "rb").read()  # noqa: ASYNC230 - the browser is done; a small file
    assert len(data) > 10_000
    width, height, bpp, rows = png_rows(data)
    assert (width, height) == (1200, 900)
    seen = colours(width, bpp, rows)
    assert len(seen) >= 8, f"only {len(seen)} colours: a blank page?"
    background = max(seen.values())
    assert background < 0.9 * sum(seen.values()), "one colour fills nearly everything"
    # the pool's gauge: the amber of "reserved" over a quarter of a 345 px bar, sampled
    # every third pixel of every third row
    amber = seen.get(bytes((0xF0, 0xA5, 0x00)), 0)
    assert amber >= 50, f"the reserved part of the pool's gauge is missing ({amber})"
