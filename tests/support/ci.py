"""Whether a missing real part (PostgreSQL, Asterisk, Chromium) skips or fails a test."""

from __future__ import annotations

import os

import pytest

__all__ = ["IN_CI", "need"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def need(reason: str) -> None:
    """Fail in CI, skip elsewhere: a test that needs a real part never passes without it."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)  # outside CI only: under CI=true the line above failed
