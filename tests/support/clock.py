"""A settable clock for the rater and the gateway."""

from __future__ import annotations

import datetime as dt

__all__ = ["Clock"]


class Clock:
    """A clock tests can set and move."""

    def __init__(self, now: dt.datetime):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += dt.timedelta(**kw)
