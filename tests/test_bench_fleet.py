"""The fleet bench (``bench/fleet_bench.py``) runs end to end at a tiny size: it is a
script nobody runs every day, so the suite makes sure it still works. Only what it
reports is checked (every call completed, each PBX's calls handled by its own gateway
process, a figure per run), never how fast anything was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(*args: str, timeout: float) -> str:
    res = subprocess.run([sys.executable, "-m", "bench.fleet_bench", *args], cwd=REPO,
                         env=os.environ.copy(), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.db
def test_rater_run_with_one_and_two_processes():
    out = run_bench("rater", "--processes", "1,2", "--seconds", "0.5", "--tenants", "3",
                    "--concurrency", "1", "--start-delay", "2", timeout=180)
    rows = re.findall(r"^  (spread over 3 pools|one hot pool)\s+(\d)\s+(\d+)\s+([\d.]+)", out,
                      re.M)
    assert [(kind, procs) for kind, procs, _, _ in rows] == [
        ("spread over 3 pools", "1"), ("spread over 3 pools", "2"),
        ("one hot pool", "1"), ("one hot pool", "2")], out
    assert all(int(cycles) > 0 for _, _, cycles, _ in rows), out
    # each kind's first run is its own baseline
    assert [ratio for _, procs, _, ratio in rows if procs == "1"] == ["1.00", "1.00"], out
    assert "spread: 2 processes give" in out and "hot pool: 2 processes give" in out, out


@pytest.mark.pbx
@pytest.mark.fleet
@pytest.mark.db
def test_two_pbxs_two_gateways_against_one_of_each(pbx_root):
    out = run_bench("calls", "--ramp", "4", "--step-seconds", "2", "--warmup-rate", "2",
                    "--budget", "120", "--pbx-root", str(pbx_root), timeout=300)
    assert "single: every call completed up to 4 calls/s" in out, out
    assert "fleet: every call completed up to 4 calls/s" in out, out
    fleet_step = out.split("  fleet  4 calls/s in all")[-1]
    # each PBX's calls were decided by the gateway that owns it, and all were settled
    assert "'pbx1 by gw-a settled': 4" in fleet_step, out
    assert "'pbx2 by gw-b settled': 4" in fleet_step, out
    assert "'gw-a outbound ALLOW FUNDED': 4, 'gw-b outbound ALLOW FUNDED': 4" in fleet_step, out
    assert "ratio fleet/single (highest clean total rate): 1.00" in out, out
