"""structlog set-up: JSON lines in production, readable lines on a terminal.

Everything goes out through one processor chain: the gateway's own structlog loggers and
the standard library's ``logging`` (asyncio, asyncpg, aiohttp), so a traceback from a
library is one JSON line too. Two processors guard that chain:

- ``Redactor`` replaces every configured secret (tokens, the AMI secret, database
  passwords) wherever it appears in a line, exception text included;
- ``RateLimiter`` lets a repeated warning or error through a few times per window and
  then counts it instead, so a flood (a refused AGI peer reconnecting, "Too many open
  files" from the event loop) cannot fill the disk or starve the process.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

# secrets shorter than this are not searched for in free text: masking every "pw" in
# every line would garble the logs; structured places (the database URL) mask them anyway
MIN_REDACTED_LENGTH = 4


class Redactor:
    """A processor that replaces each secret string by ``***`` in every value."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_REDACTED_LENGTH},
                                    key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._value(v) for v in value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub(str(value))

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if not self.secrets:
            return event
        return {k: self._value(v) for k, v in event.items()}


class RateLimiter:
    """Lets each (level, logger, event) of level warning and above through ``burst``
    times per ``window`` seconds; the rest are dropped and counted, and the first line
    of the next window says how many were (``suppressed``)."""

    def __init__(self, burst: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, str, str], list[float | int]] = {}

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        level = event.get("level", method)
        if LEVELS.get(str(level), logging.WARNING) < logging.WARNING:
            return event
        key = (str(level), str(event.get("logger", "")), str(event.get("event", "")))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window:
            suppressed = int(seen[2]) if seen is not None else 0
            self._seen[key] = [now, 1, 0]
            if len(self._seen) > 10_000:  # keys are event names: bounded in practice
                self._seen = {key: self._seen[key]}
            if suppressed:
                event["suppressed"] = suppressed
            return event
        seen[1] += 1
        if seen[1] <= self.burst:
            return event
        seen[2] += 1
        raise structlog.DropEvent


def _add_logger_name(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    record = event.get("_record")
    if record is not None:
        event.setdefault("logger", record.name)
    return event


def configure(fmt: str = "auto", level: str = "info", stream=None,
              secrets: Iterable[str] = ()) -> None:
    """Configure structlog and route the standard library's logging through it."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    limiter = RateLimiter()
    redactor = Redactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        limiter,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redactor,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # The standard library's records (asyncio, asyncpg, aiohttp) take the same path.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_add_logger_name, structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _StructlogHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # libraries stay at warning unless the gateway runs at debug
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.captureWarnings(True)


class _StructlogHandler(logging.StreamHandler):
    """Writes the formatted line; a record that the rate limiter drops writes nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except structlog.DropEvent:
            return
        try:
            self.stream.write(line + self.terminator)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
