# ruff: noqa: ASYNC220, ASYNC221, ASYNC230 - set-up steps of a test may block the loop
"""A new user's first run: a fresh clone, the README's run command, no database URL.
The gateway must come up on its embedded PostgreSQL, say so first, answer /healthz,
and report the database up and AMI not configured on /status."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess

import aiohttp
import pytest

from tests.support.ci import need
from tests.support.pbx import free_port

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
async def test_fresh_clone_serves_on_the_embedded_database(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                      capture_output=True).returncode != 0:
        need("a git checkout to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    http_port, agi_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GATEWAY_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(GATEWAY_HTTP_PORT=str(http_port), GATEWAY_AGI_PORT=str(agi_port),
               GATEWAY_LOG_FORMAT="json")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["scripts/serve"], cwd=clone, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status = None
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):  # set-up installs the package: give it minutes
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{http_port}/healthz") as r:
                        healthz = r.status
                    async with http.get(f"http://127.0.0.1:{http_port}/status") as r:
                        status = await r.json()
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.5)
        assert status is not None, log_path.read_text()[-3000:]
        assert healthz == 200
        comps = status["components"]
        assert comps["database"]["state"] == "up" and comps["database"]["mode"] == "embedded"
        assert comps["ami"]["state"] == "not_configured"
        assert "GATEWAY_AMI_HOST" in comps["ami"]["reason"]
        assert comps["agi"]["state"] == "up"
        # the first line the gateway itself logs says which database it uses
        events = [json.loads(line) for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        assert events[0]["event"] == "gateway_starting" and events[0]["database"] == "embedded"
        assert (clone / "var" / "pgdata").is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
