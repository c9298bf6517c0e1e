"""The end-to-end bench (``bench/e2e_bench.py``) runs at a tiny size through the real
Asterisk: it is a script nobody runs every day, so the suite makes sure it still works
and still prints every figure issue 10 names, read from the gateway's own ``/metrics``
and ``/status`` over HTTP (the gateway runs as its own process). Only what it reports
is checked (every call completed and was settled, each figure present), never how
fast anything was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.pbx
@pytest.mark.db
def test_a_tiny_run_through_asterisk_prints_every_figure(pbx_root):
    res = subprocess.run(
        [sys.executable, "-m", "bench.e2e_bench", "--rate", "4", "--calls", "8",
         "--ramp", "4", "--step-seconds", "2", "--hold-ms", "200", "--budget", "120",
         "--pbx-root", str(pbx_root)],
        cwd=REPO, env=os.environ.copy(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=300)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    # part 1: both modes completed every call; the post-dial delay of each
    for mode in ("gateway", "direct"):
        assert re.search(rf"^  {mode}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+8/8$", out,
                         re.M), out
    assert re.search(r"^  gateway adds -?[\d.]+ ms at the median \(target <= 3 ms: (met|NOT met)\)"
                     r" and -?[\d.]+ ms at p99 \(target <= 8 ms: (met|NOT met)\)$", out, re.M), out
    # the gateway's handler and authorisation timings, from its /metrics
    handler = re.search(r"of which the gateway's AGI handler \(mean\) ([\d.]+) ms: authorise "
                        r"([\d.]+) ms", out)
    assert handler is not None and float(handler.group(1)) >= float(handler.group(2)) > 0, out
    assert re.search(r"manager queue: \d+ messages a call through the gateway, \d+ direct",
                     out), out
    cpu = re.search(r"^    gateway  (.*)$", out.split("CPU per call (ms)")[1], re.M)
    assert cpu is not None and "gateway (python)" in cpu.group(1) \
        and "asterisk" in cpu.group(1), out
    # part 2: every call of the step decided and settled, as /status and the database say
    step = out.split("part 2: ramp")[1]
    assert re.search(r"gateway: AGI outbound handler \(8 calls\)", step), out
    assert "decisions {'ALLOW/FUNDED': 8}" in step, out
    assert "calls in the database after the step: {'settled': 8}" in step, out
    assert re.search(r"database: gateway pool in use avg [\d.]+/10,", step), out
    assert "gateway AMI events waiting for handlers: max " in step, out
    assert "gateway: every call completed up to 4 calls/s" in out, out
    assert "direct: every call completed up to 4 calls/s" in out, out
