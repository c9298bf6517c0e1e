"""Every process the PBX tools start, tracked so that none outlives the test run.

Asterisk and SIPp each run in their own session (process group); ``track()`` them when
started and ``untrack()`` them once reaped. Whatever is still tracked when the Python
process exits is killed with its whole group (``kill_leftovers()``, run at exit).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess

from gateway.lab import group_alive

__all__ = ["PbxError", "group_alive", "kill_leftovers", "track", "untrack"]

_LIVE_PROCS: set[subprocess.Popen | asyncio.subprocess.Process] = set()


class PbxError(RuntimeError):
    """The PBX or SIPp could not be started or driven."""


def track(proc: subprocess.Popen | asyncio.subprocess.Process) -> None:
    """Kill ``proc``'s process group at exit unless ``untrack()`` is called first."""
    _LIVE_PROCS.add(proc)


def untrack(proc: subprocess.Popen | asyncio.subprocess.Process | None) -> None:
    """``proc`` has ended (or is stopped by its owner): no need to kill it at exit."""
    _LIVE_PROCS.discard(proc)


def kill_leftovers() -> None:
    """Kill the process group of every tracked process that is still running."""
    for proc in list(_LIVE_PROCS):
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)  # each runs in its own session


atexit.register(kill_leftovers)
