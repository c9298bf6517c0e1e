"""pytest fixtures for the real-PBX tests.

A pytest plugin, loaded for every test by ``tests/conftest.py`` (``pytest_plugins``).

``pbx_root`` (session) makes sure the Debian sid root folder with Asterisk and
SIPp exists, building it with ``.ci/pbx-root.sh`` when missing. Under CI
(``CI=true``) a missing root is a test FAILURE, never a skip: a CI run that
silently skips the PBX tests proves nothing. Elsewhere it skips with the reason.

``make_pbx`` (function) starts ``Pbx`` instances with any ``Pbx`` keyword and
stops every one of them at teardown, whatever the test did.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .asterisk import REPO, Pbx, pbx_root_path, root_ready

BUILD_SCRIPT = REPO / ".ci" / "pbx-root.sh"
BUILD_TIMEOUT = 1200  # seconds; a cold build downloads ~150 MB of packages


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``), where a missing PBX is a failure."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


_root_failure: list[str] = []  # a failed build is tried once per session


def _unavailable(reason: str) -> None:
    if not _root_failure:
        _root_failure.append(reason)
    if in_ci():
        pytest.fail(f"real PBX unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"real PBX unavailable: {reason}")  # outside CI only: CI failed above


@pytest.fixture(scope="session")
def pbx_root() -> Path:
    """The root folder with Asterisk and SIPp, built when missing."""
    root = pbx_root_path()
    if root_ready(root):
        return root
    if _root_failure:
        _unavailable(_root_failure[0])
    if os.geteuid() != 0:
        _unavailable(f"{root} is missing and building it needs root (run {BUILD_SCRIPT} as root)")
    try:
        res = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            env={**os.environ, "PBX_ROOT": str(root)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BUILD_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"{BUILD_SCRIPT} did not run: {e}")
    if res.returncode != 0 or not root_ready(root):
        tail = (res.stdout + res.stderr).decode(errors="replace")[-3000:]
        _unavailable(f"{BUILD_SCRIPT} exited {res.returncode}:\n{tail}")
    return root


@pytest.fixture
def make_pbx(pbx_root: Path) -> Iterator[Callable[..., Pbx]]:
    """Start ``Pbx`` instances (any ``Pbx`` keyword); every one is stopped at teardown."""
    started: list[Pbx] = []

    def factory(**kwargs) -> Pbx:
        pbx = Pbx(root=pbx_root, **kwargs)
        started.append(pbx)
        return pbx.start()

    try:
        yield factory
    finally:
        for pbx in started:
            pbx.stop()
