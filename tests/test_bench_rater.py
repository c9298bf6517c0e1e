"""The rater bench (``bench/rater_bench.py``) runs end to end at a tiny size: it is a
script nobody runs every day, so the suite makes sure it still works and still prints
every figure issue 10 names. Only what it reports is checked (every run has a rate and
latencies, the ratios are printed), never how fast anything was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

RUNS = ("round trip: SELECT 1", "UPDATE..RETURNING, 3 rows", "UPDATE..RETURNING, one hot row",
        "floor: 2 statements, 3 rows", "floor: 2 statements, one hot row", "cycles spread over 3 pools", "cycles on one hot pool", "spread, each alone",
        "hot pool, each alone")


@pytest.mark.db
def test_a_tiny_run_prints_every_run_and_the_ratios():
    res = subprocess.run(
        [sys.executable, "bench/rater_bench.py", "--cycles", "40", "--concurrency", "2",
         "--tenants", "3", "--compare"],
        cwd=REPO, env=os.environ.copy(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=180)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    number = r"(\d+(?:\.\d+)?)"
    rows = re.findall(rf"^\s*(.+?)\s+{number}\s+{number}\s+{number}\s+{number}\s+{number}$",
                      out, re.M)
    assert [label for label, *_ in rows] == list(RUNS), out
    for label, per_s, p50, p99, pg_ms, own_ms in rows:
        assert float(per_s) > 0 and 0 < float(p50) <= float(p99), (label, out)
        assert float(pg_ms) >= 0 and float(own_ms) > 0, (label, out)
    for kind, target in (("spread", "0.35"), ("hot   ", "0.45")):
        assert re.search(rf"^{kind} cycles / updates:\s+[\d.]+  \(target >= {target}: "
                         r"(met|not met); p99 [\d.]+ ms, target < 10 ms\)$", out, re.M), out
    # the ceiling the ratios are read against, and the cycles against it
    for kind in ("spread", "hot   "):
        assert re.search(rf"^{kind} floor / updates:\s+[\d.]+  \(the most a cycle of two"
                         r" commits reached here\); cycles / floor:\s+[\d.]+$", out, re.M), out
    # the hot pool's requests went together: at most the 2 workers per statement
    shared = re.search(r"^hot pool: ([\d.]+) authorisations and settlements per statement",
                       out, re.M)
    assert shared is not None and 1.0 <= float(shared.group(1)) <= 2.0, out
    assert re.search(r"synchronous_commit on,", out), out
