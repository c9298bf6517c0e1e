"""The gateway as a real process (``python -m gateway serve``), so that a test can
SIGKILL or SIGTERM it and start another in its place."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.pbx import free_port


class GatewayProcess:
    def __init__(self, *, nofile: int | None = None,
                 argv: tuple[str, ...] = ("-m", "gateway", "serve"), **config: Any):
        """``nofile``: the process's open-files limit, soft and hard (the gateway cannot
        raise it), to put it at the descriptor limit. ``argv``: the interpreter's
        arguments (a bench may start the gateway through a wrapper of its own)."""
        self.nofile = nofile
        self.argv = argv
        self.http_port = free_port()
        self.config = {"http_port": self.http_port, "log_format": "json",
                       "log_level": "info", **config}
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="gw-faults-", suffix=".log")[1])
        self._log = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        for key, value in self.config.items():
            if isinstance(value, list | tuple):
                value = ",".join(value)
            env[f"GATEWAY_{key.upper()}"] = str(value)
        return env

    async def start(self, ready_within: float = 30.0) -> GatewayProcess:
        self._log = self.log_path.open("ab")
        limit = self.nofile

        def lower_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.argv, env=self.env(),
            stdout=self._log, stderr=self._log, start_new_session=True,
            preexec_fn=lower_limit)
        await self.wait_ready(ready_within)
        return self

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{self.http_port}/readyz",
                         timeout=aiohttp.ClientTimeout(total=3)) as r:
            return r.status, await r.json()

    async def status(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{self.http_port}/status",
                         timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json()

    async def wait_ready(self, within: float) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError, aiohttp.ClientError, TimeoutError):
                status, _ = await self.readyz()
                if status == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"gateway not ready in {within} s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    async def kill(self) -> None:
        await self._signal(signal.SIGKILL)

    async def terminate(self, within: float = 20.0) -> int:
        await self._signal(signal.SIGTERM, within)
        assert self.proc is not None
        return self.proc.returncode  # type: ignore[return-value]

    async def _signal(self, sig: int, within: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def close(self) -> None:
        await self.kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
