"""The memory bench (``bench/memory_bench.py``) runs end to end at a tiny size: the
gateway as a process holding a few live calls at each level, then hung up. Only what it
reports is checked (each level's live table and open calls, a slope per pair of levels,
the table and the database back to no call, the traced heap's diff), never how much
memory anything took."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent


def test_metrics_carry_the_process_resident_memory():
    text = Metrics().render().decode()
    rss = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert rss is not None, text
    assert float(rss.group(1)) > 0


@pytest.mark.db
def test_a_tiny_traced_run_reports_each_level_and_the_hang_up():
    res = subprocess.run(
        [sys.executable, "-m", "bench.memory_bench", "--levels", "0,2,5", "--settle", "0.1",
         "--warmup", "2", "--rounds", "2", "--trace", "--top", "3"],
        cwd=REPO, env=os.environ.copy(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=240)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+|hung up)\s+([\d.]+)\s+(\d+)\s+(\d+)$", out, re.M)
    # each level's calls are all in the live table and open in the database; after the
    # hang-up none is left in either
    assert [(n, live, db) for n, _, live, db in rows] == [
        ("0", "0", "0"), ("2", "2", "2"), ("5", "5", "5"), ("hung up", "0", "0")], out
    assert all(float(mib) > 0 for _, mib, _, _ in rows), out
    slopes = re.findall(r"^  (\d+) -> (\d+) calls: (-?[\d.]+) KiB per call$", out, re.M)
    assert [(lo, hi) for lo, hi, _ in slopes] == [("0", "2"), ("2", "5"), ("0", "5")], out
    assert re.search(r"^target < 100 KiB per live call \(2 -> 5 calls\): (met|NOT met)$",
                     out, re.M), out
    assert re.search(r"^after hang-up: live table 0, open calls in the database 0;", out,
                     re.M), out
    # a second round holds the most calls again, and ends them all again
    assert re.search(r"^round 2: 5 live calls [\d.]+ MiB \([+-]\d+ KiB against the first "
                     r"round's\), live table 5; after hang-up [\d.]+ MiB, live table 0, open "
                     r"calls in the database 0$", out, re.M), out
    # the traced run says what the heap keeps once the calls are gone, and names where
    # it grew, line by line
    assert re.search(r"^after hang-up the traced heap keeps -?\d+ B per call of the 5 calls",
                     out, re.M), out
    assert re.search(r"^traced Python heap, 2 -> 5 calls: -?[\d.]+ KiB per call$", out,
                     re.M), out
    grew = out.split("source lines by growth")[-1].split("source lines kept")[0]
    kept = out.split("source lines kept after the hang-up")[-1]
    for section in (grew, kept):
        lines = section.strip().splitlines()[1:4]
        assert len(lines) == 3 and all(re.search(r"B .*:\d+$", x) for x in lines), out
