"""FastAGI wire format: the environment block, replies and argument quoting.

Pure functions over text; no sockets and no knowledge of what the calls are for.
The reply formats follow Asterisk's ``res_agi.c``:

- ``200 result=1 (tenant1)`` -- value in parentheses, may hold spaces and parentheses
- ``200 result=0 endpos=1234`` / ``200 result= (timeout)``
- ``100 result=0 Trying...`` -- interim line before the final reply (GOSUB)
- ``510 Invalid or unknown command`` / ``511 Command Not Permitted on a dead channel…``
- ``520-Invalid command syntax.  Proper usage follows:`` … ``520 End of proper usage.``
- ``HANGUP`` -- unsolicited, sent once when the channel hangs up (not a reply)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "HANGUP_LINE",
    "USAGE_END",
    "AgiCommandError",
    "AgiConnectionClosed",
    "AgiError",
    "AgiProtocolError",
    "AgiReply",
    "AgiRequest",
    "AgiTimeout",
    "is_multiline_start",
    "parse_environment",
    "parse_reply",
    "quote",
]

HANGUP_LINE = "HANGUP"
USAGE_END = "520 End of proper usage."

_REPLY_RE = re.compile(r"^(?P<code>\d{3})(?P<sep>[ -]|$)(?P<rest>.*)$", re.DOTALL)
_ARG_RE = re.compile(r"^arg_(\d+)$")


class AgiError(Exception):
    """Base of every error raised by the AGI layer."""


class AgiProtocolError(AgiError):
    """The peer sent something that is not valid FastAGI; ``raw`` keeps what it sent."""

    def __init__(self, message: str, raw: str = "") -> None:
        super().__init__(message)
        self.raw = raw


class AgiTimeout(AgiError, TimeoutError):
    """The peer did not answer within the allotted time."""


class AgiConnectionClosed(AgiError, ConnectionError):
    """The peer closed the connection (Asterisk ended the AGI)."""


class AgiCommandError(AgiError):
    """A helper got a reply it cannot turn into a value; ``reply`` is that reply."""

    def __init__(self, message: str, reply: AgiReply) -> None:
        super().__init__(message)
        self.reply = reply


def _strip_eol(line: str) -> str:
    if line.endswith("\n"):
        line = line[:-1]
    if line.endswith("\r"):
        line = line[:-1]
    return line


@dataclass(frozen=True)
class AgiRequest:
    """One FastAGI request, as Asterisk announced it in the environment block."""

    script: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)

    def _get(self, key: str) -> str:
        return self.env.get(key, "")

    @property
    def channel(self) -> str:
        return self._get("channel")

    @property
    def uniqueid(self) -> str:
        return self._get("uniqueid")

    @property
    def callerid(self) -> str:
        return self._get("callerid")

    @property
    def extension(self) -> str:
        return self._get("extension")

    @property
    def context(self) -> str:
        return self._get("context")

    @property
    def request(self) -> str:
        return self._get("request")


def _script_name(env: Mapping[str, str]) -> str:
    script = env.get("network_script")
    if script is None:
        # Older or odd clients: fall back to the path of agi://host:port/<script>.
        url = env.get("request", "")
        _, sep, after = url.partition("://")
        script = after.partition("/")[2] if sep else ""
    script = script.lstrip("/")
    for stop in ("/", "?"):
        script = script.partition(stop)[0]
    return script


def parse_environment(lines: Iterable[str]) -> AgiRequest:
    """Build a request from the ``agi_key: value`` lines of the environment block.

    Line terminators are stripped; an empty line ends the block (anything after it is
    ignored). A line that is not ``agi_<key>: <value>``, a repeated key, or a NUL
    character (Asterisk writes C strings: a NUL cannot come from it, and PostgreSQL
    refuses it in text) raises :class:`AgiProtocolError`.
    """
    env: dict[str, str] = {}
    numbered_args: dict[int, str] = {}
    for raw_line in lines:
        line = _strip_eol(raw_line)
        if line == "":
            break
        if "\x00" in line:
            raise AgiProtocolError(f"NUL in an AGI environment line: {line!r}", raw=line)
        key, sep, value = line.partition(":")
        if not sep or not key.startswith("agi_") or len(key) == len("agi_") or " " in key:
            raise AgiProtocolError(f"not an AGI environment line: {line!r}", raw=line)
        key = key[len("agi_") :]
        if value.startswith(" "):
            value = value[1:]
        if key in env:
            raise AgiProtocolError(f"repeated AGI environment key: {key!r}", raw=line)
        env[key] = value
        match = _ARG_RE.match(key)
        if match:
            numbered_args[int(match.group(1))] = value
    args = tuple(value for _, value in sorted(numbered_args.items()))
    return AgiRequest(script=_script_name(env), args=args, env=MappingProxyType(env))


@dataclass(frozen=True)
class AgiReply:
    """Asterisk's answer to one command. Error codes (510, 511, 520) are replies too."""

    code: int
    result: str | None
    data: str | None
    raw: str

    @property
    def ok(self) -> bool:
        """True for a ``200`` reply."""
        return self.code == 200


def is_multiline_start(line: str) -> bool:
    """True if ``line`` opens a multi-line reply (``520-…``) that ends with :data:`USAGE_END`."""
    return len(line) > 3 and line[:3].isdigit() and line[3] == "-"


def parse_reply(lines: str | Sequence[str]) -> AgiReply:
    """Parse one complete reply: a single line, or the lines of a multi-line ``520``.

    ``result`` is the token after ``result=`` (``None`` when absent); ``data`` is the text
    between the first ``(`` and the last ``)`` following it (``None`` when absent).
    """
    if isinstance(lines, str):
        lines = lines.splitlines() or [""]
    stripped = [_strip_eol(line) for line in lines]
    raw = "\n".join(stripped)
    if not stripped:
        raise AgiProtocolError("empty reply", raw=raw)
    first = stripped[0]
    match = _REPLY_RE.match(first)
    if match is None:
        raise AgiProtocolError(f"not an AGI reply: {first!r}", raw=raw)
    code = int(match.group("code"))
    if match.group("sep") == "-":
        if len(stripped) < 2 or not stripped[-1].endswith(USAGE_END):
            raise AgiProtocolError("unterminated multi-line reply", raw=raw)
        return AgiReply(code=code, result=None, data=None, raw=raw)
    if len(stripped) != 1:
        raise AgiProtocolError("extra lines after a single-line reply", raw=raw)

    rest = match.group("rest")
    result: str | None = None
    data: str | None = None
    if rest.startswith("result="):
        result, _, rest = rest[len("result=") :].partition(" ")
        rest = rest.lstrip(" ")
        if rest.startswith("("):
            close = rest.rfind(")")
            if close > 0:
                data = rest[1:close]
    elif code == 200:
        raise AgiProtocolError(f"200 reply without result=: {first!r}", raw=raw)
    return AgiReply(code=code, result=result, data=data, raw=raw)


def quote(value: str) -> str:
    """Quote one command argument the way Asterisk's ``parse_args`` reads it back.

    Wraps ``value`` in double quotes and escapes backslashes and double quotes. A line
    break would end the command early, so ``\\n`` and ``\\r`` (and NUL) are rejected with
    :class:`ValueError`.
    """
    if any(ch in value for ch in "\n\r\x00"):
        raise ValueError("an AGI argument cannot contain a line break or NUL")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
